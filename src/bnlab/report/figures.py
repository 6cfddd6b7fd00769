"""Figures, drawn on :class:`matplotlib.figure.Figure` objects (never pyplot, so importing
bnlab.report switches no backend and opens no window). Plotting functions take ``ax=None``
and return the axes they drew on."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import (FuncFormatter, LogFormatterSciNotation, LogLocator, NullFormatter,
                               PercentFormatter)

from bnlab.lab.norms import NORMS, norm
from . import stats

__all__ = ["DPI", "MIN_TEXT_PX", "PAGE_PX", "color", "label", "new_figure", "percent_axis",
           "plot_band", "plot_mean_band", "png_bytes", "readable_log_axis",
           "smallest_text_px"]

DPI = 110  # a figure of w inches is w * DPI pixels wide
PAGE_PX = 1068  # the report page's content width in CSS pixels (max-width 1100px less padding)
MIN_TEXT_PX = 10.5  # the smallest text a figure may show on the page, in CSS pixels


def label(name: str) -> str:
    """The one name of a variant, in tables, legends, the CLI and the HTML alike: its norm's
    label (:mod:`bnlab.lab.norms`), or ``name`` itself where no norm has that name."""
    return norm(name).label if name in NORMS else name


def color(name: str) -> str | None:
    """The colour of the norm ``name`` (a family's, ghost-K's, too); None where it has none
    (matplotlib then takes its next)."""
    return norm(name).color if name in NORMS else None


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 7.0, height: float = 4.5,
               **subplot_kw) -> tuple[Figure, np.ndarray]:
    """A figure and its axes (always an array), without pyplot."""
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes.ravel()


def percent_axis(ax: Axes, axis: str = "y") -> None:
    """Accuracies stored as fractions, shown in % (with decimals where ticks need them)."""
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(1.0, decimals=None))


def log_axis(ax: Axes, axis: str = "y") -> bool:
    """A log scale (with :func:`readable_log_axis`'s ticks) on ``axis`` where the lines drawn
    on ``ax`` hold a finite positive value; else the axis stays linear, with a note, and
    False (a run whose every network diverged has no loss to put on a log scale)."""
    values = [np.array([np.nan if v is None else v for v in
                        (line.get_ydata() if axis == "y" else line.get_xdata())], dtype=float)
              for line in ax.lines]
    if any(np.any(np.isfinite(v) & (v > 0)) for v in values):
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        readable_log_axis(ax, axis)
        return True
    ax.text(0.5, 0.5, "no finite value to plot: every network diverged", ha="center",
            va="center", transform=ax.transAxes, fontsize=9)
    return False


def readable_log_axis(ax: Axes, axis: str = "y") -> None:
    """Log-axis ticks as plain numbers (0.01, 0.1, 1, 10) where they fit, not 10^-2; on an
    axis spanning under two decades, 2x and 5x are labelled too, or one tick may remain."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if 0 < low and high < 100 * low:
        target.set_major_locator(LogLocator(subs=(1, 2, 5)))
    target.set_major_formatter(FuncFormatter(
        lambda v, _pos: f"{v:g}" if 1e-3 <= v <= 1e4 else LogFormatterSciNotation()(v)))
    target.set_minor_formatter(NullFormatter())


def plot_band(curves: np.ndarray, x: np.ndarray | None = None, ax: Axes | None = None,
              label: str | None = None, color: str | None = None, linestyle: str = "-",
              band: bool = True, log: bool = False) -> Axes:
    """Mean over seeds (rows of ``curves``) as a line, with its 95% t-interval as a band.

    ``log=True`` for positive quantities on a log axis: the geometric mean, with the interval
    taken on the logarithms (a band that cannot cross zero). NaN entries (a diverged seed's
    loss) are left out of the mean at that point.
    """
    return plot_mean_band(stats.band(curves, log), x, ax, label, color, linestyle, band)


def plot_mean_band(band: dict, x=None, ax: Axes | None = None, label: str | None = None,
                   color: str | None = None, linestyle: str = "-", show_band: bool = True) -> Axes:
    """A line and band from ``{"mean", "low", "high", "n"}`` lists (as in a summary)."""
    ax = ax if ax is not None else new_figure()[1][0]
    mean = np.asarray(band["mean"], dtype=np.float64)  # None (not finite) -> nan: a gap
    x = np.arange(1, len(mean) + 1) if x is None else np.asarray(x)
    n = band["n"]
    ax.plot(x, mean, color=color, linestyle=linestyle,
            label=None if label is None else f"{label} (n={n})")
    if show_band and n > 1:
        ax.fill_between(x, np.asarray(band["low"], dtype=np.float64),
                        np.asarray(band["high"], dtype=np.float64), color=color, alpha=0.2,
                        linewidth=0)
    return ax


def png_bytes(fig: Figure) -> bytes:
    """``fig`` laid out and encoded as PNG."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def page_scale(fig: Figure) -> float:
    """How much the report page shrinks ``fig``: images are shown at their own size, or
    the page's width where they are wider."""
    return min(1.0, PAGE_PX / (fig.get_figwidth() * DPI))


def smallest_text_px(fig: Figure) -> tuple[float, str]:
    """The smallest visible text of a drawn ``fig`` as the report page shows it: its font
    size in CSS pixels, and the text."""
    FigureCanvasAgg(fig).draw()  # lays out the tick labels
    sizes = [(t.get_fontsize() * DPI / 72 * page_scale(fig), t.get_text())
             for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return min(sizes)
