"""Prometheus artifacts: alert rules (rules.yml, rules_test.yml) and the config renderer."""

from __future__ import annotations

from ops.prometheus.config import (
    RULES_FILE,
    PrometheusConfigError,
    ScrapeTarget,
    prometheus_binary,
    prometheus_command,
    render_prometheus_config,
)

__all__ = [
    "RULES_FILE",
    "PrometheusConfigError",
    "ScrapeTarget",
    "prometheus_binary",
    "prometheus_command",
    "render_prometheus_config",
]
