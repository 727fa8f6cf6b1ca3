"""`ensemble-train import` for every Keras model shape: small `.keras` members of nine shapes
(binary, multi-label, regression, two named inputs, two heads, raw text, named mixed-type
features, integer tokens of any length, a Gaussian regression head) published through the CLI
in manifest format 2; their manifests say the inputs, heads, tasks and labels the members have;
the service loads every one (its named engine checks each member's signature and warms it up)
and answers as the members combined; members that cannot be imported are refused with one line
naming the file and the input or head."""

from __future__ import annotations

import numpy as np
import pytest

from contract import tasks
from contract.manifest import ManifestV2, read_manifest
from tests.test_api import wait_for as wait
from training.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")
L = keras.layers
WORDS = ["a good film", "a bad film", "very good", "very bad indeed", "good acting"]


def _binary(seed: int):
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,), name="features")
    return keras.Model(x, L.Dense(1, activation="sigmoid")(L.Dense(6, activation="relu")(x)))


def _multilabel(seed: int):
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,))  # unnamed: the manifest calls it input_0
    return keras.Model(x, L.Dense(3, activation="sigmoid", name="tags")(x))


def _regression(seed: int):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((3,)), L.Dense(4, activation="relu"), L.Dense(1)])


def _image_and_vector(seed: int):
    keras.utils.set_random_seed(seed)
    image, meta = keras.Input((4, 4, 1), name="image"), keras.Input((3,), name="meta")
    h = L.Dense(6, activation="relu")(L.Concatenate()([L.Flatten()(image), meta]))
    return keras.Model([image, meta], L.Dense(3, activation="softmax", name="kind")(h))


def _two_heads(seed: int):
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,), name="features")
    h = L.Dense(6, activation="relu")(x)
    return keras.Model(x, {"kind": L.Dense(3, activation="softmax")(h), "flag": L.Dense(1, activation="sigmoid")(h)})


def _text(seed: int):
    keras.utils.set_random_seed(seed)
    review = keras.Input((), dtype="string", name="review")
    vectorize = L.TextVectorization(max_tokens=30, output_sequence_length=5)
    vectorize.adapt(WORDS)
    x = L.GlobalAveragePooling1D()(L.Embedding(30, 4)(vectorize(review)))
    return keras.Model(review, L.Dense(1, activation="sigmoid")(x))


def _mixed(seed: int):
    keras.utils.set_random_seed(seed)
    age, city = keras.Input((1,), name="age"), keras.Input((1,), dtype="string", name="city")
    one_hot = L.StringLookup(vocabulary=["paris", "rome", "oslo"], output_mode="one_hot")(city)
    h = L.Dense(4, activation="relu")(L.Concatenate()([age, one_hot]))
    return keras.Model({"age": age, "city": city}, L.Dense(2, activation="softmax", name="churn")(h))


def _tokens(seed: int):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = L.GlobalAveragePooling1D()(L.Embedding(20, 4, mask_zero=True)(tokens))
    return keras.Model(tokens, L.Dense(2, activation="softmax")(x))


def _gaussian(seed: int):
    keras.utils.set_random_seed(seed)
    x = keras.Input((2,), name="features")
    h = L.Dense(6, activation="relu")(x)
    return keras.Model(x, L.Concatenate(name="price")([L.Dense(1)(h), L.Dense(1, activation="softplus")(h)]))


# name: (build, members, flags, the manifest's inputs, its heads (name, task, labels, variance))
SHAPES = {
    "binary": (_binary, 2, [], [("features", "float32", (4,))], [("output_0", "binary", ("0", "1"), False)]),
    "multilabel": (_multilabel, 2, ["--labels", "red,green,blue"], [("input_0", "float32", (4,))],
                   [("tags", "multilabel", ("red", "green", "blue"), False)]),
    "regression": (_regression, 2, [], [("input_0", "float32", (3,))],
                   [("output_0", "regression", ("output_0",), False)]),
    "image-vector": (_image_and_vector, 2, ["--classes", "cat,dog,bird"],
                     [("image", "float32", (4, 4, 1)), ("meta", "float32", (3,))],
                     [("kind", "classification", ("cat", "dog", "bird"), False)]),
    "two-heads": (_two_heads, 2, ["--labels", "kind=a,b,c", "--labels", "flag=no,yes"],
                  [("features", "float32", (4,))],
                  [("kind", "classification", ("a", "b", "c"), False), ("flag", "binary", ("no", "yes"), False)]),
    "text": (_text, 2, ["--labels", "neg,pos"], [("review", "string", ())],
             [("output_0", "binary", ("neg", "pos"), False)]),
    "mixed": (_mixed, 2, [], [("age", "float32", (1,)), ("city", "string", (1,))],
              [("churn", "classification", ("0", "1"), False)]),
    "tokens": (_tokens, 1, [], [("tokens", "int32", (None,))], [("output_0", "classification", ("0", "1"), False)]),
    "gauss": (_gaussian, 2, ["--variance", "price", "--labels", "usd"], [("features", "float32", (2,))],
              [("price", "regression", ("usd",), True)]),
}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Every shape's members saved as .keras files and imported through the CLI into one
    repository; the Keras models to compare with, by shape."""
    files, root = tmp_path_factory.mktemp("members"), tmp_path_factory.mktemp("models")
    models, outputs = {}, {}
    for name, (build, count, flags, _, _) in SHAPES.items():
        models[name] = [build(10 + i) for i in range(count)]
        paths = [str(files / f"{name}-{i}.keras") for i in range(count)]
        for model, path in zip(models[name], paths):
            model.save(path)
        import io
        from contextlib import redirect_stdout

        with redirect_stdout(io.StringIO()) as out:
            code = main(["import", "--name", name, "--repository", str(root), *flags, *paths])
        assert code == EXIT_OK, name
        outputs[name] = out.getvalue()
    return root, models, files, outputs


@pytest.mark.parametrize("name", list(SHAPES))
def test_each_shape_is_published_in_format_2_with_its_inputs_heads_tasks_and_labels(published, name):
    root, _, _, out = published
    _, count, _, inputs, heads = SHAPES[name]
    manifest = read_manifest(root / name / "1")
    assert isinstance(manifest, ManifestV2) and manifest.format_version == 2
    assert [(s.name, s.dtype, s.shape) for s in manifest.inputs] == inputs
    assert [(h.name, h.task, h.labels, h.variance) for h in manifest.heads] == heads
    assert len(manifest.members) == count and {m.kind for m in manifest.members} == {"imported"}
    assert f"[publish] {name} version 1 with {count} imported members (format 2: " in out[name]


@pytest.fixture(scope="module")
def client(published):
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from service.app import create_app
    from service.config import Settings
    from service.metrics import ServiceMetrics

    root = published[0]
    settings = Settings(repository=root, poll_interval_seconds=0.2, warmup_batch_sizes=(1, 3),
                        isolated_loading=False, default_model="two-heads")
    with TestClient(create_app(settings, ServiceMetrics(CollectorRegistry()))) as c:
        for name in SHAPES:
            assert wait(lambda: c.get(f"/v2/models/{name}/ready").status_code == 200, timeout=120), name
        yield c


def test_the_service_loads_every_imported_shape(client):
    """Ready means: every member's signature passed the named engine's check and warmed up."""
    for name in SHAPES:
        assert client.get(f"/v2/models/{name}/ready").status_code == 200, name


def _stacked(models, x, head=None):
    """The members' outputs for `x` (for `head` of dict outputs): (rows, members, k)."""
    outs = [model(x, training=False) for model in models]
    return np.stack([np.asarray(o[head] if head else o) for o in outs], axis=1)


def test_two_named_inputs_are_answered_as_the_members_average(client, published):
    models = published[1]["image-vector"]
    rng = np.random.default_rng(0)
    image, meta = rng.uniform(size=(3, 4, 4, 1)).astype("float32"), rng.uniform(size=(3, 3)).astype("float32")
    rows = [{"image": image[i].tolist(), "meta": meta[i].tolist()} for i in range(3)]
    resp = client.post("/v1/models/image-vector:predict", json={"instances": rows})
    assert resp.status_code == 200, resp.text
    want = tasks.classification(_stacked(models, [image, meta]), [0.5, 0.5])
    np.testing.assert_allclose(resp.json()["predictions"], want.value, atol=1e-5)


def test_two_heads_are_answered_by_head_as_their_members_combined(client, published):
    models = published[1]["two-heads"]
    x = np.random.default_rng(1).uniform(size=(2, 4)).astype("float32")
    resp = client.post("/predict", json={"instances": x.tolist()})
    assert resp.status_code == 200, resp.text
    kind = tasks.classification(_stacked(models, x, "kind"), [0.5, 0.5])
    flag = tasks.labels(_stacked(models, x, "flag"), [0.5, 0.5])
    predictions = resp.json()["predictions"]
    np.testing.assert_allclose([p["kind"] for p in predictions], kind.value, atol=1e-5)
    np.testing.assert_allclose([p["flag"] for p in predictions], flag.value, atol=1e-5)


def test_raw_text_and_named_mixed_features_are_answered_as_their_members_combined(client, published):
    models = published[1]
    texts = ["a good film", "very bad indeed", "words never seen"]
    resp = client.post("/v1/models/text:predict", json={"instances": texts})
    assert resp.status_code == 200, resp.text
    want = tasks.labels(_stacked(models["text"], tf.constant(texts)), [0.5, 0.5])
    np.testing.assert_allclose(resp.json()["predictions"], want.value, atol=1e-5)

    rows = [{"age": [0.3], "city": ["rome"]}, {"age": [0.9], "city": ["lisbon"]}]
    resp = client.post("/v1/models/mixed:predict", json={"instances": rows})
    assert resp.status_code == 200, resp.text
    x = {"age": tf.constant([[0.3], [0.9]]), "city": tf.constant([["rome"], ["lisbon"]])}
    want = tasks.classification(_stacked(models["mixed"], x), [0.5, 0.5])
    np.testing.assert_allclose(resp.json()["predictions"], want.value, atol=1e-5)


def test_a_gaussian_head_imported_with_variance_is_the_members_mixture(client, published):
    models = published[1]["gauss"]
    x = np.array([[0.1, 0.2], [1.0, -1.0]], np.float32)
    resp = client.post("/v1/models/gauss:predict?uncertainty=true", json={"instances": x.tolist()})
    assert resp.status_code == 200, resp.text
    outs = _stacked(models, x)
    want = tasks.regression(outs[:, :, :1], [0.5, 0.5], 1.0, outs[:, :, 1:])
    np.testing.assert_allclose(resp.json()["predictions"], want.value, atol=1e-5)
    np.testing.assert_allclose(resp.json()["heads"]["price"]["uncertainty"]["std"], want.scores["std"], atol=1e-5)


# -- refusals ------------------------------------------------------------------------------------


def _refused(capsys, files, *args) -> str:
    """Import through the CLI, expect a refusal, and return its one error line."""
    code = main(["import", "--name", "refused", "--repository", str(files / "refused-models"), *map(str, args)])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED, err
    assert "Traceback" not in err and not (files / "refused-models" / "refused").exists()
    lines = err.splitlines()
    assert lines[-1] == "ensemble-train: nothing was published" and len(lines) == 2, err
    return lines[0]


def test_members_that_disagree_on_an_input_are_refused_naming_both_files_and_the_input(published, capsys):
    files = published[2]
    keras.utils.set_random_seed(0)
    x = keras.Input((5,), name="features")
    keras.Model(x, L.Dense(1, activation="sigmoid")(x)).save(files / "wide.keras")
    line = _refused(capsys, files, files / "binary-0.keras", files / "wide.keras")
    assert line == (f"ensemble-train: error: {files / 'wide.keras'}: input 'features' takes float32 [5] but "
                    f"{files / 'binary-0.keras'} takes float32 [4]: members of one ensemble must agree")


def test_a_head_whose_task_the_model_does_not_say_is_refused_naming_it_and_the_choices(published, capsys):
    files = published[2]
    line = _refused(capsys, files, files / "gauss-0.keras")
    assert line == (f"ensemble-train: error: {files / 'gauss-0.keras'}: head 'price' ends in a Concatenate layer "
                    "(price), which has no activation to read; say what it is with --task TASK (one of "
                    "classification, binary, multilabel, regression)")


def test_a_task_for_a_head_the_members_do_not_have_is_refused_naming_their_heads(published, capsys):
    files = published[2]
    line = _refused(capsys, files, "--task", "kind=classification,nope=binary", files / "two-heads-0.keras")
    assert line == "ensemble-train: error: --task names head 'nope', but the members give heads ['kind', 'flag']"


def test_a_logit_declared_binary_is_refused_naming_the_file_and_head(published, capsys):
    files = published[2]
    keras.utils.set_random_seed(0)
    x = keras.Input((4,), name="features")
    keras.Model(x, L.Dense(1, bias_initializer=keras.initializers.Constant(5.0), name="logit")(x)).save(
        files / "logit.keras")
    line = _refused(capsys, files, "--task", "binary", files / "logit.keras")
    assert line.startswith(f"ensemble-train: error: {files / 'logit.keras'}: head 'logit' (binary): its values are "
                           "not probabilities (they reach ")
    assert line.endswith("outside [0, 1]): end the head with a sigmoid, or say it is a regression")


def test_members_whose_ends_say_different_tasks_are_refused_naming_both(published, capsys):
    files = published[2]
    keras.utils.set_random_seed(0)
    x = keras.Input((4,))
    keras.Model(x, L.Dense(3, activation="softmax", name="tags")(x)).save(files / "softmax-tags.keras")
    line = _refused(capsys, files, files / "multilabel-0.keras", files / "softmax-tags.keras")
    assert line == (f"ensemble-train: error: {files / 'multilabel-0.keras'}: head 'tags' ends in 3 units with a "
                    f"sigmoid (multilabel) but {files / 'softmax-tags.keras'} ends in a softmax over 3 units "
                    "(classification): members must agree, or pass --task tags=TASK")


def test_wrong_label_counts_and_odd_variance_widths_are_refused_naming_the_head(published, capsys):
    files = published[2]
    line = _refused(capsys, files, "--labels", "kind=a,b", files / "two-heads-0.keras")
    assert line == "ensemble-train: error: --labels names 2 labels for head 'kind' but the members output 3"
    line = _refused(capsys, files, "--variance", "tags", files / "multilabel-0.keras")
    assert line == (f"ensemble-train: error: {files / 'multilabel-0.keras'}: head 'tags' (regression, with a "
                    "variance): it gives 3 columns; a head with a variance gives 2k: the k means, then the k variances")


def test_a_task_that_is_not_one_is_a_usage_error(published, capsys):
    files = published[2]
    code = main(["import", "--name", "x", "--repository", str(files / "none"), "--task", "kind=ranking",
                 str(files / "two-heads-0.keras")])
    assert code == EXIT_USAGE
    assert capsys.readouterr().err == ("ensemble-train: error: --task kind=ranking: 'ranking' is not a task; the "
                                       "tasks are classification, binary, multilabel, regression\n")


def test_saved_models_are_read_from_their_serving_signature_and_say_no_task_but_softmax_rows(published, capsys):
    """A format-2 version's members, imported again: inputs and heads by the signature's names;
    rows that sum to one say classification, a sigmoid column needs --task."""
    root, _, files, _ = published
    version = root / "two-heads" / "1"
    members = [version / m.path for m in read_manifest(version).members]
    line = _refused(capsys, files, *members)
    assert line == (f"ensemble-train: error: {members[0]}: head 'flag' comes from a SavedModel, whose signature does "
                    "not say its activation; say what it is with --task flag=TASK (one of classification, binary, "
                    "multilabel, regression)")
    again = files / "again"
    assert main(["import", "--name", "two-heads", "--repository", str(again), "--task", "flag=binary",
                 "--labels", "kind=a,b,c", "--labels", "flag=no,yes", *map(str, members)]) == EXIT_OK
    assert "kind (classification: it gives rows of probabilities that sum to one; 3 columns)" in capsys.readouterr().out
    first, second = read_manifest(version), read_manifest(again / "two-heads" / "1")
    assert second.inputs == first.inputs  # a signature's outputs come by name: flag, kind
    assert second.heads == tuple(sorted(first.heads, key=lambda head: head.name))
