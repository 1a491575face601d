"""OpenTelemetry tracing over NATS: provider setup, header propagation, spans, waterfall.

Setup (one per process; the result is passed to the code that traces, never made global)::

    tracing = setup_tracing(service="gateway", region="lon", run_dir=run_dir)
    tracer = tracing.tracer                 # a no-op tracer when tracing is off
    ...
    tracing.shutdown()                      # flushes the BatchSpanProcessor

Export goes to OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set *and* an OTLP exporter package
is importable; otherwise to a JSON-lines file of ours, one finished span per line
(``<run-dir>/traces/<service>-<region>.jsonl``), which ``meridian trace <order id>`` reads.
``MERIDIAN_TRACING=off`` (or ``enabled=False``) turns tracing off entirely: a no-op tracer,
no processor, no export; :func:`send_span`/:func:`process_span` then cost one branch.

Propagation is W3C Trace Context in NATS message headers::

    headers: dict[str, str] = {}
    with send_span(tracer, subject, headers, order_id=oid):
        await js.publish(subject, payload, headers=headers)      # traceparent injected

    with process_span(tracer, "EXEC", msg.headers, subject=msg.subject, order_id=oid):
        ...                                                      # child of the publisher

Span names and attributes follow the OpenTelemetry messaging semantic conventions:
``"{operation name} {destination}"`` (``publish mrd.lon.ord``, ``process EXEC``) with
``messaging.system=nats``, ``messaging.destination.name`` (the full subject),
``messaging.destination.template`` (its low-cardinality prefix), ``messaging.operation.name``
and ``messaging.operation.type`` (``send`` for publish/request, as the current conventions
renamed the deprecated ``publish`` type, then ``receive`` and ``process``). Every span of an
order carries ``meridian.order_id``. The asyncio auto-instrumentation is deliberately not used
(it wraps every task and distorts latency).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NoOpTracer, Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ops.telemetry.paths import default_run_dir, spans_path

__all__ = [
    "ORDER_ID",
    "JsonLinesSpanExporter",
    "SpanRecord",
    "Tracing",
    "destination_template",
    "extract",
    "inject",
    "process_span",
    "read_spans",
    "send_span",
    "setup_tracing",
    "spans_of_order",
    "trace_files",
    "waterfall",
]

log = logging.getLogger(__name__)

ORDER_ID: Final = "meridian.order_id"
"""Span attribute carrying the order id on every span of an order."""
REGION: Final = "meridian.region"
"""Resource attribute: region code of the process."""
TRACING_ENV: Final = "MERIDIAN_TRACING"
"""``off``/``0``/``false`` turns tracing off in every process."""

_SYSTEM = "messaging.system"
_DEST = "messaging.destination.name"
_DEST_TEMPLATE = "messaging.destination.template"
_OP_TYPE = "messaging.operation.type"
_OP_NAME = "messaging.operation.name"
_CONSUMER = "messaging.consumer.group.name"
_BODY_SIZE = "messaging.message.body.size"

_PROPAGATOR = TraceContextTextMapPropagator()
_NOOP_TRACER = NoOpTracer()
NOOP_TRACER = _NOOP_TRACER
"""A tracer that records nothing (tracing off, or a worker built without telemetry)."""


# ---- propagation -------------------------------------------------------------------------


def inject(headers: dict[str, str], context: Context | None = None) -> dict[str, str]:
    """Write ``traceparent`` (and ``tracestate``) of the current span into ``headers``.

    Does nothing when there is no recording span (tracing off). Returns ``headers``.
    """
    _PROPAGATOR.inject(headers, context=context)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    """The remote parent context carried by NATS message ``headers`` (empty if none)."""
    return _PROPAGATOR.extract(headers or {})


# ---- span helpers ------------------------------------------------------------------------


def destination_template(subject: str) -> str:
    """Low-cardinality form of a subject, used in span names.

    ``mrd.lon.ord.LON-HF-01.ab12`` -> ``mrd.lon.ord``; request subjects keep the entry region,
    ``mrd.v1.entry.lon.LON-HF-01.new`` -> ``mrd.v1.entry.lon``. Other subjects keep their first
    three tokens.
    """
    tokens = subject.split(".")
    n = 4 if len(tokens) > 2 and tokens[1] == "v1" else 3
    return ".".join(tokens[:n])


@contextlib.contextmanager
def send_span(
    tracer: trace.Tracer,
    subject: str,
    headers: dict[str, str],
    *,
    order_id: str | None = None,
    operation: str = "publish",
    body_size: int | None = None,
    attributes: Mapping[str, str | int | float | bool] | None = None,
) -> Iterator[Span]:
    """Span around sending one message; injects its context into ``headers``.

    Args:
        tracer: From :class:`Tracing`; a no-op tracer makes this nearly free.
        subject: The subject published to (or requested).
        headers: Message headers, filled with ``traceparent`` before the body runs.
        order_id: Set as ``meridian.order_id``.
        operation: ``publish`` (PRODUCER span) or ``request`` (CLIENT span, request/reply).
        body_size: Payload size in bytes, if known.
        attributes: Extra span attributes.
    """
    if tracer is _NOOP_TRACER or isinstance(tracer, NoOpTracer):
        yield trace.INVALID_SPAN
        return
    dest = destination_template(subject)
    attrs: dict[str, Any] = {
        _SYSTEM: "nats",
        _DEST: subject,
        _DEST_TEMPLATE: dest,
        _OP_TYPE: "send",
        _OP_NAME: operation,
    }
    if order_id is not None:
        attrs[ORDER_ID] = order_id
    if body_size is not None:
        attrs[_BODY_SIZE] = body_size
    if attributes:
        attrs.update(attributes)
    kind = SpanKind.CLIENT if operation == "request" else SpanKind.PRODUCER
    with tracer.start_as_current_span(f"{operation} {dest}", kind=kind, attributes=attrs) as span:
        _PROPAGATOR.inject(headers)
        yield span


@contextlib.contextmanager
def process_span(
    tracer: trace.Tracer,
    destination: str,
    headers: Mapping[str, str] | None,
    *,
    subject: str | None = None,
    order_id: str | None = None,
    operation: str = "process",
    consumer: str | None = None,
    attributes: Mapping[str, str | int | float | bool] | None = None,
) -> Iterator[Span]:
    """Span around handling one received message, child of the sender's span.

    Args:
        tracer: From :class:`Tracing`.
        destination: Low-cardinality name for the span name: a stream (``EXEC``) or a subject
            template (``mrd.v1.entry.lon``).
        headers: The message's headers (``msg.headers``); the parent is extracted from them.
        subject: The concrete subject, recorded as ``messaging.destination.name``.
        order_id: Set as ``meridian.order_id``.
        operation: ``process`` (CONSUMER span) or ``receive`` (CLIENT span, a pull fetch).
        consumer: Durable consumer name, recorded as ``messaging.consumer.group.name``.
        attributes: Extra span attributes.
    """
    if tracer is _NOOP_TRACER or isinstance(tracer, NoOpTracer):
        yield trace.INVALID_SPAN
        return
    attrs: dict[str, Any] = {
        _SYSTEM: "nats",
        _DEST: subject or destination,
        _DEST_TEMPLATE: destination,
        _OP_TYPE: operation,
        _OP_NAME: operation,
    }
    if order_id is not None:
        attrs[ORDER_ID] = order_id
    if consumer is not None:
        attrs[_CONSUMER] = consumer
    if attributes:
        attrs.update(attributes)
    kind = SpanKind.CLIENT if operation == "receive" else SpanKind.CONSUMER
    with tracer.start_as_current_span(
        f"{operation} {destination}", context=extract(headers), kind=kind, attributes=attrs
    ) as span:
        yield span


# ---- span records and the file exporter ---------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SpanRecord:
    """One finished span as stored in a span file (one JSON object per line)."""

    trace_id: str
    """32 hex digits."""
    span_id: str
    """16 hex digits."""
    parent_id: str | None
    name: str
    kind: str
    """``INTERNAL``, ``SERVER``, ``CLIENT``, ``PRODUCER`` or ``CONSUMER``."""
    start_ns: int
    """Unix epoch nanoseconds."""
    end_ns: int
    attributes: Mapping[str, Any] = field(default_factory=dict)
    service: str = ""
    region: str = ""
    status: str = "UNSET"

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    def to_json(self) -> str:
        return json.dumps(
            {
                "trace_id": self.trace_id,
                "span_id": self.span_id,
                "parent_id": self.parent_id,
                "name": self.name,
                "kind": self.kind,
                "start_ns": self.start_ns,
                "end_ns": self.end_ns,
                "attributes": dict(self.attributes),
                "service": self.service,
                "region": self.region,
                "status": self.status,
            },
            separators=(",", ":"),
            default=str,
        )

    @classmethod
    def from_json(cls, line: str) -> SpanRecord:
        """Parse one line of a span file; raises ``ValueError``/``KeyError`` if malformed."""
        d = json.loads(line)
        return cls(
            trace_id=str(d["trace_id"]),
            span_id=str(d["span_id"]),
            parent_id=d.get("parent_id") or None,
            name=str(d["name"]),
            kind=str(d.get("kind", "INTERNAL")),
            start_ns=int(d["start_ns"]),
            end_ns=int(d["end_ns"]),
            attributes=dict(d.get("attributes") or {}),
            service=str(d.get("service", "")),
            region=str(d.get("region", "")),
            status=str(d.get("status", "UNSET")),
        )

    @classmethod
    def from_span(cls, span: ReadableSpan) -> SpanRecord:
        """Convert an SDK span."""
        ctx = span.context
        res = span.resource.attributes if span.resource is not None else {}
        attrs = {
            k: list(v) if isinstance(v, tuple) else v for k, v in (span.attributes or {}).items()
        }
        return cls(
            trace_id=f"{ctx.trace_id:032x}" if ctx else "",
            span_id=f"{ctx.span_id:016x}" if ctx else "",
            parent_id=f"{span.parent.span_id:016x}" if span.parent is not None else None,
            name=span.name,
            kind=span.kind.name,
            start_ns=span.start_time or 0,
            end_ns=span.end_time or 0,
            attributes=attrs,
            service=str(res.get("service.name", "")),
            region=str(res.get(REGION, "")),
            status=span.status.status_code.name,
        )


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a file, one JSON object per line (see :class:`SpanRecord`).

    Each export batch is written and flushed at once, so a reader sees whole lines only
    (except, at worst, a torn last line after a crash; :func:`read_spans` skips it).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        text = "".join(SpanRecord.from_span(s).to_json() + "\n" for s in spans)
        with self._lock:
            if self._file is None:
                return SpanExportResult.FAILURE
            try:
                self._file.write(text)
                self._file.flush()
            except OSError:
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            if self._file is not None:
                self._file.flush()
        return True

    def shutdown(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


# ---- setup ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Tracing:
    """Tracing of one process: the tracer to use and how spans leave the process."""

    tracer: trace.Tracer
    provider: TracerProvider | None
    """None when tracing is off."""
    exporter: str
    """``off``, ``file`` or ``otlp-http``/``otlp-grpc``."""
    path: Path | None = None
    """The span file when ``exporter == "file"``."""

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        """Export every finished span now."""
        if self.provider is None:
            return True
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Flush and stop the exporter (idempotent)."""
        if self.provider is not None:
            self.provider.shutdown()


SAMPLE_ENV = "MERIDIAN_TRACE_SAMPLE"


def sampler_from_env() -> Any:
    """Head sampling: the first span of an order (desk or gateway) decides for all hops.

    ``MERIDIAN_TRACE_SAMPLE`` is the fraction of new traces kept (default 1: every order, the
    devstack's choice; the benchmark shows what that costs). Child spans follow their parent's
    decision, so a trace is always whole or absent.
    """
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    try:
        ratio = float(os.environ.get(SAMPLE_ENV, "1"))
    except ValueError:
        ratio = 1.0
    return ParentBased(TraceIdRatioBased(min(1.0, max(0.0, ratio))))


def tracing_enabled_from_env() -> bool:
    """False when ``MERIDIAN_TRACING`` is ``off``, ``0``, ``false`` or ``no``."""
    return os.environ.get(TRACING_ENV, "on").strip().lower() not in {"off", "0", "false", "no"}


def setup_tracing(
    *,
    service: str,
    region: str,
    run_dir: str | Path | None = None,
    path: str | Path | None = None,
    enabled: bool | None = None,
    otlp_endpoint: str | None = None,
    schedule_delay_ms: int = 200,
) -> Tracing:
    """Build a tracer provider for one process (not installed as the global provider).

    Args:
        service: ``service.name`` resource attribute.
        region: ``meridian.region`` resource attribute.
        run_dir: Run directory for the span file (default ``$MERIDIAN_RUN_DIR`` or ``./run``).
        path: Explicit span file; overrides ``run_dir``.
        enabled: False gives a no-op tracer; None reads ``MERIDIAN_TRACING``.
        otlp_endpoint: OTLP endpoint; None reads ``OTEL_EXPORTER_OTLP_ENDPOINT``. Used only if
            an OTLP exporter package is importable, else the file exporter is used (logged).
        schedule_delay_ms: Batch export delay; short, so ``meridian trace`` sees spans soon.
    """
    if enabled is None:
        enabled = tracing_enabled_from_env()
    if not enabled:
        return Tracing(tracer=_NOOP_TRACER, provider=None, exporter="off")
    resource = Resource.create({"service.name": service, REGION: region})
    provider = TracerProvider(resource=resource, shutdown_on_exit=True, sampler=sampler_from_env())
    exporter: SpanExporter | None = None
    kind = "file"
    file_path: Path | None = None
    endpoint = otlp_endpoint
    from_env = False
    if endpoint is None:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        from_env = endpoint is not None
    if endpoint:
        found = _otlp_exporter(None if from_env else endpoint)
        if found is None:
            log.warning(
                "OTLP endpoint %s configured but no OTLP exporter package is installed; "
                "writing spans to a file instead",
                endpoint,
            )
        else:
            exporter, kind = found
    if exporter is None:
        file_path = (
            Path(path)
            if path is not None
            else spans_path(run_dir if run_dir is not None else default_run_dir(), service, region)
        )
        exporter = JsonLinesSpanExporter(file_path)
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=16384,
            schedule_delay_millis=schedule_delay_ms,
            max_export_batch_size=1024,
        )
    )
    tracer = provider.get_tracer("meridian")
    return Tracing(tracer=tracer, provider=provider, exporter=kind, path=file_path)


def _otlp_exporter(endpoint: str | None) -> tuple[SpanExporter, str] | None:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    order = ["grpc", "http"] if protocol == "grpc" else ["http", "grpc"]
    for proto in order:
        try:
            mod = importlib.import_module(
                f"opentelemetry.exporter.otlp.proto.{proto}.trace_exporter"
            )
        except ImportError:
            continue
        cls = mod.OTLPSpanExporter
        if endpoint is None:  # let the exporter apply the OTEL_* environment rules itself
            return cls(), f"otlp-{proto}"
        if proto == "http" and not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        return cls(endpoint=endpoint), f"otlp-{proto}"
    return None


# ---- reading span files and the waterfall ----------------------------------------------------


def trace_files(run_dir: str | Path) -> list[Path]:
    """Every span file of a run directory."""
    return sorted((Path(run_dir) / "traces").glob("*.jsonl"))


def read_spans(paths: Iterable[str | Path]) -> list[SpanRecord]:
    """Every span of the given span files; torn or malformed lines are skipped."""
    out: list[SpanRecord] = []
    for p in paths:
        try:
            lines = Path(p).read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            if not line.strip():
                continue
            try:
                out.append(SpanRecord.from_json(line))
            except (ValueError, KeyError, TypeError):
                continue
    return out


def spans_of_order(spans: Iterable[SpanRecord], order_id: str) -> list[SpanRecord]:
    """Every span of every trace that has a span with ``meridian.order_id == order_id``."""
    spans = list(spans)
    traces = {s.trace_id for s in spans if str(s.attributes.get(ORDER_ID)) == order_id}
    return [s for s in spans if s.trace_id in traces]


def waterfall(spans: Iterable[SpanRecord], *, width: int = 40) -> str:
    """Render span trees as a terminal waterfall, one block per trace.

    Each line shows the offset from the trace's first span and the duration, both in
    microseconds, the span name indented by depth, where it ran (``service@region``) and a bar
    placing the span on the trace's time axis. Spans whose parent is not in ``spans`` are
    shown as roots.
    """
    by_trace: dict[str, list[SpanRecord]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s)
    blocks = [
        _render_trace(tid, ss, width)
        for tid, ss in sorted(by_trace.items(), key=lambda kv: min(s.start_ns for s in kv[1]))
    ]
    return "\n\n".join(blocks)


def _render_trace(trace_id: str, spans: list[SpanRecord], width: int) -> str:
    t0 = min(s.start_ns for s in spans)
    t1 = max(s.end_ns for s in spans)
    total = max(t1 - t0, 1)
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRecord]] = {}
    for s in spans:
        parent = s.parent_id if s.parent_id in ids else None
        children.setdefault(parent, []).append(s)
    for kids in children.values():
        kids.sort(key=lambda s: (s.start_ns, s.end_ns))

    rows: list[tuple[int, SpanRecord]] = []
    seen: set[str] = set()

    def walk(parent: str | None, depth: int) -> None:
        for s in children.get(parent, []):
            if s.span_id in seen:  # duplicate ids in bad input: never loop
                continue
            seen.add(s.span_id)
            rows.append((depth, s))
            walk(s.span_id, depth + 1)

    walk(None, 0)
    labels = [("  " * d) + s.name for d, s in rows]
    wheres = [f"{s.service}@{s.region}" if s.service or s.region else "" for _, s in rows]
    lw = max([len("span"), *map(len, labels)])
    ww = max([len("where"), *map(len, wheres)])
    head = f"trace {trace_id}  {len(spans)} spans  {total / 1000:,.0f} us"
    cols = f"{'start_us':>10} {'dur_us':>10}  {'span':<{lw}}  {'where':<{ww}}"
    lines = [head, cols]
    for (_, s), label, where in zip(rows, labels, wheres, strict=True):
        off = s.start_ns - t0
        a = min(int(off * width / total), width - 1)
        b = max(a + 1, min(width, round((off + s.duration_ns) * width / total)))
        bar = " " * a + "█" * (b - a) + " " * (width - b)
        lines.append(
            f"{off / 1000:>10,.0f} {s.duration_ns / 1000:>10,.0f}  {label:<{lw}}  "
            f"{where:<{ww}}  |{bar}|"
        )
    return "\n".join(lines)
