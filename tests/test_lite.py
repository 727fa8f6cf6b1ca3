"""The TensorFlow Lite engine: conversion at compile time, faithfulness, threads, fallbacks."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import numpy as np
import pytest

import service.engines.compile
from service.config import Settings
from service.engines.base import LoadError
from service.engines.compile import compile_version, convert_checked
from service.engines.compiled import CompileCache, CompiledVersion
from service.engines.keras_members import load_members
from service.engines.lite import LiteEngine, load_lite
from service.engines.loader import EngineLoader, plan_of
from service.engines.tensorflow import import_frozen
from contract.manifest import read_manifest


@pytest.fixture(scope="module")
def compiled(trained_repository):
    vdir = trained_repository / "digits" / "1"
    manifest = read_manifest(vdir)
    return manifest, vdir, compile_version(manifest, vdir)


@pytest.fixture(scope="module")
def reference(compiled):
    """The frozen TensorFlow graph of the same version: what TensorFlow Lite must agree with."""
    manifest, vdir, graph = compiled
    return import_frozen(manifest, vdir, graph.frozen, (1,))


def test_compiled_version_runs_on_tensorflow_lite_with_the_same_answers(compiled, reference, digits_test_split):
    manifest, vdir, graph = compiled
    assert graph.lite and graph.lite[4:8] == b"TFL3"  # a TensorFlow Lite flatbuffer
    lite = load_lite(manifest, vdir, graph.lite, (1, 8))
    assert (lite.engine.kind, reference.engine.kind) == ("tflite", "tensorflow") and not hasattr(lite.engine, "fn")
    x = digits_test_split.x[:100]
    for got, want in zip(lite.predict(x), reference.predict(x)):
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_runner_serves_any_batch_size_from_several_threads(compiled, reference, digits_test_split):
    runner = LiteEngine(compiled[2].lite)
    sizes = (1, 3, 17, 64)
    x = digits_test_split.x[:64]
    want = {n: reference.predict(x[:n]) for n in sizes}
    failures, calls = [], []

    def client(offset: int):
        for i in range(24):
            n = sizes[(i + offset) % len(sizes)]  # every thread changes size on every call
            average, members, scores = runner.run(x[:n])
            calls.append(n)
            if not (np.allclose(average, want[n][0], atol=1e-5) and np.allclose(members, want[n][1], atol=1e-5)
                    and np.allclose(scores[:, :3], want[n][2][:, :3], atol=1e-5)):
                failures.append((offset, i, n))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 96 and not failures
    assert 1 <= runner._idle.qsize() <= 4  # one interpreter per call running at once, kept


def test_file_keeps_the_lite_model_and_refuses_a_truncated_one(compiled, tmp_path):
    graph = compiled[2]
    for version in (graph, replace(graph, lite=None)):
        version.write(tmp_path / "graph.bin")
        assert CompiledVersion.read(tmp_path / "graph.bin") == version
    graph.write(tmp_path / "graph.bin")
    (tmp_path / "graph.bin").write_bytes((tmp_path / "graph.bin").read_bytes()[:200])
    with pytest.raises(LoadError, match="truncated"):
        CompiledVersion.read(tmp_path / "graph.bin")


def loaded_by_the_server(graph, tmp_path, manifest, vdir, **settings):
    """What the server's loader makes of a compiled version (from its cache, as after a restart)."""
    CompileCache(tmp_path / "cache").put(manifest, graph)
    settings = Settings(compile_cache_dir=tmp_path / "cache", warmup_batch_sizes=(1,), **settings)
    return EngineLoader(settings, plan_of(settings, 2))(manifest, vdir, lambda: None)


def test_the_loader_runs_the_engine_asked_for_and_falls_back_to_tensorflow(compiled, tmp_path, caplog):
    manifest, vdir, graph = compiled
    assert loaded_by_the_server(graph, tmp_path, manifest, vdir).engine.kind == "tflite"
    assert loaded_by_the_server(graph, tmp_path, manifest, vdir, engine="tensorflow").engine.kind == "tensorflow"
    without = loaded_by_the_server(replace(graph, lite=None), tmp_path, manifest, vdir)
    assert without.engine.kind == "tensorflow"  # a version that did not convert
    with caplog.at_level(logging.WARNING, logger="service.engines.loader"):
        broken = loaded_by_the_server(replace(graph, lite=b"\x00" * 64), tmp_path, manifest, vdir)
    assert broken.engine.kind == "tensorflow"
    assert "runs on TensorFlow" in caplog.text
    with pytest.raises(LoadError):
        load_lite(manifest, vdir, b"\x00" * 64, (1,))


def test_a_model_that_does_not_convert_or_disagrees_is_not_kept(compiled, reference, monkeypatch, caplog):
    manifest, vdir, graph = compiled
    original = load_members(manifest, vdir, (1,))
    assert convert_checked(original, reference) is not None

    def refuse(fn):
        raise LoadError("cannot convert the ensemble to TensorFlow Lite: op Foo is not supported")

    monkeypatch.setattr(service.engines.compile, "to_lite", refuse)
    with caplog.at_level(logging.WARNING, logger="service.engines.compile"):
        assert convert_checked(original, reference) is None
    assert "op Foo is not supported" in caplog.text
    monkeypatch.undo()

    call = LiteEngine.run

    def classes_reversed(self, x):  # still probabilities, but not the members' answer
        average, members, scores = call(self, x)
        return average[:, ::-1].copy(), members, scores

    monkeypatch.setattr(LiteEngine, "run", classes_reversed)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="service.engines.compile"):
        assert convert_checked(original, reference) is None
    assert "differ from the members" in caplog.text


def test_outputs_are_told_apart_by_shape_and_by_name_when_shapes_tie():
    from service.engines.lite import order_outputs

    def out(name, *shape):
        return {"name": name, "shape": [1, *shape]}

    avg, members, scores = out("Identity", 10), out("Identity_1", 5, 10), out("Identity_2", 4)
    assert order_outputs([scores, members, avg]) == [avg, members, scores]  # by shape, any order
    swapped = [out("Identity", 4), out("Identity_1", 5, 10), out("Identity_2", 10)]
    assert order_outputs(swapped) == [swapped[2], swapped[1], swapped[0]]
    four = [out("Identity_2", 4), out("Identity", 4), out("Identity_1", 3, 4)]  # 4 classes: names decide
    assert order_outputs(four) == [four[1], four[2], four[0]]
    assert order_outputs([avg, members]) is None
    assert order_outputs([avg, out("Identity_1", 10), scores]) is None
    assert order_outputs([out("Identity", 7), members, scores]) is None  # 7 is neither 10 nor 4
