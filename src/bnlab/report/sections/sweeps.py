"""``init-sweep`` and ``lr-sweep``: where plain networks and BN networks learn.

Every (value, seed, norm) is one unit trained for ``epochs`` epochs, with the swept value
(initial weight std or learning rate) in place of the config's. Each sweep reads one
accuracy per epoch: training accuracy for init-sweep, test accuracy for lr-sweep (both in
inference mode over the whole set). A diverged seed counts at chance after its divergence.

* init-sweep: a variant *learns* at a scale when its mean final training accuracy over
  seeds is at least ``learned_threshold``.
* lr-sweep: a seed's steps to ``threshold`` are (first epoch with test accuracy >=
  threshold) x steps per epoch, so their resolution is one epoch. At a learning rate a
  variant's steps are the mean over seeds when every seed reached the threshold, and "not
  reached by k of n" otherwise. The cost of going without BN is the mean, over the
  learning rates where both reached it, of steps(plain) / steps(variant).

This one module serves both experiments, so it words its title and expectation per
summary (``title(summary)``, ``expected(summary)``) instead of fixed ``TITLE``/``EXPECTED``.
"""

from __future__ import annotations

import math
from itertools import groupby

import numpy as np

from ..figures import (color, label, log_axis, new_figure, percent_axis, plot_mean_band,
                       readable_log_axis)
from ..stats import band, first_reaching, format_interval, mean_interval
from .compare import CHANCE, epoch_curves

# per experiment: the swept field, the config fields of its values and of the threshold,
# the accuracy read, and the title
SWEPT = {"init-sweep": ("init_scale", "scales", "learned_threshold", "train_acc",
                        "init-sweep: initial weight scale, plain vs BN"),
         "lr-sweep": ("lr", "lrs", "threshold", "test_acc", "lr-sweep: learning rate, plain vs BN")}
EXPECTATIONS = {
    "init-sweep": ("Deep Learning from Scratch 6.3.2 (784 -> 5 x 100 ReLU -> 10, 1000 MNIST "
                   "images, SGD lr 0.01, batch 100): the BN network learns at nearly every "
                   "initial weight std in logspace(0, -4, 16), the plain network only in a "
                   "narrow band around std 0.1; where both learn, BN learns faster."),
    "lr-sweep": ("Ioffe & Szegedy (2015, 3.3), Santurkar et al. (2018): BN tolerates larger "
                 "learning rates and reaches a threshold accuracy in fewer steps; plain "
                 "networks stall or diverge where BN trains."),
}


def title(summary: dict) -> str:
    return SWEPT[summary["kind"]][4]


def expected(summary: dict) -> str:
    return EXPECTATIONS[summary["kind"]]


def analyze(rows: list[dict], config) -> dict:
    key, field, threshold_field, metric, _ = SWEPT[config.name]
    init, threshold = config.name == "init-sweep", getattr(config, threshold_field)
    curves = epoch_curves(rows, config.epochs, by=(key, "norm"))
    values = [v for v in getattr(config, field) if any((v, n) in curves for n in config.norms)]
    norms = [n for n in config.norms if any((v, n) in curves for v in values)]
    r = next(r for r in rows if r.get("epoch"))  # rows close an epoch: step = epoch x steps
    per_epoch = r["step"] // r["epoch"]
    cells = [{n: curves[v, n] for n in norms if (v, n) in curves} for v in values]
    s = {"kind": config.name, "threshold": threshold, "epochs": config.epochs, "values": values,
         "norms": norms, "steps_per_epoch": per_epoch,
         "points": [{n: _point(c, metric, threshold, per_epoch) for n, c in cs.items()}
                    for cs in cells]}
    ok = {n: [v for v, p in column(s, n) if (p["final"]["mean"] >= threshold if init else
                                                p["steps"])] for n in norms}
    if init:
        return {**s, "learns": ok,
                "curves": [{n: band(c[metric]) for n, c in cs.items()} for cs in cells]}
    plain = {v: p["steps"] for v, p in column(s, "none")}
    ratios = {n: [plain[v] / p["steps"] for v, p in column(s, n) if p["steps"] and plain.get(v)]
              for n in norms if n != "none"}
    return {**s, "reaches": ok,
            "step_ratio": {n: float(np.mean(r)) for n, r in ratios.items() if r}}


def _point(c: dict, metric: str, threshold: float, per_epoch: int) -> dict:
    """One (value, norm): final accuracy over seeds, and when each seed first reached
    ``threshold``; the mean steps to it only when every seed did."""
    hits = [first_reaching(a, threshold) for a in c[metric]]  # c[metric]: (seeds, epochs)
    steps = [h * per_epoch for h in hits if h is not None]
    return {"n": len(hits), "diverged": int(sum(c["diverged"])), "epochs_to_threshold": hits,
            "final": mean_interval(c[metric][:, -1]).to_dict(), "missed": len(hits) - len(steps),
            "steps": float(np.mean(steps)) if len(steps) == len(hits) else None}


def column(summary: dict, norm: str) -> list[tuple[float, dict]]:
    """(swept value, point) of one variant, over the values it was run at."""
    return [(v, p[norm]) for v, p in zip(summary["values"], summary["points"]) if norm in p]


# -- words ----------------------------------------------------------------------------------
def spans(values: list[float], chosen: list[float]) -> str:
    """``chosen`` as runs of consecutive sweep values: "1 to 0.00063, 0.0001"."""
    at = [i for i, v in enumerate(values) if v in chosen]
    runs = [[values[i] for _, i in g] for _, g in groupby(enumerate(at), lambda x: x[1] - x[0])]
    return ", ".join(f"{r[0]:.3g}" + (f" to {r[-1]:.3g}" if len(r) > 1 else "")
                     for r in runs) or "none"


def measured(summary: dict) -> list[str]:
    values, norms, t = summary["values"], summary["norms"], summary["threshold"]
    init = summary["kind"] == "init-sweep"
    ok, name = (summary["learns"], "weight std") if init else (summary["reaches"], "learning rate")
    lines = [(f"Mean final training accuracy >= {t:.0%}" if init else
              f"Every seed reached {t:.0%} test accuracy") + " at " + " and ".join(
        f"{len(ok[n])} of {len(values)} {'scales' if init else 'learning rates'} with {label(n)}"
        + (f" (lr {spans(values, ok[n])})" if ok[n] and not init else "") for n in norms) + "."]
    lines += [f"{label(n)} learns at " + (f"weight std {spans(values, ok[n])}." if ok[n] else
                                          "no weight std.") for n in norms if init]
    lines += [f"Where both reach it (lr {spans(values, [v for v in ok[n] if v in ok['none']])}), "
              f"{label('none')} needs {r:.1f}x the steps of {label(n)} on average."
              for n, r in summary.get("step_ratio", {}).items()]
    if not init:
        best = {n: max((p["final"]["mean"], v) for v, p in column(summary, n)) for n in norms}
        lines.append("Best mean final test accuracy: " + "; ".join(
            f"{label(n)} {a:.2%} at lr {v:.3g}" for n, (a, v) in best.items()) + ".")
    for n in norms:
        col = column(summary, n)
        gone = [v for v, p in col if p["diverged"]]
        stuck = [v for v, p in col if not p["diverged"] and p["final"]["mean"] < 2 * CHANCE]
        if gone:
            lines.append(f"{label(n)}: {sum(p['diverged'] for _, p in col)} of "
                         f"{sum(p['n'] for _, p in col)} runs diverged (non-finite loss), at "
                         f"{name} {spans(values, gone)}; they count at chance after that.")
        if stuck:
            lines.append(f"{label(n)} stays near chance (mean final accuracy below "
                         f"{2 * CHANCE:.0%}) without diverging at {name} {spans(values, stuck)}.")
    return lines


def _cell(p: dict | None, steps: bool) -> str:
    if p is None:
        return "-"
    if steps:
        return f"not reached by {p['missed']} of {p['n']}" if p["missed"] else f"{p['steps']:.0f}"
    return format_interval(p["final"], pct=True, show_n=False) + (
        f", {p['diverged']} of {p['n']} diverged" if p["diverged"] else "")


def tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    norms, t, init = summary["norms"], summary["threshold"], summary["kind"] == "init-sweep"
    cols = [(n, False) for n in norms] + [(n, True) for n in norms if not init]
    header = ["weight std" if init else "learning rate"] + [
        f"{label(n)} steps to {t:.0%}" if steps else
        f"{label(n)} final {'train' if init else 'test'} acc" for n, steps in cols]
    return [(header, [[f"{v:.3g}"] + [_cell(p.get(n), steps) for n, steps in cols]
                      for v, p in zip(summary["values"], summary["points"])])]


# -- figures --------------------------------------------------------------------------------
def plot_grid(summary: dict):
    """init-sweep: a panel per weight std of the training accuracy per epoch, one band per
    variant, y axes shared; a panel's title counts its diverged seeds."""
    k, rows, t = len(summary["values"]), math.ceil(len(summary["values"]) / 4), summary["threshold"]
    fig, axes = new_figure(4, rows, width=10.5, height=2.2 * rows + 0.9, sharex=True, sharey=True)
    for ax, v, curves, points in zip(axes, summary["values"], summary["curves"], summary["points"]):
        for norm, c in curves.items():
            plot_mean_band(c, ax=ax, label=label(norm), color=color(norm),
                           linestyle="--" if norm == "none" else "-")
        ax.axhline(t, color="#999999", linewidth=0.8, linestyle=":", label=f"threshold {t:.0%}")
        gone = "; ".join(f"{label(n)}: {p['diverged']}/{p['n']} diverged"
                         for n, p in points.items() if p["diverged"])
        ax.set_title(f"std {v:.2g}" + (f" ({gone})" if gone else ""), fontsize=8.5 if gone else 9.5)
        ax.grid(alpha=0.3), percent_axis(ax)
    for ax in axes[k:]:
        ax.axis("off")
    axes[0].set_ylim(0, 1), axes[0].legend(fontsize=8.5, loc="best")
    fig.supxlabel("epoch"), fig.supylabel("training accuracy")
    fig.suptitle("Training accuracy per epoch, mean over seeds with 95% interval")
    return fig


def plot_final(summary: dict, ax=None):
    """lr-sweep: mean final test accuracy (95% interval) against the learning rate."""
    ax = ax if ax is not None else new_figure()[1][0]
    for norm in summary["norms"]:
        x, f = zip(*((v, p["final"]) for v, p in column(summary, norm)))
        ax.errorbar(x, [d["mean"] for d in f], [[d["mean"] - d["low"] for d in f],
                    [d["high"] - d["mean"] for d in f]], color=color(norm), marker="o",
                    capsize=3, label=f"{label(norm)} (n={f[0]['n']})")
    t = summary["threshold"]
    ax.axhline(t, color="#999999", linewidth=0.8, linestyle=":", label=f"threshold {t:.0%}")
    ax.set_ylim(0, 1), percent_axis(ax)
    return _lr_axis(ax, "final test accuracy",
                    f"Final test accuracy after {summary['epochs']} epochs (95% interval)")


def plot_steps(summary: dict, ax=None):
    """lr-sweep: steps to the threshold against the learning rate (mean over seeds, drawn
    only where every seed reached it); an x at the run's length marks a learning rate where
    k of n seeds did not reach it, with k/n beside it."""
    ax = ax if ax is not None else new_figure()[1][0]
    t, total = summary["threshold"], summary["epochs"] * summary["steps_per_epoch"]
    for i, norm in enumerate(summary["norms"]):
        col = column(summary, norm)
        ax.plot([v for v, _ in col], [p["steps"] or math.nan for _, p in col], color=color(norm),
                marker="o", label=label(norm))
        miss, y = [(v, p) for v, p in col if p["missed"]], total * 1.4 ** i  # a row per variant
        ax.plot([v for v, _ in miss], [y] * len(miss), "x", color=color(norm),
                label=f"{label(norm)}: not reached (k/n seeds missed)" if miss else None)
        for v, p in miss:
            ax.annotate(f"{p['missed']}/{p['n']}", (v, y), textcoords="offset points",
                        xytext=(5, -3), fontsize=8.5, color=color(norm))
    log_axis(ax)
    return _lr_axis(ax, f"steps to {t:.0%} test accuracy", f"Steps to {t:.0%} (mean over "
                    f"seeds; one epoch = {summary['steps_per_epoch']}, the run {total} steps)")


def _lr_axis(ax, ylabel: str, title: str):
    ax.set_xscale("log"), readable_log_axis(ax, "x"), ax.set_xlabel("learning rate")
    ax.set_ylabel(ylabel), ax.set_title(title, fontsize=10), ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5, loc="best")
    return ax


def figures(summary: dict) -> dict:
    if summary["kind"] == "init-sweep":
        return {"init_sweep": plot_grid(summary)}
    fig, axes = new_figure(2, width=10.5, height=4.8)
    plot_final(summary, axes[0]), plot_steps(summary, axes[1])
    return {"lr_sweep": fig}
