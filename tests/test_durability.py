"""What a PubAck guarantees in the local (default) mode: an acked message survives a SIGKILL
of the nats-server that stored it (decision 0002)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from ops.procs import NatsServer, free_ports
from router.natsutil import AsyncPublisher, PublishError

pytestmark = pytest.mark.integration


def _server(tmp: Path, port: int, mon: int) -> NatsServer:
    conf = tmp / "js.conf"
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\nhttp: "127.0.0.1:{mon}"\n'
        f'jetstream {{ store_dir: "{tmp / "store"}" }}\n'
    )
    return NatsServer("nats-durability", conf, mon, tmp / "nats.log")


async def test_acked_messages_survive_sigkill_of_the_server(tmp_path: Path) -> None:
    port, mon = free_ports(2)
    srv = _server(tmp_path, port, mon).start()
    acked: set[int] = set()
    try:
        nc = await nats.connect(
            f"nats://127.0.0.1:{port}", max_reconnect_attempts=0, allow_reconnect=False
        )
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="DUR", subjects=["dur.>"]))
        pub = await AsyncPublisher(nc, max_pending=512).start()

        async def one(i: int) -> None:
            fut = await pub.publish(f"dur.{i}", str(i).encode(), {"Nats-Msg-Id": str(i)})
            try:
                await asyncio.wait_for(fut, 5)
                acked.add(i)
            except (PublishError, Exception):
                pass

        tasks = [asyncio.create_task(one(i)) for i in range(5000)]
        while len(acked) < 2000:
            await asyncio.sleep(0.001)
        srv.signal(signal.SIGKILL)  # mid-stream: some publishes are in flight
        await asyncio.gather(*tasks, return_exceptions=True)
        await nc.close()
    finally:
        srv.kill()
    assert len(acked) >= 2000
    srv2 = _server(tmp_path, port, mon).start()
    try:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream()
        info = await js.stream_info("DUR")
        stored = set()
        sub = await js.subscribe("dur.>", ordered_consumer=True)
        for _ in range(info.state.messages):
            m = await sub.next_msg(timeout=5)
            stored.add(int(m.data))
        await nc.close()
    finally:
        srv2.stop()
    assert acked <= stored, f"{len(acked - stored)} acked messages lost"
