"""Deterministic identifiers: the same input always yields the same id (a replay is caught by a
unique key, never creates a second order)."""

from __future__ import annotations

import base64
import hashlib
from typing import NewType

OrderId = NewType("OrderId", str)
ClOrdId = NewType("ClOrdId", str)
ExecId = NewType("ExecId", str)
TradeId = NewType("TradeId", str)


def order_id(account: str, cl_ord_id: str) -> OrderId:
    """Order id of the NewOrder ``cl_ord_id`` of ``account``: 'O' + 16 base32 characters."""
    h = hashlib.blake2b(f"{account}\x00{cl_ord_id}".encode(), digest_size=10).digest()
    return OrderId("O" + base64.b32encode(h).decode().rstrip("="))
