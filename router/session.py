"""The trading day: when it rolls, so that DAY orders end with it.

FX trades around the clock; its day ends at 17:00 New York time (the value-date roll), which
is 21:00 or 22:00 UTC as New York's daylight saving time comes and goes. The topology's
``[session]`` table sets the roll (``roll = "17:00"``, ``tz = "America/New_York"``, the
defaults). At each roll every execution worker stores one ``ExpireDay`` command per book in
its ``EXEC`` stream (:meth:`router.execution.ExecutionWorker.roll`), naming the roll instant
and the next eight (a schedule, so a book knows every roll of a week's backlog, daylight
saving changes included). A book takes each roll before the first command stored at or after
it (by the stream's stored time), whether that is its ExpireDay or not: commands stored while
the worker was down, or before its ExpireDay, never trade with an ended day's DAY orders. The
book expires every resting DAY order accepted before the roll, and one accepted before it
that reaches the book later expires on arrival. Being in the stream, the expiry is replayed
like any command, and a second command for the same roll changes nothing.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from regions.topology import Session


def _roll_on(session: Session, day: dt.date) -> int:
    """The roll of ``day`` as an instant (UTC ns). A roll time that the zone skips or repeats
    on that day (a daylight saving change) resolves as :meth:`datetime.timestamp` does: the
    first of a repeated hour, and for a skipped one the offset before the change."""
    hh, mm = session.hh_mm
    at = dt.datetime.combine(day, dt.time(hh, mm), tzinfo=ZoneInfo(session.tz))
    return int(at.timestamp()) * 1_000_000_000


def _around(session: Session, now_ns: int) -> list[int]:
    """The rolls of the days around ``now_ns`` (its local date, one before, two after),
    ascending: instants, compared as instants (never as wall-clock times)."""
    today = dt.datetime.fromtimestamp(now_ns // 10**9, ZoneInfo(session.tz)).date()
    return sorted({_roll_on(session, today + dt.timedelta(days=d)) for d in (-1, 0, 1, 2)})


def last_roll_ns(session: Session, now_ns: int) -> int:
    """The latest roll at or before ``now_ns`` (UTC ns)."""
    return max(r for r in _around(session, now_ns) if r <= now_ns)


def next_roll_ns(session: Session, now_ns: int) -> int:
    """The first roll after ``now_ns`` (UTC ns)."""
    return min(r for r in _around(session, now_ns) if r > now_ns)


def rolls_after(session: Session, cutoff_ns: int, n: int) -> tuple[int, ...]:
    """The ``n`` rolls after ``cutoff_ns`` (an ExpireDay's schedule)."""
    out: list[int] = []
    at = cutoff_ns
    for _ in range(n):
        at = next_roll_ns(session, at)
        out.append(at)
    return tuple(out)
