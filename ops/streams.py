"""Create (or update) every region's JetStream streams and KV buckets, idempotently."""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

from regions.topology import Topology
from router import subjects
from router.subjects import StreamSpec


def stream_config(spec: StreamSpec, *, replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=spec.max_age_s,
        max_bytes=spec.max_bytes,
        max_msgs_per_subject=spec.max_msgs_per_subject,
        max_msg_size=spec.max_msg_size,
        discard=DiscardPolicy.NEW if spec.discard_new_per_subject else DiscardPolicy.OLD,
        discard_new_per_subject=spec.discard_new_per_subject,
        duplicate_window=spec.duplicate_window_s,
        num_replicas=replicas,
        allow_direct=True,
    )


async def ensure_region_streams(nc: NATS, region: str, *, replicas: int = 1) -> list[str]:
    """Create or update the streams and KV buckets of one region's domain."""
    js = nc.jetstream(domain=region)
    made = []
    for spec in subjects.region_streams(region):
        cfg = stream_config(spec, replicas=replicas)
        try:
            await js.add_stream(cfg)
        except BadRequestError as e:
            if e.err_code != 10058:  # stream name already in use with a different config
                raise
            await js.update_stream(cfg)
        made.append(spec.name)
    for bucket, history in (
        (subjects.kill_bucket(region), 16),
        (subjects.riskcfg_bucket(region), 16),
    ):
        await js.create_key_value(
            KeyValueConfig(
                bucket=bucket, history=history, storage=StorageType.FILE, replicas=replicas
            )
        )
        made.append(f"KV_{bucket}")
    await js.create_key_value(refused_bucket_config(region, replicas=replicas))
    made.append(f"KV_{subjects.refused_bucket(region)}")
    return made


def refused_bucket_config(region: str, *, replicas: int = 1) -> KeyValueConfig:
    """Execution's refused commands: kept as long as EXEC keeps the commands themselves."""
    (exec_spec,) = [sp for sp in subjects.region_streams(region) if sp.name == "EXEC"]
    return KeyValueConfig(
        bucket=subjects.refused_bucket(region),
        history=1,
        ttl=exec_spec.max_age_s,
        storage=StorageType.FILE,
        replicas=replicas,
    )


async def ensure_streams(nc: NATS, topology: Topology) -> dict[str, list[str]]:
    """Every region's streams, created through one client (leaf links carry the API calls)."""
    return {code: await ensure_region_streams(nc, code) for code in topology.codes}
