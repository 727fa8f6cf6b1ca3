"""Showing where a long training step is and how long is left.

Two steps take minutes: the search (trial k of n) and the member runs (run k of R, epoch e of
E). On a terminal one line is rewritten in place, a few times a second at most, and ends with a
newline when its step ends; anywhere else (logs, CI, a scheduler's child, a Kubernetes Job) the
same facts come as occasional plain lines through the trainer's `report`, so that a log is not
one line per epoch. Time left is always extrapolated from time measured in this process, and
said as "about" (or "at most about" where early stopping may end a run sooner).

This module knows nothing of Keras: `training/tune.py` and `training/members.py` hold the thin
callbacks that feed it epochs and trials.
"""

from __future__ import annotations

import math
import shutil
import time
from typing import Callable, Sequence, TextIO

PROGRESS_MODES = ("auto", "always", "never")

# A terminal line rewritten more often than this only flickers.
MIN_REDRAW_SECONDS = 0.25
# Plain lines of a member run: no more often than both of these allow.
PLAIN_EVERY_SECONDS = 10.0
PLAIN_EVERY_SHARE = 0.1

_CLEAR_LINE = "\r\x1b[K"


def is_interactive(mode: str, stream: TextIO) -> bool:
    """Whether progress rewrites one line in place: `auto` on a terminal, `always`, never for `never`."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"--progress must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
    if mode == "auto":
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())
    return mode == "always"


def format_elapsed(seconds: float) -> str:
    """A measured duration: `42 s`, `3 min 05 s`, `1 h 04 min`."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def format_left(seconds: float) -> str:
    """An estimate, rounded as coarsely as it deserves: `about 7 s`, `about 45 s`, `about 4 min`."""
    if seconds < 10:
        return f"about {max(1, round(seconds))} s"
    if seconds < 90:
        return f"about {5 * round(seconds / 5)} s"
    if seconds < 3600:
        return f"about {max(2, round(seconds / 60))} min"
    minutes = 5 * round(seconds / 300)
    if minutes >= 600:
        return f"about {round(minutes / 60)} h"
    return f"about {minutes // 60} h" + (f" {minutes % 60} min" if minutes % 60 else "")


def left_phrase(seconds: float | None, at_most: bool = False) -> str:
    """`, about 4 min left` (`, at most about ...` for an upper bound); empty when unknown or done."""
    if seconds is None or seconds <= 0:
        return ""
    return f", {'at most ' if at_most else ''}{format_left(seconds)} left"


def seconds_left(measured: Sequence[tuple[int, float]], remaining: Sequence[int]) -> float | None:
    """Time the remaining units (their epochs given) should take, from (epochs, seconds) measured.

    Units of different budgets (Hyperband's trials) are fitted as a fixed cost per unit plus a
    cost per epoch; units of one budget, or a fit that makes either cost negative, fall back to
    time proportional to epochs. None before anything has been measured.
    """
    if not remaining:
        return 0.0
    done = [(e, s) for e, s in measured if e > 0]
    if not done:
        return None
    epochs = [e for e, _ in done]
    seconds = [s for _, s in done]
    per_unit, per_epoch = 0.0, sum(seconds) / sum(epochs)
    if len(set(epochs)) > 1:
        mean_e, mean_s = sum(epochs) / len(epochs), sum(seconds) / len(seconds)
        slope = (sum((e - mean_e) * (s - mean_s) for e, s in done)
                 / sum((e - mean_e) ** 2 for e in epochs))
        intercept = mean_s - slope * mean_e
        if slope >= 0 and intercept >= 0:
            per_unit, per_epoch = intercept, slope
    return per_unit * len(remaining) + per_epoch * sum(remaining)


def hyperband_budgets(max_epochs: int, factor: int, min_epochs: int = 1, iterations: int = 1) -> list[int]:
    """The epochs each trial of a Hyperband search trains, in the order one tuner runs them.

    Keras Tuner's HyperbandOracle exposes no count of its trials, so this follows its bracket
    arithmetic expression for expression (`_get_num_brackets`, `_get_size`, `_get_epochs`;
    even the floating-point log, which decides a ceiling): brackets from the most aggressive
    down, each round's promoted trials training on from the previous round's epochs.
    """
    brackets, epochs = 0, max_epochs
    while epochs >= min_epochs:
        epochs = epochs / factor
        brackets += 1
    last_round_size = math.ceil(1 + math.log(max_epochs, factor))
    budgets: list[int] = []
    for _ in range(iterations):
        for bracket in range(brackets - 1, -1, -1):
            for round_num in range(bracket + 1):
                size = math.ceil(last_round_size / (bracket + 1) * factor ** (bracket - round_num))
                until = math.ceil(max_epochs / factor ** (bracket - round_num))
                since = math.ceil(max_epochs / factor ** (bracket - round_num + 1)) if round_num else 0
                budgets += [until - since] * size
    return budgets


def plain_line_due(seconds_since: float, epochs_since: int, epochs: int) -> bool:
    """Whether a plain progress line is due: both 10 s and a tenth of the epochs since the last."""
    return seconds_since >= PLAIN_EVERY_SECONDS and epochs_since >= epochs * PLAIN_EVERY_SHARE


def trial_done_line(k: int, n: int, objective: str, value: float | None, best: float | None,
                    elapsed: float, left: float | None) -> str:
    """`[tune] trial 3 of 30 done: val_accuracy=0.9312 (best 0.9400), 1 min 12 s elapsed, about 3 min left`."""
    of = f" of {n}" if n >= k else ""
    return (f"[tune] trial {k}{of} done: {objective}={_figure(value)} (best {_figure(best)}), "
            f"{format_elapsed(elapsed)} elapsed{left_phrase(left)}")


def worker_trial_done_line(k: int, n: int, objective: str, value: float | None, best: float | None,
                           elapsed: float) -> str:
    """A distributed-tuning worker's line: its own count, the search's size, no time left (it is shared)."""
    return (f"[tune] trial {k} done on this worker (the search runs {n}): {objective}={_figure(value)} "
            f"(best here {_figure(best)}), {format_elapsed(elapsed)} elapsed")


def trial_epoch_line(k: int, n: int, epoch: int, epochs: int, objective: str, value: float | None,
                     left: float | None) -> str:
    """`[tune] trial 4 of 30: epoch 2 of 3, val_accuracy=0.9100, about 3 min left` (the search's time left)."""
    of = f" of {n}" if n >= k else ""
    return f"[tune] trial {k}{of}: epoch {epoch} of {epochs}, {objective}={_figure(value)}{left_phrase(left)}"


def member_epoch_line(label: str, epoch: int, epochs: int, at_most: bool, val_loss: float | None,
                      left: float | None) -> str:
    """`[member] seed-1 (seed): epoch 5 of at most 60, val_loss=0.3124, at most about 40 s left`."""
    return (f"[member] {label}: epoch {epoch} of {'at most ' if at_most else ''}{epochs}, "
            f"val_loss={_figure(val_loss)}{left_phrase(left, at_most)}")


def member_done_line(label: str, epoch: int, epochs: int, at_most: bool, val_loss: float | None,
                     elapsed: float) -> str:
    """`[member] seed-1 (seed): epoch 12 of at most 60, val_loss=0.3011, done in 34 s`."""
    return (f"[member] {label}: epoch {epoch} of {'at most ' if at_most else ''}{epochs}, "
            f"val_loss={_figure(val_loss)}, done in {format_elapsed(elapsed)}")


def logged_value(logs: dict | None, name: str) -> float | None:
    """A metric from Keras's epoch logs as a float (a Python or NumPy number, or a scalar tensor); None if absent."""
    try:
        return float((logs or {})[name])
    except (KeyError, TypeError, ValueError):
        return None


def _figure(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


class Display:
    """Where progress goes: one line rewritten in place on a terminal, plain `report` lines elsewhere."""

    def __init__(self, report: Callable[[str], None], stream: TextIO | None = None, interactive: bool = False,
                 clock: Callable[[], float] = time.monotonic, columns: int | None = None):
        if interactive and stream is None:
            raise ValueError("an interactive progress display needs a stream to rewrite its line on")
        self.report = report
        self.stream = stream
        self.interactive = interactive
        self.clock = clock
        self.columns = columns
        self._drawn = False  # a transient line is on screen, not yet ended by a newline
        self._last_draw: float | None = None

    def show(self, text: str) -> None:
        """On a terminal, rewrite the line with `text` unless it was rewritten very recently; elsewhere nothing."""
        if not self.interactive:
            return
        now = self.clock()
        if self._last_draw is not None and now - self._last_draw < MIN_REDRAW_SECONDS:
            return
        self._draw(text)
        self._last_draw = now

    def finish(self, text: str) -> None:
        """End a step with `text`: its terminal line rewritten and kept, or one plain line."""
        if not self.interactive:
            self.report(text)
            return
        self._draw(text)
        self.stream.write("\n")
        self.stream.flush()
        self._drawn = False

    def line(self, text: str) -> None:
        """A permanent line; on a terminal it takes the place of the in-place line."""
        if self._drawn:
            self.stream.write(_CLEAR_LINE)
            self.stream.flush()
            self._drawn = False
        self.report(text)

    def _draw(self, text: str) -> None:
        width = self.columns or shutil.get_terminal_size().columns
        if len(text) >= width:  # a wrapped line cannot be rewritten by a carriage return
            text = text[: max(1, width - 2)] + "…"
        self.stream.write(_CLEAR_LINE + text)
        self.stream.flush()
        self._drawn = True


class SearchProgress:
    """Where a search is: trial k of n, the best objective so far, and the search's time left."""

    def __init__(self, display: Display, objective: str, minimise: bool, budgets: Sequence[int],
                 done_before: int = 0, best_before: float | None = None, worker: bool = False):
        self.display = display
        self.objective = objective
        self.minimise = minimise
        self.budgets = list(budgets)
        self.done = done_before
        self.best = best_before
        self.worker = worker
        self.ran = 0  # trials run by this process
        self.measured: list[tuple[int, float]] = []
        self.started = display.clock()
        self._since = self.started  # a trial's time runs from the end of the one before

    def better(self, value: float | None, than: float | None) -> bool:
        """Whether `value` improves on `than` in the objective's direction."""
        if value is None or not math.isfinite(value):
            return False
        return than is None or (value < than if self.minimise else value > than)

    def epoch(self, epoch: int, epochs: int, value: float | None) -> None:
        """Epoch `epoch` of the running trial's `epochs` has ended (shown on a terminal only)."""
        k = (self.ran if self.worker else self.done) + 1
        left = None
        if not self.worker:
            now = [(epoch, self.display.clock() - self._since)]
            left = seconds_left(self.measured + now, [epochs - epoch, *self.budgets[k:]])
        self.display.show(trial_epoch_line(k, len(self.budgets), epoch, epochs, self.objective, value, left))

    def trial_done(self, epochs: int, value: float | None) -> None:
        """A trial has ended after `epochs` epochs with `value` its best objective: its permanent line."""
        now = self.display.clock()
        self.measured.append((epochs, now - self._since))
        self._since = now
        self.done += 1
        self.ran += 1
        if self.better(value, self.best):
            self.best = value
        n, elapsed = len(self.budgets), now - self.started
        if self.worker:
            self.display.line(worker_trial_done_line(self.ran, n, self.objective, value, self.best, elapsed))
            return
        left = seconds_left(self.measured, self.budgets[self.done:])
        self.display.line(trial_done_line(self.done, n, self.objective, value, self.best, elapsed, left))


class RunProgress:
    """Where one member run is: epoch e of E, its validation loss, and the run's time left."""

    def __init__(self, display: Display, label: str, epochs: int, at_most: bool,
                 on_end: Callable[[int], None] | None = None):
        self.display = display
        self.label = label
        self.epochs = epochs
        self.at_most = at_most
        self.on_end = on_end
        self.started = display.clock()
        self.first = 0  # the epoch this fit started from (later than 0 when resumed from a backup)
        self.last = 0
        self.val_loss: float | None = None
        self._plain_at = (self.started, 0)

    def begin(self, first_epoch: int) -> None:
        """The fit starts at 0-based epoch `first_epoch`."""
        self.started = self.display.clock()
        self.first = self.last = first_epoch
        self._plain_at = (self.started, first_epoch)

    def epoch(self, epoch: int, val_loss: float | None) -> None:
        """Epoch `epoch` (1-based) has ended with this validation loss."""
        now = self.display.clock()
        self.last, self.val_loss = epoch, val_loss
        left = seconds_left([(epoch - self.first, now - self.started)], [self.epochs - epoch])
        text = member_epoch_line(self.label, epoch, self.epochs, self.at_most, val_loss, left)
        if self.display.interactive:
            self.display.show(text)
        elif epoch < self.epochs and plain_line_due(now - self._plain_at[0], epoch - self._plain_at[1], self.epochs):
            self._plain_at = (now, epoch)
            self.display.line(text)

    def end(self) -> None:
        """The fit is over (all epochs run, or early stopping): the run's final line."""
        self.display.finish(member_done_line(self.label, self.last, self.epochs, self.at_most, self.val_loss,
                                             self.display.clock() - self.started))
        if self.on_end:
            self.on_end(self.last - self.first)


class MemberPhase:
    """Where the member phase is: run k of R, and the time its remaining runs should take."""

    def __init__(self, display: Display, runs: Sequence[tuple[int, bool]]):
        """`runs`: each run's epochs and whether early stopping may end it sooner, in order."""
        self.display = display
        self.runs = list(runs)
        self.measured: list[tuple[int, float]] = []
        self._current: tuple[float, int] | None = None  # the running run's start and epochs run

    def begin(self, index: int) -> str:
        """Run `index` (1-based) starts: ` of R` and, once a run has been timed, the phase's time left."""
        now = self.display.clock()
        if self._current is not None:
            started, epochs = self._current
            self.measured.append((epochs, now - started))
        self._current = (now, 0)
        remaining = self.runs[index - 1:]
        left = seconds_left(self.measured, [epochs for epochs, _ in remaining]) if self.measured else None
        at_most = any(may_stop for _, may_stop in remaining)
        shown = left_phrase(left, at_most).removeprefix(", ")
        return f" of {len(self.runs)}" + (f" ({shown} for the members)" if shown else "")

    def run(self, label: str, epochs: int, at_most: bool) -> RunProgress:
        """The progress of one fit of the current run."""
        return RunProgress(self.display, label, epochs, at_most, self._ran)

    def _ran(self, epochs: int) -> None:
        if self._current is not None:
            self._current = (self._current[0], self._current[1] + epochs)
