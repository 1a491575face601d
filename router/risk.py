"""Pre-trade risk: limits and the pure, deterministic risk engine of one home region.

The engine is single-writer per account: every order request of an account, from any entry
region, lands in the account's home ORDERS stream and is checked here in stream order, so the
credit limit holds however many regions send at once. It has no I/O: the worker
(:mod:`router.risk_worker`) fetches the two non-deterministic inputs (the Redis rate-limit
verdict and the reference price) and records them in RISKLOG beside each decision, so a restart
rebuilds exactly the same state from the engine's last snapshot (:meth:`RiskEngine.snapshot`)
and the engine re-run over the RISKLOG records after it.

Checks on a new order, in order, each with its reject reason::

    kill switch (account, desk or global)   KILL_SWITCH
    restricted symbol (global or account)   RESTRICTED_SYMBOL
    message rate (token bucket in Redis)    RATE_LIMIT
    max order quantity per instrument       MAX_QTY        (limits or topology, the smaller)
    max order notional (USD) per instrument MAX_NOTIONAL
    reference price present                 NO_REFERENCE_PRICE
    price collar around the reference mid   PRICE_COLLAR   (LIMIT only)
    credit limit on net open exposure       CREDIT_LIMIT   (risk-reducing orders pass)

A replace must name the order's own symbol (INVALID_FIELD otherwise: it would be checked
against, and routed to, another instrument's book), then meets the same checks on it: the
kill switch and a restriction only when it grows the order (a reduce or a new price passes,
so a desk can still work an order down), the rate always (it is one more command for the
book). A cancel takes no rate token and passes every check but the order's identity and
symbol: a desk can always pull its orders.

Net open exposure of an account, in USD: for every symbol, the worst case of its position
if every open buy or every open sell fills, in base-currency units, valued at the base
currency's reference USD rate: ``sum(max(|pos + open_buy|, |pos - open_sell|) * usd_rate)``,
each term rounded up to a whole USD (never in the trader's favour).
"""

from __future__ import annotations

import logging
import tomllib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from regions.topology import Topology
from router.book import Cancel, Replace, Submit, report_position
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
)

DEFAULT_LIMITS = Path(__file__).with_name("limits.toml")

log = logging.getLogger("meridian.risk")


# ---- limits ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountLimits:
    credit_limit_usd: int
    restricted_symbols: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class InstrumentLimits:
    max_qty: int
    max_notional_usd: int


_TOP_KEYS = frozenset(
    {
        "collar_bps",
        "restricted_symbols",
        "rate",
        "default_account",
        "default_instrument",
        "accounts",
        "instruments",
    }
)
_RATE_KEYS = frozenset({"orders_per_s", "burst"})
_ACCOUNT_KEYS = frozenset({"credit_limit_usd", "restricted_symbols"})
_INSTRUMENT_KEYS = frozenset({"max_qty", "max_notional_usd"})
"""The keys a limits document may hold, per table (:meth:`RiskLimits.to_mapping` writes all)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RiskLimits:
    collar_bps: int
    restricted_symbols: frozenset[str]
    rate_per_s: int
    burst: int
    default_account: AccountLimits
    default_instrument: InstrumentLimits
    accounts: Mapping[str, AccountLimits] = field(default_factory=dict)
    instruments: Mapping[str, InstrumentLimits] = field(default_factory=dict)

    def account(self, account: str) -> AccountLimits:
        return self.accounts.get(account, self.default_account)

    def instrument(self, symbol: str) -> InstrumentLimits:
        return self.instruments.get(symbol, self.default_instrument)

    def to_mapping(self) -> dict[str, Any]:
        """The limits document :meth:`from_mapping` reads (``from_mapping(to_mapping())``
        gives back equal limits): for snapshots and for showing what is in force."""

        def acct(a: AccountLimits) -> dict[str, Any]:
            return {
                "credit_limit_usd": a.credit_limit_usd,
                "restricted_symbols": sorted(a.restricted_symbols),
            }

        def inst(i: InstrumentLimits) -> dict[str, Any]:
            return {"max_qty": i.max_qty, "max_notional_usd": i.max_notional_usd}

        return {
            "collar_bps": self.collar_bps,
            "restricted_symbols": sorted(self.restricted_symbols),
            "rate": {"orders_per_s": self.rate_per_s, "burst": self.burst},
            "default_account": acct(self.default_account),
            "default_instrument": inst(self.default_instrument),
            "accounts": {k: acct(v) for k, v in sorted(self.accounts.items())},
            "instruments": {k: inst(v) for k, v in sorted(self.instruments.items())},
        }

    @classmethod
    def load(cls, path: Path | None = None, *, topology: Topology | None = None) -> RiskLimits:
        return cls.from_mapping(
            tomllib.loads((path or DEFAULT_LIMITS).read_text()), topology=topology
        )

    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, Any], *, topology: Topology | None = None, strict: bool = True
    ) -> RiskLimits:
        """Validate a limits document (TOML or the JSON in the RISKCFG bucket).

        An ``[accounts.X]`` or ``[instruments.X]`` override inherits every field of
        ``default_account`` / ``default_instrument`` it does not set (restricted symbols
        included: an override that sets them replaces the default's list). A key this code
        does not know is an error, never ignored (a ``credit_limt_usd`` typo would leave the
        default limit in force unnoticed); so are, given the ``topology``, an account or a
        symbol it does not know. Raises ValueError naming the key. ``strict=False`` (what a
        risk worker reads: a document stored in RISKCFG or recorded in RISKLOG by an older,
        looser build, or a snapshot) logs unknown keys and ignores them: refusing a recorded
        document would stop a rebuild, and refusing a stored one would drop the operator's
        limits for the defaults; ``meridian risk set-limits`` validates strictly.
        """

        def pos_int(v: Any, where: str) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{where}: must be a positive integer")
            return v

        def table(v: Any, where: str, allowed: frozenset[str] | None) -> Mapping[str, Any]:
            if not isinstance(v, Mapping):
                raise ValueError(f"{where or 'limits'}: must be a table")
            for k in v:
                if allowed is not None and k not in allowed:
                    what = f"{where}.{k}: unknown key" if where else f"{k}: unknown key"
                    if strict:
                        raise ValueError(what)
                    log.warning("risk limits: %s (ignored)", what)
            return v

        def symbol(s: str, where: str) -> str:
            if topology is not None and s not in known_symbols:
                raise ValueError(f"{where}: unknown symbol {s!r} (not in the topology)")
            return s

        def syms(v: Any, where: str) -> frozenset[str]:
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise ValueError(f"{where}: must be a list of symbols")
            return frozenset(symbol(s, where) for s in v)

        def acct(v: Any, where: str, base: AccountLimits | None) -> AccountLimits:
            v = table(v, where, _ACCOUNT_KEYS)
            return AccountLimits(
                credit_limit_usd=pos_int(v["credit_limit_usd"], f"{where}.credit_limit_usd")
                if "credit_limit_usd" in v or base is None
                else base.credit_limit_usd,
                restricted_symbols=syms(v["restricted_symbols"], f"{where}.restricted_symbols")
                if "restricted_symbols" in v
                else base.restricted_symbols
                if base is not None
                else frozenset(),
            )

        def inst(v: Any, where: str, base: InstrumentLimits | None) -> InstrumentLimits:
            v = table(v, where, _INSTRUMENT_KEYS)
            return InstrumentLimits(
                max_qty=pos_int(v["max_qty"], f"{where}.max_qty")
                if "max_qty" in v or base is None
                else base.max_qty,
                max_notional_usd=pos_int(v["max_notional_usd"], f"{where}.max_notional_usd")
                if "max_notional_usd" in v or base is None
                else base.max_notional_usd,
            )

        def account_name(k: str) -> str:
            if topology is not None and k not in known_accounts:
                raise ValueError(f"accounts.{k}: unknown account (not in the topology)")
            return k

        known_symbols = {i.symbol for i in topology.instruments} if topology is not None else set()
        known_accounts = set(topology.accounts()) if topology is not None else set()
        try:
            raw = table(raw, "", _TOP_KEYS)
            d_acct = acct(raw["default_account"], "default_account", None)
            d_inst = inst(raw["default_instrument"], "default_instrument", None)
            rate = table(raw["rate"], "rate", _RATE_KEYS)
            return cls(
                collar_bps=pos_int(raw["collar_bps"], "collar_bps"),
                restricted_symbols=syms(raw.get("restricted_symbols", []), "restricted_symbols"),
                rate_per_s=pos_int(rate["orders_per_s"], "rate.orders_per_s"),
                burst=pos_int(rate["burst"], "rate.burst"),
                default_account=d_acct,
                default_instrument=d_inst,
                accounts={
                    account_name(k): acct(v, f"accounts.{k}", d_acct)
                    for k, v in table(raw.get("accounts", {}), "accounts", None).items()
                },
                instruments={
                    symbol(k, f"instruments.{k}"): inst(v, f"instruments.{k}", d_inst)
                    for k, v in table(raw.get("instruments", {}), "instruments", None).items()
                },
            )
        except KeyError as e:
            raise ValueError(f"{e.args[0]}: is required") from None


# ---- engine state ------------------------------------------------------------------------------


@dataclass(slots=True)
class OpenOrder:
    order_id: str
    cl_ord_id: str
    symbol: str
    side: Side
    price_ticks: int
    leaves: int
    pending_qty: int = 0
    """While a replace is in flight: the larger of old and new leaves is reserved."""
    cum: int = 0
    """Filled so far (the highest ``cum_qty`` of its reports): what the position holds of
    it, and a reject of a live order's replace says PARTIALLY_FILLED once it is above zero.
    -1: not known (restored from a snapshot that did not keep it)."""
    ver: tuple[str, int, int] = ("", 0, 0)
    """Where the newest report applied was made (:func:`router.book.report_position`): an
    older one, delivered late, sets nothing."""
    pending_cl: list[str] = field(default_factory=list)
    """cl_ord_ids of the replaces approved and not yet answered, oldest first. The
    reservation ends when none is left: a report naming one answers it and every one before
    it (the book applied them in order, and the report says where they left the order); a
    refusal answers only its own, because the replaces before it may have changed the order
    in ways no report has told yet."""

    @property
    def status(self) -> OrdStatus:
        """The live order's FIX status as risk knows it (the book's reports are the truth)."""
        return OrdStatus.PARTIALLY_FILLED if self.cum > 0 else OrdStatus.NEW


DEFAULT_CL_ID_MEMORY = 200_000
"""cl_ord_ids remembered per account, beyond those of its open orders: bounds risk's memory
and snapshot size in a market that trades all week (at 1,000 orders/s an account used to add
86 million a day)."""


@dataclass(slots=True)
class AccountState:
    orders: dict[str, OpenOrder] = field(default_factory=dict)
    cl_ids: dict[str, str] = field(default_factory=dict)
    """cl_ord_id -> order_id for every id the account's open orders are known by, and for the
    latest ids of its closed ones (oldest first: :meth:`note_cl` forgets beyond a bound)."""
    positions: dict[str, int] = field(default_factory=dict)
    """Net filled base-currency units per symbol."""
    closed: dict[str, str] = field(default_factory=dict)
    """order_id -> final OrdStatus of the latest closed orders (oldest first, as many as
    ``cl_ids`` keeps ids): what a late replace's reject reports as the order's status."""
    reserved: dict[str, list[int]] = field(default_factory=dict)
    """symbol -> [open buy, open sell] base units (max of leaves and pending replace), kept
    incrementally so a credit check costs O(symbols), not O(open orders)."""
    cl_order: deque[str] = field(default_factory=deque, compare=False, repr=False)
    closed_order: deque[str] = field(default_factory=deque, compare=False, repr=False)
    """The keys of ``cl_ids`` and ``closed`` in their maps' order, oldest first, so the
    oldest is found in O(1). ``next(iter(d))`` scans the deleted slots a forgetting map
    leaves at its front: at 200,000 ids it cost 32-144 us per order, growing, instead of ~1.
    (The maps stay plain dicts: copying one for a snapshot is 5-13 ms, an OrderedDict 80.)"""

    def restore_order(self) -> None:
        """Rebuild the key orders from the maps' own (after a restore)."""
        self.cl_order = deque(self.cl_ids)
        self.closed_order = deque(self.closed)

    def _adjust(self, o: OpenOrder, sign: int) -> None:
        b = self.reserved.setdefault(o.symbol, [0, 0])
        b[0 if o.side is Side.BUY else 1] += sign * max(o.leaves, o.pending_qty)

    def add(self, o: OpenOrder) -> None:
        self.orders[o.order_id] = o
        self._adjust(o, +1)

    def note_cl(self, cl_ord_id: str, order_id: str, memory: int, *, keep: bool = False) -> None:
        """Remember that ``cl_ord_id`` names ``order_id`` (``keep``: unless it already names
        one), then forget the oldest ids of closed orders beyond ``memory`` ids.

        Ids of open orders are never forgotten (an old one that comes up is moved to the back),
        so cancel and replace always find a live order. A forgotten id of a closed order makes
        a late cancel or replace UNKNOWN_ORDER instead of TOO_LATE_TO_CANCEL, as the book's
        terminal memory does; a new order re-using one is still refused at entry while ORDERS
        holds its request (decision 0002). The order of ``cl_ids`` is part of the snapshot, so
        a restored engine forgets exactly what the original would.
        """
        if cl_ord_id not in self.cl_ids:
            self.cl_ids[cl_ord_id] = order_id
            self.cl_order.append(cl_ord_id)
        elif not keep:
            self.cl_ids[cl_ord_id] = order_id  # keeps its place, in the map and the order
        looked = 0
        while len(self.cl_ids) > memory and looked < 4 and self.cl_order:
            oldest = self.cl_order[0]
            if oldest == cl_ord_id:
                break  # every other id is of an open order: keep the one just noted too
            self.cl_order.popleft()
            oid = self.cl_ids.pop(oldest, None)
            if oid is None:
                continue  # no longer in the map
            if oid in self.orders:
                self.cl_ids[oldest] = oid  # still open: to the back
                self.cl_order.append(oldest)
            looked += 1

    def remove(self, order_id: str) -> None:
        o = self.orders.pop(order_id, None)
        if o is not None:
            self._adjust(o, -1)

    def note_closed(self, order_id: str, status: OrdStatus, memory: int) -> None:
        """Remember how ``order_id`` ended, forgetting the oldest beyond ``memory``."""
        if order_id not in self.closed:
            self.closed_order.append(order_id)
        self.closed[order_id] = status.value
        while len(self.closed) > memory and self.closed_order:
            self.closed.pop(self.closed_order.popleft(), None)

    def update(
        self,
        o: OpenOrder,
        *,
        leaves: int | None = None,
        pending: int | None = None,
        cum: int | None = None,
    ) -> None:
        self._adjust(o, -1)
        if leaves is not None:
            o.leaves = leaves
        if pending is not None:
            o.pending_qty = pending
        if cum is not None:
            o.cum = max(o.cum, cum)  # a late report never takes it back
        self._adjust(o, +1)


@dataclass(frozen=True, slots=True, kw_only=True)
class RefPrice:
    bid_ticks: int
    ask_ticks: int

    @property
    def mid2(self) -> int:
        """Twice the mid (keeps it an integer)."""
        return self.bid_ticks + self.ask_ticks


@dataclass(frozen=True, slots=True, kw_only=True)
class Externals:
    """Non-deterministic inputs of one decision, recorded in RISKLOG with it."""

    rate_ok: bool = True
    ref: RefPrice | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What one order request leads to: a command for execution, or a report back."""

    command: Submit | Cancel | Replace | None = None
    exec_region: str = ""
    symbol: str = ""
    report: ExecutionReport | CancelReject | None = None


class RiskEngine:
    """Pure pre-trade risk of the accounts homed in ``region``."""

    def __init__(
        self,
        topology: Topology,
        region: str,
        limits: RiskLimits,
        *,
        cl_id_memory: int = DEFAULT_CL_ID_MEMORY,
    ) -> None:
        self.topology = topology
        self.region = region
        self.limits = limits
        self.cl_id_memory = cl_id_memory
        """cl_ord_ids remembered per account (:meth:`AccountState.note_cl`)."""
        self.accounts: dict[str, AccountState] = {}
        self.kills: set[str] = set()
        """Engaged kill keys: 'global', 'account.<id>', 'desk.<id>'."""
        self._usd_rate = {c.code: c.usd_rate_micros for c in topology.currencies}
        self._topo_max_qty = {i.symbol: i.max_qty for i in topology.instruments}
        self._executed = {s for r in topology.regions for s in r.executes}

    # ---- queries -----------------------------------------------------------------------------
    def state(self, account: str) -> AccountState:
        st = self.accounts.get(account)
        if st is None:
            st = self.accounts[account] = AccountState()
        return st

    def killed(self, account: str) -> bool:
        if "global" in self.kills or f"account.{account}" in self.kills:
            return True
        try:
            desk = self.topology.account_desk(account)
        except KeyError:
            # state of an account this topology no longer has (a snapshot taken under an
            # older one): no desk's switch names it, and a kill must never fail its batch
            log.warning(
                "risk %s: account %s is not in the topology: no desk kill applies",
                self.region,
                account,
            )
            return False
        return f"desk.{desk}" in self.kills

    def max_qty(self, symbol: str) -> int:
        """Largest order quantity of ``symbol``: the limits' or the topology's, the smaller."""
        return min(self.limits.instrument(symbol).max_qty, self._topo_max_qty[symbol])

    def base_usd(self, symbol: str, qty: int) -> int:
        """USD value of ``qty`` base units of ``symbol`` at the reference rate, rounded up:
        every limit is checked against it, and a fraction of a dollar never counts in the
        trader's favour."""
        return -(-qty * self._usd_rate[self.topology.instrument(symbol).base] // 1_000_000)

    def exposure_usd(self, account: str, *, extra: tuple[str, Side, int] | None = None) -> int:
        """Net open exposure of ``account`` in USD: per symbol, the larger of the long and the
        short side if every open order filled; ``extra`` adds one more open order."""
        return self.exposure_change(account, extra)[1] if extra else self._exposure(account)

    def exposure_change(self, account: str, extra: tuple[str, Side, int]) -> tuple[int, int]:
        """(exposure now, exposure with ``extra``): only ``extra``'s symbol's term changes,
        so one pass over the account's symbols instead of two and no copy of its orders."""
        sym, side, q = extra
        st = self.state(account)
        before = self._exposure(account)
        buy, sell = st.reserved.get(sym, (0, 0))
        with_extra = (buy + q, sell) if side is Side.BUY else (buy, sell + q)
        after = before - self._term(st, sym, buy, sell) + self._term(st, sym, *with_extra)
        return before, after

    def _exposure(self, account: str) -> int:
        st = self.state(account)
        total = 0
        for sym in set(st.reserved) | set(st.positions):
            buy, sell = st.reserved.get(sym, (0, 0))
            total += self._term(st, sym, buy, sell)
        return total

    def _term(self, st: AccountState, sym: str, buy: int, sell: int) -> int:
        pos = st.positions.get(sym, 0)
        return self.base_usd(sym, max(abs(pos + buy), abs(pos - sell)))

    # ---- decisions ---------------------------------------------------------------------------
    def on_new(
        self,
        msg: NewOrder,
        *,
        order_id: str,
        accepted_ns: int,
        ext: Externals,
        seq: int,
        verdict: bool | None = None,
    ) -> Decision:
        """Decide a new order against the limits in force; or, with ``verdict`` (a replay of a
        recorded decision: True approved, False rejected), apply that decision to the state
        without checking again, so the state follows what was decided, whatever the limits
        (or the code) are now. Raises ValueError when a recorded approval cannot be applied
        (the order is open already: the state diverged)."""
        acct, sym = msg.account, msg.symbol
        st = self.state(acct)

        def rej(reason: RejectReason, text: str) -> Decision:
            return Decision(
                report=self._reject_report(msg, order_id, reason, text, accepted_ns, seq)
            )

        if msg.cl_ord_id in st.cl_ids and verdict is not True:
            return rej(RejectReason.DUPLICATE_CL_ORD_ID, "cl_ord_id already used")
        st.note_cl(msg.cl_ord_id, order_id, self.cl_id_memory)
        if verdict is False:
            return Decision()  # replayed reject: its recorded report stands
        if verdict is True:
            if order_id in st.orders:
                raise ValueError(f"replayed approval of {order_id}: it is open already")
            return self._accept_new(msg, order_id, accepted_ns, ext)
        limit = msg.price_ticks if msg.ord_type is OrdType.LIMIT else None
        refused = self._order_checks(acct, sym, msg.qty, limit, ext, grows=True)
        if refused is not None:
            return rej(*refused)
        before, after = self.exposure_change(acct, (sym, msg.side, msg.qty))
        limit = self.limits.account(acct).credit_limit_usd
        if after > limit and after > before:
            return rej(
                RejectReason.CREDIT_LIMIT,
                f"net open exposure would be {after} USD > limit {limit} USD",
            )
        return self._accept_new(msg, order_id, accepted_ns, ext)

    def _order_checks(
        self, acct: str, sym: str, qty: int, price: int | None, ext: Externals, *, grows: bool
    ) -> tuple[RejectReason, str] | None:
        """The checks a new order and a replace share, in order (the module docstring): the
        first refusal, or None. ``grows``: the kill switch and restrictions apply (a new
        order always; a replace only if it leaves more open); ``price``: a LIMIT price to
        collar (None: a market order, which needs a reference all the same)."""
        if grows and self.killed(acct):
            return RejectReason.KILL_SWITCH, "kill switch engaged"
        if grows and (
            sym in self.limits.restricted_symbols
            or sym in self.limits.account(acct).restricted_symbols
        ):
            return RejectReason.RESTRICTED_SYMBOL, f"{sym} is restricted"
        if not ext.rate_ok:
            return (
                RejectReason.RATE_LIMIT,
                f"more than {self.limits.rate_per_s} orders/s (burst {self.limits.burst})",
            )
        max_qty = self.max_qty(sym)
        if qty > max_qty:
            return RejectReason.MAX_QTY, f"qty {qty} > max {max_qty}"
        notional, most = self.base_usd(sym, qty), self.limits.instrument(sym).max_notional_usd
        if notional > most:
            return RejectReason.MAX_NOTIONAL, f"notional {notional} USD > max {most} USD"
        if ext.ref is None:
            return RejectReason.NO_REFERENCE_PRICE, f"no fresh top of book for {sym}"
        # |price - mid| / mid > collar_bps / 10^4, with mid2 = 2*mid, all in integers
        if price is not None and (
            abs(2 * price - ext.ref.mid2) * 10_000 > self.limits.collar_bps * ext.ref.mid2
        ):
            return (
                RejectReason.PRICE_COLLAR,
                f"price {price} outside +-{self.limits.collar_bps} bps of mid {ext.ref.mid2 / 2:g}",
            )
        return None

    def _accept_new(
        self, msg: NewOrder, order_id: str, accepted_ns: int, ext: Externals
    ) -> Decision:
        acct, sym = msg.account, msg.symbol
        price = msg.price_ticks
        if msg.ord_type is not OrdType.LIMIT:
            assert ext.ref is not None  # a market order without a reference is rejected
            price = ext.ref.ask_ticks if msg.side is Side.BUY else ext.ref.bid_ticks
        assert price is not None
        self.state(acct).add(
            OpenOrder(
                order_id=order_id,
                cl_ord_id=msg.cl_ord_id,
                symbol=sym,
                side=msg.side,
                price_ticks=price,
                leaves=msg.qty,
            )
        )
        cmd = Submit(
            order_id=order_id,
            cl_ord_id=msg.cl_ord_id,
            account=acct,
            home_region=self.region,
            side=msg.side,
            ord_type=msg.ord_type,
            tif=msg.tif,
            qty=msg.qty,
            price_ticks=msg.price_ticks,
            entry_ns=accepted_ns,
        )
        return Decision(command=cmd, exec_region=self.topology.exec_region(sym), symbol=sym)

    def on_cancel(
        self, msg: CancelOrder, *, seq: int, reason: str = "", accepted_ns: int | None = None
    ) -> Decision:
        """Decide a cancel. ``accepted_ns``: the request's accept time (its stored time in
        ORDERS, :func:`router.entry.entry_time`), a cancel reject's ``transact_ns``; None
        only for a caller that does not know it (then the client's ``sent_ns``)."""
        at = msg.sent_ns if accepted_ns is None else accepted_ns
        st = self.state(msg.account)
        oid = st.cl_ids.get(msg.orig_cl_ord_id)
        if oid is None:
            return Decision(
                report=self._cancel_reject(
                    msg, "NONE", RejectReason.UNKNOWN_ORDER, "cancel", seq, at=at
                )
            )
        o = st.orders.get(oid)
        if o is None and (ended := st.closed.get(oid)) is not None:
            # how it ended is known here: answer at once, as for a late replace, rather than
            # send the cancel to the book (a WAN round trip when another region executes)
            st.note_cl(msg.cl_ord_id, oid, self.cl_id_memory, keep=True)
            return Decision(
                report=self._cancel_reject(
                    msg,
                    oid,
                    RejectReason.TOO_LATE_TO_CANCEL,
                    "cancel",
                    seq,
                    at=at,
                    ord_status=OrdStatus(ended),
                )
            )
        if o is not None and msg.symbol != o.symbol:
            # the request's symbol would route it to another book, which does not know the
            # order: refused here, naming it. Its id is noted as an approved cancel's is, so a
            # replay of a record from a build that sent it on leaves the same state.
            st.note_cl(msg.cl_ord_id, oid, self.cl_id_memory, keep=True)
            return Decision(
                report=self._cancel_reject(
                    msg,
                    oid,
                    RejectReason.INVALID_FIELD,
                    "cancel",
                    seq,
                    _wrong_symbol(msg.symbol, o.symbol),
                    at=at,
                    ord_status=o.status,
                )
            )
        # the order's symbol routes it (the same as the request's when risk holds the order;
        # one whose end risk forgot goes where the request says, and its book answers)
        sym = o.symbol if o is not None else msg.symbol
        cur_cl = o.cl_ord_id if o is not None else msg.orig_cl_ord_id
        cmd = Cancel(
            order_id=oid,
            cl_ord_id=msg.cl_ord_id,
            orig_cl_ord_id=cur_cl,
            account=msg.account,
            home_region=self.region,
            reason=reason,
        )
        st.note_cl(msg.cl_ord_id, oid, self.cl_id_memory, keep=True)
        return Decision(command=cmd, exec_region=self.topology.exec_region(sym), symbol=sym)

    def on_replace(
        self,
        msg: ReplaceOrder,
        *,
        ext: Externals,
        seq: int,
        verdict: bool | None = None,
        accepted_ns: int | None = None,
    ) -> Decision:
        """Decide a replace; ``verdict`` replays a recorded decision (see :meth:`on_new`),
        ``accepted_ns`` is as :meth:`on_cancel` takes it. Raises ValueError when a recorded
        approval cannot be applied (the state diverged)."""
        at = msg.sent_ns if accepted_ns is None else accepted_ns
        acct = msg.account
        st = self.state(acct)
        oid = st.cl_ids.get(msg.orig_cl_ord_id)
        o = st.orders.get(oid) if oid is not None else None
        if verdict is True and o is None:
            raise ValueError(f"replayed approval of replace {msg.cl_ord_id}: no open order")
        if oid is None or o is None:
            ended = st.closed.get(oid) if oid is not None else None
            if oid is None or ended is None:  # never known, or closed too long ago to say how
                return Decision(
                    report=self._cancel_reject(
                        msg, "NONE", RejectReason.UNKNOWN_ORDER, "replace", seq, at=at
                    )
                )
            # the order's real status, as FIX wants it on a cancel reject: a desk must not
            # read a filled order as live again
            return Decision(
                report=self._cancel_reject(
                    msg,
                    oid,
                    RejectReason.TOO_LATE_TO_CANCEL,
                    "replace",
                    seq,
                    at=at,
                    ord_status=OrdStatus(ended),
                )
            )

        def rej(reason: RejectReason, text: str) -> Decision:
            return Decision(
                report=self._cancel_reject(
                    msg, oid, reason, "replace", seq, text, at=at, ord_status=o.status
                )
            )

        if verdict is False:
            return Decision()  # replayed reject: its recorded report stands
        if verdict is True:
            return self._accept_replace(msg, oid, o)

        if msg.symbol != o.symbol:
            # checked and routed by its own symbol it would meet another instrument's limits
            # and book (which answers UNKNOWN_ORDER for an order it never held, naming none)
            return rej(RejectReason.INVALID_FIELD, _wrong_symbol(msg.symbol, o.symbol))
        sym = o.symbol
        # msg.qty is the new total: what it leaves open is that less what has filled (as far
        # as risk knows: a fill still in flight only makes this larger, never smaller). One
        # that does not grow the order (a reduce, a new price) passes a kill switch and a
        # restriction, so a desk can still work an order down or away from the market; it
        # takes a rate token like a new order (an EXEC command, a book change), where a
        # cancel never does: a desk can always pull its orders.
        new_leaves = msg.qty - max(o.cum, 0)
        grows = new_leaves > o.leaves
        refused = self._order_checks(acct, sym, msg.qty, msg.price_ticks, ext, grows=grows)
        if refused is not None:
            return rej(*refused)
        # the credit check counts what the reservation will (_accept_replace): the new leaves
        if grows:
            before, after = self.exposure_change(acct, (sym, o.side, new_leaves - o.leaves))
            limit = self.limits.account(acct).credit_limit_usd
            if after > limit and after > before:
                return rej(
                    RejectReason.CREDIT_LIMIT,
                    f"net open exposure would be {after} USD > limit {limit} USD",
                )
        return self._accept_replace(msg, oid, o)

    def _accept_replace(self, msg: ReplaceOrder, oid: str, o: OpenOrder) -> Decision:
        acct = msg.account
        st = self.state(acct)
        # leaves after the replace: qty - cum, as far as risk knows (a fill in flight only
        # makes them smaller, so this is never below them); reserve the larger until confirmed
        st.update(o, pending=max(o.pending_qty, msg.qty - max(o.cum, 0)))
        o.pending_cl.append(msg.cl_ord_id)
        st.note_cl(msg.cl_ord_id, oid, self.cl_id_memory)
        cmd = Replace(
            order_id=oid,
            cl_ord_id=msg.cl_ord_id,
            orig_cl_ord_id=o.cl_ord_id,
            account=acct,
            home_region=self.region,
            qty=msg.qty,
            price_ticks=msg.price_ticks,
        )
        # the order's symbol, never the request's (the same once on_replace checked it; a
        # replayed approval of an older build's is routed where the order is)
        return Decision(
            command=cmd, exec_region=self.topology.exec_region(o.symbol), symbol=o.symbol
        )

    # ---- feedback from execution -----------------------------------------------------------------
    def on_report(self, er: ExecutionReport) -> None:
        """Apply one execution report of an account homed here.

        A report can come twice, or after a later one of the same order: the worker drops a
        redelivered input it remembers (``done``), but that memory is bounded, and a report
        whose ack was lost in a link cut comes back when the link does, maybe after more
        inputs than the worker remembers (1,000,000 inputs is about 8 minutes at 1,000
        orders/s; a snapshot keeps the last 100,000); and execution re-sends a report whose
        PubAck it lost, which JetStream may store after a later report of the same order.
        So the position moves by what the order's ``cum_qty`` adds to what was applied, not
        by ``last_qty``: a fill counts once, in whatever order its reports come. A report of
        an order already closed, or older than one applied (a lower ``cum_qty``), changes
        nothing. (A duplicate of an order closed so long ago that ``closed`` forgot it too
        would count again: more than ``cl_id_memory`` closed orders of the account later.)
        """
        st = self.state(er.account)
        o = st.orders.get(er.order_id)
        sign = 1 if er.side is Side.BUY else -1
        if o is None:
            if er.order_id in st.closed:
                return  # its closing report came already: this one is a duplicate, or late
            if er.exec_type is ExecType.TRADE:  # an order this engine does not hold
                st.positions[er.symbol] = st.positions.get(er.symbol, 0) + sign * er.last_qty
            return
        # older than a report applied already: its fills are counted (a lower cum_qty), its
        # leaves and price are out of date, and its replace may not be the latest
        pos = report_position(er.exec_id)
        stale = 0 <= er.cum_qty < o.cum or (pos is not None and pos[0] == o.ver[0] and pos < o.ver)
        if o.cum >= 0:
            filled = max(0, er.cum_qty - o.cum)
        else:  # restored from a snapshot that did not keep it: count fills as they come
            filled = er.last_qty if er.exec_type is ExecType.TRADE else 0
        if filled:
            st.positions[er.symbol] = st.positions.get(er.symbol, 0) + sign * filled
        if er.ord_status in (
            OrdStatus.FILLED,
            OrdStatus.CANCELED,
            OrdStatus.EXPIRED,
            OrdStatus.REJECTED,
        ):
            st.remove(er.order_id)
            st.note_closed(er.order_id, er.ord_status, self.cl_id_memory)
            return
        if stale:
            return
        if pos is not None:
            o.ver = pos
        # the order's id and price now (a trade after a replace names the replaced order);
        # the replace risk approved last is done once a report names its id
        o.cl_ord_id = er.cl_ord_id
        o.price_ticks = er.price_ticks
        done = er.exec_type is ExecType.REPLACED and not o.pending_cl  # from an old snapshot
        if er.cl_ord_id in o.pending_cl:
            del o.pending_cl[: o.pending_cl.index(er.cl_ord_id) + 1]
            done = not o.pending_cl
        st.update(o, leaves=er.leaves_qty, pending=0 if done else None, cum=er.cum_qty)
        if er.exec_type is ExecType.REPLACED:
            st.note_cl(er.cl_ord_id, er.order_id, self.cl_id_memory)

    def on_cancel_reject(self, cr: CancelReject) -> None:
        st = self.state(cr.account)
        o = st.orders.get(cr.order_id)
        if o is None and cr.order_id == "NONE" and cr.response_to == "replace":
            # a book that never held the order names none (an older build routed a replace
            # by the request's symbol, which may not be the order's): the replace it refuses
            # is found by its own id, or its reservation would stay for the order's life
            oid = st.cl_ids.get(cr.cl_ord_id)
            o = st.orders.get(oid) if oid is not None else None
            if o is not None and cr.cl_ord_id not in o.pending_cl:
                return
        if o is None or cr.response_to != "replace":
            return
        # a refusal answers its own replace only: one approved before it may have been applied
        # by the book, with no report here yet (its first publish lost and sent again after
        # this refusal), so the reservation ends only when no replace is left unanswered
        if cr.cl_ord_id in o.pending_cl:
            o.pending_cl.remove(cr.cl_ord_id)
        elif o.pending_cl:
            return  # delivered again, or older than what is in flight: nothing to end
        if not o.pending_cl:
            st.update(o, pending=0)

    def set_kill(self, key: str, engaged: bool) -> list[tuple[str, OpenOrder]]:
        """Engage/release a kill key; returns (account, order) to cancel when engaging: every
        open order of the accounts it halts, but for one of a symbol no region executes now
        (state kept from an older topology), which is logged: no book could take its cancel."""
        if not engaged:
            self.kills.discard(key)
            return []
        self.kills.add(key)
        out = []
        for acct, st in sorted(self.accounts.items()):
            if not self.killed(acct):
                continue
            for o in list(st.orders.values()):
                if o.symbol not in self._executed:  # no book to send its cancel to
                    log.warning(
                        "risk %s: %s's order %s is of %s, which no region executes: not canceled",
                        self.region,
                        acct,
                        o.order_id,
                        o.symbol,
                    )
                    continue
                out.append((acct, o))
        return out

    def set_limits(self, limits: RiskLimits) -> None:
        self.limits = limits

    # ---- snapshots -----------------------------------------------------------------------------
    SNAPSHOT_VERSION = 1

    def snapshot(self) -> dict[str, Any]:
        """Everything the engine decides with, as plain msgpack-able data.

        ``reserved`` is not stored: :meth:`restore` recomputes it from the open orders.
        """
        return {
            "v": self.SNAPSHOT_VERSION,
            "region": self.region,
            "limits": self.limits.to_mapping(),
            "kills": sorted(self.kills),
            "accounts": {
                acct: {
                    "orders": [
                        [
                            o.order_id,
                            o.cl_ord_id,
                            o.symbol,
                            o.side.value,
                            o.price_ticks,
                            o.leaves,
                            o.pending_qty,
                        ]
                        for o in st.orders.values()
                    ],
                    # filled quantity of the partly filled open orders: a map of its own,
                    # which a build without it ignores (a rollback keeps its snapshot)
                    "cum": {o.order_id: o.cum for o in st.orders.values() if o.cum},
                    # since stop 16, the same way: the newest report applied, the latest
                    # replace in flight
                    "ver": {o.order_id: list(o.ver) for o in st.orders.values() if o.ver[0]},
                    # "pcl": the latest one, as builds before the list read it
                    "pcl": {
                        o.order_id: o.pending_cl[-1] for o in st.orders.values() if o.pending_cl
                    },
                    "pcls": {
                        o.order_id: list(o.pending_cl) for o in st.orders.values() if o.pending_cl
                    },
                    "cl_ids": st.cl_ids.copy(),
                    "positions": st.positions.copy(),
                    "closed": st.closed.copy(),
                }
                for acct, st in sorted(self.accounts.items())
            },
        }

    @classmethod
    def restore(
        cls,
        snap: Mapping[str, Any],
        topology: Topology,
        region: str,
        *,
        cl_id_memory: int = DEFAULT_CL_ID_MEMORY,
    ) -> RiskEngine:
        """The engine :meth:`snapshot` described. Raises ValueError on a foreign snapshot."""
        if snap.get("v") != cls.SNAPSHOT_VERSION or snap.get("region") != region:
            raise ValueError(
                f"risk snapshot v{snap.get('v')} for {snap.get('region')!r}, "
                f"expected v{cls.SNAPSHOT_VERSION} for {region!r}"
            )
        limits = RiskLimits.from_mapping(snap["limits"], strict=False)
        eng = cls(topology, region, limits, cl_id_memory=cl_id_memory)
        eng.kills = set(snap["kills"])
        for acct, raw in snap["accounts"].items():
            st = eng.state(acct)
            for oid, cl, sym, side, px, leaves, pending in raw["orders"]:
                st.add(OpenOrder(oid, cl, sym, Side(side), px, leaves, pending))
            # absent before stop 15: such an order's filled quantity is not known (-1) until
            # its next report, and it says NEW on a replace reject meanwhile; a filled
            # quantity of no open order fails the restore
            if "cum" not in raw:
                for o in st.orders.values():
                    o.cum = -1
            for oid, cum in raw.get("cum", {}).items():
                st.orders[oid].cum = int(cum)
            # absent before stop 16: any report counts as newer, and the next replace report
            # or refusal ends a reservation, as before
            for oid, (xr, seq, n) in raw.get("ver", {}).items():
                st.orders[oid].ver = (str(xr), int(seq), int(n))
            for oid, cl in raw.get("pcl", {}).items():
                st.orders[oid].pending_cl = [str(cl)]
            for oid, pending in raw.get("pcls", {}).items():
                st.orders[oid].pending_cl = [str(c) for c in pending]
            st.cl_ids = dict(raw["cl_ids"])
            st.positions = dict(raw["positions"])
            # absent in snapshots before stop 14; a status that is not one fails the restore
            st.closed = {oid: OrdStatus(v).value for oid, v in raw.get("closed", {}).items()}
            st.restore_order()
        return eng

    # ---- reports -------------------------------------------------------------------------------
    def _reject_report(
        self,
        msg: NewOrder,
        order_id: str,
        reason: RejectReason,
        text: str,
        accepted_ns: int,
        seq: int,
    ) -> ExecutionReport:
        return ExecutionReport.refused(
            reason=reason,
            text=text,
            exec_id=f"{self.region}-risk-{seq}",
            order_id=order_id,
            cl_ord_id=msg.cl_ord_id,
            account=msg.account,
            symbol=msg.symbol,
            side=msg.side,
            ord_type=msg.ord_type,
            tif=msg.tif,
            qty=msg.qty,
            price_ticks=msg.price_ticks or 0,
            home_region=self.region,
            exec_region=self.region,
            transact_ns=accepted_ns,
            entry_ns=accepted_ns,
        )

    def _cancel_reject(
        self,
        msg: CancelOrder | ReplaceOrder,
        order_id: str,
        reason: RejectReason,
        response_to: str,
        seq: int,
        text: str = "",
        *,
        at: int,
        ord_status: OrdStatus | None = None,
    ) -> CancelReject:
        if ord_status is None:
            ord_status = OrdStatus.REJECTED if order_id == "NONE" else OrdStatus.NEW
        return CancelReject(
            order_id=order_id,
            cl_ord_id=msg.cl_ord_id,
            orig_cl_ord_id=msg.orig_cl_ord_id,
            account=msg.account,
            symbol=msg.symbol,
            ord_status=ord_status,
            response_to=response_to,
            reason=reason,
            text=(text or reason.value)[:256],
            reject_id=f"{self.region}-risk-{seq}",
            home_region=self.region,
            exec_region=self.region,
            transact_ns=at,
        )


def _wrong_symbol(asked: str, symbol: str) -> str:
    return f"symbol: {asked} is not the order's symbol ({symbol})"


def limits_with(limits: RiskLimits, **changes: Any) -> RiskLimits:
    return replace(limits, **changes)
