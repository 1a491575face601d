"""Book commands on the EXEC stream (risk -> execution), msgpack-encoded.

Internal to the order path (not part of the public wire contract): ``{"op": "submit" |
"cancel" | "replace" | "expire", ...fields of router.book.Submit/Cancel/Replace}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from router.book import Cancel, Command, ExpireDay, Replace, Submit
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


def decode_command(data: bytes) -> Command:
    """Raises ValueError on anything that is not a well-formed command."""
    try:
        raw = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise ValueError(f"not msgpack: {type(e).__name__}") from e
    if not isinstance(raw, dict):
        raise ValueError("command must be a map")
    cls = _OPS.get(raw.pop("op", None))
    if cls is None:
        raise ValueError("unknown op")
    if cls is Submit:
        raw["side"] = Side(raw["side"])
        raw["ord_type"] = OrdType(raw["ord_type"])
        raw["tif"] = TimeInForce(raw["tif"])
    try:
        return cls(**raw)  # type: ignore[no-any-return]
    except TypeError as e:
        raise ValueError(str(e)) from e
