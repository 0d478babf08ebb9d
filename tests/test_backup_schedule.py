"""When a backup schedule runs next (a pure rule, no bed)."""

from datetime import UTC, datetime

from portal.backups import next_run


def test_daily_runs_at_the_next_hour_slot_strictly_after():
    t = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)  # a Monday
    assert next_run("daily", 2, 0, t) == datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    assert next_run("daily", 3, 0, t) == datetime(2026, 11, 23, 3, 0, tzinfo=UTC)


def test_weekly_runs_on_its_weekday():
    t = datetime(2026, 11, 23, 12, 30, tzinfo=UTC)  # Monday
    assert next_run("weekly", 2, 6, t) == datetime(2026, 11, 29, 2, 0, tzinfo=UTC)  # Sunday
    assert next_run("weekly", 13, 0, t) == datetime(2026, 11, 23, 13, 0, tzinfo=UTC)
    assert next_run("weekly", 12, 0, t) == datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
