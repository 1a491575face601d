"""Market data without servers: simulator determinism, tick-file replay, quote validation."""

from __future__ import annotations

import itertools
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from regions.topology import Topology, load_topology
from replication.errors import QuoteRejected, ReplayError
from replication.metrics import MdMetrics
from replication.simulator import (
    PROFILES,
    QuoteSimulator,
    ReplaySource,
    pip_ticks,
    read_ticks,
    record,
)
from replication.validate import REJECT_REASONS, validate_quote
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
    ],
)
def test_malformed_quotes_are_rejected_with_a_reason(
    subject: str, data: bytes, reason: str
) -> None:
    with pytest.raises(QuoteRejected) as e:
        validate_quote(subject, data, regions=("lon", "nyc", "sgp"))
    assert e.value.reason == reason
    assert reason in REJECT_REASONS


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
