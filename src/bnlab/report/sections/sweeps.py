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

from ..figures import color, label, new_figure, percent_axis, plot_mean_band, readable_log_axis
from ..stats import band, first_reaching, format_interval, mean_interval
from .compare import CHANCE, epoch_curves

# per experiment: the swept field, and the config fields of its values and of the threshold
SWEPT = {"init-sweep": ("init_scale", "scales", "learned_threshold"),
         "lr-sweep": ("lr", "lrs", "threshold")}
TITLES = {"init-sweep": "init-sweep: initial weight scale, plain vs BN",
          "lr-sweep": "lr-sweep: learning rate, plain vs BN"}
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
    return TITLES[summary["kind"]]


def expected(summary: dict) -> str:
    return EXPECTATIONS[summary["kind"]]


def analyze(rows: list[dict], config) -> dict:
    key, field, threshold_field = SWEPT[config.name]
    init, threshold = config.name == "init-sweep", getattr(config, threshold_field)
    metric = "train_acc" if init else "test_acc"
    curves = epoch_curves(rows, config.epochs, by=(key, "norm"))
    values = [v for v in getattr(config, field) if any((v, n) in curves for n in config.norms)]
    norms = [n for n in config.norms if any((v, n) in curves for v in values)]
    r = next(r for r in rows if r.get("epoch"))  # rows close an epoch: step = epoch x steps
    cells = [{n: curves[v, n] for n in norms if (v, n) in curves} for v in values]
    summary = {"kind": config.name, "threshold": threshold, "epochs": config.epochs,
               "steps_per_epoch": r["step"] // r["epoch"], "values": values, "norms": norms}
    summary["points"] = [{n: _point(c, metric, threshold, summary["steps_per_epoch"])
                          for n, c in cs.items()} for cs in cells]
    if init:
        summary["curves"] = [{n: band(c[metric]) for n, c in cs.items()} for cs in cells]
        summary["learns"] = {n: [v for v, p in column(summary, n) if p["final"]["mean"] >= threshold]
                             for n in norms}
        return summary
    summary["reaches"] = {n: [v for v, p in column(summary, n) if p["steps"]] for n in norms}
    plain = {v: p["steps"] for v, p in column(summary, "none")}
    both = {n: [(v, plain[v] / p["steps"]) for v, p in column(summary, n) if p["steps"] and plain.get(v)]
            for n in norms if n != "none"}
    summary["step_ratio"] = {n: {"ratio": float(np.mean([r for _, r in b])), "values": [v for v, _ in b]}
                             for n, b in both.items() if b}
    return summary


def _point(c: dict, metric: str, threshold: float, per_epoch: int) -> dict:
    """One (value, norm): final accuracy over seeds, and when each seed first reached
    ``threshold``; the mean steps only when every seed did."""
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
    runs = [[values[i] for _, i in run] for _, run in groupby(enumerate(at), lambda x: x[1] - x[0])]
    return ", ".join(f"{r[0]:.3g}" + (f" to {r[-1]:.3g}" if len(r) > 1 else "") for r in runs) or "none"


def measured(summary: dict) -> list[str]:
    values, norms, t = summary["values"], summary["norms"], summary["threshold"]
    init = summary["kind"] == "init-sweep"
    ok, name = (summary["learns"], "weight std") if init else (summary["reaches"], "learning rate")
    where = {n: spans(values, ok[n]) for n in norms}
    lines = [(f"Mean final training accuracy >= {t:.0%}" if init else f"Every seed reached {t:.0%} "
              "test accuracy") + " at " + " and ".join(
        f"{len(ok[n])} of {len(values)} {'scales' if init else 'learning rates'} with {label(n)}"
        + (f" (lr {where[n]})" if ok[n] and not init else "") for n in norms) + "."]
    lines += [f"{label(n)} learns at " + (f"weight std {where[n]}." if ok[n] else "no weight std.")
              for n in norms if init]
    lines += [f"Where both reach it (lr {spans(values, r['values'])}), {label('none')} needs "
              f"{r['ratio']:.1f}x the steps of {label(n)} on average."
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
            lines.append(f"{label(n)} stays near chance (mean final accuracy below {2 * CHANCE:.0%}) "
                         f"without diverging at {name} {spans(values, stuck)}.")
    return lines


def tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    norms, t, init = summary["norms"], summary["threshold"], summary["kind"] == "init-sweep"
    header = ["weight std" if init else "learning rate"] + [
        f"{label(n)} final {'train' if init else 'test'} acc" for n in norms] + (
        [f"learns (mean >= {t:.0%})"] if init else [f"{label(n)} steps to {t:.0%}" for n in norms])
    rows = []
    for v, p in zip(summary["values"], summary["points"]):
        final = ["-" if n not in p else format_interval(p[n]["final"], pct=True, show_n=False)
                 + (f", {p[n]['diverged']} of {p[n]['n']} diverged" if p[n]["diverged"] else "")
                 for n in norms]
        steps = ["-" if n not in p else f"not reached by {p[n]['missed']} of {p[n]['n']}"
                 if p[n]["missed"] else f"{p[n]['steps']:.0f}" for n in norms]
        learns = ", ".join(label(n) for n in norms if v in summary["learns"][n]) if init else ""
        rows.append([f"{v:.3g}"] + final + ([learns or "-"] if init else steps))
    return [(header, rows)]


# -- figures --------------------------------------------------------------------------------
def plot_curves(summary: dict, i: int, ax=None):
    """init-sweep: training accuracy per epoch at the ``i``-th weight std, one band per
    variant; the title counts the diverged seeds."""
    ax = ax if ax is not None else new_figure()[1][0]
    for norm, c in summary["curves"][i].items():
        plot_mean_band(c, ax=ax, label=label(norm), color=color(norm),
                       linestyle="--" if norm == "none" else "-")
    ax.axhline(summary["threshold"], color="#999999", linewidth=0.8, linestyle=":",
               label=f"threshold {summary['threshold']:.0%}")
    gone = "; ".join(f"{label(n)}: {p['diverged']}/{p['n']} diverged"
                     for n, p in summary["points"][i].items() if p["diverged"])
    ax.set_title(f"std {summary['values'][i]:.2g}" + (f" ({gone})" if gone else ""),
                 fontsize=8 if gone else 9)
    ax.set_ylim(0, 1), ax.grid(alpha=0.3), percent_axis(ax)
    return ax


def plot_grid(summary: dict):
    """A panel of training-accuracy curves per weight std, y axes shared."""
    k = len(summary["values"])
    cols, rows = min(4, k), math.ceil(k / 4)
    fig, axes = new_figure(cols, rows, width=3 * cols + 0.6, height=2.4 * rows + 0.8,
                           sharex=True, sharey=True)
    for i, ax in enumerate(axes[:k]):
        plot_curves(summary, i, ax)
    for ax in axes[k:]:
        ax.axis("off")
    axes[0].legend(fontsize=7, loc="best")
    fig.supxlabel("epoch"), fig.supylabel("training accuracy")
    fig.suptitle("Training accuracy per epoch, mean over seeds with 95% interval")
    return fig


def plot_lr(summary: dict, steps: bool, ax=None):
    """lr-sweep, per variant against the learning rate: the mean final test accuracy with
    its 95% interval, or (``steps``) the mean steps to the threshold, drawn only where every
    seed reached it, and an x at the top where k of n seeds did not, with k/n beside it."""
    ax = ax if ax is not None else new_figure()[1][0]
    top, t = ax.get_xaxis_transform(), summary["threshold"]  # top: x in data, y in axes fractions
    for norm in summary["norms"]:
        x, f = zip(*((v, p["final"]) for v, p in column(summary, norm)))
        if not steps:
            ax.errorbar(x, [d["mean"] for d in f], [[d["mean"] - max(d["low"], 0) for d in f],
                        [min(d["high"], 1) - d["mean"] for d in f]], color=color(norm), marker="o",
                        capsize=3, label=f"{label(norm)} (n={f[0]['n']})")
            continue
        ax.plot(x, [p["steps"] or math.nan for _, p in column(summary, norm)], color=color(norm),
                marker="o", label=label(norm))
        y = 0.95 if norm == "none" else 0.88  # two rows, so marks at one lr do not overlap
        for j, (v, p) in enumerate((v, p) for v, p in column(summary, norm) if p["missed"]):
            ax.plot([v], [y], transform=top, color=color(norm), marker="x", linestyle="none",
                    label=f"{label(norm)}: not reached (k/n seeds missed)" if j == 0 else None)
            ax.annotate(f"{p['missed']}/{p['n']}", (v, y), xycoords=top, textcoords="offset points",
                        xytext=(5, -3), fontsize=7, color=color(norm))
    if not steps:
        ax.axhline(t, color="#999999", linewidth=0.8, linestyle=":", label=f"threshold {t:.0%}")
        ax.set_ylim(0, 1), percent_axis(ax)
    elif any(p[n]["steps"] for p in summary["points"] for n in p):
        ax.set_yscale("log"), readable_log_axis(ax)
        ax.set_ylim(ax.get_ylim()[0], ax.get_ylim()[1] * 4)  # room above for the marks
    ax.set_xscale("log"), readable_log_axis(ax, "x"), ax.set_xlabel("learning rate"), ax.grid(alpha=0.3)
    ax.set_ylabel(f"steps to {t:.0%} test accuracy" if steps else "final test accuracy")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"Steps to {t:.0%} (mean over seeds; one epoch = {summary['steps_per_epoch']} steps)"
                 if steps else f"Final test accuracy after {summary['epochs']} epochs (95% interval)")
    return ax


def figures(summary: dict) -> dict:
    if summary["kind"] == "init-sweep":
        return {"init_sweep": plot_grid(summary)}
    fig, axes = new_figure(2, width=13, height=4.5)
    plot_lr(summary, False, axes[0]), plot_lr(summary, True, axes[1])
    return {"lr_sweep": fig}
