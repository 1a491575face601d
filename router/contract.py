"""Meridian wire contract v1: message types, their msgpack encoding, and validation.

Contract-first: every message crossing NATS is one of the dataclasses below. Their fields,
types and limits are declared once (``_f(...)`` metadata) and drive three things: the strict
decoder (:func:`decode`), the encoder (:func:`encode`) and the JSON Schema that bridge clients
build against (:func:`json_schema`, written to ``docs/contract.schema.json``).

Rules that hold for every message:

* msgpack map with string keys; field ``v`` is the contract version (only ``1`` is accepted).
* Prices are integer ticks (``price_ticks``; 10**price_decimals ticks per unit of the quote
  currency), quantities integer units of the base currency, times int64 UTC nanoseconds.
  Floats are refused everywhere, so NaN and infinities cannot enter.
* Unknown fields are refused (a typo is an error, not a silently ignored field).
* Payloads above :data:`MAX_PAYLOAD_BYTES` are refused before decoding.

Exceptions::

    ContractError (ValueError)   reason: RejectReason, field: str, rule: str
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack

VERSION = 1
MAX_PAYLOAD_BYTES = 4096
"""Largest order-entry payload accepted (a NewOrder is ~200 bytes)."""
MAX_INT64 = 2**63 - 1

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/+=-]{0,63}$")
_ACCOUNT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")
_SYMBOL = re.compile(r"^[A-Z]{6}$")
_REGION = re.compile(r"^[a-z]{3}$")


class Side(enum.StrEnum):
    BUY = "BUY"
    SELL = "SELL"


class OrdType(enum.StrEnum):
    LIMIT = "LIMIT"
    MARKET = "MARKET"


class TimeInForce(enum.StrEnum):
    GTC = "GTC"
    DAY = "DAY"
    IOC = "IOC"
    FOK = "FOK"


class ExecType(enum.StrEnum):
    """FIX tag 150."""

    NEW = "NEW"
    TRADE = "TRADE"
    CANCELED = "CANCELED"
    REPLACED = "REPLACED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"


class OrdStatus(enum.StrEnum):
    """FIX tag 39."""

    NEW = "NEW"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCELED = "CANCELED"
    REPLACED = "REPLACED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"


TERMINAL_STATUSES = frozenset(
    {OrdStatus.FILLED, OrdStatus.CANCELED, OrdStatus.REJECTED, OrdStatus.EXPIRED}
)


class RejectReason(enum.StrEnum):
    """Why something was refused. Stable codes: bridges map them to FIX text/OrdRejReason."""

    MALFORMED = "MALFORMED"  # not msgpack, not a map, wrong type of a field
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    OVERSIZED = "OVERSIZED"
    INVALID_FIELD = "INVALID_FIELD"  # present and typed, but breaks a rule (range, pattern)
    UNKNOWN_SYMBOL = "UNKNOWN_SYMBOL"
    UNKNOWN_ACCOUNT = "UNKNOWN_ACCOUNT"
    DUPLICATE_CL_ORD_ID = "DUPLICATE_CL_ORD_ID"
    UNKNOWN_ORDER = "UNKNOWN_ORDER"
    TOO_LATE_TO_CANCEL = "TOO_LATE_TO_CANCEL"
    MAX_QTY = "MAX_QTY"
    MAX_NOTIONAL = "MAX_NOTIONAL"
    PRICE_COLLAR = "PRICE_COLLAR"
    NO_REFERENCE_PRICE = "NO_REFERENCE_PRICE"
    CREDIT_LIMIT = "CREDIT_LIMIT"
    RESTRICTED_SYMBOL = "RESTRICTED_SYMBOL"
    RATE_LIMIT = "RATE_LIMIT"
    KILL_SWITCH = "KILL_SWITCH"
    SELF_TRADE = "SELF_TRADE"
    NO_LIQUIDITY = "NO_LIQUIDITY"
    UNAVAILABLE = "UNAVAILABLE"  # the target region could not durably take the order


UNKNOWN_FIELD = "unknown field"
"""The rule a field this version does not define breaks (a newer build's, most likely)."""


class ContractError(ValueError):
    """A message broke the contract. ``field`` names the field, ``rule`` says what it broke."""

    def __init__(self, reason: RejectReason, field: str, rule: str) -> None:
        super().__init__(f"{reason}: {field}: {rule}")
        self.reason = reason
        self.field = field
        self.rule = rule


# ---- field declarations ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Spec:
    kind: str  # int | str | bool | enum | levels | strlist
    doc: str
    required: bool = True
    lo: int | None = None
    hi: int | None = None
    pattern: re.Pattern[str] | None = None
    max_len: int = 64
    enum: type[enum.StrEnum] | None = None


def _f(kind: str, doc: str, *, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    spec = Spec(kind=kind, doc=doc, required=default is dataclasses.MISSING, **kw)
    if default is dataclasses.MISSING:
        return field(metadata={"spec": spec})
    return field(default=default, metadata={"spec": spec})


def _qty(doc: str, **kw: Any) -> Any:
    return _f("int", doc, lo=1, hi=10**12, **kw)


def _px(doc: str, **kw: Any) -> Any:
    return _f("int", doc, lo=1, hi=10**12, **kw)


def _ns(doc: str, **kw: Any) -> Any:
    return _f("int", doc, lo=0, hi=MAX_INT64, **kw)


def is_id(value: str) -> bool:
    """Whether ``value`` is an id as the contract's id fields take them (order ids, ...)."""
    return bool(_ID.fullmatch(value))


def _id(doc: str, **kw: Any) -> Any:
    return _f("str", doc, pattern=_ID, **kw)


class Message:
    """Base of every contract message."""

    kind: ClassVar[str]
    schema_rules: ClassVar[tuple[dict[str, Any], ...]] = ()
    """Rules across fields, as JSON Schema (``allOf`` of the message's schema). The decoder
    does not read them: :func:`router.entry.check_request` enforces them."""

    def to_dict(self) -> dict[str, Any]:
        """Plain values (enums as their strings, tuples as lists), ``None`` fields left out."""
        out: dict[str, Any] = {"v": VERSION}
        for name in _names(type(self)):
            val = getattr(self, name)
            if val is None:
                continue
            if isinstance(val, enum.Enum):
                val = val.value
            elif isinstance(val, tuple) and val and isinstance(val[0], tuple):
                val = [list(x) for x in val]
            elif isinstance(val, tuple):
                val = list(val)
            out[name] = val
        return out


# ---- order entry -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NewOrder(Message):
    """Desk/bridge -> gateway, request on ``mrd.v1.entry.<region>.<account>.new``."""

    kind: ClassVar[str] = "NewOrder"
    schema_rules: ClassVar[tuple[dict[str, Any], ...]] = (
        {
            "if": {"properties": {"ord_type": {"const": "MARKET"}}, "required": ["ord_type"]},
            "then": {
                "properties": {"tif": {"enum": ["IOC", "FOK"]}},
                "not": {"required": ["price_ticks"]},
            },
        },
        {
            "if": {"properties": {"ord_type": {"const": "LIMIT"}}, "required": ["ord_type"]},
            "then": {"required": ["price_ticks"]},
        },
    )
    account: str = _f(
        "str",
        "Trading account; must match the subject's account token.",
        pattern=_ACCOUNT,
        max_len=48,
    )
    cl_ord_id: str = _id(
        "Client order id (FIX 11); unique per account, idempotency key. 1-64 characters, "
        "the first a letter or digit."
    )
    symbol: str = _f("str", "Six-letter pair, e.g. EURUSD.", pattern=_SYMBOL, max_len=6)
    side: Side = _f("enum", "BUY or SELL.", enum=Side)
    ord_type: OrdType = _f(
        "enum", "LIMIT (price_ticks required) or MARKET (no price_ticks; IOC or FOK).", enum=OrdType
    )
    tif: TimeInForce = _f("enum", "GTC, DAY, IOC or FOK; IOC or FOK for MARKET.", enum=TimeInForce)
    qty: int = _qty(
        "Quantity in base-currency units; at least the instrument's min_qty (topology), "
        "else INVALID_FIELD."
    )
    price_ticks: int | None = _px(
        "Limit price in ticks; required for LIMIT, absent for MARKET.", default=None
    )
    sent_ns: int = _ns("Client send time, UTC ns.", default=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelOrder(Message):
    """Request on ``mrd.v1.entry.<region>.<account>.cancel``."""

    kind: ClassVar[str] = "CancelOrder"
    account: str = _f("str", "Trading account.", pattern=_ACCOUNT, max_len=48)
    cl_ord_id: str = _id("Id of this cancel request (FIX 11); must differ from orig_cl_ord_id.")
    orig_cl_ord_id: str = _id("cl_ord_id of the order to cancel (FIX 41).")
    symbol: str = _f("str", "Symbol of the order.", pattern=_SYMBOL, max_len=6)
    sent_ns: int = _ns("Client send time, UTC ns.", default=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplaceOrder(Message):
    """Request on ``mrd.v1.entry.<region>.<account>.replace`` (FIX G)."""

    kind: ClassVar[str] = "ReplaceOrder"
    account: str = _f("str", "Trading account.", pattern=_ACCOUNT, max_len=48)
    cl_ord_id: str = _id(
        "Id of the replacement (FIX 11); the order is known by it afterwards. Must differ from "
        "orig_cl_ord_id."
    )
    orig_cl_ord_id: str = _id("cl_ord_id the order is currently known by (FIX 41).")
    symbol: str = _f("str", "Symbol of the order.", pattern=_SYMBOL, max_len=6)
    qty: int = _qty(
        "New total quantity (FIX 38); at least the instrument's min_qty (topology). At or "
        "below what has filled (cum_qty) it is accepted and the rest canceled: a REPLACED "
        "report with ord_status FILLED, qty = cum_qty, leaves_qty 0."
    )
    price_ticks: int = _px("New limit price in ticks.")
    sent_ns: int = _ns("Client send time, UTC ns.", default=0)


EntryMessage = NewOrder | CancelOrder | ReplaceOrder
ENTRY_OPS: dict[str, type[Message]] = {
    "new": NewOrder,
    "cancel": CancelOrder,
    "replace": ReplaceOrder,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderAck(Message):
    """Gateway -> client reply: the request is durably stored in the home region's stream."""

    kind: ClassVar[str] = "OrderAck"
    status: str = _f("str", "Always ACCEPTED.", max_len=8)
    order_id: str = _id("Meridian order id (FIX 37), derived from (account, cl_ord_id).")
    cl_ord_id: str = _id("Echo of the request's cl_ord_id.")
    account: str = _f("str", "Account.", pattern=_ACCOUNT, max_len=48)
    op: str = _f("str", "new, cancel or replace.", max_len=8)
    entry_region: str = _f("str", "Region whose gateway took the request.", pattern=_REGION)
    risk_region: str = _f("str", "Home region of the account (runs risk).", pattern=_REGION)
    exec_region: str = _f("str", "Region executing the symbol.", pattern=_REGION)
    stream_seq: int = _f("int", "Sequence in the home region's ORDERS stream.", lo=1, hi=MAX_INT64)
    accepted_ns: int = _ns(
        "When the gateway accepted the request (direct entry: the desk's clock at its PubAck), "
        "UTC ns."
    )
    duplicate: bool = _f("bool", "True when this repeats the ack of an earlier identical request.")


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderReject(Message):
    """Gateway -> client reply: the request was refused and nothing was stored."""

    kind: ClassVar[str] = "OrderReject"
    status: str = _f("str", "Always REJECTED.", max_len=8)
    cl_ord_id: str = _f(
        "str", "Echo of cl_ord_id when it could be read, else empty.", max_len=64, default=""
    )
    reason: RejectReason = _f("enum", "Reject code.", enum=RejectReason)
    field: str = _f("str", "Offending field, or empty.", max_len=64, default="")
    rule: str = _f("str", "Human-readable rule that was broken.", max_len=512, default="")
    rejected_ns: int = _ns("UTC ns.", default=0)


# ---- execution ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionReport(Message):
    """Execution/risk -> desk, on ``mrd.<region>.er.<src>.<home>.<account>`` (FIX 35=8)."""

    kind: ClassVar[str] = "ExecutionReport"
    exec_id: str = _id("Unique, deterministic execution id (FIX 17).")
    order_id: str = _id("FIX 37.")
    cl_ord_id: str = _id("FIX 11: the id the order is now known by.")
    orig_cl_ord_id: str = _f("str", "FIX 41 on cancel/replace reports.", max_len=64, default="")
    account: str = _f("str", "FIX 1.", pattern=_ACCOUNT, max_len=48)
    symbol: str = _f("str", "FIX 55.", pattern=_SYMBOL, max_len=6)
    side: Side = _f("enum", "FIX 54.", enum=Side)
    ord_type: OrdType = _f("enum", "FIX 40.", enum=OrdType)
    tif: TimeInForce = _f("enum", "FIX 59.", enum=TimeInForce)
    exec_type: ExecType = _f("enum", "FIX 150.", enum=ExecType)
    ord_status: OrdStatus = _f(
        "enum",
        "FIX 39. REPLACED is never sent (a replace reports the order's status).",
        enum=OrdStatus,
    )
    qty: int = _f("int", "FIX 38: order quantity.", lo=0, hi=10**12)
    price_ticks: int = _f("int", "FIX 44 in ticks; 0 for MARKET.", lo=0, hi=10**12)
    cum_qty: int = _f("int", "FIX 14.", lo=0, hi=10**12)
    leaves_qty: int = _f("int", "FIX 151.", lo=0, hi=10**12)
    last_qty: int = _f("int", "FIX 32; 0 unless TRADE.", lo=0, hi=10**12)
    last_px: int = _f("int", "FIX 31 in ticks; 0 unless TRADE.", lo=0, hi=10**12)
    cum_notional: int = _f(
        "int", "Sum of last_qty*last_px (ticks*units): exact avg_px source.", lo=0, hi=MAX_INT64
    )
    avg_px: str = _f(
        "str",
        "FIX 6: average fill price in price units, not ticks: cum_notional / cum_qty / "
        "10**price_decimals as a decimal string, rounded half-even to price_decimals + 2 places "
        "(EURUSD: '1.0845067'); '0' when nothing has filled.",
        max_len=32,
    )
    trade_id: str = _f("str", "Trade id on TRADE reports.", max_len=64, default="")
    reject_reason: str = _f(
        "str",
        "RejectReason on REJECTED, and on CANCELED by the system (SELF_TRADE, NO_LIQUIDITY, "
        "KILL_SWITCH); else empty.",
        max_len=32,
        default="",
    )
    text: str = _f("str", "FIX 58.", max_len=256, default="")
    home_region: str = _f("str", "Account's home region.", pattern=_REGION)
    exec_region: str = _f("str", "Region that produced the report.", pattern=_REGION)
    transact_ns: int = _ns("FIX 60: when it happened (matching time), UTC ns.")
    entry_ns: int = _ns("When the order entered Meridian (stored in ORDERS), UTC ns.", default=0)

    @classmethod
    def refused(cls, *, reason: RejectReason, text: str, **order: Any) -> ExecutionReport:
        """The REJECTED report of an order refused before it traded (by risk's checks, or by
        an executing region that cannot take it): nothing filled, nothing left. ``order``
        names the order (ids, account, symbol, side, type, tif, qty, price, regions, times)."""
        return cls(
            exec_type=ExecType.REJECTED,
            ord_status=OrdStatus.REJECTED,
            cum_qty=0,
            leaves_qty=0,
            last_qty=0,
            last_px=0,
            cum_notional=0,
            avg_px="0",
            reject_reason=reason.value,
            text=text[:256],
            **order,
        )


def refusal_of(
    raw: Mapping[str, Any],
    *,
    op: str,
    reason: RejectReason,
    text: str,
    reply_id: str,
    symbol: str,
    exec_region: str,
    transact_ns: int,
) -> ExecutionReport | CancelReject | None:
    """The answer to a request or command that could not be decided or applied, built from
    what can be read of it (``raw``: its map, with ``order_id``, ``cl_ord_id``, ``account``
    and ``home_region``): a REJECTED report for a new order (``op`` ``submit`` or ``new``),
    a cancel reject for a cancel or replace. A field that cannot be read (an unknown side, a
    NaN quantity) takes a default rather than stop the answer. None when it names no order
    well enough to answer for it (the answer must keep the contract: ids, account, symbol)."""

    def num(name: str, hi: int = 10**12) -> int:
        v = raw.get(name)
        return v if type(v) is int and 0 <= v <= hi else 0

    def member(cls: Any, name: str, default: Any) -> Any:
        try:
            return cls(raw.get(name))
        except ValueError:
            return default

    try:
        common = {
            "order_id": raw["order_id"],
            "cl_ord_id": raw["cl_ord_id"],
            "account": raw["account"],
            "symbol": symbol,
            "home_region": raw["home_region"],
            "exec_region": exec_region,
            "transact_ns": transact_ns,
        }
        out: ExecutionReport | CancelReject
        if op in ("submit", "new"):
            out = ExecutionReport.refused(
                reason=reason,
                text=text,
                **common,
                exec_id=reply_id,
                side=member(Side, "side", Side.BUY),
                ord_type=member(OrdType, "ord_type", OrdType.LIMIT),
                tif=member(TimeInForce, "tif", TimeInForce.GTC),
                qty=num("qty"),
                price_ticks=num("price_ticks"),
                entry_ns=num("entry_ns", MAX_INT64),
            )
        elif op in ("cancel", "replace"):
            out = CancelReject(
                **common,
                orig_cl_ord_id=raw["orig_cl_ord_id"],
                ord_status=OrdStatus.REJECTED,
                response_to=op,
                reason=reason,
                text=text[:256],
                reject_id=reply_id,
            )
        else:
            return None
        # only an answer that keeps the contract (ids, account, symbol patterns) goes out
        return decode(type(out), encode(out))
    except Exception:  # names no order, or not well enough to answer for it
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Fill(Message):
    """Execution -> ledger, one per trade, on ``mrd.<region>.fill.<symbol>``."""

    kind: ClassVar[str] = "Fill"
    trade_id: str = _id("Deterministic trade id: 'T-<region>-<symbol>-<input seq>-<n>'.")
    exec_region: str = _f("str", "Region where it executed (ledger partition).", pattern=_REGION)
    symbol: str = _f("str", "Pair.", pattern=_SYMBOL, max_len=6)
    base: str = _f("str", "Base currency.", max_len=3)
    quote: str = _f("str", "Quote currency.", max_len=3)
    price_decimals: int = _f("int", "Ticks per unit = 10**price_decimals.", lo=0, hi=8)
    price_ticks: int = _px("Trade price in ticks.")
    qty: int = _qty("Base-currency units traded.")
    buy_account: str = _f("str", "Buyer.", pattern=_ACCOUNT, max_len=48)
    sell_account: str = _f("str", "Seller.", pattern=_ACCOUNT, max_len=48)
    buy_order_id: str = _id("Buyer's order id.")
    sell_order_id: str = _id("Seller's order id.")
    buy_exec_id: str = _id("Buyer's TRADE report exec_id.")
    sell_exec_id: str = _id("Seller's TRADE report exec_id.")
    aggressor: Side = _f("enum", "Side of the incoming order.", enum=Side)
    transact_ns: int = _ns("Matching time, UTC ns.")


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelReject(Message):
    """Execution/risk -> desk when a cancel or replace cannot be done (FIX 35=9).

    Published on the same report subjects as ExecutionReport; the order itself is unchanged.
    """

    kind: ClassVar[str] = "CancelReject"
    order_id: str = _f("str", "FIX 37, or 'NONE' when the order is unknown.", max_len=64)
    cl_ord_id: str = _id("FIX 11 of the cancel/replace request.")
    orig_cl_ord_id: str = _id("FIX 41.")
    account: str = _f("str", "FIX 1.", pattern=_ACCOUNT, max_len=48)
    symbol: str = _f("str", "FIX 55.", pattern=_SYMBOL, max_len=6)
    ord_status: OrdStatus = _f(
        "enum",
        "FIX 39: current status of the order (REJECTED if unknown). REPLACED is never sent.",
        enum=OrdStatus,
    )
    response_to: str = _f("str", "FIX 434: 'cancel' or 'replace'.", max_len=8)
    reason: RejectReason = _f("enum", "Why.", enum=RejectReason)
    text: str = _f("str", "FIX 58.", max_len=256, default="")
    reject_id: str = _id("Unique, deterministic id of this reject (dedup key).")
    home_region: str = _f("str", "Account's home region.", pattern=_REGION)
    exec_region: str = _f("str", "Region that produced it.", pattern=_REGION)
    transact_ns: int = _ns("UTC ns.")


# ---- control -----------------------------------------------------------------------------------


class KillScope(enum.StrEnum):
    ACCOUNT = "account"
    DESK = "desk"
    GLOBAL = "global"


@dataclass(frozen=True, slots=True, kw_only=True)
class KillSwitch(Message):
    """Value of a key in every region's KILL_<region> KV bucket (key '<scope>.<target>' or
    'global')."""

    kind: ClassVar[str] = "KillSwitch"
    scope: KillScope = _f("enum", "account, desk or global.", enum=KillScope)
    target: str = _f("str", "Account or desk id; '*' for global.", max_len=48)
    engaged: bool = _f("bool", "True halts new orders and cancels resting ones.")
    reason: str = _f("str", "Why.", max_len=256, default="")
    by: str = _f("str", "Who (operator id).", max_len=64, default="")
    at_ns: int = _ns("When, UTC ns.", default=0)


# ---- market data -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Quote(Message):
    """A liquidity provider's tiered quote, on ``mrd.<region>.md.<symbol>``."""

    kind: ClassVar[str] = "Quote"
    symbol: str = _f("str", "Pair.", pattern=_SYMBOL, max_len=6)
    region: str = _f("str", "Publishing region.", pattern=_REGION)
    lp: str = _f("str", "Liquidity provider id.", max_len=32)
    seq: int = _f("int", "Per (region, symbol) sequence, from 1, no gaps.", lo=1, hi=MAX_INT64)
    bids: tuple[tuple[int, int], ...] = _f("levels", "[[price_ticks, qty], ...] best first.")
    asks: tuple[tuple[int, int], ...] = _f("levels", "[[price_ticks, qty], ...] best first.")
    src_ns: int = _ns("Source timestamp, UTC ns.")


MESSAGE_TYPES: tuple[type[Message], ...] = (
    NewOrder,
    CancelOrder,
    ReplaceOrder,
    OrderAck,
    OrderReject,
    ExecutionReport,
    CancelReject,
    Fill,
    KillSwitch,
    Quote,
)

M = TypeVar("M", bound=Message)


# ---- codec -------------------------------------------------------------------------------------


def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def encode(msg: Message) -> bytes:
    """msgpack bytes of ``msg`` (version field included).

    Same bytes as packing :meth:`Message.to_dict`, without building the plain copy: enums are
    ``StrEnum`` (msgpack packs them as their string) and tuples pack as arrays.
    """
    out: dict[str, Any] = {"v": VERSION}
    for name in _names(type(msg)):
        val = getattr(msg, name)
        if val is not None:
            out[name] = val
    return _packb(out)


def unpack(data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> dict[str, Any]:
    """Bytes -> map, refusing oversize, non-msgpack, trailing bytes and non-map payloads."""
    if len(data) > max_bytes:
        raise ContractError(RejectReason.OVERSIZED, "", f"payload {len(data)} B > {max_bytes} B")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ContractError(RejectReason.MALFORMED, "", f"not msgpack: {type(e).__name__}") from e
    if not isinstance(raw, dict):
        raise ContractError(RejectReason.MALFORMED, "", "payload must be a msgpack map")
    return raw


def decode(cls: type[M], data: bytes | dict[str, Any], *, max_bytes: int = MAX_PAYLOAD_BYTES) -> M:
    """Strictly decode ``data`` into ``cls``; raises :class:`ContractError` naming the field."""
    raw = data if isinstance(data, dict) else unpack(data, max_bytes=max_bytes)
    v = raw.get("v")
    if type(v) is not int or v != VERSION:
        raise ContractError(
            RejectReason.UNSUPPORTED_VERSION,
            "v",
            f"contract version {v!r} not supported (expected {VERSION})",
        )
    fields = _fields(cls)
    for key in raw:
        if key != "v" and key not in fields:
            raise ContractError(RejectReason.MALFORMED, str(key)[:64], UNKNOWN_FIELD)
    kwargs: dict[str, Any] = {}
    for name, spec, fast in _checkers(cls):
        val = raw.get(name)
        if val is None:
            if spec.required:
                raise ContractError(RejectReason.MALFORMED, name, "is required")
            continue
        ok, got = fast(val)
        # the fast check accepts only what _check accepts; anything else gets _check's verdict
        kwargs[name] = got if ok else _check(name, spec, val)
    return cls(**kwargs)


def _check(name: str, spec: Spec, val: Any) -> Any:
    if spec.kind == "int":
        if isinstance(val, float):
            rule = "NaN is not a number" if math.isnan(val) else "floats are not accepted"
            raise ContractError(RejectReason.MALFORMED, name, f"{rule}; send integer units/ticks")
        if isinstance(val, bool) or not isinstance(val, int):
            raise ContractError(
                RejectReason.MALFORMED, name, f"must be an integer, got {type(val).__name__}"
            )
        if spec.lo is not None and val < spec.lo:
            raise ContractError(RejectReason.INVALID_FIELD, name, f"must be >= {spec.lo}")
        if spec.hi is not None and val > spec.hi:
            raise ContractError(RejectReason.INVALID_FIELD, name, f"must be <= {spec.hi}")
        return val
    if spec.kind == "bool":
        if not isinstance(val, bool):
            raise ContractError(RejectReason.MALFORMED, name, "must be a boolean")
        return val
    if spec.kind in ("str", "enum"):
        if not isinstance(val, str):
            raise ContractError(
                RejectReason.MALFORMED, name, f"must be a string, got {type(val).__name__}"
            )
        if len(val) > spec.max_len:
            raise ContractError(
                RejectReason.INVALID_FIELD, name, f"longer than {spec.max_len} characters"
            )
        if spec.kind == "enum":
            assert spec.enum is not None
            try:
                return spec.enum(val)
            except ValueError:
                allowed = ", ".join(m.value for m in spec.enum)
                raise ContractError(
                    RejectReason.INVALID_FIELD, name, f"must be one of {allowed}"
                ) from None
        if spec.pattern is not None and not spec.pattern.fullmatch(val):
            raise ContractError(
                RejectReason.INVALID_FIELD, name, f"must match {spec.pattern.pattern}"
            )
        return val
    if spec.kind == "levels":
        if not isinstance(val, list | tuple) or len(val) > 16:
            raise ContractError(RejectReason.MALFORMED, name, "must be a list of <= 16 levels")
        out = []
        for i, lvl in enumerate(val):
            if (
                not isinstance(lvl, list | tuple)
                or len(lvl) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lvl)
            ):
                raise ContractError(
                    RejectReason.MALFORMED, f"{name}[{i}]", "must be [price_ticks, qty] integers"
                )
            if lvl[0] <= 0 or lvl[1] <= 0 or lvl[0] > 10**12 or lvl[1] > 10**12:
                raise ContractError(
                    RejectReason.INVALID_FIELD, f"{name}[{i}]", "price and qty must be positive"
                )
            out.append((lvl[0], lvl[1]))
        return tuple(out)
    raise AssertionError(spec.kind)


_FIELDS_CACHE: dict[type[Message], dict[str, Spec]] = {}
_NAMES_CACHE: dict[type[Message], tuple[str, ...]] = {}
_CHECKERS_CACHE: dict[type[Message], tuple[tuple[str, Spec, Any], ...]] = {}
_FAIL = (False, None)


def _names(cls: type[Message]) -> tuple[str, ...]:
    got = _NAMES_CACHE.get(cls)
    if got is None:
        got = _NAMES_CACHE[cls] = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    return got


def _fast(spec: Spec) -> Any:
    """A check for the common, valid case: ``val -> (True, value)`` or ``(False, None)``.

    It never accepts what :func:`_check` refuses; on ``False`` the caller runs ``_check``,
    which raises the detailed error (or, for kinds without a fast path, does the work).
    """
    if spec.kind == "int":
        lo = spec.lo if spec.lo is not None else -(2**64)
        hi = spec.hi if spec.hi is not None else 2**64

        def check_int(val: Any) -> tuple[bool, Any]:
            return (True, val) if type(val) is int and lo <= val <= hi else _FAIL

        return check_int
    if spec.kind == "enum":
        assert spec.enum is not None
        members = {m.value: m for m in spec.enum}

        def check_enum(val: Any) -> tuple[bool, Any]:
            got = members.get(val) if type(val) is str else None
            return _FAIL if got is None else (True, got)

        return check_enum
    if spec.kind == "str":
        max_len, match = spec.max_len, spec.pattern.fullmatch if spec.pattern else None

        def check_str(val: Any) -> tuple[bool, Any]:
            if type(val) is not str or len(val) > max_len or (match and not match(val)):
                return _FAIL
            return (True, val)

        return check_str
    return lambda val: _FAIL


def _checkers(cls: type[Message]) -> tuple[tuple[str, Spec, Any], ...]:
    got = _CHECKERS_CACHE.get(cls)
    if got is None:
        got = tuple((n, sp, _fast(sp)) for n, sp in _fields(cls).items())
        _CHECKERS_CACHE[cls] = got
    return got


def _fields(cls: type[Message]) -> dict[str, Spec]:
    got = _FIELDS_CACHE.get(cls)
    if got is None:
        got = {f.name: f.metadata["spec"] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        _FIELDS_CACHE[cls] = got
    return got


# ---- schema ------------------------------------------------------------------------------------


def json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of every message, generated from the declarations above."""
    defs: dict[str, Any] = {}
    for cls in MESSAGE_TYPES:
        props: dict[str, Any] = {"v": {"const": VERSION, "description": "Contract version."}}
        required = ["v"]
        for name, spec in _fields(cls).items():
            props[name] = _prop_schema(spec)
            if spec.required:
                required.append(name)
        defs[cls.kind] = {
            "type": "object",
            "description": (cls.__doc__ or "").strip(),
            "properties": props,
            "required": required,
            "additionalProperties": False,
        }
        if cls.schema_rules:
            defs[cls.kind]["allOf"] = copy.deepcopy(list(cls.schema_rules))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://meridian.example/contract/v1.json",
        "title": f"Meridian wire contract v{VERSION} (msgpack maps)",
        "$defs": defs,
    }


def _prop_schema(spec: Spec) -> dict[str, Any]:
    out: dict[str, Any] = {"description": spec.doc}
    if spec.kind == "int":
        out["type"] = "integer"
        if spec.lo is not None:
            out["minimum"] = spec.lo
        if spec.hi is not None:
            out["maximum"] = spec.hi
    elif spec.kind == "bool":
        out["type"] = "boolean"
    elif spec.kind == "enum":
        assert spec.enum is not None
        out["enum"] = [m.value for m in spec.enum]
    elif spec.kind == "str":
        out["type"] = "string"
        out["maxLength"] = spec.max_len
        if spec.pattern is not None:
            out["pattern"] = spec.pattern.pattern
    elif spec.kind == "levels":
        out["type"] = "array"
        out["maxItems"] = 16
        out["items"] = {
            "type": "array",
            "prefixItems": [
                {"type": "integer", "minimum": 1, "maximum": 10**12},
                {"type": "integer", "minimum": 1, "maximum": 10**12},
            ],
            "minItems": 2,
            "maxItems": 2,
        }
    return out


def main() -> None:
    """``python -m router.contract [PATH]``: write the JSON Schema (docs/contract.schema.json)."""
    import json
    import sys
    from pathlib import Path

    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/contract.schema.json")
    path.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
