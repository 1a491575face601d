"""One order, one trace across every hop and region (issue 8)."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time

import pytest
from nats.aio.msg import Msg

from ops.loadgen import REFERENCE_MIDS
from ops.telemetry.tracing import read_spans, setup_tracing, spans_of_order, trace_files
from router import subjects
from router.client import DeskClient
from router.contract import ExecType, OrderAck, Side
from tests.conftest import Mesh

pytestmark = pytest.mark.integration


async def test_order_from_lon_executed_in_sgp_is_one_trace_across_every_hop(
    order_path: Mesh,
) -> None:
    mesh = order_path
    tracing = setup_tracing(service="desk", region="lon", run_dir=mesh.run_dir, enabled=True)
    nc_l = await mesh.connect("lon", role="desk")
    nc_s = await mesh.connect("sgp", role="desk")
    try:
        seller = DeskClient(nc_s, mesh.topology, region="sgp", account="SGP-BANK-02")
        buyer = DeskClient(
            nc_l, mesh.topology, region="lon", account="LON-BANK-02", tracer=tracing.tracer
        )
        await seller.start()
        await buyer.start()
        reports: list[Msg] = []

        async def keep(m: Msg) -> None:
            reports.append(m)

        await nc_l.subscribe(subjects.reports_for_account("LON-BANK-02"), cb=keep)
        await nc_l.flush()
        px = REFERENCE_MIDS["USDSGD"] + 3
        s = await seller.new_order("USDSGD", Side.SELL, 1_000_000, px)
        assert isinstance(s, OrderAck)
        await seller.wait_report(s.order_id, lambda r: r.exec_type is ExecType.NEW)
        b = await buyer.new_order("USDSGD", Side.BUY, 1_000_000, px)
        assert isinstance(b, OrderAck) and b.exec_region == "sgp"
        await buyer.wait_report(b.order_id, lambda r: r.exec_type is ExecType.TRADE)
    finally:
        await nc_l.close()
        await nc_s.close()
    tracing.force_flush()

    hops = [
        "request mrd.v1.entry.lon",
        "process mrd.v1.entry.lon",
        "process ORDERS",
        "process EXEC",
    ]
    # each process exports its spans in batches (every 200 ms): wait for all of them
    deadline = time.monotonic() + 15
    while True:
        spans = spans_of_order(read_spans(trace_files(mesh.run_dir)), b.order_id)
        if set(hops) <= {sp.name for sp in spans} or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    assert len({sp.trace_id for sp in spans}) == 1, "the order must be one trace"
    by = {sp.name: sp for sp in spans}
    assert all(h in by for h in hops), sorted(by)
    # parent chain: desk -> gateway (lon) -> risk (lon) -> execution (sgp)
    for parent, child in itertools.pairwise(hops):
        assert by[child].parent_id == by[parent].span_id, (parent, child)
    assert [by[h].start_ns for h in hops] == sorted(by[h].start_ns for h in hops)
    # the WAN hop lon -> sgp sits between risk (lon) and execution (sgp)
    one_way_ns = mesh.topology.link("lon", "sgp").one_way_ms * 1e6
    gap = by["process EXEC"].start_ns - by["process ORDERS"].start_ns
    assert gap >= one_way_ns * 0.95, (gap, one_way_ns)
    # reports published by execution (in sgp) carry the execution span's context, so their
    # consumers' spans are its children (one span per command, none per output)
    assert int(by["process EXEC"].attributes.get("meridian.outputs", 0)) >= 1
    parents = [(m.headers or {}).get("traceparent", "") for m in reports]
    assert any(by["process EXEC"].span_id in tp for tp in parents), (parents, by["process EXEC"])

    # and `meridian trace` prints the waterfall
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "--run-dir", str(mesh.run_dir), "trace", b.order_id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "process EXEC" in out.stdout and "process ORDERS" in out.stdout
