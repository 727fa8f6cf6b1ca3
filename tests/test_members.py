"""Member mixes and run plans (pure), and the SWA callback and BN recompute on tiny models."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from training.members import (
    distinct_configs,
    parse_member_mix,
    plan_runs,
    snapshot_cycle_ends,
    swa_start_epoch,
)
from training.swa import StochasticWeightAveraging, recompute_batch_norm, running_average

A, B, C = {"units": 32}, {"units": 64}, {"units": 128}


def test_distinct_configs_drops_hyperband_repeats_in_rank_order():
    assert distinct_configs([A, A, B, A, C], 2) == [A, B]
    assert distinct_configs([A, B], 5) == [A, B]


@pytest.mark.parametrize(
    "text, mix",
    [
        ("5", {"tuned": 5}),
        ("tuned:3,seed:2,snapshot:3,swa:1", {"tuned": 3, "seed": 2, "snapshot": 3, "swa": 1}),
        (" swa:2 , tuned:1 ", {"swa": 2, "tuned": 1}),
    ],
)
def test_parse_member_mix(text, mix):
    assert parse_member_mix(text) == mix
    assert list(parse_member_mix(text)) == list(mix)


@pytest.mark.parametrize(
    "text, message",
    [("boosted:2", "unknown kind 'boosted'"), ("tuned:2,tuned:1", "given twice"), ("tuned:0", "at least 1"),
     ("tuned", "not KIND:COUNT"), ("", "at least one member")],
)
def test_parse_member_mix_refuses_with_reason(text, message):
    with pytest.raises(ValueError, match=message):
        parse_member_mix(text)


def test_plan_runs_numbers_members_across_kinds_with_own_seeds():
    runs = plan_runs([B, A, B, C], {"tuned": 2, "seed": 1, "snapshot": 3, "swa": 1}, seed=10)
    assert [(r.kind, r.names, r.hyperparameters, r.seed) for r in runs] == [
        ("tuned", ("tuned-0",), B, 10),
        ("tuned", ("tuned-1",), A, 11),
        ("seed", ("seed-2",), B, 12),
        ("snapshot", ("snapshot-3", "snapshot-4", "snapshot-5"), B, 13),
        ("swa", ("swa-6",), B, 14),
    ]


def test_plan_fills_missing_tuned_configs_with_seed_runs_of_the_best():
    runs = plan_runs([A, A], {"tuned": 3}, seed=0)
    assert [(r.kind, r.names, r.hyperparameters) for r in runs] == [
        ("tuned", ("tuned-0",), A), ("seed", ("seed-1",), A), ("seed", ("seed-2",), A)]


def test_plan_needs_a_configuration():
    with pytest.raises(ValueError, match="no configuration"):
        plan_runs([], {"tuned": 1}, seed=0)


def test_snapshot_and_swa_epoch_arithmetic():
    assert snapshot_cycle_ends(3, 10) == [9, 19, 29]
    assert swa_start_epoch(30, 0.6) == 18
    assert swa_start_epoch(3, 0.99) == 2  # never past the last epoch
    assert swa_start_epoch(10, 0.0) == 0


def test_running_average_is_the_mean():
    values = [np.array([1.0, 2.0]), np.array([3.0, 6.0]), np.array([5.0, 1.0])]
    avg = values[0]
    for n, v in enumerate(values[1:], start=1):
        avg = running_average(avg, v, n)
    np.testing.assert_allclose(avg, np.mean(values, axis=0))


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append([w.numpy().copy() for w in self.model.trainable_weights])


def tiny_model(batch_norm: bool = False) -> keras.Model:
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4)(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return model


def test_swa_callback_averages_weights_from_the_start_epoch(tmp_path):
    keras.utils.set_random_seed(0)
    model = tiny_model()
    x, y = np.random.default_rng(0).normal(size=(32, 3)), np.arange(32) % 2
    recorder, swa = _Recorder(), StochasticWeightAveraging(start_epoch=2, state_path=tmp_path / "swa.npz")
    model.fit(x, y, epochs=5, batch_size=8, verbose=0, callbacks=[recorder, swa])
    assert swa.count == 3
    swa.apply_to(model)
    for i, w in enumerate(model.trainable_weights):
        np.testing.assert_allclose(w.numpy(), np.mean([seen[i] for seen in recorder.seen[2:]], axis=0), rtol=1e-5)
    resumed = StochasticWeightAveraging(start_epoch=2, state_path=tmp_path / "swa.npz")
    resumed.on_train_begin()
    assert resumed.count == 3 and len(resumed.average) == len(model.trainable_weights)


def test_recompute_batch_norm_sets_population_statistics():
    keras.utils.set_random_seed(0)
    model = tiny_model(batch_norm=True)
    x = np.random.default_rng(1).normal(loc=3.0, size=(100, 3)).astype("float32")
    assert recompute_batch_norm(model, x, batch_size=16) == 1
    bn = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    h = keras.Model(model.input, bn.input)(x).numpy()
    np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), h.var(axis=0), rtol=1e-4, atol=1e-5)


class _Interrupt(keras.callbacks.Callback):
    """Simulates a crash at the end of an epoch."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            raise KeyboardInterrupt


class _FirstEpoch(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def test_interrupted_member_training_resumes_from_its_backup(tmp_path):
    from training.data import Dataset, Splits
    from training.hypermodel import EnsembleHyperModel
    from training.members import MemberOptions, MemberTrainer, hyperparameters_from

    rng = np.random.default_rng(0)
    part = lambda n: Dataset(rng.normal(size=(n, 3)).astype("float32"), np.arange(n) % 2, ("a", "b"), "t")  # noqa: E731
    splits = Splits(part(32), part(16), part(16))
    hypermodel = EnsembleHyperModel((3,), 2, np.zeros(3, "float32"), np.ones(3, "float32"))
    trainer = MemberTrainer(hypermodel, splits, MemberOptions(epochs=5, batch_size=8), tmp_path / "out",
                            tmp_path / "backup", report=lambda _: None)
    config = {"units": 32, "dropout": 0.0, "dense_layers": 1, "learning_rate": 0.01}
    model = hypermodel.build(hyperparameters_from(config))
    with pytest.raises(KeyboardInterrupt):
        trainer._fit(model, 5, tmp_path / "backup" / "run", [_Interrupt(at=2)])
    resumed, seen = hypermodel.build(hyperparameters_from(config)), _FirstEpoch()
    trainer._fit(resumed, 5, tmp_path / "backup" / "run", [seen])
    assert seen.epochs == [3, 4]  # epochs 0-2 were done before the crash
