"""How closely two runs of one configuration agree: above all a run on a GPU against the same
run on the CPU (docs/lab.md, "On a GPU").

:func:`compare_runs` matches the two records row by row (each unit's rows in order) and
measures how far each measured number of one lies from the other's: accuracies (keys ending
in ``acc``) by their difference, every other number by its difference relative to the
larger of the two (a list of numbers, such as ``ics``'s percentiles of every unit of a
layer, relative to its largest: a percentile near 0 is measured against the layer's
scale). Everything else must be equal: the units, their rows' keys, steps and epochs,
integers (a count of features, a batch size), and whether and when a unit diverged.

The same network trained in two arithmetics (a GPU's products, reductions and ``exp``
against the CPU's) starts from the same weights and trains on the same batches, but its
rounding differs from the first step on, and training carries those differences along:
networks that train stably stay as close as the rounding (docs/lab.md, "On a GPU", has the
measurements), while those whose training amplifies it (BN over two or four examples, BN
of activations whose variance is near the rounding, learning rates at the edge of
divergence) part further. :data:`TOLERANCE` is for the former.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fields import ConfigError
from .rundir import METRICS, read_config, read_rows

__all__ = ["Agreement", "TOLERANCE", "compare_runs"]

# acc: largest difference of an accuracy (a fraction: 0.01 is a point); rel: largest
# difference of any other number relative to the larger of the two; floor: differences
# below it always agree (a loss range of 1e-9 against 2e-9 is no disagreement). Two float32
# arithmetics that differ by rounding (on the CPU: the stacked products summed in another
# order, BN in torch ops instead of the kernels) gave on the default compare losses within
# 5e-7 relative and equal accuracies; rel allows 2000 times that.
TOLERANCE = {"acc": 0.01, "rel": 1e-3, "floor": 1e-6}
_NOT_MEASURED = ("unit", "config")  # a row's name and its config's digest: compared apart


@dataclass(frozen=True)
class Agreement:
    """The outcome of :func:`compare_runs`: ``ok`` when every number agrees within
    ``tolerance`` and nothing else differs. ``worst`` holds, per measured key, the largest
    deviation (difference for accuracies, relative difference otherwise) and where it lies
    (``unit@step``); ``failures`` says what disagrees, one line each; ``compared`` counts the
    numbers compared."""

    runs: tuple[str, str]
    compared: int
    worst: dict[str, tuple[float, str]]
    failures: tuple[str, ...]
    tolerance: dict[str, float] = field(default_factory=lambda: dict(TOLERANCE))

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        head = (f"{self.runs[0]} and {self.runs[1]}: {self.compared} numbers compared, "
                + ("they agree" if self.ok else f"{len(self.failures)} disagree")
                + f" (accuracies within {self.tolerance['acc']:g}, other numbers within "
                f"{self.tolerance['rel']:g} relative)")
        width = max((len(k) for k in self.worst), default=0)
        lines = [f"  {k:<{width}}  {'abs' if _is_accuracy(k) else 'rel'} {d:.3g} at {where}"
                 for k, (d, where) in sorted(self.worst.items())]
        return "\n".join([head, *lines, *(f"  {f}" for f in self.failures[:20])])


def compare_runs(a: str | os.PathLike, b: str | os.PathLike, *, acc: float | None = None,
                 rel: float | None = None, floor: float | None = None) -> Agreement:
    """How closely the runs in the run directories ``a`` and ``b`` agree: two runs of one
    experiment and configuration (the same digest; the device is not part of it), such as
    one trained with ``device="cpu"`` and one with ``device="cuda"``. The tolerances
    default to :data:`TOLERANCE`: ``acc`` for accuracies (a fraction), ``rel`` for every
    other number (relative), differences below ``floor`` agreeing always. ConfigError if
    the two are not runs of one configuration."""
    tolerance = dict(TOLERANCE)
    tolerance.update({k: v for k, v in (("acc", acc), ("rel", rel), ("floor", floor))
                      if v is not None})
    for name, value in tolerance.items():
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number of 0 or more (got {value!r})")
    dirs = (Path(a), Path(b))
    configs = [read_config(d) for d in dirs]
    if configs[0].name != configs[1].name or configs[0].digest() != configs[1].digest():
        raise ConfigError(f"{a} and {b} are not runs of one configuration ({configs[0].name} "
                          f"{configs[0].digest()} and {configs[1].name} "
                          f"{configs[1].digest()}); compare runs of one command, the device "
                          "aside")
    rows = [read_rows(d / METRICS, configs[0].digest()) for d in dirs]
    return _compare(rows[0], rows[1], (str(a), str(b)), tolerance)


def _compare(rows_a: list[dict], rows_b: list[dict], runs: tuple[str, str],
             tolerance: dict[str, float]) -> Agreement:
    by_unit = [_units(rows) for rows in (rows_a, rows_b)]
    failures: list[str] = []
    worst: dict[str, tuple[float, str]] = {}
    compared = 0
    for unit in dict.fromkeys([*by_unit[0], *by_unit[1]]):
        mine, theirs = by_unit[0].get(unit), by_unit[1].get(unit)
        if mine is None or theirs is None:
            failures.append(f"unit {unit} is recorded in {runs[0] if theirs is None else runs[1]} "
                            "only")
            continue
        if len(mine) != len(theirs):
            failures.append(f"unit {unit}: {len(mine)} rows against {len(theirs)}")
            continue
        for i, (row_a, row_b) in enumerate(zip(mine, theirs), 1):
            where = f"{unit}@{row_a['step']}" if "step" in row_a else f"{unit}#{i}"
            if row_a.keys() != row_b.keys():
                failures.append(f"{where}: keys {sorted(row_a)} against {sorted(row_b)}")
                continue
            for key in row_a:
                if key in _NOT_MEASURED:
                    continue
                count, deviation, ok = _values(key, row_a[key], row_b[key], tolerance)
                compared += count
                if deviation is not None and deviation >= worst.get(key, (-1.0, ""))[0]:
                    worst[key] = (deviation, where)
                if not ok:
                    failures.append(f"{where}: {key} {row_a[key]!r} against {row_b[key]!r}")
    return Agreement(runs, compared, worst, tuple(failures), tolerance)


def _units(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["unit"], []).append(row)
    return out


def _is_accuracy(key: str) -> bool:
    return key.endswith("acc")


def _values(key: str, a: Any, b: Any, tolerance: dict[str, float],
            scale: float | None = None) -> tuple[int, float | None, bool]:
    """(numbers compared, the largest deviation or None, whether they agree) of one key's
    values in two matched rows; ``scale``: what a difference is relative to (default: the
    larger of the two numbers; for a list, its largest number)."""
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return 0, None, False
        numbers = [abs(v) for v in (*a, *b) if _is_float(v)]
        parts = [_values(key, x, y, tolerance, max(numbers, default=0.0)) for x, y in zip(a, b)]
        deviations = [d for _, d, _ in parts if d is not None]
        return (sum(n for n, _, _ in parts), max(deviations, default=None),
                all(ok for _, _, ok in parts))
    if not (_is_float(a) and _is_float(b)):
        return 0, None, type(a) is type(b) and a == b  # keys, flags, integers, None (NaN)
    difference = abs(a - b)
    if _is_accuracy(key):
        return 1, difference, difference <= tolerance["acc"]
    scale = max(abs(a), abs(b)) if scale is None else scale
    deviation = difference / scale if scale > 0 else 0.0
    return 1, deviation, difference <= tolerance["floor"] or deviation <= tolerance["rel"]


def _is_float(v: Any) -> bool:
    return isinstance(v, float) and math.isfinite(v)
