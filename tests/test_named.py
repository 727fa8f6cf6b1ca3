"""Format-2 versions served end to end: small Keras members of four shapes (two named inputs with
two heads; raw text with TextVectorization inside; a Gaussian regression head; integer tokens of
any length), published with a format-2 manifest, loaded by the service and asked through
`POST /v1/models/NAME:predict` and `/predict`. Each answer is checked against the members'
own outputs combined by the head's task (contract.tasks); bad input gets a 4xx naming what."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from contract import tasks
from contract.integrity import file_digests
from tests.test_api import wait_for as wait

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")


def _multi(seed: int):
    keras.utils.set_random_seed(seed)
    image = keras.Input((4, 4, 1), name="image")
    meta = keras.Input((3,), name="meta")
    h = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([keras.layers.Flatten()(image), meta]))
    kind = keras.layers.Dense(3, activation="softmax", name="kind")(h)
    flag = keras.layers.Dense(1, activation="sigmoid", name="flag")(h)
    return keras.Model({"image": image, "meta": meta}, {"kind": kind, "flag": flag})


def _text(seed: int):
    keras.utils.set_random_seed(seed)
    review = keras.Input((), dtype="string", name="review")
    vectorize = keras.layers.TextVectorization(max_tokens=40, output_sequence_length=6)
    vectorize.adapt(["a good film", "a bad film", "very good", "very bad indeed"])
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(40, 4)(vectorize(review)))
    return keras.Model(review, keras.layers.Dense(1, activation="sigmoid")(x))


def _gaussian(seed: int):
    keras.utils.set_random_seed(seed)
    x = keras.Input((2,), name="features")
    h = keras.layers.Dense(6, activation="relu")(x)
    mean = keras.layers.Dense(1)(h)
    variance = keras.layers.Dense(1, activation="softplus")(h)
    return keras.Model(x, keras.layers.Concatenate(name="price")([mean, variance]))


def _tokens(seed: int):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(20, 4, mask_zero=True)(tokens))
    return keras.Model(tokens, keras.layers.Dense(2, activation="softmax")(x))


SHAPES = {
    "multi": (_multi, [{"name": "image", "dtype": "float32", "shape": [4, 4, 1]},
                       {"name": "meta", "dtype": "float32", "shape": [3]}],
              [{"name": "kind", "task": "classification", "labels": ["a", "b", "c"], "temperatures": [1.5]},
               {"name": "flag", "task": "binary", "labels": ["no", "yes"]}]),
    "text": (_text, [{"name": "review", "dtype": "string"}],
             [{"name": "positive", "task": "binary", "labels": ["neg", "pos"],
               "abstention": {"score": "mutual_information", "threshold": -1.0}}]),
    "gauss": (_gaussian, [{"name": "features", "dtype": "float32", "shape": [2]}],
              [{"name": "price", "task": "regression", "labels": ["price"], "variance": True,
                "variance_scale": 2.0}]),
    "tokens": (_tokens, [{"name": "tokens", "dtype": "int32", "shape": [None]}],
               [{"name": "label", "task": "classification", "labels": ["x", "y"]}]),
}
WEIGHTS = [0.25, 0.75]


@pytest.fixture(scope="module")
def named_repository(tmp_path_factory) -> tuple[Path, dict]:
    """A repository with one format-2 version of each shape, two members each; and the members
    (Keras models) to compare with."""
    root = tmp_path_factory.mktemp("named")
    models = {}
    for name, (build, inputs, heads) in SHAPES.items():
        folder = root / name / "1"
        entries, built = [], []
        for i, weight in enumerate(WEIGHTS):
            model = build(100 + i)
            model.export(str(folder / "members" / f"m{i}"), verbose=False)
            built.append(model)
            entries.append({"name": f"m{i}", "path": f"members/m{i}", "kind": "imported", "weight": weight,
                            "files": file_digests(folder / "members" / f"m{i}")})
        manifest = {"format_version": 2, "name": name, "version": 1,
                    "created": datetime.now(timezone.utc).isoformat(), "inputs": inputs, "heads": heads,
                    "members": entries}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        models[name] = built
    # "mismatch": the text members under a manifest naming an input they do not take
    source = root / "text" / "1"
    folder = root / "mismatch" / "1"
    folder.mkdir(parents=True)
    import shutil
    shutil.copytree(source / "members", folder / "members")
    manifest = json.loads((source / "manifest.json").read_text())
    manifest.update(name="mismatch", inputs=[{"name": "comment", "dtype": "string"}])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return root, models


@pytest.fixture(scope="module")
def client(named_repository):
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from service.app import create_app
    from service.config import Settings
    from service.metrics import ServiceMetrics

    root, _ = named_repository
    settings = Settings(repository=root, poll_interval_seconds=0.2, warmup_batch_sizes=(1, 3),
                        isolated_loading=False, default_model="multi")
    with TestClient(create_app(settings, ServiceMetrics(CollectorRegistry()))) as c:
        for name in SHAPES:
            assert wait(lambda: c.get(f"/v2/models/{name}/ready").status_code == 200 or
                        c.post(f"/v1/models/{name}:predict", json={"instances": []}).status_code != 503), name
        yield c


def member_outputs(models, inputs) -> list:
    return [model(inputs, training=False) for model in models]


def test_two_named_inputs_and_two_heads_answer_as_their_members_combined(client, named_repository):
    _, models = named_repository
    rng = np.random.default_rng(0)
    image, meta = rng.uniform(size=(3, 4, 4, 1)).astype("float32"), rng.uniform(size=(3, 3)).astype("float32")
    rows = [{"image": image[i].tolist(), "meta": meta[i].tolist()} for i in range(3)]
    resp = client.post("/v1/models/multi:predict?uncertainty=true&members=true", json={"instances": rows})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    outs = member_outputs(models["multi"], {"image": image, "meta": meta})
    kind = tasks.classification(np.stack([np.asarray(o["kind"]) for o in outs], axis=1), WEIGHTS, 1.5)
    flag = tasks.labels(np.stack([np.asarray(o["flag"]) for o in outs], axis=1), WEIGHTS)
    assert [set(p) for p in body["predictions"]] == [{"kind", "flag"}] * 3  # one object per row, by head
    np.testing.assert_allclose([p["kind"] for p in body["predictions"]], kind.value, atol=1e-5)
    np.testing.assert_allclose([p["flag"] for p in body["predictions"]], flag.value, atol=1e-5)
    heads = body["heads"]
    assert heads["kind"]["task"] == "classification" and heads["kind"]["labels"] == ["a", "b", "c"]
    assert heads["kind"]["predicted"] == [["a", "b", "c"][i] for i in kind.value.argmax(axis=1)]
    assert heads["flag"]["predicted"] == [["no", "yes"][int(p >= 0.5)] for p in flag.value[:, 0]]
    np.testing.assert_allclose(heads["kind"]["uncertainty"]["mutual_information"],
                               kind.scores["mutual_information"], atol=1e-5)
    np.testing.assert_allclose(heads["flag"]["members"]["m1"], np.asarray(outs[1]["flag"]), atol=1e-5)
    # the same through /predict (the default ensemble) and columnar
    assert client.post("/predict", json={"instances": rows}).json()["predictions"] == body["predictions"]
    columnar = client.post("/v1/models/multi:predict", json={"inputs": {"image": image.tolist(), "meta": meta.tolist()}})
    np.testing.assert_allclose(columnar.json()["outputs"]["kind"], kind.value, atol=1e-5)


def test_raw_text_is_served_and_strings_may_come_as_base64(client, named_repository):
    import base64

    _, models = named_repository
    texts = ["a good film", "very bad indeed", "unknown words here"]
    resp = client.post("/v1/models/text:predict?uncertainty=true",
                       json={"instances": texts[:2] + [{"b64": base64.b64encode(texts[2].encode()).decode()}]})
    assert resp.status_code == 200, resp.text
    outs = member_outputs(models["text"], tf.constant(texts))
    want = tasks.labels(np.stack([np.asarray(o) for o in outs], axis=1), WEIGHTS)
    np.testing.assert_allclose(resp.json()["predictions"], want.value, atol=1e-5)
    head = resp.json()["heads"]["positive"]
    np.testing.assert_allclose(head["uncertainty"]["mutual_information"], want.scores["mutual_information"], atol=1e-5)
    # its rule (mutual information above -1) holds for every row; a head without a rule has no abstain
    assert head["abstain"] == [True, True, True]
    assert "abstain" not in client.post("/v1/models/tokens:predict?uncertainty=true",
                                        json={"instances": [[1, 2]]}).json()["heads"]["label"]


def test_a_gaussian_regression_head_is_the_members_mixture_with_its_interval(client, named_repository):
    _, models = named_repository
    x = np.array([[0.1, 0.2], [1.0, -1.0]], np.float32)
    resp = client.post("/v1/models/gauss:predict?uncertainty=true&interval=0.9", json={"instances": x.tolist()})
    assert resp.status_code == 200, resp.text
    outs = np.stack([np.asarray(m(x, training=False)) for m in models["gauss"]], axis=1)  # (rows, members, 2)
    want = tasks.regression(outs[:, :, :1], WEIGHTS, 2.0, outs[:, :, 1:])
    body = resp.json()
    np.testing.assert_allclose(body["predictions"], want.value, atol=1e-5)
    head = body["heads"]["price"]
    np.testing.assert_allclose(head["uncertainty"]["std"], want.scores["std"], atol=1e-5)
    lower, upper = tasks.interval(want, 0.9)
    np.testing.assert_allclose(head["interval"]["lower"], lower, atol=1e-4)
    np.testing.assert_allclose(head["interval"]["upper"], upper, atol=1e-4)
    assert client.post("/v1/models/gauss:predict?interval=2", json={"instances": x.tolist()}).status_code == 422


def test_tokens_of_any_length_sent_at_once_each_get_their_own_answer(client, named_repository):
    from concurrent.futures import ThreadPoolExecutor

    _, models = named_repository
    requests = [[[1, 2, 3]], [[4, 5], [6, 7]], [[1, 2, 3, 4, 5, 6, 7]], [[7, 6, 5]], [[3, 3]]] * 4
    with ThreadPoolExecutor(8) as pool:  # concurrent: lengths meet in the batcher's queue
        replies = list(pool.map(lambda tokens: client.post("/v1/models/tokens:predict", json={"instances": tokens}),
                                requests))
    for tokens, resp in zip(requests, replies):
        assert resp.status_code == 200, resp.text
        x = np.array(tokens, np.int32)
        outs = np.stack([np.asarray(m(x, training=False)) for m in models["tokens"]], axis=1)
        np.testing.assert_allclose(resp.json()["predictions"], tasks.classification(outs, WEIGHTS).value, atol=1e-5)


@pytest.mark.parametrize("name, body, status, says", [
    ("multi", {"instances": [{"image": [[[0.0]] * 4] * 4}]}, 422, "missing ['meta']"),
    ("multi", {"instances": [{"image": [[[0.0]] * 4] * 4, "meta": [0, 0, 0], "extra": 1}]}, 422, "unknown ['extra']"),
    ("multi", {"instances": [{"image": [[[0.0]] * 4] * 4, "meta": ["a", "b", "c"]}]}, 422, "must hold numbers only"),
    ("multi", {"instances": [{"image": [[[0.0]] * 4] * 4, "meta": [0, 0]}]}, 422, "input 'meta' must have shape [3]"),
    ("text", {"instances": [5]}, 422, "must hold strings"),
    ("text", {"instances": [{"b64": "!!!"}]}, 422, "invalid base64"),
    ("tokens", {"instances": [[1, 2], [3]]}, 422, "ragged"),
    ("tokens", {"instances": [[1.5, 2]]}, 422, "whole numbers"),
    ("tokens", {"instances": [[]]}, 422, "has a dimension of length 0"),
    ("text", {"instances": [["a", "b"], ["c"]]}, 422, "ragged"),
    ("multi", {"inputs": {"image": [[[[0.0]] * 4] * 4], "meta": [[0, 0, 0], [1, 1, 1]]}}, 422, "different numbers of rows"),
])
def test_bad_named_input_is_a_4xx_naming_the_input(client, name, body, status, says):
    resp = client.post(f"/v1/models/{name}:predict", json=body)
    assert resp.status_code == status, resp.text
    assert says in resp.json()["error"]


def oip_tensor(name: str, array: np.ndarray, datatype: str) -> dict:
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.reshape(-1).tolist()}


def bytes_elements(values: list[bytes]) -> bytes:
    """The Open Inference Protocol's BYTES serialisation: a 4-byte little-endian length, then the bytes."""
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


def test_the_open_inference_protocol_serves_named_inputs_and_every_heads_outputs(client, named_repository):
    _, models = named_repository
    rng = np.random.default_rng(1)
    image, meta = rng.uniform(size=(2, 4, 4, 1)).astype("float32"), rng.uniform(size=(2, 3)).astype("float32")
    outs = member_outputs(models["multi"], {"image": image, "meta": meta})
    kind = tasks.classification(np.stack([np.asarray(o["kind"]) for o in outs], axis=1), WEIGHTS, 1.5)
    flag = tasks.labels(np.stack([np.asarray(o["flag"]) for o in outs], axis=1), WEIGHTS)
    # the inputs in any order, one of them an integer datatype (cast to the input's float32)
    body = {"id": "r7", "inputs": [oip_tensor("meta", meta, "FP32"), oip_tensor("image", image, "FP64")]}
    resp = client.post("/v2/models/multi/infer", json=body)
    assert resp.status_code == 200, resp.text
    got = {o["name"]: o for o in resp.json()["outputs"]}
    assert resp.json()["id"] == "r7" and list(got) == ["kind", "flag"]  # every head's value by default
    assert got["kind"]["shape"] == [2, 3] and got["kind"]["datatype"] == "FP32"
    np.testing.assert_allclose(np.reshape(got["kind"]["data"], (2, 3)), kind.value, atol=1e-5)
    np.testing.assert_allclose(np.reshape(got["flag"]["data"], (2, 1)), flag.value, atol=1e-5)
    wanted = ["kind.members", "kind.label", "kind.mutual_information", "flag.entropy", "flag.label"]
    resp = client.post("/v2/models/multi/infer", json={**body, "outputs": [{"name": n} for n in wanted]})
    got = {o["name"]: o for o in resp.json()["outputs"]}
    assert list(got) == wanted
    assert got["kind.members"]["shape"] == [2, 2, 3]
    np.testing.assert_allclose(np.reshape(got["kind.members"]["data"], (2, 2, 3))[:, 1], outs[1]["kind"], atol=1e-5)
    assert got["kind.label"] == {"name": "kind.label", "shape": [2], "datatype": "BYTES",
                                 "data": [["a", "b", "c"][i] for i in kind.value.argmax(axis=1)]}
    np.testing.assert_allclose(got["kind.mutual_information"]["data"], kind.scores["mutual_information"], atol=1e-5)
    assert got["flag.entropy"]["shape"] == [2, 1]
    assert got["flag.label"]["data"] == [["no", "yes"][int(p >= 0.5)] for p in flag.value[:, 0]]
    # metadata lists every input, every output tensor and each head's task
    meta_reply = client.get("/v2/models/multi").json()
    assert meta_reply["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 4, 4, 1]},
                                    {"name": "meta", "datatype": "FP32", "shape": [-1, 3]}]
    listed = {o["name"]: o for o in meta_reply["outputs"]}
    assert listed["kind"] == {"name": "kind", "datatype": "FP32", "shape": [-1, 3]}
    assert listed["kind.members"]["shape"] == [-1, 2, 3] and listed["flag.label"]["datatype"] == "BYTES"
    assert meta_reply["parameters"]["heads"] == {"kind": {"task": "classification", "labels": ["a", "b", "c"]},
                                                 "flag": {"task": "binary", "labels": ["no", "yes"]}}
    assert client.get("/v2/models/tokens").json()["inputs"] == [{"name": "tokens", "datatype": "INT32",
                                                                 "shape": [-1, -1]}]


def test_binary_bytes_tensors_in_and_out(client, named_repository):
    _, models = named_repository
    texts = [b"a good film", b"very bad indeed", "caf\u00e9 bad".encode()]
    blob = bytes_elements(texts)
    header = json.dumps({"inputs": [{"name": "review", "shape": [3], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "positive", "parameters": {"binary_data": True}},
                                     {"name": "positive.label", "parameters": {"binary_data": True}},
                                     {"name": "positive.abstain"}]}).encode()
    resp = client.post("/v2/models/text/infer", content=header + blob,
                       headers={"Inference-Header-Content-Length": str(len(header))})
    assert resp.status_code == 200, resp.text
    length = int(resp.headers["inference-header-content-length"])
    head, raw = json.loads(resp.content[:length]), resp.content[length:]
    outs = member_outputs(models["text"], tf.constant(texts))
    want = tasks.labels(np.stack([np.asarray(o) for o in outs], axis=1), WEIGHTS)
    positive, label, abstain = head["outputs"]
    np.testing.assert_allclose(np.frombuffer(raw[:12], "<f4").reshape(3, 1), want.value, atol=1e-5)
    assert label["datatype"] == "BYTES" and label["parameters"]["binary_data_size"] == len(raw) - 12
    labels = [["neg", "pos"][int(p >= 0.5)].encode() for p in want.value[:, 0]]
    assert raw[12:] == bytes_elements(labels)
    assert abstain == {"name": "positive.abstain", "shape": [3], "datatype": "BOOL", "data": [True, True, True]}
    # the same strings as JSON data
    resp = client.post("/v2/models/text/infer", json={"inputs": [
        {"name": "review", "shape": [3], "datatype": "BYTES", "data": [t.decode() for t in texts]}]})
    np.testing.assert_allclose(resp.json()["outputs"][0]["data"], want.value[:, 0], atol=1e-5)


def test_a_regression_heads_interval_at_the_level_asked(client, named_repository):
    _, models = named_repository
    x = np.array([[0.1, 0.2], [1.0, -1.0]], np.float32)
    outs = np.stack([np.asarray(m(x, training=False)) for m in models["gauss"]], axis=1)
    want = tasks.regression(outs[:, :, :1], WEIGHTS, 2.0, outs[:, :, 1:])
    names = ["price", "price.lower", "price.upper", "price.variance", "price.epistemic_std"]
    resp = client.post("/v2/models/gauss/infer", json={"inputs": [oip_tensor("features", x, "FP32")],
                                                       "parameters": {"interval": 0.8},
                                                       "outputs": [{"name": n} for n in names]})
    assert resp.status_code == 200, resp.text
    got = {o["name"]: np.reshape(o["data"], o["shape"]) for o in resp.json()["outputs"]}
    lower, upper = tasks.interval(want, 0.8)
    np.testing.assert_allclose(got["price"], want.value, atol=1e-5)
    np.testing.assert_allclose(got["price.lower"], lower, atol=1e-4)
    np.testing.assert_allclose(got["price.upper"], upper, atol=1e-4)
    np.testing.assert_allclose(got["price.variance"], want.variance, rtol=1e-4)
    np.testing.assert_allclose(got["price.epistemic_std"], want.scores["epistemic_std"], atol=1e-5)
    default = client.post("/v2/models/gauss/infer", json={"inputs": [oip_tensor("features", x, "FP32")],
                                                          "outputs": [{"name": "price.lower"}]}).json()
    np.testing.assert_allclose(np.reshape(default["outputs"][0]["data"], (2, 1)), tasks.interval(want, 0.9)[0],
                               atol=1e-4)


def test_tokens_of_any_length_through_the_open_inference_protocol(client, named_repository):
    _, models = named_repository
    x = np.array([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]], np.int32)
    resp = client.post("/v2/models/tokens/infer", json={"inputs": [oip_tensor("tokens", x, "INT64")]})
    assert resp.status_code == 200, resp.text
    outs = np.stack([np.asarray(m(x, training=False)) for m in models["tokens"]], axis=1)
    np.testing.assert_allclose(np.reshape(resp.json()["outputs"][0]["data"], (2, 2)),
                               tasks.classification(outs, WEIGHTS).value, atol=1e-5)


_IMAGE = np.zeros((1, 4, 4, 1), np.float32)
_META = np.zeros((1, 3), np.float32)


@pytest.mark.parametrize("name, body, says", [
    ("multi", {"inputs": [oip_tensor("image", _IMAGE, "FP32")]}, "missing inputs ['meta']"),
    ("multi", {"inputs": [oip_tensor("image", _IMAGE, "FP32"), oip_tensor("meta", _META, "FP32"),
                          oip_tensor("x", _META, "FP32")]}, "inputs[2] names input 'x'; this model's inputs are"),
    ("multi", {"inputs": [oip_tensor("image", _IMAGE, "FP32"), oip_tensor("image", _IMAGE, "FP32")]},
     "input 'image' is given twice"),
    ("multi", {"inputs": [oip_tensor("image", _IMAGE, "FP32"), oip_tensor("meta", _META[:, :2], "FP32")]},
     "input 'meta' must have shape [rows, 3], got [1, 2]"),
    ("multi", {"inputs": [oip_tensor("image", _IMAGE, "FP32"), oip_tensor("meta", np.zeros((2, 3)), "FP32")]},
     "different numbers of rows"),
    ("multi", {"inputs": [oip_tensor("image", _IMAGE, "BYTES"), oip_tensor("meta", _META, "FP32")]},
     "input 'image' (float32) takes FP32"),
    ("text", {"inputs": [{"name": "review", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
     "input 'review' (string) takes BYTES"),
    ("text", {"inputs": [{"name": "review", "shape": [1], "datatype": "BYTES", "data": [1.0]}]}, "must hold strings"),
    ("text", {"inputs": [{"name": "review", "shape": [2], "datatype": "BYTES", "data": ["a"]}]},
     "holds 1 values; shape [2] needs 2"),
    ("tokens", {"inputs": [{"name": "tokens", "shape": [1, 0], "datatype": "INT32", "data": []}]},
     "has a dimension of length 0"),
    ("multi", {"inputs": [oip_tensor("image", _IMAGE, "FP32"), oip_tensor("meta", _META, "FP32")],
               "outputs": [{"name": "kind.variance"}]}, "unknown output 'kind.variance'"),
    ("gauss", {"inputs": [oip_tensor("features", np.zeros((1, 2)), "FP32")], "parameters": {"interval": 1.5}},
     "parameters.interval must be a level between 0 and 1"),
])
def test_bad_named_tensors_are_a_422_naming_the_input(client, name, body, says):
    resp = client.post(f"/v2/models/{name}/infer", json=body)
    assert resp.status_code == 422, resp.text
    assert says in resp.json()["error"]


@pytest.mark.parametrize("blob, size, says", [
    (b"\x05\x00\x00\x00abc", 7, "BYTES element 0 declares 5 bytes; 3 are left"),
    (b"\x01\x00\x00\x00ab", 6, "has 1 bytes after its 1 BYTES elements"),
    (b"\x01\x00", 2, "1 BYTES elements need at least 4"),
    (b"\x01\x00\x00\x00a", 9, "declares binary_data_size 9; the binary part has 5 bytes left"),
])
def test_malformed_binary_bytes_are_a_422(client, blob, size, says):
    header = json.dumps({"inputs": [{"name": "review", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": size}}]}).encode()
    resp = client.post("/v2/models/text/infer", content=header + blob,
                       headers={"Inference-Header-Content-Length": str(len(header))})
    assert resp.status_code == 422, resp.text
    assert says in resp.json()["error"]


def test_a_version_whose_members_do_not_take_its_inputs_is_refused_naming_member_and_input(client):
    def versions():
        return next((m["versions"] for m in client.get("/models").json()["models"] if m["name"] == "mismatch"), [])

    assert wait(lambda: any(v.get("state") == "failed" for v in versions()))
    entry = next(v for v in versions() if v["version"] == 1)
    assert entry["state"] == "failed" and entry["category"] == "signature"
    assert client.post("/v1/models/mismatch:predict", json={"instances": ["x"]}).status_code == 503


def _metric(text: str, name: str, absent: float | None = 0.0, **labels) -> float | None:
    """The value of one series in an exposition, its labels in any order (`absent` when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return absent


def test_metrics_per_head_count_what_each_task_predicts_its_uncertainty_and_abstentions(client, named_repository):
    _, models = named_repository
    before = client.get("/metrics").text
    texts = ["a good film", "very bad indeed", "good good good", "bad"]
    client.post("/v1/models/text:predict", json={"instances": texts})
    x = np.array([[0.1, 0.2], [1.0, -1.0]], np.float32)
    client.post("/v1/models/gauss:predict", json={"instances": x.tolist()})
    after = client.get("/metrics").text

    def delta(name, **labels):
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    outs = member_outputs(models["text"], tf.constant(texts))
    want = tasks.labels(np.stack([np.asarray(o) for o in outs], axis=1), WEIGHTS)
    yes = int(np.count_nonzero(want.value[:, 0] >= 0.5))
    assert delta("ensemble_head_predicted_total", model="text", head="positive", label="pos") == yes
    assert delta("ensemble_head_predicted_total", model="text", head="positive", label="neg") == 4 - yes
    assert delta("ensemble_head_abstained_rows_total", model="text", head="positive") == 4  # its rule: always
    assert delta("ensemble_head_uncertainty_count", model="text", head="positive", score="mutual_information") == 4
    assert delta("ensemble_head_uncertainty_sum", model="text", head="positive",
                 score="mutual_information") == pytest.approx(float(want.scores["mutual_information"].sum()), abs=1e-6)
    assert delta("ensemble_head_uncertainty_count", model="gauss", head="price", score="epistemic_std") == 2
    # the reference each drift alert compares with, per head (none recorded here: 0)
    assert _metric(after, "ensemble_reference_head_uncertainty", model="gauss", head="price",
                   score="epistemic_std", absent=None) == 0.0


def test_a_version_of_numbers_runs_on_tensorflow_lite_and_one_of_strings_on_tensorflow(client):
    """The `tflite` engine (the default) serves a format-2 version whose members convert and
    answer the same (numbers, TensorFlow Lite's own ops); text's TextVectorization does not
    convert, so that version runs on TensorFlow. GET /models says which."""
    engines = {m["name"]: next(v["engine"] for v in m["versions"] if v["state"] == "live")
               for m in client.get("/models").json()["models"] if m["live"] is not None}
    assert engines == {"multi": "tflite", "gauss": "tflite", "tokens": "tflite", "text": "tensorflow"}




def test_the_loader_says_which_engine_serves_a_version_and_why(named_repository, caplog, tmp_path):
    """Compiling a format-2 version (service.engines.named.compile_named, in the compile child
    when loading is isolated) keeps a TensorFlow Lite model when the members convert and answer
    the same, else says why not; the loader then serves the model without restoring a
    SavedModel, or loads the members on TensorFlow, and logs which and why."""
    import logging

    from contract.manifest import read_manifest
    from service.config import Settings
    from service.engines.compiled import NamedCompiled, compiled_from_bytes
    from service.engines.loader import EngineLoader, ThreadPlan
    from service.engines.named import compile_named

    root, _ = named_repository
    text, multi = (read_manifest(root / name / "1") for name in ("text", "multi"))
    compiled = compile_named(text, root / "text" / "1")
    assert compiled.lite is None and compiled.reason.startswith(
        "cannot convert the ensemble to TensorFlow Lite: TensorFlow Lite has no kernels for ")
    assert "StringSplitV2" in compiled.reason
    assert compiled_from_bytes(compiled.to_bytes(), "x") == compiled  # the cache's and the child's file
    converted = compile_named(multi, root / "multi" / "1")
    assert converted.reason == "" and converted.lite.startswith(b"\x1c\x00\x00\x00TFL3")
    assert compiled_from_bytes(converted.to_bytes(), "x") == NamedCompiled(converted.lite)

    def loader(engine):
        return EngineLoader(Settings(repository=root, isolated_loading=False, engine=engine,
                                     compile_cache_dir=tmp_path / engine, warmup_batch_sizes=(1,)),
                            ThreadPlan(1, 1, 1))

    with caplog.at_level(logging.INFO, logger="service.engines.loader"):
        kinds = (loader("tflite")(text, root / "text" / "1", lambda: None).engine.kind,
                 loader("tflite")(multi, root / "multi" / "1", lambda: None).engine.kind,
                 loader("tensorflow")(multi, root / "multi" / "1", lambda: None).engine.kind)
    assert kinds == ("tensorflow", "tflite", "tensorflow")
    said = [r.getMessage() for r in caplog.records]
    assert f"text version 1 runs on TensorFlow: {compiled.reason}" in said
    assert "multi version 1 runs on TensorFlow Lite: it converts and answers as its members do" in said
    assert "multi version 1 runs on TensorFlow: the engine setting is tensorflow" in said
