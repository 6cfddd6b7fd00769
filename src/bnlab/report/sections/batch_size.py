"""``batch-size``: test error by batch size, per normalization (Wu & He 2018, Figure 1)."""

import numpy as np

from ..figures import new_figure, percent_axis
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
COLORS = {"bn": "#1f77b4", "ghost": "#17becf", "renorm": "#2ca02c", "gn": "#d62728",
          "ln": "#9467bd"}
CHANCE = 0.1  # a diverged run's accuracy (10 classes)


def analyze(rows: list[dict], config) -> dict:
    """Per arm and batch size: test error (1 - accuracy) with running statistics and, for
    the BN arms, with precise statistics, as mean and interval over seeds; a diverged run
    counts at chance."""
    runs: dict = {}  # {(arm, b): {unit: row}}
    for r in rows:
        key = (r["arm"], r["batch"])
        if r.get("diverged"):
            runs.setdefault(key, {})[r["unit"]] = {"diverged": True}
        elif "test_acc" in r:
            runs.setdefault(key, {}).setdefault(r["unit"], r)
    arms = [a for a in config.arms if any(k[0] == a for k in runs)]
    sizes = [b for b in config.batch_sizes if any(k[1] == b for k in runs)]
    summary: dict = {"arms": arms, "sizes": sizes, "cells": {}}
    for arm in arms:
        for b in sizes:
            found = list(runs.get((arm, b), {}).values())
            if not found:
                continue
            cell = {"n": len(found), "diverged": sum(bool(r.get("diverged")) for r in found)}
            for kind, key in (("running", "test_acc"), ("precise", "precise_test_acc")):
                acc = [CHANCE if r.get("diverged") else r.get(key) for r in found]
                if all(a is not None for a in acc):
                    cell[kind] = mean_interval(1 - np.array(acc, dtype=np.float64)).to_dict()
            summary["cells"][f"{arm}@{b}"] = cell
    return summary


def _cell(summary: dict, arm: str, b: int) -> dict | None:
    return summary["cells"].get(f"{arm}@{b}")


def measured(summary: dict) -> list[str]:
    lines = []
    sizes = summary["sizes"]
    for arm in summary["arms"]:
        parts = []
        for b in sizes:
            c = _cell(summary, arm, b)
            if c and "running" in c:
                text = f"B={b}: {c['running']['mean']:.2%}"
                if "precise" in c:
                    text += f" (precise {c['precise']['mean']:.2%})"
                parts.append(text)
        n = max((_cell(summary, arm, b) or {"n": 0})["n"] for b in sizes)
        lines.append(f"{LABELS.get(arm, arm)} test error: " + ", ".join(parts) + f" (n={n}).")
    big, small = (max(sizes), min(sizes)) if sizes else (None, None)
    for arm in summary["arms"]:
        hi, lo = _cell(summary, arm, small), _cell(summary, arm, big)
        if hi and lo and "running" in hi and "running" in lo and small != big:
            a, b = hi["running"], lo["running"]
            apart = a["low"] > b["high"] or a["high"] < b["low"]
            how = "one seed: no interval" if min(a["n"], b["n"]) < 2 else \
                f"intervals {'apart' if apart else 'overlap'}"
            lines.append(f"{LABELS.get(arm, arm)}: error at B={small} minus B={big}: "
                         f"{(a['mean'] - b['mean']) * 100:+.2f} points ({how}).")
    for key, c in summary["cells"].items():
        if c["diverged"]:
            lines.append(f"{key}: {c['diverged']} of {c['n']} runs diverged (counted at chance).")
    return lines


def tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    header = ["arm", "test error with"] + [f"B={b}" for b in summary["sizes"]]
    body = []
    for arm in summary["arms"]:
        for kind in ("running", "precise"):
            cells = [_cell(summary, arm, b) for b in summary["sizes"]]
            if not any(c and kind in c for c in cells):
                continue
            body.append([LABELS.get(arm, arm), kind] + [
                format_interval(c[kind], pct=True) if c and kind in c else "-" for c in cells])
    paper = [["paper: BN (ResNet-50, ImageNet)", "running"] + [
        f"{dict(zip(PAPER_SIZES, PAPER['bn'])).get(b, '-')}" for b in summary["sizes"]],
        ["paper: GN (ResNet-50, ImageNet)", "-"] + [
        f"{dict(zip(PAPER_SIZES, PAPER['gn'])).get(b, '-')}" for b in summary["sizes"]]]
    return [(header, body), (header, paper)]


def plot_errors(summary: dict, kind: str = "running", ax=None):
    """Test error against batch size per arm: mean over seeds with its 95% interval."""
    ax = ax if ax is not None else new_figure()[1][0]
    for arm in summary["arms"]:
        pts = [(b, c[kind]) for b in summary["sizes"]
               if (c := _cell(summary, arm, b)) and kind in c]
        if not pts:
            continue
        x = [b for b, _ in pts]
        mean = np.array([d["mean"] for _, d in pts])
        low = np.array([d["low"] for _, d in pts])
        high = np.array([d["high"] for _, d in pts])
        ax.plot(x, mean, "o-", color=COLORS.get(arm), label=LABELS.get(arm, arm))
        ax.fill_between(x, low, high, color=COLORS.get(arm), alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(summary["sizes"], [str(b) for b in summary["sizes"]])
    ax.invert_xaxis()  # as the paper: batch size falling to the right
    ax.set_xlabel("batch size B (examples per step)"), ax.set_ylabel(f"test error ({kind})")
    percent_axis(ax)
    ax.grid(alpha=0.3), ax.legend(fontsize=8)
    return ax


def figures(summary: dict) -> dict:
    fig, axes = new_figure(2, width=13, height=4.5, sharey=True)
    plot_errors(summary, "running", axes[0])
    axes[0].set_title("running statistics")
    plot_errors(summary, "precise", axes[1])
    axes[1].set_title("precise statistics (update_bn_stats), BN arms")
    fig.suptitle("Test error by batch size, same examples seen, lr scaled linearly: "
                 "mean over seeds, 95% interval")
    return {"batch-size": fig}
