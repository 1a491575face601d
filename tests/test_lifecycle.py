"""Order lifecycle table (router.lifecycle): every allowed and every forbidden transition."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.contract import TERMINAL_STATUSES, ExecType, OrdStatus
from router.errors import IllegalTransition, RouterError
from router.lifecycle import TRANSITIONS, allowed, is_terminal, transition

STATUSES: list[OrdStatus | None] = [None, *OrdStatus]
LIVE = {OrdStatus.NEW, OrdStatus.PARTIALLY_FILLED}


def spec(cur: OrdStatus | None, et: ExecType, new: OrdStatus) -> bool:
    """The FIX 4.4 rules in words, written independently of the table."""
    if cur is None:  # pending new: only acknowledged or refused
        return (et, new) in {
            (ExecType.NEW, OrdStatus.NEW),
            (ExecType.REJECTED, OrdStatus.REJECTED),
        }
    if cur not in LIVE:  # terminal (and the unused REPLACED status): nothing leaves it
        return False
    if et is ExecType.TRADE:
        return new in (OrdStatus.PARTIALLY_FILLED, OrdStatus.FILLED)
    if et is ExecType.CANCELED:
        return new is OrdStatus.CANCELED
    if et is ExecType.EXPIRED:
        return new is OrdStatus.EXPIRED
    if et is ExecType.REPLACED:  # a replace neither fills nor un-fills...
        # ...but one cutting a partly filled order to its filled quantity ends it FILLED
        # (the balance canceled: FIX 4.4, a reduce at or below cum qty)
        return new is cur or (cur, new) == (OrdStatus.PARTIALLY_FILLED, OrdStatus.FILLED)
    return False  # NEW twice, REJECTED after acceptance


@pytest.mark.parametrize(
    ("cur", "et", "new"), list(itertools.product(STATUSES, ExecType, OrdStatus))
)
def test_table_matches_fix_rules(cur: OrdStatus | None, et: ExecType, new: OrdStatus) -> None:
    if spec(cur, et, new):
        assert transition(cur, et, new, order_id="o1") is new
        assert new in allowed(cur, et)
    else:
        with pytest.raises(IllegalTransition) as ei:
            transition(cur, et, new, order_id="o1")
        err = ei.value
        assert (err.order_id, err.from_status, err.exec_type, err.to_status) == (
            "o1",
            cur,
            et,
            new,
        )
        assert isinstance(err, RouterError)
        assert err.retryable is False
        assert "o1" in str(err)


def test_terminal_statuses_have_no_way_out() -> None:
    for status in TERMINAL_STATUSES:
        assert is_terminal(status)
        for et in ExecType:
            assert allowed(status, et) == frozenset()
    assert not is_terminal(None)
    assert not is_terminal(OrdStatus.NEW)


def test_replaced_status_is_never_entered() -> None:
    # FIX 4.4: a REPLACED report carries NEW or PARTIALLY_FILLED, status REPLACED is unused
    assert all(OrdStatus.REPLACED not in targets for targets in TRANSITIONS.values())


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[(OrdStatus.FILLED, ExecType.TRADE)] = frozenset()  # type: ignore[index]


@given(st.lists(st.sampled_from(list(ExecType)), max_size=12))
def test_any_history_through_transition_never_leaves_a_terminal(events: list[ExecType]) -> None:
    cur: OrdStatus | None = None
    for et in events:
        targets = sorted(allowed(cur, et))
        if not targets:
            with pytest.raises(IllegalTransition):
                transition(cur, et, OrdStatus.NEW)
            continue
        was_terminal = is_terminal(cur)
        cur = transition(cur, et, targets[0])
        assert not was_terminal
