"""Training ensemble members from tuned configurations, and exporting them as SavedModels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import keras
import keras_tuner as kt
import numpy as np

from training.data import Splits
from training.hypermodel import EnsembleHyperModel

# Keras Tuner bookkeeping values (Hyperband's epochs, bracket, round...) are not architecture.
_TUNER_PREFIX = "tuner/"


@dataclass(frozen=True)
class MemberPlan:
    """One member to train: its name, kind, configuration and seed."""

    name: str
    kind: str
    hyperparameters: dict
    seed: int


@dataclass(frozen=True)
class TrainedMember:
    plan: MemberPlan
    export_dir: Path
    epochs_trained: int


def config_values(hp: kt.HyperParameters) -> dict:
    """The architecture and optimiser values of a configuration, without tuner bookkeeping."""
    return {k: v for k, v in sorted(hp.values.items()) if not k.startswith(_TUNER_PREFIX)}


def distinct_configs(ranked: Sequence[dict], k: int) -> list[dict]:
    """The first k different configurations of a best-first list (Hyperband repeats promoted ones)."""
    out: list[dict] = []
    for values in ranked:
        if values not in out:
            out.append(values)
        if len(out) == k:
            break
    return out


def plan_tuned_members(ranked: Sequence[dict], k: int, seed: int) -> list[MemberPlan]:
    """Top-k distinct configurations; if the search found fewer, the best one again with new seeds."""
    if k < 1:
        raise ValueError(f"the ensemble needs at least one member, got {k}")
    if not ranked:
        raise ValueError("the search produced no configuration")
    configs = distinct_configs(ranked, k)
    plans = [MemberPlan(f"tuned-{i}", "tuned", c, seed + i) for i, c in enumerate(configs)]
    for i in range(len(configs), k):
        plans.append(MemberPlan(f"seed-{i}", "seed", configs[0], seed + i))
    return plans


def hyperparameters_from(values: dict) -> kt.HyperParameters:
    """A fixed HyperParameters object that makes the hypermodel build exactly this configuration."""
    hp = kt.HyperParameters()
    for key, value in values.items():
        hp.Fixed(key, value)
    return hp


def train_member(
    plan: MemberPlan,
    hypermodel: EnsembleHyperModel,
    splits: Splits,
    export_dir: Path,
    epochs: int,
    patience: int,
    batch_size: int,
    report: Callable[[str], None] = print,
) -> TrainedMember:
    """Train one member with early stopping on the validation split and export it."""
    keras.utils.set_random_seed(plan.seed)
    model = hypermodel.build(hyperparameters_from(plan.hyperparameters))
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=patience, restore_best_weights=True
    )
    history = model.fit(
        splits.train.x,
        splits.train.y,
        validation_data=(splits.val.x, splits.val.y),
        epochs=epochs,
        batch_size=batch_size,
        callbacks=[stop],
        verbose=0,
    )
    trained = len(history.history["loss"])
    val_acc = max(history.history.get("val_accuracy", [float("nan")]))
    report(f"[member] {plan.name}: {trained} epochs, best val_accuracy={val_acc:.4f}")
    export_member(model, export_dir)
    keras.backend.clear_session(free_memory=True)
    return TrainedMember(plan, export_dir, trained)


def export_member(model: keras.Model, export_dir: Path) -> None:
    """Write a SavedModel whose `serve` endpoint (and `serving_default`) runs in inference mode.

    `model.export` registers `model.__call__` without `training=False`, and Keras 3's random
    augmentation layers default to `training=True`: the exported model would augment at
    inference. The endpoint is therefore added explicitly.
    """
    import tensorflow as tf

    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.as_dtype(model.inputs[0].dtype), name="instances")
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda x: model(x, training=False), input_signature=[spec])
    archive.write_out(str(export_dir), verbose=False)


def predict_saved_model(export_dir: Path, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Probabilities from the exported SavedModel itself: what the service will serve."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(export_dir))
    parts = [np.asarray(loaded.serve(tf.constant(x[i : i + batch_size]))) for i in range(0, len(x), batch_size)]
    return np.concatenate(parts, axis=0)
