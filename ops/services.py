"""Which worker processes each region runs, as the devstack launches them."""

from __future__ import annotations

from ops.devstack import WorkerSpec


def devstack_workers() -> list[WorkerSpec]:
    """Worker specs for `meridian up`, in start order (each spec yields per-region argv)."""
    return []
