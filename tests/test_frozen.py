"""A version compiled into one frozen graph, in this process and in a child process: the same
answers as the members, and every refusal with its category."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time

import numpy as np
import pytest

from service.config import Settings
from service.engines.base import LoadError
from service.engines import child as child_module
from service.engines.child import CompileFailed, compile_in_child, stop_all
from service.engines.compile import compile_version
from service.engines.compiled import CompileCache, CompiledVersion, FrozenGraph
from service.engines.keras_members import load_members
from service.engines.loader import EngineLoader, plan_of
from service.engines.tensorflow import import_frozen
from contract.integrity import ChecksumError, verify_checksums
from contract.manifest import read_manifest
from tests.repo_tools import export_nan_member, publish_with_member


@pytest.fixture(scope="module")
def compiled(trained_repository):
    vdir = trained_repository / "digits" / "1"
    manifest = read_manifest(vdir)
    return manifest, vdir, compile_version(manifest, vdir)


def test_frozen_graph_answers_what_the_assembled_members_answer(compiled, digits_test_split, tmp_path):
    manifest, vdir, graph = compiled
    graph.write(tmp_path / "graph.bin")
    frozen = import_frozen(manifest, vdir, CompiledVersion.read(tmp_path / "graph.bin").frozen, (1, 8))
    assembled = load_members(manifest, vdir, (1,))
    x = digits_test_split.x[:100]
    for got, want in zip(frozen.predict(x), assembled.predict(x)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert frozen.version == 1 and frozen.engine.owner is None  # nothing of the SavedModels is kept
    # One graph, no variables and no nested functions left to restore.
    from tensorflow.core.framework.graph_pb2 import GraphDef

    graph_def = GraphDef.FromString(graph.frozen.graph_def)
    assert len(graph_def.library.function) == 0
    assert not {n.op for n in graph_def.node} & {"VarHandleOp", "ReadVariableOp", "StatefulPartitionedCall"}


def test_frozen_graph_file_must_be_one(tmp_path):
    (tmp_path / "graph.bin").write_bytes(b"\x08\x01 not a frozen graph")
    with pytest.raises(LoadError, match="not a frozen ensemble graph"):
        CompiledVersion.read(tmp_path / "graph.bin")


def test_import_checks_the_warm_up_outputs(compiled):
    manifest, vdir, graph = compiled
    frozen = graph.frozen
    swapped = FrozenGraph(frozen.graph_def, frozen.input, (frozen.outputs[1], frozen.outputs[0], frozen.outputs[2]))
    with pytest.raises(LoadError):  # outputs in the wrong order: shapes do not match
        import_frozen(manifest, vdir, swapped, (2,))


def test_child_process_compiles_the_same_graph(compiled, digits_test_split):
    manifest, vdir, graph = compiled
    started = time.monotonic()
    from_child = compile_in_child(vdir, timeout=300)
    took = time.monotonic() - started
    x = digits_test_split.x[:50]
    a = import_frozen(manifest, vdir, from_child.frozen, (1,)).predict(x)
    b = import_frozen(manifest, vdir, graph.frozen, (1,)).predict(x)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert from_child.lite is not None  # converted to TensorFlow Lite in the child too
    print(f"[figures] child compile of the 5-member test ensemble: {took:.1f} s")


def test_child_reports_the_category_of_a_refused_version(repository, tmp_path):
    version = publish_with_member(repository, export_nan_member(tmp_path / "nan"))
    with pytest.raises(CompileFailed, match="non-finite") as refused:
        compile_in_child(repository / "digits" / str(version), timeout=300)
    assert refused.value.category == "warmup"


def test_child_with_a_wrong_input_shape_is_a_signature_failure(repository):
    vdir = repository / "digits" / "1"
    raw = json.loads((vdir / "manifest.json").read_text())
    raw["input"]["shape"] = [64]
    (vdir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CompileFailed, match=r"manifest says \[64\]") as refused:
        compile_in_child(vdir, timeout=300)
    assert refused.value.category == "signature"


def test_child_past_its_timeout_is_killed_and_named(trained_repository):
    started = time.monotonic()
    with pytest.raises(CompileFailed, match="longer than 1 s"):
        compile_in_child(trained_repository / "digits" / "1", timeout=1)
    assert time.monotonic() - started < 5


def test_stop_all_kills_a_compiling_child(trained_repository):
    outcome: list = []

    def run():
        try:
            compile_in_child(trained_repository / "digits" / "1", timeout=300)
        except CompileFailed as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    started = time.monotonic() + 30
    while not child_module._running:  # until the child is started, where stop_all finds it
        assert time.monotonic() < started, "no compile child started in 30 s"
        time.sleep(0.01)
    stop_all()
    worker.join(10)
    assert not worker.is_alive()
    assert outcome and "killed by signal 9" in str(outcome[0])
    assert outcome[0].category == "load"


def test_cache_keys_on_the_manifest_and_survives_damage(compiled, repository, tmp_path):
    manifest, vdir, graph = compiled
    cache = CompileCache(tmp_path / "cache", keep=2)
    assert cache.get(manifest) is None
    cache.put(manifest, graph)
    assert cache.get(manifest) == graph
    copy = repository / "digits" / "1"  # same files, same manifest: same entry
    assert cache.get(read_manifest(copy)) == graph
    assert cache.get(manifest.model_copy(update={"version": 7})) is None  # another manifest is another version
    cache.path_of(manifest).write_bytes(b"damaged")
    assert cache.get(manifest) is None  # compiled again, not a crash
    for i in range(3):
        cache.put(manifest.model_copy(update={"version": 10 + i}), graph)
    assert len(list((tmp_path / "cache").glob("*.graph"))) == 2
    (tmp_path / "a-file").write_text("not a folder")
    unwritable = CompileCache(tmp_path / "a-file" / "cache")  # costs time, never a refused version
    unwritable.put(manifest, graph)
    assert unwritable.get(manifest) is None


def test_loader_compiles_a_version_once_with_a_cache(compiled, repository, tmp_path, monkeypatch):
    import service.engines.compile

    manifest, _, graph = compiled
    calls = []
    monkeypatch.setattr(service.engines.compile, "compile_version", lambda m, p, pace: calls.append(p) or graph)
    settings = Settings(isolated_loading=False, state_dir=tmp_path / "state", warmup_batch_sizes=(1,))
    vdir = repository / "digits" / "1"
    first = EngineLoader(settings, plan_of(settings, 2))(manifest, vdir, lambda: None)
    again = EngineLoader(settings, plan_of(settings, 2))(manifest, vdir, lambda: None)  # e.g. after a restart
    assert len(calls) == 1 and again.version == first.version == 1
    assert list((tmp_path / "state" / "compiled").glob("*.graph"))


@contextlib.contextmanager
def compiling_elsewhere(folder, manifest):
    """Another worker holding the version's compile lock (a thread with its own descriptor)."""
    held, release = threading.Event(), threading.Event()

    def holder():
        with CompileCache(folder)._compiling(manifest, 30):
            held.set()
            release.wait(10)

    stuck = threading.Thread(target=holder)
    stuck.start()
    assert held.wait(10)
    try:
        yield
    finally:
        release.set()
        stuck.join(10)


def test_concurrent_loaders_compile_a_version_once(compiled, tmp_path):
    """N workers that see a new version at once: the first compiles, the others wait and read."""
    manifest, _, graph = compiled
    calls, results = [], []

    def slow_compile():
        calls.append(threading.current_thread().name)
        time.sleep(0.5)
        return graph

    def load():  # each worker has its own cache object and file descriptor on the one folder
        results.append(CompileCache(tmp_path / "cache").get_or_compile(manifest, slow_compile, 30))

    workers = [threading.Thread(target=load, name=f"worker-{i}") for i in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
    assert len(calls) == 1 and results == [graph] * 3


def test_a_lock_held_too_long_or_unavailable_costs_time_not_the_version(compiled, tmp_path, caplog):
    manifest, _, graph = compiled
    started = time.monotonic()
    with compiling_elsewhere(tmp_path / "cache", manifest):
        assert CompileCache(tmp_path / "cache").get_or_compile(manifest, lambda: graph, 0.3) == graph
    assert time.monotonic() - started >= 0.3
    assert "still being compiled elsewhere" in caplog.text
    (tmp_path / "a-file").write_text("not a folder")
    assert CompileCache(tmp_path / "a-file" / "cache").get_or_compile(manifest, lambda: graph, 1) == graph


def test_evicted_entries_take_their_lock_files_along(compiled, tmp_path):
    manifest, _, graph = compiled
    cache = CompileCache(tmp_path / "cache", keep=2)
    for i in range(4):
        cache.get_or_compile(manifest.model_copy(update={"version": 10 + i}), lambda: graph, 1)
        time.sleep(0.01)  # distinct modification times: the oldest go first
    assert len(list((tmp_path / "cache").glob("*.graph"))) == 2
    assert len(list((tmp_path / "cache").glob("*.lock"))) <= 2


def test_a_stopping_server_gives_up_waiting_and_starts_no_compile(compiled, tmp_path):
    """SIGTERM while another worker compiles: the waiting loader leaves at once, not after it."""
    from service.engines.child import stops

    manifest, vdir, graph = compiled
    calls, stopping_at = [], time.monotonic() + 0.3
    started = time.monotonic()
    with compiling_elsewhere(tmp_path / "cache", manifest), pytest.raises(LoadError, match="the server is stopping"):
        CompileCache(tmp_path / "cache").get_or_compile(
            manifest, lambda: calls.append(1) or graph, 30, give_up=lambda: time.monotonic() > stopping_at)
    assert calls == [] and time.monotonic() - started < 5
    with pytest.raises(CompileFailed, match="the server is stopping"):
        compile_in_child(vdir, 60, since_stops=stops() - 1)  # a stop came after the load began


# -- what is compiled is what was verified ----------------------------------------------------

def swap_member(vdir, manifest, victim: int, donor: int) -> None:
    """Replace a member's folder by a copy of another member's: a different SavedModel that loads."""
    target = vdir / manifest.members[victim].path
    shutil.rmtree(target)
    shutil.copytree(vdir / manifest.members[donor].path, target)


@pytest.fixture()
def private_tmp(tmp_path, monkeypatch):
    """The temporary folder the loader copies versions into (and its compile child works in)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_member_swapped_after_verification_is_not_compiled_nor_cached(repository, tmp_path, private_tmp):
    """The manager checks a version, then the loader compiles it in a child: a member folder
    replaced in between, by another SavedModel that loads, is refused, and nothing is cached."""
    vdir = repository / "digits" / "1"
    manifest = read_manifest(vdir)
    verify_checksums(vdir, manifest)  # the manager's check, before it calls the loader
    swap_member(vdir, manifest, victim=-1, donor=0)
    abandoned = private_tmp / "ensemble-verified-0123456789ab"  # a copy left by a server that was killed
    (abandoned / "digits").mkdir(parents=True)
    abandoned.with_name(abandoned.name + ".lock").touch()
    os.utime(abandoned, (time.time() - 3600, time.time() - 3600))
    settings = Settings(isolated_loading=True, compile_cache_dir=tmp_path / "cache", warmup_batch_sizes=(1,))
    with pytest.raises(ChecksumError, match=f"member {manifest.members[-1].name}: "):
        EngineLoader(settings, plan_of(settings, 2))(manifest, vdir, lambda: None)
    assert not list((tmp_path / "cache").glob("*.graph"))
    assert list(private_tmp.iterdir()) == []  # no copy left behind, the abandoned one removed


def test_a_member_swapped_while_compiling_changes_neither_the_answers_nor_the_cache(
        compiled, repository, tmp_path, private_tmp, digits_test_split):
    """The files change while the version compiles (at the loader's first pause): the version
    answers with the members that were verified, and the cache holds their graph only."""
    manifest, intact, graph = compiled
    vdir = repository / "digits" / "1"
    x = digits_test_split.x[:50]
    verified = import_frozen(manifest, intact, graph.frozen, (1,)).predict(x)
    assert np.max(np.abs(verified[1][:, -1] - verified[1][:, 0])) > 1e-2  # the swap would show
    swapped = []

    def pace():
        if not swapped:
            swap_member(vdir, manifest, victim=-1, donor=0)
            swapped.append(True)

    settings = Settings(isolated_loading=False, compile_cache_dir=tmp_path / "cache", warmup_batch_sizes=(1,))
    loaded = EngineLoader(settings, plan_of(settings, 2))(manifest, vdir, pace)
    assert swapped
    cached = CompileCache(tmp_path / "cache").get(manifest)
    from_cache = import_frozen(manifest, intact, cached.frozen, (1,))
    for answers in (loaded.predict(x), from_cache.predict(x)):
        for got, want in zip(answers, verified):
            np.testing.assert_allclose(got, want, atol=1e-4)
    assert len(list((tmp_path / "cache").glob("*.graph"))) == 1
    assert list(private_tmp.iterdir()) == []
