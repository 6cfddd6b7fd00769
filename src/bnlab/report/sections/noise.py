"""``noise``: how far do mini-batch statistics stray from the whole training set's?"""

import numpy as np
from matplotlib import colormaps
from matplotlib.ticker import NullLocator

from ..figures import new_figure, plot_mean_band, readable_log_axis
from ..stats import band, format_interval, mean_interval

TITLE = "noise: the true mean vs the mini-batch mean"
EXPECTED = ("The standard error of mu_B is sigma/sqrt(m): log-log slope -1/2 (bending down as m "
            "nears the set size, sampling without replacement); var_B's relative error is "
            "about sqrt((kurtosis - 1)/m), slope -1/2 too once m is large against the "
            "feature's kurtosis (heavy-tailed features bend away from it at small m); one "
            "example's x_hat moves by about 1/sqrt(m) between batches; most x_hat lies in "
            "[-3, 3] (at least 8/9 by Chebyshev).")
THEORY = -0.5  # log-log slope of an error falling as 1/sqrt(m)
KEYS = {"mean_err": "RMS error of mu_B (population SDs)",
        "var_rel_err": "RMS relative error of var_B",
        "probe_xhat_sd": "SD of one example's x_hat across batches"}
PER_M = ("mean_err", "probe_xhat_sd", "within3")  # the raw inputs' table, per batch size


def fit_slope(m, err) -> float:
    """Least-squares slope of log(err) against log(m): -1/2 for err ~ 1/sqrt(m)."""
    return float(np.polyfit(np.log(np.asarray(m, float)), np.log(np.asarray(err, float)), 1)[0])


def analyze(rows: list[dict], config) -> dict:
    seeds, sizes = sorted({r["seed"] for r in rows}), list(config.batch_sizes)
    sets = list(dict.fromkeys(r["set"] for r in rows if "set" in r))  # in the order measured
    at = {(r["set"], r["seed"], r["m"]): r for r in rows if "set" in r}
    near = min(sizes, key=lambda m: abs(m - 64))  # the table's m for the share in [-3, 3]
    ex = min((r for r in rows if "feature" in r), key=lambda r: r["seed"], default=None)

    def values(name: str, key: str) -> np.ndarray:  # (seeds, sizes); a diverged seed has no trained sets
        have = [s for s in seeds if (name, s, sizes[0]) in at]
        return np.array([[at[name, s, m][key] for m in sizes] for s in have], dtype=np.float64)

    upper = sizes[len(sizes) // 2:]  # the larger half of the sizes: var_B's slope away from small m
    tail = [fit_slope(upper, v[len(sizes) // 2:]) for v in values("inputs", "var_rel_err")
            ] if len(upper) >= 2 else []
    return {"sets": sets, "batch_sizes": sizes, "near_m": near,
            "var_tail": {"from_m": upper[0], "slope": mean_interval(tail).to_dict()}
            if len(upper) >= 2 else None,
            "diverged": sum(1 for r in rows if r.get("diverged")), "seeds": len(seeds),
            "slopes": {n: {k: mean_interval([fit_slope(sizes, v) for v in values(n, k)]).to_dict()
                           for k in KEYS} for n in sets},
            "theory": values("inputs", "mean_err_theory")[0].tolist(),
            "curves": {n: {k: band(values(n, k), log=True) for k in KEYS} for n in sets},
            "within3": {n: mean_interval(values(n, "within3")[:, sizes.index(near)]).to_dict()
                        for n in sets},
            "inputs": {k: [mean_interval(v).to_dict() for v in values("inputs", k).T]
                       for k in PER_M},
            "example": ex and {k: ex[k]
                               for k in ("feature", "population_mean", "batch_means", "m")}}


def _against_theory(iv: dict) -> str:
    """How a slope's interval stands to -0.5, at the three decimals shown."""
    if iv["n"] < 2:
        return "one seed: no interval"
    low, high = round(iv["low"], 3), round(iv["high"], 3)
    if low <= THEORY <= high:
        return "its interval holds -0.5"
    return f"{'shallower' if low > THEORY else 'steeper'} than -0.5: its interval lies " + (
        "above" if low > THEORY else "below")


def verdict(summary: dict) -> list[str]:
    """Both slopes of the raw inputs against what theory predicts."""
    mean, var = summary["slopes"]["inputs"]["mean_err"], summary["slopes"]["inputs"]["var_rel_err"]
    line = (f"Slopes against m for the raw inputs (theory: -0.5 for both): mu_B's error "
            f"{format_interval(mean, show_n=False)} ({_against_theory(mean)}); var_B's relative "
            f"error {format_interval(var, show_n=False)} ({_against_theory(var)})")
    if (tail := summary.get("var_tail")) is not None:
        line += (f", and {format_interval(tail['slope'], show_n=False)} for m >= "
                 f"{tail['from_m']} ({_against_theory(tail['slope'])})")
    return [line + f" (n={mean['n']} seed{'' if mean['n'] == 1 else 's'})."]


def measured(summary: dict) -> list[str]:
    lines = verdict(summary)
    for key, what in (("mean_err", "mu_B's error"), ("var_rel_err", "var_B's relative error")):
        slopes = [summary["slopes"][name][key]["mean"] for name in summary["sets"]]
        lines.append(f"The slope of {what} for all {len(slopes)} feature sets (mean over "
                     f"seeds): {min(slopes):+.3f} to {max(slopes):+.3f}.")
    if summary.get("diverged"):
        lines.append(f"{summary['diverged']} of {summary['seeds']} seeds diverged in training "
                     "(non-finite loss); their trained sets are left out.")
    if (ex := summary["example"]) is not None:
        lines.append(f"The article's '10.1 vs 9.9', in the data's units: feature {ex['feature']} has "
                     f"population mean {ex['population_mean']:.2f}; two random mini-batches of "
                     f"{ex['m']} gave {ex['batch_means'][0]:.2f} and {ex['batch_means'][1]:.2f}.")
    return lines


def tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    cell = lambda d, pct=False: format_interval(d, pct=pct, show_n=False)  # noqa: E731
    n = summary["slopes"][summary["sets"][0]]["mean_err"]["n"] if summary["sets"] else 0
    slopes = [[name, n] + [cell(summary["slopes"][name][k]) for k in KEYS]
              + [cell(summary["within3"][name], pct=True)] for name in summary["sets"]]
    per_m = [[m, n, f"{theory:.3f}"] + [cell(summary["inputs"][k][j], pct=k == "within3")
                                        for k in PER_M]
             for j, (m, theory) in enumerate(zip(summary["batch_sizes"], summary["theory"]))]
    return [(["features", "n", "slope mu_B error", "slope var_B rel. error",
              "slope probe x_hat SD", f"share of x_hat in [-3, 3] at m={summary['near_m']}"],
             slopes),
            (["m (raw inputs)", "n", "theory sigma/sqrt(m)", "RMS error of mu_B (SDs)",
              "SD of the probe's x_hat", "share of x_hat in [-3, 3]"], per_m)]


def plot_noise(summary: dict, key: str, ax=None, legend: bool = True):
    """One quantity against m, log-log, one line per feature set; the theory with mean_err."""
    ax = ax if ax is not None else new_figure()[1][0]
    names, m = summary["sets"], summary["batch_sizes"]
    for i, name in enumerate(names):
        plot_mean_band(summary["curves"][name][key], x=m, ax=ax,
                       color=colormaps["viridis"](i / max(len(names) - 1, 1)), label=name)
    if key == "mean_err":
        ax.plot(m, summary["theory"], "k:", label="theory sigma/sqrt(m), finite population")
    ax.set_xscale("log", base=2), ax.set_yscale("log")
    readable_log_axis(ax, "y")
    ax.set_xticks(m, [str(v) for v in m])  # every m measured, 2 included
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("batch size m"), ax.set_ylabel(KEYS[key]), ax.grid(alpha=0.3, which="both")
    if legend:
        ax.legend(fontsize=9)
    return ax


def figures(summary: dict) -> dict:
    fig, axes = new_figure(2, 2, width=10, height=8)
    for ax, key in zip(axes, KEYS):
        plot_noise(summary, key, ax, legend=False)
        if summary["sets"]:
            ax.set_title(f"raw inputs: slope {summary['slopes']['inputs'][key]['mean']:+.2f}"
                         if "inputs" in summary["slopes"] else "", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[3].axis("off")
    axes[3].legend(handles, labels, loc="center", fontsize=10, title="feature set (n=seeds)",
                   title_fontsize=10)
    fig.suptitle("Mini-batch statistics against the whole training set's: mean over seeds, "
                 "95% interval", fontsize=11)
    return {"noise": fig}
