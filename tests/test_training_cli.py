"""`ensemble-train`: bad input fails with one clear line and publishes nothing; npz vectors work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contract.layout import scan_model
from contract.manifest import read_manifest
from training.cli import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, EXIT_USAGE, main

FAST = ["--max-epochs", "2", "--factor", "2", "--members", "2", "--epochs", "2", "--patience", "1",
        "--snapshot-epochs-per-cycle", "1", "--swa-epochs", "2"]


def vectors(path, n=120, classes=3, d=6):
    rng = np.random.default_rng(1)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, d)) + 3 * y[:, None]
    np.savez(path, x=x.astype("float32"), y=np.array(["red", "green", "blue"])[y])


def run(args, tmp_path, capsys):
    code = main([*args, "--repository", str(tmp_path / "models")])
    return code, capsys.readouterr()


def test_npz_feature_vectors_train_and_publish_a_dense_ensemble(tmp_path, capsys):
    vectors(tmp_path / "v.npz")
    code, out = run(["--data", str(tmp_path / "v.npz"), "--name", "vectors", *FAST], tmp_path, capsys)
    assert code == EXIT_OK, out.err
    manifest = read_manifest(tmp_path / "models" / "vectors" / "1")
    assert manifest.input.shape == (6,) and manifest.output.classes == ("blue", "green", "red")
    assert {"accuracy", "nll", "best_member_accuracy", "selected_member_nll"} <= set(manifest.metrics)
    assert manifest.data.fingerprint and manifest.data.rows["test"] == 24
    assert "[publish] vectors version 1" in out.out and "ENSEMBLE" in out.out
    # The default ensemble: members kept on validation evidence, calibrated, compared honestly.
    report = json.loads((tmp_path / "models" / "vectors" / "1" / "report.json").read_text())
    kept = [n for n, m in report["members"].items() if m["kept"]]
    assert len(report["members"]) == 2 and [m.name for m in manifest.members] == kept
    assert len(kept) + len(report["selection"]["removed"]) == 2
    assert "[ensemble] kept" in out.out and "(pruned)" in out.out
    assert f"temperature {manifest.temperature:.3f} (fitted on validation)" in out.out
    assert "the member chosen on validation (lowest NLL)" in out.out
    assert out.out.count("[evaluate]   ") == 4  # accuracy, nll, brier, ece with intervals
    assert "[abstain]" in out.out and "[uncertainty] AUROC" in out.out
    for name in ("reliability.png", "metrics.png", "risk_coverage.png"):
        assert (tmp_path / "models" / "vectors" / "1" / name).read_bytes()[:4] == b"\x89PNG"


def test_ood_holdout_trains_without_the_classes_and_reports_how_well_they_are_noticed(tmp_path, capsys):
    vectors(tmp_path / "v.npz")
    code, out = run(["--data", str(tmp_path / "v.npz"), "--name", "vectors", *FAST, "--ood-holdout", "red",
                     "--weights", "uniform", "--calibration", "none"], tmp_path, capsys)
    assert code == EXIT_OK, out.err
    vdir = tmp_path / "models" / "vectors" / "1"
    manifest = read_manifest(vdir)
    assert manifest.output.classes == ("blue", "green") and manifest.calibration is None
    report = json.loads((vdir / "report.json").read_text())
    assert report["data"]["ood_holdout"] == ["red"] and report["ood"]["rows"] > 0
    assert set(report["ood"]["auroc"]) == {"entropy", "expected_entropy", "mutual_information"}
    assert "[ood] AUROC for telling the" in out.out
    assert (vdir / "ood.png").read_bytes()[:4] == b"\x89PNG"
    code, out = run(["--data", str(tmp_path / "v.npz"), "--name", "other", *FAST, "--ood-holdout", "purple"],
                    tmp_path, capsys)
    assert code != EXIT_OK and "--ood-holdout names 'purple'" in out.err


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("garbage"), "not a readable .npz"),
        (lambda p: np.savez(p, x=np.zeros((30, 2))), "no array 'y'"),
        (lambda p: np.savez(p, x=np.zeros((30, 2)), y=np.zeros(30)), "1 class"),
        (lambda p: np.savez(p, x=np.full((30, 2), np.nan), y=np.arange(30) % 2), "NaN"),
        (lambda p: np.savez(p, x=np.zeros((4, 2)), y=np.arange(4) % 2), "at least 3"),
    ],
)
def test_bad_data_exits_1_with_a_clear_line_and_publishes_nothing(tmp_path, capsys, setup, message):
    setup(tmp_path / "d.npz")
    code, out = run(["--data", str(tmp_path / "d.npz"), *FAST], tmp_path, capsys)
    assert code == EXIT_FAILED
    assert message in out.err and "nothing was published" in out.err
    assert scan_model(tmp_path / "models", "digits") == []


def test_usage_errors_exit_2(tmp_path, capsys):
    code, out = run(["--name", "Bad Name"], tmp_path, capsys)
    assert code == EXIT_USAGE and "is not valid" in out.err
    code, out = run(["--members", "tuned:0"], tmp_path, capsys)
    assert code == EXIT_USAGE and "tuned needs a count of at least 1" in out.err
    code, out = run(["--members", "bagged:2"], tmp_path, capsys)
    assert code == EXIT_USAGE and "unknown kind 'bagged'" in out.err
    code, out = run(["--data", "mnist", *FAST], tmp_path, capsys)
    assert code == EXIT_FAILED and "unknown data source 'mnist'" in out.err


def test_unwritable_repository_exits_1(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code = main(["--repository", str(tmp_path / "file" / "models"), *FAST])
    assert code == EXIT_FAILED and "cannot create repository folder" in capsys.readouterr().err


def test_if_empty_skips_when_a_version_exists(trained_repository, capsys):
    assert main(["--repository", str(trained_repository), "--if-empty"]) == EXIT_OK
    assert "already has version 1" in capsys.readouterr().out


def test_gate_refuses_a_worse_challenger_and_no_gate_publishes(tmp_path, capsys):
    vectors(tmp_path / "v.npz")
    common = ["--data", str(tmp_path / "v.npz"), "--name", "vectors", *FAST]
    strong = [*common, "--tuner", "random", "--max-trials", "2", "--epochs", "40", "--patience", "5"]
    assert run(strong, tmp_path, capsys)[0] == EXIT_OK
    # One epoch of one member cannot match forty epochs by NLL on the same test rows (same seed).
    weak = [*common, "--tuner", "random", "--max-trials", "1", "--max-epochs", "1", "--epochs", "1",
            "--members", "seed:1", "--allow-fewer", "--gate-metric", "nll"]
    code, out = run(weak, tmp_path, capsys)
    assert code == EXIT_REFUSED, out.err
    assert "challenger is refused: nll" in out.err and "version 1's" in out.err and "nothing was published" in out.err
    assert [v.version for v in scan_model(tmp_path / "models", "vectors")] == [1]
    code, out = run([*weak, "--no-gate"], tmp_path, capsys)
    assert code == EXIT_OK and "gate disabled" in out.out
    vdir = tmp_path / "models" / "vectors" / "2"
    assert {"report.json", "reliability.png", "metrics.png"} <= {p.name for p in vdir.iterdir()}


def test_fitted_weights_are_stored_and_csv_data_trains(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(90, 3))
    y = np.arange(90) % 3
    x[:, 0] += 3 * y
    lines = ["f1,f2,f3,kind", *(f"{a},{b},{c},k{l}" for (a, b, c), l in zip(x, y))]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    code, out = run(["--data", str(tmp_path / "d.csv"), "--label-column", "kind", "--name", "csv", *FAST,
                     "--members", "tuned:1,seed:1", "--weights", "fitted"], tmp_path, capsys)
    assert code == EXIT_OK, out.err
    manifest = read_manifest(tmp_path / "models" / "csv" / "1")  # a table: named columns, format 2
    assert [(s.name, s.dtype) for s in manifest.inputs] == [("f1", "float32"), ("f2", "float32"), ("f3", "float32")]
    assert [(h.name, h.task, h.labels) for h in manifest.heads] == [("kind", "classification", ("k0", "k1", "k2"))]
    report = json.loads((tmp_path / "models" / "csv" / "1" / "report.json").read_text())
    # 90 rows: cross-fitted (training.crossfit), each member published as its 5 fold models with a
    # fifth of its fitted weight each.
    fitted = report["heads"]["kind"]["selection"]["weights"]
    assert report["weighting"] == "fitted" and report["cross_fitted"] == {"folds": 5, "rows": 72}
    assert list(manifest.weights) == pytest.approx([w / 5 for w in fitted for _ in range(5)])
    assert sum(manifest.weights) == pytest.approx(1.0)


def test_schedule_runs_training_children_and_reports_failures(tmp_path, capfd):
    (tmp_path / "bad.npz").write_text("not an npz")
    code = main(["schedule", "--every", "1s", "--max-runs", "2", "--initial-run", "always",
                 "--data", str(tmp_path / "bad.npz"), "--repository", str(tmp_path / "models")])
    out = capfd.readouterr()
    assert code == EXIT_FAILED
    assert out.out.count("failed with exit code 1 (nothing published); retrying at the next tick") == 2
    assert "not a readable .npz file" in out.err
    assert scan_model(tmp_path / "models", "digits") == []


def test_schedule_refuses_bad_cron_and_interval(tmp_path, capsys):
    assert main(["schedule", "--cron", "61 * * * *", "--repository", str(tmp_path)]) == EXIT_USAGE
    assert "not a valid cron expression" in capsys.readouterr().err
    assert main(["schedule", "--every", "soon", "--repository", str(tmp_path)]) == EXIT_USAGE
    assert "not an interval" in capsys.readouterr().err


def test_a_second_trainer_of_the_same_ensemble_stops_at_once_and_says_who_holds_it(tmp_path, capsys):
    """The seed Job, the CronJob and a manual run share the tuner folder and backups of a name:
    the pipeline's own lock lets one at a time through."""
    import os
    import time

    from training.lock import one_trainer

    work = tmp_path / "work"
    with one_trainer(work, "digits"):
        started = time.monotonic()
        code = main(["--data", "digits", "--name", "digits", "--repository", str(tmp_path / "models"),
                     "--work-dir", str(work), *FAST])
        assert time.monotonic() - started < 10  # refused before loading anything
    err = capsys.readouterr().err
    assert code == EXIT_FAILED and f"another training run of 'digits' is running (pid {os.getpid()}" in err
    assert "nothing was published" in err and scan_model(tmp_path / "models", "digits") == []
    with one_trainer(work, "other"):  # another name is another lock
        pass
    with one_trainer(work, "digits"):  # released when its holder is done
        pass
