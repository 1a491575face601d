"""``meridian demo`` (the main job's trading session) and ``meridian bench``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

from router.entry import ENTRIES


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a realistic 3-region trading session on the mesh")
    p.add_argument("--seconds", type=float, default=45.0)
    p.add_argument("--rate", type=float, default=300.0, help="target orders/s, all desks")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--entry",
        choices=("mixed", *ENTRIES),
        default="mixed",
        help="how desks enter orders: each desk's first account stores its orders in ORDERS "
        "itself and the others use the gateway (mixed, default), or all one way",
    )
    p.add_argument(
        "--export-dir",
        type=Path,
        default=None,
        help="where the ledger export goes (default: <run-dir>/export)",
    )
    p.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmark the mesh; writes JSON + markdown results")
    b.add_argument("--quick", action="store_true", help="short run (< 2 minutes)")
    b.add_argument(
        "--out", type=Path, default=Path("docs/bench"), help="directory for result files"
    )
    b.set_defaults(func=cmd_bench)


def cmd_demo(args: argparse.Namespace) -> int:
    from ops.devstack import Devstack

    ds = Devstack.attach(args.run_dir)
    st = ds.status()
    if not st["healthy"]:
        print("the mesh is not healthy; see `meridian status`", file=sys.stderr)
        return 1
    return asyncio.run(_demo(ds, args))


async def _demo(ds: Any, args: argparse.Namespace) -> int:
    from ops.demo import Demo, summary_table, wait_ledger_drained

    print(
        f"demo: {args.seconds:.0f} s at ~{args.rate:.0f} orders/s across "
        f"{len(ds.topology.desks)} desks in {', '.join(ds.topology.codes)}",
        flush=True,
    )
    demo = Demo(ds, rate=args.rate, seconds=args.seconds, seed=args.seed, entry=args.entry)
    try:
        res = await demo.run()
    finally:
        await demo.close()
    print()
    print(summary_table(res))
    print("\nwaiting for the ledger writers to commit every fill ...", flush=True)
    drained = await wait_ledger_drained(ds)
    if not drained:
        print("ledger NOT drained within 60 s (see `meridian status` and the ledger logs)")
        return 1
    line, ok = await asyncio.to_thread(export_and_verify, ds, args.export_dir)
    print(line)
    return 0 if ok else 1


def export_and_verify(ds: Any, export_dir: Path | None) -> tuple[str, bool]:
    """Export a consistent cross-region snapshot, then verify the ledger: one summary line."""
    from ledger.export import ExportRequest, export_ledger
    from ledger.verify import verify

    out = export_dir or (ds.run_dir / "export")
    out.mkdir(parents=True, exist_ok=True)
    export_ledger(
        ds.pg_dsn, ExportRequest(regions=ds.topology.codes, out_dir=out), progress=sys.stderr
    )
    # against the export just taken, as compliance would: every region in it, each chain
    # still running through the export's head
    rep = verify(ds.pg_dsn, topology=ds.topology, manifest=out)
    chains = len(rep.heads) or len(ds.topology.codes)
    imbalances = sum(
        1
        for p in rep.problems
        if "BALANCE" in str(p.kind).upper() or "UNBALANCED" in str(p.kind).upper()
    )
    status = "verified" if rep.ok else "FAILED"
    line = (
        f"ledger {status}: {rep.transfers_checked} transfers, {rep.postings_checked} "
        f"postings, {imbalances} imbalances, {chains} chains "
        f"{'intact' if rep.ok else 'BROKEN'}; export in {out}"
    )
    if not rep.ok:
        line += "\n" + "\n".join(f"  - {p}" for p in rep.problems[:10])
    return line, rep.ok


def cmd_bench(args: argparse.Namespace) -> int:
    from ops.bench import run_bench

    return asyncio.run(
        run_bench(
            quick=args.quick, out_dir=args.out, tmp=Path(tempfile.mkdtemp(prefix="meridian-bench-"))
        )
    )
