"""Members changed after publishing into something that still loads: another member's folder, or
another valid SavedModel of the same signature. Nothing but the checksums can tell, so every
member is tried, by `verify_checksums` and through the server's own loading."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from contract.integrity import ChecksumError, verify_checksums
from contract.layout import MANIFEST_FILE, next_version, scan_model
from contract.manifest import MemberEntry, read_manifest
from tests.repo_tools import manifest_as
from tests.test_api import wait_for

MEMBERS = 5  # tests/conftest.py's TINY_MEMBERS: tuned, seed, two snapshots, swa


@pytest.fixture(scope="module")
def foreign_member(tmp_path_factory) -> Path:
    """A valid SavedModel with the members' signature (rows of 8x8x1 in, 10 probabilities out) that
    is none of them: random weights, no training."""
    import keras

    from training.members import export_member

    keras.utils.set_random_seed(7)
    inputs = keras.Input(shape=(8, 8, 1))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(inputs))
    folder = tmp_path_factory.mktemp("foreign") / "member"
    export_member(keras.Model(inputs, outputs), folder)
    return folder


def replace_member(version_dir: Path, member: MemberEntry, replacement: Path) -> None:
    """Put `replacement` (a SavedModel folder) where `member` was."""
    shutil.rmtree(version_dir / member.path)
    shutil.copytree(replacement, version_dir / member.path)


def publish_with_one_member_replaced(root: Path, index: int, replacement: Path) -> int:
    """Publish version 1 again, atomically, with member `index` replaced by `replacement` after
    the manifest (version 1's, renumbered) was written; the new version's number."""
    model_dir = root / "digits"
    version = next_version(v.version for v in scan_model(root, "digits"))
    staging = model_dir / f".staging-test-{version}"
    shutil.copytree(model_dir / "1", staging, ignore=shutil.ignore_patterns(MANIFEST_FILE))
    (staging / MANIFEST_FILE).write_text(manifest_as(model_dir / "1", version))
    replace_member(staging, read_manifest(model_dir / "1").members[index], replacement)
    os.rename(staging, model_dir / str(version))
    return version


def swap_members(version_dir: Path, a: int, b: int) -> tuple[str, str]:
    """Exchange the folders of members a and b; their names."""
    members = read_manifest(version_dir).members
    first, second = version_dir / members[a].path, version_dir / members[b].path
    os.rename(first, version_dir / "members" / ".swapping")
    os.rename(second, first)
    os.rename(version_dir / "members" / ".swapping", second)
    return members[a].name, members[b].name


@pytest.mark.parametrize("index", range(MEMBERS))
def test_a_member_replaced_by_another_valid_savedmodel_fails_its_checksum(repository, foreign_member, index):
    version_dir = repository / "digits" / "1"
    manifest = read_manifest(version_dir)
    assert len(manifest.members) == MEMBERS
    name = manifest.members[index].name
    replace_member(version_dir, manifest.members[index], foreign_member)
    # the same files by name (a SavedModel's layout): only their bytes differ
    assert {p.relative_to(foreign_member).as_posix() for p in foreign_member.rglob("*") if p.is_file()} \
        == set(manifest.members[index].files)
    with pytest.raises(ChecksumError, match=f"member {name}: checksum mismatch"):
        verify_checksums(version_dir, manifest)


@pytest.mark.parametrize("index", range(MEMBERS))
def test_a_member_swapped_with_the_next_fails_its_checksum(repository, index):
    version_dir = repository / "digits" / "1"
    names = swap_members(version_dir, index, (index + 1) % MEMBERS)
    with pytest.raises(ChecksumError, match="checksum mismatch") as refused:
        verify_checksums(version_dir, read_manifest(version_dir))
    assert str(refused.value).split(":")[0] in {f"member {n}" for n in names}


def test_the_server_refuses_a_version_with_any_member_replaced(client, repository, foreign_member):
    """Versions 2 to 6 published one after another, each version 1 with one member (0 to 4)
    replaced by another valid SavedModel after its manifest was written: each refused for its
    checksum, version 1 served throughout."""
    for index in range(MEMBERS):
        version = publish_with_one_member_replaced(repository, index, foreign_member)

        def refused():
            entry = client.get("/models").json()["models"][0]
            states = {v["version"]: v for v in entry["versions"]}
            return entry["live"] == 1 and states.get(version, {}).get("state") == "failed" and states[version]

        assert wait_for(refused), client.get("/models").json()
        assert refused()["category"] == "checksum", (index, refused())
    assert client.metrics.registry.get_sample_value(
        "ensemble_model_reload_failures_total", {"model": "digits", "reason": "checksum"}) == MEMBERS
