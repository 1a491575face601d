"""``meridian md ...``: market data as each region sees it.

``meridian md top [--region R] [--redis-url URL] [--json]`` prints the top of book of every
instrument from every region's view (Redis ``tob:<view>:<symbol>``, see
``replication/topbook.py``). ``meridian md lag [--region R] [--json]`` prints replication lag
p50/p99/max per directed link and the gap counters, from the stats files the market-data
services write every second (``$MERIDIAN_RUN_DIR/md/lag-<region>.json``).

Exit codes: 0 ok, 1 nothing to show (no quotes / no stats yet), 2 setup error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

_STALE_S = 10.0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``md`` command group to the CLI's sub-parsers."""
    md = sub.add_parser("md", help="market data: top of book and replication lag")
    md_sub = md.add_subparsers(dest="md_command", required=True)
    top = md_sub.add_parser("top", help="top of book per symbol and view region (from Redis)")
    top.add_argument("--region", default=None, help="view region (default: every region)")
    top.add_argument("--redis-url", default=None, help="default: the running mesh's Redis")
    top.add_argument("--json", action="store_true")
    top.set_defaults(func=_top)
    lag = md_sub.add_parser("lag", help="replication lag p50/p99 per link")
    lag.add_argument("--region", default=None, help="view region (default: every region)")
    lag.add_argument("--json", action="store_true")
    lag.set_defaults(func=_lag)


def _run_dir(args: argparse.Namespace) -> Path:
    rd = getattr(args, "run_dir", None)
    return Path(rd) if rd else Path(os.environ.get("MERIDIAN_RUN_DIR") or "run").resolve()


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _top(args: argparse.Namespace) -> int:
    from regions.topology import Topology, load_topology

    run_dir = _run_dir(args)
    redis_url = args.redis_url
    topo: Topology = load_topology()
    if (run_dir / "state.json").exists():
        from ops.devstack import Devstack

        ds = Devstack.attach(run_dir)
        topo = ds.topology
        redis_url = redis_url or ds.redis_url
    if not redis_url:
        print("md top: no --redis-url and no running mesh in " + str(run_dir), file=sys.stderr)
        return 2
    views = [args.region] if args.region else list(topo.codes)
    try:
        rows = asyncio.run(_read_tops(redis_url, views, [i.symbol for i in topo.instruments]))
    except OSError as e:
        print(f"md top: cannot read Redis at {redis_url}: {e}", file=sys.stderr)
        return 2
    now = time.time_ns()
    if args.json:
        print(json.dumps([dataclasses.asdict(t) for t in rows], indent=1))
        return 0 if rows else 1
    known = {i.symbol: i for i in topo.instruments}
    out = []
    for t in rows:
        ins = known.get(t.symbol)
        fmt = ins.format_price if ins is not None else str
        out.append(
            [
                t.view,
                t.symbol,
                t.src,
                f"{t.bid_qty / 1e6:g}M",
                fmt(t.bid_px),
                fmt(t.ask_px),
                f"{t.ask_qty / 1e6:g}M",
                t.seq,
                f"{(now - t.src_ns) / 1e6:.0f}",
                f"{(t.recv_ns - t.src_ns) / 1e6:.1f}",
                "STALE" if t.stale else "",
            ]
        )
    header = ["view", "symbol", "src", "bid size", "bid", "ask", "ask size", "seq", "age ms"]
    print(_table(out, [*header, "lag ms", "stale"]) if out else "no top of book yet")
    return 0 if out else 1


async def _read_tops(url: str, views: list[str], symbols: list[str]) -> list[Any]:
    import redis.asyncio as aioredis

    from replication.topbook import TopOfBook

    r = aioredis.from_url(url, socket_connect_timeout=2)
    try:
        reader = TopOfBook(r)
        out = []
        for v in views:
            syms = sorted(set(symbols) | set(await reader.symbols(v))) if symbols else []
            for s in syms:
                t = await reader.get(v, s)
                if t is not None:
                    out.append(t)
        return out
    finally:
        await r.aclose()


def _lag(args: argparse.Namespace) -> int:
    md_dir = _run_dir(args) / "md"
    files = sorted(md_dir.glob(f"lag-{args.region}.json" if args.region else "lag-*.json"))
    stats = []
    for f in files:
        try:
            stats.append(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            print(f"md lag: skipping {f}: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0 if stats else 1
    if not stats:
        print(f"no market-data stats in {md_dir} (is the md service running?)")
        return 1
    now = time.time_ns()
    rows = []
    for st in stats:
        age_s = (now - int(st.get("updated_ns", 0))) / 1e9
        note = "" if age_s < _STALE_S else f"stale ({age_s:.0f} s old)"
        stale = st.get("stale", {})
        for link, ln in sorted(st.get("links", {}).items()):
            src = link.split("->")[0]
            rows.append(
                [
                    link,
                    ln["count"],
                    f"{ln['p50_ms']:.2f}",
                    f"{ln['p99_ms']:.2f}",
                    f"{ln['max_ms']:.2f}",
                    f"silent {stale[src]:.1f} s" if src in stale else "ok",
                    note,
                ]
            )
        s = st.get("stats", {})
        gaps = ", ".join(f"{k}={s.get(k, 0)}" for k in ("gaps", "recovered", "unrecovered"))
        rows.append(
            [f"({st.get('view')})", "", "", "", "", gaps, f"rejected={s.get('rejected', 0)}"]
        )
    print(_table(rows, ["link", "quotes", "p50 ms", "p99 ms", "max ms", "state", "note"]))
    return 0
