"""Event-loop stalls: how late the loop turns, and where it was stuck when it stopped.

Every worker is one event loop. Anything that holds it (a snapshot encoded in the loop, a
full GC collection, a starved core) delays every message the process handles, and past two
of the server's 1 s pings nats-server drops the connection as stale (MACHINE-NOTES). Two
parts, both cheap:

* a heartbeat task sleeps :data:`BEAT_S` and observes how late it woke
  (``meridian_event_loop_lag_seconds``); a wake-up later than :data:`STALL_S` is logged
  with its length;
* a watchdog thread looks at the heartbeat every :data:`BEAT_S`; once it is older than
  :data:`STALL_S` it logs the main thread's stack, once per stall: what held the loop,
  named while it is still held. (Pure Python code yields the GIL to the thread every
  5 ms; a long call in C that keeps the GIL shows up only when it returns.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
import traceback
from typing import Any

log = logging.getLogger("meridian.stalls")

BEAT_S = 0.25
"""Heartbeat period (4 wake-ups a second per worker)."""
STALL_S = 0.5
"""A heartbeat this late is a stall: logged, with the stack while it lasts."""


class StallWatch:
    """Heartbeat task plus watchdog thread for the running event loop.

    Args:
        lag: A bound histogram child (``observe(seconds)``) or None.
        beat_s: Heartbeat period.
        stall_s: Lateness that counts as a stall.
    """

    def __init__(self, lag: Any = None, *, beat_s: float = BEAT_S, stall_s: float = STALL_S):
        self.lag = lag
        self.beat_s = beat_s
        self.stall_s = stall_s
        self.stalls = 0
        """Stalls seen by the heartbeat (each logged)."""
        self.stacks: list[str] = []
        """The last few stacks the watchdog caught (newest last), for tests and post-mortems."""
        self._last = time.monotonic()
        self._reported_at = 0.0
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> StallWatch:
        self._last = time.monotonic()
        self._main = threading.get_ident()  # the loop's thread
        self._task = asyncio.get_running_loop().create_task(self._beat())
        self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
        self._thread.start()
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # the watchdog thread (a daemon) sees the stop within one beat; no join here, which
        # would block the event loop

    async def _beat(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(self.beat_s)
            now = time.monotonic()
            self._last = now
            late = max(0.0, now - t0 - self.beat_s)
            if self.lag is not None:
                with contextlib.suppress(Exception):
                    self.lag.observe(late)
            if late >= self.stall_s:
                self.stalls += 1
                log.warning("event loop stalled for %.2f s", late)

    def _watch(self) -> None:
        while not self._stop.wait(self.beat_s):
            last = self._last
            age = time.monotonic() - last
            if age < self.stall_s + self.beat_s or self._reported_at == last:
                continue
            self._reported_at = last  # one stack per stall
            frame = sys._current_frames().get(self._main) if self._main else None
            if frame is None:
                continue
            stack = "".join(traceback.format_stack(frame, limit=12))
            self.stacks = [*self.stacks[-4:], stack]
            log.warning("event loop held for %.2f s so far, at:\n%s", age - self.beat_s, stack)
