"""Statistics over seeds, as pure NumPy functions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "band", "curve_band", "first_reaching", "format_interval", "mean_interval"]


# Student-t quantiles t.ppf(0.975, df) for df = 1..100 as scipy.stats gives them, to the last
# bit (a test checks): the 95% intervals over up to 101 seeds need no scipy, whose import
# costs a report about a second. Other levels and larger df ask scipy.
_T975 = np.array([
    12.706204736174694, 4.302652729749462, 3.1824463052837078, 2.7764451051977934,
    2.5705818356363146, 2.4469118511449786, 2.364624251592784, 2.306004135204166,
    2.262157162798205, 2.228138851986274, 2.200985160091639, 2.1788128296672284,
    2.1603686564627913, 2.144786687917804, 2.131449545559776, 2.1199052992212546,
    2.1098155778333156, 2.1009220402410382, 2.0930240544083087, 2.085963447265864,
    2.0796138447276795, 2.0738730679040254, 2.0686576104190486, 2.0638985616280245,
    2.0595385527532972, 2.0555294386428735, 2.0518305164802846, 2.0484071417952454,
    2.045229642132703, 2.0422724563012378, 2.039513446396408, 2.0369333434601016,
    2.0345152974493383, 2.0322445093177186, 2.030107928250343, 2.0280940009804502,
    2.0261924630291093, 2.0243941639119694, 2.022690920036761, 2.021075390306273,
    2.019540970441376, 2.0180817028184443, 2.016692199227824, 2.0153675744437636,
    2.014103388880846, 2.012895598919429, 2.0117405137297655, 2.010634757624232,
    2.0095752371292392, 2.008559112100761, 2.007583770315836, 2.006646805061688,
    2.0057459953178687, 2.0048792881880564, 2.0040447832891455, 2.003240718847872,
    2.002465459291007, 2.0017174841452356, 2.000995378088267, 2.0002978220142604,
    1.999623584994939, 1.9989715170333788, 1.998340542520741, 1.997729654317693,
    1.9971379083920038, 1.9965644189523117, 1.996008354025296, 1.9954689314298435,
    1.9949454151072374, 1.994437111771186, 1.9939433678456255, 1.9934635666618719,
    1.992997125889855, 1.992543495180932, 1.9921021540022417, 1.9916726096446642,
    1.9912543953883846, 1.9908470688116906, 1.9904502102301285, 1.990063421254446,
    1.9896863234569029, 1.989318557136572, 1.9889597801751624, 1.9886096669757083,
    1.9882679074772216, 1.98793420623902, 1.9876082815890708, 1.9872898648311692,
    1.986978699506281, 1.9866745407037683, 1.9863771544186177, 1.98608631695113,
    1.9858018143458227, 1.985523441866604, 1.9852510035054978, 1.984984311522457,
    1.9847231860139845, 1.9844674545084815, 1.9842169515864174, 1.9839715185235518,
])


def t_quantile(p: float, df: np.ndarray) -> np.ndarray:
    """``scipy.stats.t.ppf(p, df)`` for integer degrees of freedom ``df`` >= 1."""
    df = np.asarray(df)
    if df.size and df.min() < 1:
        raise ValueError(f"degrees of freedom must be at least 1 (got {df.min()})")
    if p == 0.975 and df.size and df.max() <= len(_T975):
        return _T975[df - 1]
    from scipy import stats

    return stats.t.ppf(p, df)


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
        half = np.where(n >= 2, t_quantile(0.5 + confidence / 2, np.maximum(n - 1, 1)) * sd
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
