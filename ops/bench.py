"""``meridian bench``: how fast the mesh is, and how close to this machine's raw limits.

One run measures, on a private mesh (free ports, real WAN latencies, PostgreSQL, Redis):

1. raw ceilings of the machine: JetStream publish with pipelined acks (default flush and
   fsync-always), core NATS request/reply round trip, PostgreSQL binary COPY of posting rows,
   single-core Python speed, and the floor of the order path's shape (bare hops with no logic,
   :mod:`ops.skeleton`);
2. the order path within one region at 1,000 orders/s offered: submit -> ack and submit ->
   first execution report (order-to-execution), p50/p99/p99.9/max;
3. an offered-load sweep (where latency bends) and the max sustainable rate, closed loop, for
   one region and for all three together (one load process per region);
4. fill -> ledger commit latency (from the ledger's own timestamps);
5. the same order-path points with tracing off (the overhead of tracing), each 1,000/s point
   split by hop from the timestamps the mesh records (:mod:`ops.hopsplit`); then the same
   1,000/s point with desks storing their orders in ORDERS themselves (direct entry, on the
   mesh in the same state), and (full run only) direct entry's maxima at the end;
6. (full run only) a steady state: a closed loop fills the books and risk's memory, then
   60 s at 1,000/s, with the full GC collections of the workers in that window;
7. market data: quotes/s one region publishes and replicates to the two others, with lag.

Writes ``<out>/bench-<time>.json`` and ``.md`` and prints the ratios to the raw ceilings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import psycopg
from hdrh.histogram import HdrHistogram
from nats.js.api import StreamConfig

from ops import hopsplit
from ops.devstack import Devstack, MeshPlan
from ops.loadgen import pct, run_load, seed_top_of_book
from ops.procs import (
    NatsServer,
    PostgresServer,
    free_ports,
    local_urlopen,
    nats_server_binary,
    standalone_jetstream,
)
from ops.skeleton import SHAPES, measure_shape
from regions.topology import load_topology
from router.natsutil import AsyncPublisher

BENCH_LIMITS = {
    "collar_bps": 150,
    "restricted_symbols": [],
    "rate": {"orders_per_s": 1_000_000, "burst": 1_000_000},
    "default_account": {"credit_limit_usd": 10**15},
    "default_instrument": {"max_qty": 10**9, "max_notional_usd": 10**13},
}


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- raw ceilings --------------------------------------------------------------------------------


async def raw_js_publish(tmp: Path, *, n: int, sync_always: bool) -> dict[str, Any]:
    d = tmp / ("js-sync" if sync_always else "js")
    srv, url = standalone_jetstream("bench-js", d, sync_always=sync_always)
    try:
        nc = await nats.connect(url)
        await nc.jetstream().add_stream(StreamConfig(name="RAW", subjects=["raw.>"]))
        pub = await AsyncPublisher(nc, max_pending=1024).start()
        payload = b"x" * 200
        t0 = time.perf_counter()
        futs = []
        for i in range(n):
            futs.append(await pub.publish(f"raw.{i % 16}", payload))
        await asyncio.gather(*futs)
        dt = time.perf_counter() - t0
        await nc.close()
        return {"msgs": n, "seconds": round(dt, 3), "msgs_per_s": round(n / dt)}
    finally:
        srv.stop()


_RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def cb(m): await m.respond(m.data)
    await nc.subscribe("rr.echo", cb=cb)
    await nc.flush(); print("READY", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def raw_request_reply(tmp: Path, *, n: int) -> dict[str, Any]:
    port, mon = free_ports(2)
    conf = tmp / "rr.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\nhttp: "127.0.0.1:{mon}"\n')
    srv = NatsServer("bench-rr", conf, mon, tmp / "rr.log").start()
    resp = subprocess.Popen(
        [sys.executable, "-c", _RESPONDER, f"nats://127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert resp.stdout is not None
        resp.stdout.readline()
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        h = HdrHistogram(1, 10_000_000, 3)
        for _ in range(200):
            await nc.request("rr.echo", b"x" * 200, timeout=2)
        for _ in range(n):
            t0 = time.perf_counter_ns()
            await nc.request("rr.echo", b"x" * 200, timeout=2)
            h.record_value(max(1, (time.perf_counter_ns() - t0) // 1000))
        await nc.close()
        return {"requests": n, **pct(h)}
    finally:
        resp.kill()
        srv.stop()


def raw_python_book(*, pairs: int) -> dict[str, Any]:
    """Single-core Python speed of this machine today: crossing pairs through the pure order
    book (no I/O). Every worker's own code scales with it, so runs on differently loaded or
    differently fast machines (a shared VM varies by 2-3x between days) compare through it."""
    from regions.topology import load_topology
    from router.book import OrderBook, Submit
    from router.contract import OrdType, Side, TimeInForce

    book = OrderBook(load_topology().instrument("EURUSD"), "lon")
    cmds = []
    for i in range(pairs):
        for side, acct in ((Side.BUY, "A"), (Side.SELL, "B")):
            cmds.append(
                Submit(
                    order_id=f"o{i}{side}",
                    cl_ord_id=f"c{i}{side}",
                    account=acct,
                    home_region="lon",
                    side=side,
                    ord_type=OrdType.LIMIT,
                    tif=TimeInForce.GTC,
                    qty=1_000_000,
                    price_ticks=108450,
                )
            )
    t0 = time.perf_counter()
    for seq, cmd in enumerate(cmds, 1):
        book.apply(cmd, seq=seq, ts_ns=seq)
    dt = time.perf_counter() - t0
    return {"commands": len(cmds), "seconds": round(dt, 3), "commands_per_s": int(len(cmds) / dt)}


def raw_pg_copy(tmp: Path, *, rows: int) -> dict[str, Any]:
    (port,) = free_ports(1)
    d = tmp / "pgraw"
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)
    pg = PostgresServer(d / "data", port, d / "pg.log", fsync=True).start()
    try:
        with psycopg.connect(pg.dsn()) as conn:
            conn.execute(
                "CREATE TABLE p (region text, id bigint, transfer_id text, "
                "account text, currency text, amount bigint, recorded_ns bigint, "
                "hash bytea)"
            )
            conn.commit()
            t0 = time.perf_counter()
            batch = 1000
            for start in range(0, rows, batch):
                with conn.cursor() as cur, cur.copy("COPY p FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(["text", "int8", "text", "text", "text", "int8", "int8", "bytea"])
                    for i in range(start, min(rows, start + batch)):
                        cp.write_row(
                            (
                                "lon",
                                i,
                                f"T-lon-EURUSD-{i}:base",
                                "LON-HF-01",
                                "EUR",
                                1_000_000,
                                time.time_ns(),
                                b"\x00" * 32,
                            )
                        )
                conn.commit()
            dt = time.perf_counter() - t0
        return {
            "rows": rows,
            "seconds": round(dt, 3),
            "rows_per_s": round(rows / dt),
            "fsync": True,
            "rows_per_txn": 1000,
        }
    finally:
        pg.stop()


# ---- the mesh ------------------------------------------------------------------------------------


async def _set_limits(ds: Devstack) -> None:
    from router.control import set_limits

    res = await set_limits(lambda r: ds.connect(r), ds.topology, BENCH_LIMITS)
    assert all(v == "ok" for v in res.values()), res
    await asyncio.sleep(1.0)


def start_bench_mesh(tmp: Path) -> Devstack:
    from ops.services import ledger_workers, order_path_workers

    run_dir = tmp / "mesh"
    plan = MeshPlan.free(load_topology(), run_dir, latency_scale=1.0, pg_fsync=True)
    ds = Devstack(plan, progress=lambda m: say(m))
    try:
        ds.up(with_pg=True, with_redis=True, workers=(order_path_workers, ledger_workers))
        seed_top_of_book(ds.redis_url, ds.topology)
        asyncio.run(_set_limits(ds))
    except BaseException:
        ds.down()  # nothing of a half-started mesh is left running
        raise
    return ds


def _stat(pid: int | str) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1].split()


def cpu_seconds(ds: Devstack) -> dict[str, float]:
    """User+system CPU seconds of every process of the mesh (from /proc). PostgreSQL counts
    its backends too: the live ones, and through the postmaster's children's time the ones
    that ended (a ledger writer's work is mostly in its backend)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, p in ds.procs.items():
        if p.pid is None:
            continue
        try:
            t = _stat(p.pid)
            out[name] = (int(t[11]) + int(t[12])) / tick
            rec = ds.records.get(name)
            if rec is not None and rec.kind == "postgres":
                out[name] += (int(t[13]) + int(t[14])) / tick + _children_cpu_s(p.pid)
        except (OSError, IndexError, ValueError):
            continue
    return out


def _children_cpu_s(ppid: int) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            t = _stat(pid)
            if int(t[1]) == ppid:
                total += (int(t[11]) + int(t[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def cpu_us_per_order(
    c0: dict[str, float], c1: dict[str, float], desk_s: float, n: int
) -> dict[str, float]:
    """CPU microseconds per order of every mesh process between two :func:`cpu_seconds`, and
    of the desk (the measuring process's own ``desk_s``), largest first."""
    per = {k: round((c1[k] - c0.get(k, 0.0)) / max(1, n) * 1e6, 1) for k in c1}
    per["loadgen (desk)"] = round(desk_s / max(1, n) * 1e6, 1)
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def context_switches(ds: Devstack) -> dict[str, int]:
    """Voluntary + involuntary context switches of every thread of every mesh process.

    On a shared 2-core machine each wakeup costs far more than the work it carries (cold
    caches, the Go scheduler handing work between threads): switches per order explain why
    the CPU per order falls as the load rises and batches grow.
    """
    out = {}
    for name, p in ds.procs.items():
        total = 0
        try:
            for tid in os.listdir(f"/proc/{p.pid}/task"):
                with open(f"/proc/{p.pid}/task/{tid}/status") as f:
                    total += sum(int(ln.split()[1]) for ln in f if "ctxt_switches" in ln)
        except (OSError, ValueError, IndexError):
            continue
        out[name] = total
    return out


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def restart_order_path(ds: Devstack, *, tracing: bool) -> None:
    """Restart gateways, risk and execution workers with tracing on or off (a no-op when
    they already run that way: each restart of the nine costs about a second on 2 cores)."""
    from ops.telemetry.tracing import tracing_enabled_from_env

    if tracing_enabled_from_env() == tracing and ds.procs.get("gateway-lon") is not None:
        return
    os.environ["MERIDIAN_TRACING"] = "on" if tracing else "off"
    for name in [
        n for n in list(ds.records) if n.split("-")[0] in ("gateway", "risk", "execution")
    ]:
        ds.procs[name].stop()
        ds.restart_worker(name)


def subprocess_load(
    ds: Devstack,
    regions: list[str],
    *,
    seconds: float,
    inflight: int,
    run_id: str,
    window: str = "ack",
    entry: str = "gateway",
) -> list[dict[str, Any]]:
    procs = []
    for r in regions:
        argv = [
            sys.executable,
            "-m",
            "ops.loadgen",
            "--entry",
            entry,
            "--region",
            r,
            "--seconds",
            str(seconds),
            "--inflight",
            str(inflight),
            "--window",
            window,
            "--run-id",
            f"{run_id}{r}",
            "--topology",
            ds.topology.source,
        ]
        for u in ds.urls(r, "desk"):
            argv += ["--nats-url", u]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=seconds + 60)
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def ledger_lag(ds: Devstack, since_ns: int, until_ns: int | None = None) -> dict[str, Any]:
    """Fill (matching time) -> ledger commit (recorded time), from the ledger's rows."""
    h = HdrHistogram(1, 600_000_000, 3)
    with psycopg.connect(ds.pg_dsn) as conn:
        rows = conn.execute(
            "SELECT recorded_ns - transact_ns FROM transfers WHERE transact_ns >= %s "
            "AND transact_ns < %s",
            (since_ns, until_ns or 2**62),
        ).fetchall()
    for (d,) in rows:
        h.record_value(max(1, int(d) // 1000))
    return {"transfers": len(rows), **pct(h)}


async def _in_process(
    ds: Devstack,
    region: str,
    *,
    seconds: float,
    rate: float | None,
    run_id: str,
    inflight: int = 256,
    timeline: dict[str, tuple[int, int, int, int]] | None = None,
    entry: str = "gateway",
) -> dict[str, Any]:
    return await run_load(
        ds.urls(region, "desk"),
        ds.topology,
        region,
        run_id=run_id,
        seconds=seconds,
        rate=rate,
        inflight=inflight,
        timeline=timeline,
        entry=entry,
    )


async def _stream_seqs(ds: Devstack, region: str) -> dict[str, int]:
    nc = await ds.connect(region)
    try:
        return await hopsplit.last_seqs(nc.jetstream(domain=region))
    finally:
        await nc.close()


async def _hop_split(
    ds: Devstack,
    region: str,
    after: dict[str, int],
    timeline: dict[str, tuple[int, int, int, int]],
) -> dict[str, Any]:
    nc = await ds.connect(region)
    try:
        js = nc.jetstream(domain=region)
        stamps: dict[str, int] = {}
        stored = {
            s: await hopsplit.stored_ns(js, s, seq, stamps=stamps if s == "ORDERS" else None)
            for s, seq in after.items()
        }
    finally:
        await nc.close()
    # the gateway's accept time (reports carry the stored time): direct entries have none
    timeline = {cl: (t[0], stamps.get(cl, t[1]), t[2], t[3]) for cl, t in timeline.items()}
    return hopsplit.split(timeline, stored)


async def _backlog(ds: Devstack) -> int:
    """Messages the order path and the ledger have not finished, over every region."""
    from router import subjects

    nc = await ds.connect(ds.topology.hub)
    total = 0
    try:
        for r in ds.topology.codes:
            js = nc.jetstream(domain=r)
            for stream, durable in (
                ("ORDERS", subjects.durable_risk(r)),
                ("EXEC", subjects.durable_exec(r)),
                ("EXECOUT", subjects.durable_ledger(r)),
            ):
                with contextlib.suppress(Exception):
                    ci = await js.consumer_info(stream, durable)
                    total += ci.num_pending + ci.num_ack_pending
    finally:
        await nc.close()
    return total


def wait_idle(ds: Devstack, timeout_s: float = 180.0) -> float:
    """Until every backlog is drained, so one measurement never pays for the last one."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        left = asyncio.run(_backlog(ds))
        if left == 0:
            return time.monotonic() - t0
        time.sleep(0.5)
    say(f"backlog not drained after {timeout_s:.0f} s; measuring anyway")
    return time.monotonic() - t0


def run_mesh_benchmarks(ds: Devstack, quick: bool) -> dict[str, Any]:
    res: dict[str, Any] = {}
    dur = 3.0 if quick else 10.0
    step = 2.5 if quick else 6.0
    sweep = (
        [250, 1000, 2000, 3000]
        if quick
        else [250, 500, 750, 1000, 1500, 2000, 2500, 3000, 4000, 6000]
    )
    direct: dict[str, Any] = {}
    for tracing in (True, False):
        tag = "on" if tracing else "off"
        restart_order_path(ds, tracing=tracing)
        asyncio.run(_set_limits(ds))
        wait_idle(ds)
        say(f"tracing {tag}: lon, 1,000 orders/s offered for {dur:.0f} s")
        point = latency_point(ds, seconds=dur, rate=1000, run_id=f"l1k{tag}", split=True)
        time.sleep(1.0)
        if not tracing:
            # direct entry's points on the same state of the mesh as the gateway's just
            # measured (after the same closed loop of the tracing-on pass), before this
            # pass's closed loop and the steady state fill books and memory further
            direct = direct_latency(ds, dur, quick)
        say(f"tracing {tag}: max sustainable, one region (closed loop) for {dur:.0f} s")
        point["max_one_region"] = max_one_region(ds, dur, run_id=f"m1{tag}")
        res["tracing_" + tag] = point
    # the rest runs with tracing off (the workers were restarted that way last)
    res["sweep"] = []
    for rate in sweep:
        say(f"sweep (tracing off): {rate} orders/s offered for {step:.0f} s")
        pt = asyncio.run(_in_process(ds, "lon", seconds=step, rate=rate, run_id=f"s{rate}"))
        res["sweep"].append(pt)
        wait_idle(ds)
        if pt["completed_per_s"] < 0.9 * rate:
            say(
                f"sweep: {pt['completed_per_s']:.0f}/s executed of {rate}/s offered: "
                "past the knee, stopping"
            )
            break
    if not quick:
        res["steady"] = steady_state(ds, fill_s=30.0, seconds=60.0)
    say(f"max sustainable, three regions at once (tracing off) for {dur:.0f} s")
    res["max_three_regions"] = max_three_regions(ds, dur, run_id="m3")
    if not quick:  # quick: the latency point only (the bench must stay under 2 minutes)
        direct.update(direct_max(ds, dur))
    res["direct"] = direct
    return res


def latency_point(
    ds: Devstack,
    *,
    seconds: float,
    rate: float,
    run_id: str,
    entry: str = "gateway",
    split: bool = False,
) -> dict[str, Any]:
    """One open-loop point of the lon desk (lon symbols), then the mesh drained: latency,
    CPU per executed order by process, the machine's busy cores and context switches, the
    fill -> ledger lag, and (``split``) where an order's time went (:mod:`ops.hopsplit`).
    The keys are the bench's result file's (``..._1000`` for the 1,000/s points)."""
    seqs = asyncio.run(_stream_seqs(ds, "lon")) if split else {}
    timeline: dict[str, tuple[int, int, int, int]] = {}
    c0, me0, t0_ns = cpu_seconds(ds), time.process_time(), time.time_ns()
    s0, b0 = context_switches(ds), machine_busy_s()
    lat = asyncio.run(
        _in_process(
            ds,
            "lon",
            seconds=seconds,
            rate=rate,
            run_id=run_id,
            entry=entry,
            timeline=timeline if split else None,
        )
    )
    c1, me1, t1_ns = cpu_seconds(ds), time.process_time(), time.time_ns()
    s1, b1 = context_switches(ds), machine_busy_s()
    n = max(1, lat["completed"])
    switches = {k: round((s1[k] - s0.get(k, 0)) / n, 1) for k in s1}
    wait_idle(ds)
    point = {
        "latency_1000": lat,
        "cpu_us_per_order_1000": cpu_us_per_order(c0, c1, me1 - me0, n),
        "machine_busy_us_per_order_1000": round((b1 - b0) / n * 1e6, 1),
        "machine_busy_cores_1000": round((b1 - b0) / ((t1_ns - t0_ns) / 1e9), 2),
        "switches_per_order_1000": dict(sorted(switches.items(), key=lambda kv: -kv[1])),
        "fill_to_ledger_1000": ledger_lag(ds, t0_ns, t1_ns),
    }
    if split:
        point["hop_split_1000"] = asyncio.run(_hop_split(ds, "lon", seqs, timeline))
    return point


def max_one_region(ds: Devstack, dur: float, *, run_id: str, entry: str = "gateway") -> Any:
    """lon's closed-loop maximum (256 in flight), then the mesh drained."""
    out = subprocess_load(ds, ["lon"], seconds=dur, inflight=256, run_id=run_id, entry=entry)[0]
    wait_idle(ds)
    return out


def max_three_regions(
    ds: Devstack, dur: float, *, run_id: str, entry: str = "gateway"
) -> dict[str, Any]:
    """Every region's closed loop at once (128 in flight each), then the mesh drained."""
    three = subprocess_load(
        ds, list(ds.topology.codes), seconds=dur, inflight=128, run_id=run_id, entry=entry
    )
    wait_idle(ds)
    return {
        "per_region": three,
        "completed_per_s": round(sum(x["completed_per_s"] for x in three), 1),
        "acked_per_s": round(sum(x["acked_per_s"] for x in three), 1),
    }


def direct_latency(ds: Devstack, dur: float, quick: bool) -> dict[str, Any]:
    """The 1,000/s points with desks storing their orders in ORDERS themselves (direct
    entry, contract.md): no gateway hop. Tracing off; the gateways stay up, idle. The first
    point's CPU, busy cores and hop split are kept."""
    out: dict[str, Any] = {"latency_1000": []}
    for i in range(1 if quick else 2):
        say(f"direct entry: lon, 1,000 orders/s offered for {dur:.0f} s ({i + 1})")
        pt = latency_point(
            ds, seconds=dur, rate=1000, run_id=f"d1k{i}", entry="direct", split=i == 0
        )
        out["latency_1000"].append(pt.pop("latency_1000"))
        if i == 0:
            out.update(pt)
    return out


def direct_max(ds: Devstack, dur: float) -> dict[str, Any]:
    """Direct entry's closed-loop maxima, one region and three at once."""
    say(f"direct entry: max sustainable, one region (closed loop) for {dur:.0f} s")
    one = max_one_region(ds, dur, run_id="dm1", entry="direct")
    say(f"direct entry: max sustainable, three regions at once for {dur:.0f} s")
    return {
        "max_one_region": one,
        "max_three_regions": max_three_regions(ds, dur, run_id="dm3", entry="direct"),
    }


def worker_pauses(ds: Devstack, region: str) -> dict[str, dict[str, float]]:
    """service -> {count, sum_s, stalls} so far, from each order-path worker's metrics:
    full (generation 2) cyclic-GC collections (``meridian_gc_pause_seconds``), and stalls,
    heartbeats that woke 0.5 s or more late (``meridian_event_loop_lag_seconds``)."""
    from ops.services import metrics_port

    out: dict[str, dict[str, float]] = {}
    for svc in ("gateway", "risk", "execution"):
        got: dict[str, float] = {}
        with contextlib.suppress(OSError, ValueError):
            url = f"http://127.0.0.1:{metrics_port(ds, region, svc)}/metrics"
            with local_urlopen(url, timeout_s=2) as r:  # never through $http_proxy
                lag_n = lag_fast = 0.0
                for line in r.read().decode().splitlines():
                    value = line.rsplit(" ", 1)[-1]
                    if line.startswith("meridian_gc_pause_seconds_") and 'generation="2"' in line:
                        name = line.split("{", 1)[0].rsplit("_", 1)[1]  # count, sum, ...
                        if name in ("count", "sum"):
                            got["sum_s" if name == "sum" else name] = float(value)
                    elif line.startswith("meridian_event_loop_lag_seconds_count"):
                        lag_n = float(value)
                    elif line.startswith("meridian_event_loop_lag_seconds_bucket") and (
                        'le="0.5"' in line
                    ):
                        lag_fast = float(value)  # cumulative: woke less than 0.5 s late
                got["stalls"] = lag_n - lag_fast
        out[svc] = got
    return out


def steady_state(ds: Devstack, *, fill_s: float, seconds: float) -> dict[str, Any]:
    """The tail a long session sees: the books and risk's memory filled by a closed loop,
    then ``seconds`` at 1,000 orders/s, long enough to hold the snapshots and full GC
    collections that the short points may miss (lon, tracing off)."""
    say(f"steady state: filling books and risk memory (closed loop, {fill_s:.0f} s)")
    fill = subprocess_load(ds, ["lon"], seconds=fill_s, inflight=256, run_id="fill")[0]
    wait_idle(ds)
    say(f"steady state: 1,000 orders/s for {seconds:.0f} s")
    seqs = asyncio.run(_stream_seqs(ds, "lon"))
    timeline: dict[str, tuple[int, int, int, int]] = {}
    gc0 = worker_pauses(ds, "lon")
    lat = asyncio.run(
        _in_process(ds, "lon", seconds=seconds, rate=1000, run_id="steady", timeline=timeline)
    )
    gc1 = worker_pauses(ds, "lon")
    wait_idle(ds)
    full_gc = {
        svc: {
            "collections": int(gc1[svc].get("count", 0) - gc0[svc].get("count", 0)),
            "total_ms": round(1000 * (gc1[svc].get("sum_s", 0) - gc0[svc].get("sum_s", 0)), 1),
            "stalls": int(gc1[svc].get("stalls", 0) - gc0[svc].get("stalls", 0)),
        }
        for svc in gc1
        if svc in gc0
    }
    return {
        "seconds": seconds,
        "filled_with_orders": fill["completed"],
        "latency": lat,
        "hop_split": asyncio.run(_hop_split(ds, "lon", seqs, timeline)),
        "full_gc": full_gc,
    }


def md_bench(ds: Devstack, quick: bool) -> dict[str, Any]:
    """Quotes/s sgp publishes and replicates to lon and nyc, and the lag: at 1,000/s offered
    and unthrottled (what one publisher process reaches)."""
    from replication.bench import bench_md

    urls = {r: ds.urls(r) for r in ds.topology.codes}
    out: dict[str, Any] = {}
    for name, rate in (("offered_1000", 1000.0), ("unthrottled", 0.0)):
        say(f"market data: sgp -> lon, nyc at {'max' if not rate else int(rate)} quotes/s")
        out[name] = asyncio.run(
            bench_md(urls, ds.topology, source="sgp", rate=rate, duration_s=2.0 if quick else 8.0)
        )
    return out


# ---- report --------------------------------------------------------------------------------------


ROW_HEADER = (
    "| run | offered/s | acked/s | executed/s | submit->ack ms p50/p99/p99.9/max |"
    " order->execution ms p50/p99/p99.9/max |",
    "|---|---|---|---|---|---|",
)
"""The header of the tables whose rows :func:`_row` writes."""


def _row(name: str, d: dict[str, Any]) -> str:
    a, e = d.get("submit_to_ack", {}), d.get("order_to_execution", {})

    def f(x: dict[str, Any], k: str) -> str:
        v = x.get(k)
        return f"{v:.2f}" if isinstance(v, int | float) else "-"

    return (
        f"| {name} | {d.get('offered_per_s') or 'closed loop'} | {d.get('acked_per_s')} | "
        f"{d.get('completed_per_s')} | {f(a, 'p50_ms')} / {f(a, 'p99_ms')} / "
        f"{f(a, 'p99_9_ms')} / {f(a, 'max_ms')} | {f(e, 'p50_ms')} / {f(e, 'p99_ms')} / "
        f"{f(e, 'p99_9_ms')} / {f(e, 'max_ms')} |"
    )


def _direct_lines(d: dict[str, Any]) -> list[str]:
    lines = [
        "### Direct entry (desks store their orders in ORDERS; tracing off)",
        "",
        "submit->ack: the PubAck of the desk's own store. The 1,000/s points run right after"
        " the gateway's tracing-off point, on the same mesh in the same state; the maxima at"
        " the end.",
        "",
        *ROW_HEADER,
    ]
    for lat in d.get("latency_1000", []):
        lines.append(_row("direct, 1,000/s", lat))
    if d.get("max_one_region"):
        lines.append(_row("direct, max, one region", d["max_one_region"]))
    three = d.get("max_three_regions")
    for x in (three or {}).get("per_region", []):
        lines.append(_row(f"direct, max, all three at once: {x['region']}", x))
    lines.append("")
    if three:
        lines += [
            f"All three regions together, direct entry: **{three['completed_per_s']:,} "
            "orders/s** executed end to end.",
            "",
        ]
    hs = d.get("hop_split_1000")
    if hs and hs.get("orders"):
        # no gateway: its accept is the store, so the first stage is the desk's store
        stages = {
            ("desk -> ORDERS" if k == "desk -> gateway" else k): v
            for k, v in hs["stages"].items()
            if k != "gateway -> ORDERS"
        }
        lines += [
            f"Where a direct order's time goes at 1,000/s ({hs['orders']:,} orders, the first "
            "point; `ops/hopsplit.py`):",
            "",
            *_stage_rows({**hs, "stages": stages}),
            "",
        ]
    cpu = d.get("cpu_us_per_order_1000", {})
    if cpu:
        lines += [
            "Direct entry at 1,000 orders/s: CPU per executed order "
            + ", ".join(f"{k} {v:.0f} us" for k, v in cpu.items() if v >= 5)
            + f"; total {sum(cpu.values()):,.0f} us ({d.get('machine_busy_cores_1000', 0)} "
            "cores busy).",
            "",
        ]
    return lines


def markdown(r: dict[str, Any]) -> str:
    raw, mesh = r["raw"], r.get("mesh", {})
    lines = [
        f"## Run {r['started']} ({'quick' if r['quick'] else 'full'})",
        "",
        f"Machine: {r['machine']['cpus']} cores, Python {r['machine']['python']}, "
        f"{r['machine']['nats_server']}. Command: `{r['command']}` on commit "
        f"{r.get('commit', 'unknown')}. Everything (3 nats-servers,"
        " 9 order-path workers, 3 ledger writers, PostgreSQL, Redis, the link proxies and the"
        " load generator) shares this machine.",
        "",
        "### Raw ceilings of this machine",
        "",
        "| what | result |",
        "|---|---|",
        f"| JetStream publish, pipelined acks (default flush) | "
        f"{raw['js_publish']['msgs_per_s']:,} msgs/s |",
        f"| JetStream publish, pipelined acks, `sync_interval: always` | "
        f"{raw['js_publish_fsync']['msgs_per_s']:,} msgs/s |",
        f"| core NATS request/reply, one at a time | p50 {raw['request_reply']['p50_ms']:.3f} ms,"
        f" p99 {raw['request_reply']['p99_ms']:.3f} ms |",
        f"| PostgreSQL binary COPY, 1,000 posting rows/txn, fsync on | "
        f"{raw['pg_copy']['rows_per_s']:,} rows/s |",
    ]
    if "python_book" in raw:
        lines.append(
            "| Python, one core: crossing orders through the pure book (no I/O) | "
            f"{raw['python_book']['commands_per_s']:,} commands/s |"
        )
    lines.append("")
    if raw.get("shapes"):
        lines += _shape_lines(raw["shapes"])
    if mesh:
        lines += [
            "### Order path (lon desk, lon symbols; crossing pairs, so every pair trades)",
            "",
            "submit->ack: the gateway's reply (the order is in the ORDERS stream). "
            "order->execution: submit to the first execution report at the desk. "
            "executed/s: orders whose first report arrived.",
            "",
            *ROW_HEADER,
        ]
        for tag in ("on", "off"):
            pt = mesh.get("tracing_" + tag)
            if pt:
                lines.append(_row(f"1,000/s, tracing {tag}", pt["latency_1000"]))
                lines.append(_row(f"max, one region, tracing {tag}", pt["max_one_region"]))
        for sw in mesh["sweep"]:
            lines.append(_row(f"sweep {sw['offered_per_s']}/s (tracing off)", sw))
        for x in mesh["max_three_regions"]["per_region"]:
            lines.append(_row(f"max, all three at once: {x['region']}", x))
        lines += [
            "",
            f"All three regions together (tracing off): "
            f"**{mesh['max_three_regions']['completed_per_s']:,} orders/s** executed end to end.",
            "",
        ]
        for tag in ("on", "off"):
            pt = mesh.get("tracing_" + tag)
            if not pt:
                continue
            cpu = pt.get("cpu_us_per_order_1000", {})
            fl = pt.get("fill_to_ledger_1000", {})
            lines += [
                f"Tracing {tag}, at 1,000 orders/s: CPU per executed order "
                + ", ".join(f"{k} {v:.0f} us" for k, v in cpu.items() if v >= 5)
                + f"; total {sum(cpu.values()):,.0f} us (the whole machine: "
                f"{pt.get('machine_busy_us_per_order_1000', 0):,.0f} us, "
                f"{pt.get('machine_busy_cores_1000', 0)} cores busy). Context switches per "
                "order: "
                + ", ".join(
                    f"{k} {v:.1f}"
                    for k, v in pt.get("switches_per_order_1000", {}).items()
                    if v >= 0.5
                )
                + ". Fill -> ledger commit "
                f"({fl.get('transfers', 0)} transfers): p50 {fl.get('p50_ms', 0):.1f} ms, "
                f"p99 {fl.get('p99_ms', 0):.1f} ms.",
                "",
            ]
    if mesh.get("direct"):
        lines += _direct_lines(mesh["direct"])
    for tag in ("off", "on"):
        hs = mesh.get("tracing_" + tag, {}).get("hop_split_1000")
        if hs and hs.get("orders"):
            lines += _split_lines(hs, tag)
    if mesh.get("steady"):
        lines += _steady_lines(mesh["steady"])
    if r.get("ratios"):
        lines += ["### Ratios to the raw ceilings", ""]
        lines += [f"- {k}: {v}" for k, v in r["ratios"].items()]
        lines.append("")
    if r.get("md"):
        lines += [
            "### Market data: sgp publishes, lon and nyc replicate",
            "",
            "| offered | published/s | link | path | received | p50 / p99 / max ms |",
            "|---|---|---|---|---|---|",
        ]
        for name, m in r["md"].items():
            for link, paths in sorted(m.get("links", {}).items()):
                for path, v in sorted(paths.items()):
                    lag = v.get("lag_ms", {})
                    lines.append(
                        f"| {name} | {m.get('publish_qps')} | {link} | {path} | "
                        f"{v.get('received')}{'' if v.get('complete') else ' (incomplete)'} | "
                        f"{lag.get('p50', '-')} / {lag.get('p99', '-')} / {lag.get('max', '-')} |"
                    )
        lines.append("")
    return "\n".join(lines)


def _steady_lines(st: dict[str, Any]) -> list[str]:
    lat = st["latency"]
    gc_txt = ", ".join(
        f"{svc} {v['collections']} ({v['total_ms']:,.0f} ms in all)"
        for svc, v in st.get("full_gc", {}).items()
    )
    stall_txt = ", ".join(f"{svc} {v.get('stalls', 0)}" for svc, v in st.get("full_gc", {}).items())
    lines = [
        f"### Steady state: {st.get('seconds', 60):.0f} s at 1,000 orders/s with full books "
        "(lon, tracing off)",
        "",
        f"After a closed loop of {st['filled_with_orders']:,} orders filled the books and "
        "risk's memory, so the window holds the snapshots and full GC collections of a long "
        f"session. Full GC collections in the window: {gc_txt}. Event-loop stalls (a "
        f"heartbeat 0.5 s or more late, `ops/telemetry/stalls.py`): {stall_txt}.",
        "",
        *ROW_HEADER,
        _row(f"{st.get('seconds', 60):.0f} s at 1,000/s, full books", lat),
        "",
    ]
    hs = st.get("hop_split", {})
    if hs.get("orders"):
        lines += [*_stage_rows(hs), ""]
    return lines


def _stage_rows(hs: dict[str, Any]) -> list[str]:
    """The per-stage table of an :mod:`ops.hopsplit` result."""
    return [
        "| stage | p50 ms | p90 ms | p99 ms | mean ms |",
        "|---|---|---|---|---|",
        *(
            f"| {stage} | {v['p50_ms']:.2f} | {v['p90_ms']:.2f} | {v['p99_ms']:.2f} | "
            f"{v['mean_ms']:.2f} |"
            for stage, v in hs["stages"].items()
        ),
    ]


def _split_lines(hs: dict[str, Any], tag: str) -> list[str]:
    lines = [
        f"### Where an order's time goes at 1,000 orders/s (lon, tracing {tag})",
        "",
        f"From the timestamps the mesh records ({hs['orders']:,} orders; `ops/hopsplit.py`): "
        "the desk's send, the gateway's accept, JetStream's stored time of each write, "
        "the desk's receipt of the first report.",
        "",
        *_stage_rows(hs),
    ]
    return [*lines, ""]


SHAPE_NAMES = {
    "today": "today's shape: desk -> gateway -> ORDERS -> risk -> RISKLOG, EXEC -> execution "
    "-> OUT -> desk",
    "entry": "risk at the entry: desk -> entry -> RISKLOG, EXEC -> execution -> OUT -> desk",
}


def _shape_lines(shapes: dict[str, Any]) -> list[str]:
    lines = [
        "### Floor of the order path's shape (bare hops, no logic)",
        "",
        "Each hop a Python process that only moves a 200-byte payload on, with the same "
        "messages, PubAcks and acks as Meridian's workers (`ops/skeleton.py`): what the "
        "shape itself costs on this machine.",
        "",
        "| shape | at 1,000/s: order->report ms p50/p99/p99.9 | submit->ack ms p50/p99 | "
        "CPU per order, whole path | max orders/s (256 in flight) |",
        "|---|---|---|---|---|",
    ]
    for name, sh in shapes.items():
        at, cl = sh["at_rate"], sh["closed_loop"]
        rep, ack = at["order_to_report"], at["submit_to_ack"]
        lines.append(
            f"| {SHAPE_NAMES.get(name, name)} | {rep.get('p50_ms', 0):.2f} / "
            f"{rep.get('p99_ms', 0):.2f} / {rep.get('p99_9_ms', 0):.2f} | "
            f"{ack.get('p50_ms', 0):.2f} / {ack.get('p99_ms', 0):.2f} | "
            f"{at.get('cpu_us_per_order', 0):,} us | {cl['reported_per_s']:,} |"
        )
    lines.append("")
    return lines


def ratios(r: dict[str, Any]) -> dict[str, str]:
    raw, mesh = r["raw"], r.get("mesh")
    if not mesh:
        return {}
    js = raw["js_publish"]["msgs_per_s"]
    one = mesh["tracing_off"]["max_one_region"]["completed_per_s"]
    three = mesh["max_three_regions"]["completed_per_s"]
    rr = raw["request_reply"]["p50_ms"]
    ack = mesh["tracing_off"]["latency_1000"]["submit_to_ack"].get("p50_ms", 0)
    book = raw.get("python_book", {}).get("commands_per_s")
    floor = raw.get("shapes", {}).get("today")
    shape: dict[str, str] = {}
    if floor:
        p50 = mesh["tracing_off"]["latency_1000"]["order_to_execution"].get("p50_ms", 0)
        fp50 = floor["at_rate"]["order_to_report"].get("p50_ms", 0)
        fmax = floor["closed_loop"]["reported_per_s"]
        shape = {
            "order->execution p50 at 1,000/s / its bare shape's": f"{p50 / fp50:.1f}x"
            if fp50
            else "-",
            "one-region orders/s / its bare shape's max": f"{one / fmax:.3f}" if fmax else "-",
        }
    return {
        "one-region orders/s / raw JetStream publishes/s": f"{one / js:.3f}",
        **(
            {"one-region orders/s / pure-book commands/s (Python speed)": f"{one / book:.4f}"}
            if book
            else {}
        ),
        "three-region orders/s / raw JetStream publishes/s": f"{three / js:.3f}",
        "submit->ack p50 / raw request-reply p50": f"{ack / rr:.1f}x" if rr else "-",
        **shape,
        **_direct_ratios(mesh.get("direct") or {}, js),
        "JetStream writes per executed order": "about 4.5 (ORDERS, EXEC, 2.5 on EXECOUT, "
        "a share of a RISKLOG batch)",
    }


def _direct_ratios(d: dict[str, Any], js: float) -> dict[str, str]:
    out = {}
    if d.get("max_one_region"):
        one = d["max_one_region"]["completed_per_s"]
        out["direct entry: one-region orders/s / raw JetStream publishes/s"] = f"{one / js:.3f}"
    if d.get("max_three_regions"):
        three = d["max_three_regions"]["completed_per_s"]
        out["direct entry: three-region orders/s / raw JetStream publishes/s"] = f"{three / js:.3f}"
    return out


def code_commit() -> str:
    """The commit of the code measured (``-dirty`` with uncommitted changes), or ``unknown``
    outside a git checkout: results name what they measured."""
    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


async def run_bench(*, quick: bool, out_dir: Path, tmp: Path) -> int:
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    r: dict[str, Any] = {
        "started": started,
        "quick": quick,
        "command": "meridian bench" + (" --quick" if quick else ""),
        "commit": code_commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "nats_server": subprocess.run(
                [str(nats_server_binary()), "--version"], capture_output=True, text=True
            ).stdout.strip(),
        },
    }
    say("raw ceilings: JetStream publish (default flush)")
    n = 20_000 if quick else 100_000
    r["raw"] = {"js_publish": await raw_js_publish(tmp, n=n, sync_always=False)}
    say("raw ceilings: JetStream publish (fsync every write)")
    r["raw"]["js_publish_fsync"] = await raw_js_publish(tmp, n=n // 4, sync_always=True)
    say("raw ceilings: Python speed (the pure order book, one core)")
    r["raw"]["python_book"] = raw_python_book(pairs=5_000 if quick else 20_000)
    say("raw ceilings: core request/reply round trip")
    r["raw"]["request_reply"] = await raw_request_reply(tmp, n=500 if quick else 5000)
    say("raw ceilings: PostgreSQL COPY")
    r["raw"]["pg_copy"] = await asyncio.to_thread(
        raw_pg_copy, tmp, rows=50_000 if quick else 200_000
    )
    say("raw ceilings: the order path's shape, bare hops with no logic")
    # quick: today's shape only (the bench must stay under 2 minutes on a slow day)
    r["raw"]["shapes"] = {
        shape: await measure_shape(
            shape, tmp, seconds=1.5 if quick else 6.0, warmup_s=0.5 if quick else 1.0
        )
        for shape in (("today",) if quick else tuple(SHAPES))
    }
    say("starting a private 3-region mesh for the order path")
    ds = await asyncio.to_thread(start_bench_mesh, tmp)
    try:
        r["mesh"] = await asyncio.to_thread(run_mesh_benchmarks, ds, quick)
        r["md"] = await asyncio.to_thread(md_bench, ds, quick)
    finally:
        await asyncio.to_thread(ds.down)
    r["ratios"] = ratios(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench-{started.replace(':', '')}{'-quick' if quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(r, indent=1))
    md_text = markdown(r)
    stem.with_suffix(".md").write_text(md_text + "\n")
    print(md_text)
    print(f"\nresults: {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    with contextlib.suppress(Exception):
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0
