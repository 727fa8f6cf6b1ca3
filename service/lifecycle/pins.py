"""Pin storage: the versions operators pinned (a rollback, a pin), by ensemble name, kept where
every replica serving the repository reads them.

The pins live in one file, `pins.json`, in a folder every replica shares: the state folder
when one is set (`ENSEMBLE_STATE_DIR`), else `.state/` inside the repository itself (hidden:
the repository's scans skip it). Every replica re-reads the file at each poll, so a rollback
sent to any one of them reaches all of them within a poll interval (plus loading the version
where it is not loaded), a restarted replica keeps it, and a version published later does not
undo it. `ensemble-admin` writes the same file, for operators without HTTP.

A pin that cannot be written where the others read it is refused (`PinsNotShared`), never
kept by one replica alone: the fleet would serve two versions.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from service.files import write_atomically

log = logging.getLogger(__name__)

PINS_FILE = "pins.json"
STATE_FOLDER = ".state"


class PinsNotShared(OSError):
    """The pins file cannot be written in the shared folder."""


def pins_folder(repository: Path, state_dir: Path | None) -> Path:
    """Where the replicas serving `repository` keep their pins."""
    return Path(state_dir) if state_dir is not None else Path(repository) / STATE_FOLDER


class PinStore:
    """Versions pinned, by ensemble name: in memory only without a folder (tests, a lone
    server), else in `<folder>/pins.json`, read again whenever it changed."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.path = self.folder / PINS_FILE if self.folder is not None else None
        self._pins: dict[str, int] = {}
        self._seen: tuple | None = None  # (mtime_ns, size, inode) of the file when last read
        self.refresh()

    def refresh(self) -> dict[str, int]:
        """Re-read the file if it changed since it was last read; the pins now in force."""
        if self.path is None:
            return self._pins
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._pins, self._seen = {}, None
            return self._pins
        except OSError as exc:
            log.error("cannot read the pins file %s: %s; keeping the pins read before", self.path, exc)
            return self._pins
        seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        if seen != self._seen:
            try:
                self._pins = parse(self.path.read_text())
            except (OSError, ValueError) as exc:
                log.error("ignoring unreadable pins file %s: %s", self.path, exc)
            self._seen = seen
        return self._pins

    def get(self, name: str) -> int | None:
        return self._pins.get(name)

    def set(self, name: str, version: int | None) -> None:
        """Pin `name` to `version`, or unpin it with None: read, changed and written back under
        the folder's lock (replicas writing at once lose nothing), atomically and durably."""
        if self.path is None:
            if version is None:
                self._pins.pop(name, None)
            else:
                self._pins[name] = version
            return
        try:
            with self._locked():
                self._seen = None
                pins = dict(self.refresh())
                if version is None:
                    pins.pop(name, None)
                else:
                    pins[name] = version
                write_atomically(self.path, json.dumps(pins, sort_keys=True, indent=1).encode())
                self._pins, self._seen = pins, None
        except OSError as exc:
            raise PinsNotShared(
                f"the pin cannot be recorded in {self.path}, where every replica reads it "
                f"({exc.strerror or exc}); make that folder writable, or set ENSEMBLE_STATE_DIR "
                "to a folder every replica shares and may write") from None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / ".pins.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def parse(text: str) -> dict[str, int]:
    """The pins of a pins file's text; ValueError if it is not {name: positive version}."""
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    pins = {}
    for name, version in raw.items():
        if type(version) is not int or version < 1:
            raise ValueError(f"the pin of {name!r} is not a version number: {version!r}")
        pins[str(name)] = version
    return pins

