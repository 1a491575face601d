"""The per-region market-data process: view, feed and top-of-book consumer.

    python -m replication.service --region lon --nats-url URL [--nats-url URL2 ...] \\
        --redis-url URL --rate N [--seed S] [--metrics-port P] [--replay FILE] [--topology PATH]

It ensures ``MDVIEW`` in the region's domain, publishes the region's executed symbols
(``Region.executes``) from the simulator (or a tick file with ``--replay``) at ``--rate``
quotes/s, maintains ``tob:<region>:*`` in Redis, serves Prometheus metrics on
``--metrics-port`` (0: none) and writes ``$MERIDIAN_RUN_DIR/md/lag-<region>.json`` every
second (read by ``meridian md lag``). SIGTERM or SIGINT stops it cleanly (exit 0).

Exit codes: 0 stopped by a signal; 1 the feed (or the stats writer) died after READY (logged
as an error; the devstack restarts or reports it); 2 it could not start (a ``--replay`` file
missing or unreadable, a feed that cannot tell where its ``MD`` stream ends).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, start_http_server

from regions.natsconf import CLIENT_MAX_OUTSTANDING_PINGS, CLIENT_PING_INTERVAL_S
from regions.topology import load_topology
from replication.errors import ReplicationError
from replication.metrics import MdMetrics
from replication.simulator import Feed, QuoteSimulator, QuoteSource, ReplaySource
from replication.topbook import TopBookConsumer
from replication.validate import executing_regions
from replication.view import ensure_view

log = logging.getLogger("replication.service")
_HARD_EXIT_S = 15.0


def lag_file(run_dir: str | Path, region: str) -> Path:
    """Where the service of ``region`` writes its lag/gap stats."""
    return Path(run_dir) / "md" / f"lag-{region}.json"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m replication.service", description=__doc__)
    ap.add_argument("--region", required=True)
    ap.add_argument("--nats-url", action="append", required=True, help="repeat for failover")
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--rate", type=float, default=100.0, help="quotes/s over all symbols")
    ap.add_argument(
        "--burst-ms",
        type=float,
        default=100.0,
        help="publish what fell due every this many ms (one wakeup per burst downstream too)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metrics-port", type=int, default=0)
    ap.add_argument("--replay", type=Path, default=None, help="tick file instead of simulating")
    ap.add_argument("--topology", type=Path, default=None)
    ap.add_argument(
        "--run-dir", type=Path, default=Path(os.environ.get("MERIDIAN_RUN_DIR") or "run")
    )
    return ap


async def run(args: argparse.Namespace) -> int:
    topo = load_topology(args.topology)
    region = topo.region(args.region)
    nc = await nats.connect(
        servers=args.nats_url,
        name=f"md@{region.code}",
        connect_timeout=2,
        ping_interval=CLIENT_PING_INTERVAL_S,
        max_outstanding_pings=CLIENT_MAX_OUTSTANDING_PINGS,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        dont_randomize=True,
        pending_size=64 * 1024 * 1024,
    )
    rds = aioredis.from_url(args.redis_url)
    registry = CollectorRegistry()
    metrics = MdMetrics(registry, view=region.code, sources=topo.codes)
    http = (
        start_http_server(args.metrics_port, "127.0.0.1", registry) if args.metrics_port else None
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        stop.set()
        # a clean stop takes < 1 s; never outlive the supervisor's patience if something hangs
        t = threading.Timer(_HARD_EXIT_S, os._exit, (3,))
        t.daemon = True
        t.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    consumer: TopBookConsumer | None = None
    tasks: list[asyncio.Task[object]] = []
    try:
        await ensure_view(nc, topo, region.code)
        consumer = TopBookConsumer(
            nc,
            rds,
            view=region.code,
            regions=topo.codes,
            metrics=metrics,
            exec_regions=executing_regions(topo),
        )
        await consumer.start()
        if region.executes and args.rate > 0:
            source: QuoteSource
            try:
                if args.replay is not None:
                    source = ReplaySource(args.replay, region=region.code)
                else:
                    source = QuoteSimulator(
                        region=region.code,
                        instruments=[topo.instrument(s) for s in region.executes],
                        seed=args.seed,
                    )
                feed = Feed(nc, source, rate=args.rate, tick_s=args.burst_ms / 1000)
                resumed = await feed.resume(region.executes)
            except ReplicationError as e:  # before READY: the devstack sees a failed start
                log.error("md service %s cannot start its feed: %s", region.code, e)
                return 2
            log.info("md feed %s: %.0f quotes/s, resumed after %s", region.code, args.rate, resumed)
            tasks.append(asyncio.create_task(feed.run(stop=stop), name=f"md-feed-{region.code}"))
        tasks.append(
            asyncio.create_task(
                _write_stats(consumer, args.run_dir, region.code, stop),
                name=f"md-stats-{region.code}",
            )
        )
        print("READY", flush=True)  # the devstack waits for this line
        rc = await supervise(tasks, stop)
        log.info("md service %s stopping", region.code)
        return rc
    finally:
        for t in tasks:
            t.cancel()
        if consumer is not None:
            await consumer.stop()
            with contextlib.suppress(OSError):
                consumer.write_snapshot(lag_file(args.run_dir, region.code))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)
        with contextlib.suppress(Exception):
            await rds.aclose()
        if http is not None:
            http[0].shutdown()
        log.info("md service %s stopped", region.code)


async def supervise(tasks: Sequence[asyncio.Task[object]], stop: asyncio.Event) -> int:
    """Wait until ``stop`` is set or a task dies; then let the tasks finish (5 s each).

    A task ending normally (a replay file exhausted) is fine: the consumer keeps serving. A
    task that raises is logged as an error and stops the service: returns 1 (else 0), so the
    supervisor sees a dead feed instead of a process that only looks alive.
    """
    stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    running: set[asyncio.Future[Any]] = set(tasks)
    try:
        while running and not stop.is_set():
            done, _ = await asyncio.wait({stopping, *running}, return_when=asyncio.FIRST_COMPLETED)
            running -= done
            if any(not t.cancelled() and t.exception() is not None for t in done - {stopping}):
                stop.set()
        await stopping
    finally:
        stopping.cancel()
    pending = [t for t in tasks if not t.done()]
    if pending:  # the feed waits for its in-flight PubAcks; run() cancels what is left
        await asyncio.wait(pending, timeout=5)
    rc = 0
    for t in tasks:
        exc = None if not t.done() or t.cancelled() else t.exception()
        if exc is not None:
            log.error("md task %s died: %r", t.get_name(), exc, exc_info=exc)
            rc = 1
    return rc


async def _write_stats(
    consumer: TopBookConsumer, run_dir: Path, region: str, stop: asyncio.Event
) -> None:
    path = lag_file(run_dir, region)
    while not stop.is_set():
        try:
            consumer.write_snapshot(path)
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
