"""DAY orders end with the trading day (issue 3's time in force DAY): each execution worker
stores the day's roll in its EXEC stream (router.session, 17:00 New York), and its books
expire the DAY orders accepted before it, including those that reach the book after it."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ops.devstack import Devstack
from ops.telemetry.metrics import MeridianMetrics
from regions.topology import Session
from router import contract, subjects
from router.book import ExpireDay, Submit
from router.commands import decode_command, encode_command
from router.contract import ExecType, ExecutionReport, OrdType, Side, TimeInForce
from router.execution import ExecutionWorker
from router.session import last_roll_ns, rolls_after
from tests.private_mesh import on_a_private_mesh
from tests.test_risk_snapshots import _until

pytestmark = pytest.mark.integration


def _submit(oid: str, tif: TimeInForce, entry_ns: int, px: int) -> bytes:
    return encode_command(
        Submit(
            order_id=oid,
            cl_ord_id=f"c-{oid}",
            account="SGP-HF-01",
            home_region="sgp",
            side=Side.BUY,
            ord_type=OrdType.LIMIT,
            tif=tif,
            qty=1_000_000,
            price_ticks=px,
            entry_ns=entry_ns,
        )
    )


def test_day_orders_expire_at_the_roll_and_late_ones_on_arrival(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import router.execution as ex

    monkeypatch.setattr(ex, "ROLL_CHECK_S", 0.2)
    on_a_private_mesh(_scenario, 60)


def _far_session() -> Session:
    """A day that rolls 12 hours from now (UTC): the test never meets a real roll."""
    at = dt.datetime.now(dt.UTC) + dt.timedelta(hours=12)
    return Session(roll=at.strftime("%H:%M"), tz="UTC")


async def _scenario(ds: Devstack) -> None:
    topology = dataclasses.replace(ds.topology, session=_far_session())
    nc = await ds.connect("sgp")
    js = nc.jetstream(domain="sgp")
    reports: list[ExecutionReport] = []

    async def on_report(m: Any) -> None:
        if m.headers and m.headers.get("Mrd-Kind") == "ExecutionReport":
            reports.append(contract.decode(ExecutionReport, m.data))

    sub = await nc.subscribe("mrd.sgp.er.>", cb=on_report)

    def of(oid: str) -> list[str]:
        return [str(r.exec_type) for r in reports if r.order_id == oid]

    reg = CollectorRegistry()
    metrics = MeridianMetrics(reg, region="sgp", service="execution")
    w = ExecutionWorker(nc, topology, "sgp", snapshot_every_s=3600, day_roll=True, metrics=metrics)
    # the first attempt to store the roll fails (EXEC away): it is stored again
    real, fails = w.js.publish, [1]

    async def flaky(*a: Any, **k: Any) -> Any:
        if fails:
            fails.pop()
            raise ConnectionError("injected")
        return await real(*a, **k)

    w.js.publish = flaky  # type: ignore[method-assign]
    try:
        # a new region's books have applied no roll: it stores the latest one at start
        last = last_roll_ns(topology.session, time.time_ns())
        await w.start()
        await _until(lambda: all(b.day_cutoff_ns == last for b in w.books.values()))
        assert all(b.day_cutoff_ns == last for b in w.books.values()) and not fails
        assert w.day_roll_behind_s(time.time_ns()) == 0.0
        await _until(lambda: _gauge(reg) == 0.0)
        assert _gauge(reg) == 0.0
        n_books = len(w.books)
        rolls = (await js.stream_info("EXEC")).state.messages  # one a book, or more if slow
        assert rolls >= n_books
        for seq in range(1, rolls + 1):
            m = await js.get_msg("EXEC", seq)
            assert decode_command(m.data) == ExpireDay(
                cutoff_ns=last, schedule=rolls_after(topology.session, last, 8)
            )

        sym, px = "USDJPY", 150_000
        now = time.time_ns()
        for oid, tif, entry in (
            ("D-today", TimeInForce.DAY, now),  # accepted after the last roll: rests
            ("D-late", TimeInForce.DAY, last - 1),  # in flight over the roll
            ("G-late", TimeInForce.GTC, last - 1),  # GTC: the roll is nothing to it
        ):
            await js.publish(subjects.exec_in("sgp", sym), _submit(oid, tif, entry, px))
        await _until(lambda: len(of("D-late")) == 2 and of("G-late") and of("D-today"))
        assert of("D-late") == ["NEW", "EXPIRED"]
        assert of("D-today") == ["NEW"] and of("G-late") == ["NEW"]
        assert [o.order_id for o in w.books[sym].open_orders()] == ["D-today", "G-late"]

        # the next roll: the resting DAY order of that day expires, the GTC one stays
        cutoff = time.time_ns()
        assert await w.roll(cutoff) == n_books
        await _until(lambda: len(of("D-today")) == 2)
        expired = [r for r in reports if r.order_id == "D-today"][-1]
        assert expired.exec_type is ExecType.EXPIRED and expired.text == "end of trading day"
        assert [o.order_id for o in w.books[sym].open_orders()] == ["G-late"]
        n_reports = len(reports)
        await w.roll(cutoff)  # again: nothing more
        await asyncio.sleep(0.3)
        assert len(reports) == n_reports
        stored = (await js.stream_info("EXEC")).state.last_seq
    finally:
        await w.stop()

    # restarted: its books have applied the latest roll, so it stores none
    w2 = ExecutionWorker(nc, topology, "sgp", snapshot_every_s=3600, day_roll=True)
    try:
        await w2.start()
        await asyncio.sleep(0.5)
        assert all(b.day_cutoff_ns == cutoff for b in w2.books.values())
        assert (await js.stream_info("EXEC")).state.last_seq == stored
        assert [o.order_id for o in w2.books[sym].open_orders()] == ["G-late"]
    finally:
        await w2.stop()
        await sub.unsubscribe()
        await nc.close()


def _gauge(reg: CollectorRegistry) -> float | None:
    return reg.get_sample_value(
        "meridian_day_roll_behind_seconds", {"region": "sgp", "service": "execution"}
    )
