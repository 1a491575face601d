"""verify against tampering the chain alone cannot show: missing regions and head rows,
edited transfers, and rewrites caught only against an export's manifest (real PostgreSQL)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
import pytest

from ledger.errors import LedgerConfigError
from ledger.export import ExportRequest, export_ledger
from ledger.migrations import migrate
from ledger.model import GENESIS_HASH, Posting, posting_hash
from ledger.testing import random_fills
from ledger.verify import ProblemKind, verify
from ops.procs import PostgresServer
from regions.topology import DEFAULT_TOPOLOGY, load_topology
from router.contract import encode
from tests.test_ledger_pg import _cli, _hold, post

TOPO = load_topology()
K = ProblemKind


@pytest.fixture
def fresh_db(pg: PostgresServer) -> str:
    dsn = pg.create_database("t_" + uuid.uuid4().hex[:12])
    migrate(dsn, TOPO)
    return dsn


def _rebuild_balances(c: psycopg.Connection[tuple[object, ...]], region: str) -> None:
    """What a forger does after editing postings: balances are not hashed."""
    c.execute("DELETE FROM balances WHERE region = %s", (region,))
    c.execute(
        "INSERT INTO balances (region, account, currency, balance, last_posting_id, updated_ns) "
        "SELECT region, account, currency, sum(amount), max(id), 0 FROM postings "
        "WHERE region = %s GROUP BY region, account, currency",
        (region,),
    )


def _rehash(c: psycopg.Connection[tuple[object, ...]], region: str, from_id: int) -> None:
    """Re-chain ``region`` from posting ``from_id`` to its tip and move its head there: a
    forger who knows the hashing scheme and can write the database."""
    row = c.execute(
        "SELECT hash FROM postings WHERE region = %s AND id = %s", (region, from_id - 1)
    ).fetchone()
    prev = str(row[0]) if row else GENESIS_HASH
    cols = "region, id, transfer_id, account, currency, amount, transact_ns, recorded_ns"
    rows = c.execute(
        f"SELECT {cols} FROM postings WHERE region = %s AND id >= %s ORDER BY id",
        (region, from_id),
    ).fetchall()
    last = from_id - 1
    for r in rows:
        names = cols.split(", ")
        p = Posting(**dict(zip(names, r, strict=True)), prev_hash=prev, hash="")  # type: ignore[arg-type]
        prev = posting_hash(p)
        last = p.id
        c.execute(
            "UPDATE postings SET prev_hash = %s, hash = %s WHERE region = %s AND id = %s",
            (p.prev_hash, prev, region, p.id),
        )
    c.execute(
        "UPDATE chain_heads SET last_posting_id = %s, last_hash = %s WHERE region = %s",
        (last, prev, region),
    )


def _named(report: object) -> list[tuple[ProblemKind, str, int | None]]:
    return [(p.kind, p.region, p.posting_id) for p in report.problems]  # type: ignore[attr-defined]


# ---- finding 1: the regions verified, and postings without a head ------------------------------


def test_postings_without_a_chain_head_row_fail(fresh_db: str) -> None:
    """The last trade cut off (balances adjusted) and the head row deleted passed: the tail
    was checked only when there was a head."""
    fills = random_fills(TOPO, 10, prefix="cut", region="lon", seed=21)
    post(fresh_db, fills)
    last = fills[-1].trade_id
    with psycopg.connect(fresh_db) as c:
        c.execute("DELETE FROM postings WHERE transfer_id LIKE %s", (f"{last}:%",))
        c.execute("DELETE FROM transfers WHERE trade_id = %s", (last,))
        _rebuild_balances(c, "lon")
        c.execute("DELETE FROM chain_heads WHERE region = 'lon'")
    assert _named(verify(fresh_db)) == [(K.CHAIN_HEAD, "lon", 36)]
    assert _cli(["ledger", "verify", "--dsn", fresh_db]) == 1


def test_every_region_of_the_topology_is_verified(
    fresh_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A region emptied of every row (head row too) was simply not checked, a region name
    the topology lacks passed vacuously, and --topology was ignored."""
    fills = random_fills(TOPO, 30, prefix="gone", seed=22)
    assert {f.exec_region for f in fills} == set(TOPO.codes)
    post(fresh_db, fills)
    assert verify(fresh_db).ok
    with psycopg.connect(fresh_db) as c:
        for table in ("postings", "transfers", "balances", "chain_heads"):
            c.execute(f"DELETE FROM {table} WHERE region = 'sgp'")
    report = verify(fresh_db)
    assert _named(report) == [(K.REGION_MISSING, "sgp", None)]
    assert report.regions == ("lon", "nyc", "sgp")
    assert _cli(["ledger", "verify", "--dsn", fresh_db]) == 1
    assert "region_missing: region=sgp" in capsys.readouterr().out

    # a region the topology lacks is an error (exit 2), not a pass over nothing
    with pytest.raises(LedgerConfigError, match="'lonn'"):
        verify(fresh_db, regions=("lonn",))
    assert _cli(["ledger", "verify", "--dsn", fresh_db, "--regions", "lonn"]) == 2
    assert "'lonn'" in capsys.readouterr().err
    assert _cli(["ledger", "verify", "--dsn", fresh_db, "--regions", "lon,nyc"]) == 0

    # the topology given is the one read: here its third region is sgq, which the ledger
    # lacks (sgp is not the topology's any more: no longer required, and not nameable)
    topo = tmp_path / "topology.toml"
    topo.write_text(DEFAULT_TOPOLOGY.read_text().replace('"sgp"', '"sgq"'))
    argv = ["ledger", "verify", "--dsn", fresh_db, "--topology", str(topo)]
    assert _cli(argv) == 1
    assert "region_missing: region=sgq" in capsys.readouterr().out
    assert _cli([*argv, "--regions", "sgp"]) == 2
    assert _cli([*argv, "--regions", "lon,nyc"]) == 0


def test_an_empty_region_is_reported_and_passes(
    fresh_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No trade yet is no tampering: reported as empty; only a manifest can prove deletion."""
    post(fresh_db, random_fills(TOPO, 5, prefix="emp", region="lon", seed=23))
    report = verify(fresh_db)
    assert report.ok and report.empty_regions == ("nyc", "sgp")
    assert _cli(["ledger", "verify", "--dsn", fresh_db]) == 0
    out = capsys.readouterr().out
    assert "empty (no postings" in out and "nyc, sgp" in out and "not anchored" in out


# ---- finding 2: the manifest as the outside anchor ------------------------------------------


def test_a_chain_rewritten_to_its_tip_passes_alone_and_fails_against_the_manifest(
    fresh_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trade moved to another account, the chain re-hashed from there to its tip, head and
    balances updated: consistent inside the database (verify alone passes: the limit), but
    the chain no longer runs through the exported manifest's head."""
    fills = random_fills(TOPO, 20, prefix="anc", region="lon", seed=24)
    post(fresh_db, fills)
    exp = tmp_path / "exp"
    manifest = export_ledger(fresh_db, ExportRequest(regions=TOPO.codes, out_dir=exp))
    head = manifest["chain_heads"]["lon"]["last_posting_id"]
    assert head == 80 and manifest["chain_verifiable"] is True
    # the ledger moves on after the export: the manifest anchors what it saw
    post(fresh_db, random_fills(TOPO, 5, prefix="anc2", region="lon", seed=25))
    report = verify(fresh_db, manifest=exp)
    assert report.ok and report.anchored["lon"][0] == head

    victim = fills[3]
    thief = next(a for a in TOPO.accounts() if a not in (victim.buy_account, victim.sell_account))
    with psycopg.connect(fresh_db) as c:
        row = c.execute(  # the buyer's first posting of the trade: the first row edited
            "SELECT min(id) FROM postings WHERE transfer_id LIKE %s AND account = %s",
            (f"{victim.trade_id}:%", victim.buy_account),
        ).fetchone()
        assert row is not None
        first = int(row[0])
        c.execute(
            "UPDATE postings SET account = %s WHERE transfer_id LIKE %s AND account = %s",
            (thief, f"{victim.trade_id}:%", victim.buy_account),
        )
        c.execute(
            "UPDATE transfers SET credit_account = %s WHERE id = %s",
            (thief, f"{victim.trade_id}:base"),
        )
        c.execute(
            "UPDATE transfers SET debit_account = %s WHERE id = %s",
            (thief, f"{victim.trade_id}:quote"),
        )
        _rehash(c, "lon", first)
        _rebuild_balances(c, "lon")
    assert verify(fresh_db).ok  # what no check inside the database can see
    report = verify(fresh_db, manifest=exp)
    # the manifest's head row, and (the export's postings file being beside it) the first
    # row rewritten
    assert _named(report) == [(K.ANCHOR, "lon", head), (K.ANCHOR, "lon", first)]
    assert _cli(["ledger", "verify", "--dsn", fresh_db, "--manifest", str(exp / "manifest.json")])
    out = capsys.readouterr().out
    assert f"anchor: region=lon posting={head}" in out
    assert f"anchor: region=lon posting={first}" in out
    # the manifest alone (no postings file beside it) still fails, at its head
    alone = tmp_path / "alone.json"
    alone.write_text((exp / "manifest.json").read_text())
    assert _named(verify(fresh_db, manifest=alone)) == [(K.ANCHOR, "lon", head)]


def test_a_cut_tail_and_a_deleted_region_fail_against_the_manifest(
    fresh_db: str, tmp_path: Path
) -> None:
    """The last trade cut off with its head row moved back, and nyc deleted outright: each
    region the manifest lists must be there, its chain through the manifest's head."""
    fills = random_fills(TOPO, 30, prefix="tail", seed=26)
    post(fresh_db, fills)
    exp = tmp_path / "exp"
    manifest = export_ledger(fresh_db, ExportRequest(regions=TOPO.codes, out_dir=exp))
    head = manifest["chain_heads"]["lon"]["last_posting_id"]
    last = [f for f in fills if f.exec_region == "lon"][-1].trade_id
    with psycopg.connect(fresh_db) as c:
        c.execute("DELETE FROM postings WHERE transfer_id LIKE %s", (f"{last}:%",))
        c.execute("DELETE FROM transfers WHERE trade_id = %s", (last,))
        _rehash(c, "lon", head - 3)  # the head moved back to the new tip
        _rebuild_balances(c, "lon")
        for table in ("postings", "transfers", "balances", "chain_heads"):
            c.execute(f"DELETE FROM {table} WHERE region = 'nyc'")
    assert _named(verify(fresh_db, regions=("lon",))) == []  # the limit, again
    nyc_head = manifest["chain_heads"]["nyc"]["last_posting_id"]
    # asked for lon only: the manifest's regions are checked all the same
    report = verify(fresh_db, regions=("lon",), manifest=exp)
    assert set(_named(report)) == {
        (K.REGION_MISSING, "nyc", None),
        (K.ANCHOR, "lon", head),
        (K.ANCHOR, "lon", head - 3),
        (K.ANCHOR, "nyc", nyc_head),
        (K.ANCHOR, "nyc", 1),
    }


def test_a_manifest_that_is_not_one_is_refused(fresh_db: str, tmp_path: Path) -> None:
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(LedgerConfigError, match="manifest"):
        verify(fresh_db, manifest=tmp_path)
    assert _cli(["ledger", "verify", "--dsn", fresh_db, "--manifest", str(tmp_path)]) == 2
    assert _cli(["ledger", "verify", "--dsn", fresh_db, "--manifest", str(tmp_path / "x")]) == 2


# ---- finding 3: transfers re-derived from their trade ---------------------------------------


def test_an_edited_transfer_fails(fresh_db: str) -> None:
    """The hash covers postings only: a transfer's price or qty edited passed."""
    fills = random_fills(TOPO, 10, prefix="px", region="nyc", seed=27)
    post(fresh_db, fills)
    assert verify(fresh_db).ok
    t = fills[4].trade_id
    with psycopg.connect(fresh_db) as c:
        c.execute("UPDATE transfers SET price_ticks = price_ticks + 500 WHERE trade_id = %s", (t,))
    report = verify(fresh_db)
    assert [(p.kind, p.transfer_id) for p in report.problems] == [
        (K.TRANSFER_MISMATCH, f"{t}:quote")
    ]
    assert "amount" in report.problems[0].detail
    with psycopg.connect(fresh_db) as c:  # the review's edit, on every transfer
        c.execute("UPDATE transfers SET price_ticks = price_ticks + 500, qty = qty * 2")
    report = verify(fresh_db)
    assert {p.kind for p in report.problems} == {K.TRANSFER_MISMATCH}
    assert len(report.problems) == 2 * len(fills)


def test_a_trade_whose_legs_disagree_or_lack_one_fails(fresh_db: str) -> None:
    fills = random_fills(TOPO, 6, prefix="leg", region="sgp", seed=28)
    post(fresh_db, fills)
    a, b = fills[1].trade_id, fills[2].trade_id
    with psycopg.connect(fresh_db) as c:
        c.execute("UPDATE transfers SET stream_seq = 99 WHERE id = %s", (f"{a}:quote",))
        # a whole leg gone, postings, balances and the chain made consistent
        row = c.execute(
            "SELECT min(id) FROM postings WHERE transfer_id = %s", (f"{b}:quote",)
        ).fetchone()
        assert row is not None
        c.execute("DELETE FROM postings WHERE transfer_id = %s", (f"{b}:quote",))
        c.execute("DELETE FROM transfers WHERE id = %s", (f"{b}:quote",))
        c.execute(
            "UPDATE postings SET id = id - 2 WHERE region = 'sgp' AND id > %s", (int(row[0]),)
        )
        _rehash(c, "sgp", int(row[0]))
        _rebuild_balances(c, "sgp")
    got = [(p.kind, p.transfer_id) for p in verify(fresh_db).problems]
    assert got == [(K.TRANSFER_MISMATCH, f"{a}:quote"), (K.TRADE_LEGS, f"{b}:base")]


# ---- finding 4: a ranged export says what it is ------------------------------------------------


def test_a_ranged_export_says_its_chains_are_cut_and_lists_held_fills(
    fresh_db: str, tmp_path: Path
) -> None:
    fills = random_fills(TOPO, 12, prefix="rg", region="lon", seed=29)
    post(fresh_db, fills[:6])
    post(fresh_db, fills[8:])
    post(fresh_db, fills[6:8])  # held, posted late: old trade times, new chain ids
    _hold(fresh_db, 41, encode(fills[0]).replace(b"rg", b"rh"), "lon-EURUSD-never-posted")
    t0 = fills[5].transact_ns
    m = export_ledger(
        fresh_db,
        ExportRequest(
            regions=TOPO.codes, out_dir=tmp_path / "r", from_ns=t0, to_ns=fills[9].transact_ns
        ),
    )
    assert m["chain_verifiable"] is False and "cuts the chains" in m["chain_note"]
    assert m["postings"]["per_region"]["lon"]["contiguous"] is False
    assert m["held_outstanding"]["count"] == 1
    assert m["held_outstanding"]["fills"][0]["trade_id"] == "lon-EURUSD-never-posted"
    full = export_ledger(fresh_db, ExportRequest(regions=TOPO.codes, out_dir=tmp_path / "f"))
    assert full["chain_verifiable"] is True
    assert full["postings"]["per_region"]["lon"]["contiguous"] is True
    # a ranged export's manifest still anchors verify (its heads are the whole ledger's)
    report = verify(fresh_db, manifest=tmp_path / "r")
    assert [p.kind for p in report.problems] == [K.HELD_FILL]
    assert report.anchored["lon"] == (48, full["chain_heads"]["lon"]["last_hash"])


def test_a_held_row_deleted_since_the_export_fails_against_its_manifest(
    fresh_db: str, tmp_path: Path
) -> None:
    """The manifest lists the fills held at the export; deleting a held_fills row hid a
    trade the books lack from verify, with or without the manifest."""
    fills = random_fills(TOPO, 2, prefix="hd", region="lon", seed=31)
    post(fresh_db, fills)
    _hold(fresh_db, 77, encode(fills[0]).replace(b"hd", b"hx"), "lon-EURUSD-held-77")
    export_ledger(fresh_db, ExportRequest(regions=TOPO.codes, out_dir=tmp_path / "x"))
    with psycopg.connect(fresh_db) as c:
        c.execute("DELETE FROM held_fills WHERE stream_seq = 77")
    assert verify(fresh_db).ok  # nothing left in the database says a trade is missing
    report = verify(fresh_db, manifest=tmp_path / "x")
    (p,) = report.problems
    assert p.kind is K.HELD_FILL and "row was deleted" in p.detail and "77" in p.detail
