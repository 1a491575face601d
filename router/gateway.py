"""Edge gateway: order entry for desks and FIX bridges, one (or more) per region.

Request/reply on ``mrd.v1.entry.<region>.<account>.<op>``. For every request the gateway

1. validates it against the contract (typed :class:`~router.contract.OrderReject` naming the
   field and rule; nothing is stored);
2. routes it: the account's home region runs risk, the symbol's region executes it;
3. stores it durably in the home region's ``ORDERS`` stream, on a subject unique to
   (account, cl_ord_id), with ``Nats-Expected-Last-Subject-Sequence: 0`` (the stream refuses a
   second message on that subject; it also holds one per subject whoever publishes);
4. replies :class:`~router.contract.OrderAck` only after the PubAck - *an ack means the request
   is in the home region's stream* (decision 0002 says what survives what).

A re-sent request (same account and cl_ord_id, same content) gets the original ack back with
``duplicate=True``; the same cl_ord_id with different content is ``DUPLICATE_CL_ORD_ID``.
If the home region cannot be reached the reply is ``UNAVAILABLE``: with no PubAck the outcome
may be unknown, and re-sending the same request is always safe.

Throughput: nats-py runs one subscription's callbacks one at a time, so the callback only
validates and starts a pipelined publish (:class:`~router.natsutil.AsyncPublisher`);
one replier task per home region awaits
the PubAcks in order and answers (no head-of-line blocking of local orders behind WAN ones).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry import trace

from ops.telemetry.tracing import ORDER_ID, extract, inject
from regions.topology import Topology
from router import contract, subjects
from router.contract import ContractError, Message, OrderAck, RejectReason
from router.entry import (
    WRONG_LAST_SEQUENCE,
    Routed,
    make_ack,
    original_ack,
    reject,
    store_headers,
    store_refused,
    store_unconfirmed,
    validate,
)
from router.natsutil import (
    H_ACCEPTED_NS,
    H_ENTRY_REGION,
    H_ORDER_ID,
    AsyncPublisher,
    NoResponders,
    PublishError,
    now_ns,
    trace_context,
)

log = logging.getLogger("meridian.gateway")

PUBACK_TIMEOUT_S = 5.0


class Gateway:
    """One gateway instance of ``region`` (run several: they share a queue group)."""

    def __init__(
        self,
        nc: NATS,
        topology: Topology,
        region: str,
        *,
        max_inflight: int = 4096,
        on_result: Callable[[str, Message, int], None] | None = None,
        tracer: Any = None,
    ) -> None:
        self.nc = nc
        self.tracer = (
            tracer if tracer is not None and not isinstance(tracer, trace.NoOpTracer) else None
        )
        self._spans: dict[int, Any] = {}
        self.topology = topology
        self.region = region
        self.max_inflight = max_inflight
        self.on_result = on_result
        self._js = {code: nc.jetstream(domain=code) for code in topology.codes}
        self._pub = AsyncPublisher(nc, max_pending=max_inflight)
        self._queues: dict[str, asyncio.Queue[tuple[Msg, Routed, asyncio.Future[Any], int]]] = {
            code: asyncio.Queue() for code in topology.codes
        }
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._sub: Any = None
        self.stats = {"requests": 0, "acks": 0, "rejects": 0, "duplicates": 0}

    async def start(self) -> None:
        await self._pub.start()
        for code, q in self._queues.items():
            self._tasks.append(asyncio.create_task(self._replier(code, q), name=f"reply-{code}"))
        self._sub = await self.nc.subscribe(
            subjects.entry_wildcard(self.region),
            queue=f"gateway-{self.region}",
            cb=self._on_request,
            pending_msgs_limit=200_000,
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.drain()
        for q in self._queues.values():
            while not q.empty():
                await asyncio.sleep(0.01)
        for t in self._tasks:
            t.cancel()

    async def _on_request(self, msg: Msg) -> None:
        t0 = now_ns()
        self.stats["requests"] += 1
        try:
            routed = validate(self.topology, self.region, msg.subject, msg.data)
        except ContractError as e:
            cl = _peek_cl_ord_id(msg.data)
            await self._reply(msg, reject(e.reason, e.field, e.rule, cl), t0)
            return
        if self._pub.saturated:
            # shed load explicitly rather than stall the subscription until NATS drops
            # requests as a slow consumer: the client gets a typed answer and may retry
            await self._reply(
                msg,
                reject(
                    RejectReason.UNAVAILABLE,
                    "",
                    f"gateway {self.region} overloaded ({self._pub.max_pending} requests awaiting "
                    "storage); nothing was stored, retry later",
                    routed.msg.cl_ord_id,
                ),
                t0,
            )
            return
        headers = {
            **store_headers(routed.op),
            H_ENTRY_REGION: self.region,
            H_ACCEPTED_NS: str(t0),
            H_ORDER_ID: routed.order_id,
        }
        if self.tracer is not None:
            span = self.tracer.start_span(
                f"process mrd.v1.entry.{self.region}",
                context=extract(msg.headers),
                kind=trace.SpanKind.SERVER,
                start_time=t0,
                attributes={
                    "messaging.system": "nats",
                    "messaging.destination.name": msg.subject,
                    "messaging.operation.type": "process",
                    ORDER_ID: routed.order_id,
                    "meridian.op": routed.op,
                    "meridian.risk_region": routed.home,
                    "meridian.exec_region": routed.exec_region,
                },
            )
            self._spans[id(msg)] = span
            inject(headers, trace.set_span_in_context(span))
        elif msg.headers:
            # the desk's own trace context, only where it is one: an oversized header would
            # make ORDERS refuse the store (8 KiB), and every re-send answered UNAVAILABLE
            headers.update(trace_context(msg.headers))
        try:
            fut = await self._pub.publish(routed.subject, routed.payload, headers=headers)
        except Exception as e:
            await self._reply(
                msg,
                reject(
                    RejectReason.UNAVAILABLE,
                    "",
                    f"home region {routed.home} busy: {e!r}",
                    routed.msg.cl_ord_id,
                ),
                t0,
            )
            return
        self._queues[routed.home].put_nowait((msg, routed, fut, t0))

    async def _replier(self, home: str, q: asyncio.Queue[tuple[Msg, Routed, Any, int]]) -> None:
        while True:
            msg, routed, fut, t0 = await q.get()
            try:
                ack = await asyncio.wait_for(fut, PUBACK_TIMEOUT_S)
            except PublishError as e:
                if e.err_code in WRONG_LAST_SEQUENCE:
                    # a re-send: the subject already holds this request
                    self._spawn(self._resend(msg, routed, t0))
                    continue
                await self._reply(msg, store_refused(routed, str(e.description)), t0)
                continue
            except (TimeoutError, NoResponders, asyncio.CancelledError) as e:
                what = "no responders" if isinstance(e, NoResponders) else "timeout"
                await self._reply(msg, store_unconfirmed(routed, what), t0)
                continue
            if ack.duplicate:  # no msg id is sent: another publisher's, on this subject
                self._spawn(self._resend(msg, routed, t0))
                continue
            await self._reply(msg, make_ack(routed, self.region, ack.seq, t0, duplicate=False), t0)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._side_tasks.add(t)
        t.add_done_callback(self._side_tasks.discard)

    async def _resend(self, msg: Msg, routed: Routed, t0: int) -> None:
        """A request we have seen: answer with the original ack, or refuse a conflicting one."""
        out = await original_ack(self._js[routed.home], routed, self.region, t0)
        if isinstance(out, OrderAck):
            self.stats["duplicates"] += 1
        await self._reply(msg, out, t0)

    async def _reply(self, msg: Msg, out: Message, t0: int) -> None:
        if isinstance(out, OrderAck):
            self.stats["acks"] += 1
        else:
            self.stats["rejects"] += 1
        if self.on_result is not None:
            self.on_result(self.region, out, now_ns() - t0)
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(contract.encode(out))
        span = self._spans.pop(id(msg), None)
        if span is not None:
            span.set_attribute("meridian.outcome", getattr(out, "status", ""))
            span.end()


def _peek_cl_ord_id(data: bytes) -> str:
    """Best effort: echo the client's cl_ord_id in a reject when it is readable."""
    try:
        raw = contract.unpack(data)
        v = raw.get("cl_ord_id")
        return v if isinstance(v, str) else ""
    except ContractError:
        return ""


# ---- process entry point ---------------------------------------------------------------------


async def _main(args: argparse.Namespace) -> None:
    from ops.runtime import serve_worker

    await serve_worker(
        "gateway",
        args,
        lambda nc, topology, ctx: Gateway(
            nc, topology, args.region, on_result=ctx.record_entry_result, tracer=ctx.tracer
        ),
    )


def main(argv: list[str] | None = None) -> None:
    from ops.runtime import worker_parser

    ap = worker_parser("Meridian edge gateway")
    args = ap.parse_args(argv)
    from ops.runtime import run

    run(_main(args))


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
