"""Order entry, whoever does it: the checks a request must pass before it is stored, where it
is stored, and the answer to a re-sent one. The gateway (request/reply) and a desk that stores
its own requests (direct entry, ``DeskClient(entry="direct")``) both use this module, so the
two paths check, store and answer alike; risk runs :func:`check_request` again on what it
reads from ORDERS."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from regions.topology import Topology
from router import contract, ids, subjects
from router.contract import (
    CancelOrder,
    ContractError,
    Message,
    NewOrder,
    OrderAck,
    OrderReject,
    OrdType,
    RejectReason,
    ReplaceOrder,
    TimeInForce,
)
from router.natsutil import (
    H_ACCEPTED_NS,
    H_EXPECTED_LAST_SUBJECT_SEQ,
    H_EXPECTED_STREAM,
    H_OP,
    now_ns,
    stamp_ns,
)

WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
"""The stream's answers to a request whose subject already holds one (a re-send): the
sequence it names, or the constant form a clustered stream gives while stores on the subject
are in flight (nats-py's KV create takes both)."""

ENTRIES: tuple[str, ...] = ("gateway", "direct")
"""How a request reaches ORDERS: stored by a gateway, or by the desk itself (decision 0007)."""


def request_op(headers: dict[str, str] | None) -> str:
    """A stored request's op (``Mrd-Op``), as everything that reads ORDERS takes it: ``new``
    when absent (the first gateways sent none for new orders)."""
    return (headers or {}).get(H_OP, "new")


@dataclass(frozen=True, slots=True, kw_only=True)
class Routed:
    """A validated request and where it goes."""

    msg: NewOrder | CancelOrder | ReplaceOrder
    op: str
    account: str
    home: str
    exec_region: str
    key: str
    order_id: str
    subject: str
    payload: bytes


def reject(reason: RejectReason, field: str, rule: str, cl_ord_id: str = "") -> OrderReject:
    return OrderReject(
        status="REJECTED",
        cl_ord_id=cl_ord_id[:64],
        reason=reason,
        field=field,
        rule=rule[:512],
        rejected_ns=now_ns(),
    )


def check_request(
    topology: Topology, account: str, msg: NewOrder | CancelOrder | ReplaceOrder
) -> tuple[str, str]:
    """The checks of a decoded request beyond its fields' types and ranges: its account is
    the subject's and known, its symbol traded, its order type, price, time in force and lot
    consistent. The gateway runs them before storing a request, and risk again on what it
    reads from ORDERS (another build's or publisher's request must never reach the engine
    unchecked). Returns (home region, executing region); raises ContractError."""
    if msg.account != account:
        raise ContractError(
            RejectReason.INVALID_FIELD, "account", "must equal the account token of the subject"
        )
    try:
        home = topology.account_home(account)
    except KeyError:
        raise ContractError(
            RejectReason.UNKNOWN_ACCOUNT, "account", f"{account!r} is not a known account"
        ) from None
    try:
        instrument = topology.instrument(msg.symbol)
        exec_region = topology.exec_region(msg.symbol)
    except KeyError:
        raise ContractError(
            RejectReason.UNKNOWN_SYMBOL, "symbol", f"{msg.symbol!r} is not a traded instrument"
        ) from None
    if isinstance(msg, NewOrder):
        if msg.ord_type is OrdType.LIMIT and msg.price_ticks is None:
            raise ContractError(
                RejectReason.INVALID_FIELD, "price_ticks", "is required for LIMIT orders"
            )
        if msg.ord_type is OrdType.MARKET:
            if msg.price_ticks is not None:
                raise ContractError(
                    RejectReason.INVALID_FIELD, "price_ticks", "must be absent for MARKET orders"
                )
            if msg.tif not in (TimeInForce.IOC, TimeInForce.FOK):
                raise ContractError(
                    RejectReason.INVALID_FIELD, "tif", "MARKET orders must be IOC or FOK"
                )
    if isinstance(msg, NewOrder | ReplaceOrder) and msg.qty < instrument.min_qty:
        raise ContractError(
            RejectReason.INVALID_FIELD, "qty", f"below the minimum lot of {instrument.min_qty}"
        )
    if isinstance(msg, CancelOrder | ReplaceOrder) and msg.orig_cl_ord_id == msg.cl_ord_id:
        raise ContractError(
            RejectReason.INVALID_FIELD, "cl_ord_id", "must differ from orig_cl_ord_id"
        )
    return home, exec_region


def validate(topology: Topology, region: str, subject: str, data: bytes) -> Routed:
    """Everything the gateway checks before storing a request. Raises ContractError."""
    parts = subject.split(".")
    if len(parts) != 6 or parts[3] != region:
        raise ContractError(
            RejectReason.INVALID_FIELD, "subject", f"expected mrd.v1.entry.{region}.<account>.<op>"
        )
    account, op = parts[4], parts[5]
    cls = contract.ENTRY_OPS.get(op)
    if cls is None:
        raise ContractError(
            RejectReason.INVALID_FIELD,
            "subject",
            f"unknown op {op!r}; one of {', '.join(contract.ENTRY_OPS)}",
        )
    msg = contract.decode(cls, data)
    assert isinstance(msg, NewOrder | CancelOrder | ReplaceOrder)
    home, exec_region = check_request(topology, account, msg)
    key = subjects.request_key(account, msg.cl_ord_id)
    oid = ids.order_id(account, msg.cl_ord_id)
    return Routed(
        msg=msg,
        op=op,
        account=account,
        home=home,
        exec_region=exec_region,
        key=key,
        order_id=oid,
        subject=subjects.orders(home, account, key),
        payload=contract.encode(msg),
    )


def same_request(a: Message, b: Message) -> bool:
    """Equal apart from the client's send time (a resend after reconnect restamps it)."""
    if type(a) is not type(b):
        return False
    return dataclasses.replace(a, sent_ns=0) == dataclasses.replace(b, sent_ns=0)  # type: ignore[type-var]


def store_headers(op: str) -> dict[str, str]:
    """The headers of a request's store in ORDERS: the stream refuses a second message on
    its subject (a re-send: answered by :func:`original_ack`). No ``Nats-Msg-Id``: the
    subject is the index, and a msg id is a name any publisher into ORDERS could take first."""
    return {H_EXPECTED_LAST_SUBJECT_SEQ: "0", H_EXPECTED_STREAM: "ORDERS", H_OP: op}


def store_refused(routed: Routed, description: str) -> OrderReject:
    """A store the home region refused for another reason than a re-send."""
    return reject(
        RejectReason.UNAVAILABLE,
        "",
        f"home region {routed.home} refused: {description}",
        routed.msg.cl_ord_id,
    )


def store_unconfirmed(routed: Routed, what: str) -> OrderReject:
    """A store whose outcome is not known (``what``: no responders, a timeout)."""
    return reject(
        RejectReason.UNAVAILABLE,
        "",
        f"home region {routed.home} did not confirm ({what}); outcome unknown: re-send the "
        "same request (same cl_ord_id) to learn it",
        routed.msg.cl_ord_id,
    )


def make_ack(
    routed: Routed, entry_region: str, seq: int, accepted_ns: int, *, duplicate: bool
) -> OrderAck:
    return OrderAck(
        status="ACCEPTED",
        order_id=routed.order_id,
        cl_ord_id=routed.msg.cl_ord_id,
        account=routed.account,
        op=routed.op,
        entry_region=entry_region,
        risk_region=routed.home,
        exec_region=routed.exec_region,
        stream_seq=seq,
        accepted_ns=accepted_ns,
        duplicate=duplicate,
    )


def entry_time(claimed_ns: int, stored_ns: int) -> int:
    """An order request's accept time, everywhere (risk's decisions and reports' ``entry_ns``,
    a re-send's ack, compliance history): the time ORDERS stored the request. Only when that
    is unknown, the gateway's stamp (``Mrd-Accepted-Ns``, which any publisher into ORDERS
    could set)."""
    return stored_ns if stored_ns > 0 else claimed_ns


def header_ns(raw: str) -> int | None:
    """A time header's UTC ns (``Mrd-Accepted-Ns``, a record's ``ts``), or None when it is not
    one a report can carry (digits only, within the contract's int64)."""
    if raw.isascii() and raw.isdigit() and int(raw) <= contract.MAX_INT64:
        return int(raw)
    return None


def stored_accept_ns(headers: dict[str, str] | None) -> int:
    """:func:`entry_time` of a stored request read back whole (a direct get's headers carry
    its ``Nats-Time-Stamp``); 0 if neither time can be read."""
    h = headers or {}
    claimed = header_ns(h.get(H_ACCEPTED_NS, "")) or 0
    return entry_time(claimed, stamp_ns(h.get("Nats-Time-Stamp", "")))


async def original_ack(
    js: Any, routed: Routed, entry_region: str, fallback_ns: int
) -> OrderAck | OrderReject:
    """The answer to a re-sent request, whose subject in the home region's ORDERS already
    holds one: the original's ack (``duplicate``) if it is the same request, else
    ``DUPLICATE_CL_ORD_ID``; ``UNAVAILABLE`` if the original cannot be read."""
    try:
        stored = await js.get_last_msg("ORDERS", routed.subject, direct=True)
        seq = int(stored.seq)
    except Exception as e:
        return reject(
            RejectReason.UNAVAILABLE,
            "",
            f"could not read the original request: {e!r}",
            routed.msg.cl_ord_id,
        )
    # read: anything but this very request (another op, content, or bytes that are no
    # request at all, an empty body included: nats-py reads it as None) holds the cl_ord_id
    # for good, so a re-send cannot change the answer
    try:
        original: Message | None = contract.decode(type(routed.msg), stored.data or b"")
    except (ContractError, ValueError, TypeError):
        original = None
    op = request_op(stored.headers)
    if original is None or op != routed.op or not same_request(original, routed.msg):
        return reject(
            RejectReason.DUPLICATE_CL_ORD_ID,
            "cl_ord_id",
            "already used by a different request of this account",
            routed.msg.cl_ord_id,
        )
    accepted = stored_accept_ns(stored.headers) or fallback_ns
    return make_ack(routed, entry_region, seq, accepted, duplicate=True)
