"""Prometheus collector for nats-server's HTTP monitoring endpoints, one server per region.

Reads ``/varz``, ``/connz``, ``/leafz`` and ``/jsz?streams=true&consumers=true`` of every
region's server at scrape time (in parallel, stdlib ``urllib`` only) and exposes::

    meridian_nats_up{region}                                  1 if /varz answered
    meridian_nats_scrape_duration_seconds{region}
    meridian_nats_connections{region}                         client connections
    meridian_nats_pending_bytes{region}                       bytes queued to slow readers
    meridian_nats_memory_bytes{region}                        the server's resident memory
    meridian_nats_slow_consumers_total{region}
    meridian_nats_messages_total{region,direction}            direction: in | out
    meridian_nats_bytes_total{region,direction}
    meridian_nats_leafnodes{region}                           leaf connections
    meridian_nats_leafnode_up{region,remote,link}             1 up, 0 expected but missing
    meridian_nats_leafnode_rtt_seconds{region,remote,link}
    meridian_nats_leafnode_messages_total{region,remote,link,direction}
    meridian_nats_jetstream_api_errors_total{region}
    meridian_nats_stream_messages{region,stream}
    meridian_nats_stream_bytes{region,stream}
    meridian_nats_stream_last_seq{region,stream}
    meridian_nats_consumer_num_pending{region,stream,consumer}      not yet delivered
    meridian_nats_consumer_ack_pending{region,stream,consumer}      delivered, not acked
    meridian_nats_consumer_redelivered{region,stream,consumer}      redelivered, not acked
    meridian_nats_consumer_ack_floor_stream_seq{region,stream,consumer}
    meridian_nats_endpoint_errors_total{region,endpoint}      failed reads: varz|connz|leafz|jsz

``remote`` is the peer's ``server_name`` (the region code in the devstack), ``link`` the
topology's link name joining the two (``lon-sgp``), or empty when unknown. ``up`` follows
``/varz``: a server whose ``/varz`` does not answer gives ``meridian_nats_up 0`` and nothing
else for that region. Another endpoint that fails leaves out only its own series for that
scrape (``/connz``: pending bytes; ``/leafz``: the leaf series, ``leafnode_up 0`` included;
``/jsz``: the stream and consumer series), counted in ``meridian_nats_endpoint_errors_total``
and logged when it starts and stops failing.

Run standalone (the devstack lists it as a scrape target)::

    python -m ops.natsmon --port 9400 lon=http://127.0.0.1:8310 nyc=http://127.0.0.1:8320
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ops.procs import local_urlopen

if TYPE_CHECKING:
    from regions.topology import Topology

__all__ = [
    "NATS_METRIC_NAMES",
    "NatsMonitorCollector",
    "ServerSnapshot",
    "expected_leafs",
    "main",
    "monitors_from_topology",
    "parse_go_duration",
]

_Family = GaugeMetricFamily | CounterMetricFamily
_R = ("region",)
_LEAF = ("region", "remote", "link")
_STREAM = ("region", "stream")
_CONSUMER = ("region", "stream", "consumer")
ENDPOINTS: Final[dict[str, str]] = {
    "varz": "/varz",
    "connz": "/connz",
    "leafz": "/leafz",
    "jsz": "/jsz?streams=true&consumers=true",
}
"""Monitoring endpoints read each scrape (the ``endpoint`` label's values) and their paths."""

log = logging.getLogger("meridian.natsmon")

# name -> (type, help, labels); counters are listed without their _total suffix.
_FAMILIES: Final[dict[str, tuple[str, str, tuple[str, ...]]]] = {
    "meridian_nats_up": ("gauge", "1 if the server's monitoring endpoint answered.", _R),
    "meridian_nats_scrape_duration_seconds": ("gauge", "Time to read the endpoints.", _R),
    "meridian_nats_connections": ("gauge", "Client connections.", _R),
    "meridian_nats_pending_bytes": ("gauge", "Bytes pending to all connections.", _R),
    "meridian_nats_memory_bytes": (
        "gauge",
        "Resident memory of the server (its dedup windows and per-subject state grow with the "
        "orders of the last hour and week: docs/benchmarks.md, stop 21).",
        _R,
    ),
    "meridian_nats_slow_consumers": ("counter", "Slow consumers detected.", _R),
    "meridian_nats_messages": ("counter", "Messages in/out.", ("region", "direction")),
    "meridian_nats_bytes": ("counter", "Bytes in/out.", ("region", "direction")),
    "meridian_nats_leafnodes": ("gauge", "Leaf-node connections.", _R),
    "meridian_nats_leafnode_up": ("gauge", "1 if the leaf link to remote is up.", _LEAF),
    "meridian_nats_leafnode_rtt_seconds": ("gauge", "Leaf link round-trip time.", _LEAF),
    "meridian_nats_leafnode_messages": (
        "counter",
        "Messages over the leaf link.",
        (*_LEAF, "direction"),
    ),
    "meridian_nats_jetstream_api_errors": ("counter", "JetStream API errors.", _R),
    "meridian_nats_stream_messages": ("gauge", "Messages stored in the stream.", _STREAM),
    "meridian_nats_stream_bytes": ("gauge", "Bytes stored in the stream.", _STREAM),
    "meridian_nats_stream_last_seq": ("gauge", "Last sequence of the stream.", _STREAM),
    "meridian_nats_consumer_num_pending": (
        "gauge",
        "Messages not yet delivered to the consumer.",
        _CONSUMER,
    ),
    "meridian_nats_consumer_ack_pending": (
        "gauge",
        "Messages delivered and not yet acknowledged.",
        _CONSUMER,
    ),
    "meridian_nats_consumer_redelivered": (
        "gauge",
        "Messages redelivered and not yet acknowledged.",
        _CONSUMER,
    ),
    "meridian_nats_consumer_ack_floor_stream_seq": (
        "gauge",
        "Stream sequence below which every message is acknowledged.",
        _CONSUMER,
    ),
    "meridian_nats_endpoint_errors": (
        "counter",
        "Reads of a monitoring endpoint that failed; that scrape leaves out its series.",
        ("region", "endpoint"),
    ),
}

NATS_METRIC_NAMES: Final[frozenset[str]] = frozenset(
    f"{n}_total" if t == "counter" else n for n, (t, _, _) in _FAMILIES.items()
)
"""Every series name the collector exposes, as PromQL sees it."""

_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_UNIT_S["h"] = 3600.0


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string (``"730µs"``, ``"1.5ms"``, ``"1m2.5s"``).

    Raises:
        ValueError: ``text`` is not a Go duration.
    """
    s = text.strip()
    if s in {"0", "0s"}:
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"not a Go duration: {text!r}")
    return total


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSnapshot:
    """What one server's monitoring endpoints returned in one scrape."""

    region: str
    varz: Mapping[str, Any] | None
    """None when ``/varz`` did not answer: the server is down (then the rest is None too)."""
    connz: Mapping[str, Any] | None = field(default_factory=dict)
    """None when ``/connz`` did not answer (its series are left out), likewise below."""
    leafz: Mapping[str, Any] | None = field(default_factory=dict)
    jsz: Mapping[str, Any] | None = field(default_factory=dict)
    duration_s: float = 0.0


def monitors_from_topology(topology: Topology, host: str = "127.0.0.1") -> dict[str, str]:
    """region -> ``http://host:<monitor_port>`` for every region of ``topology``."""
    return {r.code: f"http://{host}:{r.monitor_port}" for r in topology.regions}


def expected_leafs(topology: Topology) -> dict[str, tuple[str, ...]]:
    """Leaf links each region should have in normal operation (hub and spoke).

    A spoke expects its first dial target (the hub); an acceptor expects every region whose
    first dial target it is. Fallback links (sgp -> nyc while lon is down) are reported when
    present but never expected, so a spoke on its fallback shows the hub link as down.
    """
    out: dict[str, list[str]] = {r.code: [] for r in topology.regions}
    for r in topology.regions:
        if r.leaf_dial:
            out[r.code].append(r.leaf_dial[0])
            out[r.leaf_dial[0]].append(r.code)
    return {k: tuple(v) for k, v in out.items()}


class NatsMonitorCollector(Collector):
    """Custom collector reading each region's nats-server monitoring endpoint at scrape time.

    Args:
        monitors: region -> monitoring base URL (``http://127.0.0.1:8310``).
        topology: Optional; gives the ``link`` label and the expected leaf links (missing ones
            are exported as ``meridian_nats_leafnode_up 0``).
        timeout_s: Per-request HTTP timeout.
    """

    def __init__(
        self,
        monitors: Mapping[str, str],
        *,
        topology: Topology | None = None,
        timeout_s: float = 1.0,
    ) -> None:
        self.monitors = dict(monitors)
        self.timeout_s = timeout_s
        self._links: dict[frozenset[str], str] = {}
        self._expected: dict[str, tuple[str, ...]] = {}
        self._errors = {(r, e): 0 for r in self.monitors for e in ENDPOINTS}
        """Failed reads by (region, endpoint), since start (a counter)."""
        self._failing: set[tuple[str, str]] = set()
        """(region, endpoint) whose last read failed: logged once when it starts failing."""
        self._lock = threading.Lock()  # regions are read in parallel, scrapes may overlap
        if topology is not None:
            self._links = {frozenset((ln.a, ln.b)): ln.name for ln in topology.links}
            self._expected = expected_leafs(topology)

    # ---- Collector protocol --------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        # Declared up front so registering does not scrape the servers.
        return list(_new_families().values())

    def collect(self) -> Iterable[Metric]:
        return list(self.families(self.snapshots()).values())

    # ---- reading ---------------------------------------------------------------------------

    def snapshots(self) -> list[ServerSnapshot]:
        """Read every region's endpoints, in parallel."""
        if not self.monitors:
            return []
        with ThreadPoolExecutor(max_workers=len(self.monitors)) as pool:
            return list(pool.map(lambda kv: self._read(*kv), self.monitors.items()))

    def _read(self, region: str, base: str) -> ServerSnapshot:
        t0 = time.perf_counter()
        got: dict[str, dict[str, Any] | None] = {}
        for name, path in ENDPOINTS.items():
            try:
                got[name] = self._get(base, path)
                self._note(region, name, None)
            except (OSError, ValueError, http.client.HTTPException) as e:
                got[name] = None
                self._note(region, name, e)
                if name == "varz":  # the server is down: nothing else to read
                    return ServerSnapshot(
                        region=region,
                        varz=None,
                        connz=None,
                        leafz=None,
                        jsz=None,
                        duration_s=time.perf_counter() - t0,
                    )
        return ServerSnapshot(
            region=region,
            varz=got["varz"],
            connz=got["connz"],
            leafz=got["leafz"],
            jsz=got["jsz"],
            duration_s=time.perf_counter() - t0,
        )

    def _note(self, region: str, endpoint: str, error: Exception | None) -> None:
        """Count a failed read; log when an endpoint starts and stops failing."""
        key = (region, endpoint)
        with self._lock:
            if error is None:
                if key in self._failing:
                    self._failing.discard(key)
                    log.info("natsmon: %s %s answers again", region, ENDPOINTS[endpoint])
                return
            self._errors[key] = self._errors.get(key, 0) + 1
            first = key not in self._failing
            self._failing.add(key)
        if first:
            log.warning(
                "natsmon: %s %s failed (%r); its series are left out while it fails",
                region,
                ENDPOINTS[endpoint],
                error,
            )

    def _get(self, base: str, path: str) -> dict[str, Any]:
        with local_urlopen(base.rstrip("/") + path, timeout_s=self.timeout_s) as r:
            data = json.loads(r.read())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a JSON object")
        return data

    # ---- mapping -------------------------------------------------------------------------

    def families(self, snaps: Sequence[ServerSnapshot]) -> dict[str, _Family]:
        """Metric families for a set of snapshots (no I/O; the endpoint error counts are
        the collector's own, kept by :meth:`_read`)."""
        fam = _new_families()

        def g(name: str, labels: Sequence[str], value: float) -> None:
            fam[name].add_metric(list(labels), float(value))

        with self._lock:
            errors = dict(self._errors)
        for (r, endpoint), n in sorted(errors.items()):
            g("meridian_nats_endpoint_errors", [r, endpoint], n)
        for s in snaps:
            r = s.region
            g("meridian_nats_up", [r], 0 if s.varz is None else 1)
            g("meridian_nats_scrape_duration_seconds", [r], s.duration_s)
            if s.varz is None:
                continue
            v = s.varz
            g("meridian_nats_connections", [r], _num(v, "connections"))
            g("meridian_nats_slow_consumers", [r], _num(v, "slow_consumers"))
            g("meridian_nats_memory_bytes", [r], _num(v, "mem"))
            for d in ("in", "out"):
                g("meridian_nats_messages", [r, d], _num(v, f"{d}_msgs"))
                g("meridian_nats_bytes", [r, d], _num(v, f"{d}_bytes"))
            # an endpoint that failed leaves out its series (absent, never a false 0)
            if s.connz is not None:
                conns = s.connz.get("connections") or []
                pending = sum(_num(c, "pending_bytes") for c in conns)
                g("meridian_nats_pending_bytes", [r], pending)
            if s.leafz is not None:
                self._leafs(fam, r, s.leafz)
            if s.jsz is not None:
                self._jetstream(fam, r, s.jsz)
        return fam

    def _leafs(self, fam: dict[str, _Family], region: str, leafz: Mapping[str, Any]) -> None:
        leafs = leafz.get("leafs") or []
        fam["meridian_nats_leafnodes"].add_metric([region], float(len(leafs)))
        seen: set[str] = set()
        for leaf in leafs:
            remote = str(leaf.get("name") or leaf.get("ip") or "?")
            if remote in seen:
                continue
            seen.add(remote)
            lbl = [region, remote, self._links.get(frozenset((region, remote)), "")]
            fam["meridian_nats_leafnode_up"].add_metric(lbl, 1.0)
            try:
                rtt = parse_go_duration(str(leaf.get("rtt", "")))
            except ValueError:
                rtt = None
            if rtt is not None:
                fam["meridian_nats_leafnode_rtt_seconds"].add_metric(lbl, rtt)
            for d in ("in", "out"):
                fam["meridian_nats_leafnode_messages"].add_metric(
                    [*lbl, d], _num(leaf, f"{d}_msgs")
                )
        for remote in self._expected.get(region, ()):
            if remote not in seen:
                lbl = [region, remote, self._links.get(frozenset((region, remote)), "")]
                fam["meridian_nats_leafnode_up"].add_metric(lbl, 0.0)

    @staticmethod
    def _jetstream(fam: dict[str, _Family], region: str, jsz: Mapping[str, Any]) -> None:
        api = jsz.get("api") or {}
        fam["meridian_nats_jetstream_api_errors"].add_metric([region], _num(api, "errors"))
        streams_seen: set[str] = set()
        for acc in jsz.get("account_details") or []:
            for st in acc.get("stream_detail") or []:
                name = str(st.get("name", ""))
                if not name or name in streams_seen:
                    continue
                streams_seen.add(name)
                state = st.get("state") or {}
                lbl = [region, name]
                fam["meridian_nats_stream_messages"].add_metric(lbl, _num(state, "messages"))
                fam["meridian_nats_stream_bytes"].add_metric(lbl, _num(state, "bytes"))
                fam["meridian_nats_stream_last_seq"].add_metric(lbl, _num(state, "last_seq"))
                for c in st.get("consumer_detail") or []:
                    cl = [region, name, str(c.get("name", ""))]
                    floor = c.get("ack_floor") or {}
                    fam["meridian_nats_consumer_num_pending"].add_metric(cl, _num(c, "num_pending"))
                    fam["meridian_nats_consumer_ack_pending"].add_metric(
                        cl, _num(c, "num_ack_pending")
                    )
                    fam["meridian_nats_consumer_redelivered"].add_metric(
                        cl, _num(c, "num_redelivered")
                    )
                    fam["meridian_nats_consumer_ack_floor_stream_seq"].add_metric(
                        cl, _num(floor, "stream_seq")
                    )


def _num(d: Mapping[str, Any], key: str) -> float:
    v = d.get(key, 0)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0


def _new_families() -> dict[str, _Family]:
    out: dict[str, _Family] = {}
    for name, (kind, doc, labels) in _FAMILIES.items():
        if kind == "counter":
            out[name] = CounterMetricFamily(name, doc, labels=list(labels))
        else:
            out[name] = GaugeMetricFamily(name, doc, labels=list(labels))
    return out


# ---- standalone process ------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the collector on ``--port`` until SIGTERM/SIGINT."""
    from ops.telemetry.metrics import serve

    p = argparse.ArgumentParser(prog="python -m ops.natsmon", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True, help="metrics port (0: any free port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--topology", help="topology TOML; gives monitors, links, expected leafs")
    p.add_argument("monitors", nargs="*", metavar="REGION=URL", help="overrides/extra servers")
    args = p.parse_args(argv)
    topo = None
    monitors: dict[str, str] = {}
    if args.topology:
        from regions.topology import load_topology

        topo = load_topology(args.topology)
        monitors = monitors_from_topology(topo)
    for item in args.monitors:
        region, sep, url = item.partition("=")
        if not sep or not url:
            p.error(f"expected REGION=URL, got {item!r}")
        monitors[region] = url
    if not monitors:
        p.error("no servers to monitor: give --topology or REGION=URL")
    reg = CollectorRegistry()
    reg.register(NatsMonitorCollector(monitors, topology=topo))
    server = serve(reg, args.port, host=args.host)
    print(f"natsmon serving {server.url} for {', '.join(sorted(monitors))}", flush=True)
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda n, _f: stop.append(n))
    while not stop:
        time.sleep(0.2)
    server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
