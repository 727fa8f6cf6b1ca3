"""Atomic publishing: manifests, numbering, and nothing visible when a publish fails (no TF)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from contract.integrity import verify_checksums
from contract.layout import scan_model
from contract.manifest import InputSpec, OutputSpec, read_manifest
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


# A publisher in a process of its own that stops once its member is staged, until told to go on.
PAUSED_PUBLISHER = """
import sys
from pathlib import Path

import training.publish as publish
from contract.manifest import InputSpec, OutputSpec

real = publish.file_digests


def staged(folder):
    print("staged", flush=True)
    sys.stdin.readline()
    return real(folder)


publish.file_digests = staged
member = publish.MemberArtifact("m", "tuned", Path(sys.argv[2]), 1.0)
manifest = publish.publish_version(Path(sys.argv[1]), "digits", [member], InputSpec(shape=(4,)),
                                   OutputSpec(classes=("a", "b")), {})
print("published", manifest.version, flush=True)
"""


@contextmanager
def paused_publisher(root: Path, source: Path):
    """(process, its staging folder) of a publisher stopped mid-publish; killed at the end if alive."""
    child = subprocess.Popen([sys.executable, "-c", PAUSED_PUBLISHER, str(root), str(source)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        ready, _, _ = select.select([child.stdout], [], [], 60)
        assert ready and child.stdout.readline() == "staged\n", "the publisher did not reach its staging step"
        staging = [p for p in (root / "digits").glob(f"{STAGING_PREFIX}*") if p.is_dir()]
        assert len(staging) == 1
        yield child, staging[0]
    finally:
        child.kill()
        child.wait(10)


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_killed_publishers_staging_folder_is_removed_by_the_next_publish(tmp_path):
    root, member = tmp_path / "models", fake_member(tmp_path, "m")
    with paused_publisher(root, member.source) as (child, staging):
        child.kill()
        child.wait(10)
    age(staging, 2 * 3600)  # two hours: past the grace (an hour), where a dead publisher's folder used to stay a day
    publish_version(root, "digits", [MemberArtifact("m", "tuned", member.source, 1.0)], SPEC, OUT, {})
    assert sorted(os.listdir(root / "digits")) == ["1"]  # the folder and its lock file are gone


def test_a_live_publishers_staging_folder_is_kept_however_old(tmp_path):
    root, member = tmp_path / "models", fake_member(tmp_path, "m")
    only = [MemberArtifact("m", "tuned", member.source, 1.0)]
    with paused_publisher(root, member.source) as (child, staging):
        age(staging, 3 * 24 * 3600)  # older than any grace: only its lock says it is alive
        assert publish_version(root, "digits", only, SPEC, OUT, {}).version == 1
        assert remove_stale_staging(root / "digits", older_than=0) == []
        assert staging.is_dir()
        out, _ = child.communicate("go on\n", timeout=60)
    assert child.returncode == 0 and out == "published 2\n"
    verify_checksums(root / "digits" / "2", read_manifest(root / "digits" / "2"))
    assert sorted(os.listdir(root / "digits")) == ["1", "2"]


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
