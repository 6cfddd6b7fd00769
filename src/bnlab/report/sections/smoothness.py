"""``smoothness``: is the loss landscape along the gradient smoother with BN?"""

from __future__ import annotations

import numpy as np

from ..figures import color, label, new_figure, plot_mean_band, readable_log_axis
from ..stats import band, format_interval, mean_interval

TITLE = "smoothness: the loss landscape along the gradient"
EXPECTED = ("Santurkar et al. (2018, Figures 4 and 7): along the gradient, BN's loss varies over "
            "a narrower range, its gradients change less and its effective beta-smoothness is "
            "smaller; noisy BN (random shifts and scales after BN) trains about as well as BN.")
QUANTITIES = {"loss_range": "loss range along -g", "grad_change": "max ||g_eta - g||",
              "beta": "effective beta-smoothness"}
CHANCE = 0.1  # a diverged run's test accuracy (every bnlab dataset has 10 classes)


def checkpoints(config) -> list[int]:
    """The steps fit measures at: 0, every ``eval_every``, and the last."""
    return sorted(set(range(0, config.steps + 1, config.eval_every)) | {config.steps})


def unit_curves(rows: list[dict], steps: list[int]) -> dict:
    """``{norm: {"seeds", "diverged", "test_acc", quantity: (n_seeds, n_checkpoints)}}``;
    a diverged seed's checkpoints after its divergence are NaN, its test accuracy at chance."""
    units: dict = {}
    for r in rows:
        units.setdefault(r["unit"], []).append(r)
    out: dict = {}
    for unit_rows in sorted(units.values(), key=lambda u: u[0]["seed"]):
        c = out.setdefault(unit_rows[0]["norm"], {"seeds": [], "diverged": [], "test_acc": [],
                                                  **{q: [] for q in QUANTITIES}})
        at = {r["step"]: r for r in unit_rows if not r.get("diverged")}
        final = at.get(steps[-1], {}).get("test_acc")
        c["seeds"].append(unit_rows[0]["seed"])
        c["diverged"].append(any(r.get("diverged") for r in unit_rows))
        c["test_acc"].append(CHANCE if final is None else final)
        for q in QUANTITIES:
            c[q].append([np.nan if at.get(s, {}).get(q) is None else at[s][q] for s in steps])
    return {norm: {k: np.asarray(v, dtype=np.float64) if k in QUANTITIES else v
                   for k, v in c.items()} for norm, c in out.items()}


def analyze(rows: list[dict], config) -> dict:
    steps = checkpoints(config)
    curves = unit_curves(rows, steps)
    norms = [n for n in config.norms if n in curves]
    summary: dict = {"norms": norms, "steps": steps, "variants": {}, "curves": {}}
    for norm in norms:
        c = curves[norm]
        v = {"n": len(c["seeds"]), "diverged": int(sum(c["diverged"])),
             "final_test_acc": mean_interval(c["test_acc"]).to_dict()}
        for q in QUANTITIES:
            v[q] = _after_start(c[q])
        summary["variants"][norm] = v
        summary["curves"][norm] = {q: band(c[q], log=True) for q in QUANTITIES}
    return summary


def _after_start(curves: np.ndarray) -> dict | None:
    """Each seed's mean over the checkpoints after step 0 (those before a divergence), then
    the mean and interval over the seeds that have any; None if none has."""
    later = curves[:, 1:]
    has = ~np.isnan(later).all(axis=1)
    if not has.any():
        return None
    return mean_interval(np.nanmean(later[has], axis=1)).to_dict()


def _word(low: dict, high: dict) -> str:
    """How firmly ``low`` lies below ``high``."""
    if low["mean"] >= high["mean"]:
        return "NOT smaller"
    if low["n"] < 2 or high["n"] < 2:
        return "smaller (a single seed: no interval)"
    return "smaller, intervals apart" if low["high"] < high["low"] else "smaller, intervals overlap"


def measured(summary: dict) -> list[str]:
    v, lines = summary["variants"], []
    pairs = [(name, v["bn"][q], v["none"][q]) for q, name in QUANTITIES.items()
             if "none" in v and "bn" in v and v["bn"][q] and v["none"][q]]
    if pairs:
        lines.append("Mean over checkpoints after step 0, BN vs plain: " + "; ".join(
            f"{name} {b['mean']:#.3g} vs {p['mean']:#.3g} ({_word(b, p)})" for name, b, p in pairs)
            + f" (n={pairs[0][1]['n']}, {pairs[0][2]['n']}).")
    accuracy = [f"{label(n)} {v[n]['final_test_acc']['mean']:.2%} (n={v[n]['n']})"
                for n in summary["norms"]]
    lines.append("Final test accuracy: " + ", ".join(accuracy) + ".")
    lines += [f"{label(n)}: {v[n]['diverged']} of {v[n]['n']} runs diverged; their test accuracy "
              "counts at chance." for n in summary["norms"] if v[n]["diverged"]]
    return lines


def tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    header = (["variant", "n", "final test acc [95% CI]"]
              + [f"{name} (after step 0)" for name in QUANTITIES.values()] + ["diverged"])
    cell = lambda d: "-" if d is None else format_interval(d, digits=4, show_n=False)  # noqa: E731
    rows = [[label(n), v["n"], format_interval(v["final_test_acc"], pct=True, show_n=False)]
            + [cell(v[q]) for q in QUANTITIES] + [v["diverged"]]
            for n, v in ((n, summary["variants"][n]) for n in summary["norms"])]
    return [(header, rows)]


def plot_quantity(summary: dict, quantity: str, ax=None):
    """One quantity per checkpoint and variant: geometric mean over seeds, 95% interval."""
    ax = ax if ax is not None else new_figure()[1][0]
    for norm in summary["norms"]:
        plot_mean_band(summary["curves"][norm][quantity], x=summary["steps"], ax=ax,
                       label=label(norm), color=color(norm))
    ax.set_yscale("log"), ax.set_xlabel("training step"), ax.set_ylabel(QUANTITIES[quantity])
    readable_log_axis(ax)
    ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=8)
    return ax


def figures(summary: dict) -> dict:
    fig, axes = new_figure(3, width=14, height=4.2, sharex=True)
    for ax, q in zip(axes, QUANTITIES):
        plot_quantity(summary, q, ax)
    fig.suptitle("Along the gradient direction, on the next training batch: geometric mean over "
                 "seeds, 95% interval")
    return {"smoothness": fig}
