"""Long work on a single writer's event loop without holding it.

:class:`Turn` bounds a stretch of work between two yields (a batch of up to 1,024 commands
or decisions ran in one turn: publishing only buffers, so nothing in it suspended, and on a
starved core the loop was held for up to a second while PubAcks and the server's pings sat
unread). The rest encodes a large snapshot the same way.

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
import time
from collections.abc import Iterable
from typing import Any

import msgpack

TURN_S = 0.02
"""Longest stretch of work between two yields to the event loop."""


class Turn:
    """Yields to the event loop once ``turn_s`` has passed since the last yield.

    Call :meth:`check` between units of work (commands, decisions) in a loop that would
    otherwise not suspend. Only for a single writer: whatever runs meanwhile (its
    completion task, book queries, the connection's reads) must not change its state.
    """

    def __init__(self, turn_s: float = TURN_S) -> None:
        self.turn_s = turn_s
        self.ends = time.monotonic() + turn_s

    async def check(self) -> None:
        if time.monotonic() >= self.ends:
            await asyncio.sleep(0)
            self.ends = time.monotonic() + self.turn_s


SLICE = 20_000
"""Pieces, map entries or array items per slice (a few milliseconds of work each)."""


async def join_yielding(parts: Iterable[bytes], slice_len: int = SLICE) -> bytes:
    """``b"".join(parts)`` without holding the loop: small pieces are joined on the loop in
    runs of at most ``slice_len`` pieces or 1 MiB, with a yield between runs; the last join,
    of those runs and the large pieces, runs in a thread, where CPython copies large bytes
    without the GIL (a 55 MB join measured 38-59 ms on the loop, 5 ms of loop time from a
    thread)."""
    runs: list[bytes] = []
    run: list[bytes] = []
    size = 0
    for part in parts:
        if len(part) >= 1 << 20:  # large: no copy here
            if run:
                runs.append(b"".join(run))
                run, size = [], 0
            runs.append(part)
            await asyncio.sleep(0)
            continue
        run.append(part)
        size += len(part)
        if len(run) >= slice_len or size >= 1 << 20:
            runs.append(b"".join(run))
            run, size = [], 0
            await asyncio.sleep(0)
    if run:
        runs.append(b"".join(run))
    return await asyncio.to_thread(b"".join, runs)


async def packb_yielding(obj: Any, slice_len: int = SLICE) -> bytes:
    """``msgpack.packb(obj, use_bin_type=True)``, yielding about every ``slice_len`` entries:
    a map or array longer than that is packed in slices of it, one holding a long child is
    walked into, anything else is packed in one call (an order row, a short map)."""
    w = _Walker(slice_len)
    await w.pack(obj)
    return await join_yielding(w.parts, slice_len)


SHORT = 64
"""A child container this long or shorter is packed with its parent, not walked into."""


def _long(v: Any, depth: int = 4) -> bool:
    """A container longer than :data:`SHORT`, or a short one holding such a container
    within ``depth`` levels (risk's state: engine -> accounts -> account -> cl_ids). Only
    short containers are looked into, so the check costs little whatever the data."""
    if not isinstance(v, dict | list | tuple):
        return False
    if len(v) > SHORT:
        return True
    if depth == 0:
        return False
    children = v.values() if isinstance(v, dict) else v
    return any(_long(c, depth - 1) for c in children)


class _Walker:
    """One pass over the object. A container longer than the slice is packed in slices; a
    medium one that holds containers is walked child by child; a short one is walked only
    if a long container hides below it (risk's accounts); the rest is packed in one call.
    (A first version scanned every subtree before packing it, and held the loop longer
    than one packb call.)"""

    def __init__(self, n: int) -> None:
        self.n = n
        self.p = msgpack.Packer(use_bin_type=True)
        self.parts: list[bytes] = []
        self.since_yield = 0

    async def _tick(self, entries: int) -> None:
        self.since_yield += entries
        if self.since_yield >= self.n:
            self.since_yield = 0
            await asyncio.sleep(0)

    async def pack(self, obj: Any) -> None:
        p, n = self.p, self.n
        if not isinstance(obj, dict | list | tuple):
            self.parts.append(p.pack(obj))
            await self._tick(1)
            return
        children = obj.values() if isinstance(obj, dict) else obj
        if len(obj) > n:
            await self._sliced(obj)
        elif len(obj) > SHORT and any(isinstance(c, dict | list | tuple) for c in children):
            await self._walk(obj)  # medium, holding containers: each child on its own
        elif len(obj) <= SHORT and any(_long(c) for c in children):
            await self._walk(obj)  # short, with a long container somewhere below
        else:
            self.parts.append(p.pack(obj))  # scalars, or only short containers
            await self._tick(len(obj))

    async def _walk(self, obj: dict[Any, Any] | list[Any] | tuple[Any, ...]) -> None:
        p = self.p
        if isinstance(obj, dict):
            self.parts.append(p.pack_map_header(len(obj)))
            for k, v in obj.items():
                self.parts.append(p.pack(k))
                await self.pack(v)
        else:
            self.parts.append(p.pack_array_header(len(obj)))
            for v in obj:
                await self.pack(v)

    async def _sliced(self, obj: dict[Any, Any] | list[Any] | tuple[Any, ...]) -> None:
        p, n = self.p, self.n
        if isinstance(obj, dict):
            self.parts.append(p.pack_map_header(len(obj)))
            entries = iter(obj.items())  # not list(): 200,000 pairs would be 30 ms in one go
            for _ in range(0, len(obj), n):
                chunk = dict(itertools.islice(entries, n))
                self.parts.append(_without_header(p.pack(chunk), p.pack_map_header(len(chunk))))
                await self._tick(len(chunk))
        else:
            self.parts.append(p.pack_array_header(len(obj)))
            for i in range(0, len(obj), n):
                run = list(obj[i : i + n])
                self.parts.append(_without_header(p.pack(run), p.pack_array_header(len(run))))
                await self._tick(len(run))


def _without_header(packed: bytes, header: bytes) -> bytes:
    assert packed.startswith(header)
    return packed[len(header) :]
