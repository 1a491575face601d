"""Structured JSON logs: one JSON object per line, one file per process.

Every line carries ``ts`` (UTC, ISO 8601 with microseconds), ``level``, ``region``,
``service``, ``logger``, ``msg``, and, when known, ``order_id``, ``trace_id`` and ``span_id``.
``order_id``/``trace_id`` come from ``extra=`` or, for the trace, from the current span::

    log_file = configure_logging(service="risk", region="lon", run_dir=run_dir)
    log.info("order accepted", extra={"order_id": oid, "account": acct})

Other ``extra=`` fields are kept as top-level keys (non-JSON values as ``str``). Files go to
``<run-dir>/logs/<service>-<region>.jsonl``, read back by ``meridian logs``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from opentelemetry import trace

from ops.telemetry.paths import default_run_dir, log_path

__all__ = ["JsonFormatter", "configure_logging", "log_path"]

_STANDARD: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}
_MARK = "_meridian_json_handler"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object (no newline inside) for a given process."""

    def __init__(self, *, service: str, region: str) -> None:
        super().__init__()
        self.service = service
        self.region = region

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname,
            "region": self.region,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        for k in ("order_id", "trace_id", "span_id"):
            v = extras.pop(k, None)
            if v is not None:
                out[k] = str(v)
        if "trace_id" not in out:
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                out["trace_id"] = f"{ctx.trace_id:032x}"
                out["span_id"] = f"{ctx.span_id:016x}"
        for k, v in extras.items():
            if not k.startswith("_") and k not in out:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, separators=(",", ":"), default=str, ensure_ascii=False)


def configure_logging(
    *,
    service: str,
    region: str,
    run_dir: str | Path | None = None,
    stderr: bool = False,
    level: int | str = logging.INFO,
    logger: logging.Logger | None = None,
) -> Path:
    """Send ``logger`` (default: the root logger) to this process's JSON log file.

    Idempotent: handlers installed by an earlier call on the same logger are replaced.

    Args:
        service: Service name on every line and in the file name.
        region: Region code on every line and in the file name.
        run_dir: Run directory (default ``$MERIDIAN_RUN_DIR`` or ``./run``).
        stderr: Also write the same JSON lines to stderr.
        level: Level of ``logger``.
        logger: Logger to configure (tests pass their own).

    Returns:
        The log file path.
    """
    target = logger if logger is not None else logging.getLogger()
    path = log_path(run_dir if run_dir is not None else default_run_dir(), service, region)
    path.parent.mkdir(parents=True, exist_ok=True)
    for h in list(target.handlers):
        if getattr(h, _MARK, False):
            target.removeHandler(h)
            h.close()
    fmt = JsonFormatter(service=service, region=region)
    handlers: list[logging.Handler] = [logging.FileHandler(path, encoding="utf-8")]
    if stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setFormatter(fmt)
        setattr(h, _MARK, True)
        target.addHandler(h)
    target.setLevel(level)
    return path
