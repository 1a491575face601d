"""Pre-trade risk on the real mesh: every check rejects with its reason on a REJECTED report.

The gateway acks first (the request is durably in the home region's ORDERS stream), then risk
decides: acceptance is not approval. Also the 3-region concurrent credit test: one account
sends from the lon, nyc and sgp gateways at once, and its net open exposure never exceeds its
limit (hypothesis over random order streams).

Accounts used here (each test owns its account's state, so tests can run in any order):
LON-HF-01 / NYC-CORP-03 for the static checks, SGP-BANK-02 for the kill switch, LON-BANK-02
for runtime limits, NYC-BANK-02 for the rate limit, SGP-HF-01 for replaces' rate tokens,
LON-CORP-03 for the credit test.
Resting orders are placed away from the mid (inside the collar) and canceled afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from ops.loadgen import REFERENCE_MIDS, seed_top_of_book
from regions.topology import Topology
from router import contract
from router.client import DeskClient, Report
from router.contract import (
    CancelReject,
    ExecType,
    ExecutionReport,
    KillScope,
    KillSwitch,
    OrderAck,
    OrdStatus,
    RejectReason,
    Side,
)
from router.externals import REF_MAX_AGE_S
from router.risk import DEFAULT_LIMITS
from tests.conftest import Mesh

pytestmark = pytest.mark.integration

BUY, SELL = Side.BUY, Side.SELL
REPORT_TIMEOUT_S = 10.0


# ---- helpers shared by the order-path test modules -----------------------------------------------


@contextlib.asynccontextmanager
async def desks(
    mesh: Mesh, *pairs: tuple[str, str], entry: str = "gateway"
) -> AsyncIterator[list[DeskClient]]:
    """Desk clients for (region, account) pairs, each on its own connection in that region
    (``entry``: through the gateway, or direct into ORDERS)."""
    conns: list[NATS] = []
    out: list[DeskClient] = []
    try:
        for region, account in pairs:
            nc = await mesh.connect(region, role="desk")
            conns.append(nc)
            c = DeskClient(
                nc, mesh.topology, region=region, account=account, timeout_s=10.0, entry=entry
            )
            await c.start()
            out.append(c)
        yield out
    finally:
        for nc in conns:
            with contextlib.suppress(Exception):
                await nc.close()


def cl(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def deep(symbol: str, side: Side, bps: int = 80) -> int:
    """A price ``bps`` away from the reference mid on the passive side: rests, inside the collar."""
    mid = REFERENCE_MIDS[symbol]
    off = mid * bps // 10_000
    return mid - off if side is BUY else mid + off


def is_outcome(r: Report) -> bool:
    """The first risk outcome of a new order: approved (execution's NEW) or REJECTED."""
    return isinstance(r, ExecutionReport) and r.exec_type in (ExecType.NEW, ExecType.REJECTED)


def is_terminal(r: Report) -> bool:
    return isinstance(r, ExecutionReport) and r.ord_status in contract.TERMINAL_STATUSES


async def outcome(
    c: DeskClient, ack: object, timeout_s: float = REPORT_TIMEOUT_S
) -> ExecutionReport:
    assert isinstance(ack, OrderAck), ack
    r = await c.wait_report(ack.order_id, is_outcome, timeout_s)
    assert isinstance(r, ExecutionReport)
    return r


async def expect_reject(c: DeskClient, ack: object, reason: RejectReason) -> ExecutionReport:
    """The gateway acked (durable acceptance) and risk then rejected with ``reason``."""
    assert isinstance(ack, OrderAck) and not ack.duplicate, ack
    er = await outcome(c, ack)
    assert er.exec_type is ExecType.REJECTED and er.ord_status is OrdStatus.REJECTED, er
    assert er.reject_reason == reason.value, er
    assert er.exec_region == ack.risk_region and er.cum_qty == 0 and er.leaves_qty == 0
    return er


async def expect_new(c: DeskClient, ack: object) -> ExecutionReport:
    er = await outcome(c, ack)
    assert er.exec_type is ExecType.NEW, er
    return er


async def cancel_all(c: DeskClient, orders: Iterable[tuple[str, str, str]]) -> None:
    """Cancel (order_id, cl_ord_id, symbol) orders and wait until each is terminal."""
    orders = list(orders)
    acks = await asyncio.gather(*(c.cancel(clid, sym) for _, clid, sym in orders))
    for ack in acks:
        assert isinstance(ack, OrderAck), ack
    await asyncio.gather(
        *(c.wait_report(oid, is_terminal, REPORT_TIMEOUT_S) for oid, _, _ in orders)
    )


def default_limits_doc() -> dict[str, Any]:
    return tomllib.loads(DEFAULT_LIMITS.read_text())


async def put_kv(mesh: Mesh, bucket: str, key: str, value: bytes | None) -> None:
    """Put (or delete, ``value=None``) ``key`` in ``bucket`` of EVERY region's domain, each
    through that region's own server; every PubAck must come from that region's domain."""
    from router import subjects
    from router.control import put_all

    bucket_of = {"KILL": subjects.kill_bucket, "RISKCFG": subjects.riskcfg_bucket}[bucket]
    res = await put_all(lambda r: mesh.connect(r, role="sre"), mesh.topology, bucket_of, key, value)
    assert all(v == "ok" for v in res.values()), res


async def put_limits(mesh: Mesh, doc: dict[str, Any] | None) -> None:
    """Write a limits document to RISKCFG in every region (None: the defaults of limits.toml)."""
    body = json.dumps(doc if doc is not None else default_limits_doc()).encode()
    await put_kv(mesh, "RISKCFG", "limits", body)
    # the risk workers watch the bucket; an order entered after this is checked under it
    await asyncio.sleep(0.3)


async def put_kill(mesh: Mesh, scope: KillScope, target: str, *, engaged: bool) -> None:
    key = "global" if scope is KillScope.GLOBAL else f"{scope.value}.{target}"
    ks = KillSwitch(
        scope=scope,
        target=target,
        engaged=engaged,
        reason="test",
        by="pytest",
        at_ns=time.time_ns(),
    )
    await put_kv(mesh, "KILL", key, contract.encode(ks))


async def until(pred: Callable[[], bool], timeout_s: float = REPORT_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


# ---- each check on the mesh ----------------------------------------------------------------------


async def test_price_collar_rejects_and_inside_passes(order_path: Mesh) -> None:
    async with desks(order_path, ("lon", "LON-HF-01")) as (c,):
        sym = "EURGBP"
        for side in (BUY, SELL):
            outside = deep(sym, side, bps=-200)  # aggressive side, 2% away
            await expect_reject(
                c, await c.new_order(sym, side, 10_000, outside), RejectReason.PRICE_COLLAR
            )
            passive = deep(sym, side, bps=200)  # 2% away on the passive side: still outside
            await expect_reject(
                c, await c.new_order(sym, side, 10_000, passive), RejectReason.PRICE_COLLAR
            )
        clid = cl("in")
        ack = await c.new_order(sym, BUY, 10_000, deep(sym, BUY), cl_ord_id=clid)
        await expect_new(c, ack)
        assert isinstance(ack, OrderAck)
        await cancel_all(c, [(ack.order_id, clid, sym)])


async def test_max_qty_rejects_above_the_instrument_limit(order_path: Mesh) -> None:
    # limits.toml: USDMXN max_qty 10M (the topology allows 20M, so the gateway accepts it)
    async with desks(order_path, ("sgp", "NYC-HF-01")) as (c,):
        ack = await c.new_order("USDMXN", BUY, 10_000_001, deep("USDMXN", BUY))
        er = await expect_reject(c, ack, RejectReason.MAX_QTY)
        assert er.home_region == "nyc" and er.account == "NYC-HF-01"
        clid = cl("mq")
        ack = await c.new_order("USDMXN", BUY, 10_000_000, deep("USDMXN", BUY), cl_ord_id=clid)
        await expect_new(c, ack)
        assert isinstance(ack, OrderAck)
        await cancel_all(c, [(ack.order_id, clid, "USDMXN")])


async def test_restricted_symbol_per_account(order_path: Mesh) -> None:
    # limits.toml: NYC-CORP-03 is restricted from USDJPY; entered in lon, risk runs in nyc
    async with desks(order_path, ("lon", "NYC-CORP-03")) as (c,):
        ack = await c.new_order("USDJPY", BUY, 1_000_000, deep("USDJPY", BUY))
        await expect_reject(c, ack, RejectReason.RESTRICTED_SYMBOL)
        clid = cl("rs")
        ack = await c.new_order("USDSGD", BUY, 1_000_000, deep("USDSGD", BUY), cl_ord_id=clid)
        await expect_new(c, ack)
        assert isinstance(ack, OrderAck)
        await cancel_all(c, [(ack.order_id, clid, "USDSGD")])


async def test_no_reference_price_rejects(order_path: Mesh) -> None:
    r = aioredis.from_url(order_path.redis_url)
    try:
        async with desks(order_path, ("nyc", "LON-HF-01")) as (c,):
            await r.delete("tob:lon:EURCHF")  # risk-lon reads lon's view only
            await asyncio.sleep(2 * REF_MAX_AGE_S)  # past risk's price cache
            ack = await c.new_order("EURCHF", SELL, 10_000, deep("EURCHF", SELL))
            await expect_reject(c, ack, RejectReason.NO_REFERENCE_PRICE)
            seed_top_of_book(order_path.redis_url, order_path.topology)
            clid = cl("ref")
            ack = await c.new_order("EURCHF", SELL, 10_000, deep("EURCHF", SELL), cl_ord_id=clid)
            await expect_new(c, ack)
            assert isinstance(ack, OrderAck)
            await cancel_all(c, [(ack.order_id, clid, "EURCHF")])
    finally:
        seed_top_of_book(order_path.redis_url, order_path.topology)
        await r.aclose()


async def test_kill_switch_rejects_cancels_resting_and_releases(order_path: Mesh) -> None:
    acct = "SGP-BANK-02"  # home sgp; used by no other test
    mesh = order_path
    async with desks(mesh, ("lon", acct)) as (c,):
        resting = []
        for sym, side in (("USDSGD", BUY), ("EURGBP", SELL), ("USDCAD", BUY)):
            clid = cl("k")
            ack = await c.new_order(sym, side, 100_000, deep(sym, side), cl_ord_id=clid)
            await expect_new(c, ack)
            assert isinstance(ack, OrderAck)
            resting.append((ack.order_id, clid, sym))
        try:
            await put_kill(mesh, KillScope.ACCOUNT, acct, engaged=True)
            for oid, _, _ in resting:
                er = await c.wait_report(oid, is_terminal, REPORT_TIMEOUT_S)
                assert isinstance(er, ExecutionReport)
                assert er.exec_type is ExecType.CANCELED and er.reject_reason == "KILL_SWITCH"
            ack = await c.new_order("USDSGD", BUY, 100_000, deep("USDSGD", BUY))
            await expect_reject(c, ack, RejectReason.KILL_SWITCH)
        finally:
            await put_kill(mesh, KillScope.ACCOUNT, acct, engaged=False)
        # the release reaches sgp's risk worker through its KV watch: retry briefly
        clid = cl("after")
        deadline = time.monotonic() + REPORT_TIMEOUT_S
        while True:
            ack = await c.new_order("USDSGD", BUY, 100_000, deep("USDSGD", BUY), cl_ord_id=clid)
            er = await outcome(c, ack)
            if er.exec_type is ExecType.NEW or time.monotonic() > deadline:
                break
            clid = cl("after")
            await asyncio.sleep(0.1)
        assert er.exec_type is ExecType.NEW, er
        await cancel_all(c, [(er.order_id, clid, "USDSGD")])


async def test_runtime_limit_change_via_riskcfg(order_path: Mesh) -> None:
    mesh = order_path
    sym = "GBPUSD"  # GBP at 1.268 USD
    doc = default_limits_doc()
    doc["instruments"][sym] = {"max_qty": 3_000_000, "max_notional_usd": 2_000_000}
    async with desks(mesh, ("nyc", "LON-BANK-02")) as (c,):
        placed = []

        async def order(qty: int) -> tuple[object, str]:
            clid = cl("lim")
            return await c.new_order(sym, BUY, qty, deep(sym, BUY), cl_ord_id=clid), clid

        ack, clid = await order(1_800_000)  # 2.28M USD: fine under the defaults
        await expect_new(c, ack)
        assert isinstance(ack, OrderAck)
        placed.append((ack.order_id, clid, sym))
        try:
            await put_limits(mesh, doc)
            await expect_reject(c, (await order(4_000_000))[0], RejectReason.MAX_QTY)
            await expect_reject(c, (await order(1_800_000))[0], RejectReason.MAX_NOTIONAL)
            ack, clid = await order(1_500_000)  # 1.902M USD
            await expect_new(c, ack)
            assert isinstance(ack, OrderAck)
            placed.append((ack.order_id, clid, sym))
        finally:
            await put_limits(mesh, None)
        ack, clid = await order(1_800_000)
        await expect_new(c, ack)
        assert isinstance(ack, OrderAck)
        placed.append((ack.order_id, clid, sym))
        await cancel_all(c, placed)


async def test_deleting_runtime_limits_restores_the_defaults(order_path: Mesh) -> None:
    mesh = order_path
    sym = "GBPUSD"
    doc = default_limits_doc()
    doc["instruments"][sym] = {"max_qty": 3_000_000}
    async with desks(mesh, ("lon", "LON-BANK-02")) as (c,):
        try:
            await put_limits(mesh, doc)
            ack = await c.new_order(sym, BUY, 4_000_000, deep(sym, BUY))
            await expect_reject(c, ack, RejectReason.MAX_QTY)
            await put_kv(mesh, "RISKCFG", "limits", None)
            await asyncio.sleep(0.3)
            clid = cl("del")
            ack = await c.new_order(sym, BUY, 4_000_000, deep(sym, BUY), cl_ord_id=clid)
            await expect_new(c, ack)
            assert isinstance(ack, OrderAck)
            await cancel_all(c, [(ack.order_id, clid, sym)])
        finally:
            await put_limits(mesh, None)


async def test_rate_limit_rejects_a_burst_above_the_bucket(order_path: Mesh) -> None:
    mesh = order_path
    doc = default_limits_doc()
    doc["rate"] = {"orders_per_s": 1, "burst": 5}
    sym = "USDCAD"
    async with desks(mesh, ("nyc", "NYC-BANK-02")) as (c,):
        try:
            await put_limits(mesh, doc)
            clids = [cl("rl") for _ in range(30)]
            acks = await asyncio.gather(
                *(c.new_order(sym, BUY, 10_000, deep(sym, BUY), cl_ord_id=x) for x in clids)
            )
            ers = [await outcome(c, a) for a in acks]
        finally:
            await put_limits(mesh, None)
        approved = [(e.order_id, e.cl_ord_id, sym) for e in ers if e.exec_type is ExecType.NEW]
        reasons = {e.reject_reason for e in ers if e.exec_type is ExecType.REJECTED}
        assert reasons == {"RATE_LIMIT"}, reasons
        assert 1 <= len(approved) <= 5 + 2, len(approved)  # burst, plus refill while sending
        # the bucket refills at the default rate again
        clid = cl("rl-after")
        ack = await c.new_order(sym, BUY, 10_000, deep(sym, BUY), cl_ord_id=clid)
        await expect_new(c, ack)
        await cancel_all(c, [*approved, (ack.order_id, clid, sym)])  # type: ignore[union-attr]


async def test_replaces_take_rate_tokens_and_a_cancel_never_needs_one(order_path: Mesh) -> None:
    """A runaway algo out of tokens re-pricing one order back and forth: every replace was
    approved, each a command to the book. Each now takes a token like a new order and is
    refused RATE_LIMIT without one; with the bucket empty, the desk still pulls the order."""
    mesh = order_path
    doc = default_limits_doc()
    doc["rate"] = {"orders_per_s": 1, "burst": 3}
    sym = "USDSGD"
    px = deep(sym, BUY)
    async with desks(mesh, ("nyc", "SGP-HF-01")) as (c,):
        try:
            await put_limits(mesh, doc)
            clid = cl("algo")
            er = await expect_new(c, await c.new_order(sym, BUY, 100_000, px, cl_ord_id=clid))
            rclids = {cl("algo-r"): px + i % 2 for i in range(12)}
            acks = await asyncio.gather(
                *(c.replace(clid, sym, 100_000, p, cl_ord_id=r) for r, p in rclids.items())
            )
            assert all(isinstance(a, OrderAck) for a in acks), acks

            def answers() -> dict[str, Report]:
                return {
                    r.cl_ord_id: r
                    for r in c.orders[er.order_id].reports
                    if r.cl_ord_id in rclids
                    and (isinstance(r, CancelReject) or r.exec_type is ExecType.REPLACED)
                }

            await until(lambda: len(answers()) == len(rclids))
            refused = [r for r in answers().values() if isinstance(r, CancelReject)]
            assert {r.reason for r in refused} == {RejectReason.RATE_LIMIT}, refused
            # the burst less the new order's token, plus what refilled while sending
            assert len(rclids) - len(refused) <= 2 + 3, answers()
            assert isinstance(await c.cancel(clid, sym), OrderAck)
            done = await c.wait_report(er.order_id, is_terminal, REPORT_TIMEOUT_S)
            assert done.ord_status is OrdStatus.CANCELED, done
        finally:
            await put_limits(mesh, None)


# ---- the 3-region concurrent credit test ---------------------------------------------------------

CREDIT_ACCOUNT = "LON-CORP-03"  # home lon, limits.toml: 20M USD
CREDIT_LIMIT_USD = 20_000_000
CREDIT_SYMBOLS = ("EURUSD", "USDCAD", "USDJPY")  # executed in lon, nyc, sgp

order_spec = st.tuples(
    st.sampled_from(CREDIT_SYMBOLS),
    st.sampled_from([BUY, SELL]),
    st.integers(min_value=1, max_value=8).map(lambda k: k * 1_000_000),
)
region_stream = st.lists(order_spec, min_size=1, max_size=5)


def exposure_usd(topo: Topology, orders: Iterable[tuple[str, Side, int]]) -> int:
    """The engine's measure with no position: per symbol max(open buys, open sells) in USD."""
    per: dict[str, list[int]] = {}
    for sym, side, qty in orders:
        per.setdefault(sym, [0, 0])[0 if side is BUY else 1] += qty
    total = 0
    for sym, (buy, sell) in per.items():
        rate = topo.currency(topo.instrument(sym).base).usd_rate_micros
        total += max(buy, sell) * rate // 1_000_000
    return total


@settings(
    max_examples=4,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=list(HealthCheck),
)
@example(
    lon=[("EURUSD", BUY, 8_000_000)] * 3,
    nyc=[("USDCAD", SELL, 8_000_000)] * 3,
    sgp=[("USDJPY", BUY, 8_000_000)] * 3,
)
@given(lon=region_stream, nyc=region_stream, sgp=region_stream)
async def test_credit_limit_holds_with_concurrent_orders_from_three_regions(
    order_path: Mesh,
    lon: list[tuple[str, Side, int]],
    nyc: list[tuple[str, Side, int]],
    sgp: list[tuple[str, Side, int]],
) -> None:
    mesh = order_path
    streams = {"lon": lon, "nyc": nyc, "sgp": sgp}
    async with desks(mesh, *((r, CREDIT_ACCOUNT) for r in streams)) as clients:
        by_region = dict(zip(streams, clients, strict=True))

        async def send(region: str) -> list[tuple[OrderAck, tuple[str, Side, int]]]:
            c = by_region[region]
            specs = streams[region]
            acks = await asyncio.gather(
                *(
                    c.new_order(s, side, q, deep(s, side), cl_ord_id=cl("cr"))
                    for s, side, q in specs
                )
            )
            out = []
            for a, spec in zip(acks, specs, strict=True):
                assert isinstance(a, OrderAck), a
                assert a.risk_region == "lon" and a.entry_region == region
                out.append((a, spec))
            return out

        sent = [x for part in await asyncio.gather(*(send(r) for r in streams)) for x in part]
        watcher = clients[0]
        results = [(await outcome(watcher, a), spec) for a, spec in sent]
        approved = [(er, spec) for er, spec in results if er.exec_type is ExecType.NEW]
        rejected = [er for er, _ in results if er.exec_type is ExecType.REJECTED]
        try:
            assert {er.reject_reason for er in rejected} <= {"CREDIT_LIMIT"}, rejected
            assert exposure_usd(mesh.topology, [s for _, s in approved]) <= CREDIT_LIMIT_USD
            if exposure_usd(mesh.topology, [s for _, s in sent]) > CREDIT_LIMIT_USD:
                assert rejected, "the stream exceeds the limit, yet nothing was rejected"
            # every approved order is resting (passive prices): exposure is just open orders
            for er, _ in approved:
                assert er.ord_status is OrdStatus.NEW and er.leaves_qty == er.qty
        finally:
            await cancel_all(
                watcher, [(er.order_id, er.cl_ord_id, er.symbol) for er, _ in approved]
            )
            # risk-lon learns of the cancels from each region's EXECOUT; let it catch up
            await asyncio.sleep(0.3)
