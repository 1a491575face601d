"""JetStream plumbing shared by the order-path workers.

* :class:`PullLoop` - a continuous pull consumer: keeps one pull request of ``batch`` messages
  outstanding and re-issues it as it drains or expires, handing each message to a queue. nats-py
  2.16's ``fetch()`` waits for a full batch or its timeout, which adds latency at low rates.
* :func:`stream_position` - stream sequence and stored timestamp (int ns) of a delivered message,
  parsed from its ``$JS.ACK`` reply subject (nats-py's metadata gives float seconds).
* Header names of the Meridian envelope.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

log = logging.getLogger(__name__)

# Envelope headers (values are strings).
H_MSG_ID = "Nats-Msg-Id"
H_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
H_EXPECTED_STREAM = "Nats-Expected-Stream"
H_KIND = "Mrd-Kind"
"""Contract message class name of the payload (ExecutionReport, CancelReject, ...)."""
H_OP = "Mrd-Op"
H_ENTRY_REGION = "Mrd-Entry-Region"
H_ACCEPTED_NS = "Mrd-Accepted-Ns"
H_ORDER_ID = "Mrd-Order-Id"
H_IN_SEQ = "Mrd-In-Seq"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
W3C_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
MAX_TRACESTATE = 512
"""W3C Trace Context's own limit on ``tracestate``."""


def trace_context(headers: dict[str, str]) -> dict[str, str]:
    """The W3C trace context among ``headers``, only where it is one (a traceparent of the
    standard's form, a tracestate within its 512 characters): what a hop may pass on."""
    out = {}
    tp = headers.get(TRACEPARENT)
    if tp is not None and W3C_TRACEPARENT.fullmatch(tp):
        out[TRACEPARENT] = tp
        ts = headers.get(TRACESTATE)
        if ts is not None and len(ts) <= MAX_TRACESTATE:
            out[TRACESTATE] = ts
    return out


class StreamPos(NamedTuple):
    """Where a delivery sits: its stream, consumer, stream sequence, stored time (ns), times
    delivered, messages pending after it, and its consumer delivery sequence."""

    stream: str
    consumer: str
    seq: int
    ts_ns: int
    delivered: int
    pending: int
    cseq: int = 0
    """The consumer's delivery sequence: one more for every delivery, redeliveries included."""


def stream_position(msg: Msg) -> StreamPos:
    """Parse a delivery's reply subject, once per message (kept on the message: a worker asks
    up to three times per input, and the parse cost 7 us of risk's ~440 us per order).

    ``$JS.ACK.[<domain>.<acchash>.]<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``
    """
    d = msg.__dict__
    pos: StreamPos | None = d.get("_mrd_pos")
    if pos is not None:
        return pos
    reply = msg.reply or ""
    t = reply.split(".")
    n = len(t)
    if n < 9 or n == 10 or t[0] != "$JS" or t[1] != "ACK":
        raise ValueError(f"not a JetStream delivery: reply={reply!r}")
    # v2 (11 tokens, 12+ with its optional random token) carries domain and account hash
    i = 4 if n >= 11 else 2
    pos = StreamPos(
        t[i], t[i + 1], int(t[i + 3]), int(t[i + 5]), int(t[i + 2]), int(t[i + 6]), int(t[i + 4])
    )
    d["_mrd_pos"] = pos
    return pos


@dataclass(frozen=True, slots=True)
class Recovered:
    """A message read back from the stream to fill a gap in a consumer's deliveries
    (:class:`PullLoop` with ``fill_gaps``): it was delivered, to a process that died or on a
    connection that dropped it, and never handed on. The durable redelivers it only after its
    ack wait; the worker takes it now, in order, and must not ack it (its reply subject is the
    reading consumer's): a later ack, or its redelivery found decided, covers it."""

    msg: Msg


def now_ns() -> int:
    return time.time_ns()


def stamp_ns(text: str) -> int:
    """A stored message's ``Nats-Time-Stamp`` header (RFC 3339, ns precision, UTC, as a
    direct get returns it) as UTC ns; 0 if unreadable."""
    import datetime as dt

    try:
        head, _, frac = text.rstrip("Z").partition(".")
        t = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC)
        digits = "".join(c for c in frac if c.isdigit())[:9].ljust(9, "0")
        return int(t.timestamp()) * 10**9 + int(digits)
    except ValueError:
        return 0


class PullLoop:
    """A durable pull consumer that streams messages into ``queue``.

    The consumer is created (or updated) with explicit acks and ``max_ack_pending`` large enough
    for pipelining. ``api_prefix`` selects the domain (``$JS.<domain>.API``), so a worker can
    consume another region's stream over the leaf links.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        domain: str,
        stream: str,
        durable: str,
        filter_subject: str,
        queue: asyncio.Queue[Msg],
        batch: int = 256,
        expires_s: float = 2.0,
        max_ack_pending: int = 20000,
        ack_wait_s: float = 30.0,
        tag: str = "",
        ack_all: bool = False,
        fill_gaps: bool = False,
    ) -> None:
        self.nc = nc
        self.domain = domain
        self.api = f"$JS.{domain}.API"
        self.stream = stream
        self.durable = durable
        self.filter_subject = filter_subject
        self.queue = queue
        self.batch = batch
        self.expires_s = expires_s
        self.max_ack_pending = max_ack_pending
        self.ack_wait_s = ack_wait_s
        self.tag = tag
        self.ack_all = ack_all
        """AckPolicy.ALL: acking a message acks every earlier one (one ack per batch)."""
        self.fill_gaps = fill_gaps
        """Hand on every delivered message, in order (AckPolicy.ALL needs it): see
        :meth:`_on_msg`."""
        self._cseq = 0
        self._sseq = 0
        """Consumer and stream sequence of the last delivery handed on (``fill_gaps``)."""
        self._held: collections.deque[Msg] | None = None
        """Deliveries that came while a gap is filled, handed on after it (``fill_gaps``)."""
        self._filler: asyncio.Task[None] | None = None
        self.gaps_filled = 0
        """Messages read back from the stream to fill gaps (for tests and logs)."""
        self._sub: Subscription | None = None
        self._inbox = ""
        self._remaining = 0
        self._last_pull = 0.0
        self._task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()

    async def ensure_consumer(self) -> None:
        js = self.nc.jetstream(domain=self.domain)
        cfg = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.ALL if self.ack_all else AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=self.filter_subject,
            max_ack_pending=self.max_ack_pending,
            ack_wait=self.ack_wait_s,
            max_waiting=64,
            inactive_threshold=None,
        )
        await js.add_consumer(self.stream, cfg)

    async def consumer_info(self) -> Any:
        js = self.nc.jetstream(domain=self.domain)
        return await js.consumer_info(self.stream, self.durable)

    async def start(self) -> None:
        """Create or update the consumer and start pulling.

        With ``fill_gaps``, first hand on what the consumer delivered and nobody acked (to a
        predecessor that died): from its ack floor up to its last delivery.
        """
        await self.ensure_consumer()
        if self.fill_gaps:
            ci = await self.consumer_info()
            self._cseq = ci.ack_floor.consumer_seq or 0
            self._sseq = ci.ack_floor.stream_seq or 0
            if (ci.delivered.consumer_seq or 0) > self._cseq:
                self._held = collections.deque()
                await self._fill_gaps()
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg)
        self._task = asyncio.create_task(self._pump(), name=f"pull-{self.stream}-{self.tag}")

    async def stop(self) -> None:
        if self._filler is not None:
            await cancel_and_wait([self._filler])
        if self._task is not None:
            await cancel_and_wait([self._task])
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _pull(self) -> None:
        req = {"batch": self.batch, "expires": int(self.expires_s * 1e9)}
        self._remaining = self.batch
        self._last_pull = time.monotonic()
        await self.nc.publish(
            f"{self.api}.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}",
            json.dumps(req).encode(),
            reply=self._inbox,
        )

    async def _pump(self) -> None:
        """Keeps a pull outstanding; re-issues after drain/expiry/reconnect or a lost request."""
        backoff = 0.05
        while True:
            try:
                due = (
                    self._remaining <= 0
                    or time.monotonic() - self._last_pull > self.expires_s + 1.0
                )
                if due and self.nc.is_connected:
                    await self._pull()
                self._kick.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), timeout=0.5)
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as e:  # connection trouble: keep trying
                log.warning("pull loop %s/%s: %s", self.stream, self.durable, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                with contextlib.suppress(Exception):
                    await self.ensure_consumer()

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None and not msg.data:
            # 404 no messages / 408 request expired / 409 limits: the pull is over
            if status in ("404", "408", "409"):
                self._remaining = 0
                self._kick.set()
            return  # 100 = heartbeat
        self._remaining -= 1
        if self._remaining <= 0:
            self._kick.set()
        if not (msg.reply or "").startswith("$JS.ACK."):
            # not a delivery (nothing to ack, no position): kept out of the worker and of the
            # gap filler, which would stop on it
            log.warning(
                "pull loop %s/%s: not a delivery on %s", self.stream, self.durable, msg.subject
            )
            return
        if not self.fill_gaps:
            self.queue.put_nowait(msg)
            return
        # With AckPolicy.ALL, acking a message acks every one before it, handed on or not. A
        # delivery that never reached the worker (a connection or leaf link that dropped
        # it) would be acked unseen by the next ack; the server would redeliver it only
        # after its ack wait, and by then it is acked. Deliveries are numbered one by one:
        # a jump means some never came, and they are read back from the stream first.
        if self._held is not None:
            self._held.append(msg)
            return
        pos = stream_position(msg)
        if pos.cseq > self._cseq + 1:
            self._held = collections.deque([msg])
            self._filler = asyncio.create_task(
                self._fill_gaps(), name=f"fill-{self.stream}-{self.tag}"
            )
            self._filler.add_done_callback(self._filler_done)
            return
        self._hand_on(msg, pos)

    def _filler_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # deliveries stay held from here on: the worker decides nothing more from this
            # consumer, so say so loudly (its stall watch and backlog alerts follow)
            log.critical(
                "pull loop %s/%s: filling a gap failed for good: %r",
                self.stream,
                self.durable,
                task.exception(),
            )

    def _hand_on(self, msg: Msg, pos: StreamPos) -> None:
        self._cseq = max(self._cseq, pos.cseq)
        self._sseq = max(self._sseq, pos.seq)
        self.queue.put_nowait(msg)

    async def _fill_gaps(self) -> None:
        """Read back every message delivered since the last one handed on, then hand on the
        deliveries held meanwhile, up to the next gap (if any: fill it too)."""
        held = self._held
        assert held is not None
        backoff = 0.5
        while True:
            # a held new delivery bounds the gap: everything before it in the stream was
            # delivered before it (a redelivery of an old message does not: then the
            # consumer's info says how far the deliveries went)
            first = stream_position(held[0]) if held else None
            through = first.seq - 1 if first is not None and first.delivered == 1 else 0
            try:
                await self._read_back(through)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the stream's domain unreachable: later ones wait
                log.warning(
                    "pull loop %s/%s: filling a gap in the deliveries failed (%r); retrying",
                    self.stream,
                    self.durable,
                    e,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            while held:
                pos = stream_position(held[0])
                # a first delivery right after what was read back, or of something read
                # back already (a repeat is safe; waiting for a gap that is not there is not)
                bounded = pos.delivered == 1 and pos.seq <= max(through + 1, self._sseq)
                if pos.cseq > self._cseq + 1 and not bounded:
                    break  # another gap, after the last read: fill it as well
                self._hand_on(held.popleft(), pos)
                backoff = 0.5
            if not held:
                self._held = None
                return
            head = stream_position(held[0])
            if head.delivered == 1 and head.seq > self._sseq:
                continue  # another gap before a first delivery: it bounds the next read
            # the first held one is a redelivery after a gap, and the consumer's info is
            # behind what it delivered (a leader change): wait for it
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _read_back(self, through: int = 0) -> None:
        """Hand on, as :class:`Recovered`, the stream's messages of this consumer's filter
        after the last one handed on: up to ``through`` (stream sequence) if given, else up to
        the consumer's last delivery.

        ``through`` is given when a held first delivery bounds the gap. Reading further would
        hand on the held deliveries twice, the copy read back first, and the worker would
        meet each twice."""
        if through:
            upto_c, upto_s = self._cseq, through
        else:
            ci = await self.consumer_info()
            upto_c = ci.delivered.consumer_seq or 0
            upto_s = ci.delivered.stream_seq or 0
        n = 0
        js = self.nc.jetstream(domain=self.domain)
        first = 0
        if upto_s > self._sseq:
            # the first one, if the stream still holds any (max_age may have taken them)
            with contextlib.suppress(NotFoundError):
                first = (
                    await js.get_msg(
                        self.stream, seq=self._sseq + 1, subject=self.filter_subject, next=True
                    )
                ).seq or 0
        if 0 < first <= upto_s:
            cfg = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=first,
                filter_subject=self.filter_subject,
            )
            sub = await js.subscribe(
                self.filter_subject, stream=self.stream, ordered_consumer=True, config=cfg
            )
            try:
                while True:
                    m = await sub.next_msg(timeout=5)
                    seq = m.metadata.sequence.stream
                    if seq > upto_s:
                        break
                    self.queue.put_nowait(Recovered(m))  # type: ignore[arg-type]
                    n += 1
                    self._sseq = seq
                    if seq >= upto_s or m.metadata.num_pending == 0:
                        break
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._cseq = max(self._cseq, upto_c)
        self._sseq = max(self._sseq, upto_s)
        self.gaps_filled += n
        log.warning(
            "pull loop %s/%s: %d delivered messages never handed on were read back from the "
            "stream (up to stream seq %d)",
            self.stream,
            self.durable,
            n,
            upto_s,
        )


async def ensure_gone(nc: NATS, domain: str, stream: str, durable: str) -> None:
    js = nc.jetstream(domain=domain)
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(stream, durable)


class PublishError(Exception):
    """JetStream refused a publish (``err_code`` is the JetStream API error code)."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{code}/{err_code}: {description}")
        self.code = code
        self.err_code = err_code
        self.description = description


class NoResponders(Exception):
    """No stream (or no route to its domain) took the message: it was not stored."""


@dataclass(frozen=True, slots=True)
class Ack:
    stream: str
    seq: int
    domain: str
    duplicate: bool


class AsyncPublisher:
    """Pipelined JetStream publishes over core NATS with our own reply inbox.

    nats-py's ``publish_async`` raises API errors inside its reply handler (the future then
    never resolves); here every reply resolves its future: an :class:`Ack`, a
    :class:`PublishError` or :class:`NoResponders`. Callers bound waits with their own timeout.
    """

    def __init__(
        self, nc: NATS, *, max_pending: int = 8192, ack_timeout_s: float | None = None
    ) -> None:
        self.nc = nc
        self.max_pending = max_pending
        self.ack_timeout_s = ack_timeout_s
        """If set, a publish whose PubAck has not come within it fails with TimeoutError and
        frees its slot (a blackholed route never answers: without a deadline the slot would
        be held until the caller gave up on the future)."""
        self._pending: dict[str, asyncio.Future[Ack]] = {}
        """Token -> PubAck future, oldest first (publish order)."""
        self._deadlines: collections.deque[tuple[float, str]] = collections.deque()
        """(deadline on the loop's clock, token) in publish order, when ``ack_timeout_s`` is
        set: one sweep expires the overdue ones (a timer per publish cost ~3 us of ~21)."""
        self._sweep: asyncio.TimerHandle | None = None
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._prefix = ""
        self._n = 0
        self._sub: Subscription | None = None

    @property
    def saturated(self) -> bool:
        """Every slot is waiting for a PubAck: a new publish would have to wait."""
        return len(self._pending) >= self.max_pending

    async def start(self) -> AsyncPublisher:
        if self._sub is None:
            self._prefix = self.nc.new_inbox()
            self._sub = await self.nc.subscribe(
                f"{self._prefix}.*", cb=self._on_reply, pending_msgs_limit=1_000_000
            )
        return self

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[Ack]:
        if self._sub is None:
            await self.start()
        if self._slot_waiters or len(self._pending) >= self.max_pending:
            await self._wait_for_slot()
        self._n += 1
        token = str(self._n)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Ack] = loop.create_future()
        self._pending[token] = fut
        fut.add_done_callback(functools.partial(self._done, token))
        if self._slot_waiters:
            self._wake_waiters()  # another slot may be free for the next in line
        if self.ack_timeout_s is not None:
            # the loop's clock, as the timer's: uvloop rounds timers to milliseconds, and a
            # deadline on another clock made the sweep fire early and re-arm in a busy loop
            self._deadlines.append((loop.time() + self.ack_timeout_s, token))
            if self._sweep is None:
                self._sweep = loop.call_later(self.ack_timeout_s, self._expire_overdue)
        try:
            await self.nc.publish(
                subject, payload, reply=f"{self._prefix}.{token}", headers=headers
            )
        except BaseException as e:
            # a publish cancelled here frees its slot too; nats-py may have buffered the
            # message already, so it can still be stored, its PubAck then unheard (the
            # caller gave up on it: at shutdown, or a caller's own timeout)
            if not fut.done():
                if isinstance(e, Exception):
                    fut.set_exception(e)
                else:
                    fut.cancel()
            if not isinstance(e, Exception):
                raise
        return fut

    async def _wait_for_slot(self) -> None:
        """Wait, in arrival order, until a slot is free (the common case, a free slot and
        nobody waiting, never gets here). A waiter woken but cancelled before it ran passes
        the wake on, so a free slot is never left unused while someone waits."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        self._wake_waiters()
        try:
            # woken only with a slot free for it: a woken waiter counts as holding one, and
            # newcomers queue behind it until it has run
            await waiter
            self._slot_waiters.remove(waiter)
        except BaseException:
            with contextlib.suppress(ValueError):
                self._slot_waiters.remove(waiter)
            self._wake_waiters()
            raise

    def _wake_waiters(self) -> None:
        """Wake the first waiters, as many as there are free slots; a waiter woken and not
        yet run holds one of them."""
        free = self.max_pending - len(self._pending)
        for w in self._slot_waiters:
            if free <= 0:
                return
            if not w.done():
                w.set_result(None)
            free -= 1

    def _done(self, token: str, _fut: asyncio.Future[Ack]) -> None:
        if self._pending.pop(token, None) is not None and self._slot_waiters:
            self._wake_waiters()

    def _expire_overdue(self) -> None:
        """Fail every publish whose PubAck is overdue (or due within a millisecond, the
        timer's resolution); come back for the next deadline."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time() + 0.001
        dl = self._deadlines
        while dl and (dl[0][0] <= now or dl[0][1] not in self._pending):
            _, token = dl.popleft()
            fut = self._pending.get(token)
            if fut is not None and not fut.done():
                fut.set_exception(TimeoutError("no PubAck in time"))
        if dl:
            self._sweep = loop.call_later(max(0.001, dl[0][0] - now), self._expire_overdue)

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[1]
        fut = self._pending.get(token)
        if fut is None or fut.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            fut.set_exception(NoResponders())
            return
        ack = _fast_puback(msg.data)
        if ack is not None:
            fut.set_result(ack)
            return
        try:
            resp = json.loads(msg.data)
        except ValueError:
            fut.set_exception(PublishError(0, 0, f"bad PubAck {msg.data[:80]!r}"))
            return
        err = resp.get("error")
        if err:
            fut.set_exception(
                PublishError(
                    int(err.get("code", 0)),
                    int(err.get("err_code", 0)),
                    str(err.get("description", "")),
                )
            )
            return
        fut.set_result(
            Ack(
                stream=resp.get("stream", ""),
                seq=int(resp.get("seq", 0)),
                domain=resp.get("domain", ""),
                duplicate=bool(resp.get("duplicate", False)),
            )
        )

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for fut in list(self._pending.values()):
            if not fut.done():
                fut.cancel()


_PUBACK = re.compile(
    rb'\{"stream":"([^"\\]*)",(?:"domain":"([^"\\]*)",)?"seq":(\d+)(,"duplicate": ?true)?\}\Z'
)


def _fast_puback(data: bytes) -> Ack | None:
    """The success PubAck in the exact shape nats-server writes it, without ``json.loads``
    (0.3 vs 1.7 us, measured); anything else (errors, new fields) returns None and is parsed
    as JSON."""
    m = _PUBACK.match(data)
    if m is None:
        return None
    stream, domain, seq, dup = m.groups()
    return Ack(stream.decode(), int(seq), (domain or b"").decode(), dup is not None)


async def cancel_and_wait(
    tasks: list[asyncio.Task[Any]] | set[asyncio.Task[Any]], timeout_s: float = 5.0
) -> None:
    """Cancel ``tasks`` and wait for them, but never forever.

    Python 3.11's ``asyncio.wait_for`` (used inside nats-py and here) can swallow a cancel that
    races the inner result; the task then carries on. A bounded wait keeps ``stop()`` from
    hanging on such a task (the process is about to exit or rebuild anyway).
    """
    live = [t for t in tasks if not t.done()]
    for t in live:
        t.cancel()
    if live:
        _done, pending = await asyncio.wait(live, timeout=timeout_s)
        for t in pending:
            log.warning("task %s ignored its cancel; leaving it", t.get_name())


async def unstored(futs: list[asyncio.Future[Any]], timeout_s: float) -> list[int]:
    """Wait (at most ``timeout_s``) for these PubAck futures; the indexes of the writes that
    were not stored: no PubAck in time (those futures are cancelled, freeing their
    publisher slots) or a failed one. The single writers send those again with their msg
    ids, which the stream's dedup makes exact."""
    if not futs:
        return []
    _, pending = await asyncio.wait(futs, timeout=timeout_s)
    for f in pending:
        f.cancel()
    return [i for i, f in enumerate(futs) if f.cancelled() or f.exception() is not None]


class RebuildError(RuntimeError):
    """A single writer could not rebuild its exact state; it must not act until it can."""


class RebuildUnavailable(RebuildError):
    """What a rebuild reads did not answer in time (the snapshot store, the stream's replay):
    a dropped connection or an overloaded server, not a state that cannot be rebuilt. The
    worker still must not act on what it has, but a later rebuild from nothing may work, so
    the rebuild is tried again (a bounded number of times) rather than the worker stopped."""


def transient(e: BaseException) -> bool:
    """A failure of the connection or of a server's answer, not of the data."""
    import nats.errors
    import nats.js.errors

    if isinstance(e, nats.js.errors.APIError) and (getattr(e, "code", 0) or 0) >= 500:
        return True  # the server's own trouble (a leader election, placement): try again
    return isinstance(
        e,
        TimeoutError
        | ConnectionError
        | nats.errors.ConnectionClosedError
        | nats.errors.ConnectionReconnectingError
        | nats.errors.NoRespondersError
        | nats.errors.StaleConnectionError
        | nats.js.errors.ServiceUnavailableError,
    )


SNAPSHOT_PUT_BYTES_PER_S = 16 * 1024 * 1024
"""How fast a snapshot is written (:meth:`SnapshotStore.save`). At full speed a 25-55 MB
snapshot of execution's books went into the region's nats-server within about a second,
beside the orders, and the order path's p99 in that second rose from ~25 ms to 85-180 ms
(a steady state of 1,000 orders/s on the bench mesh)."""


class _PacedReader(io.RawIOBase):
    """``body`` as a reader no faster than ``bytes_per_s``. nats-py's object store reads a
    reader in its executor thread, so the waits sleep there, not on the event loop."""

    def __init__(self, body: bytes, bytes_per_s: float) -> None:
        super().__init__()
        self._view = memoryview(body)
        self._pos = 0
        self._rate = bytes_per_s
        self._t0 = time.monotonic()

    def readable(self) -> bool:
        return True

    def hurry(self) -> None:
        """No more waiting: the rest goes as fast as the store takes it."""
        self._rate = float("inf")

    def readinto(self, b: Any) -> int:
        n = min(len(b), len(self._view) - self._pos)
        if n <= 0:
            return 0
        delay = self._t0 + self._pos / self._rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        b[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n


class SnapshotLag:
    """How long a single writer's state has been ahead of its last stored snapshot (the
    gauge ``meridian_snapshot_behind_seconds``): from that snapshot's capture when it was
    stored (a busy worker moves on while it is stored), or after a rebuild that replayed past
    it; otherwise from the first check that saw the state ahead."""

    def __init__(self) -> None:
        self.since: float | None = None
        """Monotonic time the state went ahead (None: covered)."""

    def seconds(self, ahead: bool) -> float:
        if not ahead:
            self.since = None
            return 0.0
        if self.since is None:
            self.since = time.monotonic()
        return time.monotonic() - self.since

    def stored(self, ahead: bool, captured: float) -> None:
        """A snapshot captured at monotonic time ``captured`` is stored; the state has moved
        past it since (or not)."""
        self.since = captured if ahead else None

    def rebuilt(self, ahead: bool, age_s: float) -> None:
        """After a rebuild: ahead (or not) of a snapshot captured ``age_s`` ago."""
        self.since = time.monotonic() - age_s if ahead else None


def snapshot_age_s(captured_ns: int) -> float:
    """Seconds since a snapshot was captured (UTC ns; 0: unknown, or none: 0)."""
    return max(0.0, (time.time_ns() - captured_ns) / 1e9) if captured_ns else 0.0


class SnapshotStore:
    """The latest snapshot of a single writer (risk, execution): one entry of a JetStream
    object store of its own domain, created on first use.

    :meth:`load` tells "no snapshot yet" (``None``) apart from "cannot read it"
    (:class:`RebuildError`): a worker that mistook the second for the first would replay from
    the stream's first message and, once old messages have aged out, act on a partial state.
    """

    def __init__(self, js: Any, bucket: str, key: str, *, timeout_s: float = 30.0) -> None:
        self.js, self.bucket, self.key, self.timeout_s = js, bucket, key, timeout_s
        self._reader: _PacedReader | None = None

    def hurry(self) -> None:
        """Let a paced put still running go at full speed (a stop or a rebuild waits for it:
        one cancelled half way leaves its chunks in the store)."""
        if self._reader is not None:
            self._reader.hurry()

    async def _store(self) -> Any:
        try:
            return await self.js.object_store(self.bucket)
        except NotFoundError:
            from nats.js.api import ObjectStoreConfig, StorageType

            return await self.js.create_object_store(
                self.bucket,
                config=ObjectStoreConfig(bucket=self.bucket, storage=StorageType.FILE),
            )

    async def load(self) -> bytes | None:
        from nats.js.errors import ObjectNotFoundError

        try:
            store = await asyncio.wait_for(self._store(), 10)
            res = await asyncio.wait_for(store.get(self.key), self.timeout_s)
        except ObjectNotFoundError:
            return None
        except Exception as e:
            cls = RebuildUnavailable if transient(e) else RebuildError
            raise cls(f"snapshot store {self.bucket} unreadable: {e!r}") from e
        return bytes(res.data or b"")

    async def load_for(self, region: str, seq_field: str, max_seq: int) -> dict[str, Any] | None:
        """The latest snapshot as a map, or None if there is none. Raises ValueError when it
        is unusable here: not msgpack, another region's, or past the stream's last sequence
        ``max_seq`` (``snap[seq_field]``): the caller then replays its whole stream, which
        is exact as long as the stream still starts at 1."""
        import msgpack

        data = await self.load()
        if data is None:
            return None
        snap = msgpack.unpackb(data, raw=False)
        if not isinstance(snap, dict):
            raise ValueError("not a snapshot map")
        seq = int(snap[seq_field])
        if snap.get("region") != region or seq > max_seq:
            raise ValueError(f"snapshot for {snap.get('region')} at {seq} (stream at {max_seq})")
        return snap

    async def save(self, body: bytes, *, bytes_per_s: float = SNAPSHOT_PUT_BYTES_PER_S) -> None:
        """Store ``body`` as the latest snapshot, written at ``bytes_per_s`` at most (0: at
        full speed); raises on failure (callers log and go on: a missed snapshot only means
        a longer replay)."""
        store = await asyncio.wait_for(self._store(), 10)
        data: Any = body
        timeout_s = self.timeout_s
        if bytes_per_s > 0:
            data = self._reader = _PacedReader(body, bytes_per_s)
            timeout_s += len(body) / bytes_per_s
        try:
            await asyncio.wait_for(store.put(self.key, data), timeout_s)
        finally:
            self._reader = None

    async def delete(self) -> None:
        store = await asyncio.wait_for(self._store(), 10)
        await asyncio.wait_for(store.delete(self.key), self.timeout_s)


async def take_batch(queue: asyncio.Queue[Any], limit: int = 1024) -> list[Any]:
    """A single writer's next batch: waits for one item, then takes what else is queued (up
    to ``limit``), without the :data:`WAKE` items (an empty batch: only woken)."""
    batch = [await queue.get()]
    while len(batch) < limit and not queue.empty():
        batch.append(queue.get_nowait())
    return [x for x in batch if x is not WAKE]


WAKE = object()
"""Queue item that only wakes a worker's batch loop (see :func:`wake_every`)."""


async def wake_every(queue: asyncio.Queue[Any], seconds: float) -> None:
    """Put :data:`WAKE` into a single writer's input queue every ``seconds``, so an idle
    worker still runs what it does between batches (a snapshot of its last inputs, before
    the stream's max_age could take them). The batch loop drops WAKE items."""
    while True:
        await asyncio.sleep(seconds)
        queue.put_nowait(WAKE)
