"""``regularization``: is the noise of mini-batch statistics medicine?

Every norm of the config is trained on a small training set; at the last epoch, per seed,

* the generalization gap in accuracy, ``train_acc - test_acc`` (inference mode, whole sets),
  and in loss, ``test_loss - train_loss``;
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

from ..figures import color, label, new_figure, percent_axis, plot_mean_band
from ..stats import band, format_interval, mean_interval
from .compare import epoch_curves

TITLE = "regularization: is the noise of batch statistics medicine?"
EXPECTED = ("The seed and Ioffe & Szegedy (2015, 3.4): the noise of mini-batch statistics "
            "regularizes, so on a small training set BN narrows the train-test gap and raises "
            "test accuracy; smaller ghost batches add noise and regularize more, until the noise "
            "hurts fitting (Hoffer et al. 2017); BN without the noise (full-batch statistics) "
            "keeps less of the gain, and BN without gradient through its statistics (population) "
            "trains worse (Ioffe & Szegedy 2015, section 2).")
NOTES = {"full-batch": " (no batch noise)",
         "population": " (no noise, no gradient through the statistics)"}
OTHER_COLOR = "#17becf"  # a norm with no colour of its own


def ghost_size(norm: str) -> int | None:
    return int(norm[6:]) if norm.startswith("ghost-") else None


def _interval(values) -> dict | None:
    """Mean and 95% interval of the finite values (a diverged seed has no final loss)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return mean_interval(v).to_dict() if len(v) else None


def analyze(rows: list[dict], config) -> dict:
    curves = epoch_curves(rows, config.epochs)
    norms = [n for n in config.norms if n in curves]
    summary: dict = {"norms": norms, "epochs": config.epochs, "n_train": config.n_train,
                     "ghosts": sorted((n for n in norms if ghost_size(n)), key=ghost_size),
                     "variants": {}, "curves": {}}
    for norm in norms:
        c = curves[norm]
        train, test = c["train_acc"][:, -1], c["test_acc"][:, -1]
        summary["variants"][norm] = {
            "n": len(c["seeds"]), "diverged": int(sum(c["diverged"])),
            "final_test_acc": mean_interval(test).to_dict(),
            "final_train_acc": mean_interval(train).to_dict(),
            "best_test_acc": mean_interval(c["test_acc"].max(axis=1)).to_dict(),
            "final_gap": mean_interval(train - test).to_dict(),
            "final_loss_gap": _interval(c["test_loss"][:, -1] - c["train_loss"][:, -1]),
        }
        summary["curves"][norm] = {"test_acc": band(c["test_acc"])}  # what the figure draws
    summary.update(_noise_share(summary["variants"]))
    test = {n: summary["variants"][n]["final_test_acc"]["mean"] for n in summary["ghosts"]}
    summary["best_ghost"] = max(summary["ghosts"], key=test.get) if test else None
    return summary


def _noise_share(variants: dict) -> dict:
    """BN's gain over plain in mean final test accuracy, and the share of it that
    full-batch BN loses: (BN - full-batch) / (BN - plain)."""
    if not {"none", "bn"} <= set(variants):
        return {"bn_gain": None, "noise_share": None}
    test = {n: v["final_test_acc"]["mean"] for n, v in variants.items()}
    gain = test["bn"] - test["none"]
    share = (test["bn"] - test["full-batch"]) / gain if gain > 1e-9 and "full-batch" in test else None
    return {"bn_gain": gain, "noise_share": share}


def measured(summary: dict) -> list[str]:
    v, norms = summary["variants"], summary["norms"]
    plain = [n for n in norms if not ghost_size(n)]
    n = sorted({v[x]["n"] for x in norms})
    lines = [f"Final test accuracy (mean over n={'/'.join(map(str, n))} seeds): "
             + ", ".join(f"{label(x)}{NOTES.get(x, '')} {v[x]['final_test_acc']['mean']:.2%}"
                         for x in plain) + ".",
             "Train - test gap in accuracy: " + ", ".join(
                 f"{label(x)} {100 * v[x]['final_gap']['mean']:.2f}" for x in plain) + " points."]
    if summary["ghosts"]:
        lines.append("Ghost BN by virtual batch size K: " + "; ".join(
            f"K={ghost_size(g)} {v[g]['final_test_acc']['mean']:.2%} test accuracy (gap "
            f"{100 * v[g]['final_gap']['mean']:.2f} points)" for g in summary["ghosts"])
            + f"; best: {label(summary['best_ghost'])}.")
    lines.extend(_gain_line(summary))
    lines.extend(f"{label(x)}: {v[x]['diverged']} of {v[x]['n']} runs diverged; their accuracy "
                 "counts at chance after that." for x in norms if v[x]["diverged"])
    return lines


def _gain_line(summary: dict) -> list[str]:
    gain, share = summary["bn_gain"], summary["noise_share"]
    if gain is None:
        return []
    if gain <= 1e-9:
        return [f"{label('bn')} did not beat {label('none')} on test accuracy ({100 * gain:+.2f} "
                "points), so there is no gain for the noise to explain."]
    if share is None:
        return [f"{label('bn')} beat {label('none')} by {100 * gain:+.2f} points of test accuracy "
                f"(no {label('full-batch')} run to tell how much of it is the noise)."]
    return [f"Share of {label('bn')}'s test-accuracy gain over {label('none')} "
            f"({100 * gain:+.2f} points) that the batch noise explains, (BN - full-batch BN) / "
            f"(BN - plain): {share:.0%}."]


def _pct(d: dict, clip: bool = True) -> str:
    return format_interval(d, pct=True, clip=clip, show_n=False)


def tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    rows = []
    for norm in summary["norms"]:
        v = summary["variants"][norm]
        loss = v["final_loss_gap"]
        rows.append([label(norm), v["n"], _pct(v["final_train_acc"]), _pct(v["final_test_acc"]),
                     _pct(v["best_test_acc"]), _pct(v["final_gap"], clip=False).replace("%", ""),
                     "-" if loss is None else format_interval(loss, show_n=False), v["diverged"]])
    return [(["variant", "n", "final train acc", "final test acc [95% CI]", "best test acc",
              "train - test gap (pts)", "test - train loss", "diverged"], rows)]


def colors(norms: list[str]) -> dict:
    """Each variant's colour; ghost sizes as one graded family, darker for larger K."""
    ghosts = sorted((n for n in norms if ghost_size(n)), key=ghost_size)
    shade = colormaps["YlOrBr"]
    out = {n: color(n) or OTHER_COLOR for n in norms}
    out.update({g: to_hex(shade(0.35 + 0.6 * i / max(len(ghosts) - 1, 1)))
                for i, g in enumerate(ghosts)})
    return out


def plot_test_accuracy(summary: dict, ax=None):
    """Mean test accuracy per epoch of every variant (bands left out: nine overlap)."""
    ax = ax if ax is not None else new_figure()[1][0]
    cs = colors(summary["norms"])
    for norm in summary["norms"]:
        plot_mean_band(summary["curves"][norm]["test_acc"], ax=ax, label=label(norm),
                       color=cs[norm], show_band=False)
    ax.set_xlabel("epoch"), ax.set_ylabel("test accuracy (mean over seeds)"), ax.grid(alpha=0.3)
    percent_axis(ax)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Test accuracy per epoch")
    return ax


def plot_final(summary: dict, metric: str, ax=None):
    """Per variant, the mean final ``metric`` with its 95% interval: the gap
    (``final_gap``) as bars in accuracy points, an accuracy as a point in %."""
    ax = ax if ax is not None else new_figure()[1][0]
    norms, cs = summary["norms"], colors(summary["norms"])
    k = 100.0 if metric == "final_gap" else 1.0
    d = [summary["variants"][n][metric] for n in norms]
    mean = np.array([x["mean"] for x in d]) * k
    err = np.array([[x["mean"] - x["low"] for x in d], [x["high"] - x["mean"] for x in d]]) * k
    x = np.arange(len(norms))
    if metric == "final_gap":  # a gap starts at zero: bars
        ax.bar(x, mean, yerr=err, capsize=3, color=[cs[n] for n in norms])
    else:  # accuracies differ by points on a scale of tens: points, not bars from zero
        for i, n in enumerate(norms):
            ax.errorbar(x[i], mean[i], yerr=err[:, i:i + 1], color=cs[n], marker="o", capsize=3)
    ax.set_xticks(x, [label(n) for n in norms], rotation=35, ha="right", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    if metric == "final_gap":
        ax.set_ylabel("train - test accuracy (points)")
        ax.set_title("Final generalization gap (95% interval)")
    else:
        percent_axis(ax)
        ax.set_ylabel(metric.replace("final_", "final ").replace("_acc", " accuracy"))
        ax.set_title("Final test accuracy (95% interval)")
    return ax


def figures(summary: dict) -> dict:
    fig, axes = new_figure(3, width=16, height=5)
    plot_test_accuracy(summary, axes[0])
    plot_final(summary, "final_test_acc", axes[1])
    plot_final(summary, "final_gap", axes[2])
    n = summary["n_train"]
    fig.suptitle(f"Training on {'the whole training set' if n is None else f'{n} examples'}, "
                 f"{summary['epochs']} epochs")
    return {"regularization": fig}
