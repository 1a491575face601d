"""Validation of a market-data message as it arrives in a view region.

A quote is accepted only if its subject is ``mrd.<region>.md.<symbol>``, the payload decodes
strictly as a contract :class:`~router.contract.Quote`, the quote names the same region and
symbol as its subject, that region is one of the topology's, the symbol is one of the
topology's instruments and that region executes it (when ``exec_regions`` is given), its
``src_ns`` is not ahead of the receiver's clock by more than :data:`MAX_FUTURE_NS` (when
``now_ns`` is given), both sides have levels sorted best first with positive prices and sizes,
and the book is not crossed (best bid < best ask).
Anything else raises :class:`~replication.errors.QuoteRejected` with one of
:data:`REJECT_REASONS` (the ``reason`` label of ``meridian_md_rejected_total``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Final

from regions.topology import Topology
from replication.errors import QuoteRejected
from router.contract import ContractError, Quote, RejectReason, decode

REJECT_REASONS: Final[tuple[str, ...]] = (
    "malformed",
    "invalid_field",
    "bad_subject",
    "wrong_region",
    "wrong_symbol",
    "unknown_symbol",
    "not_executed",
    "future_src_ns",
    "one_sided",
    "unsorted",
    "crossed",
)

MAX_FUTURE_NS: Final[int] = 1_000_000_000
"""How far a quote's ``src_ns`` may be ahead of the receiver's clock (NTP skew is ms). It must
stay well below the consumer's LP TTL (5 s): a quote stamped further ahead would push every real
LP out of the composite and pin its price, with a negative age, until the clock caught up."""


def executing_regions(topology: Topology) -> dict[str, str]:
    """``symbol -> region that executes it`` (``""`` if none) for every instrument."""
    out = {i.symbol: "" for i in topology.instruments}
    for r in topology.regions:
        for s in r.executes:
            out[s] = r.code
    return out


def parse_subject(subject: str) -> tuple[str, str]:
    """``mrd.<region>.md.<symbol>`` -> (region, symbol); raises :class:`QuoteRejected`."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != "mrd" or parts[2] != "md":
        raise QuoteRejected("bad_subject", "subject", "must be mrd.<region>.md.<symbol>")
    return parts[1], parts[3]


def validate_quote(
    subject: str,
    data: bytes,
    *,
    regions: Collection[str] | None = None,
    exec_regions: Mapping[str, str] | None = None,
    now_ns: int | None = None,
) -> Quote:
    """Decode and check one market-data message; returns the quote or raises QuoteRejected.

    Args:
        subject: Subject the message arrived on.
        data: Its payload.
        regions: Region codes accepted as publishers (``None``: any).
        exec_regions: ``symbol -> executing region`` (see :func:`executing_regions`); a symbol not
            in it is ``unknown_symbol``, one published by another region ``not_executed``
            (``None``: any symbol). Quotes are keyed by symbol in Redis, so a second publisher
            of a symbol would overwrite the executing region's prices.
        now_ns: The receiver's clock, for the ``future_src_ns`` rule (``None``: not checked).
    """
    region, symbol = parse_subject(subject)
    try:
        q = decode(Quote, data)
    except ContractError as e:
        reason = "malformed" if e.reason != RejectReason.INVALID_FIELD else "invalid_field"
        raise QuoteRejected(reason, e.field, e.rule) from e
    if q.region != region or (regions is not None and region not in regions):
        raise QuoteRejected("wrong_region", "region", f"{q.region!r} published on {subject}")
    if q.symbol != symbol:
        raise QuoteRejected("wrong_symbol", "symbol", f"{q.symbol!r} published on {subject}")
    if exec_regions is not None:
        executor = exec_regions.get(symbol)
        if executor is None:
            raise QuoteRejected("unknown_symbol", "symbol", f"{symbol!r} is not an instrument")
        if executor != region:
            rule = f"{symbol!r} is executed in {executor or 'no region'}, not {region!r}"
            raise QuoteRejected("not_executed", "region", rule)
    if now_ns is not None and q.src_ns - now_ns > MAX_FUTURE_NS:
        ahead_ms = (q.src_ns - now_ns) // 1_000_000
        raise QuoteRejected(
            "future_src_ns", "src_ns", f"{ahead_ms} ms ahead of the receiver's clock"
        )
    if not q.bids or not q.asks:
        raise QuoteRejected("one_sided", "bids" if not q.bids else "asks", "needs >= 1 level")
    for i in range(1, len(q.bids)):
        if q.bids[i][0] >= q.bids[i - 1][0]:
            raise QuoteRejected("unsorted", f"bids[{i}]", "bids must be strictly descending")
    for i in range(1, len(q.asks)):
        if q.asks[i][0] <= q.asks[i - 1][0]:
            raise QuoteRejected("unsorted", f"asks[{i}]", "asks must be strictly ascending")
    if q.bids[0][0] >= q.asks[0][0]:
        raise QuoteRejected("crossed", "bids[0]", "best bid must be below best ask")
    return q
