"""A small Python client for desks (used by the CLI, the demo, the benchmark and the tests).

    client = DeskClient(nc, topology, region="lon", account="LON-HF-01")
    await client.start()                      # subscribes to the account's reports
    ack = await client.new_order("EURUSD", Side.BUY, 1_000_000, price_ticks=108450)
    er = await client.wait_report(ack.order_id, lambda r: r.exec_type is ExecType.NEW)

Reports arrive live on ``mrd.*.er.*.*.<account>`` from every region; :meth:`replay` reads
them back from the streams (EXECOUT of every region, RISKLOG of the home region) after a
reconnect, each from its own position: ``(region, stream)`` -> stream sequence, which only a
replay learns (live reports carry none; :attr:`DeskClient.replayed`). Duplicates (same
exec_id) are dropped here, so a desk never sees one twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NoStreamResponseError

from regions.topology import Topology
from router import contract, ids, subjects
from router.book import report_position
from router.contract import (
    TERMINAL_STATUSES,
    CancelOrder,
    CancelReject,
    ContractError,
    ExecutionReport,
    Message,
    NewOrder,
    OrderAck,
    OrderReject,
    OrdType,
    ReplaceOrder,
    Side,
    TimeInForce,
)
from router.entry import (
    ENTRIES,
    WRONG_LAST_SEQUENCE,
    make_ack,
    original_ack,
    reject,
    store_headers,
    store_refused,
    store_unconfirmed,
    validate,
)
from router.natsutil import H_KIND, trace_context

Report = ExecutionReport | CancelReject

StreamKey = tuple[str, str]
"""A report stream: (region, stream name), e.g. ``("lon", "EXECOUT")``, ``("sgp", "RISKLOG")``.
Each region's streams number their messages themselves."""

_counter = itertools.count(1)


def new_cl_ord_id(prefix: str = "C") -> str:
    return f"{prefix}{os.getpid():x}-{time.time_ns():x}-{next(_counter)}"


@dataclass
class OrderState:
    """What the desk knows about one of its orders."""

    order_id: str
    reports: list[Report] = field(default_factory=list)

    @property
    def last(self) -> Report | None:
        """The order's latest report: the latest made, not the latest delivered. A report
        whose PubAck was lost is sent again and may be stored after later reports of its
        order (decision 0002): by the book's position in its id it is older, and no report
        moves an order back from a terminal status (contract.md, "Reports")."""
        best: Report | None = None
        for r in self.reports:
            if best is None or _made_after(r, best):
                best = r
        return best


def _made_after(a: Report, b: Report) -> bool:
    """Whether report ``a`` of an order was made after ``b`` (``b`` delivered first)."""
    a_done, b_done = a.ord_status in TERMINAL_STATUSES, b.ord_status in TERMINAL_STATUSES
    if a_done != b_done:
        return a_done
    pa = report_position(a.exec_id if isinstance(a, ExecutionReport) else a.reject_id)
    pb = report_position(b.exec_id if isinstance(b, ExecutionReport) else b.reject_id)
    if pa is not None and pb is not None and pa[0] == pb[0]:
        return pa[1:] > pb[1:]  # one book made both: its order is the order's
    return True  # made by different hands (risk, another region): as delivered


class DeskClient:
    def __init__(
        self,
        nc: NATS,
        topology: Topology,
        *,
        region: str,
        account: str,
        timeout_s: float = 5.0,
        tracer: Any = None,
        entry: str = "gateway",
    ) -> None:
        if entry not in ENTRIES:
            raise ValueError(f"entry must be one of {ENTRIES}, not {entry!r}")
        self.entry = entry
        """``gateway``: requests go to the entry region's gateway (request/reply);
        ``direct``: this client stores them in the home region's ORDERS itself."""
        self.tracer = tracer
        """When set, every request starts a trace (W3C traceparent in the NATS headers)."""
        self.nc = nc
        self.topology = topology
        self.region = region
        self.account = account
        self.timeout_s = timeout_s
        self.orders: dict[str, OrderState] = {}
        self.seen: set[str] = set()
        self.reports: list[Report] = []
        self.on_report: Callable[[Report, Msg], None] | None = None
        self.replayed: dict[StreamKey, int] = {}
        """(region, stream) -> stream sequence of the last report a :meth:`replay` read there
        (or the ``since`` it was given, if it read nothing later): the ``since`` of the next
        replay. Live reports carry no stream sequence and do not move it."""
        self._cond = asyncio.Condition()
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            subjects.reports_for_account(self.account),
            cb=self._on_msg,
            pending_msgs_limit=1_000_000,
        )
        await self.nc.flush()

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    # ---- requests ----------------------------------------------------------------------------
    async def request(
        self, op: str, msg: Message, *, headers: dict[str, str] | None = None
    ) -> OrderAck | OrderReject:
        if self.entry == "direct":
            return await self._store(op, msg, headers or {})
        subject = subjects.entry(self.region, self.account, op)
        headers = dict(headers or {})
        if self.tracer is not None:
            from ops.telemetry.tracing import send_span

            oid = ids.order_id(self.account, getattr(msg, "cl_ord_id", ""))
            with send_span(self.tracer, subject, headers, order_id=oid, operation="request"):
                reply = await self.nc.request(
                    subject, contract.encode(msg), timeout=self.timeout_s, headers=headers
                )
        else:
            reply = await self.nc.request(
                subject, contract.encode(msg), timeout=self.timeout_s, headers=headers or None
            )
        raw = contract.unpack(reply.data)
        if raw.get("status") == "ACCEPTED":
            return contract.decode(OrderAck, raw)
        return contract.decode(OrderReject, raw)

    async def _store(
        self, op: str, msg: Message, headers: dict[str, str]
    ) -> OrderAck | OrderReject:
        """Direct entry (contract.md): the gateway's checks run here (a typed reject, nothing
        stored), then the request is stored in the home region's ORDERS on its own subject,
        with the gateway's store headers, and the PubAck is the ack. A re-send is answered
        from the stored original, as the gateway answers it (:mod:`router.entry`)."""
        subject = subjects.entry(self.region, self.account, op)
        try:
            routed = validate(self.topology, self.region, subject, contract.encode(msg))
        except ContractError as e:
            return reject(e.reason, e.field, e.rule, getattr(msg, "cl_ord_id", ""))
        # of the caller's headers only trace context: the rest are the store's to set
        hdrs = {**trace_context(headers), **store_headers(routed.op)}
        js = self.nc.jetstream(domain=routed.home)
        span: Any = contextlib.nullcontext()
        if self.tracer is not None:
            from ops.telemetry.tracing import send_span

            span = send_span(
                self.tracer, routed.subject, hdrs, order_id=routed.order_id, operation="publish"
            )
        try:
            with span:
                ack = await js.publish(
                    routed.subject, routed.payload, self.timeout_s, "ORDERS", hdrs
                )
        except APIError as e:
            if e.err_code in WRONG_LAST_SEQUENCE:  # a re-send: the subject holds one
                return await original_ack(js, routed, self.region, time.time_ns())
            return store_refused(routed, str(e.description))
        except (TimeoutError, NoStreamResponseError) as e:
            what = "no responders" if isinstance(e, NoStreamResponseError) else "timeout"
            return store_unconfirmed(routed, what)
        if ack.duplicate:  # no msg id is sent: another publisher's, on this subject
            return await original_ack(js, routed, self.region, time.time_ns())
        # the PubAck carries no stored time: the desk's clock just after it (reports carry
        # the stored time as entry_ns)
        return make_ack(routed, self.region, ack.seq, time.time_ns(), duplicate=False)

    async def new_order(
        self,
        symbol: str,
        side: Side,
        qty: int,
        price_ticks: int | None = None,
        *,
        ord_type: OrdType = OrdType.LIMIT,
        tif: TimeInForce = TimeInForce.GTC,
        cl_ord_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> OrderAck | OrderReject:
        msg = NewOrder(
            account=self.account,
            cl_ord_id=cl_ord_id or new_cl_ord_id(),
            symbol=symbol,
            side=side,
            ord_type=ord_type,
            tif=tif,
            qty=qty,
            price_ticks=price_ticks,
            sent_ns=time.time_ns(),
        )
        return await self.request("new", msg, headers=headers)

    async def cancel(
        self, orig_cl_ord_id: str, symbol: str, *, cl_ord_id: str | None = None
    ) -> OrderAck | OrderReject:
        msg = CancelOrder(
            account=self.account,
            cl_ord_id=cl_ord_id or new_cl_ord_id("X"),
            orig_cl_ord_id=orig_cl_ord_id,
            symbol=symbol,
            sent_ns=time.time_ns(),
        )
        return await self.request("cancel", msg)

    async def replace(
        self,
        orig_cl_ord_id: str,
        symbol: str,
        qty: int,
        price_ticks: int,
        *,
        cl_ord_id: str | None = None,
    ) -> OrderAck | OrderReject:
        msg = ReplaceOrder(
            account=self.account,
            cl_ord_id=cl_ord_id or new_cl_ord_id("R"),
            orig_cl_ord_id=orig_cl_ord_id,
            symbol=symbol,
            qty=qty,
            price_ticks=price_ticks,
            sent_ns=time.time_ns(),
        )
        return await self.request("replace", msg)

    # ---- reports ----------------------------------------------------------------------------
    async def _on_msg(self, msg: Msg) -> None:
        try:
            rep = decode_report(msg)
        except Exception:
            return
        self._add(rep, msg)

    def _add(self, rep: Report, msg: Msg | None = None) -> bool:
        rid = rep.exec_id if isinstance(rep, ExecutionReport) else rep.reject_id
        if rid in self.seen:
            return False
        self.seen.add(rid)
        self.reports.append(rep)
        st = self.orders.get(rep.order_id)
        if st is None:
            st = self.orders[rep.order_id] = OrderState(order_id=rep.order_id)
        st.reports.append(rep)
        if self.on_report is not None and msg is not None:
            self.on_report(rep, msg)
        asyncio.get_running_loop().create_task(self._notify())
        return True

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def wait_report(
        self, order_id: str, pred: Callable[[Report], bool], timeout_s: float | None = None
    ) -> Report:
        """The first report of ``order_id`` matching ``pred`` (already seen or future)."""

        def find() -> Report | None:
            st = self.orders.get(order_id)
            if st is None:
                return None
            return next((r for r in st.reports if pred(r)), None)

        async with self._cond:
            await asyncio.wait_for(
                self._cond.wait_for(lambda: find() is not None), timeout_s or self.timeout_s
            )
        found = find()
        assert found is not None
        return found

    async def replay(
        self, *, since: Mapping[StreamKey, int] | None = None, timeout_s: float = 5.0
    ) -> int:
        """Catch up from the report streams (after a reconnect): EXECOUT of every region and
        RISKLOG of the account's home region, each read from after its position in ``since``.

        ``since``: (region, stream) -> last stream sequence read there (absent: from the
        start), e.g. :attr:`replayed` of an earlier replay, persisted. Reports received live
        since then come again and are dropped as duplicates. :attr:`replayed` is updated from
        the stream sequences the replay's consumers deliver. Returns the number of reports
        that were new to this client.
        """
        since = dict(since or {})
        for key in since:
            if not (isinstance(key, tuple) and len(key) == 2):
                # a region alone names two streams with separate sequences (EXECOUT, RISKLOG)
                raise TypeError(f"since is keyed by (region, stream), not {key!r}")
        added = 0
        home = self.topology.account_home(self.account)
        for region in self.topology.codes:
            js = self.nc.jetstream(domain=region)
            wanted = [("EXECOUT", subjects.exec_reports_of(region, home, self.account))]
            if region == home:
                wanted.append(("RISKLOG", subjects.report_risk(home, self.account)))
            for stream, subject in wanted:
                key = (region, stream)
                last = since.get(key, 0)
                self.replayed[key] = max(self.replayed.get(key, 0), last)
                try:
                    info = await js.stream_info(stream, subjects_filter=subject)
                except Exception:
                    continue
                if not info.state.subjects:  # nothing stored on (the wildcard) subject
                    continue
                cfg = ConsumerConfig(
                    filter_subject=subject,
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=last + 1,
                    # never acked (desks may not ack): with explicit acks the server would
                    # stop delivering after max_ack_pending (1000) reports
                    ack_policy=AckPolicy.NONE,
                )
                sub = await js.pull_subscribe(subject, stream=stream, config=cfg)
                try:
                    while True:
                        try:
                            msgs = await sub.fetch(256, timeout=min(timeout_s, 1.0))
                        except TimeoutError:  # nats-py may raise a bare asyncio one
                            break
                        pending = len(msgs) >= 256  # unless the metadata says better
                        for m in msgs:
                            with contextlib.suppress(Exception):
                                if self._add(decode_report(m), None):
                                    added += 1
                            with contextlib.suppress(Exception):
                                meta = m.metadata
                                seq = meta.sequence.stream
                                self.replayed[key] = max(self.replayed[key], seq)
                                pending = meta.num_pending > 0
                        if not pending:
                            break
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
        return added


def decode_report(msg: Msg) -> Report:
    kind = (msg.headers or {}).get(H_KIND, "ExecutionReport")
    if kind == "CancelReject":
        return contract.decode(CancelReject, msg.data)
    return contract.decode(ExecutionReport, msg.data)
