"""Where telemetry files live inside a run directory.

Layout (one file per process, named ``<service>-<region>``)::

    <run-dir>/logs/<service>-<region>.jsonl      JSON log lines (ops.telemetry.logs)
    <run-dir>/traces/<service>-<region>.jsonl    one finished span per line (ops.telemetry.tracing)
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_DIR_ENV = "MERIDIAN_RUN_DIR"


def default_run_dir() -> Path:
    """``$MERIDIAN_RUN_DIR`` if set, else ``./run``."""
    return Path(os.environ.get(RUN_DIR_ENV) or "run")


def log_path(run_dir: str | Path, service: str, region: str) -> Path:
    """The JSON log file of one process."""
    return Path(run_dir) / "logs" / f"{service}-{region}.jsonl"


def spans_path(run_dir: str | Path, service: str, region: str) -> Path:
    """The span file of one process."""
    return Path(run_dir) / "traces" / f"{service}-{region}.jsonl"
