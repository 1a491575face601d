"""The benchmark's report: the raw ceilings it prints, and its ratios (no mesh needed)."""

from __future__ import annotations

import re
from typing import Any

from ops.bench import code_commit, markdown, ratios, raw_python_book


def _raw() -> dict[str, Any]:
    return {
        "js_publish": {"msgs_per_s": 50_000},
        "js_publish_fsync": {"msgs_per_s": 5_000},
        "request_reply": {"p50_ms": 0.4, "p99_ms": 0.9},
        "pg_copy": {"rows_per_s": 300_000},
        "python_book": raw_python_book(pairs=50),
    }


def _report(raw: dict[str, Any], mesh: dict[str, Any] | None = None) -> str:
    """The markdown of a run with these raw ceilings (and mesh results, if any)."""
    r: dict[str, Any] = {
        "started": "now",
        "quick": mesh is None,
        "command": "meridian bench",
        "commit": "abc1234",
        "machine": {"cpus": 2, "python": "3.11", "nats_server": "v2"},
        "raw": raw,
    }
    if mesh is not None:
        r["mesh"] = mesh
    return markdown(r)


def test_python_speed_is_measured_and_reported() -> None:
    raw = _raw()
    assert raw["python_book"]["commands"] == 100
    assert raw["python_book"]["commands_per_s"] > 0
    text = _report(raw)
    assert "pure book (no I/O)" in text
    assert f"{raw['python_book']['commands_per_s']:,} commands/s" in text


def test_ratios_divide_by_the_raw_ceilings() -> None:
    raw = _raw()
    raw["python_book"] = {"commands_per_s": 20_000}
    point = {"completed_per_s": 1_000, "submit_to_ack": {"p50_ms": 2.0}}
    mesh = {
        "tracing_off": {"max_one_region": point, "latency_1000": point},
        "max_three_regions": {"completed_per_s": 1_500},
    }
    out = ratios({"raw": raw, "mesh": mesh})
    assert out["one-region orders/s / raw JetStream publishes/s"] == "0.020"
    assert out["one-region orders/s / pure-book commands/s (Python speed)"] == "0.0500"
    assert out["submit->ack p50 / raw request-reply p50"] == "5.0x"


def _shape(p50: float, max_per_s: float) -> dict[str, Any]:
    lat = {"p50_ms": p50, "p99_ms": 2 * p50, "p99_9_ms": 3 * p50}
    return {
        "hops": ["gateway", "risk", "execution"],
        "at_rate": {"order_to_report": lat, "submit_to_ack": lat, "cpu_us_per_order": 900},
        "closed_loop": {"reported_per_s": max_per_s},
    }


def test_the_path_is_compared_with_its_bare_shape() -> None:
    raw = _raw()
    raw["shapes"] = {"today": _shape(1.25, 10_000.0), "entry": _shape(1.0, 15_000.0)}
    point = {
        "completed_per_s": 4_000,
        "submit_to_ack": {"p50_ms": 2.0},
        "order_to_execution": {"p50_ms": 5.0},
    }
    mesh = {
        "tracing_off": {"max_one_region": point, "latency_1000": point},
        "max_three_regions": {"completed_per_s": 3_000},
    }
    out = ratios({"raw": raw, "mesh": mesh})
    assert out["order->execution p50 at 1,000/s / its bare shape's"] == "4.0x"
    assert out["one-region orders/s / its bare shape's max"] == "0.400"
    text = _report(raw)
    assert "Floor of the order path's shape" in text
    assert "risk at the entry" in text and "| 1.25 / 2.50 / 3.75 |" in text


def test_the_steady_state_point_is_reported_with_its_full_collections() -> None:
    lat = {"p50_ms": 6.0, "p99_ms": 40.0, "p99_9_ms": 90.0, "max_ms": 120.0}
    point = {"offered_per_s": 1000, "acked_per_s": 999.0, "completed_per_s": 999.0}
    steady = {
        "filled_with_orders": 80_000,
        "latency": {**point, "submit_to_ack": lat, "order_to_execution": lat},
        "hop_split": {
            "orders": 60_000,
            "stages": {
                "EXEC -> EXECOUT": {"p50_ms": 1.5, "p90_ms": 4.0, "p99_ms": 30.0, "mean_ms": 2.5}
            },
        },
        "full_gc": {"execution": {"collections": 12, "total_ms": 300.0, "stalls": 1}},
    }
    text = _report(
        _raw(),
        {
            "sweep": [],
            "max_three_regions": {"per_region": [], "completed_per_s": 1.0},
            "steady": steady,
        },
    )
    assert "### Steady state: 60 s at 1,000 orders/s with full books" in text
    assert "closed loop of 80,000 orders" in text and "execution 12 (300 ms in all)" in text
    assert "Event-loop stalls (a heartbeat 0.5 s or more late" in text and ": execution 1." in text
    assert (
        "| 60 s at 1,000/s, full books | 1000 | 999.0 | 999.0 | 6.00 / 40.00 / 90.00 / 120.00"
        in text
    )
    assert "| EXEC -> EXECOUT | 1.50 | 4.00 | 30.00 | 2.50 |" in text


def test_direct_entry_is_reported_beside_the_gateway_path() -> None:
    """Both ways in, one mesh: the direct rows, their ratios, and where a direct order's time
    goes, with the store as the first stage (no gateway, so no gateway stage)."""
    lat = {"p50_ms": 5.0, "p99_ms": 20.0, "p99_9_ms": 30.0, "max_ms": 40.0}
    point = {
        "offered_per_s": 1000,
        "acked_per_s": 1000.0,
        "completed_per_s": 1000.0,
        "submit_to_ack": lat,
        "order_to_execution": lat,
    }
    stage = {"p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "mean_ms": 1.5}
    direct = {
        "latency_1000": [point],
        "max_one_region": {**point, "offered_per_s": None, "completed_per_s": 2_500.0},
        "max_three_regions": {"per_region": [{**point, "region": "nyc"}], "completed_per_s": 3_000},
        "hop_split_1000": {
            "orders": 900,
            "stages": {
                "desk -> gateway": stage,
                "gateway -> ORDERS": stage,
                "EXEC -> EXECOUT": stage,
            },
        },
        "cpu_us_per_order_1000": {"risk-lon": 500.0},
        "machine_busy_cores_1000": 1.7,
    }
    mesh = {
        "tracing_off": {"max_one_region": point, "latency_1000": point},
        "max_three_regions": {"completed_per_s": 1_500, "per_region": []},
        "sweep": [],
        "direct": direct,
    }
    out = ratios({"raw": _raw(), "mesh": mesh})
    assert out["direct entry: one-region orders/s / raw JetStream publishes/s"] == "0.050"
    assert out["direct entry: three-region orders/s / raw JetStream publishes/s"] == "0.060"
    text = _report(_raw(), mesh)
    assert "### Direct entry" in text and "| direct, max, all three at once: nyc |" in text
    assert "**3,000 orders/s**" in text and "risk-lon 500 us" in text
    assert "| desk -> ORDERS | 1.00 |" in text and "| gateway -> ORDERS |" not in text


def test_a_run_names_the_commit_it_measured() -> None:
    assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?|unknown", code_commit())
    assert "`meridian bench` on commit abc1234." in _report(_raw())
