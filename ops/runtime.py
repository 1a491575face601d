"""What every Meridian worker process shares: event loop, logs, metrics, NATS connection,
and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from ops.devstack import connect
from ops.telemetry.stalls import StallWatch
from router.contract import Message, OrderAck, OrderReject

if TYPE_CHECKING:
    from regions.topology import Topology

log = logging.getLogger("meridian.runtime")


def run(coro: Coroutine[Any, Any, None]) -> None:
    """asyncio.run with uvloop when available (measured faster on this machine)."""
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def worker_parser(description: str) -> argparse.ArgumentParser:
    """Command-line options every regional worker takes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--region", required=True)
    ap.add_argument(
        "--nats-url",
        action="append",
        required=True,
        help="the region's server first, then its failover order",
    )
    ap.add_argument("--topology", default=None)
    ap.add_argument("--metrics-port", type=int, default=0)
    return ap


async def serve_until_stopped(worker: Any, nc: NATS) -> None:
    """Announce readiness (the devstack waits for READY), run until SIGTERM/SIGINT, stop."""
    print("READY", flush=True)
    freeze_startup_objects()
    stop = install_stop_signals()
    waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait())}
    fatal = getattr(worker, "fatal", None)  # a worker that can stop deciding for good
    if isinstance(fatal, asyncio.Future):
        waits.add(fatal)
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    await worker.stop()
    await nc.drain()
    if isinstance(fatal, asyncio.Future) and fatal.done():
        raise SystemExit(f"stopped: {fatal.result()!r}")  # non-zero exit, visible to the SRE


async def serve_worker(
    service: str,
    args: argparse.Namespace,
    build: Callable[[NATS, Any, ServiceContext], Any],
    *,
    describe: Callable[[Any], str] = lambda _w: "",
) -> None:
    """The whole life of one regional worker process: logs, metrics and tracing
    (:func:`service_context`), its NATS connection, ``build(nc, topology, ctx)``, start,
    a ready line, then :func:`serve_until_stopped`. ``describe`` adds what start-up did."""
    import time

    from regions.topology import load_topology

    topology = load_topology(args.topology)
    async with service_context(service, args.region, args.metrics_port, topology=topology) as ctx:
        nc = await connect_worker(
            args.nats_url, name=f"{service}-{args.region}", metrics=ctx.metrics
        )
        watch = StallWatch(getattr(ctx.metrics, "event_loop_lag", None)).start()
        try:
            worker = build(nc, topology, ctx)
            t0 = time.monotonic()
            await worker.start()
            detail = describe(worker)
            log.info(
                "%s %s ready in %.2f s%s",
                service,
                args.region,
                time.monotonic() - t0,
                f" ({detail})" if detail else "",
            )
            await serve_until_stopped(worker, nc)
        finally:
            await watch.stop()


def freeze_startup_objects() -> None:
    """Collect once, then move every object alive after start-up (modules, topology,
    restored books and risk state) out of the cyclic GC's reach (``gc.freeze``).

    Full collections then walk only what the running worker allocates, which shortens the
    pauses that set the order path's tail latency (``meridian_gc_pause_seconds``).
    """
    gc.collect()
    gc.freeze()


def install_stop_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def connect_worker(urls: list[str], *, name: str, metrics: Any = None) -> NATS:
    """Connect with the region's failover order; log (and count) disconnects and reconnects."""

    async def disconnected() -> None:
        log.warning("%s: disconnected from NATS", name)

    async def reconnected() -> None:
        log.warning("%s: reconnected to NATS", name)
        if metrics is not None:
            with contextlib.suppress(Exception):
                metrics.reconnects.inc()

    async def error(e: Exception) -> None:
        log.warning("%s: NATS error: %s", name, e)

    return await connect(
        urls, name=name, disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error
    )


@dataclass
class ServiceContext:
    service: str
    region: str
    registry: CollectorRegistry
    metrics: Any = None
    tracing: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tracer(self) -> Any:
        """The process's tracer, or None when tracing is off."""
        return self.tracing.tracer if self.tracing else None

    def record_entry_result(self, region: str, out: Message, latency_ns: int) -> None:
        m = self.metrics
        if m is None:
            return
        m.orders_received.inc()
        if isinstance(out, OrderAck):
            m.orders_acked.inc()
            m.submit_to_ack.observe(latency_ns / 1e9)
        elif isinstance(out, OrderReject):
            m.order_rejects(out.reason).inc()


@contextlib.asynccontextmanager
async def service_context(
    service: str, region: str, metrics_port: int = 0, *, topology: Topology | None = None
) -> AsyncIterator[ServiceContext]:
    """JSON logs to the run dir, a metrics endpoint, and tracing for one worker process.

    ``topology``: the worker's own (its ``--topology``), which bounds the metrics' symbol and
    link labels; the shipped one when omitted. With another file, a symbol only the worker's
    topology has would fail its metrics (and, before, turned off all of execution's)."""
    from ops.telemetry.logs import configure_logging

    configure_logging(service=service, region=region, stderr=False)
    registry = CollectorRegistry()
    ctx = ServiceContext(service=service, region=region, registry=registry)
    server = None
    gc_watch: Any = None
    try:
        from ops.telemetry.metrics import MeridianMetrics, serve

        if topology is None:
            from regions.topology import load_topology

            topology = load_topology()
        ctx.metrics = MeridianMetrics(registry, region=region, service=service, topology=topology)
        gc_watch = ctx.metrics.watch_gc()
        if metrics_port:
            server = serve(registry, metrics_port)
    except Exception as e:  # metrics must never stop the order path
        log.warning("metrics unavailable for %s-%s: %s", service, region, e)
    try:
        from ops.telemetry.tracing import setup_tracing

        ctx.tracing = setup_tracing(service=service, region=region)
    except Exception as e:
        log.warning("tracing unavailable for %s-%s: %s", service, region, e)
    log.info("%s %s starting (pid %d)", service, region, os.getpid())
    try:
        yield ctx
    finally:
        if ctx.tracing is not None:
            with contextlib.suppress(Exception):
                ctx.tracing.shutdown()
        if server is not None:
            with contextlib.suppress(Exception):
                server.close()
        if gc_watch in gc.callbacks:
            gc.callbacks.remove(gc_watch)
        log.info("%s %s stopped", service, region)
