"""A worker's metrics follow its own topology (``--topology``), not the shipped file: their
symbol and region labels are checked against it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest

import ops.runtime as runtime
from regions.topology import DEFAULT_TOPOLOGY

EXTRA = """
[[instruments]]
symbol = "GBPJPY"
base = "GBP"
quote = "JPY"
price_decimals = 3
min_qty = 1000
max_qty = 50000000
"""


def _topology_with_gbpjpy(tmp_path: Path) -> Path:
    """The shipped topology, with sgp also executing GBPJPY (a pair it does not have)."""
    text = DEFAULT_TOPOLOGY.read_text()
    old = 'executes = ["USDJPY", "USDSGD", "AUDUSD"]'
    assert text.count(old) == 1
    text = text.replace(old, 'executes = ["USDJPY", "USDSGD", "AUDUSD", "GBPJPY"]')
    text = text.replace("\n[[currencies]]", EXTRA + "\n[[currencies]]", 1)
    path = tmp_path / "topology.toml"
    path.write_text(text)
    return path


async def test_a_worker_labels_its_metrics_from_its_own_topology(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERIDIAN_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("MERIDIAN_TRACING", "0")

    async def no_nats(*_: Any, **__: Any) -> Any:
        return object()

    async def stop_at_once(worker: Any, nc: Any) -> None:
        return None

    monkeypatch.setattr(runtime, "connect_worker", no_nats)
    monkeypatch.setattr(runtime, "serve_until_stopped", stop_at_once)
    seen: list[Any] = []

    class _Worker:
        async def start(self) -> None:
            return None

    def build(nc: Any, topology: Any, ctx: runtime.ServiceContext) -> _Worker:
        assert "GBPJPY" in topology.region("sgp").executes
        seen.append(ctx)
        # a book only this topology has: its series must be accepted
        ctx.metrics.fills("GBPJPY").inc()
        ctx.metrics.book_depth("GBPJPY", "buy").set(3)
        return _Worker()

    args = argparse.Namespace(
        region="sgp",
        nats_url=["nats://127.0.0.1:1"],
        topology=str(_topology_with_gbpjpy(tmp_path)),
        metrics_port=0,
    )
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        await runtime.serve_worker("execution", args, build)
    finally:  # service_context sent the root logger to the run dir's file
        for h in root.handlers:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
    (ctx,) = seen
    assert ctx.metrics is not None  # built: not "metrics unavailable"
    labels = {"region": "sgp", "service": "execution", "symbol": "GBPJPY"}
    assert ctx.registry.get_sample_value("meridian_fills_total", labels) == 1
