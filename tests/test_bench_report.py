"""The benchmark's report: the raw ceilings it prints, and its ratios (no mesh needed)."""

from __future__ import annotations

from typing import Any

from ops.bench import markdown, ratios, raw_python_book


def _raw() -> dict[str, Any]:
    return {
        "js_publish": {"msgs_per_s": 50_000},
        "js_publish_fsync": {"msgs_per_s": 5_000},
        "request_reply": {"p50_ms": 0.4, "p99_ms": 0.9},
        "pg_copy": {"rows_per_s": 300_000},
        "python_book": raw_python_book(pairs=50),
    }


def test_python_speed_is_measured_and_reported() -> None:
    raw = _raw()
    assert raw["python_book"]["commands"] == 100
    assert raw["python_book"]["commands_per_s"] > 0
    r = {
        "started": "now",
        "quick": True,
        "command": "meridian bench --quick",
        "machine": {"cpus": 2, "python": "3.11", "nats_server": "v2"},
        "raw": raw,
    }
    text = markdown(r)
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
