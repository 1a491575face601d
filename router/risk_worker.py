"""The pre-trade risk worker of one home region: the I/O around :class:`RiskEngine`.

Inputs, merged into one queue and handled by one task (single writer per account):

* the home ``ORDERS`` stream (durable ``risk_<home>``): new/cancel/replace requests;
* execution reports for the home region's accounts from every region's ``EXECOUT``
  (durable ``fb_<home>_at_<region>``, over the leaf links): fills release exposure;
* the ``KILL_<home>`` and ``RISKCFG_<home>`` KV buckets of the home domain (watched).

For each batch it takes the non-deterministic inputs (token-bucket rate limit per account, top
of book per symbol) from Redis through :class:`router.externals.RedisExternals`, which asks
Redis only when its short-lived price cache and token leases fall short, runs the engine, then
writes, in this order: one RISKLOG record per input (the input, its recorded externals and its
outputs), the outputs (commands to the executing region's ``EXEC`` stream, risk rejects to the
account's report subject), and only then acks the inputs. A restart restores the latest engine
snapshot (object store ``RISKSNAP_<region>``, built between batches every 200,000 records or 5
minutes, stored beside the next batches) and replays the RISKLOG records after it through the
engine, so the state is rebuilt exactly, and RISKLOG's max_age never takes state with it; an
input redelivered after a crash finds its record (or, if older than the snapshot, its id in the
snapshot) and has its recorded outputs re-published (Nats-Msg-Id dedup drops what was already
stored). A state that cannot be rebuilt exactly stops the worker (:class:`RebuildError`): it
fails closed.

The loop does not wait for the outputs' PubAcks before it decides the next batch: a command
for another region's ``EXEC`` is acknowledged a WAN round trip later (70-230 ms), and local
orders must not queue behind it. A completion task acks each batch's inputs, in order, once its
outputs are stored, and re-sends outputs that were not (a region down or cut off) until they
are, for at most :data:`STUCK_LIMIT_S`: past it a re-send could outlive the stream's dedup
window and store a command twice, so the worker stops instead (an operator reconciles). A
snapshot taken while outputs wait keeps them with their inputs.

Every delivered input is handed on, in order, before a later one is acked (AckPolicy.ALL acks
everything before it): deliveries a killed predecessor held, or that a dropped connection or
leaf link lost, are read back from the stream first (:class:`router.natsutil.PullLoop`'s
``fill_gaps``; decision 0002).

Risk fails closed: with Redis down, orders are rejected (RATE_LIMIT / NO_REFERENCE_PRICE) once
the cached prices and leased tokens run out (at most 50 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import nats
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry import trace

from ops.telemetry.tracing import ORDER_ID, extract, inject
from regions.topology import Topology
from router import contract, ids, subjects
from router.book import Cancel
from router.commands import encode_command
from router.contract import (
    CancelOrder,
    CancelReject,
    ContractError,
    ExecutionReport,
    KillSwitch,
    NewOrder,
    RejectReason,
    ReplaceOrder,
)
from router.entry import check_request, entry_time, header_ns, request_op
from router.externals import RedisExternals, externals_for
from router.natsutil import (
    H_ACCEPTED_NS,
    H_ENTRY_REGION,
    H_EXPECTED_LAST_SUBJECT_SEQ,
    H_KIND,
    H_MSG_ID,
    H_OP,
    H_ORDER_ID,
    TRACEPARENT,
    AsyncPublisher,
    PullLoop,
    RebuildError,
    RebuildUnavailable,
    Recovered,
    SnapshotLag,
    SnapshotStore,
    cancel_and_wait,
    snapshot_age_s,
    stream_position,
    take_batch,
    trace_context,
    transient,
    unstored,
    wake_every,
)
from router.risk import Decision, Externals, RefPrice, RiskEngine, RiskLimits
from router.yielding import Turn, packb_yielding

log = logging.getLogger("meridian.risk")

COMMAND_KINDS = frozenset({"Submit", "Cancel", "Replace"})
"""Output kinds that are commands to an EXEC stream (an order input's approval)."""
UNREAD = "unread"
"""Record kind of an order request this build could not read, recorded with its answer."""
PUB_TIMEOUT_S = 10.0
DONE_MEMORY = 1_000_000


@dataclass(slots=True)
class Item:
    """One input of the single-writer loop."""

    input_id: str
    kind: str  # order | report | cancel_reject | kill | cfg
    msg: Msg | None = None
    payload: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    decoded: Any = None
    trace_headers: dict[str, str] | None = None
    """traceparent of this worker's span for the item (outputs become its children)."""
    account: str = ""
    """An order request's account as its ORDERS subject names it (the gateway's, never the
    payload's): what the payload must say, and the only account an answer may go to."""
    entry: str = ""
    """An order request's entry path: ``gateway`` or ``direct`` (for the metrics only)."""
    unanswered: str = ""
    """Why an unreadable order request got no answer, when it got none (for the metrics)."""
    reused: bool = False
    """An order request on a key whose earlier request ORDERS no longer holds
    (:meth:`RiskWorker._reused`): answered DUPLICATE_CL_ORD_ID (or as unreadable), never
    decided, and its record says so (``ru``)."""


@dataclass(slots=True)
class Out:
    subject: str
    msg_id: str
    kind: str
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Pending:
    """A decided batch whose outputs are on their way: acked once every output is stored."""

    outs: list[Out]
    futs: list[asyncio.Future[Any]]
    acks: list[Msg]
    spans: list[Any]
    approvals: list[bool]
    ids: list[str]
    since: float = field(default_factory=time.monotonic)
    retries: int = 0


class RiskWorker:
    def __init__(
        self,
        nc: NATS,
        topology: Topology,
        region: str,
        redis_client: aioredis.Redis,
        limits: RiskLimits | None = None,
        *,
        metrics: Any = None,
        tracer: Any = None,
        snapshot_every: int = 200_000,
        snapshot_every_s: float = 300.0,
    ) -> None:
        self.snapshot_every = snapshot_every
        """Snapshot the engine after this many RISKLOG records (0: never) ..."""
        self.snapshot_every_s = snapshot_every_s
        """... or this long after the last one, if the state moved past the last one stored."""
        self.restored_from = 0
        """RISKLOG sequence of the snapshot the engine was restored from at start (0: none)."""
        self._risklog_seq = 0
        """How far this process's state covers RISKLOG: its last record replayed or stored,
        a later risk reject report it stored, or after a rebuild the stream's last message
        (a predecessor's reports included) (the snapshot position). Every record up to
        it is applied between batches (the only writer's), so a snapshot there leaves after
        itself nothing of this process's but later batches: if RISKLOG's max_age takes
        messages after a snapshot, records went with them, and a rebuild stops."""
        self._snap_saved = 0
        """Position of the last snapshot stored (or restored): a later one is due once
        :attr:`_risklog_seq` passed it, so an idle region's last reject reports are covered
        long before max_age takes them (:meth:`_maybe_snapshot`)."""
        self._last_record = 0
        """Stream sequence of the last record on this region's RISKLOG subject (0: none),
        read at each rebuild and kept as records are stored: what the next one expects.
        Not :attr:`_risklog_seq`, the position a snapshot or replay reached: records older
        than RISKLOG's max_age are gone, and then the subject holds none."""
        self._records_since_snap = 0
        self._snap_at = 0.0
        self._restored_saved_ns = 0
        """When the restored snapshot was captured (UTC ns; 0: unknown, or none)."""
        self._lag = SnapshotLag()
        self._limits_from_cfg = False
        """The limits in force came from the RISKCFG bucket (not limits.toml)."""
        self._snap_put: asyncio.Task[None] | None = None
        self._between_batches = asyncio.Event()
        """Clear while the batch loop is inside a batch (a snapshot then waits for its end)."""
        self._between_batches.set()
        self.fatal: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        """Resolved when the worker stopped deciding for good (the process should exit)."""
        self._epoch = f"{time.time_ns():x}"
        """Part of every RISKLOG record id: a retried batch re-recorded in this process
        collides with (and so detects) a record stored late; another process never does."""
        self._snapshots_ok = True
        """False once a batch failed for good (its state may hold decisions with no record):
        no snapshot is taken after that."""
        self.nc = nc
        self.topology = topology
        self.region = region
        self.tracer = (
            tracer if tracer is not None and not isinstance(tracer, trace.NoOpTracer) else None
        )
        self.default_limits = limits or RiskLimits.load(topology=topology)
        """Limits in force while the RISKCFG bucket has no ``limits`` key (or it is deleted)."""
        self.engine = RiskEngine(topology, region, self.default_limits)
        self.metrics = metrics
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.js = nc.jetstream(domain=region)
        self._own_reports = subjects.report_risk(region, "")
        """Prefix of this worker's reject reports, stored in its own RISKLOG."""
        self.snapshots = SnapshotStore(self.js, self.snapshot_bucket, "state")
        self.pub = AsyncPublisher(nc, max_pending=20000, ack_timeout_s=PUB_TIMEOUT_S)
        self.done: OrderedDict[str, bytes] = OrderedDict()
        """Input id -> its recorded outputs, msgpack-packed: bytes are not tracked by Python's
        cyclic GC, so up to DONE_MEMORY entries cost no collector time (as objects they made
        every full collection walk millions of them: pauses of tens of ms, growing)."""
        self._recent: deque[str] = deque(maxlen=SNAPSHOT_RECENT_INPUTS)
        """The latest order and report input ids of :attr:`done`, oldest first: what a
        snapshot keeps of it. Copying this is ~1 ms at its bound; walking the OrderedDict
        backwards for the same ids held the batch loop ~40 ms (the capture was ~130 ms)."""
        self.loops: list[PullLoop] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._starters: list[asyncio.Task[None]] = []
        """Start-ups of other regions' report loops still trying (see :meth:`start`)."""
        self._inflight: deque[_Pending] = deque()
        """Decided batches whose outputs await their PubAcks, oldest first (see _complete)."""
        self._inflight_ids: set[str] = set()
        """Input ids of the batches in flight: a redelivery of one of them (its ack is only
        waiting for an older batch) needs nothing; acking that batch acks it too."""
        self._stuck_logged = 0.0
        self.stuck_limit_s = STUCK_LIMIT_S
        """How long a decided batch's outputs may go unstored before the worker stops."""
        self._inflight_added = asyncio.Event()  # wakes _complete
        self._inflight_done = asyncio.Event()  # wakes the batch loop waiting for room
        self.externals = RedisExternals(redis_client, region)
        self.stats = {
            "orders": 0,
            "approved": 0,
            "rejected": 0,
            "reports": 0,
            "rebuilt": 0,
            "bad": 0,
            "stale": 0,
        }
        self._hwm: dict[str, tuple[int, int]] = {}
        """Per input stream (``ORDERS``, ``EXECOUT@<exec region>``), the highest stream
        sequence decided and the highest stored time (ns). Inputs come in stream order (the
        pull loops fill gaps), so a delivery at or below both that ``done`` no longer
        remembers was decided long ago: a durable consumer recreated (it starts again from
        the stream's first message), not a new input. Deciding it again would trade it again
        (:meth:`_stale`). The time tells a stream recreated since: its first messages have
        low sequences, but were stored later."""

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.pub.start()
        await self.rebuild()
        self.loops = [
            PullLoop(
                self.nc,
                domain=self.region,
                stream="ORDERS",
                durable=subjects.durable_risk(self.region),
                filter_subject=subjects.orders_filter(self.region),
                queue=self.queue,
                batch=512,
                tag="orders",
                ack_all=True,
                fill_gaps=True,
            )
        ]
        for x in self.topology.codes:
            self.loops.append(
                PullLoop(
                    self.nc,
                    domain=x,
                    stream="EXECOUT",
                    durable=subjects.durable_feedback(self.region, x),
                    filter_subject=subjects.reports_for_home(x, self.region),
                    queue=self.queue,
                    batch=512,
                    tag=f"fb-{x}",
                    ack_all=True,
                    fill_gaps=True,
                )
            )
        self._tasks.append(asyncio.create_task(self._complete()))
        # kill switches and limits first: their current values are queued before any order
        # request is read, so a backlog stored after a kill (this worker was down when it was
        # engaged) is decided under it, never before it
        ready = [asyncio.Event(), asyncio.Event()]
        self._tasks.append(
            asyncio.create_task(self._watch_kv(subjects.kill_bucket(self.region), "kill", ready[0]))
        )
        self._tasks.append(
            asyncio.create_task(
                self._watch_kv(subjects.riskcfg_bucket(self.region), "cfg", ready[1])
            )
        )
        while not all(e.is_set() for e in ready):
            # fail closed: no order is decided before the kill switches are known (an order
            # approved under a kill it did not see cannot be taken back)
            try:
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), KV_READY_S)
            except TimeoutError:
                log.error(
                    "risk %s: kill switches or limits not read in %.0f s; not deciding orders "
                    "until they are",
                    self.region,
                    KV_READY_S,
                )
        for lp in self.loops:
            # every loop first hands on what its consumer delivered to a predecessor and
            # nobody acked, read back from the stream (PullLoop's fill_gaps)
            if lp.domain == self.region:
                await lp.start()
            else:
                # another region's reports: it may be down or cut off now, and deciding this
                # region's orders must not wait for it (its reports come when it is back)
                self._starters.append(asyncio.create_task(self._start_remote(lp)))
        await self._decide_queued()
        self._tasks.append(asyncio.create_task(self._run()))
        self._tasks.append(
            asyncio.create_task(wake_every(self.queue, max(1.0, self.snapshot_every_s / 4)))
        )

    async def _start_remote(self, lp: PullLoop) -> None:
        """Start the loop of another region's reports, trying again until that region
        answers."""
        delay, logged = 0.5, 0.0
        while True:
            try:
                await lp.start()
                if logged:
                    log.info("risk %s: reading %s's reports again", self.region, lp.domain)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if time.monotonic() - logged > 30.0:
                    logged = time.monotonic()
                    log.warning(
                        "risk %s: cannot read %s's reports yet (%r); deciding without them, "
                        "trying again",
                        self.region,
                        lp.domain,
                        e,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def stop(self) -> None:
        await cancel_and_wait(self._starters)  # before the loops: none starts after this
        for lp in self.loops:
            await lp.stop()
        deadline = time.monotonic() + 5.0
        while self._inflight and time.monotonic() < deadline:  # let stored outputs be acked
            await asyncio.sleep(0.01)
        await cancel_and_wait(self._tasks)
        for p in self._inflight:  # unacked: redelivered to the next process
            for span in p.spans:
                span.end()
        if self._snap_put is not None and not self._snap_put.done():
            # let a snapshot being stored finish (bounded): the next start replays less
            self.snapshots.hurry()
            await asyncio.wait({self._snap_put}, timeout=10)

    async def rebuild(self, *, known_last: int = -1) -> None:
        """The latest engine snapshot, then every later RISKLOG record replayed through the
        engine: exactly the state before the restart, however old the stream's first record.
        The kill switch gauges then show the rebuilt state's kills.

        Raises :class:`RebuildError` rather than leave a partial state behind (a snapshot or
        RISKLOG that cannot be read, records missing between the snapshot and the stream, a
        replay that stalls): deciding orders on partial exposure is worse than not deciding.

        ``known_last``: the last record this process stored or read (a rebuild after a failed
        batch), -1 when it knows none (at start): one past the snapshot that is gone stops
        the rebuild. So does any message gone after the snapshot: a snapshot covers this
        process's reject reports too (:attr:`_risklog_seq`), so what is gone after it held
        records, or may have.
        """
        await self._rebuild(known_last)
        self._show_kills()

    async def _rebuild(self, known_last: int) -> None:
        if self._snap_put is not None and not self._snap_put.done():
            # a retried batch rebuilds while this process may still be storing a snapshot: an
            # object store get racing a put of the same object can wait for chunks the put
            # purges, time out, and fail the rebuild for good (the put has its own timeout)
            self.snapshots.hurry()
            await asyncio.wait({self._snap_put})
        js = self.js
        try:
            info = await js.stream_info("RISKLOG")
        except NotFoundError:
            self._last_record = 0
            self._log_rebuilt(0)  # a region that never recorded anything
            return
        except Exception as e:
            cls = RebuildUnavailable if transient(e) else RebuildError
            raise cls(f"RISKLOG unreadable: {e!r}") from e
        await self._restore_snapshot(max_seq=info.state.last_seq)
        self._risklog_seq = self.restored_from
        start = self.restored_from + 1
        try:
            last = (await js.get_last_msg("RISKLOG", subjects.risklog(self.region))).seq
        except NotFoundError:
            last = 0
        except Exception as e:
            cls = RebuildUnavailable if transient(e) else RebuildError
            raise cls(f"RISKLOG unreadable: {e!r}") from e
        self._last_record = last or 0
        if known_last >= start and (last or 0) < known_last:
            # a record of this process's own, past the snapshot, is gone (purged from inside
            # the stream: the stream's first message does not show it)
            raise RebuildError(
                f"RISKLOG record {known_last}, past the snapshot at {start - 1}, is gone"
            )
        self._snap_saved = self.restored_from
        gone_to = info.state.first_seq - 1
        if start <= gone_to and info.state.last_seq >= start:  # messages after it are gone
            raise RebuildError(
                f"RISKLOG {start}..{gone_to} are gone (the stream starts at "
                f"{gone_to + 1}) and no snapshot covers them"
            )
        if last is None or last < start:
            self._rebuilt_through(info.state.last_seq)
            self._log_rebuilt(0)
            return
        sub = await js.subscribe(
            f"mrd.{self.region}.risk.>",
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            ),
        )
        n = 0
        try:
            while True:
                try:
                    m = await sub.next_msg(timeout=5)
                except nats.errors.TimeoutError:
                    raise RebuildUnavailable(
                        f"replay stalled after RISKLOG {self._risklog_seq} (last record {last})"
                    ) from None
                seq = m.metadata.sequence.stream
                msg_id = (m.headers or {}).get(H_MSG_ID, "")
                if 0 <= known_last < seq and not msg_id.startswith(f"rec:{self._epoch}:"):
                    # a record after this process's own last one that it did not write: a
                    # second risk worker is running. Going on would skip the inputs it took
                    # as older than the mark; both stop instead (fail closed)
                    raise RebuildError(
                        f"RISKLOG {seq} ({msg_id or 'no id'}) was written by another risk "
                        f"worker of {self.region}: only one may run"
                    )
                body = msgpack.unpackb(m.data, raw=False)
                for rec in body.get("b", [body]):
                    # a batch re-recorded after a crash is found done; the answer to a re-used
                    # key is replayed as the live worker took it (:meth:`_reused`)
                    if rec["in"] not in self.done or rec.get("ru"):
                        self._replay(rec)
                        n += 1
                self._risklog_seq = max(self._risklog_seq, m.metadata.sequence.stream)
                if m.metadata.sequence.stream >= last:
                    break
        finally:
            await sub.unsubscribe()
        self._rebuilt_through(info.state.last_seq)
        self._log_rebuilt(n)

    def _rebuilt_through(self, stream_last: int) -> None:
        """The end of a rebuild that replayed every record up to the last one, read after
        ``stream_last``: the state covers all of RISKLOG up to it (what is not a record is a
        reject report, stored after its record), so a snapshot is due once it is past the
        restored one, dated from that one's capture."""
        self._apply_file_limits()
        self._risklog_seq = max(self._risklog_seq, stream_last)
        # the next snapshot is due by the restored one's age (a long stop: at once)
        age_s = snapshot_age_s(self._restored_saved_ns)
        self._snap_at = time.monotonic() - age_s
        self._lag.rebuilt(self._risklog_seq > self._snap_saved, age_s)

    def _apply_file_limits(self) -> None:
        """After a rebuild: limits.toml as it is now, unless a RISKCFG entry set the limits."""
        if not self._limits_from_cfg:
            self.engine.set_limits(self.default_limits)

    def _log_rebuilt(self, n: int) -> None:
        self.stats["rebuilt"] = n
        log.info(
            "risk %s rebuilt from %s and %d RISKLOG records",
            self.region,
            f"the snapshot at RISKLOG {self.restored_from}" if self.restored_from else "nothing",
            n,
        )

    # ---- snapshots -----------------------------------------------------------------------
    @property
    def snapshot_bucket(self) -> str:
        return f"RISKSNAP_{self.region}"

    def snapshot_behind_s(self) -> float:
        """Seconds the state has been ahead of the last stored snapshot (0: covered)."""
        return self._lag.seconds(self._risklog_seq > self._snap_saved)

    async def _maybe_snapshot(self) -> None:
        behind = self.snapshot_behind_s()
        if self.metrics is not None:
            self.metrics.snapshot_behind().set(behind)
        due_n = self.snapshot_every and self._records_since_snap >= self.snapshot_every
        due_t = (
            self._risklog_seq > self._snap_saved
            and time.monotonic() - self._snap_at >= self.snapshot_every_s
        )
        if (due_n or due_t) and self._snapshots_ok:
            await self.snapshot()

    async def snapshot(self) -> None:
        """Store the engine as of :attr:`_risklog_seq` (taken between batches, so every record
        up to it is applied): its last record, or a reject report of its own stored after
        it, but never past a record another risk worker wrote (a deploy overlap), which the
        state does not hold: the position then stays at its own last record.

        It also keeps the ids of the latest order and report inputs, so an input redelivered
        after a restart, because its ack was lost, is recognised as decided. Kill switches and
        limits are not among them: their watchers re-deliver the current entries at start, and
        applying one again changes nothing (a kill re-sends cancels, which dedup or execution
        drops). Limits taken from limits.toml (no RISKCFG entry) are re-read from the file.
        Their outputs are stored, except those of the batches still in flight (a region cut
        off): those inputs are kept with their outputs (``pending``), so their redelivery
        after a restart re-publishes them. At start-up :meth:`_decide_queued` re-published
        the outputs of every decided but unacked request of the last process. Best effort: a
        failed snapshot only means a longer replay.
        """
        if self._snap_put is not None and not self._snap_put.done():
            return  # the last one is still being stored: try again after the next batch
        while not self._between_batches.is_set():
            # mid-batch (the batch loop yields, and awaits its RISKLOG record), the state
            # could hold decisions with no record yet, which a restart after that batch
            # failed would take as decided: wait for the batch to end
            await self._between_batches.wait()
        if not self._snapshots_ok:
            return  # a batch that never completed
        seq, mine = self._risklog_seq, self._last_record
        if seq > mine and not await self._last_record_is(mine):
            seq = mine
        if not self._between_batches.is_set() or self._last_record != mine:
            return  # a batch ran meanwhile (a caller outside the loop): the next one
        t0 = time.perf_counter()
        # kill/limits entries are left out: the KV watchers re-deliver the current ones at start
        decided = list(reversed(self._recent))  # newest first, as before
        pending = {  # decided, outputs maybe not stored yet: re-published on redelivery
            i: self.done[i]
            for i in self._inflight_ids
            if i in self.done and not i.startswith(("kill:", "cfg:"))
        }
        state = {
            "v": 1,
            "region": self.region,
            "risklog_seq": seq,
            "saved_ns": time.time_ns(),
            "engine": self.engine.snapshot(),  # copies: the engine goes on changing
            "limits_from_cfg": self._limits_from_cfg,
            "decided": decided,
            "pending": pending,
            "hwm": {k: list(v) for k, v in self._hwm.items()},
        }
        built_ms = (time.perf_counter() - t0) * 1000
        self._records_since_snap, self._snap_at = 0, time.monotonic()
        # the batch loop only pays for capturing the state (~20 ms at full memory); encoding
        # it (~45 ms, in slices with yields between: msgpack keeps the GIL, so a thread would
        # not free the loop) and storing it run beside the next batches
        self._snap_put = asyncio.create_task(
            self._put_snapshot(seq, state, built_ms, self._snap_at)
        )

    async def _put_snapshot(
        self, seq: int, state: dict[str, Any], built_ms: float, captured: float
    ) -> None:
        try:
            body = await packb_yielding(state)
            await self.snapshots.save(body)
            self._snap_saved = max(self._snap_saved, seq)
            self._lag.stored(self._risklog_seq > self._snap_saved, captured)
            if self.metrics is not None:
                self.metrics.snapshot_behind().set(self.snapshot_behind_s())
            log.info(
                "risk %s: snapshot at RISKLOG %d (%d bytes, captured in %.1f ms)",
                self.region,
                seq,
                len(body),
                built_ms,
            )
        except Exception as e:
            log.warning("risk %s: snapshot at RISKLOG %d failed: %s", self.region, seq, e)

    async def _last_record_is(self, seq: int) -> bool:
        """Is ``seq`` the last record on this region's RISKLOG subject? Read before a
        snapshot is captured past its own last record: the reports it covers were stored
        before this read, so a record another worker stored before them shows here."""
        try:
            last = (await self.js.get_last_msg("RISKLOG", subjects.risklog(self.region))).seq
        except NotFoundError:
            last = 0
        except Exception as e:  # not covered this time: the next snapshot tries again
            log.warning("risk %s: RISKLOG's last record unreadable: %r", self.region, e)
            return False
        return last == seq

    async def _restore_snapshot(self, *, max_seq: int) -> None:
        self._restored_saved_ns = 0
        try:
            snap = await self.snapshots.load_for(self.region, "risklog_seq", max_seq)
            if snap is None:
                return  # no snapshot yet
            seq = int(snap["risklog_seq"])
            engine = RiskEngine.restore(snap["engine"], self.topology, self.region)
        except RebuildError:
            raise  # the store could not be read: not the same as an unusable snapshot
        except Exception as e:
            log.error("risk %s: unusable snapshot (%s); replaying all of RISKLOG", self.region, e)
            return
        # the snapshot's limits stay in force while later records are replayed (they were
        # decided under them); rebuild() then re-reads limits.toml if no RISKCFG entry rules
        self._limits_from_cfg = bool(snap.get("limits_from_cfg"))
        self.engine = engine
        self._hwm = {
            str(k): (int(v[0]), int(v[1]))
            for k, v in (snap.get("hwm") or {}).items()
            if isinstance(v, list) and len(v) == 2
        }
        empty = msgpack.packb([])
        # stored newest first; an id twice (a snapshot of a build that kept a re-used key's
        # old place too) keeps its newest place
        oldest_first = list(reversed(dict.fromkeys(snap.get("decided", []))))
        for input_id in oldest_first:
            # decided before the snapshot, outputs stored: a redelivery is only acked
            self.done[input_id] = empty
        self._recent.clear()
        self._recent.extend(oldest_first)
        for input_id, packed in snap.get("pending", {}).items():
            if input_id not in self.done:  # pending ids are among the decided ones
                self._recent.append(input_id)
            self.done[input_id] = packed  # its outputs may not have been stored
        self.restored_from = seq
        self._restored_saved_ns = int(snap.get("saved_ns") or 0)

    async def _decide_queued(self) -> int:
        """Decide, before the batch loop starts, what the region's own loops queued at start:
        first the requests and reports a killed predecessor had received but not acked, read
        back from the streams. Their durables would redeliver them only after the ack wait
        (30 s), and hand out later ones meanwhile. Deciding them here, before any snapshot
        can be taken, keeps a snapshot from listing as done a request whose outputs the
        predecessor may not have stored: a request it decided is found in ``done`` and its
        recorded outputs are published again (dedup drops what was stored)."""
        n = self.queue.qsize()
        done = 0
        while done < n and not self.queue.empty():
            batch = await take_batch(self.queue, limit=min(1024, n - done))
            done += len(batch)
            if batch:
                await self._process(batch)
        if n:
            log.info("risk %s: decided %d inputs queued at start", self.region, n)
        return n

    def _replay(self, rec: dict[str, Any]) -> None:
        item = Item(input_id=rec["in"], kind=rec["k"], payload=rec["p"], headers=rec["h"])
        self._mark(item)
        if rec["k"] == UNREAD:  # answered unread: its answer stands, nothing was decided
            if rec.get("ru"):  # as the live worker did (see _process)
                self._forget(rec["in"])
            self._remember(rec["in"], [Out(*o) for o in rec["o"]])
            return
        ext = _ext_from(rec.get("x"))
        # an order is applied as it was decided (approved iff it sent a command to EXEC), not
        # checked again: limits.toml, or the checks themselves, may have changed since, and
        # the state must hold what execution holds
        verdict = None
        if item.kind == "order" and not rec.get("oc"):
            verdict = any(o[2] in COMMAND_KINDS for o in rec["o"])
        try:
            item.decoded = self._decode(item, check=False)
            produced = self._decide(item, ext, verdict=verdict)  # the recorded outputs stand
        except Exception as e:
            # a record this build cannot read, or a recorded approval the state cannot take
            # (it diverged): the state cannot be rebuilt exactly, so the worker stops
            raise RebuildError(f"risk {self.region}: replay of {item.input_id}: {e!r}") from e
        self._remember(item.input_id, produced if rec.get("oc") else [Out(*o) for o in rec["o"]])

    # ---- the loop ---------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                batch = await take_batch(self.queue)
                if batch:
                    decided = False
                    self._between_batches.clear()
                    try:
                        try:
                            await self._process(batch)
                        except Exception:
                            log.exception(
                                "risk %s: batch failed; rebuilding, then retrying it",
                                self.region,
                            )
                            await self._retry_batch(batch)
                        decided = True
                    finally:
                        if not decided:  # the state may hold unrecorded decisions
                            self._snapshots_ok = False
                        self._between_batches.set()
                await self._maybe_snapshot()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # fail closed, and loudly: the process stops deciding
            log.critical("risk %s: stopped deciding: %r", self.region, e)
            if not self.fatal.done():
                self.fatal.set_result(e)

    async def _retry_batch(self, batch: list[Any]) -> None:
        """Rebuild the exact state, then process the same batch again, until it goes through.

        Not a nak: with AckPolicy.ALL the next batch's ack would ack a nak'd input that had
        not been redelivered yet (and KV inputs cannot be redelivered at all). Inputs whose
        records were stored are found decided and have their outputs re-published.
        """
        delay = 0.5
        known_last = self._last_record  # this process's own: no other writer records
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            await asyncio.sleep(delay)
            known_last = max(known_last, self._last_record)  # what an attempt stored
            try:
                self.engine = RiskEngine(self.topology, self.region, self.default_limits)
                self.done.clear()
                self._recent.clear()
                self._hwm = {}
                self.restored_from = 0
                self._limits_from_cfg = False
                await self.rebuild(known_last=known_last)
                await self._process(batch)
                return
            except RebuildUnavailable:  # its state did not answer in time: try again
                log.exception(
                    "risk %s: retry %d/%d could not read its state",
                    self.region,
                    attempt,
                    RETRY_ATTEMPTS,
                )
                delay = min(delay * 2, 5.0)
            except RebuildError:
                raise  # fail closed: see _run
            except Exception:
                log.exception(
                    "risk %s: retry %d/%d of the failed batch failed",
                    self.region,
                    attempt,
                    RETRY_ATTEMPTS,
                )
                delay = min(delay * 2, 5.0)
        raise RuntimeError(f"a batch of {len(batch)} inputs failed {RETRY_ATTEMPTS + 1} times")

    async def _process(self, raw_batch: list[Any]) -> None:
        self._show_pending(raw_batch)
        items: list[Item] = []
        for raw in raw_batch:
            it = self._classify(raw)
            if it is not None:
                items.append(it)
        # a redelivered input whose batch is still in flight: that batch's ack covers it
        items = [it for it in items if it.input_id not in self._inflight_ids]
        items = once_each(items)
        for it in items:
            # not a redelivery: another request on a key ORDERS held over 7 days ago; its
            # answer is its own, and replaces the first's in ``done`` once recorded
            it.reused = self._reused(it)
        known = {it.input_id for it in items if it.input_id in self.done and not it.reused}
        stale = {i.input_id for i in items if i.input_id not in self.done and self._stale(i)}
        fresh = [it for it in items if it.input_id not in known and it.input_id not in stale]
        if self.metrics is not None:
            for it in fresh:
                if it.entry:
                    self.metrics.risk_requests(it.entry).inc()
        spans = self._start_spans(fresh)
        exts = await self._externals([it for it in fresh if not it.reused])
        records: list[dict[str, Any]] = []
        outs: list[Out] = []
        approvals: list[bool] = []  # per new order decision, for the metrics
        turn = Turn()  # the engine's only writer is this task; _complete only acks, re-sends
        for it in items:
            await turn.check()
            if it.input_id in known:
                if it.kind == "bad" and not self._refuse_unread(it):
                    # bytes no one can answer under a key decided for another message (a copy
                    # on another account's subject, garbage stored on a re-used key): never
                    # that message's outputs (its own redelivery re-sends them)
                    continue
                outs.extend(self._recorded(it.input_id))  # redelivery: republish them
                continue
            if it.input_id in stale:
                continue  # decided long ago, beyond memory: acked with the batch only
            ext: Externals | None = None
            if it.kind == "bad" or it.reused:  # undecodable: acked with the batch (_classify)
                produced = self._refuse_unread(it) if it.kind == "bad" else self._refuse_reused(it)
                if not produced:
                    if self.metrics is not None and it.input_id.startswith("o:"):
                        self.metrics.risk_unanswered(it.unanswered or "unreadable").inc()
                    # nothing recorded, the key's entry untouched: it may be a copy on another
                    # account's subject, whose key is a live request's (a redelivery of it is
                    # acked with nothing re-sent, above)
                    continue
                # recorded with its answer: a build that can read it, taking over or
                # replaying, finds it answered and never decides it after the REJECTED; not
                # its bytes (up to max_payload: the record must fit a message): ORDERS keeps
                # them, and a replay needs only the answer
                kind, payload = UNREAD, b""
            else:
                ext = exts.get(it.input_id, Externals())
                produced = self._decide(it, ext)
                kind, payload = it.kind, it.payload
                if it.kind == "order":
                    approvals.append(any(o.kind in COMMAND_KINDS for o in produced))
            if it.reused:  # the key's entry is this request's now, and as recent as it is
                self._forget(it.input_id)
            self._remember(it.input_id, produced)
            self._mark(it)
            rec: dict[str, Any] = {"in": it.input_id, "k": kind, "p": payload, "h": it.headers}
            if it.reused:
                rec["ru"] = 1  # a replay finds the key done, and replays this all the same
            if ext is not None:
                rec["x"] = _ext_to(ext)
            if it.kind == "kill":
                # a kill cancels every open order of what it halts: thousands of cancels would
                # not fit one message (max_payload 1 MiB). They are a pure function of the
                # engine state the record is replayed on, so the replay recomputes them.
                rec["o"], rec["oc"] = [], 1
            else:
                rec["o"] = _rows(produced)
            records.append(rec)
            outs.extend(produced)
        futs = []
        # One RISKLOG message per batch (<= MAX_RECORD_BYTES): one durable write, not one per
        # input. Its msg id names this process and the first input, with its stream sequence
        # (a key re-used once ORDERS dropped it is another input: :meth:`_reused`): a resend
        # of the same piece is a duplicate, which fails the batch (rebuilt, then retried).
        # Each piece expects the record before it on the subject: what this worker last
        # stored or replayed, then the piece before. A record stored late by a failed
        # attempt (its PubAck lost, the rebuild already done) then fails this attempt instead
        # of forking the log with decisions made without it; a second writer's record stops
        # the rebuild that follows (:meth:`rebuild`).
        # A piece is sent once the one before it is stored: a stored piece then means every
        # earlier one is, and a replay's high-water marks never pass an input whose record
        # was lost (:meth:`_stale`).
        chunks = _chunks(records)
        expect = self._last_record
        for i, chunk in enumerate(chunks):
            fut = await self.pub.publish(
                subjects.risklog(self.region),
                msgpack.packb({"b": chunk}, use_bin_type=True),
                headers={
                    H_MSG_ID: (
                        f"rec:{self._epoch}:{chunk[0]['in']}:{chunk[0]['h'].get('seq', '')}"
                        f":{len(chunk)}"
                    ),
                    H_EXPECTED_LAST_SUBJECT_SEQ: str(expect),
                },
            )
            if i < len(chunks) - 1:
                ack = await asyncio.wait_for(asyncio.shield(fut), PUB_TIMEOUT_S)
                if ack.duplicate:
                    raise RuntimeError("RISKLOG record already stored by an earlier attempt")
                expect = ack.seq
            futs.append(fut)
        if futs:
            # the decisions are durable before anything acts on them
            acks = await asyncio.wait_for(asyncio.gather(*futs), PUB_TIMEOUT_S)
            if any(a.duplicate for a in acks):
                # stored by an attempt whose PubAck was lost, with decisions that may differ
                # from these: rebuild (which reads it) and retry, never act on these
                raise RuntimeError("RISKLOG record already stored by an earlier attempt")
            self._risklog_seq = max(self._risklog_seq, *(a.seq for a in acks))
            self._last_record = max(self._last_record, *(a.seq for a in acks))
            self._records_since_snap += len(records)
            futs = []
        # The outputs go out now, but the loop does not wait for their PubAcks: a command to
        # another region's EXEC takes a WAN round trip (70-230 ms) to be acknowledged, and
        # waiting here would hold every later order of this region behind it. _complete()
        # acks the inputs once the outputs are stored, batch by batch in order.
        while len(self._inflight) >= MAX_INFLIGHT_BATCHES:
            self._inflight_done.clear()
            await self._inflight_done.wait()
        ids = [it.input_id for it in items]
        self._inflight.append(
            _Pending(outs, await self._publish(outs), ack_handles(items), spans, approvals, ids)
        )
        self._inflight_ids.update(ids)
        self._inflight_added.set()

    async def _publish(self, outs: list[Out]) -> list[asyncio.Future[Any]]:
        return [
            await self.pub.publish(
                o.subject, o.payload, headers={H_MSG_ID: o.msg_id, H_KIND: o.kind, **o.headers}
            )
            for o in outs
        ]

    async def _complete(self) -> None:
        """Acks each decided batch's inputs once its outputs are stored, oldest batch first.

        An output that was not stored (no PubAck within PUB_TIMEOUT_S, or no route to a region
        that is down or cut off) is published again, with its fixed msg id, until it is: the
        decision is in RISKLOG already, so re-sending it is safe while the stream's dedup
        window (EXEC: 1 h) still holds the first attempt, and the inputs stay unacked
        meanwhile. Later batches keep being decided; their acks wait for this one
        (AckPolicy.ALL). Past ``stuck_limit_s``, or if this task fails, the worker stops
        deciding (``fatal``).
        """
        try:
            while True:
                if not self._inflight:
                    self._inflight_added.clear()
                    await self._inflight_added.wait()
                    continue
                p = self._inflight[0]
                failed = await self._stored(p)
                if failed:
                    self._warn_stuck(p, failed)
                    if time.monotonic() - p.since > self.stuck_limit_s:
                        raise RuntimeError(
                            f"{len(failed)} outputs (first to {failed[0].subject}) not stored "
                            f"for {self.stuck_limit_s:.0f} s; re-sending any later could outlive "
                            "the dedup window and store them twice: stopping to be reconciled"
                        )
                    await asyncio.sleep(min(5.0, 0.25 * 2 ** min(p.retries, 5)))
                    p.retries += 1
                    p.outs = failed
                    p.futs = await self._publish(failed)
                    continue
                for m in p.acks:
                    with contextlib.suppress(Exception):  # lost: a redelivery, found done
                        await m.ack()
                for span in p.spans:
                    span.end()
                if self.metrics is not None:
                    self._observe(p.approvals)
                self._inflight.popleft()
                self._inflight_ids.difference_update(p.ids)
                self._inflight_done.set()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # fail closed, and loudly: see _run
            log.critical("risk %s: output completion failed: %r", self.region, e)
            if not self.fatal.done():
                self.fatal.set_result(e)

    async def _stored(self, p: _Pending) -> list[Out]:
        """Waits (bounded) for the batch's PubAcks; returns the outputs that were not stored.
        A reject report stored in this region's RISKLOG moves :attr:`_risklog_seq` past it."""
        assert len(p.outs) == len(p.futs)
        failed = set(await unstored(p.futs, PUB_TIMEOUT_S + 1.0))
        own = self._own_reports
        for i, (o, f) in enumerate(zip(p.outs, p.futs, strict=True)):
            if o.subject.startswith(own) and i not in failed and f.result().stream == "RISKLOG":
                self._risklog_seq = max(self._risklog_seq, f.result().seq)
        return [o for i, o in enumerate(p.outs) if i in failed]

    def _warn_stuck(self, p: _Pending, failed: list[Out]) -> None:
        now = time.monotonic()
        if now - self._stuck_logged < 10.0:
            return
        self._stuck_logged = now
        errs = [f.exception() for f in p.futs if f.done() and not f.cancelled() and f.exception()]
        log.warning(
            "risk %s: %d outputs of a decided batch not stored for %.0f s (%r, first to %s); "
            "publishing them again; %d batches wait behind it",
            self.region,
            len(failed),
            now - p.since,
            errs[0] if errs else "no PubAck",
            failed[0].subject,
            len(self._inflight) - 1,
        )

    def _start_spans(self, fresh: list[Item]) -> list[Any]:
        """A CONSUMER span per new order request, child of the gateway's span."""
        if self.tracer is None:
            return []
        spans = []
        for it in fresh:
            if it.kind != "order" or TRACEPARENT not in it.headers:
                continue
            span = self.tracer.start_span(
                "process ORDERS",
                context=extract({TRACEPARENT: it.headers[TRACEPARENT]}),
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "nats",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": f"mrd.{self.region}.ord",
                    "messaging.consumer.group.name": subjects.durable_risk(self.region),
                    ORDER_ID: it.headers.get(H_ORDER_ID, ""),
                },
            )
            it.trace_headers = inject({}, trace.set_span_in_context(span))
            spans.append(span)
        return spans

    def _observe(self, approvals: list[bool]) -> None:
        with contextlib.suppress(Exception):
            for approved in approvals:
                self.metrics.risk_decisions("accept" if approved else "reject").inc()

    def _show_kills(self) -> None:
        """``meridian_kill_switch_engaged`` per scope from the engine's engaged kills: after
        each kill applied (live or replayed) and each rebuild (a restored snapshot's kills)."""
        if self.metrics is not None:
            with contextlib.suppress(Exception):  # metrics never fail a batch
                self.metrics.kills_engaged(self.engine.kills)

    def _show_pending(self, raw_batch: list[Any]) -> None:
        """``meridian_consumer_pending`` of each consumer with a delivery in the batch, from
        its last one (the stream position's ``pending``): one set per consumer and batch.
        Inputs read back from a stream (gap fills) and KV updates carry none of their own."""
        if self.metrics is None:
            return
        with contextlib.suppress(Exception):  # metrics never fail a batch
            last: dict[str, Any] = {}
            for raw in raw_batch:
                if isinstance(raw, Msg):
                    pos = stream_position(raw)  # parsed once per message, kept on it
                    last[pos.consumer] = pos
            for pos in last.values():
                self.metrics.consumer_pending(pos.stream, pos.consumer).set(pos.pending)

    def _classify(self, raw: Any) -> Item | None:
        if isinstance(raw, Item):  # KV updates arrive pre-classified
            return raw
        if isinstance(raw, Recovered):  # read back to fill a gap: decided now, never acked
            it = self._classify(raw.msg)
            if it is not None:
                it.msg = None
            return it
        msg: Msg = raw
        hdrs = dict(msg.headers or {})
        if msg.subject.startswith(f"mrd.{self.region}.ord."):
            parts = msg.subject.split(".")
            # mrd.<r>.ord.<account>.<key>; any other shape is not a request's subject, and its
            # input id must never be one (the stream would store it beside the request)
            key = parts[4] if len(parts) == 5 else "?" + msg.subject
            keep = kept_headers(hdrs)
            pos = stream_position(msg)
            keep["seq"], keep["ts"] = str(pos.seq), str(pos.ts_ns)
            it = Item(input_id=f"o:{key}", kind="order", msg=msg, payload=msg.data, headers=keep)
            it.account = parts[3]
            it.entry = "gateway" if H_ENTRY_REGION in hdrs else "direct"
        else:
            kind = "cancel_reject" if hdrs.get(H_KIND) == "CancelReject" else "report"
            pos = stream_position(msg)
            msg_id = hdrs.get(H_MSG_ID) or f"{msg.subject}:{pos.seq}"
            it = Item(
                input_id=f"f:{msg_id}",
                kind=kind,
                msg=msg,
                payload=msg.data,
                headers={
                    "seq": str(pos.seq),
                    "ts": str(pos.ts_ns),
                    "xr": msg.subject.split(".")[1],
                },
            )
        try:
            it.decoded = self._decode(it)
        except (ContractError, ValueError) as e:
            # Not term()ed: with AckPolicy.ALL a term acks every earlier input too, decided or
            # not (inputs of this batch not yet recorded, earlier batches waiting for their
            # outputs). It is acked in its place instead, deciding nothing; an order request
            # is answered and that answer recorded (:meth:`_refuse_unread`).
            log.error(
                "risk %s: input %s not readable or not valid (%s); acking it in its place, "
                "deciding nothing",
                self.region,
                it.input_id,
                e,
            )
            self.stats["bad"] += 1
            it.kind = "bad"
            it.decoded = e
        return it

    def _decode(self, it: Item, *, check: bool = True) -> Any:
        """The input's message. An order request is checked too (``check``): a replay takes
        a recorded one as it was decided, whatever this build's checks say of it now."""
        if it.kind == "order":
            # the headers are input too (a newer gateway's, or a rogue publisher's): one this
            # build cannot read makes the input "bad", never a batch that fails for good
            op = request_op(it.headers)
            cls = contract.ENTRY_OPS.get(op)
            if cls is None:
                raise ValueError(f"unknown op {op!r}")
            if not check:
                return contract.decode(cls, it.payload)
            stored_ns = int(it.headers.get("ts", "0"))
            # a stamp is read only where no stored time is known (it is then the accept time)
            claimed = accepted_ns(it.headers) if stored_ns <= 0 else 0
            msg = contract.decode(cls, it.payload)
            assert isinstance(msg, NewOrder | CancelOrder | ReplaceOrder)
            # its subject first: a request not on its own is never answered, whatever else
            # is wrong with it (:meth:`_refuse_unread`)
            fault = self._subject_fault(it, msg.cl_ord_id)
            if fault:
                raise ContractError(RejectReason.INVALID_FIELD, "subject", fault)
            # the gateway's checks again (its account the subject's, a traded symbol, a
            # LIMIT's price...): the engine must never meet a request that breaks them
            check_request(self.topology, it.account, msg)
            # A desk may store its request itself (direct entry, contract.md): the order id
            # and the accept time are derived here, never taken from a publisher's headers
            # (the accept time is the stored time), and the record keeps what was derived,
            # so that a replay decides the same.
            if isinstance(msg, NewOrder):
                oid = ids.order_id(it.account, msg.cl_ord_id)
                given = it.headers.get(H_ORDER_ID)
                if given is not None and given != oid:
                    raise ValueError(f"order id header {given!r:.80} is not the order's {oid}")
                it.headers[H_ORDER_ID] = oid
            else:
                it.headers.pop(H_ORDER_ID, None)  # the request's own, not the order's
            it.headers[H_ACCEPTED_NS] = str(entry_time(claimed, stored_ns))
            return msg
        if it.kind == "report":
            return contract.decode(ExecutionReport, it.payload)
        if it.kind == "cancel_reject":
            return contract.decode(CancelReject, it.payload)
        if it.kind == "kill":
            key = it.headers["key"]
            if not it.payload:
                return (key, False)
            ks = contract.decode(KillSwitch, it.payload)
            return (key, ks.engaged)
        if it.kind == "cfg":
            if not it.payload:  # key deleted or purged: back to the configured defaults
                return self.default_limits
            return RiskLimits.from_mapping(json.loads(it.payload), strict=False)
        raise ValueError(f"unknown input kind {it.kind}")

    async def _externals(self, items: list[Item]) -> dict[str, Externals]:
        """Rate-limit verdicts and reference prices for this batch (router.externals: Redis is
        asked only for what the short-lived cache and token leases do not cover)."""
        wants: list[tuple[str, str | None, str]] = []
        wanted: dict[str, int] = {}
        for it in items:
            d = it.decoded
            if it.kind != "order" or not isinstance(d, NewOrder | ReplaceOrder):
                continue
            # a new order and a replace take a token each; a cancel none (left out above):
            # a desk out of tokens can always pull its orders
            acct = d.account
            wanted[acct] = wanted.get(acct, 0) + 1
            wants.append((it.input_id, acct, d.symbol))
        if not wants:
            return {}
        granted, refs = await self.externals.fetch(
            wanted, {w[2] for w in wants}, self.engine.limits, time.monotonic()
        )
        return externals_for(wants, granted, refs)

    def _decide(self, it: Item, ext: Externals, *, verdict: bool | None = None) -> list[Out]:
        d = it.decoded
        eng = self.engine
        seq = int(it.headers.get("seq", "0"))
        if it.kind == "order":
            self.stats["orders"] += 1
            if isinstance(d, NewOrder):
                dec = eng.on_new(
                    d,
                    order_id=it.headers.get(H_ORDER_ID, ""),
                    accepted_ns=accepted_ns(it.headers),
                    ext=ext,
                    seq=seq,
                    verdict=verdict,
                )
            elif isinstance(d, CancelOrder):
                dec = eng.on_cancel(d, seq=seq, accepted_ns=accepted_ns(it.headers))
            else:
                dec = eng.on_replace(
                    d, ext=ext, seq=seq, verdict=verdict, accepted_ns=accepted_ns(it.headers)
                )
            if dec.command is None and dec.report is None:
                self.stats["rejected"] += 1
                return []  # a replayed reject: its recorded report stands
            return self._outputs(dec, it)
        if it.kind == "report":
            self.stats["reports"] += 1
            eng.on_report(d)
            return []
        if it.kind == "cancel_reject":
            eng.on_cancel_reject(d)
            return []
        if it.kind == "kill":
            key, engaged = d
            outs = []
            halted = eng.set_kill(key, engaged)
            self._show_kills()
            for account, o in halted:
                cmd = Cancel(
                    order_id=o.order_id,
                    cl_ord_id=f"KILL-{o.order_id}",
                    orig_cl_ord_id=o.cl_ord_id,
                    account=account,
                    home_region=self.region,
                    reason="KILL_SWITCH",
                )
                x = self.topology.exec_region(o.symbol)
                outs.append(
                    Out(
                        subjects.exec_in(x, o.symbol),
                        f"{it.input_id}:{o.order_id}",
                        "Cancel",
                        encode_command(cmd),
                    )
                )
            return outs
        if it.kind == "cfg":
            eng.set_limits(d)
            self._limits_from_cfg = bool(it.payload)  # empty: deleted, back to limits.toml
            return []
        return []

    @staticmethod
    def _hwm_key(it: Item) -> str | None:
        if it.input_id.startswith("o:"):
            return "ORDERS"
        if it.input_id.startswith("f:") and it.headers.get("xr"):
            return f"EXECOUT@{it.headers['xr']}"
        return None  # kill switches, limits, and records from before high-water marks

    def _position(self, it: Item) -> tuple[str, int, int] | None:
        """(stream key, stream sequence, stored ns) of an input, if it has them."""
        key, seq, ts = self._hwm_key(it), it.headers.get("seq", ""), it.headers.get("ts", "")
        if key is None or not seq.isdigit() or not ts.isdigit():
            return None
        return key, int(seq), int(ts)

    def _mark(self, it: Item) -> None:
        """``it`` is decided: raise its stream's high-water mark."""
        pos = self._position(it)
        if pos is not None:
            key, seq, ts = pos
            old_seq, old_ts = self._hwm.get(key, (0, 0))
            self._hwm[key] = (max(old_seq, seq), max(old_ts, ts))

    def _stale(self, it: Item) -> bool:
        """A delivery at or below its stream's high-water mark, in sequence and in stored
        time, that ``done`` does not hold (the caller checks ``done`` first): see
        :attr:`_hwm`."""
        pos = self._position(it)
        if pos is None:
            return False
        key, seq, ts = pos
        mark_seq, mark_ts = self._hwm.get(key, (0, 0))
        if seq > mark_seq or ts > mark_ts:
            return False
        self.stats["stale"] += 1
        if self.stats["stale"] in (1, 10, 100) or self.stats["stale"] % 10_000 == 0:
            log.error(
                "risk %s: %s (stream seq %s) is at or below what was decided on %s and not "
                "remembered: decided long ago, skipped, not decided again (%d so far; was a "
                "durable consumer recreated?)",
                self.region,
                it.input_id,
                seq,
                key,
                self.stats["stale"],
            )
        return True

    def _reused(self, it: Item) -> bool:
        """An order request whose key ``done`` holds but which was never decided: its ORDERS
        sequence is above the high-water mark. A redelivery is at or below it: every input
        decided since marks existed raised the mark with its own sequence, live and in a
        replay, and one decided before (restored from an old snapshot, or replayed from a
        record without a position) lies below every later one, as ORDERS is in order. This
        is another request on the same ``(account, cl_ord_id)``, stored once ORDERS no
        longer held the first (its max_age is 7 days). Taken as a redelivery, it was acked,
        never decided, and the first's outputs were sent again, past EXEC's dedup window.
        The stored time is not used: it need not follow the sequence (a clock stepped back),
        and an input without a mark of its own could then be refused although decided. So a
        recreated stream's new store on an old key, whose sequence is low, is still taken
        for a redelivery. No mark at all (a snapshot from before marks) leaves it one too."""
        if not it.input_id.startswith("o:") or it.input_id not in self.done:
            return False
        pos = self._position(it)
        if pos is None or pos[0] not in self._hwm:
            return False
        key, seq, _ts = pos
        return seq > self._hwm[key][0]

    def _refuse_reused(self, it: Item) -> list[Out]:
        """The answer to a request on a key risk remembers deciding (:meth:`_reused`):
        ``DUPLICATE_CL_ORD_ID``, recorded as an answer like an unread request's, so a replay
        finds it answered. A new order's answer names the order id its ack named, derived
        from ``(account, cl_ord_id)``: the first order's (the desk matches the answer to
        its ack; the refusal is of this request, never of that order)."""
        acct, cl = it.account, it.decoded.cl_ord_id
        answer = self._refusal(
            it,
            msgpack.unpackb(it.payload, raw=False),
            reason=RejectReason.DUPLICATE_CL_ORD_ID,
            text="cl_ord_id already used (by a request older than ORDERS keeps): use a new one",
            order_id=ids.order_id(acct, cl),
        )
        if answer:
            self.stats["rejected"] += 1
            log.warning(
                "risk %s: %s stored again after ORDERS dropped its first request: answered "
                "DUPLICATE_CL_ORD_ID",
                self.region,
                it.input_id,
            )
        return answer

    def _subject_fault(self, it: Item, cl_ord_id: str) -> str | None:
        """Why an order request is not on its own subject, or None. The subject is the
        request's index entry (a re-send finds it there): a key not derived from its
        cl_ord_id would let the same request be stored and decided twice, and a region that
        is not its account's home would decide it against an empty view of the account
        (direct entry lets a desk publish into any region's ORDERS)."""
        if it.input_id != f"o:{subjects.request_key(it.account, cl_ord_id)}":
            return "the last token must be the request key of (account, cl_ord_id)"
        try:
            home = self.topology.account_home(it.account)
        except KeyError:
            return None  # an unknown account: check_request's typed reject
        if home != self.region:
            return f"{it.account} is homed in {home}: its requests go to {home}'s ORDERS"
        return None

    def _refuse_unread(self, it: Item) -> list[Out]:
        """The answer to an order request this build cannot read (a newer gateway's, most
        likely): a REJECTED report (a cancel reject for a cancel or replace) with the
        contract's reason, built from what can be read of it, so the desk that holds its
        OrderAck is not left waiting. It decides nothing; the answer is recorded in RISKLOG
        (kind ``unread``) and its id is the request's ORDERS sequence. A payload whose account
        is not the subject's gets no answer. An unknown ``Mrd-Op`` is answered as what its map
        looks like: a cancel reject if it names ``orig_cl_ord_id``, else a REJECTED report."""
        if not it.input_id.startswith("o:"):
            return []
        err = it.decoded
        reason = err.reason if isinstance(err, ContractError) else RejectReason.MALFORMED
        try:
            raw = msgpack.unpackb(it.payload, raw=False)
        except Exception:
            raw = None
        if not isinstance(raw, dict) or raw.get("account") != it.account:
            # an answer goes only to the account the subject names: a map naming another is
            # not on its own subject
            it.unanswered = "subject" if isinstance(raw, dict) else "unreadable"
            return []
        cl = raw.get("cl_ord_id")
        if not isinstance(cl, str) or self._subject_fault(it, cl):
            # names no request, or not on its own subject: perhaps a copy of another desk's
            # live order, whose desk must not read a rejection of it
            it.unanswered = "subject" if isinstance(cl, str) else "unreadable"
            return []
        answer = self._refusal(
            it,
            raw,
            reason=reason,
            text=f"not decided: {err}",
            # a new order's id is derived from its cl_ord_id (as the gateway derives it; a
            # header naming another is what made it unreadable); a cancel's or replace's
            # names an order this answer cannot look up
            order_id=ids.order_id(it.account, cl),
        )
        if answer:
            log.warning("risk %s: answered unreadable %s with %s", self.region, it.input_id, reason)
        return answer

    def _refusal(
        self, it: Item, raw: dict[str, Any], *, reason: RejectReason, text: str, order_id: str
    ) -> list[Out]:
        """A refused order request's answer, built from its map ``raw``: a REJECTED report
        for a new order, a cancel reject for a cancel or replace (``order_id`` only for the
        former: the latter's names an order this answer does not look up)."""
        op = request_op(it.headers)
        if op not in contract.ENTRY_OPS:
            # an op this build does not know (a newer client's, or a direct publisher's
            # typo): answered by the shape of its map, so the desk is not left waiting
            op = ("replace" if "qty" in raw else "cancel") if "orig_cl_ord_id" in raw else "new"
        try:
            accepted = accepted_ns(it.headers)
        except ValueError:
            accepted = 0
        accepted = entry_time(accepted, int(it.headers.get("ts", "0")))
        fields = {
            **raw,
            "order_id": order_id if op == "new" else "NONE",
            "home_region": self.region,
            "entry_ns": accepted,
        }
        answer = contract.refusal_of(
            fields,
            op=op,
            reason=reason,
            text=text,
            reply_id=f"{self.region}-risk-{it.headers.get('seq', '0')}",
            symbol=str(raw.get("symbol", "")),
            exec_region=self.region,
            transact_ns=accepted,
        )
        if answer is None:
            return []
        return [self._report(answer, {})]

    def _report(self, r: ExecutionReport | CancelReject, headers: dict[str, str]) -> Out:
        """Risk's own answer to an order (``er.r``), its id the message id."""
        return Out(
            subjects.report_risk(self.region, r.account),
            r.exec_id if isinstance(r, ExecutionReport) else r.reject_id,
            type(r).__name__,
            contract.encode(r),
            headers,
        )

    def _outputs(self, dec: Decision, it: Item) -> list[Out]:
        tp = dict(it.trace_headers or {})
        if not tp and TRACEPARENT in it.headers:
            tp = {TRACEPARENT: it.headers[TRACEPARENT]}
        if dec.command is not None:
            self.stats["approved"] += 1
            return [
                Out(
                    subjects.exec_in(dec.exec_region, dec.symbol),
                    f"cmd:{it.input_id}",
                    type(dec.command).__name__,
                    encode_command(dec.command),
                    tp,
                )
            ]
        assert dec.report is not None
        self.stats["rejected"] += 1
        return [self._report(dec.report, tp)]

    def _remember(self, input_id: str, outs: list[Out]) -> None:
        if input_id not in self.done and not input_id.startswith(("kill:", "cfg:")):
            # kill/limits entries are left out: the KV watchers re-deliver the current ones
            self._recent.append(input_id)
        self.done[input_id] = msgpack.packb(_rows(outs), use_bin_type=True)
        while len(self.done) > DONE_MEMORY:
            old, packed = self.done.popitem(last=False)
            if old in self._inflight_ids:
                # its batch still waits for its outputs (a region cut off): it must stay
                # found, and in the snapshot's pending, whatever came since
                self.done[old] = packed
                if len(self._inflight_ids) >= len(self.done):
                    break
                continue

    def _forget(self, input_id: str) -> None:
        """Drop ``input_id`` from ``done`` and :attr:`_recent`, so that :meth:`_remember`
        puts it back as the newest (a re-used key's answer, :meth:`_reused`: rare, so the
        deque's linear scan is paid only then)."""
        self.done.pop(input_id, None)
        with contextlib.suppress(ValueError):
            self._recent.remove(input_id)

    def _recorded(self, input_id: str) -> list[Out]:
        packed = self.done.get(input_id)
        if packed is None:
            return []
        return [Out(*o) for o in msgpack.unpackb(packed, raw=False)]

    async def _watch_kv(self, bucket: str, kind: str, ready: asyncio.Event | None = None) -> None:
        """Queue every entry of ``bucket`` as an input; ``ready`` is set once the entries it
        held when the watch began are queued (nats-py marks their end with None)."""
        while True:
            try:
                kv = await self.js.key_value(bucket)
                watcher = await kv.watchall()
                async for entry in watcher:
                    if entry is None:
                        if ready is not None:
                            ready.set()
                        continue
                    payload = entry.value or b""
                    if kind == "cfg" and entry.key != "limits":
                        continue
                    it = Item(
                        input_id=f"{kind}:{entry.revision}",
                        kind=kind,
                        payload=payload,
                        headers={"key": entry.key},
                    )
                    try:
                        it.decoded = self._decode(it)
                    except Exception as e:
                        log.error("risk %s: bad %s entry %s: %s", self.region, bucket, entry.key, e)
                        continue
                    self.queue.put_nowait(it)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("risk %s: KV watch %s failed (%s); retrying", self.region, bucket, e)
                await asyncio.sleep(1)


KV_READY_S = 10.0
"""How often a starting risk worker, waiting for its kill switches and limits before it reads
any order request, says it is still waiting."""
RETRY_ATTEMPTS = 10
"""Rebuild-and-retry rounds for a failed batch before the worker stops (fail closed)."""
STUCK_LIMIT_S = 1800.0
"""Half of EXEC's and RISKLOG's 1 h dedup window (router.subjects.region_streams)."""
MAX_INFLIGHT_BATCHES = 100_000
"""Decided batches whose outputs may await PubAcks at once; the loop waits beyond it."""
MAX_RECORD_BYTES = 512 * 1024
SNAPSHOT_RECENT_INPUTS = 100_000
"""Input ids a snapshot keeps as decided: far more than can be unacked at any moment."""


_KEPT = {H_OP: 16, H_ACCEPTED_NS: 24, H_ORDER_ID: 24}
"""Headers of an ORDERS message risk keeps (in its records too), and how much of each: more
than any valid op or order id, so that a longer one still reads as invalid (a stamp is only
read where no stored time is known), and a publisher's 8 KiB header cannot fill a RISKLOG
record (1 MiB per message)."""


def kept_headers(hdrs: dict[str, str]) -> dict[str, str]:
    """What risk keeps of an ORDERS message's headers: the op, the gateway's stamps (bounded),
    and a W3C traceparent only when it is one."""
    keep = {k: hdrs[k][:n] for k, n in _KEPT.items() if k in hdrs}
    tp = trace_context(hdrs).get(TRACEPARENT)  # the one filter (its tracestate not kept)
    if tp is not None:
        keep[TRACEPARENT] = tp
    return keep


def accepted_ns(headers: dict[str, str]) -> int:
    """An order request's accept time (the gateway's ``Mrd-Accepted-Ns``; 0 when absent),
    or ValueError when it is not a UTC ns a report can carry (the contract's int64)."""
    raw = headers.get(H_ACCEPTED_NS, "0")
    ns = header_ns(raw)
    if ns is None:
        raise ValueError(f"accept time header {raw!r:.40}")
    return ns


def _rows(outs: list[Out]) -> list[list[Any]]:
    """Outputs as a record and ``done`` hold them (``Out(*row)`` reads one back)."""
    return [[o.subject, o.msg_id, o.kind, o.payload, o.headers] for o in outs]


def once_each(items: list[Item]) -> list[Item]:
    """A batch's inputs, each once, in order of first appearance. The same input comes twice
    in one batch when a gap is read back from the stream and its delivery, held meanwhile,
    follows: decided twice, its rate token would be taken twice and the second verdict
    overwrite the first. A later copy's delivery becomes the first's ack handle if the first
    has none (read back: never acked itself)."""
    uniq: dict[str, Item] = {}
    for it in items:
        first = uniq.setdefault(it.input_id, it)
        if first is not it and first.msg is None and it.msg is not None:
            first.msg = it.msg
    return list(uniq.values())


def ack_handles(items: list[Item]) -> list[Msg]:
    """The delivery to ack for each input consumer of a decided batch: AckPolicy.ALL, so the
    one with the highest stream sequence acks every earlier one on that consumer. Not simply
    the last in the batch: a redelivery keeps its old stream sequence, and :func:`once_each`
    may have moved a later delivery onto an earlier input. Acking a lower one would leave the
    higher ones to be redelivered after their ack wait (found decided, but late)."""
    best: dict[str, tuple[int, Msg]] = {}
    for it in items:
        if it.msg is None or not it.msg.reply:
            continue
        pos = stream_position(it.msg)
        have = best.get(pos.consumer)
        if have is None or pos.seq > have[0]:
            best[pos.consumer] = (pos.seq, it.msg)
    return [m for _, m in best.values()]


def _chunks(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    cur: list[dict[str, Any]] = []
    size = 0
    for r in records:
        n = len(r["p"]) + sum(len(o[3]) for o in r["o"]) + 200
        if cur and size + n > MAX_RECORD_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append(r)
        size += n
    if cur:
        out.append(cur)
    return out


def _ext_to(ext: Externals) -> list[Any]:
    ref = [ext.ref.bid_ticks, ext.ref.ask_ticks] if ext.ref is not None else None
    return [ext.rate_ok, ref]


def _ext_from(raw: Any) -> Externals:
    if not raw:
        return Externals()
    ok, ref = raw
    return Externals(
        rate_ok=bool(ok), ref=RefPrice(bid_ticks=ref[0], ask_ticks=ref[1]) if ref else None
    )


# ---- process entry point ---------------------------------------------------------------------


async def _main(args: argparse.Namespace) -> None:
    from ops.runtime import serve_worker

    r = aioredis.from_url(args.redis_url)
    try:
        await serve_worker(
            "risk",
            args,
            lambda nc, topology, ctx: RiskWorker(
                nc,
                topology,
                args.region,
                r,
                metrics=ctx.metrics,
                tracer=ctx.tracer,
                snapshot_every=args.snapshot_every,
            ),
            describe=lambda w: (
                f"snapshot at RISKLOG {w.restored_from}, then {w.stats['rebuilt']} records"
            ),
        )
    finally:
        await r.aclose()


def main(argv: list[str] | None = None) -> None:
    from ops.runtime import worker_parser

    ap = worker_parser("Meridian pre-trade risk worker")
    ap.add_argument("--redis-url", required=True)
    ap.add_argument(
        "--snapshot-every",
        type=int,
        default=200_000,
        help="snapshot the engine every N RISKLOG records (and every 5 minutes); 0: never",
    )
    args = ap.parse_args(argv)
    from ops.runtime import run

    run(_main(args))


if __name__ == "__main__":
    main()
