"""The repository as one poll saw it: taken in a thread, off the event loop, and shared by every
status route until the next poll (GET /models, the /ui page's data, the admin status route and
gRPC's GetModelStatus), so no request makes the server walk the file system.

A snapshot holds every ensemble's version folders, the entries skipped (the first
`SKIPPED_SHOWN` by name, and how many there were: a repository may hold any number of odd
entries, a reply may not), and the stamps of the versions whose stamp decides something: the
failed ones (retried only once their files change) and the uncommitted ones (recorded as such).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Mapping

from contract.layout import Skipped, VersionDir, scan_model_entries, scan_names_entries

SKIPPED_SHOWN = 100


def version_stamp(version: VersionDir) -> tuple:
    """What must change before a failed version is tried again: (path, mtime, size) of its files
    and folders. What cannot be read is left out, never raised: a poll goes on."""
    entries = []
    for folder, folders, files in os.walk(version.path):  # links to folders are not followed
        for name in folders + files:
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:  # gone, or unreadable
                continue
            entries.append((os.path.relpath(path, version.path), st.st_mtime_ns, st.st_size))
    return tuple(sorted(entries))


@dataclass(frozen=True)
class Skips:
    """Entries skipped in one folder: the first `SKIPPED_SHOWN` by name, and how many in all."""

    shown: tuple[Skipped, ...] = ()
    count: int = 0


def capped(skipped: list[Skipped]) -> Skips:
    """The skipped entries a reply shows: a bounded, stable part of them, and their number."""
    return Skips(tuple(sorted(skipped, key=lambda s: s.entry)[:SKIPPED_SHOWN]), len(skipped))


@dataclass(frozen=True)
class EnsembleScan:
    """One ensemble's folder: its version folders by number (oldest first), what was skipped, and
    the stamps of its failed and uncommitted versions."""

    folders: dict[int, VersionDir] = field(default_factory=dict)
    skipped: Skips = Skips()
    stamps: dict[int, tuple] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """The repository at one poll: ensemble names (sorted), the root's skipped entries, and each
    ensemble's scan."""

    names: tuple[str, ...] = ()
    skipped: Skips = Skips()
    ensembles: dict[str, EnsembleScan] = field(default_factory=dict)

    def of(self, name: str) -> EnsembleScan:
        """The scan of `name`; empty for a name this poll did not find."""
        return self.ensembles.get(name, EnsembleScan())


def take(root: Path, failed: Mapping[str, Collection[int]]) -> Snapshot:
    """Scan the repository `root` once; `failed`, the versions of each ensemble that failed,
    whose stamps the poll compares. File-system work: call it off the event loop."""
    names, skipped = scan_names_entries(root)
    ensembles = {}
    for name in names:
        folders, skipped_here = scan_model_entries(root, name)
        refused = failed.get(name, ())
        stamps = {v.version: version_stamp(v) for v in folders if not v.committed or v.version in refused}
        ensembles[name] = EnsembleScan({v.version: v for v in folders}, capped(skipped_here), stamps)
    return Snapshot(tuple(names), capped(skipped), ensembles)
