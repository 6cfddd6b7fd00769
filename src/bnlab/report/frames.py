"""A run's summary as tidy pandas tables: numbers, not the report's formatted strings.

A report section's ``analyze`` returns a nested summary (``summary.json``): mappings of
variants, sets or metrics, records of numbers, intervals (``{"mean", "low", "high", "n",
"confidence"}``), curves (``{"mean": [...], "low": [...], "high": [...], "n"}``) and lists of
points. :func:`summary_frames` flattens any such summary by its shape alone, so a user's own
section's summary converts too:

* the top-level scalars (``epochs``, ``threshold``, ``experiment``, ...) are one row of the
  table ``"summary"``; the prose (``expected``, ``measured``, ``setting``) is left out (see
  :attr:`bnlab.lab.results.Result.verdict`);
* every other top-level key is a table of that name; a nested part that is not one row's
  worth is a table named by its key path (``"variants.test_acc"``,
  ``"epochs_to_target.variants"``), its rows carrying the columns that locate them;
* a mapping adds a column holding its keys: ``variant`` where the keys are the summary's
  variants (its ``norms`` or ``arms``), the singular of another top-level list of names they
  come from (``set`` for ``sets``), ``metric`` where its values are statistics (intervals,
  curves, or lists of them), else the singular of its own key (``cells`` -> ``cell``);
* a record (numbers beside intervals and the like) is one row: an interval or other dict of
  numbers within it becomes columns ``name.mean``, ``name.low``, ...; a list of numbers
  (one per seed, say) stays one cell holding the list;
* a curve is a long table, a row per point, along the summary's own axis: its ``steps`` or
  ``batch_sizes`` where one has the curve's length, else ``epoch`` 1..N where the summary's
  ``epochs`` is N, else ``index`` 0..N-1;
* a list of points adds a column: the summary's ``values`` (a sweep's), ``early_steps`` or
  ``batch_sizes`` where one has the list's length, else ``index``; a list of
  ``[name, number]`` pairs reads as the mapping it spells;
* a top-level list of numbers or names is a one-column table of that name (``values``,
  ``norms``, ``theory``).

Every number of the summary lands in some table. Integer columns stay integers (pandas'
nullable ``Int64`` where a row lacks the value); a column of lists stays ``object``.
"""

from __future__ import annotations

import numbers
from typing import Any

import pandas as pd

from bnlab.lab.results import rows_frame

__all__ = ["ROOT", "summary_frames"]

ROOT = "summary"  # the table of the top-level scalars
PROSE = ("expected", "measured", "setting")  # words, not numbers
VARIANT_LISTS = ("norms", "arms")  # top-level lists whose names a "variant" column holds
SERIES_AXES = (("steps", "step"), ("batch_sizes", "batch_size"))  # a curve's x, in order
POINT_AXES = (("values", "value"), ("early_steps", "step"), ("batch_sizes", "batch_size"))
FIRST = ("mean", "low", "high", "n")  # a statistic's columns in this order, the rest after


def summary_frames(summary: dict) -> dict[str, pd.DataFrame]:
    """The tables of a section's ``summary`` (as ``analyze`` returns it, or summary.json
    holds it), by name: ``"summary"`` for its top-level scalars, else the key path of the
    part each holds; see the module's docstring for how each shape becomes a table."""
    if not isinstance(summary, dict):
        raise TypeError(f"summary must be a dict, as summary.json holds (got "
                        f"{type(summary).__name__})")
    flat = _Flattener(summary)
    root = {}
    for key, value in summary.items():
        if key in PROSE:
            continue
        if _is_scalar(value):
            root[key] = value
        else:
            flat.emit(str(key), {}, value, str(key))
    tables = {ROOT: [root]} if root else {}
    tables.update(flat.tables)
    return {name: rows_frame(rows) for name, rows in tables.items()}


class _Flattener:
    """Rows of every table, by table name, from one summary's parts."""

    def __init__(self, summary: dict) -> None:
        self.summary = summary
        self.tables: dict[str, list[dict]] = {}
        self.names: list[tuple[set, str]] = []  # (names, the column that holds them)
        for key, value in summary.items():
            if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                column = "variant" if key in VARIANT_LISTS else _singular(key)
                self.names.append((set(value), column))
        self.names.sort(key=lambda entry: entry[1] != "variant")  # variants first

    def emit(self, table: str, where: dict, node: Any, label: str) -> None:
        """Add ``node``'s rows to ``table``; ``where`` holds the columns that locate it,
        ``label`` names its value where it is one number."""
        if _is_scalar(node):
            self._row(table, {**where, label: node})
        elif isinstance(node, dict):
            self._dict(table, where, node, label)
        elif _is_scalars(node):
            for value in node:
                self._row(table, {**where, label: value})
        elif _pairs(node) is not None:
            self.emit(table, where, _pairs(node), label)
        else:
            column, coords = self._axis(where, len(node), POINT_AXES, label)
            for i, item in enumerate(node):
                self.emit(table, {**where, column: coords[i]}, item, label)

    def _dict(self, table: str, where: dict, node: dict, label: str) -> None:
        column = self._names_column(node)
        if column is not None or _is_mapping(node):
            column = _fresh(column or self._key_column(node, label), where)
            for key, value in node.items():
                self.emit(table, {**where, column: key}, value, label)
        elif _is_series(node):
            self._series(table, where, _ordered(node))
        elif all(_is_scalar(v) for v in node.values()):
            self._row(table, {**where, **_ordered(node)})
        else:
            self._record(table, where, node)

    def _record(self, table: str, where: dict, node: dict) -> None:
        """One row of the record's numbers; its larger parts go to tables of their own."""
        row = dict(where)
        for key, value in node.items():
            key = str(key)
            if _is_scalar(value) or _is_scalars(value):
                row[key] = value
            elif isinstance(value, dict) and all(_is_scalar(v) for v in value.values()):
                row.update((f"{key}.{k}", v) for k, v in _ordered(value).items())
            else:
                self.emit(f"{table}.{key}", where, value, key)
        if len(row) > len(where):
            self._row(table, row)

    def _series(self, table: str, where: dict, node: dict) -> None:
        """A row per point of a curve: its lists side by side, its scalars (n) repeated."""
        length = next(len(v) for v in node.values() if isinstance(v, list))
        column, coords = self._axis(where, length, SERIES_AXES, "", epochs=True)
        for i in range(length):
            self._row(table, {**where, column: coords[i],
                              **{k: v[i] if isinstance(v, list) else v for k, v in node.items()}})

    def _axis(self, where: dict, length: int, axes: tuple, label: str,
              epochs: bool = False) -> tuple[str, list]:
        """The column and coordinates along a list of ``length``: the summary's own list of
        that length (the first of ``axes`` it has, not the list itself), else epochs 1..N
        (with ``epochs``, where the summary ran N), else positions."""
        for key, column in axes:
            coords = self.summary.get(key)
            if key != label and isinstance(coords, list) and len(coords) == length \
                    and all(_is_number(c) for c in coords):
                return _fresh(column, where), coords
        if epochs and self.summary.get("epochs") == length and _is_number(length):
            return _fresh("epoch", where), list(range(1, length + 1))
        return _fresh("index", where), list(range(length))

    def _names_column(self, node: dict) -> str | None:
        """``variant`` (or another list's singular) where every key is one of its names."""
        keys = set(node)
        return next((column for names, column in self.names if keys <= names), None)

    @staticmethod
    def _key_column(node: dict, label: str) -> str:
        values = list(node.values())
        stats = all(_is_stat(v) or (isinstance(v, list) and v and all(map(_is_stat, v)))
                    for v in values)
        return "metric" if stats else _singular(label) or "key"

    def _row(self, table: str, row: dict) -> None:
        self.tables.setdefault(table, []).append(row)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, numbers.Number))


def _is_scalars(value: Any) -> bool:
    return isinstance(value, list) and all(map(_is_scalar, value))


def _is_series(node: dict) -> bool:
    """Two or more lists of numbers of one length (a curve's mean, low and high), beside
    scalars only."""
    lists = [v for v in node.values() if isinstance(v, list)]
    return (len(lists) >= 2 and len({len(v) for v in lists}) == 1 and len(lists[0]) > 0
            and all(_is_number(x) or x is None for v in lists for x in v)
            and all(isinstance(v, list) or _is_scalar(v) for v in node.values()))


def _is_stat(value: Any) -> bool:
    """An interval, a curve or another dict of numbers: a statistic of one quantity."""
    return isinstance(value, dict) and (
        _is_series(value) or bool(value) and all(_is_scalar(v) for v in value.values()))


def _kind(value: Any) -> str:
    if _is_scalar(value):
        return "scalar"
    if isinstance(value, list):
        return "numbers" if _is_scalars(value) else "list"
    if _is_series(value):
        return "series"
    return "numbers" if all(_is_scalar(v) for v in value.values()) else "dict"


def _is_mapping(node: dict) -> bool:
    """A dict keyed by names (variants, sets, metrics): its values all of one kind, none a
    scalar (a dict of scalars is one record)."""
    kinds = {_kind(v) for v in node.values()}
    return len(kinds) == 1 and "scalar" not in kinds


def _pairs(node: list) -> dict | None:
    """``[["none", 0], ["bn", 2]]`` as ``{"none": 0, "bn": 2}``; None for any other list."""
    if node and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                    and _is_scalar(p[1]) for p in node):
        pairs = dict(node)
        return pairs if len(pairs) == len(node) else None
    return None


def _ordered(node: dict) -> dict:
    """A statistic's mean, low, high and n first (summary.json sorts its keys)."""
    return dict(sorted(node.items(), key=lambda kv: FIRST.index(kv[0]) if kv[0] in FIRST
                       else len(FIRST)))


def _singular(name: str) -> str:
    return name[:-1] if name.endswith("s") and not name.endswith("ss") else name


def _fresh(column: str, where: dict) -> str:
    """``column``, or ``column_2``, ... where a locating column already has that name."""
    name, n = column, 1
    while name in where:
        n += 1
        name = f"{column}_{n}"
    return name
