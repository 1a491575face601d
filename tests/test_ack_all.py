"""What the single writers rely on in JetStream's AckPolicy.ALL, pinned on a real nats-server.

Risk acks each batch's inputs once the batch's outputs are stored, batch by batch in order, by
acking the last message of each consumer in the batch. While an old batch waits (a region cut
off), its inputs are redelivered; risk skips those (router.risk_worker._process) because
acking the original delivery of a later message acks them too. That holds only if AckAll
works by stream sequence, and if acking a redelivery never acks messages delivered after it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from ops.procs import standalone_jetstream

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def _stream_s(
    name: str, tmp_path: Path, domain: str | None = None
) -> AsyncIterator[tuple[Any, Any]]:
    """A nats-server of its own with stream ``S`` on ``s.>``: (connection, JetStream)."""
    srv, url = standalone_jetstream(name, tmp_path, domain=domain)
    try:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream(domain=domain)
            await js.add_stream(StreamConfig(name="S", subjects=["s.>"]))
            yield nc, js
        finally:
            await nc.close()
    finally:
        srv.stop()


async def test_ack_all_works_by_stream_sequence_across_redeliveries(tmp_path: Path) -> None:
    async with _stream_s("ackall", tmp_path) as (_, js):
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


# ---- deliveries that never reached the worker (PullLoop(fill_gaps=True)) ----------------------


def _seqs(items: list[object]) -> list[tuple[int, bool]]:
    """(stream seq, read back?) of what a PullLoop handed on, in order."""
    from router.natsutil import Recovered, stream_position

    out = []
    for x in items:
        m = x.msg if isinstance(x, Recovered) else x
        out.append((stream_position(m).seq, isinstance(x, Recovered)))  # type: ignore[arg-type]
    return out


async def _drain(q: asyncio.Queue[object], n: int, timeout: float = 10.0) -> list[object]:
    got: list[object] = []
    async with asyncio.timeout(timeout):
        while len({s for s, _ in _seqs(got)}) < n:
            got.append(await q.get())
    await asyncio.sleep(0.3)  # anything handed on twice comes now
    while not q.empty():
        got.append(q.get_nowait())
    return got


async def test_a_restart_hands_on_what_the_dead_predecessor_was_delivered(tmp_path: Path) -> None:
    """A worker stopped with deliveries it never handled: the next one's first ack
    (AckPolicy.ALL) would ack them unseen, and the server redelivers only after ack_wait. The
    pull loop reads them back first, in order, marked so that nobody acks them."""
    from router.natsutil import PullLoop

    async with _stream_s("fillstart", tmp_path, domain="lon") as (nc, js):
        for i in range(10):
            await js.publish(f"s.{i}", b"x")
        q: asyncio.Queue[object] = asyncio.Queue()
        kw = dict(domain="lon", stream="S", durable="w", filter_subject="s.>", ack_all=True)
        await PullLoop(nc, queue=q, **kw).ensure_consumer()  # type: ignore[arg-type]
        dead = await js.pull_subscribe("s.>", durable="w", stream="S")
        took = await dead.fetch(6, timeout=2)  # the predecessor's deliveries: 1..6
        await took[1].ack()  # it acked 1..2, then died holding 3..6
        await dead.unsubscribe()

        lp = PullLoop(nc, queue=q, batch=64, fill_gaps=True, **kw)  # type: ignore[arg-type]
        await lp.start()
        got = _seqs(await _drain(q, 8))
        await lp.stop()
        assert got[:4] == [(3, True), (4, True), (5, True), (6, True)]
        assert [s for s, _ in got[4:]] == [7, 8, 9, 10]
        assert lp.gaps_filled == 4


def _lossy_loop(nc: object, q: asyncio.Queue[object], *, lost: tuple[int, ...]) -> Any:
    """A gap-filling PullLoop on stream S whose deliveries of the stream sequences ``lost``
    never arrive (a dropped connection or leaf link)."""
    from router.natsutil import PullLoop, stream_position

    lp = PullLoop(
        nc, domain="lon", stream="S", durable="w", filter_subject="s.>",  # type: ignore[arg-type]
        queue=q, batch=64, ack_all=True, fill_gaps=True,  # type: ignore[arg-type]
    )  # fmt: skip
    handle = lp._on_msg

    async def lossy(msg: object) -> None:
        reply = getattr(msg, "reply", "") or ""
        if reply.startswith("$JS.ACK") and stream_position(msg).seq in lost:  # type: ignore[arg-type]
            return
        await handle(msg)  # type: ignore[arg-type]

    lp._on_msg = lossy  # type: ignore[method-assign]
    return lp


async def test_deliveries_lost_on_the_way_are_read_back_before_later_ones(tmp_path: Path) -> None:
    """Deliveries a dropped connection or leaf link lost never reach the worker; the next
    ones come with a jump in the consumer's delivery numbers. Those in between are read back
    from the stream and handed on first, so no ack covers a message the worker never had."""

    async with _stream_s("fillgap", tmp_path, domain="lon") as (nc, js):
        q: asyncio.Queue[object] = asyncio.Queue()
        lp = _lossy_loop(nc, q, lost=(5, 6))
        await lp.start()
        for i in range(1, 9):
            await js.publish(f"s.{i}", b"x")
            await asyncio.sleep(0.05)
        handed = await _drain(q, 8)
        got = _seqs(handed)
        await lp.stop()
        # every one once, in order, 5 and 6 read back before 7; 7, whose jump showed the gap,
        # is handed on as the delivery it is, not read back as well (its ack would wait)
        assert got == [(s, s in (5, 6)) for s in range(1, 9)]
        assert lp.gaps_filled == 2
        last = [x for x in handed if not hasattr(x, "msg")][-1]
        await last.ack()  # type: ignore[attr-defined]
        await asyncio.sleep(0.3)
        ci = await js.consumer_info("S", "w")
        assert ci.ack_floor.stream_seq == 8 and ci.num_ack_pending == 0


async def test_two_gaps_among_the_held_deliveries_are_both_read_back_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deliveries 3 and 6 lost, the rest arriving while the first gap is filled: the second
    gap lies among the held deliveries, and is read back up to the one after it, at once
    (no backoff: that is for a consumer info lagging a redelivery)."""
    import sys

    real_sleep, backoffs = asyncio.sleep, []

    async def sleep(delay: float, *a: object, **k: object) -> object:
        if sys._getframe(1).f_code.co_name == "_fill_gaps":
            backoffs.append(delay)
        return await real_sleep(delay, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "sleep", sleep)

    async with _stream_s("fillgap2", tmp_path, domain="lon") as (nc, js):
        q: asyncio.Queue[object] = asyncio.Queue()
        lp = _lossy_loop(nc, q, lost=(3, 6))
        await lp.start()
        await asyncio.gather(*(js.publish(f"s.{i}", b"x") for i in range(1, 11)))
        got = _seqs(await _drain(q, 10))
        await lp.stop()
        assert got == [(s, s in (3, 6)) for s in range(1, 11)]
        assert lp.gaps_filled == 2 and backoffs == []
