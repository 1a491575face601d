"""Benchmark: quotes/s one region publishes and replicates to the others, and the lag at that rate.

``await bench_md(urls, topology, source="sgp", rate=0, duration_s=5)`` publishes simulated
quotes for fresh random symbols from ``source`` for ``duration_s`` (``rate=0``: as fast as
PubAcks allow, 1024 in flight), and in every other region measures both paths a quote takes:

* ``mdview``: JetStream sourcing into that region's ``MDVIEW`` (an ordered consumer there),
* ``live``: the core subject through the leaf links (what the top-of-book consumer applies),

each as arrival minus ``src_ns`` (HdrHistogram, ms). Not a test: results go to the benchmark
notes (``meridian bench`` calls this).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import nats
from hdrh.histogram import HdrHistogram
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

from regions.natsconf import CLIENT_MAX_OUTSTANDING_PINGS, CLIENT_PING_INTERVAL_S
from regions.topology import Instrument, Topology
from replication.simulator import Feed, QuoteSimulator
from replication.view import VIEW_STREAM, ensure_view
from router import subjects
from router.contract import Quote, decode


class _Probe:
    def __init__(self, symbols: set[str]) -> None:
        self.symbols = symbols
        self.hist = HdrHistogram(1, 3_600_000_000, 3)
        self.count = 0
        self.last_ns = 0

    def take(self, msg: Msg) -> None:
        now = time.time_ns()
        q = decode(Quote, msg.data)
        if q.symbol not in self.symbols:
            return
        self.count += 1
        self.last_ns = now
        self.hist.record_value(min(max((now - q.src_ns) // 1000, 1), 3_600_000_000))

    def summary(self, expected: int, t0_ns: int) -> dict[str, Any]:
        h = self.hist
        span_s = max((self.last_ns - t0_ns) / 1e9, 1e-9)
        return {
            "received": self.count,
            "complete": self.count == expected,
            "qps": round(self.count / span_s),
            "lag_ms": {f"p{p:g}": h.get_value_at_percentile(p) / 1000 for p in (50, 90, 99, 99.9)}
            | {"max": h.get_max_value() / 1000},
        }


async def _connect(servers: Sequence[str]) -> Client:
    return await nats.connect(
        servers=list(servers),
        connect_timeout=2,
        ping_interval=CLIENT_PING_INTERVAL_S,
        max_outstanding_pings=CLIENT_MAX_OUTSTANDING_PINGS,
        dont_randomize=True,
        pending_size=256 * 1024 * 1024,
    )


async def bench_md(
    urls: Mapping[str, Sequence[str]],
    topology: Topology,
    *,
    source: str = "sgp",
    rate: float = 0.0,
    duration_s: float = 5.0,
    n_symbols: int = 3,
    drain_s: float = 15.0,
) -> dict[str, Any]:
    """Publish from ``source`` for ``duration_s`` and measure replication to every other region.

    Args:
        urls: Region code -> client URLs (the region's own server first).
        topology: The mesh's topology (region codes).
        source: Publishing region.
        rate: Offered quotes/s (0 = unthrottled: the publish capacity).
        duration_s: Publishing time.
        n_symbols: Symbols quoted (fresh random ones, so runs never mix).
        drain_s: Longest wait for the views to receive everything after publishing stops.

    Returns:
        ``{"source", "rate_offered", "published", "publish_qps", "links": {"sgp->lon":
        {"mdview": {...}, "live": {...}}}}`` where each path has ``received``, ``complete``,
        ``qps`` (received / time from first publish to last arrival) and ``lag_ms`` p50..max.
    """
    views = [c for c in topology.codes if c != source]
    symbols = [
        "".join(chr(65 + (uuid.uuid4().int >> (5 * i)) % 26) for i in range(6))
        for _ in range(n_symbols)
    ]
    instruments = [
        Instrument(symbol=s, base=s[:3], quote=s[3:], price_decimals=5, min_qty=1, max_qty=10**8)
        for s in symbols
    ]
    pub = await _connect(urls[source])
    conns = {v: await _connect(urls[v]) for v in views}
    subs: list[Subscription] = []
    probes: dict[str, dict[str, _Probe]] = {}
    try:
        for v in views:
            await ensure_view(conns[v], topology, v)
        for v, nc in conns.items():
            mdview, live = _Probe(set(symbols)), _Probe(set(symbols))
            probes[v] = {"mdview": mdview, "live": live}

            async def on_view(msg: Msg, p: _Probe = mdview) -> None:
                p.take(msg)

            async def on_live(msg: Msg, p: _Probe = live) -> None:
                p.take(msg)

            subs.append(
                await nc.jetstream(domain=v).subscribe(
                    subjects.md_filter(source),
                    stream=VIEW_STREAM,
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.NEW,
                    cb=on_view,
                    pending_msgs_limit=-1,
                    pending_bytes_limit=-1,
                )
            )
            subs.append(
                await nc.subscribe(
                    subjects.md_filter(source),
                    cb=on_live,
                    pending_msgs_limit=-1,
                    pending_bytes_limit=-1,
                )
            )
        await asyncio.sleep(0.5)  # subscription interest crosses the WAN
        sim = QuoteSimulator(region=source, instruments=instruments, seed=42)
        feed = Feed(pub, sim, rate=rate)
        stop = asyncio.Event()
        t0 = time.time_ns()
        task = asyncio.create_task(feed.run(stop=stop))
        await asyncio.sleep(duration_s)
        stop.set()
        stats = await task
        pub_s = (time.time_ns() - t0) / 1e9
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and any(
            p.count < stats.acked for pr in probes.values() for p in pr.values()
        ):
            await asyncio.sleep(0.1)
        return {
            "source": source,
            "rate_offered": rate,
            "duration_s": round(pub_s, 3),
            "published": stats.acked,
            "publish_qps": round(stats.acked / pub_s),
            "links": {
                f"{source}->{v}": {k: p.summary(stats.acked, t0) for k, p in pr.items()}
                for v, pr in probes.items()
            },
        }
    finally:
        for s in subs:
            with contextlib.suppress(Exception):
                await s.unsubscribe()
        for nc in [pub, *conns.values()]:
            with contextlib.suppress(Exception):
                await nc.close()
