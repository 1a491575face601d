"""Compliance export: one consistent snapshot across regions, with a manifest.

Everything is read inside ONE transaction: ``REPEATABLE READ READ ONLY`` on PostgreSQL (one
MVCC snapshot for every region's partition, no write locks), ``AS OF SYSTEM TIME
follower_read_timestamp()`` on CockroachDB (a historical read served by the nearest replica).
Writers keep writing meanwhile; the export sees none of their later commits.

Output directory::

    postings.<fmt>    region, id, transfer_id, account, currency, amount, ..., prev_hash, hash
    transfers.<fmt>   every transfer of the time range
    balances.<fmt>    balances as of the snapshot (not filtered by time)
    manifest.json     row counts, per-currency sums, chain heads, snapshot time, file sha256,
                      held fills outstanding at the snapshot

The manifest is the ledger's outside anchor: kept outside the database, ``meridian ledger
verify --manifest`` checks that every region's chain still runs through the manifest's head
(:func:`load_manifest`), which a rewrite of the chain and ``chain_heads`` inside the database
cannot fake.

The time range filters on ``transact_ns`` (trade time): ``from`` inclusive, ``to`` exclusive.
A ranged export's postings are NOT one chain per region: a fill held and posted late carries
its old trade time, so the range has holes in the chain ids. Its manifest says so
(``chain_verifiable: false``, and per region whether its ids are ``contiguous``); every row
still carries its ``prev_hash``, so each row's hash can be recomputed, and the manifest's
``chain_heads`` (the whole ledger's, at the snapshot) anchor verify all the same. Held fills
outstanding at the snapshot are trades missing from the books: the manifest lists them
(``held_outstanding``) whatever the range.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import psycopg
from psycopg import sql

from ledger.db import dialect_of, libpq_dsn
from ledger.errors import LedgerConfigError
from ledger.held import outstanding
from ledger.store import POSTING_COLUMNS, TRANSFER_COLUMNS

Format = Literal["csv", "jsonl"]
MAX_NS = 2**63 - 1
MANIFEST_KIND = "meridian-ledger-export"
MANIFEST = "manifest.json"

POSTING_COLS = POSTING_COLUMNS  # the columns the writer stores, in its order
TRANSFER_COLS = TRANSFER_COLUMNS  # the columns the writer stores, in its order
BALANCE_COLS = ("region", "account", "currency", "balance", "last_posting_id", "updated_ns")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportRequest:
    """What to export."""

    regions: tuple[str, ...]
    out_dir: Path
    fmt: Format = "csv"
    from_ns: int = 0
    to_ns: int = MAX_NS
    role: str | None = None
    """``SET LOCAL ROLE`` for the export transaction, e.g. ``meridian_compliance``."""


class _Progress:
    def __init__(self, stream: TextIO | None, label: str, total: int) -> None:
        self.stream, self.label, self.total = stream, label, total
        self.n = 0
        self._last = 0.0

    def tick(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.stream is not None and now - self._last >= 0.2:
            self._last = now
            self._draw()

    def _draw(self) -> None:
        assert self.stream is not None
        pct = 100.0 * self.n / self.total if self.total else 100.0
        width = 30
        fill = int(width * pct / 100)
        self.stream.write(
            f"\r{self.label:<10} [{'#' * fill}{'.' * (width - fill)}] "
            f"{self.n:,}/{self.total:,} {pct:5.1f}%"
        )
        self.stream.flush()

    def done(self) -> None:
        if self.stream is not None:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


class _Writer:
    """Rows -> csv/jsonl file, hashing the bytes as they go."""

    def __init__(self, path: Path, fmt: Format, cols: Sequence[str]) -> None:
        self.path, self.fmt, self.cols = path, fmt, cols
        self.fh = path.open("w", encoding="utf-8", newline="")
        self.sha = hashlib.sha256()
        self.rows = 0
        self._buf = io.StringIO()
        self._csv = csv.writer(self._buf, lineterminator="\n")
        if fmt == "csv":
            self._csv.writerow(cols)
            self._flush()

    def _flush(self) -> None:
        data = self._buf.getvalue()
        self._buf.seek(0)
        self._buf.truncate()
        self.fh.write(data)
        self.sha.update(data.encode())

    def write(self, row: Sequence[Any]) -> None:
        if self.fmt == "csv":
            self._csv.writerow(row)
        else:
            self._buf.write(
                json.dumps(dict(zip(self.cols, row, strict=True)), separators=(",", ":")) + "\n"
            )
        self.rows += 1
        if self._buf.tell() > 1 << 16:
            self._flush()

    def close(self) -> dict[str, Any]:
        self._flush()
        self.fh.close()
        return {"path": self.path.name, "rows": self.rows, "sha256": self.sha.hexdigest()}


def _stream(
    conn: psycopg.Connection[Any], name: str, sql: str, params: Sequence[Any]
) -> Iterator[tuple[Any, ...]]:
    with conn.cursor(name=name) as cur:
        cur.itersize = 5000
        cur.execute(sql, params)
        yield from cur


def export_ledger(
    dsn: str, req: ExportRequest, *, progress: TextIO | None = None
) -> dict[str, Any]:
    """Write the export files and ``manifest.json``; returns the manifest."""
    if req.fmt not in ("csv", "jsonl"):
        raise LedgerConfigError("format", "must be csv or jsonl")
    if not req.regions:
        raise LedgerConfigError("regions", "at least one region")
    if req.from_ns >= req.to_ns:
        raise LedgerConfigError("to", "must be after from")
    dialect = dialect_of(dsn)
    req.out_dir.mkdir(parents=True, exist_ok=True)
    rg = list(req.regions)
    t_start = time.monotonic()
    with psycopg.connect(libpq_dsn(dsn), application_name="ledger-export") as conn:
        if dialect == "postgresql":
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            if dialect == "cockroachdb":
                conn.execute("SET TRANSACTION AS OF SYSTEM TIME follower_read_timestamp()")
            if req.role:
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(req.role)))
            # The first query takes the snapshot: record its time and identity with it.
            if dialect == "postgresql":
                row = conn.execute(
                    "SELECT clock_timestamp()::text, pg_current_snapshot()::text"
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT now()::text, cluster_logical_timestamp()::text"
                ).fetchone()
            assert row is not None
            snapshot = {
                "time": row[0],
                "id": row[1],
                "dialect": dialect,
                "isolation": "REPEATABLE READ READ ONLY"
                if dialect == "postgresql"
                else "AS OF SYSTEM TIME follower_read_timestamp()",
            }
            heads = {
                r: {"last_posting_id": int(i), "last_hash": h}
                for r, i, h in conn.execute(
                    "SELECT region, last_posting_id, last_hash FROM chain_heads "
                    "WHERE region = ANY(%s) ORDER BY region",
                    (rg,),
                )
            }
            held = _held_outstanding(conn, rg)
            where = "region = ANY(%s) AND transact_ns >= %s AND transact_ns < %s"
            params = (rg, req.from_ns, req.to_ns)
            total = conn.execute(f"SELECT count(*) FROM postings WHERE {where}", params).fetchone()
            t_total = conn.execute(
                f"SELECT count(*) FROM transfers WHERE {where}", params
            ).fetchone()

            # ---- postings
            w = _Writer(req.out_dir / f"postings.{req.fmt}", req.fmt, POSTING_COLS)
            bar = _Progress(progress, "postings", int(total[0]) if total else 0)
            per_ccy: dict[str, dict[str, int]] = {}
            per_region: dict[str, dict[str, Any]] = {}
            for row in _stream(
                conn,
                "exp_postings",
                f"SELECT {', '.join(POSTING_COLS)} FROM postings WHERE {where} ORDER BY region, id",
                params,
            ):
                w.write(row)
                region, pid, ccy, amount, h = row[0], row[1], row[4], row[5], row[9]
                c = per_ccy.setdefault(ccy, {"rows": 0, "debits": 0, "credits": 0, "net": 0})
                c["rows"] += 1
                c["net"] += amount
                if amount < 0:
                    c["debits"] += -amount
                else:
                    c["credits"] += amount
                r = per_region.setdefault(region, {"rows": 0, "first_id": pid})
                r["rows"] += 1
                r["last_id"] = pid
                r["last_hash"] = h
                bar.tick()
            bar.done()
            postings_file = w.close()

            # ---- transfers
            w = _Writer(req.out_dir / f"transfers.{req.fmt}", req.fmt, TRANSFER_COLS)
            bar = _Progress(progress, "transfers", int(t_total[0]) if t_total else 0)
            t_ccy: dict[str, dict[str, int]] = {}
            for row in _stream(
                conn,
                "exp_transfers",
                f"SELECT {', '.join(TRANSFER_COLS)} FROM transfers "
                f"WHERE {where} ORDER BY region, id",
                params,
            ):
                w.write(row)
                c = t_ccy.setdefault(row[5], {"rows": 0, "amount": 0})
                c["rows"] += 1
                c["amount"] += row[6]
                bar.tick()
            bar.done()
            transfers_file = w.close()

            # ---- balances (as of the snapshot)
            w = _Writer(req.out_dir / f"balances.{req.fmt}", req.fmt, BALANCE_COLS)
            b_ccy: dict[str, int] = {}
            for row in _stream(
                conn,
                "exp_balances",
                f"SELECT {', '.join(BALANCE_COLS)} FROM balances "
                "WHERE region = ANY(%s) ORDER BY region, account, currency",
                (rg,),
            ):
                w.write(row)
                b_ccy[row[2]] = b_ccy.get(row[2], 0) + row[3]
            balances_file = w.close()

    ranged = (req.from_ns, req.to_ns) != (0, MAX_NS)
    for r in per_region.values():
        r["contiguous"] = r["rows"] == r["last_id"] - r["first_id"] + 1
    manifest: dict[str, Any] = {
        "kind": MANIFEST_KIND,
        "version": 1,
        "format": req.fmt,
        "regions": list(req.regions),
        "from_ns": req.from_ns,
        "to_ns": req.to_ns,
        "chain_verifiable": not ranged,
        "chain_note": (
            "a time range cuts the chains (held fills post late with their old trade time): "
            "the postings file cannot be verified as whole chains; each row's hash still can "
            "from its prev_hash, and chain_heads anchor `meridian ledger verify --manifest`"
            if ranged
            else "every region's chain from genesis up to chain_heads"
        ),
        "snapshot": snapshot,
        "chain_heads": heads,
        "held_outstanding": held,
        "postings": {
            **postings_file,
            "per_currency": dict(sorted(per_ccy.items())),
            "per_region": dict(sorted(per_region.items())),
        },
        "transfers": {**transfers_file, "per_currency": dict(sorted(t_ccy.items()))},
        "balances": {**balances_file, "per_currency": dict(sorted(b_ccy.items()))},
        "elapsed_s": round(time.monotonic() - t_start, 3),
        "generated_ns": time.time_ns(),
    }
    (req.out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _held_outstanding(conn: psycopg.Connection[Any], regions: list[str]) -> dict[str, Any]:
    """Held fills not posted at the snapshot: trades the books lack (whatever the range)."""
    if conn.execute("SELECT to_regclass('held_fills')").fetchone() in (None, (None,)):
        return {"count": None, "note": "no held_fills table (migration 2): not known"}
    held = outstanding(conn, regions)
    return {
        "count": len(held),
        "fills": [
            {"region": h.region, "stream_seq": h.stream_seq, "trade_id": h.trade_id} for h in held
        ],
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestAnchor:
    """An export's manifest read back: what ``verify --manifest`` holds the ledger to."""

    path: Path
    regions: tuple[str, ...]
    """The regions exported: each must still be in the ledger."""
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)
    """region -> (last posting id, its hash) at the export's snapshot."""
    snapshot_time: str = ""
    postings_path: Path | None = None
    """The export's postings file, when it is beside the manifest (to name rewritten rows)."""
    postings_sha256: str = ""
    fmt: Format = "csv"
    held: tuple[tuple[str, int, str | None], ...] = ()
    """(region, EXECOUT stream seq, trade id) of the fills held, not posted, at the export:
    each must still be held or be posted since (a deleted held_fills row hides a trade)."""


def load_manifest(path: str | Path) -> ManifestAnchor:
    """Read an export's ``manifest.json`` (or the export directory holding it).

    Raises :class:`LedgerConfigError` naming what is wrong with it.
    """
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise LedgerConfigError("manifest", f"cannot read {p}: {e}") from None
    if not isinstance(raw, dict) or raw.get("kind") != MANIFEST_KIND:
        raise LedgerConfigError("manifest", f"{p} is not a {MANIFEST_KIND} manifest")
    if raw.get("version") != 1:
        raise LedgerConfigError("manifest.version", f"{raw.get('version')!r} is not 1")
    regions = raw.get("regions")
    if not isinstance(regions, list) or not all(isinstance(r, str) for r in regions):
        raise LedgerConfigError("manifest.regions", "must be a list of region codes")
    heads: dict[str, tuple[int, str]] = {}
    chain_heads = raw.get("chain_heads")
    if not isinstance(chain_heads, dict):
        raise LedgerConfigError("manifest.chain_heads", "must be an object")
    for region, h in chain_heads.items():
        try:
            hid, hh = h["last_posting_id"], h["last_hash"]
            ok = isinstance(hid, int) and hid >= 0 and len(hh) == 64 and bytes.fromhex(hh)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise LedgerConfigError(
                f"manifest.chain_heads.{region}", "must be {last_posting_id: int, last_hash: hex}"
            )
        heads[str(region)] = (int(hid), str(hh).lower())
    fmt = raw.get("format", "csv")
    postings = raw.get("postings")
    if not isinstance(postings, dict):
        postings = {}
    name = postings.get("path")
    ppath = p.parent / name if isinstance(name, str) and "/" not in name else None
    held_raw = raw.get("held_outstanding")
    fills = held_raw.get("fills") if isinstance(held_raw, dict) else None
    held = tuple(
        (str(f["region"]), int(f["stream_seq"]), f.get("trade_id") or None)
        for f in (fills if isinstance(fills, list) else [])
        if isinstance(f, dict) and isinstance(f.get("stream_seq"), int) and "region" in f
    )
    return ManifestAnchor(
        held=held,
        path=p,
        regions=tuple(dict.fromkeys([*regions, *heads])),
        heads=heads,
        snapshot_time=str(snap.get("time", ""))
        if isinstance(snap := raw.get("snapshot"), dict)
        else "",
        postings_path=ppath if ppath is not None and ppath.is_file() else None,
        postings_sha256=str(postings.get("sha256", "")),
        fmt="jsonl" if fmt == "jsonl" else "csv",
    )


def exported_hashes(anchor: ManifestAnchor, region: str) -> Iterator[tuple[int, str]]:
    """(posting id, hash) of ``region``'s rows in the export's postings file, in file order;
    nothing when the file is missing or is not the one the manifest describes (sha256)."""
    path = anchor.postings_path
    if path is None or not anchor.postings_sha256:
        return
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    if sha.hexdigest() != anchor.postings_sha256:
        return
    with path.open(encoding="utf-8", newline="") as fh:
        rows: Iterator[dict[str, Any]] = (
            (json.loads(line) for line in fh) if anchor.fmt == "jsonl" else csv.DictReader(fh)
        )
        for r in rows:
            if r["region"] == region:
                yield int(r["id"]), str(r["hash"])
