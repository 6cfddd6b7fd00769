"""Exports of a run: its metrics and summary tables as CSV files, its metrics as TensorBoard
event files (``bnlab export RUN --csv DIR``, ``bnlab export RUN --tensorboard DIR``).

Both read the run directory only, so an archived, read-only run exports, and both write a
new or empty folder, whole: the files are written into a hidden folder beside it
(``.NAME.XXXXXXXX.tmp``), which then takes its name. An export that fails leaves nothing
(one killed outright leaves that hidden folder), and the folder is never mixed with files
of an earlier export; exporting again means another folder, or removing the old one.

* :func:`export_csv`: ``metrics.csv``, a row per unit and evaluation
  (:func:`bnlab.lab.results.metrics_frame`), and each table of the run's summary as
  ``NAME.csv`` (:func:`bnlab.report.frames.summary_frames`), the tables
  :attr:`bnlab.lab.results.Result.summary` holds: from the run's ``summary.json`` where it
  was written after the run's last session, else analyzed from the finished units' rows.
  No index column; columns in the frames' order; floats written to read back exactly; a
  list in a cell (ics's percentiles, a value per seed) as JSON text. A run in which no unit
  has finished yet has no summary: its metrics are exported alone (and a warning logged).
* :func:`export_tensorboard`: a TensorBoard run per unit (:class:`bnlab.lab.tblog.ScalarLog`
  says which values become scalars), for ``tensorboard --logdir DIR``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd

from bnlab._io import TMP_SUFFIX
from bnlab.lab.fields import ConfigError
from bnlab.lab.results import Result
from bnlab.lab.rundir import METRICS, read_config, read_rows
from bnlab.lab.tblog import ScalarLog, check_log_dir, scalars
from .build import ReportError

log = logging.getLogger(__name__)

__all__ = ["export_csv", "export_tensorboard"]

METRICS_CSV = "metrics.csv"
_TABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a summary table's file name stem


def export_csv(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write the run's metrics and summary tables as CSV files into ``out_dir`` (new or
    empty); returns their paths, ``metrics.csv`` first, then the tables in the report's
    order."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    try:
        result = Result(run_dir)
        frames = {"metrics": result.metrics}  # the record read, and checked
    except ConfigError as exc:
        raise ReportError(str(exc)) from None
    _check_out(out_dir)
    if result.units()[0]:
        for name, frame in result.summary.items():
            if not _TABLE_NAME.fullmatch(name) or name == "metrics":
                raise ReportError(f"the {result.name} summary has a table {name!r}, which "
                                  f"cannot name its CSV file beside {METRICS_CSV}")
            frames[name] = frame
    else:
        log.warning("%s: no unit has finished yet, so the run has no summary tables; "
                    "exporting %s alone", run_dir, METRICS_CSV)

    def write(folder: Path) -> None:
        for name, frame in frames.items():
            _csv_cells(frame).to_csv(folder / f"{name}.csv", index=False)

    _write_folder(out_dir, write)
    return [out_dir / f"{name}.csv" for name in frames]


def export_tensorboard(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write the run's metrics as TensorBoard event files into ``out_dir`` (new or empty), a
    TensorBoard run per unit; returns the units' folders, in the record's order. Every
    recorded row is written, those of units still training included."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    rows = _rows(run_dir)
    try:
        check_log_dir(out_dir)
    except ValueError as exc:
        raise ReportError(str(exc)) from None
    units = list(dict.fromkeys(r["unit"] for r in rows if scalars(r)))
    if not units:
        raise ReportError(f"{run_dir / METRICS} holds no value measured at a training step "
                          "(TensorBoard plots scalars against steps); export it as CSV "
                          "instead")

    def write(folder: Path) -> None:
        with ScalarLog(folder, append=True, flush=False) as tb:  # the hidden folder, made empty
            for row in rows:
                tb.add(row)

    _write_folder(out_dir, write)
    return [out_dir / unit for unit in units]


def _csv_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each list or dict in a cell as JSON text (a CSV cell holds text)."""
    nested = [c for c in frame.columns if frame[c].dtype == object
              and frame[c].map(lambda v: isinstance(v, (list, dict))).any()]
    if not nested:
        return frame
    frame = frame.copy()
    for c in nested:
        frame[c] = frame[c].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    return frame


def _rows(run_dir: Path) -> list[dict]:
    """Every row of the run, checked against its config; a path that is not a run is named
    with what to give instead."""
    try:
        return read_rows(run_dir / METRICS, read_config(run_dir).digest())
    except ConfigError as exc:
        raise ReportError(str(exc)) from None


def check_targets(csv_dir: str | os.PathLike | None,
                  tensorboard_dir: str | os.PathLike | None) -> None:
    """Check, before either is written, that the folders of an export to both formats can
    take it: each new or empty, and not one folder for both."""
    if csv_dir is not None and tensorboard_dir is not None \
            and os.path.abspath(csv_dir) == os.path.abspath(tensorboard_dir):
        raise ReportError(f"{csv_dir} is given for both the CSV and the TensorBoard files; "
                          "give each its own folder")
    if csv_dir is not None:
        _check_out(Path(csv_dir))
    if tensorboard_dir is not None:
        try:
            check_log_dir(tensorboard_dir)
        except ValueError as exc:
            raise ReportError(str(exc)) from None


def _check_out(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"{out_dir} exists and is not a folder; export into a new or empty "
                          "folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ReportError(f"{out_dir} already holds files; export into a new or empty folder "
                          "(an export is never mixed with files there before)")


def _write_folder(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Fill a hidden folder beside ``out_dir`` through ``write(folder)``, then give it
    ``out_dir``'s name: ``out_dir`` ends up holding the whole export, or, if anything fails,
    stays as it was."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    tmp.mkdir()
    try:
        write(tmp)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty, as checked: not every system renames onto a folder
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s", out_dir)
