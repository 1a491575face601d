"""AsyncPublisher against a real nats-server: PubAcks parsed exactly, errors typed, overdue
PubAcks failed and their slots given back, waiting for a slot when all are taken."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from ops.procs import standalone_jetstream
from router.natsutil import H_MSG_ID, Ack, AsyncPublisher, PublishError, _fast_puback


def _with_stream(
    tmp_path: Path, body: Callable[[NATS], Awaitable[None]], domain: str | None = None
) -> None:
    """Run ``body`` connected to a fresh JetStream server with a stream ``T`` on ``t.>``."""
    srv, url = standalone_jetstream("pub", tmp_path, domain=domain)

    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(StreamConfig(name="T", subjects=["t.>"]))
            await body(nc)
        finally:
            await nc.close()

    try:
        asyncio.run(go())
    finally:
        srv.stop()


def _json_ack(data: bytes) -> Ack:
    d = json.loads(data)
    return Ack(d["stream"], int(d["seq"]), d.get("domain", ""), bool(d.get("duplicate")))


@pytest.mark.parametrize("domain", [None, "lon"])
def test_pubacks_the_server_writes_take_the_fast_path(tmp_path: Path, domain: str | None) -> None:
    async def body(nc: NATS) -> None:
        raw = []
        for _ in range(2):  # the second is a duplicate
            r = await nc.request("t.a", b"x", headers={H_MSG_ID: "m1"}, timeout=5)
            raw.append(r.data)
        for data in raw:
            fast = _fast_puback(data)
            assert fast is not None, data  # the shape changed: the fast path is lost
            assert fast == _json_ack(data)
        assert _fast_puback(raw[1]).duplicate and not _fast_puback(raw[0]).duplicate  # type: ignore[union-attr]
        assert _fast_puback(raw[0]).domain == (domain or "")  # type: ignore[union-attr]
        # anything else is parsed as JSON, not guessed at
        assert _fast_puback(b'{"stream":"T","seq":1,"batch":"b"}') is None

    _with_stream(tmp_path, body, domain)


def test_errors_timeouts_and_slots(tmp_path: Path) -> None:
    async def body(nc: NATS) -> None:
        # a responder that never answers: no PubAck, no 503 either
        async def ignore(_m: object) -> None:
            pass

        await nc.subscribe("silent.>", cb=ignore)
        await nc.flush()
        pub = await AsyncPublisher(nc, max_pending=2, ack_timeout_s=0.3).start()

        ok = await pub.publish("t.a", b"x", headers={H_MSG_ID: "a"})
        assert (await ok).seq == 1
        refused = await pub.publish(
            "t.a", b"y", headers={"Nats-Expected-Last-Subject-Sequence": "0"}
        )
        with pytest.raises(PublishError) as e:
            await refused
        assert e.value.err_code == 10071  # wrong last sequence, typed

        lost = [await pub.publish("silent.a", b"z") for _ in range(2)]
        assert pub.saturated
        # a third publish waits for a slot; the overdue two free theirs
        third = asyncio.create_task(pub.publish("t.b", b"w"))
        await asyncio.sleep(0.1)
        assert not third.done()
        for f in lost:
            with pytest.raises(TimeoutError):
                await f
        assert (await (await third)).seq == 2
        assert not pub._pending and not pub._slot_waiters
        await pub.close()

    _with_stream(tmp_path, body)


class _FakeNats:
    """Just enough of a nats-py client for AsyncPublisher: publishes are recorded, and the
    test answers them itself (so waits, wakes and cancels happen in an order it controls)."""

    def __init__(self) -> None:
        self.replies: list[str] = []

    def new_inbox(self) -> str:
        return "_INBOX.t"

    async def subscribe(self, subject: str, **_kw: object) -> object:
        return self

    async def unsubscribe(self) -> None:
        pass

    async def publish(self, subject: str, payload: bytes, **kw: object) -> None:
        self.replies.append(str(kw["reply"]))


class _Reply:
    def __init__(self, subject: str, seq: int) -> None:
        self.subject, self.headers = subject, None
        self.data = b'{"stream":"T","seq":%d}' % seq


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_waiter_cancelled_after_its_wake_passes_the_slot_on() -> None:
    async def go() -> None:
        nc = _FakeNats()
        pub = await AsyncPublisher(nc, max_pending=1).start()  # type: ignore[arg-type]
        first = await pub.publish("t.a", b"1")
        a = asyncio.create_task(pub.publish("t.a", b"2"))
        b = asyncio.create_task(pub.publish("t.a", b"3"))
        await _turns()
        assert not a.done() and not b.done()
        await pub._on_reply(_Reply(nc.replies[0], 1))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the PubAck's done-callback frees the slot and wakes A
        a.cancel()  # woken, cancelled before it ran
        await _turns()
        assert (await first).seq == 1
        assert a.cancelled() and b.done(), "the slot freed for A went to nobody"
        assert len(pub._pending) == 1 and not pub._slot_waiters

    asyncio.run(go())


def test_a_slot_freed_while_a_woken_waiter_has_not_run_goes_to_the_next() -> None:
    async def go() -> None:
        nc = _FakeNats()
        pub = await AsyncPublisher(nc, max_pending=2).start()  # type: ignore[arg-type]
        for i in range(2):
            await pub.publish("t.a", b"%d" % i)
        w0 = asyncio.create_task(pub.publish("t.a", b"w0"))
        await _turns()
        for i, reply in enumerate(nc.replies[:2], start=1):  # both PubAcks, no turn between
            await pub._on_reply(_Reply(reply, i))  # type: ignore[arg-type]
        # runs after the PubAcks' callbacks have freed both slots and woken w0, before w0
        late = asyncio.create_task(pub.publish("t.a", b"late"))
        await _turns()
        assert w0.done() and late.done(), "a free slot was left unused while someone waited"
        assert len(pub._pending) == 2 and not pub._slot_waiters

    asyncio.run(go())


def test_overdue_pubacks_are_swept_without_spinning_on_uvloop() -> None:
    """Deadlines on the loop's own clock: uvloop's millisecond timers once made the sweep
    fire early and re-arm itself hundreds of times."""
    import uvloop

    async def go() -> int:
        nc = _FakeNats()
        pub = await AsyncPublisher(nc, max_pending=100, ack_timeout_s=0.05).start()  # type: ignore[arg-type]
        sweeps = 0
        sweep = pub._expire_overdue

        def counted() -> None:
            nonlocal sweeps
            sweeps += 1
            sweep()

        pub._expire_overdue = counted  # type: ignore[method-assign]
        futs = []
        for i in range(20):
            futs.append(await pub.publish("t.a", b"%d" % i))
            await asyncio.sleep(0.0137)
        await asyncio.sleep(0.2)
        for f in futs:
            with pytest.raises(TimeoutError):
                await f
        assert not pub._pending
        return sweeps

    assert uvloop.run(go()) <= 40  # one per deadline at most, plus a few re-arms


@pytest.mark.parametrize("n", [0, 1, 255, 256, 65535, 65536, 1 << 20])
def test_bin_header_is_msgpacks(n: int) -> None:
    import msgpack

    from router.execution import _bin_header

    packed = msgpack.packb(b"x" * n, use_bin_type=True)
    assert packed == _bin_header(n) + b"x" * n


def test_only_a_well_formed_trace_context_is_passed_on() -> None:
    """A desk's headers pass a hop only as W3C trace context, bounded: an 8 KiB tracestate
    would make a direct store too large for ORDERS, answered UNAVAILABLE (re-send) for ever."""
    from router.natsutil import trace_context

    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    assert trace_context({"traceparent": tp, "tracestate": "k=v", "Nats-Msg-Id": "x"}) == {
        "traceparent": tp,
        "tracestate": "k=v",
    }
    assert trace_context({"traceparent": tp, "tracestate": "x" * 513}) == {"traceparent": tp}
    assert trace_context({"traceparent": "nonsense", "tracestate": "k=v"}) == {}


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.ORDERS.risk_lon.1.42.7.1700000000000000000.3",  # v1
        "$JS.ACK.lon.ACCHASH.ORDERS.risk_lon.1.42.7.1700000000000000000.3",  # v2, 11 tokens
        "$JS.ACK.lon.ACCHASH.ORDERS.risk_lon.1.42.7.1700000000000000000.3.RND",  # v2, 12
    ],
)
def test_every_ack_subject_shape_gives_the_stream_position(reply: str) -> None:
    """A v2 ack subject without its optional last token (11 tokens, which nats-py and
    nats.go accept) was read as v1: int('risk_lon') raised on every delivery."""
    from nats.aio.msg import Msg

    from router.natsutil import StreamPos, stream_position

    pos = stream_position(Msg(_client=None, subject="s", reply=reply))  # type: ignore[arg-type]
    assert pos == StreamPos("ORDERS", "risk_lon", 42, 1700000000000000000, 1, 3, 7)
