"""Where a repository keeps what: ensemble folders, version folders, the manifest as commit
marker, and the scan that finds them.

Layout::

    <root>/<name>/<version>/manifest.json   written last: the commit marker
    <root>/<name>/<version>/members/<member>/...   one SavedModel per member

Names follow NAME_PATTERN; versions are ASCII numbers from 1 to MAX_VERSION. Hidden entries
(a trainer's work folders, copies in progress) are neither; anything else that is not an
ensemble or a version is reported as skipped, with why, never used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from contract.files import printable

MANIFEST_FILE = "manifest.json"
MEMBERS_DIR = "members"
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
# The largest version number: a signed 64-bit integer, what JSON clients and gRPC's int64 carry.
MAX_VERSION = 2**63 - 1


@dataclass(frozen=True)
class VersionDir:
    """A numeric version folder found on disk, committed or not."""

    name: str
    version: int
    path: Path
    committed: bool


def is_valid_name(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None


@dataclass(frozen=True)
class Skipped:
    """An entry of the repository that is neither an ensemble nor a version: reported, not used."""

    entry: str
    reason: str


def _entries(folder: Path, root: Path) -> tuple[list[tuple[str, Path]], list[Skipped]]:
    """(name, path) of the visible sub-folders of `folder`, and what was skipped and why: files
    where folders belong, unreadable entries, symbolic links leaving the repository. Hidden
    entries (the trainer's work folders, copies in progress) are neither."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    except OSError as exc:
        return [], [Skipped(printable(folder.name), f"cannot be read: {exc.strerror}")]
    found, skipped = [], []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_symlink() and not _inside(Path(entry.path), root):
                skipped.append(Skipped(printable(entry.name), "a symbolic link leading out of the repository"))
            elif not entry.is_dir():
                skipped.append(Skipped(printable(entry.name), "not a folder"))
            else:
                found.append((entry.name, Path(entry.path)))
        except OSError as exc:
            skipped.append(Skipped(printable(entry.name), f"cannot be read: {exc.strerror}"))
    return found, skipped


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, its symbolic links followed, is within the repository `root`."""
    try:
        return path.resolve(strict=True).is_relative_to(root.resolve(strict=True))
    except (OSError, RuntimeError):  # a dangling link or a loop
        return False


def is_version_folder(entry: str) -> bool:
    """Whether a folder name is a version number: ASCII digits (str.isdigit() accepts "²" and
    "٣", which int() refuses or reads), no leading zero, from 1 to MAX_VERSION."""
    return entry.isascii() and entry.isdigit() and entry == str(int(entry)) and 1 <= int(entry) <= MAX_VERSION


def scan_model_entries(root: Path, name: str) -> tuple[list[VersionDir], list[Skipped]]:
    """The numeric version folders of one ensemble, oldest first, and the entries skipped."""
    found, skipped = _entries(root / name, root)
    versions = []
    for entry, path in found:
        if not is_version_folder(entry):
            skipped.append(Skipped(printable(entry), f"not a version number (1 to {MAX_VERSION}; no leading zeros)"))
            continue
        try:
            committed = (path / MANIFEST_FILE).is_file()
        except OSError as exc:
            skipped.append(Skipped(printable(entry), f"cannot be read: {exc.strerror}"))
            continue
        versions.append(VersionDir(name, int(entry), path, committed))
    return sorted(versions, key=lambda v: v.version), skipped


def scan_model(root: Path, name: str) -> list[VersionDir]:
    """The numeric version folders of one ensemble, oldest first (see scan_model_entries)."""
    return scan_model_entries(root, name)[0]


def scan_names_entries(root: Path) -> tuple[list[str], list[Skipped]]:
    """Ensemble names present in the repository, sorted, and the entries skipped."""
    found, skipped = _entries(root, root)
    names = []
    for entry, _ in found:
        if is_valid_name(entry):
            names.append(entry)
        else:
            skipped.append(Skipped(printable(entry), f"not an ensemble name ({NAME_PATTERN})"))
    return sorted(names), skipped


def scan_names(root: Path) -> list[str]:
    """Ensemble names present in the repository, sorted."""
    return scan_names_entries(root)[0]


def choose_version(
    committed: Iterable[int], policy: Literal["latest"] | int, rejected: Iterable[int] = ()
) -> int | None:
    """The version to serve: the newest committed one not rejected, or the pinned one if present."""
    available = set(committed) - set(rejected)
    if policy == "latest":
        return max(available, default=None)
    return policy if policy in available else None


def next_version(existing: Iterable[int]) -> int:
    """The number a new version gets: one past the highest folder, committed or not."""
    return max(existing, default=0) + 1
