"""Order lifecycle: the explicit table of allowed order-status transitions.

Every execution report changes (or confirms) an order's status (FIX 39) through an execution
type (FIX 150). :data:`TRANSITIONS` lists every allowed ``(status before, exec type)`` pair
with the statuses it may lead to; :func:`transition` checks one event against it and raises
:class:`~router.errors.IllegalTransition` for anything else. The matching core calls it on
every report it emits, so an impossible change is an error, never silently applied.

``None`` as the status before means "not acknowledged yet" (pending new).

FIX 4.4 conventions kept here:

* a replace report (exec type REPLACED) carries the order's *current* status, NEW or
  PARTIALLY_FILLED, or FILLED when the replace cut the order to its filled quantity; status
  REPLACED is no longer used by FIX 4.4 and is never entered;
* FILLED, CANCELED, REJECTED and EXPIRED are terminal: no event leaves them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from router.contract import TERMINAL_STATUSES, ExecType, OrdStatus
from router.errors import IllegalTransition

__all__ = ["TERMINAL_STATUSES", "TRANSITIONS", "allowed", "is_terminal", "transition"]

_NEW = OrdStatus.NEW
_PF = OrdStatus.PARTIALLY_FILLED
_FILLED = OrdStatus.FILLED

TRANSITIONS: Mapping[tuple[OrdStatus | None, ExecType], frozenset[OrdStatus]] = MappingProxyType(
    {
        # acknowledgement or refusal of a new order
        (None, ExecType.NEW): frozenset({_NEW}),
        (None, ExecType.REJECTED): frozenset({OrdStatus.REJECTED}),
        # fills
        (_NEW, ExecType.TRADE): frozenset({_PF, _FILLED}),
        (_PF, ExecType.TRADE): frozenset({_PF, _FILLED}),
        # cancel (client, system, IOC/FOK/MARKET remainder, self-trade prevention)
        (_NEW, ExecType.CANCELED): frozenset({OrdStatus.CANCELED}),
        (_PF, ExecType.CANCELED): frozenset({OrdStatus.CANCELED}),
        # replace keeps the fill state: a replace never fills and never un-fills; one that
        # cuts a partly filled order to its filled quantity ends it (FIX 4.4: the balance is
        # canceled, the order is FILLED)
        (_NEW, ExecType.REPLACED): frozenset({_NEW}),
        (_PF, ExecType.REPLACED): frozenset({_PF, _FILLED}),
        # end of day for DAY orders
        (_NEW, ExecType.EXPIRED): frozenset({OrdStatus.EXPIRED}),
        (_PF, ExecType.EXPIRED): frozenset({OrdStatus.EXPIRED}),
    }
)
"""(status before, exec type) -> statuses allowed after. Pairs not listed are illegal."""

_EMPTY: frozenset[OrdStatus] = frozenset()


def allowed(current: OrdStatus | None, exec_type: ExecType) -> frozenset[OrdStatus]:
    """Statuses an order in ``current`` may move to on an ``exec_type`` event (maybe none)."""
    return TRANSITIONS.get((current, exec_type), _EMPTY)


def is_terminal(status: OrdStatus | None) -> bool:
    """True when no further event may change ``status``."""
    return status in TERMINAL_STATUSES


def transition(
    current: OrdStatus | None,
    exec_type: ExecType,
    new: OrdStatus,
    *,
    order_id: str = "",
) -> OrdStatus:
    """Check one status change against :data:`TRANSITIONS` and return the new status.

    Args:
        current: Status before the event; ``None`` for an order not acknowledged yet.
        exec_type: The event (FIX 150).
        new: Status the event would put the order in (FIX 39).
        order_id: For the error only.

    Raises:
        IllegalTransition: the table does not allow ``current --exec_type--> new``.
    """
    if new not in TRANSITIONS.get((current, exec_type), _EMPTY):
        raise IllegalTransition(
            order_id=order_id, from_status=current, exec_type=exec_type, to_status=new
        )
    return new
