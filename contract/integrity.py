"""A version's integrity: every member file's sha256 as the manifest lists it, checked before a
version is loaded, and a private copy made of exactly the bytes checked.

Member files are opened without following symbolic links and without blocking (a pipe planted
in a version is refused, never waited on); a version holds its own regular files and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path
from typing import Iterator

from contract.files import open_regular, printable
from contract.layout import MANIFEST_FILE
from contract.manifest import Manifest, RepositoryError

_CHUNK = 1 << 20


class ChecksumError(RepositoryError):
    """A member file is missing, unexpected, or its bytes do not match the manifest."""

    category = "checksum"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a regular file's bytes, read in chunks (OSError for a symbolic link or a pipe)."""
    digest = hashlib.sha256()
    for chunk in _file_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    """A regular file's bytes in chunks, opened without following a symbolic link and without
    blocking (a pipe put in its place is refused, never waited on)."""
    with os.fdopen(open_regular(path), "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every regular file under a directory, keyed by POSIX path relative to it."""
    out: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            out[path.relative_to(directory).as_posix()] = sha256_file(path)
    return out


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
                                     f"member {member.name}: {member.path}/{printable(rel)}")
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
                raise ChecksumError(f"{where}/{printable(rel)} is a symbolic link; a version holds its own files")
            if name in names:
                if not stat.S_ISREG(mode):
                    raise ChecksumError(f"{where}/{printable(rel)} is not a regular file")
                files.append(rel)
    return files
