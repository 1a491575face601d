"""The order path end to end on the real mesh: gateway -> risk -> execution -> reports."""

from __future__ import annotations

import time
import uuid

import nats
import pytest

from router import contract
from router.client import DeskClient
from router.contract import ExecType, OrderAck, OrderReject, OrdStatus, RejectReason, Side
from tests.conftest import Mesh

pytestmark = pytest.mark.integration


async def desk(mesh: Mesh, region: str, account: str) -> tuple[nats.NATS, DeskClient]:
    nc = await mesh.connect(region, role="desk")
    c = DeskClient(nc, mesh.topology, region=region, account=account)
    await c.start()
    return nc, c


async def test_local_order_is_acked_and_rests(order_path: Mesh) -> None:
    nc, c = await desk(order_path, "lon", "LON-HF-01")
    try:
        ack = await c.new_order("EURUSD", Side.BUY, 1_000_000, price_ticks=108300)
        assert isinstance(ack, OrderAck), ack
        assert ack.risk_region == "lon" and ack.exec_region == "lon" and not ack.duplicate
        er = await c.wait_report(ack.order_id, lambda r: r.exec_type is ExecType.NEW)
        assert er.ord_status is OrdStatus.NEW and er.leaves_qty == 1_000_000
    finally:
        await nc.close()


async def test_cross_region_order_matches_in_sgp_and_reports_reach_lon(order_path: Mesh) -> None:
    """Entered in lon for USDJPY (executed in sgp), matched against a resting sgp order."""
    topo = order_path.topology
    nc_s, seller = await desk(order_path, "sgp", "SGP-HF-01")
    nc_l, buyer = await desk(order_path, "lon", "LON-HF-01")
    try:
        px = 151205
        sell = await seller.new_order("USDJPY", Side.SELL, 2_000_000, price_ticks=px)
        assert isinstance(sell, OrderAck), sell
        await seller.wait_report(sell.order_id, lambda r: r.exec_type is ExecType.NEW)
        t0 = time.perf_counter()
        buy = await buyer.new_order("USDJPY", Side.BUY, 1_000_000, price_ticks=px)
        t_ack = time.perf_counter() - t0
        assert isinstance(buy, OrderAck), buy
        assert (buy.entry_region, buy.risk_region, buy.exec_region) == ("lon", "lon", "sgp")
        trade = await buyer.wait_report(buy.order_id, lambda r: r.exec_type is ExecType.TRADE)
        t_trade = time.perf_counter() - t0
        assert trade.last_qty == 1_000_000 and trade.last_px == px
        assert trade.ord_status is OrdStatus.FILLED and trade.exec_region == "sgp"
        s_trade = await seller.wait_report(sell.order_id, lambda r: r.exec_type is ExecType.TRADE)
        assert s_trade.ord_status is OrdStatus.PARTIALLY_FILLED and s_trade.leaves_qty == 1_000_000
        # lon ack is local (home lon); the trade report crosses lon->sgp and back
        one_way = topo.link("lon", "sgp").one_way_ms / 1000
        # the trade crossed the WAN both ways (lower bound); the upper bound only catches a
        # stall (speed is measured by `meridian bench`, not asserted here)
        assert t_ack < t_trade
        assert 2 * one_way * 0.95 <= t_trade <= 2 * one_way + 3.0, t_trade
    finally:
        await nc_s.close()
        await nc_l.close()


async def test_resent_order_gets_the_original_ack(order_path: Mesh) -> None:
    nc, c = await desk(order_path, "nyc", "NYC-HF-01")
    try:
        cl = "dup-" + uuid.uuid4().hex[:8]
        a1 = await c.new_order("USDCAD", Side.BUY, 1_000_000, price_ticks=136500, cl_ord_id=cl)
        a2 = await c.new_order("USDCAD", Side.BUY, 1_000_000, price_ticks=136500, cl_ord_id=cl)
        assert isinstance(a1, OrderAck) and isinstance(a2, OrderAck)
        assert a2.duplicate and a2.order_id == a1.order_id and a2.stream_seq == a1.stream_seq
        a3 = await c.new_order("USDCAD", Side.BUY, 2_000_000, price_ticks=136500, cl_ord_id=cl)
        assert isinstance(a3, OrderReject) and a3.reason is RejectReason.DUPLICATE_CL_ORD_ID
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("payload", "reason", "field"),
    [
        (b"\xc1\xc1garbage", RejectReason.MALFORMED, ""),
        (b"\x93\x01\x02\x03", RejectReason.MALFORMED, ""),
        (b"x" * 10_000, RejectReason.OVERSIZED, ""),
    ],
)
async def test_garbage_is_rejected_with_a_type(
    order_path: Mesh, payload: bytes, reason: RejectReason, field: str
) -> None:
    nc = await order_path.connect("lon", role="desk")
    try:
        reply = await nc.request("mrd.v1.entry.lon.LON-HF-01.new", payload, timeout=5)
        rej = contract.decode(OrderReject, reply.data)
        assert rej.reason is reason and rej.field == field
    finally:
        await nc.close()
