"""Order flow on the real mesh: cancel, replace, time in force, and replay after a reconnect.

Symbols here: GBPUSD (resting orders, canceled afterwards) and EURCHF (crossing), both executed
in lon; orders enter from other regions too, so reports cross the WAN links.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest

from ops.history import order_history
from ops.loadgen import REFERENCE_MIDS
from router.client import DeskClient
from router.contract import (
    CancelReject,
    ExecType,
    ExecutionReport,
    OrderAck,
    OrdStatus,
    OrdType,
    RejectReason,
    TimeInForce,
)
from tests.conftest import Mesh
from tests.test_risk_checks import (
    BUY,
    REPORT_TIMEOUT_S,
    SELL,
    cancel_all,
    cl,
    deep,
    desks,
    expect_new,
    expect_reject,
    is_terminal,
)

pytestmark = pytest.mark.integration

MARKET = OrdType.MARKET


async def terminal(c: DeskClient, ack: object) -> ExecutionReport:
    assert isinstance(ack, OrderAck), ack
    r = await c.wait_report(ack.order_id, is_terminal, REPORT_TIMEOUT_S)
    assert isinstance(r, ExecutionReport)
    return r


async def cancel_reject(c: DeskClient, ack: object) -> CancelReject:
    """The CancelReject answering the cancel/replace request ``ack`` (by its cl_ord_id).

    It names the order it concerns, or ``NONE`` when risk does not know the order.
    """
    assert isinstance(ack, OrderAck), ack
    deadline = time.monotonic() + REPORT_TIMEOUT_S
    while time.monotonic() < deadline:
        for r in c.reports:
            if isinstance(r, CancelReject) and r.cl_ord_id == ack.cl_ord_id:
                return r
        await asyncio.sleep(0.02)
    raise AssertionError(f"no CancelReject for {ack.cl_ord_id}")


async def test_cancel_of_a_resting_order(order_path: Mesh) -> None:
    async with desks(order_path, ("nyc", "LON-HF-01")) as (c,):
        sym, order_cl = "GBPUSD", cl("o")
        ack = await c.new_order(sym, BUY, 1_000_000, deep(sym, BUY), cl_ord_id=order_cl)
        new = await expect_new(c, ack)
        cxl_cl = cl("x")
        cack = await c.cancel(order_cl, sym, cl_ord_id=cxl_cl)
        assert isinstance(cack, OrderAck) and cack.op == "cancel", cack
        er = await terminal(c, ack)
        assert er.exec_type is ExecType.CANCELED and er.ord_status is OrdStatus.CANCELED
        assert (er.cl_ord_id, er.orig_cl_ord_id) == (cxl_cl, order_cl)
        assert er.order_id == new.order_id and er.leaves_qty == 0 and er.cum_qty == 0
        # a second cancel of the same (now terminal) order is refused, the order is unchanged
        again = await c.cancel(order_cl, sym)
        cr = await cancel_reject(c, again)
        assert cr.reason is RejectReason.TOO_LATE_TO_CANCEL and cr.response_to == "cancel"
        assert cr.order_id == new.order_id


async def test_replace_reports_the_new_id_and_the_order_is_known_by_it(order_path: Mesh) -> None:
    async with desks(order_path, ("sgp", "LON-HF-01")) as (c,):
        sym, order_cl = "GBPUSD", cl("o")
        px = deep(sym, BUY)
        ack = await c.new_order(sym, BUY, 1_000_000, px, cl_ord_id=order_cl)
        await expect_new(c, ack)
        assert isinstance(ack, OrderAck)
        rep_cl = cl("r")
        rack = await c.replace(order_cl, sym, 2_000_000, px + 3, cl_ord_id=rep_cl)
        assert isinstance(rack, OrderAck) and rack.op == "replace", rack
        er = await c.wait_report(
            ack.order_id, lambda r: getattr(r, "exec_type", None) is ExecType.REPLACED
        )
        assert isinstance(er, ExecutionReport)
        assert (er.cl_ord_id, er.orig_cl_ord_id) == (rep_cl, order_cl)
        assert er.ord_status is OrdStatus.NEW
        assert (er.qty, er.price_ticks, er.leaves_qty) == (2_000_000, px + 3, 2_000_000)
        # and again, naming the replace's id (FIX: OrigClOrdID is the latest ClOrdID)
        rep2_cl = cl("r2")
        rack2 = await c.replace(rep_cl, sym, 3_000_000, px + 2, cl_ord_id=rep2_cl)
        assert isinstance(rack2, OrderAck), rack2
        await c.wait_report(
            ack.order_id, lambda r: getattr(r, "cl_ord_id", None) == rep2_cl, REPORT_TIMEOUT_S
        )
        # cancel by the newest id
        await cancel_all(c, [(ack.order_id, rep2_cl, sym)])
        assert c.orders[ack.order_id].last.ord_status is OrdStatus.CANCELED  # type: ignore[union-attr]
    # compliance finds the order by any of its ids, with the account or without it
    nc = await order_path.connect("lon")
    try:
        for ref, account in ((rep2_cl, "LON-HF-01"), (rep_cl, None), (order_cl, None)):
            h = await order_history(nc, order_path.topology, ref, account=account)
            assert h is not None and h.order_id == ack.order_id, (ref, h)
            whats = [e.what for e in h.events]
            assert "accepted (new)" in whats and whats.count("accepted (replace)") == 2, whats
            assert "REPLACED NEW" in whats and "CANCELED CANCELED" in whats, whats
            assert {order_cl, rep_cl, rep2_cl} <= set(h.cl_ord_ids) and not h.gaps
    finally:
        await nc.close()


async def test_cancel_and_replace_of_an_unknown_order_are_rejected(order_path: Mesh) -> None:
    async with desks(order_path, ("lon", "NYC-HF-01")) as (c,):
        ghost = cl("ghost")
        cack = await c.cancel(ghost, "USDCAD")
        assert isinstance(cack, OrderAck), cack  # stored: only risk knows the order is unknown
        cr = await cancel_reject(c, cack)
        assert cr.reason is RejectReason.UNKNOWN_ORDER and cr.order_id == "NONE"
        assert cr.orig_cl_ord_id == ghost and cr.response_to == "cancel"
        # stamped when ORDERS stored the request (after the gateway's accept stamp), not
        # with the desk's own sent_ns, which a client may leave out (0)
        assert cr.transact_ns >= cack.accepted_ns
        rack = await c.replace(ghost, "USDCAD", 1_000_000, deep("USDCAD", BUY))
        cr = await cancel_reject(c, rack)
        assert cr.reason is RejectReason.UNKNOWN_ORDER and cr.response_to == "replace"
        assert cr.transact_ns >= rack.accepted_ns


async def test_ioc_fok_and_market_orders_reach_terminal_states(order_path: Mesh) -> None:
    sym = "EURCHF"
    mid = REFERENCE_MIDS[sym]
    async with desks(order_path, ("lon", "LON-BANK-02"), ("nyc", "NYC-HF-01")) as (maker, taker):
        # nothing to match: IOC and MARKET are canceled for lack of liquidity
        er = await terminal(
            taker, await taker.new_order(sym, BUY, 100_000, mid, tif=TimeInForce.IOC)
        )
        assert er.ord_status is OrdStatus.CANCELED and er.reject_reason == "NO_LIQUIDITY"
        ack = await taker.new_order(sym, BUY, 100_000, ord_type=MARKET, tif=TimeInForce.FOK)
        er = await terminal(taker, ack)
        assert er.ord_status is OrdStatus.CANCELED and er.cum_qty == 0

        mack = await maker.new_order(sym, SELL, 1_000_000, mid + 2)
        await expect_new(maker, mack)
        assert isinstance(mack, OrderAck)
        # FOK larger than the book: canceled whole, the resting order untouched
        er = await terminal(
            taker, await taker.new_order(sym, BUY, 2_000_000, mid + 2, tif=TimeInForce.FOK)
        )
        assert er.ord_status is OrdStatus.CANCELED and er.cum_qty == 0
        # IOC within the book: filled
        er = await terminal(
            taker, await taker.new_order(sym, BUY, 600_000, mid + 2, tif=TimeInForce.IOC)
        )
        assert er.ord_status is OrdStatus.FILLED and er.cum_qty == 600_000
        assert Decimal(er.avg_px) == Decimal(mid + 2).scaleb(-5)
        # MARKET IOC for more than is left: fills the rest, remainder canceled
        ack = await taker.new_order(
            sym, BUY, 1_000_000, ord_type=OrdType.MARKET, tif=TimeInForce.IOC
        )
        er = await terminal(taker, ack)
        assert er.ord_status is OrdStatus.CANCELED and er.cum_qty == 400_000
        assert er.leaves_qty == 0
        mer = await terminal(maker, mack)
        assert mer.ord_status is OrdStatus.FILLED and mer.cum_qty == 1_000_000
        trades = [
            r
            for r in maker.orders[mack.order_id].reports
            if isinstance(r, ExecutionReport) and r.exec_type is ExecType.TRADE
        ]
        assert [t.last_qty for t in trades] == [600_000, 400_000]


async def test_replay_after_reconnect_returns_the_same_reports(order_path: Mesh) -> None:
    acct, sym = "SGP-HF-01", "GBPUSD"  # home sgp, executed in lon: reports from two regions
    async with desks(order_path, ("nyc", acct)) as (c,):
        rest_cl = cl("rest")
        a1 = await c.new_order(sym, SELL, 1_000_000, deep(sym, SELL), cl_ord_id=rest_cl)
        await expect_new(c, a1)
        a2 = await c.new_order(sym, SELL, 1_000_000, deep(sym, SELL, bps=300))
        await expect_reject(c, a2, RejectReason.PRICE_COLLAR)
        gone_cl = cl("gone")
        a3 = await c.new_order(sym, SELL, 2_000_000, deep(sym, SELL), cl_ord_id=gone_cl)
        await expect_new(c, a3)
        assert isinstance(a1, OrderAck) and isinstance(a2, OrderAck) and isinstance(a3, OrderAck)
        await cancel_all(c, [(a3.order_id, gone_cl, sym)])
        ids = {a1.order_id, a2.order_id, a3.order_id}
        live = {oid: list(c.orders[oid].reports) for oid in ids}
        assert sum(len(v) for v in live.values()) == 4
    # a new connection, as a desk that restarted
    async with desks(order_path, ("lon", acct)) as (c2,):
        added = await c2.replay()
        assert added >= 4
        replayed = {oid: c2.orders[oid].reports for oid in ids}
        assert replayed == live
        assert await c2.replay() == 0  # nothing twice
        # positions per (region, stream), from the replay's consumers: the home region's
        # RISKLOG (the PRICE_COLLAR reject) and the executing region's EXECOUT
        pos = dict(c2.replayed)
        assert pos[("sgp", "RISKLOG")] > 0 and pos[("lon", "EXECOUT")] > 0, pos
        with pytest.raises(TypeError):
            await c2.replay(since={"lon": 1})  # type: ignore[dict-item]  # a region: two streams
        await cancel_all(c2, [(a1.order_id, rest_cl, sym)])  # its CANCELED came live
        assert await c2.replay(since=pos) == 0
        assert c2.replayed[("lon", "EXECOUT")] > pos[("lon", "EXECOUT")]
        # a client starting from those positions (not subscribed: nothing comes live) reads
        # only what was stored after them
        c3 = DeskClient(c2.nc, order_path.topology, region="lon", account=acct)
        assert await c3.replay(since=pos) == 1
        (r,) = c3.reports
        assert isinstance(r, ExecutionReport) and r.order_id == a1.order_id
        assert r.exec_type is ExecType.CANCELED
        assert c3.replayed == c2.replayed
