"""The floor of an order path's shape: bare hops over real JetStream, with no logic in them.

Each hop is its own Python process (uvloop, nats-py, the same pipelined publishes and
AckPolicy.ALL push consumers as Meridian's workers) that only moves a ~200-byte payload on.
So what a shape costs here is what its messages, PubAcks and process wakeups cost on this
machine, and nothing of Meridian's own code. ``meridian bench`` measures two shapes:

* ``today``: Meridian's order path. desk -> gateway (ORDERS, PubAck, reply ack) -> risk (a
  RISKLOG record per batch, PubAck, then one EXEC command per order) -> execution (one report
  per order to OUT) -> desk.
* ``entry``: risk at the entry (docs/benchmarks.md, "What would meet the targets"). desk ->
  entry (RISKLOG record per batch, PubAck, reply ack, then one EXEC command per order) ->
  execution -> desk. One process hop and one stream write fewer per order.

Everything runs on one nats-server with GOMAXPROCS=1 (what each region's server gets in the
mesh on 2 cores). ``python -m ops.skeleton`` runs both shapes and prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from ops.loadgen import hist, pct
from ops.procs import standalone_jetstream
from router.natsutil import H_MSG_ID, AsyncPublisher, take_batch

SHAPES: dict[str, tuple[str, ...]] = {
    "today": ("gateway", "risk", "execution"),
    "entry": ("entry", "execution"),
}
"""Shape -> the hop processes it starts (the desk is the measuring process)."""

STREAMS = {"ORD": "sk.ord", "LOG": "sk.log", "EXE": "sk.exe", "OUT": "sk.out"}
REQUEST = "sk.req"
Role = Callable[[NATS], Awaitable[None]]


# ---- the hops --------------------------------------------------------------------------------


async def _replier(nc: NATS, q: asyncio.Queue[tuple[asyncio.Future[Any], str]]) -> None:
    """Answer requests in arrival order once their write is stored (as the gateway does)."""
    while True:
        fut, reply = await q.get()
        await fut
        await nc.publish(reply, b"A")


async def _consume(nc: NATS, stream: str, durable: str, q: asyncio.Queue[Msg]) -> None:
    js = nc.jetstream()
    cfg = ConsumerConfig(ack_policy=AckPolicy.ALL, max_ack_pending=20_000)

    async def cb(m: Msg) -> None:
        q.put_nowait(m)

    await js.subscribe(
        f"{STREAMS[stream]}.>",
        durable=durable,
        stream=stream,
        cb=cb,
        manual_ack=True,
        config=cfg,
        pending_msgs_limit=1_000_000,
    )


Done = asyncio.Queue[tuple[list[asyncio.Future[Any]], Msg | None]]


async def _ack_when_stored(q: Done) -> None:
    """Ack a batch's last input (AckPolicy.ALL) once every output of it is stored."""
    while True:
        futs, last = await q.get()
        await asyncio.gather(*futs)
        if last is not None:
            await last.ack()


def _msg_id(payload: bytes, hop: str) -> dict[str, str]:
    return {H_MSG_ID: f"{hop}:{msgpack.unpackb(payload)['id']}"}


async def gateway(nc: NATS) -> None:
    pub = await AsyncPublisher(nc).start()
    replies: asyncio.Queue[tuple[asyncio.Future[Any], str]] = asyncio.Queue()

    async def on_request(m: Msg) -> None:
        fut = await pub.publish(f"{STREAMS['ORD']}.x", m.data, headers=_msg_id(m.data, "o"))
        replies.put_nowait((fut, m.reply))

    await nc.subscribe(REQUEST, cb=on_request, pending_msgs_limit=1_000_000)
    await _replier(nc, replies)


async def _decide_and_command(
    nc: NATS, pub: AsyncPublisher, inputs: list[bytes]
) -> list[asyncio.Future[Any]]:
    """One RISKLOG record for the batch, stored before any command it decided is sent."""
    await (await pub.publish(f"{STREAMS['LOG']}.x", msgpack.packb(inputs)))
    return [
        await pub.publish(f"{STREAMS['EXE']}.x", data, headers=_msg_id(data, "e"))
        for data in inputs
    ]


Outputs = Callable[[AsyncPublisher, list[Msg]], Awaitable[list[asyncio.Future[Any]]]]


async def _single_writer(nc: NATS, stream: str, durable: str, outputs: Outputs) -> None:
    """Consume ``stream`` in batches, publish each batch's outputs, ack it once they are
    stored (as Meridian's risk and execution workers do)."""
    pub = await AsyncPublisher(nc).start()
    q: asyncio.Queue[Msg] = asyncio.Queue()
    done: Done = asyncio.Queue()
    await _consume(nc, stream, durable, q)
    completer = asyncio.ensure_future(_ack_when_stored(done))
    while True:
        batch = await take_batch(q)
        done.put_nowait((await outputs(pub, batch), batch[-1]))
    completer.cancel()  # pragma: no cover - the loop runs until the process is stopped


async def risk(nc: NATS) -> None:
    async def decide(pub: AsyncPublisher, batch: list[Msg]) -> list[asyncio.Future[Any]]:
        return await _decide_and_command(nc, pub, [m.data for m in batch])

    await _single_writer(nc, "ORD", "risk", decide)


async def entry(nc: NATS) -> None:
    pub = await AsyncPublisher(nc).start()
    q: asyncio.Queue[Msg] = asyncio.Queue()
    done: Done = asyncio.Queue()

    async def on_request(m: Msg) -> None:
        q.put_nowait(m)

    await nc.subscribe(REQUEST, cb=on_request, pending_msgs_limit=1_000_000)
    completer = asyncio.ensure_future(_ack_when_stored(done))
    while True:
        batch = await take_batch(q)
        futs = await _decide_and_command(nc, pub, [m.data for m in batch])
        for m in batch:  # the order is journaled (its RISKLOG record is stored): ack it
            await nc.publish(m.reply, b"A")
        done.put_nowait((futs, None))
    completer.cancel()  # pragma: no cover


async def execution(nc: NATS) -> None:
    async def report(pub: AsyncPublisher, batch: list[Msg]) -> list[asyncio.Future[Any]]:
        return [
            await pub.publish(f"{STREAMS['OUT']}.x", m.data, headers=_msg_id(m.data, "r"))
            for m in batch
        ]

    await _single_writer(nc, "EXE", "execution", report)


ROLES: dict[str, Role] = {
    "gateway": gateway,
    "risk": risk,
    "entry": entry,
    "execution": execution,
}


# ---- the desk and the run --------------------------------------------------------------------


class Desk:
    """Sends orders (open loop at a rate, or closed loop with N in flight) and times the ack
    and the report of each."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.sent_ns: dict[int, int] = {}
        """Send times of orders not reported yet."""
        self.unacked: dict[int, int] = {}
        """Send times of orders not acked yet (a report can come before the ack)."""
        self.acks = hist()
        self.reports = hist()
        self.acked = 0
        self.reported = 0
        self.inflight = 0
        self._n = 0
        self._free = asyncio.Event()
        self._inbox = ""

    async def start(self) -> None:
        self._inbox = nc_inbox = self.nc.new_inbox()
        await self.nc.subscribe(f"{nc_inbox}.*", cb=self._on_ack, pending_msgs_limit=2_000_000)
        await self.nc.subscribe(
            f"{STREAMS['OUT']}.>", cb=self._on_report, pending_msgs_limit=2_000_000
        )
        await self.nc.flush()

    async def _send(self) -> None:
        i = self._n = self._n + 1
        self.sent_ns[i] = self.unacked[i] = time.perf_counter_ns()
        self.inflight += 1
        body = msgpack.packb({"id": i, "pad": "x" * 180})
        await self.nc.publish(REQUEST, body, reply=f"{self._inbox}.{i}")

    async def _on_ack(self, m: Msg) -> None:
        t0 = self.unacked.pop(int(m.subject.rsplit(".", 1)[1]), None)
        if t0 is not None:
            self.acked += 1
            self.acks.record_value(max(1, (time.perf_counter_ns() - t0) // 1000))

    async def _on_report(self, m: Msg) -> None:
        t0 = self.sent_ns.pop(msgpack.unpackb(m.data)["id"], None)
        if t0 is not None:
            self.reported += 1
            self.inflight -= 1
            self._free.set()
            self.reports.record_value(max(1, (time.perf_counter_ns() - t0) // 1000))

    async def run(self, *, seconds: float, rate: float | None, inflight: int) -> dict[str, Any]:
        self.acks, self.reports = hist(), hist()
        self.acked = self.reported = 0
        self.sent_ns.clear()
        self.unacked.clear()
        self.inflight = 0
        t0 = time.perf_counter()
        sent = 0
        while (now := time.perf_counter()) < t0 + seconds:
            if rate is not None:
                while sent < (now - t0) * rate:
                    await self._send()
                    sent += 1
                await asyncio.sleep(0.001)
            else:
                while self.inflight < inflight:
                    await self._send()
                    sent += 1
                self._free.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._free.wait(), 1.0)
        took = time.perf_counter() - t0
        deadline = time.perf_counter() + 5
        while self.reported < sent and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
        return {
            "offered_per_s": rate,
            "sent": sent,
            "acked": self.acked,
            "reported": self.reported,
            "reported_per_s": round(self.reported / took, 1),
            "submit_to_ack": pct(self.acks),
            "order_to_report": pct(self.reports),
        }


def _cpu_s(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/stat") as f:
                t = f.read().split(") ", 1)[1].split()
            total += (int(t[11]) + int(t[12])) / tick
    return total


async def measure_shape(
    shape: str, tmp: Path, *, seconds: float = 5.0, rate: float = 1000.0, warmup_s: float = 1.0
) -> dict[str, Any]:
    """Start a server and the shape's hops, then measure: ``rate`` orders/s offered (latency,
    CPU per order of every process) and a closed loop of 256 in flight (max orders/s)."""
    import nats

    srv, url = standalone_jetstream(f"skeleton-{shape}", tmp / f"skeleton-{shape}", gomaxprocs=1)
    hops: list[subprocess.Popen[str]] = []
    try:
        nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
        js = nc.jetstream()
        for name, prefix in STREAMS.items():
            await js.add_stream(StreamConfig(name=name, subjects=[f"{prefix}.>"]))
        for role in SHAPES[shape]:
            p = subprocess.Popen(
                [sys.executable, "-m", "ops.skeleton", "hop", role, url],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert p.stdout is not None
            if p.stdout.readline().strip() != "READY":
                raise RuntimeError(f"skeleton hop {role} did not start")
            hops.append(p)
        desk = Desk(nc)
        await desk.start()
        await desk.run(seconds=warmup_s, rate=rate, inflight=0)
        pids = [p.pid for p in hops] + ([srv.pid] if srv.pid else [])
        c0, me0 = _cpu_s(pids), time.process_time()
        at_rate = await desk.run(seconds=seconds, rate=rate, inflight=0)
        c1, me1 = _cpu_s(pids), time.process_time()
        n = max(1, at_rate["reported"])
        at_rate["cpu_us_per_order"] = round((c1 - c0 + me1 - me0) / n * 1e6)
        closed = await desk.run(seconds=seconds, rate=None, inflight=256)
        await nc.close()
        return {"hops": list(SHAPES[shape]), "at_rate": at_rate, "closed_loop": closed}
    finally:
        for p in hops:
            p.kill()
            p.wait()
        srv.stop()


async def measure_shapes(tmp: Path, *, seconds: float = 5.0) -> dict[str, Any]:
    return {shape: await measure_shape(shape, tmp, seconds=seconds) for shape in SHAPES}


def _hop_main(role: str, url: str) -> None:
    from ops.runtime import run

    async def go() -> None:
        import nats

        nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
        task = asyncio.ensure_future(ROLES[role](nc))
        await nc.flush()
        await asyncio.sleep(0.2)  # the role's subscriptions are in place
        print("READY", flush=True)
        await task

    run(go())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="floor of the order path's shapes (no logic)")
    sub = ap.add_subparsers(dest="cmd")
    hop = sub.add_parser("hop")
    hop.add_argument("role", choices=sorted(ROLES))
    hop.add_argument("url")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args(argv)
    if args.cmd == "hop":
        _hop_main(args.role, args.url)
        return
    with tempfile.TemporaryDirectory() as t:
        print(json.dumps(asyncio.run(measure_shapes(Path(t), seconds=args.seconds)), indent=1))


if __name__ == "__main__":
    main()
