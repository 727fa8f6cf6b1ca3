"""Files written so that they survive a crash and cannot be redirected: shared by the pins, the
compile cache and publishing."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path


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


def read_nofollow(path: Path, limit: int | None = None) -> bytes:
    """A regular file's bytes, refusing (OSError) a symbolic link, anything but a regular file
    (opened without blocking, so a pipe planted under the name cannot hang the read) and, with
    `limit`, a file of more bytes than that."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if limit is None:
            return f.read()
        data = f.read(limit + 1) if info.st_size <= limit else b""  # a file growing meanwhile too
        if info.st_size > limit or len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return data
