"""Pin storage: the versions operators pinned (a rollback, a pin), by ensemble name, kept where
every replica serving the repository reads them.

The pins live in one file, `pins.json`, in a folder every replica shares: the state folder
when one is set (`ENSEMBLE_STATE_DIR`), else `.state/` inside the repository itself (hidden:
the repository's scans skip it). Every replica re-reads the file at each poll, so a rollback
sent to any one of them reaches all of them within a poll interval (plus loading the version
where it is not loaded), a restarted replica keeps it, and a version published later does not
undo it. `ensemble-admin` writes the same file, for operators without HTTP.

On an object-store repository the pins are the store's `.state/pins.json` object instead,
read at each poll (parsed when its ETag changed) and changed by compare-and-swap, so replicas on
any node share them; a store that cannot be read keeps the pins read before in force.

A pin that cannot be written where the others read it is refused (`PinsNotShared`), never
kept by one replica alone: the fleet would serve two versions.

The file is shared state, so it is read as untrusted bytes: a regular file only (never through
a link, never blocking on a pipe), of a bounded size, parsed with every error caught, each name
an ensemble name and each version in the repository's range. A file refused for any reason is
damaged: the pins read before stay in force and `state` says so; a store that never read good
pins (a replica started on a damaged file) knows none (`PinsState.known` is false), and a pin
is not written over a damaged file (`PinsDamaged`): what it held would be lost for the fleet.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

from contract.files import lock_file, lock_within, read_nofollow, write_atomically
from contract.layout import MAX_VERSION, is_valid_name

if TYPE_CHECKING:
    from contract.store import RemoteStore

log = logging.getLogger(__name__)

PINS_FILE = "pins.json"
STORE_PINS_KEY = ".state/pins.json"  # on an object store, beside the ensembles (hidden: not a name)
CAS_ATTEMPTS = 10
LOCK_WAIT_SECONDS = 0.5  # the longest a pin waits for another writer (it may be on the event loop)
STATE_FOLDER = ".state"
# One pin is a few dozen bytes: a file this large is not a pins file, and is refused unread.
MAX_PINS_BYTES = 1 << 20


class PinsNotShared(OSError):
    """The pins file cannot be written in the shared folder."""


class PinsDamaged(PinsNotShared):
    """The pins file is damaged: a pin written over it would drop the pins it held."""


class DamagedPins(ValueError):
    """The bytes of a pins file are not {ensemble name: version}; the text says why, without the
    file's path (it reaches GET /models)."""


@dataclass(frozen=True)
class PinsState:
    """Whether the pins in force are the file's: `valid` (the file was read and accepted, or there
    is none: no pins), `damaged` (the file is refused; the pins read before it stay in force) or
    `unknown` (the file is refused and no good pins were ever read here, or it was not read yet).
    `error` says why the file is refused, `since` (Unix time) when it was first seen so."""

    state: Literal["valid", "damaged", "unknown"] = "unknown"
    error: str | None = None
    since: float | None = None

    @property
    def known(self) -> bool:
        """Whether the pins in force are the fleet's (as read now, or the last good ones)."""
        return self.state != "unknown"


def pins_folder(repository: Path, state_dir: Path | None) -> Path:
    """Where the replicas serving `repository` keep their pins."""
    return Path(state_dir) if state_dir is not None else Path(repository) / STATE_FOLDER


class PinStore:
    """Versions pinned, by ensemble name: in memory only without a folder (tests, a lone
    server), else in `<folder>/pins.json`, read again (`refresh`) whenever it changed. Safe to
    use from the poller's thread and the event loop at once."""

    def __init__(self, folder: Path | None = None, remote: "RemoteStore | None" = None):
        self.folder = Path(folder) if folder is not None else None
        self.path = self.folder / PINS_FILE if self.folder is not None else None
        # On an object store (contract.store): the object STORE_PINS_KEY, changed by compare-and-swap.
        self.remote = remote
        if remote is not None:
            self.path = f"{remote.url}/{STORE_PINS_KEY}"
        self._pins: dict[str, int] = {}
        self._seen: tuple | None = None  # (mtime_ns, size, inode) of the file, or the object's ETag, when last read
        self.state = PinsState("valid") if self.path is None else PinsState()
        self._guard = threading.RLock()

    def refresh(self) -> dict[str, int]:
        """Re-read the file if it changed since it was last read; the pins now in force (the last
        good ones while the file is damaged: `state` says so). File-system work: call it off
        the event loop."""
        with self._guard:
            if self.remote is not None:
                self._read_remote()
            elif self.path is not None:
                self._read()
            return self._pins

    def _read_remote(self) -> None:
        """The pins object, parsed when its ETag changed. A store that cannot be read leaves the
        pins read before in force (the manager reports the store); before any good read, the
        pins are unknown and this replica serves nothing, as with a damaged file."""
        from contract.store import NotFound, StoreError

        try:
            data, etag = self.remote.read(STORE_PINS_KEY)
        except NotFound:
            self._pins, self._seen = {}, None
            self._accept()
            return
        except StoreError as exc:
            if not self.state.known:
                self._refuse(f"the pins on the store cannot be read ({exc.meaning})")
            return
        if etag is not None and etag == self._seen:
            return
        self._seen = etag
        try:
            pins = parse(data)
        except DamagedPins as exc:
            self._refuse(str(exc))
        else:
            self._pins = pins
            self._accept()

    def _set_remote(self, name: str, version: int | None) -> None:
        """Read, change and write back the pins object by compare-and-swap (create-only when
        there is none); a writer that lost a race reads again. Never over damaged pins."""
        from contract.store import AlreadyExists, Conflict, NotFound, StoreError

        try:
            for _ in range(CAS_ATTEMPTS):
                try:
                    data, etag = self.remote.read(STORE_PINS_KEY)
                    pins = parse(data)
                except NotFound:
                    pins, etag = {}, None
                except DamagedPins as exc:
                    raise PinsDamaged(f"the pins at {self.path} are damaged ({exc}); a pin written over them "
                                      "would drop the pins they hold for every replica: repair or remove the "
                                      "object") from None
                if version is None:
                    pins.pop(name, None)
                else:
                    pins[name] = version
                body = json.dumps(pins, sort_keys=True, indent=1).encode()
                try:
                    self._seen = (self.remote.create(STORE_PINS_KEY, body) if etag is None
                                  else self.remote.replace(STORE_PINS_KEY, body, etag))
                except (AlreadyExists, Conflict):  # another admin wrote meanwhile: read theirs, apply ours
                    continue
                self._pins = pins
                self._accept()
                return
            raise PinsNotShared(f"the pins at {self.path} kept changing under this write ({CAS_ATTEMPTS} tries); "
                                "try again")
        except StoreError as exc:
            raise PinsNotShared(f"the pin cannot be recorded at {self.path}, where every replica reads it: "
                                f"{exc}") from None

    def _read(self) -> None:
        try:
            st = os.lstat(self.path)
        except (FileNotFoundError, NotADirectoryError):  # no file (or no folder): no pins
            self._pins, self._seen = {}, None
            self._accept()
            return
        except OSError as exc:
            self._seen = None  # read again once it can be
            self._refuse(f"{PINS_FILE} cannot be read: {exc.strerror or exc}")
            return
        seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            pins = parse(read_nofollow(self.path, MAX_PINS_BYTES))
        except OSError as exc:
            self._refuse(f"{PINS_FILE} {unreadable(exc)}")
        except DamagedPins as exc:
            self._refuse(str(exc))
        else:
            self._pins = pins
            self._accept()

    def _accept(self) -> None:
        if self.state.state != "valid" and self.state.error is not None:
            log.warning("the pins file %s is valid again: its pins are in force", self.path)
        self.state = PinsState("valid")

    def _refuse(self, error: str) -> None:
        before = self.state
        known = before.known
        self.state = PinsState("damaged" if known else "unknown", error,
                               before.since if before.error is not None else time.time())
        if error == before.error:  # said once, not at every poll
            return
        if known:
            log.error("the pins file %s is damaged (%s): keeping the pins read before it, %s",
                      self.path, error, self._pins or "none")
        else:
            log.critical("the pins file %s is damaged (%s) and no good pins were read before it: "
                         "the versions the fleet pinned are unknown here; repair the file or remove "
                         "it (no pins)", self.path, error)

    def get(self, name: str) -> int | None:
        return self._pins.get(name)

    def hold(self, name: str, version: int | None) -> None:
        """Put a pin in force here at once, before it is written where the others read it (a
        store's write takes a round trip: a load finishing meanwhile must already see it)."""
        if version is None:
            self._pins.pop(name, None)
        else:
            self._pins = {**self._pins, name: version}

    def set(self, name: str, version: int | None) -> None:
        """Pin `name` to `version`, or unpin it with None: read, changed and written back under
        the folder's lock (replicas writing at once lose nothing), atomically and durably; never
        over a damaged file (PinsDamaged)."""
        if self.path is None:
            self.hold(name, version)
            return
        if self.remote is not None:
            with self._guard:
                self._set_remote(name, version)
            return
        if not self._guard.acquire(timeout=LOCK_WAIT_SECONDS):  # a poll's read in the scan thread
            raise PinsNotShared(f"the pins file {self.path} is being read; try again")
        with _released(self._guard):
            try:
                with self._locked():
                    self._seen = None
                    pins = dict(self.refresh())
                    if self.state.state != "valid":
                        raise PinsDamaged(
                            f"the pins file {self.path} is damaged ({self.state.error}); a pin written "
                            "over it would drop the pins it holds for every replica: repair it (a JSON "
                            'object such as {"digits": 3}, renamed into place) or remove it (no pins)')
                    if version is None:
                        pins.pop(name, None)
                    else:
                        pins[name] = version
                    write_atomically(self.path, json.dumps(pins, sort_keys=True, indent=1).encode())
                    self._pins, self._seen = pins, None
            except PinsDamaged:
                raise
            except OSError as exc:
                raise PinsNotShared(
                    f"the pin cannot be recorded in {self.path}, where every replica reads it "
                    f"({exc.strerror or exc}); make that folder writable, or set ENSEMBLE_STATE_DIR "
                    "to a folder every replica shares and may write") from None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The folder's lock, waited for at most LOCK_WAIT_SECONDS (the caller may be the event
        loop): a writer that holds it longer, or a lock that never answers, is an OSError."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = lock_file(self.folder / ".pins.lock")
        try:
            if not lock_within(fd, LOCK_WAIT_SECONDS):
                raise OSError(errno.EWOULDBLOCK, "another writer holds the pins lock; try again")
            yield
        finally:
            os.close(fd)


@contextmanager
def _released(lock) -> Iterator[None]:
    """Release `lock`, acquired already, on leaving."""
    try:
        yield
    finally:
        lock.release()


def unreadable(exc: OSError) -> str:
    """Why a pins file could not be read, in words without its path."""
    if exc.errno == errno.ELOOP:
        return "is a symbolic link"
    if exc.errno == errno.EFBIG:
        return f"is larger than {MAX_PINS_BYTES} bytes"
    if exc.errno in (errno.EINVAL, errno.EISDIR):
        return "is not a regular file"
    return f"cannot be read: {exc.strerror or exc}"


def parse(data: bytes) -> dict[str, int]:
    """The pins of a pins file's bytes; DamagedPins unless they are a JSON object of
    {ensemble name: version from 1 to MAX_VERSION}."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise DamagedPins(f"{PINS_FILE} is not UTF-8 text") from None
    except RecursionError:
        raise DamagedPins(f"{PINS_FILE} is nested too deeply to be pins") from None
    except ValueError as exc:  # json.JSONDecodeError; also an integer of too many digits
        raise DamagedPins(f"{PINS_FILE} is not JSON: {str(exc)[:200]}") from None
    if not isinstance(raw, dict):
        raise DamagedPins(f"{PINS_FILE} is not a JSON object of {{ensemble name: version}}")
    pins = {}
    for name, version in raw.items():
        if not is_valid_name(name):
            raise DamagedPins(f"{PINS_FILE} pins {name[:64]!r}, which is not an ensemble name")
        if type(version) is not int or not 1 <= version <= MAX_VERSION:
            raise DamagedPins(f"the pin of {name!r} in {PINS_FILE} is not a version number from 1 to "
                              f"{MAX_VERSION}: {short(version)}")
        pins[name] = version
    return pins


def short(value: object) -> str:
    """A JSON value as text of at most 40 characters (a pin's value may be anything)."""
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."
