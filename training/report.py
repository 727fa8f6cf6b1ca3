"""The run report: report.json and its pictures (reliability, metrics, risk-coverage, and the
out-of-distribution check when there is one), written beside the manifest of a version."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import orjson

from contract.scores import SCORES
from training.abstention import risk_coverage
from training.evaluate import METRICS, reliability_bins


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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def risk_coverage_png(scores: np.ndarray, correct: np.ndarray, threshold) -> bytes:
    """Error rate of the answered rows against the share answered, one line per uncertainty
    score, the target error and the fitted threshold's point (test split)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for j, name in enumerate(SCORES):
        _, coverage, risk = risk_coverage(scores[:, j], correct)
        ax.plot(coverage, risk, label=name)
    ax.axhline(threshold.target_error, linestyle="--", color="grey", label=f"target {threshold.target_error:.1%}")
    answered = scores[:, SCORES.index(threshold.score)] <= threshold.threshold
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


def metrics_png(members: dict[str, dict[str, float]], ensemble: dict[str, float]) -> bytes:
    """One bar chart per metric: every member, and the ensemble in another colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*members, "ENSEMBLE"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.8))
    for ax, metric in zip(axes, METRICS):
        values = [members[n][metric] for n in members] + [ensemble[metric]]
        colours = ["tab:blue"] * len(members) + ["tab:orange"]
        ax.bar(range(len(names)), values, color=colours)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        better = "higher" if metric == "accuracy" else "lower"
        ax.set_title(f"{metric} ({better} is better)")
        if metric == "accuracy":
            low = min(values)
            ax.set_ylim(max(0.0, low - (1 - low) * 0.5 - 0.01), 1.0)
    fig.suptitle("Members against the ensemble, held-out test split")
    fig.tight_layout()
    return _png(fig)

