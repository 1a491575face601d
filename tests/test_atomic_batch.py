"""What decision 0006 relies on in nats-server: an atomic batch publish (ADR-50, 2.12+) that
carries an order's index message, on its own subject with
``Nats-Expected-Last-Subject-Sequence: 0``, and the decision record stores all of it or
nothing. A key seen before refuses the whole batch, record included, and at most 1,000
messages fit one batch. If a server upgrade changes either, this fails before the design
does."""

from __future__ import annotations

import json
from pathlib import Path

import nats

from ops.procs import standalone_jetstream

H_EXPECT = "Nats-Expected-Last-Subject-Sequence"


async def _commit(nc: nats.NATS, bid: str, keys: list[str], record: bytes) -> dict[str, object]:
    msgs = [(f"rl.key.{k}", k.encode(), {H_EXPECT: "0"}) for k in keys]
    msgs.append(("rl.rec", record, {}))
    for i, (subject, data, extra) in enumerate(msgs, 1):
        headers = {"Nats-Batch-Id": bid, "Nats-Batch-Sequence": str(i), **extra}
        if i < len(msgs):
            await nc.publish(subject, data, headers=headers)  # no PubAck within a batch
            continue
        headers["Nats-Batch-Commit"] = "1"
        reply = await nc.request(subject, data, headers=headers, timeout=5)
        out: dict[str, object] = json.loads(reply.data)
        return out
    raise AssertionError("unreachable")


async def test_an_atomic_batch_with_a_seen_key_stores_nothing(tmp_path: Path) -> None:
    srv, url = standalone_jetstream("atomic", tmp_path)
    try:
        nc = await nats.connect(url)
        try:
            # nats-py's StreamConfig has no allow_atomic: the raw API takes it
            cfg = {"name": "RL", "subjects": ["rl.>"], "allow_atomic": True, "allow_direct": True}
            created = json.loads(
                (await nc.request("$JS.API.STREAM.CREATE.RL", json.dumps(cfg).encode())).data
            )
            assert created["config"]["allow_atomic"] is True, created

            first = await _commit(nc, "b1", ["k1", "k2"], b"rec1")
            assert first["seq"] == 3 and first["count"] == 3, first

            again = await _commit(nc, "b2", ["k3", "k2"], b"rec2")
            assert again["error"]["err_code"] == 10071, again  # type: ignore[index]
            js = nc.jetstream()
            assert (await js.stream_info("RL")).state.messages == 3  # not k3, not rec2
            assert (await js.get_last_msg("RL", "rl.rec")).data == b"rec1"

            full = await _commit(nc, "b3", [f"x{i}" for i in range(999)], b"rec3")
            assert full["count"] == 1000, full
            over = await _commit(nc, "b4", [f"y{i}" for i in range(1000)], b"rec4")
            assert over["error"]["err_code"] == 10199, over  # type: ignore[index]
        finally:
            await nc.close()
    finally:
        srv.stop()
