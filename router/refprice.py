"""Reference prices for the pre-trade collar, read from the top-of-book read model in Redis.

Key layout (written by replication.topbook): hash ``tob:<view region>:<symbol>`` with integer
fields ``bid_px`` and ``ask_px`` (ticks) among others. Risk in region R reads R's own view.

A price the view marks ``stale`` (its source region silent: a cut link, a region down; or no
live quote since the view restarted) is no reference: an order needing one is rejected
``NO_REFERENCE_PRICE`` rather than collared against a price the market may have left. So is
one whose source time (``src_ns``) is older than :data:`MAX_REF_AGE_S`: the flag is only
written while the view runs, and a view that died (or a pair no longer quoted) leaves its
last prices behind with ``stale`` 0. A book with no source time (seeded, ``src_ns`` 0) is
taken as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from router.risk import RefPrice

MAX_REF_AGE_S = 30.0
"""Oldest source time a reference price may have (the views mark a silent source stale after
about a second; this bounds what a dead view leaves behind)."""


def tob_key(view: str, symbol: str) -> str:
    return f"tob:{view}:{symbol}"


def read_ref_prices(
    pipe: Any, view: str, symbols: Sequence[str]
) -> Callable[[Sequence[Any]], dict[str, RefPrice]]:
    """Queue the reads on a Redis pipeline; returns a parser for their results."""
    for s in symbols:
        pipe.hmget(tob_key(view, s), "bid_px", "ask_px", "stale", "src_ns")

    def parse(results: Sequence[Any]) -> dict[str, RefPrice]:
        out = {}
        oldest = time.time_ns() - int(MAX_REF_AGE_S * 1e9)
        for s, (bid, ask, stale, src_ns) in zip(symbols, results, strict=False):
            if bid is None or ask is None or stale in ("1", b"1"):
                continue
            if src_ns is not None and 0 < int(src_ns) < oldest:
                continue  # a view that stopped writing, or a pair no longer quoted
            b, a = int(bid), int(ask)
            if 0 < b < a:  # a crossed or empty book is no reference
                out[s] = RefPrice(bid_ticks=b, ask_ticks=a)
        return out

    return parse
