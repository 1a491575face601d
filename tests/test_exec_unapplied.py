"""A command execution cannot apply is answered, never skipped in silence.

Risk approved it and the desk holds an OrderAck: with no report the order would hang for
ever, its exposure reserved in risk. A region without the symbol's book (risk routed it from
another topology), or a command another build encoded, gets the answer a book gives to what
it refuses: a REJECTED report for a submit, a cancel reject for a cancel or replace, with an
id from the command's stream sequence (a replay sends the same one). Commands are also
checked field by field before they reach a book.
"""

from __future__ import annotations

import asyncio
import math
import types
from typing import Any

import msgpack
import pytest

from regions.topology import load_topology
from router import subjects
from router.book import Cancel, ExpireDay, OrderBook, Submit
from router.commands import decode_command, encode_command
from router.contract import (
    CancelReject,
    ExecType,
    ExecutionReport,
    OrdStatus,
    OrdType,
    RejectReason,
    Side,
    TimeInForce,
)
from router.contract import decode as contract_decode
from router.execution import Cmd, ExecutionWorker, unapplied_report
from router.natsutil import RebuildError
from router.risk import Externals, RefPrice, RiskEngine, RiskLimits

TOPO = load_topology()


def _submit(**over: Any) -> dict[str, Any]:
    body = msgpack.unpackb(
        encode_command(
            Submit(
                order_id="O-1",
                cl_ord_id="c1",
                account="SGP-CORP-03",
                home_region="sgp",
                side=Side.BUY,
                ord_type=OrdType.LIMIT,
                tif=TimeInForce.GTC,
                qty=1_000_000,
                price_ticks=150000,
                entry_ns=7,
            )
        )
    )
    body.update(over)
    return body  # type: ignore[no-any-return]


def _cmd(body: dict[str, Any] | bytes, symbol: str = "USDJPY", seq: int = 42) -> Cmd:
    data = body if isinstance(body, bytes) else msgpack.packb(body)
    return Cmd(subjects.exec_in("sgp", symbol), data, seq, 1_700_000_000_000_000_000, None)


@pytest.mark.parametrize(
    "field, value",
    [
        ("qty", math.nan),
        ("qty", "5"),
        ("qty", True),
        ("qty", 0),
        ("price_ticks", -1),
        ("price_ticks", 1.5),
        ("order_id", ""),
        ("account", "A\x00B"),
        ("cl_ord_id", 7),
        ("entry_ns", None),
    ],
)
def test_a_command_with_a_field_of_the_wrong_type_or_range_never_reaches_a_book(
    field: str, value: Any
) -> None:
    with pytest.raises(ValueError, match=field):
        decode_command(msgpack.packb(_submit(**{field: value})))


@pytest.mark.parametrize(
    "expire",
    [
        {"op": "expire"},  # no roll
        {"op": "expire", "cutoff_ns": 0},
        {"op": "expire", "cutoff_ns": 5, "schedule": 7},
        {"op": "expire", "cutoff_ns": 5, "schedule": [7.5]},
        {"op": "expire", "cutoff_ns": 5, "schedule": [-1]},
        {"op": "expire", "cutoff_ns": 5, "schedule": list(range(1, 10))},  # more than 8
    ],
)
def test_a_malformed_roll_never_reaches_a_book(expire: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        decode_command(msgpack.packb(expire))


@pytest.mark.parametrize("op", [[], {}, None, 7, "SUBMIT"])
def test_a_command_with_an_op_of_the_wrong_type_is_bad_input(op: Any) -> None:
    """An unhashable op once raised TypeError, which the worker treats as its own fault."""
    with pytest.raises(ValueError, match="unknown op"):
        decode_command(msgpack.packb({**_submit(), "op": op}))


def test_a_roll_round_trips() -> None:
    roll = ExpireDay(cutoff_ns=5, schedule=(7, 9))
    assert decode_command(encode_command(roll)) == roll
    assert decode_command(msgpack.packb({"op": "expire", "cutoff_ns": 5})) == ExpireDay(cutoff_ns=5)


def test_well_formed_commands_still_decode() -> None:
    assert decode_command(msgpack.packb(_submit())).qty == 1_000_000  # type: ignore[union-attr]
    market = decode_command(msgpack.packb(_submit(ord_type="MARKET", price_ticks=None)))
    assert isinstance(market, Submit) and market.price_ticks is None
    with pytest.raises(ValueError):
        decode_command(msgpack.packb(_submit(side="SIDEWAYS")))
    with pytest.raises(ValueError):
        decode_command(msgpack.packb({**_submit(), "extra": 1}))


def test_a_submit_for_a_symbol_this_region_does_not_execute_is_rejected() -> None:
    r = unapplied_report(_cmd(_submit()), "sgp", "no book", no_book=True)
    assert isinstance(r, ExecutionReport)
    assert (r.exec_type, r.ord_status, r.reject_reason) == (
        ExecType.REJECTED,
        OrdStatus.REJECTED,
        RejectReason.UNKNOWN_SYMBOL.value,
    )
    assert (r.order_id, r.cl_ord_id, r.account, r.symbol, r.qty) == (
        "O-1",
        "c1",
        "SGP-CORP-03",
        "USDJPY",
        1_000_000,
    )
    assert r.exec_id == "sgp-USDJPY-42-x"  # from the stream sequence: a replay sends the same
    late = unapplied_report(
        _cmd(_submit(entry_ns=1_764_300_000_000_000_000)), "sgp", "", no_book=True
    )
    assert late is not None and late.entry_ns == 1_764_300_000_000_000_000  # kept, not zeroed
    assert r == unapplied_report(_cmd(_submit()), "sgp", "no book", no_book=True)


def test_a_malformed_submit_that_names_its_order_is_rejected_as_malformed() -> None:
    r = unapplied_report(_cmd(_submit(qty=math.nan)), "sgp", "qty: NaN", no_book=False)
    assert isinstance(r, ExecutionReport) and r.reject_reason == RejectReason.MALFORMED.value
    assert r.qty == 0 and "qty" in r.text


def test_a_submit_with_an_unreadable_enum_still_gets_its_rejection() -> None:
    # another build's side, order type or time in force: the order is still answered
    data = msgpack.packb(_submit(side="SELL_SHORT", ord_type="PEGGED", tif="GTX"))
    r = unapplied_report(_cmd(data), "sgp", "side: unknown", no_book=False)
    assert isinstance(r, ExecutionReport), r
    assert r.ord_status is OrdStatus.REJECTED and r.order_id == "O-1"


def test_a_cancel_or_replace_gets_a_cancel_reject() -> None:
    body = msgpack.unpackb(
        encode_command(
            Cancel(
                order_id="O-1",
                cl_ord_id="k1",
                orig_cl_ord_id="c1",
                account="SGP-CORP-03",
                home_region="sgp",
            )
        )
    )
    r = unapplied_report(_cmd(body), "sgp", "no book", no_book=True)
    assert isinstance(r, CancelReject)
    assert (r.response_to, r.reason, r.order_id) == ("cancel", RejectReason.UNKNOWN_SYMBOL, "O-1")


@pytest.mark.parametrize(
    "data",
    [b"\xc1garbage", msgpack.packb([1, 2]), msgpack.packb({"op": "expire"}), msgpack.packb({})],
)
def test_a_command_that_names_no_order_gets_no_answer(data: bytes) -> None:
    assert unapplied_report(_cmd(data), "sgp", "bad", no_book=False) is None


def test_the_answer_releases_what_risk_reserved() -> None:
    eng = RiskEngine(TOPO, "sgp", RiskLimits.load())
    from router.contract import NewOrder

    d = eng.on_new(
        NewOrder(
            account="SGP-CORP-03",
            cl_ord_id="c1",
            symbol="USDJPY",
            side=Side.BUY,
            ord_type=OrdType.LIMIT,
            tif=TimeInForce.GTC,
            qty=1_000_000,
            price_ticks=150000,
        ),
        order_id="O-1",
        accepted_ns=1,
        ext=Externals(rate_ok=True, ref=RefPrice(bid_ticks=149990, ask_ticks=150010)),
        seq=1,
    )
    assert d.command is not None and eng.exposure_usd("SGP-CORP-03") > 0
    cmd = _cmd(msgpack.unpackb(encode_command(d.command)))
    r = unapplied_report(cmd, "sgp", "no book", no_book=True)
    assert isinstance(r, ExecutionReport)
    eng.on_report(r)
    assert eng.exposure_usd("SGP-CORP-03") == 0 and eng.state("SGP-CORP-03").orders == {}


async def test_the_worker_publishes_the_answer_and_goes_on() -> None:
    class _Nc:
        def jetstream(self, domain: str) -> Any:
            return types.SimpleNamespace()

    w = ExecutionWorker(_Nc(), TOPO, "sgp")  # type: ignore[arg-type]
    w._fresh_books()  # sgp's own books: garbage on USDJPY is refused by the decoder, not for
    assert "USDJPY" in w.books and "EURUSD" not in w.books  # want of a book
    sent: list[tuple[str, dict[str, str]]] = []

    async def publish(subject: str, payload: bytes, headers: dict[str, str]) -> Any:
        sent.append((subject, headers))
        f = asyncio.get_running_loop().create_future()
        f.set_result(None)
        return f

    w.pub = types.SimpleNamespace(publish=publish)  # type: ignore[assignment]
    recorded: list[str] = []

    async def put(key: str, value: bytes) -> None:  # the bucket (a mesh test has the real one)
        recorded.append(key)

    w._refused_store = types.SimpleNamespace(put=put)
    futs = await w._apply_and_send(_cmd(_submit(), symbol="EURUSD"), True, None)  # lon's
    assert len(futs) == 1 and w.stats["bad"] == 1 and recorded == ["42"]
    answer = (
        subjects.report_exec("sgp", "sgp", "SGP-CORP-03"),
        {"Nats-Msg-Id": "sgp-EURUSD-42-x", "Mrd-Kind": "ExecutionReport"},
    )
    assert sent == [answer]
    assert await w._apply_and_send(_cmd(b"\xc1garbage", seq=43), True, None) == []
    assert recorded == ["42", "43"]  # refused with no answer: recorded all the same
    # sgp now executes EURUSD (a new topology, or a build that reads the command): a
    # replay of command 42 must not put the order refused before into the book
    w.books["EURUSD"] = OrderBook(TOPO.instrument("EURUSD"), "sgp")
    sent.clear()
    await w._apply_and_send(_cmd(_submit(), symbol="EURUSD"), True, None)
    assert sent == [answer] and len(w.books["EURUSD"]) == 0
    # a record is used only for the command it was made for (same sequence, other bytes:
    # a stream recreated while the bucket kept its keys)
    await w._apply_and_send(_cmd(_submit(order_id="O-9"), symbol="EURUSD"), True, None)
    assert w.books["EURUSD"].status("O-9") is not None
    # below the ack floor a command refused now for the first time is neither answered nor
    # recorded: the worker that acked it applied it (records come before acks), so this one
    # fails closed rather than rebuild books without that order
    with pytest.raises(RebuildError, match="command 44"):
        await w._apply_and_send(_cmd(_submit(order_id="O-7"), symbol="GBPUSD", seq=44), False, None)
    assert recorded == ["42", "43"] and 44 not in w._refused


async def test_only_what_names_an_order_the_book_does_not_hold_is_answered() -> None:
    """A malformed submit that reuses a live order's id is not that order's refusal; a
    malformed cancel of a live order says the order's real status; a fault of this build
    while applying (the book may be half changed) is never answered as a refusal."""

    class _Nc:
        def jetstream(self, domain: str) -> Any:
            return types.SimpleNamespace()

    w = ExecutionWorker(_Nc(), TOPO, "sgp")  # type: ignore[arg-type]
    w._fresh_books()
    book = w.books["USDJPY"]
    book.apply(decode_command(msgpack.packb(_submit())), seq=1, ts_ns=1)  # O-1 rests
    from router.execution import CommandRefused

    refused = CommandRefused("qty: NaN", False)
    assert w._answer(_cmd(_submit(qty=math.nan)), refused) is None
    cancel = msgpack.unpackb(
        encode_command(
            Cancel(
                order_id="O-1",
                cl_ord_id="k1",
                orig_cl_ord_id="c1",
                account="SGP-CORP-03",
                home_region="sgp",
            )
        )
    )
    r = w._answer(_cmd({**cancel, "reason": 5}), refused)
    assert isinstance(r, CancelReject) and r.ord_status is OrdStatus.NEW

    def broken(*a: Any, **k: Any) -> Any:
        raise KeyError("a bug")

    book.apply = broken  # type: ignore[method-assign]
    puts: list[str] = []

    async def put(key: str, value: bytes) -> None:
        puts.append(key)

    w._refused_store = types.SimpleNamespace(put=put)
    from router.execution import CommandFault

    with pytest.raises(CommandFault):  # the batch fails, and is rebuilt
        await w._apply_and_send(_cmd(_submit(order_id="O-2")), True, None)
    assert w.stats["bad"] == 1 and puts == ["42"]  # recorded as a fault, not a refusal
    assert 42 in w._faulted and 42 not in w._refused


async def test_refusal_records_of_either_format_load_and_garbage_fails_closed() -> None:
    """The first records held the answer only; later ones the command's digest and the
    answer (or none). Both load; a record of neither shape stops the rebuild, rather than
    let a refused command be applied."""
    from router.execution import _digest
    from router.natsutil import RebuildError

    class _Nc:
        def jetstream(self, domain: str) -> Any:
            return types.SimpleNamespace()

    answer = ["mrd.sgp.er.x.sgp.SGP-CORP-03", "sgp-EURUSD-7-x", "ExecutionReport", b"r"]
    values = {
        "7": msgpack.packb(answer),
        "8": msgpack.packb([_digest(b"cmd8"), None]),
        "3": msgpack.packb([_digest(b"old"), None]),  # at or below the snapshot: not needed
    }

    class _Kv:
        async def keys(self) -> list[str]:
            return list(values)

        async def get(self, key: str) -> Any:
            return types.SimpleNamespace(value=values[key])

    w = ExecutionWorker(_Nc(), TOPO, "sgp")  # type: ignore[arg-type]
    w._refused_store = _Kv()
    await w._load_refused(after=5)
    assert w._refused[7] == ("", (*answer, None))
    assert w._refused[8] == (_digest(b"cmd8"), None) and 3 not in w._refused
    values["10"] = msgpack.packb([_digest(b"cmd10"), None, "fault"])
    await w._load_refused(after=5)
    assert w._faulted == {10: _digest(b"cmd10")} and 10 not in w._refused
    values["9"] = msgpack.packb({"not": "a record"})
    with pytest.raises(RebuildError, match="refusal record 9"):
        await w._load_refused(after=5)


async def test_a_command_whose_application_failed_is_refused_by_the_replay() -> None:
    """Applying a command raises (a fault of this build; the book may be half changed): the
    fault is recorded and the batch fails. The rebuild's replay refuses the command,
    UNAVAILABLE, answering its order even below the ack floor and recording the refusal in
    place of the fault; the book is as if it never came. Below the ack floor a command that
    fails with no record was applied by the worker that acked it: the rebuild stops."""
    from router.execution import CommandFault, _digest

    class _Nc:
        def jetstream(self, domain: str) -> Any:
            return types.SimpleNamespace()

    faults: list[str] = []

    def worker() -> ExecutionWorker:
        w = ExecutionWorker(_Nc(), TOPO, "sgp")  # type: ignore[arg-type]
        w.metrics = types.SimpleNamespace(
            execution_faults=lambda s: types.SimpleNamespace(inc=lambda: faults.append(s))
        )
        w._fresh_books()
        w.pub = types.SimpleNamespace(publish=publish)  # type: ignore[assignment]
        w._refused_store = types.SimpleNamespace(put=put)
        return w

    sent: list[bytes] = []
    recorded: dict[str, Any] = {}

    async def publish(subject: str, payload: bytes, headers: dict[str, str]) -> Any:
        sent.append(payload)
        f = asyncio.get_running_loop().create_future()
        f.set_result(None)
        return f

    async def put(key: str, value: bytes) -> None:
        recorded[key] = msgpack.unpackb(value)

    def broken(*a: Any, **k: Any) -> Any:
        raise KeyError("a bug")

    w = worker()
    await w._apply_and_send(_cmd(_submit(), seq=1), True, None)  # O-1 rests
    sent.clear()
    faulting = _cmd(_submit(order_id="O-2", cl_ord_id="c2"), seq=2)
    w.books["USDJPY"].apply = broken  # type: ignore[method-assign]
    with pytest.raises(CommandFault):
        await w._apply_and_send(faulting, True, None)
    assert sent == [] and faults == ["USDJPY"]
    assert recorded == {"2": [_digest(faulting.data), None, "fault"]}

    # the rebuild: fresh books, the records loaded, the stream replayed (1 below the floor)
    r = worker()
    r._faulted = {2: _digest(faulting.data)}
    await r._apply_and_send(_cmd(_submit(), seq=1), False, None)
    await r._apply_and_send(faulting, False, None)  # below the floor too: answered all the same
    rep = contract_decode(ExecutionReport, sent[-1])
    assert (rep.order_id, rep.exec_type, rep.reject_reason) == (
        "O-2",
        ExecType.REJECTED,
        RejectReason.UNAVAILABLE,
    )
    assert r.books["USDJPY"].status("O-2") is None and r.books["USDJPY"].status("O-1") is not None
    assert recorded["2"][0] == _digest(faulting.data) and len(recorded["2"]) == 2  # now refused
    assert 2 in r._refused and 2 not in r._faulted
    # a later rebuild finds the refusal: not applied, and below the floor not sent again
    sent.clear()
    again = worker()
    again._refused = dict(r._refused)
    await again._apply_and_send(faulting, False, None)
    assert sent == [] and again.books["USDJPY"].status("O-2") is None

    # below the floor with no record: the worker that acked it applied it; this build fails
    late = worker()
    late.books["USDJPY"].apply = broken  # type: ignore[method-assign]
    with pytest.raises(RebuildError, match="command 2"):
        await late._apply_and_send(faulting, False, None)
    # above the floor, but handed to a predecessor (or published by this worker): its
    # outputs may have gone out, so it cannot be refused either
    handed = worker()
    handed._out_through = 2
    handed.books["USDJPY"].apply = broken  # type: ignore[method-assign]
    with pytest.raises(RebuildError, match="command 2"):
        await handed._apply_and_send(faulting, True, None)
    # a fault on every command is the build's, not theirs: past MAX_FAULTS within the window
    # (each a rebuild), the worker stops rather than crawl, however many snapshots between
    import time
    from collections import deque

    from router.execution import MAX_FAULTS

    systematic = worker()
    systematic._faults = deque([time.monotonic()] * MAX_FAULTS)
    systematic.books["USDJPY"].apply = broken  # type: ignore[method-assign]
    with pytest.raises(RebuildError, match="systematic"):
        await systematic._apply_and_send(_cmd(_submit(order_id="O-8"), seq=8), True, None)
    assert recorded["2"][0] == _digest(faulting.data) and len(recorded["2"]) == 2
    # as many faults over an hour ago count for nothing: a fault now is refused as usual
    from router.execution import FAULT_WINDOW_S, CommandFault

    spread = worker()
    spread._faults = deque([time.monotonic() - 2 * FAULT_WINDOW_S] * MAX_FAULTS)
    spread.books["USDJPY"].apply = broken  # type: ignore[method-assign]
    with pytest.raises(CommandFault):
        await spread._apply_and_send(_cmd(_submit(order_id="O-9"), seq=9), True, None)
    assert list(spread._faults) == [spread._faults[-1]]
