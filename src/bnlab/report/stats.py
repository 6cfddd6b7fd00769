"""Statistics over seeds, as pure NumPy functions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

__all__ = ["Interval", "first_reaching", "format_interval", "mean_interval", "summarize_compare"]


@dataclass(frozen=True)
class Interval:
    """A mean over n runs with a two-sided Student-t confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n,
                "confidence": self.confidence}

    def __str__(self) -> str:
        return format_interval(self, digits=4)


def curve_band(curves: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise mean and two-sided Student-t interval over the rows (seeds) of ``curves``;
    with one row the interval is the row itself."""
    curves = np.asarray(curves, dtype=np.float64)
    mean = curves.mean(axis=0)
    n = curves.shape[0]
    if n < 2:
        return mean, mean, mean
    half = _st.t.ppf(0.5 + confidence / 2, n - 1) * curves.std(axis=0, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def mean_interval(values, confidence: float = 0.95) -> Interval:
    """Mean and t-interval of ``values``; with one value the interval is the value itself."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"expected a non-empty 1-D sequence (got shape {v.shape})")
    mean, low, high = (float(a[0]) for a in curve_band(v[:, None], confidence))
    return Interval(mean, low, high, len(v), confidence)


def format_interval(iv: Interval | dict, pct: bool = False, digits: int = 3,
                    clip: bool | None = None, show_n: bool = True) -> str:
    """"mean [low, high] (n=k)". With ``pct``, in % with 2 decimals and, for accuracies
    (``clip``, the default with ``pct``), the interval clipped to [0, 100]: a t-interval over
    few seeds can reach past the bounds."""
    d = iv.to_dict() if isinstance(iv, Interval) else iv
    k, unit, digits = (100, "%", 2) if pct else (1, "", digits)
    n = f" (n={d['n']})" if show_n else ""
    if d["n"] < 2:
        return f"{d['mean'] * k:.{digits}f}{unit}{n}"
    low, high = d["low"], d["high"]
    if pct if clip is None else clip:
        low, high = max(low, 0.0), min(high, 1.0)
    return f"{d['mean'] * k:.{digits}f}{unit} [{low * k:.{digits}f}, {high * k:.{digits}f}]{n}"


def first_reaching(curve, target: float) -> int | None:
    """1-based index of the first point of ``curve`` >= ``target``, or None."""
    hits = np.flatnonzero(np.asarray(curve) >= target)
    return int(hits[0]) + 1 if len(hits) else None


def summarize_compare(curves: dict[str, dict[str, np.ndarray]], baseline: str = "none") -> dict:
    """Summary of a comparison from per-norm metric curves of shape (n_seeds, n_epochs).

    Epochs-to-target states the seed's claim in numbers: target = the baseline's mean final
    test accuracy; for each other norm, the first epoch at which its mean test-accuracy curve
    reaches the target, the same per seed (with each seed's own baseline final accuracy as
    target, seeds being paired), and the ratio baseline epochs / epochs.
    """
    out: dict = {"variants": {}}
    for norm, c in curves.items():
        test, train = c["test_acc"], c["train_acc"]
        out["variants"][norm] = {
            "n": int(test.shape[0]),
            "epochs": int(test.shape[1]),
            "final_test_acc": mean_interval(test[:, -1]).to_dict(),
            "final_train_acc": mean_interval(train[:, -1]).to_dict(),
            "best_test_acc": mean_interval(test.max(axis=1)).to_dict(),
            "final_test_loss": mean_interval(c["test_loss"][:, -1]).to_dict(),
            "final_gap": mean_interval(train[:, -1] - test[:, -1]).to_dict(),
        }
    if baseline in curves:
        base = curves[baseline]["test_acc"]
        target = float(base[:, -1].mean())
        targets = {"baseline": baseline, "target_test_acc": target, "baseline_epochs": int(base.shape[1]),
                   "variants": {}}
        for norm, c in curves.items():
            if norm == baseline:
                continue
            test = c["test_acc"]
            epoch = first_reaching(test.mean(axis=0), target)
            n = min(len(test), len(base))
            per_seed = [first_reaching(test[i], base[i, -1]) for i in range(n)]
            reached = [e for e in per_seed if e is not None]
            targets["variants"][norm] = {
                "epoch": epoch,
                "ratio": None if epoch is None else base.shape[1] / epoch,
                "per_seed_epochs": per_seed,
                "per_seed_interval": mean_interval(reached).to_dict() if reached else None,
                "seeds_reaching": len(reached),
            }
        out["epochs_to_target"] = targets
        out["milestones"] = _milestones(curves, baseline)
    return out


def _milestones(curves: dict[str, dict[str, np.ndarray]], baseline: str) -> list[dict]:
    """The baseline's mean test accuracy after 10, 25, 50, 100 epochs (those within the run,
    and the last), and the first epoch at which each other variant's mean curve reached it:
    the seed's claim at several horizons rather than one."""
    base = curves[baseline]["test_acc"].mean(axis=0)
    horizons = sorted({h for h in (10, 25, 50, 100) if h <= len(base)} | {len(base)})
    rows = []
    for h in horizons:
        level = float(base[h - 1])
        rows.append({"baseline_epoch": h, "test_acc": level,
                     "epochs": {norm: first_reaching(c["test_acc"].mean(axis=0), level)
                                for norm, c in curves.items() if norm != baseline}})
    return rows
