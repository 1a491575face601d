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
  EVALSHA, and gives back in the same call what its last lease did not use; orders within
  :data:`LEASE_S` use the leased tokens. Tokens are only ever taken from the bucket, never made
  up here. While tokens are given back, the bucket's refill is capped at ``burst - returned``,
  so unused leased tokens never add to a full bucket. What a lease can add to a plain bucket:
  tokens of one block that were used while the bucket refilled, so over a window shorter than
  :data:`LEASE_S` an account can pass at most one block (50 ms of its rate) beyond its burst;
  over longer windows the bucket's own bound holds. Unused tokens are lost only with the
  process (at most one block per account). An account whose block rounds to zero (rate below
  1 / LEASE_S) asks Redis for every batch, exactly a plain bucket.

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
from redis.exceptions import NoScriptError

from router.refprice import read_ref_prices
from router.risk import Externals, RefPrice, RiskLimits

log = logging.getLogger("meridian.risk")

REF_MAX_AGE_S = 0.05
"""Oldest cached reference price a decision may use."""
LEASE_S = 0.05
"""Leased rate tokens are usable this long; the block leased is ``rate_per_s * LEASE_S``."""

RATE_LUA = """
local rate = tonumber(ARGV[1]); local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3]); local back = tonumber(ARGV[4])
local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)
local v = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(v[1]) or burst; local ts = tonumber(v[2]) or now
tokens = math.min(math.max(burst - back, 0), tokens + (now - ts) * rate / 1000)
tokens = math.min(burst, tokens + back)
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now))
local ttl = 60000
if rate > 0 then ttl = math.max(ttl, math.ceil(burst * 1000 / rate)) end
redis.call('PEXPIRE', KEYS[1], string.format('%d', ttl))
return granted
"""
"""Token bucket per account: takes back ARGV[4] unused leased tokens (the refill meanwhile
capped so they never overfill it), then takes up to ARGV[3]; returns how many it granted.
An idle bucket is deleted (a missing one is full) only once it would have refilled: after
``burst / rate`` seconds (at least 60), never sooner, or a burst above 60 s of the rate
would come back early."""


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
        asks: dict[str, tuple[int, int]] = {}  # account -> (tokens wanted, unused given back)
        block = lease_block(limits)
        terms = (limits.rate_per_s, limits.burst)
        for acct in sorted(wanted):
            lease = self._leases.get(acct)
            held = lease.tokens if lease is not None else 0
            usable = lease is not None and now <= lease.until and lease.terms == terms
            have[acct] = held if usable else 0
            if have[acct] < wanted[acct]:
                asks[acct] = (wanted[acct] + block, held)
        renewed: set[str] = set()
        if asks or stale:
            got, fresh = await self._ask(asks, stale, limits)
            for s, ref in fresh.items():
                self._refs[s] = (ref, now)
                refs[s] = ref
            for acct in asks:
                if acct in got:  # the old lease went back in the same call
                    have[acct] = got[acct]
                    renewed.add(acct)
                else:  # failed: the call may have taken the old lease back; never use it twice
                    have[acct] = 0
                    self._leases.pop(acct, None)
        granted: dict[str, int] = {}
        for acct, n in wanted.items():
            use = min(n, have[acct])
            granted[acct] = use
            if acct in renewed:
                self._leases[acct] = _Lease(have[acct] - use, now + LEASE_S, terms)
            elif use:
                self._leases[acct].tokens -= use
        return granted, refs

    async def _ask(
        self, asks: Mapping[str, tuple[int, int]], symbols: list[str], limits: RiskLimits
    ) -> tuple[dict[str, int], dict[str, RefPrice]]:
        """One pipeline: every account's EVALSHA, then every symbol's top of book. On any
        error nothing is granted and no price found (fail closed); leases are kept."""
        accounts = list(asks)
        for attempt in (1, 2):
            try:
                if self._rate_sha is None:
                    self._rate_sha = await self.redis.script_load(RATE_LUA)
                pipe = self.redis.pipeline(transaction=False)
                for acct in accounts:
                    want, back = asks[acct]
                    pipe.evalsha(
                        self._rate_sha, 1, f"rl:{acct}", limits.rate_per_s, limits.burst, want, back
                    )
                parse = read_ref_prices(pipe, self.view, symbols)
                self.redis_calls += 1
                res: list[Any] = await pipe.execute()
            except NoScriptError:  # Redis restarted (scripts are not persisted): load it again
                self._rate_sha = None
                if attempt == 1:
                    continue
                return {}, {}
            except Exception as e:
                log.warning("risk %s: Redis unavailable (%s): failing closed", self.view, e)
                self._rate_sha = None
                return {}, {}
            got = {acct: int(res[i]) for i, acct in enumerate(accounts)}
            return got, parse(res[len(accounts) :])
        return {}, {}


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
