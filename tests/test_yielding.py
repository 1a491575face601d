"""Snapshots encoded in slices: the same bytes as msgpack, the loop turning meanwhile, and
the captured state unaffected by what the worker does after the capture."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest

from regions.topology import load_topology
from router.book import OrderBook, Submit
from router.contract import OrdType, Side, TimeInForce
from router.execution import snapshot_body, snapshot_parts
from router.risk import RiskEngine, RiskLimits
from router.yielding import Turn, join_yielding, packb_yielding


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
    async def go() -> int:
        turns = 0
        done = False

        async def tick() -> None:
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(tick())
        await packb_yielding({"cl_ids": {f"c{i}": f"O{i}" for i in range(200_000)}}, 20_000)
        done = True
        await t
        return turns

    assert asyncio.run(go()) >= 10  # one turn per slice at least


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


def test_execution_parts_captured_then_book_changed_join_as_captured() -> None:
    topo = load_topology()
    book = OrderBook(topo.instrument("EURUSD"), "lon")

    def submit(i: int, side: Side) -> None:
        book.apply(
            Submit(
                order_id=f"O{i}{side.value}",
                cl_ord_id=f"c{i}{side.value}",
                account="LON-HF-01" if side is Side.BUY else "LON-BANK-02",
                home_region="lon",
                side=side,
                ord_type=OrdType.LIMIT,
                tif=TimeInForce.GTC,
                qty=1_000_000,
                price_ticks=108450 - (i % 3),
            ),
            seq=book.last_seq + 1,
            ts_ns=1,
        )

    for i in range(40):
        submit(i, Side.BUY)
    expected = snapshot_body("lon", 40, {"EURUSD": book})
    parts = snapshot_parts("lon", 40, {"EURUSD": book})
    for i in range(40, 80):  # the next commands trade against the resting ones
        submit(i, Side.SELL)
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

    async def go() -> tuple[bytes, int]:
        turns = 0
        done = False

        async def tick() -> None:
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(tick())
        body = await packb_yielding(state, 1_000)
        done = True
        await t
        return body, turns

    body, turns = asyncio.run(go())
    assert body == msgpack.packb(state, use_bin_type=True)
    assert turns >= 100  # 200 accounts x 900 entries, a turn every 1,000 entries or so


def test_a_turn_yields_only_once_its_time_is_up() -> None:
    """The single writers' batch loops call Turn.check() between commands; it must let the
    loop run (PubAcks, the server's pings) once the turn is over, and cost nothing before."""

    async def ticks_during(turn: Turn, checks: int) -> int:
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
        for _ in range(checks):
            await turn.check()
        done = True
        await t
        return ticks

    assert asyncio.run(ticks_during(Turn(3600.0), 100)) == 0
    assert asyncio.run(ticks_during(Turn(0.0), 100)) >= 99
