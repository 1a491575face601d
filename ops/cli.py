"""``meridian``: the one command-line entry point.

Exit codes: 0 ok, 1 unhealthy / check failed, 2 usage or setup error.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Subcommand groups owned by each bounded context; each module has register(subparsers).
PLUGINS = (
    "ops.cli_orders",
    "ops.cli_ledger",
    "ops.cli_md",
    "ops.cli_obs",
    "ops.cli_terraform",
    "ops.cli_demo",
)


def default_run_dir() -> Path:
    return Path(os.environ.get("MERIDIAN_RUN_DIR", "run")).resolve()


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# ---- up / down / status ------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from ops.devstack import Devstack, MeshPlan, recorded_running
    from ops.services import devstack_workers, start_telemetry
    from regions.topology import load_topology

    run_dir: Path = args.run_dir
    # from the process records alone: a moved or broken topology file must not hide them
    if recorded_running(run_dir):
        print(f"a mesh is already running from {run_dir}; `meridian down` first", file=sys.stderr)
        return 2
    if args.fresh and run_dir.exists():
        import shutil

        for sub in ("nats", "pg", "redis", "export", "logs", "traces", "md", "prometheus"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    elif (run_dir / "nats").exists():
        print(
            f"  .. reusing the streams, ledger and logs in {run_dir} (--fresh starts empty)",
            file=sys.stderr,
        )
    topo = load_topology(args.topology)
    if args.free_ports:
        plan = MeshPlan.free(topo, run_dir, pg_fsync=True)
        plan = dataclasses.replace(plan, sync_always=args.durable)
    else:
        plan = MeshPlan.fixed(topo, run_dir, sync_always=args.durable)
    ds = Devstack(plan, detach=True, progress=_progress)
    print(f"meridian up: {len(topo.regions)} regions, run dir {run_dir}", file=sys.stderr)
    ds.up(
        workers=() if args.no_workers else devstack_workers(),
        after=None if args.no_workers else start_telemetry,
    )
    # links and market data settle a few seconds after the last process is ready
    st = ds.wait_healthy(args.wait_s)
    _print_status(st, plan_view=ds)
    if not st["healthy"]:
        print(
            f"meridian up: the mesh is running but not healthy after {args.wait_s:.0f} s "
            f"(logs in {run_dir}/logs/; `meridian down` stops it)",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from ops.devstack import Devstack, down_recorded
    from ops.procs import OpsError
    from regions.topology import TopologyError

    try:
        ds = Devstack.attach(args.run_dir)
    except OpsError as e:
        print(f"nothing to stop: {e}", file=sys.stderr)
        return 0
    except TopologyError as e:
        print(
            f"meridian down: warning: cannot read the mesh's topology ({e}); "
            "stopping every recorded process",
            file=sys.stderr,
        )
        n = down_recorded(args.run_dir)
        print(f"stopped {n} processes ({args.run_dir})")
        return 0
    n = len(ds.records)
    ds.down()
    print(f"stopped {n} processes ({args.run_dir})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ops.devstack import Devstack
    from ops.procs import OpsError

    try:
        ds = Devstack.attach(args.run_dir)
    except OpsError as e:
        print(str(e), file=sys.stderr)
        return 1
    st = ds.status()
    if args.json:
        print(json.dumps(st, indent=1))
    else:
        _print_status(st, plan_view=ds)
    return 0 if st["healthy"] else 1


def _print_status(st: dict[str, Any], plan_view: Any = None) -> None:
    ok = {True: "ok", False: "DOWN"}
    print(
        table(
            [
                (code, ok[v["server"]], ok[v["jetstream"]], v["client_port"], v["monitor_port"])
                for code, v in st["regions"].items()
            ],
            ["region", "server", "jetstream", "client", "monitor"],
        )
    )
    print()
    print(
        table(
            [
                (
                    name,
                    f"{v['dialer']} -> {v['acceptor']}",
                    v["role"],
                    v["proxy"],
                    v["one_way_ms"],
                    v["state"],
                    "ok" if v["healthy"] else "UNHEALTHY",
                )
                for name, v in st["links"].items()
            ],
            ["link", "leaf", "role", "proxy", "one-way ms", "leaf conn", "health"],
        )
    )
    print()
    print(
        table(
            [
                (
                    n,
                    v["kind"],
                    v["region"] or "-",
                    v["pid"],
                    v["port"] or "-",
                    "up" if v["alive"] else v.get("state", "dead").upper(),
                )
                for n, v in st["processes"].items()
            ],
            ["process", "kind", "region", "pid", "port", "state"],
        )
    )
    if st.get("market_data"):
        print()
        print(
            table(
                [
                    (
                        code,
                        "-" if v["age_s"] is None else v["age_s"],
                        ", ".join(sorted(v["stale"])) or "-",
                        "ok" if v["healthy"] else f"UNHEALTHY: {v['why']}",
                    )
                    for code, v in st["market_data"].items()
                ],
                ["md view", "updated s ago", "stale sources", "health"],
            )
        )
    if plan_view is not None:
        print(f"\nPostgreSQL {plan_view.pg_dsn}   Redis {plan_view.redis_url}")
        print(f"credentials: {st['run_dir']}/credentials.json   logs: {st['run_dir']}/logs/")
    print(f"\nmesh {'HEALTHY' if st['healthy'] else 'UNHEALTHY'}")


def cmd_link(args: argparse.Namespace) -> int:
    from ops.devstack import Devstack

    ctl = Devstack.attach(args.run_dir).links
    if args.action == "status":
        rows = ctl.status()
    elif args.action == "latency":
        rows = ctl.send("latency", args.link, ms=args.ms)["links"]
    else:
        rows = ctl.send(args.action, args.link)["links"]
    print(
        table(
            [(r["link"], r["state"], r["one_way_ms"], r["connections"]) for r in rows],
            ["link", "state", "one-way ms", "connections"],
        )
    )
    return 0


# ---- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="meridian", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run-dir",
        type=Path,
        default=default_run_dir(),
        help="mesh run directory (env MERIDIAN_RUN_DIR, default ./run)",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start the local 3-region mesh")
    p.add_argument("--topology", type=Path, default=None, help="topology TOML")
    p.add_argument(
        "--durable", action="store_true", help="fsync every JetStream write (sync_interval: always)"
    )
    p.add_argument("--no-workers", action="store_true", help="servers only")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start from empty streams, ledger and logs (default: keep the last run's)",
    )
    p.add_argument(
        "--free-ports",
        action="store_true",
        help="any free ports instead of the topology's (a second mesh beside one)",
    )
    p.add_argument(
        "--wait-s",
        type=float,
        default=20.0,
        help="how long to wait for a healthy mesh once started (exit 1 if it is not)",
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop everything `up` started")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="health per region, link and process (exit 1 if unhealthy)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("link", help="cut, blackhole or restore an inter-region link")
    p.add_argument("action", choices=["status", "cut", "blackhole", "restore", "latency"])
    p.add_argument("link", nargs="?", default=None, help="e.g. lon-sgp (default: all)")
    p.add_argument("ms", nargs="?", type=float, default=None, help="one-way ms for latency")
    p.set_defaults(func=cmd_link)

    for mod in PLUGINS:
        register: Callable[[Any], None] | None = None
        try:
            register = importlib.import_module(mod).register
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
        if register is not None:
            register(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from ops.procs import Interrupted, OpsError
    from regions.topology import TopologyError

    try:
        rc = args.func(args)
    except (OpsError, TopologyError) as e:
        print(f"meridian: {e}", file=sys.stderr)
        rc = 2
    except Interrupted as e:
        rc = 128 + e.signum
    except KeyboardInterrupt:
        rc = 130
    sys.exit(rc)


if __name__ == "__main__":
    main()
