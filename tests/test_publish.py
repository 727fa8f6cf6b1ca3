"""Atomic publishing: manifests, numbering, and nothing visible when a publish fails (no TF)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from service.repository import InputSpec, OutputSpec, read_manifest, scan_model, verify_checksums
from training.publish import (
    STAGING_PREFIX,
    MemberArtifact,
    PublishError,
    publish_version,
    remove_stale_staging,
)

SPEC = InputSpec(shape=(4,))
OUT = OutputSpec(classes=("a", "b"))


def fake_member(tmp_path: Path, name: str, payload: bytes = b"w") -> MemberArtifact:
    src = tmp_path / "exports" / name
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(payload)
    (src / "variables" / "variables.index").write_bytes(payload * 2)
    return MemberArtifact(name=name, kind="tuned", source=src, weight=0.5, metrics={"accuracy": 0.9})


def test_publish_writes_verifiable_numbered_versions(tmp_path):
    root = tmp_path / "models"
    members = [fake_member(tmp_path, "tuned-0"), fake_member(tmp_path, "tuned-1", b"v")]
    first = publish_version(root, "digits", members, SPEC, OUT, {"accuracy": 0.95})
    second = publish_version(root, "digits", members, SPEC, OUT, {"accuracy": 0.96})
    assert (first.version, first.replaces) == (1, None)
    assert (second.version, second.replaces) == (2, 1)
    manifest = read_manifest(root / "digits" / "2")
    verify_checksums(root / "digits" / "2", manifest)
    assert set(manifest.members[0].files) == {"saved_model.pb", "variables/variables.index"}
    assert not list((root / "digits").glob(f"{STAGING_PREFIX}*"))


def test_publish_skips_numbers_taken_by_uncommitted_folders(tmp_path):
    root = tmp_path / "models"
    (root / "digits" / "1").mkdir(parents=True)  # a folder someone is still copying in
    only = MemberArtifact("m", "tuned", fake_member(tmp_path, "m").source, 1.0)
    m = publish_version(root, "digits", [only], SPEC, OUT, {})
    assert m.version == 2
    assert m.replaces is None


def test_failed_publish_leaves_nothing_visible(tmp_path):
    root = tmp_path / "models"
    good = fake_member(tmp_path, "tuned-0")
    missing = MemberArtifact(name="tuned-1", kind="tuned", source=tmp_path / "nope", weight=0.5)
    with pytest.raises(FileNotFoundError):
        publish_version(root, "digits", [good, missing], SPEC, OUT, {})
    assert scan_model(root, "digits") == []
    assert os.listdir(root / "digits") == []


def test_publish_refuses_bad_name_and_unwritable_repository(tmp_path):
    member = MemberArtifact("m", "tuned", fake_member(tmp_path, "m").source, 1.0)
    with pytest.raises(PublishError, match="not valid"):
        publish_version(tmp_path / "models", "Bad Name", [member], SPEC, OUT, {})
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PublishError, match="cannot create repository folder"):
        publish_version(blocker / "models", "digits", [member], SPEC, OUT, {})


def test_stale_staging_folders_are_removed_fresh_ones_kept(tmp_path):
    old, new = tmp_path / f"{STAGING_PREFIX}old", tmp_path / f"{STAGING_PREFIX}new"
    old.mkdir()
    new.mkdir()
    long_ago = time.time() - 3 * 24 * 3600
    os.utime(old, (long_ago, long_ago))
    assert remove_stale_staging(tmp_path) == [old]
    assert new.exists() and not old.exists()


def test_replaces_names_the_version_published_just_before_the_rename(tmp_path, monkeypatch):
    """Another trainer publishes while this one copies its members: `replaces` is read at the
    rename, so it names that version, not the one live when this publish began."""
    import training.publish as publish

    root = tmp_path / "models"
    members = [MemberArtifact("m", "tuned", fake_member(tmp_path, "m").source, 1.0)]
    publish_version(root, "digits", members, SPEC, OUT, {})  # 1
    real = publish.file_digests
    meanwhile = []

    def digests_while_another_publishes(folder):
        if not meanwhile:
            monkeypatch.setattr(publish, "file_digests", real)
            meanwhile.append(publish_version(root, "digits", members, SPEC, OUT, {}))  # 2
        return real(folder)

    monkeypatch.setattr(publish, "file_digests", digests_while_another_publishes)
    last = publish_version(root, "digits", members, SPEC, OUT, {})
    assert meanwhile[0].version == 2 and (last.version, last.replaces) == (3, 2)


def test_a_publish_whose_rename_succeeded_reports_success(tmp_path, monkeypatch):
    """Syncing the folder after the rename fails: the version is published, and publish says so."""
    import training.publish as publish

    calls = []

    def sync_folder(folder):
        calls.append(folder)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(publish, "sync_folder", sync_folder)
    monkeypatch.setattr(publish, "_fsync_tree", lambda folder: None)
    only = MemberArtifact("m", "tuned", fake_member(tmp_path, "m").source, 1.0)
    m = publish_version(tmp_path / "models", "digits", [only], SPEC, OUT, {})
    assert calls and m.version == 1
    assert read_manifest(tmp_path / "models" / "digits" / "1") == m
