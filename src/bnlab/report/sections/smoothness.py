"""``smoothness``: is the loss landscape along the gradient smoother with BN?"""

import numpy as np

from ..figures import color, label, log_axis, new_figure, plot_mean_band
from ..stats import band, format_interval, mean_interval
from .compare import seeds_per_arm

TITLE = "smoothness: the loss landscape along the gradient"
EXPECTED = ("Santurkar et al. (2018, Figures 4 and 7): along the gradient, BN's loss varies over "
            "a narrower range, its gradients change less and its effective beta-smoothness is "
            "smaller; noisy BN (random shifts and scales after BN) trains about as well as BN.")
QUANTITIES = {"loss_range": "loss range along -g", "grad_change": "max ||g_eta - g||",
              "beta": "effective beta-smoothness"}
CHANCE = 0.1  # a diverged run's test accuracy (every bnlab dataset has 10 classes)


def analyze(rows: list[dict], config) -> dict:
    """Per variant, each quantity's mean over the checkpoints after step 0 per seed, then the
    mean and interval over seeds (None if no seed has one); a diverged seed's checkpoints
    after its divergence are left out, its test accuracy counts at chance."""
    steps = sorted(set(range(0, config.steps + 1, config.eval_every)) | {config.steps})
    runs: dict = {}  # {norm: {unit: {step or "diverged": row}}}, units in seed order
    for r in sorted(rows, key=lambda r: r["seed"]):
        runs.setdefault(r["norm"], {}).setdefault(r["unit"], {})[
            "diverged" if r.get("diverged") else r["step"]] = r
    norms = [n for n in config.norms if n in runs]
    summary: dict = {"norms": norms, "steps": steps, "variants": {}, "curves": {}}
    for norm in norms:
        at = list(runs[norm].values())
        acc = np.array([a.get(steps[-1], {}).get("test_acc") for a in at], dtype=np.float64)
        curves = {q: np.array([[a.get(s, {}).get(q) for s in steps] for a in at], dtype=np.float64)
                  for q in QUANTITIES}  # None (absent or not finite) -> NaN
        later = {q: c[~np.isnan(c[:, 1:]).all(axis=1), 1:] for q, c in curves.items()}
        summary["variants"][norm] = {
            "n": len(at), "diverged": sum("diverged" in a for a in at),
            "final_test_acc": mean_interval(np.where(np.isnan(acc), CHANCE, acc)).to_dict(),
            **{q: mean_interval(np.nanmean(v, axis=1)).to_dict() if len(v) else None
               for q, v in later.items()}}
        summary["curves"][norm] = {q: band(c, log=True) for q, c in curves.items()}
    return summary


def _word(low: dict, high: dict) -> str:
    """How firmly ``low`` lies below ``high``."""
    if low["mean"] >= high["mean"]:
        return "NOT smaller"
    if min(low["n"], high["n"]) < 2:
        return "smaller (a single seed: no interval)"
    return "smaller, intervals " + ("apart" if low["high"] < high["low"] else "overlap")


def measured(summary: dict) -> list[str]:
    v, norms = summary["variants"], summary["norms"]
    pairs = [(name, v["bn"][q], v["none"][q]) for q, name in QUANTITIES.items()
             if "none" in v and "bn" in v and v["bn"][q] and v["none"][q]]
    lines = ["Mean over checkpoints after step 0, BN vs plain: " + "; ".join(
        f"{name} {b['mean']:#.3g} vs {p['mean']:#.3g} ({_word(b, p)})" for name, b, p in pairs)
        + f" ({seeds_per_arm(pairs[0][1]['n'], pairs[0][2]['n'])})."] if pairs else []
    lines.append("Final test accuracy: " + ", ".join(
        f"{label(n)} {v[n]['final_test_acc']['mean']:.2%} (n={v[n]['n']})" for n in norms) + ".")
    return lines + [f"{label(n)}: {v[n]['diverged']} of {v[n]['n']} runs diverged; their test "
                    "accuracy counts at chance." for n in norms if v[n]["diverged"]]


def tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    cell = lambda d: "-" if d is None else format_interval(d, digits=4, show_n=False)  # noqa: E731
    return [(["variant", "n", "final test acc [95% CI]"]
             + [f"{name} (after step 0)" for name in QUANTITIES.values()] + ["diverged"],
             [[label(n), v["n"], format_interval(v["final_test_acc"], pct=True, show_n=False)]
              + [cell(v[q]) for q in QUANTITIES] + [v["diverged"]]
              for n, v in ((n, summary["variants"][n]) for n in summary["norms"])])]


def plot_quantity(summary: dict, quantity: str, ax=None):
    """One quantity per checkpoint and variant: geometric mean over seeds, 95% interval."""
    ax = ax if ax is not None else new_figure()[1][0]
    for norm in summary["norms"]:
        plot_mean_band(summary["curves"][norm][quantity], x=summary["steps"], ax=ax,
                       label=label(norm), color=color(norm))
    log_axis(ax), ax.set_xlabel("training step"), ax.set_ylabel(QUANTITIES[quantity])
    ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=8.5)
    return ax


def figures(summary: dict) -> dict:
    fig, axes = new_figure(3, width=10.5, height=4, sharex=True)
    for ax, q in zip(axes, QUANTITIES):
        plot_quantity(summary, q, ax)
    fig.suptitle("Along the gradient direction, on the next training batch: geometric mean over "
                 "seeds, 95% interval")
    return {"smoothness": fig}
