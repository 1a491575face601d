"""Market data without servers: simulator determinism, tick-file replay, quote validation,
and the top-of-book consumer's sequencing, freshness and Redis handling against stubs."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
import redis.exceptions
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.js.api import RawStreamMsg
from prometheus_client import CollectorRegistry

from regions.topology import Topology, load_topology
from replication.errors import QuoteRejected, ReplayError, ResumeError
from replication.metrics import MdMetrics
from replication.service import supervise
from replication.simulator import (
    PROFILES,
    Feed,
    QuoteSimulator,
    ReplaySource,
    pip_ticks,
    read_ticks,
    record,
)
from replication.topbook import MAX_GAP_QUOTES, TopBookConsumer, TopOfBook
from replication.validate import REJECT_REASONS, executing_regions, validate_quote
from router import subjects
from router.contract import Quote, encode


@pytest.fixture(scope="module")
def topo() -> Topology:
    return load_topology()


def _sim(topo: Topology, region: str, seed: int) -> QuoteSimulator:
    clock = itertools.count(1_700_000_000_000_000_000, 1_000_000)
    ins = [topo.instrument(s) for s in topo.region(region).executes]
    return QuoteSimulator(region=region, instruments=ins, seed=seed, clock_ns=lambda: next(clock))


def test_simulator_is_deterministic_for_a_seed(topo: Topology) -> None:
    a = _sim(topo, "lon", 7).take(500)
    b = _sim(topo, "lon", 7).take(500)
    c = _sim(topo, "lon", 8).take(500)
    assert a == b
    assert a != c


def test_simulator_quotes_are_realistic_and_valid(topo: Topology) -> None:
    for region in topo.codes:
        sim = _sim(topo, region, 1)
        quotes = sim.take(2000)
        seqs: dict[str, list[int]] = {}
        for q in quotes:
            seqs.setdefault(q.symbol, []).append(q.seq)
            # every generated quote passes the consumer's validation after a msgpack round trip
            assert validate_quote(subjects.md(region, q.symbol), encode(q)) == q
            ins = topo.instrument(q.symbol)
            ref = ins.parse_price(PROFILES[q.symbol].ref_mid)
            mid2 = q.bids[0][0] + q.asks[0][0]
            assert abs(mid2 / 2 - ref) / ref < 0.01, (q.symbol, mid2, ref)  # near the reference
            spread_pips = (q.asks[0][0] - q.bids[0][0]) / pip_ticks(ins)
            assert 0 < spread_pips <= PROFILES[q.symbol].spread_pips * 2.5 + 1
            assert [lvl[1] for lvl in q.bids] == [1_000_000, 5_000_000, 10_000_000]
        for sym, s in seqs.items():
            assert s == list(range(1, len(s) + 1)), sym
        assert {q.lp for q in quotes} == {"LP-A", "LP-B", "LP-C", "LP-D"}
    usdjpy = _sim(topo, "sgp", 3).quote("USDJPY")
    assert 150_000 < usdjpy.bids[0][0] < 152_500  # 151.250 with 3 decimals


def test_simulator_resume_continues_seq_and_price(topo: Topology) -> None:
    sim = _sim(topo, "lon", 1)
    last = sim.quote("EURUSD")
    fresh = _sim(topo, "lon", 2)
    fresh.resume("EURUSD", Quote(**{**_fields(last), "seq": 41}))
    nxt = fresh.quote("EURUSD")
    assert nxt.seq == 42
    assert abs(nxt.bids[0][0] - last.bids[0][0]) < 20


def _fields(q: Quote) -> dict[str, object]:
    return {f: getattr(q, f) for f in ("symbol", "region", "lp", "seq", "bids", "asks", "src_ns")}


def test_tick_file_round_trip_and_replay(topo: Topology, tmp_path: Path) -> None:
    quotes = _sim(topo, "sgp", 11).take(300)
    path = tmp_path / "ticks.csv"
    assert record(quotes, path) == 300
    assert path.read_text().splitlines()[0] == "src_ns,region,symbol,lp,seq,bids,asks"
    assert list(read_ticks(path)) == quotes
    # replay without retiming reproduces the recording exactly; with retiming only src_ns moves
    exact = ReplaySource(path, region="sgp", retime=False)
    assert list(iter(exact.next_quote, None)) == quotes
    retimed = ReplaySource(path, region="sgp", clock_ns=lambda: 5)
    got = list(iter(retimed.next_quote, None))
    assert [q.src_ns for q in got] == [5] * 300
    assert [(q.symbol, q.seq, q.bids, q.asks) for q in got] == [
        (q.symbol, q.seq, q.bids, q.asks) for q in quotes
    ]
    # resuming after a restart shifts the file's seqs above what the stream already holds
    shifted = ReplaySource(path, region="sgp", retime=False)
    shifted.resume("USDJPY", quotes[0])
    first = next(q for q in iter(shifted.next_quote, None) if q.symbol == "USDJPY")
    assert first.seq == 2
    assert list(iter(ReplaySource(path, region="lon").next_quote, None)) == []


def test_tick_file_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("src_ns,region,symbol,lp,seq,bids,asks\n1,lon,EURUSD,LP-A,1,100:1,99:1\n")
    # crossed books are the consumer's business; a negative qty is the contract's
    assert len(list(read_ticks(bad))) == 1
    bad.write_text("src_ns,region,symbol,lp,seq,bids,asks\n1,lon,EURUSD,LP-A,1,100:-1,101:1\n")
    with pytest.raises(ReplayError) as e:
        list(read_ticks(bad))
    assert e.value.line == 2
    bad.write_text("nope\n")
    with pytest.raises(ReplayError):
        list(read_ticks(bad))


def _raw(**over: object) -> bytes:
    base: dict[str, object] = {
        "v": 1,
        "symbol": "EURUSD",
        "region": "lon",
        "lp": "LP-A",
        "seq": 1,
        "bids": [[108449, 1_000_000]],
        "asks": [[108451, 1_000_000]],
        "src_ns": 1,
    }
    base.update(over)
    return msgpack.packb(base)  # type: ignore[no-any-return]


_NOW_NS = 1_700_000_000_000_000_000


@pytest.mark.parametrize(
    ("subject", "data", "reason"),
    [
        ("mrd.lon.md.EURUSD", b"\xc1\xff garbage", "malformed"),
        ("mrd.lon.md.EURUSD", _raw(bids=[[108452, 1_000_000]]), "crossed"),
        ("mrd.lon.md.EURUSD", _raw(bids=[[108449, -5]]), "invalid_field"),
        ("mrd.lon.md.EURUSD", _raw(asks=[[108451, 0]]), "invalid_field"),
        ("mrd.lon.md.EURUSD", _raw(region="nyc"), "wrong_region"),
        ("mrd.xyz.md.EURUSD", _raw(region="xyz"), "wrong_region"),
        ("mrd.lon.md.GBPUSD", _raw(), "wrong_symbol"),
        ("mrd.lon.md.EURUSD", _raw(asks=[]), "one_sided"),
        ("mrd.lon.md.EURUSD", _raw(bids=[[108449, 1], [108450, 1]]), "unsorted"),
        ("mrd.lon.md.EURUSD", _raw(seq=1.5), "malformed"),
        ("mrd.lon.EURUSD", _raw(), "bad_subject"),
        ("mrd.lon.md.EURUSD", _raw(src_ns=float("nan")), "malformed"),
        ("mrd.lon.md.EURUSD", _raw(bids=[[float("nan"), 1_000_000]]), "malformed"),
        ("mrd.lon.md.EURUSD", _raw(bids=[[108449 - i, 1] for i in range(600)]), "malformed"),
        ("mrd.lon.md.EURUSD", _raw(seq=0), "invalid_field"),
        ("mrd.lon.md.EURUSD", _raw(seq=2**63), "invalid_field"),
        ("mrd.lon.md.EURUSD", _raw(src_ns=-1), "invalid_field"),
        ("mrd.lon.md.EURUSD", _raw(src_ns=_NOW_NS + 3_600 * 10**9), "future_src_ns"),
        ("mrd.lon.md.ZZZZZZ", _raw(symbol="ZZZZZZ"), "unknown_symbol"),
        ("mrd.sgp.md.EURUSD", _raw(region="sgp"), "not_executed"),
    ],
)
def test_malformed_quotes_are_rejected_with_a_reason(
    topo: Topology, subject: str, data: bytes, reason: str
) -> None:
    with pytest.raises(QuoteRejected) as e:
        validate_quote(
            subject,
            data,
            regions=topo.codes,
            exec_regions=executing_regions(topo),
            now_ns=_NOW_NS,
        )
    assert e.value.reason == reason
    assert e.value.reason in REJECT_REASONS  # a label meridian_md_rejected_total starts with


def test_quote_rules_accept_a_sane_quote_and_tolerate_clock_skew(topo: Topology) -> None:
    rules: dict[str, Any] = {"exec_regions": executing_regions(topo), "now_ns": _NOW_NS}
    q = validate_quote("mrd.lon.md.EURUSD", _raw(src_ns=_NOW_NS + 900_000_000), **rules)
    assert q.symbol == "EURUSD"
    # without the topology any symbol goes (the mesh tests' random symbols), as before
    assert validate_quote("mrd.sgp.md.ZZZZZZ", _raw(region="sgp", symbol="ZZZZZZ")).seq == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_a_quote_or_a_typed_rejection(data: bytes) -> None:
    try:
        validate_quote("mrd.lon.md.EURUSD", data)
    except QuoteRejected as e:
        assert e.reason in REJECT_REASONS


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from(["lon", "nyc", "sgp"]), st.integers(1, 400))
def test_simulated_books_never_cross(seed: int, region: str, n: int) -> None:
    topo = load_topology()
    for q in _sim(topo, region, seed).take(n):
        assert q.bids[0][0] < q.asks[0][0]
        assert all(a[0] > b[0] for a, b in itertools.pairwise(q.bids))
        assert all(a[0] < b[0] for a, b in itertools.pairwise(q.asks))


def test_lag_percentiles() -> None:
    m = MdMetrics(CollectorRegistry(), view="lon", sources=("sgp",))
    for i in range(1, 101):
        m.observe_lag("sgp->lon", i * 1_000_000)
    lag = m.lag()["sgp->lon"]
    assert lag.count == 100
    assert 49.5 <= lag.p50_ms <= 50.5 and 98.5 <= lag.p99_ms <= 99.5


# ---- the top-of-book consumer against stubs -----------------------------------------------------


class _NC:
    def __init__(self, js: Any = None) -> None:
        self.js = js

    def jetstream(self, **kw: Any) -> Any:
        return self.js

    async def subscribe(self, *a: Any, **kw: Any) -> Any:
        return _Sub([])


class _Sub:
    def __init__(self, msgs: list[Any]) -> None:
        self.msgs = msgs

    async def next_msg(self, timeout: float) -> Any:
        return self.msgs.pop(0)

    async def unsubscribe(self) -> None:
        pass


class _JS:
    """MDVIEW as the bootstrap sees it: ``msgs`` delivered last per subject."""

    def __init__(self, msgs: list[Any]) -> None:
        self.msgs = msgs

    async def stream_info(self, name: str) -> Any:
        return SimpleNamespace(state=SimpleNamespace(messages=len(self.msgs)))

    async def subscribe(self, *a: Any, **kw: Any) -> Any:
        return _Sub(self.msgs)


class _Pipe:
    def __init__(self, r: _Redis) -> None:
        self.r, self.ops = r, list[tuple[Any, ...]]()

    async def __aenter__(self) -> _Pipe:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    def hset(self, key: str, mapping: dict[str, Any]) -> None:
        self.ops.append(("hset", key, {k: str(v) for k, v in mapping.items()}))

    def sadd(self, key: str, *members: str) -> None:
        self.ops.append(("sadd", key, members))

    async def execute(self) -> None:
        if self.r.down:
            raise redis.exceptions.ConnectionError("Error 111 connecting to redis")
        for op, key, arg in self.ops:
            if op == "hset":
                self.r.hashes.setdefault(key, {}).update(arg)
            else:
                self.r.sets.setdefault(key, set()).update(arg)
        self.r.log.extend(self.ops)


class _Redis:
    """Just enough of redis.asyncio for the consumer's pipeline and the reader."""

    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.hashes: dict[str, dict[str, str]] = {}
        self.sets: dict[str, set[str]] = {}
        self.log: list[tuple[Any, ...]] = []

    def pipeline(self, transaction: bool = True) -> _Pipe:
        return _Pipe(self)

    async def hgetall(self, key: str) -> dict[str, str]:
        return dict(self.hashes.get(key, {}))

    async def smembers(self, key: str) -> set[str]:
        return set(self.sets.get(key, set()))


def _tob(redis: Any = None, js: Any = None, **kw: Any) -> TopBookConsumer:
    m = MdMetrics(CollectorRegistry(), view="lon", sources=("lon", "nyc", "sgp"))
    c = TopBookConsumer(_NC(js), redis, view="lon", regions=("lon", "nyc", "sgp"), metrics=m, **kw)  # type: ignore[arg-type]

    async def _no(key: tuple[str, str]) -> None:
        pass

    c._recover = _no  # type: ignore[method-assign]
    return c


def _q(reg: str, sym: str, seq: int, bid: int, ask: int, ns: int, lp: str = "LP-A") -> bytes:
    return encode(
        Quote(
            symbol=sym,
            region=reg,
            lp=lp,
            seq=seq,
            bids=((bid, 10**6),),
            asks=((ask, 10**6),),
            src_ns=ns,
        )
    )


def _live(c: TopBookConsumer, reg: str, sym: str, seq: int, bid: int, ns: int, **kw: Any) -> None:
    c._ingest(subjects.md(reg, sym), _q(reg, sym, seq, bid, bid + 10, ns, **kw), ns, live=True)


def _stored(subject: str, data: bytes, stored_ns: int) -> Any:
    ts = datetime.datetime.fromtimestamp(stored_ns / 1e9, tz=datetime.UTC)
    return SimpleNamespace(
        subject=subject, data=data, metadata=SimpleNamespace(num_pending=0, timestamp=ts)
    )


@pytest.mark.parametrize(
    ("jump_seq", "ahead_ns", "reason"),
    [
        (2**62, 1_000_000, "rebaseline"),
        (1 + 2_000_000, 1_000_000, "rebaseline"),
        (1 + 2_000_000, 3_600 * 10**9, "future_src_ns"),
        (2**62, 3_600 * 10**9, "future_src_ns"),
        (1 + MAX_GAP_QUOTES // 2, 1_000_000, "gap"),
    ],
)
async def test_a_bogus_seq_jump_neither_hangs_nor_pins_the_price(
    jump_seq: int, ahead_ns: int, reason: str
) -> None:
    c = _tob()
    t0 = time.time_ns() - 10**9
    _live(c, "sgp", "USDJPY", 1, 151_000, t0)
    # a better price from an LP nobody knows, with a seq far ahead (and maybe a future stamp)
    _live(c, "sgp", "USDJPY", jump_seq, 151_004, t0 + ahead_ns, lp="LP-BOGUS")
    _live(c, "sgp", "USDJPY", 2, 151_001, t0 + 2_000_000)
    _live(c, "sgp", "USDJPY", 3, 151_002, t0 + 3_000_000)
    top = c._composite(c._books[("sgp", "USDJPY")])
    assert "LP-BOGUS" not in f"{top['bid_lp']},{top['ask_lp']}"
    assert (top["bid_px"], top["seq"], top["src_ns"]) == (151_002, 3, t0 + 3_000_000)
    assert c.last_seq("sgp", "USDJPY") == 3
    assert sum(c.open_gaps().values()) <= MAX_GAP_QUOTES
    if reason == "future_src_ns":
        assert c.metrics.rejected.labels("future_src_ns")._value.get() == 1
        assert c.stats.rebaselines == 0
    else:  # the jump is taken (a real feed may jump), the real feed's next quote starts over
        assert c.stats.rebaselines == (2 if reason == "rebaseline" else 1)
        assert c.metrics.rebaselines.labels("sgp->lon")._value.get() == c.stats.rebaselines
        assert c.open_gaps() == {}


async def test_open_gaps_stay_bounded_over_repeated_jumps() -> None:
    c = _tob(max_gap_quotes=10)
    t0 = time.time_ns() - 10**9
    for i, seq in enumerate((1, 8, 15, 16)):  # gaps of 6, then 6 more would make 12 > 10
        _live(c, "sgp", "USDJPY", seq, 151_000, t0 + i)
    assert c.open_gaps() == {} and c.stats.gaps == 1 and c.stats.rebaselines == 1
    assert c.stats.unrecovered == 6  # the first gap's seqs, dropped with the old baseline
    assert c.last_seq("sgp", "USDJPY") == 16


async def test_a_feed_restarted_at_seq_1_is_taken_not_frozen() -> None:
    c = _tob()
    t0 = time.time_ns() - 10**9
    for seq in range(1, 6):
        _live(c, "sgp", "USDJPY", seq, 151_000, t0 + seq)
    assert c.last_seq("sgp", "USDJPY") == 5
    # a replayed duplicate is dropped and is no sign of life
    heard = c._last_live_ns["sgp"]
    c._ingest(
        subjects.md("sgp", "USDJPY"), _q("sgp", "USDJPY", 4, 151_000, 151_010, t0 + 4), t0 + 99,
        live=True,
    )  # fmt: skip
    assert c.stats.duplicates == 1 and c._last_live_ns["sgp"] == heard
    t1 = t0 + 500_000_000  # the restarted feed: seqs from 1 again, newer stamps, a new price
    for seq in range(1, 4):
        _live(c, "sgp", "USDJPY", seq, 152_000 + seq, t1 + seq)
    assert c.last_seq("sgp", "USDJPY") == 3
    top = c._composite(c._books[("sgp", "USDJPY")])
    assert (top["bid_px"], top["seq"], top["src_ns"]) == (152_003, 3, t1 + 3)
    assert c.stats.rebaselines == 1 and c.stats.duplicates == 1
    assert c._last_live_ns["sgp"] == t1 + 3


class _FeedJS:
    def __init__(self, last: RawStreamMsg) -> None:
        self.last = last

    async def get_last_msg(self, stream: str, subject: str) -> RawStreamMsg:
        return self.last


async def test_feed_resume_refuses_to_restart_over_an_unreadable_last_message(
    topo: Topology,
) -> None:
    sim = _sim(topo, "lon", 1)
    good = RawStreamMsg(seq=9, data=_q("lon", "EURUSD", 41, 108_449, 108_451, 5))
    assert await Feed(_NC(_FeedJS(good)), sim, rate=0).resume(["EURUSD"]) == {"EURUSD": 41}  # type: ignore[arg-type]
    assert sim.quote("EURUSD").seq == 42
    bad = RawStreamMsg(seq=10, data=b"\x93not a quote")
    with pytest.raises(ResumeError) as e:
        await Feed(_NC(_FeedJS(bad)), _sim(topo, "lon", 1), rate=0).resume(["EURUSD"])  # type: ignore[arg-type]
    assert e.value.subject == "mrd.lon.md.EURUSD" and e.value.stream_seq == 10


async def test_bootstrapped_quotes_are_not_fresh_and_a_down_source_is_reported() -> None:
    rds = _Redis()
    src_ns = time.time_ns() - 1_800 * 10**9  # sgp went down half an hour ago
    stored_ns = src_ns + 21_000_000
    subject = subjects.md("sgp", "USDJPY")
    js = _JS([_stored(subject, _q("sgp", "USDJPY", 7, 151_000, 151_010, src_ns), stored_ns)])
    c = _tob(rds, js, stale_after_s=0.3)
    await c.start()
    try:
        reader = TopOfBook(rds)  # type: ignore[arg-type]
        top = await reader.get("lon", "USDJPY")
        assert top is not None and top.seq == 7 and top.stale
        assert abs(top.recv_ns - stored_ns) < 1_000  # when MDVIEW stored it, not "now"
        await asyncio.sleep(0.6)
        assert "sgp" in c.stale_sources() and c.stale_sources()["sgp"] >= 0.3
        assert c.metrics.source_stale.labels("sgp->lon")._value.get() == 1
        assert c.stats.stale_reports >= 1
        # sgp comes back: live again, the gauge and the hash say so
        now = time.time_ns()
        live = SimpleNamespace(subject=subject, data=_q("sgp", "USDJPY", 8, 151_001, 151_011, now))
        await c._on_msg(live)  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        assert "sgp" not in c.stale_sources()
        assert c.metrics.source_stale.labels("sgp->lon")._value.get() == 0
        top = await reader.get("lon", "USDJPY")
        assert top is not None and top.seq == 8 and not top.stale and top.recv_ns >= now
    finally:
        await c.stop()


async def test_bootstrap_survives_redis_down_and_writes_once_it_is_back() -> None:
    rds = _Redis(down=True)
    now = time.time_ns()
    subject = subjects.md("nyc", "USDCAD")
    js = _JS([_stored(subject, _q("nyc", "USDCAD", 3, 136_600, 136_605, now), now)])
    c = _tob(rds, js)
    await c.start()  # raised redis.exceptions.ConnectionError: the region's feed never started
    try:
        assert rds.hashes == {}
        rds.down = False
        await asyncio.sleep(0.6)  # the batch loop retries every 0.2 s
        assert rds.hashes["tob:lon:USDCAD"]["seq"] == "3"
    finally:
        await c.stop()


async def test_symbol_index_is_rebuilt_after_redis_restarts_empty() -> None:
    rds = _Redis()
    c = _tob(rds)
    t0 = time.time_ns()
    _live(c, "lon", "EURUSD", 1, 108_449, t0)
    await c._flush()
    assert await TopOfBook(rds).symbols("lon") == ["EURUSD"]  # type: ignore[arg-type]
    rds.hashes.clear()
    rds.sets.clear()  # Redis restarted without persistence; no write failed in between
    _live(c, "lon", "EURUSD", 2, 108_450, t0 + 1)
    await c._flush()
    assert await TopOfBook(rds).symbols("lon") == ["EURUSD"]  # type: ignore[arg-type]
    assert [op[2] for op in rds.log if op[0] == "sadd"] == [("EURUSD",), ("EURUSD",)]


async def test_consumer_rejects_unknown_and_foreign_symbols(topo: Topology) -> None:
    c = _tob(exec_regions=executing_regions(topo))
    t0 = time.time_ns()
    _live(c, "lon", "ZZZZZZ", 1, 100_000, t0)
    _live(c, "sgp", "EURUSD", 1, 108_000, t0)  # lon executes EURUSD: sgp's would overwrite it
    _live(c, "lon", "EURUSD", 1, 108_449, t0)
    assert set(c._books) == {("lon", "EURUSD")}
    assert c.stats.rejected == 2
    assert c.metrics.rejected.labels("unknown_symbol")._value.get() == 1
    assert c.metrics.rejected.labels("not_executed")._value.get() == 1


def test_replay_of_a_missing_file_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(ReplayError) as e:
        ReplaySource(tmp_path / "nope.csv", region="lon")
    assert e.value.path == tmp_path / "nope.csv"


async def test_a_feed_that_dies_ends_the_service_with_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("src_ns,region,symbol,lp,seq,bids,asks\n1,lon,EURUSD,LP-A,x,1:1,2:1\n")
    feed = Feed(_NC(), ReplaySource(bad, region="lon"), rate=0)  # type: ignore[arg-type]
    stop = asyncio.Event()
    tasks: list[asyncio.Task[object]] = [
        asyncio.create_task(feed.run(stop=stop), name="md-feed-lon"),  # type: ignore[arg-type]
        asyncio.create_task(stop.wait(), name="md-stats-lon"),  # type: ignore[arg-type]
    ]
    with caplog.at_level(logging.ERROR, logger="replication.service"):
        assert await asyncio.wait_for(supervise(tasks, stop), 5) == 1
    assert "md-feed-lon" in caplog.text and "bad.csv:2" in caplog.text
    assert stop.is_set()


async def test_a_feed_that_ends_is_fine_and_stop_exits_0() -> None:
    async def done() -> None:
        pass

    stop = asyncio.Event()
    tasks: list[asyncio.Task[object]] = [
        asyncio.create_task(done()),  # type: ignore[arg-type]
        asyncio.create_task(stop.wait()),  # type: ignore[arg-type]
    ]
    asyncio.get_running_loop().call_later(0.2, stop.set)
    assert await asyncio.wait_for(supervise(tasks, stop), 5) == 0


async def test_a_region_that_executes_nothing_is_never_stale() -> None:
    """Every view watched every region of the topology: one executing nothing (which the
    topology allows) publishes nothing and was stale for good: status unhealthy, a page."""
    c = _tob(exec_regions={"EURUSD": "lon", "USDJPY": "sgp"}, stale_after_s=0.05)
    task = asyncio.create_task(c._watch())
    try:
        await asyncio.sleep(0.3)
    finally:
        task.cancel()
    assert set(c.stale_sources()) == {"lon", "sgp"}  # silent, and they do quote
