"""Each region's replicated market-data view: the ``MDVIEW`` stream.

``MDVIEW`` in region R's JetStream domain has no subjects of its own. It *sources* every
region's ``MD`` stream: R's own locally, the others across domains over the leaf links via
their API prefix (``$JS.<domain>.API``). JetStream does the replication; there is no
hand-written forwarder. Sourced messages keep their subjects (``mrd.<source>.md.<symbol>``)
and their ``Nats-Msg-Id``, so one subject per (source, symbol) holds that feed in order.

Limits bound the view: ``max_age`` (default 1 h, like ``MD``) and ``max_msgs_per_subject``
(default 10,000 quotes per symbol), enough to fill a gap of several seconds at thousands of
quotes/s, while a consumer that only wants the latest price reads it with ``DeliverPolicy
LAST_PER_SUBJECT``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from nats.aio.client import Client
from nats.js.api import (
    DiscardPolicy,
    ExternalStream,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
    StreamSource,
)
from nats.js.errors import APIError, BadRequestError

from regions.topology import Topology
from router import subjects

VIEW_STREAM = "MDVIEW"
MD_STREAM = "MD"
DEFAULT_MAX_AGE_S = 3600.0
DEFAULT_MAX_MSGS_PER_SUBJECT = 10_000


def view_config(
    topology: Topology,
    region: str,
    *,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    max_msgs_per_subject: int = DEFAULT_MAX_MSGS_PER_SUBJECT,
) -> StreamConfig:
    """The ``MDVIEW`` config of ``region``: its own ``MD`` plus every other domain's ``MD``."""
    topology.region(region)  # KeyError on an unknown region
    sources = [StreamSource(name=MD_STREAM)]
    sources += [
        StreamSource(name=MD_STREAM, external=ExternalStream(api=subjects.js_api(code)))
        for code in topology.codes
        if code != region
    ]
    return StreamConfig(
        name=VIEW_STREAM,
        description=f"market data of every region as seen from {region}",
        subjects=[],
        sources=sources,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=max_age_s,
        max_msgs_per_subject=max_msgs_per_subject,
        discard=DiscardPolicy.OLD,
        num_replicas=1,
        allow_direct=True,
    )


async def ensure_view(
    nc: Client,
    topology: Topology,
    region: str,
    *,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    max_msgs_per_subject: int = DEFAULT_MAX_MSGS_PER_SUBJECT,
) -> StreamInfo:
    """Create ``MDVIEW`` in ``region``'s domain, or update it to the wanted config (idempotent)."""
    js = nc.jetstream(domain=region)
    cfg = view_config(
        topology, region, max_age_s=max_age_s, max_msgs_per_subject=max_msgs_per_subject
    )
    try:
        return await js.add_stream(cfg)
    except BadRequestError as e:
        if e.err_code != 10058:  # name in use with a different config
            raise
        return await js.update_stream(cfg)


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceState:
    """How far one sourced ``MD`` stream is, as ``MDVIEW``'s server reports it."""

    source: str
    """Source region code."""
    lag: int
    """Messages known to be behind (stays 0 while the link is down: watch ``active_s``)."""
    active_s: float | None
    """Seconds since the source was last heard from (``None``: never)."""
    error: str = ""


async def view_sources(
    nc: Client, region: str, *, timeout_s: float = 2.0
) -> dict[str, SourceState]:
    """Per source region, the sourcing state of ``region``'s ``MDVIEW``."""
    # raw API call: nats-py's StreamSourceInfo drops the ``external`` block that names the domain
    msg = await nc.request(
        f"{subjects.js_api(region)}.STREAM.INFO.{VIEW_STREAM}", b"", timeout=timeout_s
    )
    info = json.loads(msg.data)
    if "error" in info:
        raise APIError.from_error(info["error"])
    out: dict[str, SourceState] = {}
    for s in info.get("sources") or []:
        ext = (s.get("external") or {}).get("api", "")
        src = ext.split(".")[1] if ext.startswith("$JS.") else region
        active = s.get("active")
        err = s.get("error")
        out[src] = SourceState(
            source=src,
            lag=int(s.get("lag") or 0),
            active_s=None if active is None or active < 0 else active / 1e9,
            error=str(err.get("description", err)) if isinstance(err, dict) else "",
        )
    return out
