"""Nine everyday Keras model shapes, each served as its members' combination through every
protocol and both transports, by a real `ensemble-serve` process and unchanged clients:
TensorFlow Serving REST (row and columnar) with httpx, the Open Inference Protocol over HTTP
(tritonclient.http, JSON and binary tensors) and gRPC (tritonclient.grpc), and TensorFlow
Serving's gRPC Predict (tensorflow-serving-api's stubs, TensorFlow's tensor protos).

The shapes are the ones Keras's guides build: a softmax, one sigmoid unit, k sigmoids, a linear
unit, two named inputs, two named heads, raw text with TextVectorization inside, named
mixed-type features with StringLookup inside, and integer tokens of any length. Two members
each, built here (no download), published as format-2 versions; every answer is checked
against the members' own outputs combined by the head's task (contract.tasks).

tritonclient brings its own definitions of the `inference` protocol, so this process never
imports the service's (service.protocols.gen)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import grpc
import httpx
import numpy as np
import pytest

from contract import tasks
from contract.integrity import file_digests
from tests.conftest import free_port
from tests.server import ServerProcess

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")
triton_grpc = pytest.importorskip("tritonclient.grpc")
triton_http = pytest.importorskip("tritonclient.http")
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from tests.tfs_grpc import tfs_predict  # noqa: E402

WEIGHTS = [0.4, 0.6]
ROWS = 3


def _dense_model(width: int, units: int, activation: str | None):
    def build():
        x = keras.Input((width,), name="features")
        h = keras.layers.Dense(8, activation="relu")(x)
        return keras.Model(x, keras.layers.Dense(units, activation=activation)(h))
    return build


def _two_inputs():
    image, vector = keras.Input((4, 4, 1), name="image"), keras.Input((3,), name="vector")
    h = keras.layers.Concatenate()([keras.layers.Flatten()(image), vector])
    return keras.Model({"image": image, "vector": vector}, keras.layers.Dense(3, activation="softmax")(h))


def _two_heads():
    x = keras.Input((5,), name="features")
    h = keras.layers.Dense(8, activation="relu")(x)
    return keras.Model(x, {"kind": keras.layers.Dense(3, activation="softmax", name="kind")(h),
                           "flag": keras.layers.Dense(1, activation="sigmoid", name="flag")(h)})


def _text():
    review = keras.Input((), dtype="string", name="review")
    vectorize = keras.layers.TextVectorization(max_tokens=30, output_sequence_length=5)
    vectorize.adapt(["a good film", "a bad film", "very good", "very bad indeed"])
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(30, 4)(vectorize(review)))
    return keras.Model(review, keras.layers.Dense(1, activation="sigmoid")(x))


def _mixed():
    age, city = keras.Input((1,), name="age"), keras.Input((1,), dtype="string", name="city")
    onehot = keras.layers.StringLookup(vocabulary=["paris", "oslo", "lima"], output_mode="one_hot")(city)
    h = keras.layers.Dense(6, activation="relu")(keras.layers.Concatenate()([age, onehot]))
    return keras.Model({"age": age, "city": city}, keras.layers.Dense(2, activation="softmax")(h))


def _tokens():
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(20, 4, mask_zero=True)(tokens))
    return keras.Model(tokens, keras.layers.Dense(2, activation="softmax")(x))


def _floats(*shape):
    return lambda rng: rng.uniform(-1, 1, size=(ROWS, *shape)).astype("float32")


# name -> (build, manifest inputs, manifest heads, {input: rows of it})
SHAPES = {
    "softmax": (_dense_model(6, 3, "softmax"), [{"name": "features", "dtype": "float32", "shape": [6]}],
                [{"name": "output_0", "task": "classification", "labels": ["a", "b", "c"]}],
                {"features": _floats(6)}),
    "binary": (_dense_model(4, 1, "sigmoid"), [{"name": "features", "dtype": "float32", "shape": [4]}],
               [{"name": "output_0", "task": "binary", "labels": ["no", "yes"]}], {"features": _floats(4)}),
    "multilabel": (_dense_model(4, 3, "sigmoid"), [{"name": "features", "dtype": "float32", "shape": [4]}],
                   [{"name": "output_0", "task": "multilabel", "labels": ["x", "y", "z"]}],
                   {"features": _floats(4)}),
    "regression": (_dense_model(4, 1, None), [{"name": "features", "dtype": "float32", "shape": [4]}],
                   [{"name": "output_0", "task": "regression", "labels": ["price"]}], {"features": _floats(4)}),
    "two_inputs": (_two_inputs, [{"name": "image", "dtype": "float32", "shape": [4, 4, 1]},
                                 {"name": "vector", "dtype": "float32", "shape": [3]}],
                   [{"name": "output_0", "task": "classification", "labels": ["a", "b", "c"]}],
                   {"image": _floats(4, 4, 1), "vector": _floats(3)}),
    "two_heads": (_two_heads, [{"name": "features", "dtype": "float32", "shape": [5]}],
                  [{"name": "kind", "task": "classification", "labels": ["a", "b", "c"]},
                   {"name": "flag", "task": "binary", "labels": ["no", "yes"]}], {"features": _floats(5)}),
    "text": (_text, [{"name": "review", "dtype": "string"}],
             [{"name": "output_0", "task": "binary", "labels": ["neg", "pos"]}],
             {"review": lambda rng: np.array([b"a good film", b"very bad indeed", b"caf\xc3\xa9 words"],
                                             dtype=object)}),
    "mixed": (_mixed, [{"name": "age", "dtype": "float32", "shape": [1]},
                       {"name": "city", "dtype": "string", "shape": [1]}],
              [{"name": "output_0", "task": "classification", "labels": ["stay", "leave"]}],
              {"age": _floats(1), "city": lambda rng: np.array([[b"paris"], [b"lima"], [b"nowhere"]], dtype=object)}),
    "tokens": (_tokens, [{"name": "tokens", "dtype": "int32", "shape": [None]}],
               [{"name": "output_0", "task": "classification", "labels": ["x", "y"]}],
               {"tokens": lambda rng: rng.integers(1, 20, size=(ROWS, 7)).astype("int32")}),
}
_DATATYPES = {"float32": "FP32", "int32": "INT32", "object": "BYTES"}


def _combined(head: dict, members: list[np.ndarray]) -> tasks.Combined:
    stacked = np.stack(members, axis=1)
    if head["task"] == "classification":
        return tasks.classification(stacked, WEIGHTS)
    if head["task"] in ("binary", "multilabel"):
        return tasks.labels(stacked, WEIGHTS)
    return tasks.regression(stacked, WEIGHTS)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A repository of one format-2 version per shape, and per shape its inputs and each head's
    expected value (the members' outputs combined)."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(7)
    expected = {}
    for name, (build, inputs, heads, makers) in SHAPES.items():
        folder = root / name / "1"
        x = {key: make(rng) for key, make in makers.items()}
        outs, entries = [], []
        for i, weight in enumerate(WEIGHTS):
            keras.utils.set_random_seed(10 * i + len(name))
            model = build()
            model.export(str(folder / "members" / f"m{i}"), verbose=False)
            given = {k: tf.constant(v) for k, v in x.items()}
            out = model(given if len(given) > 1 else next(iter(given.values())), training=False)
            outs.append(out if isinstance(out, dict) else {heads[0]["name"]: out})
            entries.append({"name": f"m{i}", "path": f"members/m{i}", "kind": "imported", "weight": weight,
                            "files": file_digests(folder / "members" / f"m{i}")})
        manifest = {"format_version": 2, "name": name, "version": 1, "created": datetime.now(timezone.utc).isoformat(),
                    "inputs": inputs, "heads": heads, "members": entries}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        combined = {h["name"]: _combined(h, [np.asarray(o[h["name"]]) for o in outs]) for h in heads}
        expected[name] = (x, {head: c.value for head, c in combined.items()}, combined)
    return root, expected


@pytest.fixture(scope="module")
def served(shapes, tmp_path_factory):
    root, _ = shapes
    # Nine versions, each compiled in its own child process: the loader at full speed, and time for all.
    port = free_port()
    server = ServerProcess(root, env={"ENSEMBLE_DEFAULT_MODEL": "two_heads", "ENSEMBLE_LOADER_DUTY_CYCLE": "1"},
                           args=["--grpc-port", str(port)]).start(timeout=400)
    server.grpc = f"127.0.0.1:{port}"
    for name in SHAPES:  # every version live before the tests ask
        server.wait_live(1, name, timeout=400)
    try:
        yield server
    finally:
        server.kill()


def _check(name: str, answers: dict[str, np.ndarray], expected: dict[str, np.ndarray], how: str) -> None:
    assert set(answers) == set(expected), how
    for head, want in expected.items():
        np.testing.assert_allclose(np.asarray(answers[head], dtype=np.float64).reshape(want.shape), want,
                                   atol=1e-5, err_msg=f"{name} head {head} via {how}")


def _json_value(array):
    """Rows (or one row's value) as JSON: bytes as text."""
    if isinstance(array, bytes):
        return array.decode()
    if array.dtype == object:
        return np.vectorize(lambda b: b.decode(), otypes=[object])(array).tolist()
    return array.tolist()


@pytest.mark.parametrize("name", list(SHAPES))
def test_tensorflow_serving_rest_rows_and_columns(served, shapes, name):
    x, expected, _ = shapes[1][name]
    heads = list(expected)
    rows = [{k: _json_value(v[i]) for k, v in x.items()} for i in range(ROWS)]
    body = httpx.post(f"{served.base}/v1/models/{name}:predict", json={"instances": rows}, timeout=30)
    assert body.status_code == 200, body.text
    predictions = body.json()["predictions"]
    answers = ({h: [p[h] for p in predictions] for h in heads} if len(heads) > 1 else {heads[0]: predictions})
    _check(name, answers, expected, "TFS REST rows")
    columns = httpx.post(f"{served.base}/v1/models/{name}:predict",
                         json={"inputs": {k: _json_value(v) for k, v in x.items()}}, timeout=30)
    assert columns.status_code == 200, columns.text
    outputs = columns.json()["outputs"]
    _check(name, outputs if len(heads) > 1 else {heads[0]: outputs}, expected, "TFS REST columns")


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_open_inference_protocol_over_http_with_tritonclient(served, shapes, name, binary):
    x, expected, _ = shapes[1][name]
    client = triton_http.InferenceServerClient(served.base.removeprefix("http://"))
    inputs = []
    for key, array in x.items():
        tensor = triton_http.InferInput(key, list(array.shape), _DATATYPES[array.dtype.name])
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    outputs = [triton_http.InferRequestedOutput(h, binary_data=binary) for h in expected]
    result = client.infer(name, inputs, outputs=outputs)
    _check(name, {h: result.as_numpy(h) for h in expected}, expected, f"OIP HTTP ({'binary' if binary else 'JSON'})")
    meta = client.get_model_metadata(name)
    assert [i["name"] for i in meta["inputs"]] == list(x)
    assert {o["name"] for o in meta["outputs"]} >= set(expected)


@pytest.mark.parametrize("name", list(SHAPES))
def test_open_inference_protocol_over_grpc_with_tritonclient(served, shapes, name):
    x, expected, _ = shapes[1][name]
    client = triton_grpc.InferenceServerClient(served.grpc)
    inputs = []
    for key, array in x.items():
        tensor = triton_grpc.InferInput(key, list(array.shape), _DATATYPES[array.dtype.name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(name, inputs)  # no outputs named: every head's value
    _check(name, {h: result.as_numpy(h) for h in expected}, expected, "OIP gRPC")
    meta = client.get_model_metadata(name)
    assert [i.name for i in meta.inputs] == list(x)


@pytest.mark.parametrize("name", list(SHAPES))
def test_tensorflow_serving_grpc_predict(served, shapes, name):
    x, expected, _ = shapes[1][name]
    _check(name, tfs_predict(served.grpc, name, x, list(expected)), expected, "TFS gRPC")


def test_slash_predict_answers_the_default_ensemble(served, shapes):
    x, expected, _ = shapes[1]["two_heads"]
    reply = httpx.post(f"{served.base}/predict", json={"instances": x["features"].tolist()}, timeout=30).json()
    _check("two_heads", {h: [p[h] for p in reply["predictions"]] for h in expected}, expected, "/predict")


def test_named_inputs_to_a_grpc_server_refused_with_the_input_named(served):
    client = triton_grpc.InferenceServerClient(served.grpc)
    tensor = triton_grpc.InferInput("review", [1], "FP32")
    tensor.set_data_from_numpy(np.zeros(1, np.float32))
    with pytest.raises(Exception) as caught:
        client.infer("text", [tensor])
    assert "input 'review' (string) takes BYTES" in str(caught.value)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mixed"
    request.inputs["age"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 1), np.float32)))
    with grpc.insecure_channel(served.grpc) as channel, pytest.raises(grpc.RpcError) as error:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing inputs ['city']" in error.value.details()


def test_a_regression_interval_at_the_level_a_kserve_client_asks_over_grpc_and_http(served, shapes):
    x, _, combined = shapes[1]["regression"]
    lower, upper = tasks.interval(combined["output_0"], 0.8)
    for module, address in ((triton_grpc, served.grpc), (triton_http, served.base.removeprefix("http://"))):
        tensor = module.InferInput("features", list(x["features"].shape), "FP32")
        tensor.set_data_from_numpy(x["features"])
        outputs = [module.InferRequestedOutput(n) for n in ("output_0.lower", "output_0.upper")]
        result = module.InferenceServerClient(address).infer("regression", [tensor], outputs=outputs,
                                                             parameters={"interval": 0.8})
        np.testing.assert_allclose(result.as_numpy("output_0.lower"), lower, atol=1e-4, err_msg=module.__name__)
        np.testing.assert_allclose(result.as_numpy("output_0.upper"), upper, atol=1e-4, err_msg=module.__name__)
