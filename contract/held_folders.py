"""Work folders that last as long as the process using them: a publisher's staging folder, the
server's private copy of a version it compiles.

Each folder has a lock file beside it (`<folder>.lock`), made before the folder and held (flock)
for as long as the folder is in use; the kernel releases it when its holder exits or is killed.
A cleaner removes a folder only when it can take that lock (the holder is gone) and the folder
is older than a grace: a live holder keeps its folder however slow it is, and the grace covers
what a lock cannot show (a holder on another machine of a file system that keeps locks per
machine). A folder without a lock file was made by something else (an older publisher, a copy
by hand): it is removed only after a longer grace, or never.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from contract.files import lock_within, open_regular

LOCK_SUFFIX = ".lock"


@contextmanager
def held_folder(parent: Path, prefix: str, mode: int = 0o700) -> Iterator[Path]:
    """A new, empty folder `parent/<prefix><random>`, held until the block ends, then removed
    with its lock file (unless the block renamed it away, as publishing does)."""
    name = prefix + secrets.token_hex(6)
    folder, lock = parent / name, parent / (name + LOCK_SUFFIX)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits only for a cleaner that is looking at it right now
        folder.mkdir(mode=mode)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


def remove_abandoned(parent: Path, prefix: str, grace: float,
                     foreign_grace: float | None = None) -> list[Path]:
    """Remove the folders `parent/<prefix>*` whose holder is gone and that are older than `grace`
    seconds (and lock files left without their folder); folders without a lock file only after
    `foreign_grace` seconds (None: never). Returns the folders removed. Entries that cannot be
    read or locked (another user's) are left alone."""
    try:
        names = {entry.name for entry in os.scandir(parent) if entry.name.startswith(prefix)}
    except OSError:
        return []
    removed = []
    for name in sorted({n[:-len(LOCK_SUFFIX)] if n.endswith(LOCK_SUFFIX) else n for n in names}):
        folder, lock = parent / name, parent / (name + LOCK_SUFFIX)
        if name + LOCK_SUFFIX not in names:
            if foreign_grace is not None and _older_than(folder, foreign_grace):
                removed += _remove(folder)
            continue
        fd = _take(lock)
        if fd is None:  # held: its holder is alive
            continue
        try:
            if name in names and _older_than(folder, grace):
                removed += _remove(folder)
                lock.unlink(missing_ok=True)
            elif name not in names and _older_than(lock, grace):
                lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return removed


def _take(lock: Path) -> int | None:
    """A descriptor holding `lock` (a regular file), or None if another process holds it or it
    cannot be opened."""
    try:
        fd = open_regular(lock, os.O_RDWR)
    except OSError:
        return None
    if lock_within(fd, 0):
        return fd
    os.close(fd)  # held
    return None


def _remove(folder: Path) -> list[Path]:
    """[folder] once it is gone; rmtree refuses a symbolic link, never follows one."""
    shutil.rmtree(folder, ignore_errors=True)
    return [] if os.path.lexists(folder) else [folder]


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - os.lstat(path).st_mtime > seconds
    except OSError:
        return False
