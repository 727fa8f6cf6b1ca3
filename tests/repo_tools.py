"""Writing versions into a repository the way a trainer would (or the ways a broken one might)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from contract.integrity import file_digests
from contract.layout import MANIFEST_FILE, next_version, scan_model


def manifest_as(source: Path, version: int, edit=None) -> str:
    """The manifest of `source`, renumbered to `version` (and changed by `edit(raw)` if given)."""
    raw = json.loads((source / MANIFEST_FILE).read_text())
    raw["version"] = version
    if edit is not None:
        edit(raw)
    return json.dumps(raw, indent=2)


def upload_copy(store, version_dir: Path, name: str, version: int) -> None:
    """Upload a version folder to an object store (contract.store.RemoteStore) as `name/version`,
    its manifest renumbered and written last, create-only (as contract.remote commits)."""
    for path in sorted(p for p in version_dir.rglob("*") if p.is_file() and p != version_dir / MANIFEST_FILE):
        store.write(f"{name}/{version}/{path.relative_to(version_dir).as_posix()}", path)
    store.create(f"{name}/{version}/{MANIFEST_FILE}", manifest_as(version_dir, version).encode())


def publish_copy(root: Path, name: str = "digits", source: int = 1, edit=None) -> int:
    """Publish version `source` again as the next version, atomically: staged in a hidden folder,
    manifest written last, then renamed into place. Returns the new version number."""
    model_dir = root / name
    version = next_version(v.version for v in scan_model(root, name))
    staging = model_dir / f".staging-test-{version}"
    shutil.copytree(model_dir / str(source), staging, ignore=shutil.ignore_patterns(MANIFEST_FILE))
    (staging / MANIFEST_FILE).write_text(manifest_as(model_dir / str(source), version, edit))
    os.rename(staging, model_dir / str(version))
    return version


def export_nan_member(directory: Path, input_shape=(8, 8, 1), classes: int = 10) -> Path:
    """A SavedModel with the right signature whose outputs are all NaN."""
    import keras

    from training.members import export_member

    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(classes)(x)
    outputs = keras.layers.Lambda(lambda t: t * float("nan"))(x)
    export_member(keras.Model(inputs, outputs), directory)
    return directory


def publish_with_member(root: Path, member_dir: Path, name: str = "digits", source: int = 1) -> int:
    """Publish a version like `source`, but with one member: the SavedModel in `member_dir`."""
    model_dir = root / name
    version = next_version(v.version for v in scan_model(root, name))
    staging = model_dir / f".staging-test-{version}"
    shutil.copytree(member_dir, staging / "members" / "odd")

    def one_member(raw):
        entry = dict(raw["members"][0], name="odd", path="members/odd", weight=1.0,
                     files=file_digests(staging / "members" / "odd"))
        raw["members"] = [entry]

    (staging / MANIFEST_FILE).write_text(manifest_as(model_dir / str(source), version, one_member))
    os.rename(staging, model_dir / str(version))
    return version
