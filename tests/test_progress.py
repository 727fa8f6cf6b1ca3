"""Progress of the long steps: the arithmetic and wording as pure functions, the terminal and plain
displays on fake streams with an injected clock, Hyperband's trial count against Keras Tuner
itself, and one tiny `ensemble-train` run's plain lines."""

from __future__ import annotations

import io
import re
import tempfile

import pytest

from training.progress import (
    Display,
    MemberPhase,
    RunProgress,
    SearchProgress,
    format_elapsed,
    format_left,
    hyperband_budgets,
    is_interactive,
    logged_value,
    member_epoch_line,
    seconds_left,
    trial_done_line,
    worker_trial_done_line,
)


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def terminal_display(columns: int = 200) -> tuple[Display, Terminal, Clock, list[str]]:
    lines: list[str] = []
    stream, clock = Terminal(), Clock()
    return Display(lines.append, stream, interactive=True, clock=clock, columns=columns), stream, clock, lines


# --- wording and arithmetic -------------------------------------------------------------------


@pytest.mark.parametrize("seconds, text", [
    (0.2, "about 1 s"), (3.4, "about 3 s"), (42, "about 40 s"), (44, "about 45 s"), (100, "about 2 min"),
    (250, "about 4 min"), (3700, "about 1 h"), (4800, "about 1 h 20 min"), (40000, "about 11 h"),
])
def test_format_left_rounds_as_coarsely_as_an_estimate_deserves(seconds, text):
    assert format_left(seconds) == text


@pytest.mark.parametrize("seconds, text", [(41.6, "42 s"), (185, "3 min 05 s"), (3840, "1 h 04 min")])
def test_format_elapsed_says_a_measured_duration(seconds, text):
    assert format_elapsed(seconds) == text


def test_seconds_left_is_proportional_to_epochs_when_every_unit_has_one_budget():
    assert seconds_left([(3, 6.0), (3, 6.0)], [3, 3, 3]) == pytest.approx(18.0)
    assert seconds_left([(5, 10.0)], [15]) == pytest.approx(30.0)  # a member run: 2 s an epoch


def test_seconds_left_fits_a_cost_per_trial_and_per_epoch_when_budgets_differ():
    # Hyperband: 2 s to build and save every trial, 1 s an epoch.
    measured = [(e, 2.0 + e) for e in (1, 1, 2, 4)]
    assert seconds_left(measured, [4, 4]) == pytest.approx(12.0)


def test_seconds_left_falls_back_to_proportional_when_a_fit_makes_a_cost_negative():
    assert seconds_left([(1, 0.1), (4, 10.0)], [5]) == pytest.approx(10.1 / 5 * 5)


def test_seconds_left_is_unknown_before_anything_is_measured_and_zero_when_nothing_remains():
    assert seconds_left([], [3]) is None
    assert seconds_left([(0, 1.0)], [3]) is None
    assert seconds_left([(2, 1.0)], []) == 0.0


def test_hyperband_budgets_follow_the_brackets():
    # max_epochs 2, factor 2: a bracket of two 1-epoch trials and one promotion (+1 epoch),
    # then a bracket of two 2-epoch trials.
    assert hyperband_budgets(2, 2) == [1, 1, 1, 2, 2]
    assert len(hyperband_budgets(9, 3)) == 23


def test_lines_say_what_issue_28_asked_for():
    assert trial_done_line(3, 30, "val_accuracy", 0.93124, 0.94, 72, 190) == (
        "[tune] trial 3 of 30 done: val_accuracy=0.9312 (best 0.9400), 1 min 12 s elapsed, about 3 min left")
    assert member_epoch_line("seed-1 (seed)", 5, 60, True, 0.31237, 41) == (
        "[member] seed-1 (seed): epoch 5 of at most 60, val_loss=0.3124, at most about 40 s left")
    assert member_epoch_line("swa-4 (swa)", 5, 30, False, None, None) == (
        "[member] swa-4 (swa): epoch 5 of 30, val_loss=n/a")


def test_logged_values_are_read_whatever_number_type_keras_logs():
    import numpy as np

    assert logged_value({"val_loss": np.float32(0.5)}, "val_loss") == 0.5
    assert logged_value({"val_loss": 1}, "val_loss") == 1.0
    assert logged_value({}, "val_loss") is None and logged_value(None, "val_loss") is None


def test_a_workers_trial_line_keeps_the_pattern_the_compose_test_counts():
    line = worker_trial_done_line(2, 30, "val_loss", 0.5, 0.4, 12)
    assert re.search(r"\[tune\] trial \d+ done", line) and "left" not in line


def test_is_interactive_follows_the_mode_and_the_stream():
    assert is_interactive("auto", Terminal()) and not is_interactive("auto", io.StringIO())
    assert is_interactive("always", io.StringIO()) and not is_interactive("never", Terminal())
    with pytest.raises(ValueError, match="--progress must be one of auto, always, never"):
        is_interactive("sometimes", Terminal())


# --- the terminal display -------------------------------------------------------------------


def test_terminal_rewrites_one_line_in_place_and_ends_it_with_a_newline():
    display, stream, clock, lines = terminal_display()
    display.show("epoch 1")
    clock.now += 1
    display.show("epoch 2")
    display.finish("done")
    assert stream.getvalue() == "\r\x1b[Kepoch 1\r\x1b[Kepoch 2\r\x1b[Kdone\n"
    assert lines == []


def test_terminal_redraws_a_few_times_a_second_at_most_but_always_shows_the_end():
    display, stream, clock, _ = terminal_display()
    for epoch in range(1, 11):  # ten epochs in a second
        display.show(f"epoch {epoch}")
        clock.now += 0.1
    display.finish("epoch 10, done")
    shown = re.findall(r"\r\x1b\[K([^\r\n]*)", stream.getvalue())
    assert shown == ["epoch 1", "epoch 4", "epoch 7", "epoch 10", "epoch 10, done"]
    assert stream.getvalue().endswith("\n")


def test_a_permanent_line_takes_the_place_of_the_line_being_rewritten():
    display, stream, clock, lines = terminal_display()
    display.show("[tune] trial 1 of 5: epoch 1 of 2")
    display.line("[tune] trial 1 of 5 done")
    assert stream.getvalue().endswith("\r\x1b[K") and lines == ["[tune] trial 1 of 5 done"]
    display.line("[tune] search done")  # nothing on screen to clear any more
    assert stream.getvalue().count("\r\x1b[K") == 2


def test_terminal_lines_are_cut_to_the_width_so_a_carriage_return_can_rewrite_them():
    display, stream, _, _ = terminal_display(columns=20)
    display.show("x" * 50)
    assert stream.getvalue() == "\r\x1b[K" + "x" * 18 + "…"


def test_plain_display_shows_nothing_in_place_and_reports_the_end():
    lines: list[str] = []
    display = Display(lines.append)
    display.show("epoch 1")
    display.finish("done")
    assert lines == ["done"]


# --- member runs and the member phase -------------------------------------------------------


def run_epochs(progress: RunProgress, clock: Clock, epochs: int, seconds: float, stop: int | None = None) -> None:
    progress.begin(0)
    for epoch in range(1, (stop or epochs) + 1):
        clock.now += seconds
        progress.epoch(epoch, 1.0 / epoch)
    progress.end()


def test_plain_member_lines_come_every_10_s_when_that_is_rarer_than_every_tenth_of_the_epochs():
    lines: list[str] = []
    clock = Clock()
    run_epochs(RunProgress(Display(lines.append, clock=clock), "seed-1 (seed)", 20, True), clock, 20, 3.0)
    assert [re.search(r"epoch (\d+)", line).group(1) for line in lines] == ["4", "8", "12", "16", "20"]
    assert lines[-1] == "[member] seed-1 (seed): epoch 20 of at most 20, val_loss=0.0500, done in 1 min 00 s"


def test_plain_member_lines_come_every_tenth_of_the_epochs_when_that_is_rarer_than_10_s():
    lines: list[str] = []
    clock = Clock()
    run_epochs(RunProgress(Display(lines.append, clock=clock), "swa-4 (swa)", 100, False), clock, 100, 0.5)
    assert [re.search(r"epoch (\d+)", line).group(1) for line in lines] == ["20", "40", "60", "80", "100"]
    assert "about 40 s left" in lines[0] and "at most" not in lines[0]


def test_an_early_stopped_run_ends_with_its_last_epoch():
    lines: list[str] = []
    clock = Clock()
    run_epochs(RunProgress(Display(lines.append, clock=clock), "tuned-0 (tuned)", 60, True), clock, 60, 0.5, stop=7)
    assert lines == ["[member] tuned-0 (tuned): epoch 7 of at most 60, val_loss=0.1429, done in 4 s"]


def test_a_member_run_on_a_terminal_is_one_line_with_its_time_left():
    display, stream, clock, lines = terminal_display()
    run_epochs(RunProgress(display, "tuned-0 (tuned)", 10, True), clock, 10, 2.0)
    text = stream.getvalue()
    assert "epoch 1 of at most 10, val_loss=1.0000, at most about 20 s left" in text
    assert text.endswith("epoch 10 of at most 10, val_loss=0.1000, done in 20 s\n") and text.count("\n") == 1
    assert lines == []


def test_a_resumed_run_times_only_the_epochs_it_runs():
    lines: list[str] = []
    clock = Clock()
    progress = RunProgress(Display(lines.append, clock=clock), "swa-4 (swa)", 100, False)
    progress.begin(50)  # BackupAndRestore brought it back at epoch 50
    for epoch in range(51, 71):
        clock.now += 1.0
        progress.epoch(epoch, 0.5)
    assert lines == ["[member] swa-4 (swa): epoch 60 of 100, val_loss=0.5000, about 40 s left",
                     "[member] swa-4 (swa): epoch 70 of 100, val_loss=0.5000, about 30 s left"]


def test_the_member_phase_says_run_k_of_r_and_its_time_left_once_a_run_is_timed():
    lines: list[str] = []
    clock = Clock()
    display = Display(lines.append, clock=clock)
    phase = MemberPhase(display, [(10, True), (20, False), (30, False)])
    assert phase.begin(1) == " of 3"
    run_epochs(phase.run("tuned-0 (tuned)", 10, True), clock, 10, 1.0, stop=5)  # early stopping
    clock.now += 5  # the export
    assert phase.begin(2) == " of 3 (about 2 min left for the members)"  # 2 s an epoch, 50 epochs
    assert phase.begin(3) == " of 3 (about 60 s left for the members)"  # run 2 ran no epoch: same rate


# --- the search -------------------------------------------------------------------------------


def test_search_lines_count_trials_keep_the_best_and_weigh_time_by_epochs():
    lines: list[str] = []
    clock = Clock()
    progress = SearchProgress(Display(lines.append, clock=clock), "val_loss", True, [1, 1, 1, 2, 2])
    for epochs, value in [(1, 0.9), (1, 0.7), (1, 0.8)]:
        clock.now += 2.0 * epochs
        progress.trial_done(epochs, value)
    assert lines == [
        "[tune] trial 1 of 5 done: val_loss=0.9000 (best 0.9000), 2 s elapsed, about 10 s left",
        "[tune] trial 2 of 5 done: val_loss=0.7000 (best 0.7000), 4 s elapsed, about 10 s left",
        "[tune] trial 3 of 5 done: val_loss=0.8000 (best 0.7000), 6 s elapsed, about 8 s left",
    ]


def test_a_resumed_search_counts_on_from_the_trials_already_finished():
    lines: list[str] = []
    clock = Clock()
    progress = SearchProgress(Display(lines.append, clock=clock), "val_accuracy", False, [3] * 10,
                              done_before=6, best_before=0.9)
    clock.now += 30
    progress.trial_done(3, 0.8)
    assert lines == ["[tune] trial 7 of 10 done: val_accuracy=0.8000 (best 0.9000), 30 s elapsed, about 2 min left"]


def test_search_epochs_show_on_a_terminal_only():
    display, stream, clock, lines = terminal_display()
    progress = SearchProgress(display, "val_accuracy", False, [2, 2])
    clock.now += 1
    progress.epoch(1, 2, 0.5)
    assert stream.getvalue() == "\r\x1b[K[tune] trial 1 of 2: epoch 1 of 2, val_accuracy=0.5000, about 3 s left"
    plain: list[str] = []
    SearchProgress(Display(plain.append), "val_accuracy", False, [2, 2]).epoch(1, 2, 0.5)
    assert plain == []


# --- against Keras Tuner ----------------------------------------------------------------------


@pytest.mark.parametrize("max_epochs, factor", [(2, 2), (9, 3), (27, 3), (20, 4)])
def test_hyperband_budgets_are_the_trials_keras_tuner_runs(max_epochs, factor):
    import keras_tuner as kt

    from training.tune import SearchBudget, planned_trials

    class Budgets(kt.Hyperband):
        """Trains nothing: records each trial's epochs (its public `run_trial` hook) and scores it."""

        def run_trial(self, trial, *args, **kwargs):
            hp = trial.hyperparameters
            self.budgets.append(hp["tuner/epochs"] - hp["tuner/initial_epoch"])
            return {"score": hp["x"]}

    hp = kt.HyperParameters()
    hp.Float("x", 0, 1)
    tuner = Budgets(hyperparameters=hp, objective=kt.Objective("score", "max"), max_epochs=max_epochs,
                    factor=factor, directory=tempfile.mkdtemp(), seed=0)
    tuner.budgets = []
    tuner.search(verbose=0)
    planned = planned_trials(tuner, SearchBudget(max_epochs=max_epochs, factor=factor))
    assert planned == hyperband_budgets(max_epochs, factor) == tuner.budgets


def test_a_tiny_hyperband_search_reports_every_trial_of_its_planned_count(tmp_path):
    import keras
    import keras_tuner as kt
    import numpy as np

    from training.tune import TrialProgress

    def build(hp):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(hp.Int("units", 1, 8)), keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        return model

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 3)), rng.normal(size=16)
    lines: list[str] = []
    progress = SearchProgress(Display(lines.append), "val_loss", True, hyperband_budgets(2, 2))
    tuner = kt.Hyperband(build, objective="val_loss", max_epochs=2, factor=2, directory=str(tmp_path), seed=0)
    tuner.search(x, y, validation_data=(x, y), callbacks=[TrialProgress(progress)], verbose=0)
    assert len(tuner.oracle.trials) == 5
    assert [line.split(" done")[0] for line in lines] == [f"[tune] trial {k} of 5" for k in range(1, 6)]
    assert [epochs for epochs, _ in progress.measured] == [1, 1, 1, 2, 2]  # the promotion trains on 1 epoch
    assert "left" not in lines[-1] and "left" in lines[0]


def test_ensemble_train_prints_plain_progress_lines_when_not_on_a_terminal(tmp_path, capsys):
    from tests.test_training_cli import FAST, vectors
    from training.cli import EXIT_OK, main

    vectors(tmp_path / "v.npz")
    code = main(["--data", str(tmp_path / "v.npz"), "--name", "vectors", *FAST,
                 "--repository", str(tmp_path / "models")])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "\r" not in out
    first = r"^\[tune\] trial 1 of 5 done: val_accuracy=\S+ \(best \S+\), [^,]+ elapsed, about \d+ (s|min) left$"
    assert re.search(first, out, re.MULTILINE), out
    assert "[tune] trial 5 of 5 done" in out and "trial 6" not in out
    assert "[member] run 1 of 2: tuned" in out
    assert re.search(r"\[member\] run 2 of 2 \(at most about \d+ (s|min) left for the members\): tuned", out)
    member = r"^\[member\] tuned-0 \(tuned\): epoch 2 of at most 2, val_loss=\S+, done in [^,]+$"
    assert re.search(member, out, re.MULTILINE)
