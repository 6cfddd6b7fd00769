"""``regularization``: is the noise of mini-batch statistics medicine?

Every norm of the config is trained on a small training set (by compare's runner, so its
rows are compare's and so are the final accuracies read from them); at the last epoch, per
seed,

* the generalization gap in accuracy, ``train_acc - test_acc`` (inference mode, whole sets),
  and in loss, ``test_loss - train_loss`` (over the seeds that did not diverge);
* the share of BN's test-accuracy gain over the plain network that the batch noise explains,
  ``(BN - full-batch BN) / (BN - plain)`` on mean final test accuracies: full-batch BN is BN
  with the whole training subset's statistics at every step, gradient through them included,
  so it differs from BN in the noise alone. Undefined (None) unless BN beats plain.

Ghost BN (``ghost-K``, statistics over virtual batches of K) adds noise as K shrinks;
population BN normalizes with the whole subset's statistics as constants (no noise and no
gradient through the statistics).
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex

from bnlab.lab.norms import norm
from ..figures import color, label, new_figure, percent_axis, plot_mean_band
from ..stats import format_interval, mean_interval
from . import compare

TITLE = "regularization: is the noise of batch statistics medicine?"
EXPECTED = ("The source article and Ioffe & Szegedy (2015, 3.4): the noise of mini-batch statistics "
            "regularizes, so on a small training set BN narrows the train-test gap and raises "
            "test accuracy; smaller ghost batches add noise and regularize more, until the noise "
            "hurts fitting (Hoffer et al. 2017); BN without the noise (full-batch statistics) "
            "keeps less of the gain, and BN without gradient through its statistics (population) "
            "trains worse (Ioffe & Szegedy 2015, section 2).")
NOTES = {"full-batch": " (no batch noise)",
         "population": " (no noise, no gradient through the statistics)"}


def ghosts(norms: list[str]) -> list[str]:
    """The ghost BN variants (members of the ghost-K family), by virtual batch size K."""
    members = [m for m in map(norm, norms) if m.family == "ghost-K"]
    return [m.name for m in sorted(members, key=lambda m: m.k)]


def analyze(rows: list[dict], config) -> dict:
    s = compare.analyze(rows, config)  # per variant: n, diverged, final accuracies and gap
    curves = compare.epoch_curves(rows, config.epochs)
    for norm, v in s["variants"].items():
        loss = curves[norm]["test_loss"][:, -1] - curves[norm]["train_loss"][:, -1]  # NaN: diverged
        loss = loss[~np.isnan(loss)]
        v["final_loss_gap"] = mean_interval(loss).to_dict() if len(loss) else None
    test = {n: v["final_test_acc"]["mean"] for n, v in s["variants"].items()}
    gain = test["bn"] - test["none"] if {"none", "bn"} <= set(test) else None
    share = ((test["bn"] - test["full-batch"]) / gain
             if gain is not None and gain > 1e-9 and "full-batch" in test else None)
    g = ghosts(s["norms"])
    return {"norms": s["norms"], "epochs": s["epochs"], "n_train": config.n_train,
            "variants": s["variants"], "bn_gain": gain, "noise_share": share, "ghosts": g,
            "best_ghost": max(g, key=test.get, default=None),
            "curves": {n: {"test_acc": c["test_acc"]} for n, c in s["curves"].items()}}


def measured(summary: dict) -> list[str]:
    v, gain, share = summary["variants"], summary["bn_gain"], summary["noise_share"]
    rest = [n for n in summary["norms"] if n not in summary["ghosts"]]
    seeds = "/".join(str(k) for k in sorted({x["n"] for x in v.values()}))
    lines = [f"Final test accuracy (mean over n={seeds} seeds): " + ", ".join(
                 f"{label(n)}{NOTES.get(n, '')} {v[n]['final_test_acc']['mean']:.2%}" for n in rest)
             + ".", "Train - test gap in accuracy: " + ", ".join(
                 f"{label(n)} {100 * v[n]['final_gap']['mean']:.2f}" for n in rest) + " points."]
    if summary["ghosts"]:
        lines.append("Ghost BN by virtual batch size K: " + "; ".join(
            f"K={norm(g).k} {v[g]['final_test_acc']['mean']:.2%} test accuracy (gap "
            f"{100 * v[g]['final_gap']['mean']:.2f} points)" for g in summary["ghosts"])
            + f"; best: {label(summary['best_ghost'])}.")
    if share is not None:
        lines.append(f"Share of {label('bn')}'s test-accuracy gain over {label('none')} "
                     f"({100 * gain:+.2f} points) that the batch noise explains, "
                     f"(BN - full-batch BN) / (BN - plain): {share:.0%}.")
    elif gain is not None and gain <= 1e-9:
        lines.append(f"{label('bn')} did not beat {label('none')} on test accuracy "
                     f"({100 * gain:+.2f} points), so there is no gain for the noise to explain.")
    return lines + [f"{label(n)}: {v[n]['diverged']} of {v[n]['n']} runs diverged; their accuracy "
                    "counts at chance after that." for n in summary["norms"] if v[n]["diverged"]]


def tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    """compare's table of final accuracies and gaps, with the loss gap before "diverged"."""
    (header, rows), = compare.tables(summary)
    for row, norm in zip(rows, summary["norms"]):
        loss = summary["variants"][norm]["final_loss_gap"]
        row.insert(-1, "-" if loss is None else format_interval(loss, show_n=False))
    return [(header[:-1] + ["test - train loss", "diverged"], rows)]


def colors(norms: list[str]) -> dict:
    """Each variant's colour; ghost sizes as one graded family, darker for larger K."""
    g = ghosts(norms)
    shade = {n: to_hex(colormaps["YlOrBr"](0.35 + 0.6 * i / max(len(g) - 1, 1)))
             for i, n in enumerate(g)}
    return {n: shade.get(n) or color(n) or "#17becf" for n in norms}  # cyan: no colour of its own


def plot_test_accuracy(summary: dict, ax=None):
    """Mean test accuracy per epoch of every variant (bands left out: nine overlap)."""
    ax = ax if ax is not None else new_figure()[1][0]
    cs = colors(summary["norms"])
    for norm in summary["norms"]:
        plot_mean_band(summary["curves"][norm]["test_acc"], ax=ax, label=label(norm),
                       color=cs[norm], show_band=False)
    ax.set_xlabel("epoch"), ax.set_ylabel("test accuracy (mean over seeds)"), ax.grid(alpha=0.3)
    percent_axis(ax), ax.legend(fontsize=8.5, loc="lower right")
    ax.set_title("Test accuracy per epoch")
    return ax


def plot_gap(summary: dict, ax=None):
    """Per variant, the mean final train - test accuracy gap with its 95% interval, in points."""
    ax = ax if ax is not None else new_figure()[1][0]
    norms, cs = summary["norms"], colors(summary["norms"])
    gap = 100 * np.array([[summary["variants"][n]["final_gap"][k] for k in ("mean", "low", "high")]
                          for n in norms])  # (variants, 3)
    ax.bar(range(len(norms)), gap[:, 0], yerr=abs(gap[:, 1:] - gap[:, :1]).T, capsize=3,
           color=[cs[n] for n in norms])
    ax.set_xticks(range(len(norms)), [label(n) for n in norms], rotation=35, ha="right", fontsize=9)
    ax.set_ylabel("train - test accuracy (points)"), ax.grid(alpha=0.3, axis="y")
    ax.set_title("Final generalization gap (95% interval)")
    return ax


def figures(summary: dict) -> dict:
    fig, axes = new_figure(2, width=10.5, height=5)
    plot_test_accuracy(summary, axes[0]), plot_gap(summary, axes[1])
    n = summary["n_train"]
    fig.suptitle(f"Training on {'the whole training set' if n is None else f'{n} examples'}, "
                 f"{summary['epochs']} epochs")
    return {"regularization": fig}
