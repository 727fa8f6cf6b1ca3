"""The report of a format-2 head (`training.report.head_attachments`): each task's pictures are
PNGs listed in report.json, the same bytes for the same assessment, and drawn from numbers that
agree with the assessment's own metrics (coverage per level by hand, reliability bins adding up
to the ECE); and (slow) the /ui page of a real server showing a regression version and a
multi-label one in a real headless Chromium."""

from __future__ import annotations

import json
import re
from functools import lru_cache

import numpy as np
import pytest

from contract import tasks
from tests.test_head_assess import NAMES, _labels, _regression, _softmax_members, _split
from training.head_assess import assess_head
from training.report import (
    COVERAGE_LEVELS,
    head_attachments,
    label_reliability,
    observed_coverage,
    per_label_metrics,
)
from training.task_metrics import label_calibration_error

PNG = b"\x89PNG\r\n\x1a\n"


def _means_only(rng, rows=1000, k=3):
    """Members of three targets with means only (no variance output)."""
    x = rng.normal(size=(rows, k))
    y = x * np.arange(1, k + 1) + rng.normal(size=(rows, k))
    return np.stack([x * np.arange(1, k + 1) + rng.normal(size=(rows, k)) * 0.3 for _ in NAMES]), y


@lru_cache(maxsize=None)
def _case(name):
    """(task, variance, labels, the assessment, the test targets, the selected member's raw test outputs)."""
    rng = np.random.default_rng(3)
    task, variance, labels, (raw, y) = {
        "classification": ("classification", False, list("abcd"), _softmax_members(rng)),
        "binary": ("binary", False, ["no", "yes"], _labels(rng, k=1)),
        "multilabel": ("multilabel", False, ["old", "late", "far"], _labels(rng, k=3)),
        "many_labels": ("multilabel", False, None, _labels(rng, k=15)),
        "regression": ("regression", True, ["price"], _regression(rng)),
        "means_only": ("regression", False, ["u", "v", "w"], _means_only(rng)),
    }[name]
    val, test, y_val, y_test = _split(raw, y)
    found = assess_head(task, NAMES, val, test, y_val, y_test, variance=variance, weighting="uniform",
                        target_error=0.5 if task == "regression" else 0.3, seed=0)
    return task, labels, found, y_test, test[NAMES.index(found.selected)]


PICTURED = {"classification": {"reliability.png", "risk_coverage.png", "metrics.png"},
            "binary": {"reliability.png", "risk_coverage.png", "metrics.png"},
            "multilabel": {"reliability.png", "risk_coverage.png", "metrics.png"},
            "regression": {"predicted.png", "coverage.png", "metrics.png"}}
CASES = ["classification", "binary", "multilabel", "many_labels", "regression", "means_only"]


@pytest.mark.parametrize("case", CASES)
def test_each_tasks_pictures_are_pngs_listed_in_the_report(case):
    task, labels, found, y, selected = _case(case)
    report = {"name": "x", "heads": {"h": found.summary()}}
    files = head_attachments(report, found, y, selected, labels)
    assert set(files) == {"report.json"} | PICTURED[task]
    for file in PICTURED[task]:
        assert files[file].startswith(PNG) and len(files[file]) > 10_000, file
    written = json.loads(files["report.json"])
    head = written["heads"]["h"]
    assert set(head["pictures"]) == PICTURED[task] and all(head["pictures"].values())
    assert head["versus_selected_member"]["member"] == found.selected  # the summary, kept whole
    assert ("per_label" in head) == (task in ("binary", "multilabel"))
    assert "pictures" not in report["heads"]["h"]  # the caller's report is left as it was


@pytest.mark.parametrize("case", ["multilabel", "regression"])
def test_the_same_assessment_gives_the_same_bytes(case):
    runs = []
    for make in (_case, _case.__wrapped__):  # the second assessment made again from the same outputs
        _, labels, found, y, selected = make(case)
        runs.append(head_attachments({"heads": {"h": found.summary()}}, found, y, selected, labels))
    assert runs[0] == runs[1]


def test_observed_coverage_counts_the_values_inside_each_central_interval_by_hand():
    # Two targets, standard deviations 1 and 2, around means 0 and 10. The central 50% interval
    # is mean +- 0.6745 sd, the 90% one mean +- 1.6449 sd.
    answer = tasks.Combined(np.array([[0.0, 10.0]] * 4), np.array([[1.0, 4.0]] * 4), {})
    target = np.array([[0.5, 10.5],   # inside both: |0.5| < 0.67; |0.5| < 1.35
                       [1.0, 12.0],   # 90% only: 1.0 < 1.64; 2.0 in (1.35, 3.29)
                       [-2.0, 6.0],   # neither: 2.0 > 1.64; 4.0 > 3.29
                       [0.0, 13.0]])  # inside both; 90% only (3.0 < 3.29)
    assert observed_coverage(answer, target, (0.5, 0.9)).tolist() == [3 / 8, 6 / 8]


def test_observed_coverage_is_the_assessments_own_coverage_at_its_levels():
    _, _, found, y, _ = _case("regression")
    at = observed_coverage(found.served, y, (0.5, 0.9, 0.95))
    assert at.tolist() == pytest.approx([found.ensemble[f"coverage_{p}"] for p in (50, 90, 95)], abs=1e-12)
    before = observed_coverage(found.pooled, y, (0.9,))
    assert before[0] == pytest.approx(found.uncalibrated["coverage_90"], abs=1e-12)
    assert (COVERAGE_LEVELS[0], COVERAGE_LEVELS[-1]) == (0.05, 0.99)
    assert list(COVERAGE_LEVELS) == sorted(COVERAGE_LEVELS)


def test_each_labels_reliability_bins_add_up_to_its_ece_and_the_labels_to_the_heads_metrics():
    _, labels, found, y, _ = _case("multilabel")
    p = np.asarray(found.served.value, np.float64)
    for j in range(y.shape[1]):
        mean_p, frequency, counts = label_reliability(p[:, j], y[:, j])
        filled = counts > 0
        gap = float((counts[filled] * np.abs(mean_p[filled] - frequency[filled])).sum() / counts.sum())
        assert gap == pytest.approx(label_calibration_error(p[:, [j]], y[:, [j]]), abs=1e-12)
        assert counts.sum() == len(y)
    rows = per_label_metrics(found, y, labels)
    assert [r["label"] for r in rows] == labels
    assert np.mean([r["ece"] for r in rows]) == pytest.approx(found.ensemble["ece"], abs=1e-12)
    assert np.mean([r["ece_before"] for r in rows]) == pytest.approx(found.uncalibrated["ece"], abs=1e-12)
    assert np.mean([r["brier"] for r in rows]) == pytest.approx(found.ensemble["brier"], abs=1e-12)
    assert [r["nll"] for r in rows] == pytest.approx([found.ensemble[f"nll_label_{j}"] for j in range(3)], abs=1e-9)
    assert [r["share_yes"] for r in rows] == pytest.approx(y.mean(axis=0).tolist())


def test_a_binary_heads_one_label_is_its_positive_label():
    _, labels, found, y, selected = _case("binary")
    files = head_attachments({"heads": {"sick": found.summary()}}, found, y, selected, labels)
    (row,) = json.loads(files["report.json"])["heads"]["sick"]["per_label"]
    assert row["label"] == "yes" and row["nll"] == pytest.approx(found.ensemble["nll"], abs=1e-9)


def test_a_report_of_other_than_one_head_or_of_other_rows_is_refused():
    _, labels, found, y, selected = _case("regression")
    for heads in ({}, {"a": {}, "b": {}}):
        with pytest.raises(ValueError, match=f"this report has {len(heads)} heads"):
            head_attachments({"heads": heads}, found, y, selected, labels)
    with pytest.raises(ValueError, match="this report has no heads"):
        head_attachments({"versus_selected_member": {}}, found, y, selected, labels)
    with pytest.raises(ValueError, match=r"answered 500 test rows; got 499 targets"):
        head_attachments({"heads": {"h": {}}}, found, y[:-1], selected, labels)
    with pytest.raises(ValueError, match=r"a regression head of 1 column\(s\) has 1 labels .*got 2"):
        head_attachments({"heads": {"h": {}}}, found, y, selected, ["price", "cost"])


# -- /ui in a real browser ----------------------------------------------------------------------

ROWS = 600


def _published(root, name: str, task: str, labels: list[str], x: np.ndarray, y: np.ndarray):
    """Three tiny members of `task` trained on (x, y), exported, assessed and published in format
    2 with head_attachments, as the table pipeline does; returns the assessment."""
    import keras

    from contract.manifest import TensorSpec
    from training.heads import Head
    from training.members import export_named_member, predict_named_saved_model
    from training.publish import MemberArtifact, publish_named_version

    inputs = (TensorSpec(name="features", dtype="float32", shape=(x.shape[1],)),)
    train, val, test = slice(0, 300), slice(300, 450), slice(450, ROWS)
    head = Head(task, y.shape[1], name, y[train] if task == "regression" else None)
    members = []
    for i in range(3):
        keras.utils.set_random_seed(10 + i)
        features = keras.Input((x.shape[1],), name="features")
        model = keras.Model(features, head.output(keras.layers.Dense(8, activation="relu")(features)))
        model.compile(optimizer=keras.optimizers.Adam(0.02), loss=head.loss())
        model.fit(x[train], head.fit_target(y[train]), epochs=15, batch_size=64, verbose=0)
        export_named_member(model, root / ".work" / name / f"m{i}", inputs, name)
        members.append(root / ".work" / name / f"m{i}")
    val_out, test_out = (np.stack([predict_named_saved_model(m, {"features": x[rows]}, name) for m in members])
                         for rows in (val, test))
    names = [f"m{i}" for i in range(3)]
    found = assess_head(task, names, val_out, test_out, y[val], y[test], variance=task == "regression",
                        weighting="uniform", target_error=0.5 if task == "regression" else 0.3)
    report = {"name": name, "data": {"source": "/somewhere/private/table.csv", "task": task, "labels": labels},
              "heads": {name: found.summary()}}
    publish_named_version(
        root, name,
        [MemberArtifact(name=n, kind="seed", source=m, weight=found.weight_of(n)) for n, m in zip(names, members)],
        inputs, (found.head_spec(name, labels),),
        {k: v for k, v in found.ensemble.items() if np.isfinite(v)}, None,
        head_attachments(report, found, y[test], test_out[names.index(found.selected)], labels))
    return found


@pytest.mark.slow
def test_ui_shows_a_regression_and_a_multilabel_version_in_their_tasks_terms(tmp_path):
    from tests.server import ServerProcess
    from tests.test_reports import browse

    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 3)).astype(np.float32)
    price = (2 * x[:, :1] - x[:, 1:2] + rng.normal(size=(ROWS, 1)) * (0.5 + np.abs(x[:, 2:]))).astype(np.float32)
    flags = (rng.random((ROWS, 3)) < 1 / (1 + np.exp(-2 * x))).astype(np.float32)
    root = tmp_path / "models"
    root.mkdir()
    regression = _published(root, "price", "regression", ["price"], x, price)
    multilabel = _published(root, "flags", "multilabel", ["old", "late", "far"], x, flags)

    server = ServerProcess(root, env={"ENSEMBLE_LOADER_DUTY_CYCLE": "1"}).start(timeout=400)
    try:
        for name in ("price", "flags"):
            server.wait_live(1, name, timeout=400)
        dom = browse(f"{server.base}/ui", "--dump-dom")
        assert 'data-ready="yes"' in dom, dom[-2000:]
        parts = {re.match(r'<h2 data-model="([^"]+)"', part).group(1): part
                 for part in re.split(r'(?=<h2 data-model=")', dom) if part.startswith("<h2 data-model=")}
        price_part, flags_part = parts["price"], parts["flags"]

        # The versions table: the task's headline metrics, as the manifest holds them.
        assert "<th>RMSE</th><th>NLL</th><th>coverage 90%</th>" in price_part
        assert f"<td>{regression.ensemble['rmse']:.4f}</td>" in price_part
        assert "<th>micro F1</th><th>macro F1</th><th>NLL</th><th>ECE</th>" in flags_part
        assert f"<td>{multilabel.ensemble['micro_f1']:.4f}</td>" in flags_part
        assert "<th>accuracy</th>" not in dom

        # Each head: its task, the comparison with its bootstrap intervals, calibration, abstention.
        assert 'data-task="regression"' in price_part and 'data-head="price"' in price_part
        assert "the member chosen on validation" in price_part and "95% interval" in price_part
        assert "<td>coverage_90</td>" in price_part and "variance scale" in price_part
        scale = regression.selection.calibration[0]
        assert f"variance scale {scale:.3f} (fitted on validation)" in price_part
        assert "Abstains when its 90% interval" in price_part or "No abstention rule" in price_part
        assert 'data-task="multilabel"' in flags_part and "<td>micro_f1</td>" in flags_part
        assert "temperatures " + ", ".join(f"{t:.3f}" for t in multilabel.selection.calibration) in flags_part
        for label in ("old", "late", "far"):
            assert f"<td>{label}</td>" in flags_part
        assert "share of yes" in flags_part

        # Every picture the reports list, loaded.
        for part, files in ((price_part, ("predicted.png", "coverage.png", "metrics.png")),
                            (flags_part, ("reliability.png", "risk_coverage.png", "metrics.png"))):
            shown = re.findall(r'<img [^>]*>', part)
            assert sorted(re.search(r'data-file="([^"]+)"', i).group(1) for i in shown) == sorted(files)
            assert all('data-loaded="yes"' in i for i in shown), shown
        assert "/somewhere" not in dom
        shot = tmp_path / "ui.png"
        browse(f"{server.base}/ui", f"--screenshot={shot}", "--window-size=1280,3000")
        assert shot.read_bytes()[:4] == b"\x89PNG"
        print(f"[figures] screenshot in {shot}")
    finally:
        server.kill()
