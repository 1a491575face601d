"""The pure pre-trade risk engine (router.risk): one passing and one rejecting case per check,
feedback from execution, and a property test over random histories.

Execution is the real pure matching core (router.book.OrderBook): approved commands are applied
to it and its reports are fed back to the engine, so feedback has the exact shape the worker
sees.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ops.loadgen import REFERENCE_MIDS as MIDS
from regions.topology import Topology, load_topology
from router.book import Cancel, OrderBook, Output, Replace, Submit
from router.contract import (
    CancelOrder,
    CancelReject,
    ExecType,
    ExecutionReport,
    NewOrder,
    OrdStatus,
    OrdType,
    RejectReason,
    ReplaceOrder,
    Side,
    TimeInForce,
)
from router.risk import (
    DEFAULT_CL_ID_MEMORY,
    AccountLimits,
    Decision,
    Externals,
    InstrumentLimits,
    OpenOrder,
    RefPrice,
    RiskEngine,
    RiskLimits,
)

TOPO: Topology = load_topology()
BUY, SELL = Side.BUY, Side.SELL


def ref(symbol: str, spread: int = 4) -> RefPrice:
    mid = MIDS[symbol]
    return RefPrice(bid_ticks=mid - spread // 2, ask_ticks=mid + spread // 2)


def ext(symbol: str, *, rate_ok: bool = True) -> Externals:
    return Externals(rate_ok=rate_ok, ref=ref(symbol))


_seq = itertools.count(1)


def new_order(
    account: str,
    cl: str,
    symbol: str,
    side: Side,
    qty: int,
    price: int | None,
    tif: TimeInForce = TimeInForce.GTC,
) -> NewOrder:
    """A NewOrder: LIMIT at ``price`` ticks, or MARKET when ``price`` is None."""
    return NewOrder(
        account=account,
        cl_ord_id=cl,
        symbol=symbol,
        side=side,
        ord_type=OrdType.LIMIT if price is not None else OrdType.MARKET,
        tif=tif,
        qty=qty,
        price_ticks=price,
    )


def replace_order(
    account: str, cl: str, orig: str, symbol: str, qty: int, price: int
) -> ReplaceOrder:
    """A ReplaceOrder of ``orig`` to ``qty`` at ``price`` ticks."""
    return ReplaceOrder(
        account=account,
        cl_ord_id=cl,
        orig_cl_ord_id=orig,
        symbol=symbol,
        qty=qty,
        price_ticks=price,
    )


@dataclass
class Rig:
    """A risk engine of one home region wired to real books (instant execution)."""

    region: str = "lon"
    limits: RiskLimits = field(default_factory=RiskLimits.load)
    engine: RiskEngine = field(init=False)
    books: dict[str, OrderBook] = field(default_factory=dict)
    pending: list[ExecutionReport | CancelReject] = field(default_factory=list)
    """Reports produced by the books and not yet fed back to the engine."""
    delivered: list[ExecutionReport | CancelReject] = field(default_factory=list)
    """Reports fed back so far, in order (a redelivery sends a suffix of them again)."""
    auto_feedback: bool = True
    cl_id_memory: int = DEFAULT_CL_ID_MEMORY

    def __post_init__(self) -> None:
        self.engine = RiskEngine(TOPO, self.region, self.limits, cl_id_memory=self.cl_id_memory)

    def book(self, symbol: str) -> OrderBook:
        b = self.books.get(symbol)
        if b is None:
            inst = TOPO.instrument(symbol)
            b = self.books[symbol] = OrderBook(inst, TOPO.exec_region(symbol))
        return b

    def execute(self, symbol: str, cmd: Submit | Cancel | Replace) -> list[Output]:
        s = next(_seq)
        outs = self.book(symbol).apply(cmd, seq=s, ts_ns=s)
        for o in outs:
            if isinstance(o, ExecutionReport | CancelReject) and o.home_region == self.region:
                self.pending.append(o)
        if self.auto_feedback:
            self.deliver()
        return outs

    def deliver(self, n: int | None = None) -> None:
        take = self.pending if n is None else self.pending[:n]
        self.pending = [] if n is None else self.pending[n:]
        self.delivered.extend(take)
        self._feed(take)

    def swap(self, i: int) -> None:
        """Two reports not yet fed back change places: execution re-sent the first (its
        PubAck was lost) and JetStream stored it after the second."""
        if len(self.pending) >= 2:
            j = i % (len(self.pending) - 1)
            self.pending[j], self.pending[j + 1] = self.pending[j + 1], self.pending[j]

    def redeliver(self, n: int) -> None:
        """The last ``n`` delivered reports again, in order: what a consumer with AckPolicy.ALL
        sends when the ack that covered them was lost."""
        self._feed(self.delivered[len(self.delivered) - n :] if n else [])

    def _feed(self, reports: list[ExecutionReport | CancelReject]) -> None:
        for r in reports:
            if isinstance(r, ExecutionReport):
                self.engine.on_report(r)
            else:
                self.engine.on_cancel_reject(r)

    def new(
        self,
        account: str,
        symbol: str,
        side: Side,
        qty: int,
        price: int | None = None,
        *,
        ord_type: OrdType = OrdType.LIMIT,
        tif: TimeInForce = TimeInForce.GTC,
        cl: str | None = None,
        x: Externals | None = None,
    ) -> Decision:
        s = next(_seq)
        if price is None and ord_type is OrdType.LIMIT:
            price = MIDS[symbol]
        msg = NewOrder(
            account=account,
            cl_ord_id=cl or f"C{s}",
            symbol=symbol,
            side=side,
            ord_type=ord_type,
            tif=tif,
            qty=qty,
            price_ticks=price,
        )
        d = self.engine.on_new(
            msg,
            order_id=f"O-{msg.cl_ord_id}",
            accepted_ns=s,
            ext=x if x is not None else ext(symbol),
            seq=s,
        )
        if d.command is not None:
            assert d.symbol == symbol and d.exec_region == TOPO.exec_region(symbol)
            self.execute(symbol, d.command)
        return d

    def cancel(self, account: str, symbol: str, orig: str, *, run: bool = True) -> Decision:
        """Risk's decision on a cancel; its command executed unless not ``run``."""
        s = next(_seq)
        msg = CancelOrder(account=account, cl_ord_id=f"X{s}", orig_cl_ord_id=orig, symbol=symbol)
        d = self.engine.on_cancel(msg, seq=s)
        if d.command is not None and run:
            self.execute(symbol, d.command)
        return d

    def replace(
        self,
        account: str,
        symbol: str,
        orig: str,
        qty: int,
        price: int,
        *,
        run: bool = True,
        x: Externals | None = None,
    ) -> Decision:
        """Risk's decision on a replace; its command executed unless not ``run``."""
        s = next(_seq)
        msg = replace_order(account, f"R{s}", orig, symbol, qty, price)
        d = self.engine.on_replace(msg, ext=x if x is not None else ext(symbol), seq=s)
        if d.command is not None and run:
            self.execute(symbol, d.command)
        return d

    def counterparty(self, symbol: str, side: Side, qty: int, price: int) -> list[Output]:
        """An order of another home region's account, straight into the book."""
        s = next(_seq)
        cmd = Submit(
            order_id=f"CP-{s}",
            cl_ord_id=f"CP{s}",
            account="NYC-HF-01",
            home_region="nyc",
            side=side,
            ord_type=OrdType.LIMIT,
            tif=TimeInForce.GTC,
            qty=qty,
            price_ticks=price,
        )
        return self.execute(symbol, cmd)


def rejected(d: Decision) -> RejectReason | None:
    if d.report is None:
        return None
    assert d.command is None
    if isinstance(d.report, ExecutionReport):
        assert d.report.exec_type is ExecType.REJECTED
        assert d.report.ord_status is OrdStatus.REJECTED
        return RejectReason(d.report.reject_reason)
    return d.report.reason


def approved(d: Decision) -> bool:
    return d.command is not None and d.report is None


# ---- each check: a passing and a rejecting case --------------------------------------------------


@pytest.mark.parametrize(
    ("key", "account", "other_passes"),
    [
        ("account.LON-HF-01", "LON-HF-01", "LON-BANK-02"),
        ("desk.LONFX1", "LON-HF-01", None),  # every account of the desk is halted
        ("global", "LON-HF-01", None),
    ],
)
def test_kill_switch_rejects_and_release_lets_orders_pass(
    key: str, account: str, other_passes: str | None
) -> None:
    rig = Rig()
    assert approved(rig.new(account, "EURUSD", BUY, 1_000_000, 108000))
    to_cancel = rig.engine.set_kill(key, True)
    assert [(a, o.symbol) for a, o in to_cancel if a == account] == [(account, "EURUSD")]
    assert rejected(rig.new(account, "EURUSD", BUY, 1_000_000)) is RejectReason.KILL_SWITCH
    if key.startswith("desk") or key == "global":
        assert rejected(rig.new("LON-BANK-02", "EURUSD", BUY, 1_000)) is RejectReason.KILL_SWITCH
    if other_passes is not None:
        assert approved(rig.new(other_passes, "EURUSD", BUY, 1_000_000))
    assert rig.engine.set_kill(key, False) == []
    assert approved(rig.new(account, "EURUSD", BUY, 1_000_000))


def test_kill_switch_of_another_desk_does_not_halt() -> None:
    rig = Rig()
    rig.engine.set_kill("desk.NYCFX1", True)
    rig.engine.set_kill("account.LON-BANK-02", True)
    assert approved(rig.new("LON-HF-01", "EURUSD", BUY, 1_000_000))


def test_kill_switch_cancels_resting_orders_through_execution() -> None:
    rig = Rig()
    d = rig.new("LON-HF-01", "EURUSD", BUY, 1_000_000, 108000)
    assert approved(d)
    for acct, o in rig.engine.set_kill("account.LON-HF-01", True):
        cmd = Cancel(
            order_id=o.order_id,
            cl_ord_id=f"KILL-{o.order_id}",
            orig_cl_ord_id=o.cl_ord_id,
            account=acct,
            home_region="lon",
            reason="KILL_SWITCH",
        )
        outs = rig.execute(o.symbol, cmd)
        (er,) = [r for r in outs if isinstance(r, ExecutionReport)]
        assert er.exec_type is ExecType.CANCELED and er.reject_reason == "KILL_SWITCH"
    assert rig.engine.exposure_usd("LON-HF-01") == 0
    assert rig.engine.state("LON-HF-01").orders == {}


def test_restricted_symbol_global_and_per_account() -> None:
    limits = replace(RiskLimits.load(), restricted_symbols=frozenset({"USDMXN"}))
    rig = Rig(region="nyc", limits=limits)
    assert rejected(rig.new("NYC-HF-01", "USDMXN", BUY, 1_000_000)) is (
        RejectReason.RESTRICTED_SYMBOL
    )
    assert approved(rig.new("NYC-HF-01", "USDCAD", BUY, 1_000_000))
    # limits.toml: NYC-CORP-03 may not trade USDJPY; NYC-HF-01 may
    assert rejected(rig.new("NYC-CORP-03", "USDJPY", BUY, 1_000_000)) is (
        RejectReason.RESTRICTED_SYMBOL
    )
    assert approved(rig.new("NYC-HF-01", "USDJPY", BUY, 1_000_000))
    assert approved(rig.new("NYC-CORP-03", "USDCAD", BUY, 1_000_000))


def test_rate_limit_verdict_is_applied() -> None:
    rig = Rig()
    d = rig.new("LON-HF-01", "EURUSD", BUY, 1_000_000, x=ext("EURUSD", rate_ok=False))
    assert rejected(d) is RejectReason.RATE_LIMIT
    assert approved(rig.new("LON-HF-01", "EURUSD", BUY, 1_000_000, x=ext("EURUSD")))


def test_max_qty_per_instrument() -> None:
    rig = Rig(region="nyc")  # limits.toml: USDMXN max_qty 10M
    assert approved(rig.new("NYC-HF-01", "USDMXN", BUY, 10_000_000))
    assert rejected(rig.new("NYC-HF-01", "USDMXN", BUY, 10_000_001)) is RejectReason.MAX_QTY
    assert approved(rig.new("NYC-HF-01", "USDCAD", BUY, 50_000_000))  # default 50M
    assert rejected(rig.new("NYC-HF-01", "USDCAD", BUY, 50_000_001)) is RejectReason.MAX_QTY


def test_max_notional_per_instrument_in_usd() -> None:
    base = RiskLimits.load()
    limits = replace(
        base,
        instruments={
            **base.instruments,
            "EURUSD": InstrumentLimits(max_qty=50_000_000, max_notional_usd=1_000_000),
        },
    )
    rig = Rig(limits=limits)
    # EUR at 1.085 USD: 921,658 EUR = 999,998.93 USD (999,999 rounded up) passes,
    # 922,000 EUR = 1,000,370 USD does not
    assert approved(rig.new("LON-HF-01", "EURUSD", BUY, 921_658))
    assert rejected(rig.new("LON-HF-01", "EURUSD", BUY, 922_000)) is RejectReason.MAX_NOTIONAL


def test_no_reference_price_rejects_limit_and_market() -> None:
    rig = Rig()
    none = Externals(rate_ok=True, ref=None)
    assert rejected(rig.new("LON-HF-01", "EURUSD", BUY, 1_000, x=none)) is (
        RejectReason.NO_REFERENCE_PRICE
    )
    d = rig.new(
        "LON-HF-01",
        "EURUSD",
        SELL,
        1_000,
        ord_type=OrdType.MARKET,
        tif=TimeInForce.IOC,
        x=none,
    )
    assert rejected(d) is RejectReason.NO_REFERENCE_PRICE
    assert approved(rig.new("LON-HF-01", "EURUSD", BUY, 1_000))


@pytest.mark.parametrize("side", [BUY, SELL])
def test_price_collar_both_sides(side: Side) -> None:
    rig = Rig()
    mid = MIDS["EURUSD"]  # 108450; 150 bps of it = 1626.75 ticks
    assert rig.limits.collar_bps == 150
    assert approved(rig.new("LON-HF-01", "EURUSD", side, 1_000, mid + 1626))
    assert approved(rig.new("LON-HF-01", "EURUSD", side, 1_000, mid - 1626))
    assert rejected(rig.new("LON-HF-01", "EURUSD", side, 1_000, mid + 1627)) is (
        RejectReason.PRICE_COLLAR
    )
    assert rejected(rig.new("LON-HF-01", "EURUSD", side, 1_000, mid - 1627)) is (
        RejectReason.PRICE_COLLAR
    )


def test_market_order_skips_the_collar() -> None:
    rig = Rig()
    d = rig.new("LON-HF-01", "EURUSD", BUY, 1_000, ord_type=OrdType.MARKET, tif=TimeInForce.IOC)
    assert approved(d)


def test_credit_limit_on_net_open_exposure() -> None:
    rig = Rig(region="sgp")  # SGP-CORP-03: 20M USD
    acct = "SGP-CORP-03"
    assert approved(rig.new(acct, "USDJPY", BUY, 15_000_000, 150000))
    assert rig.engine.exposure_usd(acct) == 15_000_000
    assert rejected(rig.new(acct, "USDJPY", BUY, 5_000_001, 150000)) is RejectReason.CREDIT_LIMIT
    assert approved(rig.new(acct, "USDJPY", BUY, 5_000_000, 150000))
    assert rig.engine.exposure_usd(acct) == 20_000_000
    # the opposite side nets: worst case is max(open buys, open sells) per symbol
    assert approved(rig.new(acct, "USDJPY", SELL, 20_000_000, 152000))
    assert rig.engine.exposure_usd(acct) == 20_000_000
    # another symbol adds up
    assert rejected(rig.new(acct, "USDSGD", BUY, 1_000, 134210)) is RejectReason.CREDIT_LIMIT


def test_order_that_does_not_increase_exposure_passes_while_over_the_limit() -> None:
    rig = Rig(region="sgp")
    acct = "SGP-CORP-03"
    assert approved(rig.new(acct, "USDJPY", BUY, 15_000_000, 150000))
    base = rig.limits
    tight = replace(base, accounts={**base.accounts, acct: AccountLimits(credit_limit_usd=1_000)})
    rig.engine.set_limits(tight)  # a runtime change leaves the account over its limit
    assert rejected(rig.new(acct, "USDJPY", BUY, 1_000, 150000)) is RejectReason.CREDIT_LIMIT
    assert approved(rig.new(acct, "USDJPY", SELL, 15_000_000, 152000))  # hedges, no increase
    assert rejected(rig.new(acct, "USDJPY", SELL, 1_000, 152000)) is RejectReason.CREDIT_LIMIT
    rig.engine.set_limits(base)
    assert approved(rig.new(acct, "USDJPY", SELL, 1_000, 152000))


def test_duplicate_cl_ord_id_is_rejected() -> None:
    rig = Rig()
    assert approved(rig.new("LON-HF-01", "EURUSD", BUY, 1_000, cl="same"))
    assert rejected(rig.new("LON-HF-01", "EURUSD", BUY, 1_000, cl="same")) is (
        RejectReason.DUPLICATE_CL_ORD_ID
    )
    assert approved(rig.new("LON-BANK-02", "EURUSD", BUY, 1_000, cl="same"))


def test_closed_orders_ids_are_forgotten_beyond_the_memory_open_ones_never() -> None:
    rig = Rig(region="sgp", cl_id_memory=4)
    acct, sym = "SGP-CORP-03", "USDJPY"
    assert approved(rig.new(acct, sym, BUY, 1_000_000, 150000, cl="resting"))  # stays open
    for i in range(8):  # IOCs with nothing to trade against: each closes at once
        assert approved(rig.new(acct, sym, SELL, 1_000, 152000, tif=TimeInForce.IOC, cl=f"i{i}"))
    st = rig.engine.state(acct)
    assert len(st.cl_ids) == 4 and "resting" in st.cl_ids
    assert set(st.cl_ids) == {"resting", "i5", "i6", "i7"}  # the open one moved to the back
    # a late cancel of a remembered closed order is answered by risk with how it ended (as
    # the book would, without the trip to it); one of a forgotten id is UNKNOWN_ORDER, as the
    # book answers beyond its terminal memory
    d = rig.cancel(acct, sym, "i7")
    assert d.command is None and isinstance(d.report, CancelReject)
    assert d.report.reason is RejectReason.TOO_LATE_TO_CANCEL and d.report.response_to == "cancel"
    assert d.report.ord_status is OrdStatus.CANCELED and d.report.order_id == "O-i7"
    # a closed order whose end risk forgot (ids outlive ends only by the memory's order) still
    # goes to the book, which answers from its own memory
    del st.closed["O-i6"]
    assert isinstance(rig.cancel(acct, sym, "i6").command, Cancel)
    d = rig.cancel(acct, sym, "i0")
    assert isinstance(d.report, CancelReject) and d.report.reason is RejectReason.UNKNOWN_ORDER
    # the open order is always found, however old its id
    for i in range(20):
        rig.new(acct, sym, SELL, 1_000, 152000, tif=TimeInForce.IOC, cl=f"j{i}")
    assert isinstance(rig.cancel(acct, sym, "resting").command, Cancel)
    assert len(st.cl_ids) <= 4 + 1


def test_the_id_just_noted_is_kept_when_every_other_is_open() -> None:
    rig = Rig(region="sgp", cl_id_memory=3)
    acct, sym = "SGP-CORP-03", "USDJPY"
    for i in range(5):  # more open orders than the memory holds: all of them stay
        assert approved(rig.new(acct, sym, BUY, 100_000, 150000 - i, cl=f"open{i}"))
    assert set(rig.engine.state(acct).cl_ids) == {f"open{i}" for i in range(5)}
    for i in range(5):
        assert isinstance(rig.cancel(acct, sym, f"open{i}").command, Cancel)


def test_memory_of_ids_stays_bounded_over_a_long_day() -> None:
    rig = Rig(region="sgp", cl_id_memory=1_000)
    acct, sym = "SGP-CORP-03", "USDJPY"
    for i in range(5_000):
        rig.new(acct, sym, SELL, 1_000, 152000, tif=TimeInForce.IOC, cl=f"d{i}")
    assert len(rig.engine.state(acct).cl_ids) == 1_000
    assert len(_restored(rig.engine, cl_id_memory=1_000).state(acct).cl_ids) == 1_000


# ---- feedback from execution ---------------------------------------------------------------------


def test_fill_moves_exposure_from_open_order_to_position() -> None:
    rig = Rig(region="sgp")
    acct = "SGP-CORP-03"
    assert approved(rig.new(acct, "USDJPY", BUY, 10_000_000, 151000, cl="b1"))
    rig.counterparty("USDJPY", SELL, 4_000_000, 151000)
    st = rig.engine.state(acct)
    (o,) = st.orders.values()
    assert o.leaves == 6_000_000 and st.positions["USDJPY"] == 4_000_000
    assert rig.engine.exposure_usd(acct) == 10_000_000  # |pos + open buys| unchanged
    # a sell of the position reduces nothing worst-case but is within the limit
    assert approved(rig.new(acct, "USDJPY", SELL, 4_000_000, 152000))
    rig.counterparty("USDJPY", BUY, 4_000_000, 152000)
    assert st.positions["USDJPY"] == 0
    assert rig.engine.exposure_usd(acct) == 6_000_000
    rig.counterparty("USDJPY", SELL, 6_000_000, 151000)  # fills b1 completely
    assert st.orders == {} and st.positions["USDJPY"] == 6_000_000
    assert rig.engine.exposure_usd(acct) == 6_000_000


def test_a_redelivered_fill_is_not_added_to_the_position_twice() -> None:
    """A link cut loses the ack of the last reports; they come back, in order, when the worker
    may no longer remember their ids (its memory is bounded): the engine must not count them
    twice, and it ends where the first pass ended."""
    rig = Rig(region="sgp")
    acct = "SGP-CORP-03"
    assert approved(rig.new(acct, "USDJPY", BUY, 10_000_000, 151000, cl="b1"))
    rig.counterparty("USDJPY", SELL, 4_000_000, 151000)  # partial: b1 stays open
    assert approved(rig.new(acct, "USDJPY", BUY, 2_000_000, 151000, cl="b2"))
    rig.counterparty("USDJPY", SELL, 3_000_000, 151000)  # b1 2M more; b2 1M
    rig.counterparty("USDJPY", SELL, 5_000_000, 151000)  # fills b1 (4M), b2 (1M)
    st = rig.engine.state(acct)
    assert st.orders == {} and st.positions["USDJPY"] == 12_000_000
    exposure = rig.engine.exposure_usd(acct)
    for n in range(1, len(rig.delivered) + 1):  # any unacked suffix, delivered again
        rig.redeliver(n)
        assert st.positions["USDJPY"] == 12_000_000
        assert rig.engine.exposure_usd(acct) == exposure


@pytest.mark.parametrize("closing", [False, True])
def test_fills_count_once_whatever_order_their_reports_come_in(closing: bool) -> None:
    """Execution re-sends a report whose PubAck it lost; JetStream may store it after a later
    report of the same order. The position counts each fill once either way, and a late
    report's leaves do not overwrite a newer one's."""
    rig = Rig(region="sgp")
    acct = "SGP-CORP-03"
    rig.auto_feedback = False
    assert approved(rig.new(acct, "USDJPY", BUY, 10_000_000, 151000, cl="b1"))
    rig.counterparty("USDJPY", SELL, 4_000_000, 151000)
    rig.counterparty("USDJPY", SELL, 6_000_000 if closing else 3_000_000, 151000)
    i, j = [k for k, r in enumerate(rig.pending) if getattr(r, "last_qty", 0)]
    # the second fill's report is stored first
    rig.pending[i], rig.pending[j] = rig.pending[j], rig.pending[i]
    rig.deliver()
    st = rig.engine.state(acct)
    assert st.positions["USDJPY"] == (10_000_000 if closing else 7_000_000)
    if closing:
        assert st.orders == {}
    else:
        (o,) = st.orders.values()
        assert (o.leaves, o.cum) == (3_000_000, 7_000_000)
    assert rig.engine.exposure_usd(acct) == 10_000_000


def test_an_order_restored_without_its_filled_quantity_counts_fills_as_they_come() -> None:
    """A snapshot from before stop 15 has no filled quantity per open order: the engine does
    not know what the position already holds of it, so it adds each fill as reported (not
    the whole cum_qty), until a report tells it the order's cum_qty."""
    import msgpack

    rig = Rig(region="sgp")
    acct = "SGP-CORP-03"
    assert approved(rig.new(acct, "USDJPY", BUY, 10_000_000, 151000, cl="b1"))
    rig.counterparty("USDJPY", SELL, 4_000_000, 151000)
    snap = msgpack.unpackb(msgpack.packb(rig.engine.snapshot(), use_bin_type=True), raw=False)
    del snap["accounts"][acct]["cum"]
    rig.engine = RiskEngine.restore(snap, TOPO, "sgp")
    st = rig.engine.state(acct)
    rig.counterparty("USDJPY", SELL, 1_000_000, 151000)
    rig.counterparty("USDJPY", SELL, 2_000_000, 151000)
    assert st.positions["USDJPY"] == 7_000_000
    (o,) = st.orders.values()
    assert (o.leaves, o.cum) == (3_000_000, 7_000_000)


def test_a_redelivered_suffix_ends_where_the_first_pass_did() -> None:
    """Within the suffix an older report sets leaves again (over-reserving for a moment,
    never under); by its end the open order is as the first pass left it."""
    rig = Rig(region="sgp")
    acct = "SGP-CORP-03"
    assert approved(rig.new(acct, "USDJPY", BUY, 10_000_000, 151000, cl="b1"))
    rig.counterparty("USDJPY", SELL, 1_000_000, 151000)
    d = rig.replace(acct, "USDJPY", "b1", 8_000_000, 151000)
    assert isinstance(d.command, Replace)
    rig.execute("USDJPY", d.command)
    rig.counterparty("USDJPY", SELL, 2_000_000, 151000)
    st = rig.engine.state(acct)
    (o,) = st.orders.values()
    first = (o.cl_ord_id, o.leaves, o.cum, o.pending_qty, dict(st.positions))
    for n in range(1, len(rig.delivered) + 1):
        rig.redeliver(n)
        assert (o.cl_ord_id, o.leaves, o.cum, o.pending_qty, dict(st.positions)) == first


def _first_replace(rig: Rig) -> tuple[str, ExecutionReport]:
    """An order of 1M (reports delivered by hand), replaced to 2M: (account, the replace's
    REPLACED report, not delivered yet)."""
    acct = "SGP-CORP-03"
    rig.auto_feedback = False
    assert approved(rig.new(acct, "USDJPY", BUY, 1_000_000, 151000, cl="b1"))
    rig.deliver()
    assert isinstance(rig.replace(acct, "USDJPY", "b1", 2_000_000, 151000).command, Replace)
    (r1,) = _replaced(rig)
    return acct, r1


def _replaced(rig: Rig) -> list[ExecutionReport]:
    return [
        r
        for r in rig.pending
        if isinstance(r, ExecutionReport) and r.exec_type is ExecType.REPLACED
    ]


def test_a_replace_report_ends_only_its_own_reservation() -> None:
    """Two replaces on their way: the first one's report must not end the reservation the
    second still needs (before stop 16 it did, and for a moment the account's exposure
    counted the first replace's quantity, not the second's)."""
    rig = Rig(region="sgp")
    acct, r1 = _first_replace(rig)
    assert isinstance(rig.replace(acct, "USDJPY", r1.cl_ord_id, 5_000_000, 151000).command, Replace)
    assert rig.engine.exposure_usd(acct) == 5_000_000
    rig.deliver(1)  # the first replace's report
    assert rig.engine.exposure_usd(acct) == 5_000_000  # the second still reserved
    rig.deliver()
    (o,) = rig.engine.state(acct).orders.values()
    assert (o.leaves, o.pending_qty, rig.engine.exposure_usd(acct)) == (5_000_000, 0, 5_000_000)


def test_a_late_replace_report_changes_nothing() -> None:
    """A replace's report delivered again after a newer one (its ack lost in a link cut,
    its id past risk's memory): it must not end a third replace's reservation, nor bring
    back the old id, price or quantity."""
    rig = Rig(region="sgp")
    acct, r1 = _first_replace(rig)
    rig.deliver()
    rig.replace(acct, "USDJPY", r1.cl_ord_id, 3_000_000, 151001)
    (r2,) = _replaced(rig)
    rig.deliver()
    assert isinstance(rig.replace(acct, "USDJPY", r2.cl_ord_id, 8_000_000, 151002).command, Replace)
    (o,) = rig.engine.state(acct).orders.values()
    before = (o.cl_ord_id, o.price_ticks, o.leaves, o.pending_qty)
    assert before == (r2.cl_ord_id, 151001, 3_000_000, 8_000_000)
    rig.engine.on_report(r1)
    assert (o.cl_ord_id, o.price_ticks, o.leaves, o.pending_qty) == before
    assert rig.engine.exposure_usd(acct) == 8_000_000


def test_a_refused_replace_does_not_end_an_earlier_one_not_reported_yet() -> None:
    """Order 1M; replace B to 5M and replace C to 4M approved; the book applies B, a 3M
    trade follows, C is refused (its new id is in use in the book). B's report reaches risk
    after C's refusal (its first publish lost, sent again later): the refusal must not end
    the reservation, or risk counts 1M while 5M is live in the book."""
    rig = Rig(region="sgp")
    acct, r1 = _first_replace(rig)  # B: 1M -> 2M, applied, its report held back
    b = rig.replace(acct, "USDJPY", r1.cl_ord_id, 5_000_000, 151000)  # applied too
    assert isinstance(b.command, Replace)
    # an order of the account that risk does not hold (entered under another build, say)
    # holds the id C will ask for, so the book refuses C
    taken = Submit(
        order_id="O-taken",
        cl_ord_id="C-late",
        account=acct,
        home_region="sgp",
        side=BUY,
        ord_type=OrdType.LIMIT,
        tif=TimeInForce.GTC,
        qty=1_000_000,
        price_ticks=140000,
    )
    rig.book("USDJPY").apply(taken, seq=next(_seq), ts_ns=1)
    c_msg = replace_order(acct, "C-late", b.command.cl_ord_id, "USDJPY", 4_000_000, 151000)
    c = rig.engine.on_replace(c_msg, ext=ext("USDJPY"), seq=next(_seq))
    assert isinstance(c.command, Replace)
    rig.counterparty("USDJPY", SELL, 3_000_000, 151000)
    rig.execute("USDJPY", c.command)  # refused by the book: its new id is in use
    (refusal,) = [r for r in rig.pending if isinstance(r, CancelReject)]
    assert refusal.cl_ord_id == "C-late"
    assert refusal.reason is RejectReason.DUPLICATE_CL_ORD_ID
    rig.pending.remove(refusal)
    rig.engine.on_cancel_reject(refusal)  # first, before every report of B
    assert rig.engine.exposure_usd(acct) >= 5_000_000  # B's 5M still reserved
    rig.deliver()
    (o,) = rig.engine.state(acct).orders.values()
    assert (o.leaves, o.pending_qty, o.pending_cl) == (2_000_000, 0, [])
    assert rig.engine.state(acct).positions["USDJPY"] == 3_000_000


def test_the_latest_replace_and_its_reports_survive_a_snapshot() -> None:
    rig = Rig(region="sgp")
    acct, r1 = _first_replace(rig)
    rig.replace(acct, "USDJPY", r1.cl_ord_id, 5_000_000, 151000)
    rig.deliver(1)
    rig.engine = _restored(rig.engine)
    (o,) = rig.engine.state(acct).orders.values()
    assert o.pending_cl and o.ver[0] == "sgp" and o.pending_qty == 5_000_000
    rig.engine.on_report(r1)  # again, after the restore: nothing changes
    assert rig.engine.exposure_usd(acct) == 5_000_000
    rig.deliver()
    assert rig.engine.state(acct).orders[o.order_id].pending_qty == 0


def test_cancel_releases_exposure_and_unknown_cancel_is_rejected() -> None:
    rig = Rig(region="sgp")
    acct = "SGP-CORP-03"
    assert approved(rig.new(acct, "USDJPY", BUY, 20_000_000, 150000, cl="big"))
    assert rejected(rig.new(acct, "USDJPY", BUY, 1_000, 150000)) is RejectReason.CREDIT_LIMIT
    d = rig.cancel(acct, "USDJPY", "big")
    assert isinstance(d.command, Cancel)
    assert rig.engine.exposure_usd(acct) == 0
    assert approved(rig.new(acct, "USDJPY", BUY, 20_000_000, 150000))
    d = rig.cancel(acct, "USDJPY", "never-sent")
    assert isinstance(d.report, CancelReject) and d.report.reason is RejectReason.UNKNOWN_ORDER


def test_replace_moves_exposure_and_is_credit_checked() -> None:
    rig = Rig(region="sgp")
    acct = "SGP-CORP-03"
    assert approved(rig.new(acct, "USDJPY", BUY, 10_000_000, 150000, cl="r0"))
    d = rig.replace(acct, "USDJPY", "r0", 25_000_000, 150000)
    assert isinstance(d.report, CancelReject) and d.report.reason is RejectReason.CREDIT_LIMIT
    assert rig.engine.exposure_usd(acct) == 10_000_000
    d = rig.replace(acct, "USDJPY", "r0", 18_000_000, 150100)
    assert isinstance(d.command, Replace)
    (o,) = rig.engine.state(acct).orders.values()
    assert o.leaves == 18_000_000 and o.pending_qty == 0 and o.price_ticks == 150100
    assert rig.engine.exposure_usd(acct) == 18_000_000
    # the order is now known by the replacement's id: shrink it with that id
    new_cl = o.cl_ord_id
    assert new_cl.startswith("R")
    assert isinstance(rig.replace(acct, "USDJPY", new_cl, 2_000_000, 150100).command, Replace)
    assert rig.engine.exposure_usd(acct) == 2_000_000


def test_replace_in_flight_reserves_the_larger_quantity() -> None:
    rig = Rig(region="sgp")
    rig.auto_feedback = False
    acct = "SGP-CORP-03"
    assert approved(rig.new(acct, "USDJPY", BUY, 5_000_000, 150000, cl="p0"))
    rig.deliver()
    assert isinstance(rig.replace(acct, "USDJPY", "p0", 15_000_000, 150000).command, Replace)
    assert rig.engine.exposure_usd(acct) == 15_000_000  # before the REPLACED report arrives
    assert rejected(rig.new(acct, "USDJPY", BUY, 5_000_001, 150000)) is RejectReason.CREDIT_LIMIT
    rig.deliver()
    assert rig.engine.exposure_usd(acct) == 15_000_000


# ---- property: the credit limit holds over any history -------------------------------------------

ACCT = "LON-CORP-03"  # limits.toml: 20M USD
LIMIT = 20_000_000
SYMS = ("EURUSD", "USDJPY")
QTY = st.integers(min_value=1, max_value=40).map(lambda k: k * 500_000)
OFFSET = st.integers(min_value=-10, max_value=10)  # ticks around the mid: crossing happens

ops = st.one_of(
    st.tuples(st.just("new"), st.sampled_from(SYMS), st.sampled_from([BUY, SELL]), QTY, OFFSET),
    st.tuples(st.just("ioc"), st.sampled_from(SYMS), st.sampled_from([BUY, SELL]), QTY, OFFSET),
    st.tuples(st.just("cp"), st.sampled_from(SYMS), st.sampled_from([BUY, SELL]), QTY, OFFSET),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("replace"), st.integers(0, 50), QTY, OFFSET),
    st.tuples(st.just("deliver"), st.integers(0, 6)),
    st.tuples(st.just("redeliver"), st.integers(0, 12)),
    st.tuples(st.just("swap"), st.integers(0, 12)),
)


def true_exposure(rig: Rig, positions: dict[str, int]) -> int:
    """Exposure computed from the books themselves (what really is open and filled)."""
    total = 0
    for sym in SYMS:
        opens = rig.book(sym).open_orders(ACCT)
        buy = sum(o.leaves_qty for o in opens if o.side is BUY)
        sell = sum(o.leaves_qty for o in opens if o.side is SELL)
        pos = positions.get(sym, 0)
        total += rig.engine.base_usd(sym, max(abs(pos + buy), abs(pos - sell)))
    return total


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, min_size=1, max_size=60))
def test_credit_limit_never_exceeded_over_random_histories(history: list[tuple[Any, ...]]) -> None:
    rig = Rig()
    rig.auto_feedback = False  # reports arrive late, in order, interleaved with new orders
    positions: dict[str, int] = {}
    sent: list[tuple[str, str]] = []

    def track(outs: list[Output]) -> None:
        for r in outs:
            if isinstance(r, ExecutionReport) and r.account == ACCT and r.last_qty:
                sign = 1 if r.side is BUY else -1
                positions[r.symbol] = positions.get(r.symbol, 0) + sign * r.last_qty

    for op in history:
        kind = op[0]
        if kind in ("new", "ioc"):
            _, sym, side, qty, off = op
            tif = TimeInForce.IOC if kind == "ioc" else TimeInForce.GTC
            before = rig.engine.exposure_usd(ACCT)
            s = next(_seq)
            msg = new_order(ACCT, f"P{s}", sym, side, qty, MIDS[sym] + off, tif)
            d = rig.engine.on_new(msg, order_id=f"O{s}", accepted_ns=s, ext=ext(sym), seq=s)
            after = rig.engine.exposure_usd(ACCT)
            if d.command is not None:
                assert after <= LIMIT or after <= before, (before, after)
                track(rig.execute(sym, d.command))
                sent.append((msg.cl_ord_id, sym))
            else:
                assert rejected(d) is RejectReason.CREDIT_LIMIT
                assert after == before
        elif kind == "cp":
            _, sym, side, qty, off = op
            track(rig.counterparty(sym, side, qty, MIDS[sym] + off))
        elif kind == "cancel":
            if sent:
                cl, sym = sent[op[1] % len(sent)]
                d = rig.cancel(ACCT, sym, cl, run=False)
                if d.command is not None:
                    track(rig.execute(sym, d.command))
        elif kind == "replace":
            # of any order sent, replaced or not: a stale or unknown orig is refused somewhere
            if sent:
                cl, sym = sent[op[1] % len(sent)]
                _, _, qty, off = op
                before = rig.engine.exposure_usd(ACCT)
                d = rig.replace(ACCT, sym, cl, qty, MIDS[sym] + off, run=False)
                after = rig.engine.exposure_usd(ACCT)
                if d.command is not None:
                    assert after <= LIMIT or after <= before, (before, after)
                    track(rig.execute(sym, d.command))
                    sent.append((d.command.cl_ord_id, sym))
                else:
                    assert after == before
        elif kind == "redeliver":
            rig.redeliver(op[1])
        elif kind == "swap":
            rig.swap(op[1])
        else:
            rig.deliver(op[1])
        # reports in flight only ever release exposure: the engine is conservative
        assert true_exposure(rig, positions) <= rig.engine.exposure_usd(ACCT)
        assert true_exposure(rig, positions) <= LIMIT
    rig.deliver()
    assert rig.engine.exposure_usd(ACCT) == true_exposure(rig, positions)
    for sym in SYMS:
        assert rig.engine.state(ACCT).positions.get(sym, 0) == positions.get(sym, 0)


# ---- snapshots (the worker restores one, then replays only later RISKLOG records) --------------


def _restored(engine: RiskEngine, *, cl_id_memory: int = DEFAULT_CL_ID_MEMORY) -> RiskEngine:
    import msgpack

    wire = msgpack.unpackb(msgpack.packb(engine.snapshot(), use_bin_type=True), raw=False)
    return RiskEngine.restore(wire, TOPO, engine.region, cl_id_memory=cl_id_memory)


def test_limits_document_round_trips() -> None:
    lim = RiskLimits.load()
    assert RiskLimits.from_mapping(lim.to_mapping()) == lim


@settings(max_examples=100, deadline=None)
@given(st.lists(ops, min_size=1, max_size=40), st.lists(ops, min_size=1, max_size=20))
def test_restored_engine_decides_like_the_original(
    before: list[tuple[Any, ...]], after: list[tuple[Any, ...]]
) -> None:
    """Snapshot after one random history, restore, then feed both engines the same inputs:
    identical decisions, exposure and snapshots all the way (with a memory of 6 cl_ord_ids per
    account, so forgetting them is part of what must match)."""
    rig = Rig(cl_id_memory=6)
    rig.engine.set_kill("account.LON-HF-01", True)
    rig.engine.set_limits(replace(rig.limits, collar_bps=200))

    def run(
        eng: RiskEngine, history: list[tuple[Any, ...]], tag: str, sent: list[tuple[str, str]]
    ) -> list[Any]:
        """``sent``: (cl_ord_id, symbol) of the account's orders so far, replaced ones
        included (cancels and replaces pick among them, before the snapshot or after)."""
        out: list[Any] = []
        for i, op in enumerate(history):
            kind = op[0]
            if kind in ("new", "ioc", "cp"):
                _, sym, side, qty, off = op
                acct = ACCT if kind != "cp" else "LON-BANK-02"
                tif = TimeInForce.IOC if kind == "ioc" else TimeInForce.GTC
                msg = new_order(acct, f"{tag}{i}", sym, side, qty, MIDS[sym] + off, tif)
                d = eng.on_new(msg, order_id=f"O{tag}{i}", accepted_ns=i, ext=ext(sym), seq=i)
                out.append((d.command, d.report))
                if acct == ACCT:
                    sent.append((msg.cl_ord_id, sym))
            elif kind in ("cancel", "replace"):
                orig, sym = sent[op[1] % len(sent)] if sent else (f"{tag}{op[1]}", SYMS[0])
                if kind == "cancel":
                    msg_c = CancelOrder(
                        account=ACCT, cl_ord_id=f"X{tag}{i}", orig_cl_ord_id=orig, symbol=sym
                    )
                    d = eng.on_cancel(msg_c, seq=i)
                else:
                    _, _, qty, off = op
                    msg_r = replace_order(ACCT, f"R{tag}{i}", orig, sym, qty, MIDS[sym] + off)
                    d = eng.on_replace(msg_r, ext=ext(sym), seq=i)
                    if d.command is not None:
                        sent.append((msg_r.cl_ord_id, sym))
                out.append((d.command, d.report))
            out.append(eng.exposure_usd(ACCT))
        return out

    before_sent: list[tuple[str, str]] = []
    run(rig.engine, before, "a", before_sent)
    twin = _restored(rig.engine, cl_id_memory=6)
    assert twin.snapshot() == rig.engine.snapshot()
    assert twin.accounts == rig.engine.accounts  # reserved is recomputed from the open orders
    assert twin.kills == rig.engine.kills and twin.limits == rig.engine.limits
    assert run(twin, after, "b", list(before_sent)) == run(
        rig.engine, after, "b", list(before_sent)
    )
    assert twin.snapshot() == rig.engine.snapshot()


def test_replaying_recorded_verdicts_rebuilds_the_state_whatever_the_limits_now() -> None:
    """A replay applies each order as it was decided: an engine under limits that reject
    everything ends with the original's open orders, and one that would approve everything
    does not pick up the original's rejects."""
    loose, tight = Rig(region="sgp"), Rig(region="sgp")
    acct, sym = "SGP-CORP-03", "USDJPY"
    inputs = []
    for i in range(12):
        qty = 30_000_000 if i % 4 == 3 else 1_000_000  # every 4th is over the credit limit
        msg = new_order(acct, f"v{i}", sym, BUY, qty, None if i % 5 == 0 else 150000)
        d = loose.engine.on_new(msg, order_id=f"O-v{i}", accepted_ns=i, ext=ext(sym), seq=i)
        inputs.append((msg, d.command is not None))
    assert [ok for _, ok in inputs].count(False) >= 2
    tight.engine.set_limits(replace(tight.limits, collar_bps=0, rate_per_s=0))
    tight.engine.set_kill("global", True)
    for i, (msg, ok) in enumerate(inputs):
        tight.engine.on_new(msg, order_id=f"O-v{i}", accepted_ns=i, ext=ext(sym), seq=i, verdict=ok)
    assert tight.engine.accounts == loose.engine.accounts
    assert tight.engine.exposure_usd(acct) == loose.engine.exposure_usd(acct)
    # a replace, replayed approved under limits that would refuse it
    orig = next(m.cl_ord_id for m, ok in inputs if ok and m.ord_type is OrdType.LIMIT)
    rep = replace_order(acct, "v-r", orig, sym, 2_000_000, 150001)
    assert loose.engine.on_replace(rep, ext=ext(sym), seq=99).command is not None
    assert tight.engine.on_replace(rep, ext=ext(sym), seq=99).command is None
    # the live refusal above changed nothing; now the recorded approval
    assert tight.engine.on_replace(rep, ext=ext(sym), seq=99, verdict=True).command is not None
    assert tight.engine.accounts == loose.engine.accounts


def test_a_recorded_approval_the_state_cannot_take_is_an_error() -> None:
    """The state diverged from what was decided: the replay must stop, not guess."""
    rig = Rig(region="sgp")
    acct, sym = "SGP-CORP-03", "USDJPY"
    msg = new_order(acct, "twice", sym, BUY, 1_000_000, 150000)
    rig.engine.on_new(msg, order_id="O-twice", accepted_ns=1, ext=ext(sym), seq=1, verdict=True)
    with pytest.raises(ValueError, match="open already"):
        rig.engine.on_new(msg, order_id="O-twice", accepted_ns=1, ext=ext(sym), seq=2, verdict=True)
    rep = replace_order(acct, "r", "gone", sym, 1, 150000)
    with pytest.raises(ValueError, match="no open order"):
        rig.engine.on_replace(rep, ext=ext(sym), seq=3, verdict=True)


def test_foreign_snapshot_is_refused() -> None:
    snap = RiskEngine(TOPO, "lon", RiskLimits.load()).snapshot()
    with pytest.raises(ValueError, match="expected v1 for 'nyc'"):
        RiskEngine.restore(snap, TOPO, "nyc")


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(sorted(MIDS)),
        st.tuples(
            st.integers(0, 10**9),
            st.integers(0, 10**9),
            st.integers(-(10**9), 10**9),
        ),
        max_size=6,
    ),
    st.sampled_from(sorted(MIDS)),
    st.sampled_from([Side.BUY, Side.SELL]),
    st.integers(1, 10**9),
)
def test_exposure_change_is_the_two_full_passes(
    state: dict[str, tuple[int, int, int]], sym: str, side: Side, qty: int
) -> None:
    """The one-pass exposure_change equals the definition: every symbol's larger side,
    summed, without and with the extra order."""
    engine = Rig().engine
    acct = "LON-HF-01"
    st_ = engine.state(acct)
    st_.reserved = {s: [b, sl] for s, (b, sl, _p) in state.items()}
    st_.positions = {s: p for s, (_b, _sl, p) in state.items()}

    def full(extra: tuple[str, Side, int] | None) -> int:
        per = {k: list(v) for k, v in st_.reserved.items()}
        if extra is not None:
            b = per.setdefault(extra[0], [0, 0])
            b[0 if extra[1] is Side.BUY else 1] += extra[2]
        return sum(
            engine.base_usd(
                s, max(abs(st_.positions.get(s, 0) + bs[0]), abs(st_.positions.get(s, 0) - bs[1]))
            )
            for s, bs in ((s, per.get(s, [0, 0])) for s in set(per) | set(st_.positions))
        )

    assert engine.exposure_change(acct, (sym, side, qty)) == (full(None), full((sym, side, qty)))
    assert engine.exposure_usd(acct) == full(None)
    assert engine.exposure_usd(acct, extra=(sym, side, qty)) == full((sym, side, qty))


def test_a_late_replace_reports_how_the_order_ended_not_new() -> None:
    """FIX wants the order's current status on a cancel reject: a late replace of a filled
    order said NEW, which a desk's OMS could take for a live order again. Risk now keeps how
    its latest closed orders ended (as many as their client order ids), through a snapshot;
    one closed too long ago is UNKNOWN_ORDER, as a forgotten id already was."""
    rig = Rig(region="sgp", cl_id_memory=3)
    acct, sym = "SGP-CORP-03", "USDJPY"
    assert approved(rig.new(acct, sym, BUY, 1_000_000, 150000, cl="filled"))
    rig.counterparty(sym, SELL, 1_000_000, 150000)  # fills it
    rig.deliver()
    assert approved(rig.new(acct, sym, BUY, 1_000_000, 149000, cl="canceled"))
    assert isinstance(rig.cancel(acct, sym, "canceled").command, Cancel)
    rig.deliver()

    for cl, status in (("filled", OrdStatus.FILLED), ("canceled", OrdStatus.CANCELED)):
        d = rig.replace(acct, sym, cl, 2_000_000, 150000)
        assert d.command is None and isinstance(d.report, CancelReject), d
        assert d.report.reason is RejectReason.TOO_LATE_TO_CANCEL
        assert d.report.ord_status is status and d.report.order_id == f"O-{cl}"

    restored = RiskEngine.restore(rig.engine.snapshot(), TOPO, "sgp", cl_id_memory=3)
    assert restored.state(acct).closed == rig.engine.state(acct).closed
    assert restored.snapshot() == rig.engine.snapshot()
    bad = rig.engine.snapshot()
    bad["accounts"][acct]["closed"]["O-filled"] = "DONE"  # not an OrdStatus: unusable
    with pytest.raises(ValueError):
        RiskEngine.restore(bad, TOPO, "sgp", cl_id_memory=3)

    for i in range(4):  # IOCs that close at once push "filled" out of the memory
        rig.new(acct, sym, SELL, 1_000, 152000, tif=TimeInForce.IOC, cl=f"i{i}")
    rig.deliver()
    rig.engine.state(acct).cl_ids["filled"] = "O-filled"  # still named, end forgotten
    d = rig.replace(acct, sym, "filled", 2_000_000, 150000)
    assert isinstance(d.report, CancelReject) and d.report.reason is RejectReason.UNKNOWN_ORDER
    assert d.report.ord_status is OrdStatus.REJECTED


def test_a_refused_replace_of_a_partly_filled_order_says_partially_filled() -> None:
    """Risk's reject of a live order's replace said NEW even after a fill, so a desk's OMS
    would show a partly filled order as untouched. Risk now keeps each open order's filled
    quantity from its reports (and in its snapshot)."""
    rig = Rig(region="sgp")
    acct, sym = "SGP-CORP-03", "USDJPY"
    assert approved(rig.new(acct, sym, BUY, 3_000_000, 150000, cl="p"))
    too_big = rig.engine.limits.instrument(sym).max_qty + 1
    d = rig.replace(acct, sym, "p", too_big, 150000)
    assert rejected(d) is RejectReason.MAX_QTY
    assert isinstance(d.report, CancelReject) and d.report.ord_status is OrdStatus.NEW

    rig.counterparty(sym, SELL, 1_000_000, 150000)  # fills a third of it
    rig.deliver()
    d = rig.replace(acct, sym, "p", too_big, 150000)
    assert isinstance(d.report, CancelReject) and d.report.reason is RejectReason.MAX_QTY
    assert d.report.ord_status is OrdStatus.PARTIALLY_FILLED and d.report.order_id == "O-p"

    snap = rig.engine.snapshot()
    restored = RiskEngine.restore(snap, TOPO, "sgp")
    assert restored.snapshot() == snap
    assert restored.state(acct).orders["O-p"].status is OrdStatus.PARTIALLY_FILLED
    assert snap["accounts"][acct]["cum"] == {"O-p": 1_000_000}
    # the order rows are as before, so a build without the filled quantity reads this
    # snapshot; one from such a build restores too (NEW until the order's next report)
    assert all(len(row) == 7 for row in snap["accounts"][acct]["orders"])
    del snap["accounts"][acct]["cum"]
    old = RiskEngine.restore(snap, TOPO, "sgp")
    assert old.state(acct).orders["O-p"].status is OrdStatus.NEW
    snap["accounts"][acct]["cum"] = {"O-gone": 5}  # of no open order: unusable
    with pytest.raises(KeyError):
        RiskEngine.restore(snap, TOPO, "sgp")


def _reference_note_cl(
    d: dict[str, str], open_ids: set[str], cl: str, oid: str, memory: int, keep: bool
) -> None:
    """How note_cl forgot before it kept its own key order (next(iter) on the map)."""
    if keep:
        d.setdefault(cl, oid)
    else:
        d[cl] = oid
    looked = 0
    while len(d) > memory and looked < 4:
        oldest = next(iter(d))
        if oldest == cl:
            break
        old = d.pop(oldest)
        if old in open_ids:
            d[oldest] = old
        looked += 1


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["new", "cancel", "close"]), st.integers(0, 12), st.booleans()),
        max_size=120,
    ),
    st.integers(1, 6),
)
def test_the_bounded_id_maps_forget_exactly_as_before(
    steps: list[tuple[str, int, bool]], memory: int
) -> None:
    """The id maps keep their key order beside them (O(1) to find the oldest, where the
    map's own first key cost a scan of its deleted slots: 32-144 us per order at 200,000
    ids). Same maps, in the same order, as the old next(iter(map)) way, through a restore."""
    from router.risk import AccountState, OpenOrder

    acct = AccountState()
    ref_ids: dict[str, str] = {}
    ref_closed: dict[str, str] = {}
    for i, (what, n, keep) in enumerate(steps):
        oid = f"O{n}"
        if what == "new" and oid not in acct.orders:
            acct.add(OpenOrder(oid, f"c{i}", "EURUSD", BUY, 100, 1))
            acct.note_cl(f"c{i}", oid, memory)
            _reference_note_cl(ref_ids, set(acct.orders), f"c{i}", oid, memory, False)
        elif what == "cancel":  # a cancel's id names the order it cancels (keep)
            acct.note_cl(f"x{n}", oid, memory, keep=keep)
            _reference_note_cl(ref_ids, set(acct.orders), f"x{n}", oid, memory, keep)
        elif what == "close" and oid in acct.orders:
            acct.remove(oid)
            acct.note_closed(oid, OrdStatus.FILLED if keep else OrdStatus.CANCELED, memory)
            ref_closed[oid] = (OrdStatus.FILLED if keep else OrdStatus.CANCELED).value
            while len(ref_closed) > memory:
                del ref_closed[next(iter(ref_closed))]
        assert list(acct.cl_ids.items()) == list(ref_ids.items())
        assert list(acct.closed.items()) == list(ref_closed.items())
        assert list(acct.cl_order) == list(acct.cl_ids)
        assert list(acct.closed_order) == list(acct.closed)
    again = AccountState(cl_ids=dict(acct.cl_ids), closed=dict(acct.closed))
    again.restore_order()
    assert list(again.cl_order) == list(acct.cl_order)
    assert list(again.closed_order) == list(acct.closed_order)


def test_a_replace_cutting_an_order_to_its_fills_releases_the_rest() -> None:
    """The book answers a replace below what has filled with REPLACED / FILLED (FIX 4.4, the
    balance canceled): risk counts the fills once and releases the order's open exposure."""
    rig = Rig(region="sgp")
    acct = "SGP-CORP-03"
    assert approved(rig.new(acct, "USDJPY", BUY, 5_000_000, 151000, cl="cut"))
    rig.counterparty("USDJPY", SELL, 3_000_000, 151000)
    assert rig.engine.state(acct).positions["USDJPY"] == 3_000_000
    d = rig.replace(acct, "USDJPY", "cut", 2_000_000, 151000)
    assert isinstance(d.command, Replace)
    (er,) = [r for r in rig.delivered if getattr(r, "exec_type", None) is ExecType.REPLACED]
    assert (er.ord_status, er.cum_qty, er.leaves_qty) == (OrdStatus.FILLED, 3_000_000, 0)
    st = rig.engine.state(acct)
    assert not st.orders and st.positions["USDJPY"] == 3_000_000
    assert rig.engine.exposure_usd(acct) == rig.engine.base_usd("USDJPY", 3_000_000)


# ---- replaces meet the checks a new order meets, on the order's own instrument ------------------


def test_a_replace_without_a_rate_token_is_refused_a_cancel_never_needs_one() -> None:
    """A runaway algo out of tokens re-pricing one order back and forth: every replace is an
    EXEC command, so each takes a token like a new order (it used to take none: all
    approved). The desk can still pull the order: a cancel is never rate-limited."""
    rig = Rig()
    acct = "LON-HF-01"
    assert approved(rig.new(acct, "EURUSD", BUY, 1_000_000, 108000, cl="algo"))
    (o,) = rig.engine.state(acct).orders.values()
    dry = ext("EURUSD", rate_ok=False)
    for px in (108001, 108000, 108001, 108000):
        d = rig.replace(acct, "EURUSD", "algo", 1_000_000, px, x=dry)
        assert rejected(d) is RejectReason.RATE_LIMIT
        assert isinstance(d.report, CancelReject) and d.report.order_id == "O-algo"
        assert d.report.ord_status is OrdStatus.NEW and d.report.response_to == "replace"
    assert (o.price_ticks, o.pending_qty, o.pending_cl) == (108000, 0, [])
    assert approved(rig.replace(acct, "EURUSD", "algo", 1_000_000, 108001))  # with a token
    d = rig.cancel(acct, "EURUSD", "algo")  # on_cancel takes no rate verdict at all
    assert isinstance(d.command, Cancel)
    assert rig.engine.state(acct).orders == {}


@pytest.mark.parametrize("scope", ["global", "account"])
def test_a_replace_growing_an_order_on_a_restricted_symbol_is_refused(scope: str) -> None:
    """An operator restricts USDMXN while an order rests: a replace growing it used to be
    approved (only new orders were checked). One that does not grow it (a reduce, a new
    price) passes, as under a kill switch, so the desk can work the order down."""
    rig = Rig(region="nyc")
    acct = "NYC-HF-01"
    px = MIDS["USDMXN"]
    assert approved(rig.new(acct, "USDMXN", BUY, 1_000_000, px, cl="mx"))
    base = rig.limits
    if scope == "global":
        restricted = replace(base, restricted_symbols=frozenset({"USDMXN"}))
    else:
        only = AccountLimits(credit_limit_usd=250_000_000, restricted_symbols=frozenset({"USDMXN"}))
        restricted = replace(base, accounts={**base.accounts, acct: only})
    rig.engine.set_limits(restricted)
    exposure = rig.engine.exposure_usd(acct)
    d = rig.replace(acct, "USDMXN", "mx", 10_000_000, px)
    assert rejected(d) is RejectReason.RESTRICTED_SYMBOL
    assert isinstance(d.report, CancelReject) and d.report.order_id == "O-mx"
    (o,) = rig.engine.state(acct).orders.values()
    assert (o.leaves, o.pending_qty) == (1_000_000, 0)
    assert rig.engine.exposure_usd(acct) == exposure
    assert approved(rig.replace(acct, "USDMXN", "mx", 1_000_000, px - 10))  # price only
    assert approved(rig.replace(acct, "USDMXN", o.cl_ord_id, 400_000, px - 10))  # reduce
    assert o.leaves == 400_000
    assert rejected(rig.replace(acct, "USDMXN", o.cl_ord_id, 400_001, px - 10)) is (
        RejectReason.RESTRICTED_SYMBOL
    )


def test_a_replace_or_cancel_naming_another_symbol_is_refused_naming_the_order() -> None:
    """A replace naming EURUSD for an EURGBP order was checked against EURUSD's limits and
    sent to the EURUSD book, which answered UNKNOWN_ORDER naming no order (NONE); the
    reservation it made then stayed. Risk now refuses it (and such a cancel) itself, with a
    typed reject naming the order, and reserves nothing."""
    rig = Rig()
    acct, px = "LON-HF-01", MIDS["EURGBP"]
    assert approved(rig.new(acct, "EURGBP", BUY, 1_000_000, px, cl="eg"))
    st_ = rig.engine.state(acct)
    (o,) = st_.orders.values()
    exposure = rig.engine.exposure_usd(acct)
    for d in (
        rig.replace(acct, "EURUSD", "eg", 5_000_000, MIDS["EURUSD"]),
        rig.cancel(acct, "EURUSD", "eg"),
    ):
        assert rejected(d) is RejectReason.INVALID_FIELD
        assert isinstance(d.report, CancelReject)
        assert d.report.order_id == "O-eg" and d.report.ord_status is OrdStatus.NEW
        assert "symbol" in d.report.text and "EURGBP" in d.report.text
    assert (o.leaves, o.pending_qty, o.pending_cl) == (1_000_000, 0, [])
    assert rig.engine.exposure_usd(acct) == exposure
    assert "EURUSD" not in rig.books  # nothing was sent to another book
    # named right, both are routed to the order's book
    d = rig.replace(acct, "EURGBP", "eg", 2_000_000, px)
    assert isinstance(d.command, Replace) and (d.symbol, d.exec_region) == ("EURGBP", "lon")
    assert o.leaves == 2_000_000 and o.pending_qty == 0
    d = rig.cancel(acct, "EURGBP", o.cl_ord_id)
    assert isinstance(d.command, Cancel) and d.symbol == "EURGBP"
    assert st_.orders == {} and rig.engine.exposure_usd(acct) == 0


def test_a_book_refusing_a_replace_of_an_order_it_never_held_ends_its_reservation() -> None:
    """An older build sent such a replace to the wrong book, which answers UNKNOWN_ORDER with
    order id NONE: the refusal is matched to its replace by the replace's own id, so the
    reservation ends (it stayed for the order's life)."""
    rig = Rig()
    acct, px = "LON-HF-01", MIDS["EURGBP"]
    assert approved(rig.new(acct, "EURGBP", BUY, 1_000_000, px, cl="eg"))
    d = rig.replace(acct, "EURGBP", "eg", 5_000_000, px, run=False)
    assert isinstance(d.command, Replace)
    (o,) = rig.engine.state(acct).orders.values()
    assert o.pending_qty == 5_000_000
    outs = rig.execute("EURUSD", d.command)  # where the request's symbol sent it
    (cr,) = [r for r in outs if isinstance(r, CancelReject)]
    assert (cr.order_id, cr.reason) == ("NONE", RejectReason.UNKNOWN_ORDER)
    assert (o.pending_qty, o.pending_cl) == (0, [])
    assert rig.engine.exposure_usd(acct) == rig.engine.base_usd("EURGBP", 1_000_000)
    # a NONE refusal of an id that is no replace in flight changes nothing
    assert approved(rig.replace(acct, "EURGBP", "eg", 3_000_000, px, run=False))
    rig.engine.on_cancel_reject(replace(cr, cl_ord_id="R-unrelated"))
    assert o.pending_qty == 3_000_000


def test_the_topologys_max_qty_holds_where_it_is_below_the_limits() -> None:
    """regions/topology.toml caps USDSGD at 20M per order; limits.toml's default is 50M. The
    smaller is the limit, for new orders and growing replaces."""
    rig = Rig(region="sgp")
    acct, px = "SGP-HF-01", MIDS["USDSGD"]
    assert TOPO.instrument("USDSGD").max_qty == 20_000_000
    assert rig.limits.instrument("USDSGD").max_qty == 50_000_000
    d = rig.new(acct, "USDSGD", BUY, 20_000_001, px)
    assert rejected(d) is RejectReason.MAX_QTY
    assert isinstance(d.report, ExecutionReport) and "max 20000000" in d.report.text
    assert approved(rig.new(acct, "USDSGD", BUY, 20_000_000, px, cl="sg"))
    assert rejected(rig.replace(acct, "USDSGD", "sg", 20_000_001, px)) is RejectReason.MAX_QTY
    assert rig.engine.state(acct).orders["O-sg"].pending_qty == 0
    # where the limits are smaller (USDMXN: 10M, topology 20M) they still hold
    nyc = Rig(region="nyc")
    assert rejected(nyc.new("NYC-HF-01", "USDMXN", BUY, 10_000_001)) is RejectReason.MAX_QTY


def test_usd_values_round_up_for_every_limit() -> None:
    """LON-CORP-03 (limit 20M USD) buying 18,433,180 EUR (20,000,000.30 USD at 1.085) was
    approved: the conversion rounded down, in the trader's favour."""
    rig = Rig()
    acct = "LON-CORP-03"
    assert rig.limits.account(acct).credit_limit_usd == 20_000_000
    assert rig.engine.base_usd("EURUSD", 1) == 2  # 1.085 USD
    assert rig.engine.base_usd("EURUSD", 1_000_000) == 1_085_000  # exact stays exact
    assert rejected(rig.new(acct, "EURUSD", BUY, 18_433_180, 108400)) is RejectReason.CREDIT_LIMIT
    # 18,433,179 EUR = 19,999,999.215 USD: 20,000,000 rounded up, at the limit
    assert approved(rig.new(acct, "EURUSD", BUY, 18_433_179, 108400))
    assert rig.engine.exposure_usd(acct) == 20_000_000
    # the notional maximum too: 921,659 EUR = 1,000,000.015 USD > 1,000,000
    base = RiskLimits.load()
    limits = replace(
        base,
        instruments={
            **base.instruments,
            "EURUSD": InstrumentLimits(max_qty=50_000_000, max_notional_usd=1_000_000),
        },
    )
    small = Rig(limits=limits)
    assert rejected(small.new("LON-HF-01", "EURUSD", BUY, 921_659)) is RejectReason.MAX_NOTIONAL
    assert approved(small.new("LON-HF-01", "EURUSD", BUY, 921_658))


# ---- the limits document -------------------------------------------------------------------------


def _limits_doc(**changes: Any) -> dict[str, Any]:
    doc = RiskLimits.load().to_mapping()
    doc.update(changes)
    return doc


def test_an_account_override_inherits_every_default_it_does_not_set() -> None:
    """[accounts.X] credit_limit_usd = ... used to drop the default's restricted symbols."""
    doc = _limits_doc(
        default_account={"credit_limit_usd": 250_000_000, "restricted_symbols": ["USDMXN"]},
        default_instrument={"max_qty": 50_000_000, "max_notional_usd": 75_000_000},
        accounts={
            "LON-CORP-03": {"credit_limit_usd": 20_000_000},
            "NYC-CORP-03": {"restricted_symbols": ["USDJPY"]},  # replaces the default's list
        },
        instruments={"USDMXN": {"max_qty": 10_000_000}},
    )
    lim = RiskLimits.from_mapping(doc)
    corp = lim.account("LON-CORP-03")
    assert (corp.credit_limit_usd, corp.restricted_symbols) == (20_000_000, frozenset({"USDMXN"}))
    nyc = lim.account("NYC-CORP-03")
    assert (nyc.credit_limit_usd, nyc.restricted_symbols) == (250_000_000, frozenset({"USDJPY"}))
    assert lim.instrument("USDMXN") == InstrumentLimits(
        max_qty=10_000_000, max_notional_usd=75_000_000
    )
    rig = Rig(limits=lim)
    assert rejected(rig.new("LON-CORP-03", "USDMXN", BUY, 1_000, MIDS["USDMXN"])) is (
        RejectReason.RESTRICTED_SYMBOL
    )
    assert RiskLimits.from_mapping(lim.to_mapping()) == lim
    # the defaults themselves may leave the restricted symbols out (ops/bench.py does)
    bare = RiskLimits.from_mapping(_limits_doc(default_account={"credit_limit_usd": 1}))
    assert bare.default_account.restricted_symbols == frozenset()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            {"accounts": {"LON-CORP-03": {"credit_limt_usd": 1}}},
            "accounts.LON-CORP-03.credit_limt_usd",
        ),
        ({"instruments": {"USDMXN": {"max_qtty": 1}}}, "instruments.USDMXN.max_qtty"),
        (
            {"default_account": {"credit_limit_usd": 1, "restricted": []}},
            "default_account.restricted",
        ),
        ({"rate": {"orders_per_s": 1, "burst": 1, "brust": 2}}, "rate.brust"),
        ({"colar_bps": 150}, "colar_bps"),
        ({"accounts": {"LON-CORP-03": 5}}, "accounts.LON-CORP-03"),
    ],
)
def test_an_unknown_key_in_the_limits_is_an_error_naming_it(
    change: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=f"^{named}: "):
        RiskLimits.from_mapping(_limits_doc(**change))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"accounts": {"LON-CORP-3": {"credit_limit_usd": 1}}}, "accounts.LON-CORP-3"),
        ({"instruments": {"USDMXM": {"max_qty": 1}}}, "instruments.USDMXM"),
        ({"restricted_symbols": ["USDMXM"]}, "restricted_symbols"),
        (
            {"accounts": {"LON-CORP-03": {"restricted_symbols": ["EURUSX"]}}},
            "accounts.LON-CORP-03.restricted_symbols",
        ),
    ],
)
def test_names_the_topology_does_not_know_are_an_error_where_it_is_given(
    change: dict[str, Any], named: str
) -> None:
    doc = _limits_doc(**change)
    with pytest.raises(ValueError, match=f"^{named}: unknown"):
        RiskLimits.from_mapping(doc, topology=TOPO)
    RiskLimits.from_mapping(doc)  # without a topology, names cannot be checked
    assert RiskLimits.load(topology=TOPO) == RiskLimits.load()  # limits.toml is clean


# ---- state the topology no longer knows ----------------------------------------------------------


def test_a_kill_switch_skips_accounts_and_symbols_the_topology_no_longer_has() -> None:
    """A snapshot from an older topology holds an account (and an order of a symbol) this one
    does not: engaging a desk's kill switch raised KeyError, which failed the batch and so
    stopped risk for the region."""
    rig = Rig()
    assert approved(rig.new("LON-HF-01", "EURUSD", BUY, 1_000_000, 108000, cl="live"))
    assert approved(rig.new("LON-BANK-02", "EURUSD", BUY, 1_000_000, 108000, cl="gone"))
    snap = rig.engine.snapshot()
    snap["accounts"]["LON-OLD-09"] = snap["accounts"].pop("LON-BANK-02")
    eng = RiskEngine.restore(snap, TOPO, "lon")
    eng.state("LON-OLD-09").add(OpenOrder("O-xau", "xau", "XAUUSD", BUY, 200000, 5))
    cancels = eng.set_kill("desk.LONFX1", True)
    assert [(a, o.order_id) for a, o in cancels] == [("LON-HF-01", "O-live")]
    assert not eng.killed("LON-OLD-09")
    # a global (or the account's own) switch still reaches it: its orders can be canceled
    # where a book holds them
    eng.set_kill("desk.LONFX1", False)
    cancels = eng.set_kill("global", True)
    assert sorted((a, o.order_id) for a, o in cancels) == [
        ("LON-HF-01", "O-live"),
        ("LON-OLD-09", "O-gone"),
    ]


async def test_set_limits_refuses_a_name_the_topology_does_not_know_before_writing() -> None:
    """`meridian risk set-limits` with a misspelt account would have written a document
    whose override nobody holds: the account kept the default limit, unnoticed."""
    from router.control import set_limits

    doc = RiskLimits.load().to_mapping()
    doc["accounts"] = {"LON-CORP-3": {"credit_limit_usd": 1000}}

    async def connect(region: str) -> object:
        raise AssertionError("nothing may be written")

    with pytest.raises(ValueError, match="LON-CORP-3"):
        await set_limits(connect, load_topology(), doc)  # type: ignore[arg-type]


@pytest.mark.parametrize("sent_ns", [0, 123])
def test_a_risk_cancel_reject_is_stamped_with_the_requests_accept_time(sent_ns: int) -> None:
    """Risk's cancel rejects carried the client's sent_ns as transact_ns (0 when the client
    left it out, which the contract allows); they carry the accept time, as risk's REJECTED
    reports do."""
    rig = Rig()
    acct, px = "LON-HF-01", MIDS["EURGBP"]
    assert approved(rig.new(acct, "EURGBP", BUY, 1_000_000, px, cl="o1"))
    assert approved(rig.new(acct, "EURGBP", BUY, 1_000_000, px, cl="o2"))
    assert isinstance(rig.cancel(acct, "EURGBP", "o2").command, Cancel)  # o2 ends CANCELED
    accepted = 1_800_000_000_000_000_000

    def cancel(orig: str, symbol: str) -> Decision:
        msg = CancelOrder(account=acct, cl_ord_id=f"x-{orig}", orig_cl_ord_id=orig, symbol=symbol)
        msg = replace(msg, sent_ns=sent_ns)
        return rig.engine.on_cancel(msg, seq=next(_seq), accepted_ns=accepted)

    def replace_(orig: str, qty: int) -> Decision:
        msg = replace(replace_order(acct, f"r-{orig}", orig, "EURGBP", qty, px), sent_ns=sent_ns)
        return rig.engine.on_replace(msg, ext=ext("EURGBP"), seq=next(_seq), accepted_ns=accepted)

    answers = [
        cancel("nope", "EURGBP"),
        cancel("o1", "EURUSD"),
        cancel("o2", "EURGBP"),
        replace_("nope", 1_000_000),
        replace_("o2", 1_000_000),
        replace_("o1", 10**11),
    ]
    got = []
    for d in answers:
        assert isinstance(d.report, CancelReject), d
        got.append((d.report.reason, d.report.transact_ns))
    assert got == [
        (RejectReason.UNKNOWN_ORDER, accepted),
        (RejectReason.INVALID_FIELD, accepted),
        (RejectReason.TOO_LATE_TO_CANCEL, accepted),
        (RejectReason.UNKNOWN_ORDER, accepted),
        (RejectReason.TOO_LATE_TO_CANCEL, accepted),
        (RejectReason.MAX_QTY, accepted),
    ]


def test_a_reduce_of_a_partly_filled_order_never_counts_as_growing_it() -> None:
    """`grows` compared the new total with the leaves: with 8M of 10M filled, a replace to
    9M (leaves 2M -> 1M) was refused RESTRICTED_SYMBOL, and the FIX cut to 7M KILL_SWITCH."""
    rig = Rig(region="sgp")
    acct = "SGP-CORP-03"
    assert approved(rig.new(acct, "USDJPY", BUY, 10_000_000, 151000, cl="pf"))
    rig.counterparty("USDJPY", SELL, 8_000_000, 151000)
    (o,) = rig.engine.state(acct).orders.values()
    assert (o.cum, o.leaves) == (8_000_000, 2_000_000)
    rig.engine.set_limits(replace(rig.limits, restricted_symbols=frozenset({"USDJPY"})))
    assert approved(rig.replace(acct, "USDJPY", "pf", 9_000_000, 151000))  # leaves 1M
    assert rejected(rig.replace(acct, "USDJPY", o.cl_ord_id, 11_000_000, 151000)) is (
        RejectReason.RESTRICTED_SYMBOL  # leaves 3M: grows
    )
    rig.engine.set_kill(f"account.{acct}", True)
    assert approved(rig.replace(acct, "USDJPY", o.cl_ord_id, 7_000_000, 151000))  # the cut
    assert not rig.engine.state(acct).orders  # REPLACED / FILLED: done


def test_a_stored_or_recorded_limits_document_with_an_unknown_key_is_read_not_refused() -> None:
    """Strict limits refused a document an older, looser set-limits had stored or RISKLOG had
    recorded: a rebuild replaying it stopped the region's risk. Workers read leniently (the
    key ignored, logged); the operator's command stays strict."""
    doc = {**RiskLimits.load().to_mapping(), "note": "from an older build"}
    with pytest.raises(ValueError, match="note"):
        RiskLimits.from_mapping(doc)
    assert RiskLimits.from_mapping(doc, strict=False) == RiskLimits.load()


def test_an_account_at_its_limit_can_reduce_or_cut_a_partly_filled_order() -> None:
    """A replace reserved its whole new quantity, filled part included: with 8M of 10M
    filled and the account at its limit, the cut to 7M (the FIX reduce racing a fill) and a
    reduce to 9M were refused CREDIT_LIMIT, and the last 2M stayed live to fill."""
    rig = Rig(region="sgp")
    acct = "SGP-CORP-03"
    assert approved(rig.new(acct, "USDJPY", BUY, 10_000_000, 151000, cl="atl"))
    rig.counterparty("USDJPY", SELL, 8_000_000, 151000)
    at_limit = AccountLimits(
        credit_limit_usd=rig.engine.exposure_usd(acct), restricted_symbols=frozenset()
    )
    rig.engine.set_limits(replace(rig.limits, accounts={**rig.limits.accounts, acct: at_limit}))
    (o,) = rig.engine.state(acct).orders.values()
    assert approved(rig.replace(acct, "USDJPY", "atl", 9_000_000, 151000, run=False))
    assert o.pending_qty == 1_000_000  # the new leaves, not the new total
    assert approved(rig.replace(acct, "USDJPY", o.pending_cl[-1], 7_000_000, 151000))
    assert not rig.engine.state(acct).orders  # REPLACED / FILLED: nothing left to fill
