"""Exceptions of the ``router`` package (order entry, risk, matching).

One root, :class:`RouterError`; every subclass carries structured fields so callers decide
(retry, alert, reject) by reading attributes, never by parsing messages::

    RouterError (Exception)
     +-- IllegalTransition     order_id, from_status, exec_type, to_status; retryable=False
     |                         an order-status change the lifecycle table forbids (a bug:
     |                         the matching core never applies it)
     +-- SnapshotError         reason; retryable=False
                               a book snapshot that cannot be restored (corrupt, wrong
                               version, other symbol or region)
"""

from __future__ import annotations

from router.contract import ExecType, OrdStatus


class RouterError(Exception):
    """Root of every error raised by the router package."""

    retryable: bool = False


class IllegalTransition(RouterError):
    """An order-status transition that :mod:`router.lifecycle` does not allow."""

    def __init__(
        self,
        *,
        order_id: str,
        from_status: OrdStatus | None,
        exec_type: ExecType,
        to_status: OrdStatus,
    ) -> None:
        frm = from_status.value if from_status is not None else "<none>"
        super().__init__(
            f"order {order_id or '?'}: illegal transition {frm} --{exec_type.value}--> "
            f"{to_status.value}"
        )
        self.order_id = order_id
        self.from_status = from_status
        self.exec_type = exec_type
        self.to_status = to_status


class SnapshotError(RouterError):
    """An order-book snapshot could not be restored; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
