"""Price-time-priority limit order book of one symbol: the pure, deterministic matching core.

Events in, events out (LMAX style): :meth:`OrderBook.apply` takes one command decoded from the
EXEC stream with its stream sequence and timestamp and returns the execution reports, cancel
rejects and fills it causes. No clock reads, no randomness, no I/O: the same commands give
byte-identical outputs, ids included, so a replay after a crash republishes exactly what was
published before and the worker's dedup (Nats-Msg-Id = exec_id / trade_id / reject_id) drops it.

Ids (``n`` counts the reports and rejects of one command from 0, ``m`` its matches)::

    exec_id / reject_id   <exec region>-<symbol>-<seq>-<n>
    trade_id              T-<exec region>-<symbol>-<seq>-<m>

Semantics (FIX 4.4):

* Submit -> NEW, then per match: TRADE for the incoming order, TRADE for the resting order,
  one :class:`~router.contract.Fill`. Trades execute at the resting order's price, better
  prices first, earlier orders first within a price.
* LIMIT GTC/DAY rests; IOC remainder, MARKET remainder (MARKET never rests) and an FOK that
  cannot fill completely (checked before matching) are CANCELED with ``NO_LIQUIDITY``.
* Self-trade prevention: reaching a resting order of the same account cancels the incoming
  remainder (``SELF_TRADE``); the resting order is untouched, earlier fills stand.
* Cancel/Replace find the order by ``order_id`` when the book knows it for that account, else
  by ``(account, orig_cl_ord_id)``. Unknown (or other account's) -> CancelReject
  UNKNOWN_ORDER; terminal -> TOO_LATE_TO_CANCEL.
* Replace: ``qty`` is the new total quantity. A smaller size at the same price keeps time
  priority; a price change or larger size goes to the back of its level, and a crossing price
  matches like an incoming order. The REPLACED report has ``cl_ord_id`` = new id,
  ``orig_cl_ord_id`` = old id and the order's current status (NEW/PARTIALLY_FILLED). A ``qty``
  at or below ``cum_qty`` (a reduce that raced a fill) is accepted and the rest canceled, as
  FIX 4.4 does: REPLACED with status FILLED, ``qty`` = ``cum_qty``, leaves 0.
* A CANCELED report for a Cancel command has ``cl_ord_id`` = the cancel's id and
  ``orig_cl_ord_id`` = the order's id (FIX); a system reason (``"KILL_SWITCH"``, or
  ``"KILL_SWITCH: text"``) goes to ``reject_reason`` (code) and ``text``.
* The trading day rolls (:mod:`router.session`): an ExpireDay command names a roll and the
  next ones (its schedule). A roll is taken before the first command stored at or after it
  (by the stream's stored time, so replays are exact), whichever command that is: its own
  ExpireDay, or any other when that has not come yet (execution down over 17:00, a
  backlog). At a roll every resting DAY order of an ended day is EXPIRED, and a DAY order
  of an ended day that arrives later is NEW, then EXPIRED at once: a DAY order never trades
  after its day. A DAY order's day is its accept time (``entry_ns``), or its stored time
  when that is missing or later (a clock ahead). A roll the book has passed changes
  nothing, and an ExpireDay older than the book's last roll is ignored, schedule and all.
* A Submit whose ``order_id`` the book already knows is a redelivery: no output, no change.
  A command with ``seq <= last_seq`` was already applied: no output, no change (so a worker
  may replay its stream from any point after :meth:`OrderBook.restore`).

Terminal orders are remembered (FIFO, ``terminal_memory`` of them) to answer late cancels with
TOO_LATE_TO_CANCEL; the memory is part of the snapshot, so eviction is deterministic too.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from regions.topology import Instrument
from router.contract import (
    TERMINAL_STATUSES,
    CancelReject,
    ExecType,
    ExecutionReport,
    Fill,
    OrdStatus,
    OrdType,
    RejectReason,
    Side,
    TimeInForce,
)
from router.errors import SnapshotError
from router.lifecycle import transition

_packb = msgpack.Packer(use_bin_type=True).pack
"""Encode one value (a Packer resets after each pack: the bytes of that value alone)."""

__all__ = [
    "DEFAULT_TERMINAL_MEMORY",
    "Cancel",
    "Command",
    "ExpireDay",
    "OrderBook",
    "OrderView",
    "Output",
    "Replace",
    "Submit",
    "avg_px",
]

BOOK_RULES = 2
"""The rules a book applies commands by, recorded in its snapshots. 1 (before): a replace down
to or below what has filled is refused, and a replace or cancel applied already is applied
again. 2: the first ends the order FILLED (FIX 4.4), the second changes nothing. A book
restored from a snapshot of older rules applies them to the commands an older build may
have applied already (:attr:`OrderBook.legacy_through`): a replay must give what that build
published, ids and bytes."""

PAST_IDS_KEPT = 64
"""Ids an order no longer answers to, kept per order (OrderBook._past): the latest only. A
replace or cancel stored twice is one of the outputs risk had in flight when it stopped (a
region down can hold many of one quote's replaces back); a quote replaced all day must not
grow its book, its snapshots and each replace's cost without bound. Beyond the latest 64,
a replace stored twice is applied again."""
SNAPSHOT_VERSION = 2
"""2: the index in insertion order (1: sorted). Restore takes both; a book restored from a v1
snapshot decides exactly alike but does not snapshot byte for byte like one replayed from
scratch (its index order differs)."""
DEFAULT_TERMINAL_MEMORY = 100_000
"""Terminal orders remembered for TOO_LATE_TO_CANCEL answers (older ones: UNKNOWN_ORDER)."""


def _clid_key(account: str, cl_ord_id: str) -> str:
    """One string for (account, cl_ord_id): the contract's patterns keep NUL out of both
    (``router.contract._ACCOUNT``, ``_ID``), so keys never collide."""
    return f"{account}\x00{cl_ord_id}"


_REASON_CODES = frozenset(r.value for r in RejectReason)


def report_position(report_id: str) -> tuple[str, int, int] | None:
    """Where a book made a report (exec id or cancel-reject id): (exec region, EXEC stream
    sequence of its command, n-th output of that command). One order's reports come from one
    book in this order, whatever order they are delivered in. None for an id a book did not
    make (``OrderBook._next_id``)."""
    try:
        head, seq, n = report_id.rsplit("-", 2)
        return head.split("-", 1)[0], int(seq), int(n)
    except ValueError:
        return None


# ---- commands -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Submit:
    """A risk-approved new order."""

    order_id: str
    cl_ord_id: str
    account: str
    home_region: str
    side: Side
    ord_type: OrdType
    tif: TimeInForce
    qty: int
    price_ticks: int | None
    """Limit price in ticks; ignored (reported as 0) for MARKET orders."""
    entry_ns: int = 0
    """When the order entered Meridian (gateway accept); copied to every report."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel:
    """Cancel a resting order (client request or system cancel)."""

    order_id: str
    cl_ord_id: str
    """Id of the cancel request itself."""
    orig_cl_ord_id: str
    """Id the order is currently known by."""
    account: str
    home_region: str
    reason: str = ""
    """System reason, e.g. ``"KILL_SWITCH"``; goes to reject_reason (if a code) and text."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Replace:
    """Cancel/replace (FIX G): new total quantity and limit price."""

    order_id: str
    cl_ord_id: str
    """The order's new id."""
    orig_cl_ord_id: str
    account: str
    home_region: str
    qty: int
    """New total quantity. At or below what has filled, the order ends FILLED at its
    ``cum_qty`` (the rest canceled)."""
    price_ticks: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpireDay:
    """End of the trading day: every DAY order accepted before ``cutoff_ns`` expires."""

    cutoff_ns: int
    """The roll instant, UTC ns (:func:`router.session.last_roll_ns`)."""
    schedule: tuple[int, ...] = ()
    """The rolls after it (UTC ns, ascending; :data:`ROLL_SCHEDULE` of them): each is taken
    before the first command stored at or after it, if its own ExpireDay has not come."""


ROLL_SCHEDULE = 8
"""Rolls an ExpireDay names after its own: more than EXEC's 7 days of max_age, so the rolls
of any backlog a restarted worker replays are known, daylight saving changes included."""
ROLL_HORIZON_NS = 10 * 86_400 * 10**9
"""Rolls further than this after an ExpireDay's own are not believed."""


Command = Submit | Cancel | Replace | ExpireDay
Output = ExecutionReport | CancelReject | Fill


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderView:
    """Read-only view of one order in the book."""

    order_id: str
    cl_ord_id: str
    account: str
    home_region: str
    side: Side
    ord_type: OrdType
    tif: TimeInForce
    qty: int
    price_ticks: int
    cum_qty: int
    leaves_qty: int
    cum_notional: int
    status: OrdStatus
    entry_ns: int


def avg_px(cum_notional: int, cum_qty: int, price_decimals: int) -> str:
    """Exact average price string: cum_notional / cum_qty / 10**price_decimals.

    Rounded half-even to ``price_decimals + 2`` places with integer arithmetic only (no
    float, no Decimal context precision); ``"0"`` when nothing is filled.
    """
    if cum_qty <= 0:
        return "0"
    q, r = divmod(cum_notional * 100, cum_qty)
    if 2 * r > cum_qty or (2 * r == cum_qty and q & 1):
        q += 1
    places = price_decimals + 2
    s = str(q).rjust(places + 1, "0")
    return f"{s[:-places]}.{s[-places:]}"


# ---- internal state -----------------------------------------------------------------------------


class _Order:
    __slots__ = (
        "account",
        "cl_ord_id",
        "cum_notional",
        "cum_qty",
        "entry_ns",
        "home_region",
        "ord_type",
        "order_id",
        "price_ticks",
        "qty",
        "side",
        "status",
        "tif",
    )

    def __init__(
        self,
        *,
        order_id: str,
        cl_ord_id: str,
        account: str,
        home_region: str,
        side: Side,
        ord_type: OrdType,
        tif: TimeInForce,
        qty: int,
        price_ticks: int,
        entry_ns: int,
        cum_qty: int = 0,
        cum_notional: int = 0,
        status: OrdStatus | None = None,
    ) -> None:
        self.order_id = order_id
        self.cl_ord_id = cl_ord_id
        self.account = account
        self.home_region = home_region
        self.side = side
        self.ord_type = ord_type
        self.tif = tif
        self.qty = qty
        self.price_ticks = price_ticks
        self.entry_ns = entry_ns
        self.cum_qty = cum_qty
        self.cum_notional = cum_notional
        self.status = status

    @property
    def leaves(self) -> int:
        return 0 if self.status in TERMINAL_STATUSES else self.qty - self.cum_qty

    def pack(self) -> list[Any]:
        return [
            self.order_id,
            self.cl_ord_id,
            self.account,
            self.home_region,
            self.side.value,
            self.ord_type.value,
            self.tif.value,
            self.qty,
            self.price_ticks,
            self.entry_ns,
            self.cum_qty,
            self.cum_notional,
            self.status.value if self.status is not None else None,
        ]

    @classmethod
    def unpack(cls, row: list[Any]) -> _Order:
        (oid, clid, acct, home, side, otype, tif, qty, px, entry, cum, notional, st) = row
        return cls(
            order_id=oid,
            cl_ord_id=clid,
            account=acct,
            home_region=home,
            side=Side(side),
            ord_type=OrdType(otype),
            tif=TimeInForce(tif),
            qty=qty,
            price_ticks=px,
            entry_ns=entry,
            cum_qty=cum,
            cum_notional=notional,
            status=OrdStatus(st) if st is not None else None,
        )

    def view(self) -> OrderView:
        assert self.status is not None
        return OrderView(
            order_id=self.order_id,
            cl_ord_id=self.cl_ord_id,
            account=self.account,
            home_region=self.home_region,
            side=self.side,
            ord_type=self.ord_type,
            tif=self.tif,
            qty=self.qty,
            price_ticks=self.price_ticks,
            cum_qty=self.cum_qty,
            leaves_qty=self.leaves,
            cum_notional=self.cum_notional,
            status=self.status,
            entry_ns=self.entry_ns,
        )


class _Level:
    __slots__ = ("orders", "price", "total")

    def __init__(self, price: int) -> None:
        self.price = price
        # OrderedDict: O(1) removal of any order and O(1) pop of the front (FIFO priority)
        self.orders: OrderedDict[str, _Order] = OrderedDict()
        self.total = 0


class _BookSide:
    """One side: price -> level, plus the sorted prices (ascending) for best-first walks."""

    __slots__ = ("is_bid", "levels", "prices")

    def __init__(self, is_bid: bool) -> None:
        self.is_bid = is_bid
        self.levels: dict[int, _Level] = {}
        self.prices: list[int] = []

    def best(self) -> _Level | None:
        if not self.prices:
            return None
        return self.levels[self.prices[-1] if self.is_bid else self.prices[0]]

    def best_first(self) -> Iterator[_Level]:
        prices = reversed(self.prices) if self.is_bid else iter(self.prices)
        for p in prices:
            yield self.levels[p]

    def add(self, o: _Order) -> None:
        level = self.levels.get(o.price_ticks)
        if level is None:
            level = self.levels[o.price_ticks] = _Level(o.price_ticks)
            bisect.insort(self.prices, o.price_ticks)
        level.orders[o.order_id] = o
        level.total += o.qty - o.cum_qty

    def remove(self, o: _Order) -> None:
        level = self.levels[o.price_ticks]
        del level.orders[o.order_id]
        level.total -= o.qty - o.cum_qty
        if not level.orders:
            self.drop(level.price)

    def drop(self, price: int) -> None:
        del self.levels[price]
        i = bisect.bisect_left(self.prices, price)
        del self.prices[i]

    def orders(self) -> Iterator[_Order]:
        for level in self.best_first():
            yield from level.orders.values()


# ---- the book -----------------------------------------------------------------------------------


class OrderBook:
    """Limit order book of one instrument in its execution region (single writer).

    Args:
        instrument: The instrument traded (symbol, price_decimals for avg_px).
        exec_region: Region code of this book; part of every id it produces.
        terminal_memory: How many terminal orders to remember for late cancels.
    """

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by content

    def __init__(
        self,
        instrument: Instrument,
        exec_region: str,
        *,
        terminal_memory: int = DEFAULT_TERMINAL_MEMORY,
    ) -> None:
        self.instrument = instrument
        self.symbol = instrument.symbol
        self.exec_region = exec_region
        self.terminal_memory = terminal_memory
        self.last_seq = 0
        """Sequence of the last applied command (0 before any)."""
        self.day_cutoff_ns = 0
        """The latest trading-day roll applied (UTC ns; 0: none): DAY orders accepted before
        it have expired, or expire on arrival."""
        self.rolls: tuple[int, ...] = ()
        """The rolls to come (UTC ns, ascending), each taken before the first command stored
        at or after it (empty: none known, and none is taken until an ExpireDay comes)."""
        self._bids = _BookSide(is_bid=True)
        self._asks = _BookSide(is_bid=False)
        self._orders: dict[str, _Order] = {}  # live orders
        # _clid_key(account, cl_ord_id) -> order_id; keys are strings, not tuples, so these
        # maps (and the FIFO below) hold no object the cyclic GC tracks: with tuples, the
        # 128,000 made by 32,000 orders made a full collection cost ~90 ms of CPU, not ~20
        self._by_clid: dict[str, str] = {}
        # Remembered terminal orders, oldest first, kept as their snapshot encoding only: a
        # terminal order never changes again and is read back only for a late cancel or a
        # status query. As objects, 100,000 of them per book were scanned by every full
        # cyclic-GC pass of the execution worker (about 100 ms each, measured); as bytes the
        # collector does not see them, and a snapshot splices them in instead of encoding
        # them (320 ms per full book before, measured).
        self._terminal: dict[str, bytes] = {}  # in the order they ended
        # the same orders' ids and index keys, oldest first, to forget the oldest
        self._terminal_fifo: deque[str] = deque()
        self._terminal_keys: deque[str] = deque()  # their _clid_key, in the same order
        # the index's snapshot encoding, kept beside it in the same (insertion) order
        self._index_packed: dict[str, bytes] = {}
        # bytes of the kept encodings, kept as they change, so a snapshot knows its length
        # without reading 200,000 of them (~5 ms per full book, on the worker's loop)
        self._terminal_bytes = 0
        self._index_bytes = 0
        # (account, cl_ord_id) keys an order no longer answers to: the ids it had before a
        # replace, and the id of the cancel that ended it, kept while the order is known (live
        # or remembered), with their snapshot encoding like the index's. A replace or cancel
        # applied already and stored again (risk re-sends the outputs it recorded; past
        # EXEC's duplicate window they are stored twice) is told by them from a new one, and
        # changes nothing: applied again, a stale replace would move the order back to a
        # superseded price. Strings and tuples of strings: nothing the cyclic GC tracks.
        self._past: dict[str, str] = {}
        self._past_of: dict[str, tuple[str, ...]] = {}
        self._past_packed: dict[str, bytes] = {}
        self._past_bytes = 0
        self.rules = BOOK_RULES
        """The rules of the snapshot this book was restored from (a fresh book: this build's)."""
        self.legacy_through = 0
        """Commands up to this stream sequence are applied by rules 1 (see :data:`BOOK_RULES`):
        set by the execution worker to what a predecessor may have applied, when restored
        from a snapshot of older rules."""
        # per-command scratch (reset by apply)
        self._out: list[Output] = []
        self._seq = 0
        self._ts = 0
        self._n = 0
        self._m = 0

    # ---- commands -----------------------------------------------------------------------

    def apply(self, cmd: Command, *, seq: int, ts_ns: int) -> list[Output]:
        """Apply one command and return what it caused, in publication order.

        Args:
            cmd: The command.
            seq: Its sequence in the input stream (must grow; ``<= last_seq`` is ignored).
            ts_ns: Its timestamp (from the message, never the clock): every output's
                transact_ns.

        Returns:
            ExecutionReports, CancelRejects and Fills; empty for an ignored command.
        """
        if seq <= self.last_seq:
            return []
        out: list[Output] = []
        self._out = out
        self._seq, self._ts, self._n, self._m = seq, ts_ns, 0, 0
        if self.rolls and self.rolls[0] <= ts_ns:  # a day ended before this was stored
            self._take_rolls(ts_ns)
        if isinstance(cmd, Submit):
            self._submit(cmd)
        elif isinstance(cmd, Cancel):
            self._cancel(cmd)
        elif isinstance(cmd, Replace):
            self._replace(cmd)
        elif self.day_cutoff_ns <= cmd.cutoff_ns <= ts_ns + ROLL_HORIZON_NS:
            # (an older roll's command: nothing; one far past its own stored time: a clock
            # days ahead, or a rogue publisher, nothing either.) Its rolls not due yet by
            # this command's stored time (a clock ahead named them early) wait for their time
            # like the rest of the schedule, and rolls already pending before its own stay
            horizon = cmd.cutoff_ns + ROLL_HORIZON_NS
            named = {cmd.cutoff_ns, *(r for r in cmd.schedule if cmd.cutoff_ns < r <= horizon)}
            named.update(r for r in self.rolls if r < cmd.cutoff_ns)
            self.rolls = tuple(sorted(r for r in named if r > self.day_cutoff_ns))
            self._take_rolls(ts_ns)
        self.last_seq = seq
        self._out = []
        return out

    def _submit(self, c: Submit) -> None:
        if c.order_id in self._orders or c.order_id in self._terminal:
            return  # redelivery of an order already taken
        market = c.ord_type is OrdType.MARKET
        o = _Order(
            order_id=c.order_id,
            cl_ord_id=c.cl_ord_id,
            account=c.account,
            home_region=c.home_region,
            side=c.side,
            ord_type=c.ord_type,
            tif=c.tif,
            qty=c.qty,
            price_ticks=0 if market else (c.price_ticks or 0),
            # a DAY order's day is its accept time, never after its stored time (a missing
            # accept time, or a clock ahead, would carry it past the day's roll)
            entry_ns=min(c.entry_ns or self._ts, self._ts)
            if c.tif is TimeInForce.DAY
            else c.entry_ns,
        )
        self._orders[o.order_id] = o
        problem = ""
        if c.qty <= 0:
            problem = "qty must be > 0"
        elif not market and (c.price_ticks is None or c.price_ticks <= 0):
            problem = "price_ticks must be > 0 for a LIMIT order"
        if problem:
            self._report(
                o,
                ExecType.REJECTED,
                OrdStatus.REJECTED,
                reason=RejectReason.INVALID_FIELD,
                text=problem,
            )
            self._remember(o)
            return
        key = _clid_key(c.account, c.cl_ord_id)
        if key in self._by_clid:
            self._report(
                o,
                ExecType.REJECTED,
                OrdStatus.REJECTED,
                reason=RejectReason.DUPLICATE_CL_ORD_ID,
                text=f"cl_ord_id {c.cl_ord_id} is in use",
            )
            self._remember(o)
            return
        self._index(c.account, c.cl_ord_id, o.order_id)
        self._report(o, ExecType.NEW, OrdStatus.NEW)
        if c.tif is TimeInForce.DAY and o.entry_ns < self.day_cutoff_ns:
            # accepted on a day that has ended (in flight over the roll): it never trades
            self._report(o, ExecType.EXPIRED, OrdStatus.EXPIRED, text="trading day ended")
            self._remember(o)
            return
        if c.tif is TimeInForce.FOK:
            got, blocked = self._available(o)
            if got < o.qty:
                reason = RejectReason.SELF_TRADE if blocked else RejectReason.NO_LIQUIDITY
                self._cancel_incoming(o, reason, f"FOK: only {got} of {o.qty} available")
                return
        self._place(o, self._match(o))

    def _cancel(self, c: Cancel) -> None:
        o = self._resolve(c.order_id, c.account, c.orig_cl_ord_id)
        if (
            self._seq > self.legacy_through
            and o is not None
            and self._past.get(_clid_key(c.account, c.cl_ord_id)) == o.order_id
        ):
            return  # the cancel that ended it, stored again: applied already
        if o is None or o.status in TERMINAL_STATUSES:
            self._cancel_reject(c, o, "cancel")
            return
        self._side(o).remove(o)
        code, _, _ = c.reason.partition(":")
        code = code.strip()
        self._report(
            o,
            ExecType.CANCELED,
            OrdStatus.CANCELED,
            reason=code if code in _REASON_CODES else "",
            text=c.reason[:256],
            cl_ord_id=c.cl_ord_id,
            orig_cl_ord_id=o.cl_ord_id,
        )
        self._add_past(c.account, c.cl_ord_id, o.order_id)
        self._remember(o)

    def _replace(self, c: Replace) -> None:
        o = self._resolve(c.order_id, c.account, c.orig_cl_ord_id)
        new_key = _clid_key(c.account, c.cl_ord_id)
        legacy = self._seq <= self.legacy_through
        if (
            not legacy
            and o is not None
            and o.order_id in (self._by_clid.get(new_key), self._past.get(new_key))
        ):
            return  # a replace applied already (the order has, or had, its id), stored again
        if o is None or o.status in TERMINAL_STATUSES:
            self._cancel_reject(c, o, "replace")
            return
        if legacy and (c.qty <= o.cum_qty or c.price_ticks <= 0):  # rules 1, as published
            text = (
                f"qty {c.qty} must exceed cum_qty {o.cum_qty}"
                if c.qty <= o.cum_qty
                else "price_ticks must be > 0"
            )
            self._cancel_reject(c, o, "replace", RejectReason.INVALID_FIELD, text)
            return
        if c.qty <= 0 or c.price_ticks <= 0:
            text = "qty must be > 0" if c.qty <= 0 else "price_ticks must be > 0"
            self._cancel_reject(c, o, "replace", RejectReason.INVALID_FIELD, text)
            return
        if new_key in self._by_clid:
            self._cancel_reject(
                c,
                o,
                "replace",
                RejectReason.DUPLICATE_CL_ORD_ID,
                f"cl_ord_id {c.cl_ord_id} is in use",
            )
            return
        side = self._side(o)
        if c.qty <= o.cum_qty:
            # Cut to what has filled already (a reduce racing a fill): FIX 4.4 accepts the
            # replace and cancels the balance: REPLACED, FILLED, leaves 0. Refusing it would
            # leave the rest live, to fill past the size the desk asked for.
            side.remove(o)
            requested, o.qty, o.price_ticks = c.qty, o.cum_qty, c.price_ticks
            old = o.cl_ord_id
            self._rename(o, c.cl_ord_id)
            self._report(
                o,
                ExecType.REPLACED,
                OrdStatus.FILLED,
                orig_cl_ord_id=old,
                text=f"qty {requested} at or below cum_qty {o.cum_qty}: the rest is canceled",
            )
            self._remember(o)
            return
        keep = c.price_ticks == o.price_ticks and c.qty <= o.qty
        if keep:  # smaller (or equal) size, same price: time priority kept
            side.levels[o.price_ticks].total -= o.qty - c.qty
            o.qty = c.qty
        else:
            side.remove(o)
            o.qty = c.qty
            o.price_ticks = c.price_ticks
        old = o.cl_ord_id
        self._rename(o, c.cl_ord_id)
        status = OrdStatus.NEW if o.cum_qty == 0 else OrdStatus.PARTIALLY_FILLED
        self._report(o, ExecType.REPLACED, status, orig_cl_ord_id=old)
        if not keep:
            self._place(o, self._match(o))

    def _take_rolls(self, ts_ns: int) -> None:
        """Take the latest scheduled roll at or before ``ts_ns`` (an outage may have passed
        several: the latest ends every day before it)."""
        due = [r for r in self.rolls if r <= ts_ns]
        if not due:
            return
        self.rolls = tuple(r for r in self.rolls if r > ts_ns)
        cutoff_ns = max(due)
        if cutoff_ns <= self.day_cutoff_ns:
            return  # that roll is applied already
        self.day_cutoff_ns = cutoff_ns
        day = [
            o
            for side in (self._bids, self._asks)
            for o in side.orders()
            if o.tif is TimeInForce.DAY and o.entry_ns < cutoff_ns
        ]
        for o in day:
            self._side(o).remove(o)
            self._report(o, ExecType.EXPIRED, OrdStatus.EXPIRED, text="end of trading day")
            self._remember(o)

    # ---- matching -----------------------------------------------------------------------

    def _crosses(self, o: _Order, price: int) -> bool:
        if o.ord_type is OrdType.MARKET:
            return True
        return price <= o.price_ticks if o.side is Side.BUY else price >= o.price_ticks

    def _available(self, o: _Order) -> tuple[int, bool]:
        """Quantity ``o`` could fill before self-trade prevention stops it; stopped by STP?"""
        got = 0
        opp = self._asks if o.side is Side.BUY else self._bids
        for level in opp.best_first():
            if not self._crosses(o, level.price):
                break
            for rest in level.orders.values():
                if rest.account == o.account:
                    return got, True
                got += rest.qty - rest.cum_qty
                if got >= o.qty:
                    return got, False
        return got, False

    def _match(self, o: _Order) -> bool:
        """Match ``o`` against the opposite side; True when self-trade prevention stopped it."""
        buy = o.side is Side.BUY
        opp = self._asks if buy else self._bids
        while o.cum_qty < o.qty:
            level = opp.best()
            if level is None or not self._crosses(o, level.price):
                return False
            orders = level.orders
            while orders and o.cum_qty < o.qty:
                rest = next(iter(orders.values()))
                if rest.account == o.account:
                    return True
                q = min(o.qty - o.cum_qty, rest.qty - rest.cum_qty)
                px = level.price
                level.total -= q
                self._trade(o, rest, q, px, buy)
                if rest.cum_qty == rest.qty:
                    orders.popitem(last=False)
                    self._remember(rest)
            if not orders:
                opp.drop(level.price)
        return False

    def _trade(self, o: _Order, rest: _Order, q: int, px: int, buy: bool) -> None:
        trade_id = f"T-{self.exec_region}-{self.symbol}-{self._seq}-{self._m}"
        self._m += 1
        for x in (o, rest):
            x.cum_qty += q
            x.cum_notional += q * px
        mine = self._report(
            o, ExecType.TRADE, self._fill_status(o), last_qty=q, last_px=px, trade_id=trade_id
        )
        theirs = self._report(
            rest, ExecType.TRADE, self._fill_status(rest), last_qty=q, last_px=px, trade_id=trade_id
        )
        b, s = (mine, theirs) if buy else (theirs, mine)
        self._out.append(
            Fill(
                trade_id=trade_id,
                exec_region=self.exec_region,
                symbol=self.symbol,
                base=self.instrument.base,
                quote=self.instrument.quote,
                price_decimals=self.instrument.price_decimals,
                price_ticks=px,
                qty=q,
                buy_account=b.account,
                sell_account=s.account,
                buy_order_id=b.order_id,
                sell_order_id=s.order_id,
                buy_exec_id=b.exec_id,
                sell_exec_id=s.exec_id,
                aggressor=o.side,
                transact_ns=self._ts,
            )
        )

    @staticmethod
    def _fill_status(o: _Order) -> OrdStatus:
        return OrdStatus.FILLED if o.cum_qty == o.qty else OrdStatus.PARTIALLY_FILLED

    def _place(self, o: _Order, self_trade: bool) -> None:
        """After matching: rest the remainder, or cancel it, or (filled) remember the order."""
        if o.cum_qty == o.qty:
            self._remember(o)
        elif self_trade:
            self._cancel_incoming(
                o, RejectReason.SELF_TRADE, "would trade with a resting order of the same account"
            )
        elif o.ord_type is OrdType.MARKET or o.tif in (TimeInForce.IOC, TimeInForce.FOK):
            self._cancel_incoming(
                o, RejectReason.NO_LIQUIDITY, f"{o.qty - o.cum_qty} unfilled, order does not rest"
            )
        else:
            self._side(o).add(o)

    def _cancel_incoming(self, o: _Order, reason: RejectReason, text: str) -> None:
        self._report(o, ExecType.CANCELED, OrdStatus.CANCELED, reason=reason, text=text)
        self._remember(o)

    # ---- outputs --------------------------------------------------------------------------

    def _next_id(self) -> str:
        """``<exec region>-<symbol>-<EXEC seq>-<n>``: :func:`report_position` reads it."""
        n = self._n
        self._n = n + 1
        return f"{self.exec_region}-{self.symbol}-{self._seq}-{n}"

    def _report(
        self,
        o: _Order,
        exec_type: ExecType,
        status: OrdStatus,
        *,
        last_qty: int = 0,
        last_px: int = 0,
        trade_id: str = "",
        reason: str = "",
        text: str = "",
        cl_ord_id: str = "",
        orig_cl_ord_id: str = "",
    ) -> ExecutionReport:
        o.status = transition(o.status, exec_type, status, order_id=o.order_id)
        er = ExecutionReport(
            exec_id=self._next_id(),
            order_id=o.order_id,
            cl_ord_id=cl_ord_id or o.cl_ord_id,
            orig_cl_ord_id=orig_cl_ord_id,
            account=o.account,
            symbol=self.symbol,
            side=o.side,
            ord_type=o.ord_type,
            tif=o.tif,
            exec_type=exec_type,
            ord_status=status,
            qty=max(o.qty, 0),
            price_ticks=max(o.price_ticks, 0),
            cum_qty=o.cum_qty,
            leaves_qty=o.leaves,
            last_qty=last_qty,
            last_px=last_px,
            cum_notional=o.cum_notional,
            avg_px=avg_px(o.cum_notional, o.cum_qty, self.instrument.price_decimals),
            trade_id=trade_id,
            reject_reason=str(reason),
            text=text,
            home_region=o.home_region,
            exec_region=self.exec_region,
            transact_ns=self._ts,
            entry_ns=o.entry_ns,
        )
        self._out.append(er)
        return er

    def _cancel_reject(
        self,
        c: Cancel | Replace,
        o: _Order | None,
        response_to: str,
        reason: RejectReason | None = None,
        text: str = "",
    ) -> None:
        if reason is None:
            if o is None:
                reason, text = RejectReason.UNKNOWN_ORDER, "no such order for this account"
            else:
                reason = RejectReason.TOO_LATE_TO_CANCEL
                text = f"order is {o.status.value if o.status else '?'}"
        self._out.append(
            CancelReject(
                order_id=o.order_id if o is not None else "NONE",
                cl_ord_id=c.cl_ord_id,
                orig_cl_ord_id=c.orig_cl_ord_id,
                account=c.account,
                symbol=self.symbol,
                ord_status=(
                    o.status if o is not None and o.status is not None else OrdStatus.REJECTED
                ),
                response_to=response_to,
                reason=reason,
                text=text,
                reject_id=self._next_id(),
                home_region=c.home_region,
                exec_region=self.exec_region,
                transact_ns=self._ts,
            )
        )

    # ---- bookkeeping ----------------------------------------------------------------------

    def _side(self, o: _Order) -> _BookSide:
        return self._bids if o.side is Side.BUY else self._asks

    def _known(self, order_id: str) -> _Order | None:
        """A live order, or a copy of a remembered terminal one (read-only), or None."""
        o = self._orders.get(order_id)
        if o is None and (row := self._terminal.get(order_id)) is not None:
            o = _Order.unpack(msgpack.unpackb(row, raw=False))
        return o

    def _resolve(self, order_id: str, account: str, orig_cl_ord_id: str) -> _Order | None:
        o = self._known(order_id)
        if o is not None and o.account == account:
            return o
        oid = self._by_clid.get(_clid_key(account, orig_cl_ord_id))
        return self._known(oid) if oid is not None else None

    def _remember(self, o: _Order) -> None:
        """``o`` became terminal (its last change): keep its encoding for late cancels and
        forget the oldest beyond the cap."""
        row = _packb(o.pack())  # first: an order never half leaves the book
        del self._orders[o.order_id]
        self._keep_terminal(o, row)
        while len(self._terminal_fifo) > self.terminal_memory:
            oid = self._terminal_fifo.popleft()
            key = self._terminal_keys.popleft()
            self._terminal_bytes -= len(self._terminal.pop(oid))
            if self._by_clid.get(key) == oid:
                self._unindex(key)
            for k in self._past_of.pop(oid, ()):
                if self._past.get(k) == oid:
                    del self._past[k]
                    self._past_bytes -= len(self._past_packed.pop(k))

    def _rename(self, o: _Order, cl_ord_id: str) -> None:
        """``o`` is known by ``cl_ord_id`` from now on (a replace); its old id is past."""
        self._unindex(_clid_key(o.account, o.cl_ord_id))
        self._add_past(o.account, o.cl_ord_id, o.order_id)
        self._index(o.account, cl_ord_id, o.order_id)
        o.cl_ord_id = cl_ord_id

    def _add_past(self, account: str, cl_ord_id: str, order_id: str) -> None:
        key = _clid_key(account, cl_ord_id)
        if key in self._past:
            return  # (one id is past for one order only: the first keeps it)
        self._past[key] = order_id
        kept = (*self._past_of.get(order_id, ()), key)
        if len(kept) > PAST_IDS_KEPT:  # a quote replaced all day: only its latest ids
            for old in kept[:-PAST_IDS_KEPT]:
                if self._past.get(old) == order_id:
                    del self._past[old]
                    self._past_bytes -= len(self._past_packed.pop(old))
            kept = kept[-PAST_IDS_KEPT:]
        self._past_of[order_id] = kept
        row = _packb([account, cl_ord_id, order_id])
        self._past_packed[key] = row
        self._past_bytes += len(row)

    def _keep_terminal(self, o: _Order, row: bytes) -> None:
        """Remember ended ``o`` (an order ends once: it is not among the remembered)."""
        self._terminal[o.order_id] = row
        self._terminal_bytes += len(row)
        self._terminal_fifo.append(o.order_id)
        self._terminal_keys.append(_clid_key(o.account, o.cl_ord_id))

    def _index(self, account: str, cl_ord_id: str, order_id: str) -> None:
        key = _clid_key(account, cl_ord_id)
        self._by_clid[key] = order_id
        row = _packb([account, cl_ord_id, order_id])
        prev = self._index_packed.get(key)
        if prev is not None:
            self._index_bytes -= len(prev)
        self._index_packed[key] = row
        self._index_bytes += len(row)

    def _unindex(self, key: str) -> None:
        del self._by_clid[key]
        self._index_bytes -= len(self._index_packed.pop(key))

    # ---- queries --------------------------------------------------------------------------

    def best_bid(self) -> tuple[int, int] | None:
        """(price_ticks, total quantity) of the best bid level, or None."""
        level = self._bids.best()
        return (level.price, level.total) if level is not None else None

    def best_ask(self) -> tuple[int, int] | None:
        """(price_ticks, total quantity) of the best ask level, or None."""
        level = self._asks.best()
        return (level.price, level.total) if level is not None else None

    def depth(self, levels: int = 5) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Up to ``levels`` (price_ticks, qty) per side, best first: (bids, asks)."""
        out: list[list[tuple[int, int]]] = []
        for side in (self._bids, self._asks):
            rows: list[tuple[int, int]] = []
            for level in side.best_first():
                if len(rows) >= levels:
                    break
                rows.append((level.price, level.total))
            out.append(rows)
        return out[0], out[1]

    def order(self, order_id: str) -> OrderView | None:
        """View of a resting order, or None when it is not (or no longer) in the book."""
        o = self._orders.get(order_id)
        if o is None or o.status in TERMINAL_STATUSES:
            return None
        return o.view()

    def status(self, order_id: str) -> OrdStatus | None:
        """Status of any order the book knows (resting or remembered terminal), or None."""
        o = self._known(order_id)
        return o.status if o is not None else None

    def open_orders(self, account: str | None = None) -> list[OrderView]:
        """Resting orders in priority order (bids best first, then asks), optionally of one
        account (e.g. for a kill switch)."""
        return [
            o.view()
            for side in (self._bids, self._asks)
            for o in side.orders()
            if account is None or o.account == account
        ]

    def __len__(self) -> int:
        return sum(
            len(level.orders) for s in (self._bids, self._asks) for level in s.levels.values()
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OrderBook):
            return NotImplemented
        return (
            self.symbol == other.symbol
            and self.exec_region == other.exec_region
            and self._resting_rows() == other._resting_rows()
        )

    def __repr__(self) -> str:
        return (
            f"OrderBook({self.exec_region}/{self.symbol}, last_seq={self.last_seq}, "
            f"bid={self.best_bid()}, ask={self.best_ask()}, resting={len(self)})"
        )

    def _resting_rows(self) -> tuple[list[list[Any]], list[list[Any]]]:
        return ([o.pack() for o in self._bids.orders()], [o.pack() for o in self._asks.orders()])

    # ---- snapshot -------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """msgpack of the whole state: resting orders in priority, remembered terminal
        orders, the (account, cl_ord_id) index, ``last_seq`` and the day's rolls."""
        groups, _ = self.snapshot_groups()
        return b"".join(itertools.chain.from_iterable(groups))

    def snapshot_groups(self) -> tuple[list[list[bytes]], int]:
        """:meth:`snapshot` as a few lists of pieces whose concatenation it is (copies: the
        book may change once this returns) and that length, taken from kept totals, so a
        caller embedding several books copies their bytes once (at full memory a book is
        ~14 MB). The execution worker captures this between batches: at full memory ~1-2
        ms per book, where listing the pieces one by one and summing their lengths took
        ~10."""
        bids, asks = self._resting_rows()
        head = {
            "v": SNAPSHOT_VERSION,
            "symbol": self.symbol,
            "exec_region": self.exec_region,
            "last_seq": self.last_seq,
            "day_cutoff_ns": self.day_cutoff_ns,
            "rolls": list(self.rolls),
            "terminal_memory": self.terminal_memory,
            "rules": BOOK_RULES,
            "bids": bids,
            "asks": asks,
        }
        p = msgpack.Packer(use_bin_type=True)
        first = [p.pack_map_header(len(head) + 3)]
        for k, v in head.items():
            first += (p.pack(k), p.pack(v))
        # msgpack is compositional: an array header followed by N encoded items is the
        # encoding of the N-item array, so the kept encodings splice in as they are
        first += (p.pack("terminal"), p.pack_array_header(len(self._terminal)))
        mid = [p.pack("index"), p.pack_array_header(len(self._index_packed))]
        # "past" came later: a build before it ignores the key, and reads its snapshots
        last = [p.pack("past"), p.pack_array_header(len(self._past_packed))]
        n = sum(map(len, first)) + sum(map(len, mid)) + sum(map(len, last))
        n += self._terminal_bytes + self._index_bytes + self._past_bytes
        groups = [
            first,
            list(self._terminal.values()),
            mid,
            list(self._index_packed.values()),
            last,
            list(self._past_packed.values()),
        ]
        return groups, n

    @classmethod
    def restore(cls, data: bytes, instrument: Instrument, exec_region: str) -> OrderBook:
        """Rebuild a book from :meth:`snapshot` bytes.

        Raises:
            SnapshotError: corrupt data, another snapshot version, symbol or region.
        """
        try:
            raw = msgpack.unpackb(data, raw=False)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise SnapshotError(f"not msgpack: {type(e).__name__}") from e
        if not isinstance(raw, dict) or raw.get("v") not in (1, SNAPSHOT_VERSION):
            raise SnapshotError(f"unsupported snapshot (expected a v1-v{SNAPSHOT_VERSION} map)")
        if raw.get("symbol") != instrument.symbol or raw.get("exec_region") != exec_region:
            raise SnapshotError(
                f"snapshot of {raw.get('exec_region')}/{raw.get('symbol')}, "
                f"not {exec_region}/{instrument.symbol}"
            )
        try:
            book = cls(instrument, exec_region, terminal_memory=int(raw["terminal_memory"]))
            book.last_seq = int(raw["last_seq"])
            book.day_cutoff_ns = int(raw.get("day_cutoff_ns", 0))
            book.rolls = tuple(int(r) for r in raw.get("rolls", ()))
            book.rules = int(raw.get("rules", 1))  # none before rules were recorded
            for key in ("bids", "asks"):
                for row in raw[key]:
                    o = _Order.unpack(row)
                    if o.order_id in book._orders:
                        raise ValueError(f"order {o.order_id} is in the snapshot twice")
                    book._orders[o.order_id] = o
                    book._side(o).add(o)
            for row in raw["terminal"]:
                o = _Order.unpack(row)
                if o.order_id in book._orders or o.order_id in book._terminal:
                    raise ValueError(f"order {o.order_id} is in the snapshot twice")
                book._keep_terminal(o, _packb(o.pack()))
            for account, clid, oid in raw["index"]:
                for v in (account, clid, oid):  # a key is both parts with a NUL between
                    if not isinstance(v, str) or "\x00" in v:
                        raise ValueError(f"index entry {[account, clid, oid]!r}")
                book._index(account, clid, oid)
            for account, clid, oid in raw.get("past", ()):  # none in older snapshots
                for v in (account, clid, oid):
                    if not isinstance(v, str) or "\x00" in v:
                        raise ValueError(f"past entry {[account, clid, oid]!r}")
                if oid in book._orders or oid in book._terminal:
                    book._add_past(account, clid, oid)
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"corrupt snapshot: {type(e).__name__}: {e}") from e
        return book
