"""The model repository contract: manifest schema, scanning, checksums and version choice.

This module is shared by the writer (training) and the reader (service), and is all they share.
It imports neither TensorFlow nor FastAPI, so both halves (and their tests) can use it cheaply.

Layout::

    <root>/<name>/<version>/manifest.json   written last: the commit marker
    <root>/<name>/<version>/members/<member>/...   one SavedModel per member
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import re
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MEMBERS_DIR = "members"
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
MEMBER_KINDS = ("tuned", "seed", "snapshot", "swa", "imported")
SUPPORTED_DTYPES = ("float32", "float64", "int32", "int64", "uint8")
# Weights must sum to one; this absorbs rounding in a JSON round trip.
WEIGHT_SUM_TOLERANCE = 1e-6
_CHUNK = 1 << 20


class RepositoryError(Exception):
    """A version on disk is not a valid, complete version."""

    category = "invalid"  # the reason label of the reload-failure metric


def failure_of(exc: Exception) -> tuple[str, str]:
    """(reason, category) of why a version could not be loaded: a RepositoryError says both;
    anything else (TensorFlow and Keras raise many types for unloadable models) is a `load`
    failure named by its type."""
    if isinstance(exc, RepositoryError):
        return str(exc), exc.category
    return f"{type(exc).__name__}: {exc}", "load"


class ManifestError(RepositoryError):
    """The manifest is missing, unreadable or does not follow the schema."""

    category = "manifest"


class ChecksumError(RepositoryError):
    """A member file is missing, unexpected, or its bytes do not match the manifest."""

    category = "checksum"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """Shape of one instance (without the batch dimension) and its dtype."""

    shape: tuple[int, ...] = Field(min_length=1)
    dtype: Literal["float32", "float64", "int32", "int64", "uint8"] = "float32"

    @field_validator("shape")
    @classmethod
    def _positive_dims(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(d <= 0 for d in shape):
            raise ValueError(f"every dimension must be a positive integer, got {list(shape)}")
        return shape


class OutputSpec(_Strict):
    """The class labels, in the order of the probability columns."""

    classes: tuple[str, ...] = Field(min_length=2)

    @field_validator("classes")
    @classmethod
    def _unique(cls, classes: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(classes)) != len(classes):
            raise ValueError("class labels must be unique")
        return classes


class MemberEntry(_Strict):
    """One ensemble member: where it is, how it was made, how it did, and its files' digests."""

    name: str = Field(pattern=NAME_PATTERN)
    path: str
    kind: Literal["tuned", "seed", "snapshot", "swa", "imported"]
    hyperparameters: dict[str, bool | int | float | str | None] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    weight: float = Field(gt=0.0, le=1.0)
    files: dict[str, str] = Field(min_length=1)

    @field_validator("path")
    @classmethod
    def _inside_members(cls, path: str) -> str:
        parts = PurePosixPath(path).parts
        if len(parts) != 2 or parts[0] != MEMBERS_DIR or parts[1] in ("..", "."):
            raise ValueError(f"member path must be '{MEMBERS_DIR}/<member>', got {path!r}")
        return path

    @field_validator("files")
    @classmethod
    def _relative_files_and_digests(cls, files: dict[str, str]) -> dict[str, str]:
        for rel, digest in files.items():
            p = PurePosixPath(rel)
            if p.is_absolute() or ".." in p.parts or rel != p.as_posix():
                raise ValueError(f"file path {rel!r} must be relative, normalised, inside the member")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"digest of {rel!r} is not a sha256 hex digest")
        return files


class DataInfo(_Strict):
    """Where the training data came from, and a fingerprint of its contents."""

    source: str
    fingerprint: str
    rows: dict[str, int] = Field(default_factory=dict)


# The uncertainty scores of a prediction (service.scores computes them).
ScoreName = Literal["entropy", "expected_entropy", "mutual_information"]


class Calibration(_Strict):
    """Pool, then calibrate: the temperature applied to the averaged members (service.scores)."""

    method: Literal["temperature"] = "temperature"
    temperature: float = Field(gt=0.0, le=100.0)


class Abstention(_Strict):
    """When a prediction should not be trusted: a row whose `score` (service.scores.SCORES) is
    above `threshold` is flagged `abstain`. Fitted on the validation split so that the answered
    rows err at most `target_error`; `coverage` is the share it answered there."""

    score: ScoreName
    threshold: float
    target_error: float = Field(gt=0.0, lt=1.0)
    coverage: float = Field(ge=0.0, le=1.0)


class Manifest(_Strict):
    """The contract of one published version. Written last; its presence commits the version."""

    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    created: datetime
    input: InputSpec
    output: OutputSpec
    members: tuple[MemberEntry, ...] = Field(min_length=1)
    metrics: dict[str, float] = Field(default_factory=dict)
    data: DataInfo | None = None
    replaces: int | None = None
    calibration: Calibration | None = None
    abstention: Abstention | None = None
    # Mean of each uncertainty score on the validation split: the level a drift alert compares with.
    uncertainty_reference: dict[ScoreName, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _members_consistent(self) -> "Manifest":
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        paths = [m.path for m in self.members]
        if len(set(paths)) != len(paths):
            raise ValueError(f"member paths must be unique, got {paths}")
        total = sum(m.weight for m in self.members)
        if not math.isclose(total, 1.0, abs_tol=WEIGHT_SUM_TOLERANCE):
            raise ValueError(f"member weights must sum to 1, they sum to {total}")
        return self

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(m.weight for m in self.members)

    @property
    def temperature(self) -> float:
        """The temperature of the pooled distribution (1: not calibrated)."""
        return self.calibration.temperature if self.calibration is not None else 1.0


def first_nonfinite_row(x: np.ndarray) -> int | None:
    """Index of the first row holding NaN or infinity, or None if every value is finite: rows a
    version is trained on or asked about must be finite."""
    if x.dtype.kind != "f":
        return None
    # For float32 and narrower, one float64 sum decides: NaN and infinity reach it, and finite
    # values cannot overflow it. A float64 sum could overflow, so float64 is checked value by value.
    if x.dtype.itemsize < 8 and np.isfinite(np.add.reduce(x, axis=None, dtype=np.float64)):
        return None
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def uniform_weights(n: int) -> list[float]:
    """Equal averaging weights for n members that sum to exactly one after rounding."""
    if n < 1:
        raise ValueError("an ensemble needs at least one member")
    return [1.0 / n] * n


def sha256_file(path: Path) -> str:
    """Hex sha256 of a regular file's bytes, read in chunks (OSError for a symbolic link or a pipe)."""
    digest = hashlib.sha256()
    for chunk in _file_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    """A regular file's bytes in chunks, opened without following a symbolic link and without
    blocking (a pipe put in its place is refused, never waited on)."""
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        while chunk := f.read(_CHUNK):
            yield chunk


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every regular file under a directory, keyed by POSIX path relative to it."""
    out: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            out[path.relative_to(directory).as_posix()] = sha256_file(path)
    return out


def read_manifest(version_dir: Path) -> Manifest:
    """Parse and validate a version's manifest, checking it names the folder it sits in."""
    path = version_dir / MANIFEST_FILE
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ManifestError(f"{path} is not a regular file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path} does not exist (the version is not committed)") from None
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from None
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise ManifestError(f"{path} does not follow the schema: {problems}") from None
    if manifest.name != version_dir.parent.name or str(manifest.version) != version_dir.name:
        raise ManifestError(
            f"{path} describes {manifest.name}/{manifest.version} but sits in "
            f"{version_dir.parent.name}/{version_dir.name}"
        )
    return manifest


def verify_checksums(version_dir: Path, manifest: Manifest, copy_into: Path | None = None) -> None:
    """Check every member's files against the manifest: none missing, none extra, all equal,
    and every one a regular file in its folder (no symbolic link, device or pipe).

    Checking a folder and then loading it by its path leaves a writer time to change it in
    between; with `copy_into`, each member file is copied there as it is checked (and the
    manifest written beside them), so what is loaded from `copy_into` is exactly what was
    verified, whatever happens to `version_dir` afterwards. `copy_into` must not exist yet; an
    OSError while writing it is raised as such (the copy's disk, not the version, failed)."""
    if copy_into is not None:
        copy_into.mkdir(mode=0o700, parents=True)
    for member in manifest.members:
        member_dir = version_dir / member.path
        if member_dir.is_symlink() or not member_dir.is_dir():
            raise ChecksumError(f"member {member.name}: folder {member.path} is missing (or a symbolic link)")
        on_disk = set(_regular_files(member_dir, f"member {member.name}: {member.path}"))
        missing = sorted(set(member.files) - on_disk)
        if missing:
            raise ChecksumError(f"member {member.name}: missing file {member.path}/{missing[0]}")
        extra = sorted(on_disk - set(member.files))
        if extra:
            raise ChecksumError(
                f"member {member.name}: file {member.path}/{extra[0]} is not in the manifest"
            )
        for rel, expected in member.files.items():
            actual = _checked_digest(member_dir / rel, copy_into / member.path / rel if copy_into else None,
                                     f"member {member.name}: {member.path}/{_shown(rel)}")
            if actual != expected:
                raise ChecksumError(
                    f"member {member.name}: checksum mismatch for {member.path}/{rel} "
                    f"(manifest {expected[:12]}..., file {actual[:12]}...)"
                )
    if copy_into is not None:
        (copy_into / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")


def _checked_digest(path: Path, copy_to: Path | None, where: str) -> str:
    """The file's sha256 (ChecksumError naming `where` if it cannot be read: it may have changed
    since it was listed); with `copy_to`, its bytes also written to that new file as they are
    hashed (an OSError there is the copy's own)."""
    if copy_to is not None:
        copy_to.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with (open(os.open(copy_to, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb")
          if copy_to is not None else contextlib.nullcontext()) as out:
        digest, chunks = hashlib.sha256(), _file_chunks(path)
        while True:
            try:
                chunk = next(chunks, b"")
            except OSError as exc:
                raise ChecksumError(f"{where} cannot be read: {exc.strerror}") from None
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)
            if out is not None:
                out.write(chunk)


def _regular_files(folder: Path, where: str) -> list[str]:
    """POSIX paths of the files under `folder`, relative to it; ChecksumError for anything that
    is not a regular file or a folder (symbolic links are not followed), or cannot be read."""
    files = []

    def refuse(error: OSError) -> None:
        raise ChecksumError(f"{where}: cannot read {error.filename}: {error.strerror}")

    for current, folders, names in os.walk(folder, onerror=refuse):
        for name in folders + names:
            path = Path(current, name)
            try:
                mode = path.lstat().st_mode
            except OSError as exc:
                refuse(exc)
            rel = path.relative_to(folder).as_posix()
            if stat.S_ISLNK(mode):
                raise ChecksumError(f"{where}/{_shown(rel)} is a symbolic link; a version holds its own files")
            if name in names:
                if not stat.S_ISREG(mode):
                    raise ChecksumError(f"{where}/{_shown(rel)} is not a regular file")
                files.append(rel)
    return files


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
        return [], [Skipped(_shown(folder.name), f"cannot be read: {exc.strerror}")]
    found, skipped = [], []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_symlink() and not _inside(Path(entry.path), root):
                skipped.append(Skipped(_shown(entry.name), "a symbolic link leading out of the repository"))
            elif not entry.is_dir():
                skipped.append(Skipped(_shown(entry.name), "not a folder"))
            else:
                found.append((entry.name, Path(entry.path)))
        except OSError as exc:
            skipped.append(Skipped(_shown(entry.name), f"cannot be read: {exc.strerror}"))
    return found, skipped


def _shown(name: str) -> str:
    """A folder entry's name as printable text (names need not be UTF-8), at most 100 characters."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")[:100]


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
            skipped.append(Skipped(_shown(entry), f"not a version number (1 to {MAX_VERSION}; no leading zeros)"))
            continue
        try:
            committed = (path / MANIFEST_FILE).is_file()
        except OSError as exc:
            skipped.append(Skipped(_shown(entry), f"cannot be read: {exc.strerror}"))
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
            skipped.append(Skipped(_shown(entry), f"not an ensemble name ({NAME_PATTERN})"))
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
