"""How the risk worker takes its inputs in: an undecodable one is acked in its place (never
term()ed, which under AckPolicy.ALL would ack every earlier input, decided or not), and an
input that comes twice in one batch is decided once."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from nats.aio.msg import Msg
from nats.js.errors import APIError, NoStreamResponseError

from ops.procs import RedisServer, free_ports
from regions.topology import load_topology
from router import contract, ids, subjects
from router.contract import (
    CancelOrder,
    CancelReject,
    NewOrder,
    OrdType,
    RejectReason,
    ReplaceOrder,
    Side,
    TimeInForce,
)
from router.natsutil import PullLoop
from router.refprice import tob_key
from router.risk import Externals, RiskLimits
from router.risk_worker import (
    Item,
    RiskWorker,
    ack_handles,
    kept_headers,
    once_each,
)


class _Nc:
    def jetstream(self, domain: str) -> Any:
        return types.SimpleNamespace()


def _worker() -> RiskWorker:
    return RiskWorker(_Nc(), load_topology(), "lon", None)  # type: ignore[arg-type]


def _order() -> NewOrder:
    return NewOrder(
        account="LON-HF-01",
        cl_ord_id="c1",
        symbol="GBPUSD",
        side=Side.BUY,
        ord_type=OrdType.LIMIT,
        tif=TimeInForce.GTC,
        qty=1_000_000,
        price_ticks=126000,
    )


OID = ids.order_id("LON-HF-01", "c1")
KEY = subjects.request_key("LON-HF-01", "c1")
STORED_NS = 1700000000000000000  # the time in _delivery's ack subject


def _delivery(
    subject: str, data: bytes, seq: int = 5, headers: dict[str, str] | None = None
) -> Msg:
    class _Client:
        async def publish(self, *a: Any, **k: Any) -> None:
            raise AssertionError("nothing is sent for an input when it is classified")

    return Msg(
        _client=_Client(),  # type: ignore[arg-type]
        subject=subject,
        reply=f"$JS.ACK.ORDERS.risk_lon.1.{seq}.{seq}.1700000000000000000.0",
        data=data,
        headers=headers or {"Mrd-Op": "new", "Mrd-Order-Id": OID, "Mrd-Accepted-Ns": "1"},
    )


async def test_an_undecodable_input_is_kept_to_be_acked_in_its_place() -> None:
    w = _worker()
    it = w._classify(_delivery("mrd.lon.ord.LON-HF-01.k1", b"\xc1 not msgpack"))
    assert it is not None and it.kind == "bad" and it.msg is not None
    assert w.stats["bad"] == 1
    assert ack_handles([it]) == [it.msg]  # its own delivery acks it, in its batch


def test_an_input_twice_in_a_batch_is_taken_once_with_the_delivery_to_ack() -> None:
    read_back = Item(input_id="o:k1", kind="order", msg=None)
    other = Item(input_id="o:k2", kind="order", msg=None)
    delivery = _delivery("mrd.lon.ord.LON-HF-01.k1", b"x")
    held = Item(input_id="o:k1", kind="order", msg=delivery)
    got = once_each([read_back, other, held])
    assert got == [read_back, other] and read_back.msg is delivery


def test_the_ack_handle_is_the_delivery_with_the_highest_stream_sequence() -> None:
    # a gap read back (no handle) and its held delivery (sequence 6) merge onto the first
    # item; the batch's last item is an earlier delivery (5): acking it would leave 6 unacked
    read_back = Item(input_id="o:k1", kind="order", msg=None)
    earlier = Item(input_id="o:k2", kind="order", msg=_delivery("mrd.lon.ord.A.k2", b"x", 5))
    held = _delivery("mrd.lon.ord.A.k1", b"x", 6)
    batch = once_each([read_back, earlier, Item(input_id="o:k1", kind="order", msg=held)])
    assert batch[-1] is earlier
    assert ack_handles(batch) == [held]


@pytest.mark.parametrize(
    "headers",
    [
        {"Mrd-Op": "frobnicate", "Mrd-Order-Id": "O1", "Mrd-Accepted-Ns": "1"},
        # an order id that is not the order's (another's, or none)
        {"Mrd-Op": "new", "Mrd-Order-Id": "O1", "Mrd-Accepted-Ns": "1"},
        {"Mrd-Op": "new", "Mrd-Order-Id": ids.order_id("LON-HF-01", "c2")},
        {"Mrd-Op": "new", "Mrd-Order-Id": "O 1\x00", "Mrd-Accepted-Ns": "1"},
        {"Mrd-Op": "new", "Mrd-Order-Id": "O1\n", "Mrd-Accepted-Ns": "1"},
    ],
)
async def test_an_order_with_headers_this_build_cannot_read_is_bad_not_fatal(
    headers: dict[str, str],
) -> None:
    # a newer gateway's op, or a rogue publisher's accept time: before, a KeyError or a
    # ValueError failed the batch for good, and the same read-back failed it after a restart
    w = _worker()
    order = contract.encode(_order())
    it = w._classify(_delivery(f"mrd.lon.ord.LON-HF-01.{KEY}", order, headers=headers))
    assert it is not None and it.kind == "bad" and it.msg is not None


@pytest.mark.parametrize(
    "headers, accepted",
    [
        # a desk's own store (direct entry): nothing but the op; both derived
        ({"Mrd-Op": "new"}, STORED_NS),
        # the gateway's stamp, or one a desk made up: the stored time either way
        ({"Mrd-Op": "new", "Mrd-Order-Id": OID, "Mrd-Accepted-Ns": str(STORED_NS - 10**6)},
         STORED_NS),
        ({"Mrd-Op": "new", "Mrd-Accepted-Ns": "1"}, STORED_NS),
        ({"Mrd-Op": "new", "Mrd-Accepted-Ns": str(STORED_NS + 10**9)}, STORED_NS),
        # not even a time (past int64 once failed a batch for good: msgpack could not encode
        # its report): not read at all where the stored time is known
        ({"Mrd-Op": "new", "Mrd-Accepted-Ns": "soon"}, STORED_NS),
        ({"Mrd-Op": "new", "Mrd-Accepted-Ns": str(2**64)}, STORED_NS),
        ({"Mrd-Op": "new", "Mrd-Accepted-Ns": "-5"}, STORED_NS),
    ],
)  # fmt: skip
async def test_an_orders_id_and_accept_time_are_derived_not_taken_from_its_publisher(
    headers: dict[str, str], accepted: int
) -> None:
    """A desk may store its request in ORDERS itself (direct entry): risk derives the order
    id from the account and cl_ord_id, and the accept time is the stored time. The record
    keeps what was derived (a replay decides the same)."""
    w = _worker()
    order = contract.encode(_order())
    it = w._classify(_delivery(f"mrd.lon.ord.LON-HF-01.{KEY}", order, headers=dict(headers)))
    assert it is not None and it.kind == "order"
    assert it.headers["Mrd-Order-Id"] == OID
    assert int(it.headers["Mrd-Accepted-Ns"]) == accepted


@pytest.mark.parametrize(
    "subject",
    [
        "mrd.lon.ord.LON-HF-01.k1",  # a key that is not the request's: it could be stored twice
        f"mrd.lon.ord.NYC-HF-01.{KEY}",  # another account than the payload's
        # the right account and key, under another subject ORDERS would store beside the
        # request's: taken as the request, it was decided twice, or refused as a re-use
        f"mrd.lon.ord.LON-HF-01.x.{KEY}",
    ],
)
async def test_a_request_on_a_subject_that_is_not_its_own_is_bad(subject: str) -> None:
    w = _worker()
    w.done["o:" + KEY] = b""  # the request itself was decided
    w._hwm["ORDERS"] = (1, 1)
    it = w._classify(_delivery(subject, contract.encode(_order()), headers={"Mrd-Op": "new"}))
    assert it is not None and it.kind == "bad" and w._refuse_unread(it) == []
    if subject.count(".") != 4:  # another shape: never the request's input
        assert it.input_id != "o:" + KEY and not w._reused(it)


@pytest.mark.parametrize(
    "subject",
    [
        f"mrd.nyc.ord.LON-HF-01.{KEY}",
        "mrd.nyc.ord.LON-HF-01.k1",
        "mrd.lon.ord.LON-HF-01.k1",
        f"mrd.lon.ord.LON-HF-01.x.{KEY}",
    ],
)
@pytest.mark.parametrize("broken", [{"qty": 1}, {"price_ticks": 0}, {"v": 2}])
async def test_a_request_off_its_own_subject_is_not_answered_whatever_else_is_wrong(
    subject: str, broken: dict[str, Any]
) -> None:
    """A copy of a live order with a field broken too (below the lot, out of range, a newer
    version), stored in another region or under another key: no REJECTED may reach the desk
    whose order it copies."""
    import msgpack

    w = RiskWorker(_Nc(), load_topology(), subject.split(".")[1], None)  # type: ignore[arg-type]
    it = w._classify(_delivery(subject, msgpack.packb(_order_map(**broken)), 3, {"Mrd-Op": "new"}))
    assert it is not None and it.kind == "bad"
    assert w._refuse_unread(it) == [] and it.unanswered == "subject"


async def test_a_request_stored_outside_its_accounts_home_region_is_refused() -> None:
    """Direct entry lets a desk publish into any region's ORDERS: nyc's risk must not decide
    (or hold exposure for) an account lon's risk owns."""
    w = RiskWorker(_Nc(), load_topology(), "nyc", None)  # type: ignore[arg-type]
    d = _delivery(f"mrd.nyc.ord.LON-HF-01.{KEY}", contract.encode(_order()), 3, {"Mrd-Op": "new"})
    it = w._classify(d)
    assert it is not None and it.kind == "bad"
    # not answered: it may be a copy of an order resting in lon, whose desk must not read a
    # rejection of it
    assert w._refuse_unread(it) == []


async def test_what_risk_keeps_of_a_publishers_headers_is_bounded() -> None:
    big = "x" * 8000
    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    kept = kept_headers(
        {"Mrd-Op": big, "Mrd-Order-Id": big, "Mrd-Accepted-Ns": big, "traceparent": big, "X": big}
    )
    assert set(kept) == {"Mrd-Op", "Mrd-Order-Id", "Mrd-Accepted-Ns"}
    assert max(len(v) for v in kept.values()) <= 24
    assert kept_headers({"traceparent": tp}) == {"traceparent": tp}


def _order_map(**over: Any) -> dict[str, Any]:
    """:func:`_order`'s map on the wire, with ``over`` changed (what another build sends)."""
    import msgpack

    body = msgpack.unpackb(contract.encode(_order()))
    body.update(over)
    return body  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "body, reason",
    [
        (_order_map(v=2), "UNSUPPORTED_VERSION"),  # a newer gateway's contract
        (_order_map(fee_bps=3), "MALFORMED"),  # a field this build does not know
        (_order_map(qty=1.5), "MALFORMED"),
        # readable, but breaking the gateway's checks (another build's or publisher's): the
        # engine must never meet it (an unknown symbol, or a LIMIT with no price, stopped
        # the worker and stalled the region's orders)
        (_order_map(symbol="XAUUSD"), "UNKNOWN_SYMBOL"),
        (_order_map(price_ticks=None), "INVALID_FIELD"),
        (_order_map(tif="DAY", ord_type="MARKET", price_ticks=None), "INVALID_FIELD"),
    ],
)
async def test_an_order_this_build_cannot_read_is_answered_with_a_typed_reject(
    body: dict[str, Any], reason: str
) -> None:
    """Its desk holds an OrderAck (the gateway stored it): it gets a REJECTED report with
    the contract's reason, its id from the ORDERS sequence, and nothing is decided."""
    import msgpack

    w = _worker()
    it = w._classify(_delivery(f"mrd.lon.ord.LON-HF-01.{KEY}", msgpack.packb(body), seq=9))
    assert it is not None and it.kind == "bad"
    (out,) = w._refuse_unread(it)
    rep = contract.decode(contract.ExecutionReport, out.payload)
    assert out.subject == "mrd.lon.er.r.lon.LON-HF-01" and out.msg_id == "lon-risk-9"
    assert (rep.order_id, rep.cl_ord_id, rep.exec_type.value) == (OID, "c1", "REJECTED")
    assert rep.reject_reason == reason and rep.qty == (0 if body["qty"] == 1.5 else 1_000_000)
    assert w.engine.exposure_usd("LON-HF-01") == 0


async def test_an_unreadable_cancel_gets_a_cancel_reject_and_garbage_gets_nothing() -> None:
    import msgpack

    w = _worker()
    cancel = {"v": 2, "account": "LON-HF-01", "cl_ord_id": "x1", "orig_cl_ord_id": "c1",
              "symbol": "GBPUSD"}  # fmt: skip
    hdrs = {"Mrd-Op": "cancel", "Mrd-Order-Id": "O9", "Mrd-Accepted-Ns": "1"}
    x1 = subjects.request_key("LON-HF-01", "x1")
    it = w._classify(_delivery(f"mrd.lon.ord.LON-HF-01.{x1}", msgpack.packb(cancel), 4, hdrs))
    assert it is not None
    (out,) = w._refuse_unread(it)
    rej = contract.decode(contract.CancelReject, out.payload)
    assert (rej.order_id, rej.orig_cl_ord_id, rej.response_to) == ("NONE", "c1", "cancel")
    assert rej.reason == "UNSUPPORTED_VERSION"
    for data in (b"\xc1 not msgpack", msgpack.packb([1, 2]), msgpack.packb({"v": 2})):
        it = w._classify(_delivery("mrd.lon.ord.LON-HF-01.k3", data))
        assert it is not None and w._refuse_unread(it) == []  # names no order: nothing


async def test_a_pull_loop_hands_on_only_deliveries() -> None:
    q: asyncio.Queue[Any] = asyncio.Queue()
    lp = PullLoop(
        None,  # type: ignore[arg-type]
        domain="lon",
        stream="ORDERS",
        durable="risk_lon",
        filter_subject="mrd.lon.ord.>",
        queue=q,
        fill_gaps=True,
    )
    await lp._on_msg(Msg(_client=None, subject="mrd.lon.ord.A.k", reply="_INBOX.x", data=b"1"))  # type: ignore[arg-type]
    assert q.empty() and lp._held is None
    await lp._on_msg(_delivery("mrd.lon.ord.A.k", b"1", seq=1))
    assert q.qsize() == 1


async def test_an_order_whose_payload_names_another_account_than_its_subject_is_bad() -> None:
    """The gateway stores a request under its account's subject; a payload that names
    another account (a rogue publisher's) is not decided, and not answered either: an
    answer may go only to the account the subject names."""
    import msgpack

    w = _worker()
    body = msgpack.packb(_order_map(account="LON-BANK-02"))
    it = w._classify(_delivery("mrd.lon.ord.LON-HF-01.k1", body))
    assert it is not None and it.kind == "bad" and w._refuse_unread(it) == []
    key = subjects.request_key("LON-BANK-02", "c1")
    ok = w._classify(_delivery(f"mrd.lon.ord.LON-BANK-02.{key}", body, headers={"Mrd-Op": "new"}))
    assert ok is not None and ok.kind == "order"


def test_a_stored_requests_accept_time_is_its_stored_time_wherever_it_is_read() -> None:
    """One rule (router.entry.entry_time) for risk, a re-send's ack and compliance history:
    the stored time, a publisher's stamp only when no stored time is known."""
    from router.entry import stored_accept_ns

    stored = {"Nats-Time-Stamp": "2026-11-28T12:00:00.000000123Z"}
    at = 1795867200000000123
    assert stored_accept_ns(stored) == at
    assert stored_accept_ns({**stored, "Mrd-Accepted-Ns": "1"}) == at
    assert stored_accept_ns({"Mrd-Accepted-Ns": "17"}) == 17
    assert stored_accept_ns({"Mrd-Accepted-Ns": "soon"}) == 0


async def test_a_re_use_is_told_from_a_redelivery_by_its_sequence_alone() -> None:
    """A delivery on a key risk remembers is a re-use of the cl_ord_id (answered
    DUPLICATE_CL_ORD_ID) only when its ORDERS sequence is above every decided one: a
    redelivery never is. Its stored time is not used, whichever way the clocks went: a
    re-use stored under a clock behind the mark is still one, and an input decided by a
    build without marks, redelivered under a mark whose time is behind its own, is still a
    redelivery."""
    w = _worker()
    w.done["o:" + KEY] = b""

    def at(seq: int, ts: int) -> Item:
        return Item(input_id="o:" + KEY, kind="order", headers={"seq": str(seq), "ts": str(ts)})

    assert not w._reused(at(100, 10))  # no mark yet: a redelivery
    w._hwm["ORDERS"] = (101, 5)  # decided up to 101, the latest stored at 5
    assert w._reused(at(102, 4))  # stored after, under a clock behind the mark
    assert not w._reused(at(100, 10))  # decided before the marks, stored at a later time
    assert not w._reused(at(101, 5))  # the latest decided, redelivered
    w.done.clear()
    assert not w._reused(at(102, 4))  # not remembered: decided as any new request


class _Stored:
    def __init__(self, data: bytes | None, headers: dict[str, str] | None = None) -> None:
        self.data, self.seq, self.headers = data, 7, headers


class _Js:
    def __init__(self, got: Any) -> None:
        self.got = got

    async def get_last_msg(self, stream: str, subject: str, direct: bool = False) -> Any:
        if isinstance(self.got, Exception):
            raise self.got
        return self.got


@pytest.mark.parametrize(
    ("stored", "want"),
    [
        (None, "same"),  # the request itself: its original ack
        (_Stored(b""), "DUPLICATE_CL_ORD_ID"),  # an empty body (nats-py: data None)
        (_Stored(None), "DUPLICATE_CL_ORD_ID"),
        (_Stored(b"\xc1"), "DUPLICATE_CL_ORD_ID"),  # bytes that are no request
        (_Stored(None, {"Mrd-Op": "cancel"}), "DUPLICATE_CL_ORD_ID"),
        (TimeoutError(), "UNAVAILABLE"),  # not read: the outcome is not known
    ],
)
async def test_a_resend_is_answered_by_what_its_subject_holds(stored: Any, want: str) -> None:
    """Whatever the subject holds that is not this very request refuses the cl_ord_id for
    good (DUPLICATE_CL_ORD_ID, so a re-send gets the same answer); only a failed read is
    UNAVAILABLE. An empty stored body made every re-send UNAVAILABLE, for ever."""
    from router.entry import original_ack, validate

    routed = validate(
        load_topology(), "lon", "mrd.v1.entry.lon.LON-HF-01.new", contract.encode(_order())
    )
    if stored is None:
        stored = _Stored(routed.payload, {"Mrd-Op": "new"})
    elif isinstance(stored, _Stored) and stored.headers:
        stored.data = routed.payload  # the same bytes, under another op
    got = await original_ack(_Js(stored), routed, "lon", fallback_ns=1)
    if want == "same":
        assert isinstance(got, contract.OrderAck) and got.duplicate and got.stream_seq == 7
    else:
        assert isinstance(got, contract.OrderReject) and got.reason.value == want, got


class _StoreJs(_Js):
    """A home region's JetStream for DeskClient's direct store: its publish answers
    ``outcome`` (a PubAck, or raises it); a re-send's read finds ``held``."""

    def __init__(self, outcome: Any, held: Any = None) -> None:
        super().__init__(held)
        self.outcome = outcome
        self.published: list[tuple[str, dict[str, str]]] = []

    async def publish(
        self, subject: str, payload: bytes, timeout: float, stream: str, headers: dict[str, str]
    ) -> Any:
        self.published.append((subject, headers))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class _StoreNc:
    def __init__(self, js: _StoreJs) -> None:
        self.js = js

    def jetstream(self, domain: str) -> Any:
        assert domain == "lon"  # the account's home
        return self.js


@pytest.mark.parametrize(
    ("outcome", "want"),
    [
        (types.SimpleNamespace(seq=9, duplicate=False), "ACK 9"),
        (APIError(err_code=10071, description="wrong last sequence: 3"), "ACK 7 duplicate"),
        (APIError(err_code=10164, description="wrong last sequence"), "ACK 7 duplicate"),
        (APIError(err_code=10054, description="maximum message size exceeded"), "refused"),
        (TimeoutError(), "did not confirm (timeout)"),
        (NoStreamResponseError(), "did not confirm (no responders)"),
    ],
)
async def test_a_direct_store_is_answered_as_the_gateway_answers(outcome: Any, want: str) -> None:
    """DeskClient's direct store (contract.md, direct entry): the PubAck is the ack; a
    subject that holds one already (10071, or 10164 from a clustered stream) is answered from
    the original; any other refusal, and a store not confirmed, is UNAVAILABLE (a re-send
    tells the outcome). Only trace context and the store's headers are sent."""
    from router.client import DeskClient

    js = _StoreJs(outcome)
    c = DeskClient(_StoreNc(js), load_topology(), region="lon", account="LON-HF-01", entry="direct")  # type: ignore[arg-type]
    o = _order()
    routed_payload = contract.encode(o)
    js.got = _Stored(routed_payload, {"Mrd-Op": "new"})
    got = await c.new_order(
        o.symbol, o.side, o.qty, o.price_ticks, cl_ord_id=o.cl_ord_id,
        headers={"X-Other": "dropped", "traceparent": "not-one"},
    )  # fmt: skip
    ((subject, headers),) = js.published
    assert subject == f"mrd.lon.ord.LON-HF-01.{KEY}"
    assert headers == {
        "Nats-Expected-Last-Subject-Sequence": "0",
        "Nats-Expected-Stream": "ORDERS",
        "Mrd-Op": "new",
    }
    if want.startswith("ACK"):
        _, seq, *dup = want.split()
        assert isinstance(got, contract.OrderAck) and got.stream_seq == int(seq)
        assert got.duplicate == bool(dup) and got.order_id == OID
    else:
        assert isinstance(got, contract.OrderReject) and got.reason.value == "UNAVAILABLE"
        assert want in got.rule, got.rule


async def test_a_direct_request_that_fails_the_gateways_checks_is_never_stored() -> None:
    from router.client import DeskClient

    js = _StoreJs(types.SimpleNamespace(seq=1, duplicate=False))
    c = DeskClient(_StoreNc(js), load_topology(), region="lon", account="LON-HF-01", entry="direct")  # type: ignore[arg-type]
    got = await c.new_order("GBPUSD", Side.BUY, 0, 126000, cl_ord_id="c0")
    assert isinstance(got, contract.OrderReject) and got.reason.value == "INVALID_FIELD"
    assert js.published == []
    with pytest.raises(ValueError):
        DeskClient(_StoreNc(js), load_topology(), region="lon", account="A", entry="fast")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    d: Path = tmp_path_factory.mktemp("redis-inputs")
    srv = RedisServer(free_ports(1)[0], d, d / "redis.log").start()
    try:
        yield srv
    finally:
        srv.stop()


async def test_a_replace_takes_a_rate_token_and_a_cancel_never_does(
    redis_srv: RedisServer,
) -> None:
    """A batch asked Redis for a token per new order only, and a replace passed the rate
    check whatever the bucket held: a runaway algo re-pricing one order sent the book a
    command per replace. Replaces now count in what a batch asks for, in batch order with
    the new orders; cancels never do, so a desk out of tokens can still pull its orders."""
    rds = aioredis.from_url(redis_srv.url)
    try:
        await rds.flushdb()
        await rds.hset(tob_key("lon", "GBPUSD"), mapping={"bid_px": 126798, "ask_px": 126802})
        tight = replace(RiskLimits.load(), rate_per_s=1, burst=3)  # no lease: Redis decides
        w = RiskWorker(_Nc(), load_topology(), "lon", rds, tight)  # type: ignore[arg-type]
        acct = "LON-HF-01"

        def item(n: int, msg: Any, **headers: str) -> Item:
            return Item(
                input_id=f"o:k{n}", kind="order", decoded=msg, headers={"seq": str(n), **headers}
            )

        def cancel(n: int) -> Item:
            return item(
                n,
                CancelOrder(account=acct, cl_ord_id=f"x{n}", orig_cl_ord_id="c1", symbol="GBPUSD"),
            )

        new = item(1, _order(), **{"Mrd-Order-Id": OID, "Mrd-Accepted-Ns": "1"})
        reps = [
            item(
                2 + i,
                ReplaceOrder(
                    account=acct,
                    cl_ord_id=f"r{i}",
                    orig_cl_ord_id="c1",
                    symbol="GBPUSD",
                    qty=1_000_000,
                    price_ticks=126001 - i % 2,  # back and forth
                ),
            )
            for i in range(4)
        ]
        batch = [new, *reps, cancel(9)]
        exts = await w._externals(batch)
        assert [exts[it.input_id].rate_ok for it in (new, *reps)] == [True] * 3 + [False] * 2
        assert "o:k9" not in exts  # the cancel asked for no token
        outs = [w._decide(it, exts.get(it.input_id, Externals())) for it in batch]
        assert [o.kind for (o,) in outs] == [
            "Submit",
            "Replace",
            "Replace",
            "CancelReject",
            "CancelReject",
            "Cancel",
        ]
        for (o,) in outs[3:5]:
            rej = contract.decode(CancelReject, o.payload)
            assert (rej.reason, rej.order_id) == (RejectReason.RATE_LIMIT, OID)
        # the bucket is empty: a batch of cancels asks Redis nothing and is not refused
        calls = w.externals.redis_calls
        assert await w._externals([cancel(10), cancel(11)]) == {}
        assert w.externals.redis_calls == calls
    finally:
        await rds.aclose()
