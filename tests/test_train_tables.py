"""Tables end to end: a CSV as a user brings it (named mixed-type columns, words in a category
column, empty cells, an id column to leave out), trained through `ensemble-train` for each task,
published in format 2 with one input per column, served by a real `ensemble-serve`, and asked
with rows exactly as the CSV holds them (`null` where a cell is empty) over TensorFlow Serving's
REST API and the Open Inference Protocol's JSON, and with one tensor per column over both gRPC
protocols. Each answer must be the
members' combination (contract.tasks, with the published calibration) computed here on the
published members themselves.

The budgets are tiny: these tests check the plumbing (columns in, the task's head out, the same
numbers on both sides), not the quality, which `docs/training.md` measures. The tests that
train are marked slow (four trainings, one cross-fitted: minutes); `tests/test_text.py` trains
and serves a folder of texts in the fast suite."""

from __future__ import annotations

import csv
import json

import httpx
import numpy as np
import pytest

from contract import tasks
from contract.manifest import read_manifest
from tests.conftest import free_port
from tests.server import ServerProcess
from training.cli import EXIT_OK, EXIT_USAGE, main

FAST = ["--tuner", "random", "--max-trials", "1", "--max-epochs", "2", "--members", "tuned:1,seed:1",
        "--epochs", "4", "--patience", "2", "--no-gate"]
ROWS = 160


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)


def patients(tmp_path):
    """A `;`-separated table: an id, a number with empty cells, a category of words with empty
    cells, an integer code, and three targets (a number, a yes/no, two labels of 0/1)."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(ROWS):
        age = int(rng.integers(20, 80))
        sex = ["female", "male"][i % 2]
        bmi = float(np.round(rng.normal(26, 4), 1))
        stage = i % 3
        risk = 0.05 * age + 2.0 * (sex == "female") + 0.3 * bmi + stage + rng.normal(0, 1)
        rows.append([f"p{i:04d}", age, "" if i % 11 == 0 else sex, "" if i % 7 == 0 else bmi, stage,
                     f"{risk:.3f}", "yes" if risk > 13 else "no", int(age > 50), int(stage == 2)])
    path = tmp_path / "patients.csv"
    write_csv(path, ["id", "age", "sex", "bmi", "stage", "risk", "sick", "old", "late"], rows, delimiter=";")
    return path


def train(tmp_path, capsys, *args):
    code = main(["--data", str(tmp_path / "patients.csv"), "--repository", str(tmp_path / "models"),
                 "--ignore-columns", "id,old,late", *FAST, *args])
    out = capsys.readouterr()
    return code, out


def columns_of(manifest, rows) -> dict[str, np.ndarray]:
    """Each input's column of `rows` as a tensor carries it: NaN and b"" where a cell is empty."""
    columns = {}
    for spec in manifest.inputs:
        values = [row[spec.name] for row in rows]
        if spec.dtype == "string":
            columns[spec.name] = np.array([b"" if v is None else v.encode() for v in values], dtype=object)
        else:
            columns[spec.name] = np.array([np.nan if v is None else v for v in values], dtype=spec.dtype)
    return columns


def members_answer(vdir, manifest, rows):
    """The head's answer to `rows` computed on the published members, as the server combines them."""
    from training.members import predict_named_saved_model

    head = manifest.heads[0]
    columns = columns_of(manifest, rows)
    outputs = np.stack([predict_named_saved_model(vdir / m.path, columns, head.name) for m in manifest.members],
                       axis=1)
    return tasks.combine_head(head, outputs, manifest.weights)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three versions of the same table (regression, binary, multi-label) and a server."""
    root = tmp_path_factory.mktemp("tables")
    patients(root)
    # Each run leaves out the id and the other runs' targets.
    # `risk` is small enough to be cross-fitted (training.crossfit: every member one model per
    # fold); the others are trained once each, to keep the test short.
    runs = {"risk": ["--label-column", "risk", "--task", "regression", "--categorical", "stage",
                     "--ignore-columns", "id,sick,old,late"],
            "sick": ["--label-column", "sick", "--ignore-columns", "id,risk,old,late", "--cross-fit", "never"],
            "flags": ["--label-column", "old,late", "--task", "multilabel", "--ignore-columns", "id,risk,sick",
                      "--cross-fit", "never"]}
    logs = {}
    for name, args in runs.items():
        code = main(["--data", str(root / "patients.csv"), "--repository", str(root / "models"), "--name", name,
                     *FAST, *args])
        assert code == EXIT_OK, name
        logs[name] = read_manifest(root / "models" / name / "1")
    port = free_port()
    server = ServerProcess(root / "models", env={"ENSEMBLE_LOADER_DUTY_CYCLE": "1"}, args=["--grpc-port", str(port)])
    server.grpc = f"127.0.0.1:{port}"
    server.start(timeout=400)
    try:
        for name in runs:
            server.wait_live(1, name, timeout=400)
        yield root, server, logs
    finally:
        server.kill()


ASKED = [{"age": 41, "sex": "female", "bmi": None, "stage": 2},
         {"age": 67, "sex": None, "bmi": 31.5, "stage": 0},
         {"age": 35, "sex": "male", "bmi": 22.0, "stage": None},
         {"age": 58, "sex": "unknown", "bmi": 27.0, "stage": 9}]  # an unseen word and code: out of vocabulary


@pytest.mark.slow
def test_the_manifest_lists_every_column_by_name_and_the_task_of_each_head(trained):
    root, _, manifests = trained
    risk = manifests["risk"]
    assert [(s.name, s.dtype, s.nullable) for s in risk.inputs] == [
        ("age", "float32", True), ("sex", "string", True), ("bmi", "float32", True), ("stage", "float64", True)]
    assert [(h.name, h.task, h.labels, h.variance) for h in risk.heads] == [
        ("risk", "regression", ("risk",), True)]
    assert risk.heads[0].variance_scale != 1.0  # fitted on the out-of-fold predictions
    assert [m.name for m in risk.members] == [f"{n}-fold{k}" for n in ("tuned-0", "seed-1") for k in range(5)]
    assert sum(risk.weights) == pytest.approx(1.0) and len(set(risk.weights)) == 1
    sick = manifests["sick"].heads[0]
    assert (sick.name, sick.task, sick.labels, len(sick.temperatures)) == ("sick", "binary", ("no", "yes"), 1)
    flags = manifests["flags"].heads[0]
    assert (flags.name, flags.task, flags.labels, len(flags.temperatures)) == (
        "labels", "multilabel", ("old", "late"), 2)
    report = json.loads((root / "models" / "risk" / "1" / "report.json").read_text())
    assert set(report["heads"]["risk"]["calibration"]["test_after"]) >= {"rmse", "mae", "r2", "nll", "coverage_90"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["risk", "sick", "flags"])
def test_rows_as_the_csv_holds_them_are_answered_as_the_members_combine(trained, name):
    root, server, manifests = trained
    manifest = manifests[name]
    expected = members_answer(root / "models" / name / "1", manifest, ASKED)
    reply = httpx.post(f"{server.base}/v1/models/{name}:predict", json={"instances": ASKED}, timeout=30)
    assert reply.status_code == 200, reply.text
    got = reply.json()["predictions"]
    head = manifest.heads[0].name
    values = np.array([row[head] if isinstance(row, dict) else row for row in got], dtype=np.float64)
    np.testing.assert_allclose(values.reshape(expected.value.shape), expected.value, rtol=1e-4, atol=1e-4)
    # The Open Inference Protocol: one tensor per column, null where a cell is empty.
    datatypes = {"float32": "FP32", "float64": "FP64", "string": "BYTES"}
    body = {"inputs": [{"name": s.name, "shape": [len(ASKED)], "datatype": datatypes[s.dtype],
                        "data": [row[s.name] for row in ASKED]} for s in manifest.inputs],
            "outputs": [{"name": head}]}
    reply = httpx.post(f"{server.base}/v2/models/{name}/infer", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    (tensor,) = reply.json()["outputs"]
    assert tensor["name"] == head
    np.testing.assert_allclose(np.reshape(tensor["data"], expected.value.shape), expected.value, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["risk", "sick", "flags"])
def test_the_same_rows_over_grpc_with_the_clients_of_both_protocols(trained, name):
    """tritonclient's gRPC client (the Open Inference Protocol) and TensorFlow Serving's
    PredictionService, one tensor per column, NaN and b"" where a cell is empty."""
    import tritonclient.grpc as triton_grpc

    from tests.tfs_grpc import tfs_predict

    root, server, manifests = trained
    manifest = manifests[name]
    expected = members_answer(root / "models" / name / "1", manifest, ASKED).value
    head = manifest.heads[0].name
    columns = columns_of(manifest, ASKED)
    inputs = []
    for key, array in columns.items():
        tensor = triton_grpc.InferInput(key, [len(ASKED)], {"float32": "FP32", "float64": "FP64",
                                                            "object": "BYTES"}[array.dtype.name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = triton_grpc.InferenceServerClient(server.grpc).infer(
        name, inputs, outputs=[triton_grpc.InferRequestedOutput(head)])
    np.testing.assert_allclose(result.as_numpy(head).reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)
    answer = tfs_predict(server.grpc, name, columns, [head])[head]
    np.testing.assert_allclose(answer.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_trainer_says_what_it_read_and_refuses_what_it_cannot_use(tmp_path, capsys):
    patients(tmp_path)
    code, out = train(tmp_path, capsys, "--label-column", "risk")
    distinct = len({row[5] for row in csv.reader(open(tmp_path / "patients.csv"), delimiter=";")}) - 1
    assert code != EXIT_OK and f"holds {distinct} distinct numbers; say what to predict: --task regression" in out.err
    assert "nothing was published" in out.err
    code, out = train(tmp_path, capsys, "--label-column", "risk", "--task", "regression", "--gate-metric", "accuracy")
    assert code != EXIT_OK and "--gate-metric 'accuracy' is not a metric of a regression head" in out.err
    code, out = train(tmp_path, capsys, "--label-column", "sick", "--members", "seed:1", "--name", "one")
    assert code == EXIT_USAGE and "--members asks for 1 member(s), fewer than --min-members 2" in out.err
    assert not (tmp_path / "models" / "one").exists()
    code, out = train(tmp_path, capsys, "--label-column", "sick", "--name", "sick", "--cross-fit", "never")
    assert code == EXIT_OK, out.err
    assert "[data] 2 classes in 'sick': trained as binary" in out.out
    assert "[data] column 'bmi': 23 of 160 cells missing" in out.out


def test_the_gate_refuses_to_replace_a_version_that_takes_other_inputs(tmp_path):
    """A published version of another signature: its clients would break, so the gate says so
    instead of comparing."""
    from datetime import datetime, timezone

    from contract.manifest import TensorSpec
    from training.data import DataError
    from training.table_pipeline import comparable_champion

    folder = tmp_path / "risk" / "1"
    (folder / "members" / "m0").mkdir(parents=True)
    (folder / "members" / "m0" / "saved_model.pb").write_bytes(b"x")
    manifest = {"format_version": 2, "name": "risk", "version": 1, "created": datetime.now(timezone.utc).isoformat(),
                "inputs": [{"name": "age", "dtype": "float32"}],
                "heads": [{"name": "risk", "task": "regression", "labels": ["risk"], "variance": True}],
                "members": [{"name": "m0", "path": "members/m0", "kind": "seed", "weight": 1.0,
                             "files": {"saved_model.pb": "0" * 64}}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    ours = (TensorSpec(name="age", dtype="float32", nullable=True), TensorSpec(name="bmi", dtype="float32", nullable=True))
    refusal = (r"^version 1 of 'risk' takes other inputs or answers another head than this run's; its clients would "
               r"break: publish under another --name, or pass --no-gate$")
    with pytest.raises(DataError, match=refusal):
        comparable_champion(tmp_path, "risk", ours, "risk", "regression", ("risk",))
    with pytest.raises(DataError, match=refusal):  # the same inputs, another task
        comparable_champion(tmp_path, "risk", ours[:1], "risk", "binary", ("no", "yes"))
    manifest, vdir = comparable_champion(tmp_path, "risk", ours[:1], "risk", "regression", ("risk",))
    assert (manifest.version, vdir) == (1, folder)
    assert comparable_champion(tmp_path, "other", ours, "risk", "regression", ("risk",)) is None


def test_columns_become_input_names_every_part_takes_unchanged():
    from training.table_pipeline import head_name, input_names

    assert input_names(["mean radius", "a/b", "ok-1", "1st", "_id", "Age", "x_2"]) == {
        "mean radius": "mean_radius", "a/b": "a_b", "ok-1": "ok_1", "1st": "c_1st", "_id": "c__id", "Age": "Age",
        "x_2": "x_2"}
    # A valid name stays; a made one that is taken is numbered.
    assert input_names(["a b", "a_b", "年齢", "性別"]) == {"a b": "a_b_2", "a_b": "a_b", "年齢": "c___", "性別": "c____2"}
    assert [head_name(("mean radius",), "regression"), head_name(("a", "b"), "multilabel"),
            head_name(("a", "b"), "regression")] == ["mean_radius", "labels", "targets"]


def test_columns_named_like_the_members_own_layers_build_export_and_read_cells_as_the_csv_holds_them(tmp_path):
    """Every layer a table's member adds has a `-` in its name, which no input name has, so
    columns called `features`, `dropout`, `dense`, `cast` or `price_raw` beside a head `price`
    clash with nothing; a string cell is read inside the member as the trainer read it (spaces
    stripped, `?` missing)."""
    import keras_tuner as kt

    from contract.manifest import TensorSpec
    from training.features import as_inputs, column_stats
    from training.heads import Head
    from training.hypermodel import TableHyperModel
    from training.members import export_named_member, predict_named_saved_model

    rng = np.random.default_rng(0)
    numbers = ("features", "dropout", "dense", "price_raw", "concatenate")
    columns = {**{n: rng.normal(size=40) for n in numbers},
               "work": np.array(["Private", "State-gov", ""] * 13 + ["Private"], dtype=object),
               "cast": np.array(["a good film", "a bad one", "so so"] * 13 + ["fine"], dtype=object)}
    kinds = {"work": "string", "cast": "text"}
    stats = [column_stats(n, kinds.get(n, "numeric"), v) for n, v in columns.items()]
    head = Head("regression", 1, "price", rng.normal(size=(40, 1)))
    hp = kt.HyperParameters()
    hp.Fixed("text_encoder", "bag")
    hp.Fixed("wide", True)
    model = TableHyperModel(stats, head).build(hp)
    specs = [TensorSpec(name=s.name, dtype=s.spec().dtype, nullable=True) for s in stats]
    export_named_member(model, tmp_path / "m", specs, "price")
    asked = {**{n: np.zeros(4) for n in numbers}, "cast": np.array(["good"] * 4, dtype=object),
             "work": np.array(["Private", " Private ", "?", ""], dtype=object)}
    out = predict_named_saved_model(tmp_path / "m", as_inputs(asked, stats), "price")
    assert out.shape == (4, 2) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out[1], out[0], rtol=1e-6)  # " Private " is Private
    np.testing.assert_allclose(out[2], out[3], rtol=1e-6)  # "?" is the missing category
    assert not np.allclose(out[0], out[3])


def test_a_column_a_category_cannot_learn_from_is_refused_naming_it():
    from training.data import DataError
    from training.features import MAX_VOCABULARY, column_stats

    ids = np.array([f"u{i:05d}" for i in range(MAX_VOCABULARY + 1)], dtype=object)
    with pytest.raises(DataError, match=r"^column 'user': none of its 257 distinct training values repeats, so a "
                                        r"category has nothing to learn from: an identifier\? leave it out with "
                                        r"--ignore-columns \(or --text-columns if it is free text\)$"):
        column_stats("user", "string", ids)
    with pytest.raises(DataError, match=r"^column 'code': no training row has a value; leave it out with "
                                        r"--ignore-columns$"):
        column_stats("code", "integer", np.full(10, np.nan))
