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

import numpy as np

from ..figures import color, label, new_figure, percent_axis, plot_mean_band, readable_log_axis
from ..stats import band, first_reaching, format_interval, mean_interval
from .compare import CHANCE, epoch_curves

# per experiment: the swept field, the config fields of its values and of the threshold,
# the accuracy read, the summary field of the values passing the threshold, and wording
SWEEPS = {
    "init-sweep": {
        "key": "init_scale", "values": "scales", "threshold": "learned_threshold",
        "metric": "train_acc", "passes": "learns", "name": "weight std", "short": "std",
        "title": "init-sweep: initial weight scale, plain vs BN",
        "expected": ("Deep Learning from Scratch 6.3.2 (784 -> 5 x 100 ReLU -> 10, 1000 MNIST "
                     "images, SGD lr 0.01, batch 100): the BN network learns at nearly every "
                     "initial weight std in logspace(0, -4, 16), the plain network only in a "
                     "narrow band around std 0.1; where both learn, BN learns faster.")},
    "lr-sweep": {
        "key": "lr", "values": "lrs", "threshold": "threshold",
        "metric": "test_acc", "passes": "reaches", "name": "learning rate", "short": "lr",
        "title": "lr-sweep: learning rate, plain vs BN",
        "expected": ("Ioffe & Szegedy (2015, 3.3), Santurkar et al. (2018): BN tolerates larger "
                     "learning rates and reaches a threshold accuracy in fewer steps; plain "
                     "networks stall or diverge where BN trains.")},
}


def title(summary: dict) -> str:
    return SWEEPS[summary["kind"]]["title"]


def expected(summary: dict) -> str:
    return SWEEPS[summary["kind"]]["expected"]


def analyze(rows: list[dict], config) -> dict:
    s = SWEEPS[config.name]
    threshold = getattr(config, s["threshold"])
    curves = epoch_curves(rows, config.epochs, by=(s["key"], "norm"))
    values = [v for v in getattr(config, s["values"]) if any((v, n) in curves for n in config.norms)]
    norms = [n for n in config.norms if any((v, n) in curves for v in values)]
    r = next(r for r in rows if r.get("epoch"))  # rows close an epoch: step = epoch x steps
    per_epoch = r["step"] // r["epoch"]
    cells = [{n: curves[v, n] for n in norms if (v, n) in curves} for v in values]
    summary = {"kind": config.name, "threshold": threshold, "epochs": config.epochs,
               "steps_per_epoch": per_epoch, "values": values, "norms": norms,
               "points": [{n: _point(c, s["metric"], threshold, per_epoch) for n, c in cs.items()}
                          for cs in cells],
               "curves": [{n: band(c[s["metric"]]) for n, c in cs.items()} for cs in cells]}
    if config.name == "init-sweep":
        summary["learns"] = _where(summary, lambda p: p["final"]["mean"] >= threshold)
        return summary
    summary["reaches"] = _where(summary, lambda p: p["steps"] is not None)
    plain = {v: p["steps"] for v, p in column(summary, "none")}
    both = {n: [(v, plain[v] / p["steps"]) for v, p in column(summary, n) if p["steps"] and plain[v]]
            for n in norms if n != "none" and plain}
    summary["step_ratio"] = {n: {"ratio": float(np.mean([r for _, r in b])), "values": [v for v, _ in b]}
                             for n, b in both.items() if b}
    return summary


def _point(c: dict, metric: str, threshold: float, per_epoch: int) -> dict:
    """One (value, norm): final accuracy over seeds, and when each seed first reached
    ``threshold``; the mean steps only when every seed did."""
    acc = c[metric]  # (seeds, epochs)
    hits = [first_reaching(a, threshold) for a in acc]
    steps = [h * per_epoch for h in hits if h is not None]
    return {"n": len(acc), "diverged": int(sum(c["diverged"])),
            "final": mean_interval(acc[:, -1]).to_dict(), "epochs_to_threshold": hits,
            "missed": len(hits) - len(steps),
            "steps": float(np.mean(steps)) if len(steps) == len(hits) else None}


def column(summary: dict, norm: str) -> list[tuple[float, dict]]:
    """(swept value, point) of one variant, over the values it was run at."""
    return [(v, p[norm]) for v, p in zip(summary["values"], summary["points"]) if norm in p]


def _where(summary: dict, passes) -> dict:
    return {n: [v for v, p in column(summary, n) if passes(p)] for n in summary["norms"]}


# -- words ----------------------------------------------------------------------------------
def spans(values: list[float], chosen: list[float]) -> str:
    """``chosen`` as runs of consecutive sweep values: "1 to 0.00063, 0.0001"."""
    runs: list[list[float]] = []
    for i, v in enumerate(values):
        if v in chosen:
            if runs and values.index(runs[-1][-1]) == i - 1:
                runs[-1].append(v)
            else:
                runs.append([v])
    return ", ".join(f"{r[0]:.3g}" if len(r) == 1 else f"{r[0]:.3g} to {r[-1]:.3g}"
                     for r in runs) or "none"


def measured(summary: dict) -> list[str]:
    s, values, norms, t = SWEEPS[summary["kind"]], summary["values"], summary["norms"], summary["threshold"]
    ok, init = summary[s["passes"]], summary["kind"] == "init-sweep"
    lines = [(f"Mean final training accuracy >= {t:.0%}" if init else
              f"Every seed reached {t:.0%} test accuracy") + " at " + " and ".join(
        f"{len(ok[n])} of {len(values)} {'scales' if init else 'learning rates'} with {label(n)}"
        + (f" (lr {spans(values, ok[n])})" if ok[n] and not init else "") for n in norms) + "."]
    if init:
        lines += [f"{label(n)} learns at " + (f"weight std {spans(values, ok[n])}." if ok[n] else
                                              "no weight std.") for n in norms]
    else:
        lines += [f"Where both reach it (lr {spans(values, r['values'])}), {label('none')} needs "
                  f"{r['ratio']:.1f}x the steps of {label(n)} on average."
                  for n, r in summary["step_ratio"].items()]
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
                         f"{s['name']} {spans(values, gone)}; they count at chance after that.")
        if stuck:
            lines.append(f"{label(n)} stays near chance (mean final accuracy below {2 * CHANCE:.0%}) "
                         f"without diverging at {s['name']} {spans(values, stuck)}.")
    return lines


def _cells(p: dict | None, init: bool) -> list[str]:
    """A variant's table cells at one value: final accuracy, and for lr-sweep the steps."""
    if p is None:
        return ["-"] if init else ["-", "-"]
    final = format_interval(p["final"], pct=True, show_n=False) + (
        f", {p['diverged']} of {p['n']} diverged" if p["diverged"] else "")
    return [final] if init else [final, f"not reached by {p['missed']} of {p['n']}"
                                 if p["missed"] else f"{p['steps']:.0f}"]


def tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    s, norms, t = SWEEPS[summary["kind"]], summary["norms"], summary["threshold"]
    init = summary["kind"] == "init-sweep"
    cells = [[_cells(p.get(n), init) for n in norms] for p in summary["points"]]
    header = [s["name"]] + [f"{label(n)} final {s['metric'][:-4]} acc" for n in norms] + (
        [f"learns (mean >= {t:.0%})"] if init else [f"{label(n)} steps to {t:.0%}" for n in norms])
    rows = [[f"{v:.3g}"] + [c[0] for c in cs] + ([", ".join(
        label(n) for n in norms if v in summary["learns"][n]) or "-"] if init else [c[1] for c in cs])
        for v, cs in zip(summary["values"], cells)]
    return [(header, rows)]


# -- figures --------------------------------------------------------------------------------
def plot_curves(summary: dict, i: int, ax=None):
    """The accuracy per epoch at the ``i``-th swept value, one band per variant."""
    ax = ax if ax is not None else new_figure()[1][0]
    for norm, c in summary["curves"][i].items():
        plot_mean_band(c, ax=ax, label=label(norm), color=color(norm),
                       linestyle="--" if norm == "none" else "-")
    ax.axhline(summary["threshold"], color="#999999", linewidth=0.8, linestyle=":",
               label=f"threshold {summary['threshold']:.0%}")
    gone = "; ".join(f"{label(n)}: {p['diverged']}/{p['n']} diverged"
                     for n, p in summary["points"][i].items() if p["diverged"])
    ax.set_title(f"{SWEEPS[summary['kind']]['short']} {summary['values'][i]:.2g}"
                 + (f" ({gone})" if gone else ""), fontsize=8 if gone else 9)
    ax.set_ylim(0, 1), ax.grid(alpha=0.3), percent_axis(ax)
    return ax


def plot_grid(summary: dict):
    """A panel of accuracy curves per swept value, y axes shared."""
    k = len(summary["values"])
    cols, rows = min(4, k), math.ceil(k / 4)
    fig, axes = new_figure(cols, rows, width=3 * cols + 0.6, height=2.4 * rows + 0.8,
                           sharex=True, sharey=True)
    for i, ax in enumerate(axes):
        plot_curves(summary, i, ax) if i < k else ax.axis("off")
    axes[0].legend(fontsize=7, loc="best")
    acc = "training" if summary["kind"] == "init-sweep" else "test"
    fig.supxlabel("epoch"), fig.supylabel(f"{acc} accuracy")
    fig.suptitle(f"{acc.capitalize()} accuracy per epoch, mean over seeds with 95% interval")
    return fig


def plot_final(summary: dict, ax=None):
    """Mean final test accuracy (95% interval) against the learning rate, on a log axis,
    with k/n beside a point to which k diverged seeds (at chance) contributed."""
    ax = ax if ax is not None else new_figure()[1][0]
    for norm in summary["norms"]:
        col = column(summary, norm)
        mean = np.array([p["final"]["mean"] for _, p in col])
        err = [mean - [max(p["final"]["low"], 0) for _, p in col],
               [min(p["final"]["high"], 1) for _, p in col] - mean]
        ax.errorbar([v for v, _ in col], mean, yerr=err, color=color(norm), marker="o", capsize=3,
                    label=f"{label(norm)} (n={col[0][1]['n']})")
        for v, p in (x for x in col if x[1]["diverged"]):
            ax.annotate(f"{p['diverged']}/{p['n']} diverged", (v, p["final"]["mean"]), fontsize=7,
                        textcoords="offset points", xytext=(-6, 8), color=color(norm))
    ax.axhline(summary["threshold"], color="#999999", linewidth=0.8, linestyle=":",
               label=f"threshold {summary['threshold']:.0%}")
    ax.set_xscale("log"), ax.set_xlabel("learning rate"), readable_log_axis(ax, "x")
    ax.set_ylabel("final test accuracy"), ax.set_ylim(0, 1), ax.grid(alpha=0.3), percent_axis(ax)
    ax.legend(fontsize=8)
    ax.set_title(f"Final test accuracy after {summary['epochs']} epochs (95% interval)")
    return ax


def plot_steps(summary: dict, ax=None):
    """Steps to the threshold against the learning rate (mean over seeds, drawn only where
    every seed reached it); an x at the top marks a learning rate where k of n seeds did
    not, with k/n beside it."""
    ax = ax if ax is not None else new_figure()[1][0]
    top = ax.get_xaxis_transform()  # x in data, y in axes fractions
    for norm in summary["norms"]:
        col = column(summary, norm)
        ax.plot([v for v, _ in col], [math.nan if p["steps"] is None else p["steps"] for _, p in col],
                color=color(norm), marker="o", label=label(norm))
        y = 0.95 if norm == "none" else 0.88  # two rows, so marks at one lr do not overlap
        for j, (v, p) in enumerate(x for x in col if x[1]["missed"]):
            ax.plot([v], [y], transform=top, color=color(norm), marker="x", linestyle="none",
                    label=f"{label(norm)}: not reached (k/n seeds missed)" if j == 0 else None)
            ax.annotate(f"{p['missed']}/{p['n']}", (v, y), xycoords=top, textcoords="offset points",
                        xytext=(5, -3), fontsize=7, color=color(norm))
    ax.set_xscale("log"), readable_log_axis(ax, "x")
    if any(p[n]["steps"] for p in summary["points"] for n in p):
        ax.set_yscale("log"), readable_log_axis(ax)
        ax.set_ylim(ax.get_ylim()[0], ax.get_ylim()[1] * 4)  # room above for the marks
    ax.set_xlabel("learning rate"), ax.set_ylabel(f"steps to {summary['threshold']:.0%} test accuracy")
    ax.grid(alpha=0.3), ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"Steps to {summary['threshold']:.0%} (mean over seeds; one epoch = "
                 f"{summary['steps_per_epoch']} steps)")
    return ax


def figures(summary: dict) -> dict:
    if summary["kind"] == "init-sweep":
        return {"init_sweep": plot_grid(summary)}
    fig, axes = new_figure(2, width=13, height=4.5)
    plot_final(summary, axes[0]), plot_steps(summary, axes[1])
    return {"lr_sweep": fig}
