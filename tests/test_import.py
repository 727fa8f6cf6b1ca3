"""Bring your own members: SavedModels and .keras files become a servable version."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from service.engines.keras_members import load_members
from contract.integrity import verify_checksums
from contract.manifest import read_manifest
from training.cli import EXIT_FAILED, EXIT_OK, main
from training.importer import MemberImportError, import_members
from training.members import predict_saved_model


def keras_file(path, units=8, softmax=True):
    keras.utils.set_random_seed(units)
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, activation="softmax" if softmax else None)(keras.layers.Dense(units)(inputs))
    model = keras.Model(inputs, outputs)
    model.save(path)
    return model


def test_import_saved_models_and_keras_files_serves_their_average(trained_repository, tmp_path):
    member_dir = trained_repository / "digits" / "1" / read_manifest(trained_repository / "digits" / "1").members[0].path
    root = tmp_path / "models"
    manifest = import_members(root, "mixed-digits", [member_dir], classes=[str(i) for i in range(10)],
                              report=lambda _: None)
    vdir = root / "mixed-digits" / "1"
    verify_checksums(vdir, manifest)
    assert manifest.input.shape == (8, 8, 1) and manifest.members[0].kind == "imported"
    x = np.random.default_rng(0).uniform(0, 16, (5, 8, 8, 1)).astype("float32")
    ensemble = load_members(manifest, vdir, (1,))
    np.testing.assert_allclose(ensemble.predict(x)[0], predict_saved_model(member_dir, x), atol=1e-5)

    a, b = keras_file(tmp_path / "a.keras", 8), keras_file(tmp_path / "b.keras", 16)
    code = main(["import", "--name", "tabular", "--repository", str(root), "--classes", "x,y,z",
                 str(tmp_path / "a.keras"), str(tmp_path / "b.keras")])
    assert code == EXIT_OK
    manifest = read_manifest(root / "tabular" / "1")
    assert manifest.output.classes == ("x", "y", "z") and len(manifest.members) == 2
    v = np.random.default_rng(1).normal(size=(6, 4)).astype("float32")
    expected = (a.predict(v, verbose=0) + b.predict(v, verbose=0)) / 2
    np.testing.assert_allclose(load_members(manifest, root / "tabular" / "1", (1,)).predict(v)[0], expected, atol=1e-5)


def test_import_refuses_logits_mismatched_members_and_junk(tmp_path, capsys):
    keras_file(tmp_path / "logits.keras", softmax=False)
    with pytest.raises(MemberImportError, match="not probabilities"):
        import_members(tmp_path / "models", "x", [tmp_path / "logits.keras"], report=lambda _: None)
    keras_file(tmp_path / "ok.keras")
    with pytest.raises(MemberImportError, match="--classes names 2 labels but the members output 3"):
        import_members(tmp_path / "models", "x", [tmp_path / "ok.keras"], classes=["a", "b"], report=lambda _: None)
    (tmp_path / "junk.txt").write_text("x")
    code = main(["import", "--name", "x", "--repository", str(tmp_path / "models"), str(tmp_path / "junk.txt")])
    assert code == EXIT_FAILED and "not a SavedModel folder or a .keras file" in capsys.readouterr().err
    assert not (tmp_path / "models" / "x").exists() or not any((tmp_path / "models" / "x").iterdir())


def test_a_keras_file_that_would_run_python_while_loading_is_refused(tmp_path):
    """safe_mode=True is passed, not assumed: a Lambda layer's code is not deserialised."""
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Lambda(lambda x: x * 2)(inputs))
    keras.Model(inputs, outputs).save(tmp_path / "lambda.keras")
    with pytest.raises(MemberImportError, match="safe_mode"):
        import_members(tmp_path / "models", "x", [tmp_path / "lambda.keras"], report=lambda _: None)
    assert not (tmp_path / "models" / "x").exists()  # nothing published
