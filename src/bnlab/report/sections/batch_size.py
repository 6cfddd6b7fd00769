"""``batch-size``: test error by batch size, per normalization (Wu & He 2018, Figure 1), and
how close to converged each arm's training ended."""

import numpy as np

from ..figures import color, new_figure, percent_axis
from ..stats import format_interval, mean_interval

TITLE = "batch-size: BN, ghost BN, Batch Renorm, GroupNorm and LayerNorm by batch size"
# Wu & He (2018), Figure 1 / Table 2: ResNet-50 ImageNet top-1 error (%) by images per GPU
PAPER_SIZES = (32, 16, 8, 4, 2)
PAPER = {"bn": (23.6, 23.7, 24.8, 27.3, 34.7), "gn": (24.1, 24.2, 24.0, 24.2, 24.1)}
EXPECTED = ("Wu & He (2018, Group Normalization, Figure 1): ResNet-50's ImageNet error by "
            "images per GPU (32, 16, 8, 4, 2) is, for BN, "
            + ", ".join(f"{e}" for e in PAPER["bn"]) + "%, and for GN "
            + ", ".join(f"{e}" for e in PAPER["gn"]) + "%: BN degrades as the batch shrinks, "
            "GN does not. Batch Renorm (Ioffe 2017) recovers part of BN's small-batch loss; "
            "precise statistics (Wu & Johnson 2021) remove the part due to noisy running "
            "averages.")
LABELS = {"bn": "BN", "ghost": "ghost BN (steps of max B)", "renorm": "Batch Renorm",
          "gn": "GroupNorm", "ln": "LayerNorm"}
CHANCE = 0.1  # a diverged run's accuracy (10 classes)
FAILED = 2 * CHANCE  # a run whose test accuracy stays below this learned nothing: at chance


def analyze(rows: list[dict], config) -> dict:
    """Per arm and batch size: test error (1 - accuracy) with running statistics and, for
    the BN arms, with precise statistics, as mean and interval over seeds; a diverged run
    counts at chance. Runs that diverged or ended at chance (test accuracy below 20%) are
    listed in ``failed``, and counted per cell. Where the rows hold each epoch's mean
    training loss, a cell's ``sgd_loss`` is its mean over the runs that did not diverge, in
    the last epoch and in the one before. ``trained`` says how long every run trained."""
    runs: dict = {}  # {(arm, b): {unit: row}}
    epochs: dict = {}  # {(arm, b): {unit: {epoch: sgd_loss}}}
    for r in rows:
        key = (r["arm"], r["batch"])
        if r.get("diverged"):
            runs.setdefault(key, {})[r["unit"]] = {**r, "diverged": True}
            continue
        if "test_acc" in r:
            runs.setdefault(key, {}).setdefault(r["unit"], r)
        if "epoch" in r and "sgd_loss" in r:
            epochs.setdefault(key, {}).setdefault(r["unit"], {})[r["epoch"]] = r["sgd_loss"]
    arms = [a for a in config.arms if any(k[0] == a for k in runs)]
    sizes = [b for b in config.batch_sizes if any(k[1] == b for k in runs)]
    summary: dict = {"arms": arms, "sizes": sizes, "cells": {}, "failed": [],
                     "trained": trained(config)}
    for arm in arms:
        for b in sizes:
            found = list(runs.get((arm, b), {}).values())
            if not found:
                continue
            failed = [{"arm": arm, "batch": b, "seed": r.get("seed"),
                       "diverged": bool(r.get("diverged")), "test_acc": r.get("test_acc"),
                       "test_loss": r.get("test_loss")}
                      for r in found if r.get("diverged") or r["test_acc"] < FAILED]
            cell = {"n": len(found), "diverged": sum(f["diverged"] for f in failed),
                    "failed": len(failed)}
            for kind, key in (("running", "test_acc"), ("precise", "precise_test_acc")):
                acc = [CHANCE if r.get("diverged") else r.get(key) for r in found]
                if all(a is not None for a in acc):
                    cell[kind] = mean_interval(1 - np.array(acc, dtype=np.float64)).to_dict()
            ended = [epochs.get((arm, b), {}).get(r["unit"]) for r in found
                     if not r.get("diverged")]
            if ended and all(ended):
                cell["sgd_loss"] = _last_epochs(ended)
            summary["cells"][f"{arm}@{b}"] = cell
            summary["failed"] += failed
    return summary


def trained(config) -> str:
    """How long every run trained: epochs (of the first n_train examples), or, in a record
    written before epochs, a number of examples."""
    if config.epochs is None:
        return f"{config.samples} examples"
    of = "" if config.n_train is None else f" of {config.n_train} examples"
    return f"{config.epochs} epoch{'s' * (config.epochs != 1)}{of}"


def _last_epochs(losses: list[dict]) -> dict:
    """Mean training loss over the runs, in their last epoch and in the one before (None
    after one epoch); ``losses`` holds each run's {epoch: loss}."""
    last = max(losses[0])
    before = [run.get(last - 1) for run in losses]
    return {"last": float(np.mean([run[last] for run in losses])),
            "before": float(np.mean(before)) if all(v is not None for v in before) else None}


def _cell(summary: dict, arm: str, b: int) -> dict | None:
    return summary["cells"].get(f"{arm}@{b}")


def _name(arm: str) -> str:
    return LABELS.get(arm, arm)


def _color(arm: str) -> str | None:
    """An arm's colour is its norm's (the ghost arm's norm is ghost-B, of the ghost-K family)."""
    return color("ghost-K" if arm == "ghost" else arm)


def _change(summary: dict, arm: str) -> tuple[float, str] | None:
    """``arm``'s running test error at the smallest batch minus at the largest, in points,
    and how its intervals stand."""
    sizes = summary["sizes"]
    if len(sizes) < 2:
        return None
    hi, lo = _cell(summary, arm, min(sizes)), _cell(summary, arm, max(sizes))
    if not (hi and lo and "running" in hi and "running" in lo):
        return None
    a, b = hi["running"], lo["running"]
    if min(a["n"], b["n"]) < 2:
        return (a["mean"] - b["mean"]) * 100, "one seed: no interval"
    apart = a["low"] > b["high"] or a["high"] < b["low"]
    return (a["mean"] - b["mean"]) * 100, f"intervals {'apart' if apart else 'overlap'}"


def _seeds(summary: dict, arms: tuple[str, ...]) -> str:
    ns = sorted({c["n"] for k, c in summary["cells"].items() if k.split("@")[0] in arms})
    return f"n={'-'.join(map(str, ns[::max(len(ns) - 1, 1)]))} seeds per arm and batch size"


def verdict(summary: dict) -> list[str]:
    """Whether Wu & He's shape holds: BN's error rising as the batch shrinks, GN's flat."""
    bn, gn = _change(summary, "bn"), _change(summary, "gn")
    if bn is None:
        return []
    small, big = min(summary["sizes"]), max(summary["sizes"])
    claim = (f"Wu & He's claim, BN's test error rises as the batch shrinks (paper: +11.1 points "
             f"from 32 to 2 images per GPU) while GroupNorm's stays flat (+0.0)")
    failed = [f for f in summary["failed"] if f["arm"] in ("bn", "gn")
              and f["batch"] in (small, big)]
    if failed:
        return [f"{claim}: not assessed: {len(failed)} BN or GroupNorm network(s) at B={small} "
                f"or B={big} diverged or ended at chance; try a smaller --lr."]
    d, how = bn
    word = ("observed" if d > 0 and how == "intervals apart" else
            "not shown (the intervals overlap)" if d > 0 and how == "intervals overlap" else
            "suggested (one seed: no interval)" if d > 0 else "NOT observed")
    text = (f"{claim}: {word} in this run: from B={big} to B={small}, BN's error changed by "
            f"{d:+.2f} points ({how})")
    if gn is not None:
        text += f", GroupNorm's by {gn[0]:+.2f} points ({gn[1]})"
    return [text + f" ({_seeds(summary, ('bn', 'gn'))})."]


def _failed_line(f: dict) -> str:
    where = f"{_name(f['arm'])} at B={f['batch']}, seed {f['seed']}"
    if f["diverged"]:
        return f"{where}: diverged (non-finite loss); counted at chance."
    loss = "" if f["test_loss"] is None else f", test loss {f['test_loss']:.3g}"
    return (f"{where}: FAILED, at chance (test accuracy {f['test_acc']:.2%}{loss}); its error "
            "counts in the mean.")


def _loss_text(loss: dict) -> str:
    """A cell's last-epoch training loss, and its change from the epoch before."""
    if loss["before"] is None:
        return f"{loss['last']:.3f}"
    return f"{loss['last']:.3f} ({loss['last'] / loss['before'] - 1:+.0%})"


def convergence(summary: dict) -> list[str]:
    """How far from converged the largest batch, the fewest steps, ended, per arm."""
    big = max(summary["sizes"], default=None)
    ended = [(arm, c["sgd_loss"]) for arm in summary["arms"]
             if (c := _cell(summary, arm, big)) and "sgd_loss" in c]
    if not ended or ended[0][1]["before"] is None:
        return []
    return [f"Trained to the end? At B={big}, the fewest steps, the last epoch's mean training "
            "loss (and its change from the epoch before) is "
            + ", ".join(f"{_loss_text(loss)} for {_name(arm)}" for arm, loss in ended) + "."]


def measured(summary: dict) -> list[str]:
    lines = verdict(summary)
    sizes = summary["sizes"]
    for arm in summary["arms"]:
        if (change := _change(summary, arm)) is not None:
            lines.append(f"{_name(arm)}: error at B={min(sizes)} minus B={max(sizes)}: "
                         f"{change[0]:+.2f} points ({change[1]}).")
    return lines + convergence(summary) + [_failed_line(f) for f in summary["failed"]]


def _interval(c: dict | None, kind: str) -> str:
    if not c or kind not in c:
        return "-"
    text = format_interval(c[kind], pct=True, show_n=False)
    return text + (f" ({c['failed']} of {c['n']} failed)" if c.get("failed") else "")


def _ns(cells: list[dict | None]) -> str:
    """The cells' seed counts: "5", or "3-5" where they differ."""
    ns = sorted({c["n"] for c in cells if c})
    return "-".join(map(str, ns[::max(len(ns) - 1, 1)]))


def tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    header = ["arm", "statistics", "n"] + [f"B={b}" for b in summary["sizes"]]
    body = []
    for arm in summary["arms"]:
        cells = [_cell(summary, arm, b) for b in summary["sizes"]]
        for kind in ("running", "precise"):
            if any(c and kind in c for c in cells):
                body.append([_name(arm), kind, _ns(cells)] + [_interval(c, kind) for c in cells])
    paper = [[f"paper: {name} (ResNet-50, ImageNet)", kind, "-"] + [
        f"{dict(zip(PAPER_SIZES, PAPER[arm])).get(b, '-')}" for b in summary["sizes"]]
        for arm, name, kind in (("bn", "BN", "running"), ("gn", "GN", "-"))]
    losses = []
    for arm in summary["arms"]:
        cells = [_cell(summary, arm, b) for b in summary["sizes"]]
        if any(c and "sgd_loss" in c for c in cells):
            losses.append([_name(arm), "last epoch (change)", _ns(cells)]
                          + [_loss_text(c["sgd_loss"]) if c and "sgd_loss" in c else "-"
                             for c in cells])
    loss_header = ["arm", "training loss", "n"] + header[3:]
    return [(header, body), (header, paper)] + ([(loss_header, losses)] if losses else [])


def _limits(means: list[float]) -> tuple[float, float]:
    lo, hi = min(means), max(means)
    pad = max(0.15 * (hi - lo), 0.005)
    return max(0.0, lo - pad), min(1.0, hi + pad)


def plot_errors(summary: dict, kind: str = "running", ax=None):
    """Test error against batch size per arm: mean over seeds with its 95% interval (clipped
    to the possible 0-100%; left out below 3 seeds, where it spans most of that range); the
    axis spans the means, so a wide interval may run past it. A cell with a failed network
    (diverged or at chance) is ringed and labelled."""
    ax = ax if ax is not None else new_figure()[1][0]
    means = []
    for arm in summary["arms"]:
        pts = [(b, c) for b in summary["sizes"] if (c := _cell(summary, arm, b)) and kind in c]
        if not pts:
            continue
        x = [b for b, _ in pts]
        mean = np.array([c[kind]["mean"] for _, c in pts])
        ax.plot(x, mean, "o-", color=_color(arm), label=_name(arm))
        if min(c[kind]["n"] for _, c in pts) >= 3:
            ax.fill_between(x, np.clip([c[kind]["low"] for _, c in pts], 0.0, 1.0),
                            np.clip([c[kind]["high"] for _, c in pts], 0.0, 1.0),
                            color=_color(arm), alpha=0.15, linewidth=0)
        for b, c in pts:
            if c.get("failed"):
                ax.plot(b, c[kind]["mean"], "o", markersize=13, markerfacecolor="none",
                        markeredgecolor="#d00000", markeredgewidth=1.5)
                ax.annotate(f"{c['failed']} of {c['n']} failed", (b, c[kind]["mean"]),
                            textcoords="offset points", xytext=(10, -4), fontsize=9,
                            color="#d00000")
        means += list(mean)
    ax.set_xscale("log", base=2)
    ax.set_xticks(summary["sizes"], [str(b) for b in summary["sizes"]])
    ax.minorticks_off()
    ax.invert_xaxis()  # as the paper: batch size falling to the right
    if means:
        ax.set_ylim(*_limits(means))
    ax.set_xlabel("batch size B (examples per step)"), ax.set_ylabel(f"test error ({kind})")
    percent_axis(ax)
    ax.grid(alpha=0.3), ax.legend(fontsize=9, loc="best")
    return ax


def figures(summary: dict) -> dict:
    fig, axes = new_figure(2, width=10.5, height=4.6, sharey=True)
    plot_errors(summary, "running", axes[0])
    axes[0].set_title("running statistics", fontsize=10)
    plot_errors(summary, "precise", axes[1])
    axes[1].set_title("precise statistics (update_bn_stats), BN arms", fontsize=10)
    axes[1].yaxis.set_tick_params(labelleft=True)
    means = [c[k]["mean"] for c in summary["cells"].values() for k in ("running", "precise") if k in c]
    if means:
        axes[0].set_ylim(*_limits(means))  # both panels: the axes are shared
    n = min((c["n"] for c in summary["cells"].values()), default=0)
    over = ("seeds, 95% interval" if n >= 3 else f"{n} seeds\n(no interval band: too few "
            "seeds; the table gives each interval)")
    fig.suptitle(f"Test error by batch size after {summary['trained']}, lr scaled linearly: "
                 f"mean over {over}", fontsize=11)
    return {"batch-size": fig}
