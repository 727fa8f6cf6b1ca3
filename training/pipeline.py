"""The training pipeline: data, search, members, evaluation, gate, publish. Nothing is published
unless every step succeeded and the gate let the challenger through."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from service.repository import DataInfo, InputSpec, Manifest, OutputSpec, uniform_weights
from training.data import DataOptions, Splits, fingerprint, normalization_stats, open_source, split
from training.evaluate import METRICS, average_probabilities, classification_metrics, format_table
from training.gate import GateDecision, champion_on, decide
from training.members import STRATEGIES, MemberOptions, RunPlan
from training.lock import one_trainer
from training.publish import MemberArtifact, check_writable, publish_version
from training.tune import SearchBudget, is_distributed_worker

DEFAULT_MEMBERS = {"tuned": 1, "seed": 2, "snapshot": 1, "swa": 1}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; the CLI fills it from flags."""

    data: str
    name: str
    repository: Path
    work_dir: Path | None = None
    data_options: DataOptions = field(default_factory=DataOptions)
    budget: SearchBudget = field(default_factory=SearchBudget)
    members: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MEMBERS))
    member_options: MemberOptions = field(default_factory=MemberOptions)
    weighting: Literal["uniform", "fitted"] = "uniform"
    gate: bool = True
    gate_metric: str = "accuracy"
    gate_tolerance: float = 0.0
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    verbose: int = 0

    def __post_init__(self) -> None:
        if not self.members or any(k not in STRATEGIES or n < 1 for k, n in self.members.items()):
            raise ValueError(f"--members must name kinds of {', '.join(STRATEGIES)} with counts >= 1")
        if self.weighting not in ("uniform", "fitted"):
            raise ValueError(f"--weights must be 'uniform' or 'fitted', got {self.weighting!r}")
        if self.gate_metric not in METRICS:
            raise ValueError(f"--gate-metric must be one of {', '.join(METRICS)}, got {self.gate_metric!r}")
        if self.gate_tolerance < 0:
            raise ValueError(f"--gate-tolerance must be >= 0, got {self.gate_tolerance}")

    def resolved_work_dir(self) -> Path:
        """Tuner state and backups live in a hidden folder of the repository unless told otherwise."""
        return self.work_dir or (self.repository / ".work")


@dataclass(frozen=True)
class EvaluationResult:
    member_metrics: dict[str, dict[str, float]]
    ensemble_metrics: dict[str, float]
    ensemble_probabilities: np.ndarray


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: the published manifest, or None when the gate refused it."""

    manifest: Manifest | None
    decision: GateDecision
    evaluation: EvaluationResult
    report: dict


def evaluate_members(
    names: list[str], member_probs: np.ndarray, weights: list[float], labels: np.ndarray
) -> EvaluationResult:
    """Metrics of every member and of their weighted average on the same rows."""
    per_member = {n: classification_metrics(p, labels) for n, p in zip(names, member_probs)}
    average = average_probabilities(member_probs, weights)
    return EvaluationResult(per_member, classification_metrics(average, labels), average)


def best_member(result: EvaluationResult) -> str:
    """The member with the highest accuracy (ties: lower NLL)."""
    return min(result.member_metrics, key=lambda n: (-result.member_metrics[n]["accuracy"],
                                                     result.member_metrics[n]["nll"]))


def run_key(run: RunPlan) -> str:
    """Short digest of a run's kind, configuration and seed: its backup folder must not be reused
    by a different run that happens to have the same member names."""
    raw = json.dumps([run.kind, run.hyperparameters, run.seed], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:10]


def train_ensemble(config: TrainConfig, report: Callable[[str], None] = print) -> TrainResult | None:
    """Run the whole pipeline. Returns None in a distributed-tuning worker (it only runs trials).
    Raises, publishing nothing, on failure, and at once (TrainingBusy) while another run of the
    same ensemble holds its lock (a distributed-tuning worker takes none: it shares its chief's)."""
    check_writable(config.repository)
    if is_distributed_worker():
        return _train(config, report)
    with one_trainer(config.resolved_work_dir(), config.name):
        return _train(config, report)


def _train(config: TrainConfig, report: Callable[[str], None]) -> TrainResult | None:
    # Heavy imports here so `--help` and argument errors are instant.
    import keras

    from training.hypermodel import SEARCH_SPACE_VERSION, EnsembleHyperModel
    from training.members import MemberTrainer, config_values, plan_runs, predict_saved_model
    from training.tune import search
    from training.weighting import fit_weights

    started = time.monotonic()
    data = open_source(config.data, config.data_options).load()
    splits: Splits = split(data, config.seed, config.val_fraction, config.test_fraction)
    report(f"[data] {data.source}: {len(data.y)} rows of shape {list(data.input_shape)}, "
           f"{len(data.classes)} classes; {len(splits.train.y)} train / {len(splits.val.y)} validation / "
           f"{len(splits.test.y)} test")

    mean, variance = normalization_stats(splits.train.x)
    hypermodel = EnsembleHyperModel(data.input_shape, len(data.classes), mean, variance)
    digest = fingerprint(data)
    work = config.resolved_work_dir()
    work.mkdir(parents=True, exist_ok=True)
    project = f"{config.name}-{digest[:12]}-s{SEARCH_SPACE_VERSION}"

    report(f"[tune] {config.budget.describe()}")
    keras.utils.set_random_seed(config.seed)
    ranked = search(hypermodel, splits, config.budget, work / "tuning", project, config.seed, report,
                    config.verbose)
    if is_distributed_worker():
        report("[tune] worker: the chief has closed the search; this worker is done")
        return None
    search_seconds = time.monotonic() - started
    report(f"[tune] search done after {search_seconds:.0f} s; {len(ranked)} trials")
    runs = plan_runs([config_values(hp) for hp in ranked], config.members, config.seed)

    exports = Path(tempfile.mkdtemp(prefix="members-", dir=work))
    try:
        trainer = MemberTrainer(hypermodel, splits, config.member_options, exports,
                                work / "backup" / project, report)
        trained = []
        for i, run in enumerate(runs, 1):
            report(f"[member] run {i}/{len(runs)}: {run.kind} -> {', '.join(run.names)}; "
                   f"{run.hyperparameters}")
            trained.extend(trainer.train_run(run, run_key(run)))

        names = [t.name for t in trained]
        if config.weighting == "fitted":
            val_probs = np.stack([predict_saved_model(t.export_dir, splits.val.x) for t in trained])
            weights = fit_weights(val_probs, splits.val.y)
            report("[weights] fitted on the validation split: "
                   + ", ".join(f"{n}={w:.3f}" for n, w in zip(names, weights)))
        else:
            weights = uniform_weights(len(trained))
        probs = np.stack([predict_saved_model(t.export_dir, splits.test.x) for t in trained])
        result = evaluate_members(names, probs, weights, splits.test.y)
        best = best_member(result)
        report("[evaluate] held-out test split, " + f"{len(splits.test.y)} rows:\n"
               + format_table({**{f"{n} ({t.kind})": result.member_metrics[n] for n, t in zip(names, trained)},
                               "ENSEMBLE": result.ensemble_metrics}))
        ens, top = result.ensemble_metrics, result.member_metrics[best]
        report(f"[evaluate] ensemble accuracy {ens['accuracy']:.4f} vs best member ({best}) "
               f"{top['accuracy']:.4f}; NLL {ens['nll']:.4f} vs {top['nll']:.4f}")

        if config.gate:
            champion = champion_on(config.repository, config.name, splits.test.x, splits.test.y,
                                   data.input_shape, data.classes)
            decision = decide(ens, champion, config.gate_metric, config.gate_tolerance)
        else:
            decision = GateDecision(True, config.gate_metric, config.gate_tolerance,
                                    ens[config.gate_metric], None, None, "gate disabled (--no-gate)")
        report(f"[gate] {decision.reason}")

        run_report = {
            "name": config.name,
            "data": {"source": data.source, "fingerprint": digest,
                     "rows": {"train": len(splits.train.y), "validation": len(splits.val.y),
                              "test": len(splits.test.y)}},
            "search": {**asdict(config.budget), "trials": len(ranked), "seconds": round(search_seconds, 1)},
            "members": {n: {"kind": t.kind, "weight": w, "metrics": result.member_metrics[n],
                            "hyperparameters": t.hyperparameters}
                        for n, t, w in zip(names, trained, weights)},
            "weighting": config.weighting,
            "ensemble": ens,
            "best_member": {"name": best, **top},
            "gate": asdict(decision),
            "seconds": round(time.monotonic() - started, 1),
        }
        if not decision.passed:
            return TrainResult(None, decision, result, run_report)

        from training.report import metrics_png, reliability_png, report_json

        best_index = names.index(best)
        attachments = {
            "report.json": report_json(run_report),
            "reliability.png": reliability_png({
                "ensemble": (result.ensemble_probabilities, splits.test.y),
                f"best member ({best})": (probs[best_index], splits.test.y)}),
            "metrics.png": metrics_png(result.member_metrics, ens),
        }
        manifest = publish_version(
            config.repository,
            config.name,
            [MemberArtifact(name=t.name, kind=t.kind, source=t.export_dir, weight=w,
                            hyperparameters=t.hyperparameters, metrics=result.member_metrics[t.name])
             for t, w in zip(trained, weights)],
            InputSpec(shape=data.input_shape, dtype="float32"),
            OutputSpec(classes=data.classes),
            {**ens, **{f"best_member_{k}": v for k, v in top.items()}},
            DataInfo(source=data.source, fingerprint=digest, rows=run_report["data"]["rows"]),
            attachments,
        )
    finally:
        shutil.rmtree(exports, ignore_errors=True)
    report(f"[publish] {config.name} version {manifest.version} with {len(manifest.members)} members "
           f"in {config.repository / config.name / str(manifest.version)} "
           f"({time.monotonic() - started:.0f} s in all)")
    return TrainResult(manifest, decision, result, run_report)
