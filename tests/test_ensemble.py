"""Loading a published version and averaging its members, against the members called directly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from service.engines.base import LoadError, check_probabilities
from service.engines.keras_members import check_signature, load_members
from contract.manifest import InputSpec, read_manifest
from contract.scores import SCORES, served, uncertainty
from training.members import predict_saved_model


def member_probabilities(version_dir, manifest, x):
    return np.stack([predict_saved_model(version_dir / m.path, x) for m in manifest.members])


def test_ensemble_equals_the_calibrated_average_of_its_members(trained_repository, digits_test_split):
    vdir = trained_repository / "digits" / "1"
    manifest = read_manifest(vdir)
    ensemble = load_members(manifest, vdir, warmup_sizes=(1, 8))
    x = digits_test_split.x[:64]
    average, members, scores = ensemble.predict(x)
    direct = member_probabilities(vdir, manifest, x)
    np.testing.assert_allclose(members, direct.transpose(1, 0, 2), atol=1e-5)
    np.testing.assert_allclose(average, served(direct.transpose(1, 0, 2), manifest.weights, manifest.temperature),
                               atol=1e-5)
    # The uncertainty scores computed in the graph are contract.scores' (the contract's) definition.
    want = uncertainty(served(direct.transpose(1, 0, 2), manifest.weights, manifest.temperature),
                       direct.transpose(1, 0, 2), manifest.weights)
    np.testing.assert_allclose(scores[:, :3], want, atol=1e-5)
    a = manifest.abstention
    assert scores[:, 3].tolist() == (want[:, SCORES.index(a.score)] > a.threshold).astype(float).tolist()


def test_weighted_manifest_averages_with_its_weights(repository, digits_test_split):
    vdir = repository / "digits" / "1"
    raw = json.loads((vdir / "manifest.json").read_text())
    weights = [0.5, 0.2, 0.15, 0.1, 0.05]
    for m, w in zip(raw["members"], weights):
        m["weight"] = w
    (vdir / "manifest.json").write_text(json.dumps(raw))
    manifest = read_manifest(vdir)
    average = load_members(manifest, vdir, (1,)).predict(digits_test_split.x[:16])[0]
    direct = member_probabilities(vdir, manifest, digits_test_split.x[:16])
    np.testing.assert_allclose(average, served(direct.transpose(1, 0, 2), weights, manifest.temperature), atol=1e-5)


def test_member_with_other_input_shape_is_refused(repository):
    vdir = repository / "digits" / "1"
    raw = json.loads((vdir / "manifest.json").read_text())
    raw["input"]["shape"] = [64]
    (vdir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(LoadError, match=r"takes shape \[8, 8, 1\], manifest says \[64\]"):
        load_members(read_manifest(vdir), vdir, (1,))


def test_missing_member_folder_is_a_load_error(repository):
    vdir = repository / "digits" / "1"
    manifest = read_manifest(vdir)
    shutil.rmtree(vdir / manifest.members[1].path)
    with pytest.raises(LoadError, match="cannot load SavedModel"):
        load_members(manifest, vdir, (1,))


def test_check_signature_wants_one_input_of_the_right_dtype():
    spec = InputSpec(shape=(4,))
    check_signature("m", [tf.TensorSpec([None, 4], tf.float32)], spec)
    with pytest.raises(LoadError, match="takes 2 inputs"):
        check_signature("m", [tf.TensorSpec([None, 4])] * 2, spec)
    with pytest.raises(LoadError, match="dtype int32"):
        check_signature("m", [tf.TensorSpec([None, 4], tf.int32)], spec)


@pytest.mark.parametrize(
    "probs, message",
    [
        (np.array([[0.5, 0.5, 0.0]]), "shape"),
        (np.array([[np.nan, 1.0]]), "non-finite"),
        (np.array([[1.5, -0.5]]), "outside"),
        (np.array([[0.3, 0.3]]), "sums to 0.6"),
    ],
)
def test_check_probabilities_refuses_what_is_not_a_distribution(probs, message):
    with pytest.raises(LoadError, match=message):
        check_probabilities(probs, 1, 2, "m")
