"""Long work on a writer's loop without holding it: snapshots encoded in slices are the same
bytes as msgpack, the loop turns meanwhile, the captured state is unaffected by what the
worker does after the capture, and a Turn yields once its time is up."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import msgpack
import pytest

from regions.topology import load_topology
from router.book import OrderBook
from router.contract import Side
from router.execution import snapshot_body, snapshot_parts
from router.risk import RiskEngine, RiskLimits
from router.yielding import Turn, join_yielding, packb_yielding
from tests.test_book import cxl, rpl, sub


async def _ticks_during(work: Awaitable[Any]) -> tuple[Any, int]:
    """``work``'s result, and how many times another task ran meanwhile."""
    ticks = 0
    done = False

    async def tick() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.create_task(tick())
    await asyncio.sleep(0)
    ticks = 0
    try:
        return await work, ticks
    finally:
        done = True
        await t


def _trade(book: OrderBook, first: int, n: int, side: Side, px: int = 108450) -> None:
    """``n`` orders of one side at ``px`` (accounts A buy, B sell: never a self-trade)."""
    for i in range(first, first + n):
        acct = "A" if side is Side.BUY else "B"
        book.apply(
            sub(f"O{i}{side.value}", side, 1_000_000, px, acct=acct), seq=book.last_seq + 1, ts_ns=1
        )


def _risk_like(n: int) -> dict[str, Any]:
    return {
        "v": 1,
        "engine": {
            "accounts": {
                "A": {"cl_ids": {f"c{i}": f"O{i}" for i in range(n)}, "orders": [], "p": {}},
                "B": {"cl_ids": {}, "orders": [["O1", "c1", "EURUSD", "BUY", 1, 2, 0]]},
            },
            "kills": [],
        },
        "decided": [f"o:{i}" for i in range(n // 2)],
        "pending": {f"o:{i}": b"\x93" + bytes(i % 7) for i in range(n // 3)},
        "t": (1, 2.5, None, True),
    }


@pytest.mark.parametrize(("size", "slice_len"), [(0, 7), (7, 7), (8, 7), (100, 7), (1000, 20)])
def test_packb_yielding_writes_what_packb_writes(size: int, slice_len: int) -> None:
    obj = _risk_like(size)
    assert asyncio.run(packb_yielding(obj, slice_len)) == msgpack.packb(obj, use_bin_type=True)


def test_long_maps_and_arrays_take_32_bit_headers_in_slices() -> None:
    obj = {"m": {i: i for i in range(70_001)}, "a": list(range(70_001))}
    got = asyncio.run(packb_yielding(obj, 70_000))  # slices of 70,000: map32/array32 headers
    assert got == msgpack.packb(obj, use_bin_type=True)


def test_the_loop_turns_between_slices() -> None:
    state = {"cl_ids": {f"c{i}": f"O{i}" for i in range(200_000)}}
    _, ticks = asyncio.run(_ticks_during(packb_yielding(state, 20_000)))
    assert ticks >= 10  # one turn per slice at least


def test_risk_state_captured_then_changed_encodes_as_captured() -> None:
    engine = RiskEngine(load_topology(), "lon", RiskLimits.load())
    st = engine.state("LON-HF-01")
    for i in range(50):
        st.cl_ids[f"c{i}"] = f"O{i}"
    st.positions["EURUSD"] = 5
    captured = {"engine": engine.snapshot()}
    expected = msgpack.packb(captured, use_bin_type=True)
    st.cl_ids["late"] = "O-late"  # the worker goes on deciding
    st.positions["EURUSD"] = 9
    assert asyncio.run(packb_yielding(captured, 7)) == expected


def test_execution_snapshot_body_is_the_packed_map_byte_for_byte() -> None:
    """The spliced snapshot body is exactly what msgpack would write for the same map (so
    every restore path reads it unchanged), including a book past 64 KiB (bin 32)."""
    topo = load_topology()
    books = {s: OrderBook(topo.instrument(s), "lon") for s in ("EURUSD", "GBPUSD")}
    for i in range(600):  # EURUSD past 64 KiB of ended orders; GBPUSD empty
        _trade(books["EURUSD"], i, 1, Side.BUY)
        _trade(books["EURUSD"], i, 1, Side.SELL)
    seq = books["EURUSD"].last_seq
    assert len(books["EURUSD"].snapshot()) > 1 << 16
    expected = msgpack.packb(
        {
            "v": 1,
            "applied": seq,
            "region": "lon",
            "saved_ns": 12345,
            "books": {s: b.snapshot() for s, b in books.items()},
        },
        use_bin_type=True,
    )
    assert snapshot_body("lon", seq, books, 12345) == expected
    # joined in slices beside the next commands (what the worker stores), the same bytes
    parts = snapshot_parts("lon", seq, books, 12345)
    assert asyncio.run(join_yielding(parts, slice_len=7)) == expected


def test_a_book_keeps_the_length_of_its_snapshot_through_evictions_and_replaces() -> None:
    """The bin header of each book in the execution snapshot comes from totals the book
    keeps as orders end, are forgotten (terminal memory) and change ids (replace); a wrong
    total would make the snapshot unreadable, so check it against the bytes themselves."""
    topo = load_topology()
    book = OrderBook(topo.instrument("EURUSD"), "lon", terminal_memory=50)
    for i in range(120):  # many more ended orders than remembered: the oldest are forgotten
        _trade(book, i, 1, Side.BUY)
        _trade(book, i, 1, Side.SELL)
    assert len(book._terminal) == 50
    seq = book.last_seq
    for i in range(10):  # resting orders re-indexed under new ids, some cancelled
        seq += 1
        book.apply(sub(f"R{i}", Side.BUY, 1_000_000, 108000 - i), seq=seq, ts_ns=1)
        seq += 1
        book.apply(rpl(f"R{i}", 2_000_000, 107900 - i, new=f"n-R{i}"), seq=seq, ts_ns=1)
        if i % 3 == 0:
            seq += 1
            book.apply(cxl(f"R{i}", orig=f"n-R{i}"), seq=seq, ts_ns=1)

    def exact(b: OrderBook) -> None:
        groups, n = b.snapshot_groups()
        assert n == len(b.snapshot()) == sum(len(x) for g in groups for x in g)
        assert b._terminal_bytes == sum(map(len, b._terminal.values()))
        assert b._index_bytes == sum(map(len, b._index_packed.values()))

    exact(book)
    again = OrderBook.restore(book.snapshot(), topo.instrument("EURUSD"), "lon")
    exact(again)
    assert again.snapshot() == book.snapshot()
    expected = msgpack.packb(
        {
            "v": 1,
            "applied": seq,
            "region": "lon",
            "saved_ns": 0,
            "books": {"EURUSD": book.snapshot()},
        },
        use_bin_type=True,
    )
    assert asyncio.run(join_yielding(snapshot_parts("lon", seq, {"EURUSD": book}), 3)) == expected


def test_execution_parts_captured_then_book_changed_join_as_captured() -> None:
    book = OrderBook(load_topology().instrument("EURUSD"), "lon")
    _trade(book, 0, 40, Side.BUY)
    expected = snapshot_body("lon", 40, {"EURUSD": book})
    parts = snapshot_parts("lon", 40, {"EURUSD": book})
    _trade(book, 40, 40, Side.SELL)  # the next commands trade against the resting ones
    assert asyncio.run(join_yielding(parts, 5)) == expected


def test_many_accounts_with_open_orders_are_walked_not_packed_whole() -> None:
    """A real region has hundreds of accounts, each a short map holding long ones: the
    encoder walks into them (and into long lists of order rows) instead of packing the
    whole engine in one call, and still writes packb's bytes."""
    accounts = {
        f"ACCT-{a:03d}": {
            "orders": [
                [f"O{a}-{i}", f"c{i}", "EURUSD", "BUY", 108450, 1_000_000, 0] for i in range(300)
            ],
            "cl_ids": {f"c{a}-{i}": f"O{a}-{i}" for i in range(300)},
            "positions": {"EURUSD": a},
        }
        for a in range(200)
    }
    state = {"v": 1, "engine": {"accounts": accounts, "kills": []}, "decided": ["o:1"]}

    body, turns = asyncio.run(_ticks_during(packb_yielding(state, 1_000)))
    assert body == msgpack.packb(state, use_bin_type=True)
    assert turns >= 100  # 200 accounts x 900 entries, a turn every 1,000 entries or so


def test_a_turn_yields_only_once_its_time_is_up() -> None:
    """The single writers' batch loops call Turn.check() between commands; it must let the
    loop run (PubAcks, the server's pings) once the turn is over, and cost nothing before."""

    async def checks(turn: Turn, n: int) -> None:
        for _ in range(n):
            await turn.check()

    assert asyncio.run(_ticks_during(checks(Turn(3600.0), 100)))[1] == 0
    assert asyncio.run(_ticks_during(checks(Turn(0.0), 100)))[1] >= 99
