"""Reference prices for the pre-trade collar, read from the top-of-book read model in Redis.

Key layout (written by replication.topbook): hash ``tob:<view region>:<symbol>`` with integer
fields ``bid_px`` and ``ask_px`` (ticks) among others. Risk in region R reads R's own view.

A price the view marks ``stale`` (its source region silent: a cut link, a region down; or no
live quote since the view restarted) is no reference: an order needing one is rejected
``NO_REFERENCE_PRICE`` rather than collared against a price the market may have left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from router.risk import RefPrice


def tob_key(view: str, symbol: str) -> str:
    return f"tob:{view}:{symbol}"


def read_ref_prices(
    pipe: Any, view: str, symbols: Sequence[str]
) -> Callable[[Sequence[Any]], dict[str, RefPrice]]:
    """Queue the reads on a Redis pipeline; returns a parser for their results."""
    for s in symbols:
        pipe.hmget(tob_key(view, s), "bid_px", "ask_px", "stale")

    def parse(results: Sequence[Any]) -> dict[str, RefPrice]:
        out = {}
        for s, (bid, ask, stale) in zip(symbols, results, strict=False):
            if bid is None or ask is None or stale in ("1", b"1"):
                continue
            b, a = int(bid), int(ask)
            if 0 < b < a:  # a crossed or empty book is no reference
                out[s] = RefPrice(bid_ticks=b, ask_ticks=a)
        return out

    return parse
