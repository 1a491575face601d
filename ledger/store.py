"""Posting a batch of transfers in ONE transaction (psycopg 3, async).

The batch either commits whole or not at all:

1. lock the region's chain head (``SELECT ... FOR UPDATE``: one writer per region at a time);
2. insert the transfers with ``ON CONFLICT (region, id) DO NOTHING RETURNING id``: the ids that
   come back are the new ones, everything else is a replay and posts nothing. A replay must
   be the same transfer: the ones that did not come back are read once (one query, only in
   a batch that has any) and compared; another fill under a posted trade id (or two fills
   of one trade id in the batch) raises :class:`~ledger.errors.TransferConflict` and the
   batch posts nothing, so the caller drops those fills and posts the rest;
3. COPY the new postings, chained from the head;
4. add the per-(account, currency) deltas to ``balances`` (sorted keys: no deadlocks);
5. move the chain head.

Callers retry the WHOLE call on serialization failures and lost connections
(:func:`ledger.db.is_retryable`); a retry re-reads the head, and transfers that did commit
before the connection was lost come back as replays, so nothing is posted twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import psycopg

from ledger.errors import LedgerConfigError, TransferConflict
from ledger.model import Posting, Transfer, balance_deltas, chain_postings

if TYPE_CHECKING:
    from regions.topology import Topology

TRANSFER_COLUMNS = (
    "region",
    "id",
    "trade_id",
    "leg",
    "symbol",
    "currency",
    "amount",
    "debit_account",
    "credit_account",
    "price_ticks",
    "price_decimals",
    "qty",
    "transact_ns",
    "recorded_ns",
    "stream_seq",
)
_TRANSFER_TYPES = (
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "int8",
    "text",
    "text",
    "int8",
    "int2",
    "int8",
    "int8",
    "int8",
    "int8",
)
_INSERT_TRANSFERS = (
    f"INSERT INTO transfers ({', '.join(TRANSFER_COLUMNS)}) "
    "SELECT * FROM unnest("
    + ", ".join(f"%s::{t}[]" for t in _TRANSFER_TYPES)
    + ") ON CONFLICT (region, id) DO NOTHING RETURNING id"
)
POSTING_COLUMNS = (
    "region",
    "id",
    "transfer_id",
    "account",
    "currency",
    "amount",
    "transact_ns",
    "recorded_ns",
    "prev_hash",
    "hash",
)


def posting_row(p: Posting) -> tuple[object, ...]:
    """A posting as a row of :data:`POSTING_COLUMNS`, in that order."""
    return (
        p.region,
        p.id,
        p.transfer_id,
        p.account,
        p.currency,
        p.amount,
        p.transact_ns,
        p.recorded_ns,
        p.prev_hash,
        p.hash,
    )


_UPSERT_BALANCES = (
    "INSERT INTO balances (region, account, currency, balance, last_posting_id, updated_ns) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::int8[], %s::int8[], "
    "%s::int8[]) "
    "ON CONFLICT (region, account, currency) DO UPDATE SET "
    "balance = balances.balance + EXCLUDED.balance, "
    "last_posting_id = EXCLUDED.last_posting_id, updated_ns = EXCLUDED.updated_ns"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchResult:
    """What one committed batch did."""

    transfers_new: int
    transfers_replayed: int
    """Transfers already in the ledger (or twice in the batch): posted nothing."""
    postings: int
    last_posting_id: int
    last_hash: str


async def post_transfers(
    conn: psycopg.AsyncConnection[object],
    region: str,
    transfers: Sequence[Transfer],
    *,
    recorded_ns: int | None = None,
) -> BatchResult:
    """Write ``transfers`` of ``region`` in one transaction; replays are no-ops.

    Raises:
        TransferConflict: a transfer id is taken by a transfer of other content (another
            fill under a posted trade id, or in this batch); nothing was posted.
    """
    now = time.time_ns() if recorded_ns is None else recorded_ns
    first: dict[str, Transfer] = {}
    again: list[Transfer] = []
    for t in transfers:
        if t.region != region:
            raise LedgerConfigError("region", f"transfer {t.id} belongs to {t.region}")
        if t.id in first:
            again.append(t)
        else:
            first[t.id] = t
    unique = list(first.values())
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT last_posting_id, last_hash FROM chain_heads WHERE region = %s FOR UPDATE",
            (region,),
        )
        head = await cur.fetchone()
        if head is None:
            raise LedgerConfigError("region", f"no chain head for {region!r}: run migrate")
        last_id, last_hash = int(head[0]), str(head[1])  # type: ignore[index]
        if not unique:
            return BatchResult(
                transfers_new=0,
                transfers_replayed=len(transfers),
                postings=0,
                last_posting_id=last_id,
                last_hash=last_hash,
            )
        columns: list[list[object]] = [[] for _ in TRANSFER_COLUMNS]
        for t in unique:
            row = (*transfer_content(t), now, t.stream_seq)  # TRANSFER_COLUMNS' order
            for col, v in zip(columns, row, strict=True):
                col.append(v)
        cur = await conn.execute(_INSERT_TRANSFERS, columns)
        new_ids = {str(r[0]) for r in await cur.fetchall()}  # type: ignore[index]
        fresh = [t for t in unique if t.id in new_ids]
        if len(fresh) < len(unique) or again:
            await _check_replays(conn, region, unique, again, new_ids)
        postings = chain_postings(
            fresh, region=region, last_id=last_id, last_hash=last_hash, recorded_ns=now
        )
        if postings:
            await _copy_postings(conn, postings)
            await _apply_balances(conn, region, postings, now)
            last_id, last_hash = postings[-1].id, postings[-1].hash
            await conn.execute(
                "UPDATE chain_heads SET last_posting_id = %s, last_hash = %s, updated_ns = %s "
                "WHERE region = %s",
                (last_id, last_hash, now, region),
            )
    return BatchResult(
        transfers_new=len(fresh),
        transfers_replayed=len(transfers) - len(fresh),
        postings=len(postings),
        last_posting_id=last_id,
        last_hash=last_hash,
    )


_CONTENT = tuple(c for c in TRANSFER_COLUMNS if c not in ("recorded_ns", "stream_seq"))
"""What makes two transfers the same: every column but ``recorded_ns`` (when it was posted)
and ``stream_seq`` (a fill re-sent past the stream's dedup window is the same trade)."""
_SELECT_POSTED = f"SELECT {', '.join(_CONTENT)} FROM transfers WHERE region = %s AND id = ANY(%s)"


transfer_content: Callable[[Transfer], tuple[object, ...]] = attrgetter(*_CONTENT)
"""A transfer's columns of :data:`_CONTENT`, in that order (TRANSFER_COLUMNS' first ones)."""
assert (*_CONTENT, "recorded_ns", "stream_seq") == TRANSFER_COLUMNS


def content_diff(posted: Sequence[object], given: Sequence[object]) -> str:
    """What differs between two contents of :data:`_CONTENT` ("" when nothing does)."""
    return ", ".join(
        f"{col} {a!r} posted, {b!r} here"
        for col, a, b in zip(_CONTENT, posted, given, strict=True)
        if a != b
    )


async def _check_replays(
    conn: psycopg.AsyncConnection[object],
    region: str,
    unique: list[Transfer],
    again: list[Transfer],
    new_ids: set[str],
) -> None:
    """Raise :class:`TransferConflict` unless every replay is the transfer already posted
    (or posted earlier in this batch)."""
    old_ids = [t.id for t in unique if t.id not in new_ids]
    posted: dict[str, tuple[object, ...]] = {}
    if old_ids:
        cur = await conn.execute(_SELECT_POSTED, (region, old_ids))
        rows: list[Any] = await cur.fetchall()
        posted = {str(r[1]): tuple(r) for r in rows}
    for t in unique:
        if t.id in new_ids:
            posted[t.id] = transfer_content(t)  # the batch's own: what a repeat must equal
    conflicts: list[tuple[Transfer, str]] = []
    for t in [u for u in unique if u.id not in new_ids] + again:
        ref = posted.get(t.id)
        if ref is None:  # cannot happen short of a concurrent delete: refuse, do not guess
            conflicts.append((t, "not inserted and not found"))
        elif diff := content_diff(ref, transfer_content(t)):
            conflicts.append((t, diff))
    if conflicts:
        raise TransferConflict(region, conflicts)


async def _copy_postings(conn: psycopg.AsyncConnection[object], rows: list[Posting]) -> None:
    cur = conn.cursor()
    async with cur.copy(f"COPY postings ({', '.join(POSTING_COLUMNS)}) FROM STDIN") as copy:
        for p in rows:
            await copy.write_row(posting_row(p))


async def _apply_balances(
    conn: psycopg.AsyncConnection[object], region: str, postings: list[Posting], now: int
) -> None:
    last: dict[tuple[str, str], int] = {}
    for p in postings:
        last[(p.account, p.currency)] = p.id
    deltas = balance_deltas(postings)
    keys = list(deltas)
    await conn.execute(
        _UPSERT_BALANCES,
        (
            [region] * len(keys),
            [k[0] for k in keys],
            [k[1] for k in keys],
            [deltas[k] for k in keys],
            [last[k] for k in keys],
            [now] * len(keys),
        ),
    )


MINOR_UNITS_SQL = "SELECT code, minor_units FROM currencies"


async def minor_units(conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
    """The ledger's own currencies (as migrate stored them from the writers' topology):
    code -> minor units. Commits the read's transaction."""
    got = dict(await (await conn.execute(MINOR_UNITS_SQL)).fetchall())
    await conn.commit()
    return {str(k): int(v) for k, v in got.items()}


def minor_units_disagree(ledger: dict[str, int], topology: Topology) -> list[str]:
    """Where ``topology``'s currencies disagree with the ledger's (a stale topology file
    would scale every amount posted by a power of ten, for good: a posted trade is never
    posted again)."""
    return [
        f"currency {c.code}: {c.minor_units} minor units in this topology, "
        f"{ledger.get(c.code)} in the ledger"
        for c in topology.currencies
        if ledger.get(c.code) != c.minor_units
    ]
