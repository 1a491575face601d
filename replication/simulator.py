"""A realistic FX quote simulator, a CSV recorder/replayer of its ticks, and the region feed.

Simulation (deterministic for a given seed and clock): every symbol's mid follows a geometric
random walk with the pair's annualised volatility; each step one liquidity provider (LP)
re-quotes the symbol around the mid with its own spread multiplier and a small skew, in tiers of
size (1M / 5M / 10M by default, capped by the instrument's ``max_qty``), wider per tier. Prices
are integer ticks (``Instrument.price_decimals``); spreads are given in pips (0.0001, or 0.01 for
JPY-quoted pairs). Each quote carries a per-(region, symbol) ``seq`` from 1 and ``src_ns``.

Tick file (``record`` / ``ReplaySource``), CSV with a header row, one quote per row::

    src_ns,region,symbol,lp,seq,bids,asks
    1714000000000000000,lon,EURUSD,LP-A,1,108449:1000000|108448:5000000,108451:1000000|...

``bids`` and ``asks`` are ``price_ticks:qty`` levels, best first, joined by ``|``.

:class:`Feed` publishes a source's quotes into the region's ``MD`` stream on
``mrd.<region>.md.<symbol>`` at a paced rate, pipelined (``publish_async``, a bounded number in
flight), with ``Nats-Msg-Id = <region>:<symbol>:<seq>`` so a retried publish is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

import nats
from nats.aio.client import Client
from nats.js.errors import APIError, NotFoundError

from regions.topology import Instrument
from replication.errors import ReplayError, ResumeError
from router import subjects
from router.contract import ContractError, Quote, decode, encode

log = logging.getLogger(__name__)

MD_STREAM = "MD"
TICK_COLUMNS = ("src_ns", "region", "symbol", "lp", "seq", "bids", "asks")
_YEAR_S = 365.0 * 86400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PairProfile:
    """How one pair moves and is quoted."""

    ref_mid: str
    """Starting mid as a decimal string, e.g. ``"1.08450"``."""
    annual_vol: float
    """Annualised volatility of the mid (0.07 = 7 %)."""
    spread_pips: float
    """Top-tier spread of the tightest LP, in pips."""


PROFILES: Mapping[str, PairProfile] = {
    "EURUSD": PairProfile(ref_mid="1.08450", annual_vol=0.07, spread_pips=0.2),
    "GBPUSD": PairProfile(ref_mid="1.26800", annual_vol=0.08, spread_pips=0.4),
    "EURGBP": PairProfile(ref_mid="0.85520", annual_vol=0.05, spread_pips=0.5),
    "EURCHF": PairProfile(ref_mid="0.95800", annual_vol=0.06, spread_pips=0.8),
    "USDCAD": PairProfile(ref_mid="1.36600", annual_vol=0.06, spread_pips=0.5),
    "USDMXN": PairProfile(ref_mid="17.05000", annual_vol=0.13, spread_pips=30.0),
    "USDJPY": PairProfile(ref_mid="151.250", annual_vol=0.09, spread_pips=0.3),
    "USDSGD": PairProfile(ref_mid="1.34200", annual_vol=0.04, spread_pips=1.5),
    "AUDUSD": PairProfile(ref_mid="0.65500", annual_vol=0.10, spread_pips=0.3),
}
"""Reference profiles of the shipped topology's pairs (mid levels of spring 2024)."""

DEFAULT_PROFILE = PairProfile(ref_mid="1.00000", annual_vol=0.08, spread_pips=1.0)
"""Profile of a pair not in :data:`PROFILES` (test symbols)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LiquidityProvider:
    name: str
    spread_mult: float
    """Multiplier on the pair's top-tier spread (1.0 = the tightest LP)."""
    max_skew_pips: float = 0.1
    """Largest random skew of the LP's mid, in pips."""


DEFAULT_LPS: tuple[LiquidityProvider, ...] = (
    LiquidityProvider(name="LP-A", spread_mult=1.0),
    LiquidityProvider(name="LP-B", spread_mult=1.25),
    LiquidityProvider(name="LP-C", spread_mult=1.6),
    LiquidityProvider(name="LP-D", spread_mult=2.2, max_skew_pips=0.2),
)
DEFAULT_TIERS: tuple[int, ...] = (1_000_000, 5_000_000, 10_000_000)
"""Tier sizes in base-currency units; each tier widens the spread (see ``_TIER_WIDEN``)."""
_TIER_WIDEN = (1.0, 1.6, 2.5, 3.5, 5.0)


def pip_ticks(instrument: Instrument) -> int:
    """Ticks per pip: a pip is 0.01 for JPY-quoted pairs, 0.0001 otherwise."""
    pip_decimals = 2 if instrument.quote == "JPY" else 4
    return int(10 ** max(instrument.price_decimals - pip_decimals, 0))


class QuoteSource(Protocol):
    """Anything the :class:`Feed` can publish from."""

    region: str

    def next_quote(self) -> Quote | None:
        """The next quote, stamped now; ``None`` when the source is exhausted."""
        ...

    def resume(self, symbol: str, last: Quote) -> None:
        """Continue ``symbol`` after ``last`` (the newest quote already in the stream)."""
        ...


@dataclass(slots=True)
class _PairState:
    instrument: Instrument
    profile: PairProfile
    pip: int
    mid: float
    """Mid in ticks (a float: the walk is continuous, quotes are rounded to ticks)."""
    seq: int = 0


class QuoteSimulator:
    """Deterministic tiered multi-LP quote generator for one region's symbols.

    Args:
        region: Publishing region code.
        instruments: The symbols to quote (usually ``Region.executes`` of the topology).
        seed: Seed of the random walk and LP choice; same seed + same clock = same quotes.
        profiles: Per-symbol profiles (default :data:`PROFILES`, else :data:`DEFAULT_PROFILE`).
        lps: Liquidity providers.
        tiers: Size of each tier, best first.
        step_s: Simulated time one symbol's mid moves per quote (sets the per-step volatility).
        clock_ns: Source of ``src_ns`` (UTC ns); pass a counter for fully reproducible output.
    """

    def __init__(
        self,
        *,
        region: str,
        instruments: Sequence[Instrument],
        seed: int = 0,
        profiles: Mapping[str, PairProfile] = PROFILES,
        lps: Sequence[LiquidityProvider] = DEFAULT_LPS,
        tiers: Sequence[int] = DEFAULT_TIERS,
        step_s: float = 0.1,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if not instruments:
            raise ValueError("instruments: at least one symbol is required")
        if not lps or not tiers or len(tiers) > len(_TIER_WIDEN):
            raise ValueError(f"need >= 1 LP and 1..{len(_TIER_WIDEN)} tiers")
        self.region = region
        self._rng = random.Random(seed)
        self._lps = tuple(lps)
        self._tiers = tuple(tiers)
        self._clock = clock_ns
        self._step_sd = math.sqrt(step_s / _YEAR_S)
        self._pairs: list[_PairState] = []
        for ins in instruments:
            prof = profiles.get(ins.symbol, DEFAULT_PROFILE)
            self._pairs.append(
                _PairState(
                    instrument=ins,
                    profile=prof,
                    pip=pip_ticks(ins),
                    mid=float(ins.parse_price(prof.ref_mid)),
                )
            )
        self._by_symbol = {p.instrument.symbol: p for p in self._pairs}
        self._next = 0

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(self._by_symbol)

    def next_quote(self) -> Quote:
        """The next quote, symbols in round-robin order."""
        pair = self._pairs[self._next]
        self._next = (self._next + 1) % len(self._pairs)
        return self._step(pair)

    def quote(self, symbol: str) -> Quote:
        """The next quote of ``symbol``."""
        return self._step(self._by_symbol[symbol])

    def take(self, n: int) -> list[Quote]:
        return [self.next_quote() for _ in range(n)]

    def resume(self, symbol: str, last: Quote) -> None:
        """Continue after ``last``: next seq is ``last.seq + 1``, the mid starts at its mid."""
        pair = self._by_symbol.get(symbol)
        if pair is None:
            return
        pair.seq = last.seq
        if last.bids and last.asks:
            pair.mid = (last.bids[0][0] + last.asks[0][0]) / 2.0

    def _step(self, pair: _PairState) -> Quote:
        rng = self._rng
        vol = pair.profile.annual_vol
        # geometric walk, never below 100 pips
        pair.mid = max(
            pair.mid * math.exp(vol * self._step_sd * rng.gauss(0.0, 1.0)), 100.0 * pair.pip
        )
        lp = self._lps[rng.randrange(len(self._lps))]
        mid = pair.mid + rng.uniform(-lp.max_skew_pips, lp.max_skew_pips) * pair.pip
        half = pair.profile.spread_pips * lp.spread_mult * pair.pip / 2.0
        ins = pair.instrument
        bids: list[tuple[int, int]] = []
        asks: list[tuple[int, int]] = []
        for i, size in enumerate(self._tiers):
            h = half * _TIER_WIDEN[i]
            bid = math.floor(mid - h)
            ask = max(math.ceil(mid + h), bid + 1)
            if bids and bid >= bids[-1][0]:
                bid = bids[-1][0] - 1
            if asks and ask <= asks[-1][0]:
                ask = asks[-1][0] + 1
            qty = min(max(size, ins.min_qty), ins.max_qty)
            bids.append((max(bid, 1), qty))
            asks.append((ask, qty))
        pair.seq += 1
        return Quote(
            symbol=ins.symbol,
            region=self.region,
            lp=lp.name,
            seq=pair.seq,
            bids=tuple(bids),
            asks=tuple(asks),
            src_ns=self._clock(),
        )


# ---- tick files ----------------------------------------------------------------------------


def _levels_text(levels: Iterable[tuple[int, int]]) -> str:
    return "|".join(f"{px}:{qty}" for px, qty in levels)


def _parse_levels(text: str) -> list[list[int]]:
    if not text:
        return []
    out = []
    for lvl in text.split("|"):
        px, _, qty = lvl.partition(":")
        out.append([int(px), int(qty)])
    return out


def record(quotes: Iterable[Quote], path: str | Path) -> int:
    """Write ``quotes`` as a tick file (columns :data:`TICK_COLUMNS`); returns the row count."""
    n = 0
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TICK_COLUMNS)
        for q in quotes:
            w.writerow(
                (
                    q.src_ns,
                    q.region,
                    q.symbol,
                    q.lp,
                    q.seq,
                    _levels_text(q.bids),
                    _levels_text(q.asks),
                )
            )
            n += 1
    return n


def check_ticks(path: str | Path) -> None:
    """Raise :class:`ReplayError` now if ``path`` cannot be opened or has the wrong header.

    :func:`read_ticks` is lazy: without this a missing file would only fail once the feed
    asks for its first quote, after the service reported READY.
    """
    p = Path(path)
    try:
        with p.open(newline="") as f:
            _check_header(p, csv.reader(f))
    except OSError as e:
        raise ReplayError(p, 0, f"cannot open: {e.strerror or e}") from e


def _check_header(p: Path, r: Iterator[list[str]]) -> None:
    header = next(r, None)
    if header is None or tuple(header) != TICK_COLUMNS:
        raise ReplayError(p, 1, f"header must be {','.join(TICK_COLUMNS)}")


def read_ticks(path: str | Path) -> Iterator[Quote]:
    """Every quote of a tick file, validated against the contract, in file order."""
    p = Path(path)
    with p.open(newline="") as f:
        r = csv.reader(f)
        _check_header(p, r)
        for lineno, row in enumerate(r, start=2):
            if len(row) != len(TICK_COLUMNS):
                raise ReplayError(p, lineno, f"expected {len(TICK_COLUMNS)} columns")
            src_ns, region, symbol, lp, seq, bids, asks = row
            try:
                raw = {
                    "v": 1,
                    "symbol": symbol,
                    "region": region,
                    "lp": lp,
                    "seq": int(seq),
                    "bids": _parse_levels(bids),
                    "asks": _parse_levels(asks),
                    "src_ns": int(src_ns),
                }
                yield decode(Quote, raw)
            except ValueError as e:  # int() or ContractError (a ValueError)
                field_ = e.field if isinstance(e, ContractError) else ""
                raise ReplayError(p, lineno, f"{field_}: {e}".strip(": ")) from e


class ReplaySource:
    """Replays one region's quotes from a tick file, in file order.

    Args:
        path: Tick file (opened and its header checked at once: :class:`ReplayError`).
        region: Only this region's rows are replayed.
        retime: Stamp ``src_ns`` with the clock at replay (lag then measures this run); else the
            recorded ``src_ns`` is kept (a bit-for-bit reproduction of the recording).
        clock_ns: Clock used when ``retime``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        region: str,
        retime: bool = True,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.region = region
        check_ticks(path)
        self._it = (q for q in read_ticks(path) if q.region == region)
        self._retime = retime
        self._clock = clock_ns
        self._offset: dict[str, int] = {}

    def next_quote(self) -> Quote | None:
        q = next(self._it, None)
        if q is None:
            return None
        seq = q.seq + self._offset.get(q.symbol, 0)
        if self._retime or seq != q.seq:
            return Quote(
                symbol=q.symbol,
                region=q.region,
                lp=q.lp,
                seq=seq,
                bids=q.bids,
                asks=q.asks,
                src_ns=self._clock() if self._retime else q.src_ns,
            )
        return q

    def resume(self, symbol: str, last: Quote) -> None:
        # the stream already holds seqs up to last.seq: shift the file's seqs above it
        self._offset[symbol] = last.seq


# ---- the feed ------------------------------------------------------------------------------


@dataclass(slots=True)
class FeedStats:
    published: int = 0
    acked: int = 0
    duplicates: int = 0
    retries: int = 0
    by_symbol: dict[str, int] = field(default_factory=dict)
    """Last seq published per symbol."""


class Feed:
    """Publishes a :class:`QuoteSource` into its region's ``MD`` stream at a paced rate.

    Args:
        nc: A client connected to (preferably) the region's own server.
        source: The quotes; ``source.region`` picks the subjects and the JetStream domain.
        rate: Quotes per second over all symbols; ``0`` means as fast as acks allow.
        max_in_flight: Unacknowledged publishes allowed before the feed waits.
        tick_s: Pacing granularity: the shortest sleep between bursts (below ``1 / rate``
            the feed sleeps until its next quote is due, so a slow feed wakes once a quote).
    """

    def __init__(
        self,
        nc: Client,
        source: QuoteSource,
        *,
        rate: float,
        max_in_flight: int = 1024,
        tick_s: float = 0.005,
    ) -> None:
        self.region = source.region
        self.source = source
        self.rate = rate
        self.stats = FeedStats()
        self._js = nc.jetstream(domain=self.region, publish_async_max_pending=max_in_flight)
        self._max_in_flight = max_in_flight
        self._tick_s = tick_s
        self._inflight: deque[tuple[Quote, bytes, asyncio.Future[object]]] = deque()

    async def resume(self, symbols: Iterable[str]) -> dict[str, int]:
        """Continue every symbol after the newest quote already in the stream (restarts).

        A symbol with no message in ``MD`` (never published, or its history aged out) starts
        at seq 1; views re-baseline on it because its ``src_ns`` is newer than anything they
        hold. A newest message that is not a quote of this feed raises :class:`ResumeError`:
        its seq cannot be established, and guessing 1 would reuse stored ``Nats-Msg-Id`` s.
        """
        out = {}
        for sym in symbols:
            subject = subjects.md(self.region, sym)
            try:
                raw = await self._js.get_last_msg(MD_STREAM, subject)
            except NotFoundError:
                continue
            try:
                last = decode(Quote, raw.data or b"")
            except ContractError as e:
                raise ResumeError(
                    subject,
                    raw.seq or 0,
                    f"newest message is not a quote ({e}); purge it from {MD_STREAM} "
                    "before restarting the feed",
                ) from e
            if last.region != self.region or last.symbol != sym:
                raise ResumeError(
                    subject,
                    raw.seq or 0,
                    f"newest message is a quote of {last.region}:{last.symbol}",
                )
            self.source.resume(sym, last)
            out[sym] = last.seq
        return out

    async def run(
        self, *, stop: asyncio.Event | None = None, count: int | None = None
    ) -> FeedStats:
        """Publish until ``stop`` is set, ``count`` quotes are out, or the source ends."""
        stop = stop or asyncio.Event()
        t0 = time.monotonic()
        sent = 0
        exhausted = False
        while not stop.is_set() and not exhausted and (count is None or sent < count):
            if self.rate > 0:
                due = int((time.monotonic() - t0) * self.rate) - sent
                if due <= 0:
                    wait = t0 + (sent + 1) / self.rate - time.monotonic()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), max(self._tick_s, wait))
                    continue
            else:
                due = self._max_in_flight
            if count is not None:
                due = min(due, count - sent)
            for _ in range(due):
                q = self.source.next_quote()
                if q is None:
                    exhausted = True
                    break
                await self.publish(q)
                sent += 1
            await self._reap(block=True)
        await self.flush()
        return self.stats

    async def publish(self, q: Quote) -> None:
        """Pipeline one quote (call :meth:`flush` to wait for the acks)."""
        data = encode(q)
        fut = await self._send(q, data)
        self._inflight.append((q, data, fut))
        self.stats.published += 1
        self.stats.by_symbol[q.symbol] = q.seq

    async def flush(self) -> None:
        """Wait until every published quote is acknowledged (retrying failures in order)."""
        await self._reap(block=True, all_=True)

    async def _send(self, q: Quote, data: bytes) -> asyncio.Future[object]:
        headers = {"Nats-Msg-Id": f"{q.region}:{q.symbol}:{q.seq}"}
        fut = await self._js.publish_async(
            subjects.md(q.region, q.symbol), data, stream=MD_STREAM, headers=headers
        )
        return cast("asyncio.Future[object]", fut)

    async def _reap(self, *, block: bool, all_: bool = False) -> None:
        # acks are consumed in publish order; a failure is retried with the same Msg-Id (the
        # stream dedups) before anything newer is considered done
        while self._inflight:
            q, data, fut = self._inflight[0]
            if not fut.done():
                if not block or (not all_ and len(self._inflight) < self._max_in_flight):
                    return
                try:
                    await asyncio.wait_for(asyncio.shield(fut), 5.0)
                except TimeoutError:
                    fut.cancel()
                except Exception:  # the ack future failed: handled below
                    pass
            if fut.cancelled() or fut.exception() is not None:
                ack = await self._retry(q, data)
            else:
                ack = fut.result()
            self.stats.acked += 1
            if getattr(ack, "duplicate", False):
                self.stats.duplicates += 1
            self._inflight.popleft()

    async def _retry(self, q: Quote, data: bytes) -> object:
        headers = {"Nats-Msg-Id": f"{q.region}:{q.symbol}:{q.seq}"}
        delay = 0.05
        while True:
            self.stats.retries += 1
            try:
                return await self._js.publish(
                    subjects.md(q.region, q.symbol),
                    data,
                    stream=MD_STREAM,
                    headers=dict(headers),
                    timeout=2.0,
                )
            except (nats.errors.Error, APIError, TimeoutError) as e:
                log.warning("md publish %s:%s retry in %.2fs: %r", q.symbol, q.seq, delay, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
