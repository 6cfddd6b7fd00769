"""Statistics over seeds, as pure NumPy functions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

__all__ = ["Interval", "band", "curve_band", "first_reaching", "format_interval", "mean_interval"]


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
    """Pointwise mean and two-sided Student-t interval over the rows (seeds) of ``curves``.
    NaN entries (a diverged seed's loss) are left out at their point; where fewer than two
    values remain, the interval is the mean itself."""
    curves = np.asarray(curves, dtype=np.float64)
    n = (~np.isnan(curves)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(curves, axis=0) / n
        sd = np.sqrt(np.nansum((curves - mean) ** 2, axis=0) / (n - 1))
        half = np.where(n >= 2, _st.t.ppf(0.5 + confidence / 2, np.maximum(n - 1, 1)) * sd
                        / np.sqrt(np.maximum(n, 1)), 0.0)
    return mean, mean - half, mean + half


def band(curves: np.ndarray, log: bool = False) -> dict:
    """``{"mean", "low", "high", "n"}`` lists of :func:`curve_band`, for a summary; with
    ``log``, the geometric mean and the interval taken on the logarithms."""
    curves = np.asarray(curves, dtype=np.float64)
    mean, low, high = curve_band(np.log(np.maximum(curves, 1e-300)) if log else curves)
    if log:
        mean, low, high = np.exp(mean), np.exp(low), np.exp(high)
    clean = lambda a: [None if not np.isfinite(v) else float(v) for v in a]  # noqa: E731
    return {"mean": clean(mean), "low": clean(low), "high": clean(high), "n": int(curves.shape[0])}


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
