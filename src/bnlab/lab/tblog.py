"""TensorBoard event files of a run's rows: one TensorBoard run per unit.

:class:`ScalarLog` turns the rows a run writes to ``metrics.jsonl`` into TensorBoard scalars,
as they come (a live run: a listener of :class:`~bnlab.lab.rundir.Record`) or afterwards
(``bnlab export RUN --tensorboard DIR``). Each unit (one trained network, e.g. ``bn-seed0``)
is a TensorBoard run of its own, the folder ``LOGDIR/<unit>``, so TensorBoard's run selector
lists the networks, and its smoothing and run comparison work on them.

What a row becomes (:func:`scalars`): each numeric value (an int or a float) is a scalar
whose tag is its key (``test_acc``), at the global step given by the row's ``step``, so curves
line up across units. Left out are

* the bookkeeping keys ``unit``, ``config``, ``done`` and ``step`` itself;
* the keys that name the unit, spelled in its name (``seed`` in ``bn-seed0``, ``lr`` in
  ``lr0.01-bn-seed0``): they are constant over the unit's curves;
* bools (``diverged``), text (``norm``, noise's ``set``), lists (ics's percentiles ``p15``,
  ``p50``, ``p85``, noise's ``batch_means``) and nulls (metrics.jsonl's non-finite floats);
* whole rows without an integer ``step`` (noise's rows, measured per batch size).

TensorBoard stores scalars as float32. Event files are written with tensorboardX (bnlab's
``tensorboard`` extra), imported only when a :class:`ScalarLog` is made.
"""

from __future__ import annotations

import logging
import numbers
import os
import secrets
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["ScalarLog", "TensorBoardMissing", "check_log_dir", "scalars"]

EXTRA = "pip install 'bnlab[tensorboard]'"
BOOKKEEPING = frozenset({"unit", "config", "done", "step"})


class TensorBoardMissing(ImportError, ValueError):
    """tensorboardX, bnlab's ``tensorboard`` extra, is not installed (an ImportError for
    Python callers; a ValueError, the user's to mend, for the command line)."""


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of ``row`` by tag (see the module docstring for what is left
    out); none for a row without an integer ``step``."""
    step = row.get("step")
    if not isinstance(step, numbers.Integral) or isinstance(step, bool):
        return {}
    unit = f"-{row.get('unit')}-"
    return {key: float(value) for key, value in row.items()
            if key not in BOOKKEEPING and isinstance(value, numbers.Real)
            and not isinstance(value, bool) and f"-{key}{value}-" not in unit}


def check_log_dir(log_dir: str | os.PathLike, append: bool = False) -> Path:
    """``log_dir`` as a Path, if a :class:`ScalarLog` may write there: a folder or a name not
    yet taken, and unless ``append``, one that holds nothing. TensorBoard reads every event
    file of a run's folder, so points written there twice would show twice."""
    path = Path(log_dir)
    if not str(log_dir).strip():
        raise ValueError("the TensorBoard folder is an empty path; give a folder name")
    if path.exists() and not path.is_dir():
        raise ValueError(f"TensorBoard folder {path} exists and is not a folder; give a new or "
                         "empty folder")
    if not append and path.is_dir() and any(path.iterdir()):
        raise ValueError(f"TensorBoard folder {path} already holds files; give a new or empty "
                         "folder (TensorBoard would show the points written there before "
                         "together with these)")
    return path


def _tensorboardx() -> tuple[Any, Any, Any]:
    """tensorboardX's synchronous event writer and its Event and Summary protos."""
    try:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
    except ImportError as exc:
        raise TensorBoardMissing("TensorBoard event files are written with tensorboardX, "
                                 f"bnlab's tensorboard extra; install it with {EXTRA}") from exc
    return EventsWriter, Event, Summary


def _unit_folder(unit: Any) -> str:
    """The unit's name as a folder name; refused where it would lead elsewhere."""
    if not isinstance(unit, str) or unit in ("", ".", "..") or any(
            c in unit for c in ("/", "\\", "\0")):
        raise ValueError(f"unit {unit!r} cannot name a TensorBoard run folder (expected a "
                         "name without path separators)")
    return unit


class ScalarLog:
    """Writes rows (:meth:`add`) as TensorBoard scalars into ``log_dir``, a folder per unit.

    Args:
        log_dir: the folder TensorBoard is pointed at (``tensorboard --logdir LOG_DIR``);
            created with the first scalar.
        append: add to a folder that holds files already (a resumed run continuing its own
            log); without it such a folder is refused (:func:`check_log_dir`), since writing
            the same rows into it twice would show every point twice.
        flush: write each row through to disk as it is added (default), so a TensorBoard
            watching the folder shows a point as soon as its row is recorded; False for an
            export written in one go (each file is written out when it is closed: an
            ``fsync`` per row would take most of the time).

    Every unit gets one event file per :class:`ScalarLog` in its folder (a resumed run adds
    one), written synchronously, without threads. A unit's file is closed on its ``"done":
    true`` row, so a run keeps open only the files of the units it trains at the time. Rows
    may come from several threads.

    Example::

        with ScalarLog("tb/compare") as tb:
            for row in read_rows(run_dir / "metrics.jsonl"):
                tb.add(row)
    """

    def __init__(self, log_dir: str | os.PathLike, append: bool = False,
                 flush: bool = True) -> None:
        self.log_dir, self.flush = check_log_dir(log_dir, append), flush
        self._writer, self._event, self._summary = _tensorboardx()
        self._files: dict[str, Any] = {}  # unit -> its open EventsWriter
        self._lock = threading.Lock()
        self._closed = False
        # event files are named by the second they are opened and the host; TensorBoard
        # reads a folder's files in the order of their names, and a second file of one name
        # would replace the first: the nanosecond and the process keep a resumed run's
        # files after its earlier ones, and every session's apart
        self._suffix = f".{time.time_ns()}.{os.getpid()}.{secrets.token_hex(2)}"

    def add(self, row: dict[str, Any]) -> int:
        """Write ``row``'s scalars (:func:`scalars`) into its unit's run; returns how many.
        A ``"done": true`` row closes the unit's file."""
        values = scalars(row)
        with self._lock:
            if self._closed:
                raise ValueError(f"this ScalarLog of {self.log_dir} is closed")
            unit = row.get("unit")
            if values:
                events = self._files[unit] if unit in self._files else self._open(unit)
                summary = self._summary(value=[self._summary.Value(tag=k, simple_value=v)
                                               for k, v in values.items()])
                events.write_event(self._event(wall_time=time.time(), step=int(row["step"]),
                                               summary=summary))
                if self.flush:
                    events.flush()
            if row.get("done") is True and unit in self._files:
                self._files.pop(unit).close()
        return len(values)

    def _open(self, unit: Any) -> Any:
        folder = self.log_dir / _unit_folder(unit)
        folder.mkdir(parents=True, exist_ok=True)
        events = self._files[unit] = self._writer(str(folder / "events"), self._suffix)
        return events

    def close(self) -> None:
        """Close every unit's file (their points are on disk); adding is refused after."""
        with self._lock:
            self._closed = True
            files, self._files = list(self._files.values()), {}
        for events in files:
            events.close()

    def __enter__(self) -> "ScalarLog":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ScalarLog({str(self.log_dir)!r})"
