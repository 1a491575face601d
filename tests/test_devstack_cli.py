"""`meridian up`'s exit code: 0 only for a mesh that became healthy (no mesh is started:
the devstack's own start and status are replaced, the CLI's decision is under test)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ops.cli import main
from ops.devstack import Devstack


def _status(healthy: bool) -> dict[str, Any]:
    return {
        "healthy": healthy,
        "regions": {},
        "links": {},
        "processes": {},
        "market_data": {"lon": {"healthy": healthy, "age_s": 0.5, "stale": {}, "why": "x"}},
        "run_dir": "run",
    }


@pytest.mark.parametrize(("answers", "rc"), [([False] * 1000, 1), ([False, False, True], 0)])
def test_up_waits_for_a_healthy_mesh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answers: list[bool], rc: int
) -> None:
    it = iter(answers)
    monkeypatch.setattr(Devstack, "up", lambda self, **kw: None)
    monkeypatch.setattr(Devstack, "status", lambda self: _status(next(it)))
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "--run-dir",
                str(tmp_path / "run"),
                "up",
                "--free-ports",
                "--no-workers",
                "--wait-s",
                "1.5",
            ]
        )
    assert exit_.value.code == rc
