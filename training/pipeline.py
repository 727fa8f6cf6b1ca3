"""The training pipeline: data, search, members, evaluation, publish. Nothing is published unless
every step succeeded."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from service.repository import DataInfo, InputSpec, Manifest, OutputSpec, uniform_weights
from training.data import Splits, fingerprint, normalization_stats, open_source, split
from training.evaluate import average_probabilities, classification_metrics, format_table
from training.publish import MemberArtifact, check_writable, publish_version
from training.tune import SearchBudget


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; the CLI fills it from flags."""

    data: str
    name: str
    repository: Path
    work_dir: Path | None = None
    budget: SearchBudget = field(default_factory=SearchBudget)
    members: int = 5
    epochs: int = 60
    patience: int = 10
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    verbose: int = 0

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ValueError(f"--members must be at least 1, got {self.members}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {self.epochs}")
        if self.patience < 1:
            raise ValueError(f"--patience must be at least 1, got {self.patience}")

    def resolved_work_dir(self) -> Path:
        """Tuner state lives in a hidden folder of the repository unless told otherwise."""
        return self.work_dir or (self.repository / ".work")


@dataclass(frozen=True)
class EvaluationResult:
    member_metrics: dict[str, dict[str, float]]
    ensemble_metrics: dict[str, float]


def evaluate_members(
    names: list[str], member_probs: np.ndarray, weights: list[float], labels: np.ndarray
) -> EvaluationResult:
    """Metrics of every member and of their weighted average on the same rows."""
    per_member = {n: classification_metrics(p, labels) for n, p in zip(names, member_probs)}
    ensemble = classification_metrics(average_probabilities(member_probs, weights), labels)
    return EvaluationResult(per_member, ensemble)


def best_member_metrics(result: EvaluationResult) -> dict[str, float]:
    """The member with the highest accuracy (ties: lower NLL)."""
    return min(result.member_metrics.values(), key=lambda m: (-m["accuracy"], m["nll"]))


def train_ensemble(config: TrainConfig, report: Callable[[str], None] = print) -> Manifest:
    """Run the whole pipeline and publish a new version; raises (publishing nothing) on failure."""
    # Heavy imports here so `--help` and argument errors are instant.
    import keras

    from training.hypermodel import SEARCH_SPACE_VERSION, EnsembleHyperModel
    from training.members import config_values, plan_tuned_members, predict_saved_model, train_member
    from training.tune import search

    started = time.monotonic()
    check_writable(config.repository)
    data = open_source(config.data).load()
    splits: Splits = split(data, config.seed, config.val_fraction, config.test_fraction)
    print_data = f"{len(splits.train.y)} train / {len(splits.val.y)} validation / {len(splits.test.y)} test"
    report(f"[data] {data.source}: {len(data.y)} rows of shape {list(data.input_shape)}, "
           f"{len(data.classes)} classes; {print_data}")

    mean, variance = normalization_stats(splits.train.x)
    hypermodel = EnsembleHyperModel(data.input_shape, len(data.classes), mean, variance)
    digest = fingerprint(data)
    work = config.resolved_work_dir()
    work.mkdir(parents=True, exist_ok=True)

    report(f"[tune] {config.budget.tuner}, max_epochs={config.budget.max_epochs}, "
           f"factor={config.budget.factor}, objective={config.budget.objective}")
    keras.utils.set_random_seed(config.seed)
    ranked = search(hypermodel, splits, config.budget, work / "tuning", f"{config.name}-{digest[:12]}-s{SEARCH_SPACE_VERSION}",
                    config.seed, report, config.verbose)
    report(f"[tune] search done after {time.monotonic() - started:.0f} s; {len(ranked)} trials")
    plans = plan_tuned_members([config_values(hp) for hp in ranked], config.members, config.seed)

    exports = Path(tempfile.mkdtemp(prefix="members-", dir=work))
    try:
        trained = []
        for i, plan in enumerate(plans, 1):
            report(f"[member] training {plan.name} ({i}/{len(plans)}): {plan.hyperparameters}")
            trained.append(train_member(plan, hypermodel, splits, exports / plan.name, config.epochs,
                                        config.patience, config.budget.batch_size, report))

        names = [t.plan.name for t in trained]
        weights = uniform_weights(len(trained))
        probs = np.stack([predict_saved_model(t.export_dir, splits.test.x) for t in trained])
        result = evaluate_members(names, probs, weights, splits.test.y)
        report("[evaluate] held-out test split, " + f"{len(splits.test.y)} rows:\n"
               + format_table({**result.member_metrics, "ENSEMBLE": result.ensemble_metrics}))
        best = best_member_metrics(result)
        report(f"[evaluate] ensemble accuracy {result.ensemble_metrics['accuracy']:.4f} "
               f"vs best member {best['accuracy']:.4f}; "
               f"NLL {result.ensemble_metrics['nll']:.4f} vs {best['nll']:.4f}")

        artifacts = [
            MemberArtifact(
                name=t.plan.name,
                kind=t.plan.kind,
                source=t.export_dir,
                weight=w,
                hyperparameters={**t.plan.hyperparameters, "seed": t.plan.seed,
                                 "epochs_trained": t.epochs_trained},
                metrics=result.member_metrics[t.plan.name],
            )
            for t, w in zip(trained, weights)
        ]
        metrics = {**result.ensemble_metrics, **{f"best_member_{k}": v for k, v in best.items()}}
        manifest = publish_version(
            config.repository,
            config.name,
            artifacts,
            InputSpec(shape=data.input_shape, dtype="float32"),
            OutputSpec(classes=data.classes),
            metrics,
            DataInfo(source=data.source, fingerprint=digest,
                     rows={"train": len(splits.train.y), "validation": len(splits.val.y),
                           "test": len(splits.test.y)}),
        )
    finally:
        shutil.rmtree(exports, ignore_errors=True)
    report(f"[publish] {config.name} version {manifest.version} with {len(manifest.members)} members "
           f"in {config.repository / config.name / str(manifest.version)} "
           f"({time.monotonic() - started:.0f} s in all)")
    return manifest
