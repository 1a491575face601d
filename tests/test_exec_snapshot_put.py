"""The execution worker stores a snapshot beside the next commands; a rebuild and a stop
wait for that put (a put finishing during a rebuild's read purges the chunks being read)."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest

from regions.topology import load_topology
from router.book import BOOK_RULES
from router.execution import ExecutionWorker
from router.natsutil import RebuildError


class _Nc:
    def jetstream(self, domain: str) -> Any:
        async def stream_info(name: str) -> Any:
            return types.SimpleNamespace(state=types.SimpleNamespace(last_seq=0, first_seq=1))

        return types.SimpleNamespace(stream_info=stream_info)


async def _worker(put_s: float, events: list[str]) -> ExecutionWorker:
    w = ExecutionWorker(_Nc(), load_topology(), "sgp", snapshot_every=1)  # type: ignore[arg-type]

    async def save(body: bytes) -> None:
        events.append("put started")
        await asyncio.sleep(put_s)
        events.append("put done")

    async def consumer_info() -> Any:
        return types.SimpleNamespace(ack_floor=None)

    async def loop_stop() -> None:
        return None

    async def restore(*, max_seq: int) -> None:
        events.append("snapshot read")
        for book in w.books.values():  # as from a snapshot of this build's book rules
            book.rules = BOOK_RULES

    def hurry() -> None:
        events.append("put hurried")

    w.snapshots = types.SimpleNamespace(save=save, hurry=hurry)  # type: ignore[assignment]
    w.loop = types.SimpleNamespace(consumer_info=consumer_info, stop=loop_stop)  # type: ignore[assignment]

    async def no_refused(*, after: int) -> None:
        return None

    w._restore_snapshot = restore  # type: ignore[method-assign]
    w._load_refused = no_refused  # type: ignore[method-assign]
    return w


async def _turns(n: int = 10) -> None:
    """A few turns of the loop: the body is joined in slices, a yield between each."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_the_put_runs_beside_the_next_commands_and_a_rebuild_waits_for_it() -> None:
    events: list[str] = []
    w = await _worker(0.3, events)
    w.applied = 5
    await w._maybe_snapshot()  # after a batch: captured now, joined and stored beside
    await _turns()
    assert events == ["put started"] and w._saving is not None and not w._saving.done()
    w.applied = 6
    await w._maybe_snapshot()  # a put is running: no second one
    await w.rebuild()  # it hurries the paced put, waits for it, then reads
    assert events == ["put started", "put hurried", "put done", "snapshot read"]


async def test_a_stop_lets_a_running_put_finish() -> None:
    events: list[str] = []
    w = await _worker(0.2, events)
    w.applied = 5
    await w._maybe_snapshot()
    await _turns()
    await w.stop()
    assert events == ["put started", "put hurried", "put done"]


async def test_a_rebuild_that_fails_on_the_connection_is_tried_again() -> None:
    """Seen in the full bench: an overloaded machine kept execution from answering the
    server's pings, the server dropped it, and the rebuild after the failed batch timed out;
    the worker stopped for good. A failure that is not the state's is now retried."""
    events: list[str] = []
    w = await _worker(0.0, events)
    calls = {"n": 0}

    async def flaky_consumer_info() -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise TimeoutError
        return types.SimpleNamespace(ack_floor=None)

    w.loop.consumer_info = flaky_consumer_info  # type: ignore[union-attr]
    await w._rebuild_with_retries()
    assert calls["n"] == 2 and events == ["snapshot read"]


async def test_a_rebuild_whose_snapshot_store_does_not_answer_is_tried_again() -> None:
    """A review found the store's timeout raised as RebuildError, which stops the worker at
    once: the retries above never ran for the commonest failure of an overloaded machine."""
    from router.natsutil import RebuildUnavailable

    events: list[str] = []
    w = await _worker(0.0, events)
    restore = w._restore_snapshot
    calls = {"n": 0}

    async def slow_store(*, max_seq: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RebuildUnavailable("snapshot store EXECSNAP_sgp unreadable: TimeoutError()")
        await restore(max_seq=max_seq)

    w._restore_snapshot = slow_store  # type: ignore[method-assign]
    await w._rebuild_with_retries()
    assert calls["n"] == 2 and events == ["snapshot read"]


async def test_a_state_that_cannot_be_rebuilt_is_not_tried_again() -> None:
    events: list[str] = []
    w = await _worker(0.0, events)

    async def unreadable(*, max_seq: int) -> None:
        events.append("snapshot read")
        raise RebuildError("snapshot store unreadable")

    w._restore_snapshot = unreadable  # type: ignore[method-assign]
    with pytest.raises(RebuildError):
        await w._rebuild_with_retries()
    assert events == ["snapshot read"]


class _Pub:
    """A publisher whose first ``lost`` publishes never get a PubAck (a dropped connection)."""

    def __init__(self, lost: int) -> None:
        self.lost = lost
        self.sent: list[tuple[str, bytes, str]] = []

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> Any:
        self.sent.append((subject, payload, headers["Nats-Msg-Id"]))
        fut = asyncio.get_running_loop().create_future()
        if len(self.sent) > self.lost:
            fut.set_result("ack")
        return fut


async def test_outputs_whose_pubacks_were_lost_are_sent_again_not_rebuilt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen in the full bench: a dropped connection lost a batch's PubAcks, and the worker
    rebuilt four full books (15 s) to send the same outputs again. It now sends just those."""
    import router.execution as execution

    monkeypatch.setattr(execution, "RESEND_WAITS_S", (0.05, 0.05, 0.05))
    w = await _worker(0.0, [])
    pub = _Pub(lost=2)
    w.pub = pub  # type: ignore[assignment]
    futs = [
        await w._send(f"mrd.lon.er.t.{i}", b"report", {"Nats-Msg-Id": f"id{i}"}) for i in range(3)
    ]
    await w._all_stored(futs)
    # the two without a PubAck went again, with the same ids (the stream's dedup drops a copy)
    assert [x[2] for x in pub.sent] == ["id0", "id1", "id2", "id0", "id1"]


async def test_outputs_never_stored_fail_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    import router.execution as execution

    monkeypatch.setattr(execution, "RESEND_WAITS_S", (0.05, 0.05))
    w = await _worker(0.0, [])
    w.pub = _Pub(lost=100)  # type: ignore[assignment]
    futs = [await w._send("mrd.lon.er.t.0", b"report", {"Nats-Msg-Id": "id0"})]
    with pytest.raises(TimeoutError):
        await w._all_stored(futs)


async def test_a_command_missing_from_a_gap_fails_the_batch_and_is_never_acked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Delivery 102 arrives after 100: 101 is read back. A direct get answered by a replica
    behind the leader says "not found"; taking that for "removed by the stream's limits"
    skipped 101 and acked it with the batch (AckPolicy.ALL), unapplied."""
    from nats.aio.msg import Msg
    from nats.js.errors import NotFoundError

    from router import execution

    monkeypatch.setattr(execution, "GAP_RETRY_S", (0.0, 0.01))
    w = await _worker(0.0, [])
    w.applied = 100
    asked: list[int] = []

    async def get_msg(stream: str, seq: int, direct: bool = False) -> Any:
        asked.append(seq)
        raise NotFoundError

    w.js = types.SimpleNamespace(get_msg=get_msg)  # type: ignore[assignment]
    acked: list[int] = []
    m = Msg(
        _client=None,  # type: ignore[arg-type]
        subject="mrd.sgp.exe.USDSGD",
        reply=f"$JS.ACK.EXEC.EXEC_sgp.1.102.2.{1_795_000_000_000_000_000}.0",
        data=b"\x80",
    )

    async def ack() -> None:
        acked.append(102)

    m.ack = ack  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="EXEC 101"):
        await w._process([m])
    assert asked == [101, 101] and not acked and w.applied == 100


async def test_a_snapshot_holding_a_symbol_no_longer_executed_here_restores_the_others() -> None:
    """A book in the snapshot whose symbol is gone from the topology (no instrument to
    restore it with) once made the whole snapshot unusable: every book replayed from the
    stream's first command, a region down once EXEC had aged past it."""
    from router.book import OrderBook

    w = ExecutionWorker(_Nc(), load_topology(), "sgp", snapshot_every=1)  # type: ignore[arg-type]
    w._fresh_books()
    sym = sorted(w.books)[0]
    kept = OrderBook(w.topology.instrument(sym), "sgp").snapshot()

    async def load_for(region: str, key: str, max_seq: int) -> Any:
        return {"applied": 5, "saved_ns": 1, "books": {"ZZZXXX": kept, sym: kept}}

    w.snapshots = types.SimpleNamespace(load_for=load_for)  # type: ignore[assignment]
    await w._restore_snapshot(max_seq=10)
    assert (w.applied, w.restored_from) == (5, 5) and "ZZZXXX" not in w.books


async def test_pubacks_lost_with_a_connection_give_their_slots_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Execution's publisher had no PubAck deadline: outputs of a batch or replay abandoned
    mid-way (their PubAcks lost with a dropped connection) held their slots for good, and
    once all were held the worker waited for a slot forever, alive and applying nothing."""
    from router import execution
    from tests.test_publisher import _FakeNats

    monkeypatch.setattr(execution, "PUB_TIMEOUT_S", 0.05)
    nc = _FakeNats()
    nc.jetstream = _Nc().jetstream  # type: ignore[attr-defined]
    w = ExecutionWorker(nc, load_topology(), "sgp", snapshot_every=1)  # type: ignore[arg-type]
    w.pub.max_pending = 2
    lost = [await w.pub.publish("t.a", b"1"), await w.pub.publish("t.a", b"2")]  # never acked
    third = await asyncio.wait_for(w.pub.publish("t.a", b"3"), 2.0)  # a slot came back
    for f in lost:
        with pytest.raises(TimeoutError):
            await f
    assert not third.done() and len(w.pub._pending) == 1


async def test_a_rebuild_from_an_older_rules_snapshot_replays_by_them_then_snapshots() -> None:
    """Books restored from a snapshot an older build wrote apply its rules to what it may
    have applied (every command stored at this worker's first rebuild), and a snapshot is
    taken at once, so no later start replays this build's own commands by the old rules."""
    events: list[str] = []
    w = await _worker(0.0, events)
    w._fresh_books()

    async def restore(*, max_seq: int) -> None:
        events.append("snapshot read")
        for book in w.books.values():
            book.rules = 1  # as restored from a snapshot without "rules"

    w._restore_snapshot = restore  # type: ignore[method-assign]
    w._out_through = 7  # what a predecessor may have applied (not 0: the stub's stream is empty)
    await w.rebuild()
    await _turns()
    assert all(b.legacy_through == w._out_through for b in w.books.values())
    assert w._out_through == 7
    assert events[0] == "snapshot read" and "put done" in events and not w._rules_upgrade


async def test_the_older_rules_boundary_is_set_once_and_the_snapshot_is_stored_first() -> None:
    """The boundary followed _out_through, which grows with this build's own outputs: a
    second rebuild (its forced snapshot not stored) replayed this build's commands by the
    older rules. It is set once; the rebuild waits for the snapshot, retrying."""
    events: list[str] = []
    w = await _worker(0.0, events)
    w._fresh_books()
    fails = [True, False, False]  # the first put fails, the retry and the next rebuild's store

    async def save(body: bytes) -> None:
        if fails.pop(0):
            raise RuntimeError("store down")
        events.append("put stored")

    async def restore(*, max_seq: int) -> None:
        for book in w.books.values():
            book.rules = 1

    w.snapshots.save = save  # type: ignore[attr-defined]
    w._restore_snapshot = restore  # type: ignore[method-assign]
    w._out_through = 10
    w.applied = 10
    await w.rebuild()
    assert "put stored" in events  # the second try, before the rebuild returned
    w._out_through = 15  # this build applied 11..15
    await w.rebuild()  # the same older snapshot restored again
    assert all(b.legacy_through == 10 for b in w.books.values())


async def test_a_rules_snapshot_that_cannot_be_stored_stops_the_worker() -> None:
    """Applying new commands with no snapshot of this build's rules stored would let a
    restart replay them by the older rules: the worker fails closed instead."""
    events: list[str] = []
    w = await _worker(0.0, events)

    async def save(body: bytes) -> None:
        raise RuntimeError("store down")

    async def restore(*, max_seq: int) -> None:
        return None  # no snapshot: fresh books, rules unknown

    w.snapshots.save = save  # type: ignore[attr-defined]
    w._restore_snapshot = restore  # type: ignore[method-assign]
    with pytest.raises(RebuildError, match="book rules"):
        await w.rebuild()
