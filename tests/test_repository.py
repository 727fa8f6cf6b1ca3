"""The repository contract: manifest schema, checksums, scanning and version choice (no TF)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from contract.integrity import ChecksumError, file_digests, verify_checksums
from contract.layout import choose_version, next_version, scan_model, scan_names
from contract.manifest import (
    InputSpec,
    Manifest,
    ManifestError,
    MemberEntry,
    OutputSpec,
    read_manifest,
    uniform_weights,
)

DIGEST = "a" * 64


def member(name="tuned-0", weight=0.5, **kw) -> dict:
    return dict(name=name, path=f"members/{name}", kind="tuned", weight=weight,
                files={"saved_model.pb": DIGEST}, **kw)


def manifest_dict(**kw) -> dict:
    base = dict(name="digits", version=1, created=datetime.now(timezone.utc).isoformat(),
                input={"shape": [8, 8, 1], "dtype": "float32"}, output={"classes": ["0", "1"]},
                members=[member("tuned-0"), member("tuned-1")])
    base.update(kw)
    return base


def write_version(root: Path, name: str, version: int, payload: bytes = b"weights") -> Manifest:
    """A committed version with one member holding one file."""
    vdir = root / name / str(version)
    (vdir / "members" / "m").mkdir(parents=True)
    (vdir / "members" / "m" / "saved_model.pb").write_bytes(payload)
    manifest = Manifest(name=name, version=version, created=datetime.now(timezone.utc),
                        input=InputSpec(shape=(2,)), output=OutputSpec(classes=("a", "b")),
                        members=(MemberEntry(name="m", path="members/m", kind="tuned", weight=1.0,
                                             files=file_digests(vdir / "members" / "m")),))
    (vdir / "manifest.json").write_text(manifest.model_dump_json())
    return manifest


def test_manifest_round_trips_through_json():
    m = Manifest.model_validate(manifest_dict())
    assert Manifest.model_validate_json(m.model_dump_json()) == m
    assert m.weights == (0.5, 0.5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(members=[member("tuned-0", 0.5), member("tuned-1", 0.4)]), "sum to 1"),
        (dict(members=[member("a", 0.5), member("a", 0.5)]), "unique"),
        (dict(members=[]), "at least 1"),
        (dict(name="Digits!"), "pattern"),
        (dict(version=0), "greater than or equal to 1"),
        (dict(input={"shape": [8, 0, 1]}), "positive"),
        (dict(output={"classes": ["0", "0"]}), "unique"),
        (dict(format_version=2), "format_version"),
        (dict(surprise=True), "Extra inputs"),
    ],
)
def test_manifest_rejects_invalid_content(change, message):
    with pytest.raises(ValueError, match=message):
        Manifest.model_validate(manifest_dict(**change))


@pytest.mark.parametrize("path", ["../escape", "members/../../x", "members", "elsewhere/m"])
def test_member_path_must_stay_inside_members(path):
    with pytest.raises(ValueError, match="member path"):
        MemberEntry(name="m", path=path, kind="tuned", weight=1.0, files={"a": DIGEST})


@pytest.mark.parametrize("files", [{"../x": DIGEST}, {"/abs": DIGEST}, {"a": "not-a-digest"}])
def test_member_files_must_be_relative_with_sha256(files):
    with pytest.raises(ValueError):
        MemberEntry(name="m", path="members/m", kind="tuned", weight=1.0, files=files)


def test_uniform_weights_sum_to_one():
    assert sum(uniform_weights(3)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        uniform_weights(0)


def test_read_manifest_missing_says_not_committed(tmp_path):
    (tmp_path / "digits" / "1").mkdir(parents=True)
    with pytest.raises(ManifestError, match="not committed"):
        read_manifest(tmp_path / "digits" / "1")


def test_read_manifest_rejects_garbage_with_field_names(tmp_path):
    vdir = tmp_path / "digits" / "1"
    vdir.mkdir(parents=True)
    (vdir / "manifest.json").write_text('{"name": "digits"}')
    with pytest.raises(ManifestError, match="version: Field required"):
        read_manifest(vdir)


def test_read_manifest_must_match_its_folder(tmp_path):
    write_version(tmp_path, "digits", 2)
    (tmp_path / "digits" / "2").rename(tmp_path / "digits" / "3")
    with pytest.raises(ManifestError, match="describes digits/2 but sits in digits/3"):
        read_manifest(tmp_path / "digits" / "3")


def test_verify_checksums_accepts_intact_version(tmp_path):
    m = write_version(tmp_path, "digits", 1)
    verify_checksums(tmp_path / "digits" / "1", m)


def test_verify_checksums_detects_truncated_file(tmp_path):
    m = write_version(tmp_path, "digits", 1, payload=b"0123456789")
    (tmp_path / "digits/1/members/m/saved_model.pb").write_bytes(b"01234")
    with pytest.raises(ChecksumError, match="checksum mismatch for members/m/saved_model.pb"):
        verify_checksums(tmp_path / "digits" / "1", m)


def test_verify_checksums_detects_missing_and_extra_files(tmp_path):
    m = write_version(tmp_path, "digits", 1)
    extra = tmp_path / "digits/1/members/m/extra.bin"
    extra.write_bytes(b"x")
    with pytest.raises(ChecksumError, match="extra.bin is not in the manifest"):
        verify_checksums(tmp_path / "digits" / "1", m)
    extra.unlink()
    (tmp_path / "digits/1/members/m/saved_model.pb").unlink()
    with pytest.raises(ChecksumError, match="missing file members/m/saved_model.pb"):
        verify_checksums(tmp_path / "digits" / "1", m)


def test_a_verified_copy_holds_the_verified_bytes_and_the_manifest(tmp_path):
    m = write_version(tmp_path, "digits", 1, payload=b"verified")
    copy = tmp_path / "private" / "digits" / "1"
    verify_checksums(tmp_path / "digits" / "1", m, copy_into=copy)
    assert file_digests(copy / "members" / "m") == m.members[0].files
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*")) == [
        "manifest.json", "members", "members/m", "members/m/saved_model.pb"]
    assert read_manifest(copy) == m
    with pytest.raises(FileExistsError):  # the copy's own faults are OSErrors, not the version's
        verify_checksums(tmp_path / "digits" / "1", m, copy_into=copy)


def test_a_file_turned_into_a_pipe_after_listing_is_refused_not_waited_on(tmp_path, monkeypatch):
    import os
    import threading

    from contract import integrity as repository

    m = write_version(tmp_path, "digits", 1)
    listed = repository._regular_files

    def then_swapped(folder, where):
        files = listed(folder, where)
        (folder / "saved_model.pb").unlink()
        os.mkfifo(folder / "saved_model.pb")  # no writer: reading it would wait for ever
        return files

    monkeypatch.setattr(repository, "_regular_files", then_swapped)
    raised = []

    def verify():
        try:
            verify_checksums(tmp_path / "digits" / "1", m)
        except ChecksumError as exc:
            raised.append(exc)

    checking = threading.Thread(target=verify, daemon=True)
    checking.start()
    checking.join(10)
    assert not checking.is_alive(), "the check waited on a pipe"
    assert "members/m/saved_model.pb cannot be read: not a regular file" in str(raised[0])


def test_scan_ignores_hidden_odd_and_uncommitted_folders(tmp_path):
    write_version(tmp_path, "digits", 1)
    write_version(tmp_path, "digits", 10)
    for odd in (".staging-abc", "007", "0", "latest"):
        (tmp_path / "digits" / odd).mkdir()
    (tmp_path / "digits" / "11").mkdir()  # no manifest yet
    (tmp_path / "Not_Valid").mkdir()
    (tmp_path / ".work").mkdir()
    found = scan_model(tmp_path, "digits")
    assert [(v.version, v.committed) for v in found] == [(1, True), (10, True), (11, False)]
    assert scan_names(tmp_path) == ["digits"]
    assert scan_model(tmp_path, "absent") == []
    assert scan_names(tmp_path / "nowhere") == []


@pytest.mark.parametrize(
    "committed, policy, rejected, expected",
    [
        ([1, 2, 3], "latest", [], 3),
        ([1, 2, 3], "latest", [3], 2),
        ([1, 2, 3], "latest", [1, 2, 3], None),
        ([], "latest", [], None),
        ([1, 2, 3], 2, [], 2),
        ([1, 2, 3], 5, [], None),
        ([1, 2, 3], 2, [2], None),
    ],
)
def test_choose_version(committed, policy, rejected, expected):
    assert choose_version(committed, policy, rejected) == expected


def test_next_version_counts_uncommitted_folders_too():
    assert next_version([]) == 1
    assert next_version([1, 4, 2]) == 5
