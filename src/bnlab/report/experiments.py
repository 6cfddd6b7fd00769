"""Figures, numbers and the expected-vs-measured statement of each named experiment, from
its ``results.json`` alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np

from .figures import COLORS, LABELS, plot_band
from .stats import first_reaching, format_interval, mean_interval

__all__ = ["EXPECTED", "SECTIONS", "Section"]


@dataclass
class Section:
    title: str
    expected: str
    measured: list[str]
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)  # (header, rows)
    figures: dict[str, plt.Figure] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


EXPECTED = {
    "noise": "The standard error of mu_B is sigma/sqrt(m): log-log slope -1/2 (bending down as m "
             "nears the set size, sampling without replacement); var_B's relative error falls the "
             "same way; one example's x_hat moves by about 1/sqrt(m) between batches; most x_hat "
             "lies in [-3, 3] (at least 8/9 by Chebyshev).",
    "ics": "Ioffe & Szegedy (2015), Figure 1: with BN, test accuracy rises faster and ends higher; "
           "without BN the 15/50/85th percentiles of a last-layer sigmoid's input drift in mean "
           "and spread over training, with BN they stay put.",
    "regularization": "The seed and Ioffe & Szegedy (2015, 3.4): batch-statistic noise regularizes, "
                      "so BN narrows the train-test gap and raises test accuracy on a small training "
                      "set; smaller ghost batches add noise (Hoffer et al. 2017); BN without batch "
                      "noise keeps less of the gain.",
    "init-sweep": "Deep Learning from Scratch 6.3: the BN network learns at nearly every initial "
                  "weight scale in logspace(0, -4, 16); the plain network only in a narrow band.",
    "lr-sweep": "Ioffe & Szegedy (2015, 3.3), Santurkar et al. (2018): BN tolerates larger learning "
                "rates and reaches a threshold accuracy in fewer steps; plain networks stall or "
                "diverge where BN trains.",
    "smoothness": "Santurkar et al. (2018): along the gradient, BN's loss varies over a narrower "
                  "range, its gradients change less and its effective beta-smoothness is smaller; "
                  "noisy BN (random shifts and scales after BN) trains about as well as BN.",
}


def _ci(values, pct: bool = False, clip: bool | None = None) -> str:
    return format_interval(mean_interval(values), pct=pct, clip=clip)


# -- noise --------------------------------------------------------------------------------
def noise_section(r: dict) -> Section:
    seeds = r["seeds"]
    names = list(seeds[0]["sets"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    keys = [("mean_err", "RMS error of mu_B (population SDs)"),
            ("var_rel_err", "RMS relative error of var_B"),
            ("probe_xhat_sd", "SD of one example's x_hat across batches")]
    cmap = plt.get_cmap("viridis")
    for ax, (key, label) in zip(axes, keys):
        for i, name in enumerate(names):
            m = [row["m"] for row in seeds[0]["sets"][name]["rows"]]
            curves = np.array([[row[key] for row in s["sets"][name]["rows"]] for s in seeds])
            slope = np.mean([s["sets"][name]["slopes"][key] for s in seeds])
            plot_band(curves, x=np.array(m), ax=ax, color=cmap(i / max(len(names) - 1, 1)),
                      label=f"{name}: slope {slope:+.2f}", log=True)
        if key == "mean_err":
            rows = seeds[0]["sets"]["inputs"]["rows"]
            ax.plot([row["m"] for row in rows], [row["mean_err_theory"] for row in rows], "k:",
                    label="theory sigma/sqrt(m), finite population")
        ax.set_xscale("log", base=2), ax.set_yscale("log")
        ax.set_xlabel("batch size m"), ax.set_ylabel(label), ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=6)
    fig.suptitle("Mini-batch statistics against the full training set's")
    rows, measured = [], []
    for name in names:
        sl = {k: [s["sets"][name]["slopes"][k] for s in seeds] for k, _ in keys}
        near60 = min(seeds[0]["sets"][name]["rows"], key=lambda row: abs(row["m"] - 64))
        w3 = [next(row["within3"] for row in s["sets"][name]["rows"] if row["m"] == near60["m"]) for s in seeds]
        rows.append([name, _ci(sl["mean_err"]), _ci(sl["var_rel_err"]), _ci(sl["probe_xhat_sd"]),
                     f"{near60['m']}", _ci(w3, pct=True)])
    inputs = [s["sets"]["inputs"]["slopes"]["mean_err"] for s in seeds]
    measured.append(f"Slope of mu_B's error against m for the raw inputs: {_ci(inputs)} (theory -0.5).")
    ex = seeds[0]["example"]
    measured.append(f"The seed's '10.1 vs 9.9', in the data's units: feature {ex['feature']} has population "
                    f"mean {ex['population_mean']:.2f}; two random mini-batches of {ex['m']} gave "
                    f"{ex['batch_means'][0]:.2f} and {ex['batch_means'][1]:.2f}.")
    per_m = []
    for j, row in enumerate(seeds[0]["sets"]["inputs"]["rows"]):
        per_m.append([str(row["m"]), f"{row['mean_err_theory']:.3f}"]
                     + [_ci([s["sets"]["inputs"]["rows"][j][k] for s in seeds])
                        for k in ("mean_err", "probe_xhat_sd")]
                     + [_ci([s["sets"]["inputs"]["rows"][j]["within3"] for s in seeds], pct=True)])
    return Section("noise: the true mean vs the mini-batch mean", EXPECTED["noise"], measured,
                   [(["features", "slope mu_B error", "slope var_B rel. error", "slope probe x_hat SD",
                      "m", "share of x_hat in [-3, 3]"], rows),
                    (["m (raw inputs)", "theory sigma/sqrt(m)", "RMS error of mu_B (SDs)",
                      "SD of the probe's x_hat", "share of x_hat in [-3, 3]"], per_m)], {"noise": fig},
                   {"input_mean_err_slope": mean_interval(inputs).to_dict()})


# -- ics ----------------------------------------------------------------------------------
def ics_section(r: dict) -> Section:
    runs = r["runs"]
    norms = list(dict.fromkeys(run["norm"] for run in runs))
    fig, axes = plt.subplots(1, 1 + len(norms), figsize=(5 * (1 + len(norms)), 4))
    steps = np.array(runs[0]["steps"])
    for norm in norms:
        acc = np.array([run["test_acc"] for run in runs if run["norm"] == norm])
        plot_band(acc, x=steps, ax=axes[0], label=LABELS.get(norm, norm), color=COLORS.get(norm))
    axes[0].set_xlabel("training step"), axes[0].set_ylabel("test accuracy"), axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3), axes[0].set_title("(a) test accuracy")
    drift_rows, drift = [], {}
    early = sorted({0, len(steps) // 5 - 1, len(steps) - 1} - {-1})  # first, a fifth, last evaluation
    for ax, norm in zip(axes[1:], norms):
        run0 = next(run for run in runs if run["norm"] == norm)
        p = np.array(run0["percentiles"])[0]  # neuron 0: (evals, 3)
        for j, q in enumerate(r["percentiles"]):
            ax.plot(steps, p[:, j], color=COLORS.get(norm), linestyle=["--", "-", ":"][j],
                    label=f"{round(q * 100)}th")
        ax.set_title(f"({'bc'[norms.index(norm)] if norms.index(norm) < 2 else norm}) {LABELS.get(norm, norm)}: "
                     "one sigmoid's input")
        ax.set_xlabel("training step"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
        # drift over all neurons: how far the median and the 15-85 spread wander over training
        # (max - min over evaluations), in units of the neuron's mean 15-85 spread
        med, spread = [], []
        for run in (x for x in runs if x["norm"] == norm):
            pc = np.array(run["percentiles"])  # (neurons, evals, 3)
            width = pc[:, :, 2] - pc[:, :, 0]
            unit = np.maximum(width.mean(axis=1), 1e-12)
            med.append((np.ptp(pc[:, :, 1], axis=1) / unit).mean())
            spread.append((np.ptp(width, axis=1) / unit).mean())
        drift[norm] = float(np.mean(med))
        accs = np.array([run["test_acc"] for run in runs if run["norm"] == norm])
        drift_rows.append([LABELS.get(norm, norm)] + [_ci(accs[:, i], pct=True) for i in early]
                          + [_ci(med), _ci(spread)])
    axes[1].set_ylabel("input to the sigmoid")
    measured = [f"Test accuracy after {steps[0]} and {steps[-1]} steps: " + "; ".join(
        f"{row[0]} {row[1]} and {row[len(early)]}" for row in drift_rows) + "."]
    if "none" in drift and "bn" in drift and drift["bn"] > 0:
        measured.append(f"Drift of a sigmoid's median input over training, in units of its 15-85 "
                        f"spread (mean over the last layer's sigmoids): plain {drift['none']:.3f} vs BN "
                        f"{drift['bn']:.3f}, {drift['none'] / drift['bn']:.1f}x.")
    return Section("ics: Ioffe & Szegedy's Figure 1", EXPECTED["ics"], measured,
                   [(["variant"] + [f"test acc after {steps[i]} steps" for i in early]
                     + ["median drift (in spreads)", "spread drift (in spreads)"], drift_rows)],
                   {"ics": fig}, {"median_drift": drift})


# -- regularization -----------------------------------------------------------------------
def regularization_section(r: dict) -> Section:
    variants = r["variants"]
    final = {v: [run["curve"][-1] for run in r["runs"] if run["variant"] == v] for v in variants}
    rows = []
    for v in variants:
        f = final[v]
        rows.append([v, _ci([x["train_acc"] for x in f], pct=True), _ci([x["test_acc"] for x in f], pct=True),
                     _ci([x["train_acc"] - x["test_acc"] for x in f], pct=True, clip=False),
                     _ci([x["test_loss"] - x["train_loss"] for x in f])])
    test = {v: np.mean([x["test_acc"] for x in final[v]]) for v in variants}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ghosts = [v for v in variants if v.startswith("ghost-")]
    shade = plt.get_cmap("YlOrBr")  # ghost sizes as one graded family, apart from the rest
    colors = {v: COLORS.get(v, "#17becf") for v in variants}
    colors.update({g: shade(0.35 + 0.6 * i / max(len(ghosts) - 1, 1)) for i, g in enumerate(ghosts)})
    for v in variants:
        curves = np.array([[c["test_acc"] for c in run["curve"]] for run in r["runs"] if run["variant"] == v])
        plot_band(curves, ax=axes[0], label=v, color=colors[v], band=False)
    axes[0].set_xlabel("epoch"), axes[0].set_ylabel("test accuracy"), axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    gaps = [mean_interval([x["train_acc"] - x["test_acc"] for x in final[v]]) for v in variants]
    axes[1].bar(range(len(variants)), [g.mean for g in gaps],
                yerr=[[g.mean - g.low for g in gaps], [g.high - g.mean for g in gaps]],
                color=[colors[v] for v in variants])
    axes[1].set_xticks(range(len(variants)), variants, rotation=30, fontsize=8)
    axes[1].set_ylabel("train - test accuracy (final)"), axes[1].grid(alpha=0.3, axis="y")
    fig.suptitle(f"Training on {r['n_train']} examples")
    gap = {v: np.mean([x["train_acc"] - x["test_acc"] for x in final[v]]) for v in variants}
    measured = [f"Final test accuracy: plain {test['none'] * 100:.2f}%, BN {test['bn'] * 100:.2f}%, "
                f"full-batch BN (no batch noise) {test['full-batch-bn'] * 100:.2f}%, population BN "
                f"(no noise, no gradient through the statistics) {test['population-bn'] * 100:.2f}%.",
                f"Train - test gap: plain {gap['none'] * 100:.2f}, BN {gap['bn'] * 100:.2f}, full-batch BN "
                f"{gap['full-batch-bn'] * 100:.2f} points."]
    if ghosts:
        best = max(ghosts, key=lambda v: test[v])
        measured.append(f"Best ghost batch: {best} at {test[best] * 100:.2f}% test accuracy; the "
                        f"smallest, {ghosts[0]}, {test[ghosts[0]] * 100:.2f}%.")
    gain = test["bn"] - test["none"]
    share = None
    if gain > 1e-9:
        share = (test["bn"] - test["full-batch-bn"]) / gain
        measured.append(f"Share of BN's test-accuracy gain over plain ({gain * 100:+.2f} points) that "
                        f"the batch noise explains, (BN - full-batch BN) / (BN - plain): {share * 100:.0f}%.")
    else:
        measured.append(f"BN did not beat plain on test accuracy ({gain * 100:+.2f} points), so there "
                        "is no gain for the noise to explain.")
    return Section("regularization: is the noise medicine?", EXPECTED["regularization"], measured,
                   [(["variant", "train acc", "test acc", "gap (acc)", "gap (loss)"], rows)],
                   {"regularization": fig}, {"noise_share": share, "final_test_acc": test})


# -- sweeps -------------------------------------------------------------------------------
def _by(runs: list[dict], key: str) -> dict:
    out: dict = {}
    for run in runs:
        out.setdefault(run[key], {}).setdefault(run["norm"], []).append(run)
    return out


def init_sweep_section(r: dict, threshold: float) -> Section:
    grid = _by(r["runs"], "init_scale")
    scales = list(grid)
    cols = 4
    fig, axes = plt.subplots(int(np.ceil(len(scales) / cols)), cols, figsize=(12, 2.4 * np.ceil(len(scales) / cols)),
                             squeeze=False, sharey=True)
    learns = {"none": [], "bn": []}
    for ax, scale in zip(axes.flat, scales):
        for norm in ("bn", "none"):
            curves = np.array([run["acc"] for run in grid[scale][norm]])
            plot_band(curves, ax=ax, color=COLORS[norm], linestyle="-" if norm == "bn" else "--",
                      label=LABELS[norm] if scale == scales[0] else None)
            if curves[:, -1].mean() >= threshold:
                learns[norm].append(scale)
        ax.set_title(f"std {scale:.2g}", fontsize=9), ax.set_ylim(0, 1), ax.grid(alpha=0.3)
    for ax in axes.flat[len(scales):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.supxlabel("epoch"), fig.supylabel("training accuracy")
    rows = [[f"{s:.3g}"] + [_ci([run["acc"][-1] for run in grid[s][n]], pct=True) for n in ("none", "bn")]
            for s in scales]
    measured = [f"Final training accuracy >= {threshold:.0%} at {len(learns['bn'])} of {len(scales)} scales "
                f"with BN and {len(learns['none'])} of {len(scales)} without. Plain learns at: "
                + (", ".join(f"{s:.3g}" for s in learns["none"]) or "none") + "."]
    return Section("init-sweep: initial weight scale", EXPECTED["init-sweep"], measured,
                   [(["weight std", "plain final train acc", "BN final train acc"], rows)],
                   {"init_sweep": fig}, {"learns": learns})


def lr_sweep_section(r: dict, threshold: float) -> Section:
    grid = _by(r["runs"], "lr")
    lrs = sorted(grid)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    rows, reach, missed = [], {"none": [], "bn": []}, {}
    for norm in ("none", "bn"):
        finals = [mean_interval([run["acc"][-1] for run in grid[lr][norm]]) for lr in lrs]
        axes[0].errorbar(lrs, [f.mean for f in finals], yerr=[[f.mean - f.low for f in finals],
                         [f.high - f.mean for f in finals]], color=COLORS[norm], label=LABELS[norm], marker="o")
        for lr in lrs:
            runs = grid[lr][norm]
            hit = [first_reaching(run["acc"], threshold) for run in runs]
            steps = [h * r["steps_per_epoch"] for h in hit if h is not None]
            reach[norm].append(np.mean(steps) if len(steps) == len(runs) else np.nan)
            missed.setdefault(lr, {})[norm] = (len(runs) - len(steps), len(runs))
        axes[1].plot(lrs, reach[norm], color=COLORS[norm], marker="o", label=LABELS[norm])
    for ax in axes:
        ax.set_xscale("log"), ax.set_xlabel("learning rate"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    axes[0].set_ylabel("final test accuracy"), axes[1].set_ylabel(f"steps to {threshold:.0%} test accuracy")
    for i, lr in enumerate(lrs):
        rows.append([f"{lr:.3g}"] + [_ci([run["acc"][-1] for run in grid[lr][n]], pct=True) for n in ("none", "bn")]
                    + [f"not reached by {missed[lr][n][0]} of {missed[lr][n][1]}" if np.isnan(reach[n][i])
                       else f"{reach[n][i]:.0f}" for n in ("none", "bn")])
    ok = {n: [lr for lr, s in zip(lrs, reach[n]) if not np.isnan(s)] for n in ("none", "bn")}
    measured = [f"Every seed reached {threshold:.0%} test accuracy at {len(ok['bn'])} of {len(lrs)} "
                f"learning rates with BN and {len(ok['none'])} without."]
    both = [i for i in range(len(lrs)) if not np.isnan(reach["none"][i]) and not np.isnan(reach["bn"][i])]
    if both:
        ratio = np.mean([reach["none"][i] / reach["bn"][i] for i in both])
        measured.append(f"Where both reach it, plain needs {ratio:.1f}x the steps of BN on average.")
    return Section("lr-sweep: learning rate", EXPECTED["lr-sweep"], measured,
                   [(["lr", "plain final test acc", "BN final test acc", "plain steps to threshold",
                      "BN steps to threshold"], rows)], {"lr_sweep": fig}, {"reaches": ok})


def smoothness_section(r: dict) -> Section:
    variants = r["variants"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    keys = [("loss_range", "loss range along -g"), ("grad_change", "max ||g_eta - g||"),
            ("beta", "effective beta-smoothness")]
    rows, means = [], {}
    for v in variants:
        runs = [run for run in r["runs"] if run["variant"] == v]
        steps = np.array([c["step"] for c in runs[0]["checks"]])
        row = [LABELS.get(v, v), _ci([run["test_acc"] for run in runs], pct=True)]
        for ax, (key, label) in zip(axes, keys):
            curves = np.array([[c[key] for c in run["checks"]] for run in runs])
            plot_band(curves, x=steps, ax=ax, label=LABELS.get(v, v), color=COLORS.get(v, "#2ca02c"),
                      log=True)
            ax.set_yscale("log"), ax.set_xlabel("training step"), ax.set_ylabel(label), ax.grid(alpha=0.3)
            later = curves[:, 1:] if curves.shape[1] > 1 else curves  # after the first step
            row.append(_ci(later.mean(axis=1)))
            means.setdefault(v, {})[key] = float(later.mean())
        rows.append(row)
    axes[0].legend(fontsize=8)
    fig.suptitle("Along the gradient direction: geometric mean over seeds, 95% interval")
    measured = []
    if "none" in means and "bn" in means:
        measured.append("Mean over checkpoints after step 0, plain vs BN: " + "; ".join(
            f"{label} {means['none'][k]:.3g} vs {means['bn'][k]:.3g}" for k, label in keys) + ".")
    acc = {v: np.mean([run["test_acc"] for run in r["runs"] if run["variant"] == v]) for v in variants}
    measured.append("Final test accuracy: " + ", ".join(f"{LABELS.get(v, v)} {acc[v] * 100:.2f}%" for v in variants) + ".")
    return Section("smoothness: the loss landscape along the gradient", EXPECTED["smoothness"], measured,
                   [(["variant", "final test acc"] + [label for _, label in keys], rows)],
                   {"smoothness": fig}, {"means": means, "test_acc": acc})


SECTIONS: dict[str, Callable[[dict], Section]] = {
    "noise": noise_section,
    "ics": ics_section,
    "regularization": regularization_section,
    "init-sweep": lambda r: init_sweep_section(r, r["config"]["learned_threshold"]),
    "lr-sweep": lambda r: lr_sweep_section(r, r["config"]["threshold"]),
    "smoothness": smoothness_section,
}
