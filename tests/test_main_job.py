"""The main job end to end through the CLI: up, status, a short demo session whose ledger is
exported and verified, an order's history, down with no process left behind (issue 6)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ops.procs import pid_alive

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def meridian(run_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "--run-dir", str(run_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "MERIDIAN_RUN_DIR": str(run_dir)},
    )


def test_up_demo_verify_history_down() -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="meridian-main-", dir="/tmp"))
    run_dir.chmod(0o755)
    pids: list[int] = []
    try:
        up = meridian(run_dir, "up", "--free-ports")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "mesh HEALTHY" in up.stdout
        state = json.loads((run_dir / "state.json").read_text())
        pids = [p["pid"] for p in state["processes"].values()]
        kinds = {p["name"].rsplit("-", 1)[0] for p in state["processes"].values()}
        assert {
            "nats",
            "gateway",
            "risk",
            "execution",
            "ledger",
            "md",
            "postgres",
            "redis",
            "linkproxy",
        } <= kinds

        st = meridian(run_dir, "status", "--json")
        assert st.returncode == 0, st.stdout + st.stderr
        status = json.loads(st.stdout)
        assert status["healthy"] and len(status["regions"]) == 3

        demo = meridian(run_dir, "demo", "--seconds", "10", "--rate", "120")
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        line = next(ln for ln in demo.stdout.splitlines() if ln.startswith("ledger "))
        m = re.match(
            r"ledger verified: (\d+) transfers, \d+ postings, 0 imbalances, "
            r"3 chains intact",
            line,
        )
        assert m, line
        assert int(m.group(1)) > 0, "the session produced no trades"
        assert "risk rejects by reason" in demo.stdout
        # each desk's first account stores its orders itself, the others use the gateway
        assert "\ngateway (through the gateway): " in demo.stdout, demo.stdout[-2000:]
        assert "\ndirect  (stored by the desk in ORDERS): " in demo.stdout, demo.stdout[-2000:]
        assert (run_dir / "export" / "manifest.json").exists()

        # compliance: a traded order's history spans entry, risk, execution and ledger
        new = meridian(
            run_dir,
            "order",
            "new",
            "--region",
            "lon",
            "--account",
            "LON-HF-01",
            "--direct",  # stored in ORDERS by the CLI itself: history finds it all the same
            "sell",
            "1000000",
            "EURUSD",
            "1.00000",
            "--tif",
            "IOC",
            "--cl-ord-id",
            "hist-1",
        )
        assert new.returncode == 0, new.stdout + new.stderr
        assert "ACK" in new.stdout
        hist = meridian(run_dir, "order", "history", "hist-1", "--account", "LON-HF-01")
        assert hist.returncode in (0, 1), hist.stderr
        assert "ORDERS" in hist.stdout or "PRICE_COLLAR" in hist.stdout, hist.stdout

        # isolate sgp (both of its links): status must say so with a non-zero exit
        for link in ("lon-sgp", "nyc-sgp"):
            cut = meridian(run_dir, "link", "cut", link)
            assert cut.returncode == 0 and "cut" in cut.stdout
        time.sleep(1.0)
        bad = meridian(run_dir, "status")
        assert bad.returncode == 1 and "UNHEALTHY" in bad.stdout, bad.stdout
        for link in ("lon-sgp", "nyc-sgp"):
            assert meridian(run_dir, "link", "restore", link).returncode == 0
    finally:
        down = meridian(run_dir, "down")
        assert down.returncode == 0, down.stderr
    assert not [p for p in pids if pid_alive(p)], "processes left behind by `down`"
