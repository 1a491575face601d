"""Pure ledger rules and the emitted DDL (no servers)."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Decimal, localcontext

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import FillRejected
from ledger.model import (
    GENESIS_HASH,
    balance_deltas,
    chain_postings,
    posting_hash,
    quote_amount_minor,
    round_half_even_div,
    transfer_id,
    transfers_for_fill,
)
from ledger.schema import TRANSACTIONAL_TABLES, schema_ddl
from ledger.testing import make_fill
from regions.topology import Topology, load_topology
from router.contract import Fill

TOPO = load_topology()


def _fill(**kw: object) -> Fill:
    args: dict[str, object] = dict(
        trade_id="lon-EURUSD-1-1",
        symbol="EURUSD",
        qty=1_000_000,
        price_ticks=108_453,
        buy_account="LON-HF-01",
        sell_account="NYC-BANK-02",
    )
    args.update(kw)
    return make_fill(TOPO, **args)  # type: ignore[arg-type]


# ---- amounts and ids -----------------------------------------------------------------------


@given(st.integers(0, 10**30), st.integers(1, 10**12))
def test_half_even_division_matches_decimal(num: int, den: int) -> None:
    with localcontext() as ctx:
        ctx.prec = 80
        want = int((Decimal(num) / Decimal(den)).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    assert round_half_even_div(num, den) == want


def test_quote_amount_rounds_half_even() -> None:
    # 1 unit at 1.00005 USD = 100.005 cents -> 100 (even); 3 units = 300.015 -> 300.02 -> 300
    assert (
        quote_amount_minor(qty=1, price_ticks=100005, price_decimals=5, quote_minor_units=2) == 100
    )
    assert (
        quote_amount_minor(qty=1, price_ticks=101500, price_decimals=5, quote_minor_units=2) == 102
    )  # 101.5 -> 102
    assert (
        quote_amount_minor(qty=1, price_ticks=100500, price_decimals=5, quote_minor_units=2) == 100
    )  # 100.5 -> 100
    # JPY has no minor units: 1,000,000 USD at 151.237 = 151,237,000 JPY
    assert (
        quote_amount_minor(
            qty=1_000_000, price_ticks=151_237, price_decimals=3, quote_minor_units=0
        )
        == 151_237_000
    )


def test_a_trade_is_two_balanced_transfers_buyer_pays_quote() -> None:
    base, quote = transfers_for_fill(_fill(), TOPO, "lon")
    assert base.id == "lon-EURUSD-1-1:base" and quote.id == "lon-EURUSD-1-1:quote"
    assert (base.currency, base.amount) == ("EUR", 100_000_000)
    assert (base.debit_account, base.credit_account) == ("NYC-BANK-02", "LON-HF-01")
    assert (quote.currency, quote.amount) == ("USD", 108_453_000)
    assert (quote.debit_account, quote.credit_account) == ("LON-HF-01", "NYC-BANK-02")
    again = transfers_for_fill(_fill(), TOPO, "lon")
    assert (base, quote) == again  # deterministic: a replay maps to the same ids


def test_transfer_ids_are_injective() -> None:
    assert transfer_id("a:base", "quote") != transfer_id("a", "base")
    with pytest.raises(ValueError):
        transfer_id("a", "fee")


@pytest.mark.parametrize(
    ("kw", "region", "field"),
    [
        ({}, "nyc", "exec_region"),
        ({"buy_account": "NOPE-1"}, "lon", "buy_account"),
        ({"sell_account": "NOPE-1"}, "lon", "sell_account"),
    ],
)
def test_fills_breaking_ledger_rules_are_rejected_with_the_field(
    kw: dict[str, object], region: str, field: str
) -> None:
    with pytest.raises(FillRejected) as ei:
        transfers_for_fill(_fill(**kw), TOPO, region)
    assert ei.value.field == field and ei.value.trade_id == "lon-EURUSD-1-1"


def test_fill_with_wrong_price_decimals_is_rejected() -> None:
    import dataclasses

    bad = dataclasses.replace(_fill(), price_decimals=3)
    with pytest.raises(FillRejected) as ei:
        transfers_for_fill(bad, TOPO, "lon")
    assert ei.value.field == "price_decimals"


# ---- hash chain ----------------------------------------------------------------------------


def test_chain_links_and_detects_an_edit() -> None:
    trs = [
        t
        for i in range(3)
        for t in transfers_for_fill(_fill(trade_id=f"lon-EURUSD-{i}-1"), TOPO, "lon")
    ]
    ps = chain_postings(trs, region="lon", last_id=0, last_hash=GENESIS_HASH, recorded_ns=5)
    assert [p.id for p in ps] == list(range(1, 13))
    assert ps[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(ps))
    assert all(posting_hash(p) == p.hash for p in ps)
    import dataclasses

    edited = dataclasses.replace(ps[4], amount=ps[4].amount + 1)
    assert posting_hash(edited) != edited.hash


# ---- property: random trade streams --------------------------------------------------------

_SYMBOLS = [i.symbol for i in TOPO.instruments]
_ACCOUNTS = list(TOPO.accounts())


@st.composite
def trade_streams(draw: st.DrawFn) -> list[Fill]:
    n = draw(st.integers(1, 40))
    out = []
    for i in range(n):
        sym = draw(st.sampled_from(_SYMBOLS))
        out.append(
            make_fill(
                TOPO,
                trade_id=f"{TOPO.exec_region(sym)}-{sym}-p-{i}",
                symbol=sym,
                qty=draw(st.integers(1, 10**9)),
                price_ticks=draw(st.integers(1, 10**9)),
                buy_account=draw(st.sampled_from(_ACCOUNTS)),
                sell_account=draw(st.sampled_from(_ACCOUNTS)),
                transact_ns=i,
            )
        )
    return out


def _model(fills: Sequence[Fill], topo: Topology) -> dict[tuple[str, str], int]:
    """Independent model: Decimal arithmetic, positions per (account, currency)."""
    pos: dict[tuple[str, str], int] = {}
    for f in fills:
        base_mu = topo.currency(f.base).minor_units
        quote_mu = topo.currency(f.quote).minor_units
        b = f.qty * 10**base_mu
        q = int(
            (
                Decimal(f.qty)
                * Decimal(f.price_ticks)
                / Decimal(10) ** f.price_decimals
                * Decimal(10) ** quote_mu
            ).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
        )
        for acct, ccy, amt in (
            (f.buy_account, f.base, b),
            (f.sell_account, f.base, -b),
            (f.buy_account, f.quote, -q),
            (f.sell_account, f.quote, q),
        ):
            pos[(acct, ccy)] = pos.get((acct, ccy), 0) + amt
    return {k: v for k, v in sorted(pos.items())}


@settings(max_examples=150, deadline=None)
@given(trade_streams())
def test_property_postings_sum_to_zero_and_balances_match_model(fills: list[Fill]) -> None:
    heads: dict[str, tuple[int, str]] = {}
    postings = []
    for f in fills:
        region = f.exec_region
        last_id, last_hash = heads.get(region, (0, GENESIS_HASH))
        ps = chain_postings(
            transfers_for_fill(f, TOPO, region),
            region=region,
            last_id=last_id,
            last_hash=last_hash,
            recorded_ns=1,
        )
        heads[region] = (ps[-1].id, ps[-1].hash)
        postings.extend(ps)
    per_ccy: dict[str, int] = {}
    for p in postings:
        per_ccy[p.currency] = per_ccy.get(p.currency, 0) + p.amount
    assert set(per_ccy.values()) == {0}
    got = {k: v for k, v in balance_deltas(postings).items()}
    want = _model(fills, TOPO)
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in want.items() if v}


# ---- DDL ------------------------------------------------------------------------------------


def test_postgres_ddl_partitions_every_transactional_table_by_region() -> None:
    ddl = schema_ddl("postgresql", TOPO)
    text = "\n".join(ddl)
    for t in TRANSACTIONAL_TABLES:
        create = next(s for s in ddl if s.startswith(f"CREATE TABLE IF NOT EXISTS {t.name} ("))
        assert create.endswith("PARTITION BY LIST (region)")
        pk = re.search(r"PRIMARY KEY \(([^)]*)\)", create)
        assert pk and pk.group(1).split(", ")[0] == "region"
        for code in TOPO.codes:
            assert (
                f"CREATE TABLE IF NOT EXISTS {t.name}_{code} PARTITION OF {t.name} "
                f"FOR VALUES IN ('{code}')"
            ) in ddl
    for ref in ("currencies", "instruments", "accounts"):
        create = next(s for s in ddl if s.startswith(f"CREATE TABLE IF NOT EXISTS {ref} ("))
        assert "PARTITION" not in create
    assert "LOCALITY" not in text and "crdb_region" not in text


def test_cockroach_ddl_is_multi_region_regional_by_row_and_global() -> None:
    ddl = schema_ddl("cockroachdb", TOPO, database="meridian")
    text = "\n".join(ddl)
    assert "PARTITION BY" not in text  # the PostgreSQL layout must not leak into CockroachDB
    # CockroachDB Cloud's names of the GCP regions (tests/test_ledger_crdb_regions.py ties
    # them to terraform's)
    assert ddl[0] == 'ALTER DATABASE "meridian" SET PRIMARY REGION "gcp-europe-west2"'
    assert 'ALTER DATABASE "meridian" ADD REGION IF NOT EXISTS "gcp-us-east4"' in ddl
    assert 'ALTER DATABASE "meridian" ADD REGION IF NOT EXISTS "gcp-asia-southeast1"' in ddl
    assert "SURVIVE" not in text  # terraform owns the survival goal
    for t in TRANSACTIONAL_TABLES:
        create = next(s for s in ddl if s.startswith(f"CREATE TABLE IF NOT EXISTS {t.name} ("))
        assert create.endswith(") LOCALITY REGIONAL BY ROW AS crdb_region")
        assert "crdb_region crdb_internal_region NOT VISIBLE NOT NULL AS (CASE region " in create
        for r in TOPO.regions:
            assert f"WHEN '{r.code}' THEN 'gcp-{r.cloud_region}'" in create
    for ref in ("currencies", "instruments", "accounts"):
        create = next(s for s in ddl if s.startswith(f"CREATE TABLE IF NOT EXISTS {ref} ("))
        assert create.endswith(") LOCALITY GLOBAL")
    region_ddl = schema_ddl("cockroachdb", TOPO, database="m", survival="region")
    assert 'ALTER DATABASE "m" SURVIVE REGION FAILURE' in region_ddl  # only when asked


def _docker_ok() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.integration
def test_cockroach_schema_applies_on_a_real_cluster() -> None:
    if not _docker_ok():
        pytest.skip(
            "no Docker engine here (docker info fails): the CockroachDB DDL is checked "
            "as emitted SQL above; this runs where testcontainers can start cockroach"
        )
    from testcontainers.cockroachdb import CockroachDBContainer

    from ledger.migrations import migrate
    from ledger.verify import verify

    with CockroachDBContainer("cockroachdb/cockroach:latest-v24.1") as crdb:
        url = crdb.get_connection_url()
        dsn = "cockroachdb://" + url.split("://", 1)[1]
        # A single-node demo cluster has one region: map every region code to it (the
        # override a self-hosted cluster uses; MERIDIAN_LEDGER_CRDB_REGIONS="*=<region>").
        with __import__("psycopg").connect("postgresql://" + url.split("://", 1)[1]) as c:
            regions = [r[0] for r in c.execute("SHOW REGIONS FROM CLUSTER").fetchall()]
        demo = {"*": regions[0]}
        assert migrate(dsn, TOPO, crdb_regions=demo) == [1, 2]
        assert migrate(dsn, TOPO, crdb_regions=demo) == []  # a rerun is safe
        assert verify(dsn).ok
