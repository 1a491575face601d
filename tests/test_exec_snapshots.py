"""Execution restarts from a book snapshot plus the commands after it, and ends in exactly the
state (and outputs) of a worker that never stopped (issue 3: "rebuilt from the stream plus
snapshots")."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ops.devstack import Devstack
from router import subjects
from router.book import Submit
from router.commands import encode_command
from router.contract import OrdType, Side, TimeInForce
from router.execution import ExecutionWorker
from router.natsutil import RebuildError
from tests.private_mesh import on_a_private_mesh

pytestmark = pytest.mark.integration


def _submit(i: int, side: Side, px: int) -> bytes:
    return encode_command(
        Submit(
            order_id=f"O{i:05d}",
            cl_ord_id=f"c{i}",
            account="SGP-HF-01" if side is Side.BUY else "SGP-BANK-02",
            home_region="sgp",
            side=side,
            ord_type=OrdType.LIMIT,
            tif=TimeInForce.GTC,
            qty=1_000_000,
            price_ticks=px,
        )
    )


def test_restart_restores_snapshot_then_replays_the_rest() -> None:
    on_a_private_mesh(_scenario, 90)


async def _scenario(ds: Devstack) -> None:
    if True:
        nc = await ds.connect("sgp")
        js = nc.jetstream(domain="sgp")
        w1 = ExecutionWorker(nc, ds.topology, "sgp", snapshot_every=25, snapshot_every_s=3600)
        await w1.start()
        # 60 resting bids at distinct prices, then 10 asks that take the best 10
        for i in range(60):
            await js.publish(subjects.exec_in("sgp", "USDJPY"), _submit(i, Side.BUY, 150000 + i))
        for i in range(60, 70):
            await js.publish(subjects.exec_in("sgp", "USDJPY"), _submit(i, Side.SELL, 150000))
        for _ in range(100):
            if w1.applied >= 70:
                break
            await asyncio.sleep(0.1)
        assert w1.applied == 70
        await w1.stop()
        live = w1.books["USDJPY"]
        assert len(live) == 50

        w2 = ExecutionWorker(nc, ds.topology, "sgp", snapshot_every=25, snapshot_every_s=3600)
        await w2.start()
        try:
            assert 25 <= w2.restored_from <= 70, "no snapshot was used"
            assert w2.stats["replayed"] == 70 - w2.restored_from
            assert w2.books["USDJPY"] == live
            assert w2.applied == 70
        finally:
            await w2.stop()

        # an idle worker still snapshots its last commands (woken between batches)
        w_idle = ExecutionWorker(nc, ds.topology, "sgp", snapshot_every=0, snapshot_every_s=1.0)
        await w_idle.start()
        await js.publish(subjects.exec_in("sgp", "USDJPY"), _submit(70, Side.BUY, 149000))
        for _ in range(50):
            if w_idle.applied >= 71:
                break
            await asyncio.sleep(0.1)
        for _ in range(100):  # idle for more than snapshot_every_s: snapshot, stored
            if w_idle._saved_seq >= 71:
                break
            await asyncio.sleep(0.1)
        assert w_idle._saved_seq == 71 and w_idle.snapshot_behind_s() == 0.0
        # its put fails once (an object-store blip): idle, it tries again, and the gauge of
        # MeridianSnapshotBehind shows the books ahead until then
        save, fails = w_idle.snapshots.save, [1]

        async def blip(*a: object, **k: object) -> None:
            if fails:
                fails.pop()
                raise ConnectionError("injected")
            await save(*a, **k)

        w_idle.snapshots.save = blip  # type: ignore[method-assign]
        await js.publish(subjects.exec_in("sgp", "USDJPY"), _submit(71, Side.BUY, 149001))
        for _ in range(50):
            if not fails:
                break
            await asyncio.sleep(0.1)
        assert not fails and w_idle._saved_seq == 71
        await asyncio.sleep(0.2)
        assert w_idle.snapshot_behind_s() >= 0.2  # ahead since the command, and counting
        for _ in range(60):
            if w_idle._saved_seq >= 72:
                break
            await asyncio.sleep(0.1)
        assert w_idle._saved_seq == 72, "an idle worker did not try its failed snapshot again"
        await w_idle.stop()
        w_after = ExecutionWorker(nc, ds.topology, "sgp", snapshot_every=0, snapshot_every_s=3600)
        await w_after.start()
        try:
            assert w_after.restored_from == 72, "the idle worker's last command was not snapshot"
        finally:
            await w_after.stop()

        # the commands age out of EXEC and the snapshot is lost: the books cannot be rebuilt,
        # and execution refuses to start rather than run with books missing resting orders
        await js.purge_stream("EXEC")
        await w2.snapshots.delete()
        w3 = ExecutionWorker(nc, ds.topology, "sgp", snapshot_every=25, snapshot_every_s=3600)
        with pytest.raises(RebuildError, match="are gone"):
            await w3.start()
        await w3.stop()
        await nc.close()


def test_a_restart_long_after_the_last_snapshot_takes_one_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Execution was down longer than its snapshot interval: after the rebuild the books are
    ahead of a snapshot that old, so the gauge of MeridianSnapshotBehind counts from its
    capture (a restart hides no failing snapshots), and the next snapshot is due at once
    (a healthy worker is not left looking behind for another interval)."""
    import router.execution as ex

    on_a_private_mesh(lambda ds: _long_stop_scenario(ds, monkeypatch, ex), 60)


async def _long_stop_scenario(ds: Devstack, monkeypatch: pytest.MonkeyPatch, ex: Any) -> None:
    nc = await ds.connect("sgp")
    js = nc.jetstream(domain="sgp")
    try:
        w1 = ExecutionWorker(nc, ds.topology, "sgp", snapshot_every=5, snapshot_every_s=3600)
        await w1.start()
        for n in (5, 8):  # a snapshot at 5 (stored before going on), then 3 past it
            for i in range(w1.applied, n):
                cmd = _submit(i, Side.BUY, 150000 + i)
                await js.publish(subjects.exec_in("sgp", "USDJPY"), cmd)
            for _ in range(200):
                if w1.applied >= n and w1._saved_seq >= 5:
                    break
                await asyncio.sleep(0.05)
        await w1.stop()
        assert (w1._saved_seq, w1.applied) == (5, 8)
        monkeypatch.setattr(ex, "snapshot_age_s", lambda captured_ns: 4000.0)  # long ago
        w2 = ExecutionWorker(nc, ds.topology, "sgp", snapshot_every=0, snapshot_every_s=3600)
        await w2.start()
        try:
            assert w2.restored_from == 5 and w2.applied == 8
            assert w2.snapshot_behind_s() >= 4000.0  # since that snapshot's capture
            await js.publish(subjects.exec_in("sgp", "USDJPY"), _submit(8, Side.BUY, 149000))
            for _ in range(100):  # the next batch finds a snapshot due: taken, stored
                if w2._saved_seq >= 9:
                    break
                await asyncio.sleep(0.05)
            assert w2._saved_seq == 9 and w2.snapshot_behind_s() == 0.0
        finally:
            await w2.stop()
    finally:
        await nc.close()


class _FakeJs:
    """Just enough of a JetStream context for SnapshotStore: one object store."""

    def __init__(self, get: object) -> None:
        self._get = get

    async def object_store(self, bucket: str) -> object:
        js = self

        class Store:
            async def get(self, key: str) -> object:
                if isinstance(js._get, BaseException):
                    raise js._get
                return type("Res", (), {"data": js._get})()

        return Store()


def test_snapshot_store_tells_missing_unreadable_and_unusable_apart() -> None:
    import msgpack
    from nats.js.errors import ObjectNotFoundError

    from router.natsutil import SnapshotStore

    def load(get: object, max_seq: int = 10) -> object:
        store = SnapshotStore(_FakeJs(get), "EXECSNAP_sgp", "books")
        return asyncio.run(store.load_for("sgp", "applied", max_seq))

    from router.natsutil import RebuildUnavailable

    assert load(ObjectNotFoundError()) is None  # none yet: replay the stream
    with pytest.raises(RebuildUnavailable, match="unreadable"):
        load(TimeoutError())  # cannot tell: never mistake it for "none yet"; try again later
    with pytest.raises(RebuildError, match="unreadable") as exc:
        load(RuntimeError("bad digest"))  # not the connection's: the worker stops
    assert not isinstance(exc.value, RebuildUnavailable)
    with pytest.raises(ValueError):
        load(b"\xc1 not msgpack")
    with pytest.raises(ValueError, match="snapshot for lon"):
        load(msgpack.packb({"region": "lon", "applied": 3}))
    with pytest.raises(ValueError, match="stream at 10"):
        load(msgpack.packb({"region": "sgp", "applied": 11}))
    assert load(msgpack.packb({"region": "sgp", "applied": 7})) == {"region": "sgp", "applied": 7}


def test_a_snapshot_is_written_no_faster_than_its_pace(monkeypatch: pytest.MonkeyPatch) -> None:
    """SnapshotStore.save hands nats-py's object store a reader that waits (in the store's
    executor thread) so the chunks go out at the pace: the bytes are the body's, and the
    last chunk is read no sooner than its offset / pace after the first (a fake clock)."""
    from router import natsutil

    now = [100.0]

    def sleep(s: float) -> None:
        now[0] += s

    monkeypatch.setattr(natsutil.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(natsutil.time, "sleep", sleep)
    body = bytes(range(256)) * 4096  # 1 MiB
    reader = natsutil._PacedReader(body, bytes_per_s=256 * 1024)
    chunk, out = bytearray(128 * 1024), bytearray()
    while n := reader.readinto(chunk):
        out += chunk[:n]
    assert bytes(out) == body
    assert now[0] - 100.0 == pytest.approx(3.5)  # the 8th chunk starts at 7/8 MiB
    assert reader.readinto(chunk) == 0
    # a stop or a rebuild hurries a put still running: the rest is read without waiting
    now[0] = 100.0
    reader = natsutil._PacedReader(body, bytes_per_s=256 * 1024)
    for _ in range(4):
        reader.readinto(chunk)
    reader.hurry()
    while reader.readinto(chunk):
        pass
    assert now[0] - 100.0 == pytest.approx(1.5)  # the 4th chunk's wait, then none


def test_a_refused_command_is_never_applied_by_a_rebuild() -> None:
    """sgp's execution refuses a Submit for a pair it has no book for (risk routed it by
    another topology), answers REJECTED and records the refusal. A rebuild with the pair's
    book now there (the topology fixed) replays that command: it must not put the order the
    desk was told was rejected into the book."""
    on_a_private_mesh(_refused_scenario, 60)


async def _refused_scenario(ds: Devstack) -> None:
    from router.book import OrderBook

    nc = await ds.connect("sgp")
    js = nc.jetstream(domain="sgp")
    w1 = ExecutionWorker(nc, ds.topology, "sgp", snapshot_every=0, snapshot_every_s=3600)
    await w1.start()
    try:
        ack = await js.publish(subjects.exec_in("sgp", "EURUSD"), _submit(1, Side.BUY, 108000))
        for _ in range(100):
            if ack.seq in w1._refused:  # recorded (the count goes up before the record)
                break
            await asyncio.sleep(0.05)
        assert w1.stats["bad"] == 1
    finally:
        await w1.stop()
    kv = await js.key_value(subjects.refused_bucket("sgp"))
    assert (await kv.get(str(ack.seq))).value
    w2 = ExecutionWorker(nc, ds.topology, "sgp", snapshot_every=0, snapshot_every_s=3600)
    fresh = w2._fresh_books

    def with_eurusd() -> None:  # the fixed topology: sgp executes EURUSD too
        fresh()
        w2.books["EURUSD"] = OrderBook(ds.topology.instrument("EURUSD"), "sgp")

    w2._fresh_books = with_eurusd  # type: ignore[method-assign]
    await w2.start()
    try:
        assert w2.applied >= ack.seq
        assert w2.books["EURUSD"].status("O00001") is None and len(w2.books["EURUSD"]) == 0
    finally:
        await w2.stop()
        await nc.close()


def test_a_command_whose_application_fails_is_rebuilt_away_and_answered() -> None:
    """Applying a command fails (a fault of this build) after it matched part of the book,
    twice in one burst: the worker records each fault, rebuilds, and answers each order
    UNAVAILABLE; nothing of them stays (no fill, the resting orders untouched), the region
    trades on, and a restart with a build that could apply them keeps them refused."""
    on_a_private_mesh(_fault_scenario, 90)


async def _fault_scenario(ds: Devstack) -> None:
    from router.book import OrderBook
    from router.contract import ExecutionReport, RejectReason
    from router.contract import decode as contract_decode

    real_apply = OrderBook.apply

    def faulty(self: OrderBook, command: object, **kw: object) -> object:
        outs = real_apply(self, command, **kw)  # type: ignore[arg-type]
        if getattr(command, "order_id", "") in ("O00002", "O00004"):
            raise KeyError("a bug in this build, after the book changed")
        return outs

    nc = await ds.connect("sgp")
    js = nc.jetstream(domain="sgp")
    got: list[tuple[str, bytes]] = []

    async def on_out(m: object) -> None:
        got.append((m.subject, m.data))  # type: ignore[attr-defined]

    await nc.subscribe("mrd.sgp.>", cb=on_out)
    OrderBook.apply = faulty  # type: ignore[assignment,method-assign]
    w1 = ExecutionWorker(nc, ds.topology, "sgp", snapshot_every=1, snapshot_every_s=0.1)
    try:
        await w1.start()
        sym = "USDJPY"
        acks = await asyncio.gather(
            *(
                js.publish(subjects.exec_in("sgp", sym), _submit(i, side, 150000))
                for i, side in ((1, Side.BUY), (2, Side.SELL), (3, Side.BUY), (4, Side.SELL))
            )
        )
        seqs = [a.seq for a in acks]

        def answered() -> bool:
            return all(any(".er." in s and o in d for s, d in got) for o in (b"O00002", b"O00004"))

        for _ in range(300):
            if w1.applied >= seqs[3] and answered():
                break
            await asyncio.sleep(0.05)
        assert answered() and not w1.fatal.done()
        reports = [contract_decode(ExecutionReport, d) for s, d in got if ".er." in s]
        rejected = [(r.order_id, r.reject_reason) for r in reports if r.reject_reason]
        # (a replay re-publishes what is past the ack floor: a core subscriber sees it again,
        # with the same exec id; the stream keeps it once)
        assert sorted(set(rejected)) == [
            ("O00002", RejectReason.UNAVAILABLE),
            ("O00004", RejectReason.UNAVAILABLE),
        ]
        assert not [s for s, _ in got if ".fill." in s]  # nothing of the failed match
        book = w1.books[sym]
        assert book.status("O00001") is not None and book.status("O00002") is None
        assert book.status("O00003") is not None and book.status("O00004") is None
        await w1.stop()
    finally:
        OrderBook.apply = real_apply  # type: ignore[method-assign]
    got.clear()
    w2 = ExecutionWorker(nc, ds.topology, "sgp", snapshot_every=0, snapshot_every_s=3600)
    await w2.start()  # a build that could apply it
    try:
        assert w2.applied >= seqs[3] and w2.books["USDJPY"].status("O00002") is None
        assert w2.books["USDJPY"].status("O00004") is None
        await asyncio.sleep(0.3)
        assert not [s for s, _ in got if ".fill." in s]
    finally:
        await w2.stop()
        await nc.close()


def test_the_snapshot_lag_counts_from_the_latest_stored_capture() -> None:
    """A busy worker moves on while each snapshot is stored, so its state is never caught up
    with one: the lag must count from the capture of the latest stored snapshot, not from
    the first time the state went ahead (that made MeridianSnapshotBehind fire an hour
    after start in any busy region)."""
    import time

    from router.natsutil import SnapshotLag

    lag = SnapshotLag()
    assert lag.seconds(True) < 1.0
    assert lag.since is not None
    lag.since -= 4000  # ahead, with snapshots stored all along, for over an hour
    lag.stored(True, time.monotonic() - 5)  # one captured 5 s ago is stored; moved on since
    assert 5.0 <= lag.seconds(True) < 60.0
    lag.stored(False, time.monotonic())  # stored, and nothing since
    assert lag.seconds(False) == 0.0 and lag.since is None
