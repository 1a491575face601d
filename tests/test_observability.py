"""Metrics of every worker of the test mesh exist and move when orders flow; no worker logged
a failed batch (issue 8)."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest

from ops.loadgen import REFERENCE_MIDS
from router.client import DeskClient
from router.contract import ExecType, OrderAck, Side
from tests.conftest import Mesh

pytestmark = pytest.mark.integration


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def total(text: str, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    out = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if not m:
            continue
        lbl = m.group(1) or ""
        if all(f'{k}="{v}"' in lbl for k, v in labels.items()):
            out += float(m.group(2))
    return out


def worker_ports(mesh: Mesh) -> dict[str, int]:
    return {n: r.port for n, r in mesh.records.items() if r.kind == "worker" and r.port}


async def test_metrics_endpoints_expose_key_series_that_move(order_path: Mesh) -> None:
    ports = worker_ports(order_path)
    assert {
        f"{s}-{r}" for s in ("gateway", "risk", "execution") for r in ("lon", "nyc", "sgp")
    } <= set(ports)
    before = {n: scrape(p) for n, p in ports.items()}
    for name, text in before.items():
        assert "meridian_" in text, f"{name} exposes no meridian series"

    nc_b = await order_path.connect("sgp", role="desk")
    nc_s = await order_path.connect("sgp", role="desk")
    try:
        # the buyer stores its orders itself (direct entry): risk counts both ways in
        buyer = DeskClient(
            nc_b, order_path.topology, region="sgp", account="SGP-HF-01", entry="direct"
        )
        seller = DeskClient(nc_s, order_path.topology, region="sgp", account="SGP-BANK-02")
        await buyer.start()
        await seller.start()
        px = REFERENCE_MIDS["AUDUSD"]
        for _ in range(5):
            s = await seller.new_order("AUDUSD", Side.SELL, 1_000_000, px)
            b = await buyer.new_order("AUDUSD", Side.BUY, 1_000_000, px)
            assert isinstance(s, OrderAck) and isinstance(b, OrderAck)
            await buyer.wait_report(b.order_id, lambda r: r.exec_type is ExecType.TRADE)
        await asyncio.sleep(0.5)
    finally:
        await nc_b.close()
        await nc_s.close()

    gw = scrape(ports["gateway-sgp"])
    assert (
        total(gw, "meridian_orders_received_total")
        >= total(before["gateway-sgp"], "meridian_orders_received_total") + 5
    )
    assert total(gw, "meridian_submit_to_ack_seconds_count") >= 5
    risk = scrape(ports["risk-sgp"])
    for entry in ("gateway", "direct"):
        name = "meridian_risk_requests_total"
        was = total(before["risk-sgp"], name, entry=entry)
        assert total(risk, name, entry=entry) >= was + 5, entry
    assert 'le="0.0005"' in gw, "latency buckets must resolve sub-millisecond work"
    ex = scrape(ports["execution-sgp"])
    assert (
        total(ex, "meridian_fills_total", symbol="AUDUSD")
        >= total(before["execution-sgp"], "meridian_fills_total", symbol="AUDUSD") + 5
    )
    assert total(ex, "meridian_order_to_execution_seconds_count", symbol="AUDUSD") >= 10
    assert "meridian_book_depth" in ex
    # each worker's consumers, as the last delivery of its latest batch saw them
    assert 'meridian_consumer_pending{consumer="exec_sgp",region="sgp",' in ex
    assert 'meridian_consumer_pending{consumer="risk_sgp",region="sgp",' in risk


def test_no_worker_failed_a_batch(order_path: Mesh) -> None:
    """Metrics, tracing or anything else around the order path must never fail a batch."""
    bad = []
    for path in sorted((order_path.run_dir / "logs").glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            if "batch failed" in line:
                bad.append(f"{path.name}: {line[:300]}")
    assert not bad, "\n".join(bad[:5])


async def test_local_order_flow_sends_nothing_over_the_leaf_links(order_path: Mesh) -> None:
    """Orders entered and executed in lon must not cost the WAN anything (no stray interest:
    e.g. same-named consumers in other domains would pull every ack across)."""
    import json

    def leaf_out() -> dict[str, int]:
        port = order_path.topology.region("lon").monitor_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/leafz", timeout=5) as r:
            return {lf["name"]: lf["out_msgs"] for lf in json.load(r)["leafs"]}

    nc = await order_path.connect("lon", role="desk")
    try:
        c = DeskClient(nc, order_path.topology, region="lon", account="LON-CORP-03")
        await c.start()
        before = leaf_out()
        acks = []
        for i in range(40):
            a = await c.new_order("EURGBP", Side.BUY, 100_000, REFERENCE_MIDS["EURGBP"] - 50 - i)
            assert isinstance(a, OrderAck)
            acks.append(a)
        await c.wait_report(acks[-1].order_id, lambda r: True)
        for a in acks:
            await c.cancel(a.cl_ord_id, "EURGBP")
        await asyncio.sleep(0.5)
        after = leaf_out()
    finally:
        await nc.close()
    # pings and the odd heartbeat only: far below one message per order
    assert all(after[k] - before.get(k, 0) < 20 for k in after), (before, after)
