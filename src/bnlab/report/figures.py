"""Figures. Each plotting function takes ``ax=None`` and returns the axes it drew on."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from .stats import curve_band  # noqa: E402

__all__ = ["LABELS", "plot_band", "plot_compare_accuracy", "plot_compare_loss"]

LABELS = {"none": "plain FC", "bn": "FC + BN (bnlab)", "torch-bn": "FC + BN (torch.nn)",
          "noisy-bn": "FC + noisy BN", "population-bn": "FC + population BN",
          "full-batch-bn": "FC + full-batch BN"}
COLORS = {"none": "#555555", "bn": "#1f77b4", "torch-bn": "#ff7f0e", "noisy-bn": "#2ca02c",
          "population-bn": "#d62728", "full-batch-bn": "#9467bd"}


def plot_band(curves: np.ndarray, x: np.ndarray | None = None, ax: Axes | None = None,
              label: str | None = None, color: str | None = None, linestyle: str = "-",
              band: bool = True, log: bool = False) -> Axes:
    """Mean over seeds (rows of ``curves``) as a line, with its 95% t-interval as a band.

    ``log=True`` for positive quantities on a log axis: the geometric mean, with the interval
    taken on the logarithms (a band that cannot cross zero).
    """
    ax = ax or plt.gca()
    if log:
        mean, low, high = (np.exp(c) for c in curve_band(np.log(np.maximum(curves, 1e-300))))
    else:
        mean, low, high = curve_band(curves)
    x = np.arange(1, len(mean) + 1) if x is None else x
    n = np.asarray(curves).shape[0]
    ax.plot(x, mean, color=color, linestyle=linestyle,
            label=None if label is None else f"{label} (n={n})")
    if band and n > 1:
        ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
    return ax


def plot_compare_accuracy(curves: dict[str, dict[str, np.ndarray]], summary: dict,
                          ax: Axes | None = None) -> Axes:
    """Test accuracy against epoch per variant (band: 95% interval over seeds), training
    accuracy dashed, and the epochs-to-target marks."""
    ax = ax or plt.gca()
    for norm, c in curves.items():
        color = COLORS.get(norm)
        plot_band(c["test_acc"], ax=ax, label=f"{LABELS.get(norm, norm)} test", color=color)
        plot_band(c["train_acc"], ax=ax, color=color, linestyle="--", band=False)
    targets = summary.get("epochs_to_target")
    if targets:
        ax.axhline(targets["target_test_acc"], color="#999999", linewidth=0.8, linestyle=":")
        for norm, t in targets["variants"].items():
            if t["epoch"] is not None:
                ax.axvline(t["epoch"], color=COLORS.get(norm), linewidth=0.8, linestyle=":")
                ax.annotate(f"epoch {t['epoch']}", (t["epoch"], targets["target_test_acc"]),
                            textcoords="offset points", xytext=(4, -12), fontsize=8,
                            color=COLORS.get(norm))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (solid: test, dashed: train)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return ax


def plot_compare_loss(curves: dict[str, dict[str, np.ndarray]], metric: str,
                      ax: Axes | None = None) -> Axes:
    """One loss curve per variant (``metric``: train_loss or test_loss), log scale."""
    ax = ax or plt.gca()
    for norm, c in curves.items():
        plot_band(c[metric], ax=ax, label=LABELS.get(norm, norm), color=COLORS.get(norm), log=True)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return ax


def save_compare_figures(curves: dict[str, dict[str, np.ndarray]], summary: dict,
                         out_dir) -> dict[str, str]:
    """Write accuracy.png and loss.png into ``out_dir``; returns {name: path}."""
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_compare_accuracy(curves, summary, ax=ax)
    ax.set_title("Accuracy per epoch, mean over seeds with 95% interval")
    paths["accuracy"] = save_figure(fig, out_dir / "accuracy.png")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    plot_compare_loss(curves, "train_loss", ax=axes[0])
    plot_compare_loss(curves, "test_loss", ax=axes[1])
    fig.suptitle("Cross-entropy loss per epoch (inference mode, whole set; geometric mean over "
                 "seeds, 95% interval)")
    paths["loss"] = save_figure(fig, out_dir / "loss.png")
    return paths


def save_figure(fig, path) -> str:
    """Write ``fig`` as PNG atomically and close it; returns the path."""
    from bnlab._io import atomic_write

    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
    return str(path)
