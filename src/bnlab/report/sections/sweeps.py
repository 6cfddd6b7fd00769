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

# per experiment: the swept field, the config field listing its values, the accuracy read,
# the config field holding the threshold on it, and what the swept value is called
SWEEPS = {"init-sweep": {"key": "init_scale", "values": "scales", "metric": "train_acc",
                         "threshold": "learned_threshold", "name": "weight std"},
          "lr-sweep": {"key": "lr", "values": "lrs", "metric": "test_acc",
                       "threshold": "threshold", "name": "learning rate"}}
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
    s = SWEEPS[config.name]
    metric, threshold = s["metric"], getattr(config, s["threshold"])
    curves = epoch_curves(rows, config.epochs, by=(s["key"], "norm"))
    values = [v for v in getattr(config, s["values"]) if any((v, n) in curves for n in config.norms)]
    norms = [n for n in config.norms if any((v, n) in curves for v in values)]
    per_epoch = steps_per_epoch(rows)
    points = [{n: _point(curves[v, n], metric, threshold, per_epoch)
               for n in norms if (v, n) in curves} for v in values]
    summary = {"kind": config.name, "swept": s["key"], "metric": metric, "threshold": threshold,
               "epochs": config.epochs, "steps_per_epoch": per_epoch, "values": values,
               "norms": norms, "points": points,
               "curves": [{n: band(curves[v, n][metric]) for n in p} for v, p in zip(values, points)]}
    if config.name == "init-sweep":
        summary["learns"] = {n: [v for v, p in zip(values, points)
                                 if n in p and p[n]["final"]["mean"] >= threshold] for n in norms}
    else:
        summary["reaches"] = {n: [v for v, p in zip(values, points)
                                  if n in p and p[n]["steps"] is not None] for n in norms}
        summary["step_ratio"] = _step_ratios(summary)
    return summary


def steps_per_epoch(rows: list[dict]) -> int:
    """From any row: rows are written at the end of an epoch, so step = epoch x steps."""
    r = next(r for r in rows if r.get("epoch"))
    return r["step"] // r["epoch"]


def _point(c: dict, metric: str, threshold: float, per_epoch: int) -> dict:
    """One (value, norm): final accuracy over seeds, and when each seed first reached
    ``threshold``."""
    acc = c[metric]  # (seeds, epochs)
    hits = [first_reaching(a, threshold) for a in acc]
    steps = [h * per_epoch for h in hits if h is not None]
    final = mean_interval(acc[:, -1]).to_dict()
    return {"n": len(acc), "diverged": int(sum(c["diverged"])), "final": final,
            "epochs_to_threshold": hits,
            "missed": len(hits) - len(steps),
            "steps": float(np.mean(steps)) if len(steps) == len(hits) else None}


def _step_ratios(summary: dict) -> dict:
    """Per variant but plain: the mean of steps(plain) / steps(variant) over the values
    where every seed of both reached the threshold (None where there is none)."""
    if "none" not in summary["norms"]:
        return {}
    out = {}
    for norm in summary["norms"]:
        if norm == "none":
            continue
        both = [(v, p["none"]["steps"] / p[norm]["steps"])
                for v, p in zip(summary["values"], summary["points"])
                if p.get("none", {}).get("steps") is not None
                and p.get(norm, {}).get("steps") is not None]
        out[norm] = {"ratio": float(np.mean([r for _, r in both])) if both else None,
                     "values": [v for v, _ in both]}
    return out


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
    lines = _measured_init(summary) if summary["kind"] == "init-sweep" else _measured_lr(summary)
    name = SWEEPS[summary["kind"]]["name"]
    for norm in summary["norms"]:
        pts = [(v, p[norm]) for v, p in zip(summary["values"], summary["points"]) if norm in p]
        hit = [v for v, p in pts if p["diverged"]]
        if hit:
            k, n = sum(p["diverged"] for _, p in pts), sum(p["n"] for _, p in pts)
            lines.append(f"{label(norm)}: {k} of {n} runs diverged (non-finite loss), at {name} "
                         f"{spans(summary['values'], hit)}; they count at chance after that.")
        stuck = [v for v, p in pts if not p["diverged"] and p["final"]["mean"] < 2 * CHANCE]
        if stuck:
            lines.append(f"{label(norm)} stays near chance (mean final accuracy below "
                         f"{2 * CHANCE:.0%}) without diverging at {name} "
                         f"{spans(summary['values'], stuck)}.")
    return lines


def _measured_init(summary: dict) -> list[str]:
    values, learns, t = summary["values"], summary["learns"], summary["threshold"]
    lines = [f"Mean final training accuracy >= {t:.0%} at "
             + " and ".join(f"{len(learns[n])} of {len(values)} scales with {label(n)}"
                            for n in summary["norms"]) + "."]
    lines.extend(f"{label(n)} learns at weight std {spans(values, learns[n])}." if learns[n] else
                 f"{label(n)} learns at no weight std." for n in summary["norms"])
    return lines


def _measured_lr(summary: dict) -> list[str]:
    values, reaches, t = summary["values"], summary["reaches"], summary["threshold"]
    lines = [f"Every seed reached {t:.0%} test accuracy at "
             + " and ".join(f"{len(reaches[n])} of {len(values)} learning rates with {label(n)}"
                            + (f" (lr {spans(values, reaches[n])})" if reaches[n] else "")
                            for n in summary["norms"]) + "."]
    for norm, r in summary["step_ratio"].items():
        if r["ratio"] is not None:
            lines.append(f"Where both reach it (lr {spans(values, r['values'])}), {label('none')} "
                         f"needs {r['ratio']:.1f}x the steps of {label(norm)} on average.")
    best = []
    for norm in summary["norms"]:
        finals = [(p[norm]["final"]["mean"], v) for v, p in zip(values, summary["points"]) if norm in p]
        acc, lr = max(finals)
        best.append(f"{label(norm)} {acc:.2%} at lr {lr:.3g}")
    lines.append("Best mean final test accuracy: " + "; ".join(best) + ".")
    return lines


def _pct(d: dict) -> str:
    return format_interval(d, pct=True, show_n=False)


def _final_cell(p: dict | None) -> str:
    if p is None:
        return "-"
    return _pct(p["final"]) + (f", {p['diverged']} of {p['n']} diverged" if p["diverged"] else "")


def _steps_cell(p: dict | None) -> str:
    if p is None:
        return "-"
    return f"not reached by {p['missed']} of {p['n']}" if p["missed"] else f"{p['steps']:.0f}"


def tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    norms, kind = summary["norms"], summary["kind"]
    acc = "train" if summary["metric"] == "train_acc" else "test"
    header = [SWEEPS[kind]["name"]] + [f"{label(n)} final {acc} acc" for n in norms]
    rows = [[f"{v:.3g}"] + [_final_cell(p.get(n)) for n in norms]
            for v, p in zip(summary["values"], summary["points"])]
    if kind == "init-sweep":
        header.append(f"learns (mean >= {summary['threshold']:.0%})")
        for row, v in zip(rows, summary["values"]):
            row.append(", ".join(label(n) for n in norms if v in summary["learns"][n]) or "-")
    else:
        header += [f"{label(n)} steps to {summary['threshold']:.0%}" for n in norms]
        for row, p in zip(rows, summary["points"]):
            row += [_steps_cell(p.get(n)) for n in norms]
    return [(header, rows)]


# -- figures --------------------------------------------------------------------------------
def _value_text(summary: dict, v: float) -> str:
    return f"std {v:.2g}" if summary["kind"] == "init-sweep" else f"lr {v:.3g}"


def plot_curves(summary: dict, i: int, ax=None):
    """The accuracy per epoch at the ``i``-th swept value, one band per variant."""
    ax = ax if ax is not None else new_figure()[1][0]
    points, curves = summary["points"][i], summary["curves"][i]
    for norm in summary["norms"]:
        if norm in curves:
            plot_mean_band(curves[norm], ax=ax, label=label(norm), color=color(norm),
                           linestyle="-" if norm != "none" else "--")
    ax.axhline(summary["threshold"], color="#999999", linewidth=0.8, linestyle=":",
               label=f"threshold {summary['threshold']:.0%}")
    gone = [f"{label(n)}: {p['diverged']}/{p['n']} diverged" for n, p in points.items() if p["diverged"]]
    ax.set_title(_value_text(summary, summary["values"][i]) + (f" ({'; '.join(gone)})" if gone else ""),
                 fontsize=8 if gone else 9)
    ax.set_ylim(0, 1), ax.grid(alpha=0.3)
    percent_axis(ax)
    return ax


def plot_final(summary: dict, ax=None):
    """Mean final accuracy (95% interval) against the swept value, on a log axis; an x
    where seeds diverged, with k/n beside it."""
    ax = ax if ax is not None else new_figure()[1][0]
    for norm in summary["norms"]:
        pts = [(v, p[norm]["final"]) for v, p in zip(summary["values"], summary["points"]) if norm in p]
        x = [v for v, _ in pts]
        mean = np.array([f["mean"] for _, f in pts])
        err = [mean - [max(f["low"], 0) for _, f in pts], [min(f["high"], 1) for _, f in pts] - mean]
        ax.errorbar(x, mean, yerr=err, color=color(norm), marker="o", capsize=3,
                    label=f"{label(norm)} (n={pts[0][1]['n']})" if pts else label(norm))
        _mark_diverged(summary, norm, ax)
    ax.axhline(summary["threshold"], color="#999999", linewidth=0.8, linestyle=":",
               label=f"threshold {summary['threshold']:.0%}")
    acc = "training" if summary["metric"] == "train_acc" else "test"
    ax.set_xscale("log"), ax.set_xlabel(SWEEPS[summary["kind"]]["name"])
    ax.set_ylabel(f"final {acc} accuracy"), ax.set_ylim(0, 1), ax.grid(alpha=0.3)
    readable_log_axis(ax, "x"), percent_axis(ax)
    ax.legend(fontsize=8)
    ax.set_title(f"Final {acc} accuracy after {summary['epochs']} epochs (95% interval)")
    return ax


def _mark_diverged(summary: dict, norm: str, ax) -> None:
    """An x over each final accuracy to which diverged seeds (at chance) contributed."""
    gone = [(v, p[norm]) for v, p in zip(summary["values"], summary["points"])
            if norm in p and p[norm]["diverged"]]
    for j, (v, p) in enumerate(gone):
        ax.plot([v], [p["final"]["mean"]], color=color(norm), marker="x", markersize=11,
                linestyle="none", label=f"{label(norm)}: k/n seeds diverged" if j == 0 else None)
        ax.annotate(f"{p['diverged']}/{p['n']}", (v, p["final"]["mean"]), textcoords="offset points",
                    xytext=(-6, 8), fontsize=7, color=color(norm))


def plot_steps(summary: dict, ax=None):
    """Steps to the threshold against the learning rate (mean over seeds, drawn only where
    every seed reached it); an x at the top marks a learning rate where k of n seeds did
    not, with k/n beside it."""
    ax = ax if ax is not None else new_figure()[1][0]
    top = ax.get_xaxis_transform()  # x in data, y in axes fractions
    for norm in summary["norms"]:
        pts = [(v, p[norm]) for v, p in zip(summary["values"], summary["points"]) if norm in p]
        steps = [math.nan if p["steps"] is None else p["steps"] for _, p in pts]
        ax.plot([v for v, _ in pts], steps, color=color(norm), marker="o", label=label(norm))
        missed = [(v, p) for v, p in pts if p["missed"]]
        y = 0.95 if norm == "none" else 0.88  # two rows, so marks at one lr do not overlap
        for j, (v, p) in enumerate(missed):
            ax.plot([v], [y], transform=top, color=color(norm), marker="x", linestyle="none",
                    label=f"{label(norm)}: not reached (k/n seeds missed)" if j == 0 else None)
            ax.annotate(f"{p['missed']}/{p['n']}", (v, y), xycoords=top, textcoords="offset points",
                        xytext=(5, -3), fontsize=7, color=color(norm))
    ax.set_xscale("log"), readable_log_axis(ax, "x")
    if any(p[n]["steps"] for p in summary["points"] for n in p):
        ax.set_yscale("log"), readable_log_axis(ax)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * 4)  # room above the lines for the "not reached" marks
    ax.set_xlabel("learning rate"), ax.set_ylabel(f"steps to {summary['threshold']:.0%} test accuracy")
    ax.grid(alpha=0.3), ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"Steps to {summary['threshold']:.0%} (mean over seeds; one epoch = "
                 f"{summary['steps_per_epoch']} steps)")
    return ax


def plot_grid(summary: dict):
    """A panel of accuracy curves per swept value, y axes shared."""
    k = len(summary["values"])
    cols = min(4, k)
    rows = math.ceil(k / cols)
    fig, axes = new_figure(cols, rows, width=3 * cols + 0.6, height=2.4 * rows + 0.8,
                           sharex=True, sharey=True)
    for i, ax in enumerate(axes):
        if i < k:
            plot_curves(summary, i, ax)
        else:
            ax.axis("off")
    axes[0].legend(fontsize=7, loc="best")
    acc = "training" if summary["metric"] == "train_acc" else "test"
    fig.supxlabel("epoch"), fig.supylabel(f"{acc} accuracy")
    fig.suptitle(f"{acc.capitalize()} accuracy per epoch, mean over seeds with 95% interval")
    return fig


def figures(summary: dict) -> dict:
    grid = plot_grid(summary)
    if summary["kind"] == "init-sweep":
        fig, (ax,) = new_figure(width=8, height=4.5)
        plot_final(summary, ax)
        return {"init_sweep": grid, "init_sweep_final": fig}
    fig, axes = new_figure(2, width=13, height=4.5)
    plot_final(summary, axes[0])
    plot_steps(summary, axes[1])
    return {"lr_sweep": fig, "lr_sweep_curves": grid}
