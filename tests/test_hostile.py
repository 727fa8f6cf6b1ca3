"""Hostile and careless clients: every input gets a 4xx that names the problem (never a 500),
limits agree with each other, and what a request may make the server hold is bounded before
the memory is spent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from service.batching import Batcher
from service.config import Settings
from service.protocols.arrays import parse_json_object, to_spec
from service.dataplane.limits import SMALL_BODY, Hold, InflightBytes, json_value_limit, json_values, largest_body
from service.protocols.oip import input_array, wanted_outputs
from service.protocols.predict import instances_to_array
from service.errors import InvalidInput, PayloadTooLarge
from contract.manifest import InputSpec
from tests.test_api import make_client

DIGITS = InputSpec(shape=(8, 8, 1))


@pytest.fixture(scope="module")
def client(trained_repository):
    c, metrics = make_client(trained_repository)
    with c:
        yield c


def v2(tensor: dict, **extra) -> dict:
    return {"inputs": [{"name": "instances", "shape": [1, 8, 8, 1], "datatype": "FP32",
                        "data": [0.0] * 64, **tensor}], **extra}


def refused(resp, status: int, words: str) -> None:
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"], resp.json()


# -- limits that agree -----------------------------------------------------------------------

def test_settings_that_contradict_each_other_are_refused_naming_both():
    with pytest.raises(ValidationError, match=r"max_rows_per_request \(4097\) is above max_queue_rows \(4096\)"):
        Settings(max_rows_per_request=4097)
    with pytest.raises(ValidationError, match=r"max_body_bytes \(.*\) is above max_inflight_bytes"):
        Settings(max_body_bytes=2048, max_inflight_bytes=1024)
    Settings(max_rows_per_request=10, max_queue_rows=10)  # equal is fine


def test_the_defaults_let_the_largest_request_allowed_be_queued():
    s = Settings()
    assert s.max_rows_per_request <= s.max_queue_rows


def test_a_request_larger_than_the_queue_is_413_not_a_429_to_retry_forever():
    import asyncio

    async def go():
        b = Batcher(max_batch_size=4, max_queue_rows=8)
        b.start()
        try:
            with pytest.raises(PayloadTooLarge, match="more than the queue ever holds"):
                await b.submit(object(), np.zeros((9, 1)))
        finally:
            await b.stop()

    asyncio.run(go())


# -- no 500 from any input ----------------------------------------------------------------------

@pytest.mark.parametrize("header, words", [
    ("\u0661\u0662", "must be a byte count"),  # Arabic-Indic digits: str.isdigit() says yes, int() accepts them too
    ("\u00b2", "must be a byte count"),  # superscript two: isdigit() yes, int() no
    ("9" * 5000, "but the body has only"),  # past int()'s 4,300-digit limit
])
def test_odd_inference_header_lengths_are_400(client, header, words):
    resp = client.post("/v2/models/digits/infer", content=orjson.dumps(v2({})),
                       headers={"Inference-Header-Content-Length": header.encode()})
    refused(resp, 400, words)


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/models/digits/versions/{v}:predict"),
    ("POST", "/v2/models/digits/versions/{v}/infer"),
    ("GET", "/v2/models/digits/versions/{v}"),
    ("GET", "/v2/models/digits/versions/{v}/ready"),
])
def test_a_5000_digit_version_in_a_url_is_a_4xx(client, method, path):
    resp = client.request(method, path.format(v="7" * 5000), json={"instances": [[[[0]] * 8] * 8]})
    assert 400 <= resp.status_code < 500, resp.text
    assert "error" in resp.json() or "detail" in resp.json()


@pytest.mark.parametrize("body, words", [
    (v2({}, parameters=[1]), "parameters must be a JSON object"),
    (v2({"parameters": [1, 2]}), "inputs[0].parameters must be a JSON object"),
    (v2({}, outputs=[{"name": "probabilities", "parameters": "yes"}]), "outputs[0].parameters must be"),
    (v2({}, outputs=[{"name": ["probabilities"]}]), "'outputs' must be a list of"),
    (v2({"shape": [True, 8, 8, 1]}), "shape must be a list of non-negative integers"),
    (v2({"shape": [1, 8, 8, True]}), "shape must be a list of non-negative integers"),
    (v2({"parameters": {"binary_data_size": True}}), "binary_data_size"),
    (v2({"datatype": ["FP32"]}), "datatype"),  # found by tests/test_fuzz.py: a 500 before
])
def test_v2_bodies_of_the_wrong_types_are_422(client, body, words):
    refused(client.post("/v2/models/digits/infer", content=orjson.dumps(body)), 422, words)


@pytest.mark.parametrize("dtype, values", [
    ("int32", [2 ** 40]),
    ("int32", [-(2 ** 31) - 1]),
    ("uint8", [-1, 3]),
    ("uint8", [300]),
    ("int64", [2.0 ** 63]),
    ("uint8", [256.0]),
])
def test_integers_outside_the_input_dtype_are_422_not_wrapped(dtype, values):
    with pytest.raises(InvalidInput, match="outside the range of input dtype"):
        to_spec(np.asarray(values), InputSpec(shape=(1,), dtype=dtype), "x")


def test_integers_at_the_edges_of_the_dtype_are_kept():
    assert to_spec(np.asarray([0, 255]), InputSpec(shape=(1,), dtype="uint8"), "x").tolist() == [0, 255]
    out = to_spec(np.asarray([-(2 ** 31), 2 ** 31 - 1]), InputSpec(shape=(1,), dtype="int32"), "x")
    assert out.tolist() == [-(2 ** 31), 2 ** 31 - 1]


def test_integer_inputs_out_of_range_are_422_in_every_wire_format():
    spec = InputSpec(shape=(2,), dtype="uint8")
    with pytest.raises(InvalidInput, match="outside the range"):
        instances_to_array([[1, 300]], spec, max_rows=4)
    json_tensor = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "INT32", "data": [1, -1]}]}
    with pytest.raises(InvalidInput, match="outside the range"):
        input_array(json_tensor, b"", spec, max_rows=4)
    raw = np.array([[1, 70000]], dtype="<i4")
    binary = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "INT32",
                          "parameters": {"binary_data_size": raw.nbytes}}]}
    with pytest.raises(InvalidInput, match="outside the range"):
        input_array(binary, raw.tobytes(), spec, max_rows=4)


def test_wanted_outputs_ignores_non_boolean_binary_flags():
    names, binary = wanted_outputs({"outputs": [{"name": "members", "parameters": {"binary_data": "no"}}]})
    assert names == ["members"] and binary == set()


# -- bounded memory ---------------------------------------------------------------------------

def test_json_values_bounds_what_a_parse_creates():
    for body in (b'{"a": [1, 2, [3, []], {"b": "x,y"}]}', b"[[], [], []]", b"[" + b"1," * 999 + b"1]"):
        parsed = orjson.loads(body)

        def count(v) -> int:
            if isinstance(v, list):
                return 1 + sum(count(x) for x in v)
            if isinstance(v, dict):
                return 1 + sum(1 + count(x) for x in v.values())
            return 1

        assert json_values(body) >= count(parsed)


def test_a_body_of_more_values_than_a_valid_request_is_413_before_it_is_parsed(monkeypatch):
    import service.protocols.arrays as arrays

    parsed = []
    monkeypatch.setattr(arrays.orjson, "loads", lambda b: parsed.append(b) or {})
    limit = json_value_limit(DIGITS, max_rows=4, cap=10 ** 6)
    body = b'{"instances": [' + b",".join([b"[]"] * limit) + b"]}"
    with pytest.raises(PayloadTooLarge, match="more JSON values than the largest valid request"):
        parse_json_object(body, limit)
    assert parsed == []


def test_limits_derive_from_the_model():
    assert largest_body(DIGITS, 4096) == 4096 * 64 * 64 + 64 * 1024
    # a row of (8, 8, 1): 64 numbers, 64 innermost lists, 8 rows of them, the row itself
    assert json_value_limit(DIGITS, 10, cap=10 ** 9) == 10 * (64 + 64 + 8 + 1) + 1024
    assert json_value_limit(DIGITS, 4096, cap=1000) == 1000


def test_bytes_in_flight_keep_a_pool_for_small_bodies():
    pool = InflightBytes(budget=1_000_000, small_pool=SMALL_BODY * 2)
    large, refused_hold, small = Hold("a"), Hold("b"), Hold("c")
    assert pool.grow(large, 900_000)
    assert not pool.grow(refused_hold, 200_000)  # past the budget: refused, nothing held
    assert pool.held == 900_000 and refused_hold.large == 0
    assert "limit of 1000000" in pool.refusal(refused_hold, 200_000)
    assert pool.grow(small, 300)  # small requests go on while large ones fill the budget
    pool.release_hold(large)
    assert pool.grow(refused_hold, 200_000)
    # a body that arrives in chunks moves from the small pool to the budget as it grows
    chunked = Hold("d")
    assert pool.grow(chunked, 1000) and pool.grow(chunked, SMALL_BODY + 1)
    assert (chunked.small, chunked.large) == (0, SMALL_BODY + 1)
    assert not pool.grow(chunked, 2_000_000) and chunked.large == SMALL_BODY + 1  # refused: unchanged
    for hold in (small, refused_hold, chunked):
        pool.release_hold(hold)
    assert pool.held == 0 and pool.small == 0 and pool.large == 0
    assert pool.held_by("a") == pool.held_by("d") == 0


def test_one_peer_cannot_hold_more_than_its_share_of_the_bytes_in_flight():
    pool = InflightBytes(budget=1_000_000, per_peer=300_000)
    first, second, other = Hold("10.0.0.1"), Hold("10.0.0.1"), Hold("10.0.0.2")
    assert pool.grow(first, 200_000)
    assert not pool.grow(second, 200_000)  # the peer's 300 000 would be passed
    assert "per client" in pool.refusal(second, 200_000)
    assert pool.grow(second, 100_000)  # up to its share
    assert pool.grow(other, 300_000)  # another peer has its own
    assert pool.held_by("10.0.0.1") == 300_000 and pool.held_by("10.0.0.2") == 300_000
    pool.release_hold(first)
    assert pool.grow(second, 250_000) and pool.held_by("10.0.0.1") == 250_000
    pool.release_hold(second)
    pool.release_hold(other)
    assert pool.held == 0 and pool.held_by("10.0.0.1") == 0


def test_a_body_over_the_models_largest_request_is_413_on_both_paths(client):
    limit = largest_body(DIGITS, Settings().max_rows_per_request)
    too_big = b'{"instances": [' + b" " * limit + b"]}"
    refused(client.post("/predict", content=too_big), 413, f"exceeds the limit of {limit} bytes")

    def chunks():  # no Content-Length: refused as it passes the limit
        yield b'{"instances": ['
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    refused(client.post("/predict", content=chunks()), 413, f"exceeds the limit of {limit} bytes")
    assert client.post("/predict", json={"instances": [[[[0]] * 8] * 8]}).status_code == 200


# -- secrets ----------------------------------------------------------------------------------

def test_the_compile_child_gets_no_secret_of_the_servers_environment(monkeypatch, tmp_path):
    """The child runs the repository's graphs: the admin token and any other variable not on
    its list stay in the server."""
    import subprocess

    from service.engines import child

    monkeypatch.setenv("ENSEMBLE_ADMIN_TOKEN", "a-token-of-sixteen-chars")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    seen = {}

    def popen(argv, **kw):
        seen.update(kw["env"])
        raise OSError("not started in this test")

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(OSError, match="not started"):
        child.compile_in_child(tmp_path, timeout=5)
    assert "ENSEMBLE_ADMIN_TOKEN" not in seen and "AWS_SECRET_ACCESS_KEY" not in seen
    assert not any(k.startswith("ENSEMBLE_") for k in seen)
    assert seen["TF_CPP_MIN_LOG_LEVEL"] == "3" and seen["LC_ALL"] == "C.UTF-8" and seen["PATH"]
    assert seen["PYTHONPATH"].split(":")[0] == str(child.Path(child.__file__).resolve().parents[2])


# -- a repository that can hold anything ------------------------------------------------------

def odd_repository(root, outside):
    """Next to digits/1: every kind of entry a careless copy or a hostile writer could leave."""
    digits = root / "digits"
    for name in ("\u00b2", "\u0663", "007", "0", "-1"):  # superscript two, Arabic-Indic three
        (digits / name).mkdir()
    (digits / "5").write_text("a file where a folder belongs")
    (outside / "6").mkdir()
    (digits / "6").symlink_to(outside / "6")  # leaves the repository
    (digits / "7").symlink_to(root / "nowhere")  # dangling
    (root / "Not A Name").mkdir()
    (root / "file.txt").write_text("x")
    (root / "elsewhere").symlink_to(outside)


def test_odd_entries_are_skipped_with_a_reason_and_polling_goes_on(repository, tmp_path):
    from contract.layout import scan_model_entries, scan_names_entries

    outside = tmp_path / "outside"
    outside.mkdir()
    odd_repository(repository, outside)
    names, skipped_names = scan_names_entries(repository)
    assert names == ["digits"]
    assert {s.entry for s in skipped_names} == {"Not A Name", "file.txt", "elsewhere"}
    versions, skipped = scan_model_entries(repository, "digits")
    assert [v.version for v in versions] == [1]
    reasons = {s.entry: s.reason for s in skipped}
    assert set(reasons) == {"\u00b2", "\u0663", "007", "0", "-1", "5", "6", "7"}
    assert reasons["6"] == "a symbolic link leading out of the repository"
    assert reasons["5"] == "not a folder" and "not a version number" in reasons["\u00b2"]


def test_an_unreadable_entry_is_reported_not_raised(repository, monkeypatch):
    import os

    from contract import layout as repo

    real = os.scandir

    def scandir(path):
        if str(path).endswith("digits"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(repo.os, "scandir", scandir)
    versions, skipped = repo.scan_model_entries(repository, "digits")
    assert versions == [] and skipped[0].reason == "cannot be read: Permission denied"


def test_a_service_on_an_odd_repository_serves_and_reports_what_it_skipped(repository, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    odd_repository(repository, outside)
    c, _ = make_client(repository)
    with c:
        assert c.post("/predict", json={"instances": [[[[0]] * 8] * 8]}).status_code == 200
        body = c.get("/models").json()
        assert {s["entry"] for s in body["skipped"]} == {"Not A Name", "file.txt", "elsewhere"}
        digits = next(m for m in body["models"] if m["name"] == "digits")
        assert digits["live"] == 1 and len(digits["skipped"]) == 8


@pytest.mark.parametrize("kind", ["symlinked file", "symlinked folder", "fifo"])
def test_a_version_holding_anything_but_its_own_regular_files_is_refused(repository, tmp_path, kind):
    import os

    from contract.integrity import ChecksumError, verify_checksums
    from contract.manifest import read_manifest

    version = repository / "digits" / "1"
    manifest = read_manifest(version)
    member = version / manifest.members[0].path
    victim = next(p for p in sorted(member.rglob("*")) if p.is_file())
    if kind == "symlinked file":
        (tmp_path / "copy").write_bytes(victim.read_bytes())
        victim.unlink()
        victim.symlink_to(tmp_path / "copy")  # same bytes, same checksum: refused all the same
    elif kind == "symlinked folder":
        (member / "extra").symlink_to(tmp_path)
    else:
        os.mkfifo(member / "pipe")  # reading it would block for ever
    with pytest.raises(ChecksumError, match="symbolic link|not a regular file"):
        verify_checksums(version, manifest)


# -- a compile cache that is checked ----------------------------------------------------------

def cache_and_versions(tmp_path):
    from datetime import datetime, timezone

    from service.engines.compiled import CompileCache, CompiledVersion, FrozenGraph
    from contract.manifest import InputSpec, Manifest, MemberEntry, OutputSpec

    member = MemberEntry(name="m", path="members/m", kind="tuned", weight=1.0, files={"f": "0" * 64})
    versions = [Manifest(name="digits", version=i, created=datetime.now(timezone.utc), input=InputSpec(shape=(4,)),
                         output=OutputSpec(classes=("a", "b")), members=(member,)) for i in (1, 2)]
    graphs = [CompiledVersion(FrozenGraph(f"graph {i}".encode(), "in:0", ("a:0", "b:0")), f"lite {i}".encode())
              for i in (1, 2)]
    return CompileCache(tmp_path / "cache"), versions, graphs


def test_a_cache_entry_the_server_did_not_write_is_not_used(tmp_path):
    cache, (v1, v2), (g1, g2) = cache_and_versions(tmp_path)
    cache.put(v1, g1)
    cache.put(v2, g2)
    assert cache.get(v1) == g1 and cache.get(v2) == g2
    # planted: the right name (computable from the manifest) and the right format, no digest
    cache.path_of(v1).write_bytes(g2.to_bytes())
    assert cache.get(v1) is None
    # moved: a real entry of another version, digest and all
    cache.path_of(v1).write_bytes(cache.path_of(v2).read_bytes())
    assert cache.get(v1) is None
    assert cache.get(v2) == g2


def test_the_cache_folder_is_private_and_not_used_when_others_may_write_it(tmp_path):
    import os
    import stat

    cache, (v1, _), (g1, _) = cache_and_versions(tmp_path)
    cache.put(v1, g1)
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "cache" / ".key").st_mode) == 0o600
    os.chmod(tmp_path / "cache", 0o777)
    from service.engines.compiled import CompileCache

    shared = CompileCache(tmp_path / "cache")
    assert shared.get(v1) is None  # world-writable: not trusted, the version is compiled again
    assert shared.get_or_compile(v1, lambda: g1, 1) == g1


def test_cache_writes_do_not_follow_planted_links(tmp_path):
    cache, (v1, _), (g1, _) = cache_and_versions(tmp_path)
    cache.put(v1, g1)
    target = tmp_path / "victim"
    target.write_text("must stay")
    entry = cache.path_of(v1)
    entry.unlink()
    entry.symlink_to(target)
    assert cache.get(v1) is None  # not read through the link
    cache.put(v1, g1)  # replaces the link, never writes through it
    assert target.read_text() == "must stay" and not entry.is_symlink() and cache.get(v1) == g1


def test_eviction_tolerates_entries_evicted_meanwhile(tmp_path, monkeypatch):
    from pathlib import Path

    cache, (v1, v2), (g1, g2) = cache_and_versions(tmp_path)
    cache.keep = 1
    cache.put(v1, g1)
    real_stat = Path.stat

    def stat(self, *a, **kw):  # another worker evicts this entry between the listing and the stat
        if self.suffix == ".graph" and self == cache.path_of(v1):
            self.unlink(missing_ok=True)
        return real_stat(self, *a, **kw)

    monkeypatch.setattr(Path, "stat", stat)
    cache.put(v2, g2)  # no FileNotFoundError
    monkeypatch.undo()
    assert cache.get(v2) == g2


def test_the_images_settings_keep_the_documented_bound_within_the_containers_memory(monkeypatch):
    """The shipped image's limits (Dockerfile ENV), for any model (every limit at its cap), with
    400 MiB for the idle server: within the memory limit the Deployment gives the api."""
    import re

    from service.dataplane.limits import memory_bound
    from tests.deploy_checks import image_limits

    root = Path(__file__).resolve().parent.parent
    env = image_limits()
    assert {"ENSEMBLE_MAX_BODY_BYTES", "ENSEMBLE_MAX_GRPC_CALLS", "ENSEMBLE_MAX_CONNECTIONS"} <= set(env)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert "ENSEMBLE_GRPC_PORT=8001" in (root / "Dockerfile").read_text()  # the image serves gRPC
    shipped = Settings(grpc_port=8001)
    worst = memory_bound(shipped, shipped.max_body_bytes, shipped.max_body_bytes, shipped.max_json_values)
    limit = re.search(r"limits:\s*\n(?:\s+\w+: \S+\n)*?\s+memory: (\d+)Mi",
                      (root / "deploy/kubernetes/deployment.yaml").read_text())
    assert limit, "no memory limit in the Deployment"
    assert worst + 400 * 2**20 <= int(limit.group(1)) * 2**20, worst / 2**20
    # the package's own defaults do not fit: which is why the image sets its own
    monkeypatch.undo()
    assert memory_bound(Settings(grpc_port=8001), 64 << 20, 64 << 20, 1 << 22) > 1536 * 2**20
