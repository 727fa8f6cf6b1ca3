"""The repository on object storage against a real S3 server (SeaweedFS on loopback, started
here): conditional writes, publishing by claim and manifest-last, racing publishers, a killed
upload, a reader's mirror checking every file, and the one-line errors of wrong credentials, a
missing bucket and a store that is down."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from contract.integrity import file_digests
from contract.layout import MANIFEST_FILE, scan_model
from contract.manifest import InputSpec, Manifest, MemberEntry, OutputSpec, read_manifest
from contract.remote import CLAIM_FILE, Mirror, remove_stale_claims, upload_version, versions_of
from contract.store import AlreadyExists, Conflict, NotFound, RemoteStore, StoreError, is_remote
from tests.s3server import S3Server

pytest.importorskip("obstore")
WRONG_SECRET = "not-the-secret-of-this-store"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture()
def store(s3, monkeypatch, request):
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return RemoteStore(s3.url(f"t-{request.node.name[:40]}-{time.time_ns()}"))


def staged_version(folder: Path, members: int = 2) -> tuple[Path, tuple[MemberEntry, ...]]:
    """A version's files as a publisher stages them (members and a report), and their entries."""
    entries = []
    for i in range(members):
        member = folder / "members" / f"m{i}"
        (member / "variables").mkdir(parents=True)
        (member / "saved_model.pb").write_bytes(os.urandom(2000))
        (member / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(5000))
        entries.append(MemberEntry(name=f"m{i}", path=f"members/m{i}", kind="imported", weight=1 / members,
                                   files=file_digests(member)))
    (folder / "report.json").write_text("{}")
    return folder, tuple(entries)


def manifest_for(name: str, entries):
    def make(version: int, replaces: int | None) -> Manifest:
        return Manifest(name=name, version=version, created="2026-12-08T00:00:00Z",
                        input=InputSpec(shape=[4], dtype="float32"), output=OutputSpec(classes=["a", "b"]),
                        members=entries, metrics={}, replaces=replaces)
    return make


def test_locations_name_a_store_or_a_folder():
    assert is_remote("s3://bucket/models") and is_remote("gs://b/p") and is_remote("az://c/p")
    assert not is_remote("models") and not is_remote("/srv/models") and not is_remote(Path("s3:/x"))
    with pytest.raises(StoreError, match="not an object-store location"):
        RemoteStore("s3://")


def test_conditional_writes_are_honoured_and_found_honoured(store):
    assert store.missing_guarantees() == []
    etag = store.create("state/pins.json", b"{}")
    with pytest.raises(AlreadyExists):
        store.create("state/pins.json", b"{\"x\": 1}")
    new = store.replace("state/pins.json", b"{\"x\": 2}", etag)
    with pytest.raises(Conflict):
        store.replace("state/pins.json", b"{\"x\": 3}", etag)  # stale: another admin wrote since
    assert store.read("state/pins.json") == (b"{\"x\": 2}", new)
    with pytest.raises(NotFound):
        store.read("state/nothing.json")
    assert [e.key for e in store.list()] == ["state/pins.json"]  # the probe object was removed


def test_a_store_that_ignores_conditional_writes_is_named_for_what_it_lacks(store):
    """A store's writes seen through a client that drops the conditions (as `rclone serve s3`
    does): the probe names both guarantees."""
    class Unconditional(RemoteStore):
        def _put(self, what, key, data, **mode):
            return super()._put(what, key, data)

    careless = Unconditional(store.url)
    missing = careless.missing_guarantees()
    assert len(missing) == 2 and "create-only" in missing[0] and "compare-and-swap" in missing[1]


def test_a_version_is_committed_by_its_manifest_written_last(store, tmp_path):
    staged, entries = staged_version(tmp_path / "stage")
    first = upload_version(store, "digits", staged, manifest_for("digits", entries))
    second = upload_version(store, "digits", staged, manifest_for("digits", entries))
    assert (first.version, first.replaces, second.version, second.replaces) == (1, None, 2, 1)
    versions = versions_of(store.list())["digits"]
    assert all(v.committed for v in versions.values())
    keys = {rel for rel, _ in versions[2].files()}
    assert keys == {MANIFEST_FILE, "report.json", *(f"{e.path}/{f}" for e in entries for f in e.files)}


def test_two_publishers_racing_never_share_a_number(store, tmp_path):
    staged, entries = staged_version(tmp_path / "stage", members=1)
    got, errors = [], []

    def publish():
        try:
            for _ in range(3):
                got.append(upload_version(store, "race", staged, manifest_for("race", entries)).version)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(got) == list(range(1, 13))


def test_the_mirror_brings_committed_versions_checked_and_nothing_else(store, tmp_path):
    staged, entries = staged_version(tmp_path / "stage")
    upload_version(store, "digits", staged, manifest_for("digits", entries))
    # A killed upload: a claim and one file, no manifest.
    store.create(f"digits/2/{CLAIM_FILE}", b"{}")
    store.write("digits/2/members/m0/saved_model.pb", b"half")
    # A version whose member file was changed after its manifest was written.
    upload_version(store, "digits", staged, manifest_for("digits", entries))
    store.write("digits/3/members/m1/saved_model.pb", b"tampered")
    cache = tmp_path / "cache"
    mirror = Mirror(store, cache)
    result = mirror.sync()
    assert result.downloaded == ["digits/1"]
    assert list(result.refused) == ["digits/3"] and "m1" in result.refused["digits/3"]
    assert [(v.version, v.committed) for v in scan_model(cache, "digits")] == [(1, True)]
    assert read_manifest(cache / "digits" / "1").members == entries
    assert (cache / "digits" / "1" / "report.json").read_text() == "{}"
    # Nothing changed: nothing downloaded again, the refused version not retried.
    again = mirror.sync()
    assert (again.downloaded, again.refused, again.removed) == ([], {}, [])
    # A version deleted from the store leaves the cache.
    for entry in store.list("digits/1/"):
        store.delete(entry.key)
    assert mirror.sync().removed == ["digits/1"]
    assert scan_model(cache, "digits") == []


def test_a_killed_upload_is_removed_by_a_later_publish_once_stale(store, tmp_path):
    store.create(f"digits/1/{CLAIM_FILE}", b"{}")
    store.write("digits/1/members/m0/saved_model.pb", b"half")
    staged, entries = staged_version(tmp_path / "stage", members=1)
    published = upload_version(store, "digits", staged, manifest_for("digits", entries))
    assert published.version == 2  # the unfinished 1 is young: left alone, its number skipped
    lines = []
    removed = remove_stale_claims(store, versions_of(store.list())["digits"].values(), lines.append, older_than=0)
    assert removed == [1] and "digits/1" in lines[0]
    assert sorted({e.key.split("/")[1] for e in store.list()}) == ["2"]


def test_wrong_credentials_a_missing_bucket_and_a_store_that_is_down_say_so_in_one_line(s3, monkeypatch):
    for key, value in s3.env(secret=WRONG_SECRET).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StoreError) as denied:
        RemoteStore(s3.url()).list()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.env()["AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(StoreError) as missing:
        RemoteStore("s3://no-such-bucket/repo").list()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StoreError) as down:
        RemoteStore(s3.url()).list()
    assert time.monotonic() - started < 30
    for error, meaning in ((denied, "access denied (403)"), (missing, "does not exist (404)"),
                           (down, "did not answer")):
        text = str(error.value)
        assert meaning in text and "\n" not in text, text
        assert s3.env()["AWS_SECRET_ACCESS_KEY"] not in text and WRONG_SECRET not in text
    assert json.dumps(str(down.value))  # printable as one log field


@pytest.mark.slow
def test_a_table_trained_onto_the_store_then_again_against_its_champion(store, tmp_path, capsys):
    """`ensemble-train --repository s3://...`: the first run publishes version 1 on the store; the
    second reads version 1 back through its mirror, gates against it, and says which it compared."""
    from tests.test_train_tables import FAST, patients
    from training.cli import EXIT_OK, EXIT_REFUSED, main

    patients(tmp_path)
    common = ["--data", str(tmp_path / "patients.csv"), "--repository", store.url, "--name", "sick",
              "--label-column", "sick", "--ignore-columns", "id,risk,old,late", "--cross-fit", "never",
              "--work-dir", str(tmp_path / "work")]
    assert main([*common, *FAST]) == EXIT_OK
    first = capsys.readouterr().out
    assert f"in {store.url}/sick/1 " in first
    gated = [a for a in FAST if a != "--no-gate"]
    code = main([*common, *gated])
    second = capsys.readouterr().out
    assert code in (EXIT_OK, EXIT_REFUSED), second
    assert "[gate]" in second and "version 1" in second, second
    versions = versions_of(store.list())["sick"]
    assert versions[1].committed and (2 in versions) == (code == EXIT_OK)
    if code == EXIT_OK:
        manifest = json.loads(store.read("sick/2/manifest.json")[0])
        assert manifest["replaces"] == 1 and manifest["inputs"][0]["name"] == "age"


def test_a_store_ignoring_conditional_writes_is_refused_before_training(store, tmp_path, capsys, monkeypatch):
    from training.cli import EXIT_FAILED, main

    monkeypatch.setattr(RemoteStore, "missing_guarantees", lambda self: ["create-only writes (If-None-Match: *)"])
    code = main(["--data", "digits", "--repository", store.url, "--name", "digits"])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED
    assert "cannot be published to: it ignores create-only writes" in err and "\n" not in err.strip()
    assert store.list() == []


def test_pins_on_the_store_are_shared_by_compare_and_swap(store):
    """Two replicas' pin stores on one store: each sees the other's pins at its next read, and
    writers racing lose nothing (a lost compare-and-swap reads again)."""
    from service.lifecycle.pins import STORE_PINS_KEY, PinsDamaged, PinStore

    mine, theirs = PinStore(remote=store), PinStore(remote=store)
    assert mine.refresh() == {} and mine.state.state == "valid"
    mine.set("digits", 3)
    assert theirs.refresh() == {"digits": 3}
    threads = [threading.Thread(target=PinStore(remote=store).set, args=(f"m{i}", i + 1)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert theirs.refresh() == {"digits": 3, **{f"m{i}": i + 1 for i in range(6)}}
    theirs.set("digits", None)
    assert "digits" not in mine.refresh()
    store.write(STORE_PINS_KEY, b"not json")
    assert mine.refresh() == {f"m{i}": i + 1 for i in range(6)} and mine.state.state == "damaged"
    with pytest.raises(PinsDamaged):
        mine.set("digits", 1)
    assert store.read(STORE_PINS_KEY)[0] == b"not json"


def test_ensemble_admin_pins_on_the_store(store, tmp_path, capsys, monkeypatch):
    from service import admin_cli
    from service.lifecycle.pins import STORE_PINS_KEY

    staged, entries = staged_version(tmp_path / "stage", members=1)
    for _ in range(3):
        upload_version(store, "digits", staged, manifest_for("digits", entries))
    monkeypatch.chdir(tmp_path)
    assert admin_cli.main(["--repository", store.url, "rollback", "digits"]) == admin_cli.EXIT_OK
    assert json.loads(store.read(STORE_PINS_KEY)[0]) == {"digits": 2}
    assert admin_cli.main(["--repository", store.url, "pin", "digits", "9"]) == admin_cli.EXIT_REFUSED
    assert "no committed version 9" in capsys.readouterr().err
    assert admin_cli.main(["--repository", store.url, "status"]) == admin_cli.EXIT_OK
    assert "digits: pinned to 2; committed versions [1, 2, 3]" in capsys.readouterr().out
    assert admin_cli.main(["--repository", store.url, "unpin", "digits"]) == admin_cli.EXIT_OK
    assert json.loads(store.read(STORE_PINS_KEY)[0]) == {}
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())  # nothing local named "s3:"


def test_a_folder_that_is_not_the_mirror_is_never_touched(store, tmp_path):
    """A real repository given as the cache (ENSEMBLE_STORE beside a folder repository, a wrong
    ENSEMBLE_CACHE_DIR): refused before anything in it is removed."""
    (tmp_path / "repo" / "digits" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "digits" / "1" / MANIFEST_FILE).write_text("{}")
    with pytest.raises(StoreError, match="not a mirror") as refused:
        Mirror(store, tmp_path / "repo").sync()
    assert refused.value.meaning == "the cache folder is not a mirror"
    assert (tmp_path / "repo" / "digits" / "1" / MANIFEST_FILE).is_file()
    Mirror(store, tmp_path / "cache").sync()
    other = RemoteStore(store.url + "-other")
    with pytest.raises(StoreError, match="mirrors"):
        Mirror(other, tmp_path / "cache").sync()


def test_one_bad_version_does_not_stop_the_others(store, tmp_path):
    staged, entries = staged_version(tmp_path / "stage")
    upload_version(store, "a", staged, manifest_for("a", entries))
    upload_version(store, "a", staged, manifest_for("a", entries))
    store.write("a/1/members/m0/saved_model.pb/x", b"a key under a file's key")
    result = Mirror(store, tmp_path / "cache").sync()
    assert result.downloaded == ["a/2"] and "cannot be a file" in result.refused["a/1"]


def test_a_member_file_named_like_the_manifest_is_published_and_checked(store, tmp_path):
    staged, _ = staged_version(tmp_path / "stage", members=1)
    (staged / "members" / "m0" / "assets").mkdir()
    (staged / "members" / "m0" / "assets" / MANIFEST_FILE).write_text('{"a member": "file"}')
    entries = (MemberEntry(name="m0", path="members/m0", kind="imported", weight=1.0,
                           files=file_digests(staged / "members" / "m0")),)
    upload_version(store, "nested", staged, manifest_for("nested", entries))
    assert Mirror(store, tmp_path / "cache").sync().downloaded == ["nested/1"]


def test_a_publisher_whose_claim_was_taken_over_commits_nothing(store, tmp_path, monkeypatch):
    import contract.remote as remote

    staged, entries = staged_version(tmp_path / "stage", members=1)
    real_write = store.write

    def write_then_lose_the_claim(key, data):  # another publisher removed it as stale and took 1
        etag = real_write(key, data)
        if key.endswith("saved_model.pb"):
            store.delete(f"digits/1/{CLAIM_FILE}")
            store.create(f"digits/1/{CLAIM_FILE}", b'{"another": "publisher"}')
        return etag

    monkeypatch.setattr(store, "write", write_then_lose_the_claim)
    with pytest.raises(StoreError, match="removed or taken over"):
        remote.upload_version(store, "digits", staged, manifest_for("digits", entries))
    assert not versions_of(store.list())["digits"][1].committed


def test_the_version_served_comes_first_and_the_others_follow(store, tmp_path):
    """A server's mirror: the pinned version first, then newest first, `per_sync` a sync."""
    staged, entries = staged_version(tmp_path / "stage", members=1)
    for _ in range(4):
        upload_version(store, "digits", staged, manifest_for("digits", entries))
    pinned = {"digits": 2}
    mirror = Mirror(store, tmp_path / "cache", per_sync=1, first=pinned.get)
    assert [mirror.sync().downloaded for _ in range(5)] == [["digits/2"], ["digits/4"], ["digits/3"], ["digits/1"], []]
