"""``noise``: how far do mini-batch statistics stray from the whole training set's?"""

import numpy as np
from matplotlib import colormaps

from ..figures import new_figure, plot_mean_band, readable_log_axis
from ..stats import band, format_interval, mean_interval

TITLE = "noise: the true mean vs the mini-batch mean"
EXPECTED = ("The standard error of mu_B is sigma/sqrt(m): log-log slope -1/2 (bending down as m "
            "nears the set size, sampling without replacement); var_B's relative error falls the "
            "same way; one example's x_hat moves by about 1/sqrt(m) between batches; most x_hat "
            "lies in [-3, 3] (at least 8/9 by Chebyshev).")
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

    return {"sets": sets, "batch_sizes": sizes, "near_m": near,
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


def measured(summary: dict) -> list[str]:
    slopes = [summary["slopes"][name]["mean_err"]["mean"] for name in summary["sets"]]
    lines = [f"Slope of mu_B's error against m for the raw inputs: "
             f"{format_interval(summary['slopes']['inputs']['mean_err'])} (theory -0.5).",
             f"The same slope for all {len(slopes)} feature sets (mean over seeds): "
             f"{min(slopes):+.3f} to {max(slopes):+.3f}."]
    if summary.get("diverged"):
        lines.append(f"{summary['diverged']} of {summary['seeds']} seeds diverged in training "
                     "(non-finite loss); their trained sets are left out.")
    if (ex := summary["example"]) is not None:
        lines.append(f"The seed's '10.1 vs 9.9', in the data's units: feature {ex['feature']} has "
                     f"population mean {ex['population_mean']:.2f}; two random mini-batches of "
                     f"{ex['m']} gave {ex['batch_means'][0]:.2f} and {ex['batch_means'][1]:.2f}.")
    return lines


def tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    slopes = [[name] + [format_interval(summary["slopes"][name][k]) for k in KEYS]
              + [summary["near_m"], format_interval(summary["within3"][name], pct=True)]
              for name in summary["sets"]]
    per_m = [[m, f"{theory:.3f}"] + [format_interval(summary["inputs"][k][j], pct=k == "within3")
                                     for k in PER_M]
             for j, (m, theory) in enumerate(zip(summary["batch_sizes"], summary["theory"]))]
    return [(["features", "slope mu_B error", "slope var_B rel. error", "slope probe x_hat SD",
              "m", "share of x_hat in [-3, 3]"], slopes),
            (["m (raw inputs)", "theory sigma/sqrt(m)", "RMS error of mu_B (SDs)",
              "SD of the probe's x_hat", "share of x_hat in [-3, 3]"], per_m)]


def plot_noise(summary: dict, key: str, ax=None):
    """One quantity against m, log-log, one line per feature set; the theory with mean_err."""
    ax = ax if ax is not None else new_figure()[1][0]
    names, m = summary["sets"], summary["batch_sizes"]
    for i, name in enumerate(names):
        plot_mean_band(summary["curves"][name][key], x=m, ax=ax,
                       color=colormaps["viridis"](i / max(len(names) - 1, 1)),
                       label=f"{name}: slope {summary['slopes'][name][key]['mean']:+.2f}")
    if key == "mean_err":
        ax.plot(m, summary["theory"], "k:", label="theory sigma/sqrt(m), finite population")
    ax.set_xscale("log", base=2), ax.set_yscale("log")
    readable_log_axis(ax, "x"), readable_log_axis(ax, "y")
    ax.set_xlabel("batch size m"), ax.set_ylabel(KEYS[key]), ax.grid(alpha=0.3, which="both")
    return ax


def figures(summary: dict) -> dict:
    fig, axes = new_figure(3, width=15, height=4.5)
    for ax, key in zip(axes, KEYS):
        plot_noise(summary, key, ax).legend(fontsize=6)
    fig.suptitle("Mini-batch statistics against the whole training set's (mean over seeds, 95% "
                 "interval)")
    return {"noise": fig}
