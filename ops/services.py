"""Which worker processes each region runs, as the devstack launches them."""

from __future__ import annotations

import sys

from ops.devstack import Devstack, WorkerSpec


def order_path_workers(ds: Devstack, region: str) -> list[tuple[str, list[str]]]:
    """Gateway, pre-trade risk and execution of one region (metrics ports from the topology)."""
    r = ds.topology.region(region)
    urls: list[str] = []
    for u in ds.urls(region, "worker"):
        urls += ["--nats-url", u]
    topo = ["--topology", ds.topology.source] if ds.topology.source != "<memory>" else []
    base = r.metrics_port_base
    py = sys.executable
    return [
        (
            "execution",
            [
                py,
                "-m",
                "router.execution",
                "--region",
                region,
                *urls,
                *topo,
                "--metrics-port",
                str(base + 2),
            ],
        ),
        (
            "risk",
            [
                py,
                "-m",
                "router.risk_worker",
                "--region",
                region,
                *urls,
                *topo,
                "--redis-url",
                ds.redis_url,
                "--metrics-port",
                str(base + 1),
            ],
        ),
        (
            "gateway",
            [
                py,
                "-m",
                "router.gateway",
                "--region",
                region,
                *urls,
                *topo,
                "--metrics-port",
                str(base + 0),
            ],
        ),
    ]


def devstack_workers() -> list[WorkerSpec]:
    """Worker specs for `meridian up`, in start order (each spec yields per-region argv)."""
    return [order_path_workers]
