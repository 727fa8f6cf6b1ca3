"""Scheduled retraining: intervals, cron, one run at a time, failures retried (no TF)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from training.schedule import ScheduleError, next_run, parse_interval, run_schedule, single_scheduler

T0 = datetime(2026, 11, 30, 2, 30, tzinfo=timezone.utc)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("6h", 21600), ("1d", 86400), ("1h30m", 5400)])
def test_parse_interval(text, seconds):
    assert parse_interval(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "6", "6 hours", "0s", "h6", "1h junk"])
def test_parse_interval_refuses_what_it_cannot_read(text):
    with pytest.raises(ScheduleError):
        parse_interval(text)


def test_next_run_from_cron_and_interval():
    assert next_run(T0, cron="0 3 * * *") == datetime(2026, 11, 30, 3, 0, tzinfo=timezone.utc)
    assert next_run(T0.replace(hour=4), cron="0 3 * * *") == datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)
    assert next_run(T0, every=timedelta(hours=6)) == T0 + timedelta(hours=6)
    with pytest.raises(ScheduleError, match="not a valid cron"):
        next_run(T0, cron="61 * * * *")
    with pytest.raises(ScheduleError, match="exactly one"):
        next_run(T0)


class Clock:
    def __init__(self):
        self.now = T0
        self.slept = []

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += timedelta(seconds=seconds)


def test_runs_at_each_tick_and_a_failed_run_is_retried_at_the_next():
    clock, calls, lines = Clock(), [], []
    codes = iter([1, 0, 3])

    def run(args):
        calls.append((clock.now, args))
        clock.now += timedelta(minutes=5)  # a run takes time; the next tick comes after it ends
        return next(codes)

    failures = run_schedule(["--data", "digits"], "0 * * * *", None, run_first=True, max_runs=3,
                            report=lines.append, run=run, now=lambda: clock.now, sleep=clock.sleep)
    assert failures == 1
    assert [t for t, _ in calls] == [T0, T0.replace(hour=3, minute=0), T0.replace(hour=4, minute=0)]
    assert all(args == ["--data", "digits"] for _, args in calls)
    assert "failed with exit code 1 (nothing published); retrying at the next tick" in lines[0]
    assert "refused by the gate" in lines[-1]


def test_without_a_first_run_it_waits_for_the_first_tick():
    clock, calls = Clock(), []
    run_schedule([], None, timedelta(hours=6), run_first=False, max_runs=1, report=lambda _: None,
                 run=lambda a: calls.append(clock.now) or 0, now=lambda: clock.now, sleep=clock.sleep)
    assert calls == [T0 + timedelta(hours=6)]


def test_only_one_scheduler_per_lock(tmp_path):
    with single_scheduler(tmp_path / "s.lock"):
        with pytest.raises(ScheduleError, match="another scheduler"):
            with single_scheduler(tmp_path / "s.lock"):
                pass
    with single_scheduler(tmp_path / "s.lock"):
        pass
