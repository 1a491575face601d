"""What the execution and risk workers put in their metrics, without a mesh: what is measured
(order to execution on the wall clock, at publication), which outputs count (live ones, never
a rebuild's), the kill switch and consumer gauges, and a failing gauge turning off only
itself. NATS is not crossed here: the publisher and the stream reads are stand-ins."""

from __future__ import annotations

import asyncio
import logging
import time
import types
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ops.telemetry.errors import LabelError
from ops.telemetry.metrics import MeridianMetrics
from regions.topology import Topology, load_topology
from router import contract
from router.book import BOOK_RULES, Submit
from router.commands import encode_command
from router.contract import KillScope, KillSwitch, OrdType, Side, TimeInForce
from router.execution import ExecutionWorker
from router.risk_worker import Item, RiskWorker

SYM = "USDJPY"
BASE = {"region": "sgp", "service": "execution"}


@pytest.fixture(scope="module")
def topo() -> Topology:
    return load_topology()


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


class _Stored:
    """Stands in for the worker's publisher: every output stored at once."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self._seq = 0

    async def publish(self, subject: str, payload: bytes, **_: Any) -> asyncio.Future[Any]:
        self.sent.append(subject)
        self._seq += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(types.SimpleNamespace(seq=self._seq, duplicate=False, stream="X"))
        return fut


def _delivery(seq: int, data: bytes, *, stored_ns: int, pending: int = 0) -> Any:
    """An EXEC delivery: what Cmd.of and stream_position read of a nats Msg."""

    async def ack() -> None:
        return None

    return types.SimpleNamespace(
        subject=f"mrd.sgp.exe.{SYM}",
        data=data,
        headers=None,
        reply=f"$JS.ACK.EXEC.exec_sgp.1.{seq}.{seq}.{stored_ns}.{pending}",
        ack=ack,
    )


def _submit(oid: str, side: Side, px: int, entry_ns: int, account: str = "SGP-HF-01") -> bytes:
    return encode_command(
        Submit(
            order_id=oid,
            cl_ord_id=f"c-{oid}",
            account=account,
            home_region="sgp",
            side=side,
            ord_type=OrdType.LIMIT,
            tif=TimeInForce.GTC,
            qty=1_000_000,
            price_ticks=px,
            entry_ns=entry_ns,
        )
    )


async def _exec_worker(topo: Topology, metrics: Any, replay: list[Any] | None = None) -> Any:
    async def stream_info(name: str) -> Any:
        last = len(replay or [])
        return types.SimpleNamespace(state=types.SimpleNamespace(last_seq=last, first_seq=1))

    async def subscribe(subject: str, *, cb: Any, **_: Any) -> Any:
        for m in replay or []:
            await cb(m)

        async def unsubscribe() -> None:
            return None

        return types.SimpleNamespace(unsubscribe=unsubscribe)

    class _Nc:
        def jetstream(self, domain: str) -> Any:
            return types.SimpleNamespace(stream_info=stream_info, subscribe=subscribe)

    w = ExecutionWorker(_Nc(), topo, "sgp", metrics=metrics, snapshot_every=0)  # type: ignore[arg-type]
    w.pub = _Stored()  # type: ignore[assignment]

    async def consumer_info() -> Any:
        return types.SimpleNamespace(ack_floor=None)  # nothing acked: all re-published

    async def nothing(**_: Any) -> None:
        return None

    async def restored(**_: Any) -> None:
        for book in w.books.values():  # as from a snapshot of this build's book rules
            book.rules = BOOK_RULES

    w.loop = types.SimpleNamespace(consumer_info=consumer_info, durable="exec_sgp")  # type: ignore[assignment]
    w._restore_snapshot = restored  # type: ignore[method-assign]
    w._load_refused = nothing  # type: ignore[method-assign,assignment]
    w._fresh_books()
    return w


async def test_order_to_execution_is_the_wall_clock_at_publication_for_live_reports(
    topo: Topology,
) -> None:
    """Two orders stored in ORDERS 2 s ago whose EXEC commands were stored 1 ms after that
    (risk was quick), then queued in execution: the stored times say 1 ms, the desk waited 2 s."""
    reg = CollectorRegistry()
    w = await _exec_worker(topo, MeridianMetrics(reg, region="sgp", service="execution"))
    entry = time.time_ns() - 2_000_000_000
    batch = [
        _delivery(1, _submit("B1", Side.BUY, 150_000, entry), stored_ns=entry + 1_000_000),
        _delivery(
            2,
            _submit("S1", Side.SELL, 150_000, entry, "SGP-BANK-02"),
            stored_ns=entry + 1_000_000,
            pending=7,
        ),
    ]
    t0 = time.time_ns()
    await w._process(batch)
    t1 = time.time_ns()
    name = "meridian_order_to_execution_seconds"
    assert _value(reg, f"{name}_count", symbol=SYM, **BASE) == 2  # a NEW report each
    total = _value(reg, f"{name}_sum", symbol=SYM, **BASE)
    assert 2 * (t0 - entry) / 1e9 <= total <= 2 * (t1 - entry) / 1e9
    assert _value(reg, "meridian_fills_total", symbol=SYM, **BASE) == w.stats["fills"] >= 1
    # the batch's last delivery: 7 more waiting for this consumer
    pending = {"stream": "EXEC", "consumer": "exec_sgp", **BASE}
    assert _value(reg, "meridian_consumer_pending", **pending) == 7


async def test_outputs_a_rebuild_publishes_again_are_not_counted(topo: Topology) -> None:
    """A restart past the ack floor re-publishes outputs (dedup drops the stored ones): the
    fills were counted by the worker that made them, and the reports are minutes old."""
    reg = CollectorRegistry()
    entry = time.time_ns() - 600 * 1_000_000_000  # stored 10 minutes ago
    replay = [
        _delivery(1, _submit("B1", Side.BUY, 150_000, entry), stored_ns=entry, pending=1),
        _delivery(
            2, _submit("S1", Side.SELL, 150_000, entry, "SGP-BANK-02"), stored_ns=entry, pending=0
        ),
    ]
    w = await _exec_worker(
        topo, MeridianMetrics(reg, region="sgp", service="execution"), replay=replay
    )
    await w.rebuild()
    assert w.applied == 2 and w.stats["fills"] >= 1 and w.pub.sent  # re-published
    assert _value(reg, "meridian_order_to_execution_seconds_count", symbol=SYM, **BASE) == 0
    assert _value(reg, "meridian_fills_total", symbol=SYM, **BASE) == 0


async def test_book_depth_counts_price_levels(topo: Topology) -> None:
    reg = CollectorRegistry()
    w = await _exec_worker(topo, MeridianMetrics(reg, region="sgp", service="execution"))
    now = time.time_ns()
    await w._process(
        [
            _delivery(1, _submit("B1", Side.BUY, 150_000, now), stored_ns=now),
            _delivery(2, _submit("B2", Side.BUY, 150_000, now), stored_ns=now),
            _delivery(3, _submit("B3", Side.BUY, 149_990, now), stored_ns=now),
        ]
    )
    assert len(w.books[SYM]) == 3
    assert _value(reg, "meridian_book_depth", symbol=SYM, side="buy", **BASE) == 2
    assert _value(reg, "meridian_book_depth", symbol=SYM, side="sell", **BASE) == 0


async def test_a_failing_depth_gauge_turns_off_only_itself(
    topo: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, any exception there set the worker's metrics to None: every series, faults
    (which page) included, went silent for good."""

    class _NoDepth(MeridianMetrics):
        def book_depth(self, symbol: str, side: str | Side) -> Any:
            raise LabelError("symbol", symbol, ("a topology the worker does not run",))

    reg = CollectorRegistry()
    m = _NoDepth(reg, region="sgp", service="execution")
    w = await _exec_worker(topo, m)
    now = time.time_ns()
    with caplog.at_level(logging.WARNING, logger="meridian.execution"):
        await w._process([_delivery(1, _submit("B1", Side.BUY, 150_000, now), stored_ns=now)])
        await w._process(
            [_delivery(2, _submit("S1", Side.SELL, 150_000, now, "SGP-BANK-02"), stored_ns=now)]
        )
    assert w.metrics is m
    assert len([r for r in caplog.records if "book depth" in r.getMessage()]) == 1
    assert _value(reg, "meridian_order_to_execution_seconds_count", symbol=SYM, **BASE) == 2
    assert _value(reg, "meridian_fills_total", symbol=SYM, **BASE) >= 1
    w._update_depth()  # off: not tried again


# ---- risk -------------------------------------------------------------------------------------

RISK = {"region": "lon", "service": "risk"}


def _risk_worker(topo: Topology, metrics: Any, js: Any = None) -> RiskWorker:
    class _Nc:
        def jetstream(self, domain: str) -> Any:
            return js or types.SimpleNamespace()

    w = RiskWorker(_Nc(), topo, "lon", None, metrics=metrics)  # type: ignore[arg-type]
    w.pub = _Stored()  # type: ignore[assignment]
    return w


def _kill(w: RiskWorker, rev: int, key: str, engaged: bool | None) -> Item:
    """A KILL_<region> KV update, as the worker's watcher queues it (None: key deleted)."""
    scope, _, target = key.partition(".")
    payload = b""
    if engaged is not None:
        payload = contract.encode(
            KillSwitch(scope=KillScope(scope), target=target or "*", engaged=engaged)
        )
    it = Item(input_id=f"kill:{rev}", kind="kill", payload=payload, headers={"key": key})
    it.decoded = w._decode(it)
    return it


def _kills(reg: CollectorRegistry) -> dict[str, float]:
    return {
        s.value: _value(reg, "meridian_kill_switch_engaged", scope=s.value, **RISK)
        for s in KillScope
    }


async def test_kill_switch_gauges_follow_the_kills_risk_applies(topo: Topology) -> None:
    reg = CollectorRegistry()
    w = _risk_worker(topo, MeridianMetrics(reg, region="lon", service="risk"))
    await w._process([_kill(w, 1, "global", True), _kill(w, 2, "desk.LONFX1", True)])
    await w._process([_kill(w, 3, "account.LON-HF-01", True)])
    assert w.engine.kills == {"global", "desk.LONFX1", "account.LON-HF-01"}
    assert _kills(reg) == {"account": 1, "desk": 1, "global": 1}
    await w._process([_kill(w, 4, "global", False), _kill(w, 5, "desk.LONFX1", None)])
    assert _kills(reg) == {"account": 1, "desk": 0, "global": 0}


async def test_kill_switch_gauges_show_a_restored_state(topo: Topology) -> None:
    """A restart restores the kills from the snapshot (the KV watcher re-delivers them only
    later): the gauges show them as soon as the worker is rebuilt."""

    async def stream_info(name: str) -> Any:
        return types.SimpleNamespace(state=types.SimpleNamespace(last_seq=3, first_seq=1))

    async def get_last_msg(stream: str, subject: str) -> Any:
        return types.SimpleNamespace(seq=3)  # the snapshot covers the last record

    js = types.SimpleNamespace(stream_info=stream_info, get_last_msg=get_last_msg)
    reg = CollectorRegistry()
    w = _risk_worker(topo, MeridianMetrics(reg, region="lon", service="risk"), js)

    async def restore(*, max_seq: int) -> None:
        w.engine.kills = {"global", "account.LON-HF-01", "account.LON-BANK-02"}
        w.restored_from = 3

    w._restore_snapshot = restore  # type: ignore[method-assign]
    await w.rebuild()
    assert _kills(reg) == {"account": 2, "desk": 0, "global": 1}


async def test_consumer_pending_is_set_per_consumer_from_its_last_delivery(
    topo: Topology,
) -> None:
    from nats.aio.msg import Msg

    def delivery(subject: str, reply: str) -> Msg:
        return Msg(_client=None, subject=subject, reply=reply, data=b"\xc1", headers={})  # type: ignore[arg-type]

    reg = CollectorRegistry()
    w = _risk_worker(topo, MeridianMetrics(reg, region="lon", service="risk"))
    ts = 1700000000000000000
    await w._process(
        [
            delivery("mrd.lon.ord.LON-HF-01.k1", f"$JS.ACK.ORDERS.risk_lon.1.5.5.{ts}.40"),
            delivery("mrd.nyc.er.x.lon.LON-HF-01", f"$JS.ACK.EXECOUT.fb_lon_at_nyc.1.8.8.{ts}.3"),
            delivery("mrd.lon.ord.LON-HF-01.k2", f"$JS.ACK.ORDERS.risk_lon.1.6.6.{ts}.39"),
            _kill(w, 1, "global", False),  # a KV update carries no stream position
        ]
    )
    orders = {"stream": "ORDERS", "consumer": "risk_lon", **RISK}
    reports = {"stream": "EXECOUT", "consumer": "fb_lon_at_nyc", **RISK}
    assert _value(reg, "meridian_consumer_pending", **orders) == 39
    assert _value(reg, "meridian_consumer_pending", **reports) == 3
