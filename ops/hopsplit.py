"""Where an order's time goes, hop by hop, from the timestamps the mesh already records.

For each order of a load run (same machine, one wall clock):

* the desk's send time (``sent_ns`` in the request) and the time its first report arrived;
* the gateway's accept time (its ``Mrd-Accepted-Ns`` on the order's ORDERS message; reports'
  ``entry_ns`` is the stored time since stop 20). A desk that stored its order itself (direct
  entry) has none: its "desk -> gateway" stage is then its store, and "gateway -> ORDERS" the
  histogram's floor (1 us): the bench's report drops that stage for its direct point;
* the time JetStream stored the order in ORDERS, its risk record in RISKLOG and its report in
  EXECOUT (each stored message's own timestamp);
* the EXEC command's stored time, which the book uses as its matching time (``transact_ns``).

So no worker needs extra instrumentation, and tracing can stay off (it doubles the path's CPU).
Stages, in order: desk -> gateway, gateway -> ORDERS stored, ORDERS -> RISKLOG stored (delivery
to risk, its decision, the record's write), RISKLOG -> EXEC stored (the record's PubAck back
to risk, the command's write), EXEC -> EXECOUT stored (delivery to execution, matching, the
report's write), EXECOUT -> desk.
"""

from __future__ import annotations

from typing import Any

import msgpack
from hdrh.histogram import HdrHistogram
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from router.natsutil import H_ACCEPTED_NS

STAGES = (
    "desk -> gateway",
    "gateway -> ORDERS",
    "ORDERS -> RISKLOG",
    "RISKLOG -> EXEC",
    "EXEC -> EXECOUT",
    "EXECOUT -> desk",
)


async def last_seqs(
    js: Any, streams: tuple[str, ...] = ("ORDERS", "RISKLOG", "EXECOUT")
) -> dict[str, int]:
    return {s: (await js.stream_info(s)).state.last_seq for s in streams}


def _cl_ids(stream: str, data: bytes) -> list[str]:
    """The client order ids a stored message is about (empty if none or undecodable)."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return []
    if not isinstance(body, dict):
        return []
    if stream != "RISKLOG":
        cl = body.get("cl_ord_id")
        return [cl] if isinstance(cl, str) else []
    out = []
    for rec in body.get("b", ()):
        if isinstance(rec, dict) and rec.get("k") == "order":
            out += _cl_ids("ORDERS", rec.get("p", b""))
    return out


async def stored_ns(
    js: Any,
    stream: str,
    after_seq: int,
    *,
    timeout_s: float = 2.0,
    stamps: dict[str, int] | None = None,
) -> dict[str, int]:
    """cl_ord_id -> when ``stream`` first stored a message about it, for messages after
    ``after_seq`` (an ephemeral consumer that acks nothing). ``stamps``, if given, gets
    cl_ord_id -> the gateway's accept stamp of each message that has one (ORDERS)."""
    info = await js.stream_info(stream)
    want = info.state.last_seq - after_seq
    sub = await js.pull_subscribe(
        "",
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after_seq + 1,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
        ),
    )
    out: dict[str, int] = {}
    got = 0
    try:
        while got < want:
            try:
                msgs = await sub.fetch(1000, timeout=timeout_s)
            except TimeoutError:
                break
            for m in msgs:
                got += 1
                at = int(m.metadata.timestamp.timestamp() * 1e9)
                stamp = (m.headers or {}).get(H_ACCEPTED_NS, "")
                for cl in _cl_ids(stream, m.data):
                    out.setdefault(cl, at)
                    if stamps is not None and stamp.isdigit():
                        stamps.setdefault(cl, int(stamp))
    finally:
        await sub.unsubscribe()
    return out


def split(
    orders: dict[str, tuple[int, int, int, int]], stored: dict[str, dict[str, int]]
) -> dict[str, Any]:
    """Percentiles per stage over ``orders``: cl_ord_id -> (desk send, gateway accept,
    matching time, desk receive), all UTC ns; ``stored``: stream -> cl_ord_id -> stored ns."""
    hs = {s: HdrHistogram(1, 60_000_000, 3) for s in STAGES}
    n = 0
    for cl, (sent, entry, transact, recv) in orders.items():
        pts = [
            sent,
            entry,
            stored["ORDERS"].get(cl),
            stored["RISKLOG"].get(cl),
            transact,
            stored["EXECOUT"].get(cl),
            recv,
        ]
        if not all(pts):
            continue
        n += 1
        for stage, a, b in zip(STAGES, pts, pts[1:], strict=False):
            hs[stage].record_value(max(1, (b - a) // 1000))  # type: ignore[operator]
    return {
        "orders": n,
        "stages": {
            s: {
                "p50_ms": h.get_value_at_percentile(50) / 1000,
                "p90_ms": h.get_value_at_percentile(90) / 1000,
                "p99_ms": h.get_value_at_percentile(99) / 1000,
                "mean_ms": round(h.get_mean_value() / 1000, 3),
            }
            for s, h in hs.items()
        },
    }
