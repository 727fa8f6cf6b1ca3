"""The run report: report.json and its pictures, written beside the manifest of a version.

Format 1 (`attachments`, a classifier of arrays): reliability, metrics, risk-coverage, and the
out-of-distribution check when there is one. Format 2 (`head_attachments`, one head of any task
of `contract.tasks`): the pictures of the head's task, each drawn from the `HeadAssessment`'s
own served and pooled answers with the same functions that measured its metrics, so a picture
cannot disagree with the figures beside it:

- classification: as format 1 (reliability of the ensemble calibrated, before calibration and
  of the selected member; members against the ensemble; risk-coverage);
- binary and multi-label: reliability per label (the frequency of yes against the probability
  of yes, the bins of `task_metrics.label_calibration_error`), members against the ensemble,
  risk-coverage on each row's score as the server reduces it (the largest over labels);
- regression: predicted against true with the central interval as error bars, the observed
  coverage of the central interval against its nominal level, members against the ensemble.

The report.json of a format-2 head also lists its pictures with their captions (what the
`/ui` page shows), and for binary and multi-label heads the metrics of each label.
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Sequence

import numpy as np
import orjson

from contract import tasks
from contract.manifest import TASK_SCORES
from contract.scores import SCORES
from training.abstention import risk_coverage
from training.evaluate import ECE_BINS, METRICS, reliability_bins
from training.head_assess import HeadAssessment, head_target, member_outputs
from training.task_metrics import (
    HEADLINE,
    higher_is_better,
    label_calibration_error,
    label_nll,
    row_correct,
    row_scores,
)

# The nominal levels of the coverage picture's central intervals.
COVERAGE_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.99,)
PREDICTED_LEVEL = 0.9  # the central interval drawn as error bars (the report's coverage_90)
MAX_LABEL_PANELS = 12  # labels drawn one by one; the others share one pooled panel
MAX_TARGET_PANELS = 6  # regression targets drawn; a note says how many were left out
MAX_POINTS = 400  # rows drawn per target in the predicted picture (evenly spaced over the test rows)
PANEL_COLUMNS = 4  # panels side by side in the metrics and per-label pictures
# The regression metrics pictured: the 90% interval's coverage and width stand for the other levels.
REGRESSION_PICTURED = ("rmse", "mae", "r2", "nll", "coverage_90", "width_90")


def report_json(report: dict[str, Any]) -> bytes:
    return orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
                        | orjson.OPT_NON_STR_KEYS) + b"\n"


def attachments(report: dict[str, Any], found, selected_probs: np.ndarray, labels: np.ndarray) -> dict[str, bytes]:
    """The files published beside a version's manifest: report.json and its pictures, from the
    run's Assessment (`training.assess`) and the test split's labels."""
    files = {
        "report.json": report_json(report),
        "reliability.png": reliability_png({
            "ensemble (calibrated)": (found.ensemble_probabilities, labels),
            "ensemble before calibration": (found.uncalibrated_probabilities, labels),
            f"selected member ({found.selected})": (selected_probs, labels)}),
        "metrics.png": metrics_png(found.member_metrics, found.ensemble),
        "risk_coverage.png": risk_coverage_png(found.test_scores, found.test_correct, found.threshold),
    }
    if found.ood_scores is not None:
        files["ood.png"] = ood_png(found.test_scores, found.ood_scores, found.ood_auroc)
    return files


def head_attachments(report: dict[str, Any], found: HeadAssessment, test_target: np.ndarray,
                     selected_outputs: np.ndarray, labels: Sequence[str] | None = None) -> dict[str, bytes]:
    """The files published beside a format-2 version's manifest: report.json (with the head's
    pictures and, for labels, per-label metrics) and the pictures of the head's task. `report`
    has one head in `heads`; `selected_outputs` (rows, columns) is the selected member's raw test
    output for the head as the members emit it; `labels` the head's labels as the manifest
    lists them (binary: negative then positive; regression: the targets)."""
    heads = report.get("heads")
    if not isinstance(heads, dict) or len(heads) != 1:
        raise ValueError("head_attachments pictures the one head of a report's `heads`; this report has "
                         f"{len(heads) if isinstance(heads, dict) else 'no'} heads (the pictures of several "
                         "heads would share file names)")
    (head,) = heads
    k = found.served.value.shape[1]
    y = head_target(found.task, test_target, k)
    selected = member_outputs(found.task, np.asarray(selected_outputs)[None], found.variance).member(0)
    if len(y) != len(found.served.value) or len(selected[0]) != len(y):
        raise ValueError(f"the assessment answered {len(found.served.value)} test rows; got {len(y)} targets and "
                         f"{len(selected[0])} rows of the selected member's outputs")
    names = column_names(found.task, labels, k)
    pictures = PICTURES[found.task](found, y, selected, names)
    entry = {**heads[head], "pictures": {file: caption for file, (caption, _) in pictures.items()}}
    if found.task in ("binary", "multilabel"):
        entry["per_label"] = per_label_metrics(found, y, names)
    files = {"report.json": report_json({**report, "heads": {head: entry}})}
    files.update({file: png for file, (_, png) in pictures.items()})
    return files


def column_names(task: str, labels: Sequence[str] | None, columns: int) -> list[str]:
    """What each of the head's value columns is called in the pictures: a binary head's one
    column is its positive label; the others' columns are their labels (numbered without)."""
    want = 2 if task == "binary" else columns
    if labels is not None and len(labels) != want:
        raise ValueError(f"a {task} head of {columns} column(s) has {want} labels (as its manifest lists them), "
                         f"got {len(labels)}")
    if task == "binary":
        return [labels[1] if labels else "yes"]
    return list(labels) if labels else [f"{'target' if task == 'regression' else 'label'} {j}" for j in range(columns)]


def per_label_metrics(found: HeadAssessment, target: np.ndarray, names: Sequence[str]) -> list[dict[str, float]]:
    """Each label's share of yes on test and its NLL, Brier score and ECE, served and before
    calibration (the task metrics' own functions, one label at a time)."""
    out = []
    for j, name in enumerate(names):
        row = {"label": name, "share_yes": float(target[:, j].mean())}
        for suffix, answer in (("", found.served), ("_before", found.pooled)):
            p, y = np.asarray(answer.value[:, [j]], np.float64), target[:, [j]]
            row[f"nll{suffix}"] = float(label_nll(p, y).mean())
            row[f"brier{suffix}"] = float(((p - y) ** 2).mean())
            row[f"ece{suffix}"] = label_calibration_error(p, y)
        out.append(row)
    return out


def observed_coverage(answer: tasks.Combined, target: np.ndarray,
                      levels: Sequence[float] = COVERAGE_LEVELS) -> np.ndarray:
    """Per nominal level, the share of test values (rows and targets) inside the answer's central
    interval (`contract.tasks.interval`, bounds included, as the coverage metrics count)."""
    inside = []
    for level in levels:
        lower, upper = tasks.interval(answer, level)
        inside.append(float(((target >= lower) & (target <= upper)).mean()))
    return np.array(inside)


def label_reliability(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of the probability of yes (the bins of `label_calibration_error`):
    (mean probability, frequency of yes, rows), NaN where a bin is empty."""
    p, y = np.ravel(p).astype(np.float64), np.ravel(y).astype(np.float64)
    which = np.clip(np.ceil(p * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.bincount(which, weights=p, minlength=bins) / counts,
                np.bincount(which, weights=y, minlength=bins) / counts, counts)


def shown_rows(rows: int, most: int = MAX_POINTS) -> np.ndarray:
    """The rows drawn when there are too many to see: evenly spaced, always the same ones."""
    if rows <= most:
        return np.arange(rows)
    return np.unique(np.linspace(0, rows - 1, most).round().astype(int))


Selected = tuple[np.ndarray, "np.ndarray | None"]
Pictures = dict[str, tuple[str, bytes]]


def _classification_pictures(found: HeadAssessment, y: np.ndarray, selected: Selected,
                             names: Sequence[str]) -> Pictures:
    """Format 1's pictures from a classification head's answers."""
    scores = np.stack([found.served.scores[s] for s in SCORES], axis=1)
    return {
        "reliability.png": ("Reliability", reliability_png({
            "ensemble (calibrated)": (found.served.value, y),
            "ensemble before calibration": (found.pooled.value, y),
            f"selected member ({found.selected})": (selected[0], y)})),
        "risk_coverage.png": ("Risk-coverage", risk_coverage_png(
            scores, row_correct(found.task, found.served, y), found.threshold)),
        "metrics.png": ("Members and ensemble", metrics_png(found.member_metrics, found.ensemble)),
    }


def _label_pictures(found: HeadAssessment, y: np.ndarray, selected: Selected, names: Sequence[str]) -> Pictures:
    """Reliability per label, members against the ensemble, risk-coverage on the row score."""
    score_names = TASK_SCORES[found.task]
    scores = row_scores(found.task, found.served)
    return {
        "reliability.png": ("Reliability per label", label_reliability_png({
            "ensemble (calibrated)": (found.served.value, y),
            "ensemble before calibration": (found.pooled.value, y),
            f"selected member ({found.selected})": (selected[0], y)}, names)),
        "risk_coverage.png": ("Risk-coverage (each row's largest score over its labels)", risk_coverage_png(
            np.stack([scores[s] for s in score_names], axis=1), row_correct(found.task, found.served, y),
            found.threshold, score_names)),
        "metrics.png": ("Members and ensemble", metrics_png(
            found.member_metrics, found.ensemble, HEADLINE[found.task])),
    }


def _regression_pictures(found: HeadAssessment, y: np.ndarray, selected: Selected,
                         names: Sequence[str]) -> Pictures:
    """Predicted against true with intervals, coverage against the level, members against the ensemble."""
    curves = {"ensemble (calibrated)": found.served, "ensemble before calibration": found.pooled}
    value, variance = selected
    if variance is not None:
        curves[f"selected member ({found.selected})"] = tasks.Combined(value, variance, {})
    level = f"{PREDICTED_LEVEL:.0%}"
    return {
        "predicted.png": (f"Predicted against true, with the {level} intervals",
                          predicted_png(found.served, y, names)),
        "coverage.png": ("Interval coverage against the level", coverage_png(curves, y)),
        "metrics.png": ("Members and ensemble", metrics_png(found.member_metrics, found.ensemble,
                                                            REGRESSION_PICTURED)),
    }


PICTURES: dict[str, Callable[[HeadAssessment, np.ndarray, Selected, Sequence[str]], Pictures]] = {
    "classification": _classification_pictures, "binary": _label_pictures, "multilabel": _label_pictures,
    "regression": _regression_pictures,
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def risk_coverage_png(scores: np.ndarray, correct: np.ndarray, threshold, names: Sequence[str] = SCORES) -> bytes:
    """Error rate of the answered rows against the share answered, one line per uncertainty
    score (the columns of `scores`, named by `names`), the target error and the fitted
    threshold's point (test split; neither without a threshold)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for j, name in enumerate(names):
        _, coverage, risk = risk_coverage(scores[:, j], correct)
        ax.plot(coverage, risk, label=name)
    if threshold is not None:
        ax.axhline(threshold.target_error, linestyle="--", color="grey",
                   label=f"target {threshold.target_error:.1%}")
        answered = scores[:, list(names).index(threshold.score)] <= threshold.threshold
        if answered.any():
            ax.plot([answered.mean()], [(~correct[answered]).mean()], "o", color="black",
                    label=f"threshold on {threshold.score}")
    ax.set(xlabel="coverage (share of rows answered)", ylabel="error rate of the answered rows",
           xlim=(0, 1.02), title="Risk-coverage on the held-out test split")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def ood_png(known: np.ndarray, unseen: np.ndarray, aurocs: dict[str, float]) -> bytes:
    """Each uncertainty score's distribution on test rows of known classes and on rows of the
    held-out classes, with its AUROC."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(SCORES), figsize=(4.2 * len(SCORES), 3.6))
    for j, (ax, name) in enumerate(zip(axes, SCORES)):
        top = max(float(known[:, j].max()), float(unseen[:, j].max()), 1e-6)
        bins = np.linspace(0, top, 30)
        ax.hist(known[:, j], bins=bins, alpha=0.6, density=True, label="known classes (test)")
        ax.hist(unseen[:, j], bins=bins, alpha=0.6, density=True, label="held-out classes")
        ax.set_title(f"{name}: AUROC {aurocs[name]:.3f}")
        ax.set_xlabel("nats")
    axes[0].legend(fontsize=8)
    fig.suptitle("Out-of-distribution check")
    fig.tight_layout()
    return _png(fig)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def reliability_png(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Reliability diagram: accuracy against confidence per bin, one line per (name: probs, labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, counts_ax) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                        gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    width = 1.0 / 15 / (len(curves) + 1)
    for i, (name, (probs, labels)) in enumerate(curves.items()):
        confidence, accuracy, counts = reliability_bins(probs, labels)
        filled = counts > 0
        ax.plot(confidence[filled], accuracy[filled], marker="o", label=name)
        # Few rows in a bin make its point jumpy: the counts below say how much each point weighs.
        centres = (np.arange(len(counts)) + 0.5) / len(counts)
        counts_ax.bar(centres + (i - 0.5) * width, counts, width=width, label=name)
    ax.set(ylabel="accuracy", xlim=(0, 1.02), ylim=(0, 1.02), title="Reliability on the held-out test split")
    ax.legend(loc="upper left")
    counts_ax.set(xlabel="confidence (max probability), 15 equal-width bins", ylabel="rows", yscale="log")
    return _png(fig)


def metrics_png(members: dict[str, dict[str, float]], ensemble: dict[str, float],
                metrics: Sequence[str] = METRICS) -> bytes:
    """One bar chart per metric: every member, and the ensemble in another colour (a member
    without a value, NaN, has no bar); a coverage shows its nominal level as a line."""
    plt = _pyplot()
    names = [*members, "ENSEMBLE"]
    columns = min(len(metrics), PANEL_COLUMNS)
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.8 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        values = [members[n].get(metric, math.nan) for n in members] + [ensemble[metric]]
        colours = ["tab:blue"] * len(members) + ["tab:orange"]
        ax.bar(range(len(names)), values, color=colours)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        better = "higher" if higher_is_better(metric) else "lower"
        ax.set_title(f"{metric} ({better} is better)")
        if metric == "accuracy":
            low = min(values)
            ax.set_ylim(max(0.0, low - (1 - low) * 0.5 - 0.01), 1.0)
        missing = [i for i, v in enumerate(values) if not math.isfinite(v)]
        for i in missing:  # a means-only member has no NLL or interval: say so where its bar would be
            ax.text(i, 0, "none", rotation=90, ha="center", va="bottom", fontsize=7, color="grey")
        if missing:
            ax.set_xlim(-0.6, len(names) - 0.4)
        if metric.startswith("coverage_"):
            ax.axhline(int(metric.split("_")[1]) / 100, linestyle="--", color="grey")
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    fig.suptitle("Members against the ensemble, held-out test split")
    fig.tight_layout()
    return _png(fig)



def label_reliability_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], names: Sequence[str]) -> bytes:
    """Per label, the frequency of yes against the mean probability of yes in each bin, one line
    per (name: probabilities (rows, k), targets (rows, k)), each panel with every line's ECE;
    beyond MAX_LABEL_PANELS labels the others share one panel, their values pooled."""
    plt = _pyplot()
    k = len(names)
    panels = [(names[j], [j]) for j in range(min(k, MAX_LABEL_PANELS))]
    if k > MAX_LABEL_PANELS:
        panels.append((f"the other {k - MAX_LABEL_PANELS} labels, pooled", list(range(MAX_LABEL_PANELS, k))))
    columns = min(len(panels), PANEL_COLUMNS)
    rows = math.ceil(len(panels) / columns)
    side = 4.6 if len(panels) == 1 else 3.4  # a binary head's one label gets a picture of its own size
    height = side * rows + (1.4 if columns == 1 else 0.9)  # the title and the legend below the panels
    fig, axes = plt.subplots(rows, columns, figsize=(side + 0.2 if columns == 1 else 3.6 * columns, height),
                             squeeze=False)
    for ax, (title, columns_of) in zip(axes.flat, panels):
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
        eces = []
        for name, (p, y) in curves.items():
            mean_p, frequency, counts = label_reliability(p[:, columns_of], y[:, columns_of])
            filled = counts > 0
            ax.plot(mean_p[filled], frequency[filled], marker="o", markersize=3, label=name)
            eces.append(label_calibration_error(np.asarray(p[:, columns_of], np.float64), y[:, columns_of]))
        ax.text(0.98, 0.03, "ECE " + " / ".join(f"{e:.3f}" for e in eces), transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7)
        ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="probability of yes", ylabel="frequency of yes")
        ax.set_title(title, fontsize=9)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    handles, legend = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, legend, loc="lower center", ncol=1 if columns == 1 else len(legend), fontsize=8)
    fig.suptitle(f"Reliability per label, held-out test split\n{ECE_BINS} equal-width bins; dashed: perfect "
                 "calibration; ECE in the legend's order", fontsize=10)
    fig.tight_layout(rect=(0, (0.9 if columns == 1 else 0.45) / height, 1, 1))
    return _png(fig)


def coverage_png(curves: dict[str, tasks.Combined], target: np.ndarray,
                 levels: Sequence[float] = COVERAGE_LEVELS) -> bytes:
    """The share of test values inside each answer's central interval against the interval's
    nominal level (`observed_coverage`), one line per answer, and the diagonal of honest intervals."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.6))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="observed = nominal")
    for name, answer in curves.items():
        ax.plot(levels, observed_coverage(answer, target, levels), marker="o", markersize=3, label=name)
    ax.set(xlabel="nominal level of the central interval", ylabel="share of test values inside it",
           xlim=(0, 1.02), ylim=(0, 1.02), title="Interval coverage on the held-out test split")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def predicted_png(answer: tasks.Combined, target: np.ndarray, names: Sequence[str],
                  level: float = PREDICTED_LEVEL) -> bytes:
    """Per target (the first MAX_TARGET_PANELS), the served mean against the true value with the
    central interval at `level` as an error bar, values outside their interval in another colour,
    and the diagonal; MAX_POINTS rows at most, the same ones every time."""
    plt = _pyplot()
    lower, upper = tasks.interval(answer, level)
    mean = np.asarray(answer.value, np.float64)
    drawn = min(len(names), MAX_TARGET_PANELS)
    columns = min(drawn, 3)
    rows_of_panels = math.ceil(drawn / columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(4.6 * columns, 4.2 * rows_of_panels), squeeze=False)
    rows = shown_rows(len(target))
    for j, ax in zip(range(drawn), axes.flat):
        t, m, lo, hi = target[:, j], mean[:, j], lower[:, j], upper[:, j]
        inside = (t >= lo) & (t <= hi)
        for where, colour, label in ((inside, "tab:blue", "inside its interval"),
                                     (~inside, "tab:red", "outside its interval")):
            pick = rows[where[rows]]
            ax.errorbar(t[pick], m[pick], yerr=[m[pick] - lo[pick], hi[pick] - m[pick]], fmt="o", markersize=2,
                        elinewidth=0.6, alpha=0.6, color=colour, label=label)
        ends = [float(min(t.min(), m.min())), float(max(t.max(), m.max()))]
        ax.plot(ends, ends, linestyle="--", color="grey", label="predicted = true")
        ax.set(xlabel="true", ylabel="predicted (mean)",
               title=f"{names[j]}: {inside.mean():.1%} inside the {level:.0%} interval")
        ax.legend(loc="upper left", fontsize=7)
    for ax in axes.flat[drawn:]:
        ax.axis("off")
    shown = f"{len(rows)} of {len(target)} test rows" if len(rows) < len(target) else f"{len(target)} test rows"
    more = f"; the first {drawn} of {len(names)} targets" if drawn < len(names) else ""
    fig.suptitle(f"Predicted against true, held-out test split ({shown}{more})")
    fig.tight_layout()
    return _png(fig)
