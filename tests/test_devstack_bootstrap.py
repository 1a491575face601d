"""ops/bootstrap.sh on a machine where things are missing, with stand-in commands on PATH
(nothing is installed, no real virtualenv is touched)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

BOOTSTRAP = Path(__file__).resolve().parent.parent / "ops" / "bootstrap.sh"


def _bin(tmp_path: Path, scripts: dict[str, str], real: tuple[str, ...] = ()) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    for name in real:
        found = shutil.which(name)
        assert found, name
        (d / name).symlink_to(found)
    for name, body in scripts.items():
        (d / name).write_text("#!/bin/bash\n" + body + "\n")
        (d / name).chmod(0o755)
    return d


def _run(path: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", str(BOOTSTRAP)],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": path,
            "HOME": str(tmp_path),
            "MERIDIAN_VENV": str(tmp_path / "venv"),
            "MERIDIAN_WITH_PROMETHEUS": "0",
        },
    )


def test_a_failed_install_stops_bootstrap_with_what_is_missing(tmp_path: Path) -> None:
    """apt-get fails (dpkg lock, no network): bootstrap says redis-server is missing and
    exits 1, instead of a warning and a test suite failing minutes later."""
    bindir = _bin(
        tmp_path,
        {
            "apt-get": f'echo "apt-get $*" >> {tmp_path}/apt.log; exit 100',
            "id": "echo 0",  # root: bootstrap tries apt-get
            "initdb": "exit 0",
        },
        real=("ls", "cat", "dirname", "sha256sum", "cut", "rm"),
    )
    r = _run(str(bindir), tmp_path)
    assert r.returncode == 1, r.stderr
    assert "redis-server" in (tmp_path / "apt.log").read_text()
    assert "redis-server not found" in r.stderr, r.stderr
    assert not (tmp_path / "venv").exists()


def test_a_venv_without_pip_is_made_again(tmp_path: Path) -> None:
    """A venv made while python3-venv was missing has bin/python but no pip: bootstrap makes
    it again (here the stand-in python records the request and fails)."""
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text("#!/bin/bash\necho 'No module named pip' >&2; exit 1\n")
    (venv_bin / "python").chmod(0o755)
    log = tmp_path / "python.log"
    bindir = _bin(
        tmp_path,
        {
            "python3.11": f'echo "$*" >> {log}; [ "$1" = -c ] && exit 0; exit 1',
            "apt-get": "exit 100",
            "id": "echo 0",
            "initdb": "exit 0",
            "redis-server": "exit 0",
        },
        real=("ls", "cat", "dirname", "sha256sum", "cut", "rm"),
    )
    r = _run(str(bindir), tmp_path)
    calls = log.read_text().splitlines() if log.exists() else []
    assert f"-m venv --clear {tmp_path / 'venv'}" in calls, (calls, r.stderr)
    assert r.returncode == 1
    assert "cannot create" in r.stderr
