"""Where an order's time goes, from the timestamps the mesh records (ops/hopsplit.py)."""

from __future__ import annotations

import msgpack
import pytest

from ops import hopsplit
from ops.loadgen import run_load
from tests.conftest import Mesh


def test_stored_messages_name_their_orders() -> None:
    order = msgpack.packb({"cl_ord_id": "c1", "qty": 1})
    record = msgpack.packb(
        {"b": [{"k": "order", "p": order}, {"k": "report", "p": b"x"}]}, use_bin_type=True
    )
    assert hopsplit._cl_ids("ORDERS", order) == ["c1"]
    assert hopsplit._cl_ids("RISKLOG", record) == ["c1"]
    assert hopsplit._cl_ids("EXECOUT", b"\xc1 not msgpack") == []


def test_each_stage_is_the_difference_of_consecutive_timestamps() -> None:
    ms = 1_000_000
    orders = {"c1": (ms, 2 * ms, 7 * ms, 11 * ms), "c2": (ms, 2 * ms, 7 * ms, 11 * ms)}
    stored = {
        "ORDERS": {"c1": 3 * ms, "c2": 3 * ms},
        "RISKLOG": {"c1": 5 * ms, "c2": 5 * ms},
        "EXECOUT": {"c1": 8 * ms, "c2": 8 * ms},
    }
    out = hopsplit.split({**orders, "lost": (1, 2, 3, 4)}, stored)
    assert out["orders"] == 2  # an order with a missing timestamp is left out
    got = {s: v["p50_ms"] for s, v in out["stages"].items()}
    assert got == pytest.approx(  # HdrHistogram keeps 3 significant digits
        {
            "desk -> gateway": 1.0,
            "gateway -> ORDERS": 1.0,
            "ORDERS -> RISKLOG": 2.0,
            "RISKLOG -> EXEC": 2.0,
            "EXEC -> EXECOUT": 1.0,
            "EXECOUT -> desk": 3.0,
        },
        rel=1e-3,
    )


async def test_every_executed_order_is_split_on_the_real_path(order_path: Mesh) -> None:
    nc = await order_path.connect("lon")
    try:
        js = nc.jetstream(domain="lon")
        before = await hopsplit.last_seqs(js)
        timeline: dict[str, tuple[int, int, int, int]] = {}
        res = await run_load(
            order_path.urls("lon", "desk"),
            order_path.topology,
            "lon",
            run_id=f"hs{before['ORDERS']}",
            seconds=1.0,
            rate=40,
            timeline=timeline,
        )
        stamps: dict[str, int] = {}
        stored = {
            s: await hopsplit.stored_ns(js, s, seq, stamps=stamps if s == "ORDERS" else None)
            for s, seq in before.items()
        }
    finally:
        await nc.close()
    assert res["completed"] == len(timeline) > 0
    # the gateway's stamp on each stored request, before its stored time, which reports carry
    # (read here through a datetime: microseconds)
    assert set(timeline) <= set(stamps)
    for cl, (_, entry, _, _) in timeline.items():
        assert stamps[cl] <= entry and abs(stored["ORDERS"][cl] - entry) < 1000, cl
    out = hopsplit.split(timeline, stored)
    assert out["orders"] == len(timeline)
    assert set(out["stages"]) == set(hopsplit.STAGES)
