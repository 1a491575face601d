"""The execution worker of one region: single writer of every book the region executes.

Consumes the region's ``EXEC`` stream (durable ``exec``) in stream order and applies each
command to the symbol's :class:`~router.book.OrderBook` with the command's stream sequence and
stored timestamp, so matching is a pure function of the stream. Outputs go to ``EXECOUT``:
execution reports and cancel rejects on ``mrd.<region>.er.x.<home>.<account>`` (ExecType NEW
reports on ``er.n``: the risk worker need not read them), fills on
``mrd.<region>.fill.<symbol>``, each with ``Nats-Msg-Id`` = its deterministic id. Inputs are
acked only after every output of the batch has its PubAck.

Restart (including SIGKILL mid-batch): the books are restored from the latest snapshot
(object store ``EXECSNAP_<region>``) and every later ``EXEC`` command is replayed in stream
order; outputs of commands past the consumer's ack floor are published again, identical to
the first time, and dropped by the stream's dedup window (1 h). Deliveries at or below the
applied sequence are only acked, and a gap is filled from the stream before applying, so the
books never see a command out of order: no missing and no duplicate report or fill. Books
that cannot be rebuilt exactly (a snapshot that cannot be read, commands missing between it
and the stream, a replay that stalls) stop the worker (``RebuildError``): it fails closed.
A command whose application fails (a fault of this build, which may leave its book half changed)
is recorded as failed and its batch rebuilt; the replay refuses it, UNAVAILABLE, so the books
never keep half of it (:meth:`ExecutionWorker._fault`).

Also answers ``mrd.v1.book.<region>.<symbol>`` requests with the book's depth.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import msgpack
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry import trace

from ops.telemetry.tracing import NOOP_TRACER, inject, process_span
from regions.topology import Topology
from router import contract, subjects
from router.book import BOOK_RULES, ROLL_SCHEDULE, ExpireDay, OrderBook
from router.commands import decode_command, encode_command
from router.contract import (
    CancelReject,
    ExecType,
    ExecutionReport,
    Fill,
    RejectReason,
)
from router.natsutil import (
    H_KIND,
    H_MSG_ID,
    AsyncPublisher,
    PullLoop,
    RebuildError,
    RebuildUnavailable,
    SnapshotLag,
    SnapshotStore,
    cancel_and_wait,
    snapshot_age_s,
    stream_position,
    take_batch,
    transient,
    unstored,
    wake_every,
)
from router.session import last_roll_ns, next_roll_ns, rolls_after
from router.yielding import Turn, join_yielding

log = logging.getLogger("meridian.execution")

PUB_TIMEOUT_S = 10.0
ROLL_CHECK_S = 30.0
"""How often a worker checks that its books took the latest trading-day roll (and stores it
again for those that did not)."""
REPLAY_BATCH = 1024
"""Replayed commands taken from the queue at a time."""
RESEND_WAITS_S = (2.0, 4.0, 8.0)
"""How long a batch waits for its outputs' PubAcks before sending the missing ones again (same
msg ids: the stream's dedup drops what was stored), then the next wait; after the last, the
batch fails and the books are rebuilt."""
REBUILD_ATTEMPTS = 10
"""Rebuilds tried after a failed batch before the worker stops (about 40 s in all)."""


Refused = tuple[str, str, str, bytes, Any] | None
"""The answer to a refused command, as :meth:`ExecutionWorker._apply` gives outputs, or None
when it names no order to answer for."""


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


FAULT = "fault"
"""Third element of a refusal-bucket record that marks a command whose application failed."""


MAX_FAULTS = 20
FAULT_WINDOW_S = 3600.0
"""More than :data:`MAX_FAULTS` commands failing within this long (each costs a rebuild, seconds
at full memory, while every book of the region waits) is a systematic fault of the build,
not a command's: the worker stops (fails closed) rather than crawl. Counted by time, not
between snapshots: snapshots go on between faults, and a count they reset never got there."""


GAP_RETRY_S = (0.0, 0.05, 0.2, 0.5)
"""Waits before each read of a command missing from the deliveries (a replica behind)."""


class CommandFault(RuntimeError):
    """Applying a command raised (a fault of this build): its batch fails and is rebuilt."""


class CommandRefused(ValueError):
    """A command this region cannot apply, with nothing changed: no book for its symbol
    (``no_book``), it does not decode, or applying it failed before (``reason`` UNAVAILABLE)."""

    def __init__(self, why: str, no_book: bool, reason: RejectReason | None = None) -> None:
        super().__init__(why)
        self.no_book = no_book
        self.reason = reason


def unapplied_report(
    cmd: Cmd, region: str, why: str, *, no_book: bool, reason: RejectReason | None = None
) -> ExecutionReport | CancelReject | None:
    """The answer to a command this region could not apply, or None if it names no order.

    Risk approved it and the desk holds an OrderAck: skipping it in silence would leave the
    order with no report ever, and its exposure reserved in risk for good. A region that has
    no book for the symbol (risk routed it here from another topology) or a command that
    breaks :func:`router.commands.decode_command` (another build) is answered like a book's
    own refusal: a REJECTED report for a submit, a cancel reject for a cancel or replace.
    Its id is the command's stream sequence, so a replay sends the same report. ``reason``
    overrides the reason (UNAVAILABLE: applying it failed).
    """
    try:
        raw = msgpack.unpackb(cmd.data, raw=False)
    except Exception:
        return None
    if not isinstance(raw, dict):
        return None
    symbol = cmd.subject.rsplit(".", 1)[1]
    if reason is None:
        reason = RejectReason.UNKNOWN_SYMBOL if no_book else RejectReason.MALFORMED
    return contract.refusal_of(
        raw,
        op=str(raw.get("op")),
        reason=reason,
        text=f"not executed in {region}" if no_book else f"not applied: {why}",
        reply_id=f"{region}-{symbol}-{cmd.seq}-x",
        symbol=symbol,
        exec_region=region,
        transact_ns=cmd.ts_ns,
    )


def _report_out(region: str, r: ExecutionReport | CancelReject) -> tuple[str, str, str, bytes, Any]:
    """(subject, msg id, kind, bytes, output) of a report, as :meth:`ExecutionWorker._apply`
    gives them."""
    msg_id = r.exec_id if isinstance(r, ExecutionReport) else r.reject_id
    subject = subjects.report_exec(region, r.home_region, r.account)
    return (subject, msg_id, type(r).__name__, contract.encode(r), r)


@dataclass(frozen=True, slots=True)
class Cmd:
    """One EXEC command with its stream sequence and stored time (identical on replay)."""

    subject: str
    data: bytes
    seq: int
    ts_ns: int
    headers: dict[str, str] | None

    @classmethod
    def of(cls, msg: Msg) -> Cmd:
        pos = stream_position(msg)
        return cls(msg.subject, msg.data, pos.seq, pos.ts_ns, msg.headers)

    @classmethod
    def of_raw(cls, raw: Any) -> Cmd:
        hdrs = dict(raw.headers or {})
        return cls(
            raw.subject,
            raw.data or b"",
            int(raw.seq),
            _rfc3339_ns(hdrs.get("Nats-Time-Stamp", "")),
            hdrs,
        )


def _abandon(futs: list[asyncio.Future[Any]]) -> None:
    """No longer wait for these PubAcks (the work is failing and will be redone): cancelling
    gives their publisher slots back at once."""
    for f in futs:
        f.cancel()


def _rfc3339_ns(text: str) -> int:
    """'2026-11-27T14:55:01.960840123Z' -> int ns (the stored timestamp, exactly)."""
    if not text:
        return 0
    main, _, frac = text.rstrip("Z").partition(".")
    secs = int(datetime.datetime.fromisoformat(main).replace(tzinfo=datetime.UTC).timestamp())
    return secs * 1_000_000_000 + int((frac or "0").ljust(9, "0")[:9])


def _peek_order_id(data: bytes) -> str | None:
    try:
        v = msgpack.unpackb(data, raw=False).get("order_id")
        return v if isinstance(v, str) else None
    except Exception:
        return None


def snapshot_parts(
    region: str, applied: int, books: dict[str, OrderBook], saved_ns: int = 0
) -> Iterator[bytes]:
    """The execution snapshot ``{"v": 1, "applied", "region", "saved_ns", "books": {symbol:
    bin}}`` (``saved_ns``: when it was captured, UTC ns) as
    the pieces whose concatenation it is: each book's
    :meth:`~router.book.OrderBook.snapshot_groups` behind a bin header, spliced rather than
    packed. The pieces are captured (copied lists of immutable bytes) before this returns,
    so the books may change then: the concatenation (:func:`join_yielding`) runs beside the
    next commands. At full memory (four books) capturing takes a few ms of the batch loop;
    listing every piece in one list and summing the books' lengths took ~50."""
    p = msgpack.Packer(use_bin_type=True)
    head = [p.pack_map_header(5)]
    for k, v in (("v", 1), ("applied", applied), ("region", region), ("saved_ns", saved_ns)):
        head += (p.pack(k), p.pack(v))
    head += (p.pack("books"), p.pack_map_header(len(books)))
    groups = [head]
    for sym, book in books.items():
        book_groups, n = book.snapshot_groups()
        groups.append([p.pack(sym), _bin_header(n)])
        groups += book_groups
    return itertools.chain.from_iterable(groups)


def snapshot_body(
    region: str, applied: int, books: dict[str, OrderBook], saved_ns: int = 0
) -> bytes:
    """:func:`snapshot_parts` joined: the bytes a restore reads."""
    return b"".join(snapshot_parts(region, applied, books, saved_ns))


def _bin_header(n: int) -> bytes:
    """The msgpack header of a bin of ``n`` bytes (what ``packb(bytes)`` writes first)."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def book_subject(region: str, symbol: str) -> str:
    return f"mrd.v1.book.{region}.{symbol}"


class ExecutionWorker:
    def __init__(
        self,
        nc: NATS,
        topology: Topology,
        region: str,
        *,
        metrics: Any = None,
        tracer: Any = None,
        snapshot_every: int = 50_000,
        snapshot_every_s: float = 300.0,
        day_roll: bool = False,
    ) -> None:
        self.day_roll = day_roll
        """Store each trading day's roll in EXEC for this region's books (:meth:`roll`); the
        process entry point turns it on, tests that count commands leave it off."""
        self._rebuilding = False
        """A rebuild is running (its books are fresh, not behind on the day's roll)."""
        self.snapshot_every = snapshot_every
        """Snapshot the books after this many commands (0: never) ..."""
        self.snapshot_every_s = snapshot_every_s
        """... or this long after the last one, if the books moved past the last one stored."""
        self._snap_seq = 0
        self._snap_at = 0.0
        self._saved_seq = 0
        """Position of the last snapshot stored (or restored)."""
        self._restored_saved_ns = 0
        """When the restored snapshot was captured (UTC ns; 0: unknown, or none)."""
        self._lag = SnapshotLag()
        self._saving: asyncio.Task[None] | None = None
        self._sent: list[tuple[str, bytes, dict[str, str]]] = []
        """This batch's outputs as sent, in the order of their PubAck futures."""
        self.restored_from = 0
        """EXEC sequence of the snapshot the books were restored from at start (0: none)."""
        self._rules_upgrade = False
        """The books were restored from a snapshot of older rules: one is taken after the
        rebuild (router.book.BOOK_RULES)."""
        self._snapshots_stored = 0
        """Snapshots this worker stored (the rules upgrade waits for one)."""
        self._rules_boundary = -1
        """The last command a predecessor may have applied by older book rules: every one
        stored at this worker's first rebuild (set once; -1: not yet)."""
        self.nc = nc
        self.topology = topology
        self.region = region
        self.metrics = metrics
        self._depth_metrics = True
        """The book depth gauges work (off after a failure: :meth:`_update_depth`)."""
        self.tracer = tracer if tracer is not None else NOOP_TRACER
        self._traced = not isinstance(self.tracer, trace.NoOpTracer)
        self.js = nc.jetstream(domain=region)
        self.snapshots = SnapshotStore(self.js, self.snapshot_bucket, "books")
        self._refused: dict[int, tuple[str, Refused]] = {}
        """Commands refused (by EXEC sequence: the digest of their bytes, their answer or
        None) past the books' snapshot: a replay sends the answer again instead of applying
        them."""
        self._faulted: dict[int, str] = {}
        """Commands whose application failed (by EXEC sequence: the digest of their bytes),
        past the books' snapshot: a replay refuses them (:meth:`_fault`)."""
        self._refused_store: Any = None
        self.fatal: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        """Resolved when the worker stopped applying commands for good (the process exits)."""
        # a PubAck lost with a dropped connection fails its future at the deadline and gives
        # its slot back: without one, every batch or replay abandoned mid-way held its slots
        # for good, and once all 20,000 were held the worker waited for a slot forever
        self.pub = AsyncPublisher(nc, max_pending=20000, ack_timeout_s=PUB_TIMEOUT_S)
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.books: dict[str, OrderBook] = {}
        self.loop: PullLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._book_sub: Any = None
        self.stats = {
            "commands": 0,
            "reports": 0,
            "fills": 0,
            "bad": 0,
            "replayed": 0,
            "gap_filled": 0,
        }
        self.applied = 0
        """Highest EXEC stream sequence applied to the books."""
        self._faults: deque[float] = deque()
        """When commands failed to apply, within the last :data:`FAULT_WINDOW_S`."""
        self._out_through = -1
        """Highest EXEC sequence whose outputs may have gone out: every command stored when
        this worker first rebuilt (a predecessor, handed them or rebuilding, may have sent
        their outputs), then what this worker published. A command at or below it that now
        fails cannot be refused (:meth:`_fault`): at start, a stored command this build fails
        on stops the rebuild, as below the ack floor. -1: not read yet."""

    def _fresh_books(self) -> None:
        self.books = {
            s: OrderBook(self.topology.instrument(s), self.region)
            for s in self.topology.region(self.region).executes
        }
        for book in self.books.values():
            # which build applied the stream's commands is known only from a snapshot: with
            # none, those a predecessor may have applied replay by the older rules too
            book.rules = 1

    async def start(self) -> None:
        await self.pub.start()
        self.loop = PullLoop(
            self.nc,
            domain=self.region,
            stream="EXEC",
            durable=subjects.durable_exec(self.region),
            filter_subject=f"mrd.{self.region}.exe.>",
            queue=self.queue,
            batch=512,
            tag="exec",
            ack_all=True,
        )
        await self.loop.ensure_consumer()
        await self._rebuild_through_faults()
        await self.loop.start()
        self._book_sub = await self.nc.subscribe(
            f"mrd.v1.book.{self.region}.*", cb=self._on_book_request
        )
        self._tasks.append(asyncio.create_task(self._run()))
        self._tasks.append(
            asyncio.create_task(wake_every(self.queue, max(1.0, self.snapshot_every_s / 4)))
        )
        if self.day_roll:
            self._tasks.append(asyncio.create_task(self._roll_daily()))

    # ---- the trading day's roll ------------------------------------------------------------
    async def roll(self, cutoff_ns: int, symbols: list[str] | None = None) -> int:
        """Store the roll at ``cutoff_ns`` in EXEC with the schedule of the next ones, one
        ExpireDay command per book (``symbols``: these books only), applied like any command
        (:mod:`router.session`, :class:`router.book.ExpireDay`). A book ignores a roll it
        has passed, so storing one again (a restart, another attempt) changes nothing: each
        attempt has a message id of its own, so the stream's dedup never drops a needed one.
        One attempt per book; returns how many were stored (:meth:`_roll_daily` tries the
        rest again)."""
        schedule = rolls_after(self.topology.session, cutoff_ns, ROLL_SCHEDULE)
        data = encode_command(ExpireDay(cutoff_ns=cutoff_ns, schedule=schedule))
        stored = 0
        for sym in symbols if symbols is not None else list(self.books):
            try:
                await self.js.publish(
                    subjects.exec_in(self.region, sym),
                    data,
                    timeout=PUB_TIMEOUT_S,
                    headers={H_MSG_ID: f"roll:{sym}:{cutoff_ns}:{time.time_ns():x}"},
                )
                stored += 1
            except Exception as e:  # the server or the stream away: tried again
                log.warning("exec %s: roll of %s not stored: %r", self.region, sym, e)
        return stored

    def day_roll_behind_s(self, now_ns: int) -> float:
        """Seconds since the latest roll that a book of this region has not applied (0: all
        have): ``MeridianDayRollLate``."""
        last = last_roll_ns(self.topology.session, now_ns)
        if all(b.day_cutoff_ns >= last for b in self.books.values()):
            return 0.0
        return (now_ns - last) / 1e9

    async def _roll_daily(self) -> None:
        """Keep every book at the latest roll: at start (one missed while the region was
        down, or a new book), at each roll as it comes, and again while a book has not
        applied it (a roll not stored, or refused), checked every :data:`ROLL_CHECK_S`."""
        session = self.topology.session
        tried: dict[int, float] = {}  # roll -> when last stored (monotonic)
        while True:
            try:
                now = time.time_ns()
                last = last_roll_ns(session, now)
                if not self._rebuilding:  # (fresh books while it runs: not behind)
                    behind = [s for s, b in self.books.items() if b.day_cutoff_ns < last]
                    if self.metrics is not None:
                        self.metrics.day_roll_behind().set(self.day_roll_behind_s(now))
                    due = time.monotonic() - tried.get(last, float("-inf")) >= ROLL_CHECK_S
                    if behind and due:
                        tried = {last: time.monotonic()}
                        n = await self.roll(last, behind)
                        log.info(
                            "exec %s: trading day roll at %s stored for %d of %d books",
                            self.region,
                            datetime.datetime.fromtimestamp(last // 10**9, datetime.UTC),
                            n,
                            len(behind),
                        )
                left = (next_roll_ns(session, time.time_ns()) - time.time_ns()) / 1e9
                await asyncio.sleep(min(ROLL_CHECK_S, max(0.0, left)))
            except asyncio.CancelledError:
                raise
            except Exception:  # it must go on: a roll not stored is tried again
                log.exception("exec %s: trading day roll check failed", self.region)
                await asyncio.sleep(ROLL_CHECK_S)

    async def stop(self) -> None:
        if self.loop is not None:
            await self.loop.stop()
        await cancel_and_wait(self._tasks)
        await self._saved()

    async def _saved(self, timeout_s: float = 10.0) -> None:
        """Wait for the snapshot being stored, if any (bounded; a put cancelled half way
        leaves its chunks behind, and a stop without it means a longer replay next time)."""
        if self._saving is not None and not self._saving.done():
            self.snapshots.hurry()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._saving), timeout_s)
            if not self._saving.done():
                await cancel_and_wait([self._saving])

    async def rebuild(self) -> None:
        """Books = every stored EXEC command replayed in stream order.

        Commands up to the consumer's ack floor only rebuild state (their outputs are stored).
        Commands past it were delivered to a predecessor that may have died mid-batch: their
        outputs are published again (identical ids, so the dedup window drops what was already
        stored). Later deliveries at or below :attr:`applied` are just acked, and a delivery
        past ``applied + 1`` first fills the gap from the stream (:meth:`_process`), so the
        books never see a command out of stream order, whatever the durable redelivers when.
        """
        self._rebuilding = True
        try:
            await self._rebuild()
        finally:
            self._rebuilding = False
        if self._rules_upgrade:
            # stored before any new command is applied: a restart must not find the older
            # rules' snapshot again and replay this build's own commands by them
            for attempt in range(1, 4):
                stored = self._snapshots_stored
                await self._maybe_snapshot(force=True)
                await self._saved(timeout_s=60.0)
                if self._snapshots_stored > stored:
                    self._rules_upgrade = False
                    break
                log.error(
                    "exec %s: snapshot of this build's book rules not stored (%d/3)",
                    self.region,
                    attempt,
                )
            else:
                # fail closed: applying new commands now would let a restart replay them by
                # the older rules, deciding differently from what was published
                raise RebuildError(
                    f"exec {self.region}: no snapshot of this build's book rules could be "
                    "stored; not applying new commands"
                )

    async def _rebuild(self) -> None:
        # a put still storing the last snapshot would purge the chunks of the one being read
        await self._saved(timeout_s=60.0)
        self._fresh_books()
        self.applied = 0
        self._sent = []
        assert self.loop is not None
        info = await self.loop.consumer_info()
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        sinfo = await self.js.stream_info("EXEC")
        last = sinfo.state.last_seq
        if self._out_through < 0:
            # a predecessor may have sent the outputs of all it was handed, and its own
            # rebuild those of every command stored by then
            # (a consumer is never handed past the stream's last message)
            self._out_through = last or 0
        await self._restore_snapshot(max_seq=last)
        # a snapshot of older book rules: the commands a predecessor may have applied (every
        # one stored when this worker first rebuilt) are replayed by those rules, so the
        # replay gives what it published; a snapshot follows at once, so no later start
        # replays this build's own commands by them (router.book.BOOK_RULES)
        if self._rules_boundary < 0:  # once: what the predecessor may have applied
            self._rules_boundary = self._out_through
        for book in self.books.values():
            book.legacy_through = self._rules_boundary if book.rules < BOOK_RULES else 0
        self._rules_upgrade = any(b.rules < BOOK_RULES for b in self.books.values())
        await self._load_refused(after=self.applied)
        self._snap_seq = self._saved_seq = self.applied
        # the next snapshot is due by the restored one's age (a long stop: at once)
        age_s = snapshot_age_s(self._restored_saved_ns)
        self._snap_at = time.monotonic() - age_s
        self._lag.rebuilt(bool(last) and self.applied < last, age_s)
        if not last or self.applied >= last:
            return
        if self.applied + 1 < sinfo.state.first_seq:
            raise RebuildError(
                f"EXEC {self.applied + 1}..{sinfo.state.first_seq - 1} are gone (the stream "
                f"starts at {sinfo.state.first_seq}) and no snapshot covers them"
            )
        # deliveries go to a queue from the subscription's callback and are applied in
        # batches: 113,000 deliveries/s here, against 36,000 with a next_msg() per message,
        # which made a replay of 80,000 commands take 6.4 s (ordered, so in stream order)
        # bounded: a full queue holds the subscription's callback, so nats-py's own pending
        # limits and the consumer's flow control bound what waits in memory (a replay with
        # no usable snapshot reads the whole stream)
        replay: asyncio.Queue[Msg] = asyncio.Queue(maxsize=4 * REPLAY_BATCH)

        async def deliver(m: Msg) -> None:
            await replay.put(m)

        sub = await self.js.subscribe(
            f"mrd.{self.region}.exe.>",
            ordered_consumer=True,
            cb=deliver,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.applied + 1
            ),
        )
        n = 0
        futs: list[asyncio.Future[Any]] = []
        try:
            end = False
            while not end:
                try:
                    m = await asyncio.wait_for(replay.get(), 5)
                except TimeoutError:
                    raise RebuildUnavailable(
                        f"replay stalled after {n} commands (at {self.applied}, last {last})"
                    ) from None
                batch = [m]
                while len(batch) < REPLAY_BATCH and not replay.empty():
                    batch.append(replay.get_nowait())
                turn = Turn()
                for m in batch:
                    await turn.check()  # the connection's pings and PubAcks are read
                    pos = stream_position(m)
                    cmd = Cmd(m.subject, m.data, pos.seq, pos.ts_ns, m.headers)
                    # outputs sent again, minutes old maybe: never in the live metrics
                    futs += await self._handle(
                        cmd, publish=cmd.seq > floor, trace=False, live=False
                    )
                    n += 1
                    if cmd.seq >= last or pos.pending == 0:
                        end = True
                        break
        except BaseException:
            _abandon(futs)
            raise
        finally:
            await sub.unsubscribe()
        if futs:
            await asyncio.wait_for(asyncio.gather(*futs), PUB_TIMEOUT_S)
        self._sent = []
        self.stats["replayed"] = n
        log.info(
            "exec %s rebuilt %d books from %d commands (ack floor %d, last %d); "
            "re-published %d outputs past the floor",
            self.region,
            len(self.books),
            n,
            floor,
            last,
            len(futs),
        )

    def _answer(self, cmd: Cmd, e: CommandRefused) -> ExecutionReport | CancelReject | None:
        """The answer to a refused command, if it names an order this region can answer
        for: a submit reusing the id of an order the book knows gets none (that order is
        not refused)."""
        rej = unapplied_report(cmd, self.region, str(e), no_book=e.no_book, reason=e.reason)
        book = self.books.get(cmd.subject.rsplit(".", 1)[1])
        if rej is None or book is None:
            return rej
        status = book.status(rej.order_id)
        if status is None:
            return rej
        if isinstance(rej, ExecutionReport):
            return None
        return dataclasses.replace(rej, ord_status=status)

    async def _refused_kv(self) -> Any:
        """The region's refusal bucket. Not created here: it belongs to the region's streams
        (:func:`ops.streams.ensure_region_streams`, with their replicas), and a worker that
        made its own, unreplicated one would lose the records with one node."""
        if self._refused_store is None:
            bucket = subjects.refused_bucket(self.region)
            try:
                self._refused_store = await self.js.key_value(bucket)
            except NotFoundError:
                raise RebuildError(
                    f"KV bucket {bucket} is missing: create the region's streams first "
                    "(ops.streams.ensure_region_streams, run by `meridian up`)"
                ) from None
            except Exception as e:
                cls = RebuildUnavailable if transient(e) else RebuildError
                raise cls(f"KV bucket {bucket} unreadable: {e!r}") from e
        return self._refused_store

    async def _record_refused(self, cmd: Cmd, out: Refused) -> None:
        """Store the refusal of ``cmd`` (and its answer, if any) before the answer is sent: a
        rebuild then never applies that command (a later build or topology might), and sends
        the answer again if it was not stored. Until this put succeeds the batch fails, and
        is retried. The record names the command by a digest of its bytes: a record is only
        ever used for the command it was made for."""
        answer = list(out[:4]) if out is not None else None
        kv = await self._refused_kv()
        await kv.put(
            str(cmd.seq),
            msgpack.packb([_digest(cmd.data), answer], use_bin_type=True),
        )
        self._refused[cmd.seq] = (_digest(cmd.data), out)

    async def _record_fault(self, cmd: Cmd) -> None:
        """Store that applying ``cmd`` failed, before its batch fails: the rebuild then
        refuses it instead of applying it again. A build that does not know the record's
        shape stops its rebuild on it (fails closed)."""
        kv = await self._refused_kv()
        digest = _digest(cmd.data)
        await kv.put(str(cmd.seq), msgpack.packb([digest, None, FAULT], use_bin_type=True))
        self._faulted[cmd.seq] = digest

    async def _load_refused(self, after: int) -> None:
        """The refused commands past ``after`` (what a rebuild replays), with their answers,
        and the commands whose application failed."""
        from nats.js.errors import NoKeysError

        self._refused = {}
        self._faulted = {}
        kv = await self._refused_kv()
        try:
            keys = await kv.keys()
        except NoKeysError:
            return
        for key in keys:
            if not key.isdigit() or int(key) <= after:
                continue
            entry = await kv.get(key)
            rec = msgpack.unpackb(entry.value, raw=False)
            if isinstance(rec, list) and len(rec) == 4:  # the first format: the answer only
                digest, answer = "", rec
            elif isinstance(rec, list) and len(rec) == 2:
                digest, answer = rec
            elif isinstance(rec, list) and len(rec) == 3 and rec[2] == FAULT:
                self._faulted[int(key)] = str(rec[0])
                continue
            else:
                raise RebuildError(f"refusal record {key} unreadable: {rec!r:.80}")
            out = (*answer, None) if answer is not None else None
            self._refused[int(key)] = (digest, out)

    def _apply(self, cmd: Cmd, *, encode: bool = True) -> list[tuple[str, str, str, bytes, Any]]:
        """Apply ``cmd`` to its book; its outputs as (subject, msg id, kind, bytes, output),
        or none when not ``encode`` (a replayed command whose outputs are stored)."""
        symbol = cmd.subject.rsplit(".", 1)[1]
        book = self.books.get(symbol)
        if book is None:
            raise CommandRefused(f"symbol {symbol!r} is not executed in {self.region}", True)
        try:
            command = decode_command(cmd.data)
        except ValueError as e:
            raise CommandRefused(str(e), False) from e
        outs = book.apply(command, seq=cmd.seq, ts_ns=cmd.ts_ns)
        res: list[tuple[str, str, str, bytes, Any]] = []
        if not encode:
            return res
        for o in outs:
            if isinstance(o, ExecutionReport):
                to = (
                    subjects.report_exec_new
                    if o.exec_type is ExecType.NEW
                    else subjects.report_exec
                )
                res.append(
                    (
                        to(self.region, o.home_region, o.account),
                        o.exec_id,
                        "ExecutionReport",
                        contract.encode(o),
                        o,
                    )
                )
            elif isinstance(o, CancelReject):
                res.append(
                    (
                        subjects.report_exec(self.region, o.home_region, o.account),
                        o.reject_id,
                        "CancelReject",
                        contract.encode(o),
                        o,
                    )
                )
            elif isinstance(o, Fill):
                res.append(
                    (
                        subjects.fill(self.region, o.symbol),
                        o.trade_id,
                        "Fill",
                        contract.encode(o),
                        o,
                    )
                )
        return res

    async def _handle(
        self, cmd: Cmd, *, publish: bool, trace: bool = True, live: bool = True
    ) -> list[asyncio.Future[Any]]:
        """Apply one command (in stream order); publish its outputs; returns their PubAcks.
        ``live``: a command delivered now, not replayed by a rebuild (only live outputs are
        counted in the fills and order-to-execution metrics)."""
        self.applied = max(self.applied, cmd.seq)
        if not (trace and self._traced):
            # tracing off: no order-id peek (a full decode) and no span context managers,
            # ~8 % of this worker's CPU at saturation (py-spy)
            return await self._apply_and_send(cmd, publish, None, live)
        order_id = _peek_order_id(cmd.data)
        with process_span(
            self.tracer,
            "EXEC",
            cmd.headers,
            subject=cmd.subject,
            order_id=order_id,
            consumer=self.loop.durable if self.loop else "",
        ) as span:
            futs = await self._apply_and_send(cmd, publish, inject({}), live)
            span.set_attribute("meridian.outputs", len(futs))
            return futs

    async def _apply_and_send(
        self, cmd: Cmd, publish: bool, trace_headers: dict[str, str] | None, live: bool = True
    ) -> list[asyncio.Future[Any]]:
        """Apply ``cmd`` and publish its outputs. ``trace_headers`` (the command's span
        context) go on every output, so the consumers' spans are children of the command's:
        one span per command instead of one more per output (with a send span per output,
        execution took 474 us of CPU per order at 1,000/s traced, without them 350; the
        few microseconds of a buffered publish said nothing)."""
        futs: list[asyncio.Future[Any]] = []
        record = self._refused.get(cmd.seq)
        if record is not None and record[0] in ("", _digest(cmd.data)):
            # refused before a restart: never applied (a build or topology that could, must
            # not), its answer sent again
            outs = [record[1]] if publish and record[1] is not None else []
        else:
            # applying it failed before (recorded, then its batch rebuilt): refused now, and
            # answered even below the ack floor (its order never had an answer)
            faulted = cmd.seq in self._faulted and self._faulted[cmd.seq] == _digest(cmd.data)
            publish = publish or faulted
            try:
                if faulted:
                    raise CommandRefused(
                        "applying it failed in execution; not applied",
                        False,
                        RejectReason.UNAVAILABLE,
                    )
                outs = self._apply(cmd, encode=publish)
                self.stats["commands"] += 1
            except CommandRefused as e:  # nothing changed; a bad command never blocks
                if not publish:
                    # below the ack floor with no refusal record: the process that acked it
                    # applied it (records are stored before acks), so another build or
                    # topology took it. Skipping it would rebuild books without that order
                    # while its counterparties' fills stand: they could be filled again.
                    raise RebuildError(
                        f"command {cmd.seq} on {cmd.subject}, applied by the worker that acked "
                        f"it, cannot be applied by this one ({e}): run the build and topology "
                        "that took it until its ack floor passes the change, or reconcile"
                    ) from e
                self.stats["bad"] += 1
                rej = self._answer(cmd, e)
                log.error(
                    "exec %s: command %d on %s refused: %s; %s",
                    self.region,
                    cmd.seq,
                    cmd.subject,
                    e,
                    f"answered with {type(rej).__name__}" if rej else "no order to answer",
                )
                out = _report_out(self.region, rej) if rej is not None else None
                await self._record_refused(cmd, out)  # decided now: recorded, then answered
                self._faulted.pop(cmd.seq, None)
                outs = [out] if out is not None else []
            except Exception as e:  # a fault of this build, not of the command
                self.stats["bad"] += 1
                await self._fault(cmd, e, publish)
        if not publish:
            return futs
        if outs:
            self._out_through = max(self._out_through, cmd.seq)
        for subject, msg_id, kind, payload, out in outs:
            headers = {H_MSG_ID: msg_id, H_KIND: kind}
            if trace_headers:
                headers.update(trace_headers)
            futs.append(await self._send(subject, payload, headers))
            self._observe(out, live)
        return futs

    async def _fault(self, cmd: Cmd, e: Exception, publish: bool) -> NoReturn:
        """Applying ``cmd`` raised: a fault of this build, and its book may be half changed
        (an order matched, its fills lost with the exception). The fault is recorded
        (:meth:`_record_fault`) and the batch fails: the rebuild that follows discards the
        books, replays the stream, and refuses the command (UNAVAILABLE), so its order gets
        a typed answer and its book is as if it never came. The region trades on after the
        rebuild's pause; ``meridian_execution_faults_total`` pages.

        A command whose outputs may have gone out (below the ack floor, or handed to a
        predecessor, or published by this worker: :attr:`_out_through`) was applied before,
        and this build fails on it: the rebuild stops (:class:`RebuildError`) rather than
        refuse an order whose reports and fills went out. More than :data:`MAX_FAULTS`
        within :data:`FAULT_WINDOW_S` stop it too."""
        symbol = cmd.subject.rsplit(".", 1)[1]
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.execution_faults(symbol).inc()
        now = time.monotonic()
        self._faults.append(now)
        while self._faults[0] < now - FAULT_WINDOW_S:
            self._faults.popleft()
        if len(self._faults) > MAX_FAULTS:
            raise RebuildError(
                f"{len(self._faults)} commands failed within {FAULT_WINDOW_S:.0f} s, the last "
                f"{cmd.seq} on {cmd.subject} ({e!r}): a systematic fault of this build"
            ) from e
        if not publish or cmd.seq <= self._out_through:
            raise RebuildError(
                f"command {cmd.seq} on {cmd.subject}, whose outputs may have gone out (applied "
                f"before, by this worker or one before it), fails in this build ({e!r}): run "
                "a build that applies it, or reconcile"
            ) from e
        log.critical(
            "exec %s: applying command %d on %s failed (a fault of this build); it is recorded, "
            "the books are rebuilt without it and it is answered UNAVAILABLE",
            self.region,
            cmd.seq,
            cmd.subject,
            exc_info=True,
        )
        await self._record_fault(cmd)
        raise CommandFault(f"command {cmd.seq} on {cmd.subject} failed: {e!r}") from e

    async def _send(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[Any]:
        self._sent.append((subject, payload, headers))
        return await self.pub.publish(subject, payload, headers=headers)

    async def _all_stored(self, futs: list[asyncio.Future[Any]]) -> None:
        """Until every output of the batch is stored. What was not (a PubAck lost with a
        dropped connection, measured here under overload) is sent again with its msg id
        instead of rebuilding the books, which takes seconds at full memory: the books
        already hold the batch, and its outputs are the same bytes. Raises after the last
        of :data:`RESEND_WAITS_S` (the caller then rebuilds)."""
        sent = list(self._sent)
        assert len(sent) == len(futs), (len(sent), len(futs))
        for attempt, wait_s in enumerate(RESEND_WAITS_S, start=1):
            missing = await unstored(futs, wait_s)
            if not missing:
                return
            if attempt == len(RESEND_WAITS_S):
                break
            log.warning(
                "exec %s: %d of %d outputs not stored after %.0f s; sending them again",
                self.region,
                len(missing),
                len(futs),
                wait_s,
            )
            sent = [sent[i] for i in missing]
            futs = [await self.pub.publish(sub, data, headers=h) for sub, data, h in sent]
        raise TimeoutError(f"{len(missing)} outputs not stored after {len(RESEND_WAITS_S)} tries")

    async def _rebuild_with_retries(self) -> None:
        """Rebuild after a failed batch, again after a failure that is not the state's (a
        dropped connection, a request that timed out: measured here when an overloaded
        machine kept the worker from answering the server's pings), with a growing pause.
        A rebuild starts from nothing each time, so a retry is exact. A state that cannot be
        rebuilt (:class:`RebuildError`), or no success in :data:`REBUILD_ATTEMPTS`, stops the
        worker."""
        delay = 0.5
        for attempt in range(1, REBUILD_ATTEMPTS + 1):
            await asyncio.sleep(delay)
            try:
                await self._rebuild_through_faults()
                return
            except RebuildUnavailable:  # the store or the replay did not answer: try again
                log.exception(
                    "exec %s: rebuild %d/%d could not read its state", self.region, attempt,
                    REBUILD_ATTEMPTS,
                )  # fmt: skip
                delay = min(delay * 2, 5.0)
            except RebuildError:
                raise
            except Exception:
                log.exception(
                    "exec %s: rebuild %d/%d failed", self.region, attempt, REBUILD_ATTEMPTS
                )
                delay = min(delay * 2, 5.0)
        raise RuntimeError(f"books not rebuilt in {REBUILD_ATTEMPTS} attempts")

    async def _rebuild_through_faults(self) -> None:
        """:meth:`rebuild`, again after each command its replay found failing: each one is
        recorded by then, so the next replay refuses it (progress, not a retry; bounded by
        :data:`MAX_FAULTS`)."""
        while True:
            try:
                await self.rebuild()
                return
            except CommandFault as e:
                log.warning("exec %s: %s; rebuilding without it", self.region, e)

    async def _fetch(self, seq: int) -> Cmd:
        """Command ``seq``, read back to fill a gap in the deliveries. A direct get may be
        answered by a replica behind the stream's leader (ADR-31), so a miss is asked again;
        one still missing fails the batch, and the rebuild decides (it fails closed on
        commands the stream no longer holds). Skipping it would ack it unapplied (AckPolicy
        ALL): its order never answered, and a later replay's book unlike the published one."""
        for delay_s in GAP_RETRY_S:
            await asyncio.sleep(delay_s)
            try:
                return Cmd.of_raw(await self.js.get_msg("EXEC", seq, direct=True))
            except NotFoundError:
                continue
        raise RuntimeError(f"EXEC {seq} missing from a gap in the deliveries: not applied")

    async def _run(self) -> None:
        try:
            while True:
                batch = await take_batch(self.queue)
                if not batch:
                    await self._maybe_snapshot()  # idle: snapshot the last commands
                    continue
                try:
                    await self._process(batch)
                except Exception:
                    # unacked: the durable redelivers the batch, applied ones are only acked
                    log.exception("exec %s: batch failed; rebuilding books", self.region)
                    await self._rebuild_with_retries()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # fail closed, and loudly: the process stops applying
            log.critical("exec %s: stopped applying commands: %r", self.region, e)
            if not self.fatal.done():
                self.fatal.set_result(e)

    async def _process(self, batch: list[Msg]) -> None:
        futs: list[asyncio.Future[Any]] = []
        self._sent = []
        try:
            await self._apply_batch(batch, futs)
        except BaseException:
            _abandon(futs)  # the rebuild sends them again
            raise
        self._sent = []
        # AckPolicy.ALL: acking the batch's last message acks everything before it, including
        # redeliveries and bad commands (skipped, never retried): one ack per batch
        await batch[-1].ack()
        if self.metrics is not None:
            with contextlib.suppress(Exception):  # metrics never fail a batch
                pos = stream_position(batch[-1])  # parsed already (Cmd.of)
                self.metrics.consumer_pending(pos.stream, pos.consumer).set(pos.pending)
        self._update_depth()
        await self._maybe_snapshot()

    async def _apply_batch(self, batch: list[Msg], futs: list[asyncio.Future[Any]]) -> None:
        """Apply ``batch``, its outputs' PubAck futures added to ``futs``, until all stored."""
        turn = Turn()  # the books have one writer, this task: a yield changes nothing they see
        for m in batch:
            await turn.check()
            cmd = Cmd.of(m)
            if cmd.seq <= self.applied:
                continue  # a redelivery of something applied (replay or gap fill)
            for missing in range(self.applied + 1, cmd.seq):
                # delivered out of order (redelivery after a crash): take it from the stream
                got = await self._fetch(missing)
                self.stats["gap_filled"] += 1
                futs += await self._handle(got, publish=True)
                self.applied = max(self.applied, missing)
            futs += await self._handle(cmd, publish=True)
        if futs:
            await self._all_stored(futs)

    # ---- snapshots -----------------------------------------------------------------------
    @property
    def snapshot_bucket(self) -> str:
        return f"EXECSNAP_{self.region}"

    def snapshot_behind_s(self) -> float:
        """Seconds the books have been ahead of the last stored snapshot (0: covered)."""
        return self._lag.seconds(self.applied > self._saved_seq)

    async def _maybe_snapshot(self, *, force: bool = False) -> None:
        behind = self.snapshot_behind_s()
        if self.metrics is not None:
            self.metrics.snapshot_behind().set(behind)
        due_n = self.snapshot_every and self.applied - self._snap_seq >= self.snapshot_every
        due_t = (  # past the last one stored: a failed put is tried again, idle or not
            self.applied > self._saved_seq
            and time.monotonic() - self._snap_at >= self.snapshot_every_s
        )
        if (force or due_n or due_t) and (self._saving is None or self._saving.done()):
            # The books are captured here, between batches, as immutable pieces (references
            # to kept encodings); joining them (55 MB at full memory) and the put, in
            # object-store chunks, go on beside the next commands instead of holding them.
            # While a put runs, a due snapshot is left for a later batch or wake-up.
            seq, parts = self._snapshot_body()
            self._saving = asyncio.create_task(self._save(seq, parts, self._snap_at))

    def _snapshot_body(self) -> tuple[int, Iterator[bytes]]:
        """Every book at :attr:`applied`, as immutable pieces (:func:`snapshot_parts`): call
        only between batches, when every output up to it is stored."""
        seq = self.applied
        parts = snapshot_parts(self.region, seq, self.books, time.time_ns())
        self._snap_seq, self._snap_at = seq, time.monotonic()
        if self._refused:  # a rebuild reads those past its snapshot from the bucket again
            self._refused = {k: v for k, v in self._refused.items() if k > seq}
        if self._faulted:
            self._faulted = {k: v for k, v in self._faulted.items() if k > seq}
        return seq, parts

    async def _save(self, seq: int, parts: Iterator[bytes], captured: float) -> None:
        try:
            body = await join_yielding(parts)
            await self.snapshots.save(body)
            self._saved_seq = max(self._saved_seq, seq)
            self._snapshots_stored += 1
            self._lag.stored(self.applied > self._saved_seq, captured)
            if self.metrics is not None:
                self.metrics.snapshot_behind().set(self.snapshot_behind_s())
            log.info("exec %s: snapshot at seq %d (%d bytes)", self.region, seq, len(body))
        except Exception as e:
            log.warning("exec %s: snapshot at seq %d failed: %s", self.region, seq, e)

    async def _restore_snapshot(self, *, max_seq: int) -> None:
        self._restored_saved_ns = 0
        try:
            snap = await self.snapshots.load_for(self.region, "applied", max_seq)
            if snap is None:
                return  # no snapshot yet
            seq = int(snap["applied"])
            books = {}
            for sym, data in snap["books"].items():
                if sym not in self.books:
                    # a symbol this region no longer executes (moved, or gone from the
                    # topology: no instrument to restore it with) must not cost the others
                    # their snapshot
                    log.warning(
                        "exec %s: snapshot's book %s is not executed here; not restored",
                        self.region,
                        sym,
                    )
                    continue
                books[sym] = OrderBook.restore(data, self.topology.instrument(sym), self.region)
                # ~0.8 s per book at full terminal memory: let the connection answer the
                # server's pings between books (it drops a client silent for ~2 s)
                await asyncio.sleep(0)
        except RebuildError:
            raise  # the store could not be read: not the same as an unusable snapshot
        except Exception as e:
            log.error("exec %s: unusable snapshot (%s); replaying the whole stream", self.region, e)
            return
        self.books.update(books)
        self.applied = self.restored_from = seq
        self._restored_saved_ns = int(snap.get("saved_ns") or 0)

    def _update_depth(self) -> None:
        """Book depth gauges (price levels, up to 50 a side); metrics must never fail (or
        slow) a batch. A failure turns off these gauges only (logged once): every other
        series of this worker (faults, which page, included) goes on."""
        if self.metrics is None or not self._depth_metrics:
            return
        try:
            for sym, book in self.books.items():
                bids, asks = book.depth(50)
                self.metrics.book_depth(sym, "buy").set(len(bids))
                self.metrics.book_depth(sym, "sell").set(len(asks))
        except Exception as e:
            log.warning("exec %s: book depth metrics failed, turned off: %r", self.region, e)
            self._depth_metrics = False

    def _observe(self, out: Any, live: bool) -> None:
        """Count one published output; the metrics only for a ``live`` one (outputs a
        rebuild publishes again were counted, or are minutes old)."""
        if isinstance(out, Fill):
            self.stats["fills"] += 1
            if live and self.metrics is not None:
                with contextlib.suppress(Exception):
                    self.metrics.fills(out.symbol).inc()
            return
        self.stats["reports"] += 1
        if (
            live
            and self.metrics is not None
            and isinstance(out, ExecutionReport)
            and out.exec_type is ExecType.NEW
            and out.entry_ns
        ):
            # as it is published, by the wall clock (entry_ns is the ORDERS store's): its
            # transact_ns is the EXEC command's stored time, which misses this worker's
            # queueing, batches and pauses
            with contextlib.suppress(Exception):
                self.metrics.order_to_execution(out.symbol).observe(
                    max(0, time.time_ns() - out.entry_ns) / 1e9
                )

    async def _on_book_request(self, msg: Msg) -> None:
        symbol = msg.subject.rsplit(".", 1)[1]
        book = self.books.get(symbol)
        if book is None:
            body: dict[str, Any] = {"error": f"{symbol} is not executed in {self.region}"}
        else:
            bids, asks = book.depth(10)
            body = {
                "symbol": symbol,
                "region": self.region,
                "seq": book.last_seq,
                "bids": bids,
                "asks": asks,
                "orders": len(book),
            }
        with contextlib.suppress(Exception):
            await msg.respond(msgpack.packb(body))


async def _main(args: argparse.Namespace) -> None:
    from ops.runtime import serve_worker

    await serve_worker(
        "execution",
        args,
        lambda nc, topology, ctx: ExecutionWorker(
            nc,
            topology,
            args.region,
            snapshot_every=args.snapshot_every,
            metrics=ctx.metrics,
            tracer=ctx.tracer,
            day_roll=not args.no_day_roll,
        ),
        describe=lambda w: (
            f"snapshot at EXEC {w.restored_from}, then {w.stats['replayed']} commands"
        ),
    )


def main(argv: list[str] | None = None) -> None:
    from ops.runtime import worker_parser

    ap = worker_parser("Meridian execution worker")
    ap.add_argument(
        "--snapshot-every",
        type=int,
        default=50_000,
        help="snapshot the books every N commands (and every 300 s); 0: never",
    )
    ap.add_argument(
        "--no-day-roll",
        action="store_true",
        help="do not store the trading day's roll (the topology's [session]): DAY orders "
        "then rest until cancelled",
    )
    args = ap.parse_args(argv)
    from ops.runtime import run

    run(_main(args))


if __name__ == "__main__":
    main()
