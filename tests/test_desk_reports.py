"""What a desk takes as an order's state when reports come out of order (decision 0002: a
report whose PubAck was lost is sent again, and may be stored after later ones)."""

from __future__ import annotations

from router.client import OrderState
from router.contract import ExecutionReport, OrdStatus
from tests.test_book import BUY, SELL, Driver, ers, sub


def _reports_of(order_id: str) -> list[ExecutionReport]:
    d = Driver()
    out = ers(d(sub("b", BUY, 10, 100)))  # NEW
    out += ers(d(sub("s1", SELL, 4, 100, acct="S")))  # b partly filled
    out += ers(d(sub("s2", SELL, 6, 100, acct="S")))  # b filled
    return [r for r in out if r.order_id == order_id]


def test_a_resent_older_report_does_not_move_the_order_back() -> None:
    new, partial, filled = _reports_of("b")
    assert (partial.ord_status, filled.ord_status) == (OrdStatus.PARTIALLY_FILLED, OrdStatus.FILLED)
    st = OrderState(order_id="b", reports=[new, filled, partial])  # the partial re-sent last
    assert st.last is filled
    st = OrderState(order_id="b", reports=[partial, new])  # NEW re-sent after the fill
    assert st.last is partial


def test_in_order_reports_end_with_the_last_delivered() -> None:
    reports = _reports_of("b")
    assert OrderState(order_id="b", reports=reports).last is reports[-1]
    assert OrderState(order_id="b").last is None
