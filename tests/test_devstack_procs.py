"""The devstack's process layer with tiny processes (``sleep``, a socket): what `up`, `status`
and `down` rely on to find, judge and stop the mesh's processes. No mesh is started."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops import procs
from ops.devstack import (
    Devstack,
    MeshPlan,
    ProcRecord,
    md_lag_health,
    process_state,
    recorded_running,
    stop_recorded,
)
from ops.natsmon import NatsMonitorCollector
from ops.procs import (
    ManagedProcess,
    PostgresServer,
    ProcessStartError,
    RedisServer,
    boot_id,
    free_ports,
    http_ok,
    pid_alive,
    pid_exists,
    proc_start_ticks,
    write_private,
)
from regions.topology import DEFAULT_TOPOLOGY, load_topology

ROOT = Path(__file__).resolve().parent.parent


def _devstack(run_dir: Path, topology_path: Path | None = None) -> Devstack:
    return Devstack(MeshPlan.free(load_topology(topology_path), run_dir))


def _sleeper(log: Path, **kw: Any) -> ManagedProcess:
    return ManagedProcess("sleeper", ["sleep", "60"], log, **kw)


def _until(cond: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.05)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


@pytest.fixture
def sleep_proc() -> Iterator[subprocess.Popen[bytes]]:
    """A process that is not ours: the mesh must never judge or signal it as one of its own."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


# ---- 1: an interrupted `up` leaves nothing running ------------------------------------------


def test_interrupted_readiness_wait_leaves_the_process_recorded(tmp_path: Path) -> None:
    """Ctrl-C while waiting for a process to be ready: it is already in state.json, so the
    teardown (or a later `meridian down`) stops it."""

    def interrupted() -> bool:
        raise KeyboardInterrupt

    ds = _devstack(tmp_path / "run")
    p = _sleeper(tmp_path / "sleeper.log", ready=interrupted)
    with pytest.raises(KeyboardInterrupt):
        ds._start(p, kind="worker")
    assert p.pid is not None and pid_exists(p.pid)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["processes"]["sleeper"]["pid"] == p.pid
    Devstack.attach(tmp_path / "run").down()
    assert not pid_exists(p.pid)


_UP_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from ops.devstack import Devstack, MeshPlan
    from regions.topology import load_topology

    async def no_streams(self):
        return None

    # only the worker phase of `up`: servers are not what this test is about
    Devstack.start_proxies = lambda self: None
    Devstack.start_nats = lambda self, regions=None: None
    Devstack._ensure_streams = no_streams

    def never_ready(ds, region):
        return [("sleeper", ["sleep", "61.5"])] if region == ds.topology.hub else []

    ds = Devstack(
        MeshPlan.free(load_topology(), Path(sys.argv[1])),
        detach=True,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    ds.up(with_pg=False, with_redis=False, workers=[never_ready])
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_during_up_stops_what_was_started(tmp_path: Path, sig: signal.Signals) -> None:
    """`meridian up` interrupted by Ctrl-C, SIGTERM or SIGHUP while a detached (setsid, no
    PDEATHSIG) process is starting: nothing is left running."""
    script = tmp_path / "up.py"
    script.write_text(_UP_SCRIPT)
    up = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
    )
    child = 0
    try:

        def sleeper_started() -> bool:
            nonlocal child
            kids = Path(f"/proc/{up.pid}/task/{up.pid}/children").read_text().split()
            child = next((int(k) for k in kids if _cmdline(int(k))[:1] == ["sleep"]), 0)
            return child > 0

        _until(sleeper_started, 20)
        time.sleep(0.3)  # inside the readiness wait
        up.send_signal(sig)
        _, err = up.communicate(timeout=30)
        assert up.returncode != 0
        assert not pid_exists(child), "the half-started process was left running"
        assert b"stopping what was started" in err, err.decode()[-2000:]
        state = json.loads((tmp_path / "run" / "state.json").read_text())
        assert state["processes"] == {}
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if child and _cmdline(child) == ["sleep", "61.5"]:
            os.kill(child, signal.SIGKILL)


# ---- 3: a pid in state.json may belong to anything after a reboot -----------------------------


def _record_of(pid: int, argv: list[str], **kw: Any) -> ProcRecord:
    return ProcRecord(name="execution-lon", pid=pid, kind="worker", region="lon", argv=argv, **kw)


def test_process_identity_is_read_from_proc() -> None:
    p = subprocess.Popen(["sleep", "60"])
    try:
        ticks = proc_start_ticks(p.pid)
        assert ticks is not None and ticks > 0
        assert ticks == proc_start_ticks(p.pid)
        assert proc_start_ticks(os.getpid()) not in (None, ticks)
        assert len(boot_id()) == 36
    finally:
        p.kill()
        p.wait()


def test_a_reused_pid_is_never_taken_for_ours(sleep_proc: subprocess.Popen[bytes]) -> None:
    """After a reboot, a recorded worker's pid runs some other python: status says dead,
    `down` leaves it alone, `up` does not refuse."""
    ours = [sys.executable, "-m", "router.execution", "--region", "lon"]
    before_reboot = _record_of(sleep_proc.pid, ours, start_ticks=1234, boot_id="0" * 36)
    older_build = _record_of(sleep_proc.pid, ours)  # no identity recorded
    for rec in (before_reboot, older_build):
        assert process_state(rec) == "dead"
        stop_recorded({rec.name: rec})
        assert sleep_proc.poll() is None, "down killed a process that is not ours"


def test_a_recorded_process_is_recognised(tmp_path: Path) -> None:
    """Our own process, by its identity (and argv), or an older build's record by full argv."""
    ds = _devstack(tmp_path / "run")
    p = _sleeper(tmp_path / "sleeper.log")
    ds._start(p, kind="worker")
    try:
        rec = Devstack.attach(tmp_path / "run").records["sleeper"]
        assert rec.boot_id == boot_id() and rec.start_ticks == proc_start_ticks(rec.pid)
        assert process_state(rec) == "up"
        assert recorded_running(tmp_path / "run") == ["sleeper"]
        assert process_state(dataclasses.replace(rec, start_ticks=rec.start_ticks + 1)) == "dead"
        assert process_state(dataclasses.replace(rec, start_ticks=0, boot_id="")) == "up"
        # the identity names the instance: a launcher that exec'd the real binary (a shim,
        # a wrapper script) changed its command line and is still ours
        assert process_state(dataclasses.replace(rec, argv=["sleep", "61"])) == "up"
        # without one (an older build's record), the full argv must match
        old = dataclasses.replace(rec, start_ticks=0, boot_id="", argv=["sleep", "61"])
        assert process_state(old) == "dead"
    finally:
        ds.down()


# ---- 4: a stopped process is not alive; stale market data is unhealthy -----------------------


def test_a_stopped_process_is_not_alive_and_still_stops(tmp_path: Path) -> None:
    ds = _devstack(tmp_path / "run")
    p = _sleeper(tmp_path / "sleeper.log")
    ds._start(p, kind="worker")
    assert p.pid is not None
    try:
        os.kill(p.pid, signal.SIGSTOP)
        _until(lambda: not pid_alive(p.pid or 0), 5)
        assert pid_exists(p.pid)
        assert ds.status()["processes"]["sleeper"]["state"] == "stopped"
        assert not ds.status()["processes"]["sleeper"]["alive"]
        os.kill(p.pid, signal.SIGCONT)
        _until(lambda: pid_alive(p.pid or 0), 5)
        os.kill(p.pid, signal.SIGSTOP)
        Devstack.attach(tmp_path / "run").down()  # a detached, stopped process
        _until(lambda: not pid_exists(p.pid or 0), 5)
    finally:
        ds.down()


def _lag_file(path: Path, *, age_s: float = 0.0, stale: dict[str, float] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    updated = time.time_ns() - int(age_s * 1e9)
    path.write_text(json.dumps({"view": "lon", "updated_ns": updated, "stale": stale or {}}))


def test_md_lag_file_decides_market_data_health(tmp_path: Path) -> None:
    f = tmp_path / "lag-lon.json"
    now = time.time_ns()
    assert not md_lag_health(f, now)["healthy"]  # no file
    _lag_file(f)
    assert md_lag_health(f, time.time_ns())["healthy"]
    _lag_file(f, stale={"sgp": 3.5})
    st = md_lag_health(f, time.time_ns())
    assert not st["healthy"] and st["stale"] == {"sgp": 3.5} and "sgp" in st["why"]
    _lag_file(f, age_s=12)  # the md service stopped writing: hung, stopped or gone
    assert not md_lag_health(f, time.time_ns())["healthy"]


def test_status_reports_stale_market_data(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ds = _devstack(run_dir)
    for code in ("lon", "nyc"):
        ds.records[f"md-{code}"] = ProcRecord(name=f"md-{code}", pid=1, kind="worker", region=code)
    _lag_file(run_dir / "md" / "lag-lon.json")
    _lag_file(run_dir / "md" / "lag-nyc.json", stale={"sgp": 2.0})
    md = ds.status()["market_data"]
    assert set(md) == {"lon", "nyc"}  # sgp runs no md service here
    assert md["lon"]["healthy"] and not md["nyc"]["healthy"]


# ---- 5: a taken port is refused before anything starts ----------------------------------------


@pytest.fixture
def foreign_redis() -> Iterator[int]:
    """A listener that answers PING like a Redis that is not ours."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(64)
                conn.sendall(b"+PONG\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield port
    finally:
        done.set()
        srv.close()


def test_redis_port_taken_by_another_process(tmp_path: Path, foreign_redis: int) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    rs = RedisServer(foreign_redis, tmp_path / "redis", tmp_path / "redis.log")
    try:
        with pytest.raises(ProcessStartError, match=f"port {foreign_redis} in use by another"):
            rs.start(5)
        assert rs.pid is None
    finally:
        rs.stop()


def test_postgres_port_taken_is_refused_before_initdb(tmp_path: Path, foreign_redis: int) -> None:
    try:
        pg = PostgresServer(tmp_path / "pg" / "data", foreign_redis, tmp_path / "pg.log")
    except procs.OpsError:
        pytest.skip("PostgreSQL server binaries not installed")
    with pytest.raises(ProcessStartError, match=f"port {foreign_redis} in use by another"):
        pg.start(5)
    assert not (tmp_path / "pg" / "data").exists()


def test_worker_port_taken(tmp_path: Path, foreign_redis: int) -> None:
    ds = _devstack(tmp_path / "run")
    with pytest.raises(ProcessStartError, match=f"port {foreign_redis} in use by another"):
        ds.start_worker("md", "lon", ["sleep", "60", "--metrics-port", str(foreign_redis)])
    assert ds.records == {}


def test_port_in_time_wait_is_free() -> None:
    """A restart right after `down` finds the ports free although connections linger."""
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    port = lst.getsockname()[1]
    assert procs.port_in_use(port)
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = lst.accept()
    conn.close()  # the server side closes first: its end stays in TIME_WAIT
    lst.close()
    time.sleep(0.05)
    cli.close()
    assert not procs.port_in_use(port)


# ---- 6: local probes never go through an HTTP proxy ----------------------------------------------


@pytest.fixture
def monitor() -> Iterator[int]:
    """An HTTP server on 127.0.0.1 answering ``{"leafs": []}`` to every GET."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"leafs": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def test_local_probes_ignore_http_proxy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, monitor: int
) -> None:
    (dead_proxy,) = free_ports(1)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{dead_proxy}")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's cached default opener
    base = f"http://127.0.0.1:{monitor}"

    assert http_ok(f"{base}/healthz")
    assert NatsMonitorCollector({"lon": base})._get(base, "/varz") == {"leafs": []}
    plan = MeshPlan.free(load_topology(), tmp_path / "run")
    plan = dataclasses.replace(
        plan, topology=plan.topology.with_ports({"lon": {"monitor_port": monitor}})
    )
    assert Devstack(plan).leafz("lon") == []


# ---- 7: the topology path in state.json ------------------------------------------------------


def test_state_records_the_topology_path_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    shutil.copy(DEFAULT_TOPOLOGY, conf / "topo.toml")
    monkeypatch.chdir(conf)
    ds = _devstack(tmp_path / "run", Path("topo.toml"))  # relative, as typed on the CLI
    ds._write_state()
    monkeypatch.chdir(tmp_path)  # `meridian status` from another directory
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["plan"]["topology_source"] == str(conf / "topo.toml")
    assert Devstack.attach(tmp_path / "run").topology.codes == ds.topology.codes


def test_down_without_a_readable_topology_stops_every_recorded_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ops.cli import main

    topo = tmp_path / "topo.toml"
    shutil.copy(DEFAULT_TOPOLOGY, topo)
    ds = _devstack(tmp_path / "run", topo)
    p = _sleeper(tmp_path / "sleeper.log")
    ds._start(p, kind="worker")
    assert p.pid is not None and p.proc is not None
    topo.unlink()  # moved, deleted or broken since `up`
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["--run-dir", str(tmp_path / "run"), "down"])
        assert exit_.value.code == 0
        p.proc.wait(5)
        assert "stopped 1 processes" in capsys.readouterr().out
        state = json.loads((tmp_path / "run" / "state.json").read_text())
        assert state["processes"] == {}
    finally:
        p.kill()


# ---- 2 (files): run dir and secret-bearing files are private ------------------------------------


def test_run_dir_and_secrets_are_private_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes: dict[str, int] = {}
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        modes[Path(dst).name] = os.stat(src).st_mode & 0o777  # before it gets its name
        real_replace(src, dst)

    monkeypatch.setattr(procs.os, "replace", replace)
    old = os.umask(0)  # the mode must not depend on a careful umask
    try:
        ds = _devstack(tmp_path / "run")
        ds._prepare_run_dir()
    finally:
        os.umask(old)
    run = tmp_path / "run"
    assert run.stat().st_mode & 0o777 == 0o700
    for name in ("state.json", "credentials.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o600, name
        assert modes[name] == 0o600, name
    assert set(json.loads((run / "credentials.json").read_text())) == set(ds.creds.passwords), (
        "credentials.json must stay loadable"
    )


def test_write_private_narrows_an_existing_file(tmp_path: Path) -> None:
    f = tmp_path / "nats.conf"
    f.write_text("old")
    f.chmod(0o644)
    write_private(f, "password: s3cret")
    assert f.stat().st_mode & 0o777 == 0o600 and f.read_text() == "password: s3cret"
    assert [p.name for p in tmp_path.iterdir()] == ["nats.conf"]


def test_a_signal_the_caller_ignores_stays_ignored_during_up() -> None:
    """`nohup ./ops/run &`: up replaced the inherited SIGHUP-ignore, and a logout tore the
    mesh being started down."""
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with procs.termination_raises():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


def test_a_mesh_is_attached_at_the_directory_asked_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`meridian --run-dir run2 up`, then `status` with an absolute path from elsewhere: the
    relative run_dir stored in state.json sent the market-data check to the wrong place."""
    monkeypatch.chdir(tmp_path)
    ds = _devstack(Path("run2"))
    ds._start(_sleeper(tmp_path / "sleeper.log"), kind="worker")
    try:
        monkeypatch.chdir("/")
        assert Devstack.attach(tmp_path / "run2").run_dir == tmp_path / "run2"
    finally:
        ds.down()
