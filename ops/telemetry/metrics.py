"""Prometheus series of every Meridian process, with bounded label sets.

One :class:`MeridianMetrics` per process, built on a ``CollectorRegistry`` the caller passes in
(never the global one). Every series carries the constant labels ``region`` and ``service``;
the other labels take values only from closed sets (topology symbols and links, contract
enums), checked on first use, so a bug cannot explode the number of series::

    reg = CollectorRegistry()
    m = MeridianMetrics(reg, region="lon", service="gateway", topology=topo)
    m.orders_received.inc()
    m.submit_to_ack.observe(elapsed_s)
    m.order_rejects(RejectReason.MAX_QTY).inc()
    server = serve(reg, port)      # GET http://127.0.0.1:<port>/metrics

Latency histograms use :data:`LATENCY_BUCKETS_S` (50 us .. 5 s): the client library's default
buckets start at 5 ms, too coarse for a sub-millisecond hop.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ops.telemetry.errors import LabelError
from router.contract import KillScope, RejectReason, Side
from router.entry import ENTRIES
from router.subjects import region_streams

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from regions.topology import Topology

LATENCY_BUCKETS_S: Final[tuple[float, ...]] = (
    50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 750e-6,
    1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7.5e-3,
    10e-3, 15e-3, 20e-3, 30e-3, 50e-3, 75e-3,
    0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.0, 5.0,
)  # fmt: skip
"""Histogram bounds in seconds: fine below 1 ms, and dense around the WAN round trips
(lon-nyc 70 ms, lon-sgp 170 ms, nyc-sgp 230 ms) that cross-region orders pay."""

BATCH_SIZE_BUCKETS: Final[tuple[float, ...]] = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000,
)  # fmt: skip
"""Histogram bounds for ledger batch sizes (fills per commit)."""

RISK_DECISIONS: Final[tuple[str, ...]] = ("accept", "reject")
"""Values of the ``decision`` label of ``meridian_risk_decisions_total``."""

UNANSWERED: Final[tuple[str, ...]] = ("subject", "unreadable")
"""Values of the ``why`` label of ``meridian_risk_unanswered_total``: a request on a subject not
its own (another key, account or home region), or bytes naming no account to answer."""

ENTRY_PATHS: Final[tuple[str, ...]] = ENTRIES
"""Values of the ``entry`` label of ``meridian_risk_requests_total`` (router.entry.ENTRIES)."""

SIDES: Final[tuple[str, ...]] = tuple(s.value.lower() for s in Side)
KILL_SCOPES: Final[tuple[str, ...]] = tuple(s.value for s in KillScope)
REJECT_REASONS: Final[tuple[str, ...]] = tuple(r.value for r in RejectReason)

_BASE = ("region", "service")
_M = TypeVar("_M", Counter, Gauge, Histogram)


def event_loop_lag_histogram(registry: CollectorRegistry) -> Histogram:
    """``meridian_event_loop_lag_seconds`` by region and service (:mod:`ops.telemetry.stalls`):
    one definition for every long-running process, the ledger writer's own metrics included,
    so one alert covers them all."""
    return Histogram(
        "meridian_event_loop_lag_seconds",
        "How late the event loop woke a 250 ms heartbeat: time no message could be handled.",
        _BASE,
        buckets=LATENCY_BUCKETS_S,
        registry=registry,
    )


class LedgerFamilies(NamedTuple):
    """The ``meridian_ledger_*`` families shared by :class:`MeridianMetrics` and the ledger
    writer (:class:`ledger.writer.WriterMetrics`), labelled by region and service."""

    batch_size: Histogram
    commit_seconds: Histogram
    backlog: Gauge


def ledger_families(registry: CollectorRegistry) -> LedgerFamilies:
    """``meridian_ledger_batch_size``, ``meridian_ledger_commit_seconds`` and
    ``meridian_ledger_backlog`` by region and service: the one definition of these names, so the
    ledger writer (which has no :class:`MeridianMetrics`) exports the same series as the
    dashboards and alerts expect."""
    return LedgerFamilies(
        batch_size=Histogram(
            "meridian_ledger_batch_size",
            "Fills per committed ledger batch (one database transaction).",
            _BASE,
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        ),
        commit_seconds=Histogram(
            "meridian_ledger_commit_seconds",
            "Ledger batch transaction time, commit included.",
            _BASE,
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        ),
        backlog=Gauge(
            "meridian_ledger_backlog",
            "Fills in JetStream not yet committed to the ledger (pending + held).",
            _BASE,
            registry=registry,
        ),
    )


class MeridianMetrics:
    """All application series of one process, bound to its ``region`` and ``service``.

    Series without extra labels are attributes (already bound children: call ``inc``,
    ``set``, ``observe``). Series with an extra label are methods that take the label value,
    check it against its bounded set and return the bound child (cached: the check runs once
    per value).

    Args:
        registry: Where the series are registered; one registry per process (or per test).
        region: Region code of this process.
        service: Service name (``gateway``, ``risk``, ``execution``, ``ledger``, ...).
        topology: Supplies the allowed ``symbol`` and ``link`` values and checks ``region``.
            Without it, any symbol/link is accepted (unit tests only).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        region: str,
        service: str,
        topology: Topology | None = None,
    ) -> None:
        if topology is not None and region not in topology.codes:
            raise LabelError("region", region, topology.codes)
        if not service or not service.replace("-", "_").isidentifier():
            raise LabelError("service", service, ("a short identifier",))
        self.region = region
        self.service = service
        self._symbols: tuple[str, ...] | None = None
        self._links: tuple[str, ...] | None = None
        if topology is not None:
            self._symbols = tuple(i.symbol for i in topology.instruments)
            self._links = tuple(
                n for ln in topology.links for n in (f"{ln.a}->{ln.b}", f"{ln.b}->{ln.a}")
            )
        self._streams = (*(s.name for s in region_streams(region)), "MDVIEW")
        self._children: dict[tuple[int, str, str], object] = {}
        self._lock = threading.Lock()

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(name, doc, (*_BASE, *extra), registry=registry)

        def gauge(name: str, doc: str, *extra: str) -> Gauge:
            return Gauge(name, doc, (*_BASE, *extra), registry=registry)

        def histogram(name: str, doc: str, buckets: Sequence[float], *extra: str) -> Histogram:
            return Histogram(name, doc, (*_BASE, *extra), buckets=buckets, registry=registry)

        lat = LATENCY_BUCKETS_S
        self._orders_received = counter(
            "meridian_orders_received", "Order requests (new, cancel, replace) taken in."
        )
        self._orders_acked = counter(
            "meridian_orders_acked", "Order requests acknowledged to the client (durably stored)."
        )
        self._order_rejects = counter(
            "meridian_order_rejects", "Order requests rejected, by contract reason.", "reason"
        )
        self._fills = counter("meridian_fills", "Fills produced by the book.", "symbol")
        self._gc_pause = histogram(
            "meridian_gc_pause_seconds",
            "Python cyclic-GC collections (the whole worker stops meanwhile), by generation.",
            lat,
            "generation",
        )
        self._event_loop_lag = event_loop_lag_histogram(registry)
        self._submit_to_ack = histogram(
            "meridian_submit_to_ack_seconds", "Client submit to ack, seen by the gateway.", lat
        )
        self._order_to_execution = histogram(
            "meridian_order_to_execution_seconds",
            "Wall clock from an order's store in its home region's ORDERS (its entry_ns) to"
            " execution publishing its NEW report in the book's region (this worker's clock,"
            " read then): risk, the hop to EXEC (a WAN leg for a book in another region) and"
            " execution's own queueing, batches and pauses. Not in it: the entry hop before the"
            " store (the desk's own latency has it), orders the book rejects, and reports a"
            " rebuild publishes again (never observed). Across regions it includes the two"
            " hosts' clock offset.",
            lat,
            "symbol",
        )
        self._risk_decisions = counter(
            "meridian_risk_decisions", "Pre-trade risk decisions.", "decision"
        )
        self._risk_unanswered = counter(
            "meridian_risk_unanswered",
            "Order requests risk read from ORDERS and could neither decide nor answer (their "
            "publisher holds a PubAck and hears nothing; the worker's log names each).",
            "why",
        )
        self._risk_requests = counter(
            "meridian_risk_requests",
            "Order requests risk read from ORDERS, by who stored them (a gateway, or the desk: "
            "direct entry; a request carrying the gateway's entry-region header counts as a "
            "gateway's).",
            "entry",
        )
        self._book_depth = gauge(
            "meridian_book_depth",
            "Price levels holding resting orders on one side of the book, counted up to 50 (a"
            " side with more levels reads 50); not orders: set after every batch.",
            "symbol",
            "side",
        )
        self._execution_faults = counter(
            "meridian_execution_faults",
            "Commands whose application failed (a fault of this build): rebuilt without them.",
            "symbol",
        )
        self._snapshot_behind = gauge(
            "meridian_snapshot_behind_seconds",
            "Seconds since a single writer's state (risk, execution) went ahead of its last"
            " stored snapshot (0: covered; after a restart that replayed past the snapshot,"
            " since that snapshot was captured). A restart replays what is after it, and"
            " cannot start once the stream's max_age (7 days) has taken any of that.",
        )
        self._day_roll_behind = gauge(
            "meridian_day_roll_behind_seconds",
            "Seconds since the latest trading-day roll that a book of this execution worker"
            " has not applied (0: all have): DAY orders of the ended day may still rest.",
        )
        self._consumer_pending = gauge(
            "meridian_consumer_pending",
            "Messages of the stream not yet delivered to this worker's durable consumer, as"
            " the last delivery of the worker's latest batch carried them (set once per batch:"
            " an idle worker keeps its last value; meridian_nats_consumer_num_pending is the"
            " server's own count).",
            "stream",
            "consumer",
        )
        self._ledger = ledger_families(registry)
        self._md_gaps = counter("meridian_md_gaps", "Market-data sequence gaps detected.", "link")
        self._reconnects = counter("meridian_reconnects", "Reconnections to NATS.")
        self._kill_switch = gauge(
            "meridian_kill_switch_engaged",
            "Kill switches engaged in the risk worker's state, by scope (set by risk after each"
            " kill it applies and after each rebuild).",
            "scope",
        )

        base = (region, service)
        self.orders_received = self._orders_received.labels(*base)
        """Counter: order requests taken in."""
        self.orders_acked = self._orders_acked.labels(*base)
        """Counter: order requests acknowledged."""
        self.submit_to_ack = self._submit_to_ack.labels(*base)
        """Histogram (seconds): submit to ack."""
        self._base = base
        self.reconnects = self._reconnects.labels(*base)
        """Counter: NATS reconnections."""
        self.event_loop_lag = self._event_loop_lag.labels(*base)
        """Histogram (seconds): lateness of the event loop's heartbeat (ops.telemetry.stalls)."""
        # Closed sets are initialised at 0 so rate() and absent() work from the first scrape.
        for d in RISK_DECISIONS:
            self.risk_decisions(d)
        for e in ENTRY_PATHS:
            self.risk_requests(e)
        for w in UNANSWERED:
            self.risk_unanswered(w)
        for s in KILL_SCOPES:
            self.kill_switch_engaged(s)

    # The ledger families are registered in every process (one definition: every scrape
    # describes them alike), but a series exists only once something observes through it, so
    # the gateway, risk and execution do not export empty ledger series (the ledger writer
    # observes through the same families, :class:`ledger.writer.WriterMetrics`).
    @property
    def ledger_batch_size(self) -> Histogram:
        """Histogram (fills): size of each ledger commit."""
        return self._ledger.batch_size.labels(*self._base)

    @property
    def ledger_commit_seconds(self) -> Histogram:
        """Histogram (seconds): ledger commit latency."""
        return self._ledger.commit_seconds.labels(*self._base)

    @property
    def ledger_backlog(self) -> Gauge:
        """Gauge: fills not yet in the ledger."""
        return self._ledger.backlog.labels(*self._base)

    # ---- labelled series -------------------------------------------------------------------

    def order_rejects(self, reason: str | RejectReason) -> Counter:
        """Counter of rejects for ``reason`` (a :class:`RejectReason`)."""
        return self._child(self._order_rejects, "reason", str(reason), REJECT_REASONS)

    def fills(self, symbol: str) -> Counter:
        """Counter of fills in ``symbol``."""
        return self._child(self._fills, "symbol", symbol, self._symbols)

    def order_to_execution(self, symbol: str) -> Histogram:
        """Histogram (seconds) from entry to execution for ``symbol``."""
        return self._child(self._order_to_execution, "symbol", symbol, self._symbols)

    def risk_decisions(self, decision: str) -> Counter:
        """Counter of risk decisions; ``decision`` is ``accept`` or ``reject``."""
        return self._child(self._risk_decisions, "decision", decision, RISK_DECISIONS)

    def risk_unanswered(self, why: str) -> Counter:
        """Counter of requests risk could not answer; ``why``: ``subject`` or ``unreadable``."""
        return self._child(self._risk_unanswered, "why", why, UNANSWERED)

    def risk_requests(self, entry: str) -> Counter:
        """Counter of order requests risk read; ``entry`` is ``gateway`` or ``direct``."""
        return self._child(self._risk_requests, "entry", entry, ENTRY_PATHS)

    def book_depth(self, symbol: str, side: str | Side) -> Gauge:
        """Gauge of price levels (up to 50) on one side (``buy``/``sell``) of ``symbol``'s
        book."""
        sym = self._check("symbol", symbol, self._symbols)
        return self._child(self._book_depth, "side", str(side).lower(), SIDES, sym)

    def execution_faults(self, symbol: str) -> Counter:
        """Counter of commands on ``symbol`` whose application failed (execution)."""
        return self._child(self._execution_faults, "symbol", symbol, self._symbols)

    def snapshot_behind(self) -> Gauge:
        """Gauge (seconds) of a single writer's state ahead of its stored snapshot."""
        return self._snapshot_behind.labels(*self._base)

    def day_roll_behind(self) -> Gauge:
        """Gauge (seconds) of a trading-day roll not yet applied by every book (execution)."""
        return self._day_roll_behind.labels(*self._base)

    def consumer_pending(self, stream: str, consumer: str) -> Gauge:
        """Gauge of messages pending for this worker's durable ``consumer`` on ``stream``."""
        st = self._check("stream", stream, self._streams)
        if not consumer.replace("-", "_").isidentifier():
            raise LabelError("consumer", consumer, ("a durable consumer name",))
        return self._child(self._consumer_pending, "consumer", consumer, None, st)

    def md_gaps(self, link: str) -> Counter:
        """Counter of market-data gaps on directed ``link`` (``"<from>-><to>"``)."""
        return self._child(self._md_gaps, "link", link, self._links)

    def kill_switch_engaged(self, scope: str | KillScope) -> Gauge:
        """Gauge: number of kill switches engaged at ``scope`` (account, desk, global)."""
        return self._child(self._kill_switch, "scope", str(scope), KILL_SCOPES)

    def kills_engaged(self, keys: Iterable[str]) -> None:
        """Set ``meridian_kill_switch_engaged`` of every scope from the engaged kill keys
        (``global``, ``account.<id>``, ``desk.<id>``: the risk engine's ``kills``); a scope
        with none reads 0. Keys of no known scope are not counted."""
        counts = dict.fromkeys(KILL_SCOPES, 0)
        for key in keys:
            scope = key.partition(".")[0]
            if scope in counts:
                counts[scope] += 1
        for scope, n in counts.items():
            self.kill_switch_engaged(scope).set(n)

    # ---- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _check(label: str, value: str, allowed: tuple[str, ...] | None) -> str:
        if allowed is not None and value not in allowed:
            raise LabelError(label, value, allowed)
        return value

    def _child(
        self,
        metric: _M,
        label: str,
        value: str,
        allowed: tuple[str, ...] | None,
        *before: str,
    ) -> _M:
        key = (id(metric), "\x00".join(before), value)
        child = self._children.get(key)
        if child is None:
            self._check(label, value, allowed)
            with self._lock:
                child = metric.labels(self.region, self.service, *before, value)
                self._children[key] = child
        return child  # type: ignore[return-value]

    def watch_gc(self) -> Callable[[str, dict[str, int]], None]:
        """Observe every cyclic-GC collection of this process in ``meridian_gc_pause_seconds``.

        A full (generation 2) collection walks every tracked object while the event loop
        waits: with a large working set that is tens of milliseconds of tail latency.
        """
        children = {g: self._gc_pause.labels(self.region, self.service, str(g)) for g in (0, 1, 2)}
        started = [0.0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
                return
            child = children.get(info.get("generation", -1))
            if child is not None:
                child.observe(time.perf_counter() - started[0])

        gc.callbacks.append(on_gc)
        return on_gc  # remove it from gc.callbacks when the process's metrics go away


def metric_names(registry: CollectorRegistry | None = None) -> frozenset[str]:
    """Names of every family a :class:`MeridianMetrics` registers (without sample suffixes).

    Counters are returned with their ``_total`` suffix, as PromQL sees them.
    """
    reg = registry or CollectorRegistry()
    if registry is None:
        MeridianMetrics(reg, region="lon", service="probe")
    names: set[str] = set()
    for fam in reg.collect():
        names.add(f"{fam.name}_total" if fam.type == "counter" else fam.name)
    return frozenset(names)


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsServer:
    """A running ``/metrics`` HTTP endpoint (a daemon thread); :meth:`close` stops it."""

    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int
    """The bound port (the real one when 0 was asked for)."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(registry: CollectorRegistry, port: int, *, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread.

    Args:
        registry: The process's registry.
        port: TCP port; 0 picks a free one (read it back from ``.port``).
        host: Bind address; loopback by default.
    """
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server=server, thread=thread, host=host, port=server.server_port)
