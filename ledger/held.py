"""Fills the ledger writer held: what is still missing from the books, and posting it later.

The writer holds a fill it cannot post (an account, instrument or currency its topology does
not know, or a contract newer than its build) and keeps it in the stream, redelivered every
30 s. It also keeps the message's bytes in ``held_fills`` (:mod:`ledger.writer`), because
EXECOUT deletes a message after its max_age whether it was posted or not.

A row is *outstanding* while its region has no transfer of the trade, found by its trade id
(a row with none readable stays outstanding until ``post-held`` reads it). Rows are never deleted:
once the fill posts, the row stays as the record of the hold. So nothing here inserts into or
deletes from ``held_fills`` (``post-held`` only sets a row's trade id once it can read it), and
posting from a row is the writer's own posting (deterministic transfer ids: posting a fill the
stream has since delivered too is a replay, not a second trade). ``post-held`` reads the
amounts' currencies from the topology it is given, and posts nothing whose minor units
disagree with the ledger's own ``currencies`` table.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import psycopg

from ledger.errors import FillRejected
from ledger.model import Transfer, transfers_for_fill
from ledger.store import BatchResult, minor_units, post_transfers
from regions.topology import Topology
from router.contract import ContractError, Fill, decode

_POSTED = (
    "h.trade_id IS NOT NULL AND EXISTS (SELECT 1 FROM transfers t "
    "WHERE t.region = h.region AND t.id = h.trade_id || ':base')"
)
"""A held row's trade is in the books: a transfer of its trade id in its region. A row whose
trade id no build could read yet stays outstanding until ``post-held`` reads it (a stream
sequence alone could name another fill, in a stream recreated since)."""

OUTSTANDING_SQL = (
    "SELECT h.region, h.stream_seq, h.trade_id, h.subject, h.field, h.reason, "
    "h.first_held_ns, h.last_held_ns, h.holds, h.payload FROM held_fills h "
    f"WHERE h.region = ANY(%s) AND NOT ({_POSTED}) ORDER BY h.region, h.stream_seq, h.first_held_ns"
)

OUTSTANDING_COUNT_SQL = f"SELECT count(*) FROM held_fills h WHERE h.region = %s AND NOT ({_POSTED})"
"""How many of a region's held rows are outstanding (the writer's gauge)."""

POSTED_TRADES_SQL = (
    "SELECT id, symbol, qty, price_ticks, price_decimals, credit_account, debit_account, "
    "transact_ns FROM transfers WHERE region = %s AND id = ANY(%s)"
)
"""Which of these base-leg transfer ids are in a region's books, with the trade terms they
were posted with (the writer asks for the held fills it has in hand, by their own trade ids,
never through a row, and compares the terms: :func:`posted_terms_differ`)."""


def posted_terms_differ(data: bytes, posted: Sequence[Any]) -> str:
    """What differs between a held fill's trade terms and the base leg posted under its trade
    id (a POSTED_TRADES_SQL row), "" when they agree or the fill cannot be read (a newer
    build's: its row was posted by ``post-held`` or not at all). A different fill under a
    posted trade id (execution reusing one) is not the trade in the books: acking it as
    posted would drop it unnoticed."""
    try:
        f = decode(Fill, data)
    except Exception:
        return ""
    # the terms ledger.store's replay check compares too (its other columns derive from them)
    _, symbol, qty, px, decimals, buyer, seller, at = posted
    mine = (
        f.symbol, f.qty, f.price_ticks, f.price_decimals, f.buy_account, f.sell_account,
        f.transact_ns,
    )  # fmt: skip
    theirs = (symbol, qty, px, decimals, buyer, seller, at)
    names = (
        "symbol", "qty", "price_ticks", "price_decimals", "buy_account", "sell_account",
        "transact_ns",
    )  # fmt: skip
    pairs = zip(names, mine, theirs, strict=True)
    return ", ".join(f"{n} {b!r} posted, {a!r} here" for n, a, b in pairs if a != b)


UPSERT_SQL = (
    "INSERT INTO held_fills (region, stream_seq, trade_id, subject, field, reason, payload, "
    "payload_sha256, first_held_ns, last_held_ns, holds) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 1) "
    "ON CONFLICT (region, stream_seq, payload_sha256) DO UPDATE SET "
    "last_held_ns = EXCLUDED.last_held_ns, holds = held_fills.holds + 1, "
    "field = EXCLUDED.field, reason = EXCLUDED.reason, "
    "trade_id = COALESCE(EXCLUDED.trade_id, held_fills.trade_id)"
)
"""One hold of a fill: the first inserts its row, each later one counts."""


_SET_TRADE_ID = (
    "UPDATE held_fills SET trade_id = %s WHERE region = %s AND stream_seq = %s "
    "AND payload_sha256 = %s AND trade_id IS NULL"
)


def payload_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def held_trade_id(headers: dict[str, str] | None, data: bytes) -> str | None:
    """The trade id of a fill this build may not read: the payload's ``trade_id`` and its
    message id (execution sets it to the trade id), whichever can be read; None when neither
    can, or when they differ (then neither can be trusted to name the trade)."""
    ids: set[Any] = set()
    if headers and headers.get("Nats-Msg-Id"):
        ids.add(headers["Nats-Msg-Id"])
    with contextlib.suppress(Exception):
        body = msgpack.unpackb(data, raw=False)
        if isinstance(body, dict) and body.get("trade_id") is not None:
            ids.add(body["trade_id"])
    tid = ids.pop() if len(ids) == 1 else None
    return tid if isinstance(tid, str) and 0 < len(tid) <= 64 else None


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldFill:
    """One outstanding held fill: a trade execution reported and the ledger has not posted."""

    region: str
    stream_seq: int
    trade_id: str | None
    subject: str
    field: str
    reason: str
    first_held_ns: int
    last_held_ns: int
    holds: int
    payload: bytes

    def __str__(self) -> str:
        return (
            f"{self.region} EXECOUT seq {self.stream_seq} trade {self.trade_id or '?'}: "
            f"{self.field}: {self.reason} (held {self.holds}x)"
        )


def outstanding(conn: psycopg.Connection[Any], regions: Sequence[str]) -> list[HeldFill]:
    """Held fills of ``regions`` with no transfer yet, oldest stream sequence first."""
    return [_held(r) for r in conn.execute(OUTSTANDING_SQL, (list(regions),))]


def _held(r: Sequence[Any]) -> HeldFill:
    """A row of :data:`OUTSTANDING_SQL`."""
    return HeldFill(
        region=str(r[0]),
        stream_seq=int(r[1]),
        trade_id=r[2],
        subject=str(r[3]),
        field=str(r[4]),
        reason=str(r[5]),
        first_held_ns=int(r[6]),
        last_held_ns=int(r[7]),
        holds=int(r[8]),
        payload=bytes(r[9]),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PostHeldResult:
    posted: list[HeldFill]
    still_held: list[tuple[HeldFill, str]]
    """Each with why this build and topology cannot post it either."""
    batch: BatchResult | None


def transfers_of(h: HeldFill, topology: Topology) -> tuple[Transfer, Transfer]:
    """The held fill's transfers under ``topology``, as the writer would post them from the
    stream (same stream sequence); raises ContractError or FillRejected."""
    return transfers_for_fill(decode(Fill, h.payload), topology, h.region, stream_seq=h.stream_seq)


async def post_held(
    conn: psycopg.AsyncConnection[Any], topology: Topology, region: str
) -> PostHeldResult:
    """Post every outstanding held fill of ``region`` that this build and ``topology`` can
    read, in one transaction (the writer's :func:`ledger.store.post_transfers`)."""
    rows = await (await conn.execute(OUTSTANDING_SQL, ([region],))).fetchall()
    held = [_held(r) for r in rows]
    # the ledger's own currencies, as migrate stored them from the topology the writers run
    minor = await minor_units(conn)  # (ends the read's transaction)
    posted: list[HeldFill] = []
    still: list[tuple[HeldFill, str]] = []
    transfers: list[Transfer] = []
    for h in held:
        try:
            legs = transfers_of(h, topology)
        except (ContractError, FillRejected) as e:
            still.append((h, str(e)))
            continue
        # a topology file that disagrees with the ledger (a stale copy) would scale the
        # amounts by powers of ten, for good: posted once, a trade is never posted again
        bad = [
            f"currency {t.currency}: {topology.currency(t.currency).minor_units} minor units "
            f"in this topology, {minor.get(t.currency)} in the ledger"
            for t in legs
            if minor.get(t.currency) != topology.currency(t.currency).minor_units
        ]
        if bad:
            still.append((h, "; ".join(bad)))
            continue
        transfers.extend(legs)
        posted.append(h)
    batch = None
    async with conn.transaction():
        # a row no build could read the trade id of learns it now, with the posting
        for h, t in zip(posted, transfers[::2], strict=True):
            if h.trade_id is None:
                await conn.execute(
                    _SET_TRADE_ID, (t.trade_id, h.region, h.stream_seq, payload_digest(h.payload))
                )
        if transfers:
            batch = await post_transfers(conn, region, transfers)
    return PostHeldResult(posted=posted, still_held=still, batch=batch)
