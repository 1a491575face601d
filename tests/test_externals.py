"""router.externals against a real redis-server: the price cache, token leases, failing closed.

``fetch`` takes the clock as an argument, so the cache and lease windows are stepped through
without sleeping; the token bucket itself runs on Redis's clock, as in production.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ops.procs import RedisServer, free_ports
from router.externals import LEASE_S, REF_MAX_AGE_S, RedisExternals, externals_for, lease_block
from router.refprice import tob_key
from router.risk import RefPrice, RiskLimits

LIMITS = replace(RiskLimits.load(), rate_per_s=2000, burst=4000)


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    d: Path = tmp_path_factory.mktemp("redis-ext")
    srv = RedisServer(free_ports(1)[0], d, d / "redis.log").start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def rds(redis_srv: RedisServer) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(redis_srv.url)
    await r.flushdb()
    await r.hset(tob_key("lon", "EURUSD"), mapping={"bid_px": 108448, "ask_px": 108452})
    await r.hset(tob_key("lon", "GBPUSD"), mapping={"bid_px": 126798, "ask_px": 126802})
    try:
        yield r
    finally:
        await r.aclose()


async def test_prices_are_cached_for_at_most_the_max_age(rds: aioredis.Redis) -> None:
    ext = RedisExternals(rds, "lon")
    t = 1000.0
    _, refs = await ext.fetch({}, {"EURUSD", "GBPUSD"}, LIMITS, t)
    assert refs["EURUSD"] == RefPrice(bid_ticks=108448, ask_ticks=108452)
    assert ext.redis_calls == 1
    await rds.hset(tob_key("lon", "EURUSD"), mapping={"bid_px": 108500, "ask_px": 108504})
    _, refs = await ext.fetch({}, {"EURUSD"}, LIMITS, t + REF_MAX_AGE_S)
    assert refs["EURUSD"].bid_ticks == 108448  # cached: no round trip
    assert ext.redis_calls == 1
    _, refs = await ext.fetch({}, {"EURUSD"}, LIMITS, t + REF_MAX_AGE_S + 0.001)
    assert refs["EURUSD"].bid_ticks == 108500  # too old: read again
    assert ext.redis_calls == 2


async def test_a_missing_price_is_not_cached(rds: aioredis.Redis) -> None:
    ext = RedisExternals(rds, "lon")
    _, refs = await ext.fetch({}, {"EURCHF"}, LIMITS, 1.0)
    assert "EURCHF" not in refs
    await rds.hset(tob_key("lon", "EURCHF"), mapping={"bid_px": 95908, "ask_px": 95912})
    _, refs = await ext.fetch({}, {"EURCHF"}, LIMITS, 1.001)
    assert refs["EURCHF"].ask_ticks == 95912
    assert ext.redis_calls == 2


async def test_a_price_its_view_marks_stale_is_no_reference(rds: aioredis.Redis) -> None:
    """The md view marks a symbol stale while its source region is silent (a cut link, a
    region down): risk must not collar against a price the market may have left."""
    ext = RedisExternals(rds, "lon")
    await rds.hset(tob_key("lon", "EURUSD"), mapping={"stale": "1"})
    await rds.hset(tob_key("lon", "GBPUSD"), mapping={"stale": "0"})
    _, refs = await ext.fetch({}, {"EURUSD", "GBPUSD"}, LIMITS, 1.0)
    assert "EURUSD" not in refs and refs["GBPUSD"].bid_ticks == 126798
    await rds.hset(tob_key("lon", "EURUSD"), mapping={"stale": "0"})  # a live quote came
    _, refs = await ext.fetch({}, {"EURUSD"}, LIMITS, 1.001)  # not cached while stale
    assert refs["EURUSD"].bid_ticks == 108448


async def test_a_price_older_than_the_max_age_is_no_reference(rds: aioredis.Redis) -> None:
    """The stale flag is written only while the md view runs: a view that died left its last
    prices with stale 0, and risk collared against them for ever. A source time older than
    MAX_REF_AGE_S is no reference; a seeded book (src_ns 0) is taken as it is."""
    from router.refprice import MAX_REF_AGE_S

    ext = RedisExternals(rds, "lon")
    old = time.time_ns() - int((MAX_REF_AGE_S + 5) * 1e9)
    await rds.hset(tob_key("lon", "EURUSD"), mapping={"stale": "0", "src_ns": old})
    await rds.hset(tob_key("lon", "GBPUSD"), mapping={"stale": "0", "src_ns": time.time_ns()})
    _, refs = await ext.fetch({}, {"EURUSD", "GBPUSD"}, LIMITS, 1.0)
    assert "EURUSD" not in refs and "GBPUSD" in refs
    await rds.hset(tob_key("lon", "EURUSD"), mapping={"src_ns": 0})  # seeded
    _, refs = await ext.fetch({}, {"EURUSD"}, LIMITS, 1.001)
    assert refs["EURUSD"].bid_ticks == 108448


async def test_tokens_are_leased_in_blocks_and_the_lease_expires(rds: aioredis.Redis) -> None:
    ext = RedisExternals(rds, "lon")
    block = lease_block(LIMITS)
    assert block == 100
    t = 50.0
    granted, _ = await ext.fetch({"A": 1}, set(), LIMITS, t)
    assert granted == {"A": 1} and ext.redis_calls == 1
    granted, _ = await ext.fetch({"A": 60}, set(), LIMITS, t + 0.01)
    assert granted == {"A": 60} and ext.redis_calls == 1  # from the lease
    granted, _ = await ext.fetch({"A": 60}, set(), LIMITS, t + 0.02)  # 40 left: ask for more
    assert granted == {"A": 60} and ext.redis_calls == 2
    granted, _ = await ext.fetch({"A": 1}, set(), LIMITS, t + 0.02 + LEASE_S + 0.001)
    assert granted == {"A": 1} and ext.redis_calls == 3  # the lease expired
    # Redis handed out 101, then 160 (40 given back), then 101 (100 given back): 222 net,
    # every one from the bucket (plus what it refilled in the few ms the test took)
    left = float(await rds.hget("rl:A", "t") or 0)
    assert LIMITS.burst - 222 - 1 <= left <= LIMITS.burst - 222 + 100


async def test_leases_never_grant_more_than_the_bucket(rds: aioredis.Redis) -> None:
    tight = replace(LIMITS, rate_per_s=200, burst=40)  # block 10
    ext = RedisExternals(rds, "lon")
    t0 = time.monotonic()
    used = 0
    while time.monotonic() - t0 < 0.3:
        granted, _ = await ext.fetch({"B": 3}, set(), tight, time.monotonic())
        used += granted["B"]
    elapsed = time.monotonic() - t0
    assert used <= tight.burst + tight.rate_per_s * elapsed + 1
    assert used >= tight.burst  # and the bucket's tokens were usable


async def test_a_batch_never_gets_more_than_the_burst(rds: aioredis.Redis) -> None:
    """Unused leased tokens go back into the bucket capped at the burst: they never add to a
    bucket that refilled while they were out."""
    tight = replace(LIMITS, rate_per_s=200, burst=40)  # block 10
    ext = RedisExternals(rds, "lon")
    granted, _ = await ext.fetch({"F": 1}, set(), tight, 7.0)  # leases 10, the bucket has 29
    assert granted == {"F": 1}
    await asyncio.sleep(0.04)  # the bucket refills 8 while the lease is out (Redis's clock)
    granted, _ = await ext.fetch({"F": 45}, set(), tight, 7.04)
    assert granted["F"] <= tight.burst


async def test_unused_leased_tokens_go_back_to_the_bucket(rds: aioredis.Redis) -> None:
    """An account trickling single orders just over LEASE_S apart does not burn a block per
    order: each new lease gives the last one's unused tokens back."""
    tight = replace(LIMITS, rate_per_s=100, burst=40)  # block 5
    ext = RedisExternals(rds, "lon")
    t = 20.0
    for _ in range(20):
        t += LEASE_S + 0.01
        granted, _ = await ext.fetch({"G": 1}, set(), tight, t)
        assert granted == {"G": 1}
    granted, _ = await ext.fetch({"G": 40}, set(), tight, t + LEASE_S + 0.01)
    assert granted["G"] >= tight.burst - 20 - 1  # 20 used; the leases came back


async def test_a_redis_restart_that_lost_the_script_costs_nothing(rds: aioredis.Redis) -> None:
    ext = RedisExternals(rds, "lon")
    assert (await ext.fetch({"H": 1}, set(), LIMITS, 3.0))[0] == {"H": 1}
    await rds.script_flush()  # what a restarted Redis looks like (scripts are not persisted)
    assert (await ext.fetch({"H": 1}, set(), LIMITS, 3.0 + LEASE_S + 0.01))[0] == {"H": 1}


async def test_a_slow_rate_asks_redis_for_every_batch(rds: aioredis.Redis) -> None:
    slow = replace(LIMITS, rate_per_s=1, burst=5)
    assert lease_block(slow) == 0
    ext = RedisExternals(rds, "lon")
    granted, _ = await ext.fetch({"C": 30}, set(), slow, 1.0)
    assert granted == {"C": 5}
    granted, _ = await ext.fetch({"C": 1}, set(), slow, 1.001)
    assert granted == {"C": 0} and ext.redis_calls == 2


async def test_redis_down_fails_closed_once_the_cache_runs_out(redis_srv: RedisServer) -> None:
    r = aioredis.from_url(redis_srv.url)
    await r.hset(tob_key("lon", "EURUSD"), mapping={"bid_px": 108448, "ask_px": 108452})
    ext = RedisExternals(r, "lon")
    t = 10.0
    granted, refs = await ext.fetch({"D": 1}, {"EURUSD"}, LIMITS, t)
    assert granted == {"D": 1} and "EURUSD" in refs
    await r.aclose()
    gone = aioredis.from_url(f"redis://127.0.0.1:{free_ports(1)[0]}/0", socket_connect_timeout=1)
    ext.redis = gone
    try:
        granted, refs = await ext.fetch({"D": 2}, {"EURUSD"}, LIMITS, t + 0.01)
        assert granted == {"D": 2} and "EURUSD" in refs  # within the lease and the price age
        granted, refs = await ext.fetch({"D": 1}, {"EURUSD"}, LIMITS, t + 1.0)
        assert granted == {"D": 0} and refs == {}  # nothing fresh: RATE_LIMIT, NO_REFERENCE_PRICE
    finally:
        await gone.aclose()


async def test_new_limits_end_every_lease(rds: aioredis.Redis) -> None:
    ext = RedisExternals(rds, "lon")
    granted, _ = await ext.fetch({"E": 1}, set(), LIMITS, 5.0)  # leases 100 more
    tighter = replace(LIMITS, rate_per_s=1, burst=5)
    await rds.delete("rl:E")
    granted, _ = await ext.fetch({"E": 30}, set(), tighter, 5.001)
    assert granted == {"E": 5}  # the new bucket's, not the old lease's


def test_externals_for_passes_the_first_granted_orders_of_each_account() -> None:
    ref = RefPrice(bid_ticks=1, ask_ticks=3)
    out = externals_for(
        [("i1", "A", "EURUSD"), ("i2", "A", "EURUSD"), ("i3", None, "EURUSD"), ("i4", "B", "X")],
        {"A": 1, "B": 1},
        {"EURUSD": ref},
    )
    assert [out[k].rate_ok for k in ("i1", "i2", "i3", "i4")] == [True, False, True, True]
    assert out["i1"].ref == ref and out["i4"].ref is None


async def test_an_idle_bucket_lives_until_it_would_have_refilled(rds: aioredis.Redis) -> None:
    """Redis deletes an idle bucket, and a missing bucket is a full one. It used to go after
    60 s whatever the terms: with a burst above 60 s of the rate, an account that emptied it
    had a full burst again after 60 s instead of burst / rate."""
    slow = replace(LIMITS, rate_per_s=1, burst=300)  # refills in 300 s
    assert lease_block(slow) == 0  # every token from Redis: nothing held here
    ext = RedisExternals(rds, "lon")
    granted, _ = await ext.fetch({"S": 300}, set(), slow, 1.0)
    assert granted == {"S": 300}
    assert 299_000 <= await rds.pttl("rl:S") <= 300_000
    # a bucket refilling within a minute keeps the minute
    granted, _ = await ext.fetch({"Q": 5}, set(), LIMITS, 1.0)
    assert granted == {"Q": 5}
    assert 59_000 <= await rds.pttl("rl:Q") <= 60_000
