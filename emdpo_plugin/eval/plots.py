"""PNG figures in the spirit of the paper's Figures 2-7."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, ax, path: Path) -> Path:
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def grouped_bars(values: dict[str, dict[str, float]], ylabel: str, title: str, path: Path,
                 errors: dict[str, dict[str, float | None]] | None = None) -> Path:
    """values: {series (policy): {group: value}} -> bars per group, one colour per series;
    `errors` (same shape, e.g. standard errors) draws error bars where given."""
    series = list(values)
    groups = sorted({g for v in values.values() for g in v})
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups), 3.6))
    x = np.arange(len(groups))
    for i, s in enumerate(series):
        err = None
        if errors and errors.get(s):
            err = [np.nan if errors[s].get(g) is None else errors[s][g] for g in groups]
        ax.bar(x + i * width - 0.4 + width / 2, [values[s].get(g, np.nan) for g in groups], width, label=s,
               yerr=err, capsize=3 if err else 0)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, ax, path)


def weight_convergence(trajectory: np.ndarray, labels: list[str], title: str, path: Path) -> Path:
    """Running average of the Hedge weights per step (the paper's Figure 3)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    steps = np.arange(1, len(trajectory) + 1)
    for k, label in enumerate(labels):
        ax.plot(steps, trajectory[:, k], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("optimistic Hedge step")
    ax.set_ylabel("mixture weight (running average)")
    ax.set_title(title)
    return _save(fig, ax, path)


def log_likelihood_trace(traces: dict[str, list[float]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, ll in traces.items():
        ax.plot(np.arange(1, len(ll) + 1), ll, marker="o", label=name)
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("observed-data log-likelihood")
    return _save(fig, ax, path)


def responsibility_histogram(largest: dict[str, np.ndarray], path: Path) -> Path:
    """Per clustering stage, the distribution of each annotator's largest responsibility.

    Mass near 1/K means EM could not tell the annotators apart; mass near 1, confident types.
    Needs no labels.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bins = np.linspace(0.0, 1.0, 21)
    for name, values in largest.items():
        ax.hist(np.asarray(values), bins=bins, histtype="step", linewidth=1.5, label=name)
    ax.set_xlabel("largest responsibility per annotator")
    ax.set_ylabel("annotators")
    return _save(fig, ax, path)
