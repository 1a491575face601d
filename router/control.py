"""Control-plane writes that must reach every region: kill switches and runtime limits.

Each region's domain has its own KV buckets (``KILL_<region>``, ``RISKCFG_<region>``). A KV put
is a plain publish on ``$KV.<bucket>.<key>``, routed by subject interest, and nats-server does
not propagate interest in ``$KV.`` stream subjects over leaf links (checked on 2.15: a put from
another region gets "no responders"). So each region is written through a connection to that
region's own server; each write is confirmed by a PubAck from the target domain, and the
result says which regions took it (a cut link shows up there, to be retried).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from nats.aio.client import Client as NATS

from regions.topology import Topology
from router import contract, subjects
from router.contract import KillScope, KillSwitch

Connect = Callable[[str], Awaitable[NATS]]
"""region -> a connected client of that region's server."""


async def put_all(
    connect: Connect,
    topology: Topology,
    bucket_of: Callable[[str], str],
    key: str,
    value: bytes | None,
    *,
    timeout_s: float = 5.0,
) -> dict[str, str]:
    """Put (``value=None``: delete) ``key`` in every region's bucket.

    Returns region -> "ok" or the error, so a caller can retry what a cut link refused.
    """
    out: dict[str, str] = {}
    for r in topology.codes:
        bucket = bucket_of(r)
        headers = {"KV-Operation": "DEL"} if value is None else None
        try:
            nc = await connect(r)
        except Exception as e:
            out[r] = f"cannot connect: {type(e).__name__}: {e}"
            continue
        try:
            ack = await nc.jetstream(domain=r).publish(
                f"$KV.{bucket}.{key}",
                value or b"",
                stream=f"KV_{bucket}",
                headers=headers,
                timeout=timeout_s,
            )
            out[r] = "ok" if ack.domain == r else f"stored in {ack.domain!r}, not {r!r}"
        except Exception as e:
            out[r] = f"{type(e).__name__}: {e}"
        finally:
            with contextlib.suppress(Exception):
                await nc.close()
    return out


def kill_key(scope: KillScope, target: str) -> str:
    return "global" if scope is KillScope.GLOBAL else f"{scope.value}.{target}"


async def set_kill(
    connect: Connect,
    topology: Topology,
    scope: KillScope,
    target: str,
    *,
    engaged: bool,
    reason: str = "",
    by: str = "",
) -> dict[str, str]:
    """Engage or release a kill switch in every region (engaging also cancels resting orders).

    Raises ValueError, before anything is written, for an account or desk the topology does
    not know: risk matches kill keys exactly, so a misspelt one would be 'ENGAGED' everywhere
    and stop nothing."""
    if scope is KillScope.ACCOUNT and target not in topology.accounts():
        raise ValueError(f"unknown account {target!r} (not in the topology)")
    if scope is KillScope.DESK and target not in {d.code for d in topology.desks}:
        raise ValueError(f"unknown desk {target!r} (not in the topology)")
    ks = KillSwitch(
        scope=scope,
        target=target if scope is not KillScope.GLOBAL else "*",
        engaged=engaged,
        reason=reason,
        by=by,
        at_ns=time.time_ns(),
    )
    return await put_all(
        connect, topology, subjects.kill_bucket, kill_key(scope, target), contract.encode(ks)
    )


async def set_limits(
    connect: Connect, topology: Topology, doc: Mapping[str, Any] | None
) -> dict[str, str]:
    """Apply a limits document everywhere (None: back to each worker's configured defaults)."""
    from router.risk import RiskLimits

    if doc is not None:
        # validated before anything is written, against the topology too: a misspelt account
        # or symbol is refused here, not left to fall back to the defaults unnoticed
        RiskLimits.from_mapping(doc, topology=topology)
    body = None if doc is None else json.dumps(doc).encode()
    return await put_all(connect, topology, subjects.riskcfg_bucket, "limits", body)
