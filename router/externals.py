"""The risk worker's non-deterministic inputs, from Redis, without a round trip per batch.

Two read models live in Redis (design card): the token bucket of every account's order rate
(``rl:<account>``, refilled by :data:`RATE_LUA` on each take) and the top of book every region
sees (``tob:<view>:<symbol>``, written by the market-data service). Risk used to read both in
one pipeline for every batch: on this project's 2-core benchmark machine that round trip was a
fifth of the risk worker's CPU at low rates and one more wakeup on the way to execution.

:class:`RedisExternals` keeps Redis the store of both and only changes how often it is asked:

* **Reference prices** are cached per symbol for at most :data:`REF_MAX_AGE_S`. The collar
  compares an order's price with a mid that can then be that much older than Redis's, which
  is itself as old as the last quote that reached the region (replication lag, far larger).
* **Rate tokens are leased.** An account that needs tokens takes what it needs plus a block of
  ``rate_per_s * LEASE_S`` (at most a quarter of the burst) from its Redis bucket in one
  EVALSHA; later orders within :data:`LEASE_S` use the leased tokens. Tokens are only ever
  taken from the bucket, never made up here, so an account never gets more than its bucket
  grants; unused leased tokens expire (and are lost with the process), which can reject an
  order a few tokens early, never let one through late. An account whose block rounds to
  zero (rate below 1 / LEASE_S) asks Redis for every batch, exactly as before.

What each decision used is recorded in RISKLOG with it (:class:`router.risk.Externals`), so a
replay never asks Redis or this cache. Failing closed is unchanged: when Redis cannot be read,
orders that need a fresh price or more tokens are rejected (NO_REFERENCE_PRICE, RATE_LIMIT);
within :data:`REF_MAX_AGE_S` / :data:`LEASE_S` of the outage cached values still serve.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from router.refprice import read_ref_prices
from router.risk import Externals, RefPrice, RiskLimits

log = logging.getLogger("meridian.risk")

REF_MAX_AGE_S = 0.05
"""Oldest cached reference price a decision may use."""
LEASE_S = 0.05
"""Leased rate tokens are usable this long; the block leased is ``rate_per_s * LEASE_S``."""

RATE_LUA = """
local rate = tonumber(ARGV[1]); local burst = tonumber(ARGV[2]); local want = tonumber(ARGV[3])
local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)
local v = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(v[1]) or burst; local ts = tonumber(v[2]) or now
tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], 60000)
return granted
"""
"""Token bucket per account: takes up to ARGV[3] tokens at once, returns how many it granted."""


def lease_block(limits: RiskLimits) -> int:
    """Tokens taken ahead of need per Redis call: ``rate * LEASE_S``, at most burst / 4."""
    return max(0, min(int(limits.rate_per_s * LEASE_S), limits.burst // 4))


@dataclass(slots=True)
class _Lease:
    tokens: int
    until: float
    terms: tuple[int, int]
    """(rate_per_s, burst) it was taken under: new limits end every lease at once."""


class RedisExternals:
    """Rate verdicts and reference prices for a batch; Redis only when the cache is short."""

    def __init__(self, redis_client: aioredis.Redis, view: str) -> None:
        self.redis = redis_client
        self.view = view
        self._rate_sha: str | None = None
        self._refs: dict[str, tuple[RefPrice, float]] = {}
        self._leases: dict[str, _Lease] = {}
        self.redis_calls = 0
        """Round trips made (for tests and the benchmark's notes)."""

    def clear(self) -> None:
        """Forget cached prices and leased tokens (a rebuilt worker starts cold)."""
        self._refs.clear()
        self._leases.clear()

    async def fetch(
        self, wanted: Mapping[str, int], symbols: set[str], limits: RiskLimits, now: float
    ) -> tuple[dict[str, int], dict[str, RefPrice]]:
        """Grant up to ``wanted[account]`` tokens per account and find a reference price per
        symbol. Returns (granted per account, price per symbol; a symbol without one is left
        out). ``now`` is ``time.monotonic()``."""
        refs: dict[str, RefPrice] = {}
        stale: list[str] = []
        for s in sorted(symbols):
            hit = self._refs.get(s)
            if hit is not None and now - hit[1] <= REF_MAX_AGE_S:
                refs[s] = hit[0]
            else:
                stale.append(s)
        have: dict[str, int] = {}
        asks: dict[str, int] = {}
        block = lease_block(limits)
        terms = (limits.rate_per_s, limits.burst)
        for acct in sorted(wanted):
            lease = self._leases.get(acct)
            usable = lease is not None and now <= lease.until and lease.terms == terms
            left = lease.tokens if lease is not None and usable else 0
            have[acct] = left
            if left < wanted[acct]:
                asks[acct] = wanted[acct] - left + block
        if asks or stale:
            got, fresh = await self._ask(asks, stale, limits)
            for s, ref in fresh.items():
                self._refs[s] = (ref, now)
                refs[s] = ref
            for acct, n in got.items():
                have[acct] += n
            renewed = set(got)
        else:
            renewed = set()
        granted: dict[str, int] = {}
        for acct, n in wanted.items():
            use = min(n, have[acct])
            granted[acct] = use
            left = have[acct] - use
            if acct in renewed:  # a new lease (what was left of the old one joins it)
                self._leases[acct] = _Lease(left, now + LEASE_S, terms)
            elif acct in self._leases:
                self._leases[acct].tokens = left
        return granted, refs

    async def _ask(
        self, asks: Mapping[str, int], symbols: list[str], limits: RiskLimits
    ) -> tuple[dict[str, int], dict[str, RefPrice]]:
        accounts = list(asks)
        try:
            if self._rate_sha is None:
                self._rate_sha = await self.redis.script_load(RATE_LUA)
            pipe = self.redis.pipeline(transaction=False)
            for acct in accounts:
                pipe.evalsha(
                    self._rate_sha, 1, f"rl:{acct}", limits.rate_per_s, limits.burst, asks[acct]
                )
            parse = read_ref_prices(pipe, self.view, symbols)
            self.redis_calls += 1
            res: list[Any] = await pipe.execute()
        except Exception as e:
            log.warning("risk %s: Redis unavailable (%s): failing closed", self.view, e)
            self._rate_sha = None
            return {}, {}
        return {acct: int(res[i]) for i, acct in enumerate(accounts)}, parse(res[len(accounts) :])


def externals_for(
    wants: list[tuple[str, str | None, str]], granted: dict[str, int], refs: dict[str, RefPrice]
) -> dict[str, Externals]:
    """Per input: (input id, account if it takes a rate token else None, symbol), in batch
    order. The first ``granted[account]`` inputs of an account pass the rate check."""
    left = dict(granted)
    out: dict[str, Externals] = {}
    for input_id, acct, sym in wants:
        ok = True
        if acct is not None:
            ok = left.get(acct, 0) > 0
            left[acct] = left.get(acct, 0) - 1
        out[input_id] = Externals(rate_ok=ok, ref=refs.get(sym))
    return out
