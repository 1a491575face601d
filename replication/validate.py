"""Validation of a market-data message as it arrives in a view region.

A quote is accepted only if its subject is ``mrd.<region>.md.<symbol>``, the payload decodes
strictly as a contract :class:`~router.contract.Quote`, the quote names the same region and
symbol as its subject, that region is one of the topology's, both sides have levels sorted best
first with positive prices and sizes, and the book is not crossed (best bid < best ask).
Anything else raises :class:`~replication.errors.QuoteRejected` with one of
:data:`REJECT_REASONS` (the ``reason`` label of ``meridian_md_rejected_total``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

from replication.errors import QuoteRejected
from router.contract import ContractError, Quote, RejectReason, decode

REJECT_REASONS: Final[tuple[str, ...]] = (
    "malformed",
    "invalid_field",
    "bad_subject",
    "wrong_region",
    "wrong_symbol",
    "one_sided",
    "unsorted",
    "crossed",
)


def parse_subject(subject: str) -> tuple[str, str]:
    """``mrd.<region>.md.<symbol>`` -> (region, symbol); raises :class:`QuoteRejected`."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != "mrd" or parts[2] != "md":
        raise QuoteRejected("bad_subject", "subject", "must be mrd.<region>.md.<symbol>")
    return parts[1], parts[3]


def validate_quote(subject: str, data: bytes, *, regions: Collection[str] | None = None) -> Quote:
    """Decode and check one market-data message; returns the quote or raises QuoteRejected."""
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
