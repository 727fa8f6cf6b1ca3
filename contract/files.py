"""Files as shared state between processes: written so that they survive a crash, read as
untrusted bytes that cannot be redirected, and locked so that one holder at a time works on
them. Used by the pins, the compile cache, publishing, the trainer's lock and the repository's
integrity checks; written once here so that each of those rules holds everywhere.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a reader sees the old file or the new one, and a power
    loss after this returns keeps the new one: a new file of an unpredictable name (created
    exclusively, so never through a planted symbolic link), synced, renamed over the old (which
    replaces a link rather than following it), and the folder synced."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Make the folder's entries (a rename into it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the regular file at `path`, opened with `flags`, refusing (OSError) a
    symbolic link and anything but a regular file (opened without blocking, so a pipe planted
    under the name cannot hang the open or a read)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_nofollow(path: Path, limit: int | None = None) -> bytes:
    """A regular file's bytes (`open_regular`'s refusals) and, with `limit`, OSError for a file
    of more bytes than that."""
    with os.fdopen(open_regular(path), "rb") as f:
        if limit is None:
            return f.read()
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""  # a file growing meanwhile too
        if size > limit or len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return data


def printable(name: str) -> str:
    """A file or folder name as printable text (names need not be UTF-8), at most 100 characters."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")[:100]


def lock_file(path: Path, mode: int = 0o644) -> int:
    """A descriptor of the lock file at `path` (made if missing, never through a symbolic link),
    for `lock_within`; closing it releases the lock."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, mode)


def lock_within(fd: int, seconds: float, give_up: Callable[[], bool] | None = None,
                poll: float = 0.005) -> bool:
    """Take the exclusive flock on `fd`, waiting at most `seconds` (0: only if free now), and
    say whether it was taken. flock's locks are the kernel's: released when the holder closes
    the descriptor, exits or is killed, so a crashed holder never keeps one. `give_up` is asked
    between tries and ends the wait early (False) when it answers true."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline or (give_up is not None and give_up()):
                return False
            time.sleep(poll)
