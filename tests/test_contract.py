"""Wire contract v1: strict decoding, typed rejects, schema generated from the code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import contract
from router.contract import ContractError, NewOrder, OrdType, RejectReason, Side, TimeInForce

SCHEMA = Path(__file__).resolve().parent.parent / "docs" / "contract.schema.json"


def order(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "v": 1,
        "account": "LON-HF-01",
        "cl_ord_id": "c1",
        "symbol": "EURUSD",
        "side": "BUY",
        "ord_type": "LIMIT",
        "tif": "GTC",
        "qty": 1_000_000,
        "price_ticks": 108450,
    }
    base.update(kw)
    return base


def pack(d: dict[str, object]) -> bytes:
    return msgpack.packb(d)  # type: ignore[no-any-return]


def test_round_trip() -> None:
    m = NewOrder(
        account="A-1",
        cl_ord_id="x",
        symbol="USDJPY",
        side=Side.SELL,
        ord_type=OrdType.LIMIT,
        tif=TimeInForce.IOC,
        qty=5,
        price_ticks=151200,
    )
    assert contract.decode(NewOrder, contract.encode(m)) == m


@pytest.mark.parametrize(
    ("raw", "reason", "field"),
    [
        (order(v=2), RejectReason.UNSUPPORTED_VERSION, "v"),
        (order(v=None), RejectReason.UNSUPPORTED_VERSION, "v"),
        (order(v=1.0), RejectReason.UNSUPPORTED_VERSION, "v"),
        (order(cl_ord_id="abc\n"), RejectReason.INVALID_FIELD, "cl_ord_id"),
        (order(account="LON-HF-01\n"), RejectReason.INVALID_FIELD, "account"),
        (order(qty=0), RejectReason.INVALID_FIELD, "qty"),
        (order(qty=-5), RejectReason.INVALID_FIELD, "qty"),
        (order(qty=1.5), RejectReason.MALFORMED, "qty"),
        (order(qty=math.nan), RejectReason.MALFORMED, "qty"),
        (order(price_ticks=math.inf), RejectReason.MALFORMED, "price_ticks"),
        (order(qty="100"), RejectReason.MALFORMED, "qty"),
        (order(qty=True), RejectReason.MALFORMED, "qty"),
        (order(side="HOLD"), RejectReason.INVALID_FIELD, "side"),
        (order(symbol="EUR/USD"), RejectReason.INVALID_FIELD, "symbol"),
        (order(cl_ord_id=""), RejectReason.INVALID_FIELD, "cl_ord_id"),
        (order(cl_ord_id="x" * 65), RejectReason.INVALID_FIELD, "cl_ord_id"),
        (order(extra=1), RejectReason.MALFORMED, "extra"),
        ({k: v for k, v in order().items() if k != "qty"}, RejectReason.MALFORMED, "qty"),
    ],
)
def test_bad_fields_name_the_field(
    raw: dict[str, object], reason: RejectReason, field: str
) -> None:
    with pytest.raises(ContractError) as ei:
        contract.decode(NewOrder, pack(raw))
    assert ei.value.reason is reason
    assert ei.value.field == field


def test_oversized_and_non_map() -> None:
    with pytest.raises(ContractError) as ei:
        contract.decode(NewOrder, b"\x00" * (contract.MAX_PAYLOAD_BYTES + 1))
    assert ei.value.reason is RejectReason.OVERSIZED
    for junk in (b"", b"\xc1", pack([1, 2]), b"\x81\x01\x02"):  # type: ignore[list-item]
        with pytest.raises(ContractError) as ei:
            contract.decode(NewOrder, junk)
        assert ei.value.reason is RejectReason.MALFORMED


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_decode_or_raise_contract_error(data: bytes) -> None:
    try:
        contract.decode(NewOrder, data)
    except ContractError as e:
        assert isinstance(e.reason, RejectReason)


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=10),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*order().keys(), "zz"]), _values, max_size=12))
def test_any_map_decodes_or_raises_contract_error(raw: dict[str, object]) -> None:
    try:
        m = contract.decode(NewOrder, pack(raw))
    except ContractError as e:
        assert isinstance(e.reason, RejectReason) and isinstance(e.field, str)
    else:
        assert m.qty > 0 and isinstance(m.qty, int)


def test_committed_schema_is_generated_from_the_code() -> None:
    """docs/contract.schema.json must be regenerated (python -m router.contract) on change."""
    assert json.loads(SCHEMA.read_text()) == json.loads(
        json.dumps(contract.json_schema(), sort_keys=True)
    )
    defs = contract.json_schema()["$defs"]
    assert {
        "NewOrder",
        "CancelOrder",
        "ReplaceOrder",
        "OrderAck",
        "OrderReject",
        "ExecutionReport",
        "CancelReject",
        "Fill",
        "KillSwitch",
        "Quote",
    } <= set(defs)
    assert defs["NewOrder"]["properties"]["qty"]["minimum"] == 1
    assert defs["NewOrder"]["additionalProperties"] is False


def _holds(schema: dict[str, object], doc: dict[str, object]) -> bool:
    """The subset of JSON Schema the cross-field rules use: if/then, not, required, and
    properties with const or enum."""
    if "if" in schema and _holds(schema["if"], doc) and not _holds(schema["then"], doc):  # type: ignore[arg-type]
        return False
    if "not" in schema and _holds(schema["not"], doc):  # type: ignore[arg-type]
        return False
    if any(k not in doc for k in schema.get("required", [])):  # type: ignore[attr-defined]
        return False
    for name, rule in schema.get("properties", {}).items():  # type: ignore[attr-defined]
        if name in doc and ("const" in rule and doc[name] != rule["const"]):
            return False
        if name in doc and ("enum" in rule and doc[name] not in rule["enum"]):
            return False
    return True


@pytest.mark.parametrize("ord_type", list(OrdType))
@pytest.mark.parametrize("tif", list(TimeInForce))
@pytest.mark.parametrize("priced", [True, False])
def test_the_schemas_cross_field_rules_are_the_entry_checks(
    ord_type: OrdType, tif: TimeInForce, priced: bool
) -> None:
    """The schema's if/then rules of a NewOrder (MARKET: no price, IOC or FOK; LIMIT: a
    price) accept exactly what the gateway's checks (router.entry.check_request) accept."""
    from regions.topology import load_topology
    from router.entry import check_request

    raw = order(ord_type=ord_type.value, tif=tif.value)
    if not priced:
        del raw["price_ticks"]
    rules = contract.json_schema()["$defs"]["NewOrder"]["allOf"]
    by_schema = all(_holds(r, raw) for r in rules)
    msg = contract.decode(NewOrder, pack(raw))
    try:
        check_request(load_topology(), "LON-HF-01", msg)
    except ContractError as e:
        assert e.reason is RejectReason.INVALID_FIELD
        by_code = False
    else:
        by_code = True
    assert by_schema == by_code
