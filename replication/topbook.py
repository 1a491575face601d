"""Top of book per view region: a Redis read model fed by the market-data mesh (CQRS).

Redis layout (all values decimal strings; prices in integer ticks of the instrument)::

    tob:<view>:<symbol>   HASH  bid_px bid_qty ask_px ask_qty   best composite prices and the
                                                                size summed over LPs at them
                                bid_lp ask_lp                   LP(s) at best, "," separated
                                src                             source region of the quotes
                                seq src_ns                      newest quote applied
                                recv_ns                         when it arrived in <view> (for
                                                                a quote read from MDVIEW: when
                                                                the view stored it)
                                stale                           "1": not live (see below), "0"
    tobidx:<view>         SET   symbols that have a tob hash in <view>

Freshness, the rule for readers: ``stale`` is ``"1"`` while the symbol's source region is
reported silent, and from a (re)start until a live quote of the symbol arrives (what the
consumer bootstrapped from MDVIEW may be up to an hour old). ``src_ns`` is the source's own
clock: its age (:meth:`TopQuote.age_ns`) says how old the price is; ``recv_ns`` only says when
this view got it. A hash written by an older build has no ``stale`` field: judge it by age.

:meth:`TopOfBook.get` is one ``HGETALL``: the pre-trade collar pays one Redis round trip.

How the consumer reads (decision 0003): the *live path* is a core subscription to
``mrd.*.md.>`` in the view region (interest crosses the leaf links), because a live price must
not wait on JetStream sourcing, which can stall for ~40 s after a long link cut. ``MDVIEW`` is
the *recovery path*: at start the consumer takes the last quote per subject from it
(``DeliverPolicy.LAST_PER_SUBJECT``: conflated, never a backlog), and fills every gap from it.

* Conflation: arrivals are buffered by the subscription callback and drained in batches; every
  quote updates the in-memory per-LP state, but each batch writes one ``HSET`` per changed
  symbol in a single pipeline, so a burst costs Redis one write per symbol.
* Composite: best bid is the highest top-tier bid over the LPs' latest quotes (LP quotes older
  than ``lp_ttl_s`` behind the newest are ignored), best ask the lowest; if that composite is
  crossed, the newest quote's own top level is used instead.
* Gaps: per (source, symbol) the consumer expects ``seq + 1``. A jump opens a gap: counted
  (``meridian_md_gaps_total``, ``meridian_md_gap_quotes_total``), logged, and filled by an
  ordered consumer on ``MDVIEW`` filtered to that subject, from the gap's source time, retried
  until the view holds the missing range (``recover_timeout_s``); whatever the view cannot
  supply is counted as unrecovered and logged as an error, never skipped silently.
  A source that goes quiet for ``stale_after_s`` (a cut link, a dead region; from the start on,
  so a source already down when the consumer starts counts too) is an *open* gap: reported at
  once (``meridian_md_stale_total``, gauge ``meridian_md_source_stale``, a warning, ``stale`` in
  its hashes) because its size is only known once quotes flow again.
* Re-baseline (``meridian_md_rebaselines_total``, an error log): a quote whose seq is at or
  below the newest but whose ``src_ns`` is newer (the feed restarted its seqs), or a jump of
  more than ``max_gap_quotes``, starts (source, symbol) over at that quote: seqs and LP book
  are reset, open gaps of the old baseline are counted as unrecovered. Only quotes taken
  (not duplicates) count as a sign of life.
* Lag: arrival (``recv_ns`` taken in the subscription callback) minus ``src_ns`` per live quote,
  per directed link ``"<source>-><view>"`` (see :mod:`replication.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import redis.asyncio as aioredis
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy

from replication.errors import QuoteRejected
from replication.metrics import MdMetrics, link_name
from replication.validate import validate_quote
from replication.view import VIEW_STREAM
from router import subjects
from router.contract import Quote

log = logging.getLogger(__name__)

MD_WILDCARD = f"{subjects.PREFIX}.*.md.>"

MAX_GAP_QUOTES = 100_000
"""Most seqs one (source, symbol) may have missing at once. MDVIEW keeps 10,000 quotes per
subject, so a larger jump cannot be filled message by message anyway; it is a re-baseline (a
restarted or bogus seq), counted and logged as an error, never a set of 2**62 ints."""

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def tob_key(view: str, symbol: str) -> str:
    return f"tob:{view}:{symbol}"


def tob_index_key(view: str) -> str:
    return f"tobidx:{view}"


# ---- reader ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TopQuote:
    """Best bid/ask of one symbol as seen from one view region."""

    view: str
    symbol: str
    src: str
    """Region whose feed produced the prices."""
    bid_px: int
    bid_qty: int
    ask_px: int
    ask_qty: int
    bid_lp: str
    ask_lp: str
    seq: int
    """Sequence of the newest quote applied."""
    src_ns: int
    recv_ns: int
    stale: bool = False
    """The source is silent, or no live quote of the symbol arrived since the consumer started."""

    @property
    def mid_x2(self) -> int:
        """bid + ask (twice the mid, still in integer ticks)."""
        return self.bid_px + self.ask_px

    def age_ns(self, now_ns: int | None = None) -> int:
        return (now_ns if now_ns is not None else time.time_ns()) - self.src_ns


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class TopOfBook:
    """Reads the top-of-book read model (one ``HGETALL`` per lookup).

    Args:
        redis: An asyncio Redis client (``decode_responses`` either way).
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self._r = redis

    async def get(self, view_region: str, symbol: str) -> TopQuote | None:
        """Top of book of ``symbol`` in ``view_region``, or ``None`` if never quoted there."""
        raw = await self._r.hgetall(tob_key(view_region, symbol))
        if not raw:
            return None
        h = {_s(k): _s(v) for k, v in raw.items()}
        return TopQuote(
            view=view_region,
            symbol=symbol,
            src=h["src"],
            bid_px=int(h["bid_px"]),
            bid_qty=int(h["bid_qty"]),
            ask_px=int(h["ask_px"]),
            ask_qty=int(h["ask_qty"]),
            bid_lp=h.get("bid_lp", ""),
            ask_lp=h.get("ask_lp", ""),
            seq=int(h["seq"]),
            src_ns=int(h["src_ns"]),
            recv_ns=int(h["recv_ns"]),
            stale=h.get("stale", "0") == "1",
        )

    async def symbols(self, view_region: str) -> list[str]:
        """Every symbol with a top of book in ``view_region``."""
        return sorted(_s(s) for s in await self._r.smembers(tob_index_key(view_region)))


# ---- consumer ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Track:
    last_seq: int
    last_src_ns: int
    missing: set[int] = field(default_factory=set)
    """Open gaps, at most ``max_gap_quotes`` seqs."""
    gap_from_ns: int = 0
    """src_ns of the last quote before the oldest open gap (where recovery starts reading)."""


@dataclass(slots=True)
class _LpTop:
    seq: int
    bid_px: int
    bid_qty: int
    ask_px: int
    ask_qty: int
    src_ns: int


@dataclass(slots=True)
class _Book:
    src: str
    lps: dict[str, _LpTop] = field(default_factory=dict)
    newest: Quote | None = None
    recv_ns: int = 0
    live: bool = False
    """A quote from the live path was applied (else only MDVIEW's, maybe an hour old)."""


@dataclass(slots=True)
class ConsumerStats:
    applied: int = 0
    rejected: int = 0
    duplicates: int = 0
    gaps: int = 0
    gap_quotes: int = 0
    recovered: int = 0
    unrecovered: int = 0
    stale_reports: int = 0
    rebaselines: int = 0
    redis_writes: int = 0
    batches: int = 0


class TopBookConsumer:
    """Maintains ``tob:<view>:*`` in Redis from the live subjects, with gap recovery from MDVIEW.

    Args:
        nc: Client connected to the view region's server.
        redis: Asyncio Redis client of the read model.
        view: The view region code.
        regions: Region codes accepted as sources (the topology's); each is watched from start.
        metrics: Where counters and lag go.
        exec_regions: ``symbol -> executing region`` (``validate.executing_regions``); quotes
            of other symbols, or from another region, are rejected. ``None``: not checked.
        stale_after_s: Silence after which a source is reported stale (from start on).
        lp_ttl_s: LP quotes older than this behind the symbol's newest leave the composite.
        recover_timeout_s: How long a gap may wait for MDVIEW to hold the missing quotes.
        max_gap_quotes: Larger seq jumps re-baseline instead of opening a gap.
    """

    def __init__(
        self,
        nc: Client,
        redis: aioredis.Redis,
        *,
        view: str,
        regions: tuple[str, ...],
        metrics: MdMetrics,
        exec_regions: Mapping[str, str] | None = None,
        stale_after_s: float = 1.0,
        lp_ttl_s: float = 5.0,
        recover_timeout_s: float = 90.0,
        max_gap_quotes: int = MAX_GAP_QUOTES,
    ) -> None:
        self.nc, self.redis, self.view = nc, redis, view
        self.regions = regions
        self.exec_regions = exec_regions
        # the sources watched for silence: the regions that execute (so quote) something, when
        # known; a region that executes nothing publishes nothing and is never stale
        self._watched = (
            tuple(r for r in regions if r in set(exec_regions.values()))
            if exec_regions is not None
            else regions
        )
        self.metrics = metrics
        self.max_gap_quotes = max_gap_quotes
        self.stats = ConsumerStats()
        self.stale_after_ns = int(stale_after_s * 1e9)
        self.lp_ttl_ns = int(lp_ttl_s * 1e9)
        self.recover_timeout_s = recover_timeout_s
        self._js = nc.jetstream(domain=view)
        self._buf: list[tuple[str, bytes, int]] = []
        self._wake = asyncio.Event()
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._books: dict[tuple[str, str], _Book] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._started_ns = time.time_ns()
        """A source never heard live counts as silent since then."""
        self._last_live_ns: dict[str, int] = {}
        self._stale: dict[str, int] = {}
        """source -> ns when it was reported stale."""
        self._recovering: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reject_logged = 0.0
        self._rebaseline_logged = 0.0
        self._closing = False

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe the live path, load the last quote per subject from MDVIEW, then run."""
        self._started_ns = time.time_ns()
        self._sub = await self.nc.subscribe(
            MD_WILDCARD, cb=self._on_msg, pending_msgs_limit=1_000_000, pending_bytes_limit=-1
        )
        await self._bootstrap()
        self._tasks = [
            asyncio.create_task(self._run(), name=f"tob-{self.view}"),
            asyncio.create_task(self._watch(), name=f"tob-watch-{self.view}"),
        ]

    async def stop(self, timeout_s: float = 3.0) -> None:
        """Unsubscribe, write what is pending to Redis, stop the tasks (bounded by timeouts)."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sub.unsubscribe(), timeout_s)
            self._sub = None
        others = [t for t in self._tasks if t.get_name() != f"tob-{self.view}"]
        others += list(self._recovering.values())
        for t in others:
            t.cancel()
        # the batch loop exits on its own after a last flush: a cancel in the middle of a
        # Redis pipeline could leave the connection mid-reply
        self._closing = True
        self._wake.set()
        runner = [t for t in self._tasks if t not in others]
        if runner:
            _done, pending = await asyncio.wait(runner, timeout=timeout_s)
            for t in pending:
                t.cancel()
        if others:
            await asyncio.wait(others, timeout=timeout_s)
        self._tasks.clear()
        self._recovering.clear()

    def stale_sources(self) -> dict[str, float]:
        """Sources silent right now -> seconds since their last live quote."""
        now = time.time_ns()
        return {s: (now - self._last_live_ns.get(s, self._started_ns)) / 1e9 for s in self._stale}

    def open_gaps(self) -> dict[str, int]:
        """``"<source>:<symbol>"`` -> quotes still missing."""
        return {f"{k[0]}:{k[1]}": len(t.missing) for k, t in self._tracks.items() if t.missing}

    def last_seq(self, source: str, symbol: str) -> int | None:
        t = self._tracks.get((source, symbol))
        return None if t is None else t.last_seq

    def snapshot(self) -> dict[str, Any]:
        """Stats as JSON-able data (the ``md lag`` file)."""
        return {
            "view": self.view,
            "updated_ns": time.time_ns(),
            "links": {k: v.to_json() for k, v in self.metrics.lag().items()},
            "stats": dataclasses.asdict(self.stats),
            "stale": self.stale_sources(),
            "open_gaps": self.open_gaps(),
        }

    def write_snapshot(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=1))
        tmp.replace(p)

    # ---- live path -------------------------------------------------------------------------
    async def _on_msg(self, msg: Msg) -> None:
        self._buf.append((msg.subject, msg.data, time.time_ns()))
        self._wake.set()

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            batch, self._buf = self._buf, []
            for subject, data, recv_ns in batch:
                self._ingest(subject, data, recv_ns, live=True)
            try:
                await self._flush()
            except Exception as e:  # Redis down: keep the state, retry on the next batch
                log.warning("top-of-book write failed (%r); retrying", e)
                if self._closing:
                    return
                await asyncio.sleep(0.2)
                self._wake.set()
            self.stats.batches += 1

    def _ingest(self, subject: str, data: bytes, recv_ns: int, *, live: bool) -> None:
        try:
            q = validate_quote(
                subject,
                data,
                regions=self.regions,
                exec_regions=self.exec_regions,
                now_ns=time.time_ns(),
            )
        except QuoteRejected as e:
            self.stats.rejected += 1
            self.metrics.rejected.labels(e.reason).inc()
            now = time.monotonic()
            if now - self._reject_logged > 1.0:  # a flood of garbage must not flood the log
                self._reject_logged = now
                log.warning("md quote rejected on %s: %s", subject, e)
            return
        src, key = q.region, (q.region, q.symbol)
        link = link_name(src, self.view)
        t = self._tracks.get(key)
        if t is None:
            self._tracks[key] = _Track(last_seq=q.seq, last_src_ns=q.src_ns)
        elif q.seq == t.last_seq + 1:
            t.last_seq, t.last_src_ns = q.seq, q.src_ns
        elif q.seq > t.last_seq + 1:
            lo, hi = t.last_seq + 1, q.seq - 1
            n = hi - lo + 1
            if n > self.max_gap_quotes - len(t.missing):
                self._rebaseline(key, t, q, f"seq jumped by {n} after {t.last_seq}")
            else:
                if not t.missing:
                    t.gap_from_ns = t.last_src_ns
                t.missing.update(range(lo, hi + 1))
                t.last_seq, t.last_src_ns = q.seq, q.src_ns
                self.stats.gaps += 1
                self.stats.gap_quotes += n
                self.metrics.gaps.labels(link).inc()
                self.metrics.gap_quotes.labels(link).inc(n)
                log.warning(
                    "md gap %s %s: seq %d..%d missing (%d); recovering", link, q.symbol, lo, hi, n
                )
                if key not in self._recovering:
                    self._recovering[key] = asyncio.create_task(self._recover(key))
        elif q.src_ns > t.last_src_ns:
            # seq at or below the newest yet stamped later than it: the feed restarted its seqs
            # (MD history expired, stream recreated) or the newest was not its quote (a bogus
            # jump). A reorder, a late gap fill or a duplicate is never newer than the newest.
            self._rebaseline(key, t, q, f"seq {q.seq} after {t.last_seq} with a newer src_ns")
        elif q.seq in t.missing:
            t.missing.discard(q.seq)
            self.stats.recovered += 1
            self.metrics.recovered.labels(link).inc()
        else:
            self.stats.duplicates += 1
            self.metrics.duplicates.labels(link).inc()
            return
        if live:  # only a quote taken proves the source alive (a frozen feed repeats itself)
            self._heard(src, link, recv_ns)
            self.stats.applied += 1
            self.metrics.quotes.labels(link).inc()
            self.metrics.observe_lag(link, recv_ns - q.src_ns)
        self._apply(q, recv_ns, live=live)

    def _heard(self, src: str, link: str, recv_ns: int) -> None:
        last = self._last_live_ns.get(src, self._started_ns)
        self._last_live_ns[src] = recv_ns
        if src in self._stale:
            del self._stale[src]
            self.metrics.source_stale.labels(link).set(0)
            log.warning(
                "md source %s resumed after ~%.1f s of silence", link, (recv_ns - last) / 1e9
            )
            self._mark_dirty(src)  # rewrite stale=0 on its symbols

    def _rebaseline(self, key: tuple[str, str], t: _Track, q: Quote, why: str) -> None:
        """Start (source, symbol) over at ``q``: a new seq baseline and a new book."""
        link = link_name(key[0], self.view)
        lost = len(t.missing)
        if lost:  # seqs of the old baseline: ambiguous now, no longer recoverable
            self.stats.unrecovered += lost
            self.metrics.unrecovered.labels(link).inc(lost)
            t.missing.clear()
        task = self._recovering.pop(key, None)
        if task is not None:
            task.cancel()
        t.last_seq, t.last_src_ns = q.seq, q.src_ns
        book = self._books.get(key)
        if book is not None:  # LP quotes of the old baseline carry seqs the new one will reuse
            book.lps.clear()
            book.newest, book.live = None, False
        self.stats.rebaselines += 1
        self.metrics.rebaselines.labels(link).inc()
        now = time.monotonic()
        if now - self._rebaseline_logged > 1.0:  # two feeds on one subject would do it per quote
            self._rebaseline_logged = now
            log.error(
                "md feed %s %s re-baselined at seq %d: %s (%d open-gap quotes dropped)",
                link, key[1], q.seq, why, lost,
            )  # fmt: skip

    def _mark_dirty(self, src: str) -> None:
        for key, book in self._books.items():
            if key[0] == src and book.newest is not None:
                self._dirty.add(key)
        self._wake.set()

    def _apply(self, q: Quote, recv_ns: int, *, live: bool) -> None:
        key = (q.region, q.symbol)
        book = self._books.get(key)
        if book is None:
            book = self._books[key] = _Book(src=q.region)
        cur = book.lps.get(q.lp)
        if cur is None or q.seq > cur.seq:
            (bp, bq), (ap, aq) = q.bids[0], q.asks[0]
            book.lps[q.lp] = _LpTop(
                seq=q.seq, bid_px=bp, bid_qty=bq, ask_px=ap, ask_qty=aq, src_ns=q.src_ns
            )
        if book.newest is None or q.seq > book.newest.seq:
            book.newest, book.recv_ns = q, recv_ns
        book.live = book.live or live
        self._dirty.add(key)

    def _composite(self, book: _Book) -> dict[Any, Any]:
        newest = book.newest
        assert newest is not None
        fresh = {lp: t for lp, t in book.lps.items() if newest.src_ns - t.src_ns <= self.lp_ttl_ns}
        bid = max(t.bid_px for t in fresh.values())
        ask = min(t.ask_px for t in fresh.values())
        if bid < ask:
            bid_lps = sorted(lp for lp, t in fresh.items() if t.bid_px == bid)
            ask_lps = sorted(lp for lp, t in fresh.items() if t.ask_px == ask)
            bid_qty = sum(fresh[lp].bid_qty for lp in bid_lps)
            ask_qty = sum(fresh[lp].ask_qty for lp in ask_lps)
        else:  # LPs quoted at different moments and now cross: trust the newest quote alone
            (bid, bid_qty), (ask, ask_qty) = newest.bids[0], newest.asks[0]
            bid_lps = ask_lps = [newest.lp]
        return {
            "bid_px": bid,
            "bid_qty": bid_qty,
            "ask_px": ask,
            "ask_qty": ask_qty,
            "bid_lp": ",".join(bid_lps),
            "ask_lp": ",".join(ask_lps),
            "src": book.src,
            "seq": newest.seq,
            "src_ns": newest.src_ns,
            "recv_ns": book.recv_ns,
            "stale": int(book.src in self._stale or not book.live),
        }

    async def _flush(self) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for src, sym in dirty:
                    pipe.hset(
                        tob_key(self.view, sym), mapping=self._composite(self._books[(src, sym)])
                    )
                # re-added on every flush, not cached: Redis may have restarted empty since
                # (the hashes are rewritten whole each time, the index must be too)
                pipe.sadd(tob_index_key(self.view), *sorted({sym for _, sym in dirty}))
                await pipe.execute()
        except BaseException:
            self._dirty |= dirty
            raise
        self.stats.redis_writes += len(dirty)

    # ---- recovery path ---------------------------------------------------------------------
    async def _bootstrap(self) -> None:
        """The newest quote of every subject in MDVIEW (conflated: one per subject)."""
        try:
            info = await self._js.stream_info(VIEW_STREAM)
        except Exception as e:
            log.warning("MDVIEW not readable in %s (%r): starting from live quotes", self.view, e)
            return
        if not info.state.messages:
            return
        sub = await self._js.subscribe(
            MD_WILDCARD,
            stream=VIEW_STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        try:
            while True:
                msg = await sub.next_msg(timeout=2.0)
                self._ingest(msg.subject, msg.data, _stored_ns(msg), live=False)
                if msg.metadata.num_pending == 0:
                    break
        except nats.errors.TimeoutError:
            log.warning("MDVIEW bootstrap in %s timed out; continuing live", self.view)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        try:
            await self._flush()
        except Exception as e:  # Redis down must not stop the region's feed: the loop retries
            log.warning("top-of-book write after bootstrap failed (%r); retrying", e)
            self._wake.set()

    async def _recover(self, key: tuple[str, str]) -> None:
        src, sym = key
        t = self._tracks[key]
        link = link_name(src, self.view)
        subject = subjects.md(src, sym)
        deadline = time.monotonic() + self.recover_timeout_s
        next_seq: int | None = None
        try:
            while t.missing and time.monotonic() < deadline:
                if next_seq is None:  # margin: stored time >= src_ns, clocks may differ a little
                    start = datetime.datetime.fromtimestamp(
                        t.gap_from_ns / 1e9 - 2.0, tz=datetime.UTC
                    )
                    cfg = ConsumerConfig(
                        deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start
                    )
                else:
                    cfg = ConsumerConfig(
                        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=next_seq
                    )
                try:
                    sub = await self._js.subscribe(
                        subject, stream=VIEW_STREAM, ordered_consumer=True, config=cfg
                    )
                except Exception as e:
                    log.warning("md recovery %s %s: cannot read MDVIEW (%r)", link, sym, e)
                    await asyncio.sleep(1.0)
                    continue
                try:
                    while t.missing:
                        msg = await sub.next_msg(timeout=1.0)
                        next_seq = msg.metadata.sequence.stream + 1
                        self._ingest(msg.subject, msg.data, _stored_ns(msg), live=False)
                        if msg.metadata.num_pending == 0:
                            break
                except nats.errors.TimeoutError:
                    pass
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                self._wake.set()  # flush what was applied
                if t.missing:
                    await asyncio.sleep(0.5)  # the view is still catching up
            if t.missing:
                n = len(t.missing)
                self.stats.unrecovered += n
                self.metrics.unrecovered.labels(link).inc(n)
                log.error(
                    "md gap %s %s: %d quotes not in MDVIEW after %.0f s (seq %d..%d)",
                    link, sym, n, self.recover_timeout_s, min(t.missing), max(t.missing),
                )  # fmt: skip
                t.missing.clear()
            else:
                log.info("md gap %s %s recovered from MDVIEW", link, sym)
        finally:
            if self._recovering.get(key) is asyncio.current_task():  # not a successor's
                del self._recovering[key]

    async def _watch(self) -> None:
        """Reports a silent source (an open gap); every source counts from the start, so one
        that is down when the consumer (re)starts is reported too."""
        while True:
            await asyncio.sleep(0.1)
            now = time.time_ns()
            for src in self._watched:
                last = self._last_live_ns.get(src, self._started_ns)
                if src in self._stale or now - last <= self.stale_after_ns:
                    continue
                self._stale[src] = now
                link = link_name(src, self.view)
                self.stats.stale_reports += 1
                self.metrics.stale.labels(link).inc()
                self.metrics.source_stale.labels(link).set(1)
                self._mark_dirty(src)  # write stale=1 on its symbols
                last_seqs: Mapping[str, int] = {
                    sym: t.last_seq for (s, sym), t in self._tracks.items() if s == src
                }
                log.warning(
                    "md source %s silent for %.1f s: open gap after %s",
                    link, (now - last) / 1e9, last_seqs,
                )  # fmt: skip


def _stored_ns(msg: Msg) -> int:
    """When the view stored ``msg`` (UTC ns): the honest arrival time of a quote it replays."""
    try:
        ts = msg.metadata.timestamp
    except nats.errors.NotJSMessageError:
        return time.time_ns()
    return (ts - _EPOCH) // datetime.timedelta(microseconds=1) * 1000
