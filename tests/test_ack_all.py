"""What the single writers rely on in JetStream's AckPolicy.ALL, pinned on a real nats-server.

Risk acks each batch's inputs once the batch's outputs are stored, batch by batch in order, by
acking the last message of each consumer in the batch. While an old batch waits (a region cut
off), its inputs are redelivered; risk skips those (router.risk_worker._process) because
acking the original delivery of a later message acks them too. That holds only if AckAll
works by stream sequence, and if acking a redelivery never acks messages delivered after it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from ops.procs import standalone_jetstream

pytestmark = pytest.mark.integration


async def test_ack_all_works_by_stream_sequence_across_redeliveries(tmp_path: Path) -> None:
    srv, url = standalone_jetstream("ackall", tmp_path)
    try:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="S", subjects=["s.>"]))
        for i in range(6):
            await js.publish(f"s.{i}", b"x")
        await js.add_consumer(
            "S", ConsumerConfig(durable_name="c", ack_policy=AckPolicy.ALL, ack_wait=1.0)
        )
        sub = await js.pull_subscribe("s.>", durable="c", stream="S")
        first = await sub.fetch(6, timeout=2)
        assert [m.metadata.sequence.stream for m in first] == [1, 2, 3, 4, 5, 6]
        await asyncio.sleep(1.6)  # past ack_wait: 1..3 come again, with new delivery numbers
        again = await sub.fetch(3, timeout=2)
        assert [m.metadata.sequence.stream for m in again] == [1, 2, 3]
        assert all(m.metadata.sequence.consumer > 6 for m in again)

        await first[2].ack()  # the original delivery of stream seq 3 ...
        await asyncio.sleep(0.3)
        ci = await js.consumer_info("S", "c")
        assert ci.ack_floor.stream_seq == 3  # ... acks 1..3, redelivered since or not
        assert ci.num_ack_pending == 3  # 4..6 still wait

        await again[0].ack()  # acking a redelivery of seq 1 acks nothing delivered after it
        await asyncio.sleep(0.3)
        ci = await js.consumer_info("S", "c")
        assert ci.ack_floor.stream_seq == 3 and ci.num_ack_pending == 3
        await nc.close()
    finally:
        srv.stop()
