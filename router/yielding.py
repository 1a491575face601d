"""Encoding a large snapshot without holding the event loop.

A single writer's snapshot at full memory is tens of megabytes (execution: 55 MB in 800,000
pieces; risk: 15 MB with two 200,000-entry maps). Encoding or joining it in one call holds
the loop for 50-110 ms, and a thread does not help: msgpack's C packer keeps the GIL for
the whole call. So the work is cut into slices with a yield between them, relying on
msgpack being compositional: a map (array) header followed by N encoded pairs (items) is
the encoding of that map (array). The result is byte-for-byte what ``msgpack.packb`` or
``b"".join`` would give.

Call these only on data nothing mutates meanwhile (a captured copy, immutable pieces).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import msgpack

SLICE = 20_000
"""Pieces, map entries or array items per slice (a few milliseconds of work each)."""


async def join_yielding(parts: list[bytes], slice_len: int = SLICE) -> bytes:
    """``b"".join(parts)``, yielding between slices. The last join, of a few large slices,
    runs in a thread: CPython copies large bytes without the GIL (a 55 MB join measured
    38-59 ms on the loop, 5 ms of loop time from a thread)."""
    slices = []
    for i in range(0, len(parts), slice_len):
        slices.append(b"".join(parts[i : i + slice_len]))
        await asyncio.sleep(0)
    return await asyncio.to_thread(b"".join, slices)


async def packb_yielding(obj: Any, slice_len: int = SLICE) -> bytes:
    """``msgpack.packb(obj, use_bin_type=True)``, yielding between slices of every map or
    array (at any depth) larger than ``slice_len``."""
    parts: list[bytes] = []
    await _pack_into(obj, parts, msgpack.Packer(use_bin_type=True), slice_len)
    return await join_yielding(parts, slice_len)


def _big(obj: Any, n: int) -> bool:
    """A map or array longer than ``n``, or holding one (searched only through containers
    of at most ``n`` entries: a long one is sliced without looking inside)."""
    if isinstance(obj, dict):
        return len(obj) > n or any(_big(v, n) for v in obj.values())
    if isinstance(obj, list | tuple):
        return len(obj) > n or any(_big(v, n) for v in obj)
    return False


async def _pack_into(obj: Any, parts: list[bytes], p: msgpack.Packer, n: int) -> None:
    if isinstance(obj, dict) and len(obj) > n:
        parts.append(p.pack_map_header(len(obj)))
        entries = iter(obj.items())  # not list(): 200,000 pairs would be 30 ms in one go
        for _ in range(0, len(obj), n):
            chunk = dict(itertools.islice(entries, n))
            parts.append(_without_header(p.pack(chunk), p.pack_map_header(len(chunk))))
            await asyncio.sleep(0)
    elif isinstance(obj, list | tuple) and len(obj) > n:
        parts.append(p.pack_array_header(len(obj)))
        for i in range(0, len(obj), n):
            run = list(obj[i : i + n])
            parts.append(_without_header(p.pack(run), p.pack_array_header(len(run))))
            await asyncio.sleep(0)
    elif isinstance(obj, dict) and _big(obj, n):
        parts.append(p.pack_map_header(len(obj)))
        for k, v in obj.items():
            parts.append(p.pack(k))
            await _pack_into(v, parts, p, n)
    elif isinstance(obj, list | tuple) and _big(obj, n):
        parts.append(p.pack_array_header(len(obj)))
        for v in obj:
            await _pack_into(v, parts, p, n)
    else:
        parts.append(p.pack(obj))


def _without_header(packed: bytes, header: bytes) -> bytes:
    assert packed.startswith(header)
    return packed[len(header) :]
