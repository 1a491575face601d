"""AsyncPublisher against a real nats-server: PubAcks parsed exactly, errors typed, overdue
PubAcks failed and their slots given back, waiting for a slot when all are taken."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from ops.procs import standalone_jetstream
from router.natsutil import H_MSG_ID, Ack, AsyncPublisher, PublishError, _fast_puback


def _json_ack(data: bytes) -> Ack:
    d = json.loads(data)
    return Ack(d["stream"], int(d["seq"]), d.get("domain", ""), bool(d.get("duplicate")))


@pytest.mark.parametrize("domain", [None, "lon"])
def test_pubacks_the_server_writes_take_the_fast_path(tmp_path: Path, domain: str | None) -> None:
    srv, url = standalone_jetstream("pub", tmp_path, domain=domain)

    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(StreamConfig(name="T", subjects=["t.>"]))
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
        finally:
            await nc.close()

    try:
        asyncio.run(go())
    finally:
        srv.stop()


def test_errors_timeouts_and_slots(tmp_path: Path) -> None:
    srv, url = standalone_jetstream("pub", tmp_path)

    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(StreamConfig(name="T", subjects=["t.>"]))

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
        finally:
            await nc.close()

    try:
        asyncio.run(go())
    finally:
        srv.stop()
