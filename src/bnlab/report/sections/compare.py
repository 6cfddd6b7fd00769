"""``compare``: does BN converge faster and end higher than the plain network?"""

from __future__ import annotations

import numpy as np

from ..figures import color, label, log_axis, new_figure, percent_axis, plot_mean_band
from ..stats import band, first_reaching, format_interval, mean_interval

TITLE = "compare: fully connected vs fully connected + Batch Normalization"
EXPECTED = ("The source article and Ioffe & Szegedy (2015, Figure 1): with BN the network converges "
            "faster (the accuracy the plain network reaches after 100 epochs, BN reaches in "
            "20-30: 3.3-5x fewer epochs) and ends at a higher test accuracy.")


def title(summary: dict) -> str:
    """The title; a run of a model of the user's own (``model``) names it."""
    model = summary.get("model")
    return TITLE if model is None else f"compare: the model {model} with each norm"


def expected(summary: dict) -> str:
    return EXPECTED


METRICS = ("train_acc", "test_acc", "train_loss", "test_loss", "sgd_loss")
CHANCE = 0.1  # every bnlab dataset has 10 classes


def epoch_curves(rows: list[dict], epochs: int, by: tuple[str, ...] = ("norm",),
                 need: tuple[str, ...] = ()) -> dict:
    """``{key: {"seeds": [...], "diverged": [...], metric: (n_seeds, epochs)}}`` per value of
    the fields ``by``, units in the order they were recorded (seed by seed). A diverged seed
    keeps its rows up to the divergence; after it, its accuracies are at chance and its losses
    NaN (left out of loss means). A unit that did not diverge must hold every epoch, and every
    row the metrics in ``need``."""
    units: dict = {}
    for r in rows:
        units.setdefault(r["unit"], []).append(r)
    out: dict = {}
    for unit, unit_rows in units.items():
        key = tuple(unit_rows[0][k] for k in by)
        c = out.setdefault(key[0] if len(by) == 1 else key,
                           {"seeds": [], "diverged": [], **{m: [] for m in METRICS}})
        diverged = any(r.get("diverged") for r in unit_rows)
        good = {r["epoch"]: r for r in unit_rows if not r.get("diverged")}
        if not diverged and set(good) != set(range(1, epochs + 1)):
            raise ValueError(f"unit {unit} finished without a row for every epoch")
        if any(r.get(m) is None for r in good.values() for m in need):
            raise KeyError(f"unit {unit}: a row lacks {' or '.join(need)}")
        c["seeds"].append(unit_rows[0]["seed"])
        c["diverged"].append(diverged)
        for m in METRICS:
            fill = CHANCE if m.endswith("acc") else np.nan
            c[m].append([fill if good.get(e, {}).get(m) is None else good[e][m]
                         for e in range(1, epochs + 1)])
    for c in out.values():
        for m in METRICS:
            c[m] = np.asarray(c[m], dtype=np.float64)
    return out


def analyze(rows: list[dict], config) -> dict:
    curves = epoch_curves(rows, config.epochs, need=("train_acc", "test_acc"))
    norms = [n for n in config.norms if n in curves]
    summary: dict = {"norms": norms, "epochs": config.epochs, "variants": {}, "curves": {}}
    if getattr(config, "model", "mlp") != "mlp":  # absent for bnlab's MLP, as in older records
        summary["model"] = config.model
    for norm in norms:
        c = curves[norm]
        test, train = c["test_acc"], c["train_acc"]
        summary["variants"][norm] = {
            "n": len(c["seeds"]), "diverged": int(sum(c["diverged"])),
            "final_test_acc": mean_interval(test[:, -1]).to_dict(),
            "final_train_acc": mean_interval(train[:, -1]).to_dict(),
            "best_test_acc": mean_interval(test.max(axis=1)).to_dict(),
            "final_gap": mean_interval(train[:, -1] - test[:, -1]).to_dict(),
        }
        summary["curves"][norm] = {m: band(c[m], log=m.endswith("loss")) for m in METRICS}
    if "none" in curves:
        summary["epochs_to_target"] = _epochs_to_target(curves, norms)
        summary["milestones"] = _milestones(curves, norms)
    return summary


def _epochs_to_target(curves: dict, norms: list[str]) -> dict:
    """Target = the plain network's mean final test accuracy; for each other norm, the
    first epoch at which its mean curve reaches it, and the same per seed against that
    seed's own plain final accuracy (seeds are paired: same batches, same first weights)."""
    base = curves["none"]["test_acc"]
    target = float(base[:, -1].mean())
    out = {"target_test_acc": target, "baseline_epochs": int(base.shape[1]), "variants": {}}
    for norm in norms:
        if norm == "none":
            continue
        test = curves[norm]["test_acc"]
        epoch = first_reaching(test.mean(axis=0), target)
        per_seed = [first_reaching(test[i], base[i, -1]) for i in range(min(len(test), len(base)))]
        out["variants"][norm] = {"epoch": epoch, "ratio": None if epoch is None else base.shape[1] / epoch,
                                 "per_seed_epochs": per_seed}
    return out


def _milestones(curves: dict, norms: list[str]) -> list[dict]:
    """The plain network's mean test accuracy after 10, 25, 50, 100 epochs (those within the
    run, and the last), and the first epoch at which each other variant's mean reached it."""
    base = curves["none"]["test_acc"].mean(axis=0)
    horizons = sorted({h for h in (10, 25, 50, 100) if h <= len(base)} | {len(base)})
    return [{"baseline_epoch": h, "test_acc": float(base[h - 1]),
             "epochs": {n: first_reaching(curves[n]["test_acc"].mean(axis=0), float(base[h - 1]))
                        for n in norms if n != "none"}} for h in horizons]


def seeds_per_arm(a: int, b: int, names: tuple[str, str] = ("BN", "plain")) -> str:
    """"n=5 seeds per arm", or "n=5 BN and 4 plain seeds" where they differ."""
    return f"n={a} seeds per arm" if a == b else f"n={a} {names[0]} and {b} {names[1]} seeds"


def verdict(summary: dict) -> list[str]:
    """Plain-language statements of whether the source article's two claims hold in this run."""
    t, v = summary.get("epochs_to_target"), summary["variants"]
    if not t or "bn" not in t["variants"]:
        return []
    bn, plain = v["bn"], v["none"]
    if bn["diverged"] or plain["diverged"]:
        return [f"Not assessed: {bn['diverged']} of {bn['n']} BN and {plain['diverged']} of "
                f"{plain['n']} plain runs diverged (non-finite loss); try a smaller --lr."]
    if t["target_test_acc"] < 2 * CHANCE:
        return [f"Not assessed: the plain network stayed near chance ({t['target_test_acc']:.1%} "
                "test accuracy), so there is no level for BN to reach faster."]
    e = t["variants"]["bn"]
    lines = [("Faster convergence: NOT observed: BN never reached the plain network's final "
              "test accuracy.") if e["epoch"] is None else
             (f"Faster convergence: BN reached the plain network's final test accuracy "
              f"({t['target_test_acc']:.2%}, epoch {t['baseline_epochs']}) at epoch {e['epoch']}, "
              f"{e['ratio']:.1f}x fewer epochs (the article's claim: 100 vs 20-30, 3.3-5x).")]
    b, p = bn["final_test_acc"], plain["final_test_acc"]
    if b["n"] >= 2 and p["n"] >= 2:
        word = ("holds: the 95% intervals do not overlap" if b["low"] > p["high"] else
                "higher on average, but the 95% intervals overlap" if b["mean"] > p["mean"] else
                "NOT observed: BN's mean is not higher")
    else:
        word = ("higher" if b["mean"] > p["mean"] else "NOT observed") + " (a single seed: no interval)"
    lines.append(f"Higher final test accuracy: BN {b['mean']:.2%} vs plain {p['mean']:.2%} "
                 f"({seeds_per_arm(b['n'], p['n'])}); {word}.")
    return lines


def measured(summary: dict) -> list[str]:
    lines = verdict(summary)
    for norm in summary["norms"]:
        v = summary["variants"][norm]
        if v["diverged"]:
            lines.append(f"{label(norm)}: {v['diverged']} of {v['n']} runs diverged; their "
                         "accuracy counts at chance after that.")
    return lines


def _pct(d: dict | None, clip: bool = True) -> str:
    return "-" if d is None else format_interval(d, pct=True, clip=clip, show_n=False)


def tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    out = [(["variant", "n", "final test acc [95% CI]", "best test acc", "final train acc",
             "train - test gap (pts)", "diverged"],
            [[label(n), v["n"], _pct(v["final_test_acc"]), _pct(v["best_test_acc"]),
              _pct(v["final_train_acc"]), _pct(v["final_gap"], clip=False).replace("%", ""),
              v["diverged"]] for n, v in ((n, summary["variants"][n]) for n in summary["norms"])])]
    t = summary.get("epochs_to_target")
    if t and t["variants"]:
        out.append((["variant", "first epoch at plain's final test acc (mean curve)", "plain epochs",
                     "ratio", "per seed (vs that seed's plain final)"],
                    [[label(n), "not reached" if e["epoch"] is None else e["epoch"],
                      t["baseline_epochs"], "-" if e["ratio"] is None else f"{e['ratio']:.1f}x",
                      ", ".join("-" if s is None else str(s) for s in e["per_seed_epochs"])]
                     for n, e in ((n, t["variants"][n]) for n in summary["norms"] if n != "none")]))
        out.append((["plain epoch", "plain mean test acc"]
                     + [f"{label(n)} reached it at epoch" for n in summary["norms"] if n != "none"],
                    [[m["baseline_epoch"], f"{m['test_acc']:.2%}"]
                     + ["not reached" if m["epochs"][n] is None else m["epochs"][n]
                        for n in summary["norms"] if n != "none"]
                     for m in summary["milestones"]]))
    return out


def plot_accuracy(summary: dict, ax=None):
    """Test accuracy per epoch (band: 95% interval over seeds), training accuracy dashed,
    the plain network's final level dotted, and where each variant first reached it."""
    ax = ax if ax is not None else new_figure()[1][0]
    for norm in summary["norms"]:
        c = summary["curves"][norm]
        plot_mean_band(c["test_acc"], ax=ax, label=f"{label(norm)} test", color=color(norm))
        plot_mean_band(c["train_acc"], ax=ax, label=f"{label(norm)} train", color=color(norm),
                       linestyle="--", show_band=False)
    t = summary.get("epochs_to_target")
    if t:
        ax.axhline(t["target_test_acc"], color="#999999", linewidth=0.8, linestyle=":",
                   label="plain's final test acc")
        for norm, e in t["variants"].items():
            if e["epoch"] is not None:
                ax.axvline(e["epoch"], color=color(norm), linewidth=0.8, linestyle=":")
                ax.annotate(f"epoch {e['epoch']}", (e["epoch"], t["target_test_acc"]),
                            textcoords="offset points", xytext=(4, -12), fontsize=8, color=color(norm))
    ax.set_xlabel("epoch"), ax.set_ylabel("accuracy"), ax.grid(alpha=0.3)
    percent_axis(ax)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Accuracy per epoch, mean over seeds with 95% interval")
    return ax


def plot_loss(summary: dict, metric: str, ax=None):
    """One loss curve per variant (geometric mean over seeds, 95% interval), log scale."""
    ax = ax if ax is not None else new_figure()[1][0]
    for norm in summary["norms"]:
        plot_mean_band(summary["curves"][norm][metric], ax=ax, label=label(norm), color=color(norm))
    log_axis(ax), ax.set_xlabel("epoch"), ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=8)
    return ax


def figures(summary: dict) -> dict:
    fig_acc, (ax,) = new_figure(width=8, height=4.8)
    plot_accuracy(summary, ax)
    fig_loss, axes = new_figure(2, width=10, height=4.6, sharey=True)
    plot_loss(summary, "train_loss", axes[0])
    plot_loss(summary, "test_loss", axes[1])
    fig_loss.suptitle("Cross-entropy loss per epoch (inference mode, whole set; geometric mean "
                      "over seeds, 95% interval)")
    return {"accuracy": fig_acc, "loss": fig_loss}
