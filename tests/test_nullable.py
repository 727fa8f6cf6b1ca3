"""Missing values end to end: a format-2 version whose members impute a missing value themselves
(a float input's NaN gets an indicator and a fill value; a string input's empty string is its
own category, StringLookup's out-of-vocabulary one), published with `nullable: true` on both
inputs and served by a real `ensemble-serve` process. A client sends rows as its CSV holds them,
`null` where a cell is empty, and gets the members' combination of NaN and "" (computed here on
the members themselves); a null where the manifest takes none is a 422 naming the input.

The codecs' every path (row and columnar, Open Inference Protocol JSON, binary and messages,
TensorFlow Serving's Predict) is tested in process by tests/test_named_codec.py and
tests/test_named_messages.py."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import httpx
import numpy as np
import pytest

from contract import tasks
from contract.integrity import file_digests
from tests.conftest import free_port
from tests.server import ServerProcess

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")
from tests.tfs_grpc import tfs_predict  # noqa: E402

WEIGHTS = [0.4, 0.6]
INPUTS = [{"name": "age", "dtype": "float32"}, {"name": "sex", "dtype": "string", "nullable": True},
          {"name": "bmi", "dtype": "float32", "nullable": True}]
HEADS = [{"name": "risk", "task": "classification", "labels": ["low", "high"]}]
# Rows as a CSV with empty cells gives them, and as the members see them.
ROWS = [{"age": 41, "sex": "female", "bmi": None}, {"age": 30, "sex": None, "bmi": 31.5},
        {"age": 65, "sex": "male", "bmi": 24.0}, {"age": 52, "sex": None, "bmi": None}]
SEEN = {"age": np.array([41, 30, 65, 52], np.float32), "sex": np.array([b"female", b"", b"male", b""], dtype=object),
        "bmi": np.array([np.nan, 31.5, 24.0, np.nan], np.float32)}


def _imputing(seed: int):
    """A member that takes NaN in `bmi` (an indicator, and 25 in its place) and "" in `sex`."""
    keras.utils.set_random_seed(seed)
    age, bmi = keras.Input((), name="age"), keras.Input((), name="bmi")
    sex = keras.Input((), dtype="string", name="sex")
    missing = keras.ops.isnan(bmi)
    numbers = keras.ops.stack([age / 100.0, keras.ops.where(missing, 25.0, bmi) / 40.0,
                               keras.ops.cast(missing, "float32")], axis=-1)
    category = keras.layers.StringLookup(vocabulary=["female", "male"], output_mode="one_hot")(sex)
    h = keras.layers.Dense(6, activation="relu")(keras.layers.Concatenate()([numbers, category]))
    return keras.Model({"age": age, "sex": sex, "bmi": bmi}, keras.layers.Dense(2, activation="softmax")(h))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A repository holding health/1, its two members' combined answer to SEEN, and a server."""
    root = tmp_path_factory.mktemp("nullable")
    folder = root / "health" / "1"
    outs, entries = [], []
    for i, weight in enumerate(WEIGHTS):
        model = _imputing(20 + i)
        model.export(str(folder / "members" / f"m{i}"), verbose=False)
        outs.append(np.asarray(model({k: tf.constant(v) for k, v in SEEN.items()}, training=False)))
        entries.append({"name": f"m{i}", "path": f"members/m{i}", "kind": "imported", "weight": weight,
                        "files": file_digests(folder / "members" / f"m{i}")})
    manifest = {"format_version": 2, "name": "health", "version": 1, "created": datetime.now(timezone.utc).isoformat(),
                "inputs": INPUTS, "heads": HEADS, "members": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert np.all(np.isfinite(outs)) and not np.allclose(outs[0][0], outs[0][3])  # NaN imputed; rows differ
    expected = tasks.classification(np.stack(outs, axis=1), WEIGHTS).value
    port = free_port()
    server = ServerProcess(root, env={"ENSEMBLE_LOADER_DUTY_CYCLE": "1"}, args=["--grpc-port", str(port)])
    server.start(timeout=400)
    server.grpc = f"127.0.0.1:{port}"
    try:
        server.wait_live(1, "health", timeout=400)
        yield server, expected
    finally:
        server.kill()


def test_rows_with_nulls_are_answered_as_the_members_answer_nan_and_the_empty_string(published):
    server, expected = published
    reply = httpx.post(f"{server.base}/v1/models/health:predict", json={"instances": ROWS}, timeout=30)
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(reply.json()["predictions"], expected, atol=1e-5)
    columns = {name: [row[name] for row in ROWS] for name in ("age", "sex", "bmi")}
    reply = httpx.post(f"{server.base}/v1/models/health:predict", json={"inputs": columns}, timeout=30)
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(reply.json()["outputs"], expected, atol=1e-5)


def test_open_inference_protocol_nulls_and_tensorflow_serving_grpc_nan(published):
    server, expected = published
    body = {"inputs": [{"name": "age", "shape": [4], "datatype": "FP32", "data": SEEN["age"].tolist()},
                       {"name": "sex", "shape": [4], "datatype": "BYTES", "data": [r["sex"] for r in ROWS]},
                       {"name": "bmi", "shape": [4], "datatype": "FP32", "data": [r["bmi"] for r in ROWS]}]}
    reply = httpx.post(f"{server.base}/v2/models/health/infer", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(np.reshape(reply.json()["outputs"][0]["data"], (4, 2)), expected, atol=1e-5)
    np.testing.assert_allclose(tfs_predict(server.grpc, "health", SEEN, ["risk"])["risk"], expected, atol=1e-5)


def test_a_null_in_an_input_that_takes_no_missing_value_is_refused_naming_it(published):
    server, _ = published
    reply = httpx.post(f"{server.base}/v1/models/health:predict",
                       json={"instances": [dict(ROWS[0], age=None)]}, timeout=30)
    assert reply.status_code == 422
    assert reply.json() == {"error": "'instances[*].age' holds null (a missing value); input 'age' does not take "
                                     "missing values"}
    reply = httpx.post(f"{server.base}/v1/models/health:predict",
                       json={"instances": [dict(ROWS[0], bmi=1e39)]}, timeout=30)
    assert reply.status_code == 422
    assert reply.json() == {"error": "'instances[*].bmi' holds infinity in row 0 (or a number beyond the range of "
                                     "float32); input 'bmi' takes NaN as its missing value, not infinity"}
    meta = httpx.get(f"{server.base}/v2/models/health", timeout=30).json()
    assert meta["parameters"]["nullable"] == ["sex", "bmi"]
