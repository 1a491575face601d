"""`meridian risk kill` / `release` as a risk officer runs them, against stand-in regions."""

from __future__ import annotations

import argparse
import types
from pathlib import Path
from typing import Any

import pytest

from regions.topology import load_topology


class _Region:
    def __init__(self, region: str, puts: list[tuple[str, str]]) -> None:
        self.region, self.puts = region, puts

    def jetstream(self, domain: str) -> Any:
        async def publish(subject: str, payload: bytes, **kw: Any) -> Any:
            self.puts.append((domain, subject))
            return types.SimpleNamespace(domain=domain)

        return types.SimpleNamespace(publish=publish)

    async def close(self) -> None:
        pass


@pytest.fixture
def regions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    from ops import devstack

    puts: list[tuple[str, str]] = []

    async def connect(region: str, role: str = "sre", **kw: Any) -> _Region:
        assert role == "sre" and kw.get("max_reconnect_attempts") != 0  # 0: retry for ever
        return _Region(region, puts)

    stub = types.SimpleNamespace(topology=load_topology(), connect=connect)
    monkeypatch.setattr(devstack.Devstack, "attach", classmethod(lambda cls, run_dir: stub))
    return puts


def _args(**kw: Any) -> argparse.Namespace:
    base = {"account": None, "desk": None, "engaged": True, "reason": "", "by": "t"}
    return argparse.Namespace(run_dir=Path("run"), **{**base, **kw})


async def test_kill_writes_the_switch_in_every_region(regions: list[tuple[str, str]]) -> None:
    """It passed an already connected client where a per-region connect was due: every
    region answered 'cannot connect: TypeError', and no kill was ever engaged."""
    from ops.cli_orders import _kill

    assert await _kill(_args(account="LON-HF-01")) == 0
    assert sorted(regions) == [
        (r, f"$KV.KILL_{r}.account.LON-HF-01") for r in ("lon", "nyc", "sgp")
    ]


async def test_a_kill_naming_an_unknown_account_writes_nothing(
    regions: list[tuple[str, str]],
) -> None:
    """A misspelt account was 'ENGAGED' everywhere (exit 0) and stopped nothing."""
    from ops.cli_orders import _kill

    assert await _kill(_args(account="LON-HF-1")) == 2
    assert await _kill(_args(desk="NO-SUCH-DESK")) == 2
    assert regions == []
