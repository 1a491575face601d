"""``meridian order ...`` for desks and ``meridian risk ...`` for risk officers."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

from router.contract import (
    CancelReject,
    ExecutionReport,
    KillScope,
    OrderAck,
    OrdType,
    Side,
    TimeInForce,
)


def register(sub: Any) -> None:
    p = sub.add_parser("order", help="enter, cancel, replace and watch orders (desk)")
    osub = p.add_subparsers(dest="order_cmd", required=True)

    def common(q: argparse.ArgumentParser, *, entry: bool = True) -> None:
        q.add_argument("--region", default="lon", help="entry region (nearest hub)")
        q.add_argument("--account", required=True)
        if entry:
            q.add_argument(
                "--direct",
                action="store_true",
                help="store the request in the home region's ORDERS yourself (direct entry)",
            )

    q = osub.add_parser("new", help="submit a new order and wait for its first report")
    common(q)
    q.add_argument("side", choices=["buy", "sell"])
    q.add_argument("qty", type=int, help="base-currency units")
    q.add_argument("symbol")
    q.add_argument("price", nargs="?", default=None, help="limit price, e.g. 1.08453")
    q.add_argument("--tif", default="GTC", choices=[t.value for t in TimeInForce])
    q.add_argument("--cl-ord-id", default=None)
    q.set_defaults(func=_run(_new))

    q = osub.add_parser("cancel", help="cancel an order by its cl_ord_id")
    common(q)
    q.add_argument("orig_cl_ord_id")
    q.add_argument("symbol")
    q.set_defaults(func=_run(_cancel))

    q = osub.add_parser("replace", help="replace quantity and price of an order")
    common(q)
    q.add_argument("orig_cl_ord_id")
    q.add_argument("symbol")
    q.add_argument("qty", type=int)
    q.add_argument("price")
    q.set_defaults(func=_run(_replace))

    q = osub.add_parser("watch", help="stream the account's execution reports")
    common(q, entry=False)
    q.add_argument("--replay", action="store_true", help="first replay stored reports")
    q.add_argument("--seconds", type=float, default=0, help="stop after N s (0: never)")
    q.set_defaults(func=_run(_watch))

    q = osub.add_parser("book", help="depth of a symbol's book in its executing region")
    q.add_argument("symbol")
    q.add_argument("--region", default="lon", help="region to connect to")
    q.set_defaults(func=_run(_book))

    q = osub.add_parser("history", help="an order's whole life across regions (compliance)")
    q.add_argument("ref", help="order id or client order id")
    q.add_argument("--account", default=None, help="speeds up the search")
    q.add_argument("--dsn", default=None, help="ledger DSN (default: the mesh's)")
    q.set_defaults(func=_run(_history))

    p = sub.add_parser("risk", help="kill switches and runtime limits (risk officer)")
    rsub = p.add_subparsers(dest="risk_cmd", required=True)
    for name, engaged in (("kill", True), ("release", False)):
        q = rsub.add_parser(
            name, help=f"{'engage' if engaged else 'release'} a kill switch in every region"
        )
        g = q.add_mutually_exclusive_group(required=True)
        g.add_argument("--account")
        g.add_argument("--desk")
        g.add_argument("--all", action="store_true", help="global")
        q.add_argument("--reason", default="")
        q.add_argument("--by", default="cli")
        q.set_defaults(func=_run(_kill), engaged=engaged)
    q = rsub.add_parser("set-limits", help="apply a limits TOML in every region at run time")
    q.add_argument("file", type=Path)
    q.set_defaults(func=_run(_set_limits))


def _run(fn: Any) -> Any:
    def call(args: argparse.Namespace) -> int:
        rc: int = asyncio.run(fn(args))
        return rc

    return call


CONTROL_CONNECT: dict[str, Any] = {"max_reconnect_attempts": 1, "allow_reconnect": False}
"""A region that cannot be reached fails its part of a kill or limits change at once (and
the command says so): nats-py retries for ever with max_reconnect_attempts=0."""


async def _connect(args: argparse.Namespace, role: str = "desk") -> Any:
    from ops.devstack import Devstack

    ds = Devstack.attach(args.run_dir)
    return ds, await ds.connect(args.region, role=role)


async def _client(args: argparse.Namespace) -> Any:
    from router.client import DeskClient

    ds, nc = await _connect(args)
    entry = "direct" if getattr(args, "direct", False) else "gateway"
    c = DeskClient(nc, ds.topology, region=args.region, account=args.account, entry=entry)
    await c.start()
    return ds, nc, c


def fmt_report(r: ExecutionReport | CancelReject, topology: Any) -> str:
    if isinstance(r, CancelReject):
        return (
            f"CANCEL-REJECT {r.response_to} {r.orig_cl_ord_id} -> {r.reason} "
            f"({r.text}) order={r.order_id}"
        )
    inst = topology.instrument(r.symbol)
    px = inst.format_price(r.last_px) if r.last_px else "-"
    lim = inst.format_price(r.price_ticks) if r.price_ticks else "MKT"
    extra = f" reason={r.reject_reason}" if r.reject_reason else ""
    return (
        f"{r.exec_type:<9} {r.ord_status:<16} {r.side} {r.qty} {r.symbol} @ {lim} "
        f"last {r.last_qty}@{px} cum {r.cum_qty} leaves {r.leaves_qty} avg {r.avg_px} "
        f"[{r.exec_region}] order={r.order_id} cl={r.cl_ord_id}{extra}"
    )


async def _wait_first(c: Any, ack: Any, topology: Any) -> int:
    if not isinstance(ack, OrderAck):
        print(f"REJECTED {ack.reason} field={ack.field!r}: {ack.rule}")
        return 1
    print(
        f"ACK order={ack.order_id} cl={ack.cl_ord_id} entry={ack.entry_region} "
        f"risk={ack.risk_region} exec={ack.exec_region} seq={ack.stream_seq}"
        f"{' (duplicate)' if ack.duplicate else ''}"
    )
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            st = c.orders.get(ack.order_id)
            if st is not None and st.reports:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # let immediate trades arrive too
        for r in c.orders.get(ack.order_id, type("S", (), {"reports": []})).reports:
            print(fmt_report(r, topology))
    except TimeoutError:
        print("no execution report within 5 s")
    return 0


async def _new(args: argparse.Namespace) -> int:
    ds, nc, c = await _client(args)
    try:
        inst = ds.topology.instrument(args.symbol)
        px = inst.parse_price(args.price) if args.price is not None else None
        ack = await c.new_order(
            args.symbol,
            Side(args.side.upper()),
            args.qty,
            px,
            ord_type=OrdType.LIMIT if px is not None else OrdType.MARKET,
            tif=TimeInForce(args.tif if px is not None else "IOC"),
            cl_ord_id=args.cl_ord_id,
        )
        return await _wait_first(c, ack, ds.topology)
    finally:
        await nc.close()


async def _cancel(args: argparse.Namespace) -> int:
    ds, nc, c = await _client(args)
    try:
        ack = await c.cancel(args.orig_cl_ord_id, args.symbol)
        return await _wait_first(c, ack, ds.topology)
    finally:
        await nc.close()


async def _replace(args: argparse.Namespace) -> int:
    ds, nc, c = await _client(args)
    try:
        px = ds.topology.instrument(args.symbol).parse_price(args.price)
        ack = await c.replace(args.orig_cl_ord_id, args.symbol, args.qty, px)
        return await _wait_first(c, ack, ds.topology)
    finally:
        await nc.close()


async def _watch(args: argparse.Namespace) -> int:
    ds, nc, c = await _client(args)
    c.on_report = lambda r, _m: print(fmt_report(r, ds.topology), flush=True)
    try:
        if args.replay:
            for r in list(c.reports):
                print(fmt_report(r, ds.topology))
            await c.replay()
            for r in c.reports:
                print(fmt_report(r, ds.topology))
        if args.seconds:
            await asyncio.sleep(args.seconds)
        else:
            await asyncio.Event().wait()
    finally:
        await nc.close()
    return 0


async def _book(args: argparse.Namespace) -> int:
    from router.execution import book_subject

    ds, nc = await _connect(args, role="sre")
    try:
        x = ds.topology.exec_region(args.symbol)
        reply = await nc.request(book_subject(x, args.symbol), b"", timeout=5)
        body = msgpack.unpackb(reply.data)
        if "error" in body:
            print(body["error"], file=sys.stderr)
            return 1
        inst = ds.topology.instrument(args.symbol)
        print(f"{args.symbol} book in {x}: {body['orders']} resting orders")
        asks = list(reversed(body["asks"]))
        for px, q in asks:
            print(f"            {inst.format_price(px):>12}  {q:>12}")
        print("  ------------------------------------")
        for px, q in body["bids"]:
            print(f"{q:>12}  {inst.format_price(px):>12}")
        return 0
    finally:
        await nc.close()


async def _history(args: argparse.Namespace) -> int:
    from ops.history import order_history

    args.region = "lon"
    ds, nc = await _connect(args, role="compliance")
    try:
        h = await order_history(
            nc, ds.topology, args.ref, account=args.account, dsn=args.dsn or ds.pg_dsn
        )
    finally:
        await nc.close()
    if h is None:
        print(f"no order {args.ref!r} found in any region", file=sys.stderr)
        return 1
    print(h.render())
    return 0


async def _kill(args: argparse.Namespace) -> int:
    from router.control import set_kill

    if args.account:
        scope, target = KillScope.ACCOUNT, args.account
    elif args.desk:
        scope, target = KillScope.DESK, args.desk
    else:
        scope, target = KillScope.GLOBAL, "*"
    from ops.devstack import Devstack

    ds = Devstack.attach(args.run_dir)
    try:
        # every region through its own connection (set_kill connects to each in turn)
        res = await set_kill(
            lambda r: ds.connect(r, role="sre", **CONTROL_CONNECT),
            ds.topology,
            scope,
            target,
            engaged=args.engaged,
            reason=args.reason,
            by=args.by,
        )
    except ValueError as e:  # a target the topology does not know
        print(f"risk kill: {e}", file=sys.stderr)
        return 2
    what = "ENGAGED" if args.engaged else "released"
    for region, st in res.items():
        print(f"{region}: {scope.value} {target} {what if st == 'ok' else 'FAILED: ' + st}")
    return 0 if all(v == "ok" for v in res.values()) else 1


async def _set_limits(args: argparse.Namespace) -> int:
    import tomllib

    from router.control import set_limits

    raw = tomllib.loads(args.file.read_text())
    from ops.devstack import Devstack

    ds = Devstack.attach(args.run_dir)
    res = await set_limits(lambda r: ds.connect(r, role="sre", **CONTROL_CONNECT), ds.topology, raw)
    for region, st in res.items():
        print(f"{region}: {'limits applied' if st == 'ok' else 'FAILED: ' + st}")
    return 0 if all(v == "ok" for v in res.values()) else 1
