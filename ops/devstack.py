"""The local 3-region mesh: what runs where, starting it, checking it, stopping it.

One run directory holds everything of one mesh::

    run/                  created 0700
      state.json          ports, pids and paths of every process (``meridian down`` reads it)
      credentials.json    per-role NATS passwords
      nats/<region>.conf  rendered server configs;   nats/<region>/  JetStream store dirs
      pg/                 PostgreSQL data dir;        redis/  Redis work dir
      md/lag-<region>.json  market-data lag and stale sources (the md service, every second)
      logs/               one log file per process

state.json, credentials.json and the server configs hold passwords (worker argv in the
first): they are created 0600, never widened and then narrowed.

The same :class:`Devstack` serves ``meridian up`` (fixed ports from the topology, detached
processes) and the test harness (free ports, processes that die with pytest).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from ops.linkproxy import LinkControl
from ops.procs import (
    ManagedProcess,
    NatsServer,
    OpsError,
    PostgresServer,
    RedisServer,
    boot_id,
    free_port_blocks,
    free_ports,
    http_ok,
    local_urlopen,
    pid_alive,
    pid_exists,
    proc_start_ticks,
    shared_host_gomaxprocs,
    tcp_ok,
    termination_ignored,
    termination_raises,
    write_private,
)
from regions.natsconf import (
    CLIENT_MAX_OUTSTANDING_PINGS,
    CLIENT_PING_INTERVAL_S,
    Credentials,
    ServerLayout,
    client_url,
    render_server_config,
)
from regions.topology import Topology, load_topology

HOST = "127.0.0.1"
METRICS_BLOCK = 10
"""Ports per region from metrics_port_base: workers use +0..+4, telemetry +8 and +9."""
MD_FRESH_S = 5.0
"""A region's md lag file older than this: its md service is hung, stopped or gone (it
rewrites the file every second)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshPlan:
    """Every port and path of one mesh, decided before anything starts."""

    topology: Topology
    run_dir: Path
    proxy_control_port: int
    link_ports: dict[str, int]
    """link name -> the proxy's listen port (dialers connect here)."""
    pg_port: int
    redis_port: int
    sync_always: bool = False
    pg_fsync: bool = True

    @classmethod
    def fixed(cls, topology: Topology, run_dir: Path, *, sync_always: bool = False) -> MeshPlan:
        """Ports from the topology file (``meridian up``)."""
        hub = topology.region(topology.hub)
        base = hub.leaf_port + 100
        links = {ln.name: base + i for i, ln in enumerate(topology.links)}
        return cls(
            topology=topology,
            run_dir=run_dir,
            proxy_control_port=base + 50,
            link_ports=links,
            pg_port=hub.client_port + 1100,
            redis_port=hub.client_port + 2100,
            sync_always=sync_always,
        )

    @classmethod
    def free(
        cls,
        topology: Topology,
        run_dir: Path,
        *,
        latency_scale: float = 1.0,
        pg_fsync: bool = False,
    ) -> MeshPlan:
        """Free ports everywhere (tests); latencies optionally scaled down."""
        n = len(topology.regions)
        ports = free_ports(3 * n + len(topology.links) + 3)
        # metrics ports are base + offset per worker: reserve whole blocks, away from the rest
        bases = free_port_blocks(n, METRICS_BLOCK, avoid=ports)
        it = iter(ports)
        remap = {
            r.code: {
                "client_port": next(it),
                "leaf_port": next(it),
                "monitor_port": next(it),
                "metrics_port_base": bases[i],
            }
            for i, r in enumerate(topology.regions)
        }
        topo = topology.with_ports(remap).with_latency(
            {ln.name: ln.one_way_ms * latency_scale for ln in topology.links}
        )
        links = {ln.name: next(it) for ln in topo.links}
        return cls(
            topology=topo,
            run_dir=run_dir,
            proxy_control_port=next(it),
            link_ports=links,
            pg_port=next(it),
            redis_port=next(it),
            pg_fsync=pg_fsync,
        )

    # ---- derived --------------------------------------------------------------------------
    def proxied_links(self) -> list[tuple[str, str, str]]:
        """(link name, dialer, acceptor) for every link a leaf remote uses."""
        out = []
        for dialer, acceptor in self.topology.dial_links():
            out.append((self.topology.link(dialer, acceptor).name, dialer, acceptor))
        return out

    def leaf_urls(self, region: str) -> dict[str, str]:
        return {
            acceptor: f"{HOST}:{self.link_ports[name]}"
            for name, dialer, acceptor in self.proxied_links()
            if dialer == region
        }

    def to_json(self) -> dict[str, Any]:
        source = self.topology.source
        if source != "<memory>":
            # `down` / `status` may run from another directory than `up`
            source = str(Path(source).resolve())
        return {
            "topology_source": source,
            "run_dir": str(self.run_dir.resolve()),
            "proxy_control_port": self.proxy_control_port,
            "link_ports": self.link_ports,
            "pg_port": self.pg_port,
            "redis_port": self.redis_port,
            "sync_always": self.sync_always,
            "pg_fsync": self.pg_fsync,
            "regions": {
                r.code: {
                    "client_port": r.client_port,
                    "leaf_port": r.leaf_port,
                    "monitor_port": r.monitor_port,
                    "metrics_port_base": r.metrics_port_base,
                }
                for r in self.topology.regions
            },
            "latency_ms": {ln.name: ln.one_way_ms for ln in self.topology.links},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MeshPlan:
        source = Path(data["topology_source"])
        if not source.is_absolute() and not source.exists():
            # an older state.json stored the path as given, relative to where `up` ran:
            # usually the repository root, the run directory's parent
            beside = Path(data["run_dir"]).parent / source
            source = beside if beside.exists() else source
        topo = load_topology(source)
        topo = topo.with_ports(data["regions"]).with_latency(data["latency_ms"])
        return cls(
            topology=topo,
            run_dir=Path(data["run_dir"]),
            proxy_control_port=data["proxy_control_port"],
            link_ports=data["link_ports"],
            pg_port=data["pg_port"],
            redis_port=data["redis_port"],
            sync_always=data["sync_always"],
            pg_fsync=data["pg_fsync"],
        )


@dataclass
class ProcRecord:
    name: str
    pid: int
    kind: str
    region: str = ""
    port: int = 0
    log: str = ""
    argv: list[str] = field(default_factory=list)
    start_ticks: int = 0
    """The process's start time (/proc/<pid>/stat field 22); 0 in an older state.json."""
    boot_id: str = ""
    """/proc/sys/kernel/random/boot_id when it started: a pid means nothing after a reboot."""


WorkerSpec = Callable[["Devstack", str], list[tuple[str, list[str]]]]
"""(devstack, region) -> [(service name, argv)] of the workers one region runs."""


class Devstack:
    """Starts, checks and stops one mesh."""

    def __init__(
        self,
        plan: MeshPlan,
        *,
        creds: Credentials | None = None,
        detach: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.plan = plan
        self.topology = plan.topology
        self.run_dir = plan.run_dir
        self.detach = detach
        self.progress = progress or (lambda _msg: None)
        cpath = self.run_dir / "credentials.json"
        if creds is None:
            creds = Credentials.load(cpath) if cpath.exists() else Credentials.generate()
        self.creds = creds
        self.procs: dict[str, ManagedProcess] = {}
        self.records: dict[str, ProcRecord] = {}
        self.nats: dict[str, NatsServer] = {}
        self.pg: PostgresServer | None = None
        self.redis: RedisServer | None = None

    # ---- addresses --------------------------------------------------------------------------
    def url(self, region: str, role: str = "sre") -> str:
        return client_url(HOST, self.topology.region(region).client_port, role, self.creds)

    def urls(self, region: str, role: str = "sre") -> list[str]:
        """The region's failover order: its own server first."""
        return [self.url(r, role) for r in self.topology.region(region).failover]

    @property
    def links(self) -> LinkControl:
        return LinkControl(self.plan.proxy_control_port)

    @property
    def pg_dsn(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.plan.pg_port}/meridian"

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.plan.redis_port}/0"

    def log_path(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    # ---- lifecycle --------------------------------------------------------------------------
    def up(
        self,
        *,
        with_pg: bool = True,
        with_redis: bool = True,
        workers: Sequence[WorkerSpec] = (),
        after: Callable[[Devstack], None] | None = None,
    ) -> None:
        """Start everything; on any failure, Ctrl-C, SIGTERM or SIGHUP, stop what started."""
        self._prepare_run_dir()
        try:
            with termination_raises():
                self.start_proxies()
                self.start_nats()
                self.progress("creating streams and KV buckets in every domain")
                asyncio.run(self._ensure_streams())
                if with_pg:
                    self.start_pg()
                if with_redis:
                    self.start_redis()
                for spec in workers:
                    for region in self.topology.codes:
                        for name, argv in spec(self, region):
                            self.start_worker(name, region, argv)
                if after is not None:
                    after(self)
        except BaseException as e:
            with termination_ignored():
                if isinstance(e, KeyboardInterrupt):
                    # best effort: a hung-up terminal or a closed pipe (Ctrl-C killed `tee`)
                    # makes this write fail, and nothing may keep the teardown from running
                    with contextlib.suppress(Exception):
                        self.progress(
                            f"interrupted ({str(e) or 'Ctrl-C'}): stopping what was started"
                        )
                self.down()
            raise

    def _prepare_run_dir(self) -> None:
        self._make_run_dir()
        write_private(self.run_dir / "credentials.json", self.creds.to_json())
        self._write_state()

    def _make_run_dir(self) -> None:
        # mode applies when the directory is created; an existing one is left as it is
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def wait_healthy(self, timeout_s: float, poll_s: float = 0.5) -> dict[str, Any]:
        """:meth:`status` once it is healthy, or the last one after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.status()
            if st["healthy"] or time.monotonic() >= deadline:
                return st
            time.sleep(poll_s)

    def start_proxies(self) -> None:
        from ops.linkproxy import __name__ as mod

        argv = [sys.executable, "-m", mod, "--control", str(self.plan.proxy_control_port)]
        for name, _dialer, acceptor in self.plan.proxied_links():
            target = self.topology.region(acceptor).leaf_port
            ms = next(ln.one_way_ms for ln in self.topology.links if ln.name == name)
            argv += [
                "--link",
                f"name={name},listen={self.plan.link_ports[name]},target={HOST}:{target},ms={ms}",
            ]
        self.progress("starting WAN link proxies")
        self._start(
            ManagedProcess(
                "linkproxy",
                argv,
                self.log_path("linkproxy"),
                ready=lambda: tcp_ok(HOST, self.plan.proxy_control_port),
                die_with_parent=not self.detach,
                ports=[self.plan.proxy_control_port, *self.plan.link_ports.values()],
            ),
            kind="linkproxy",
            port=self.plan.proxy_control_port,
        )

    def start_nats(self, regions: Sequence[str] | None = None) -> None:
        conf_dir = self.run_dir / "nats"
        self._make_run_dir()
        conf_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        started = []
        for code in regions or self.topology.codes:
            r = self.topology.region(code)
            layout = ServerLayout(
                store_dir=conf_dir / code,
                sync_always=self.plan.sync_always,
                leaf_urls=self.plan.leaf_urls(code),
            )
            conf = conf_dir / f"{code}.conf"
            write_private(conf, render_server_config(self.topology, code, layout, self.creds))
            self.progress(f"starting nats-server {code} (client {r.client_port})")
            srv = NatsServer(
                f"nats-{code}",
                conf,
                r.monitor_port,
                self.log_path(f"nats-{code}"),
                die_with_parent=not self.detach,
                gomaxprocs=shared_host_gomaxprocs(len(self.topology.codes)),
                ports=[r.client_port, r.monitor_port, *([r.leaf_port] if r.accepts_leaf else [])],
            )
            self._start(srv, kind="nats", region=code, port=r.client_port, timeout_s=30)
            self.nats[code] = srv
            started.append(code)
        self.wait_linked(timeout_s=30)

    def wait_linked(self, timeout_s: float = 30.0) -> None:
        """Until every spoke's leaf link to its first acceptor is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = [
                name
                for name, st in self.link_health().items()
                if st["role"] == "primary" and not st["connected"]
            ]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise OpsError(f"leaf links not up after {timeout_s:.0f} s: {missing}")
            time.sleep(0.1)

    async def _ensure_streams(self) -> None:
        from ops.streams import ensure_streams

        nc = await nats.connect(self.url(self.topology.hub), connect_timeout=5)
        try:
            await ensure_streams(nc, self.topology)
        finally:
            await nc.close()

    def start_pg(self) -> None:
        self.progress(f"starting PostgreSQL (port {self.plan.pg_port})")
        pg = PostgresServer(
            self.run_dir / "pg" / "data",
            self.plan.pg_port,
            self.log_path("postgres"),
            fsync=self.plan.pg_fsync,
            die_with_parent=not self.detach,
        )
        self._start(pg, kind="postgres", port=self.plan.pg_port, timeout_s=90)
        self.pg = pg
        import psycopg

        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname='meridian'").fetchone():
                conn.execute("CREATE DATABASE meridian")
        from ledger.migrations import migrate

        self.progress("applying ledger migrations")
        migrate(self.pg_dsn, self.topology)

    def start_redis(self) -> None:
        self.progress(f"starting Redis (port {self.plan.redis_port})")
        rs = RedisServer(
            self.plan.redis_port,
            self.run_dir / "redis",
            self.log_path("redis"),
            die_with_parent=not self.detach,
        )
        self._start(rs, kind="redis", port=self.plan.redis_port)
        self.redis = rs

    def worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MERIDIAN_RUN_DIR"] = str(self.run_dir)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start_worker(
        self, name: str, region: str, argv: list[str], ready: Callable[[], bool] | None = None
    ) -> ManagedProcess:
        """Start one worker; ready when it prints READY (after its consumers exist)."""
        full = f"{name}-{region}"
        self.progress(f"starting {full}")
        log = self.log_path(full)
        offset = log.stat().st_size if log.exists() else 0

        def printed_ready() -> bool:
            with log.open("rb") as f:
                f.seek(offset)
                return b"READY" in f.read()

        port = 0
        for flag in ("--metrics-port", "--port"):
            if flag in argv:
                port = int(argv[argv.index(flag) + 1])
        if any(a.startswith("--web.listen-address=") for a in argv):
            port = int(
                next(a for a in argv if a.startswith("--web.listen-address=")).rsplit(":", 1)[1]
            )
        p = ManagedProcess(
            full,
            argv,
            log,
            ready=ready or printed_ready,
            env=self.worker_env(),
            die_with_parent=not self.detach,
            ports=[port],
        )
        self._start(p, kind="worker", region=region, port=port, timeout_s=60)
        return p

    def restart_worker(self, name: str) -> ManagedProcess:
        """Start a stopped or killed worker again with the same command line."""
        rec = self.records[name]
        old = self.procs.pop(name, None)
        if old is not None:
            old.kill()
        service = name[: -len(rec.region) - 1]
        return self.start_worker(service, rec.region, rec.argv)

    def _start(
        self,
        p: ManagedProcess,
        *,
        kind: str,
        region: str = "",
        port: int = 0,
        timeout_s: float = 30.0,
    ) -> None:
        def record(p: ManagedProcess) -> None:
            # before the readiness wait: an interrupted `up` (or a later `down`) must find it
            assert p.pid is not None
            self.procs[p.name] = p
            self.records[p.name] = ProcRecord(
                name=p.name,
                pid=p.pid,
                kind=kind,
                region=region,
                port=port,
                log=str(p.log),
                argv=p.argv,
                start_ticks=p.start_ticks or 0,
                boot_id=p.boot_id,
            )
            self._write_state()

        p.start(timeout_s, on_spawn=record)

    def stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None:
            p.stop()
        self.records.pop(name, None)
        self._write_state()

    def down(self) -> None:
        """Stop every process of this mesh, workers first, servers last."""
        stop_recorded(self.records, self.procs)
        self.procs.clear()
        self.records.clear()
        self._write_state()

    # ---- state ---------------------------------------------------------------------------------
    def _write_state(self) -> None:
        self._make_run_dir()
        state = {
            "plan": self.plan.to_json(),
            "processes": {n: dataclasses.asdict(r) for n, r in self.records.items()},
        }
        write_private(self.run_dir / "state.json", json.dumps(state, indent=1))

    @classmethod
    def attach(cls, run_dir: Path) -> Devstack:
        """The mesh described by ``run_dir/state.json`` (for down/status/link commands).

        Raises OpsError without a state file, TopologyError when its topology file cannot be
        read (:func:`down_recorded` stops the processes without it)."""
        state = _read_state(run_dir)
        plan = MeshPlan.from_json(state["plan"])
        # the directory asked about, not the one stored (relative to wherever `up` ran)
        ds = cls(dataclasses.replace(plan, run_dir=Path(run_dir)))
        ds.records = _records(state)
        return ds

    # ---- health ---------------------------------------------------------------------------------
    def leafz(self, region: str) -> list[dict[str, Any]]:
        port = self.topology.region(region).monitor_port
        with local_urlopen(f"http://{HOST}:{port}/leafz", timeout_s=1) as r:
            leafs: list[dict[str, Any]] = json.load(r).get("leafs") or []
            return leafs

    def link_health(self) -> dict[str, dict[str, Any]]:
        """Per proxied link: is a leaf connection up across it, and should one be?

        A spoke must be linked through exactly one of its dial targets. After a failover it
        stays on its standby target (nats-server never returns to the first URL by itself):
        that is healthy but reported as ``failover`` because traffic to the hub now pays the
        longer path.
        """
        out: dict[str, dict[str, Any]] = {}
        leafs_by_dialer: dict[str, list[dict[str, Any]]] = {}
        for name, dialer, acceptor in self.plan.proxied_links():
            if dialer not in leafs_by_dialer:
                try:
                    leafs_by_dialer[dialer] = self.leafz(dialer)
                except Exception:
                    leafs_by_dialer[dialer] = []
            leafs = leafs_by_dialer[dialer]
            connected = any(str(lf.get("port")) == str(self.plan.link_ports[name]) for lf in leafs)
            primary = self.topology.region(dialer).leaf_dial[0] == acceptor
            out[name] = {
                "dialer": dialer,
                "acceptor": acceptor,
                "connected": connected,
                "role": "primary" if primary else "standby",
            }
        for st in out.values():
            siblings = [v for v in out.values() if v["dialer"] == st["dialer"]]
            linked_any = any(v["connected"] for v in siblings)
            st["dialer_linked"] = linked_any
            # expected: the link that should carry traffic now
            st["expected"] = st["role"] == "primary" and not linked_any
            if st["connected"]:
                st["state"] = "active" if st["role"] == "primary" else "failover"
            else:
                st["state"] = "standby" if linked_any else "down"
        return out

    def status(self) -> dict[str, Any]:
        regions = {}
        for r in self.topology.regions:
            mon = f"http://{HOST}:{r.monitor_port}"
            regions[r.code] = {
                "server": http_ok(f"{mon}/healthz"),
                "jetstream": http_ok(f"{mon}/healthz?js-enabled-only=true"),
                "client_port": r.client_port,
                "monitor_port": r.monitor_port,
            }
        try:
            proxy = {s["link"]: s for s in self.links.status()}
        except OSError:
            proxy = {}
        links = {}
        for name, st in self.link_health().items():
            p = proxy.get(name, {})
            state = p.get("state", "proxy down")
            healthy = state == "up" and st["dialer_linked"]
            links[name] = {
                **st,
                "proxy": state,
                "one_way_ms": p.get("one_way_ms"),
                "healthy": healthy,
            }
        procs = {}
        for n, rec in self.records.items():
            state = process_state(rec)
            procs[n] = {
                "kind": rec.kind,
                "region": rec.region,
                "pid": rec.pid,
                "port": rec.port,
                "state": state,
                "alive": state == "up",
            }
        md = self.market_data_health()
        healthy = (
            all(v["server"] and v["jetstream"] for v in regions.values())
            and all(v["healthy"] for v in links.values())
            and all(v["alive"] for v in procs.values())
            and all(v["healthy"] for v in md.values())
        )
        return {
            "healthy": healthy,
            "regions": regions,
            "links": links,
            "processes": procs,
            "market_data": md,
            "run_dir": str(self.run_dir),
        }

    def market_data_health(self) -> dict[str, dict[str, Any]]:
        """Per region whose md service this mesh runs: is its view of every source live?"""
        now_ns = time.time_ns()
        return {
            code: md_lag_health(self.run_dir / "md" / f"lag-{code}.json", now_ns)
            for code in self.topology.codes
            if f"md-{code}" in self.records
        }

    # ---- clients ---------------------------------------------------------------------------------
    async def connect(self, region: str, role: str = "sre", **kw: Any) -> NATS:
        """A nats-py client with the mesh's failover order and fast dead-peer detection."""
        return await connect(self.urls(region, role), name=kw.pop("name", f"{role}@{region}"), **kw)


async def connect(servers: list[str], **kw: Any) -> NATS:
    opts: dict[str, Any] = {
        "connect_timeout": 2,
        "ping_interval": CLIENT_PING_INTERVAL_S,
        "max_outstanding_pings": CLIENT_MAX_OUTSTANDING_PINGS,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.25,
        "dont_randomize": True,
        "allow_reconnect": True,
        "pending_size": 64 * 1024 * 1024,
    }
    opts.update(kw)
    return await nats.connect(servers=servers, **opts)


def md_lag_health(path: Path, now_ns: int, fresh_s: float = MD_FRESH_S) -> dict[str, Any]:
    """A region's market-data health from its md service's lag file (written every second:
    ``updated_ns``, and ``stale``: source region -> seconds silent)."""
    try:
        data = json.loads(path.read_text())
        updated_ns = int(data.get("updated_ns") or path.stat().st_mtime_ns)
        stale = {str(k): float(v) for k, v in (data.get("stale") or {}).items()}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return {"healthy": False, "age_s": None, "stale": {}, "why": f"no lag file ({e})"}
    age_s = max(0.0, (now_ns - updated_ns) / 1e9)
    why = ""
    if age_s > fresh_s:
        why = f"lag file {age_s:.0f} s old (md service hung or stopped)"
    elif stale:
        why = "stale: " + ", ".join(f"{k} silent {v:.1f} s" for k, v in sorted(stale.items()))
    return {"healthy": not why, "age_s": round(age_s, 1), "stale": stale, "why": why}


def process_state(rec: ProcRecord) -> str:
    """``up``; ``stopped`` (ours, but stopped or traced: it answers nothing); or ``dead``
    (gone, or the pid now belongs to another program)."""
    if not _same_process(rec):
        return "dead"
    return "up" if pid_alive(rec.pid) else "stopped"


def _same_process(rec: ProcRecord) -> bool:
    """The recorded pid still is the process we started (it may be stopped).

    After a reboot or a pid wrap-around the pid may belong to anything (the machine's own
    PostgreSQL, any python): the start time and boot id recorded at launch must match, and
    that identifies the process instance. A record of an older build has neither: its full
    argv must match.
    """
    if not pid_exists(rec.pid):
        return False
    identity = (rec.boot_id, rec.start_ticks)
    if all(identity):
        # one boot, one start time: that process instance and no other, whatever its command
        # line says now (a launcher that execs the real binary, a server renaming itself)
        return identity == (boot_id(), proc_start_ticks(rec.pid))
    try:
        cmdline = Path(f"/proc/{rec.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    while cmdline and not cmdline[-1]:
        cmdline.pop()
    if [a.decode(errors="replace") for a in cmdline] == rec.argv:
        return True
    # a server that rewrote its process title (redis: "redis-server 127.0.0.1:PORT"): the
    # title must name the program and our port
    title = cmdline[0].decode(errors="replace").split() if len(cmdline) == 1 else []
    return (
        bool(rec.argv)
        and rec.port > 0
        and len(title) >= 2
        and Path(title[0]).name == Path(rec.argv[0]).name
        and title[1] == f"{HOST}:{rec.port}"
    )


def _read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "state.json"
    if not path.exists():
        raise OpsError(f"no mesh state in {run_dir} (is it up? `meridian up`)")
    state: dict[str, Any] = json.loads(path.read_text())
    return state


def _records(state: Mapping[str, Any]) -> dict[str, ProcRecord]:
    fields = {f.name for f in dataclasses.fields(ProcRecord)}
    return {
        n: ProcRecord(**{k: v for k, v in r.items() if k in fields})
        for n, r in state["processes"].items()
    }


_STOP_ORDER = {"worker": 0, "linkproxy": 1, "nats": 2, "redis": 3, "postgres": 4}


def stop_recorded(
    records: Mapping[str, ProcRecord], procs: Mapping[str, ManagedProcess] | None = None
) -> None:
    """Stop recorded processes, workers first, servers last; ``procs``: those this Python
    process started itself (the others are detached, from an earlier `meridian up`)."""
    procs = procs or {}
    for name in sorted(records, key=lambda n: _STOP_ORDER.get(records[n].kind, 0)):
        p = procs.get(name)
        if p is None:
            rec = records[name]
            p = ManagedProcess(name, rec.argv, Path(rec.log))
            p.pid = rec.pid if _same_process(rec) else None
            if rec.kind == "postgres":
                p.stop_signal = 2  # SIGINT: fast shutdown
        p.stop()


def recorded_running(run_dir: Path) -> list[str]:
    """Names of the processes in ``run_dir/state.json`` that still run (or are stopped);
    needs no topology."""
    try:
        records = _records(_read_state(run_dir))
    except OpsError:
        return []
    return [n for n, r in records.items() if _same_process(r)]


def down_recorded(run_dir: Path) -> int:
    """Stop every process in ``run_dir/state.json`` from the records alone (when the
    topology file is gone or broken): the number of records."""
    state = _read_state(run_dir)
    records = _records(state)
    stop_recorded(records)
    state["processes"] = {}
    write_private(run_dir / "state.json", json.dumps(state, indent=1))
    return len(records)
