"""Which processes the devstack runs besides the servers: per-region workers and telemetry.

Metrics ports: each region's workers use ``metrics_port_base + n`` (0 gateway, 1 risk,
2 execution, 3 ledger writer, 4 market data); the NATS monitor collector and Prometheus use
the hub's base + 8 and + 9. ``meridian status`` lists them all.
"""

from __future__ import annotations

import shutil
import sys

from ops.devstack import Devstack, WorkerSpec
from ops.procs import http_ok

METRICS_OFFSETS = {"gateway": 0, "risk": 1, "execution": 2, "ledger": 3, "md": 4}


def _urls(ds: Devstack, region: str, role: str = "worker") -> list[str]:
    out: list[str] = []
    for u in ds.urls(region, role):
        out += ["--nats-url", u]
    return out


def _topo(ds: Devstack) -> list[str]:
    return ["--topology", ds.topology.source] if ds.topology.source != "<memory>" else []


def metrics_port(ds: Devstack, region: str, service: str) -> int:
    return ds.topology.region(region).metrics_port_base + METRICS_OFFSETS[service]


def order_path_workers(ds: Devstack, region: str) -> list[tuple[str, list[str]]]:
    """Execution, pre-trade risk and gateway of one region (consumers before producers)."""
    py = sys.executable
    common = ["--region", region, *_urls(ds, region), *_topo(ds)]
    return [
        (
            "execution",
            [
                py,
                "-m",
                "router.execution",
                *common,
                "--metrics-port",
                str(metrics_port(ds, region, "execution")),
            ],
        ),
        (
            "risk",
            [
                py,
                "-m",
                "router.risk_worker",
                *common,
                "--redis-url",
                ds.redis_url,
                "--metrics-port",
                str(metrics_port(ds, region, "risk")),
            ],
        ),
        (
            "gateway",
            [
                py,
                "-m",
                "router.gateway",
                *common,
                "--metrics-port",
                str(metrics_port(ds, region, "gateway")),
            ],
        ),
    ]


def ledger_workers(ds: Devstack, region: str) -> list[tuple[str, list[str]]]:
    """The region's ledger writer (migrations ran when PostgreSQL started)."""
    return [
        (
            "ledger",
            [
                sys.executable,
                "-m",
                "ledger.writer",
                "--region",
                region,
                "--nats",
                ds.url(region, "worker"),
                "--dsn",
                ds.pg_dsn,
                *_topo(ds),
                "--metrics-port",
                str(metrics_port(ds, region, "ledger")),
            ],
        )
    ]


def md_workers(ds: Devstack, region: str) -> list[tuple[str, list[str]]]:
    """The region's market-data feed, replicated view and top of book (if built)."""
    try:
        import replication.service  # noqa: F401
    except ImportError:
        return []
    return [
        (
            "md",
            [
                sys.executable,
                "-m",
                "replication.service",
                "--region",
                region,
                *_urls(ds, region),
                "--redis-url",
                ds.redis_url,
                "--rate",
                "40",
                "--metrics-port",
                str(metrics_port(ds, region, "md")),
            ],
        )
    ]


def devstack_workers() -> list[WorkerSpec]:
    """Worker specs for `meridian up`, in start order (each spec yields per-region argv)."""
    return [md_workers, order_path_workers, ledger_workers]


def start_telemetry(ds: Devstack) -> None:
    """NATS monitor collector, and Prometheus scraping everything when it is installed."""
    from ops.prometheus.config import prometheus_command, render_prometheus_config

    hub = ds.topology.region(ds.topology.hub)
    natsmon_port = hub.metrics_port_base + 8
    prom_port = hub.metrics_port_base + 9
    monitors = [f"{r.code}=http://127.0.0.1:{r.monitor_port}" for r in ds.topology.regions]
    ds.start_worker(
        "natsmon",
        ds.topology.hub,
        [sys.executable, "-m", "ops.natsmon", "--port", str(natsmon_port), *_topo(ds), *monitors],
        ready=lambda: http_ok(f"http://127.0.0.1:{natsmon_port}/metrics"),
    )
    targets: dict[str, list[str]] = {"meridian-nats": [f"127.0.0.1:{natsmon_port}"]}
    for rec in ds.records.values():
        if rec.kind != "worker" or rec.name.startswith("natsmon"):
            continue
        service = rec.name[: -len(rec.region) - 1]
        if service in METRICS_OFFSETS:
            targets.setdefault(f"meridian-{service}", []).append(
                f"127.0.0.1:{metrics_port(ds, rec.region, service)}"
            )
    render_prometheus_config(ds.run_dir, targets)
    binary = shutil.which("prometheus")
    if binary is None:
        ds.progress("prometheus not installed: skipping (metrics endpoints still served)")
        return
    ds.start_worker(
        "prometheus",
        ds.topology.hub,
        prometheus_command(ds.run_dir, prom_port, binary=binary),
        ready=lambda: http_ok(f"http://127.0.0.1:{prom_port}/-/ready"),
    )
