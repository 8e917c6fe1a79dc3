"""The test calendar (tests/clock.py) keeps its promises whatever the date."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from pathlib import Path

from engine.authoring.check import check

from .clock import DAY, DAY0, REFERENCE, next_monday, on_test_calendar
from .conftest import REPO


def test_day0_is_a_monday_more_than_a_day_ahead_whatever_the_hour() -> None:
    start = datetime(2031, 2, 25, tzinfo=UTC).timestamp()  # any fortnight, hour by hour
    for hour in range(14 * 24):
        now = start + hour * 3600 + 59 * 60
        monday = next_monday(now)
        moment = datetime.fromtimestamp(monday, UTC)
        assert moment.weekday() == 0 and (moment.hour, moment.minute) == (0, 0)
        assert DAY < monday - now <= 8 * DAY


def test_the_demo_rules_on_the_test_calendar_move_every_date_by_whole_weeks(tmp_path: Path) -> None:
    moved = on_test_calendar(REPO / "rules", tmp_path / "rules")
    by = datetime.fromtimestamp(DAY0, UTC).date() - REFERENCE  # DAY0 plays REFERENCE in the copy
    assert by.days % 7 == 0
    dated = re.compile(r"(valid_from|valid_to|start|end|today): *(\d{4}-\d\d-\d\d)")
    count = 0
    for path in (REPO / "rules").rglob("*.yaml"):
        before = path.read_text().splitlines()
        after = (moved / path.relative_to(REPO / "rules")).read_text().splitlines()
        assert len(before) == len(after)
        for old, new in zip(before, after):
            was, now = dated.search(old), dated.search(new)
            if was is None:
                assert old == new
                continue
            assert now is not None and was.group(1) == now.group(1)
            assert date.fromisoformat(now.group(2)) - date.fromisoformat(was.group(2)) == by
            assert old.replace(was.group(2), now.group(2), 1) == new
            count += 1
    assert count >= 14  # the catalog's validity, two campaigns' dates, the campaign rule tests' days
    assert check(moved) == []
