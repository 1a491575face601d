"""Risk restarts from an engine snapshot plus the RISKLOG records after it, and ends in exactly
the state of a worker that never stopped, even once the records before the snapshot have aged
out of RISKLOG (its max_age is 7 days; a day at 1,000 orders/s is ~86M records to replay)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from ops.devstack import Devstack
from ops.loadgen import REFERENCE_MIDS
from ops.telemetry.metrics import MeridianMetrics
from router import contract, ids, subjects
from router.contract import NewOrder, OrdType, Side, TimeInForce
from router.entry import store_headers
from router.natsutil import H_ACCEPTED_NS, H_KIND, H_MSG_ID, H_OP, H_ORDER_ID, AsyncPublisher
from router.risk import AccountLimits, RiskLimits
from router.risk_worker import RebuildError, RiskWorker
from tests.private_mesh import on_a_private_mesh

pytestmark = pytest.mark.integration

ACCOUNTS = ("LON-HF-01", "LON-BANK-02")


def _on_a_mesh(scenario: Callable[[Devstack], Awaitable[None]], timeout_s: float) -> None:
    """A private mesh with Redis and a seeded top of book, no workers: the test drives one."""
    on_a_private_mesh(scenario, timeout_s, with_redis=True)


def test_restart_restores_snapshot_then_replays_the_rest() -> None:
    _on_a_mesh(_scenario, 120)


def _new(i: int) -> NewOrder:
    return NewOrder(
        account=ACCOUNTS[i % 2],
        cl_ord_id=f"snap-{i}",
        symbol="EURUSD",
        side=Side.BUY if i % 2 == 0 else Side.SELL,
        ord_type=OrdType.LIMIT,
        tif=TimeInForce.GTC,
        qty=1_000_000,
        price_ticks=REFERENCE_MIDS["EURUSD"] + (i % 7) - 3,
    )


async def _send(js: object, i: int, msg: NewOrder | None = None) -> Any:
    """Store order request ``i`` (or ``msg``) in ORDERS as the gateway would; returns what
    the publisher's ``publish`` returns (a PubAck, or its future for an AsyncPublisher)."""
    msg = msg or _new(i)
    acct, cl = msg.account, msg.cl_ord_id
    key = subjects.request_key(acct, cl)
    return await js.publish(  # type: ignore[attr-defined]
        subjects.orders("lon", acct, key),
        contract.encode(msg),
        headers={
            **store_headers("new"),
            H_ORDER_ID: ids.order_id(acct, cl),
            H_ACCEPTED_NS: str(time.time_ns()),
        },
    )


async def _decided(w: RiskWorker, n: int, tries: int = 200) -> None:
    for _ in range(tries):
        if w.stats["orders"] >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"risk decided {w.stats['orders']} of {n} orders")


def _key(i: int, msg: NewOrder | None = None) -> str:
    """Risk's input id of order request ``i`` (or ``msg``)."""
    m = msg or _new(i)
    return "o:" + subjects.request_key(m.account, m.cl_ord_id)


async def _until(cond: Callable[[], bool], tries: int = 200) -> None:
    """Poll ``cond`` every 50 ms, ``tries`` times at most (the caller asserts after)."""
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _lon(ds: Devstack) -> AsyncIterator[tuple[Any, Any, Any]]:
    """(connection, lon's JetStream, Redis), closed at the end."""
    nc = await ds.connect("lon")
    r = aioredis.from_url(ds.redis_url)
    try:
        yield nc, nc.jetstream(domain="lon"), r
    finally:
        await r.aclose()
        await nc.close()


def _worker(ds: Devstack, nc: Any, r: Any) -> RiskWorker:
    """lon's risk worker; it snapshots only when the test asks."""
    return RiskWorker(nc, ds.topology, "lon", r, snapshot_every=0, snapshot_every_s=3600)


@contextlib.asynccontextmanager
async def _started(w: RiskWorker) -> AsyncIterator[RiskWorker]:
    """``w`` started, and stopped at the end whatever happened."""
    try:
        await w.start()
        yield w
    finally:
        await w.stop()


async def _snapshot_now(w: RiskWorker) -> None:
    await w.snapshot()
    assert w._snap_put is not None
    await w._snap_put


async def _records(js: Any) -> list[dict[str, Any]]:
    """Every decision record in lon's RISKLOG, oldest first."""
    out: list[dict[str, Any]] = []
    last = (await js.stream_info("RISKLOG")).state.last_seq
    for seq in range(1, last + 1):
        with contextlib.suppress(Exception):  # gone (purged), or another subject's
            m = await js.get_msg("RISKLOG", seq)
            if m.subject == subjects.risklog("lon"):
                out += msgpack.unpackb(m.data)["b"]
    return out


def _fail_externals_once(w: RiskWorker) -> list[Exception]:
    """The worker's next batch fails reading its externals (a Redis blip); returns the
    pending failure, empty once it happened."""
    real, failures = w._externals, [ConnectionError("injected")]

    async def flaky(items: list[object]) -> object:
        if failures:
            raise failures.pop()
        return await real(items)  # type: ignore[arg-type]

    w._externals = flaky  # type: ignore[assignment,method-assign]
    return failures


async def _scenario(ds: Devstack) -> None:
    nc = await ds.connect("lon")
    js = nc.jetstream(domain="lon")
    r = aioredis.from_url(ds.redis_url)

    def worker(limits: RiskLimits | None = None) -> RiskWorker:
        return RiskWorker(
            nc, ds.topology, "lon", r, limits, snapshot_every=20, snapshot_every_s=3600
        )

    try:
        w1 = worker()
        await w1.start()
        for i in range(50):
            await _send(js, i)
        await _decided(w1, 50)
        w1.snapshot_every = 0  # then five more records that only a replay can bring back
        for i in range(50, 55):
            await _send(js, i)
        await _decided(w1, 55)
        await w1.stop()  # no execution worker here: the state is 55 open orders' exposure
        live = w1.engine.snapshot()
        assert live["accounts"], "nothing was decided"

        # limits.toml edited while risk was down (no RISKCFG entry): the records after the
        # snapshot replay under the limits they were decided with (this credit limit would
        # reject every one of them), then the file's limits are in force, as before snapshots
        edited = replace(RiskLimits.load(), default_account=AccountLimits(credit_limit_usd=1))
        w2 = worker(edited)
        await w2.start()
        try:
            assert w2.restored_from > 0, "no snapshot was used"
            assert 5 <= w2.stats["rebuilt"] < 55, "replayed more than the records after it"
            # every input decided is known as decided (its redelivery is only acked), in
            # the same order: the snapshot's ids, then the replayed records'
            assert list(w2._recent) == list(w1._recent) and len(w1._recent) == 55
            assert set(w1._recent) <= set(w2.done)
            assert w2.engine.limits == edited
            w2.engine.set_limits(RiskLimits.from_mapping(live["limits"]))
            assert w2.engine.snapshot() == live
            snap_seq = w2.restored_from
        finally:
            await w2.stop()

        # the records up to the snapshot age out of RISKLOG: the state must not depend on them
        await js.purge_stream("RISKLOG", seq=snap_seq + 1)
        w3 = worker()
        await w3.start()
        try:
            assert w3.restored_from >= snap_seq
            assert w3.engine.snapshot() == live
            # and it keeps deciding from there, through a batch that fails once (Redis blip):
            # rebuilt, then retried, not nak'd (stats count replayed decisions too)
            failures = _fail_externals_once(w3)
            await _send(js, 56)
            for _ in range(200):
                if ids.order_id(ACCOUNTS[0], "snap-56") in w3.engine.state(ACCOUNTS[0]).orders:
                    break
                await asyncio.sleep(0.05)
            assert not failures, "the injected failure never happened"
            assert ids.order_id(ACCOUNTS[0], "snap-56") in w3.engine.state(ACCOUNTS[0]).orders

            # a batch whose rebuild fails: the worker stops deciding for good (fail closed)
            async def down(items: list[object]) -> object:
                raise ConnectionError("injected")

            async def no_rebuild(**_: object) -> None:
                raise RebuildError("injected")

            w3._externals = down  # type: ignore[assignment,method-assign]
            w3.rebuild = no_rebuild  # type: ignore[method-assign]
            await _send(js, 57)
            assert isinstance(await asyncio.wait_for(w3.fatal, 10), RebuildError)
        finally:
            await w3.stop()

        # the records after the snapshot age out too: risk refuses to start on what is left,
        # and so it does without any snapshot
        await js.purge_stream("RISKLOG")
        for with_snapshot in (True, False):
            if not with_snapshot:
                store = await js.object_store(w3.snapshot_bucket)
                await store.delete("state")
            w4 = worker()
            with pytest.raises(RebuildError, match="are gone"):
                await w4.start()
            await w4.stop()
    finally:
        await r.aclose()
        await nc.close()


def test_a_replay_without_snapshot_applies_the_decisions_as_recorded() -> None:
    """No snapshot (first start after an upgrade, or snapshots lost) and limits.toml edited
    while risk was down: the replay still ends in the state that was decided, because each
    order is applied as recorded (approved or rejected), not checked against today's file."""
    _on_a_mesh(_verdict_scenario, 90)


async def _verdict_scenario(ds: Devstack) -> None:
    nc = await ds.connect("lon")
    js = nc.jetstream(domain="lon")
    r = aioredis.from_url(ds.redis_url)

    def worker(limits: RiskLimits | None = None) -> RiskWorker:
        return RiskWorker(nc, ds.topology, "lon", r, limits, snapshot_every=0)

    try:
        w1 = worker()
        await w1.start()
        for i in range(20):
            msg = _new(i)
            if i % 5 == 4:  # far outside the collar: rejected
                msg = replace(msg, price_ticks=REFERENCE_MIDS["EURUSD"] * 2)
            await _send(js, i, msg)
        await _decided(w1, 20)
        await w1.stop()
        live = w1.engine.snapshot()
        assert w1.stats["approved"] == 16 and w1.stats["rejected"] == 4

        # now every recorded approval would fail the credit check, every reject pass the collar
        edited = replace(
            RiskLimits.load(),
            collar_bps=1_000_000,
            default_account=AccountLimits(credit_limit_usd=1),
        )
        w2 = worker(edited)
        await w2.start()
        try:
            assert w2.restored_from == 0 and w2.stats["rebuilt"] >= 20
            assert w2.engine.snapshot()["accounts"] == live["accounts"]
        finally:
            await w2.stop()
    finally:
        await r.aclose()
        await nc.close()


def test_a_snapshot_taken_while_outputs_wait_keeps_them() -> None:
    """With sgp cut off, a command for it waits in flight. A snapshot taken then must not
    pass the order off as fully done: it keeps the order's outputs, so a restart re-sends
    them when the order is redelivered. And the worker does not re-send them for ever: past
    its stuck limit it stops (fail closed) rather than outlive the stream's dedup window."""
    _on_a_mesh(_pending_scenario, 90)


async def _pending_scenario(ds: Devstack) -> None:
    import msgpack

    nc = await ds.connect("lon")
    js = nc.jetstream(domain="lon")
    r = aioredis.from_url(ds.redis_url)

    def worker() -> RiskWorker:
        return RiskWorker(nc, ds.topology, "lon", r, snapshot_every=0, snapshot_every_s=3600)

    far = replace(_new(0), symbol="USDJPY", price_ticks=REFERENCE_MIDS["USDJPY"] - 50)
    input_id = f"o:{subjects.request_key(far.account, far.cl_ord_id)}"
    links = ("lon-sgp", "nyc-sgp")
    try:
        w1 = worker()
        await w1.start()
        try:
            for ln in links:
                ds.links.cut(ln)
            await _send(js, 0, far)
            await _decided(w1, 1)
            assert input_id in w1._inflight_ids, "the command to sgp was stored: not cut off?"
            await w1.snapshot()
            assert w1._snap_put is not None
            await asyncio.wait_for(w1._snap_put, 30)
            body = await w1.snapshots.load()
            assert body is not None
            snap = msgpack.unpackb(body, raw=False)
            outs = msgpack.unpackb(snap["pending"][input_id], raw=False)
            assert [o[0] for o in outs] == [subjects.exec_in("sgp", "USDJPY")]
            # re-sending for longer could outlive EXEC's dedup window: the worker stops
            w1.stuck_limit_s = 0.5
            stopped = await asyncio.wait_for(w1.fatal, 20)
            assert isinstance(stopped, RuntimeError) and "reconciled" in str(stopped)
        finally:
            for ln in links:
                ds.links.restore(ln)
            await w1.stop()
        w2 = worker()  # what a restart rebuilds: the order is decided, its outputs known
        await w2.rebuild()
        assert w2.restored_from > 0
        assert [o.subject for o in w2._recorded(input_id)] == [subjects.exec_in("sgp", "USDJPY")]
    finally:
        await r.aclose()
        await nc.close()


def test_kill_switch_over_thousands_of_open_orders() -> None:
    """A kill cancels every open order it halts. Ten thousand cancels do not fit one
    RISKLOG message (max_payload 1 MiB): the record leaves them out and a replay recomputes
    the same cancels from the state it is replayed on."""
    _on_a_mesh(_kill_scenario, 180)


async def _kill_scenario(ds: Devstack) -> None:
    from router.contract import KillScope
    from router.control import set_kill

    n = 10_000
    nc = await ds.connect("lon")
    js = nc.jetstream(domain="lon")
    r = aioredis.from_url(ds.redis_url)

    unthrottled = replace(RiskLimits.load(), rate_per_s=1_000_000, burst=1_000_000)

    def worker() -> RiskWorker:
        return RiskWorker(
            nc, ds.topology, "lon", r, unthrottled, snapshot_every=0, snapshot_every_s=3600
        )

    try:
        w1 = worker()
        await w1.start()
        pub = AsyncPublisher(nc, max_pending=2_000)
        futs = []
        for i in range(n):
            msg = replace(_new(i), account="LON-HF-01", cl_ord_id=f"k-{i}", qty=1_000)
            futs.append(await _send(pub, i, msg))
        await asyncio.gather(*futs)
        await _decided(w1, n, tries=600)
        assert len(w1.engine.state("LON-HF-01").orders) == n

        res = await set_kill(
            lambda region: ds.connect(region),
            ds.topology,
            KillScope.ACCOUNT,
            "LON-HF-01",
            engaged=True,
        )
        assert res["lon"] == "ok", res
        kill_id = ""
        for _ in range(200):
            kill_id = next((k for k in w1.done if k.startswith("kill:")), "")
            if kill_id:
                break
            await asyncio.sleep(0.05)
        assert kill_id, "the kill was never decided"
        cancels = w1._recorded(kill_id)
        assert len(cancels) == n and all(o.kind == "Cancel" for o in cancels)
        for _ in range(200):  # every cancel reached the EXEC stream (n submits, n cancels)
            if (await js.stream_info("EXEC")).state.messages >= 2 * n:
                break
            await asyncio.sleep(0.05)
        assert (await js.stream_info("EXEC")).state.messages == 2 * n
        await w1.stop()

        w2 = worker()  # no snapshot: the kill record is replayed
        await w2.start()
        try:
            assert w2._recorded(kill_id) == cancels
        finally:
            await w2.stop()
    finally:
        await r.aclose()
        await nc.close()


def test_risk_starts_and_decides_while_another_region_is_cut_off() -> None:
    """Risk reads every region's execution reports, but deciding its own region's orders must
    not wait for a region that is down or cut off: before stop 16 a restart of lon's risk
    while sgp was unreachable failed (creating sgp's consumer got no answer), and lon could
    not trade until sgp came back. It now starts, decides, and reads sgp's reports once the
    region answers again."""
    _on_a_mesh(_cut_off_start_scenario, 120)


async def _cut_off_start_scenario(ds: Devstack) -> None:
    nc = await ds.connect("lon")
    js = nc.jetstream(domain="lon")
    r = aioredis.from_url(ds.redis_url)
    links = ("lon-sgp", "nyc-sgp")
    for ln in links:
        ds.links.cut(ln)
    w = RiskWorker(nc, ds.topology, "lon", r, snapshot_every=0, snapshot_every_s=3600)
    try:
        await asyncio.wait_for(w.start(), 30)
        await _send(js, 0)
        await _decided(w, 1)
        sgp = next(lp for lp in w.loops if lp.domain == "sgp")
        assert sgp._task is None  # not reading sgp's reports: it is cut off
        for ln in links:
            ds.links.restore(ln)
        for _ in range(600):
            if sgp._task is not None:
                break
            await asyncio.sleep(0.1)
        assert sgp._task is not None, "sgp's reports never read after the links came back"
    finally:
        for ln in links:
            ds.links.restore(ln)
        await w.stop()
        await r.aclose()
        await nc.close()


def test_an_undecodable_order_request_is_acked_in_its_place() -> None:
    """A request risk cannot decode (a newer gateway's) between two it can: the worker
    decides the others, acks all three in order, and records nothing for it."""
    _on_a_mesh(_undecodable_scenario, 60)


async def _undecodable_scenario(ds: Devstack) -> None:
    async with _lon(ds) as (nc, js, r), _started(_worker(ds, nc, r)) as w:
        await _send(js, 0)
        bad = await js.publish(
            subjects.orders("lon", "LON-HF-01", "garbage-1"),
            b"\xc1 not an order",
            headers={H_MSG_ID: "new:garbage-1", H_OP: "new"},
        )
        await _send(js, 1)
        await _decided(w, 2)

        async def floor() -> int:
            ci = await js.consumer_info("ORDERS", subjects.durable_risk("lon"))
            return int(ci.ack_floor.stream_seq)

        for _ in range(100):
            if await floor() > bad.seq:
                break
            await asyncio.sleep(0.05)
        assert await floor() > bad.seq and w.stats["bad"] == 1
        assert not w.fatal.done()
        # the last input undecodable too: nothing after it acks it, so its own ack must
        last_bad = await js.publish(
            subjects.orders("lon", "LON-HF-01", "garbage-2"),
            b"\xc1 not an order either",
            headers={H_MSG_ID: "new:garbage-2", H_OP: "new"},
        )
        for _ in range(100):
            if await floor() >= last_bad.seq:
                break
            await asyncio.sleep(0.05)
        assert await floor() == last_bad.seq and w.stats["bad"] == 2
        # and neither is in a decision record
        recorded = {rec["in"] for rec in await _records(js)}
        assert {"o:garbage-1", "o:garbage-2"}.isdisjoint(recorded) and len(recorded) >= 2


def test_an_order_request_risk_cannot_read_is_answered_recorded_and_stays_answered() -> None:
    """A newer gateway's request (contract version 2): risk answers it with a typed REJECTED
    and records the answer, so a rebuild (or a build that can read it) finds it answered and
    never decides it. A payload naming another account than its subject gets no answer."""
    _on_a_mesh(_unread_scenario, 60)


async def _unread_scenario(ds: Devstack) -> None:
    async with _lon(ds) as (nc, js, r):
        answers: list[Any] = []

        async def on_report(m: Any) -> None:
            answers.append(contract.decode(contract.ExecutionReport, m.data))

        await nc.subscribe(subjects.report_risk("lon", "LON-HF-01"), cb=on_report)
        async with _started(_worker(ds, nc, r)) as w:
            newer = {**msgpack.unpackb(contract.encode(_new(0))), "v": 2}
            spoof = {**msgpack.unpackb(contract.encode(_new(1))), "account": "LON-HF-02", "v": 2}
            # each on its own subject (the request key of the subject's account and its
            # cl_ord_id): one on another's would get no answer at all
            v2_key = subjects.request_key("LON-HF-01", newer["cl_ord_id"])
            spoof_key = subjects.request_key("LON-HF-01", spoof["cl_ord_id"])
            for key, body in ((v2_key, newer), (spoof_key, spoof)):
                await js.publish(
                    subjects.orders("lon", "LON-HF-01", key),
                    msgpack.packb(body),
                    headers={
                        H_OP: "new",
                        H_ORDER_ID: ids.order_id("LON-HF-01", body["cl_ord_id"]),
                        H_ACCEPTED_NS: "1",
                    },
                )
            await _send(js, 2)
            await _decided(w, 1)
            await _until(lambda: bool(answers) and w.stats["bad"] == 2, 100)
            await asyncio.sleep(0.2)
            rejected = [(a.cl_ord_id, a.reject_reason) for a in answers if a.reject_reason]
            assert rejected == [(newer["cl_ord_id"], "UNSUPPORTED_VERSION")]
            kinds = {rec["in"]: rec["k"] for rec in await _records(js)}
            assert kinds.get(f"o:{v2_key}") == "unread" and f"o:{spoof_key}" not in kinds
        async with _started(_worker(ds, nc, r)) as w2:
            # rebuilt from RISKLOG: answered, never to be decided
            assert f"o:{v2_key}" in w2.done and f"o:{spoof_key}" not in w2.done


def test_a_request_with_an_op_risk_does_not_know_is_answered_by_its_shape() -> None:
    """A direct publisher (or a newer client during a rollout) stores a request whose
    ``Mrd-Op`` this build does not know: it is answered MALFORMED, as a REJECTED report when
    its map looks like a new order and as a cancel reject when it names an order to act on,
    and the answer is recorded (it was stored, so the desk holds a PubAck and waits)."""
    _on_a_mesh(_unknown_op_scenario, 60)


async def _unknown_op_scenario(ds: Devstack) -> None:
    async with _lon(ds) as (nc, js, r):
        reports: list[Any] = []
        rejects: list[Any] = []

        async def on_answer(m: Any) -> None:
            if (m.headers or {}).get(H_KIND) == "CancelReject":
                rejects.append(contract.decode(contract.CancelReject, m.data))
            else:
                reports.append(contract.decode(contract.ExecutionReport, m.data))

        await nc.subscribe(subjects.report_risk("lon", "LON-HF-01"), cb=on_answer)
        async with _started(_worker(ds, nc, r)) as w:
            new_like = msgpack.unpackb(contract.encode(_new(0)))
            cancel_like = {
                "account": "LON-HF-01",
                "cl_ord_id": "unknown-op-cxl",
                "orig_cl_ord_id": "snap-0",
                "symbol": "EURUSD",
                "sent_ns": 1,
                "v": 1,
            }
            for body, op in ((new_like, "mass_new"), (cancel_like, "mass_cancel")):
                key = subjects.request_key("LON-HF-01", body["cl_ord_id"])
                await js.publish(
                    subjects.orders("lon", "LON-HF-01", key),
                    msgpack.packb(body),
                    headers={**store_headers("new"), H_OP: op},
                )
            await _until(lambda: bool(reports) and bool(rejects) and w.stats["bad"] == 2, 100)
            assert w.stats["bad"] == 2
            assert [(a.cl_ord_id, a.reject_reason) for a in reports] == [("snap-0", "MALFORMED")]
            assert "unknown op 'mass_new'" in reports[0].text
            assert [(c.cl_ord_id, c.orig_cl_ord_id, c.reason, c.response_to) for c in rejects] == [
                ("unknown-op-cxl", "snap-0", "MALFORMED", "cancel")
            ]
            kinds = [rec["k"] for rec in await _records(js)]
            assert kinds == ["unread", "unread"]


@pytest.mark.parametrize("snapshot", [False, True])
def test_a_cl_ord_id_stored_again_after_orders_dropped_it_is_answered_duplicate(
    snapshot: bool,
) -> None:
    """ORDERS keeps a request 7 days; a desk that re-uses the cl_ord_id after that stores a
    new request on the same subject. Risk still remembers the key: it is not a redelivery
    (it was stored after everything decided) and not a new order (the order id would be the
    first's), so it is answered DUPLICATE_CL_ORD_ID under the id its ack named, and never
    decided; one this build cannot read is answered as unreadable. Both were taken for
    redeliveries: acked, and never answered. A restart (from the records, or from a
    snapshot) finds them answered, and their redelivery is not taken for another re-use."""
    import functools

    _on_a_mesh(functools.partial(_reused_key_scenario, snapshot=snapshot), 60)


async def _reused_key_scenario(ds: Devstack, *, snapshot: bool) -> None:
    first, other, third = _new(0), _new(3), _new(4)  # two accounts
    again = replace(first, qty=2 * first.qty)
    unreadable = {**msgpack.unpackb(contract.encode(other)), "v": 2}
    keys = {(m.account, m.cl_ord_id): subjects.request_key(m.account, m.cl_ord_id)
            for m in (first, other, third)}  # fmt: skip
    async with _lon(ds) as (nc, js, r):
        answers: list[Any] = []
        commands: list[str] = []

        async def on_report(m: Any) -> None:
            answers.append(contract.decode(contract.ExecutionReport, m.data))

        async def on_command(m: Any) -> None:
            commands.append((m.headers or {}).get(H_MSG_ID, ""))

        for acct in {a for a, _ in keys}:
            await nc.subscribe(subjects.report_risk("lon", acct), cb=on_report)
        await nc.subscribe(subjects.exec_in("lon", "*"), cb=on_command)
        reg = CollectorRegistry()
        metered = RiskWorker(
            nc,
            ds.topology,
            "lon",
            r,
            snapshot_every=0,
            snapshot_every_s=3600,
            metrics=MeridianMetrics(reg, region="lon", service="risk"),
        )
        async with _started(metered) as w:
            for i in (0, 3, 4):
                await _send(js, i)
            await _decided(w, 3)
            await asyncio.sleep(0.3)  # outputs stored, inputs acked
            snap_seq = 0
            if snapshot:  # before the re-uses: the restart replays their records on it
                await _snapshot_now(w)
                snap_seq = w._risklog_seq
            await _send(js, 1)  # decided after the first three, before their re-uses
            await _decided(w, 4)
            k4_first = w._recorded(_key(4))
            assert [o.kind for o in k4_first] == ["Submit"]
            # max_age took them (a purge of their subjects is the same to the stream's index)
            for (acct, _), key in keys.items():
                await js.purge_stream("ORDERS", subject=subjects.orders("lon", acct, key))
            # copies of snap-0 under subjects ORDERS stores beside its own: another
            # account's, and one token more; neither is answered, recorded, or touches snap-0
            k0 = keys[(first.account, first.cl_ord_id)]
            for subject in (
                subjects.orders("lon", other.account, k0),
                f"mrd.lon.ord.{first.account}.x.{k0}",
            ):
                await js.publish(subject, contract.encode(first), headers=store_headers("new"))
            ack = await _send(js, 0, again)
            assert ack.seq == 7  # stored: the subject was empty
            for m, body in ((other, msgpack.packb(unreadable)), (third, b"\x93\x01\x02\x03")):
                # one this build cannot read, and bytes that name no request (no answer)
                await js.publish(
                    subjects.orders("lon", m.account, keys[(m.account, m.cl_ord_id)]),
                    body,
                    headers=store_headers("new"),
                )
            await _send(js, 2)
            await _decided(w, 5)
            await _until(lambda: len(answers) == 2 and w.stats["bad"] == 4)
            assert w.stats["bad"] == 4  # the two copies, the unreadable one, the garbage
            # what MeridianRiskRequestsUnanswered counts: the copies, and the garbage
            for why, n in (("subject", 2), ("unreadable", 1)):
                got_n = reg.get_sample_value(
                    "meridian_risk_unanswered_total",
                    {"region": "lon", "service": "risk", "why": why},
                )
                assert got_n == n, (why, got_n)
            got = sorted((a.cl_ord_id, a.order_id, a.reject_reason) for a in answers)
            assert got == sorted(
                [
                    (first.cl_ord_id, ids.order_id(first.account, first.cl_ord_id),
                     "DUPLICATE_CL_ORD_ID"),
                    (other.cl_ord_id, ids.order_id(other.account, other.cl_ord_id),
                     "UNSUPPORTED_VERSION"),
                ]
            )  # fmt: skip
            records = await _records(js)
            kinds = [(rec["in"], rec["k"], rec.get("ru"), len(rec["o"])) for rec in records]
            assert kinds == [
                (_key(0), "order", None, 1),
                (_key(3), "order", None, 1),
                (_key(4), "order", None, 1),
                (_key(1), "order", None, 1),
                (_key(0), "unread", 1, 1),
                (_key(3), "unread", 1, 1),
                # the garbage on snap-4's key: not recorded, snap-4's entry untouched (it
                # could have been a copy on another's subject), and its redelivery below
                # re-sends nothing of snap-4's
                (_key(2), "order", None, 1),
            ]
            assert (await js.stream_info("EXEC")).state.messages == 5  # each order once
            assert w._recorded(_key(4)) == k4_first
            answered = {k: w._recorded(k) for k in (_key(0), _key(3), _key(4))}
            # the answers took the keys' places as the newest entries, once each
            newest = [_key(1), _key(0), _key(3), _key(2)]
            assert list(w.done)[-4:] == newest and list(w._recent)[-4:] == newest
            assert len(w._recent) == len(set(w._recent))
        # the next worker's durable starts again from the stream's first message: each
        # request is redelivered, at or below the mark, and found answered
        await js.delete_consumer("ORDERS", subjects.durable_risk("lon"))
        # the subscription sees every command: each order's once
        assert sorted(commands) == sorted(f"cmd:{_key(i)}" for i in (0, 3, 4, 1, 2))
        commands.clear()
        n_answers = len(answers)
        async with _started(_worker(ds, nc, r)) as w2:
            assert w2.restored_from == snap_seq
            # the records after the snapshot (or all of them) replayed as the worker took
            # them: each key holds its last answer, in the same place
            assert {k: w2._recorded(k) for k in answered} == {
                **answered,
                # decided before the snapshot, outputs stored: restored without them
                _key(4): [] if snapshot else k4_first,
            }
            assert list(w2.done)[-4:] == newest and len(w2._recent) == len(set(w2._recent))
            floor = 0
            for _ in range(100):  # until the redeliveries are acked
                ci = await js.consumer_info("ORDERS", subjects.durable_risk("lon"))
                floor = ci.ack_floor.stream_seq
                if floor >= 10:
                    break
                await asyncio.sleep(0.05)
            assert floor == 10
            assert len(await _records(js)) == len(records)  # nothing decided again
            # no first request's command sent again (a redelivery republishes only what its
            # key's entry holds: the commands of snap-1 and snap-2, decided after the last
            # snapshot, or of none)
            assert set(commands) <= {f"cmd:{_key(1)}", f"cmd:{_key(2)}"}
            again_answers = answers[n_answers:]
            assert {a.exec_id for a in again_answers} <= {a.exec_id for a in answers[:n_answers]}


@pytest.mark.parametrize("snapshot", [False, True])
def test_a_recreated_consumer_does_not_get_old_orders_decided_again(
    monkeypatch: pytest.MonkeyPatch, snapshot: bool
) -> None:
    """An operator removes risk's durable consumer on ORDERS; the next start recreates it,
    and it delivers the stream again from its first message. Orders still in memory are
    found decided; those beyond it (a memory of 2 here, of a million in production) are at
    or below the stream's high-water mark of decided inputs, and are skipped: never decided,
    recorded or sent to execution twice. The mark comes back from the records replayed at
    start, or from the snapshot."""
    import functools

    import router.risk_worker as rw

    monkeypatch.setattr(rw, "DONE_MEMORY", 2)
    monkeypatch.setattr(rw, "SNAPSHOT_RECENT_INPUTS", 2)
    _on_a_mesh(functools.partial(_recreated_scenario, snapshot=snapshot), 60)


async def _recreated_scenario(ds: Devstack, *, snapshot: bool) -> None:
    async with _lon(ds) as (nc, js, r):
        async with _started(_worker(ds, nc, r)) as w:
            for i in range(4):
                await _send(js, i)
            await _decided(w, 4)
            await asyncio.sleep(0.5)  # outputs stored, inputs acked
            if snapshot:
                await _snapshot_now(w)
        await js.delete_consumer("ORDERS", subjects.durable_risk("lon"))
        before = [rec["in"] for rec in await _records(js)]
        assert len(before) == 4
        async with _started(_worker(ds, nc, r)) as w2:
            await _send(js, 4)
            await _until(lambda: _key(4) in w2.done and w2.stats["stale"] >= 2)
            assert w2.restored_from == (w._risklog_seq if snapshot else 0)
            assert w2.stats["stale"] == 2  # the two it no longer remembered
            after = [rec["in"] for rec in await _records(js)]
            assert sorted(after) == sorted([*before, _key(4)])  # each input recorded once


def test_orders_of_a_recreated_orders_stream_are_decided() -> None:
    """ORDERS deleted and made again (a region restored): its first messages have sequences
    at or below risk's high-water mark, but were stored after it. They are new orders, and
    are decided."""
    _on_a_mesh(_recreated_stream_scenario, 60)


async def _recreated_stream_scenario(ds: Devstack) -> None:
    async with _lon(ds) as (nc, js, r):
        async with _started(_worker(ds, nc, r)) as w:
            for i in range(4):
                await _send(js, i)
            await _decided(w, 4)
            await asyncio.sleep(0.5)
        cfg = (await js.stream_info("ORDERS")).config
        await js.delete_stream("ORDERS")
        await js.add_stream(cfg)
        async with _started(_worker(ds, nc, r)) as w2:
            # its mark: ORDERS up to 4, from the records
            for i in (10, 11):
                ack = await _send(js, i)
                assert ack.seq <= 2
            keys = [_key(10), _key(11)]
            await _until(lambda: all(k in w2.done for k in keys))
            assert all(k in w2.done for k in keys) and w2.stats["stale"] == 0


def test_a_record_another_attempt_stored_late_fails_the_next_batch_not_forks_the_log() -> None:
    """A RISKLOG record the worker did not write (a failed attempt's, stored after the
    rebuild had read the log; or a second writer's): the next batch, expecting the record it
    knows as the last, is refused by the stream, rebuilt with that record, and retried. The
    log never holds decisions made without a record before them."""
    _on_a_mesh(_late_record_scenario, 60)


async def _late_record_scenario(ds: Devstack) -> None:
    async with _lon(ds) as (nc, js, r), _started(_worker(ds, nc, r)) as w:
        await _send(js, 0)
        await _decided(w, 1)
        ghost = {"in": "o:ghost", "k": "unread", "p": b"", "h": {}, "o": []}
        late = {H_MSG_ID: f"rec:{w._epoch}:o:ghost:1"}  # this process's, stored late
        await js.publish(subjects.risklog("lon"), msgpack.packb({"b": [ghost]}), headers=late)
        await _send(js, 1)
        # (decided in the refused attempt too: wait for the retry)
        await _until(lambda: _key(1) in w.done and "o:ghost" in w.done)
        assert _key(1) in w.done and "o:ghost" in w.done  # rebuilt with it, then decided
        assert not w.fatal.done()
        # a record another worker wrote (a second risk worker of the region): the worker
        # stops rather than skip the inputs that worker took
        other = {"in": "o:other", "k": "unread", "p": b"", "h": {}, "o": []}
        await js.publish(
            subjects.risklog("lon"),
            msgpack.packb({"b": [other]}),
            headers={H_MSG_ID: "rec:another:o:other:1"},
        )
        await _send(js, 2)
        got = await asyncio.wait_for(w.fatal, 30)
        assert isinstance(got, RebuildError) and "only one may run" in str(got)


def test_an_idle_regions_snapshot_covers_its_last_reject_reports() -> None:
    """An idle region's last batch rejected an order: its report is stored in RISKLOG after
    the batch's record. A snapshot covers that report, whether the worker that stored it
    takes it or, restarted before it could, the next process does; so when max_age takes
    all of RISKLOG, a new process starts from it and records on, and so does a running
    worker whose next record expects a gone one. Before, the snapshot stopped at the record,
    and the gone report after it could not be told from a gone record: a new process refused
    to start. While its snapshots fail, the worker's snapshot-behind gauge grows."""
    _on_a_mesh(_aged_out_scenario, 90)


def _far(i: int) -> NewOrder:
    """Order request ``i`` priced past the collar: risk rejects it, with a report."""
    return replace(_new(i), price_ticks=REFERENCE_MIDS["EURUSD"] * 2)


def _fast(ds: Devstack, nc: Any, r: Any, metrics: Any = None) -> RiskWorker:
    """lon's risk worker, snapshotting every second while anything is past the last one."""
    return RiskWorker(
        nc, ds.topology, "lon", r, snapshot_every=0, snapshot_every_s=1.0, metrics=metrics
    )


def _reported(w: RiskWorker) -> bool:
    """The worker's last reject report is stored (its PubAck moved the position)."""
    return w._risklog_seq > w._last_record > 0


async def _aged_out_scenario(ds: Devstack) -> None:
    from prometheus_client import CollectorRegistry

    from ops.telemetry.metrics import MeridianMetrics

    async with _lon(ds) as (nc, js, r):
        async with _started(_fast(ds, nc, r)) as w:
            # the worker that stored the report covers it
            for i in range(2):
                await _send(js, i)
            await _send(js, 9, _far(9))
            await _until(lambda: _key(9) in w.done and _reported(w))
            assert _reported(w), "the reject's report was not stored after its record"
            await _until(lambda: w._snap_saved >= w._risklog_seq, 100)
            assert w._snap_saved >= w._risklog_seq, "no snapshot covered the last report"
            assert w.snapshot_behind_s() == 0.0
        async with _started(_worker(ds, nc, r)) as w1:
            # snapshots only when asked
            # another report, and a stop before any snapshot covers it
            await _send(js, 10, _far(10))
            await _until(lambda: _key(10) in w1.done and _reported(w1))
            assert _reported(w1) and w1._snap_saved < w1._risklog_seq
            last_report = w1._risklog_seq
        async with _started(_fast(ds, nc, r)) as w2:
            # the next process covers it
            await _until(lambda: w2._snap_saved >= last_report, 100)
            assert w2._snap_saved >= last_report, "the restarted worker left the report uncovered"
        await js.purge_stream("RISKLOG")  # everything gone, as max_age would
        reg = CollectorRegistry()
        async with _started(
            _fast(ds, nc, r, MeridianMetrics(reg, region="lon", service="risk"))
        ) as w3:
            # from that snapshot: nothing after it is missing
            assert w3.restored_from >= last_report and _key(10) in w3.done
            await _send(js, 2)  # and it records on
            await _until(lambda: w3._last_record > last_report)
            assert _key(2) in w3.done and w3._last_record > last_report
            # aged out under the running worker too: its next record expects the gone one,
            # is refused, and the rebuild from its own snapshot lets it record on
            stored = w3._last_record
            await _until(lambda: w3._snap_saved >= stored, 100)
            assert w3._snap_saved >= stored, "no snapshot covered the record before the purge"
            await js.purge_stream("RISKLOG")
            await _send(js, 3)
            await _until(lambda: w3._last_record > stored)
            assert _key(3) in w3.done and w3._last_record > stored
            assert not w3.fatal.done()
            # the object store fails: the gauge shows the state ahead of the last snapshot,
            # and goes back to 0 once one is stored again
            save, tried = w3.snapshots.save, []

            async def no_save(*a: object, **k: object) -> None:
                tried.append(w3._risklog_seq)
                raise ConnectionError("injected")

            w3.snapshots.save = no_save  # type: ignore[method-assign]
            stored = w3._last_record
            await _send(js, 4)
            await _until(lambda: w3._last_record > stored)
            at = w3._last_record
            await _until(lambda: any(t >= at for t in tried), 100)

            def gauge() -> float | None:
                labels = {"region": "lon", "service": "risk"}
                return reg.get_sample_value("meridian_snapshot_behind_seconds", labels)

            await _until(lambda: (gauge() or 0.0) > 0.0, 100)  # set at a wake after the put
            assert w3._snap_saved < at and (gauge() or 0.0) > 0.0
            w3.snapshots.save = save  # type: ignore[method-assign]
            await _until(lambda: w3._snap_saved >= at and gauge() == 0.0, 100)
            assert w3._snap_saved >= at and gauge() == 0.0


def test_a_snapshot_never_covers_another_workers_record() -> None:
    """A second risk worker (a deploy overlap) stored a record after this worker's last one,
    and a reject report of this worker's was stored after that (its PubAck late). The
    snapshot must not claim the report's position: a restore there would skip the other
    worker's record, whose decisions this state does not hold: it stays at its own last
    record."""
    _on_a_mesh(_other_writer_scenario, 60)


async def _other_writer_scenario(ds: Devstack) -> None:
    async with _lon(ds) as (nc, js, r), _started(_worker(ds, nc, r)) as w:
        await _send(js, 0)
        await _until(lambda: _key(0) in w.done and w._last_record > 0)
        mine = w._last_record
        other = {"in": "o:other", "k": "unread", "p": b"", "h": {}, "o": []}
        await js.publish(
            subjects.risklog("lon"),
            msgpack.packb({"b": [other]}),
            headers={H_MSG_ID: "rec:another:o:other:1"},
        )
        late = await js.publish(subjects.report_risk("lon", ACCOUNTS[0]), b"report")
        w._risklog_seq = late.seq  # as its late PubAck would
        await _snapshot_now(w)
        assert w._snap_saved == mine, "the snapshot claimed past the other worker's record"


def test_an_own_record_purged_from_inside_the_stream_stops_the_worker() -> None:
    """A record past the snapshot is deleted from inside RISKLOG (a purge of its subject),
    while older messages stay: the stream's first message does not show it. The running
    worker knows its own last record, and its next rebuild stops (fails closed) rather than
    go on without that record's decisions."""
    _on_a_mesh(_purged_inside_scenario, 60)


async def _purged_inside_scenario(ds: Devstack) -> None:
    async with _lon(ds) as (nc, js, r), _started(_worker(ds, nc, r)) as w:
        await _send(js, 9, _far(9))  # a reject report
        await _decided(w, 1)
        await asyncio.sleep(0.3)
        await _snapshot_now(w)
        await _send(js, 0)  # its record is past the snapshot
        await _decided(w, 2)
        await asyncio.sleep(0.3)
        await js.purge_stream("RISKLOG", subject=subjects.risklog("lon"))
        _fail_externals_once(w)
        await _send(js, 1)
        got = await asyncio.wait_for(w.fatal, 20)
        assert isinstance(got, RebuildError) and "is gone" in str(got)


def test_orders_stored_while_risk_was_down_after_a_kill_are_decided_under_it() -> None:
    """Risk started its ORDERS loop and decided the backlog before its kill-switch watch
    had read a thing: orders a desk stored after a kill engaged while the worker was down
    were approved. The kill switches and limits are read first now."""
    _on_a_mesh(_kill_before_backlog_scenario, 120)


async def _kill_before_backlog_scenario(ds: Devstack) -> None:
    from router.contract import KillScope
    from router.control import set_kill

    nc = await ds.connect("lon")
    js = nc.jetstream(domain="lon")
    r = aioredis.from_url(ds.redis_url)
    try:
        async with _started(_worker(ds, nc, r)):
            pass  # its consumers exist; it stops
        res = await set_kill(
            lambda region: ds.connect(region), ds.topology, KillScope.ACCOUNT, "LON-HF-01",
            engaged=True,
        )  # fmt: skip
        assert res["lon"] == "ok", res
        n = 200
        for i in range(n):
            await _send(js, i, replace(_new(i), account="LON-HF-01", cl_ord_id=f"kb-{i}"))
        async with _started(_worker(ds, nc, r)) as w:
            await _decided(w, n)
            assert w.stats["rejected"] >= n and w.stats["orders"] == n
            assert not w.engine.state("LON-HF-01").orders  # none approved
    finally:
        await r.aclose()
        await nc.close()
