"""Market data over the real mesh: replication into MDVIEW, top of book in Redis, gaps, restarts.

Every test uses its own random six-letter symbols, so the shared ``MD``/``MDVIEW`` streams and
the shared Redis never mix tests. Latencies are the topology's x0.25 (lon-sgp ~21 ms one way).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgpack
import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client
from nats.js.api import DeliverPolicy
from prometheus_client import CollectorRegistry

from ops.devstack import Devstack, MeshPlan
from regions.topology import Instrument, Topology, load_topology
from replication.bench import bench_md
from replication.metrics import MdMetrics
from replication.simulator import Feed, QuoteSimulator
from replication.topbook import TopBookConsumer, TopOfBook
from replication.view import VIEW_STREAM, ensure_view, view_sources
from router import subjects
from router.contract import Quote, decode, encode
from tests.conftest import Mesh

pytestmark = pytest.mark.integration


def _symbols(n: int) -> list[str]:
    out = []
    for _ in range(n):
        h = uuid.uuid4().int
        out.append("".join(chr(ord("A") + (h >> (5 * i)) % 26) for i in range(6)))
    return out


def _instruments(symbols: list[str]) -> list[Instrument]:
    return [
        Instrument(
            symbol=s, base=s[:3], quote=s[3:], price_decimals=5, min_qty=1000, max_qty=50_000_000
        )
        for s in symbols
    ]


async def _until(cond: Callable[[], Awaitable[bool] | bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        r = cond()
        if not isinstance(r, bool):
            r = await r
        if r:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)


async def _view_seqs(nc: Client, view: str, source: str, symbol: str) -> list[int]:
    """Quote seqs of one (source, symbol) in ``view``'s MDVIEW, in stream order."""
    js = nc.jetstream(domain=view)
    sub = await js.subscribe(
        subjects.md(source, symbol),
        stream=VIEW_STREAM,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    out: list[int] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=2.0)
            out.append(decode(Quote, msg.data).seq)
            if msg.metadata.num_pending == 0:
                return out
    except nats.errors.TimeoutError:
        return out
    finally:
        await sub.unsubscribe()


@pytest.fixture
async def views(mesh: Mesh, clients: dict[str, Client]) -> dict[str, Client]:
    for code in mesh.topology.codes:
        await ensure_view(clients["lon"], mesh.topology, code)
    return clients


@pytest.fixture
def redis_url(mesh: Mesh) -> str:
    """The mesh's Redis, database 1: these tests write real quotes of real pairs into the
    top-of-book keys, which risk reads in database 0 (the order-path tests' seeded books);
    a quote they leave behind ages past risk's 30 s and the pair has no reference price."""
    base, _, _db = mesh.redis_url.rpartition("/")
    return f"{base}/1"


@pytest.fixture
async def rds(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(redis_url)
    try:
        yield r
    finally:
        await r.aclose()


@contextlib.asynccontextmanager
async def _consumer(
    nc: Client, rds: aioredis.Redis, topo: Topology, view: str, **kw: float
) -> AsyncIterator[TopBookConsumer]:
    metrics = MdMetrics(CollectorRegistry(), view=view, sources=topo.codes)
    c = TopBookConsumer(nc, rds, view=view, regions=topo.codes, metrics=metrics, **kw)
    await c.start()
    await asyncio.sleep(0.3)  # the live subscription's interest crosses the WAN one way
    try:
        yield c
    finally:
        await c.stop()


async def test_view_is_idempotent_and_sources_every_region(
    mesh: Mesh, views: dict[str, Client]
) -> None:
    info = await ensure_view(views["nyc"], mesh.topology, "lon")  # again, from another region
    assert info.config.name == VIEW_STREAM and len(info.config.sources or []) == 3
    src = await view_sources(views["lon"], "lon")
    assert set(src) == {"lon", "nyc", "sgp"}
    assert all(not s.error for s in src.values()), src


async def test_sgp_quote_reaches_lon_view_and_top_of_book_with_wan_lag(
    mesh: Mesh, views: dict[str, Client], rds: aioredis.Redis
) -> None:
    """A quote published in sgp is in lon's MDVIEW and lon's Redis top of book, and the lag
    lon measures is the emulated one-way delay (tolerance: -5 % .. +15 ms, loaded 2-core box)."""
    topo = mesh.topology
    one_way_ms = topo.link("lon", "sgp").one_way_ms
    syms = _symbols(2)
    sim = QuoteSimulator(region="sgp", instruments=_instruments(syms), seed=1)
    async with _consumer(views["lon"], rds, topo, "lon") as tob:
        feed = Feed(views["sgp"], sim, rate=200)
        await feed.run(count=100)
        last = feed.stats.by_symbol
        assert feed.stats.acked == 100 and feed.stats.duplicates == 0
        reader = TopOfBook(rds)

        async def all_in_redis() -> bool:
            for s in syms:
                got = await reader.get("lon", s)
                if got is None or got.seq != last[s]:
                    return False
            return True

        await _until(all_in_redis, 5)
        top = await reader.get("lon", syms[0])
        assert top is not None
        assert top.src == "sgp" and top.bid_px < top.ask_px and top.bid_qty >= 1_000_000
        assert top.recv_ns >= top.src_ns
        lag = tob.metrics.lag()["sgp->lon"]
        assert lag.count == 100
        assert one_way_ms * 0.95 <= lag.p50_ms <= one_way_ms + 15, lag
        assert tob.stats.gaps == 0 and tob.stats.rejected == 0
    # JetStream replicated every quote into lon's view, in order
    for s in syms:
        await _until(lambda s=s: _view_complete(views["lon"], "lon", "sgp", s, last[s]), 5)  # type: ignore[misc]
    assert await reader.get("nyc", syms[0]) is None  # nobody maintains nyc's view here


async def _view_complete(nc: Client, view: str, source: str, symbol: str, n: int) -> bool:
    return await _view_seqs(nc, view, source, symbol) == list(range(1, n + 1))


async def test_isolated_region_gap_is_reported_and_recovered_exactly_once(
    mesh: Mesh, views: dict[str, Client], rds: aioredis.Redis
) -> None:
    """sgp isolated (lon-sgp and nyc-sgp cut) for ~2.5 s while it keeps publishing.

    The cut is kept short on purpose: a cut of ~10 s or more stalls JetStream sourcing for
    ~40 s after the link is back (MACHINE-NOTES); the live path would not wait, but gap
    recovery from MDVIEW would, and this test must stay fast.
    """
    topo = mesh.topology
    syms = _symbols(2)
    sim = QuoteSimulator(region="sgp", instruments=_instruments(syms), seed=2)
    feed = Feed(views["sgp"], sim, rate=200)
    stop = asyncio.Event()
    async with _consumer(views["lon"], rds, topo, "lon", stale_after_s=0.5) as tob:
        task = asyncio.create_task(feed.run(stop=stop))
        try:
            await _until(lambda: all(tob.last_seq("sgp", s) for s in syms), 5)
            links = [mesh.proxy("lon-sgp"), mesh.proxy("nyc-sgp")]
            try:
                for ln in links:
                    ln.cut()
                # reported while cut: sgp is stale (an open gap), and nothing arrives
                await _until(lambda: "sgp" in tob.stale_sources(), 3)
                assert tob.metrics.source_stale.labels("sgp->lon")._value.get() == 1
                before = {s: tob.last_seq("sgp", s) for s in syms}
                await asyncio.sleep(2.0)
                assert {s: tob.last_seq("sgp", s) for s in syms} == before
            finally:
                for ln in links:
                    ln.restore()
            await _until(lambda: "sgp" not in tob.stale_sources(), 15)
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await task
        last = feed.stats.by_symbol
        # the jump in seqs when quotes flow again is a gap, filled from MDVIEW
        await _until(lambda: not tob.open_gaps() and tob.stats.recovered >= 1, 20)
        await _until(lambda: all(tob.last_seq("sgp", s) == last[s] for s in syms), 5)
        assert tob.stats.gaps >= 1 and tob.stats.stale_reports >= 1
        assert tob.stats.recovered == tob.stats.gap_quotes > 100  # ~2.5 s x 200/s
        assert tob.stats.unrecovered == 0
    for s in syms:
        seqs = await _view_seqs(views["lon"], "lon", "sgp", s)
        assert seqs == list(range(1, last[s] + 1)), (s, len(seqs), last[s])
    await _until(lambda: all(v["healthy"] for v in mesh.status()["links"].values()), 20)


async def test_malformed_quotes_are_rejected_and_counted_feed_keeps_going(
    mesh: Mesh, views: dict[str, Client], rds: aioredis.Redis
) -> None:
    topo = mesh.topology
    (sym,) = _symbols(1)
    sim = QuoteSimulator(region="nyc", instruments=_instruments([sym]), seed=3)
    js = views["nyc"].jetstream(domain="nyc")
    subject = subjects.md("nyc", sym)
    async with _consumer(views["lon"], rds, topo, "lon") as tob:
        feed = Feed(views["nyc"], sim, rate=0)
        await feed.run(count=10)
        good = sim.quote(sym)
        crossed = Quote(
            symbol=sym, region="nyc", lp="LP-X", seq=good.seq + 100,
            bids=((good.asks[0][0] + 5, 1_000_000),), asks=good.asks, src_ns=time.time_ns(),
        )  # fmt: skip
        await js.publish(subject, b"\x93not a quote", stream="MD")
        await js.publish(subject, encode(crossed), stream="MD")
        negative = {**good.to_dict(), "bids": [[good.bids[0][0], -1_000_000]]}
        await js.publish(subject, msgpack.packb(negative), stream="MD")
        await js.publish(subject, encode(good), stream="MD")  # seq 11: valid, after the garbage
        await feed.run(count=10)  # 12..21
        await _until(lambda: tob.last_seq("nyc", sym) == 21, 5)
        top = await TopOfBook(rds).get("lon", sym)
        assert top is not None and top.seq == 21
        assert tob.stats.rejected == 3
        assert tob.metrics.rejected.labels("invalid_field")._value.get() == 1
        assert tob.metrics.rejected.labels("malformed")._value.get() >= 1
        assert tob.metrics.rejected.labels("crossed")._value.get() == 1
        assert tob.stats.gaps == 0


async def test_restarted_region_resumes_sourcing_without_duplicates(tmp_path: Path) -> None:
    """Private mesh: nyc's server restarts while sgp keeps publishing; nyc's MDVIEW resumes
    where it left off: every seq once, in order."""
    ds = Devstack(MeshPlan.free(load_topology(), tmp_path, latency_scale=0.25))
    try:
        await asyncio.to_thread(ds.up, with_pg=False, with_redis=False)
        sgp = await ds.connect("sgp")
        lon = await ds.connect("lon")
        try:
            await ensure_view(lon, ds.topology, "nyc")
            (sym,) = _symbols(1)
            feed = Feed(sgp, QuoteSimulator(region="sgp", instruments=_instruments([sym])), rate=0)
            await feed.run(count=50)
            await _until(lambda: _view_complete(lon, "nyc", "sgp", sym, 50), 10)
            await asyncio.to_thread(ds.nats["nyc"].stop)
            await feed.run(count=50)
            await asyncio.to_thread(ds.nats["nyc"].start)
            await asyncio.to_thread(ds.wait_linked, 30)
            await _until(lambda: _view_complete(lon, "nyc", "sgp", sym, 100), 20)
            st = await view_sources(lon, "nyc")
            assert set(st) == {"lon", "nyc", "sgp"} and not st["sgp"].error
        finally:
            await sgp.close()
            await lon.close()
    finally:
        await asyncio.to_thread(ds.down)


@pytest.mark.bench
@pytest.mark.skipif(not os.environ.get("MERIDIAN_BENCH"), reason="benchmark: MERIDIAN_BENCH=1")
async def test_bench_md(mesh: Mesh) -> None:
    """Not a test: prints quotes/s sgp publishes and replicates to lon and nyc, and the lag."""
    urls = {c: mesh.urls(c) for c in mesh.topology.codes}
    for rate in (1000.0, 0.0):
        res = await bench_md(urls, mesh.topology, source="sgp", rate=rate, duration_s=5.0)
        print(json.dumps(res, indent=1))
        assert res["published"] > 0


async def test_service_runs_feed_view_and_top_of_book_and_cli_reads_them(
    mesh: Mesh, redis_url: str, tmp_path: Path
) -> None:
    """`python -m replication.service` for lon and sgp: lon's top of book gets sgp's symbols,
    `meridian md top` / `md lag` show them, metrics are served, SIGTERM exits 0."""
    from ops.procs import free_ports

    port_lon, port_sgp = free_ports(2)
    procs = _start_services(mesh, redis_url, tmp_path, {"lon": port_lon, "sgp": port_sgp})
    try:
        reader_url = redis_url
        r = aioredis.from_url(reader_url)
        try:
            reader = TopOfBook(r)

            async def lon_sees_sgp() -> bool:
                # fresh by the source's clock: recv_ns of a bootstrapped quote says little
                t = await reader.get("lon", "USDJPY")
                return t is not None and t.src == "sgp" and t.age_ns() < 1e9 and not t.stale

            await _until(lon_sees_sgp, 15)
            top = await reader.get("lon", "USDJPY")
            assert top is not None and 140_000 < top.bid_px < top.ask_px < 160_000
        finally:
            await r.aclose()
        await _until(lambda: (tmp_path / "md" / "lag-lon.json").exists(), 5)
        await asyncio.sleep(1.2)
        body = await asyncio.to_thread(_http_get, f"http://127.0.0.1:{port_lon}/metrics")
        # the series exists from start at 0: only its value says sgp's quotes were measured
        count = re.search(rb'meridian_replication_lag_seconds_count\{link="sgp->lon"\} (\S+)', body)
        assert count is not None and float(count[1]) > 0, body[:2000]

        rc_top, top_text = await asyncio.to_thread(
            _cli, tmp_path, ["md", "top", "--region", "lon", "--redis-url", redis_url]
        )
        rc_lag, text = await asyncio.to_thread(_cli, tmp_path, ["md", "lag", "--json"])
        assert rc_top == 0 and rc_lag == 0
        assert "USDJPY" in top_text and "EURUSD" in top_text and "151." in top_text
        # the column, and this run's live sources are fresh (other tests' random symbols in
        # the shared Redis may be stale)
        assert top_text.splitlines()[0].split()[-1] == "stale"
        live = [ln for ln in top_text.splitlines() if " USDJPY " in ln or " EURUSD " in ln]
        assert live and not any("STALE" in ln for ln in live), live
        stats = json.loads(text)
        lon = next(s for s in stats if s["view"] == "lon")
        sgp_lon = lon["links"]["sgp->lon"]
        assert (
            sgp_lon["count"] > 0
            and sgp_lon["p50_ms"] >= mesh.topology.link("lon", "sgp").one_way_ms * 0.95
        )
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        codes = {region: p.wait(15) for region, p in procs.items()}
    assert codes == {"lon": 0, "sgp": 0}, (tmp_path / "md-lon.log").read_text()[-2000:]


def _start_services(
    mesh: Mesh, redis_url: str, run_dir: Path, metrics_ports: dict[str, int]
) -> dict[str, subprocess.Popen[bytes]]:
    env = {**os.environ, "MERIDIAN_RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1"}
    procs = {}
    for region, port in metrics_ports.items():
        argv = [sys.executable, "-m", "replication.service", "--region", region]
        argv += [a for u in mesh.urls(region) for a in ("--nats-url", u)]
        argv += ["--redis-url", redis_url, "--rate", "300", "--metrics-port", str(port)]
        with (run_dir / f"md-{region}.log").open("wb") as log:
            procs[region] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    return procs


def _http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.read()  # type: ignore[no-any-return]


def _cli(run_dir: Path, argv: list[str]) -> tuple[int, str]:
    from ops.cli_md import register

    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path, default=run_dir)
    register(ap.add_subparsers(dest="command"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        args = ap.parse_args(argv)
        rc = args.func(args)
    return rc, out.getvalue()
