"""The ledger writer end to end: JetStream EXECOUT of every region -> PostgreSQL.

Real nats-server mesh (``mesh``), real PostgreSQL (``pg_dsn`` and a private server for the
outage drill). Each test uses its own durable consumer starting at the end of the stream and
its own trade-id tag, so fills published by other tests on the shared mesh cannot confuse it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
import types
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import psycopg
import pytest
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from ledger.held import outstanding, post_held
from ledger.migrations import migrate
from ledger.testing import random_fills
from ledger.verify import ProblemKind, verify
from ledger.writer import LedgerWriter, WriterConfig
from ops.cli_ledger import register
from ops.procs import PostgresServer, free_ports
from regions.topology import Desk, Topology
from router.contract import Fill, decode, encode
from router.subjects import fill as fill_subject

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ldb(pg_dsn: str, topology: Topology) -> str:
    migrate(pg_dsn, topology)
    return pg_dsn


class Running:
    def __init__(self, writer: LedgerWriter, stop: asyncio.Event, task: asyncio.Task[None]):
        self.writer, self.stop, self.task = writer, stop, task

    def metric(self, name: str, **labels: str) -> float:
        base = {"region": self.writer.region, "service": "ledger"}
        v = self.writer.registry.get_sample_value(name, {**base, **labels})
        return v or 0.0

    async def shutdown(self) -> None:
        self.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 15)


@contextlib.asynccontextmanager
async def running_writer(
    mesh: Any, topology: Topology, dsn: str, region: str, durable: str, **cfg: Any
) -> AsyncIterator[Running]:
    writer = LedgerWriter(
        topology=topology,
        config=WriterConfig(
            region=region,
            durable=durable,
            deliver_new=True,
            fetch_timeout_s=0.25,
            retry_max_s=0.5,
            **cfg,
        ),
        nats_url=mesh.url(region),
        dsn=dsn,
        registry=CollectorRegistry(),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    ready = asyncio.create_task(writer.ready.wait())
    await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert writer.ready.is_set()
    r = Running(writer, stop, task)
    try:
        yield r
    finally:
        if not task.done():
            await r.shutdown()


async def publish(nc: NATS, region: str, fills: list[Fill]) -> None:
    js = nc.jetstream(domain=region)
    for i in range(0, len(fills), 200):
        acks = await asyncio.gather(
            *(
                js.publish(fill_subject(region, f.symbol), encode(f), stream="EXECOUT")
                for f in fills[i : i + 200]
            )
        )
        assert all(a.stream == "EXECOUT" for a in acks)


def count(dsn: str, tag: str) -> tuple[int, int]:
    with psycopg.connect(dsn, connect_timeout=2) as c:
        row = c.execute(
            "SELECT (SELECT count(*) FROM transfers WHERE trade_id LIKE %s), "
            "(SELECT count(*) FROM postings WHERE transfer_id LIKE %s)",
            (f"%-{tag}-%", f"%-{tag}-%:%"),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.OperationalError):
            if await asyncio.to_thread(cond):
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def snapshot(dsn: str, tag: str) -> dict[str, Any]:
    with psycopg.connect(dsn) as c:
        return {
            "postings": c.execute(
                "SELECT region, id, transfer_id, account, amount, hash "
                "FROM postings ORDER BY region, id"
            ).fetchall(),
            "balances": c.execute(
                "SELECT region, account, currency, balance FROM balances ORDER BY 1, 2, 3"
            ).fetchall(),
            "heads": c.execute(
                "SELECT region, last_posting_id, last_hash FROM chain_heads ORDER BY 1"
            ).fetchall(),
        }


async def test_fills_of_every_region_land_in_their_partitions_and_replays_are_no_ops(
    mesh: Any, topology: Topology, ldb: str
) -> None:
    tag = "w" + uuid.uuid4().hex[:8]
    per_region = {
        c: random_fills(topology, 40, prefix=tag, region=c, seed=i)
        for i, c in enumerate(topology.codes)
    }
    async with contextlib.AsyncExitStack() as stack:
        ws = {
            c: await stack.enter_async_context(
                running_writer(mesh, topology, ldb, c, f"LT_{tag}_{c}")
            )
            for c in topology.codes
        }
        ncs = {c: await mesh.connect(c) for c in topology.codes}
        try:
            for c, fills in per_region.items():
                await publish(ncs[c], c, fills)
            # a garbage payload and a fill for an unknown account must not block the stream;
            # the garbage is terminated, the fill held (a trade this writer's topology does not
            # know yet: never dropped from the books of record)
            bad = per_region["lon"][0]
            await (
                ncs["lon"]
                .jetstream(domain="lon")
                .publish(fill_subject("lon", "EURUSD"), b"\x93not a fill", stream="EXECOUT")
            )
            await publish(
                ncs["lon"],
                "lon",
                [dataclasses.replace(bad, trade_id=f"lon-EURUSD-{tag}-x", buy_account="NOBODY")],
            )
            # and one no topology could post here (another region's fill): terminated
            await (
                ncs["lon"]
                .jetstream(domain="lon")
                .publish(
                    fill_subject("lon", "EURUSD"),
                    encode(
                        dataclasses.replace(bad, trade_id=f"lon-EURUSD-{tag}-y", exec_region="nyc")
                    ),
                    stream="EXECOUT",
                )
            )
            await publish(
                ncs["lon"], "lon", random_fills(topology, 5, prefix=tag + "z", region="lon", seed=9)
            )
            await wait_for(lambda: count(ldb, tag) == (2 * 120, 4 * 120), 20, "all fills")
            await wait_for(lambda: count(ldb, tag + "z") == (2 * 5, 4 * 5), 5, "later fills")
            with psycopg.connect(ldb) as conn:
                for c, fills in per_region.items():
                    got = {
                        r[0]
                        for r in conn.execute(
                            f"SELECT DISTINCT trade_id FROM transfers_{c} WHERE trade_id LIKE %s",
                            (f"%-{tag}-%",),
                        )
                    }
                    assert got == {f.trade_id for f in fills}
                    n = conn.execute(
                        f"SELECT count(*), min(region), max(region) FROM postings_{c} "
                        "WHERE transfer_id LIKE %s",
                        (f"%-{tag}-%",),
                    ).fetchone()
                    assert n == (4 * len(fills), c, c)
            assert ws["lon"].metric("meridian_ledger_fills_rejected_total", field="payload") == 1
            assert ws["lon"].metric("meridian_ledger_fills_held_total", field="buy_account") >= 1
            assert not ws["lon"].metric("meridian_ledger_fills_rejected_total", field="buy_account")
            rejected = ws["lon"].metric("meridian_ledger_fills_rejected_total", field="exec_region")
            assert rejected == 1  # another region's fill: no topology could post it here
            ci = await ncs["lon"].jetstream(domain="lon").consumer_info("EXECOUT", f"LT_{tag}_lon")
            assert ci.num_ack_pending == 1  # held: not acked, so not lost
            before = snapshot(ldb, tag)
            # replay every fill event twice
            for c, fills in per_region.items():
                await publish(ncs[c], c, fills + fills)
            await wait_for(
                lambda: all(
                    ws[c].metric("meridian_ledger_transfers_replayed_total") >= 160
                    for c in topology.codes
                ),
                20,
                "replays processed",
            )
            assert snapshot(ldb, tag) == before
            assert all(
                ws[c].metric("meridian_ledger_postings_total") == 160 + (20 if c == "lon" else 0)
                for c in topology.codes
            )
        finally:
            for nc in ncs.values():
                await nc.close()
    # the held fill is missing from the books, and verify says so, naming it
    with psycopg.connect(ldb) as conn:
        held = outstanding(conn, topology.codes)
    assert [(h.trade_id, h.field) for h in held] == [(f"lon-EURUSD-{tag}-x", "buy_account")]
    assert decode(Fill, held[0].payload).buy_account == "NOBODY"
    rep = verify(ldb)
    assert [(p.kind, p.transfer_id) for p in rep.problems] == [
        (ProblemKind.HELD_FILL, f"lon-EURUSD-{tag}-x:base")
    ]
    # the remedy, once the topology knows the account: post it from its row
    knows = dataclasses.replace(
        topology, desks=(*topology.desks, Desk(code="NEWDESK", region="lon", accounts=("NOBODY",)))
    )
    async with await psycopg.AsyncConnection.connect(ldb) as aconn:
        res = await post_held(aconn, knows, "lon")
    assert [h.stream_seq for h in res.posted] == [held[0].stream_seq] and not res.still_held
    assert res.batch is not None and res.batch.transfers_new == 2
    assert verify(ldb).ok


async def test_a_held_fill_posted_from_its_row_is_then_acked_by_the_writer(
    mesh: Any, topology: Topology, pg: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fill whose account the writer does not know: kept in held_fills with its bytes and
    counted at each hold; ``post-held`` (a newer topology) posts it from the row; the writer,
    at the next hold, finds it posted and acks it, so it stops coming back, posted once."""
    import ledger.writer as lw

    monkeypatch.setattr(lw, "HOLD_S", 0.3)
    monkeypatch.setattr(lw, "HELD_COUNT_S", 0.2)
    dsn = pg.create_database("t_" + uuid.uuid4().hex[:12])
    migrate(dsn, topology)
    tag = "h" + uuid.uuid4().hex[:8]
    fill = dataclasses.replace(
        random_fills(topology, 1, prefix=tag, region="lon")[0], sell_account="NOBODY"
    )
    nc = await mesh.connect("lon")
    try:
        async with running_writer(mesh, topology, dsn, "lon", f"LT_{tag}") as w:
            await publish(nc, "lon", [fill])

            def holds() -> int:
                with psycopg.connect(dsn) as c:
                    row = c.execute("SELECT max(holds) FROM held_fills").fetchone()
                return int(row[0] or 0) if row else 0

            await wait_for(lambda: holds() >= 2, 10, "the fill held twice")
            with psycopg.connect(dsn) as c:
                assert [h.trade_id for h in outstanding(c, ["lon"])] == [fill.trade_id]
            cli = _cli(["held", "--dsn", dsn])
            assert cli[0] == 1 and "1 fills held, not posted" in cli[1]
            assert fill.trade_id in cli[1] and "sell_account" in cli[1]
            gauge = "meridian_ledger_held_outstanding"
            await wait_for(lambda: w.metric(gauge) == 1, 10, "the gauge counting it")
            # it has committed nothing, and still says its database answers
            assert w.metric("meridian_ledger_db_up") == 1

            knows = dataclasses.replace(
                topology,
                desks=(*topology.desks, Desk(code="NEWDESK", region="lon", accounts=("NOBODY",))),
            )
            async with await psycopg.AsyncConnection.connect(dsn) as aconn:
                res = await post_held(aconn, knows, "lon")
            assert len(res.posted) == 1 and res.batch and res.batch.transfers_new == 2
            js = nc.jetstream(domain="lon")

            async def pending() -> int:
                return int((await js.consumer_info("EXECOUT", f"LT_{tag}")).num_ack_pending)

            deadline = time.monotonic() + 10
            while await pending() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert await pending() == 0  # acked: it stops coming back
            await wait_for(lambda: w.metric(gauge) == 0, 10, "the gauge at 0 once posted")
            assert w.metric("meridian_ledger_transfers_total") == 0  # the writer posted nothing
    finally:
        await nc.close()
    assert count(dsn, tag) == (2, 4)
    assert verify(dsn).ok
    assert _cli(["held", "--dsn", dsn])[0] == 0


async def test_another_fill_under_a_posted_trade_id_is_terminated_and_the_rest_posted(
    mesh: Any, topology: Topology, pg: PostgresServer
) -> None:
    """A second fill under a trade id already posted, with another qty, was counted as a
    replay: the books short a trade, silently. It is terminated (logged, counted as rejected:
    it pages), the fill posted first stays, and every other fill of its batch posts; the
    same fill again is still a replay."""
    dsn = pg.create_database("t_" + uuid.uuid4().hex[:12])
    migrate(dsn, topology)
    tag = "c" + uuid.uuid4().hex[:8]
    fills = random_fills(topology, 6, prefix=tag, region="lon", seed=14)
    first = fills[0]
    other = dataclasses.replace(first, qty=first.qty + 1000)
    nc = await mesh.connect("lon")
    try:
        async with running_writer(mesh, topology, dsn, "lon", f"LT_{tag}") as w:
            await publish(nc, "lon", [first])
            await wait_for(lambda: count(dsn, tag) == (2, 4), 10, "the first fill")
            await publish(nc, "lon", [fills[1], other, first, *fills[2:]])
            await wait_for(lambda: count(dsn, tag) == (12, 24), 10, "the other fills")
            rejected = "meridian_ledger_fills_rejected_total"
            await wait_for(lambda: w.metric(rejected, field="trade_id") == 1, 10, "the conflict")
            assert w.metric("meridian_ledger_transfers_replayed_total") == 2  # `first` again
            assert w.metric("meridian_ledger_transfers_total") == 12
            ci = await nc.jetstream(domain="lon").consumer_info("EXECOUT", f"LT_{tag}")
            assert ci.num_ack_pending == 0  # terminated, not held: nothing left to redeliver
    finally:
        await nc.close()
    with psycopg.connect(dsn) as c:
        qty = c.execute("SELECT DISTINCT qty FROM transfers WHERE trade_id = %s", (first.trade_id,))
        assert qty.fetchall() == [(first.qty,)]
    assert verify(dsn).ok


async def test_a_held_fill_under_a_trade_id_posted_with_other_terms_is_terminated(
    mesh: Any, topology: Topology, pg: PostgresServer
) -> None:
    """A held fill was acked as posted once its trade id was in the books, whatever trade
    holds it: a second fill reusing a posted trade id, held for an account this topology
    lacks, was dropped unnoticed (not held, not rejected, verify passing). It is terminated
    and counted as rejected (pages), as the unheld path does."""
    dsn = pg.create_database("t_" + uuid.uuid4().hex[:12])
    migrate(dsn, topology)
    tag = "g" + uuid.uuid4().hex[:8]
    first = random_fills(topology, 1, prefix=tag, region="lon", seed=21)[0]
    other = dataclasses.replace(first, qty=first.qty + 1000, sell_account="NOBODY")
    nc = await mesh.connect("lon")
    try:
        async with running_writer(mesh, topology, dsn, "lon", f"LT_{tag}") as w:
            await publish(nc, "lon", [first])
            await wait_for(lambda: count(dsn, tag) == (2, 4), 10, "the first fill")
            await publish(nc, "lon", [other])
            rejected = "meridian_ledger_fills_rejected_total"
            await wait_for(lambda: w.metric(rejected, field="trade_id") == 1, 10, "the conflict")
            ci = await nc.jetstream(domain="lon").consumer_info("EXECOUT", f"LT_{tag}")
            assert ci.num_ack_pending == 0  # terminated: nothing left to redeliver
    finally:
        await nc.close()
    assert count(dsn, tag) == (2, 4)  # the first trade only


def _cli(argv: list[str]) -> tuple[int, str]:
    """``meridian ledger <argv>`` in this process: (exit code, stdout)."""
    import argparse
    import io
    from contextlib import redirect_stdout

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["ledger", *argv])
    out = io.StringIO()
    with redirect_stdout(out):
        rc = args.func(args)
    return int(rc), out.getvalue()


async def test_writer_killed_mid_batch_and_connection_cut_lose_and_duplicate_nothing(
    mesh: Any, topology: Topology, ldb: str
) -> None:
    tag = "k" + uuid.uuid4().hex[:8]
    durable = f"LT_{tag}"
    fills = random_fills(topology, 1500, prefix=tag, region="sgp", seed=11)
    nc = await mesh.connect("sgp")
    try:
        async with running_writer(
            mesh, topology, ldb, "sgp", durable, batch_max=50, ack_wait_s=1.5
        ) as w1:
            feeder = asyncio.create_task(publish(nc, "sgp", fills))
            while w1.writer.committed_batches < 3:
                await asyncio.sleep(0.001)
            w1.task.cancel()  # the crash: whatever batch is in flight is neither acked nor kept
            with contextlib.suppress(asyncio.CancelledError):
                await w1.task
            await feeder
        done_first = count(ldb, tag)[0] // 2
        assert 0 < done_first < len(fills)
        async with running_writer(
            mesh, topology, ldb, "sgp", durable, batch_max=50, ack_wait_s=1.5
        ) as w2:
            while w2.writer.committed_batches < 2:
                await asyncio.sleep(0.005)
            # cut the writer's database connection under it (as a failover or a crash would)
            with psycopg.connect(ldb, autocommit=True) as c:
                c.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'ledger-writer-sgp' AND datname = "
                    "current_database()"
                )
            await wait_for(
                lambda: count(ldb, tag) == (2 * len(fills), 4 * len(fills)),
                30,
                "every fill exactly once",
            )
            assert w2.metric("meridian_ledger_db_retries_total", kind="connection") >= 1
    finally:
        await nc.close()
    with psycopg.connect(ldb) as c:
        dupes = c.execute(
            "SELECT trade_id, count(*) FROM transfers WHERE trade_id LIKE %s "
            "GROUP BY trade_id HAVING count(*) <> 2",
            (f"%-{tag}-%",),
        ).fetchall()
    assert dupes == []
    assert verify(ldb).ok


async def test_database_outage_buffers_in_jetstream_and_drains(
    mesh: Any, topology: Topology
) -> None:
    # Not under tmp_path: pytest re-chmods /tmp/pytest-of-<user> to 0700 when another session
    # starts, and the postgres user would then lose access to its data dir mid-test.
    base = Path(tempfile.mkdtemp(prefix="ledger-outage-", dir="/tmp"))
    os.chmod(base, 0o755)
    (port,) = free_ports(1)
    server = PostgresServer(base / "data", port, base / "pg.log", fsync=False)
    await asyncio.to_thread(server.start)
    try:
        dsn = server.create_database("ledger")
        await asyncio.to_thread(migrate, dsn, topology)
        tag = "o" + uuid.uuid4().hex[:8]
        fills = random_fills(topology, 600, prefix=tag, region="nyc", seed=12)
        nc = await mesh.connect("nyc")
        try:
            async with running_writer(
                mesh, topology, dsn, "nyc", f"LT_{tag}", batch_max=100, ack_wait_s=3
            ) as w:

                async def feed() -> None:
                    for i in range(0, len(fills), 20):  # ~8 s of steady fills
                        await publish(nc, "nyc", fills[i : i + 20])
                        await asyncio.sleep(0.25)

                feeder = asyncio.create_task(feed())
                await asyncio.sleep(1.0)
                await asyncio.to_thread(server.stop)  # PostgreSQL is gone for 10 s (issue 4)
                t_down = time.monotonic()
                await asyncio.sleep(10.0)
                mid = w.metric("meridian_ledger_backlog")
                await asyncio.to_thread(server.start)
                await feeder
                await wait_for(
                    lambda: count(dsn, tag) == (2 * len(fills), 4 * len(fills)),
                    30,
                    "backlog drained",
                )
                drained_s = time.monotonic() - t_down
                assert w.metric("meridian_ledger_db_retries_total", kind="connection") >= 1
                assert mid >= 0
                assert drained_s < 40
        finally:
            await nc.close()
        report = verify(dsn)
        assert report.ok, [str(p) for p in report.problems]
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(base, ignore_errors=True)


async def test_the_backlog_counts_held_fills_and_holds_its_value_while_idle(
    mesh: Any, topology: Topology
) -> None:
    """Held fills take all of max_ack_pending: nothing more is delivered and every fetch
    times out while the rest wait. The backlog (pending + held) must say so at every fetch,
    not fall to 0 on each timeout: MeridianLedgerBacklogHigh needs it above for 2 minutes."""
    tag = "k" + uuid.uuid4().hex[:8]
    fills = [
        dataclasses.replace(f, buy_account="NOBODY")  # an account this writer does not know
        for f in random_fills(topology, 12, prefix=tag, region="lon", seed=4)
    ]
    nc = await mesh.connect("lon")
    try:
        # no database: the held fills cannot be recorded, and are held all the same
        nowhere = "postgresql://127.0.0.1:1/none"
        async with running_writer(
            mesh, topology, nowhere, "lon", f"LT_{tag}", max_ack_pending=5
        ) as w:
            await publish(nc, "lon", fills)
            held = "meridian_ledger_fills_held_total"
            await wait_for(lambda: w.metric(held, field="buy_account") >= 5, 10, "5 fills held")
            seen = set()
            for _ in range(12):  # ~10 fetch timeouts (0.25 s each)
                await asyncio.sleep(0.25)
                seen.add(w.metric("meridian_ledger_backlog"))
            assert seen == {12.0}  # 7 pending + 5 held, at every fetch and every timeout
            assert w.metric(held, field="buy_account") == 5  # none delivered again yet
    finally:
        await nc.close()


async def test_a_fill_from_a_newer_build_is_held_never_terminated(topology: Topology) -> None:
    """A fill in another contract version, or with a field this build does not know, is a
    trade a newer execution build made: held (nak'd for later), counted, never term()ed."""
    w = LedgerWriter(
        topology=topology,
        config=WriterConfig(region="lon"),
        nats_url="nats://127.0.0.1:1",
        dsn="postgresql://127.0.0.1:1/none",
    )
    fill = msgpack.unpackb(encode(random_fills(topology, 1, prefix="nb", region="lon")[0]))
    calls: list[str] = []

    class _Msg:
        def __init__(self, data: bytes) -> None:
            self.data, self.subject = data, fill_subject("lon", "EURUSD")
            self.headers = None
            self.metadata = types.SimpleNamespace(
                sequence=types.SimpleNamespace(stream=1), num_pending=0
            )

        async def nak(self, delay: float | None = None) -> None:
            calls.append("nak")

        async def term(self) -> None:
            calls.append("term")

    newer = [
        _Msg(msgpack.packb({**fill, "v": 2})),
        _Msg(msgpack.packb({**fill, "fee_minor": 7})),
    ]
    # (no database here: recording them in held_fills fails, and they are held all the same)
    assert await w.handle_batch(newer, asyncio.Event())  # type: ignore[arg-type]
    assert calls == ["nak", "nak"]
    base = {"region": "lon", "service": "ledger"}
    assert w.registry.get_sample_value("meridian_ledger_held_unrecorded_total", base) == 2
    for field in ("v", "fee_minor"):
        labels = {"region": "lon", "service": "ledger", "field": field}
        assert w.registry.get_sample_value("meridian_ledger_fills_held_total", labels) == 1
    # garbage is still terminated
    assert await w.handle_batch([_Msg(b"\x93not a fill")], asyncio.Event())  # type: ignore[list-item]
    assert calls[-1] == "term"


async def test_held_fills_count_in_the_backlog_until_they_stop_coming_back(
    topology: Topology,
) -> None:
    """The backlog is pending + held (its help says so): fills held in earlier batches are
    delivered, not acked, and still not in the ledger."""
    import ledger.writer as lw

    w = LedgerWriter(
        topology=topology,
        config=WriterConfig(region="lon"),
        nats_url="nats://127.0.0.1:1",
        dsn="postgresql://127.0.0.1:1/none",
    )
    fill = msgpack.unpackb(encode(random_fills(topology, 1, prefix="bl", region="lon")[0]))
    unknown = msgpack.packb({**fill, "buy_account": "NOBODY"})

    class _Msg:
        def __init__(self, seq: int, pending: int) -> None:
            self.data, self.subject, self.headers = unknown, fill_subject("lon", "EURUSD"), None
            self.metadata = types.SimpleNamespace(
                sequence=types.SimpleNamespace(stream=seq), num_pending=pending
            )

        async def nak(self, delay: float | None = None) -> None:
            return None

    def backlog() -> float:
        labels = {"region": "lon", "service": "ledger"}
        return w.registry.get_sample_value("meridian_ledger_backlog", labels) or 0.0

    await w.handle_batch([_Msg(1, 4), _Msg(2, 3)], asyncio.Event())  # type: ignore[list-item]
    assert backlog() == 3 + 2
    await w.handle_batch([_Msg(3, 2)], asyncio.Event())  # type: ignore[list-item]
    assert backlog() == 2 + 3  # 1 and 2 wait for their redelivery: still held
    await w.handle_batch([_Msg(1, 2)], asyncio.Event())  # type: ignore[list-item]
    assert backlog() == 2 + 3  # redelivered and held again: counted once
    # one not delivered again for HELD_FORGET_S was acked elsewhere, or EXECOUT dropped it
    w._held[2] -= lw.HELD_FORGET_S + 1
    w._held_pruned = 0.0
    await w.handle_batch([_Msg(3, 0)], asyncio.Event())  # type: ignore[list-item]
    assert backlog() == 0 + 2


def test_a_held_fill_is_named_by_its_trade_id_only_when_header_and_payload_agree() -> None:
    """The writer acks a held fill once its trade is posted, by the trade id it reads from
    the message: the header and the payload must not name two trades."""
    from ledger.held import held_trade_id

    body = msgpack.packb({"v": 2, "trade_id": "T-1"})
    assert held_trade_id({"Nats-Msg-Id": "T-1"}, body) == "T-1"
    assert held_trade_id({"Nats-Msg-Id": "T-1"}, b"\xc1") == "T-1"  # payload unreadable
    assert held_trade_id(None, body) == "T-1"
    assert held_trade_id({"Nats-Msg-Id": "T-2"}, body) is None  # they disagree
    assert held_trade_id(None, msgpack.packb({"trade_id": 7})) is None


async def test_a_held_count_that_times_out_keeps_the_posting_connection() -> None:
    """The count runs with its own 2 s statement timeout on the posting connection: its
    QueryCanceled left the connection sound but closed it, so a slow count reconnected the
    posting path every minute. A connection error still closes it."""
    from ledger.writer import LedgerWriter, WriterConfig
    from regions.topology import load_topology

    w = LedgerWriter(
        topology=load_topology(),
        config=WriterConfig(region="lon"),
        nats_url="nats://x",
        dsn="postgresql://x",
    )
    closed: list[bool] = []

    async def close() -> None:
        closed.append(True)

    for err, closes in (
        (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), False),
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
    ):
        closed.clear()

        async def conn(err: Exception = err) -> Any:
            raise err

        w._conn = conn  # type: ignore[method-assign]
        w._close_db = close  # type: ignore[method-assign]
        await w._count_held()
        assert bool(closed) is closes, err


async def test_a_writer_whose_topology_disagrees_with_the_ledgers_currencies_posts_nothing(
    ldb: str, topology: Topology
) -> None:
    """A stale topology file would post every amount scaled by a power of ten, for good (a
    posted trade is never posted again): the writer refuses its database connection, so
    nothing is posted and the fills wait in EXECOUT. post-held held such fills already; the
    live writer did not check."""
    import dataclasses

    from ledger.errors import LedgerConfigError
    from ledger.writer import LedgerWriter, WriterConfig

    eur = topology.currency("EUR")
    wrong = dataclasses.replace(
        topology,
        currencies=tuple(
            dataclasses.replace(c, minor_units=eur.minor_units + 1) if c is eur else c
            for c in topology.currencies
        ),
    )

    def writer(topo: Topology) -> LedgerWriter:
        return LedgerWriter(
            topology=topo, config=WriterConfig(region="lon"), nats_url="nats://x", dsn=ldb
        )

    with pytest.raises(LedgerConfigError, match="currency EUR: 3 minor units in this topology"):
        await writer(wrong)._conn()
    w = writer(topology)  # the topology migrate stored: it posts
    try:
        assert not (await w._conn()).closed
    finally:
        await w._close_db()


async def test_the_writers_statements_cannot_hang_a_batch_for_good(
    ldb: str, topology: Topology
) -> None:
    """No statement timeout and no keepalives: a commit waiting on a lost host or a lock
    behind a stuck session blocked for up to TCP's ~15 minutes, with no retry counted, no
    in_progress sent and SIGTERM ignored. Both are set on the writer's connection."""
    from ledger.writer import STATEMENT_TIMEOUT_S

    w = LedgerWriter(
        topology=topology, config=WriterConfig(region="lon"), nats_url="nats://x:1", dsn=ldb
    )
    conn = await w._conn()
    try:
        row = await (await conn.execute("SHOW statement_timeout")).fetchone()
        assert row is not None and row[0] == f"{int(STATEMENT_TIMEOUT_S)}s"
        assert conn.info.get_parameters().get("keepalives") == "1"
        assert not conn.autocommit  # the batches' transactions as before
    finally:
        await w._close_db()
