"""Pin storage: the versions operators pinned through the admin routes, by ensemble name."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

PINS_FILE = "pins.json"


class PinStore:
    """Versions pinned through the admin routes, by ensemble name.

    In memory, and also in `<folder>/pins.json` when a folder is given: then every worker
    process reads the same pins at each poll, and a restarted service keeps them (a rollback
    must not be undone by a restart)."""

    def __init__(self, folder: Path | None = None):
        self.path = Path(folder) / PINS_FILE if folder is not None else None
        self._pins: dict[str, int] = {}
        self._seen: int | None = None  # mtime_ns of the file when last read
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.refresh()

    def refresh(self) -> dict[str, int]:
        """Re-read the file if another process changed it; the pins now in force."""
        if self.path is None:
            return self._pins
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._pins, self._seen = {}, None
            return self._pins
        if mtime != self._seen:
            try:
                raw = json.loads(self.path.read_text())
                self._pins = {str(k): int(v) for k, v in raw.items() if int(v) >= 1}
            except (OSError, ValueError, AttributeError, TypeError) as exc:
                log.error("ignoring unreadable pins file %s: %s", self.path, exc)
            self._seen = mtime
        return self._pins

    def get(self, name: str) -> int | None:
        return self._pins.get(name)

    def set(self, name: str, version: int | None) -> None:
        """Pin `name` to `version`, or unpin it with None; written atomically."""
        pins = dict(self.refresh())
        if version is None:
            pins.pop(name, None)
        else:
            pins[name] = version
        if self.path is not None:
            tmp = self.path.with_name(f".{PINS_FILE}.{os.getpid()}")
            tmp.write_text(json.dumps(pins, sort_keys=True))
            os.replace(tmp, self.path)
            self._seen = self.path.stat().st_mtime_ns
        self._pins = pins
