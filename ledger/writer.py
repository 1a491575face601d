"""The ledger writer: one per region, JetStream fills in, postings out, acks after commit.

Flow of one batch::

    fetch(<= batch_max), topped up once after --linger-ms if short
        -> decode + validate each fill (bad ones: log, count, term)
        -> post_transfers() in ONE transaction (retried whole) -> commit -> ack every message

At-least-once delivery plus deterministic transfer ids give an exactly-once effect: a message
redelivered after a crash, a lost ack or a lost commit reply is a replay and posts nothing.

During a database outage the writer stops fetching, keeps the batch it holds unacked (the rest
stays in JetStream), marks the held messages in progress so they are not redelivered
meanwhile, reconnects with capped exponential backoff, and drains the backlog afterwards.

Run it: ``python -m ledger.writer --region lon --nats URL --dsn DSN [--migrate]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats
import psycopg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from prometheus_client import CollectorRegistry, Counter, Gauge
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential,
    wait_random,
)

from ledger.db import RETRY_SQLSTATES, is_retryable, libpq_dsn
from ledger.errors import FillRejected, LedgerConfigError, TransferConflict
from ledger.held import (
    OUTSTANDING_COUNT_SQL,
    POSTED_TRADES_SQL,
    UPSERT_SQL,
    held_trade_id,
    payload_digest,
    posted_terms_differ,
)
from ledger.model import Transfer, transfers_for_fill
from ledger.store import BatchResult, minor_units, minor_units_disagree, post_transfers
from regions.topology import Topology, load_topology
from router.contract import UNKNOWN_FIELD, ContractError, Fill, RejectReason, decode
from router.subjects import durable_ledger, fills_filter

log = logging.getLogger("ledger.writer")

STREAM = "EXECOUT"
DEFAULT_LINGER_S = 0.05
STATEMENT_TIMEOUT_S = 20.0
"""Longest a statement of the writer may run (below the consumer's ack wait, 30 s); a batch
commits in well under a second."""
HOLD_S = 30.0
"""A fill this writer cannot post (unknown account, instrument or currency) comes back this
long after it was held."""
HELD_COUNT_S = 60.0
"""How often the writer counts its region's outstanding held fills (a gauge)."""
HELD_FORGET_S = 4 * HOLD_S
"""A held fill not delivered again for this long is no longer counted in the backlog: it
comes back every HOLD_S while held, so it was acked (post-held) or EXECOUT deleted it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WriterConfig:
    """Knobs of one region's writer."""

    region: str
    durable: str = ""
    """Durable consumer name; default ``LEDGER_<region>``."""
    batch_max: int = 512
    """Most fills per fetch and per database transaction."""
    fetch_timeout_s: float = 1.0
    linger_s: float = DEFAULT_LINGER_S
    """After a fetch that did not fill a batch, wait this long and top it up once: fewer,
    larger transactions (less CPU per fill for PostgreSQL and the writer) for up to this much
    more fill -> commit latency. 0: commit whatever one fetch returned."""
    max_ack_pending: int = 4096
    ack_wait_s: float = 30.0
    """JetStream redelivers a message not acked within this (a crashed writer's batch)."""
    retry_initial_s: float = 0.05
    retry_max_s: float = 2.0
    """Cap of the reconnect/retry backoff."""
    deliver_new: bool = False
    """Start a NEW consumer at the end of the stream instead of its beginning."""
    js_domain: str | None = None
    """JetStream domain of the stream; default the region code."""

    @property
    def durable_name(self) -> str:
        return self.durable or durable_ledger(self.region)


SERVICE = "ledger"
"""Value of the ``service`` label of the writer's series."""


class WriterMetrics:
    """Prometheus metrics of one writer, registered in the registry passed in.

    Every series is labelled ``region`` and ``service`` (``ledger``) like the other Meridian
    processes' series. ``meridian_ledger_batch_size``, ``meridian_ledger_commit_seconds`` and
    ``meridian_ledger_backlog`` are the families of :mod:`ops.telemetry.metrics` (defined
    there only); the rest exist only in the writer.
    """

    def __init__(self, registry: CollectorRegistry, region: str) -> None:
        from ops.telemetry.metrics import event_loop_lag_histogram, ledger_families

        lb = ("region", "service")
        base = (region, SERVICE)
        shared = ledger_families(registry)
        self.batch_size = shared.batch_size.labels(*base)
        self.commit_latency = shared.commit_seconds.labels(*base)
        self.backlog = shared.backlog.labels(*base)
        self.postings = Counter(
            "meridian_ledger_postings", "Postings written", lb, registry=registry
        ).labels(*base)
        self.transfers = Counter(
            "meridian_ledger_transfers", "Transfers written", lb, registry=registry
        ).labels(*base)
        self.replays = Counter(
            "meridian_ledger_transfers_replayed",
            "Transfers already posted (no-op)",
            lb,
            registry=registry,
        ).labels(*base)
        self._rejected = Counter(
            "meridian_ledger_fills_rejected",
            "Malformed fills terminated",
            (*lb, "field"),
            registry=registry,
        )
        self._held = Counter(
            "meridian_ledger_fills_held",
            "Well-formed fills that could not be posted (unknown to this writer's topology), "
            "held for redelivery: each redelivery counts",
            (*lb, "field"),
            registry=registry,
        )
        self._retries = Counter(
            "meridian_ledger_db_retries",
            "Whole-transaction retries",
            (*lb, "kind"),
            registry=registry,
        )
        self.db_up = Gauge(
            "meridian_ledger_db_up", "1 while the database answers", lb, registry=registry
        ).labels(*base)
        self.held_unrecorded = Counter(
            "meridian_ledger_held_unrecorded",
            "Held fills that could not be kept in held_fills (the stream still holds them)",
            lb,
            registry=registry,
        ).labels(*base)
        self.held_outstanding = Gauge(
            "meridian_ledger_held_outstanding",
            "Held fills in held_fills whose trade is not in the books yet (counted every "
            "60 s): they outlive EXECOUT's copy, and post only through post-held",
            lb,
            registry=registry,
        ).labels(*base)
        self.loop_lag = event_loop_lag_histogram(registry).labels(*base)
        self.region = region

    def rejected(self, field: str) -> Counter:
        """Counter: malformed fills terminated, by the offending ``field``."""
        return self._rejected.labels(self.region, SERVICE, field)

    def held(self, field: str) -> Counter:
        """Counter: fills held (not posted, not acked), by the ``field`` it could not post."""
        return self._held.labels(self.region, SERVICE, field)

    def retries(self, kind: str) -> Counter:
        """Counter: whole-transaction retries, by ``kind`` (serialization, connection)."""
        return self._retries.labels(self.region, SERVICE, kind)


def from_newer_build(e: Exception) -> bool:
    """A fill this build cannot read because a newer one wrote it: another contract version,
    or a field it does not know. A trade all the same, so it is held, never terminated."""
    if not isinstance(e, ContractError):
        return False
    return e.reason is RejectReason.UNSUPPORTED_VERSION or e.rule == UNKNOWN_FIELD


def _seq(m: Msg) -> int:
    """The message's stream sequence; 0 if it has none."""
    try:
        return int(m.metadata.sequence.stream)
    except Exception:
        return 0


class LedgerWriter:
    """Consume one region's fills and post them; single writer per region.

    Args:
        topology: currencies' minor units, instruments, accounts, regions.
        config: region and consumer settings.
        nats_url: server of the region (its JetStream domain holds ``EXECOUT``).
        dsn: ``postgresql://`` or ``cockroachdb://`` DSN of the ledger database.
        registry: where to register the metrics (a fresh one when omitted).
    """

    def __init__(
        self,
        *,
        topology: Topology,
        config: WriterConfig,
        nats_url: str | list[str],
        dsn: str,
        registry: CollectorRegistry | None = None,
        tracer: Any = None,
    ) -> None:
        if config.region not in topology.codes:
            raise LedgerConfigError("region", f"{config.region!r} is not in the topology")
        self.topology = topology
        self.config = config
        self.region = config.region
        self.nats_url = nats_url
        self.dsn = libpq_dsn(dsn)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = WriterMetrics(self.registry, self.region)
        self.tracer = tracer
        """OpenTelemetry tracer; each fill gets a span from fetch to commit (None: off)."""
        self._db: psycopg.AsyncConnection[object] | None = None
        self._nc: NATS | None = None
        self.committed_batches = 0
        """Batches committed since start (tests and status)."""
        self.ready = asyncio.Event()
        """Set once the durable consumer exists (fills published afterwards are seen)."""
        self._held: dict[int, float] = {}
        """Stream sequence of each fill held and not acked since -> when it was last held
        (monotonic): counted in ``meridian_ledger_backlog`` (they wait in EXECOUT, and fill
        max_ack_pending) until acked, or not delivered again within HELD_FORGET_S."""
        self._held_pruned = 0.0

    # ---- lifecycle -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch, post and ack until ``stop`` is set; a cancelled run acks nothing it held."""
        cfg = self.config
        nc = await nats.connect(
            self.nats_url,
            name=f"ledger-writer-{self.region}",
            ping_interval=1,
            max_outstanding_pings=3,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
        )
        self._nc = nc
        try:
            js = nc.jetstream(domain=cfg.js_domain or self.region)
            consumer = api.ConsumerConfig(
                durable_name=cfg.durable_name,
                ack_policy=api.AckPolicy.EXPLICIT,
                max_ack_pending=cfg.max_ack_pending,
                ack_wait=cfg.ack_wait_s,
                deliver_policy=api.DeliverPolicy.NEW if cfg.deliver_new else api.DeliverPolicy.ALL,
                max_deliver=-1,
            )
            psub = await js.pull_subscribe(
                fills_filter(self.region),
                durable=cfg.durable_name,
                stream=STREAM,
                config=consumer,
            )
            self.ready.set()
            log.info(
                "ledger writer %s consuming %s as %s",
                self.region,
                fills_filter(self.region),
                cfg.durable_name,
            )
            me = asyncio.current_task()
            counted = float("-inf")
            while not stop.is_set():
                if time.monotonic() - counted >= HELD_COUNT_S:
                    counted = time.monotonic()
                    await self._count_held()
                try:
                    msgs = list(await psub.fetch(cfg.batch_max, timeout=cfg.fetch_timeout_s))
                    if cfg.linger_s and len(msgs) < cfg.batch_max:
                        msgs += await self._top_up(psub, cfg.batch_max - len(msgs))
                    # Python 3.11's asyncio.wait_for (inside nats-py's fetch) can swallow a
                    # cancel that races a message arriving; the task then stays "cancelling".
                    # Honour it here, or a killed writer would keep posting.
                    if me is not None and me.cancelling():
                        raise asyncio.CancelledError
                except (TimeoutError, nats.errors.TimeoutError):
                    # nothing delivered: none pending, or held fills take all of
                    # max_ack_pending while more wait. Not 0: the consumer's own count
                    await self._idle_backlog(psub)
                    continue
                except (
                    nats.errors.ConnectionClosedError,
                    nats.errors.ConnectionReconnectingError,
                    nats.errors.NoRespondersError,
                ):
                    await asyncio.sleep(0.25)
                    continue
                if msgs:
                    await self.handle_batch(msgs, stop)
        finally:
            await self._close_db()
            with contextlib.suppress(Exception):
                await nc.close()

    async def _idle_backlog(self, psub: Any) -> None:
        """``meridian_ledger_backlog`` after a fetch that returned nothing: the consumer's
        pending and delivered-unacked (held) fills, one request per idle fetch timeout. Left
        as it was when the server does not answer."""
        try:
            info = await psub.consumer_info()
        except Exception as e:
            log.debug("ledger %s: consumer info for the backlog: %r", self.region, e)
            return
        self.metrics.backlog.set(int(info.num_pending or 0) + int(info.num_ack_pending or 0))

    def _backlog(self, num_pending: int, posting: int) -> int:
        """Fills not in the ledger yet, after a fetch: those past it in the stream, the
        ``posting`` ones of the batch, and the held ones (delivered, unacked)."""
        now = time.monotonic()
        if self._held and now - self._held_pruned >= HOLD_S:
            self._held_pruned = now
            self._held = {q: t for q, t in self._held.items() if now - t < HELD_FORGET_S}
        return num_pending + posting + len(self._held)

    async def _count_held(self) -> None:
        """Set the outstanding held fills gauge, and ``meridian_ledger_db_up`` (at start and
        every HELD_COUNT_S, so an idle writer reports its database too, not only commits).
        Best effort: a database that does not answer, or a ledger not migrated, leaves the
        count as it was."""
        try:
            conn = await self._conn()
            async with conn.transaction(), conn.cursor() as cur:
                # on the posting connection, between batches: never for long
                await cur.execute("SET LOCAL statement_timeout = '2s'")
                await cur.execute(OUTSTANDING_COUNT_SQL, (self.region,))
                row = await cur.fetchone()
            self.metrics.held_outstanding.set(int(row[0]) if row else 0)  # type: ignore[index]
            self.metrics.db_up.set(1)
        except Exception as e:
            log.debug("ledger %s: could not count held fills: %s", self.region, e)
            # an error the server sent (a SQLSTATE): it answered; anything else: down
            answered = isinstance(e, psycopg.Error) and e.sqlstate is not None
            self.metrics.db_up.set(1 if answered else 0)
            # its own statement timeout leaves the connection sound (the transaction rolled
            # back): closing it would reconnect the posting path every HELD_COUNT_S
            if is_retryable(e) and not isinstance(e, psycopg.errors.QueryCanceled):
                await self._close_db()

    async def _top_up(self, psub: Any, room: int) -> list[Msg]:
        await asyncio.sleep(self.config.linger_s)
        try:
            return list(await psub.fetch(room, timeout=0.005))
        except Exception:  # nothing more within the window (or a reconnect): commit what we hold
            return []

    async def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(Exception):
                await db.close()

    async def _conn(self) -> psycopg.AsyncConnection[object]:
        if self._db is None or self._db.closed or self._db.broken:
            await self._close_db()
            db = await psycopg.AsyncConnection.connect(
                self.dsn,
                connect_timeout=3,
                application_name=f"ledger-writer-{self.region}",
                # a server gone without a word (a lost host, a blackholed link) is noticed in
                # seconds, not after TCP's ~15 minutes of retransmissions
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
                tcp_user_timeout=int(STATEMENT_TIMEOUT_S * 1000),
                autocommit=True,
            )
            # no statement may hang a batch for good (a lock behind a stuck session, a range
            # unavailable): it fails, is retried (a visible retry, in_progress sent), and stop
            # is honoured between attempts (PostgreSQL and CockroachDB both take it)
            await db.execute(f"SET statement_timeout = '{int(STATEMENT_TIMEOUT_S * 1000)}ms'")
            await db.set_autocommit(False)
            # amounts are posted in minor units from this topology: one that disagrees with
            # the ledger's currencies (a stale file) would scale them by powers of ten, for
            # good. Refuse to post at all (fills wait in EXECOUT), as post-held holds them
            bad = minor_units_disagree(await minor_units(db), self.topology)
            if bad:
                with contextlib.suppress(Exception):
                    await db.close()
                raise LedgerConfigError("topology", "; ".join(bad)[:500])
            self._db = db
        return self._db

    # ---- one batch -----------------------------------------------------------------------

    def parse(self, msg: Msg) -> tuple[Transfer, Transfer]:
        """Fill message -> its two transfers; raises ContractError or FillRejected."""
        fill = decode(Fill, msg.data)
        return transfers_for_fill(fill, self.topology, self.region, stream_seq=_seq(msg))

    async def _record_held(
        self, held: list[tuple[Msg, FillRejected | ContractError]]
    ) -> dict[int, str]:
        """Keep the held fills in the ledger's ``held_fills``, bytes and all; returns the
        stream sequences of those whose trade id is posted already, each with what differs
        between the fill and the trade posted ("" when they agree: ``post-held`` posted it
        from its row, the stream's copy is done with; else another fill holds the id).

        EXECOUT deletes a message after its max_age (7 days), held or not; the row outlives
        it, so compliance sees a trade missing from the books (``meridian ledger verify``)
        and ``meridian ledger post-held`` can post it from the row. Best effort: the stream
        still holds the fill, and its next hold (every HOLD_S) tries again."""
        now = time.time_ns()
        rows = []
        by_tid: dict[str, list[tuple[int, bytes]]] = {}
        for m, e in held:
            if not (seq := _seq(m)):
                continue  # not a stream message: nothing to find it by
            tid = held_trade_id(m.headers, m.data)
            if tid is not None:  # one trade may be held twice (re-sent past the dedup window)
                by_tid.setdefault(f"{tid}:base", []).append((seq, bytes(m.data)))
            rows.append(
                (
                    self.region,
                    seq,
                    tid,
                    m.subject[:200],
                    (getattr(e, "field", "") or "payload")[:64],
                    str(e)[:500],
                    bytes(m.data),
                    payload_digest(bytes(m.data)),
                    now,
                    now,
                )
            )
        if not rows:
            return {}
        try:
            conn = await self._conn()
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(UPSERT_SQL, rows)
                await cur.execute(POSTED_TRADES_SQL, (self.region, list(by_tid)))
                rows_posted: list[Any] = await cur.fetchall()
                return {
                    q: posted_terms_differ(data, r)
                    for r in rows_posted
                    for q, data in by_tid[str(r[0])]
                }
        except Exception as e:
            self.metrics.held_unrecorded.inc(len(rows))
            log.warning(
                "ledger %s: could not record %d held fills in held_fills (%s); "
                "they stay in the stream and are recorded at their next hold",
                self.region,
                len(rows),
                e,
            )
            if is_retryable(e):
                await self._close_db()
            return {}

    async def _hold(self, m: Msg, e: FillRejected | ContractError) -> None:
        """A fill this writer cannot post yet: a trade that happened, against a topology
        (account, pair, currency) it does not know, or in a contract version or with a field
        newer than its own (:func:`from_newer_build`), most likely because it runs an older
        topology or build than execution. Terminating it would drop a trade from the books of
        record; it is held instead (redelivered every HOLD_S, not acked), counted, logged and paged
        on, and posts once the writer runs with the topology. Held fills count against the
        consumer's max_ack_pending: thousands of them stop the region's posting, which the
        alert is there to prevent."""
        log.error(
            "ledger %s: cannot post fill on %s (%s); holding it, again in %.0f s",
            self.region,
            m.subject,
            e,
            HOLD_S,
        )
        self.metrics.held(e.field).inc()
        with contextlib.suppress(Exception):
            await m.nak(delay=HOLD_S)

    async def handle_batch(self, msgs: Sequence[Msg], stop: asyncio.Event) -> bool:
        """Post one fetched batch; acks only after commit. False when stopped before commit."""
        t_fetch = time.time_ns()
        good: list[Msg] = []
        held: list[tuple[Msg, FillRejected | ContractError]] = []
        transfers: list[Transfer] = []
        legs: dict[int, tuple[Transfer, Transfer]] = {}  # id(msg) -> its transfers
        for m in msgs:
            try:
                legs[id(m)] = self.parse(m)
                transfers.extend(legs[id(m)])
            except (ContractError, FillRejected) as e:
                if (isinstance(e, FillRejected) and not e.permanent) or from_newer_build(e):
                    held.append((m, e))
                    continue
                field = getattr(e, "field", "") or "payload"
                log.warning(
                    "ledger %s: terminating malformed fill on %s: %s", self.region, m.subject, e
                )
                self.metrics.rejected(field).inc()
                self._held.pop(_seq(m), None)
                with contextlib.suppress(Exception):
                    await m.term()
                continue
            good.append(m)
        if held:
            posted = await self._record_held(held)
            for m, why in held:
                if posted.get(_seq(m)):  # another fill holds its trade id: not this trade
                    self._held.pop(_seq(m), None)
                    log.error(
                        "ledger %s: terminating held fill on %s (seq %d): its trade id is "
                        "posted already with other terms (%s); the ledger keeps the fill "
                        "posted first",
                        self.region,
                        m.subject,
                        _seq(m),
                        posted[_seq(m)],
                    )
                    self.metrics.rejected("trade_id").inc()
                    with contextlib.suppress(Exception):
                        await m.term()
                elif _seq(m) in posted:
                    self._held.pop(_seq(m), None)
                    log.info(
                        "ledger %s: held fill on %s (seq %d) was posted from held_fills; acking",
                        self.region,
                        m.subject,
                        _seq(m),
                    )
                    with contextlib.suppress(Exception):
                        await m.ack()
                else:
                    if _seq(m):
                        self._held[_seq(m)] = time.monotonic()
                    await self._hold(m, why)
        if self._held:
            for m in good:  # held before (a fill the writer can post now), posting now
                self._held.pop(_seq(m), None)
        with contextlib.suppress(Exception):
            pending = int(msgs[-1].metadata.num_pending)
            self.metrics.backlog.set(self._backlog(pending, len(good)))
        if not good:
            return True
        while True:
            try:
                result = await self._commit_with_retry(transfers, good, stop)
                break
            except TransferConflict as e:
                # the batch posted nothing: drop the fills whose trade id is taken by
                # another fill (a trade id reused) and post the rest
                good = await self._reject_conflicts(good, legs, e)
                transfers = [t for m in good for t in legs[id(m)]]
                if not good:
                    return True
        if result is None:
            return False
        for m in good:
            with contextlib.suppress(Exception):
                await m.ack()
        if self.tracer is not None:
            self._trace(good, transfers, t_fetch, time.time_ns())
        self.committed_batches += 1
        self.metrics.batch_size.observe(len(good))
        self.metrics.postings.inc(result.postings)
        self.metrics.transfers.inc(result.transfers_new)
        self.metrics.replays.inc(result.transfers_replayed)
        return True

    async def _reject_conflicts(
        self, good: list[Msg], legs: dict[int, tuple[Transfer, Transfer]], e: TransferConflict
    ) -> list[Msg]:
        """Terminate the fills of ``e``, whose trade id another fill's transfers hold already
        (counted as a replay, such a fill would be missing from the books unnoticed): logged in
        full and counted as rejected, which pages. Not held: a hold ends when its trade id is
        in the books, which it is. Returns the other fills."""
        bad = {id(t): why for t, why in e.conflicts}
        keep: list[Msg] = []
        for m in good:
            whys = [bad[id(t)] for t in legs[id(m)] if id(t) in bad]
            if not whys:
                keep.append(m)
                continue
            log.error(
                "ledger %s: terminating fill on %s (seq %d): trade %s is posted already with "
                "other content (%s); the ledger keeps the fill posted first",
                self.region,
                m.subject,
                _seq(m),
                legs[id(m)][0].trade_id,
                "; ".join(whys),
            )
            self.metrics.rejected(e.field).inc()
            with contextlib.suppress(Exception):
                await m.term()
        if len(keep) == len(good):  # nothing of ours: do not loop on it
            raise e
        return keep

    def _trace(self, msgs: Sequence[Msg], transfers: list[Transfer], t0: int, t1: int) -> None:
        """One CONSUMER span per fill, child of the execution span that published it."""
        from opentelemetry.trace import SpanKind

        from ops.telemetry.tracing import ORDER_ID, extract

        by_trade = {t.trade_id: t for t in transfers}
        for m in msgs:
            hdrs = m.headers or {}
            if "traceparent" not in hdrs:
                continue
            trade_id = hdrs.get("Nats-Msg-Id", "")
            t = by_trade.get(trade_id)
            span = self.tracer.start_span(
                "process EXECOUT",
                context=extract(hdrs),
                kind=SpanKind.CONSUMER,
                start_time=t0,
                attributes={
                    "messaging.system": "nats",
                    "messaging.destination.name": m.subject,
                    "messaging.operation.type": "process",
                    "messaging.consumer.group.name": self.config.durable_name,
                    "meridian.trade_id": trade_id,
                    "meridian.ledger.region": self.region,
                    ORDER_ID: _aggressor_order(m.data) or (t.trade_id if t else ""),
                },
            )
            span.end(end_time=t1)

    async def _commit_with_retry(
        self, transfers: list[Transfer], held: Sequence[Msg], stop: asyncio.Event
    ) -> BatchResult | None:
        cfg = self.config
        last_progress = time.monotonic()

        async def before_sleep(state: RetryCallState) -> None:
            nonlocal last_progress
            exc = state.outcome.exception() if state.outcome else None
            sqlstate = getattr(exc, "sqlstate", None)
            kind = "serialization" if sqlstate in RETRY_SQLSTATES else "connection"
            self.metrics.retries(kind).inc()
            if kind == "connection":
                self.metrics.db_up.set(0)
                await self._close_db()
            if state.attempt_number in (1, 10) or state.attempt_number % 50 == 0:
                log.warning(
                    "ledger %s: batch of %d fills not committed (%s: %s), attempt %d",
                    self.region,
                    len(held),
                    kind,
                    exc,
                    state.attempt_number,
                )
            # Keep the held messages from being redelivered while the database is away.
            if time.monotonic() - last_progress > cfg.ack_wait_s / 3:
                last_progress = time.monotonic()
                for m in held:
                    with contextlib.suppress(Exception):
                        await m.in_progress()

        retrying = AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            wait=wait_exponential(multiplier=cfg.retry_initial_s, max=cfg.retry_max_s)
            + wait_random(0, cfg.retry_initial_s),
            stop=lambda _state: stop.is_set(),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    conn = await self._conn()
                    t0 = time.perf_counter()
                    result = await post_transfers(conn, self.region, transfers)
                    self.metrics.commit_latency.observe(time.perf_counter() - t0)
                    self.metrics.db_up.set(1)
                    return result
        except Exception as e:
            if stop.is_set() and is_retryable(e):
                log.warning(
                    "ledger %s: stopping with %d fills unacked (redelivered later)",
                    self.region,
                    len(held),
                )
                return None
            raise
        return None


# ---- entry point -------------------------------------------------------------------------


async def _amain(args: argparse.Namespace) -> None:
    topology = load_topology(args.topology)
    if args.migrate:
        from ledger.migrations import migrate

        await asyncio.to_thread(migrate, args.dsn, topology)
    registry = CollectorRegistry()
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr="127.0.0.1", registry=registry)
    tracer = None
    with contextlib.suppress(Exception):
        from ops.telemetry.logs import configure_logging
        from ops.telemetry.tracing import setup_tracing

        configure_logging(service="ledger", region=args.region)
        tr = setup_tracing(service="ledger", region=args.region)
        tracer = tr.tracer if tr.enabled else None
    writer = LedgerWriter(
        tracer=tracer,
        topology=topology,
        config=WriterConfig(
            region=args.region,
            batch_max=args.batch,
            durable=args.durable or "",
            linger_s=args.linger_ms / 1000,
        ),
        nats_url=args.nats,
        dsn=args.dsn,
        registry=registry,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from ops.telemetry.stalls import StallWatch

    watch = StallWatch(writer.metrics.loop_lag).start()
    task = asyncio.create_task(writer.run(stop))
    ready = asyncio.create_task(writer.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if writer.ready.is_set():
        print("READY", flush=True)  # the devstack waits for this line
        from ops.runtime import freeze_startup_objects

        freeze_startup_objects()
    try:
        await task
    finally:
        await watch.stop()


def _aggressor_order(data: bytes) -> str:
    try:
        f = decode(Fill, data)
    except Exception:
        return ""
    return f.buy_order_id if f.aggressor.value == "BUY" else f.sell_order_id


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ledger.writer --region lon --nats URL --dsn DSN``."""
    p = argparse.ArgumentParser(prog="ledger.writer", description=__doc__.split("\n")[0])
    p.add_argument("--region", required=True)
    p.add_argument("--nats", required=True, help="nats://user:pass@host:port of the region")
    p.add_argument("--dsn", required=True, help="postgresql:// or cockroachdb:// DSN")
    p.add_argument("--topology", default=None, help="topology TOML (default: shipped)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument(
        "--linger-ms",
        type=float,
        default=DEFAULT_LINGER_S * 1000,
        help="top up a short batch after this long (fewer, larger transactions); 0: off",
    )
    p.add_argument("--durable", default=None)
    p.add_argument("--metrics-port", type=int, default=0)
    p.add_argument("--migrate", action="store_true", help="run ledger migrations first")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from ops.runtime import run

    run(_amain(args))


if __name__ == "__main__":
    main()
