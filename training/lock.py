"""One trainer per ensemble name at a time: the seed Job, the CronJob, a scheduler's run and a
manual run all share the tuner folder and the member backups of a name, so a second one would
resume, or delete, the first one's files mid-run. The pipeline itself holds the lock (an flock,
released by the kernel if the holder dies), so every way of starting a run is covered; a run
that finds it held stops at once, publishing nothing, and says who holds it."""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from contract.files import lock_file, lock_within
from training.publish import PublishError


class TrainingBusy(PublishError):
    """Another run of the same ensemble holds the lock."""


@contextmanager
def one_trainer(work_dir: Path, name: str) -> Iterator[None]:
    """Hold `<work_dir>/train-<name>.lock` for the run; TrainingBusy if another run holds it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"train-{name}.lock"
    fd = lock_file(path)
    try:
        if not lock_within(fd, 0):
            raise TrainingBusy(f"another training run of {name!r} is running ({_holder(fd)}; it holds "
                               f"{path}): one trainer per ensemble at a time")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        who = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {who['pid']} on {who['host']}, since {who['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
