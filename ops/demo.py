"""A realistic 3-region trading session against the running mesh (``meridian demo``).

Who trades (accounts from the topology, three per region):

* ``*-BANK-02`` make markets in their region's symbols: two-sided resting GTC quotes around
  the live top of book (market data from the feeds, read from Redis), re-quoted by replace;
* ``*-HF-01`` take liquidity with aggressive IOCs, in every region's symbols (so a third of
  their flow crosses regions);
* ``*-CORP-03`` rest passive DAY orders and cancel some; their small credit limits and the odd
  fat-finger price or restricted symbol show risk rejecting for visible reasons.

While it runs, a live view shows progress, orders/s, fills/s, ack and order-to-execution
latency percentiles per region and replication lag per link. At the end: a summary table,
then the ledger is drained, exported and verified, and one line says whether it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import redis.asyncio as aioredis
from hdrh.histogram import HdrHistogram

from ops.devstack import Devstack
from router.client import DeskClient, Report
from router.contract import (
    CancelReject,
    ExecType,
    ExecutionReport,
    OrderAck,
    OrderReject,
    OrdStatus,
    Side,
    TimeInForce,
)
from router.entry import ENTRIES
from router.subjects import durable_ledger


def _hist() -> HdrHistogram:
    return HdrHistogram(1, 60_000_000, 3)  # microseconds, 1 us .. 60 s


@dataclass
class RegionStats:
    sent: int = 0
    acked: int = 0
    entry_rejects: int = 0
    """Requests refused before they were stored (by the gateway, or by a direct desk's checks)."""
    risk_rejects: Counter[str] = field(default_factory=Counter)
    fills: int = 0
    ack_us: HdrHistogram = field(default_factory=_hist)
    first_report_us: HdrHistogram = field(default_factory=_hist)
    """Orders entered, risk-checked and executed in this region (no WAN on the way)."""
    first_report_wan_us: HdrHistogram = field(default_factory=_hist)
    """Orders whose home or executing region is another one: one or more WAN round trips."""


@dataclass
class DemoResult:
    seconds: float
    orders: int
    acked: int
    fills: int
    trades: int
    risk_rejects: Counter[str]
    per_region: dict[str, RegionStats]
    per_entry: dict[str, RegionStats] = field(default_factory=dict)
    """gateway / direct: the same measures by how the desks entered their orders."""
    ledger_line: str = ""
    ledger_ok: bool | None = None


class Demo:
    def __init__(
        self,
        ds: Devstack,
        *,
        rate: float,
        seconds: float,
        seed: int = 7,
        out: TextIO = sys.stdout,
        entry: str = "mixed",
    ) -> None:
        self.ds = ds
        self.entry = entry
        """``mixed`` (each desk's first account direct, the rest through the gateway),
        ``gateway`` or ``direct``: how the desks enter orders."""
        self.topo = ds.topology
        self.rate = rate
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.out = out
        self.stats = {r: RegionStats() for r in self.topo.codes}
        self.by_entry = {e: RegionStats() for e in ENTRIES}
        self.clients: dict[str, DeskClient] = {}
        self.ncs: list[Any] = []
        self.sent_at: dict[str, tuple[str, int, bool, str]] = {}
        """cl_ord_id -> (entry region, t0, local, entry path)."""
        self.first_seen: set[str] = set()
        self.trade_ids: set[str] = set()
        self.live_quotes: dict[str, dict[str, str]] = {}  # account -> side -> cl_ord_id
        self.resting: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.redis = aioredis.from_url(ds.redis_url)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stopping = asyncio.Event()
        """Set at the end: every flow stops at its next turn (a cancel alone is not enough:
        Python 3.11's wait_for inside nats-py can swallow one)."""
        self._n = 0

    # ---- setup ---------------------------------------------------------------------------
    async def connect(self) -> None:
        for desk in self.topo.desks:
            nc = await self.ds.connect(desk.region, role="desk", name=f"demo-{desk.code}")
            self.ncs.append(nc)
            for i, acct in enumerate(desk.accounts):
                # each desk's first account (its latency-sensitive one) stores its orders in
                # ORDERS itself (direct entry); the others go through the gateway
                entry = self.entry if self.entry != "mixed" else ("direct" if i == 0 else "gateway")
                c = DeskClient(
                    nc, self.topo, region=desk.region, account=acct, timeout_s=10, entry=entry
                )
                c.on_report = self._on_report
                await c.start()
                self.clients[acct] = c

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        for nc in self.ncs:
            with contextlib.suppress(Exception):
                await nc.drain()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def top(self, region: str, symbol: str) -> tuple[int, int] | None:
        raw = await self.redis.hmget(f"tob:{region}:{symbol}", "bid_px", "ask_px")
        if raw[0] is None or raw[1] is None:
            return None
        b, a = int(raw[0]), int(raw[1])
        return (b, a) if 0 < b < a else None

    # ---- reports -------------------------------------------------------------------------
    def _on_report(self, r: Report, _msg: Any) -> None:
        if isinstance(r, CancelReject):
            return
        sent = self.sent_at.get(r.cl_ord_id)
        region = sent[0] if sent else self.topo.account_home(r.account)
        st = self.stats[region]
        if sent and r.cl_ord_id not in self.first_seen:
            self.first_seen.add(r.cl_ord_id)
            took = max(1, (time.time_ns() - sent[1]) // 1000)
            for s in (st, self.by_entry[sent[3]]):
                (s.first_report_us if sent[2] else s.first_report_wan_us).record_value(took)
        if r.exec_type is ExecType.REJECTED and r.reject_reason:
            st.risk_rejects[r.reject_reason] += 1
        elif r.exec_type is ExecType.TRADE:
            st.fills += 1
            self.trade_ids.add(r.trade_id)

    # ---- order flow ----------------------------------------------------------------------
    def _cl(self, prefix: str) -> str:
        self._n += 1
        return f"D{prefix}{int(time.time()) % 100000:05d}{self._n:07d}"

    async def _send(
        self, c: DeskClient, coro: Any, cl: str, sym: str
    ) -> OrderAck | OrderReject | None:
        st = self.stats[c.region]
        st.sent += 1
        t0 = time.time_ns()
        local = c.region == self.topo.account_home(c.account) == self.topo.exec_region(sym)
        self.sent_at[cl] = (c.region, t0, local, c.entry)
        by = self.by_entry[c.entry]
        by.sent += 1
        try:
            ack: OrderAck | OrderReject = await coro
        except Exception:
            st.entry_rejects += 1
            return None
        took = max(1, (time.time_ns() - t0) // 1000)
        st.ack_us.record_value(took)
        by.ack_us.record_value(took)
        if isinstance(ack, OrderAck):
            st.acked += 1
            by.acked += 1
        else:
            st.entry_rejects += 1
        return ack

    async def market_maker(self, acct: str) -> None:
        c = self.clients[acct]
        region = self.topo.account_home(acct)
        symbols = self.topo.region(region).executes
        quotes: dict[tuple[str, Side], str] = {}
        while not self.stopping.is_set():
            sym = self.rng.choice(symbols)
            tob = await self.top(region, sym)
            if tob is None:
                await asyncio.sleep(0.05)
                continue
            bid, ask = tob
            for side, px in ((Side.BUY, bid), (Side.SELL, ask)):
                qty = self.rng.choice((1_000_000, 2_000_000, 3_000_000))
                old = quotes.get((sym, side))
                cl = self._cl("M")
                if old is None:
                    ack = await self._send(
                        c,
                        c.new_order(sym, side, qty, px, cl_ord_id=cl),
                        cl,
                        sym,
                    )
                else:
                    ack = await self._send(
                        c,
                        c.replace(old, sym, qty, px, cl_ord_id=cl),
                        cl,
                        sym,
                    )
                if isinstance(ack, OrderAck):
                    quotes[(sym, side)] = cl
            await asyncio.sleep(self.rng.expovariate(self.rate * 0.2) * 2)

    async def taker(self, acct: str) -> None:
        c = self.clients[acct]
        symbols = [i.symbol for i in self.topo.instruments]
        while not self.stopping.is_set():
            sym = self.rng.choice(symbols)
            x = self.topo.exec_region(sym)
            tob = await self.top(self.topo.account_home(acct), sym) or await self.top(x, sym)
            if tob is not None:
                side = self.rng.choice((Side.BUY, Side.SELL))
                # cross the touch by a few ticks: the makers' quotes lag the feed a little
                slip = self.rng.randint(0, 8)
                px = tob[1] + slip if side is Side.BUY else tob[0] - slip
                qty = self.rng.choice((500_000, 1_000_000, 2_000_000))
                cl = self._cl("H")
                await self._send(
                    c,
                    c.new_order(sym, side, qty, px, tif=TimeInForce.IOC, cl_ord_id=cl),
                    cl,
                    sym,
                )
            await asyncio.sleep(self.rng.expovariate(self.rate * 0.45))

    async def corporate(self, acct: str) -> None:
        c = self.clients[acct]
        home = self.topo.account_home(acct)
        symbols = [*self.topo.region(home).executes, "USDJPY", "EURUSD"]
        mine: list[tuple[str, str]] = []
        while not self.stopping.is_set():
            roll = self.rng.random()
            if roll < 0.25 and mine:
                cl_old, sym = mine.pop(self.rng.randrange(len(mine)))
                cl = self._cl("X")
                await self._send(c, c.cancel(cl_old, sym, cl_ord_id=cl), cl, sym)
            else:
                sym = self.rng.choice(symbols)
                tob = await self.top(home, sym)
                if tob is not None:
                    side = self.rng.choice((Side.BUY, Side.SELL))
                    mid2 = tob[0] + tob[1]
                    # passive: a few ticks behind the touch; 3% of the time a fat finger
                    off = self.rng.randint(2, 40)
                    px = (tob[0] - off) if side is Side.BUY else (tob[1] + off)
                    if self.rng.random() < 0.03:
                        px = mid2 // 2 * (110 if side is Side.BUY else 90) // 100
                    qty = self.rng.choice((1_000_000, 2_000_000, 5_000_000))
                    cl = self._cl("C")
                    ack = await self._send(
                        c,
                        c.new_order(sym, side, qty, px, tif=TimeInForce.DAY, cl_ord_id=cl),
                        cl,
                        sym,
                    )
                    if isinstance(ack, OrderAck):
                        mine.append((cl, sym))
            await asyncio.sleep(self.rng.expovariate(self.rate * 0.35 / 3) * 3)

    # ---- run -----------------------------------------------------------------------------
    async def run(self) -> DemoResult:
        await self.connect()
        await self._wait_for_prices()
        for desk in self.topo.desks:
            for acct in desk.accounts:
                role = acct.split("-")[1]
                fn = {"BANK": self.market_maker, "HF": self.taker}.get(role, self.corporate)
                t = asyncio.create_task(fn(acct), name=f"demo-{acct}")
                self.tasks.add(t)
        t0 = time.monotonic()
        last = (t0, 0, 0)
        live = self.out.isatty()
        next_line = t0
        try:
            while (now := time.monotonic()) - t0 < self.seconds:
                await asyncio.sleep(1.0)
                now = time.monotonic()
                sent = sum(s.sent for s in self.stats.values())
                fills = sum(s.fills for s in self.stats.values())
                dt = now - last[0]
                ops = (sent - last[1]) / dt
                fps = (fills - last[2]) / dt
                last = (now, sent, fills)
                view = self._view(now - t0, ops, fps)
                if live:
                    self.out.write("\x1b[H\x1b[J" + view + "\n")
                    self.out.flush()
                elif now >= next_line:
                    self.out.write(view.splitlines()[0] + "\n")
                    self.out.flush()
                    next_line = now + 5
        finally:
            self.stopping.set()
            if self.tasks:
                _done, pending = await asyncio.wait(self.tasks, timeout=5)
                for t in pending:
                    t.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=5)
            self.tasks.clear()
        await asyncio.sleep(1.0)  # last reports in flight
        elapsed = time.monotonic() - t0
        rr: Counter[str] = Counter()
        for s in self.stats.values():
            rr.update(s.risk_rejects)
        return DemoResult(
            seconds=elapsed,
            orders=sum(s.sent for s in self.stats.values()),
            acked=sum(s.acked for s in self.stats.values()),
            fills=sum(s.fills for s in self.stats.values()),
            trades=len(self.trade_ids),
            risk_rejects=rr,
            per_region=self.stats,
            per_entry={e: s for e, s in self.by_entry.items() if s.sent},
        )

    async def _wait_for_prices(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        syms = [i.symbol for i in self.topo.instruments]
        while time.monotonic() < deadline:
            have = [await self.top(self.topo.exec_region(s), s) for s in syms]
            if all(have):
                return
            await asyncio.sleep(0.25)
        raise RuntimeError("no market data in Redis after 30 s: is the md service running?")

    def _view(self, elapsed: float, ops: float, fps: float) -> str:
        frac = min(1.0, elapsed / self.seconds)
        bar = "#" * int(frac * 30) + "." * (30 - int(frac * 30))
        lines = [
            f"demo [{bar}] {elapsed:5.1f}/{self.seconds:.0f}s  {ops:7.0f} orders/s  "
            f"{fps:6.0f} fills/s"
        ]
        lines.append(
            "region   sent   acked  rejects  fills   ack p50/p99 ms   "
            "first report p50/p99 ms, local / over the WAN"
        )
        for code, s in self.stats.items():
            lines.append(
                f"{code:<6} {s.sent:>6} {s.acked:>7} {sum(s.risk_rejects.values()):>8} "
                f"{s.fills:>6}   {_ms(s.ack_us, 50):>6}/{_ms(s.ack_us, 99):<7}   "
                f"{_ms(s.first_report_us, 50):>6}/{_ms(s.first_report_us, 99):<7}  "
                f"{_ms(s.first_report_wan_us, 50):>6}/{_ms(s.first_report_wan_us, 99):<7}"
            )
        lag = read_lag(self.ds.run_dir)
        if lag:
            lines.append(
                "replication lag  "
                + "  ".join(
                    f"{k} p50 {v.get('p50_ms', 0):.1f} / p99 {v.get('p99_ms', 0):.1f} ms"
                    for k, v in sorted(lag.items())
                )
            )
        return "\n".join(lines)


def _ms(h: HdrHistogram, pct: float) -> str:
    if h.get_total_count() == 0:
        return "-"
    return f"{h.get_value_at_percentile(pct) / 1000:.2f}"


def read_lag(run_dir: Path) -> dict[str, dict[str, float]]:
    """Per-link replication lag summaries written by the market-data services."""
    out: dict[str, dict[str, float]] = {}
    for p in sorted((run_dir / "md").glob("lag-*.json")):
        with contextlib.suppress(Exception):
            data = json.loads(p.read_text())
            links = data.get("links", data)
            for k, v in links.items():
                if isinstance(v, dict):
                    out[k] = v
    return out


def summary_table(res: DemoResult) -> str:
    rows = []
    for code, s in res.per_region.items():
        rows.append(
            (
                code,
                s.sent,
                s.acked,
                s.entry_rejects,
                sum(s.risk_rejects.values()),
                s.fills,
                f"{_ms(s.ack_us, 50)} / {_ms(s.ack_us, 99)}",
                f"{_ms(s.first_report_us, 50)} / {_ms(s.first_report_us, 99)}",
                f"{_ms(s.first_report_wan_us, 50)} / {_ms(s.first_report_wan_us, 99)}",
            )
        )
    from ops.cli import table

    t = table(
        rows,
        [
            "region",
            "sent",
            "acked",
            "entry rejects",
            "risk rejects",
            "fills",
            "ack ms p50/p99",
            "1st report ms, local",
            "1st report ms, over the WAN",
        ],
    )
    reasons = ", ".join(f"{k} {v}" for k, v in res.risk_rejects.most_common()) or "none"
    how = {"direct": "stored by the desk in ORDERS", "gateway": "through the gateway"}
    by_entry = "".join(
        f"\n{e:<7} ({how[e]}): {s.sent} sent, ack p50/p99 {_ms(s.ack_us, 50)} / "
        f"{_ms(s.ack_us, 99)} ms, 1st report local {_ms(s.first_report_us, 50)} / "
        f"{_ms(s.first_report_us, 99)} ms"
        for e, s in res.per_entry.items()
    )
    return (
        f"{t}\n(local: entered, risk-checked and executed in one region; over the WAN: the "
        "account's home or the symbol's executing region is another, 35-115 ms each way)"
        + (f"\n\nby entry path:{by_entry}" if by_entry else "")
        + f"\n\n{res.orders} orders in {res.seconds:.0f} s "
        f"({res.orders / max(res.seconds, 1e-9):.0f}/s), {res.trades} trades, "
        f"{res.fills} fill reports\nrisk rejects by reason: {reasons}"
    )


async def wait_ledger_drained(ds: Devstack, timeout_s: float = 60.0) -> bool:
    """Until every region's ledger writer has committed every fill in its stream."""
    nc = await ds.connect(ds.topology.hub, role="sre")
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pending = 0
            for r in ds.topology.codes:
                js = nc.jetstream(domain=r)
                try:
                    ci = await js.consumer_info("EXECOUT", durable_ledger(r))
                    pending += ci.num_pending + ci.num_ack_pending
                except Exception:
                    pending += 1
            if pending == 0:
                return True
            await asyncio.sleep(0.5)
        return False
    finally:
        await nc.close()


__all__ = ["Demo", "DemoResult", "ExecutionReport", "OrdStatus", "summary_table"]
