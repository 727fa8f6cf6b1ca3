"""Scheduled retraining: run the training pipeline on a cron expression or a fixed interval.

Each run is a child process (`python -m training.cli ...`), so a crash or a memory leak in one
run cannot take the scheduler down, and runs never overlap: the next tick is computed after the
current run ends. A file lock keeps a second scheduler of the same ensemble from starting.
A failed run publishes nothing (the pipeline's own guarantee) and is retried at the next tick.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

from contract.files import lock_file, lock_within

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ScheduleError(ValueError):
    """The schedule cannot be used; the message says what to change."""


def parse_interval(text: str) -> timedelta:
    """`90s`, `15m`, `6h`, `1d` (or combined, `1h30m`) -> a positive timedelta."""
    parts = re.findall(r"(\d+)\s*([smhd])", text.strip().lower())
    if not parts or re.sub(r"(\d+)\s*([smhd])", "", text.strip().lower()).strip():
        raise ScheduleError(f"--every {text!r} is not an interval like 90s, 15m, 6h, 1d or 1h30m")
    seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds < 1:
        raise ScheduleError("--every must be at least 1s")
    return timedelta(seconds=seconds)


def validate_cron(expression: str) -> None:
    from croniter import croniter

    if not croniter.is_valid(expression):
        raise ScheduleError(f"--cron {expression!r} is not a valid cron expression (e.g. '0 3 * * *')")


def next_run(now: datetime, cron: str | None = None, every: timedelta | None = None) -> datetime:
    """When the next run starts: the cron expression's next match after now (UTC), or now + every."""
    if (cron is None) == (every is None):
        raise ScheduleError("give exactly one of --cron and --every")
    if every is not None:
        return now + every
    from croniter import croniter

    validate_cron(cron)
    return croniter(cron, now).get_next(datetime)


@contextmanager
def single_scheduler(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock for the scheduler's lifetime; refuse if another holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = lock_file(lock_path)
    try:
        if not lock_within(fd, 0):
            raise ScheduleError(f"another scheduler holds {lock_path}; run one scheduler per ensemble")
        yield
    finally:
        os.close(fd)  # releases the lock


def run_training(train_args: list[str]) -> int:
    """One training run in a child process; returns its exit code."""
    return subprocess.call([sys.executable, "-m", "training.cli", *train_args])


def run_schedule(
    train_args: list[str],
    cron: str | None,
    every: timedelta | None,
    run_first: bool,
    max_runs: int | None = None,
    report: Callable[[str], None] = print,
    run: Callable[[list[str]], int] = run_training,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run training at every tick, one run at a time, until `max_runs` runs (forever if None).
    Returns the number of failed runs."""
    runs = failures = 0
    due = now() if run_first else next_run(now(), cron, every)
    while max_runs is None or runs < max_runs:
        wait = (due - now()).total_seconds()
        if wait > 0:
            report(f"[schedule] next run at {due.isoformat(timespec='seconds')}")
            sleep(wait)
        started = time.monotonic()
        code = run(train_args)
        runs += 1
        outcome = {0: "succeeded", 3: "was refused by the gate (nothing published)"}.get(code)
        if outcome is None:
            failures += 1
            outcome = f"failed with exit code {code} (nothing published); retrying at the next tick"
        report(f"[schedule] run {runs} {outcome} after {time.monotonic() - started:.0f} s")
        due = next_run(now(), cron, every)
    return failures
