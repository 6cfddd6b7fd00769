"""Experiments from Python: :func:`run` trains one into a run directory and :func:`load` opens
one; both return a :class:`Result`, which shows a run as pandas tables, matplotlib figures
and its report.

    >>> import bnlab.lab
    >>> r = bnlab.lab.run("compare", epochs=20, seeds=3)   # doctest: +SKIP
    >>> r.metrics                # a row per network and evaluation   # doctest: +SKIP
    >>> r.summary["variants"]    # the summary's numbers, as tables   # doctest: +SKIP

:func:`run` takes the experiment's config fields as keywords, with the names, defaults and
checks of the ``bnlab run NAME`` options (``n_train=500`` for ``--n-train 500``), and builds
the run's report as the command does. The report is imported only when it is needed: the
lab never imports it at module level.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from .experiment_configs import experiment
from .fields import SESSION_FIELDS, Config, ConfigError, spelled
from .rundir import (CONFIG, METRICS, RESUMED, RUN, last_settings, new_run_dir, read_config,
                     read_rows, unclaim)

log = logging.getLogger(__name__)

__all__ = ["Result", "load", "metrics_frame", "rows_frame", "run"]

BOOKKEEPING = ("config", "done")  # row keys that say how a row was recorded, not what was measured


# -- tables -------------------------------------------------------------------------------------
def rows_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """A DataFrame of ``rows`` (dicts, as JSON gives them): a row each, in order; a column per
    key, in the order keys first appear. A column of integers is ``int64``, or pandas'
    nullable ``Int64`` where some rows lack the value or hold None (pandas would otherwise
    make it float); booleans likewise ``bool`` or ``boolean``; numbers mixing ints and floats,
    and a column with no value at all, ``float64`` (NaN where missing); any other column,
    lists included, ``object``."""
    rows = list(rows)
    names = list(dict.fromkeys(k for row in rows for k in row))
    return pd.DataFrame({k: _column([row.get(k) for row in rows]) for k in names},
                        index=pd.RangeIndex(len(rows)), columns=names)


def _column(values: list) -> pd.Series:
    present = [v for v in values if v is not None]
    gaps = len(present) < len(values)
    types = {type(v) for v in present}
    if present and types == {bool}:
        return pd.Series(values, dtype="boolean" if gaps else bool)
    if present and types == {int}:
        return pd.Series(values, dtype="Int64" if gaps else "int64")
    if types <= {int, float}:  # no value at all included: missing numbers
        return pd.Series([float("nan") if v is None else v for v in values], dtype="float64")
    return pd.Series(values, dtype=object)


def metrics_frame(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The measurements of the run in ``run_dir`` (finished or not): a row per network (unit)
    and evaluation, in the order of ``metrics.jsonl``, a column per row key but the
    bookkeeping (the config digest, the units' closing ``{"done": true}`` rows), and a
    boolean ``finished``: whether the row's unit finished (an interrupted run's last units
    may be partial). Integer columns stay integers (see :func:`rows_frame`). Nothing is
    written."""
    run_dir = Path(run_dir).expanduser()
    return _metrics(_rows(run_dir, read_config(run_dir)))


def _rows(run_dir: Path, config: Config) -> list[dict]:
    return read_rows(run_dir / METRICS, config.digest(), missing_ok=True)


def _metrics(rows: list[dict]) -> pd.DataFrame:
    finished = {r["unit"] for r in rows if r.get("done")}
    frame = rows_frame({k: v for k, v in r.items() if k not in BOOKKEEPING}
                       for r in rows if not r.get("done"))
    if "unit" not in frame:  # no measurement yet
        frame["unit"] = pd.Series(dtype=object)
    frame["finished"] = frame["unit"].isin(finished).astype(bool)
    return frame


# -- a run's result -----------------------------------------------------------------------------
class Result:
    """A run directory, read: its config, measurements, summary, figures and report.

    Attributes:
        run_dir: the run's folder (``config.json``, ``metrics.jsonl``, ``run.json``; a
            finished run's report beside them).
        config: the run's config (:class:`~bnlab.lab.fields.Config`), as stored.
        name: the experiment's name, such as ``"compare"``.
        metrics: a DataFrame, a row per network and evaluation (see :func:`metrics_frame`).
        summary: the summary's tables of numbers by name (see
            :func:`bnlab.report.frames.summary_frames`), e.g. ``summary["variants"]``.
        summary_dict: the summary itself, as ``summary.json`` holds it.
        figures: the report's figures by name, as matplotlib Figures.
        verdict: the report's measured statements, the verdict on the literature's claim
            among them.
        report_path: the run's ``report.html``, or None before a report was built.

    The summary is the run's ``summary.json`` where that was written after the run's last
    session (and the installed report can read it), else computed from the finished units'
    rows (:func:`bnlab.report.build_report` writes a fresh one). The summary, figures and
    page are computed when first asked for, then kept; a run without a finished unit has
    none (:class:`~bnlab.report.ReportError`), only its ``metrics``. Nothing is written into
    the run directory, so an archived, read-only run loads. In a notebook, a Result shows its
    report."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir).expanduser()
        self.config: Config = read_config(self.run_dir)
        self.name: str = self.config.name

    # -- measurements
    @cached_property
    def _rows(self) -> list[dict]:
        return _rows(self.run_dir, self.config)

    @cached_property
    def metrics(self) -> pd.DataFrame:
        return _metrics(self._rows)

    def units(self) -> tuple[int, int]:
        """(units finished, units recorded); units not yet started have no rows."""
        units = {r["unit"] for r in self._rows}
        return len({r["unit"] for r in self._rows if r.get("done")}), len(units)

    @property
    def complete(self) -> bool:
        """Whether the run's last session ended with every unit trained."""
        try:
            sessions = json.loads((self.run_dir / RUN).read_text(encoding="utf-8"))["sessions"]
            return sessions[-1].get("finished") is True
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
            return False

    @property
    def report_path(self) -> Path | None:
        path = self.run_dir / "report.html"
        return path if path.is_file() else None

    # -- summary, figures, page
    @cached_property
    def summary_dict(self) -> dict:
        from bnlab.report import build

        stored = self._stored_summary(build)
        return stored if stored is not None else self._analyzed(build)

    def _stored_summary(self, build) -> dict | None:
        """summary.json, where written after the last session and readable by the section."""
        path = self.run_dir / build.SUMMARY
        if not path.is_file() or path.is_symlink():
            return None
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if not (isinstance(stored, dict) and stored.get("experiment") == self.name
                    and stored.get("provenance") == build.provenance(self.run_dir)):
                return None
            build.section(self.name).measured(stored)  # an earlier bnlab's summary may not fit
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
                RecursionError):
            return None
        return stored

    def _analyzed(self, build) -> dict:
        finished, recorded = self.units()
        if not finished:
            raise build.ReportError(
                f"{self.run_dir}: no unit has finished yet ({recorded} started), so it has no "
                f"summary; {self._continue()} continues the run, and .metrics shows its rows")
        summary = build.full_summary(self.run_dir)[2]
        return json.loads(json.dumps(summary, sort_keys=True))  # lists, not tuples, as stored

    @cached_property
    def summary(self) -> dict[str, pd.DataFrame]:
        from bnlab.report.frames import summary_frames

        return summary_frames(self.summary_dict)

    @cached_property
    def figures(self) -> dict[str, Any]:
        from bnlab.report.build import section

        figures = section(self.name).figures(self.summary_dict)
        _inline_figures()
        return figures

    @property
    def verdict(self) -> list[str]:
        return list(self.summary_dict["measured"])

    @cached_property
    def _html(self) -> str:
        from bnlab.report.build import render

        # a notebook's output is narrower than the report's page: figures fit its width
        return ('<div class="bnlab-result"><style>.bnlab-result img {max-width: 100%; '
                'height: auto}</style>' + render(self.run_dir).body + "</div>")

    def _repr_html_(self) -> str:
        """The report's section, figures inline (the report as the installed bnlab renders
        the run's rows); for a run without a finished unit, what it holds so far."""
        import html

        from bnlab.report.build import ReportError

        try:
            self.summary_dict  # a run without a finished unit: says so, and how to go on
            return self._html
        except ReportError as exc:
            return f"<p><code>{html.escape(repr(self))}</code></p><p>{html.escape(str(exc))}</p>"

    def __repr__(self) -> str:
        finished, recorded = self.units()
        if self.complete:
            state = f"{finished} units, all finished"
        else:
            state = (f"{finished} of {recorded} units started finished, interrupted: "
                     f"{self._continue()} continues it")
        where = f"report {self.report_path}" if self.report_path else ".metrics, .summary"
        return f"<bnlab Result {self.name} in {self.run_dir}: {state}; {where}>"

    def _continue(self) -> str:
        return _call(self.config, self.run_dir)


def _inline_figures() -> None:
    """In a notebook, show matplotlib Figures as images where nothing shows them yet: the
    report draws without pyplot, so IPython's matplotlib support may not be set up (a
    display set up by ``%matplotlib`` is left as it is)."""
    from .progress import in_notebook

    if not in_notebook():
        return
    import IPython
    from matplotlib.figure import Figure

    from bnlab.report.figures import png_bytes

    png = IPython.get_ipython().display_formatter.formatters["image/png"]
    try:
        png.lookup_by_type(Figure)
    except KeyError:
        png.for_type(Figure, png_bytes)


def load(run_dir: str | os.PathLike) -> Result:
    """The run in ``run_dir``, finished or interrupted, read only: nothing is written (an
    archived, read-only run loads). ConfigError where it is not a run directory."""
    with spelled("python"):
        return Result(run_dir)


# -- running ----------------------------------------------------------------------------------
def run(name: str, out: str | os.PathLike | None = None, *,
        progress: bool | Callable[[int, int, str], None] = True, **fields: Any) -> Result:
    """Run the experiment ``name`` (see :func:`~bnlab.lab.experiment_configs.experiments`)
    with its config ``fields`` (as ``bnlab run NAME`` takes them: ``epochs=20, seeds=3,
    norms=("none", "bn")``; session fields such as ``workers`` and ``data_dir`` too), build
    its report, and return its :class:`Result`.

    Args:
        name: the experiment, e.g. ``"compare"``.
        out: the run directory. None (default): a new ``runs/NAME-DATASET-TIMESTAMP`` under
            the current folder. A folder holding a run of this experiment: given no field
            (but session ones) or the same fields, that run is continued (its finished work
            is kept); given other fields, ConfigError.
        progress: show progress (default): in a notebook a line under the cell, in a
            terminal a line on stderr; False shows nothing; a callable is called as
            ``progress(done, total, note)`` instead.
        **fields: the config's fields; a field left out takes its default.

    An interrupt (Ctrl-C, or the notebook's stop button) leaves a run that the call its note
    gives continues (the same call with the run's ``out=``; ``out=None`` would start a new
    run): the KeyboardInterrupt is raised again, with that note. Errors name
    the Python arguments (``seeds=0``, ``out``). Data-parallel runs (``nproc`` above 1) start
    processes, which the command line does: ``bnlab run NAME --nproc N``.

    ``device="cuda"`` (or ``"cuda:N"``) trains on a GPU; where torch sees none, or not that
    one, :class:`~bnlab.lab.fields.DeviceError` (a ConfigError) is raised before anything
    is made. A run continued without ``device`` goes on on its last session's device."""
    entry = experiment(name)
    cls = entry.config
    _check_keywords(cls, fields)
    if not (isinstance(progress, bool) or callable(progress)):
        raise TypeError(f"progress must be True, False or a callable(done, total, note) (got "
                        f"{progress!r})")
    with spelled("python"):
        config = _continued(name, out, fields) or cls(**fields)
        _refuse_processes(config)
        _load_trainer()  # before a folder is made: it takes a while
        from .device import resolve

        if out is None:  # a device that is not here, before a new folder is made
            resolve(config.device)
        run_dir, resume, claimed = _where(config, out)
        overrides = _session(config, fields, run_dir) if resume else {}
        if out is not None:  # the device given, or the one of the run's last session
            resolve(overrides.get("device", config.device),
                    last_session="device" in overrides and "device" not in fields)
        call = _call(config, run_dir, given=fields)
        if resume:
            log.info("continuing the run in %s", run_dir)
        return _train(config, run_dir, resume, claimed, overrides, progress, call)


def _train(config: Config, run_dir: Path, resume: bool, claimed: list[Path], overrides: dict,
           progress: Any, call: str) -> Result:
    import torch

    from .cluster import ClusterError
    from .progress import display
    from .runner import run_experiment
    from .train import Progress

    shown = None
    try:
        shown = display() if progress is True else None
        on_change = shown if progress is True else progress or None
        run_experiment(None if resume else config, run_dir, resume=resume,
                       progress=Progress(on_change), **overrides)
    except KeyboardInterrupt as exc:
        exc.add_note(_interrupted(run_dir, call))
        raise
    except (OSError, ClusterError, torch.cuda.OutOfMemoryError) as exc:  # a GPU's memory too
        if (run_dir / CONFIG).is_file():
            exc.add_note(f"bnlab: finished work in {run_dir} is saved; once the cause is "
                         f"mended, {call} continues the run")
        raise
    finally:
        if shown is not None:
            shown.close()
        unclaim(claimed)
    try:
        from bnlab.report import build_report  # after training: matplotlib takes a while

        build_report(run_dir)
    except KeyboardInterrupt as exc:
        exc.add_note(f"bnlab: the run in {run_dir} is complete, its report not written: "
                     f"bnlab.report.build_report({str(run_dir)!r}) writes it, and "
                     f"bnlab.lab.load({str(run_dir)!r}) reads the run")
        raise
    return Result(run_dir)


def _load_trainer() -> None:
    """Import the trainer (torch) with interrupts held: one would break torch's import."""
    from . import signals

    with signals.held():
        import bnlab.lab.runner  # noqa: F401


def _continued(name: str, out: str | os.PathLike | None, fields: dict) -> Config | None:
    """The stored config of the run of ``name`` in ``out`` where no field but session ones is
    given: ``run(name, out=DIR)`` continues the run there, whatever its fields."""
    if out is None or any(k not in SESSION_FIELDS for k in fields) \
            or not isinstance(out, (str, os.PathLike)) or str(out) == "" \
            or not (Path(out).expanduser() / CONFIG).is_file():
        return None
    stored = read_config(Path(out).expanduser())
    return stored if stored.name == name else None


def _check_keywords(cls: type[Config], fields: dict) -> None:
    """TypeError for a keyword that is no field of ``cls``, naming the fields there are."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in fields if k not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TypeError(f"run() got an unexpected keyword argument {unknown[0]!r} for the "
                        f"{cls.name} experiment{hint}; its fields are {', '.join(names)}")


def _refuse_processes(config: Config) -> None:
    nproc = getattr(config, "nproc", 1)
    world = os.environ.get("WORLD_SIZE", "1")
    if nproc > 1 or world != "1":
        how = f"nproc={nproc}" if nproc > 1 else f"WORLD_SIZE={world} (a launcher's process)"
        raise ConfigError(f"{how}: a data-parallel run starts processes, which bnlab.lab.run "
                          f"does not; run it from a terminal: bnlab run {config.name} --nproc "
                          f"{max(nproc, 2)} ... (then bnlab.lab.load(RUN_DIR) reads it)")


def _where(config: Config, out: str | os.PathLike | None) -> tuple[Path, bool, list[Path]]:
    """(run directory, whether it holds this run to continue, folders made for it here)."""
    if out is None:
        run_dir, made = new_run_dir(config)
        return run_dir, False, made
    if not isinstance(out, (str, os.PathLike)) or str(out) == "":
        raise ConfigError(f"out must be a folder's path, or None for a new one under runs/ "
                          f"(got {out!r})")
    run_dir = Path(out).expanduser()
    if not (run_dir / CONFIG).is_file():
        return run_dir, False, []  # a new run: the runner checks the folder
    stored = read_config(run_dir)
    if stored.name == config.name and stored.digest() == config.digest():
        return run_dir, True, []
    raise ConfigError(f"out={str(run_dir)!r} holds {_other(stored, config)}; choose another "
                      f"out for this one, or read that run with bnlab.lab.load({str(run_dir)!r})"
                      + (f", or continue it with {_call(stored, run_dir)}"
                         if stored.name == config.name else ""))


def _other(stored: Config, config: Config) -> str:
    """What a run directory holds that is not ``config``'s run, and how they differ."""
    if stored.name != config.name:
        return f"a {stored.name} run"
    names = dict.fromkeys([*stored.to_dict(), *config.to_dict()])  # added fields: if set
    diff = [f"{k}={getattr(stored, k)!r} there, {getattr(config, k)!r} here"
            for k in names if getattr(stored, k, None) != getattr(config, k, None)]
    return f"a {stored.name} run of another configuration ({'; '.join(diff)})"


def _session(config: Config, fields: dict, run_dir: Path) -> dict:
    """The session fields for continuing the run in ``run_dir``: those given, and the last
    session's :data:`~bnlab.lab.rundir.RESUMED` settings unless given (as ``bnlab ...
    --resume`` does)."""
    given = {k: getattr(config, k) for k in fields if k in SESSION_FIELDS}
    for name, value in last_settings(run_dir).items():
        if name in RESUMED and name not in given and hasattr(config, name) and value is not None:
            given[name] = value
    return given


def _call(config: Config, run_dir: Path, given: dict | None = None) -> str:
    """The call that continues the run of ``config`` in ``run_dir``: its fields that are
    not at their defaults (and the session fields ``given``)."""
    defaults = type(config)().to_dict()
    stored = config.to_dict()
    args = {k: getattr(config, k) for k, v in stored.items() if defaults.get(k) != v}
    args.update((k, getattr(config, k)) for k in (given or {}) if k in SESSION_FIELDS)
    shown = "".join(f", {k}={v!r}" for k, v in args.items())
    return f"bnlab.lab.run({config.name!r}, out={str(run_dir)!r}{shown})"


def _interrupted(run_dir: Path, call: str) -> str:
    if (run_dir / CONFIG).is_file():
        return (f"bnlab: the run in {run_dir} is saved as far as it went; {call} continues "
                f"it, and bnlab.lab.load({str(run_dir)!r}) reads what it holds")
    return "bnlab: the run had not started; nothing was written"


