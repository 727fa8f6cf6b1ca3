"""The four ways to get ensemble members, and exporting members as SavedModels.

1. tuned:    the top-k distinct configurations of the search, each retrained from scratch.
2. seed:     the best configuration, trained from k random initialisations.
3. snapshot: one run of the best configuration on a cosine learning rate with warm restarts;
             the weights at the end of each cycle are a member (Huang et al. 2017).
4. swa:      the best configuration trained with stochastic weight averaging (Izmailov et al.
             2018), batch-normalisation statistics recomputed for the averaged weights.

Every fit uses `keras.callbacks.BackupAndRestore`, so an interrupted run resumes.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import keras
import keras_tuner as kt
import numpy as np

from contract.manifest import TensorSpec
from training.data import FitSplits, Splits
from training.hypermodel import EnsembleHyperModel, TableHyperModel
from training.progress import MemberPhase, RunProgress, logged_value
from training.swa import StochasticWeightAveraging, recompute_batch_norm

# Keras Tuner bookkeeping values (Hyperband's epochs, bracket, round...) are not architecture.
_TUNER_PREFIX = "tuner/"
STRATEGIES = ("tuned", "seed", "snapshot", "swa")


@dataclass(frozen=True)
class MemberOptions:
    """How long and how each kind of member trains."""

    epochs: int = 60
    patience: int = 10
    batch_size: int = 32
    snapshot_epochs_per_cycle: int = 15
    swa_epochs: int = 30
    swa_start_fraction: float = 0.6

    def __post_init__(self) -> None:
        for name in ("epochs", "patience", "batch_size", "snapshot_epochs_per_cycle", "swa_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.swa_start_fraction < 1.0:
            raise ValueError(f"--swa-start-fraction must be in [0, 1), got {self.swa_start_fraction}")


@dataclass(frozen=True)
class RunPlan:
    """One training run: of kind `kind`, on one configuration and seed, yielding `names` members."""

    kind: str
    names: tuple[str, ...]
    hyperparameters: dict
    seed: int


@dataclass(frozen=True)
class TrainedMember:
    name: str
    kind: str
    export_dir: Path
    hyperparameters: dict = field(default_factory=dict)


def parse_member_mix(text: str) -> dict[str, int]:
    """`5` (five tuned) or `tuned:3,seed:2,snapshot:3,swa:1` -> {kind: count}, in the order given."""
    text = text.strip()
    if text.isdigit():
        text = f"tuned:{text}"
    mix: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"([a-z]+):(\d+)", part)
        if not match:
            raise ValueError(f"--members: {part!r} is not KIND:COUNT (e.g. tuned:3,seed:2,snapshot:3,swa:1)")
        kind, count = match.group(1), int(match.group(2))
        if kind not in STRATEGIES:
            raise ValueError(f"--members: unknown kind {kind!r}; choose from {', '.join(STRATEGIES)}")
        if kind in mix:
            raise ValueError(f"--members: {kind!r} is given twice")
        if count < 1:
            raise ValueError(f"--members: {kind} needs a count of at least 1")
        mix[kind] = count
    if not mix:
        raise ValueError("--members: ask for at least one member, e.g. tuned:5")
    return mix


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


def plan_runs(ranked: Sequence[dict], mix: dict[str, int], seed: int) -> list[RunPlan]:
    """Training runs for a member mix; members are numbered across kinds, each run has its own seed.

    If the search found fewer distinct configurations than `tuned` asks for, the missing ones
    are trained as `seed` members of the best configuration.
    """
    if not ranked:
        raise ValueError("the search produced no configuration")
    best = ranked[0]
    runs: list[RunPlan] = []
    index = 0

    def add(kind: str, count: int, config: dict) -> None:
        nonlocal index
        runs.append(RunPlan(kind, tuple(f"{kind}-{index + i}" for i in range(count)), config, seed + len(runs)))
        index += count

    for kind, count in mix.items():
        if kind == "tuned":
            configs = distinct_configs(ranked, count)
            for config in configs:
                add("tuned", 1, config)
            for _ in range(count - len(configs)):
                add("seed", 1, best)
        elif kind == "snapshot":
            add("snapshot", count, best)
        else:  # seed and swa: one run per member
            for _ in range(count):
                add(kind, 1, best)
    return runs


def hyperparameters_from(values: dict) -> kt.HyperParameters:
    """A fixed HyperParameters object that makes the hypermodel build exactly this configuration."""
    hp = kt.HyperParameters()
    for key, value in values.items():
        hp.Fixed(key, value)
    return hp


def snapshot_cycle_ends(cycles: int, epochs_per_cycle: int) -> list[int]:
    """0-based epochs after which a snapshot is taken: the last epoch of every cycle."""
    return [(c + 1) * epochs_per_cycle - 1 for c in range(cycles)]


def swa_start_epoch(epochs: int, fraction: float) -> int:
    """First 0-based epoch whose weights enter the average."""
    return min(epochs - 1, int(math.floor(epochs * fraction)))


class _SnapshotSaver(keras.callbacks.Callback):
    """Saves the weights at the end of every learning-rate cycle."""

    def __init__(self, epochs: list[int], paths: list[Path]):
        super().__init__()
        self.at = dict(zip(epochs, paths))

    def on_epoch_end(self, epoch, logs=None):
        if epoch in self.at:
            self.model.save_weights(str(self.at[epoch]))


def planned_epochs(run: RunPlan, options: MemberOptions) -> tuple[int, bool]:
    """The epochs a run trains, and whether early stopping may end it sooner (tuned and seed runs)."""
    if run.kind == "snapshot":
        return len(run.names) * options.snapshot_epochs_per_cycle, False
    if run.kind == "swa":
        return options.swa_epochs, False
    return options.epochs, True


class _EpochProgress(keras.callbacks.Callback):
    """Feeds a run's progress from its fit: where it started (resumed or not), each epoch, the end."""

    def __init__(self, progress: RunProgress):
        super().__init__()
        self.progress = progress
        self.begun = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self.begun:  # after BackupAndRestore has moved the fit to its resumed epoch
            self.progress.begin(epoch)
            self.begun = True

    def on_epoch_end(self, epoch, logs=None):
        self.progress.epoch(epoch + 1, logged_value(logs, "val_loss"))

    def on_train_end(self, logs=None):
        self.progress.end()


class MemberTrainer:
    """Trains the runs of a plan and exports every member they yield."""

    def __init__(
        self,
        hypermodel: EnsembleHyperModel | TableHyperModel,
        splits: Splits | FitSplits,
        options: MemberOptions,
        export_root: Path,
        backup_root: Path,
        report: Callable[[str], None] = print,
        export: Callable[[keras.Model, Path], None] | None = None,
        progress: MemberPhase | None = None,
    ):
        self.export = export or export_member
        self.progress = progress
        self.hypermodel = hypermodel
        self.splits = splits
        self.options = options
        self.export_root = Path(export_root)
        self.backup_root = Path(backup_root)
        self.report = report

    def train_run(self, run: RunPlan, key: str) -> list[TrainedMember]:
        """Train one run (resuming its backup under `key` if interrupted) and export its members."""
        keras.utils.set_random_seed(run.seed)
        model = self.hypermodel.build(hyperparameters_from(run.hyperparameters))
        backup = self.backup_root / f"{'-'.join(run.names)}-{key}"
        train = {"tuned": self._standard, "seed": self._standard, "snapshot": self._snapshot,
                 "swa": self._swa}[run.kind]
        members = train(run, model, backup)
        # Training finished: the backup (and saved snapshots) are no longer needed.
        shutil.rmtree(backup, ignore_errors=True)
        keras.backend.clear_session(free_memory=True)
        return members

    def _fit(self, model: keras.Model, epochs: int, backup: Path, callbacks: list, run: RunPlan | None = None) -> dict:
        o = self.options
        if self.progress is not None and run is not None:
            at_most = any(isinstance(c, keras.callbacks.EarlyStopping) for c in callbacks)
            label = f"{', '.join(run.names)} ({run.kind})"
            callbacks = [*callbacks, _EpochProgress(self.progress.run(label, epochs, at_most))]
        history = model.fit(
            self.splits.train.x,
            self.splits.train.y,
            validation_data=(self.splits.val.x, self.splits.val.y),
            epochs=epochs,
            batch_size=o.batch_size,
            callbacks=[keras.callbacks.BackupAndRestore(str(backup / "backup")), *callbacks],
            verbose=0,
        )
        return history.history

    def _export(self, run: RunPlan, name: str, model: keras.Model, extra: dict) -> TrainedMember:
        self.export(model, self.export_root / name)
        return TrainedMember(name, run.kind, self.export_root / name,
                             {**run.hyperparameters, "seed": run.seed, **extra})

    def _standard(self, run: RunPlan, model: keras.Model, backup: Path) -> list[TrainedMember]:
        patience = self.options.patience
        stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
        # Halving the rate on a plateau lets every seed settle into its minimum before early
        # stopping ends the run: members of more even quality average better.
        calm = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5,
                                                 patience=max(1, patience // 3), min_lr=1e-5)
        history = self._fit(model, self.options.epochs, backup, [stop, calm], run)
        epochs = len(history.get("loss", []))
        self.report(f"[member] {run.names[0]} ({run.kind}): {epochs} epochs, {best_of(history)}")
        return [self._export(run, run.names[0], model, {"epochs_trained": epochs})]

    def _snapshot(self, run: RunPlan, model: keras.Model, backup: Path) -> list[TrainedMember]:
        o = self.options
        cycles = len(run.names)
        steps = math.ceil(len(self.splits.train.y) / o.batch_size)
        peak = float(run.hyperparameters.get("learning_rate", 1e-3))
        schedule = keras.optimizers.schedules.CosineDecayRestarts(
            initial_learning_rate=peak, first_decay_steps=o.snapshot_epochs_per_cycle * steps,
            t_mul=1.0, m_mul=1.0, alpha=0.0)
        self.hypermodel.compile(model, keras.optimizers.Adam(schedule))
        backup.mkdir(parents=True, exist_ok=True)
        paths = [backup / f"{name}.weights.h5" for name in run.names]
        ends = snapshot_cycle_ends(cycles, o.snapshot_epochs_per_cycle)
        self._fit(model, cycles * o.snapshot_epochs_per_cycle, backup, [_SnapshotSaver(ends, paths)], run)
        members = []
        for cycle, (name, path) in enumerate(zip(run.names, paths), 1):
            model.load_weights(str(path))
            members.append(self._export(run, name, model, {"cycle": cycle, "epochs_per_cycle": o.snapshot_epochs_per_cycle}))
        self.report(f"[member] {', '.join(run.names)} (snapshot): {cycles} cycles of "
                    f"{o.snapshot_epochs_per_cycle} epochs, peak learning rate {peak:.2g}")
        return members

    def _swa(self, run: RunPlan, model: keras.Model, backup: Path) -> list[TrainedMember]:
        o = self.options
        start = swa_start_epoch(o.swa_epochs, o.swa_start_fraction)
        swa = StochasticWeightAveraging(start_epoch=start, state_path=backup / "swa-average.npz")
        self._fit(model, o.swa_epochs, backup, [swa], run)
        swa.apply_to(model)
        recompute_batch_norm(model, self.splits.train.x, o.batch_size)
        self.report(f"[member] {run.names[0]} (swa): {o.swa_epochs} epochs, "
                    f"{swa.count} weight sets averaged from epoch {start + 1}")
        return [self._export(run, run.names[0], model, {"swa_epochs": o.swa_epochs,
                                                         "swa_start_epoch": start + 1,
                                                         "swa_averaged": swa.count})]


def best_of(history: dict) -> str:
    """The best validation figure of a fit: accuracy where Keras measured it, else the loss."""
    if history.get("val_accuracy"):
        return f"best val_accuracy={max(history['val_accuracy']):.4f}"
    return f"best val_loss={min(history.get('val_loss', [float('nan')])):.4f}"


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


def export_named_member(model: keras.Model, export_dir: Path, inputs: Sequence[TensorSpec], head: str) -> None:
    """Write a format-2 SavedModel: its `serve` endpoint (and `serving_default`) takes every named
    input and gives the one head by its manifest name, in inference mode (as `export_member`)."""
    import tensorflow as tf

    specs = {s.name: tf.TensorSpec([None, *s.shape], tf.as_dtype(s.dtype), name=s.name) for s in inputs}
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda named: {head: model(named, training=False)}, input_signature=[specs])
    archive.write_out(str(export_dir), verbose=False)


def predict_named_saved_model(export_dir: Path, columns: dict[str, np.ndarray], head: str,
                              batch_size: int = 512) -> np.ndarray:
    """A format-2 member's head output from the exported SavedModel itself: what is served."""
    return predict_named_sets(export_dir, head, [columns], batch_size)[0]


def predict_named_sets(export_dir: Path, head: str, sets: Sequence[dict[str, np.ndarray]],
                       batch_size: int = 512) -> list[np.ndarray]:
    """The head's output on each set of rows, the SavedModel loaded once (every load of a
    SavedModel holds memory the process does not get back)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(export_dir))

    def on(columns: dict[str, np.ndarray]) -> np.ndarray:
        rows = len(next(iter(columns.values())))
        return np.concatenate([np.asarray(loaded.serve({k: tf.constant(v[i : i + batch_size])
                                                         for k, v in columns.items()})[head])
                               for i in range(0, rows, batch_size)], axis=0)

    return [on(columns) for columns in sets]
