"""Observability building blocks: Prometheus metrics, OpenTelemetry tracing, JSON logs.

Every object here is created by the caller and passed in (a ``CollectorRegistry``, a
:class:`Tracing`), never taken from a global, so tests and benchmarks build their own.

Exceptions::

    TelemetryError            (ValueError)  root of this package
    └── LabelError                          a label value outside its bounded set
"""

from __future__ import annotations

from ops.telemetry.errors import LabelError, TelemetryError
from ops.telemetry.logs import JsonFormatter, configure_logging
from ops.telemetry.metrics import (
    BATCH_SIZE_BUCKETS,
    LATENCY_BUCKETS_S,
    RISK_DECISIONS,
    MeridianMetrics,
    MetricsServer,
    metric_names,
    serve,
)
from ops.telemetry.paths import default_run_dir, log_path, spans_path
from ops.telemetry.tracing import (
    SpanRecord,
    Tracing,
    destination_template,
    extract,
    inject,
    process_span,
    read_spans,
    send_span,
    setup_tracing,
    spans_of_order,
    waterfall,
)

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "LATENCY_BUCKETS_S",
    "RISK_DECISIONS",
    "JsonFormatter",
    "LabelError",
    "MeridianMetrics",
    "MetricsServer",
    "SpanRecord",
    "TelemetryError",
    "Tracing",
    "configure_logging",
    "default_run_dir",
    "destination_template",
    "extract",
    "inject",
    "log_path",
    "metric_names",
    "process_span",
    "read_spans",
    "send_span",
    "serve",
    "setup_tracing",
    "spans_of_order",
    "spans_path",
    "waterfall",
]
