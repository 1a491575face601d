"""``meridian trace`` and ``meridian logs``: read a run directory's spans and JSON logs.

Wired into the single CLI by ``register(subparsers)``; each command sets ``func`` on its
parser, a callable taking the parsed ``argparse.Namespace`` and returning the exit code::

    sub = parser.add_subparsers(dest="command", required=True)
    cli_obs.register(sub)
    args = parser.parse_args()
    raise SystemExit(args.func(args))

Exit codes: 0 found, 1 nothing matched (no such order / no log lines), 2 no run data at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from ops.telemetry.paths import default_run_dir
from ops.telemetry.tracing import read_spans, spans_of_order, trace_files, waterfall

__all__ = ["cmd_logs", "cmd_trace", "iter_logs", "register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``trace`` and ``logs`` commands to the CLI's subparsers."""
    p = sub.add_parser("trace", help="print an order's span tree as a waterfall")
    p.add_argument("order_id", help="value of the span attribute meridian.order_id")
    _run_dir_arg(p)
    p.add_argument("--width", type=int, default=40, help="bar width in characters")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("logs", help="read the JSON logs of the run, merged in time order")
    p.add_argument("--region", help="only this region")
    p.add_argument("--order", metavar="ID", help="only lines about this order id")
    p.add_argument("--service", help="only this service")
    p.add_argument("--trace", metavar="TRACE_ID", help="only lines of this trace")
    p.add_argument("--json", action="store_true", help="print the raw JSON lines")
    _run_dir_arg(p)
    p.set_defaults(func=cmd_logs)


def _run_dir_arg(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subparser default would overwrite the main parser's global --run-dir.
    p.add_argument(
        "--run-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="run directory (default: $MERIDIAN_RUN_DIR or ./run)",
    )


def cmd_trace(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the waterfall of every trace that touched ``args.order_id``."""
    out = out or sys.stdout
    run_dir: Path = getattr(args, "run_dir", None) or default_run_dir()
    files = trace_files(run_dir)
    if not files:
        print(f"no span files in {run_dir / 'traces'}", file=sys.stderr)
        return 2
    spans = spans_of_order(read_spans(files), args.order_id)
    if not spans:
        print(f"no spans for order {args.order_id!r} in {run_dir / 'traces'}", file=sys.stderr)
        return 1
    print(waterfall(spans, width=args.width), file=out)
    return 0


def iter_logs(
    run_dir: Path,
    *,
    region: str | None = None,
    order: str | None = None,
    service: str | None = None,
    trace_id: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Matching log records of every ``<run-dir>/logs/*.jsonl`` file, oldest first."""
    records: list[dict[str, Any]] = []
    for path in sorted((run_dir / "logs").glob("*.jsonl")):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line of a live file
            if not isinstance(rec, dict):
                continue
            if region is not None and rec.get("region") != region:
                continue
            if service is not None and rec.get("service") != service:
                continue
            if order is not None and str(rec.get("order_id")) != order:
                continue
            if trace_id is not None and rec.get("trace_id") != trace_id:
                continue
            records.append(rec)
    # Every file writes the same UTC ISO format, so text order is time order; sort is stable.
    records.sort(key=lambda r: str(r.get("ts", "")))
    yield from records


def cmd_logs(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the matching log lines of the run, merged across processes in time order."""
    out = out or sys.stdout
    run_dir: Path = getattr(args, "run_dir", None) or default_run_dir()
    if not (run_dir / "logs").is_dir():
        print(f"no log directory {run_dir / 'logs'}", file=sys.stderr)
        return 2
    n = 0
    for rec in iter_logs(
        run_dir,
        region=args.region,
        order=args.order,
        service=args.service,
        trace_id=args.trace,
    ):
        n += 1
        print(json.dumps(rec, separators=(",", ":")) if args.json else _human(rec), file=out)
    return 0 if n else 1


_SHOWN = ("ts", "level", "region", "service", "msg", "logger")


def _human(rec: dict[str, Any]) -> str:
    where = f"{rec.get('service', '?')}@{rec.get('region', '?')}"
    extra = " ".join(
        f"{k}={v}" for k, v in rec.items() if k not in _SHOWN and k not in {"exc", "stack"}
    )
    line = f"{rec.get('ts', '')} {rec.get('level', ''):<7} {where:<18} {rec.get('msg', '')}"
    if extra:
        line += f"  {extra}"
    if "exc" in rec:
        line += "\n" + str(rec["exc"])
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (``python -m ops.cli_obs``) until the main CLI wires ``register``."""
    parser = argparse.ArgumentParser(prog="meridian")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
