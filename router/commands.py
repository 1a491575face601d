"""Book commands on the EXEC stream (risk -> execution), msgpack-encoded.

Internal to the order path (not part of the public wire contract): ``{"op": "submit" |
"cancel" | "replace" | "expire", ...fields of router.book.Submit/Cancel/Replace/ExpireDay}``
(risk stores the first three; each execution worker stores its books' ExpireDay).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from router.book import ROLL_SCHEDULE, Cancel, Command, ExpireDay, Replace, Submit
from router.contract import OrdType, Side, TimeInForce

_OPS: dict[str, type[Any]] = {
    "submit": Submit,
    "cancel": Cancel,
    "replace": Replace,
    "expire": ExpireDay,
}
_NAMES = {v: k for k, v in _OPS.items()}


def encode_command(cmd: Command) -> bytes:
    body: dict[str, Any] = {"op": _NAMES[type(cmd)]}
    for f in dataclasses.fields(cmd):
        v = getattr(cmd, f.name)
        body[f.name] = v.value if hasattr(v, "value") else v
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


_IDS = frozenset({"order_id", "cl_ord_id", "orig_cl_ord_id", "account", "home_region"})
"""Fields that name something: non-empty text of at most 64 characters, without NUL (the
book's index keys join two of them with one)."""
_INTS = {
    "qty": (1, 10**12),
    "price_ticks": (0, 10**12),
    "entry_ns": (0, 2**63 - 1),
    "cutoff_ns": (1, 2**63 - 1),
}
"""Integer fields and their ranges (a book rejects a zero LIMIT price itself, with a report)."""


def decode_command(data: bytes) -> Command:
    """Raises ValueError on anything that is not a well-formed command.

    Risk publishes the order commands, decoding every order strictly first, and each
    execution worker its own books' ExpireDay; this checks again, field by field, so that a
    command from anywhere else (a bug, a rogue publisher on ``mrd.<region>.exe.>``) can never
    put a NaN or a string quantity into a book, where the first would rest and absorb flow
    and the second fail half way through a submit.
    """
    try:
        raw = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise ValueError(f"not msgpack: {type(e).__name__}") from e
    if not isinstance(raw, dict):
        raise ValueError("command must be a map")
    op = raw.pop("op", None)
    # a list or map here would make the lookup raise TypeError, which the worker takes for a
    # fault of its own build (a rebuild, or a region stopped at restart), not bad input
    cls = _OPS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ValueError("unknown op")
    for name, v in raw.items():
        if name in _IDS:
            if type(v) is not str or not v or len(v) > 64 or "\x00" in v:
                raise ValueError(f"{name}: must be non-empty text of at most 64 characters")
        elif name in _INTS:
            lo, hi = _INTS[name]
            if name == "price_ticks" and v is None and cls is Submit:
                continue  # a MARKET order
            if type(v) is not int or not lo <= v <= hi:
                raise ValueError(f"{name}: must be an integer in {lo}..{hi}, got {v!r}")
        elif name == "reason" and type(v) is not str:
            raise ValueError("reason: must be text")
        elif name == "schedule":
            if (
                type(v) is not list
                or len(v) > ROLL_SCHEDULE
                or any(type(r) is not int or not 0 < r < 2**63 for r in v)
            ):
                raise ValueError(f"schedule: at most {ROLL_SCHEDULE} roll instants (ns)")
            raw[name] = tuple(v)
    try:
        if cls is Submit:
            raw["side"] = Side(raw["side"])
            raw["ord_type"] = OrdType(raw["ord_type"])
            raw["tif"] = TimeInForce(raw["tif"])
        return cls(**raw)  # type: ignore[no-any-return]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from e
