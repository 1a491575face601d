"""Re-check the ledger: double entry, balances, every transfer's terms, every region's chain.

Everything is read in ONE repeatable-read, read-only transaction, so concurrent writers never
cause false alarms and verify never takes a write lock. Each problem names the offending row:
``(region, posting_id)`` for postings, ``(region, transfer_id)`` for transfers.

The regions checked are the topology's (every one must be in the ledger: migrate gives each a
chain head row) plus any other the ledger holds; naming a region the topology lacks is an
error, not a vacuous pass. A region with a head at 0 and no postings is *empty*: reported
(``VerifyReport.empty_regions``), not a failure, since nothing inside the database can tell an
empty region from one whose every row was deleted and its head reset. That, and any rewrite
of a chain together with ``chain_heads``, is caught only against an export's manifest kept
outside the database (``manifest=``: :func:`ledger.export.load_manifest`).

What each tampering looks like:

* an edited posting: its stored hash no longer matches its content (``chain_hash``), and its
  transfer stops balancing (``unbalanced``/``posting_mismatch``);
* a deleted posting: a gap in the chain ids (``chain_gap`` naming the first missing id), or a
  head that points past the last row (``chain_head``), or postings without a head row;
* an inserted posting: an id beyond the chain head (``chain_head``) or a broken link, and a
  transfer that no longer balances;
* an edited transfer (which the hash does not cover): its amount and currency are re-derived
  from its symbol, qty and price with the writer's own code (:func:`ledger.model.trade_transfers`,
  minor units from the ledger's ``currencies``), and both legs of its trade must agree
  (``transfer_mismatch``, ``trade_legs``); the postings, hashed, pin amount, currency, accounts
  and trade time. Not pinned: ``stream_seq`` and ``recorded_ns`` beyond the two legs agreeing,
  and a price change too small to move the rounded quote amount;
* a region emptied of every row: ``region_missing``;
* a chain rewritten up to its tip with ``chain_heads`` (or truncated): only with a manifest,
  ``anchor`` naming the manifest's head row and, when the export's postings file is beside
  the manifest, the first row that differs from it.

It also fails while a fill the writer held is not posted (``held_fill``): the books then lack
a trade that execution reported (:mod:`ledger.held`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import psycopg

from ledger.db import dialect_of, libpq_dsn
from ledger.errors import LedgerConfigError
from ledger.export import ManifestAnchor, exported_hashes, load_manifest
from ledger.held import outstanding
from ledger.model import GENESIS_HASH, Posting, Transfer, posting_hash, trade_transfers
from regions.topology import Topology, load_topology

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
    TRANSFER_MISMATCH = "transfer_mismatch"
    """A transfer's content is not what its trade's terms (symbol, qty, price, accounts)
    post: re-derived with the writer's code and the ledger's currencies."""
    TRADE_LEGS = "trade_legs"
    """A trade lacks its base or quote transfer."""
    REGION_MISSING = "region_missing"
    """A region of the topology (or of the manifest) has no chain head row and no postings:
    not migrated for it, or every row of it deleted."""
    ANCHOR = "anchor"
    """The chain no longer runs through the manifest's head: the posting at its id is gone or
    has another hash (the chain was rewritten or truncated since the export)."""


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
    empty_regions: tuple[str, ...] = ()
    """Regions checked with a chain head at 0 and no postings. Not a problem by itself (no
    trade yet): only a manifest that saw postings there can prove rows were deleted."""
    anchored: dict[str, tuple[int, str]] = field(default_factory=dict)
    """region -> (posting id, hash) the chain was checked to run through (the manifest's)."""
    manifest: str | None = None
    """The manifest verified against, if any."""
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


def verify(
    dsn: str,
    *,
    regions: Sequence[str] | None = None,
    topology: Topology | None = None,
    manifest: ManifestAnchor | str | Path | None = None,
) -> VerifyReport:
    """Check double entry, balances, transfers and every region's hash chain (read-only).

    Args:
        dsn: the ledger database.
        regions: only these (each must be a region of ``topology``); default every region of
            the topology, and any other the ledger holds.
        topology: the regions the ledger must have (default: the shipped topology).
        manifest: an export's manifest (or its path, or the export directory): every region
            it lists must be in the ledger, its chain running through the manifest's head.

    Raises:
        LedgerConfigError: a region not in the topology, or a manifest that cannot be read.
    """
    topo = topology if topology is not None else load_topology()
    anchor = (
        manifest
        if manifest is None or isinstance(manifest, ManifestAnchor)
        else load_manifest(manifest)
    )
    if regions is not None:
        unknown = [r for r in regions if r not in topo.codes]
        if unknown or not regions:
            raise LedgerConfigError(
                "regions",
                f"{', '.join(map(repr, unknown)) or 'none given'}: "
                f"must be regions of the topology ({', '.join(topo.codes)})",
            )
    with psycopg.connect(libpq_dsn(dsn)) as conn:
        if dialect_of(dsn) == "postgresql":
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            return _verify(conn, topo.codes, None if regions is None else tuple(regions), anchor)


def _verify(
    conn: psycopg.Connection[Any],
    expected: tuple[str, ...],
    only: tuple[str, ...] | None,
    anchor: ManifestAnchor | None,
) -> VerifyReport:
    problems: list[Problem] = []
    heads = {
        str(r): (int(i), str(h))
        for r, i, h in conn.execute(
            "SELECT region, last_posting_id, last_hash FROM chain_heads ORDER BY region"
        ).fetchall()
    }
    present = {str(r[0]) for r in conn.execute("SELECT DISTINCT region FROM postings")}
    anchored = anchor.regions if anchor is not None else ()
    if only is None:
        must = (*expected, *anchored)
        regions = tuple(sorted(set(must) | set(heads) | present))
    else:
        must = (*only, *anchored)  # a manifest's regions are checked whatever was asked
        regions = tuple(dict.fromkeys(must))
    rg = list(regions)
    for region in dict.fromkeys(must):
        if region not in heads and region not in present:
            problems.append(
                Problem(
                    kind=ProblemKind.REGION_MISSING,
                    region=region,
                    detail=(
                        "no chain head row and no postings: the ledger was not migrated for "
                        "this region (meridian ledger migrate) or every row of it was deleted"
                    ),
                )
            )

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
        "WHERE p.region = ANY(%s) AND (t.id IS NULL OR p.currency <> t.currency "
        "OR p.transact_ns <> t.transact_ns OR NOT ("
        "(p.account = t.credit_account AND p.amount = t.amount) OR "
        "(p.account = t.debit_account AND p.amount = -t.amount))) ORDER BY p.region, p.id",
        (rg,),
    ):
        detail = (
            "no such transfer"
            if t_id is None
            else (f"{account} {amount:+d} {ccy} (or its trade time) does not match the transfer")
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
    transfers_checked, transfer_problems = _check_transfers(conn, rg)
    problems.extend(transfer_problems)

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
        if anchor is not None:
            problems.extend(_held_since(conn, anchor, rg))

    checked = 0
    empty: list[str] = []
    for region in regions:
        at = anchor.heads.get(region) if anchor is not None else None
        n, chain_problems = _check_chain(conn, region, heads.get(region), at)
        checked += n
        if n == 0 and region in heads:
            empty.append(region)
        named = {p.posting_id for p in chain_problems if p.kind == ProblemKind.ANCHOR}
        if anchor is not None and named:
            chain_problems.extend(
                p for p in _first_rewritten(conn, region, anchor) if p.posting_id not in named
            )
        problems.extend(chain_problems)

    truncated = len(problems) > MAX_PROBLEMS
    return VerifyReport(
        regions=regions,
        postings_checked=checked,
        transfers_checked=transfers_checked,
        balances_checked=balances_checked,
        heads=heads,
        empty_regions=tuple(empty),
        anchored={r: h for r, h in (anchor.heads if anchor else {}).items() if r in regions},
        manifest=str(anchor.path) if anchor is not None else None,
        problems=tuple(problems[:MAX_PROBLEMS]),
        truncated=truncated,
    )


def _held_since(
    conn: psycopg.Connection[Any], anchor: ManifestAnchor, rg: list[str]
) -> list[Problem]:
    """Every fill the manifest lists as held at the export is still held, or posted since: a
    held_fills row deleted with its trade still missing hides a trade from the books."""
    out = []
    for region, seq, trade_id in anchor.held:
        if region not in rg:
            continue
        row = conn.execute(
            "SELECT 1 FROM held_fills WHERE region = %s AND stream_seq = %s LIMIT 1",
            (region, seq),
        ).fetchone()
        posted = (
            trade_id is not None
            and conn.execute(
                "SELECT 1 FROM transfers WHERE region = %s AND id = %s",
                (region, f"{trade_id}:base"),
            ).fetchone()
        )
        if row is None and not posted:
            out.append(
                Problem(
                    kind=ProblemKind.HELD_FILL,
                    region=region,
                    transfer_id=f"{trade_id}:base" if trade_id else None,
                    detail=(
                        f"fill at EXECOUT seq {seq} was held at the export "
                        f"({anchor.path.parent}) and is neither held nor posted now: its "
                        "held_fills row was deleted"
                    ),
                )
            )
    return out


_TRANSFER_FIELDS = tuple(f.name for f in fields(Transfer))
_SELECT_TRANSFERS = (
    f"SELECT {', '.join(_TRANSFER_FIELDS)} FROM transfers WHERE region = ANY(%s) "
    "ORDER BY region, id"
)


def _check_transfers(conn: psycopg.Connection[Any], rg: list[str]) -> tuple[int, list[Problem]]:
    """Every trade has both legs, each exactly what the writer posts for the trade's terms."""
    minor = {str(c): int(m) for c, m in conn.execute("SELECT code, minor_units FROM currencies")}
    pairs = {
        str(s): (str(b), str(q))
        for s, b, q in conn.execute("SELECT symbol, base, quote FROM instruments")
    }
    problems: list[Problem] = []
    pending: dict[tuple[str, str], dict[str, Transfer]] = {}
    n = 0
    with conn.cursor(name="verify_transfers") as cur:
        cur.itersize = 5000
        cur.execute(_SELECT_TRANSFERS, (rg,))
        for r in cur:
            n += 1
            t = Transfer(**dict(zip(_TRANSFER_FIELDS, r, strict=True)))
            legs = pending.setdefault((t.region, t.trade_id), {})
            if t.leg in legs:
                problems.append(_trade_legs(t, f"a second {t.leg} leg ({legs[t.leg].id})"))
                continue
            legs[t.leg] = t
            if len(legs) == 2:
                del pending[(t.region, t.trade_id)]
                problems.extend(_check_trade(legs["base"], legs["quote"], minor, pairs))
    for legs in pending.values():
        (t,) = legs.values()
        problems.append(
            _trade_legs(t, f"its trade has no {'quote' if t.leg == 'base' else 'base'} leg")
        )
    return n, problems


def _trade_legs(t: Transfer, detail: str) -> Problem:
    return Problem(kind=ProblemKind.TRADE_LEGS, region=t.region, transfer_id=t.id, detail=detail)


def _check_trade(
    base: Transfer, quote: Transfer, minor: dict[str, int], pairs: dict[str, tuple[str, str]]
) -> list[Problem]:
    """The trade's two transfers re-derived from the base leg's terms, compared field by
    field (the postings, hashed, pin each transfer's amount, currency and accounts)."""
    pair = pairs.get(base.symbol)
    why = ""
    if pair is None:
        why = f"symbol {base.symbol!r} is not in the ledger's instruments"
    elif pair[0] not in minor or pair[1] not in minor:
        why = f"{pair[0]}/{pair[1]}: a currency not in the ledger's currencies"
    if pair is None or why:
        return [
            Problem(
                kind=ProblemKind.TRANSFER_MISMATCH,
                region=base.region,
                transfer_id=base.id,
                detail=why,
            )
        ]
    want = trade_transfers(
        region=base.region,
        trade_id=base.trade_id,
        symbol=base.symbol,
        base=pair[0],
        quote=pair[1],
        base_minor_units=minor[pair[0]],
        quote_minor_units=minor[pair[1]],
        price_ticks=base.price_ticks,
        price_decimals=base.price_decimals,
        qty=base.qty,
        buy_account=base.credit_account,
        sell_account=base.debit_account,
        transact_ns=base.transact_ns,
        stream_seq=base.stream_seq,
    )
    out: list[Problem] = []
    for got, exp in zip((base, quote), want, strict=True):
        if got == exp:
            continue
        diff = [
            f"{f} {getattr(got, f)!r}, the trade's terms give {getattr(exp, f)!r}"
            for f in _TRANSFER_FIELDS
            if getattr(got, f) != getattr(exp, f)
        ]
        if diff:
            out.append(
                Problem(
                    kind=ProblemKind.TRANSFER_MISMATCH,
                    region=got.region,
                    transfer_id=got.id,
                    account=got.debit_account,
                    currency=got.currency,
                    detail=(
                        f"{'; '.join(diff)} ({base.symbol} qty {base.qty} at "
                        f"{base.price_ticks}e-{base.price_decimals}, as its base leg says)"
                    ),
                )
            )
    return out


def _first_rewritten(
    conn: psycopg.Connection[Any], region: str, anchor: ManifestAnchor
) -> list[Problem]:
    """The first posting of ``region`` whose hash differs from the export's postings file
    beside the manifest (nothing when the file is not there or not the manifest's)."""

    def first_diff(batch: list[tuple[int, str]]) -> int | None:
        ids = [i for i, _ in batch]
        got = dict(
            conn.execute(
                "SELECT id, hash FROM postings WHERE region = %s AND id = ANY(%s)", (region, ids)
            ).fetchall()
        )
        return next((i for i, h in batch if got.get(i) != h), None)

    for batch in _chunked(exported_hashes(anchor, region), 5000):
        pid = first_diff(batch)
        if pid is not None:
            return [
                Problem(
                    kind=ProblemKind.ANCHOR,
                    region=region,
                    posting_id=pid,
                    detail=(
                        f"the first posting that differs from the export {anchor.path.parent} "
                        "(edited, deleted or re-hashed since)"
                    ),
                )
            ]
    return []


def _chunked(rows: Iterable[tuple[int, str]], n: int) -> Iterable[list[tuple[int, str]]]:
    batch: list[tuple[int, str]] = []
    for r in rows:
        batch.append(r)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def check_chain_rows(
    region: str,
    rows: Any,
    head: tuple[int, str] | None,
    anchor: tuple[int, str] | None = None,
) -> tuple[int, list[Problem]]:
    """Walk one region's postings (ordered by id) and check ids, links, hashes and the head.

    ``rows`` yields :class:`Posting` objects; used by verify and to re-check an export file.
    ``head`` is the region's chain head row (None: there is none, so postings fail);
    ``anchor``, a manifest's head, is a posting the chain must still hold, with that hash.
    """
    problems: list[Problem] = []
    expected_id, prev = 1, GENESIS_HASH
    n = 0
    anchor_seen = anchor is None or anchor[0] == 0
    for p in rows:
        n += 1
        if anchor is not None and p.id == anchor[0]:
            anchor_seen = True
            if p.hash != anchor[1]:
                problems.append(
                    Problem(
                        kind=ProblemKind.ANCHOR,
                        region=region,
                        posting_id=p.id,
                        transfer_id=p.transfer_id,
                        detail=(
                            f"hash {p.hash[:16]} but the manifest's head has {anchor[1][:16]}: "
                            "the chain was rewritten up to here since the export"
                        ),
                    )
                )
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
    if not anchor_seen and anchor is not None:
        problems.append(
            Problem(
                kind=ProblemKind.ANCHOR,
                region=region,
                posting_id=anchor[0],
                detail=(
                    f"the manifest's head posting {anchor[0]} is gone (postings end at "
                    f"{last_id}): the chain was truncated or rewritten since the export"
                ),
            )
        )
    if head is None and n:
        problems.append(
            Problem(
                kind=ProblemKind.CHAIN_HEAD,
                region=region,
                posting_id=last_id,
                detail=f"postings 1..{last_id} but no chain head row (deleted)",
            )
        )
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
    conn: psycopg.Connection[Any],
    region: str,
    head: tuple[int, str] | None,
    anchor: tuple[int, str] | None,
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

    return check_chain_rows(region, rows(), head, anchor)
