"""Atomic publishing of a version into the model repository, in either manifest format
(`publish_version`: format 1; `publish_named_version`: format 2, named inputs and heads), into a
folder as below or onto an object store (contract.remote: a claimed number, the manifest last).

A version is assembled under a hidden staging folder beside the versions, the manifest is
written last and everything is fsynced, then the folder is renamed to the next free number.
Readers ignore hidden folders and folders without a manifest, so a crash at any point leaves
nothing they would serve. A publisher holds its staging folder (contract.held_folders) while it
works; the next publish removes the staging folders of publishers that died, never a live one's.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from contract.files import sync_folder
from contract.held_folders import held_folder, remove_abandoned
from contract.integrity import file_digests
from contract.layout import MANIFEST_FILE, MEMBERS_DIR, is_valid_name, next_version, scan_model
from contract.remote import upload_version
from contract.store import RemoteStore, StoreError
from contract.manifest import (Abstention, Calibration, DataInfo, HeadSpec, InputSpec, Manifest, ManifestV2,
                               MemberEntry, OutputSpec, TensorSpec)

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
# A staging folder whose publisher is gone (its lock is free) is removed by the next publish once
# it is this old; the wait covers a publisher on another machine whose lock this one cannot see.
STALE_STAGING_SECONDS = 3600
# A staging folder without a lock file was made by something else (an older publisher, a copy by
# hand): only its age says it is abandoned.
FOREIGN_STAGING_SECONDS = 24 * 3600
_RENAME_ATTEMPTS = 20


class PublishError(Exception):
    """The version could not be published; nothing was made visible."""


@dataclass(frozen=True)
class MemberArtifact:
    """A member ready to publish: an exported SavedModel folder and what is known about it."""

    name: str
    kind: str
    source: Path
    weight: float
    hyperparameters: dict = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def _fsync_tree(directory: Path) -> None:
    """fsync every file and folder under directory, then directory itself."""
    for dirpath, _dirnames, filenames in os.walk(directory):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_folder(Path(dirpath))


def remove_stale_staging(model_dir: Path, older_than: float = STALE_STAGING_SECONDS) -> list[Path]:
    """Delete the staging folders of publishers that died (their lock is free) once older than
    `older_than` seconds; returns what was removed."""
    return remove_abandoned(model_dir, STAGING_PREFIX, older_than, FOREIGN_STAGING_SECONDS)


def check_writable(root: Path) -> None:
    """Fail early, with the path, if the repository cannot be written."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PublishError(f"cannot create repository folder {root}: {exc.strerror}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise PublishError(f"repository folder {root} is not writable; pass a writable --repository")


def latest_committed(root: Path, name: str) -> int | None:
    """The newest version of `name` whose manifest is present."""
    committed = [v.version for v in scan_model(root, name) if v.committed]
    return max(committed, default=None)


def publish_version(
    root: Path | RemoteStore,
    name: str,
    members: list[MemberArtifact],
    input_spec: InputSpec,
    output_spec: OutputSpec,
    metrics: dict[str, float],
    data: DataInfo | None = None,
    attachments: dict[str, bytes] | None = None,
    *,
    calibration: Calibration | None = None,
    abstention: Abstention | None = None,
    uncertainty_reference: dict[str, float] | None = None,
) -> Manifest:
    """Copy members (and attachments: report files beside the manifest) into a new version
    folder of `root/name` atomically, and return its manifest (with the calibration, the
    abstention threshold and the validation level of the uncertainty scores, when given)."""

    def manifest(version: int, replaces: int | None, entries: tuple[MemberEntry, ...]) -> Manifest:
        return Manifest(name=name, version=version, created=datetime.now(timezone.utc), input=input_spec,
                        output=output_spec, members=entries, metrics=metrics, data=data, replaces=replaces,
                        calibration=calibration, abstention=abstention,
                        uncertainty_reference=uncertainty_reference or {})

    return _publish(root, name, members, attachments, manifest)


def publish_named_version(
    root: Path | RemoteStore,
    name: str,
    members: list[MemberArtifact],
    inputs: tuple[TensorSpec, ...],
    heads: tuple[HeadSpec, ...],
    metrics: dict[str, float],
    data: DataInfo | None = None,
    attachments: dict[str, bytes] | None = None,
) -> ManifestV2:
    """As publish_version, in manifest format 2: named inputs and heads with tasks; every
    member's `serving_default` signature takes each input and gives each head by its name."""

    def manifest(version: int, replaces: int | None, entries: tuple[MemberEntry, ...]) -> ManifestV2:
        return ManifestV2(format_version=2, name=name, version=version, created=datetime.now(timezone.utc),
                          inputs=inputs, heads=heads, members=entries, metrics=metrics, data=data,
                          replaces=replaces)

    return _publish(root, name, members, attachments, manifest)


def _publish(
    root: Path | RemoteStore,
    name: str,
    members: list[MemberArtifact],
    attachments: dict[str, bytes] | None,
    manifest_for: Callable[[int, int | None, tuple[MemberEntry, ...]], Manifest | ManifestV2],
) -> Manifest | ManifestV2:
    """Stage members and attachments, write `manifest_for(version, replaces, entries)` last and
    rename the staging folder to the next free version number: the steps of every format."""
    if not is_valid_name(name):
        raise PublishError(
            f"ensemble name {name!r} is not valid: use 1-64 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    if not members:
        raise PublishError("an ensemble needs at least one member")
    if isinstance(root, RemoteStore):
        return _publish_to_store(root, name, members, attachments, manifest_for)
    check_writable(root)
    model_dir = root / name
    model_dir.mkdir(exist_ok=True)
    remove_stale_staging(model_dir)

    # A lock on the staging folder while it is filled: a later publish removes it only if this one died.
    with held_folder(model_dir, STAGING_PREFIX, mode=0o777) as staging:  # mode: the umask applies, as to any folder
        entries = _stage(staging, members, attachments)
        for _ in range(_RENAME_ATTEMPTS):
            # read at each try, just before the rename: another writer may have published meanwhile
            replaces = latest_committed(root, name)
            version = next_version(v.version for v in scan_model(root, name))
            manifest = manifest_for(version, replaces, tuple(entries))
            # The manifest is written last: it is the commit marker.
            (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
            _fsync_tree(staging)
            target = model_dir / str(version)
            if target.exists():  # another writer took this number; try the next one
                continue
            try:
                os.rename(staging, target)
            except OSError:  # lost a race for this number between exists() and rename()
                if target.exists():
                    continue
                raise
            # Published: from here on, say so, whatever else happens.
            try:
                sync_folder(model_dir)
            except OSError as exc:
                log.warning("%s was published but its folder could not be synced: %s", target, exc)
            return manifest
        raise PublishError(f"could not claim a version number in {model_dir} after {_RENAME_ATTEMPTS} tries")


def _stage(staging: Path, members: list[MemberArtifact], attachments: dict[str, bytes] | None) -> list[MemberEntry]:
    """Copy the members and the attachments into `staging`; the members' manifest entries."""
    entries = []
    for member in members:
        rel = f"{MEMBERS_DIR}/{member.name}"
        shutil.copytree(member.source, staging / rel)
        entries.append(MemberEntry(name=member.name, path=rel, kind=member.kind,
                                   hyperparameters=member.hyperparameters, metrics=member.metrics,
                                   weight=member.weight, files=file_digests(staging / rel)))
    for filename, content in (attachments or {}).items():
        if "/" in filename or filename in (MANIFEST_FILE, MEMBERS_DIR) or filename.startswith("."):
            raise PublishError(f"attachment name {filename!r} is not allowed")
        (staging / filename).write_bytes(content)
    return entries


def _publish_to_store(store: RemoteStore, name: str, members: list[MemberArtifact],
                      attachments: dict[str, bytes] | None, manifest_for) -> Manifest | ManifestV2:
    """The same version on an object store: staged in a private temporary folder, then claimed,
    uploaded and committed by its manifest (contract.remote.upload_version)."""
    with tempfile.TemporaryDirectory(prefix="ensemble-upload-") as tmp:
        staging = Path(tmp)
        entries = tuple(_stage(staging, members, attachments))
        try:
            return upload_version(store, name, staging, lambda version, replaces: manifest_for(version, replaces, entries))
        except StoreError as exc:
            raise PublishError(f"cannot publish {name} to {store.url}: {exc}") from None
