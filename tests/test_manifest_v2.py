"""The manifest's format 2 (contract.manifest): named inputs of any dtype and shape, heads with
tasks, each calibrated and abstaining in its task's terms; format 1 read as before and seen
through the same signature. No TensorFlow."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from contract.manifest import (
    HeadSpec,
    Manifest,
    ManifestError,
    ManifestV2,
    Signature,
    TensorSpec,
    manifest_format,
    read_manifest,
)

DIGEST = "a" * 64
MEMBERS = [dict(name=f"m{i}", path=f"members/m{i}", kind="imported", weight=0.5, files={"saved_model.pb": DIGEST})
           for i in range(2)]


def v2(**kw) -> dict:
    base = dict(format_version=2, name="shop", version=1, created=datetime.now(timezone.utc).isoformat(),
                inputs=[{"name": "image", "dtype": "float32", "shape": [8, 8, 1]},
                        {"name": "tokens", "dtype": "int32", "shape": [None]},
                        {"name": "review", "dtype": "string"}],
                heads=[{"name": "kind", "task": "classification", "labels": ["a", "b", "c"], "temperatures": [1.5]},
                       {"name": "tags", "task": "multilabel", "labels": ["x", "y"], "temperatures": [1.0, 2.0]},
                       {"name": "spam", "task": "binary", "labels": ["ham", "spam"]},
                       {"name": "price", "task": "regression", "labels": ["price"], "variance": True,
                        "variance_scale": 1.3,
                        "abstention": {"score": "interval_width", "threshold": 4.0, "level": 0.9}}],
                members=MEMBERS)
    base.update(kw)
    return base


def write(root: Path, manifest: dict) -> Path:
    folder = root / manifest["name"] / str(manifest["version"])
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_format_2_manifest_reads_with_every_input_and_head(tmp_path):
    m = read_manifest(write(tmp_path, v2()))
    assert isinstance(m, ManifestV2) and m.format_version == 2
    assert [(i.name, i.dtype, i.shape, i.fixed) for i in m.inputs] == [
        ("image", "float32", (8, 8, 1), True), ("tokens", "int32", (None,), False), ("review", "string", (), True)]
    assert [(h.name, h.task, h.labels) for h in m.heads] == [
        ("kind", "classification", ("a", "b", "c")), ("tags", "multilabel", ("x", "y")),
        ("spam", "binary", ("ham", "spam")), ("price", "regression", ("price",))]
    price = m.heads[3]
    assert price.variance and price.variance_scale == 1.3 and price.abstention.level == 0.9
    assert m.signature() == Signature(inputs=m.inputs, heads=m.heads)
    assert m.weights == (0.5, 0.5)


def test_a_format_1_manifest_reads_as_before_and_shows_one_input_and_one_head(tmp_path):
    m = read_manifest(write(tmp_path, dict(
        name="digits", version=1, created=datetime.now(timezone.utc).isoformat(),
        input={"shape": [8, 8, 1]}, output={"classes": ["a", "b"]}, members=MEMBERS,
        calibration={"temperature": 1.2},
        abstention={"score": "entropy", "threshold": 0.4, "target_error": 0.05, "coverage": 0.9})))
    assert isinstance(m, Manifest) and m.format_version == 1 and m.temperature == 1.2
    sig = m.signature()
    assert sig.inputs == (TensorSpec(name="instances", dtype="float32", shape=(8, 8, 1)),)
    (head,) = sig.heads
    assert (head.name, head.task, head.labels, head.temperatures) == ("probabilities", "classification", ("a", "b"), (1.2,))
    assert (head.abstention.score, head.abstention.threshold) == ("entropy", 0.4)


@pytest.mark.parametrize("edit, problem", [
    (dict(inputs=[{"name": "a", "dtype": "float32"}, {"name": "a", "dtype": "string"}]), "input names must be unique"),
    (dict(inputs=[{"name": "a b", "dtype": "float32"}]), "inputs.0.name: String should match pattern"),
    (dict(inputs=[{"name": "a", "dtype": "float32", "shape": [0]}]), "every dimension must be a positive integer or null"),
    (dict(inputs=[{"name": "a", "dtype": "complex64"}]), "inputs.0.dtype: Input should be"),
    (dict(inputs=[]), "inputs: Tuple should have at least 1 item"),
    (dict(heads=[{"name": "k", "task": "classification", "labels": ["a"]}]), "needs at least two classes"),
    (dict(heads=[{"name": "k", "task": "binary", "labels": ["a", "b", "c"]}]), "a binary head has two labels"),
    (dict(heads=[{"name": "k", "task": "classification", "labels": ["a", "a"]}]), "labels must be unique"),
    (dict(heads=[{"name": "k", "task": "multilabel", "labels": ["a"], "variance": True}]), "only a regression head has a variance"),
    (dict(heads=[{"name": "k", "task": "multilabel", "labels": ["a", "b"], "temperatures": [1.0]}]),
     "a multilabel head has 2 temperature(s), got 1"),
    (dict(heads=[{"name": "k", "task": "regression", "labels": ["y"], "temperatures": [1.0]}]),
     "a regression head has 0 temperature(s), got 1"),
    (dict(heads=[{"name": "k", "task": "binary", "labels": ["a", "b"], "temperatures": [0.0]}]), "temperatures must be in (0, 100]"),
    (dict(heads=[{"name": "k", "task": "binary", "labels": ["a", "b"],
                  "abstention": {"score": "std", "threshold": 1}}]), "a binary head abstains on one of entropy, "),
    (dict(heads=[{"name": "k", "task": "regression", "labels": ["y"],
                  "abstention": {"score": "interval_width", "threshold": 1}}]), "an interval_width abstention, and only it, names its level"),
    (dict(heads=[{"name": "k", "task": "regression", "labels": ["y"],
                  "abstention": {"score": "std", "threshold": 1, "level": 0.9}}]), "an interval_width abstention, and only it"),
    (dict(heads=[{"name": "k", "task": "ranking", "labels": ["y"]}]), "heads.0.task: Input should be"),
    (dict(heads=[{"name": "k", "task": "regression", "labels": ["y"]}, {"name": "k", "task": "binary", "labels": ["a", "b"]}]),
     "head names must be unique"),
    (dict(input={"shape": [2]}), "input: Extra inputs are not permitted"),
])
def test_a_format_2_manifest_that_breaks_its_rules_is_refused_naming_what(tmp_path, edit, problem):
    with pytest.raises(ManifestError, match="does not follow the schema") as raised:
        read_manifest(write(tmp_path, v2(**edit)))
    assert problem in str(raised.value)


def test_the_format_a_manifest_declares_decides_its_schema():
    assert manifest_format(b'{"format_version": 2}') == 2
    assert manifest_format(b'{"format_version": 1}') == 1
    assert manifest_format(b'{"name": "x"}') == 1  # format 1 may leave it out
    for raw in (b"[1]", b"not json", b'{"format_version": 3}', b"[" * 100000):
        assert manifest_format(raw) == 1  # the format-1 schema then says what is wrong


def test_an_unknown_format_is_refused_by_the_schema(tmp_path):
    with pytest.raises(ManifestError, match=r"format_version: Input should be 1"):
        read_manifest(write(tmp_path, v2(format_version=3)))


def test_head_spec_and_tensor_spec_alone():
    assert TensorSpec(name="x", dtype="bool").shape == ()
    assert HeadSpec(name="y", task="regression", labels=("a", "b")).variance_scale == 1.0



# -- nullable inputs: the members take a missing value ------------------------------------------

def test_a_float_or_string_input_may_be_nullable_and_an_input_is_not_by_default(tmp_path):
    m = read_manifest(write(tmp_path, v2(inputs=[{"name": "bmi", "dtype": "float32", "nullable": True},
                                                 {"name": "weight", "dtype": "float64", "nullable": True},
                                                 {"name": "sex", "dtype": "string", "nullable": True},
                                                 {"name": "age", "dtype": "float32"}])))
    assert [(i.name, i.nullable) for i in m.inputs] == [("bmi", True), ("weight", True), ("sex", True),
                                                        ("age", False)]
    assert read_manifest(write(tmp_path / "old", v2())).inputs[0].nullable is False


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool"])
def test_an_input_of_another_dtype_cannot_be_nullable_and_the_manifest_names_it(tmp_path, dtype):
    inputs = [{"name": "image", "dtype": "float32", "nullable": True}, {"name": "count", "dtype": dtype, "nullable": True}]
    with pytest.raises(ManifestError, match="does not follow the schema") as raised:
        read_manifest(write(tmp_path, v2(inputs=inputs)))
    assert (f"inputs.1: Value error, input 'count' ({dtype}) cannot be nullable: only a float input (missing: NaN) "
            "or a string input (missing: the empty string) can") in str(raised.value)
    TensorSpec(name="count", dtype=dtype, nullable=False)  # saying it is not is fine


def test_a_manifest_without_nullable_inputs_serialises_as_before_the_field_existed(tmp_path):
    """The writer's bytes and the compile cache's digest (both model_dump_json) of a manifest
    without a nullable input do not change; a nullable input says so."""
    m = read_manifest(write(tmp_path, v2()))
    written = json.loads(m.model_dump_json())
    assert written["inputs"] == [{"name": "image", "dtype": "float32", "shape": [8, 8, 1]},
                                 {"name": "tokens", "dtype": "int32", "shape": [None]},
                                 {"name": "review", "dtype": "string", "shape": []}]
    assert "nullable" not in m.model_dump_json() and "nullable" not in str(m.model_dump())
    assert TensorSpec(name="x", dtype="float32", nullable=False).model_dump_json() == \
        '{"name":"x","dtype":"float32","shape":[]}'
    spec = TensorSpec(name="bmi", dtype="float32", nullable=True)
    assert spec.model_dump() == {"name": "bmi", "dtype": "float32", "shape": (), "nullable": True}
    again = ManifestV2.model_validate_json(m.model_copy(update={"inputs": (spec,)}).model_dump_json())
    assert again.inputs == (spec,)
