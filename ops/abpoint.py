"""A/B of the order path at one offered rate: latency and CPU per order, per process.

``meridian bench`` measures everything once in about 8 minutes; comparing two variants of the
mesh needs the same point repeated under each, on the same mesh, minutes apart (the VM's
speed drifts by 10-20 % within an hour). This starts one private bench mesh and, for each
mode in turn, runs ``--reps`` points of ``--seconds`` at ``--rate`` orders/s (lon desk, lon
symbols, crossing pairs, tracing off), then optionally the closed-loop maximum of one
region or of several at once (``--max-regions lon,nyc,sgp``)::

    python -m ops.abpoint --modes base,noledger --reps 3
    # with a prototype's patch applied (docs/decisions/0006/), which reads the variable:
    python -m ops.abpoint --modes base,env:MERIDIAN_RISK_ENTRY=1+stop:gateway-lon --max

A mode is ``+``-joined steps applied to the mesh before its points. Modes are cumulative (each
starts from the mesh the last one left), so ``base`` may only come first: to compare A, B and A
again, run the tool twice.

* ``base``: nothing (the mesh as ``meridian bench`` starts it);
* ``noledger``: stop every ledger writer (what the post-trade path costs the order path);
* ``linger<ms>``: restart ledger-lon with ``--linger-ms <ms>``;
* ``stop:<process>``: stop one process of the mesh (e.g. ``gateway-lon``);
* ``entry:direct`` / ``entry:gateway``: how the load generators enter orders from then on
  (direct: stored in ORDERS by the desk, contract.md);
* ``env:<NAME>=<value>``: restart the order-path workers (gateway, risk, execution) with
  that variable in their environment (how a prototype behind a variable is measured; see
  docs/decisions/0006-risk-at-the-entry.md).

Prints one line per point: order->execution and submit->ack p50/p99, the machine's busy cores,
and CPU microseconds per executed order of every process above 20 us (PostgreSQL with its
backends, the in-process desk as ``loadgen (desk)``): :func:`ops.bench.cpu_us_per_order`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ops import bench as b
from ops.devstack import Devstack

ORDER_PATH = ("gateway", "risk", "execution")


@dataclasses.dataclass(frozen=True)
class Step:
    kind: str  # base | noledger | linger | stop | env | entry
    arg: str = ""


def parse_mode(mode: str) -> list[Step]:
    """``"stop:gateway-lon+env:X=1"`` -> its steps; raises ValueError on an unknown step."""
    steps = []
    for part in mode.split("+"):
        if part in ("base", "noledger"):
            steps.append(Step(part))
        elif part.startswith("linger") and part[6:].isdigit():
            steps.append(Step("linger", part[6:]))
        elif part.startswith("stop:") and part[5:]:
            steps.append(Step("stop", part[5:]))
        elif part.startswith("env:") and "=" in part[4:] and not part[4:].startswith("="):
            steps.append(Step("env", part[4:]))
        elif part in ("entry:direct", "entry:gateway"):
            steps.append(Step("entry", part[6:]))
        else:
            raise ValueError(f"unknown step {part!r} in mode {mode!r}")
    return steps


def _apply(ds: Devstack, step: Step) -> None:
    if step.kind == "noledger":
        for name in [n for n in ds.procs if n.startswith("ledger-")]:
            ds.stop(name)  # out of the mesh: a later env step does not start it again
    elif step.kind == "linger":
        rec = ds.records["ledger-lon"]
        argv = list(rec.argv)
        if "--linger-ms" in argv:
            i = argv.index("--linger-ms")
            del argv[i : i + 2]
        ds.records["ledger-lon"] = dataclasses.replace(rec, argv=[*argv, "--linger-ms", step.arg])
        ds.procs["ledger-lon"].stop()
        ds.restart_worker("ledger-lon")
    elif step.kind == "stop":
        ds.stop(step.arg)
    elif step.kind == "env":
        name, value = step.arg.split("=", 1)
        os.environ[name] = value  # the devstack passes its environment to the workers
        for proc in [n for n in list(ds.procs) if n.split("-")[0] in ORDER_PATH]:
            ds.procs[proc].stop()
            ds.restart_worker(proc)
    time.sleep(2.0)


def point(
    ds: Devstack, *, rate: float, seconds: float, run_id: str, entry: str = "gateway"
) -> dict[str, Any]:
    b.wait_idle(ds)
    p = b.latency_point(ds, seconds=seconds, rate=rate, run_id=run_id, entry=entry)
    lat = p["latency_1000"]
    return {
        "order_to_execution": lat["order_to_execution"],
        "submit_to_ack": lat["submit_to_ack"],
        "completed_per_s": lat["completed_per_s"],
        "busy_cores": p["machine_busy_cores_1000"],
        "cpu_us_per_order": p["cpu_us_per_order_1000"],
    }


def line(mode: str, i: int, p: dict[str, Any]) -> str:
    o2e, ack = p["order_to_execution"], p["submit_to_ack"]
    if not o2e.get("count") or not ack.get("count"):
        return f"{mode} #{i}: no order executed ({ack.get('count', 0)} acked): see the logs"
    cpu = ", ".join(f"{k} {v:.0f}" for k, v in p["cpu_us_per_order"].items() if v > 20)
    return (
        f"{mode} #{i}: order->execution p50 {o2e['p50_ms']:.2f} p99 {o2e['p99_ms']:.1f} ms, "
        f"ack p50 {ack['p50_ms']:.2f} ms, {p['completed_per_s']:.0f}/s, "
        f"busy {p['busy_cores']} cores; us/order: {cpu}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="A/B of the order path at one offered rate")
    ap.add_argument("--modes", default="base", help="comma-separated modes (module docstring)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max", action="store_true", help="also the closed-loop max, twice a mode")
    ap.add_argument(
        "--inflight",
        type=int,
        default=0,
        help="orders in flight per load process for --max (default: the bench's 256, 128 each)",
    )
    ap.add_argument(
        "--window",
        choices=("ack", "report"),
        default="ack",
        help="what frees a slot in --max's closed loop: the ack, or the first report "
        "(compares shapes whose acks mean different things)",
    )
    ap.add_argument(
        "--max-regions",
        default="lon",
        help="comma-separated regions loaded at once for --max (one load process each)",
    )
    args = ap.parse_args(argv)
    modes = [(m, parse_mode(m)) for m in args.modes.split(",")]
    if any(Step("base") in steps for _, steps in modes[1:]):
        ap.error("modes are cumulative: 'base' may only be the first (run the tool again)")
    os.environ["MERIDIAN_TRACING"] = "off"
    tmp = Path(tempfile.mkdtemp(prefix="abpoint-"))
    print(f"mesh and its logs: {tmp}", flush=True)
    ds = b.start_bench_mesh(tmp)
    try:
        b.restart_order_path(ds, tracing=False)
        asyncio.run(b._set_limits(ds))
        entry = "gateway"
        for k, (mode, steps) in enumerate(modes):
            for step in steps:
                if step.kind == "entry":  # the load generators' from then on, not the mesh's
                    entry = step.arg
                else:
                    _apply(ds, step)
            for i in range(args.reps):
                p = point(
                    ds, rate=args.rate, seconds=args.seconds, run_id=f"ab{k}p{i}", entry=entry
                )
                print(line(mode, i, p), flush=True)
            for i in range(2 if args.max else 0):
                b.wait_idle(ds)
                regions = args.max_regions.split(",")
                got = b.subprocess_load(
                    ds,
                    regions,
                    seconds=args.seconds,
                    inflight=args.inflight or (256 if len(regions) == 1 else 128),
                    run_id=f"ab{k}m{i}",  # short: cl_ord_ids carry it (<= 64)
                    window=args.window,
                    entry=entry,
                )
                each = ", ".join(
                    f"{r} {g['completed_per_s']:.0f}" for r, g in zip(regions, got, strict=True)
                )
                total = sum(g["completed_per_s"] for g in got)
                print(f"{mode} max #{i}: {total:.0f} orders/s executed ({each})", flush=True)
    finally:
        ds.down()


if __name__ == "__main__":
    main()
