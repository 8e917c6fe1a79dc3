"""The test calendar: fixed test clocks taken relative to the real one, and the demo rules moved to it.

Redis expires keys by its own clock, the real one: a test clock fixed at a calendar date drifts away from
it as the calendar moves on, and what the engine writes with an absolute expiry (a trigger, a timer)
expires in Redis before the test reads it. So every fixed moment in a test is an offset from ``DAY0``,
the first Monday 00:00 UTC more than a day ahead of the real clock when the suite starts (at most 8):
weekdays and UTC times are what the test says, and the moments lie ahead of Redis's clock, never behind.

The demo rule files carry calendar dates of their own (an offer's validity, campaign dates, the ``today``
of rule tests), so a test would see campaigns start and offers lapse as the real calendar passes them.
The suite decides on ``on_test_calendar``'s copy instead, whose dates are moved with ``DAY0``: ``DAY0``
(and the real days before it) always play the demo's ``REFERENCE`` week, whatever the date.

CI runs the suite again with the clock shifted far ahead (``.ci/shifted-clock``) to keep all this so.
"""

from __future__ import annotations

import re
import shutil
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

DAY = 86_400
HOUR = 3_600


def next_monday(now: float) -> float:
    """00:00 UTC of the first Monday more than a day after ``now`` (1970-01-01 was a Thursday)."""
    days = int(now // DAY) + 1
    return float((days + 7 - (days + 3) % 7) * DAY)


DAY0 = next_monday(time.time())
REFERENCE = date(2026, 6, 15)  # a Monday before the demo's campaigns, inside every demo offer's validity
_DATED = re.compile(r"""^(\s*(?:- )?(?:valid_from|valid_to|start|end|today):\s*["']?)(\d{4}-\d\d-\d\d)""", re.M)


def at(day: int, time_of_day: str = "00:00") -> float:
    """``day`` days after ``DAY0`` (day 0 is a Monday), at ``HH:MM`` or ``HH:MM:SS`` UTC."""
    parts = [int(p) for p in time_of_day.split(":")]
    hours, minutes, seconds = (parts + [0, 0])[:3]
    return DAY0 + day * DAY + hours * HOUR + minutes * 60 + seconds


def utc(ts: float) -> str:
    """``ts`` as the engine writes a moment in its messages: ``2026-12-01T08:00Z`` (seconds when there are any)."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ" if moment.second else "%Y-%m-%dT%H:%MZ")


def ymd(ts: float, sep: str = "-") -> str:
    """The UTC date of ``ts``: ``2026-12-07`` (``sep=""``: ``20261207``, as budget keys name days)."""
    return datetime.fromtimestamp(ts, UTC).strftime(f"%Y{sep}%m{sep}%d")


def on_test_calendar(rules_dir: Path, target: Path) -> Path:
    """A copy of ``rules_dir`` at ``target`` whose dates (``valid_from``, ``valid_to``, campaign ``start`` and
    ``end``, rule tests' ``today``) are moved by whole weeks so that ``DAY0`` is ``REFERENCE`` in them."""
    shutil.copytree(rules_dir, target)
    by = timedelta(days=round((DAY0 - datetime.combine(REFERENCE, datetime.min.time(), UTC).timestamp()) / DAY))
    for path in target.rglob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        moved = _DATED.sub(lambda m: m.group(1) + (date.fromisoformat(m.group(2)) + by).isoformat(), text)
        if moved != text:
            path.write_text(moved, encoding="utf-8")
    return target


class Clock:
    """A clock the test sets and moves: ``clock.now = at(1, "08:00")``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
