"""DAY orders end with the trading day (issue 3's time in force DAY): each execution worker
stores the day's roll in its EXEC stream (router.session, 17:00 New York), and its books
expire the DAY orders accepted before it, including those that reach the book after it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from ops.devstack import Devstack
from router import contract, subjects
from router.book import ExpireDay, Submit
from router.commands import decode_command, encode_command
from router.contract import ExecType, ExecutionReport, OrdType, Side, TimeInForce
from router.execution import ExecutionWorker
from router.session import last_roll_ns
from tests.private_mesh import on_a_private_mesh

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


async def _until(cond: Any, tries: int = 100) -> None:
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(0.05)


def test_day_orders_expire_at_the_roll_and_late_ones_on_arrival() -> None:
    on_a_private_mesh(_scenario, 60)


async def _scenario(ds: Devstack) -> None:
    nc = await ds.connect("sgp")
    js = nc.jetstream(domain="sgp")
    reports: list[ExecutionReport] = []

    async def on_report(m: Any) -> None:
        if m.headers and m.headers.get("Mrd-Kind") == "ExecutionReport":
            reports.append(contract.decode(ExecutionReport, m.data))

    sub = await nc.subscribe("mrd.sgp.er.>", cb=on_report)

    def of(oid: str) -> list[str]:
        return [str(r.exec_type) for r in reports if r.order_id == oid]

    w = ExecutionWorker(nc, ds.topology, "sgp", snapshot_every_s=3600, day_roll=True)
    try:
        # a new region's books have applied no roll: it stores the latest one at start
        last = last_roll_ns(ds.topology.session, time.time_ns())
        await w.start()
        await _until(lambda: all(b.day_cutoff_ns == last for b in w.books.values()))
        assert all(b.day_cutoff_ns == last for b in w.books.values())
        n_books = len(w.books)
        exec_msgs = await js.stream_info("EXEC")
        assert exec_msgs.state.messages == n_books
        first = await js.get_msg("EXEC", 1)
        assert decode_command(first.data) == ExpireDay(cutoff_ns=last)
        assert (first.headers or {}).get("Nats-Msg-Id", "").startswith("roll:")

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
        await w.roll(cutoff)
        await _until(lambda: len(of("D-today")) == 2)
        expired = [r for r in reports if r.order_id == "D-today"][-1]
        assert expired.exec_type is ExecType.EXPIRED and expired.text == "end of trading day"
        assert [o.order_id for o in w.books[sym].open_orders()] == ["G-late"]
        stored = (await js.stream_info("EXEC")).state.last_seq
        assert stored == n_books + 3 + n_books
        await w.roll(cutoff)  # again (another attempt): the stream's dedup drops it
        assert (await js.stream_info("EXEC")).state.last_seq == stored
    finally:
        await w.stop()

    # restarted: its books have applied the latest roll, so it stores none
    w2 = ExecutionWorker(nc, ds.topology, "sgp", snapshot_every_s=3600, day_roll=True)
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
