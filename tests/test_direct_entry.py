"""Direct entry (contract.md): a desk stores its request in its home region's ORDERS itself,
and the PubAck is its ack. Risk derives what the gateway would have stamped (the order id, the
accept time), checks the request as it checks the gateway's, and ORDERS holds one request per
(account, cl_ord_id) whoever stores it."""

from __future__ import annotations

import time

import msgpack
import pytest
from nats.js.errors import APIError

from ops.history import order_history
from router import contract, ids, subjects
from router.contract import ExecType, OrderAck, OrderReject, OrdStatus, RejectReason
from router.natsutil import H_ACCEPTED_NS, H_ENTRY_REGION, H_MSG_ID, H_OP, H_ORDER_ID
from tests.conftest import Mesh
from tests.test_risk_checks import BUY, SELL, cl, deep, desks, outcome
from tests.test_risk_engine import new_order

pytestmark = pytest.mark.integration


async def test_a_direct_order_is_acked_by_its_store_and_trades(order_path: Mesh) -> None:
    """A buyer entering in sgp for a lon-homed account, a seller in lon: both store their
    orders in lon's ORDERS themselves; they trade, and the reports carry the stored time."""
    async with desks(
        order_path, ("sgp", "LON-CORP-03"), ("lon", "LON-BANK-02"), entry="direct"
    ) as (
        buyer,
        seller,
    ):
        px = deep("EURGBP", SELL, 5)
        before = time.time_ns()
        sell = await seller.new_order("EURGBP", SELL, 1_000_000, px, cl_ord_id=cl("dsell"))
        assert isinstance(sell, OrderAck), sell
        assert (sell.entry_region, sell.risk_region, sell.exec_region) == ("lon", "lon", "lon")
        assert sell.order_id == ids.order_id("LON-BANK-02", sell.cl_ord_id) and not sell.duplicate
        await seller.wait_report(sell.order_id, lambda r: r.exec_type is ExecType.NEW, 10)
        buy = await buyer.new_order("EURGBP", BUY, 1_000_000, px, cl_ord_id=cl("dbuy"))
        assert isinstance(buy, OrderAck), buy
        assert (buy.entry_region, buy.risk_region) == ("sgp", "lon")
        assert buy.stream_seq > sell.stream_seq  # both in lon's ORDERS
        trade = await buyer.wait_report(buy.order_id, lambda r: r.exec_type is ExecType.TRADE, 10)
        assert trade.ord_status is OrdStatus.FILLED and trade.last_px == px
        assert before <= trade.entry_ns <= buy.accepted_ns  # stored, then acked
    # compliance reconstructs it: the request as the desk stored it, at its stored time
    nc = await order_path.connect("lon")
    try:
        h = await order_history(nc, order_path.topology, buy.cl_ord_id, account="LON-CORP-03")
    finally:
        await nc.close()
    assert h is not None and h.order_id == buy.order_id
    (entry,) = [e for e in h.events if e.what == "accepted (new)"]
    assert entry.ts_ns == trade.entry_ns and "stored by the desk (direct entry)" in entry.detail
    assert any(e.what == "TRADE FILLED" for e in h.events), [e.what for e in h.events]


async def test_a_direct_resend_gets_the_original_ack_and_other_content_is_refused(
    order_path: Mesh,
) -> None:
    async with desks(order_path, ("nyc", "NYC-HF-01"), entry="direct") as (c,):
        clid = cl("ddup")
        px = deep("USDCAD", BUY)
        a1 = await c.new_order("USDCAD", BUY, 1_000_000, px, cl_ord_id=clid)
        a2 = await c.new_order("USDCAD", BUY, 1_000_000, px, cl_ord_id=clid)
        assert isinstance(a1, OrderAck) and isinstance(a2, OrderAck), (a1, a2)
        assert a2.duplicate and (a2.order_id, a2.stream_seq) == (a1.order_id, a1.stream_seq)
        a3 = await c.new_order("USDCAD", BUY, 2_000_000, px, cl_ord_id=clid)
        assert isinstance(a3, OrderReject) and a3.reason is RejectReason.DUPLICATE_CL_ORD_ID
        # beyond the dedup window (here: stored under another msg id), the subject still
        # holds the request: the same content is its ack again
        late = cl("dlate")
        key = subjects.request_key("NYC-HF-01", late)
        body = msgpack.unpackb(
            contract.encode(new_order("NYC-HF-01", late, "USDCAD", BUY, 1_000_000, px))
        )
        js = c.nc.jetstream(domain="nyc")
        before_store = time.time_ns()
        first = await js.publish(
            subjects.orders("nyc", "NYC-HF-01", key),
            msgpack.packb(body),
            headers={H_MSG_ID: f"elsewhere-{key}", H_OP: "new"},
        )
        after_store = time.time_ns()
        again = await c.new_order("USDCAD", BUY, 1_000_000, px, cl_ord_id=late)
        assert isinstance(again, OrderAck) and again.duplicate and again.stream_seq == first.seq
        assert abs(again.accepted_ns - time.time_ns()) < 60 * 10**9  # the stored time
        # read from the server's stamp, not the desk's clock at the answer (a fallback)
        assert before_store - 10**9 <= again.accepted_ns <= after_store + 10**9


async def test_another_publishers_msg_id_cannot_take_a_requests_place(order_path: Mesh) -> None:
    """A publisher into ORDERS stores a copy of another account's request on its own subject,
    under the msg id the gateway used to send for that request: the victim's own store (and
    its ack) is unaffected, because stores carry no msg id; the copy is refused by risk."""
    async with desks(order_path, ("lon", "LON-HF-01"), entry="direct") as (victim,):
        js = victim.nc.jetstream(domain="lon")
        clid = cl("dvictim")
        px = deep("EURGBP", BUY)
        key = subjects.request_key("LON-HF-01", clid)
        await js.publish(
            subjects.orders("lon", "LON-BANK-02", subjects.request_key("LON-BANK-02", clid)),
            contract.encode(new_order("LON-HF-01", clid, "EURGBP", BUY, 1_000_000, px)),
            headers={H_MSG_ID: key, H_OP: "new"},
        )
        ack = await victim.new_order("EURGBP", BUY, 1_000_000, px, cl_ord_id=clid)
        assert isinstance(ack, OrderAck) and not ack.duplicate, ack
        er = await outcome(victim, ack)
        assert er.exec_type is ExecType.NEW


async def test_orders_holds_one_request_per_subject_whoever_stores_it(order_path: Mesh) -> None:
    """A publisher that sends neither a msg id nor the expected-sequence header still cannot
    store a second request on a subject; nor a message larger than a request can be."""
    nc = await order_path.connect("lon", role="desk")
    try:
        js = nc.jetstream(domain="lon")
        clid = cl("dtwice")
        subject = subjects.orders("lon", "LON-HF-01", subjects.request_key("LON-HF-01", clid))
        body = contract.encode(
            new_order("LON-HF-01", clid, "EURGBP", BUY, 1_000_000, deep("EURGBP", BUY))
        )
        await js.publish(subject, body, headers={H_OP: "new"})
        with pytest.raises(APIError) as second:
            await js.publish(subject, body, headers={H_OP: "new"})
        assert "maximum messages per subject exceeded" in str(second.value.description)
        with pytest.raises(APIError) as big:
            await js.publish(
                subjects.orders("lon", "LON-HF-01", "big"), b"x" * 9000, headers={H_OP: "new"}
            )
        assert "message size exceeds maximum allowed" in str(big.value.description)
    finally:
        await nc.close()


async def test_what_a_desk_stamps_itself_is_not_believed(order_path: Mesh) -> None:
    """A direct publisher's order id header must be the order's (another is a typed reject,
    nothing decided); an accept time it makes up is replaced by the stored time."""
    async with desks(order_path, ("lon", "LON-HF-01")) as (c,):
        js = c.nc.jetstream(domain="lon")
        forged, stamped = cl("dforged"), cl("dstamped")
        px = deep("EURGBP", BUY)
        before = time.time_ns()
        for clid, headers in (
            (forged, {H_ORDER_ID: ids.order_id("LON-HF-01", "someone-elses")}),
            (stamped, {H_ACCEPTED_NS: "1"}),
        ):
            key = subjects.request_key("LON-HF-01", clid)
            await js.publish(
                subjects.orders("lon", "LON-HF-01", key),
                contract.encode(new_order("LON-HF-01", clid, "EURGBP", BUY, 1_000_000, px)),
                headers={H_MSG_ID: key, H_OP: "new", **headers},
            )
        rej = await c.wait_report(
            ids.order_id("LON-HF-01", forged), lambda r: r.exec_type is ExecType.REJECTED, 10
        )
        assert rej.reject_reason == "MALFORMED" and rej.cl_ord_id == forged
        new = await c.wait_report(
            ids.order_id("LON-HF-01", stamped), lambda r: r.exec_type is ExecType.NEW, 10
        )
        assert before <= new.entry_ns <= time.time_ns()


async def test_a_direct_request_the_checks_refuse_is_refused_before_it_is_stored(
    order_path: Mesh,
) -> None:
    async with desks(order_path, ("lon", "LON-HF-01"), entry="direct") as (c,):
        rej = await c.new_order("XAUUSD", BUY, 1_000_000, 1, cl_ord_id=cl("dsym"))
        assert isinstance(rej, OrderReject) and rej.reason is RejectReason.UNKNOWN_SYMBOL
        # the contract's field rules too, exactly as the gateway decodes them
        for bad in ({"cl_ord_id": "a b"}, {"price_ticks": 0}):
            kw = {"cl_ord_id": cl("dfield"), "price_ticks": deep("EURGBP", BUY), **bad}
            rej = await c.new_order("EURGBP", BUY, 1_000_000, **kw)  # type: ignore[arg-type]
            assert isinstance(rej, OrderReject) and rej.reason is RejectReason.INVALID_FIELD, rej
        ok = await c.new_order("EURGBP", BUY, 1_000_000, deep("EURGBP", BUY), cl_ord_id=cl("d"))
        er = await outcome(c, ok)
        assert er.exec_type is ExecType.NEW


@pytest.mark.parametrize("entry", ["gateway", "direct"])
async def test_a_cancel_reusing_an_orders_cl_ord_id_is_refused_for_good(
    order_path: Mesh, entry: str
) -> None:
    """The subject already holds another op's request under that cl_ord_id: the answer is
    DUPLICATE_CL_ORD_ID, not UNAVAILABLE (which tells a desk to re-send, for ever)."""
    async with desks(order_path, ("lon", "LON-HF-01"), entry=entry) as (c,):
        clid = cl(f"reuse-{entry}")
        ack = await c.new_order("EURGBP", BUY, 1_000_000, deep("EURGBP", BUY), cl_ord_id=clid)
        assert isinstance(ack, OrderAck), ack
        rej = await c.cancel(cl("other"), "EURGBP", cl_ord_id=clid)
        assert isinstance(rej, OrderReject) and rej.reason is RejectReason.DUPLICATE_CL_ORD_ID


async def test_a_stored_request_without_an_op_is_read_as_risk_reads_it(order_path: Mesh) -> None:
    """A publisher stores a cancel with no Mrd-Op: risk reads it as a new order (and refuses
    it). Re-sending the same cancel must not be acked as its duplicate: it was never a cancel."""
    async with desks(order_path, ("lon", "LON-HF-01"), entry="direct") as (c,):
        clid, orig = cl("noop"), cl("orig")
        cancel = contract.CancelOrder(
            account="LON-HF-01", cl_ord_id=clid, orig_cl_ord_id=orig, symbol="EURGBP"
        )
        key = subjects.request_key("LON-HF-01", clid)
        await c.nc.jetstream(domain="lon").publish(
            subjects.orders("lon", "LON-HF-01", key), contract.encode(cancel)
        )
        rej = await c.cancel(orig, "EURGBP", cl_ord_id=clid)
        assert isinstance(rej, OrderReject) and rej.reason is RejectReason.DUPLICATE_CL_ORD_ID


async def test_the_load_generator_enters_orders_directly(order_path: Mesh) -> None:
    """The bench's direct points: every order stored by the desk, acked by its PubAck, and
    executed; none counted twice or refused."""
    from ops.loadgen import run_load

    res = await run_load(
        order_path.urls("lon", "desk"),
        order_path.topology,
        "lon",
        run_id=cl("dl")[-8:],
        seconds=1.0,
        rate=40,
        entry="direct",
    )
    assert res["sent"] == res["acked"] == res["completed"] > 0, res
    assert res["rejected"] == 0 and res["timeouts"] == 0, res
    # stored by the desk: no gateway stamped them (its stores carry Mrd-Entry-Region)
    nc = await order_path.connect("lon")
    try:
        js = nc.jetstream(domain="lon")
        last = (await js.stream_info("ORDERS")).state.last_seq
        stored = [await js.get_msg("ORDERS", s) for s in range(last - res["sent"] + 1, last + 1)]
    finally:
        await nc.close()
    assert all(H_ENTRY_REGION not in (m.headers or {}) for m in stored)
