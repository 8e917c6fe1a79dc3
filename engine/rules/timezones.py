"""Local wall clocks of IANA time zones (``zoneinfo``), daylight saving time included, cheap per decision.

``LocalClock.offset`` is asked on every decision that judges quiet hours: it caches one zone's UTC
offset for the current UTC hour, so the usual call is a tuple read and a comparison. An hour whose two
ends have different offsets holds a transition: every call in it asks ``zoneinfo`` (exact to the
second). The tz database has no zone with two transitions within one hour, so an hour whose ends agree
has one offset throughout.
"""

from __future__ import annotations

import functools
import math
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

HOUR = 3600


def find_zone(name: str) -> ZoneInfo | None:
    """The IANA zone ``name`` (``Europe/Amsterdam``, ``UTC``), None when the tz database has no such zone."""
    if not name or name != name.strip():
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "America" is a folder of zones
        return None


@functools.lru_cache(maxsize=1)
def zone_names() -> tuple[str, ...]:
    """Every zone name the tz database holds (for suggestions in load errors; reads the database)."""
    return tuple(sorted(available_timezones()))


def offset_at(tz: tzinfo, now: float) -> float:
    """``tz``'s UTC offset at epoch second ``now``, in seconds (exact, uncached)."""
    delta = datetime.fromtimestamp(now, tz).utcoffset()
    return delta.total_seconds() if delta is not None else 0.0


class LocalClock:
    """The wall clock of one zone: UTC offsets, minutes of the local day, the next local time of day."""

    __slots__ = ("name", "tz", "_hour")

    def __init__(self, name: str, tz: tzinfo) -> None:
        self.name = name
        self.tz = tz
        self._hour: tuple[int, float] = (-1, 0.0)  # (UTC hour, its offset): replaced whole, never mutated

    def offset(self, now: float) -> float:
        """The zone's UTC offset at ``now`` (seconds)."""
        hour = int(now // HOUR)
        cached = self._hour
        if cached[0] == hour:
            return cached[1]
        begin, end = offset_at(self.tz, hour * HOUR), offset_at(self.tz, hour * HOUR + HOUR - 1)
        if begin != end:  # a transition in this hour
            return offset_at(self.tz, now)
        self._hour = (hour, begin)
        return begin

    def minute_of_day(self, now: float) -> float:
        """Minutes since local midnight at ``now`` (fractional)."""
        return ((now + self.offset(now)) / 60) % 1440

    def next_transition(self, after: float, before: float) -> float | None:
        """The first second in (``after``, ``before``] whose offset differs from ``after``'s, if any (the
        offset is looked up at the ends only: at most one transition lies between them)."""
        first = offset_at(self.tz, after)
        if offset_at(self.tz, before) == first:
            return None
        low, high = math.floor(after), math.ceil(before)  # offset(low) == first != offset(high)
        while high - low > 1:
            mid = (low + high) // 2
            if offset_at(self.tz, mid) == first:
                low = mid
            else:
                high = mid
        return float(high)

    def __eq__(self, other: object) -> bool:  # one zone, one clock (the cache is no part of it)
        return isinstance(other, LocalClock) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"LocalClock({self.name!r})"


def utc_clock() -> LocalClock:
    return LocalClock("UTC", UTC)
