"""Re-check the ledger: double entry, balances, and every region's hash chain.

Everything is read in ONE repeatable-read, read-only transaction, so concurrent writers never
cause false alarms and verify never takes a write lock. Each problem names the offending row:
``(region, posting_id)`` for postings, ``(region, transfer_id)`` for transfers.

What each tampering looks like:

* an edited posting: its stored hash no longer matches its content (``chain_hash``), and its
  transfer stops balancing (``unbalanced``/``posting_mismatch``);
* a deleted posting: a gap in the chain ids (``chain_gap`` naming the first missing id), or a
  head that points past the last row (``chain_head``);
* an inserted posting: an id beyond the chain head (``chain_head``) or a broken link, and a
  transfer that no longer balances.

It also fails while a fill the writer held is not posted (``held_fill``): the books then lack
a trade that execution reported (:mod:`ledger.held`).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from ledger.db import dialect_of, libpq_dsn
from ledger.held import outstanding
from ledger.model import GENESIS_HASH, Posting, posting_hash

MAX_PROBLEMS = 1000


class ProblemKind(enum.StrEnum):
    UNBALANCED = "unbalanced"
    """A transfer's postings do not sum to zero in a currency."""
    POSTING_MISMATCH = "posting_mismatch"
    """A posting disagrees with its transfer (account, amount, currency) or has none."""
    POSTING_COUNT = "posting_count"
    """A transfer does not have exactly two postings."""
    BALANCE_MISMATCH = "balance_mismatch"
    """A balance row differs from the sum of its postings."""
    CHAIN_GAP = "chain_gap"
    CHAIN_LINK = "chain_link"
    CHAIN_HASH = "chain_hash"
    CHAIN_HEAD = "chain_head"
    HELD_FILL = "held_fill"
    """A fill execution reported that the writer holds and has not posted (``held_fills``):
    the books lack a trade until it is posted."""
    NOT_MIGRATED = "not_migrated"
    """The ledger lacks ``held_fills`` (migration 2): a held fill could not be kept, so
    verify cannot say none is missing (``meridian ledger migrate``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One thing verify found wrong, naming the row."""

    kind: ProblemKind
    region: str
    posting_id: int | None = None
    transfer_id: str | None = None
    account: str | None = None
    currency: str | None = None
    detail: str = ""

    def __str__(self) -> str:
        where = [f"region={self.region}"]
        if self.posting_id is not None:
            where.append(f"posting={self.posting_id}")
        if self.transfer_id is not None:
            where.append(f"transfer={self.transfer_id}")
        if self.account is not None:
            where.append(f"account={self.account}")
        if self.currency is not None:
            where.append(f"currency={self.currency}")
        return f"{self.kind}: {' '.join(where)}: {self.detail}"


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyReport:
    """Result of :func:`verify`; ``ok`` is True when no problem was found."""

    regions: tuple[str, ...]
    postings_checked: int
    transfers_checked: int
    balances_checked: int
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)
    """region -> (last posting id, last hash) as stored in chain_heads."""
    problems: tuple[Problem, ...] = ()
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        out["problems"] = [{**asdict(p), "kind": str(p.kind)} for p in self.problems]
        return out


def verify(dsn: str, *, regions: tuple[str, ...] | None = None) -> VerifyReport:
    """Check double entry, balances and every region's hash chain (read-only)."""
    with psycopg.connect(libpq_dsn(dsn)) as conn:
        if dialect_of(dsn) == "postgresql":
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            return _verify(conn, regions)


def _verify(conn: psycopg.Connection[Any], only: tuple[str, ...] | None) -> VerifyReport:
    problems: list[Problem] = []
    heads = {
        str(r): (int(i), str(h))
        for r, i, h in conn.execute(
            "SELECT region, last_posting_id, last_hash FROM chain_heads ORDER BY region"
        ).fetchall()
    }
    present = {str(r[0]) for r in conn.execute("SELECT DISTINCT region FROM postings")}
    regions = tuple(sorted(set(heads) | present)) if only is None else tuple(only)
    rg = list(regions)

    for region, tid, ccy, total, min_id in conn.execute(
        "SELECT region, transfer_id, currency, sum(amount), min(id) FROM postings "
        "WHERE region = ANY(%s) GROUP BY region, transfer_id, currency "
        "HAVING sum(amount) <> 0 ORDER BY region, min(id)",
        (rg,),
    ):
        problems.append(
            Problem(
                kind=ProblemKind.UNBALANCED,
                region=region,
                posting_id=min_id,
                transfer_id=tid,
                currency=ccy,
                detail=f"postings sum to {total}, not 0",
            )
        )

    for region, pid, tid, account, ccy, amount, t_id in conn.execute(
        "SELECT p.region, p.id, p.transfer_id, p.account, p.currency, p.amount, t.id "
        "FROM postings p LEFT JOIN transfers t ON t.region = p.region AND t.id = p.transfer_id "
        "WHERE p.region = ANY(%s) AND (t.id IS NULL OR p.currency <> t.currency OR NOT ("
        "(p.account = t.credit_account AND p.amount = t.amount) OR "
        "(p.account = t.debit_account AND p.amount = -t.amount))) ORDER BY p.region, p.id",
        (rg,),
    ):
        detail = (
            "no such transfer"
            if t_id is None
            else (f"{account} {amount:+d} {ccy} does not match the transfer")
        )
        problems.append(
            Problem(
                kind=ProblemKind.POSTING_MISMATCH,
                region=region,
                posting_id=pid,
                transfer_id=tid,
                account=account,
                currency=ccy,
                detail=detail,
            )
        )

    for region, tid, n in conn.execute(
        "SELECT t.region, t.id, count(p.id) FROM transfers t LEFT JOIN postings p "
        "ON p.region = t.region AND p.transfer_id = t.id WHERE t.region = ANY(%s) "
        "GROUP BY t.region, t.id HAVING count(p.id) <> 2 ORDER BY t.region, t.id",
        (rg,),
    ):
        problems.append(
            Problem(
                kind=ProblemKind.POSTING_COUNT,
                region=region,
                transfer_id=tid,
                detail=f"{n} postings, expected 2",
            )
        )
    row = conn.execute("SELECT count(*) FROM transfers WHERE region = ANY(%s)", (rg,)).fetchone()
    transfers_checked = int(row[0]) if row else 0

    for region, account, ccy, bal, total in conn.execute(
        "WITH s AS (SELECT region, account, currency, sum(amount) AS total FROM postings "
        "WHERE region = ANY(%s) GROUP BY region, account, currency), "
        "b AS (SELECT region, account, currency, balance FROM balances WHERE region = ANY(%s)) "
        "SELECT coalesce(b.region, s.region), coalesce(b.account, s.account), "
        "coalesce(b.currency, s.currency), b.balance, s.total "
        "FROM b FULL OUTER JOIN s ON b.region = s.region AND b.account = s.account "
        "AND b.currency = s.currency WHERE b.balance IS DISTINCT FROM s.total "
        "ORDER BY 1, 2, 3",
        (rg, rg),
    ):
        problems.append(
            Problem(
                kind=ProblemKind.BALANCE_MISMATCH,
                region=region,
                account=account,
                currency=ccy,
                detail=f"balance {bal} but postings sum to {total}",
            )
        )
    row = conn.execute("SELECT count(*) FROM balances WHERE region = ANY(%s)", (rg,)).fetchone()
    balances_checked = int(row[0]) if row else 0

    if conn.execute("SELECT to_regclass('held_fills')").fetchone() in (None, (None,)):
        problems.append(
            Problem(
                kind=ProblemKind.NOT_MIGRATED,
                region=",".join(rg),
                detail="no held_fills table (migration 2): held fills cannot be checked",
            )
        )
    else:
        for h in outstanding(conn, rg):
            problems.append(
                Problem(
                    kind=ProblemKind.HELD_FILL,
                    region=h.region,
                    transfer_id=f"{h.trade_id}:base" if h.trade_id else None,
                    detail=(
                        f"fill at EXECOUT seq {h.stream_seq} not posted: {h.field}: {h.reason} "
                        f"(held {h.holds}x; meridian ledger post-held)"
                    ),
                )
            )

    checked = 0
    for region in regions:
        n, chain_problems = _check_chain(conn, region, heads.get(region))
        checked += n
        problems.extend(chain_problems)

    truncated = len(problems) > MAX_PROBLEMS
    return VerifyReport(
        regions=regions,
        postings_checked=checked,
        transfers_checked=transfers_checked,
        balances_checked=balances_checked,
        heads=heads,
        problems=tuple(problems[:MAX_PROBLEMS]),
        truncated=truncated,
    )


def check_chain_rows(
    region: str, rows: Any, head: tuple[int, str] | None
) -> tuple[int, list[Problem]]:
    """Walk one region's postings (ordered by id) and check ids, links, hashes and the head.

    ``rows`` yields :class:`Posting` objects; used by verify and to re-check an export file.
    """
    problems: list[Problem] = []
    expected_id, prev = 1, GENESIS_HASH
    n = 0
    for p in rows:
        n += 1
        gap = p.id != expected_id
        if gap:
            problems.append(
                Problem(
                    kind=ProblemKind.CHAIN_GAP,
                    region=region,
                    posting_id=expected_id,
                    detail=(
                        f"postings {expected_id}..{p.id - 1} missing"
                        if p.id > expected_id
                        else f"id {p.id} out of order"
                    ),
                )
            )
        if p.prev_hash != prev and not gap:
            problems.append(
                Problem(
                    kind=ProblemKind.CHAIN_LINK,
                    region=region,
                    posting_id=p.id,
                    transfer_id=p.transfer_id,
                    detail="prev_hash does not match the previous posting",
                )
            )
        if posting_hash(p) != p.hash:
            problems.append(
                Problem(
                    kind=ProblemKind.CHAIN_HASH,
                    region=region,
                    posting_id=p.id,
                    transfer_id=p.transfer_id,
                    account=p.account,
                    currency=p.currency,
                    detail="content does not match its hash (edited)",
                )
            )
        prev = p.hash
        expected_id = p.id + 1
    last_id = expected_id - 1
    if head is not None:
        head_id, head_hash = head
        if last_id > head_id:
            problems.append(
                Problem(
                    kind=ProblemKind.CHAIN_HEAD,
                    region=region,
                    posting_id=head_id + 1,
                    detail=f"postings after the chain head {head_id} (inserted)",
                )
            )
        elif last_id < head_id:
            problems.append(
                Problem(
                    kind=ProblemKind.CHAIN_HEAD,
                    region=region,
                    posting_id=last_id + 1,
                    detail=f"chain head is {head_id} but postings end at {last_id} (deleted)",
                )
            )
        elif head_hash != prev:
            problems.append(
                Problem(
                    kind=ProblemKind.CHAIN_HEAD,
                    region=region,
                    posting_id=last_id,
                    detail="last posting's hash differs from the chain head",
                )
            )
    return n, problems


def _check_chain(
    conn: psycopg.Connection[Any], region: str, head: tuple[int, str] | None
) -> tuple[int, list[Problem]]:
    def rows() -> Any:
        with conn.cursor(name=f"verify_{region}") as cur:
            cur.itersize = 5000
            cur.execute(
                "SELECT region, id, transfer_id, account, currency, amount, transact_ns, "
                "recorded_ns, prev_hash, hash FROM postings WHERE region = %s ORDER BY id",
                (region,),
            )
            for r in cur:
                yield Posting(
                    region=r[0],
                    id=r[1],
                    transfer_id=r[2],
                    account=r[3],
                    currency=r[4],
                    amount=r[5],
                    transact_ns=r[6],
                    recorded_ns=r[7],
                    prev_hash=r[8],
                    hash=r[9],
                )

    return check_chain_rows(region, rows(), head)
