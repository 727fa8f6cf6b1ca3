"""The engines (service.engines: the interface and its checks, TensorFlow Lite, the frozen graph,
the members assembled with Keras, format 2's named engine, compiling, the compiled file and its
cache, the loader, the compile child) in process, on tiny Keras members (a few Dense units,
exported once per module): exact values, shapes, messages and categories, for what the mutation
run (mutation/run.py engines) would otherwise leave untested. The compile child's own side
(`child.main` and its helpers) is called here in this process, with the calls that would change
the process (its priority, its parent-death signal) replaced by recorders; `compile_in_child` runs
a small shell script in place of Python."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import signal
import stat
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from contract.integrity import ChecksumError, file_digests
from contract.manifest import (Abstention, HeadSpec, InputSpec, Manifest, ManifestV2, MemberEntry,
                               OutputSpec, TensorSpec, read_manifest)
from contract.scores import LOG_FLOOR, SCORES, served, temper, uncertainty
from service.answer import SCORE_COLUMNS
from service.config import Settings
from service.engines import child as child_module, compiled as compiled_module, lite as lite_module
from service.engines import loader as loader_module
from service.engines.base import (ROW_SUM_TOLERANCE, WARMUP_SEED, Ensemble, LoadError, WarmupError,
                                  check_probabilities, no_pause, warm_up, warmup_batch)
from service.engines.child import CompileFailed, child_environment, compile_in_child, stop_all, stops
from service.engines.compiled import CompileCache, CompiledVersion, FrozenGraph, tensorflow_version
from service.engines.lite import LiteEngine, NamedLiteEngine, load_lite, order_outputs, output_number
from service.engines.loader import (ABANDONED_COPY_SECONDS, COPY_PREFIX, EngineLoader, ThreadPlan, plan_of,
                                    thread_plan, verified_copy)
from service.errors import InferenceFailed

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
DIGEST = "0" * 64
X = np.random.default_rng(7).uniform(-1.0, 2.0, size=(6, 3)).astype(np.float32)  # rows of the tiny input


def counter() -> tuple[list, callable]:
    calls: list = []
    return calls, lambda: calls.append(1)


# -- tiny versions ---------------------------------------------------------------------------------

def tiny_member(seed: int, inputs: int = 3, classes: int = 3):
    keras.utils.set_random_seed(seed)
    x = keras.Input((inputs,))
    h = keras.layers.Dense(4, activation="relu")(x)
    return keras.Model(x, keras.layers.Dense(classes, activation="softmax")(keras.layers.Dense(4)(h)))


def write_v1(folder: Path, members: dict[str, Path], weights, *, temperature: float | None = None,
             abstention: tuple[str, float] | None = None, shape=(3,), dtype="float32", name="tiny") -> Manifest:
    """A format-1 version of the exported members (name -> SavedModel folder, copied in)."""
    import shutil

    entries = []
    for (member, source), weight in zip(members.items(), weights):
        target = folder / "members" / member
        if not target.exists():
            shutil.copytree(source, target)
        entries.append({"name": member, "path": f"members/{member}", "kind": "seed", "weight": weight,
                        "files": file_digests(target)})
    raw = {"format_version": 1, "name": name, "version": 1, "created": CREATED.isoformat(),
           "input": {"shape": list(shape), "dtype": dtype}, "output": {"classes": ["a", "b", "c"]},
           "members": entries}
    if temperature is not None:
        raw["calibration"] = {"temperature": temperature}
    if abstention is not None:
        raw["abstention"] = {"score": abstention[0], "threshold": abstention[1], "target_error": 0.1,
                             "coverage": 0.9}
    (folder / "manifest.json").write_text(json.dumps(raw))
    return read_manifest(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny/1: two members (weights 0.25, 0.75), calibrated (T = 1.7), abstaining on mutual
    information above its median on X; and the Keras members, to compare with."""
    from training.members import export_member

    root = tmp_path_factory.mktemp("tiny")
    models = [tiny_member(10), tiny_member(11)]
    exported = {}
    for i, model in enumerate(models):
        export_member(model, root / "exported" / f"m{i}")
        exported[f"m{i}"] = root / "exported" / f"m{i}"
    probs = np.stack([np.asarray(m(X)) for m in models], axis=1)
    mutual = uncertainty(served(probs, (0.25, 0.75), 1.7), probs, (0.25, 0.75))[:, 2]
    threshold = float(np.median(mutual))
    vdir = root / "tiny" / "1"
    manifest = write_v1(vdir, exported, (0.25, 0.75), temperature=1.7, abstention=("mutual_information", threshold))
    return SimpleNamespace(root=root, vdir=vdir, manifest=manifest, models=models, probs=probs,
                           exported=exported, threshold=threshold)


@pytest.fixture(scope="module")
def tiny_compiled(tiny):
    from service.engines.compile import compile_version

    return compile_version(tiny.manifest, tiny.vdir)


def expected_outputs(tiny, x=X, weights=(0.25, 0.75), temperature=1.7):
    probs = np.stack([np.asarray(m(x)) for m in tiny.models], axis=1)
    average = served(probs, weights, temperature)
    return average, probs, uncertainty(average, probs, weights)


def manifest_v1(members: int = 2, classes: int = 3, abstention: bool = False, shape=(3,)) -> Manifest:
    """A format-1 manifest with no files behind it (for fake engines)."""
    return Manifest(name="fake", version=4, created=CREATED, input=InputSpec(shape=shape),
                    output=OutputSpec(classes=tuple("abcdefgh"[:classes])),
                    members=tuple(MemberEntry(name=f"m{i}", path=f"members/m{i}", kind="seed", weight=1 / members,
                                              files={"saved_model.pb": DIGEST}) for i in range(members)),
                    abstention=Abstention(score="entropy", threshold=0.5, target_error=0.1, coverage=0.9)
                    if abstention else None)


class FakeEngine:
    """An engine answering `outputs(x)`; records the rows of each call."""

    kind = "fake"

    def __init__(self, outputs):
        self.outputs, self.calls = outputs, []

    def run(self, x):
        self.calls.append(len(x) if not isinstance(x, dict) else {k: v.shape for k, v in x.items()})
        return self.outputs(x)


def good_outputs(members=2, classes=3):
    def outputs(x):
        rows = len(x)
        probs = np.full((rows, members, classes), 1 / classes)
        return probs.mean(axis=1), probs, np.zeros((rows, len(SCORE_COLUMNS)))
    return outputs


# -- base: the checks every engine passes ---------------------------------------------------------

def test_error_categories():
    from service.engines.keras_members import SignatureError as KerasSignatureError
    from service.engines.named import SignatureError as NamedSignatureError

    assert (LoadError.category, WarmupError.category) == ("load", "warmup")
    assert KerasSignatureError.category == NamedSignatureError.category == "signature"
    assert issubclass(WarmupError, LoadError) and issubclass(KerasSignatureError, LoadError)
    assert issubclass(NamedSignatureError, LoadError)
    assert ROW_SUM_TOLERANCE == 1e-3 and WARMUP_SEED == 20240601 and no_pause() is None


@pytest.mark.parametrize("probs, message", [
    (np.full((2, 3), 1 / 3), None),
    (np.full((3, 3), 1 / 3), "x returned shape [3, 3], expected [2, 3]"),
    (np.full((2, 2), 1 / 2), "x returned shape [2, 2], expected [2, 3]"),
    (np.array([[0.5, 0.5, np.nan], [1, 0, 0]]), "x returned non-finite values (NaN or infinity)"),
    (np.array([[0.5, 0.5, 0], [np.inf, 0, 0]]), "x returned non-finite values (NaN or infinity)"),
    (np.array([[1.001, -0.001, 0], [1, 0, 0]]), None),  # rounding, within the tolerance
    (np.array([[1.0011, -0.0011, 0], [1, 0, 0]]), "x returned values outside [0, 1]: not probabilities"),
    (np.array([[1, 0, 0], [1.0011, 0, -0.0011]]), "x returned values outside [0, 1]: not probabilities"),
    (np.array([[0.6, 0.4, 0.0009], [1, 0, 0]]), None),
    (np.array([[0.6, 0.4, 0.0011], [1, 0, 0]]), "x returned rows that do not sum to 1 (row 0 sums to 1.0011)"),
    (np.array([[0.6, 0.4, -0.0005], [0.6, 0.3, 0.0985]]),
     "x returned rows that do not sum to 1 (row 1 sums to 0.9985)"),
])
def test_check_probabilities_exactly(probs, message):
    rows, classes = 2, 3
    if message is None:
        check_probabilities(probs, rows, classes, "x")
        return
    with pytest.raises(WarmupError) as caught:
        check_probabilities(probs, rows, classes, "x")
    assert str(caught.value) == message


def test_check_probabilities_names_the_worst_row():
    probs = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0005], [0.5, 0.5, 0.002], [0.5, 0.4985, 0.0]])
    with pytest.raises(WarmupError, match=r"\(row 2 sums to 1.0020\)"):
        check_probabilities(probs, 4, 3, "x")


def test_warmup_batch_is_the_seeded_uniform_batch_of_the_spec():
    got = warmup_batch(InputSpec(shape=(2, 3), dtype="float64"), 4)
    want = np.random.default_rng(20240601).uniform(0.0, 1.0, size=(4, 2, 3))
    assert got.dtype == np.float64 and got.shape == (4, 2, 3)
    np.testing.assert_array_equal(got, want)
    small = warmup_batch(InputSpec(shape=(3,), dtype="float32"), 2)
    assert small.dtype == np.float32 and small.shape == (2, 3)
    np.testing.assert_array_equal(small, np.random.default_rng(20240601).uniform(0.0, 1.0, size=(2, 3)).astype(np.float32))
    assert 0.0 <= small.min() and small.max() < 1.0


def test_ensemble_predict_checks_rows_and_names_its_parts():
    manifest = manifest_v1(abstention=True)
    engine = FakeEngine(good_outputs())
    ensemble = Ensemble(manifest, Path("/v"), engine)
    assert ensemble.member_names == ("m0", "m1")
    assert ensemble.signature == manifest.signature()
    assert (ensemble.name, ensemble.version, ensemble.classes) == ("fake", 4, ("a", "b", "c"))
    outputs = ensemble.predict(np.zeros((3, 3), np.float32))
    assert [o.shape for o in outputs] == [(3, 3), (3, 2, 3), (3, 4)]
    answer = ensemble.answer(outputs)
    assert (answer.name, answer.version, answer.member_names, answer.format_version) == ("fake", 4, ("m0", "m1"), 1)
    assert answer.head.abstained is not None and answer.head.labels == ("a", "b", "c")
    short = Ensemble(manifest, Path("/v"), FakeEngine(lambda x: tuple(o[:2] for o in good_outputs()(x))))
    with pytest.raises(InferenceFailed) as caught:
        short.predict(np.zeros((3, 3), np.float32))
    assert str(caught.value) == "fake version 4 returned 2 rows for 3 inputs"
    # only one output short is enough
    last = Ensemble(manifest, Path("/v"), FakeEngine(lambda x: (*good_outputs()(x)[:2], np.zeros((4, 4)))))
    with pytest.raises(InferenceFailed, match="returned 4 rows for 3 inputs"):
        last.predict(np.zeros((3, 3), np.float32))


def test_warm_up_runs_each_size_once_in_order_and_paces():
    engine = FakeEngine(good_outputs())
    ensemble = Ensemble(manifest_v1(), Path("/v"), engine)
    calls, pace = counter()
    assert warm_up(ensemble, (8, 1, 8, 3), pace) is ensemble
    assert engine.calls == [1, 3, 8] and len(calls) == 3
    assert warm_up(ensemble, ()) is ensemble


def test_warm_up_logs_what_it_warmed(caplog):
    ensemble = Ensemble(manifest_v1(), Path("/v"), FakeEngine(good_outputs()))
    with caplog.at_level(logging.DEBUG, logger="service.engines.base"):
        warm_up(ensemble, (4, 2))
    assert "fake version 4: 2 members, warmed on [2, 4] rows" in [r.getMessage() for r in caplog.records]


def broken(which: str):
    def outputs(x):
        average, members, scores = good_outputs()(x)
        if which == "raise":
            raise RuntimeError("boom")
        if which == "members-shape":
            members = members[:, :1]
        if which == "member-1":
            members = members.copy()
            members[:, 1, 0] = 2.0
        if which == "member-0":
            members = members.copy()
            members[:, 0, 0] = np.nan
        if which == "average":
            average = average * 2
        if which == "scores-shape":
            scores = scores[:, :3]
        if which == "scores-nan":
            scores = scores.copy()
            scores[-1, 0] = np.inf
        return average, members, scores
    return outputs


@pytest.mark.parametrize("which, message", [
    ("raise", "warm-up on 1 rows failed: boom"),
    ("members-shape", "members returned shape [1, 1, 3], expected [1, 2, 3] (one row of 3 class probabilities per input)"),
    ("member-1", "member m1 returned values outside [0, 1]: not probabilities"),
    ("member-0", "member m0 returned non-finite values (NaN or infinity)"),
    ("average", "the ensemble returned rows that do not sum to 1 (row 0 sums to 2.0000)"),
    ("scores-shape", "the uncertainty scores have shape [1, 3] or are not finite; expected [1, 4] finite values"),
    ("scores-nan", "the uncertainty scores have shape [1, 4] or are not finite; expected [1, 4] finite values"),
])
def test_warm_up_refuses_what_is_not_a_version_s_outputs(which, message):
    ensemble = Ensemble(manifest_v1(), Path("/v"), FakeEngine(broken(which)))
    with pytest.raises(WarmupError) as caught:
        warm_up(ensemble, (1,))
    assert str(caught.value) == message
    assert caught.value.__suppress_context__ == (which == "raise")


# -- keras_members: the reference --------------------------------------------------------------------

def test_load_members_answers_the_tempered_weighted_mean_with_its_scores(tiny):
    from service.engines.keras_members import load_members

    calls, pace = counter()
    ensemble = load_members(tiny.manifest, tiny.vdir, (3, 1), pace)
    assert len(calls) == 2 + 1 + 2  # each member, the traced function, each warm-up size
    model = ensemble.engine.owner
    assert ensemble.engine.kind == "tensorflow" and model.name == "tiny_v1"
    assert {layer.name for layer in model.layers} >= {"member_m0", "member_m1", "weight_0", "weight_1",
                                                       "weighted_average", "temperature", "members", "uncertainty"}
    assert "average" not in {layer.name for layer in model.layers}
    average, members, scores = ensemble.predict(X)
    want_average, want_members, want_scores = expected_outputs(tiny)
    np.testing.assert_allclose(members, want_members, atol=1e-6)
    np.testing.assert_allclose(average, want_average, atol=1e-5)
    np.testing.assert_allclose(scores[:, :3], want_scores, atol=1e-5)
    flags = (want_scores[:, 2] > tiny.threshold).astype(np.float32)
    assert 0 < flags.sum() < len(flags)
    assert scores[:, 3].tolist() == flags.tolist()
    assert (average.dtype, members.dtype, scores.dtype) == (np.float32,) * 3


def test_equal_weights_are_a_plain_mean_and_one_member_is_itself(tiny, tmp_path):
    from service.engines.keras_members import load_members

    plain = write_v1(tmp_path / "plain" / "1", tiny.exported, (0.5, 0.5), name="plain")
    ensemble = load_members(plain, tmp_path / "plain" / "1", (1,))
    names = {layer.name for layer in ensemble.engine.owner.layers}
    assert "average" in names and "temperature" not in names and "weighted_average" not in names
    average, members, scores = ensemble.predict(X)
    probs = np.stack([np.asarray(m(X)) for m in tiny.models], axis=1)
    np.testing.assert_allclose(average, probs.mean(axis=1), atol=1e-6)
    assert not scores[:, 3].any()  # no abstention rule: never flagged
    one = write_v1(tmp_path / "one" / "1", {"m-1": tiny.exported["m1"]}, (1.0,), name="one")
    single = load_members(one, tmp_path / "one" / "1", (2,))
    assert "member_m_1" in {layer.name for layer in single.engine.owner.layers}
    average, members, scores = single.predict(X)
    np.testing.assert_allclose(average, probs[:, 1], atol=1e-6)
    assert members.shape == (6, 1, 3)
    np.testing.assert_allclose(scores[:, 2], 0.0, atol=1e-6)  # one member agrees with itself


def test_temperature_is_the_contract_s_in_log_space():
    from service.engines.keras_members import Temperature

    probs = np.array([[0.7, 0.3, 0.0], [0.2, 0.5, 0.3], [1.0, 0.0, 0.0]], np.float32)
    layer = Temperature(2.5)
    got = np.asarray(layer(probs))
    np.testing.assert_allclose(got, temper(probs.astype(np.float64), 2.5), atol=1e-6)
    assert np.all(np.isfinite(got)) and got[0, 2] > 0  # a zero probability stays finite (LOG_FLOOR)
    np.testing.assert_allclose(got[2], temper(np.array([[1.0, LOG_FLOOR, LOG_FLOOR]]), 2.5)[0], atol=1e-6)
    assert layer.get_config()["temperature"] == 2.5 and layer.temperature == 2.5
    assert np.asarray(Temperature(0.5)(probs))[1].argmax() == 1


def test_uncertainty_layer_is_the_contract_s_scores_and_flag():
    from service.engines.keras_members import Uncertainty

    members = np.array([[[0.7, 0.3, 0.0], [0.1, 0.6, 0.3]], [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4]],
                        [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]], np.float32)
    weights = (0.25, 0.75)
    average = (members * np.array(weights, np.float32)[None, :, None]).sum(axis=1)
    want = uncertainty(average, members, weights)
    for index, score in enumerate(SCORES):
        layer = Uncertainty(weights, score, 0.0)
        got = np.asarray(layer([average, members]))
        assert got.shape == (3, 4)
        np.testing.assert_allclose(got[:, :3], want, atol=1e-6)
        at = float(got[0, index])  # a row exactly at the threshold is not flagged
        flagged = np.asarray(Uncertainty(weights, score, at)([average, members]))[:, 3]
        assert flagged.tolist() == (got[:, index] > np.float32(at)).astype(np.float32).tolist()
        assert flagged[0] == 0.0
    assert np.asarray(Uncertainty(weights, "entropy", -1.0)([average, members]))[:, 3].tolist() == [1.0, 1.0, 1.0]
    assert np.asarray(Uncertainty(weights)([average, members]))[:, 3].tolist() == [0.0, 0.0, 0.0]
    assert np.asarray(Uncertainty(weights, None, -1.0)([average, members]))[:, 3].tolist() == [0.0, 0.0, 0.0]
    # the mutual information is never negative, rounding or not
    same = np.repeat(members[:, :1], 2, axis=1)
    assert np.asarray(Uncertainty(weights)([same[:, 0], same]))[:, 2].min() >= 0.0
    config = Uncertainty(weights, "entropy", 0.25).get_config()
    assert (config["weights"], config["abstain_score"], config["threshold"]) == ([0.25, 0.75], "entropy", 0.25)


def test_check_signature_names_member_and_what_differs():
    from service.engines.keras_members import SignatureError, check_signature

    spec = InputSpec(shape=(3,), dtype="float32")
    check_signature("m", [tf.TensorSpec([None, 3], tf.float32)], spec)
    check_signature("m", [tf.TensorSpec([None, None], tf.float32)], spec)
    for signature, message in [
        ([], "member m: serving endpoint takes 0 inputs, expected 1"),
        ([tf.TensorSpec([None, 3], tf.float32)] * 2, "member m: serving endpoint takes 2 inputs, expected 1"),
        ([tf.TensorSpec([None, 3], tf.float64)], "member m: takes dtype float64, manifest says float32"),
        ([tf.TensorSpec([None, 4], tf.float32)], "member m: takes shape [4], manifest says [3]"),
        ([tf.TensorSpec([None, 3, 1], tf.float32)], "member m: takes shape [3, 1], manifest says [3]"),
    ]:
        with pytest.raises(SignatureError) as caught:
            check_signature("m", signature, spec)
        assert str(caught.value) == message


def test_assemble_refuses_a_missing_member_or_another_signature(tiny, tmp_path):
    import shutil

    from service.engines.keras_members import SignatureError, assemble, load_members

    vdir = tmp_path / "tiny" / "1"
    shutil.copytree(tiny.vdir, vdir)
    shutil.rmtree(vdir / "members" / "m1")
    calls, pace = counter()
    with pytest.raises(LoadError) as caught:
        assemble(tiny.manifest, vdir, pace)
    assert str(caught.value).startswith("member m1: cannot load SavedModel: ")
    assert len(calls) == 1 and caught.value.__suppress_context__
    wide = tiny.manifest.model_copy(update={"input": InputSpec(shape=(4,))})
    with pytest.raises(SignatureError, match=r"^member m0: takes shape \[3\], manifest says \[4\]$"):
        load_members(wide, tiny.vdir, (1,))
    double = tiny.manifest.model_copy(update={"input": InputSpec(shape=(3,), dtype="float64")})
    with pytest.raises(SignatureError, match=r"^member m0: takes dtype float32, manifest says float64$"):
        assemble(double, tiny.vdir)


# -- tensorflow: the frozen graph -----------------------------------------------------------------------

def test_frozen_graph_answers_what_the_members_answer(tiny, tiny_compiled):
    from service.engines.tensorflow import import_frozen

    frozen = tiny_compiled.frozen
    assert frozen.input == "instances:0" and len(frozen.outputs) == 3
    calls, pace = counter()
    ensemble = import_frozen(tiny.manifest, tiny.vdir, frozen, (2, 5), pace)
    assert len(calls) == 1 + 2 and ensemble.engine.kind == "tensorflow" and ensemble.engine.owner is None
    assert ensemble.path == tiny.vdir and ensemble.manifest is tiny.manifest
    average, members, scores = ensemble.predict(X)
    want_average, want_members, want_scores = expected_outputs(tiny)
    np.testing.assert_allclose(average, want_average, atol=1e-5)
    np.testing.assert_allclose(members, want_members, atol=1e-5)
    np.testing.assert_allclose(scores[:, :3], want_scores, atol=1e-5)
    assert isinstance(average, np.ndarray) and average.dtype == np.float32


def test_import_frozen_refuses_a_graph_that_does_not_import(tiny, tiny_compiled):
    from dataclasses import replace

    from service.engines.tensorflow import import_frozen

    calls, pace = counter()
    with pytest.raises(LoadError) as caught:
        import_frozen(tiny.manifest, tiny.vdir, replace(tiny_compiled.frozen, input="nowhere:0"), (1,), pace)
    assert str(caught.value).startswith("cannot import the frozen ensemble graph: ValueError: ")
    assert calls == [] and caught.value.__suppress_context__


def test_input_signature_and_engine_without_the_flat_call():
    from service.engines.tensorflow import TensorFlowEngine, input_signature

    (spec,) = input_signature(InputSpec(shape=(2, 3), dtype="int32"))
    assert spec.shape.as_list() == [None, 2, 3] and spec.dtype == tf.int32 and spec.name == "instances"
    seen = []

    def plain(x):  # a plain function has no _call_flat: called as it is
        seen.append(x)
        return x * 2, x + 1, x - 1

    owner = object()
    engine = TensorFlowEngine(plain, owner=owner)
    assert engine.fn is plain and engine.owner is owner
    average, members, scores = engine.run(np.array([[1.0, 2.0]], np.float32))
    assert average.tolist() == [[2.0, 4.0]] and members.tolist() == [[2.0, 3.0]] and scores.tolist() == [[0.0, 1.0]]
    assert isinstance(average, np.ndarray) and isinstance(seen[0], tf.Tensor)


def test_freeze_refuses_what_it_cannot_fold_or_a_function_of_other_outputs():
    from service.engines.tensorflow import freeze

    with pytest.raises(LoadError) as caught:
        freeze(object())
    assert str(caught.value).startswith("cannot freeze the ensemble into one graph: AttributeError: ")
    assert caught.value.__suppress_context__
    two = tf.function(lambda x: (x * 2.0, x + 1.0),
                      input_signature=[tf.TensorSpec([None, 3], tf.float32)]).get_concrete_function()
    with pytest.raises(LoadError) as caught:
        freeze(two)
    assert str(caught.value) == "the frozen ensemble has 1 inputs and 2 outputs, expected 1 and 3"
    three = tf.function(lambda x: (x * 2.0, x + 1.0, x - 1.0),
                        input_signature=[tf.TensorSpec([None, 3], tf.float32, name="instances")]).get_concrete_function()
    graph = freeze(three)
    assert isinstance(graph.graph_def, bytes) and graph.input == "instances:0" and len(graph.outputs) == 3
    assert tf.compat.v1.GraphDef.FromString(graph.graph_def).node


# -- compile: freeze, convert, check ---------------------------------------------------------------------

def test_compile_version_keeps_a_frozen_graph_and_a_lite_model_that_agree(tiny, tiny_compiled):
    from service.engines.compile import compile_version

    assert tiny_compiled.lite[4:8] == b"TFL3"
    calls, pace = counter()
    again = compile_version(tiny.manifest, tiny.vdir, pace)
    assert len(calls) == (2 + 1 + 2) + 2  # load_members' (two warm-up sizes), then after freezing and checking
    assert again.frozen.input == tiny_compiled.frozen.input and again.lite is not None
    lite = load_lite(tiny.manifest, tiny.vdir, again.lite, (1,))
    np.testing.assert_allclose(lite.predict(X)[0], expected_outputs(tiny)[0], atol=1e-5)


def fake_ensemble(outputs, manifest=None):
    return Ensemble(manifest or manifest_v1(), Path("/v"), FakeEngine(outputs))


def test_check_faithful_compares_each_output_but_the_abstain_flag():
    from service.engines.compile import FAITHFUL_ATOL, FAITHFUL_ROWS, check_faithful

    assert (FAITHFUL_ATOL, FAITHFUL_ROWS) == (1e-5, 32)
    original = fake_ensemble(good_outputs())
    check_faithful(original, original)
    assert original.engine.calls == [32, 32]

    def shifted(part, by, column=0):
        def outputs(x):
            arrays = [a.copy() for a in good_outputs()(x)]
            arrays[part][..., column] += by
            return tuple(arrays)
        return outputs

    check_faithful(original, fake_ensemble(shifted(2, 1.0, column=3)))  # the flag may flip at its threshold
    check_faithful(original, fake_ensemble(shifted(2, 1e-5)))  # exactly the tolerance (from 0): agrees
    check_faithful(original, fake_ensemble(shifted(2, -1e-5, column=2)))
    for part, what, column in [(0, "average", 0), (1, "member", 0), (2, "uncertainty", 2), (2, "uncertainty", 0)]:
        with pytest.raises(LoadError) as caught:
            check_faithful(original, fake_ensemble(shifted(part, 0.25, column)))
        assert str(caught.value) == f"the fake ensemble's {what} outputs differ from the members' by 0.25"
    nan = fake_ensemble(shifted(0, np.nan))
    with pytest.raises(LoadError, match="average outputs differ from the members' by nan"):
        check_faithful(original, nan)


def test_conversion_failure_says_which_ops_are_missing():
    from service.engines.compile import conversion_failure

    assert conversion_failure(ValueError("first line\nsecond")) == "first line"
    assert conversion_failure(ValueError("  \n padded \n")) == "padded"
    assert conversion_failure(ValueError("x" * 400)) == "x" * 300
    assert conversion_failure(KeyError()) == "KeyError"
    assert conversion_failure(ValueError("")) == "ValueError"
    text = "error: failed\nTF Select ops: StringSplitV2, StringToHashBucketFast\nDetails: more"
    assert conversion_failure(ValueError(text)) == "TensorFlow Lite has no kernels for StringSplitV2, StringToHashBucketFast"
    long = "TF Select ops: " + "A" * 500
    assert conversion_failure(ValueError(long)) == "TensorFlow Lite has no kernels for " + "A" * 300
    assert conversion_failure(ValueError("x\n TF Select ops: indented")) == "x"


def test_to_lite_keeps_to_the_builtin_ops():
    from service.engines.compile import to_lite

    numbers = tf.function(lambda x: (tf.nn.softmax(x),), input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    model = to_lite(numbers.get_concrete_function())
    assert model[4:8] == b"TFL3"
    strings = tf.function(lambda s: (tf.strings.to_hash_bucket_fast(tf.strings.split(s).to_tensor(), 5),),
                          input_signature=[tf.TensorSpec([None], tf.string)])
    with pytest.raises(LoadError) as caught:
        to_lite(strings.get_concrete_function())
    assert str(caught.value).startswith("cannot convert the ensemble to TensorFlow Lite: TensorFlow Lite has no "
                                        "kernels for ")
    assert caught.value.__suppress_context__


def test_convert_checked_drops_a_model_that_fails_or_disagrees(tiny, tiny_compiled, monkeypatch, caplog):
    import service.engines.compile as compile_module
    from service.engines.compile import convert_checked
    from service.engines.tensorflow import import_frozen

    frozen = import_frozen(tiny.manifest, tiny.vdir, tiny_compiled.frozen, ())
    assert convert_checked(frozen, frozen)[4:8] == b"TFL3"
    original = fake_ensemble(lambda x: tuple(np.asarray(a) for a in frozen.predict(x)), tiny.manifest)
    original.path = tiny.vdir
    far = fake_ensemble(lambda x: tuple(np.asarray(a) + 0.5 for a in frozen.predict(x)), tiny.manifest)
    with caplog.at_level(logging.WARNING, logger="service.engines.compile"):
        assert convert_checked(far, frozen) is None
    assert caplog.records[-1].getMessage() == ("tiny version 1 will run on TensorFlow: the tflite ensemble's average "
                                               "outputs differ from the members' by 0.5")

    def refused(fn, owner=None):
        raise LoadError("no kernels")

    monkeypatch.setattr(compile_module, "to_lite", refused)
    with caplog.at_level(logging.WARNING, logger="service.engines.compile"):
        assert convert_checked(original, frozen) is None
    assert caplog.records[-1].getMessage() == "tiny version 1 will run on TensorFlow: no kernels"


def test_compile_version_refuses_a_frozen_graph_that_disagrees(tiny, monkeypatch):
    import service.engines.compile as compile_module

    def loose(original, compiled):
        raise LoadError("differs")

    monkeypatch.setattr(compile_module, "check_faithful", loose)
    with pytest.raises(LoadError, match="^differs$"):
        compile_module.compile_version(tiny.manifest, tiny.vdir)


# -- lite: TensorFlow Lite -----------------------------------------------------------------------------

def test_lite_engine_answers_any_batch_on_a_pool(tiny, tiny_compiled):
    calls, pace = counter()
    ensemble = load_lite(tiny.manifest, tiny.vdir, tiny_compiled.lite, (3, 1, 3), pace, threads=2, pool=3)
    engine = ensemble.engine
    assert len(calls) == 1 + 2 and engine.kind == "tflite" and engine.threads == 2
    assert engine.model is tiny_compiled.lite and engine.input_dtype == np.float32
    assert engine._idle.qsize() == 3
    want = expected_outputs(tiny)
    for rows in (6, 2, 6, 1):  # a new size resizes the borrowed interpreter; the same size does not
        got = engine.run(X[:rows].astype(np.float64))  # cast to the model's input dtype
        for a, b in zip(got, want):
            np.testing.assert_allclose(a[:, :3] if a.ndim == 2 and a.shape[1] == 4 else a, (b[:rows]), atol=1e-5)
        assert got[2].shape == (rows, 4)
    assert engine._idle.qsize() == 3
    slots = [engine._idle.get_nowait() for _ in range(3)]
    assert {s.shape for s in slots} >= {(1, 3)}
    assert engine.run(X)[0].shape == (6, 3)  # an empty pool: a new interpreter, kept after
    assert engine._idle.qsize() == 1
    single = LiteEngine(tiny_compiled.lite)
    assert single._idle.qsize() == 1 and single.threads == 1


def record_threads(monkeypatch) -> list:
    """From now on, the `num_threads` of every TensorFlow Lite interpreter made, in order."""
    made = []
    real = lite_module.Interpreter

    def recording(**kwargs):
        made.append(kwargs["num_threads"])
        return real(**kwargs)

    monkeypatch.setattr(lite_module, "Interpreter", recording)
    return made


def test_lite_engine_threads_reach_the_interpreter(tiny_compiled, monkeypatch):
    made = record_threads(monkeypatch)
    LiteEngine(tiny_compiled.lite, threads=3, pool=2)
    assert made == [3, 3]


def test_lite_engine_runs_from_several_threads_at_once(tiny, tiny_compiled):
    engine = LiteEngine(tiny_compiled.lite)
    want = expected_outputs(tiny)[0]
    errors, barrier = [], threading.Barrier(4)

    def work(rows):
        try:
            barrier.wait(5)
            for _ in range(20):
                np.testing.assert_allclose(engine.run(X[:rows])[0], want[:rows], atol=1e-5)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in (1, 2, 5, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and engine._idle.qsize() >= 1


def test_a_model_that_is_not_an_ensemble_is_refused(tiny_compiled):
    from service.engines.compile import to_lite

    with pytest.raises(LoadError) as caught:
        LiteEngine(b"\x00" * 64)
    assert str(caught.value).startswith("TensorFlow Lite cannot load the converted ensemble: ")
    assert caught.value.__suppress_context__
    one = tf.function(lambda x: (tf.nn.softmax(x),), input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    with pytest.raises(LoadError) as caught:
        LiteEngine(to_lite(one.get_concrete_function()))
    assert str(caught.value) == ("the converted ensemble has 1 inputs and outputs of shapes [[-1, 3]]; expected one "
                                 "input, and outputs (rows, classes), (rows, members, classes) and (rows, 4)")
    two_inputs = tf.function(lambda a, b: (a + b, tf.stack([a, b], axis=1), tf.concat([a, b[:, :1]], axis=1)),
                             input_signature=[tf.TensorSpec([None, 3], tf.float32)] * 2)
    with pytest.raises(LoadError, match=r"^the converted ensemble has 2 inputs and outputs of shapes "):
        LiteEngine(to_lite(two_inputs.get_concrete_function()))


def test_output_numbers_follow_the_converter_s_names():
    assert output_number("Identity") == 0
    assert output_number("Identity_1") == 1 and output_number("Identity_12") == 12
    for name in ("Identity_x", "Other_2", "StatefulPartitionedCall:0", "Identity_", "identity_1", "XIdentity_2"):
        assert output_number(name) == 1 << 30, name


def details(*shapes_and_names):
    return [{"shape": np.array(shape), "name": name} for shape, name in shapes_and_names]


def test_outputs_are_ordered_by_shape_then_by_name():
    members, average, scores = ([1, 2, 3], "Identity_1"), ([1, 3], "Identity"), ([1, 4], "Identity_2")
    got = order_outputs(details(scores, members, average))
    assert [o["name"] for o in got] == ["Identity", "Identity_1", "Identity_2"]
    flipped = order_outputs(details(([1, 3], "Identity_2"), ([1, 4], "Identity"), ([1, 2, 3], "Identity_1")))
    assert [o["name"] for o in flipped] == ["Identity_2", "Identity_1", "Identity"]
    # four classes and four scores: the average is the first output of the function
    tie = order_outputs(details(([1, 4], "Identity_2"), ([1, 2, 4], "Identity_1"), ([1, 4], "Identity")))
    assert [o["name"] for o in tie] == ["Identity", "Identity_1", "Identity_2"]
    tie_named = order_outputs(details(([1, 4], "Identity_7"), ([1, 2, 4], "x"), ([1, 4], "Identity_3")))
    assert [o["name"] for o in tie_named] == ["Identity_3", "x", "Identity_7"]
    assert order_outputs(details(average, members)) is None
    assert order_outputs(details(average, members, scores, ([1, 3], "Identity_3"))) is None
    assert order_outputs(details(average, ([1, 3], "Identity_3"), scores)) is None  # no rank-3 output
    assert order_outputs(details(members, ([1, 2, 3], "Identity_3"), scores)) is None  # two rank-3 outputs
    assert order_outputs(details(members, ([1, 5], "Identity"), scores)) is None  # widths neither way
    assert order_outputs(details(members, ([1, 3], "Identity"), ([1, 3], "Identity_2"))) is None
    assert order_outputs(details(members, average, ([4], "Identity_2"))) is None


# -- compiled: the file and its cache -------------------------------------------------------------------

FAKE = CompiledVersion(FrozenGraph(b"graph-bytes", "instances:0", ("a:0", "b:0", "c:0")), b"lite-bytes")
HEADER = b'{"input": "instances:0", "outputs": ["a:0", "b:0", "c:0"], "graph_bytes": 11}'


def test_compiled_version_bytes_exactly():
    assert FAKE.to_bytes() == b"ensemble-frozen-graph/3\n" + HEADER + b"\n" + b"graph-bytes" + b"lite-bytes"
    assert CompiledVersion.from_bytes(FAKE.to_bytes(), "x") == FAKE
    without = CompiledVersion(FAKE.frozen)
    assert without.lite is None and without.to_bytes().endswith(b"\ngraph-bytes")
    back = CompiledVersion.from_bytes(without.to_bytes(), "x")
    assert back.lite is None and back.frozen == FAKE.frozen and isinstance(back.frozen.outputs, tuple)


@pytest.mark.parametrize("data, message", [
    (b"ensemble-frozen-graph/2\n" + HEADER + b"\ngraph-bytes", "where is not a frozen ensemble graph"),
    (b"", "where is not a frozen ensemble graph"),
    (b"ensemble-frozen-graph/3\n" + HEADER + b"\ngraph", "where is truncated: 5 bytes where the graph alone has 11"),
    (b"ensemble-frozen-graph/3\n" + HEADER + b"\n" + b"graph-byte", "where is truncated: 10 bytes where the graph "
                                                                    "alone has 11"),
])
def test_a_damaged_compiled_file_is_refused(data, message):
    with pytest.raises(LoadError) as caught:
        CompiledVersion.from_bytes(data, "where")
    assert str(caught.value) == message


def test_compiled_file_round_trip(tmp_path):
    FAKE.write(tmp_path / "graph.bin")
    assert (tmp_path / "graph.bin").read_bytes() == FAKE.to_bytes()
    assert CompiledVersion.read(tmp_path / "graph.bin") == FAKE
    (tmp_path / "bad.bin").write_bytes(b"nope")
    with pytest.raises(LoadError, match=f"^{tmp_path / 'bad.bin'} is not a frozen ensemble graph$"):
        CompiledVersion.read(tmp_path / "bad.bin")


def test_tensorflow_version_is_read_from_the_package_metadata(monkeypatch):
    assert tensorflow_version() == tf.__version__
    asked = []

    def nowhere(dist):
        asked.append(dist)
        raise compiled_module.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(compiled_module.metadata, "version", nowhere)
    assert tensorflow_version() == "unknown"
    assert asked == ["tensorflow-cpu", "tensorflow", "tf-nightly-cpu", "tf-nightly"]
    monkeypatch.setattr(compiled_module.metadata, "version", lambda dist: asked.append(dist) or f"v-{dist}")
    assert tensorflow_version() == "v-tensorflow-cpu"


def cache_manifest(version: int = 1) -> Manifest:
    return manifest_v1().model_copy(update={"version": version})


def test_cache_entries_are_named_and_signed_as_described(tmp_path):
    cache = CompileCache(tmp_path / "cache")
    manifest = cache_manifest()
    assert cache.get(manifest) is None
    folder = tmp_path / "cache"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    key = (folder / ".key").read_bytes()
    assert len(key) == 32 and cache.key() == key
    assert [p.name for p in folder.iterdir()] == [".key"]  # the key's temporary file is gone
    digest = hashlib.sha256(manifest.model_dump_json().encode())
    digest.update(tensorflow_version().encode())
    name = digest.hexdigest()
    assert cache.path_of(manifest) == folder / f"{name[:32]}.graph"
    cache.put(manifest, FAKE)
    stored = cache.path_of(manifest).read_bytes()
    data = FAKE.to_bytes()
    assert stored == hmac.new(key, name.encode() + data, hashlib.sha256).digest() + data
    assert cache.get(manifest) == FAKE
    other = CompileCache(folder)  # another worker: the same key, the same entries
    assert other.key() == key and other.get(manifest) == FAKE
    assert other.get(cache_manifest(2)) is None


def test_cache_ignores_what_it_did_not_write(tmp_path, caplog):
    cache = CompileCache(tmp_path / "cache")
    manifest = cache_manifest()
    cache.put(manifest, FAKE)
    path = cache.path_of(manifest)
    stored = path.read_bytes()
    caplog.set_level(logging.WARNING, logger="service.engines.compiled")
    path.write_bytes(stored[:-1] + b"X")
    assert cache.get(manifest) is None
    assert caplog.records[-1].getMessage() == (
        f"ignoring compiled graph {path}: not written by a server of this cache for this version (its digest does "
        "not match); compiling the version again")
    path.write_bytes(stored[:31])
    assert cache.get(manifest) is None
    path.write_bytes(b"")
    assert cache.get(manifest) is None
    # signed, but not a compiled version: compiled again
    key = cache.key()
    name = hashlib.sha256(manifest.model_dump_json().encode())
    name.update(tensorflow_version().encode())
    junk = b"junk"
    path.write_bytes(hmac.new(key, name.hexdigest().encode() + junk, hashlib.sha256).digest() + junk)
    assert cache.get(manifest) is None
    assert caplog.records[-1].getMessage() == f"ignoring unreadable compiled graph {path}: {path} is not a frozen ensemble graph"
    path.unlink()
    path.mkdir()  # unreadable
    assert cache.get(manifest) is None
    assert caplog.records[-1].getMessage().startswith(f"ignoring unreadable compiled graph {path}: ")
    # an entry moved to another version's name
    path.rmdir()
    cache.put(cache_manifest(2), FAKE)
    os.replace(cache.path_of(cache_manifest(2)), path)
    assert cache.get(manifest) is None


def test_a_folder_others_may_write_is_not_used(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="service.engines.compiled")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o770)
    cache = CompileCache(shared)
    assert cache.key() is None and cache.get(cache_manifest()) is None
    assert caplog.records[-1].getMessage() == (
        f"compile cache {shared} not used: it must be a folder of this user's that no one else may write (chmod 700)")
    cache.put(cache_manifest(), FAKE)
    assert list(shared.iterdir()) == []
    shared.chmod(0o702)
    assert CompileCache(shared).key() is None
    shared.chmod(0o755)  # others may read, not write: used
    assert CompileCache(shared).key() is not None
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert CompileCache(tmp_path / "link").key() is None
    (tmp_path / "file").write_text("x")
    assert CompileCache(tmp_path / "file").key() is None
    assert CompileCache(tmp_path / "file" / "below").key() is None
    assert caplog.records[-1].getMessage().startswith(f"compile cache {tmp_path / 'file' / 'below'} not usable: ")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    assert CompileCache(theirs).key() is None


def test_a_key_of_another_length_is_not_used(tmp_path, caplog):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    (folder / ".key").write_bytes(b"short")
    cache = CompileCache(folder)
    assert cache.key() is None and cache.get(cache_manifest()) is None
    (folder / ".key").unlink()
    (folder / ".key").mkdir()  # unreadable
    caplog.set_level(logging.WARNING, logger="service.engines.compiled")
    assert CompileCache(folder).key() is None
    assert caplog.records[-1].getMessage().startswith(f"compile cache {folder} not used: ")
    (folder / ".key").rmdir()
    (folder / ".key").write_bytes(b"k" * 32)
    assert CompileCache(folder).key() == b"k" * 32


def test_get_or_compile_compiles_once_then_reads(tmp_path):
    cache = CompileCache(tmp_path / "cache", keep=2)
    calls = []
    manifest = cache_manifest()
    assert cache.get_or_compile(manifest, lambda: calls.append(1) or FAKE, 5) == FAKE
    assert cache.get_or_compile(manifest, lambda: calls.append(1) or FAKE, 5) == FAKE
    assert CompileCache(tmp_path / "cache").get_or_compile(manifest, lambda: calls.append(1) or FAKE, 5) == FAKE
    assert calls == [1]
    assert cache.path_of(manifest).with_suffix(".lock").exists()
    for version in (2, 3, 4):
        time.sleep(0.01)
        cache.get_or_compile(cache_manifest(version), lambda: FAKE, 5)
    graphs = sorted(p.name for p in (tmp_path / "cache").glob("*.graph"))
    assert graphs == sorted(cache.path_of(cache_manifest(v)).name for v in (3, 4))
    locks = sorted(p.name for p in (tmp_path / "cache").glob("*.lock"))
    assert locks == sorted(cache.path_of(cache_manifest(v)).with_suffix(".lock").name for v in (3, 4))
    assert CompileCache(tmp_path / "c2").keep == 16


def test_eviction_keeps_the_newest(tmp_path):
    cache = CompileCache(tmp_path / "cache", keep=2)
    old, new = cache_manifest(1), cache_manifest(2)
    cache.put(old, FAKE)
    cache.put(new, FAKE)
    cache.keep = 1
    os.utime(cache.path_of(new), (1_000_000, 1_000_000))  # the entry written last is the older
    os.utime(cache.path_of(old), (2_000_000, 2_000_000))
    cache._evict()
    assert [p.name for p in (tmp_path / "cache").glob("*.graph")] == [cache.path_of(old).name]


def test_an_uncacheable_folder_compiles_every_time(tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    cache = CompileCache(tmp_path / "file" / "cache")
    calls = []
    for _ in range(2):
        assert cache.get_or_compile(cache_manifest(), lambda: calls.append(1) or FAKE, 5) == FAKE
    assert calls == [1, 1]


def test_a_cache_that_cannot_be_written_costs_time_only(tmp_path, caplog, monkeypatch):
    cache = CompileCache(tmp_path / "cache")
    cache.key()

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compiled_module, "write_atomically", full)
    caplog.set_level(logging.WARNING, logger="service.engines.compiled")
    cache.put(cache_manifest(), FAKE)
    assert caplog.records[-1].getMessage() == (f"compiled graph not cached in {tmp_path / 'cache'}: "
                                               "[Errno 28] No space left on device")
    assert cache.get_or_compile(cache_manifest(), lambda: FAKE, 5) == FAKE


class HeldElsewhere:
    """Another worker holding a version's compile lock (its own descriptor, in a thread)."""

    def __init__(self, folder, manifest):
        self.folder, self.manifest = folder, manifest
        self.held, self.release = threading.Event(), threading.Event()

    def __enter__(self):
        def holder():
            with CompileCache(self.folder)._compiling(self.manifest, 30):
                self.held.set()
                self.release.wait(10)

        self.thread = threading.Thread(target=holder)
        self.thread.start()
        assert self.held.wait(10)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(10)


def test_a_lock_held_elsewhere_is_waited_for_then_compiled_without(tmp_path, caplog):
    manifest = cache_manifest()
    caplog.set_level(logging.WARNING, logger="service.engines.compiled")
    with HeldElsewhere(tmp_path / "cache", manifest):
        started = time.monotonic()
        assert CompileCache(tmp_path / "cache").get_or_compile(manifest, lambda: FAKE, 0.3) == FAKE
        assert 0.3 <= time.monotonic() - started < 3
    assert caplog.records[-1].getMessage() == ("fake version 1 is still being compiled elsewhere after 0 s; "
                                               "compiling it here too")


def test_a_stopping_server_gives_up_waiting_for_a_lock(tmp_path):
    manifest = cache_manifest()
    calls = []
    with HeldElsewhere(tmp_path / "cache", manifest):
        started = time.monotonic()
        with pytest.raises(LoadError) as caught:
            CompileCache(tmp_path / "cache").get_or_compile(manifest, lambda: calls.append(1) or FAKE, 30,
                                                            give_up=lambda: time.monotonic() > started + 0.2)
        assert time.monotonic() - started < 5
    assert str(caught.value) == ("gave up waiting for fake version 1 to be compiled elsewhere: the server is "
                                 "stopping")
    assert calls == []


def test_a_lock_file_that_cannot_be_made_costs_nothing(tmp_path, caplog, monkeypatch):
    def refused(path, mode):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(compiled_module, "lock_file", refused)
    caplog.set_level(logging.WARNING, logger="service.engines.compiled")
    assert CompileCache(tmp_path / "cache").get_or_compile(cache_manifest(), lambda: FAKE, 5) == FAKE
    assert caplog.records[0].getMessage() == ("compiling fake version 1 without the cache's lock: [Errno 13] "
                                              "Permission denied")


def test_the_lock_is_released_after_compiling(tmp_path):
    import fcntl

    cache = CompileCache(tmp_path / "cache")
    manifest = cache_manifest()
    with pytest.raises(RuntimeError):
        cache.get_or_compile(manifest, lambda: (_ for _ in ()).throw(RuntimeError("failed")), 5)
    cache.get_or_compile(manifest, lambda: FAKE, 5)
    fd = os.open(cache.path_of(manifest).with_suffix(".lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: nobody holds it
    finally:
        os.close(fd)
    mode = stat.S_IMODE(os.stat(cache.path_of(manifest).with_suffix(".lock")).st_mode)
    assert mode == 0o600


# -- loader: the server's side ---------------------------------------------------------------------------

@pytest.mark.parametrize("settings, cores, plan", [
    ((0, 0, 0, 1), 4, (1, 4, 1)),
    ((2, 0, 0, 1), 4, (2, 2, 2)),
    ((0, 0, 0, 2), 4, (1, 2, 1)),
    ((0, 0, 0, 2), 5, (1, 2, 1)),
    ((0, 0, 0, 8), 4, (1, 1, 1)),
    ((4, 0, 0, 1), 2, (4, 1, 4)),
    ((3, 5, 6, 1), 4, (3, 5, 6)),
    ((0, 2, 0, 1), 8, (1, 2, 1)),
    ((0, 0, 3, 1), 8, (1, 8, 3)),
])
def test_thread_plan(settings, cores, plan):
    batch, intra, inter, workers = settings
    assert thread_plan(batch, intra, inter, workers, cores) == ThreadPlan(*plan)
    chosen = Settings(inference_threads=batch, intra_op_threads=intra, inter_op_threads=inter, workers=workers)
    got = plan_of(chosen, cores)
    assert isinstance(got, ThreadPlan) and got == plan
    assert (got.inference_threads, got.intra_op, got.inter_op) == plan


def test_the_loader_s_cache_folder(tmp_path):
    plan = ThreadPlan(1, 1, 1)
    assert EngineLoader(Settings(compile_cache_dir=tmp_path / "c"), plan).cache.folder == tmp_path / "c"
    assert EngineLoader(Settings(state_dir=tmp_path / "s"), plan).cache.folder == tmp_path / "s" / "compiled"
    both = EngineLoader(Settings(state_dir=tmp_path / "s", compile_cache_dir=tmp_path / "c"), plan)
    assert both.cache.folder == tmp_path / "c"
    loader = EngineLoader(Settings(), plan)
    assert loader.cache is None and loader.threads is plan and loader.settings == Settings()


@pytest.fixture()
def private_tmp(tmp_path, monkeypatch):
    """The temporary folder the loader copies versions into."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture()
def thread_calls(monkeypatch):
    """configure_threads' calls (not made: TensorFlow's pools are the test process's)."""
    import service.engines.tensorflow as tensorflow_module

    calls = []
    monkeypatch.setattr(tensorflow_module, "configure_threads", lambda intra, inter: calls.append((intra, inter)))
    return calls


def test_the_loader_compiles_a_verified_copy_and_runs_the_engine_asked_for(tiny, tiny_compiled, monkeypatch,
                                                                             private_tmp, thread_calls, caplog):
    import service.engines.compile as compile_module

    copies = []

    def compile_version(manifest, copy, pace):
        assert manifest is tiny.manifest
        assert read_manifest(copy) == tiny.manifest
        assert (copy / "members" / "m1" / "saved_model.pb").read_bytes() == \
            (tiny.vdir / "members" / "m1" / "saved_model.pb").read_bytes()
        copies.append(copy)
        return lite_or(tiny_compiled)

    lite_or = lambda compiled: compiled  # noqa: E731 - changed below
    monkeypatch.setattr(compile_module, "compile_version", compile_version)
    settings = Settings(isolated_loading=False, warmup_batch_sizes=(1, 2), inference_threads=2, intra_op_threads=3,
                        inter_op_threads=1)
    loader = EngineLoader(settings, plan_of(settings, 4))
    calls, pace = counter()
    ensemble = loader(tiny.manifest, tiny.vdir, pace)
    assert ensemble.engine.kind == "tflite" and ensemble.path == tiny.vdir
    assert ensemble.engine.threads == 3 and ensemble.engine._idle.qsize() == 2
    assert len(calls) == 1 + 1 + 2  # before compiling; load_lite's, then each warm-up size
    assert thread_calls == [(3, 1)]
    (copy,) = copies
    assert copy.parts[-2:] == ("tiny", "1") and copy.parent.parent.name.startswith(COPY_PREFIX)
    assert copy.parent.parent.parent == private_tmp and not copy.exists()
    np.testing.assert_allclose(ensemble.predict(X)[0], expected_outputs(tiny)[0], atol=1e-5)

    tensorflow = EngineLoader(Settings(isolated_loading=False, engine="tensorflow", warmup_batch_sizes=(1, 2),
                                       intra_op_threads=2), ThreadPlan(1, 2, 1))
    calls.clear()
    ensemble = tensorflow(tiny.manifest, tiny.vdir, pace)
    assert ensemble.engine.kind == "tensorflow" and len(calls) == 1 + 1 + 2 and thread_calls[-2:] == [(2, 1)] * 2
    np.testing.assert_allclose(ensemble.predict(X)[0], expected_outputs(tiny)[0], atol=1e-5)

    from dataclasses import replace

    lite_or = lambda compiled: replace(compiled, lite=None)  # noqa: E731
    assert loader(tiny.manifest, tiny.vdir, pace).engine.kind == "tensorflow"
    lite_or = lambda compiled: replace(compiled, lite=b"\x00" * 64)  # noqa: E731
    caplog.set_level(logging.WARNING, logger="service.engines.loader")
    assert loader(tiny.manifest, tiny.vdir, pace).engine.kind == "tensorflow"
    assert caplog.records[-1].getMessage().startswith(
        "tiny version 1 runs on TensorFlow: its TensorFlow Lite model failed: TensorFlow Lite cannot load the "
        "converted ensemble: ")


def test_the_loader_compiles_in_a_child_when_isolated(tiny, tiny_compiled, monkeypatch, private_tmp, thread_calls):
    asked = []

    def in_child(copy, timeout, since_stops=None):
        asked.append((copy.parts[-2:], (copy / "manifest.json").exists(), timeout, since_stops))
        return tiny_compiled

    monkeypatch.setattr(loader_module, "compile_in_child", in_child)
    settings = Settings(isolated_loading=True, load_timeout_seconds=12.5, warmup_batch_sizes=(1,))
    ensemble = EngineLoader(settings, ThreadPlan(1, 1, 1))(tiny.manifest, tiny.vdir, no_pause)
    assert asked == [(("tiny", "1"), True, 12.5, stops())]
    assert ensemble.engine.kind == "tflite" and thread_calls == []


def test_the_loader_compiles_a_version_once_with_its_cache(tiny, tiny_compiled, monkeypatch, private_tmp,
                                                             thread_calls, tmp_path):
    import service.engines.compile as compile_module

    compiles = []
    monkeypatch.setattr(compile_module, "compile_version", lambda m, copy, pace: compiles.append(1) or tiny_compiled)
    settings = Settings(isolated_loading=False, compile_cache_dir=tmp_path / "cache", warmup_batch_sizes=(1,),
                        load_timeout_seconds=0.3)
    for _ in range(2):
        assert EngineLoader(settings, ThreadPlan(1, 1, 1))(tiny.manifest, tiny.vdir, no_pause).version == 1
    assert compiles == [1]
    other = tiny.manifest.model_copy(update={"version": 2})
    with HeldElsewhere(tmp_path / "cache", other):  # waited for (load_timeout_seconds), then compiled here
        assert EngineLoader(settings, ThreadPlan(1, 1, 1)).compiled(other, tiny.vdir, no_pause) == tiny_compiled
    assert compiles == [1, 1]
    third = tiny.manifest.model_copy(update={"version": 3})
    slow = settings.model_copy(update={"load_timeout_seconds": 30.0})
    stopper = threading.Timer(0.3, stop_all)
    with HeldElsewhere(tmp_path / "cache", third):
        stopper.start()
        started = time.monotonic()
        with pytest.raises(LoadError, match="^gave up waiting for tiny version 3 to be compiled elsewhere"):
            EngineLoader(slow, ThreadPlan(1, 1, 1)).compiled(third, tiny.vdir, no_pause)
        assert time.monotonic() - started < 5
    stopper.join()


def test_the_loader_loads_a_format_2_version_from_its_compilation(named, monkeypatch, private_tmp, thread_calls,
                                                                  caplog):
    import service.engines.named as named_module
    from service.engines.compiled import NamedCompiled

    compiled = named_module.compile_named(named.manifest, named.vdir)
    assert compiled.lite[4:8] == b"TFL3" and compiled.reason == ""
    compiles, loads = [], []
    monkeypatch.setattr(named_module, "compile_named",
                        lambda manifest, copy, pace: compiles.append((copy.parts[-2:], pace)) or compiled)
    settings = Settings(isolated_loading=False, warmup_batch_sizes=(1, 3))
    calls, pace = counter()
    caplog.set_level(logging.INFO, logger="service.engines.loader")
    ensemble = EngineLoader(settings, ThreadPlan(2, 3, 4))(named.manifest, named.vdir, pace)
    assert ensemble.engine.kind == "tflite" and ensemble.path == named.vdir
    assert (ensemble.engine.threads, ensemble.engine._idle.qsize()) == (3, 2)
    assert compiles == [(("named", "1"), pace)] and thread_calls == [(3, 4)]
    assert len(calls) == 1 + 1 + 2  # before compiling, the interpreters, each warm-up size
    assert caplog.records[-1].getMessage() == ("named version 1 runs on TensorFlow Lite: it converts and answers "
                                               "as its members do")

    def load_named(manifest, copy, sizes, pace):
        loads.append((manifest, copy.parts[-2:], (copy / "manifest.json").exists(), sizes, pace))
        return "loaded"

    monkeypatch.setattr(named_module, "load_named", load_named)
    for engine, lite, says in [("tensorflow", compiled, "the engine setting is tensorflow"),
                               ("tflite", NamedCompiled(None, "no kernels for StringSplitV2"),
                                "no kernels for StringSplitV2")]:
        monkeypatch.setattr(named_module, "compile_named", lambda manifest, copy, pace, lite=lite: lite)
        chosen = settings.model_copy(update={"engine": engine})
        assert EngineLoader(chosen, ThreadPlan(2, 3, 4))(named.manifest, named.vdir, no_pause) == "loaded"
        assert loads[-1] == (named.manifest, ("named", "1"), True, (1, 3), no_pause)
        assert caplog.records[-1].getMessage() == f"named version 1 runs on TensorFlow: {says}"
    monkeypatch.setattr(named_module, "compile_named", lambda manifest, copy, pace: NamedCompiled(b"\x00" * 64))
    assert EngineLoader(settings, ThreadPlan(1, 1, 1))(named.manifest, named.vdir, no_pause) == "loaded"
    assert caplog.records[-1].getMessage().startswith(
        "named version 1 runs on TensorFlow: its TensorFlow Lite model failed: TensorFlow Lite cannot load the "
        "converted ensemble: ")


def test_verified_copy_removes_abandoned_copies_and_refuses_changed_files(tiny, private_tmp, tmp_path):
    import shutil

    old = private_tmp / (COPY_PREFIX + "0123456789ab")
    young = private_tmp / (COPY_PREFIX + "ba9876543210")
    for folder, age in ((old, ABANDONED_COPY_SECONDS + 5), (young, ABANDONED_COPY_SECONDS - 5)):
        folder.mkdir()
        (private_tmp / (folder.name + ".lock")).write_text("")
        os.utime(folder, (time.time() - age, time.time() - age))
    assert ABANDONED_COPY_SECONDS == 60.0 and COPY_PREFIX == "ensemble-verified-"
    with verified_copy(tiny.manifest, tiny.vdir) as copy:
        assert copy.is_dir() and copy.parent.parent.parent == private_tmp
    assert not old.exists() and young.exists()
    changed = tmp_path / "changed" / "tiny" / "1"
    shutil.copytree(tiny.vdir, changed)
    (changed / "members" / "m0" / "saved_model.pb").write_bytes(b"other")
    with pytest.raises(ChecksumError):
        with verified_copy(tiny.manifest, changed):
            pass
    assert [p.name for p in private_tmp.iterdir() if p != young and p.name != young.name + ".lock"] == []


def test_verified_copy_names_its_own_disk_s_failure(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(LoadError) as caught:
        with verified_copy(tiny.manifest, tiny.vdir):
            pass
    assert str(caught.value).startswith(f"cannot copy {tiny.vdir} into a private folder under {tmp_path / 'missing'} "
                                        "to compile it: [Errno 2]")
    assert caught.value.__suppress_context__ and type(caught.value) is LoadError


# -- child: compiling in a child process -----------------------------------------------------------------

@pytest.fixture()
def fake_python(tmp_path, monkeypatch):
    """sys.executable replaced by a shell script (its body given): it gets the child's arguments
    (-m service.engines.child VERSION_DIR OUT_FILE PARENT_PID NICENESS) and environment."""
    log = tmp_path / "log"
    log.mkdir()

    def install(body: str) -> Path:
        script = tmp_path / "python"
        script.write_text("#!/bin/sh\n" + f'echo "$@" > {log}/args\nenv > {log}/env\n' + body + "\n")
        script.chmod(0o755)
        monkeypatch.setattr(sys, "executable", str(script))
        return log

    return install


def test_compile_in_child_reads_what_the_child_wrote(fake_python, tmp_path, monkeypatch, caplog, capfd):
    FAKE.write(tmp_path / "compiled.bin")
    log = fake_python(f'cp {tmp_path / "compiled.bin"} "$4"\necho to-stdout\n'
                      'printf \'{"ok": true, "peak_rss_mb": 12.4}\' > "$4.result.json"')
    monkeypatch.setenv("ENSEMBLE_ADMIN_TOKEN", "secret")
    caplog.set_level(logging.INFO, logger="service.engines.child")
    vdir = tmp_path / "version"
    assert compile_in_child(vdir, 5, niceness=7) == FAKE
    args = (log / "args").read_text().split()
    assert args[:3] == ["-m", "service.engines.child", str(vdir)] and args[4:] == [str(os.getpid()), "7"]
    out = Path(args[3])
    assert out.name == "graph.bin" and out.parent.name.startswith("ensemble-compile-") and not out.parent.exists()
    env = (log / "env").read_text()
    assert "CUDA_VISIBLE_DEVICES=-1" in env and "secret" not in env
    message = caplog.records[-1].getMessage()
    assert message.startswith(f"{vdir} compiled by a child process in ")
    assert message.endswith(" s (its peak resident memory: 12 MB)")
    assert "to-stdout" not in capfd.readouterr().out
    assert compile_in_child(vdir, 5) == FAKE
    assert (log / "args").read_text().split()[-1] == "10"
    assert not child_module._running


@pytest.mark.parametrize("body, message", [
    ('printf \'{"ok": false, "category": "signature", "reason": "member m0: no"}\' > "$4.result.json"',
     "member m0: no"),
    ('echo "  some error  " >&2\nexit 5', "the loading process exited with status 5 without an answer: some error"),
    ("exit 4", "the loading process exited with status 4 without an answer"),
    ("kill -9 $$", "the loading process was killed by signal 9 without an answer"),
    ("kill -15 $$", "the loading process was killed by signal 15 without an answer"),
])
def test_compile_in_child_says_why_not(fake_python, tmp_path, body, message):
    fake_python(body)
    with pytest.raises(CompileFailed) as caught:
        compile_in_child(tmp_path, 5)
    assert str(caught.value) == message
    assert caught.value.category == ("signature" if "signature" in body else "load")
    assert not child_module._running


def test_compile_in_child_keeps_the_tail_of_the_child_s_errors(fake_python, tmp_path):
    from service.engines.child import STDERR_TAIL_CHARS

    fake_python("head -c 3000 /dev/zero | tr '\\0' e >&2\nprintf TAIL >&2\nexit 2")
    with pytest.raises(CompileFailed) as caught:
        compile_in_child(tmp_path, 5)
    assert STDERR_TAIL_CHARS == 2000
    assert str(caught.value) == ("the loading process exited with status 2 without an answer: " + "e" * 1996 + "TAIL")


def test_compile_in_child_kills_a_child_past_its_timeout(fake_python, tmp_path):
    fake_python("exec sleep 30")
    started = time.monotonic()
    with pytest.raises(CompileFailed) as caught:
        compile_in_child(tmp_path, 0.6)
    assert time.monotonic() - started < 5
    assert str(caught.value) == ("loading took longer than 1 s (ENSEMBLE_LOAD_TIMEOUT_SECONDS); the loading "
                                 "process was killed")
    assert caught.value.category == "load" and caught.value.__suppress_context__
    assert not child_module._running


def test_stop_all_kills_the_children_and_counts(fake_python, tmp_path):
    fake_python("exec sleep 30")
    before = stops()
    with pytest.raises(CompileFailed, match="^the server is stopping; the version was not compiled$"):
        compile_in_child(tmp_path, 5, since_stops=before - 1)
    assert not (tmp_path / "log" / "args").exists()  # no child started
    stopper = threading.Timer(0.5, stop_all)
    stopper.start()
    started = time.monotonic()
    with pytest.raises(CompileFailed, match="killed by signal 9"):
        compile_in_child(tmp_path, 20, since_stops=before)
    stopper.join()
    assert time.monotonic() - started < 5 and stops() == before + 1 and not child_module._running


def test_compile_failed_keeps_its_category():
    assert str(CompileFailed("why")) == "why" and CompileFailed("why").category == "load"
    assert CompileFailed("why", "checksum").category == "checksum"
    assert isinstance(CompileFailed("why"), LoadError)


def test_the_child_s_environment_holds_no_secret(monkeypatch):
    keep = {"PATH": "/bin", "HOME": "/home/x", "TMPDIR": "/t", "TEMP": "/t", "TMP": "/t", "LANG": "C",
            "LANGUAGE": "en", "TZ": "UTC", "VIRTUAL_ENV": "/v", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8", "LC_ALL": "C", "TF_ENABLE_ONEDNN_OPTS": "0",
            "OMP_NUM_THREADS": "1", "KMP_AFFINITY": "x", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "XLA_FLAGS": "--x", "KERAS_BACKEND": "tensorflow"}
    drop = {"ENSEMBLE_ADMIN_TOKEN": "secret", "AWS_SECRET_ACCESS_KEY": "s", "CUDA_VISIBLE_DEVICES": "0",
            "LD_PRELOAD": "x", "PYTHONSTARTUP": "x", "MY_TF_": "x"}
    environ = {**keep, **drop, "PYTHONPATH": "/extra"}
    if "MUTANT_UNDER_TEST" in os.environ:  # the mutation run's, read by every mutated function
        environ["MUTANT_UNDER_TEST"] = os.environ["MUTANT_UNDER_TEST"]
    monkeypatch.setattr(os, "environ", environ)
    package_parent = str(Path(child_module.__file__).resolve().parents[2])
    assert (Path(package_parent) / "service" / "engines" / "child.py").is_file()
    assert child_environment() == {**keep, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1",
                                   "PYTHONPATH": package_parent + os.pathsep + "/extra"}
    environ.pop("PYTHONPATH")
    environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    env = child_environment()
    assert env["PYTHONPATH"] == package_parent and env["TF_CPP_MIN_LOG_LEVEL"] == "0"


def test_the_child_dies_with_its_parent(monkeypatch):
    import ctypes

    calls = []

    class Libc:
        def prctl(self, option, sig):
            calls.append((option, sig))

    def cdll(name, use_errno=False):
        calls.append((name, use_errno))
        return Libc()

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(os, "getppid", lambda: 4242)
    child_module._die_with_parent(4242)
    assert calls == [(None, True), (1, signal.SIGKILL)]
    with pytest.raises(SystemExit) as caught:
        child_module._die_with_parent(17)
    assert caught.value.code == 3

    def missing(name, use_errno=False):
        raise OSError("no libc")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    child_module._die_with_parent(4242)  # not Linux: goes on
    with pytest.raises(SystemExit):
        child_module._die_with_parent(1)


def test_the_child_yields_the_cpu(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(os, "nice", lambda n: calls.append(("nice", n)))
    monkeypatch.setattr(os, "sched_setscheduler",
                        lambda pid, policy, param: calls.append(("sched", pid, policy, param.sched_priority)))
    child_module._yield_the_cpu(7)
    assert calls == [("nice", 7), ("sched", 0, os.SCHED_IDLE, 0)]

    def refused(pid, policy, param):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refused)
    with caplog.at_level(logging.DEBUG, logger="service.engines.child"):
        child_module._yield_the_cpu(3)
    assert caplog.records[-1].getMessage() == "SCHED_IDLE not available: [Errno 1] Operation not permitted"


def test_the_child_s_answer_file(tmp_path):
    import resource

    out = tmp_path / "graph.bin"
    child_module._answer(out, {"ok": True})
    result = json.loads((tmp_path / "graph.bin.result.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert result["ok"] is True and peak * 0.5 <= result["peak_rss_mb"] <= peak
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.bin.result.json"]


def test_the_child_s_main_compiles_or_reports_the_category(tiny, tmp_path, monkeypatch, thread_calls):
    steps = []
    monkeypatch.setattr(child_module, "_die_with_parent", lambda parent: steps.append(("parent", parent)))
    monkeypatch.setattr(child_module, "_yield_the_cpu", lambda niceness: steps.append(("nice", niceness)))
    out = tmp_path / "graph.bin"
    assert child_module.main([str(tiny.vdir), str(out), "123", "7"]) == 0
    assert steps == [("parent", 123), ("nice", 7)] and thread_calls == [(1, 1)]
    compiled = CompiledVersion.read(out)
    assert compiled.lite[4:8] == b"TFL3" and compiled.frozen.input == "instances:0"
    assert json.loads((tmp_path / "graph.bin.result.json").read_text())["ok"] is True
    wide = write_v1(tmp_path / "wide" / "1", tiny.exported, (0.5, 0.5), shape=(4,), name="wide")
    assert wide.input.shape == (4,)
    out = tmp_path / "wide.bin"
    assert child_module.main([str(tmp_path / "wide" / "1"), str(out), "1", "0"]) == 0
    result = json.loads((tmp_path / "wide.bin.result.json").read_text())
    assert (result["ok"], result["category"], result["reason"]) == (False, "signature",
                                                                    "member m0: takes shape [3], manifest says [4]")
    assert not out.exists()
    import service.engines.compile as compile_module

    def crash(manifest, path):
        raise RuntimeError("no memory")

    monkeypatch.setattr(compile_module, "compile_version", crash)
    assert child_module.main([str(tiny.vdir), str(tmp_path / "c.bin"), "1", "0"]) == 0
    result = json.loads((tmp_path / "c.bin.result.json").read_text())
    assert (result["ok"], result["category"], result["reason"]) == (False, "load", "RuntimeError: no memory")


# -- named: format 2 -----------------------------------------------------------------------------------------

NAMED_INPUTS = [{"name": "x", "dtype": "float32", "shape": [2]}, {"name": "tokens", "dtype": "int32", "shape": [None]}]
NAMED_HEADS = [{"name": "kind", "task": "classification", "labels": ["a", "b", "c"]},
               {"name": "flag", "task": "binary", "labels": ["no", "yes"]},
               {"name": "price", "task": "regression", "labels": ["price"], "variance": True}]


def named_member(seed: int, softmax_flag: bool):
    keras.utils.set_random_seed(seed)
    x = keras.Input((2,), name="x")
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    t = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(10, 3)(tokens))
    h = keras.layers.Dense(4, activation="relu")(keras.layers.Concatenate()([x, t]))
    kind = keras.layers.Dense(3, activation="softmax", name="kind")(h)
    flag = (keras.layers.Dense(2, activation="softmax", name="flag") if softmax_flag
            else keras.layers.Dense(1, activation="sigmoid", name="flag"))(h)
    price = keras.layers.Concatenate(name="price")([keras.layers.Dense(1)(h),
                                                    keras.layers.Dense(1, activation="softplus")(h)])
    return keras.Model({"x": x, "tokens": tokens}, {"kind": kind, "flag": flag, "price": price})


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """named/1: two members (weights 0.25, 0.75) of two named inputs (numbers, tokens of any
    length) and three heads (classification; binary, one member with two softmax columns;
    regression with a variance)."""
    root = tmp_path_factory.mktemp("named")
    vdir = root / "named" / "1"
    models, entries = [named_member(20, False), named_member(21, True)], []
    for i, (model, weight) in enumerate(zip(models, (0.25, 0.75))):
        model.export(str(vdir / "members" / f"m{i}"), verbose=False)
        entries.append({"name": f"m{i}", "path": f"members/m{i}", "kind": "imported", "weight": weight,
                        "files": file_digests(vdir / "members" / f"m{i}")})
    raw = {"format_version": 2, "name": "named", "version": 1, "created": CREATED.isoformat(),
           "inputs": NAMED_INPUTS, "heads": NAMED_HEADS, "members": entries}
    (vdir / "manifest.json").write_text(json.dumps(raw))
    return SimpleNamespace(root=root, vdir=vdir, manifest=read_manifest(vdir), models=models, raw=raw)


def named_inputs(rows: int, length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows * 100 + length)
    return {"x": rng.uniform(-1, 1, size=(rows, 2)).astype(np.float32),
            "tokens": rng.integers(0, 10, size=(rows, length)).astype(np.int32)}


def named_expected(named, inputs):
    outs = [{k: np.asarray(v) for k, v in m(inputs, training=False).items()} for m in named.models]
    return (np.stack([o["kind"] for o in outs], axis=1), np.stack([o["flag"][:, -1:] for o in outs], axis=1),
            np.stack([o["price"][:, :1] for o in outs], axis=1), np.stack([o["price"][:, 1:] for o in outs], axis=1))


def test_the_named_engine_stacks_each_head_of_each_member(named, caplog):
    from service.answer import combine
    from service.engines.named import load_named

    calls, pace = counter()
    ensemble = load_named(named.manifest, named.vdir, (3, 1), pace)
    assert ensemble.engine.kind == "tensorflow" and len(calls) == 2 + 2
    assert ensemble.engine._names == ("x", "tokens")
    inputs = named_inputs(5, 6)
    got = ensemble.engine.run(inputs)
    assert isinstance(got, tuple) and all(isinstance(a, np.ndarray) for a in got)
    for a, b in zip(got, named_expected(named, inputs), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    predicted = ensemble.predict(inputs)
    for a, b in zip(predicted, combine(named.manifest, got), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_named_version_of_numbers_compiles_to_tensorflow_lite(named):
    from service.engines.lite import load_named_lite
    from service.engines.named import compile_named

    calls, pace = counter()
    compiled = compile_named(named.manifest, named.vdir, pace)
    assert len(calls) == 2 + 2  # each member, each warm-up size (1 and the faithful batch)
    assert compiled.lite[4:8] == b"TFL3" and compiled.reason == ""
    calls.clear()
    ensemble = load_named_lite(named.manifest, named.vdir, compiled.lite, (2, 1), pace, threads=2, pool=3)
    assert ensemble.path == named.vdir and len(calls) == 1 + 2
    engine = ensemble.engine
    assert engine.kind == "tflite" and isinstance(engine, NamedLiteEngine)
    assert (engine.names, engine.outputs, engine.threads, engine._idle.qsize()) == (("x", "tokens"), 4, 2, 3)
    for rows, length in ((3, 4), (3, 7), (1, 7), (3, 4)):  # resized to each call's lengths
        inputs = named_inputs(rows, length)
        got = engine.run(inputs)
        assert isinstance(got, tuple)
        for a, b in zip(got, named_expected(named, inputs), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
    slots = [engine._idle.get_nowait() for _ in range(3)]
    assert engine.run(named_inputs(2, 3))[0].shape == (2, 2, 3) and engine._idle.qsize() == 1
    assert {s.shapes for s in slots} >= {((3, 2), (3, 4))}
    one = NamedLiteEngine(engine.model, ("x", "tokens"), 4, pool=0)
    assert one._idle.qsize() == 1 and one.threads == 1
    with pytest.raises(LoadError) as caught:
        NamedLiteEngine(engine.model, ("a", "b"), 4)
    assert str(caught.value) == ("the converted ensemble takes ['tokens', 'x'] and gives 4 outputs; expected "
                                 "['a', 'b'] and 4")
    with pytest.raises(LoadError, match=r"^the converted ensemble takes \['tokens', 'x'\] and gives 4 outputs; "
                                        r"expected \['tokens', 'x'\] and 3$"):
        NamedLiteEngine(engine.model, ("tokens", "x"), 3)
    with pytest.raises(LoadError, match="^TensorFlow Lite cannot load the converted ensemble: "):
        NamedLiteEngine(b"\x00" * 64, ("x",), 1)


def test_a_named_model_that_disagrees_runs_on_tensorflow(named, monkeypatch):
    from service.engines.named import compile_named

    real = NamedLiteEngine.run
    monkeypatch.setattr(NamedLiteEngine, "run", lambda self, x: tuple(a + 0.5 for a in real(self, x)))
    compiled = compile_named(named.manifest, named.vdir)
    assert compiled.lite is None
    assert compiled.reason == "its TensorFlow Lite model's output 0 differs from the members' by 0.5"
    monkeypatch.setattr(NamedLiteEngine, "run", lambda self, x: (*real(self, x)[:3], real(self, x)[3][:, :0]))
    assert compile_named(named.manifest, named.vdir).reason == ("its TensorFlow Lite model's output 3 differs from "
                                                                "the members' by inf")


def test_named_members_that_do_not_load_or_do_not_fit(named, tmp_path):
    import shutil

    from service.engines.named import SignatureError, load_named

    vdir = tmp_path / "named" / "1"
    shutil.copytree(named.vdir, vdir)
    shutil.rmtree(vdir / "members" / "m1")
    calls, pace = counter()
    with pytest.raises(LoadError) as caught:
        load_named(named.manifest, vdir, (1,), pace)
    assert str(caught.value).startswith("member m1: cannot load SavedModel: ") and len(calls) == 1
    assert caught.value.__suppress_context__ and type(caught.value) is LoadError

    class Bare(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
        def twice(self, x):
            return x * 2

    tf.saved_model.save(Bare(), str(vdir / "members" / "m1"), signatures={})
    with pytest.raises(SignatureError) as caught:
        load_named(named.manifest, vdir, (1,))
    assert str(caught.value) == "member m1: its SavedModel has no serving_default signature"
    assert caught.value.__suppress_context__
    renamed = named.manifest.model_copy(update={"inputs": (TensorSpec(name="y", dtype="float32", shape=(2,)),
                                                           named.manifest.inputs[1])})
    with pytest.raises(SignatureError, match=r"^member m0: its signature takes inputs \['tokens', 'x'\]; the "
                                             r"manifest names \['y', 'tokens'\]$"):
        load_named(renamed, named.vdir, (1,))


def v2(inputs, heads, members: int = 1) -> ManifestV2:
    return ManifestV2(format_version=2, name="n", version=1, created=CREATED, inputs=tuple(inputs),
                      heads=tuple(heads),
                      members=tuple(MemberEntry(name=f"m{i}", path=f"members/m{i}", kind="imported",
                                                weight=1 / members, files={"saved_model.pb": DIGEST})
                                    for i in range(members)))


def spec(*shape, dtype=tf.float32):
    return tf.TensorSpec(list(shape), dtype)


KIND = HeadSpec(name="kind", task="classification", labels=("a", "b", "c"))
FLAG = HeadSpec(name="flag", task="binary", labels=("no", "yes"))
PRICE = HeadSpec(name="price", task="regression", labels=("p", "q"), variance=True)
X_SPEC = TensorSpec(name="x", dtype="float32", shape=(2,))


def test_head_widths():
    from service.engines.named import head_widths

    assert head_widths(KIND) == (3,) and head_widths(FLAG) == (1, 2) and head_widths(PRICE) == (4,)
    assert head_widths(HeadSpec(name="p", task="regression", labels=("p", "q"))) == (2,)
    assert head_widths(HeadSpec(name="m", task="multilabel", labels=("p", "q", "r"))) == (3,)


def test_check_member_maps_heads_to_outputs():
    from service.engines.named import check_member

    manifest = v2([X_SPEC, TensorSpec(name="t", dtype="int32", shape=(None,))], [KIND, FLAG, PRICE])
    inputs = {"x": spec(None, 2), "t": spec(None, None, dtype=tf.int32)}
    outputs = {"kind": spec(None, 3), "flag": spec(None, 2), "price": spec(None, 4)}
    assert check_member("m", inputs, outputs, manifest) == {"kind": "kind", "flag": "flag", "price": "price"}
    assert check_member("m", {"x": spec(None, None), "t": spec(None, 5, dtype=tf.int32)},
                        {**outputs, "flag": spec(None, 1), "extra": spec(None)}, manifest)["flag"] == "flag"
    one = v2([X_SPEC], [KIND])
    assert check_member("m", {"x": spec(None, 2)}, {"output_0": spec(None, 3)}, one) == {"kind": "output_0"}


@pytest.mark.parametrize("inputs, outputs, heads, message", [
    ({"x": spec(None, 2), "y": spec(None, 2)}, {"kind": spec(None, 3)}, [KIND],
     "member m: its signature takes inputs ['x', 'y']; the manifest names ['x']"),
    ({}, {"kind": spec(None, 3)}, [KIND], "member m: its signature takes inputs []; the manifest names ['x']"),
    ({"x": spec(None, 2, dtype=tf.float64)}, {"kind": spec(None, 3)}, [KIND],
     "member m: input 'x' takes float64, the manifest says float32"),
    ({"x": spec(None, 3)}, {"kind": spec(None, 3)}, [KIND], "member m: input 'x' takes shape [3], the manifest says [2]"),
    ({"x": spec(None, 2)}, {"other": spec(None, 3), "more": spec(None, 3)}, [KIND],
     "member m: gives no output 'kind' (it gives ['more', 'other'])"),
    ({"x": spec(None, 2)}, {"other": spec(None, 3)}, [KIND, FLAG], "member m: gives no output 'kind' (it gives ['other'])"),
    ({"x": spec(None, 2)}, {"kind": spec(None, 4)}, [KIND], "member m: output 'kind' has shape [4]; head 'kind' needs [3]"),
    ({"x": spec(None, 2)}, {"kind": spec(None, 3, 1)}, [KIND],
     "member m: output 'kind' has shape [3, 1]; head 'kind' needs [3]"),
    ({"x": spec(None, 2)}, {"flag": spec(None, 3)}, [FLAG],
     "member m: output 'flag' has shape [3]; head 'flag' needs [1] or [2]"),
    ({"x": spec(None, 2)}, {"price": spec(None, 2)}, [PRICE],
     "member m: output 'price' has shape [2]; head 'price' needs [4]"),
    ({"x": spec(None, 2)}, {"kind": spec(None, None)}, [KIND],
     "member m: output 'kind' does not say its width; head 'kind' needs [3]"),
    ({"x": spec(None, 2)}, {"flag": spec(None, None)}, [FLAG],
     "member m: output 'flag' does not say its width; head 'flag' needs [1] or [2]"),
])
def test_check_member_says_what_does_not_fit(inputs, outputs, heads, message):
    from service.engines.named import SignatureError, check_member

    with pytest.raises(SignatureError) as caught:
        check_member("m", inputs, outputs, v2([X_SPEC], heads))
    assert str(caught.value) == message


def test_warmup_inputs_of_every_kind():
    from service.engines.base import warmup_inputs

    specs = [TensorSpec(name="f", dtype="float64", shape=(2, None)), TensorSpec(name="s", dtype="string"),
             TensorSpec(name="b", dtype="bool", shape=(3,)), TensorSpec(name="i", dtype="int64", shape=(None,)),
             TensorSpec(name="u", dtype="uint8", shape=(1,)), TensorSpec(name="g", dtype="float32")]
    batch = warmup_inputs(specs, 3)
    assert list(batch) == ["f", "s", "b", "i", "u", "g"]
    rng = np.random.default_rng(WARMUP_SEED)
    np.testing.assert_array_equal(batch["f"], rng.uniform(0.0, 1.0, size=(3, 2, 4)))
    np.testing.assert_array_equal(batch["g"], rng.uniform(0.0, 1.0, size=(3,)).astype(np.float32))
    assert batch["f"].dtype == np.float64 and batch["g"].dtype == np.float32
    assert batch["s"].dtype == object and batch["s"].shape == (3,) and set(batch["s"].tolist()) == {b"warm up"}
    assert batch["b"].dtype == bool and batch["b"].shape == (3, 3) and not batch["b"].any()
    assert batch["i"].dtype == np.int64 and batch["i"].shape == (3, 4) and (batch["i"] == 1).all()
    assert batch["u"].dtype == np.uint8 and batch["u"].shape == (3, 1) and (batch["u"] == 1).all()


def test_warmup_inputs_hold_the_missing_value_of_a_nullable_input_in_every_odd_row():
    from service.engines.base import warmup_inputs

    specs = [TensorSpec(name="f", dtype="float32", nullable=True), TensorSpec(name="s", dtype="string", nullable=True),
             TensorSpec(name="g", dtype="float64", shape=(2,), nullable=True), TensorSpec(name="h", dtype="float32")]
    batch = warmup_inputs(specs, 4)
    assert np.isnan(batch["f"]).tolist() == [False, True, False, True]
    assert batch["s"].tolist() == [b"warm up", b"", b"warm up", b""]
    assert np.isnan(batch["g"]).all(axis=1).tolist() == [False, True, False, True] and not np.isnan(batch["g"][0]).any()
    assert np.isfinite(batch["h"]).all()
    assert not np.isnan(warmup_inputs(specs[:1], 1)["f"]).any()  # one row: no odd row


@pytest.mark.parametrize("head, values, message", [
    (KIND, np.full((2, 2, 3), 1 / 3), None),
    (KIND, np.full((2, 1, 3), 1 / 3), "v of head 'kind' have shape [2, 1, 3], expected [2, 2, 3]"),
    (KIND, np.full((3, 2, 3), 1 / 3), "v of head 'kind' have shape [3, 2, 3], expected [2, 2, 3]"),
    (KIND, np.full((2, 2, 2), 1 / 2), "v of head 'kind' have shape [2, 2, 2], expected [2, 2, 3]"),
    (KIND, np.where(np.eye(3)[None, :2], np.nan, 0.5), "v of head 'kind' have shape [1, 2, 3], expected [2, 2, 3]"),
    (FLAG, np.full((2, 2, 1), np.nan), "v of head 'flag' are not finite (NaN or infinity)"),
    (FLAG, np.full((2, 2, 1), -np.inf), "v of head 'flag' are not finite (NaN or infinity)"),
    (FLAG, np.full((2, 2, 1), 1.001), None),
    (FLAG, np.full((2, 2, 1), -0.001), None),
    (FLAG, np.full((2, 2, 1), 1.0011), "v of binary head 'flag' are not probabilities (outside [0, 1]); end it with "
                                       "a softmax or a sigmoid, or declare the head a regression"),
    (FLAG, np.full((2, 2, 1), -0.0011), "v of binary head 'flag' are not probabilities (outside [0, 1]); end it "
                                        "with a softmax or a sigmoid, or declare the head a regression"),
    (HeadSpec(name="r", task="regression", labels=("r",)), np.full((2, 2, 1), -5.0), None),
    (HeadSpec(name="m", task="multilabel", labels=("p", "q")), np.full((2, 2, 2), 0.9), None),
    (KIND, np.full((2, 2, 3), 0.3336), None),
    (KIND, np.full((2, 2, 3), 0.334), "v of classification head 'kind' do not sum to 1 (end it with a softmax)"),
    (KIND, np.full((2, 2, 3), 0.3329), "v of classification head 'kind' do not sum to 1 (end it with a softmax)"),
])
def test_check_head(head, values, message):
    from service.engines.base import check_head

    if message is None:
        check_head(head, values, 2, 2, "v")
        return
    with pytest.raises(WarmupError) as caught:
        check_head(head, values, 2, 2, "v")
    assert str(caught.value) == message


def test_warm_up_named_checks_every_head_and_paces():
    from service.engines.base import warm_up_named

    manifest = v2([X_SPEC], [KIND, PRICE], members=2)

    def outputs(variance=1.0, fail=False):
        def run(x):
            if fail:
                raise ValueError("boom")
            rows = len(x["x"])
            return (np.full((rows, 2, 3), 1 / 3), np.zeros((rows, 2, 2)), np.full((rows, 2, 2), variance))
        return run

    engine = FakeEngine(outputs())
    ensemble = Ensemble(manifest, Path("/v"), engine)
    calls, pace = counter()
    assert warm_up_named(ensemble, (4, 1, 4), pace) is ensemble
    assert engine.calls == [{"x": (1, 2)}, {"x": (4, 2)}] and len(calls) == 2
    assert warm_up_named(ensemble, (1,)) is ensemble
    warm_up_named(Ensemble(manifest, Path("/v"), FakeEngine(outputs(variance=0.0))), (1,))
    for run, message in [(outputs(variance=-0.5), "the members' variances of head 'price' are negative"),
                         (outputs(variance=np.nan), "the members' variances of head 'price' are not finite (NaN or "
                                                    "infinity)"),
                         (outputs(fail=True), "warm-up on 1 rows failed: boom")]:
        with pytest.raises(WarmupError) as caught:
            warm_up_named(Ensemble(manifest, Path("/v"), FakeEngine(run)), (1,))
        assert str(caught.value) == message
    assert caught.value.__suppress_context__
    short = v2([X_SPEC], [KIND], members=2)
    with pytest.raises(WarmupError, match="^the members' values of head 'kind' have shape"):
        warm_up_named(Ensemble(short, Path("/v"), FakeEngine(lambda x: (np.full((1, 1, 3), 1 / 3),))), (1,))


def test_named_engine_calls_its_function_with_named_tensors():
    from service.engines.named import NamedEngine

    seen = []

    def fn(inputs):
        seen.append({k: (type(v), v.dtype) for k, v in inputs.items()})
        return [inputs["a"] * 2, inputs["b"]]

    owner = object()
    engine = NamedEngine(fn, ("a", "b"), owner=owner)
    got = engine.run({"b": np.array([[1, 2]], np.int32), "a": np.array([[0.5]], np.float32), "c": np.zeros(1)})
    assert isinstance(got, tuple) and got[0].tolist() == [[1.0]] and got[1].tolist() == [[1, 2]]
    assert list(seen[0]) == ["a", "b"] and engine.owner is owner and engine.kind == "tensorflow"


# -- for the survivors of the first run (mutation/run.py engines) ----------------------------------------

def test_the_child_s_peak_memory_is_its_kibibytes_in_mebibytes_and_its_answer_lands_whole(tmp_path, monkeypatch):
    import resource

    replaced = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append((Path(a), Path(b))) or real(a, b))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_module._answer(tmp_path / "graph.bin", {"ok": True})
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = json.loads((tmp_path / "graph.bin.result.json").read_text())["peak_rss_mb"]
    assert (peak * 1024).is_integer() and before <= peak * 1024 <= after
    assert replaced == [(tmp_path / "graph.bin.result.json.tmp", tmp_path / "graph.bin.result.json")]


def test_conversion_failure_reads_the_ops_after_the_first_colon():
    from service.engines.compile import conversion_failure

    assert conversion_failure(ValueError("TF Select ops: A, B (flex: see docs)")) == \
        "TensorFlow Lite has no kernels for A, B (flex: see docs)"


@pytest.mark.parametrize("settings, cores, plan", [((3, 0, 0, 1), 4, (3, 1, 3)), ((0, 0, 0, 2), 5, (1, 2, 1)),
                                                   ((2, 0, 0, 1), 5, (2, 2, 2))])
def test_thread_plan_counts_whole_threads(settings, cores, plan):
    got = thread_plan(*settings, cores)
    assert got == plan and all(type(n) is int for n in got)


def test_the_loader_keeps_the_version_s_path_and_paces_the_compile(tiny, tiny_compiled, monkeypatch, private_tmp,
                                                                   thread_calls):
    from dataclasses import replace

    import service.engines.compile as compile_module

    def compile_version(manifest, copy, pace):
        pace()
        return replace(tiny_compiled, lite=None)

    monkeypatch.setattr(compile_module, "compile_version", compile_version)
    calls, pace = counter()
    settings = Settings(isolated_loading=False, warmup_batch_sizes=(1,))
    ensemble = EngineLoader(settings, ThreadPlan(1, 1, 1))(tiny.manifest, tiny.vdir, pace)
    assert ensemble.engine.kind == "tensorflow" and ensemble.path == tiny.vdir
    assert len(calls) == 1 + 1 + 1 + 1  # before compiling, the compile's own, import_frozen's, one warm-up size


def test_named_lite_engine_defaults_threads_and_casts(named, monkeypatch):
    from service.engines.lite import load_named_lite
    from service.engines.named import compile_named

    lite = load_named_lite(named.manifest, named.vdir, compile_named(named.manifest, named.vdir).lite, (1,))
    assert lite.path == named.vdir and lite.engine.kind == "tflite"
    made = record_threads(monkeypatch)
    engine = NamedLiteEngine(lite.engine.model, ("x", "tokens"), 4)
    assert engine._idle.qsize() == 1 and made == [1]
    NamedLiteEngine(lite.engine.model, ("x", "tokens"), 4, threads=3, pool=2)
    assert made == [1, 3, 3]
    inputs = named_inputs(3, 5)
    wide = {"x": inputs["x"].astype(np.float64), "tokens": inputs["tokens"].astype(np.int64)}
    for a, b in zip(engine.run(wide), named_expected(named, inputs), strict=True):  # cast to the model's dtypes
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_named_conversion_keeps_its_owner_and_agrees_to_the_tolerance(named, monkeypatch, caplog):
    from service.engines.named import FAITHFUL_ROWS, converted, load_named

    ensemble = load_named(named.manifest, named.vdir, (1,))
    engine = ensemble.engine
    function, owner = engine.function, engine.owner
    with caplog.at_level(logging.WARNING):
        converted(ensemble, function, owner, 1, 1)
    assert not [r for r in caplog.records if "trackable_obj" in r.getMessage()]  # the owner's variables, not the
    # deprecated conversion path of a bare concrete function
    zeros = [np.zeros((FAITHFUL_ROWS, 2, k)) for k in (3, 1, 1, 1)]
    fake = Ensemble(named.manifest, named.vdir, FakeEngine(lambda x: tuple(zeros)))
    monkeypatch.setattr(NamedLiteEngine, "run", lambda self, x: tuple(z + 1e-5 for z in zeros))
    assert converted(fake, function, owner, 1, 1).path == named.vdir  # exactly the tolerance apart: agrees


def test_compile_version_warms_on_one_row_and_the_faithful_batch(tiny, monkeypatch):
    import service.engines.compile as compile_module

    sizes = []
    for name in ("load_members", "load_lite"):
        real = getattr(compile_module, name)

        def recording(*args, real=real, **kwargs):
            sizes.append(tuple(args[3] if real.__name__ == "load_lite" else args[2]))
            return real(*args, **kwargs)

        monkeypatch.setattr(compile_module, name, recording)
    compile_module.compile_version(tiny.manifest, tiny.vdir)
    assert sizes == [(1, 32), (1, 32)]


def test_eviction_skips_an_entry_gone_meanwhile_and_goes_on(tmp_path, monkeypatch):
    cache = CompileCache(tmp_path / "cache", keep=5)
    for version in range(1, 5):
        cache.put(cache_manifest(version), FAKE)
        os.utime(cache.path_of(cache_manifest(version)), (1_000_000 + version, 1_000_000 + version))
    real = Path.stat
    seen = []

    def stat_once_gone(self, *args, **kwargs):
        if self.suffix == ".graph" and not seen:  # the first entry looked at: evicted by another worker
            seen.append(self)
            raise FileNotFoundError(str(self))
        return real(self, *args, **kwargs)

    cache.keep = 2
    monkeypatch.setattr(Path, "stat", stat_once_gone)
    cache._evict()
    monkeypatch.setattr(Path, "stat", real)
    left = set((tmp_path / "cache").glob("*.graph"))
    assert seen[0] in left and len(left) == 3  # the two newest of the others, and the one not seen


def test_eviction_of_an_entry_removed_meanwhile_is_no_error(tmp_path, monkeypatch):
    cache = CompileCache(tmp_path / "cache", keep=5)
    for version in range(1, 4):
        cache.put(cache_manifest(version), FAKE)
        os.utime(cache.path_of(cache_manifest(version)), (1_000_000 + version, 1_000_000 + version))
    oldest = cache.path_of(cache_manifest(1))
    real = Path.stat

    def stat_then_gone(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        if self == oldest:  # another worker evicts it between our stat and our unlink
            os.unlink(self)
        return result

    cache.keep = 2
    monkeypatch.setattr(Path, "stat", stat_then_gone)
    cache._evict()
    monkeypatch.setattr(Path, "stat", real)
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.graph")) == sorted(
        cache.path_of(cache_manifest(v)).name for v in (2, 3))


def test_a_cached_version_is_read_without_waiting_for_the_lock(tmp_path):
    manifest = cache_manifest()
    CompileCache(tmp_path / "cache").put(manifest, FAKE)
    with HeldElsewhere(tmp_path / "cache", manifest):
        started = time.monotonic()
        assert CompileCache(tmp_path / "cache").get_or_compile(manifest, lambda: 1 / 0, 5) == FAKE
        assert time.monotonic() - started < 2


def test_a_version_compiled_elsewhere_while_waiting_is_read_not_compiled(tmp_path):
    manifest = cache_manifest()
    calls = []
    with HeldElsewhere(tmp_path / "cache", manifest) as elsewhere:
        def finish():
            CompileCache(tmp_path / "cache").put(manifest, FAKE)
            elsewhere.release.set()

        timer = threading.Timer(0.3, finish)
        timer.start()
        assert CompileCache(tmp_path / "cache").get_or_compile(manifest, lambda: calls.append(1) or FAKE, 10) == FAKE
        timer.join()
    assert calls == []


def test_compile_in_child_gives_the_child_no_stdin(fake_python, tmp_path):
    fake_python('if read line; then echo "read: $line" >&2; exit 9; fi\nexit 4')
    read, write = os.pipe()
    os.write(write, b"the server's input\n")
    os.close(write)
    saved = os.dup(0)
    os.dup2(read, 0)
    try:
        with pytest.raises(CompileFailed) as caught:
            compile_in_child(tmp_path, 5)
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(read)
    assert str(caught.value) == "the loading process exited with status 4 without an answer"


@pytest.mark.parametrize("body, message", [
    ("printf 'bad \\377 byte' >&2\nexit 3", "the loading process exited with status 3 without an answer: bad \ufffd byte"),
    ("exit 0", "the loading process exited with status 0 without an answer"),
])
def test_compile_in_child_reports_any_exit_without_an_answer(fake_python, tmp_path, body, message):
    fake_python(body)
    with pytest.raises(CompileFailed) as caught:
        compile_in_child(tmp_path, 5)
    assert str(caught.value) == message


def test_compile_in_child_logs_its_time_and_an_unknown_peak(fake_python, tmp_path, caplog):
    FAKE.write(tmp_path / "compiled.bin")
    fake_python(f'cp {tmp_path / "compiled.bin"} "$4"\nprintf \'{{"ok": true}}\' > "$4.result.json"')
    caplog.set_level(logging.INFO, logger="service.engines.child")
    assert compile_in_child(tmp_path, 5) == FAKE
    message = caplog.records[-1].getMessage()
    assert message.endswith(" s (its peak resident memory: nan MB)")
    seconds = float(message.split(" compiled by a child process in ")[1].split(" s ")[0])
    assert 0.0 <= seconds < 5.0


def test_the_cache_says_why_a_folder_or_entry_cannot_be_read(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="service.engines.compiled")
    (tmp_path / "file").write_text("x")
    assert CompileCache(tmp_path / "file" / "below").key() is None
    assert caplog.records[-1].getMessage() == (f"compile cache {tmp_path / 'file' / 'below'} not usable: [Errno 20] "
                                               f"Not a directory: '{tmp_path / 'file' / 'below'}'")
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    (folder / ".key").mkdir()
    assert CompileCache(folder).key() is None
    assert caplog.records[-1].getMessage() == (f"compile cache {folder} not used: [Errno 22] not a regular file: "
                                               f"'{folder / '.key'}'")
    cache = CompileCache(tmp_path / "other")
    cache.path_of(cache_manifest()).mkdir(parents=True)
    assert cache.get(cache_manifest()) is None
    path = cache.path_of(cache_manifest())
    assert caplog.records[-1].getMessage() == (f"ignoring unreadable compiled graph {path}: [Errno 22] not a "
                                               f"regular file: '{path}'")


def test_the_cache_folder_is_made_with_its_parents_and_its_key_beside_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-temporary-folder"))  # the key is made in place
    cache = CompileCache(tmp_path / "state" / "deep" / "compiled")
    assert cache.key() is not None and len(cache.key()) == 32
    assert stat.S_IMODE((tmp_path / "state" / "deep" / "compiled").stat().st_mode) == 0o700


def test_an_entry_of_the_signature_alone_is_unreadable_not_foreign(tmp_path, caplog):
    cache = CompileCache(tmp_path / "cache")
    manifest = cache_manifest()
    name = hashlib.sha256(manifest.model_dump_json().encode())
    name.update(tensorflow_version().encode())
    path = cache.path_of(manifest)
    path.write_bytes(hmac.new(cache.key(), name.hexdigest().encode(), hashlib.sha256).digest())  # 32 bytes, no data
    caplog.set_level(logging.WARNING, logger="service.engines.compiled")
    assert cache.get(manifest) is None
    assert caplog.records[-1].getMessage() == f"ignoring unreadable compiled graph {path}: {path} is not a frozen ensemble graph"


def test_load_lite_defaults_to_one_interpreter_of_one_thread(tiny, tiny_compiled):
    engine = load_lite(tiny.manifest, tiny.vdir, tiny_compiled.lite, (1,)).engine
    assert engine.threads == 1 and engine._idle.qsize() == 1


def test_load_named_defaults_and_keeps_its_members(named, caplog):
    import gc

    from service.engines.lite import load_named_lite
    from service.engines.named import compile_named, load_named

    with caplog.at_level(logging.WARNING):
        lite = load_named_lite(named.manifest, named.vdir, compile_named(named.manifest, named.vdir).lite, (1,))
    assert not [r for r in caplog.records if "trackable_obj" in r.getMessage()]
    assert (lite.engine.threads, lite.engine._idle.qsize()) == (1, 1)
    ensemble = load_named(named.manifest, named.vdir, (1,))
    engine = ensemble.engine
    assert ensemble.path == named.vdir and engine.kind == "tensorflow"
    function = engine.function
    (signature,) = function.structured_input_signature[0]
    assert signature["x"].shape.as_list() == [None, 2] and signature["tokens"].shape.as_list() == [None, None]
    owner = engine.owner
    assert [type(loaded).__name__ for loaded, _ in owner] != [] and len(owner) == 2
    del function, owner
    gc.collect()
    inputs = named_inputs(2, 3)
    for a, b in zip(engine.run(inputs), named_expected(named, inputs), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_freeze_without_the_folding_function_says_so(monkeypatch):
    import service.engines.tensorflow as tensorflow_module

    monkeypatch.setattr(tensorflow_module, "convert_variables_to_constants_v2", None)
    with pytest.raises(LoadError) as caught:
        tensorflow_module.freeze(object())
    assert str(caught.value) == "this TensorFlow cannot freeze a graph (no convert_variables_to_constants_v2)"


def test_check_probabilities_refuses_a_negative_value_in_a_row_summing_to_one():
    with pytest.raises(WarmupError, match=r"^x returned values outside \[0, 1\]: not probabilities$"):
        check_probabilities(np.array([[0.6, 0.6, -0.2], [1.0, 0.0, 0.0]]), 2, 3, "x")


def test_members_of_integer_inputs_are_assembled_at_their_dtype(tmp_path):
    from training.members import export_member

    from service.engines.keras_members import load_members

    keras.utils.set_random_seed(30)
    x = keras.Input((3,), dtype="int32")
    model = keras.Model(x, keras.layers.Dense(3, activation="softmax")(
        keras.layers.Flatten()(keras.layers.Embedding(10, 2)(x))))
    export_member(model, tmp_path / "exported" / "m0")
    manifest = write_v1(tmp_path / "ints" / "1", {"m0": tmp_path / "exported" / "m0"}, (1.0,), dtype="int32",
                        name="ints")
    ensemble = load_members(manifest, tmp_path / "ints" / "1", (1,))
    assert ensemble.path == tmp_path / "ints" / "1"
    rows = np.random.default_rng(3).integers(0, 10, size=(4, 3)).astype(np.int32)
    np.testing.assert_allclose(ensemble.predict(rows)[0], np.asarray(model(rows)), atol=1e-5)


def test_members_of_float64_inputs_are_assembled_and_compiled_at_their_dtype(tmp_path):
    """A TFSMLayer casts a float input to its own dtype (float32 by default) before calling the
    member, whose float64 signature then refused it: a format-1 version of float64 inputs failed
    with category `load` (found by the engines group's mutation run)."""
    from training.members import export_member

    from service.engines.compile import compile_version
    from service.engines.keras_members import load_members

    keras.utils.set_random_seed(31)
    x = keras.Input((3,), dtype="float64")
    model = keras.Model(x, keras.layers.Dense(3, activation="softmax", dtype="float64")(x))
    export_member(model, tmp_path / "exported" / "m0")
    vdir = tmp_path / "doubles" / "1"
    manifest = write_v1(vdir, {"m0": tmp_path / "exported" / "m0"}, (1.0,), dtype="float64", name="doubles")
    rows = np.random.default_rng(4).normal(size=(4, 3))  # float64, and values float32 would round
    expected = np.asarray(model(rows))
    ensemble = load_members(manifest, vdir, (1,))
    np.testing.assert_allclose(ensemble.predict(rows)[0], expected, atol=1e-5)
    compiled = compile_version(manifest, vdir)
    assert compiled.frozen


def test_order_outputs_wants_exactly_one_rank_3_and_two_rank_2_outputs():
    assert order_outputs(details(([1, 3], "Identity"), ([1, 4], "Identity_2"), ([5], "Identity_1"))) is None
    assert order_outputs(details(([1, 2, 3], "Identity_1"), ([1, 3], "Identity"), ([1, 4, 1, 1], "Identity_2"))) \
        is None


def test_the_tensorflow_engine_calls_a_concrete_function_flat(tiny, tiny_compiled):
    from service.engines.tensorflow import import_frozen

    engine = import_frozen(tiny.manifest, tiny.vdir, tiny_compiled.frozen, ()).engine
    assert engine._call is not engine.fn  # the flat entry point, not the public call


# -- a format-2 version's compilation (839c022: compiled in the child, as format 1's) --------------------

def test_named_compiled_bytes_exactly(tmp_path):
    from service.engines.compiled import NamedCompiled, compiled_from_bytes, read_compiled

    with_model, without = NamedCompiled(b"lite-bytes"), NamedCompiled(None, "no kernels")
    assert with_model.to_bytes() == b'ensemble-named/1\n{"reason": ""}\nlite-bytes'
    assert without.to_bytes() == b'ensemble-named/1\n{"reason": "no kernels"}\n'
    for compiled in (with_model, without, FAKE):
        assert compiled_from_bytes(compiled.to_bytes(), "x") == compiled
    without.write(tmp_path / "named.bin")
    assert read_compiled(tmp_path / "named.bin") == without
    for data in (b"ensemble-named/1\nnot json\n", b"ensemble-named/1\n{}\n", b"ensemble-named/1\n[1]\n"):
        with pytest.raises(LoadError, match="^x has a damaged header$"):
            compiled_from_bytes(data, "x")
    with pytest.raises(LoadError, match="^x is not a compiled format-2 version$"):
        NamedCompiled.from_bytes(FAKE.to_bytes(), "x")
    cache = CompileCache(tmp_path / "cache")
    cache.put(cache_manifest(), with_model)
    assert cache.get(cache_manifest()) == with_model


def test_the_child_s_main_compiles_a_format_2_version(named, tmp_path, monkeypatch, thread_calls):
    from service.engines.compiled import NamedCompiled, read_compiled

    monkeypatch.setattr(child_module, "_die_with_parent", lambda parent: None)
    monkeypatch.setattr(child_module, "_yield_the_cpu", lambda niceness: None)
    out = tmp_path / "named.bin"
    assert child_module.main([str(named.vdir), str(out), "1", "0"]) == 0
    compiled = read_compiled(out)
    assert isinstance(compiled, NamedCompiled) and compiled.lite[4:8] == b"TFL3" and compiled.reason == ""
    assert json.loads((tmp_path / "named.bin.result.json").read_text())["ok"] is True
