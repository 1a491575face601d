"""The bare shapes the benchmark measures as floors: every order is acked and reported
exactly once through real JetStream hops (no timing is asserted)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ops.skeleton import SHAPES, measure_shape


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_order_is_acked_and_reported(shape: str, tmp_path: Path) -> None:
    out = asyncio.run(measure_shape(shape, tmp_path, seconds=0.5, rate=200))
    at = out["at_rate"]
    assert at["sent"] == at["acked"] == at["reported"] > 0
    assert at["order_to_report"]["count"] == at["sent"]
    assert at["cpu_us_per_order"] > 0
    closed = out["closed_loop"]
    assert closed["reported"] == closed["sent"] > 0
    assert out["hops"] == list(SHAPES[shape])
