"""The run report: report.json and two pictures, written beside the manifest of a version."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import orjson

from training.evaluate import METRICS, reliability_bins


def report_json(report: dict[str, Any]) -> bytes:
    return orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
                        | orjson.OPT_NON_STR_KEYS) + b"\n"


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

