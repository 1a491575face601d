"""The ledger against a real PostgreSQL: partitions, replays, invariants, verify, export."""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.errors import LedgerConfigError, LedgerError, TransferConflict
from ledger.export import ExportRequest, export_ledger
from ledger.migrations import applied_versions, migrate
from ledger.model import Posting, chain_postings, transfers_for_fill
from ledger.roles import COMPLIANCE_ROLE
from ledger.store import POSTING_COLUMNS, BatchResult, post_transfers, posting_row
from ledger.testing import make_fill, random_fills
from ledger.verify import ProblemKind, check_chain_rows, verify
from ops.cli_ledger import register
from ops.procs import PostgresServer
from regions.topology import Topology, load_topology
from router.contract import Fill, encode

TOPO = load_topology()


@pytest.fixture(scope="module")
def db(pg_dsn: str) -> str:
    assert migrate(pg_dsn, TOPO) == [1, 2]
    return pg_dsn


@pytest.fixture
def fresh_db(pg: PostgresServer) -> str:
    dsn = pg.create_database("t_" + uuid.uuid4().hex[:12])
    migrate(dsn, TOPO)
    return dsn


def post(dsn: str, fills: list[Fill], *, batch: int = 500) -> None:
    async def go() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            by_region: dict[str, list[Any]] = {}
            for f in fills:
                by_region.setdefault(f.exec_region, []).extend(
                    transfers_for_fill(f, TOPO, f.exec_region)
                )
            for region, trs in by_region.items():
                for i in range(0, len(trs), batch):
                    await post_transfers(conn, region, trs[i : i + batch])

    asyncio.run(go())


def state(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn) as c:
        return {
            t: c.execute(f"SELECT * FROM {t} ORDER BY 1, 2, 3").fetchall()
            for t in ("transfers", "balances")
        } | {
            "postings": c.execute(
                "SELECT region, id, transfer_id, account, currency, amount, "
                "hash FROM postings ORDER BY region, id"
            ).fetchall(),
            "heads": c.execute(
                "SELECT region, last_posting_id, last_hash FROM chain_heads ORDER BY region"
            ).fetchall(),
        }


# ---- schema ---------------------------------------------------------------------------------


def test_migrate_is_versioned_idempotent_and_partitions_by_region(db: str) -> None:
    assert migrate(db, TOPO) == []
    assert applied_versions(db) == [1, 2]
    with psycopg.connect(db) as c:
        parts = {
            (parent, child, bound)
            for parent, child, bound in c.execute(
                "SELECT p.relname, ch.relname, pg_get_expr(ch.relpartbound, ch.oid) "
                "FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent "
                "JOIN pg_class ch ON ch.oid = i.inhrelid WHERE p.relkind = 'p'"
            )
        }
        for t in ("transfers", "postings", "balances", "chain_heads", "held_fills"):
            for code in TOPO.codes:
                assert (t, f"{t}_{code}", f"FOR VALUES IN ('{code}')") in parts
        strategy: dict[str, str] = dict(
            c.execute(
                "SELECT c.relname, p.partstrat FROM pg_partitioned_table p "
                "JOIN pg_class c ON c.oid = p.partrelid"
            ).fetchall()
        )
        assert strategy == {
            t: "l" for t in ("transfers", "postings", "balances", "chain_heads", "held_fills")
        }
        assert c.execute("SELECT count(*) FROM currencies").fetchone() == (len(TOPO.currencies),)


def _reference(dsn: str) -> tuple[list[Any], list[Any]]:
    with psycopg.connect(dsn) as c:
        return (
            c.execute("SELECT * FROM currencies ORDER BY code").fetchall(),
            c.execute("SELECT * FROM instruments ORDER BY symbol").fetchall(),
        )


def test_migrate_refuses_to_change_a_currencys_units_or_an_instruments_terms(
    fresh_db: str,
) -> None:
    """A stale or edited topology (a writer started with --migrate) must not rescale the units
    posted amounts are in: migrate refuses, naming the field, and changes nothing."""
    post(fresh_db, [_fill("lon-EURUSD-units-1")])
    before = _reference(fresh_db)

    def with_ccy(code: str, **kw: Any) -> Topology:
        return dataclasses.replace(
            TOPO,
            currencies=tuple(
                dataclasses.replace(c, **kw) if c.code == code else c for c in TOPO.currencies
            ),
        )

    def with_ins(symbol: str, **kw: Any) -> Topology:
        return dataclasses.replace(
            TOPO,
            instruments=tuple(
                dataclasses.replace(i, **kw) if i.symbol == symbol else i for i in TOPO.instruments
            ),
        )

    for topo, field in [
        (with_ccy("EUR", minor_units=3), "currencies.EUR.minor_units"),
        (with_ccy("JPY", minor_units=2), "currencies.JPY.minor_units"),
        (with_ins("EURUSD", price_decimals=4), "instruments.EURUSD.price_decimals"),
        (with_ins("EURUSD", quote="GBP"), "instruments.EURUSD.quote"),
        (with_ins("EURGBP", base="GBP", quote="EUR"), "instruments.EURGBP.base"),
    ]:
        with pytest.raises(LedgerConfigError) as ei:
            migrate(fresh_db, topo)
        assert ei.value.field == field
        assert _reference(fresh_db) == before  # nothing rewritten, nothing half-applied
    assert verify(fresh_db).ok

    # what the ledger lacks is still added: a new currency and a pair in it
    grown = dataclasses.replace(
        TOPO,
        currencies=(*TOPO.currencies, dataclasses.replace(TOPO.currency("USD"), code="NOK")),
        instruments=(
            *TOPO.instruments,
            dataclasses.replace(TOPO.instrument("USDCAD"), symbol="USDNOK", quote="NOK"),
        ),
    )
    assert migrate(fresh_db, grown) == []
    ccys, pairs = _reference(fresh_db)
    assert ("NOK", 2) in ccys and ("USDNOK", "USD", "NOK", 5) in pairs
    assert migrate(fresh_db, TOPO) == []  # the older topology, a subset, still migrates


def _fill(trade_id: str, *, buyer: str = "", seller: str = "") -> Fill:
    lon = TOPO.accounts("lon")
    return make_fill(
        TOPO,
        trade_id=trade_id,
        symbol="EURUSD",
        qty=1_000_000,
        price_ticks=108_500,
        buy_account=buyer or lon[0],
        sell_account=seller or lon[1],
    )


def test_a_ledger_at_version_1_gets_held_fills_and_keeps_its_rows(
    pg: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An existing ledger upgrades in place: migration 2 only adds its table."""
    import ledger.migrations as mig
    from ledger import schema

    dsn = pg.create_database("t_" + uuid.uuid4().hex[:12])
    with monkeypatch.context() as m:  # the build before held_fills
        m.setattr(mig, "MIGRATIONS", mig.MIGRATIONS[:1])
        m.setattr(schema, "TRANSACTIONAL_TABLES", schema.V1_TABLES[3:])
        assert migrate(dsn, TOPO, compliance_role=False) == [1]
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT to_regclass('held_fills')").fetchone() == (None,)
    post(dsn, [_fill("lon-EURUSD-before-v2")])
    # until migrated, verify cannot say no held fill is missing: it says so, not PASS
    assert [p.kind for p in verify(dsn).problems] == [ProblemKind.NOT_MIGRATED]
    assert migrate(dsn, TOPO) == [2]
    assert applied_versions(dsn) == [1, 2]
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT count(*) FROM transfers").fetchone() == (2,)
        for code in TOPO.codes:
            assert c.execute("SELECT to_regclass(%s)", (f"held_fills_{code}",)).fetchone() != (
                None,
            )
    assert verify(dsn).ok


def test_compliance_role_is_read_only(db: str) -> None:
    with psycopg.connect(db) as c:
        for t in ("postings", "transfers", "balances", "accounts", "held_fills"):
            row = c.execute(
                "SELECT has_table_privilege(%s, %s, 'SELECT'), "
                "has_table_privilege(%s, %s, 'INSERT'), has_table_privilege(%s, %s, 'UPDATE'), "
                "has_table_privilege(%s, %s, 'DELETE')",
                (COMPLIANCE_ROLE, t) * 4,
            ).fetchone()
            assert row == (True, False, False, False), t
        c.execute(f"SET ROLE {COMPLIANCE_ROLE}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DELETE FROM postings")


# ---- writing ----------------------------------------------------------------------------------


def test_fills_of_each_region_land_in_that_regions_partitions(db: str) -> None:
    fills = random_fills(TOPO, 90, prefix="part", seed=1)
    post(db, fills)
    with psycopg.connect(db) as c:
        for code in TOPO.codes:
            mine = {f.trade_id for f in fills if f.exec_region == code}
            assert mine
            for table, col in (("transfers", "trade_id"), ("postings", "transfer_id")):
                rows = c.execute(
                    f"SELECT DISTINCT region, split_part({col}, ':', 1) FROM {table}_{code} "
                    f"WHERE {col} LIKE %s",
                    ("%-part-%",),
                ).fetchall()
                assert {r[0] for r in rows} == {code}
                assert {r[1] for r in rows} == mine
    assert verify(db).ok


def test_replaying_every_fill_twice_changes_nothing(db: str) -> None:
    fills = random_fills(TOPO, 200, prefix="replay", seed=2)
    post(db, fills)
    before = state(db)
    post(db, fills + fills, batch=77)  # replays split differently over batches
    assert state(db) == before
    assert verify(db).ok


def test_another_fill_under_a_posted_trade_id_is_a_conflict_not_a_replay(fresh_db: str) -> None:
    """ON CONFLICT DO NOTHING never compared contents: a different fill under a posted trade
    id counted as a replay, and the books were short a trade, silently."""
    x = _fill("lon-EURUSD-conflict-1")
    post(fresh_db, [x])
    before = state(fresh_db)

    async def go(fills: list[Fill], seq: int = 0) -> BatchResult:
        async with await psycopg.AsyncConnection.connect(fresh_db) as conn:
            trs = [t for f in fills for t in transfers_for_fill(f, TOPO, "lon", stream_seq=seq)]
            return await post_transfers(conn, "lon", trs)

    other = dataclasses.replace(x, qty=2 * x.qty)
    with pytest.raises(TransferConflict) as err:
        asyncio.run(go([_fill("lon-EURUSD-conflict-2"), other]))
    e = err.value
    assert isinstance(e, LedgerError) and e.permanent and not e.retryable
    assert e.trade_ids == (x.trade_id,) and e.field == "trade_id"
    assert [t.id for t, _ in e.conflicts] == [f"{x.trade_id}:base", f"{x.trade_id}:quote"]
    assert f"qty {x.qty} posted, {2 * x.qty} here" in e.conflicts[0][1]
    assert state(fresh_db) == before  # nothing of the batch posted
    # the same fill again (even re-sent under another stream sequence) is still a replay
    res = asyncio.run(go([x], seq=77))
    assert (res.transfers_new, res.transfers_replayed, res.postings) == (0, 2, 0)
    # two fills of one trade id in one batch: the one that differs from the first is refused
    y = _fill("lon-EURUSD-conflict-3")
    with pytest.raises(TransferConflict) as err:
        asyncio.run(go([y, x, dataclasses.replace(y, price_ticks=1)]))
    assert [t.price_ticks for t, _ in err.value.conflicts] == [1, 1]
    res = asyncio.run(go([y, y]))
    assert (res.transfers_new, res.transfers_replayed) == (2, 2)
    assert verify(fresh_db).ok


@st.composite
def trade_streams(draw: st.DrawFn) -> list[Fill]:
    tag = uuid.uuid4().hex[:8]
    accounts = list(TOPO.accounts())
    symbols = [i.symbol for i in TOPO.instruments]
    out = []
    for i in range(draw(st.integers(1, 25))):
        sym = draw(st.sampled_from(symbols))
        out.append(
            make_fill(
                TOPO,
                trade_id=f"{TOPO.exec_region(sym)}-{sym}-h{tag}-{i}",
                symbol=sym,
                qty=draw(st.integers(1, 10**9)),
                price_ticks=draw(st.integers(1, 10**8)),
                buy_account=draw(st.sampled_from(accounts)),
                sell_account=draw(st.sampled_from(accounts)),
                transact_ns=i,
            )
        )
    return out


def _balances(dsn: str) -> dict[tuple[str, str], int]:
    """Total position per (account, currency): the sum over regions."""
    with psycopg.connect(dsn) as c:
        return {
            (a, ccy): int(b)
            for a, ccy, b in c.execute(
                "SELECT account, currency, sum(balance) FROM balances GROUP BY 1, 2"
            )
        }


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(fills=trade_streams())
def test_property_db_postings_sum_to_zero_and_balances_match_model(
    db: str, fills: list[Fill]
) -> None:
    from tests.test_ledger_model import _model

    before = _balances(db)
    post(db, fills, batch=8)
    after = _balances(db)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    want = _model(fills, TOPO)
    assert {k: v for k, v in delta.items() if v} == {k: v for k, v in want.items() if v}
    with psycopg.connect(db) as c:
        sums = c.execute("SELECT currency, sum(amount) FROM postings GROUP BY 1").fetchall()
    assert all(s == 0 for _, s in sums)


# ---- verify -------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    register(sub)
    args = ap.parse_args(argv)
    rc: int = args.func(args)
    return rc


def test_verify_detects_an_edited_posting(fresh_db: str) -> None:
    post(fresh_db, random_fills(TOPO, 30, prefix="ed", region="nyc", seed=3))
    assert _cli(["ledger", "verify", "--dsn", fresh_db]) == 0
    with psycopg.connect(fresh_db) as c:
        c.execute("UPDATE postings SET amount = amount + 1 WHERE region = 'nyc' AND id = 7")
    report = verify(fresh_db)
    assert not report.ok
    hashes = [p for p in report.problems if p.kind == ProblemKind.CHAIN_HASH]
    assert [(p.region, p.posting_id) for p in hashes] == [("nyc", 7)]
    assert {p.kind for p in report.problems} >= {
        ProblemKind.UNBALANCED,
        ProblemKind.BALANCE_MISMATCH,
    }
    assert _cli(["ledger", "verify", "--dsn", fresh_db]) == 1


def test_verify_detects_a_deleted_posting(fresh_db: str) -> None:
    post(fresh_db, random_fills(TOPO, 30, prefix="del", region="sgp", seed=4))
    with psycopg.connect(fresh_db) as c:
        c.execute("DELETE FROM postings WHERE region = 'sgp' AND id = 11")
    report = verify(fresh_db)
    gaps = [p for p in report.problems if p.kind == ProblemKind.CHAIN_GAP]
    assert [(p.region, p.posting_id) for p in gaps] == [("sgp", 11)]
    # the tail too: the chain head still points at the deleted row
    with psycopg.connect(fresh_db) as c:
        c.execute("DELETE FROM postings WHERE region = 'sgp' AND id = 120")
    heads = [p for p in verify(fresh_db).problems if p.kind == ProblemKind.CHAIN_HEAD]
    assert [(p.region, p.posting_id) for p in heads] == [("sgp", 120)]


def test_verify_detects_an_inserted_posting(fresh_db: str) -> None:
    post(fresh_db, random_fills(TOPO, 20, prefix="ins", region="lon", seed=5))
    with psycopg.connect(fresh_db) as c:
        head = c.execute(
            "SELECT last_posting_id, last_hash FROM chain_heads WHERE region = 'lon'"
        ).fetchone()
        assert head is not None
        # A forger who knows the hashing scheme appends a perfectly chained posting.
        fake = make_fill(
            TOPO,
            trade_id="lon-EURUSD-forged-1",
            symbol="EURUSD",
            qty=1000,
            price_ticks=100000,
            buy_account="LON-HF-01",
            sell_account="LON-HF-01",
        )
        p = chain_postings(
            transfers_for_fill(fake, TOPO, "lon")[:1],
            region="lon",
            last_id=head[0],
            last_hash=head[1],
            recorded_ns=1,
        )[0]
        c.execute(
            f"INSERT INTO postings ({', '.join(POSTING_COLUMNS)}) "
            f"VALUES ({', '.join(['%s'] * len(POSTING_COLUMNS))})",
            posting_row(p),
        )
    report = verify(fresh_db)
    named = {(p.kind, p.region, p.posting_id) for p in report.problems}
    assert (ProblemKind.CHAIN_HEAD, "lon", head[0] + 1) in named
    assert (ProblemKind.POSTING_MISMATCH, "lon", head[0] + 1) in named
    assert (ProblemKind.UNBALANCED, "lon", head[0] + 1) in named


# ---- export -------------------------------------------------------------------------------------


def _read(path: Path, fmt: str) -> list[dict[str, Any]]:
    with path.open() as fh:
        if fmt == "jsonl":
            return [json.loads(line) for line in fh]
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("id", "amount", "transact_ns", "recorded_ns"):
            if k in r and r[k].lstrip("-").isdigit():
                r[k] = int(r[k])
    return rows


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_under_concurrent_writes_is_one_consistent_snapshot(
    fresh_db: str, tmp_path: Path, fmt: str
) -> None:
    post(fresh_db, random_fills(TOPO, 5000, prefix="base", seed=6), batch=1000)
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        i = 0
        while not stop.is_set():
            post(fresh_db, random_fills(TOPO, 60, prefix=f"live{i}", seed=100 + i), batch=20)
            written[0] += 60
            i += 1

    th = threading.Thread(target=writer)
    th.start()
    try:
        while written[0] < 120:  # writes are flowing before the export starts
            threading.Event().wait(0.01)
        req = ExportRequest(
            regions=TOPO.codes,
            out_dir=tmp_path / "exp",
            fmt=fmt,  # type: ignore[arg-type]
            role=COMPLIANCE_ROLE,
        )
        manifest = export_ledger(fresh_db, req)
    finally:
        stop.set()
        th.join()
    during = written[0]
    assert during > 120, "the concurrent writer made no progress during the export"
    postings = _read(tmp_path / "exp" / f"postings.{fmt}", fmt)
    transfers = _read(tmp_path / "exp" / f"transfers.{fmt}", fmt)
    m = manifest["postings"]
    assert m["rows"] == len(postings) >= 20000
    assert manifest["transfers"]["rows"] == len(transfers)
    # per-currency sums in the manifest are those of the rows written, and they balance
    sums: dict[str, int] = {}
    for r in postings:
        sums[r["currency"]] = sums.get(r["currency"], 0) + r["amount"]
    assert sums == {c: v["net"] for c, v in m["per_currency"].items()}
    assert set(sums.values()) == {0}
    # postings and transfers come from the same snapshot
    assert {r["transfer_id"] for r in postings} == {r["id"] for r in transfers}
    # every region's chain in the file is complete up to the snapshot's chain head
    for code in TOPO.codes:
        rows = [
            Posting(**{k: r[k] for k in Posting.__dataclass_fields__})
            for r in postings
            if r["region"] == code
        ]
        head = manifest["chain_heads"][code]
        n, problems = check_chain_rows(code, rows, (head["last_posting_id"], head["last_hash"]))
        assert problems == [] and n == head["last_posting_id"] > 0
    # and the database moved on after the snapshot
    with psycopg.connect(fresh_db) as c:
        total = c.execute("SELECT count(*) FROM postings").fetchone()
    assert total is not None and total[0] > len(postings)
    saved = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert saved["snapshot"]["isolation"] == "REPEATABLE READ READ ONLY"


def test_export_time_range_and_cli(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fills = [
        dataclasses.replace(f, transact_ns=1_800_000_000_000_000_000 + i * 10**9)
        for i, f in enumerate(random_fills(TOPO, 10, prefix="rng", seed=7))
    ]
    post(db, fills)
    # 2027-01-15T08:00:00Z = 1_800_000_000 s; keep trades 2..5 (inclusive from, exclusive to)
    rc = _cli(
        [
            "ledger",
            "export",
            "--dsn",
            db,
            "--regions",
            "lon,nyc,sgp",
            "--from",
            "2027-01-15T08:00:02Z",
            "--to",
            "2027-01-15T08:00:06+00:00",
            "--format",
            "jsonl",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "postings" in err and "100.0%" in err  # the progress bar
    rows = _read(tmp_path / "x" / "transfers.jsonl", "jsonl")
    assert sorted({r["trade_id"] for r in rows}) == sorted(f.trade_id for f in fills[2:6])
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["postings"]["rows"] == 16


def _topology_unused(t: Topology) -> Iterator[str]:  # keeps the import for typing tools
    yield from t.codes


# ---- held fills ---------------------------------------------------------------------------------


def _hold(dsn: str, seq: int, payload: bytes, trade_id: str | None) -> None:
    from ledger.held import UPSERT_SQL, payload_digest

    row = ("lon", seq, trade_id, "mrd.lon.fill.EURUSD", "buy_account", "not a known account")
    with psycopg.connect(dsn) as c:
        c.execute(UPSERT_SQL, (*row, payload, payload_digest(payload), 1, 1))


def test_held_rows_are_outstanding_until_their_trade_is_posted(fresh_db: str) -> None:
    """A row is outstanding until its region has a transfer of its trade. A row whose trade
    id was not readable stays so until post-held reads it; another fill held at the same
    stream sequence (a stream recreated since) gets a row of its own."""
    from ledger.held import outstanding, post_held

    a, b = _fill("lon-EURUSD-held-a"), _fill("lon-EURUSD-held-b")
    _hold(fresh_db, 7, encode(a), None)  # its trade id not readable when held
    _hold(fresh_db, 7, encode(b), "lon-EURUSD-held-b")  # the same sequence, another fill
    _hold(fresh_db, 7, encode(b), "lon-EURUSD-held-b")  # held again: counted, one row
    with psycopg.connect(fresh_db) as c:
        held = outstanding(c, ["lon"])
        got = sorted((h.trade_id or "", h.holds) for h in held)
        assert got == [("", 1), ("lon-EURUSD-held-b", 2)]
    post(fresh_db, [b])  # the writer posts b (the stream's copy, once its cause is mended)
    with psycopg.connect(fresh_db) as c:
        assert [h.trade_id for h in outstanding(c, ["lon"])] == [None]
    assert [p.kind for p in verify(fresh_db).problems] == [ProblemKind.HELD_FILL]

    async def go() -> Any:
        async with await psycopg.AsyncConnection.connect(fresh_db) as conn:
            return await post_held(conn, TOPO, "lon")

    # a topology that disagrees with the ledger on a currency (a stale copy) posts nothing
    eur = TOPO.currency("EUR")
    wrong = dataclasses.replace(
        TOPO,
        currencies=tuple(
            dataclasses.replace(c, minor_units=eur.minor_units + 1) if c is eur else c
            for c in TOPO.currencies
        ),
    )

    async def stale() -> Any:
        async with await psycopg.AsyncConnection.connect(fresh_db) as conn:
            return await post_held(conn, wrong, "lon")

    res = asyncio.run(stale())
    assert res.posted == [] and res.batch is None
    assert "currency EUR" in res.still_held[0][1] and "in the ledger" in res.still_held[0][1]
    res = asyncio.run(go())
    assert len(res.posted) == 1 and res.batch is not None and res.batch.transfers_new == 2
    with psycopg.connect(fresh_db) as c:
        assert outstanding(c, ["lon"]) == []
        ids = c.execute("SELECT trade_id FROM held_fills ORDER BY trade_id").fetchall()
    assert ids == [("lon-EURUSD-held-a",), ("lon-EURUSD-held-b",)]  # rows stay, as the record
    assert verify(fresh_db).ok
    assert _cli(["ledger", "held", "--dsn", fresh_db]) == 0


def test_held_commands_on_a_ledger_not_migrated_say_so(pg: PostgresServer) -> None:
    dsn = pg.create_database("t_" + uuid.uuid4().hex[:12])
    assert _cli(["ledger", "held", "--dsn", dsn]) == 2
    assert _cli(["ledger", "post-held", "--dsn", dsn, "--region", "lon"]) == 2
