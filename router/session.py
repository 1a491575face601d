"""The trading day: when it rolls, so that DAY orders end with it.

FX trades around the clock; its day ends at 17:00 New York time (the value-date roll), which
is 21:00 or 22:00 UTC as New York's daylight saving time comes and goes. The topology's
``[session]`` table sets the roll (``roll = "17:00"``, ``tz = "America/New_York"``, the
defaults). At each roll every execution worker stores one ``ExpireDay`` command per book in
its ``EXEC`` stream (:meth:`router.execution.ExecutionWorker.roll`), naming the roll instant
and the next: the book expires every resting DAY order accepted before it, and a DAY order
accepted before it that reaches the book later is expired on arrival. A book also takes the
next roll before the first command stored at or after it (by the stream's stored time), so
commands stored while the worker was down, or before its ExpireDay, never trade with an
ended day's orders. Being in the stream, the expiry is replayed like any command, and a
second command for the same roll changes nothing.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from regions.topology import Session


def _at(session: Session, day: dt.date) -> dt.datetime:
    hh, mm = session.hh_mm
    return dt.datetime.combine(day, dt.time(hh, mm), tzinfo=ZoneInfo(session.tz))


def last_roll_ns(session: Session, now_ns: int) -> int:
    """The latest roll at or before ``now_ns`` (UTC ns)."""
    tz = ZoneInfo(session.tz)
    now = dt.datetime.fromtimestamp(now_ns // 10**9, tz)  # whole seconds: rolls are on them
    at = _at(session, now.date())
    if at > now:
        at = _at(session, now.date() - dt.timedelta(days=1))
    return int(at.timestamp()) * 1_000_000_000


def next_roll_ns(session: Session, now_ns: int) -> int:
    """The first roll after ``now_ns`` (UTC ns)."""
    tz = ZoneInfo(session.tz)
    now = dt.datetime.fromtimestamp(now_ns // 10**9, tz)
    at = _at(session, now.date())
    if at <= now:
        at = _at(session, now.date() + dt.timedelta(days=1))
    return int(at.timestamp()) * 1_000_000_000
