"""Market-data metrics: Prometheus series on a registry passed in, and HdrHistogram lag per link.

Series (``link`` is a directed ``"<source>-><view>"`` pair, ``reason`` a closed set)::

    meridian_replication_lag_seconds{link}       histogram: arrival (recv_ns) - src_ns
    meridian_md_quotes_total{link}               quotes applied from the live path
    meridian_md_rejected_total{reason}           quotes refused by validation
    meridian_md_duplicates_total{link}           quotes seen twice (dropped)
    meridian_md_gaps_total{link}                 sequence gaps detected
    meridian_md_gap_quotes_total{link}           quotes missing in those gaps
    meridian_md_recovered_total{link}            missing quotes later filled from MDVIEW
    meridian_md_unrecovered_total{link}          missing quotes MDVIEW could not supply
    meridian_md_stale_total{link}                times a source went silent (open gap)
    meridian_md_rebaselines_total{link}          feeds started over (seqs restarted, huge jump)
    meridian_md_source_stale{link}               gauge: 1 while the source is silent
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from hdrh.histogram import HdrHistogram
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from replication.validate import REJECT_REASONS

LAG_BUCKETS_S: Final[tuple[float, ...]] = (
    100e-6, 250e-6, 500e-6, 1e-3, 2e-3, 3e-3, 5e-3, 7.5e-3,
    10e-3, 15e-3, 20e-3, 25e-3, 30e-3, 40e-3, 50e-3, 60e-3, 75e-3,
    0.09, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Lag buckets: fine below 1 ms (local), dense around the WAN one-way delays (9-115 ms)."""

_HDR_MAX_US = 3_600_000_000  # 1 h: a quote caught up after a long outage still records


def link_name(source: str, view: str) -> str:
    return f"{source}->{view}"


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkLag:
    """Lag percentiles of one directed link since the consumer started."""

    link: str
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    def to_json(self) -> dict[str, float | int | str]:
        return {
            "link": self.link,
            "count": self.count,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        }


class MdMetrics:
    """Every market-data series of one view region's consumer.

    Args:
        registry: Where the Prometheus series go (one per process, or per test).
        view: The view region code.
        sources: Source region codes expected (their series start at 0).
    """

    def __init__(self, registry: CollectorRegistry, *, view: str, sources: Iterable[str]) -> None:
        self.view = view

        def counter(name: str, doc: str, label: str) -> Counter:
            return Counter(name, doc, (label,), registry=registry)

        self._lag = Histogram(
            "meridian_replication_lag_seconds",
            "Market data: arrival in the view region minus the quote's source timestamp.",
            ("link",),
            buckets=LAG_BUCKETS_S,
            registry=registry,
        )
        self.quotes = counter("meridian_md_quotes", "Quotes applied from the live path.", "link")
        self.rejected = counter("meridian_md_rejected", "Quotes refused by validation.", "reason")
        self.duplicates = counter("meridian_md_duplicates", "Quotes seen twice.", "link")
        self.gaps = counter("meridian_md_gaps", "Sequence gaps detected.", "link")
        self.gap_quotes = counter("meridian_md_gap_quotes", "Quotes missing in gaps.", "link")
        self.recovered = counter("meridian_md_recovered", "Missing quotes filled.", "link")
        self.unrecovered = counter(
            "meridian_md_unrecovered", "Missing quotes the view could not supply.", "link"
        )
        self.stale = counter("meridian_md_stale", "Times a source went silent.", "link")
        self.rebaselines = counter(
            "meridian_md_rebaselines", "Feeds started over (seqs restarted or jumped).", "link"
        )
        self.source_stale = Gauge(
            "meridian_md_source_stale", "1 while a source is silent.", ("link",), registry=registry
        )
        self.lag_p99 = Gauge(
            "meridian_replication_lag_p99_seconds",
            "Replication lag p99 since this md service started (never reset: after a long"
            " uptime it no longer moves), per directed link, refreshed with the `md lag` file."
            " Not for alerts or dashboards: they use meridian_replication_lag_seconds.",
            ("link",),
            registry=registry,
        )
        self._hdr: dict[str, HdrHistogram] = {}
        for r in REJECT_REASONS:
            self.rejected.labels(r)
        for s in sources:
            ln = link_name(s, view)
            for c in (
                self.quotes, self.gaps, self.recovered, self.unrecovered, self.stale,
                self.rebaselines,
            ):  # fmt: skip
                c.labels(ln)
            self.source_stale.labels(ln).set(0)
            self._lag.labels(ln)

    def observe_lag(self, link: str, lag_ns: int) -> None:
        lag_ns = max(lag_ns, 0)
        self._lag.labels(link).observe(lag_ns / 1e9)
        h = self._hdr.get(link)
        if h is None:
            h = self._hdr[link] = HdrHistogram(1, _HDR_MAX_US, 3)
        h.record_value(min(max(lag_ns // 1000, 1), _HDR_MAX_US))

    def lag(self) -> dict[str, LinkLag]:
        """p50/p99/max per link, in milliseconds (also refreshes the p99 gauge)."""
        for ln, h in self._hdr.items():
            self.lag_p99.labels(ln).set(h.get_value_at_percentile(99) / 1e6)
        return {
            ln: LinkLag(
                link=ln,
                count=h.get_total_count(),
                p50_ms=h.get_value_at_percentile(50) / 1000,
                p99_ms=h.get_value_at_percentile(99) / 1000,
                max_ms=h.get_max_value() / 1000,
            )
            for ln, h in sorted(self._hdr.items())
        }

    def reset_lag(self) -> None:
        """Forget the HdrHistograms (the Prometheus histogram is cumulative by design)."""
        for h in self._hdr.values():
            h.reset()
