"""A private 3-region mesh for one test scenario that drives its own workers."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from ops.devstack import Devstack, MeshPlan
from ops.loadgen import seed_top_of_book
from regions.topology import load_topology


def on_a_private_mesh(
    scenario: Callable[[Devstack], Awaitable[None]],
    timeout_s: float,
    *,
    with_redis: bool = False,
) -> None:
    """Run ``scenario`` on a fresh mesh on free ports (no workers; with Redis, a seeded top
    of book), then take the mesh down."""
    run_dir = Path(tempfile.mkdtemp(prefix="meridian-test-", dir="/tmp"))
    ds = Devstack(MeshPlan.free(load_topology(), run_dir, latency_scale=0.25))
    ds.up(with_pg=False, with_redis=with_redis)
    try:
        if with_redis:
            seed_top_of_book(ds.redis_url, ds.topology)
        asyncio.run(asyncio.wait_for(scenario(ds), timeout_s))
    finally:
        ds.down()
