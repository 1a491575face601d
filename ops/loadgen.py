"""Order load generator for the benchmark: pipelined requests, latency per order.

Sends crossing pairs (a BUY from one account, then a SELL at the same price from another)
so every pair trades, books stay shallow and exposure nets out. Measures, per order:
submit -> ack (the gateway's reply) and submit -> first execution report (order-to-execution,
as the desk sees it). Open loop (a fixed offered rate) or closed loop (N in flight).

Runs in-process (``await run_load(...)``) or as its own process, so that the load of several
regions does not share one Python core: ``python -m ops.loadgen --region lon ...`` prints a
JSON result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
from hdrh.histogram import HdrHistogram
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from regions.topology import Topology, load_topology
from router import subjects
from router.entry import ENTRIES, store_headers

REFERENCE_MIDS = {
    "EURUSD": 108450,
    "GBPUSD": 126800,
    "EURGBP": 85530,
    "EURCHF": 95910,
    "USDCAD": 136620,
    "USDMXN": 1724500,
    "USDJPY": 151200,
    "USDSGD": 134210,
    "AUDUSD": 65510,
}
"""Reference mids in ticks used when no market-data feed runs (bench, tests)."""


def seed_top_of_book(redis_url: str, topology: Topology, spread_ticks: int = 4) -> None:
    """Write a top of book around :data:`REFERENCE_MIDS` for every symbol in every region's
    view, in the layout the market-data service uses (``tob:<view>:<symbol>``)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        for view in topology.codes:
            for sym, mid in REFERENCE_MIDS.items():
                r.hset(
                    f"tob:{view}:{sym}",
                    mapping={
                        "bid_px": mid - spread_ticks // 2,
                        "ask_px": mid + spread_ticks // 2,
                        "bid_qty": 5_000_000,
                        "ask_qty": 5_000_000,
                        "src": topology.exec_region(sym),
                        "seq": 1,
                        "src_ns": 0,
                        "recv_ns": 0,  # seeded, never received: a view's update replaces it
                    },
                )
    finally:
        r.close()


def hist() -> HdrHistogram:
    return HdrHistogram(1, 120_000_000, 3)  # microseconds


def pct(h: HdrHistogram) -> dict[str, float]:
    if h.get_total_count() == 0:
        return {"count": 0}
    return {
        "count": h.get_total_count(),
        "p50_ms": h.get_value_at_percentile(50) / 1000,
        "p99_ms": h.get_value_at_percentile(99) / 1000,
        "p99_9_ms": h.get_value_at_percentile(99.9) / 1000,
        "max_ms": h.get_max_value() / 1000,
    }


@dataclass
class LoadResult:
    region: str
    seconds: float
    offered_per_s: float | None
    sent: int = 0
    acked: int = 0
    rejected: int = 0
    timeouts: int = 0
    completed: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    ack: HdrHistogram = field(default_factory=hist)
    first_report: HdrHistogram = field(default_factory=hist)

    def to_dict(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "seconds": round(self.seconds, 3),
            "offered_per_s": self.offered_per_s,
            "sent": self.sent,
            "acked": self.acked,
            "rejected": self.rejected,
            "timeouts": self.timeouts,
            "completed": self.completed,
            "acked_per_s": round(self.acked / self.seconds, 1) if self.seconds else 0,
            "completed_per_s": round(self.completed / self.seconds, 1) if self.seconds else 0,
            "reject_reasons": self.reject_reasons,
            "submit_to_ack": pct(self.ack),
            "order_to_execution": pct(self.first_report),
        }


class Loader:
    def __init__(
        self,
        nc: NATS,
        topology: Topology,
        region: str,
        *,
        run_id: str,
        symbols: list[str] | None = None,
        accounts: tuple[str, str] | None = None,
        qty: int = 1_000_000,
        timeline: dict[str, tuple[int, int, int, int]] | None = None,
        entry: str = "gateway",
    ) -> None:
        self.nc = nc
        self.timeline = timeline
        """If given, filled with cl_ord_id -> (desk send, gateway accept, matching time, desk
        receive of the first report), UTC ns: the input of :mod:`ops.hopsplit`."""
        self._sent_wall: dict[str, int] = {}
        self.topology = topology
        self.region = region
        self.run_id = run_id
        accts = topology.accounts(region)
        self.buyer, self.seller = accounts or (accts[0], accts[1])
        self.symbols = symbols or list(topology.region(region).executes)
        self.qty = qty
        self.sent_ns: dict[str, int] = {}
        self.first_seen: set[str] = set()
        self.inflight = 0
        self._open: set[str] = set()
        """Orders holding a closed loop's slot: each frees it once, at the ack or report."""
        self._n = 0
        self._res: LoadResult | None = None
        self._inbox = ""
        self._free = asyncio.Event()
        self.window = "ack"
        """What frees a closed loop's slot: the ack, or the order's first execution report."""
        if entry not in ENTRIES:
            raise ValueError(f"entry must be one of {ENTRIES}, not {entry!r}")
        self.entry = entry
        """``gateway`` (request/reply) or ``direct`` (a JetStream publish into ORDERS)."""
        self.homes = {a: topology.account_home(a) for a in (self.buyer, self.seller)}

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_reply, pending_msgs_limit=2_000_000)
        for acct in (self.buyer, self.seller):
            await self.nc.subscribe(
                subjects.reports_for_account(acct), cb=self._on_report, pending_msgs_limit=2_000_000
            )
        await self.nc.flush()

    def _payload(self, i: int) -> tuple[str, bytes, str]:
        pair, leg = divmod(i, 2)
        sym = self.symbols[pair % len(self.symbols)]
        acct = self.buyer if leg == 0 else self.seller
        cl = f"B{self.run_id}-{i}"
        now = time.time_ns()
        body = {
            "v": 1,
            "account": acct,
            "cl_ord_id": cl,
            "symbol": sym,
            "side": "BUY" if leg == 0 else "SELL",
            "ord_type": "LIMIT",
            "tif": "GTC",
            "qty": self.qty,
            "price_ticks": REFERENCE_MIDS[sym],
            "sent_ns": now,
        }
        if self.timeline is not None:
            self._sent_wall[cl] = now
        return subjects.entry(self.region, acct, "new"), msgpack.packb(body), cl

    async def send_one(self) -> None:
        assert self._res is not None
        i = self._n
        self._n += 1
        subject, payload, cl = self._payload(i)
        self.sent_ns[cl] = time.perf_counter_ns()
        self.inflight += 1
        self._open.add(cl)
        self._res.sent += 1
        if self.entry == "direct":  # stored in ORDERS by the desk; the PubAck is the ack
            acct = self.buyer if i % 2 == 0 else self.seller
            key = subjects.request_key(acct, cl)
            await self.nc.publish(
                subjects.orders(self.homes[acct], acct, key),
                payload,
                reply=f"{self._inbox}.{cl}",
                # the store's headers, and the stream js.publish(stream=) would name
                headers=store_headers("new"),
            )
            return
        await self.nc.publish(subject, payload, reply=f"{self._inbox}.{cl}")

    async def _on_reply(self, msg: Msg) -> None:
        res = self._res
        if res is None:
            return
        cl = msg.subject.rsplit(".", 1)[1]
        t0 = self.sent_ns.get(cl)
        try:
            if msg.data[:1] == b"{":  # a PubAck (direct entry): JSON
                ack = json.loads(msg.data)
                err = ack.get("error")
                if err is None and ack.get("seq", 0) > 0:
                    raw = {"status": "ACCEPTED"}
                else:  # refused by the stream (a refusal also names the stream, seq 0)
                    raw = {"reason": f"STORE_{(err or {}).get('err_code', 'REFUSED')}"}
            else:
                raw = msgpack.unpackb(msg.data)
        except Exception:
            raw = {}
        accepted = raw.get("status") == "ACCEPTED"
        if self.window == "ack" or not accepted:  # a refused order gets no report
            self._release(cl)
        if not raw:
            res.rejected += 1
            return
        if accepted:
            res.acked += 1
            if t0 is not None:
                res.ack.record_value(max(1, (time.perf_counter_ns() - t0) // 1000))
        else:
            res.rejected += 1
            r = str(raw.get("reason"))
            res.reject_reasons[r] = res.reject_reasons.get(r, 0) + 1

    async def _on_report(self, msg: Msg) -> None:
        res = self._res
        if res is None:
            return
        try:
            raw = msgpack.unpackb(msg.data)
        except Exception:
            return
        cl = raw.get("cl_ord_id", "")
        if cl in self.first_seen:
            return
        t0 = self.sent_ns.get(cl)
        if t0 is None:
            return
        self.first_seen.add(cl)
        if self.window == "report":
            self._release(cl)
        if self.timeline is not None and cl in self._sent_wall:
            self.timeline[cl] = (
                self._sent_wall.pop(cl),
                int(raw.get("entry_ns") or 0),
                int(raw.get("transact_ns") or 0),
                time.time_ns(),
            )
        res.completed += 1
        res.first_report.record_value(max(1, (time.perf_counter_ns() - t0) // 1000))
        if raw.get("exec_type") == "REJECTED":
            r = str(raw.get("reject_reason"))
            res.reject_reasons[r] = res.reject_reasons.get(r, 0) + 1

    def _release(self, cl: str) -> None:
        """Free ``cl``'s slot, once: an order answered UNAVAILABLE (outcome unknown) may still
        be stored and reported later."""
        if cl in self._open:
            self._open.discard(cl)
            self.inflight -= 1
            self._free.set()

    async def run(
        self,
        *,
        seconds: float,
        rate: float | None = None,
        inflight: int = 256,
        window: str = "ack",
        drain_s: float = 3.0,
    ) -> LoadResult:
        """Open loop at ``rate`` orders/s, or closed loop with ``inflight`` outstanding.

        ``window`` says what frees a closed loop's slot: ``"ack"`` (the desk's view: it may
        send again once the order is acknowledged) or ``"report"`` (its first execution
        report). They differ where the ack means less than the decision: an ack at the
        entry journal lets the loop outrun risk, with the journal as the queue.
        """
        if window not in ("ack", "report"):
            raise ValueError(f"window must be 'ack' or 'report', not {window!r}")
        self.window = window
        self._res = res = LoadResult(region=self.region, seconds=seconds, offered_per_s=rate)
        t0 = time.perf_counter()
        end = t0 + seconds
        if rate is not None:
            tick = 0.001
            sent_target = 0.0
            while (now := time.perf_counter()) < end:
                sent_target = (now - t0) * rate
                while res.sent < sent_target:
                    await self.send_one()
                await asyncio.sleep(tick)
        else:
            while time.perf_counter() < end:
                while self.inflight < inflight:
                    await self.send_one()
                self._free.clear()
                try:
                    await asyncio.wait_for(self._free.wait(), 1.0)
                except TimeoutError:
                    pass
        res.seconds = time.perf_counter() - t0
        deadline = time.perf_counter() + drain_s
        while time.perf_counter() < deadline and (
            res.acked + res.rejected < res.sent or len(self.first_seen) < res.acked
        ):
            await asyncio.sleep(0.05)
        res.timeouts = res.sent - res.acked - res.rejected
        self._res = None
        return res


async def run_load(
    urls: list[str],
    topology: Topology,
    region: str,
    *,
    run_id: str,
    seconds: float,
    rate: float | None,
    inflight: int = 256,
    window: str = "ack",
    timeline: dict[str, tuple[int, int, int, int]] | None = None,
    entry: str = "gateway",
) -> dict[str, Any]:
    from ops.devstack import connect

    nc = await connect(urls, name=f"loadgen-{region}")
    try:
        ld = Loader(nc, topology, region, run_id=run_id, timeline=timeline, entry=entry)
        await ld.start()
        res = await ld.run(seconds=seconds, rate=rate, inflight=inflight, window=window)
        return res.to_dict()
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Meridian order load generator")
    ap.add_argument("--region", required=True)
    ap.add_argument("--nats-url", action="append", required=True)
    ap.add_argument("--topology", default=None)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rate", type=float, default=None, help="open loop; default closed loop")
    ap.add_argument("--inflight", type=int, default=256)
    ap.add_argument(
        "--window",
        choices=("ack", "report"),
        default="ack",
        help="closed loop: a slot is freed by the ack (default) or by the first report",
    )
    ap.add_argument(
        "--entry",
        choices=ENTRIES,
        default="gateway",
        help="through the gateway (default), or stored in ORDERS by the desk (direct entry)",
    )
    ap.add_argument("--run-id", default=str(time.time_ns() % 10**9))
    args = ap.parse_args(argv)
    from ops.runtime import run

    async def go() -> None:
        out = await run_load(
            args.nats_url,
            load_topology(args.topology),
            args.region,
            run_id=args.run_id,
            seconds=args.seconds,
            rate=args.rate,
            inflight=args.inflight,
            window=args.window,
            entry=args.entry,
        )
        sys.stdout.write(json.dumps(out) + "\n")

    run(go())


if __name__ == "__main__":
    main()
