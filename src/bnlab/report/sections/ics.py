"""``ics``: do the inputs to the last hidden layer's units drift without BN and stay put with
it (Ioffe & Szegedy 2015, Figure 1)?"""

import numpy as np
from matplotlib.ticker import MaxNLocator

from ..build import ReportError
from ..figures import color, label, new_figure, percent_axis, plot_mean_band
from ..stats import band, format_interval, mean_interval

TITLE = "ics: Ioffe & Szegedy's Figure 1"
EXPECTED = ("Ioffe & Szegedy (2015), Figure 1: with BN, test accuracy rises faster and ends "
            "higher; without BN the 15/50/85th percentiles of a last-layer sigmoid's input drift "
            "in mean and spread over training, with BN they stay put.")
KEYS = ("p15", "p50", "p85")
DRIFTS = ("median_drift", "spread_drift")


def drift(p15: np.ndarray, p50: np.ndarray, p85: np.ndarray) -> tuple[float, float]:
    """How far each unit's median input and its 15-85 spread wander (max - min over the
    evaluations, the rows), in units of its mean spread, averaged over units (the columns)."""
    spread = p85 - p15
    scale = np.maximum(spread.mean(axis=0), 1e-12)
    return tuple(float((np.ptp(a, axis=0) / scale).mean()) for a in (p50, spread))


def analyze(rows: list[dict], config) -> dict:
    units: dict = {}
    for r in sorted(rows, key=lambda r: r["seed"]):  # each norm's units in seed order
        units.setdefault(r["unit"], []).append(r)
    runs = {n: [u for u in units.values() if u[0]["norm"] == n] for n in config.norms}
    fine = {n: [u for u in us if not any(r.get("diverged") for r in u)] for n, us in runs.items()}
    norms = [n for n in config.norms if fine[n]]
    if not norms:
        raise ReportError("every finished run diverged (non-finite loss), so there is nothing to "
                          "plot; try a smaller --lr")
    steps = [r["step"] for r in fine[norms[0]][0]]
    early = sorted({0, len(steps) // 5 - 1, len(steps) - 1} - {-1})  # first, a fifth, last
    acc = {n: np.array([[r["test_acc"] for r in u] for u in fine[n]]) for n in norms}  # (seeds, t)
    drifts = {n: zip(*(drift(*(np.array([r[k] for r in u]) for k in KEYS)) for u in fine[n]))
              for n in norms}  # per norm: (median drifts, spread drifts) over seeds
    return {"norms": norms, "activation": config.activation, "steps": steps,
            "early_steps": [steps[i] for i in early], "curves": {n: band(acc[n]) for n in norms},
            "variants": {n: {"test_acc": [mean_interval(acc[n][:, i]).to_dict() for i in early],
                             **{d: mean_interval(v).to_dict() for d, v in zip(DRIFTS, drifts[n])}}
                         for n in norms},
            # the paper shows one unit: unit 0 of the first seed
            "neuron": {n: {"seed": fine[n][0][0]["seed"], **{k: [r[k][0] for r in fine[n][0]]
                                                              for k in KEYS}} for n in norms},
            "diverged": [[n, len(runs[n]) - len(fine[n])] for n in config.norms]}


def measured(summary: dict) -> list[str]:
    v, s = summary["variants"], summary["early_steps"]
    acc = [f"{label(n)} {format_interval(v[n]['test_acc'][0], pct=True)} and "
           f"{format_interval(v[n]['test_acc'][-1], pct=True)}" for n in summary["norms"]]
    lines = [f"Test accuracy after {s[0]} and {s[-1]} steps: " + "; ".join(acc) + "."]
    if "none" in v and "bn" in v and v["bn"]["median_drift"]["mean"] > 0:
        (pm, ps), (bm, bs) = ([v[n][d]["mean"] for d in DRIFTS] for n in ("none", "bn"))
        lines.append(f"Drift of a {summary['activation']}'s median input over training, in units "
                     f"of its 15-85 spread (mean over the last layer's units): plain {pm:.3f} vs "
                     f"BN {bm:.3f}, {pm / bm:.1f}x; drift of the spread: plain {ps:.3f} vs BN "
                     f"{bs:.3f}.")
    return lines + [f"{label(n)}: {k} run(s) diverged (non-finite loss) and are left out."
                    for n, k in summary["diverged"] if k]


def tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    v = summary["variants"]
    return [(["variant"] + [f"test acc after {s} steps" for s in summary["early_steps"]]
             + ["median drift (in spreads)", "spread drift (in spreads)"],
             [[label(n)] + [format_interval(a, pct=True) for a in v[n]["test_acc"]]
              + [format_interval(v[n][d]) for d in DRIFTS] for n in summary["norms"]])]


def plot_accuracy(summary: dict, ax=None):
    """(a) Test accuracy per evaluation, mean over seeds with its 95% interval."""
    ax = ax if ax is not None else new_figure()[1][0]
    for norm in summary["norms"]:
        plot_mean_band(summary["curves"][norm], x=summary["steps"], ax=ax, label=label(norm),
                       color=color(norm))
    ax.set_xlabel("training step"), ax.set_ylabel("test accuracy"), ax.grid(alpha=0.3)
    percent_axis(ax)
    ax.yaxis.set_major_locator(MaxNLocator(steps=[1, 2, 5, 10]))  # no 2.5% steps shown rounded
    ax.legend(fontsize=9), ax.set_title("(a) test accuracy", fontsize=10)
    return ax


def plot_neuron(summary: dict, norm: str, ax=None, letter: str = ""):
    """One unit's 15th, 50th and 85th input percentiles over training."""
    ax = ax if ax is not None else new_figure()[1][0]
    p = summary["neuron"][norm]
    for key, style in zip(KEYS, ("--", "-", ":")):
        ax.plot(summary["steps"], p[key], color=color(norm), linestyle=style, label=f"{key[1:]}th")
    ax.set_title(f"{letter}{label(norm)}: one {summary['activation']}'s input (seed {p['seed']})",
                 fontsize=10)
    ax.set_xlabel("training step"), ax.grid(alpha=0.3), ax.legend(fontsize=9)
    return ax


def figures(summary: dict) -> dict:
    norms = summary["norms"]
    fig, axes = new_figure(1 + len(norms), width=min(3.6 * (1 + len(norms)), 10.8),
                           height=4.2)
    plot_accuracy(summary, axes[0])
    for i, (ax, norm) in enumerate(zip(axes[1:], norms)):
        if i:
            ax.sharey(axes[1])  # the percentile panels compare levels: one scale
        plot_neuron(summary, norm, ax, f"({'bcdefgh'[i]}) ")
    axes[1].set_ylabel(f"input to the {summary['activation']}")
    return {"ics": fig}
