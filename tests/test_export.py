"""Exports of a run (CSV, TensorBoard) and TensorBoard logging while a run trains: what is
written matches the record, read back with pandas and with TensorBoard's own reader; the run
directory is only read; a run's listeners get each row once, across a resume too, and one
that fails does not stop the run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bnlab.lab.runner as runner
import bnlab.report.export as export
from bnlab.lab.experiment_configs import CompareConfig
from bnlab.lab.results import load, metrics_frame
from bnlab.lab.rundir import Record, read_rows
from bnlab.lab.runner import run_experiment
from bnlab.lab.tblog import ScalarLog, TensorBoardMissing, check_log_dir, scalars
from bnlab.report import ReportError
from bnlab.report.export import export_csv, export_tensorboard
from conftest import TINY, rows, stop_after

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
RECORDS = sorted(p.parent.name for p in RESULTS.glob("*/metrics.jsonl"))
STEPPED = [name for name in RECORDS if name != "noise"]  # noise measures per batch size


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished TINY compare run."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run_experiment(CompareConfig(**TINY), out)
    return out


def read_only_copy(src: Path, dest: Path) -> Path:
    """A copy of the run ``src`` that no one may write (as an archive is)."""
    shutil.copytree(src, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return dest


def snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder``, with the bytes of the files (tests may run as
    root, whom a read-only mode does not stop: this proves nothing was written)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


# -- TensorBoard: read back with TensorBoard's own reader ----------------------------------
def read_tensorboard(folder: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """unit -> tag -> [(step, value)] as TensorBoard reads each run folder of ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        out[run.name] = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
                         for tag in acc.Tags()["scalars"]}
    return out


def expected_scalars(record: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """unit -> tag -> [(step, float32 value)] from the rows, written from the documented
    rule: numbers (not bools) of rows with a step, less the bookkeeping keys and the unit's
    own fields (the keys of its "done" row)."""
    fields = {r["unit"]: set(r) - {"unit", "config", "done"} for r in record if r.get("done")}
    out: dict = {}
    for r in record:
        if r.get("done") or type(r.get("step")) is not int:
            continue
        for key, value in r.items():
            if key in {"unit", "config", "step"} | fields[r["unit"]]:
                continue
            if type(value) in (int, float):
                out.setdefault(r["unit"], {}).setdefault(key, []).append(
                    (r["step"], float(np.float32(value))))
    return out


def test_scalars_are_the_numbers_of_a_row_at_its_step():
    row = {"unit": "lr1e-05-ghost-4-seed3", "config": "abc", "lr": 1e-05, "norm": "ghost-4",
           "seed": 3, "step": 40, "epoch": 2, "test_acc": 0.5, "loss": None, "diverged": True,
           "p50": [0.1, 0.2], "set": "inputs", "big": 10**20}
    assert scalars(row) == {"epoch": 2.0, "test_acc": 0.5, "big": 1e20}
    assert scalars({**row, "step": None}) == {} and scalars({**row, "step": True}) == {}
    assert scalars({k: v for k, v in row.items() if k != "step"}) == {}
    assert scalars({"unit": "seed0", "config": "abc", "seed": 0, "done": True}) == {}


def test_tensorboard_export_of_a_run_is_its_record(finished, tmp_path):
    run = read_only_copy(finished, tmp_path / "run")
    before = snapshot(run)
    folders = export_tensorboard(run, tmp_path / "tb")
    assert snapshot(run) == before
    record = rows(run)
    units = list(dict.fromkeys(r["unit"] for r in record))
    assert folders == [tmp_path / "tb" / u for u in units] and len(units) == 4
    got = read_tensorboard(tmp_path / "tb")
    assert got == expected_scalars(record)
    assert set(got["bn-seed0"]) == {"epoch", "sgd_loss", "train_loss", "train_acc", "test_loss",
                                    "test_acc"}
    assert [s for s, _ in got["bn-seed0"]["test_acc"]] == [21, 42, 63]  # 1297 // 60 a epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tb"]  # no hidden folder left


@pytest.mark.parametrize("name", STEPPED)
def test_tensorboard_export_of_each_recorded_run_is_its_record(name, tmp_path):
    run = read_only_copy(RESULTS / name, tmp_path / name)
    before = snapshot(run)
    export_tensorboard(run, tmp_path / "tb")
    assert snapshot(run) == before
    assert read_tensorboard(tmp_path / "tb") == expected_scalars(rows(run))


def test_a_record_without_steps_has_no_tensorboard_export(tmp_path):
    with pytest.raises(ReportError, match=r"noise/metrics.jsonl holds no value measured at a "
                       r"training step \(TensorBoard plots scalars against steps\); export it "
                       r"as CSV instead"):
        export_tensorboard(RESULTS / "noise", tmp_path / "tb")
    assert list(tmp_path.iterdir()) == []


def test_scalar_log_is_readable_row_by_row_and_refuses_a_used_folder(tmp_path):
    tb = ScalarLog(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()  # made with the first scalar
    for step in (10, 20):
        assert tb.add({"unit": "bn-seed0", "config": "c", "seed": 0, "step": step,
                       "test_acc": step / 100}) == 1
        # not closed, yet on disk: a live TensorBoard sees the point
        assert read_tensorboard(tmp_path / "tb")["bn-seed0"]["test_acc"][-1] == (
            step, float(np.float32(step / 100)))
    tb.add({"unit": "bn-seed0", "config": "c", "seed": 0, "done": True})
    assert tb._files == {}  # a finished unit's file is closed
    tb.close()
    with pytest.raises(ValueError, match="is closed"):
        tb.add({"unit": "bn-seed0", "config": "c", "step": 30, "test_acc": 0.3})
    with pytest.raises(ValueError, match=rf"TensorBoard folder {tmp_path / 'tb'} already holds "
                       r"files; give a new or empty folder"):
        ScalarLog(tmp_path / "tb")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        check_log_dir(tmp_path / "file", append=True)
    with ScalarLog(tmp_path / "tb", append=True) as more:  # a resumed run adds to its own
        more.add({"unit": "bn-seed0", "config": "c", "seed": 0, "step": 30, "test_acc": 0.3})
    assert [s for s, _ in read_tensorboard(tmp_path / "tb")["bn-seed0"]["test_acc"]] == [10, 20, 30]
    assert len(list((tmp_path / "tb" / "bn-seed0").iterdir())) == 2  # a file per session
    with pytest.raises(ValueError, match="cannot name a TensorBoard run folder"):
        with ScalarLog(tmp_path / "new") as bad:
            bad.add({"unit": "../x", "config": "c", "step": 1, "loss": 1.0})


def test_without_tensorboardx_the_extra_is_named(tmp_path, monkeypatch):
    for name in ["tensorboardX", *(m for m in sys.modules if m.startswith("tensorboardX."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(TensorBoardMissing, match=r"install it with pip install "
                       r"'bnlab\[tensorboard\]'") as info:
        ScalarLog(tmp_path / "tb")
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)
    with pytest.raises(TensorBoardMissing):
        export_tensorboard(RESULTS / "compare-digits", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing half written


# -- CSV -------------------------------------------------------------------------------------
def read_csv_as(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """The CSV file ``path`` read with ``frame``'s column types, its JSON lists parsed."""
    types = {c: object if t == object else str(t) for c, t in frame.dtypes.items()}
    back = pd.read_csv(path, dtype=types, keep_default_na=False, na_values=[""])
    nested = frame.map(lambda v: isinstance(v, (list, dict))).any()
    for c in frame.columns[frame.dtypes == object]:  # an empty cell: a missing value
        cells = [None if isinstance(v, float) and np.isnan(v) else
                 json.loads(v) if nested[c] and isinstance(v, str) else v for v in back[c]]
        back[c] = pd.Series(cells, index=back.index, dtype=object)
    return back


def check_csv_export(run: Path, out: Path) -> list[Path]:
    """Export ``run`` as CSV and check each file against the frame it was written from:
    equal when read back with the frame's column types."""
    before = snapshot(run)
    paths = export_csv(run, out)
    assert snapshot(run) == before
    frame = metrics_frame(run)
    assert paths[0] == out / "metrics.csv" and len(frame) == sum(
        1 for r in rows(run) if not r.get("done"))
    pd.testing.assert_frame_equal(read_csv_as(paths[0], frame), frame)
    tables = load(run).summary
    assert tables and paths[1:] == [out / f"{name}.csv" for name in tables]
    for name, table in tables.items():
        pd.testing.assert_frame_equal(read_csv_as(out / f"{name}.csv", table), table)
    assert sorted(out.iterdir()) == sorted(paths)
    return paths


def test_csv_export_of_a_run(finished, tmp_path):
    run = read_only_copy(finished, tmp_path / "run")
    check_csv_export(run, tmp_path / "csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["csv", "run"]  # no hidden folder left


@pytest.mark.parametrize("name", RECORDS)
def test_csv_export_of_each_recorded_run(name, tmp_path):
    check_csv_export(read_only_copy(RESULTS / name, tmp_path / name), tmp_path / "csv")


def test_a_run_without_a_finished_unit_exports_its_metrics_alone(tmp_path, caplog):
    with pytest.raises(KeyboardInterrupt):
        run_experiment(CompareConfig(**TINY), tmp_path / "cut", progress=stop_after(120))
    record = rows(tmp_path / "cut")
    assert record and not any(r.get("done") for r in record)
    with caplog.at_level(logging.WARNING, logger="bnlab.report.export"):
        paths = export_csv(tmp_path / "cut", tmp_path / "csv")
    assert paths == [tmp_path / "csv" / "metrics.csv"]
    assert len(pd.read_csv(paths[0])) == len(record)
    assert "no unit has finished yet, so the run has no summary tables" in caplog.text
    export_tensorboard(tmp_path / "cut", tmp_path / "tb")  # what it has, unfinished units too
    assert sum(len(v) for unit in read_tensorboard(tmp_path / "tb").values()
               for v in unit.values()) == 6 * len(record)


@pytest.mark.parametrize("export_to", [export_csv, export_tensorboard])
def test_export_errors_name_the_path_and_what_to_do(export_to, finished, tmp_path):
    with pytest.raises(ReportError, match=rf"^{tmp_path / 'gone'} does not exist; give the "
                       r"folder of a run"):
        export_to(tmp_path / "gone", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=rf"^{tmp_path / 'empty'} is not a run directory "
                       r"\(it holds no config.json\)"):
        export_to(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.csv").write_text("x")
    with pytest.raises(ReportError, match=rf"{tmp_path / 'used'} already holds files; .*new or "
                       r"empty folder"):
        export_to(finished, tmp_path / "used")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReportError, match=rf"{tmp_path / 'file'} exists and is not a folder"):
        export_to(finished, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "used"]
    (tmp_path / "into").mkdir()  # an empty folder is taken
    assert export_to(finished, tmp_path / "into")[0].parent == tmp_path / "into"


def test_an_export_that_fails_leaves_nothing(finished, tmp_path, monkeypatch):
    def fail(result):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.Result, "summary", property(fail))
    with pytest.raises(OSError, match="No space left"):
        export_csv(finished, tmp_path / "csv")
    assert list(tmp_path.iterdir()) == []

    def fail_late(frame, path, **kwargs):
        Path(path).write_text("half")
        raise OSError(28, "No space left on device")

    monkeypatch.undo()
    monkeypatch.setattr(pd.DataFrame, "to_csv", fail_late)
    (tmp_path / "csv").mkdir()
    with pytest.raises(OSError, match="No space left"):
        export_csv(finished, tmp_path / "csv")
    assert [p.name for p in tmp_path.iterdir()] == ["csv"] and not any((tmp_path / "csv").iterdir())


# -- a run's listeners ----------------------------------------------------------------------
def listened(monkeypatch, make_listeners) -> None:
    """Every Record the runner makes gets ``make_listeners()`` as its listeners."""
    class Listened(Record):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.listeners.extend(make_listeners())

    monkeypatch.setattr(runner, "Record", Listened)


def as_counts(record: list[dict]) -> Counter:
    return Counter(json.dumps(r, sort_keys=True) for r in record)


def test_listeners_get_each_row_once_across_a_resume(tmp_path, monkeypatch):
    given: list[dict] = []
    logs: list[ScalarLog] = []

    def make():
        logs.append(ScalarLog(tmp_path / "tb", append=bool(logs)))
        return [given.append, logs[-1].add]

    listened(monkeypatch, make)
    cfg = CompareConfig(**TINY)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "run", progress=stop_after(150))
    logs[-1].close()
    assert as_counts(given) == as_counts(rows(tmp_path / "run")) and given
    first = len(given)
    run_experiment(None, tmp_path / "run", resume=True)  # replays from checkpoints
    logs[-1].close()
    record = rows(tmp_path / "run")
    assert len(given) > first and as_counts(given) == as_counts(record)  # each row once
    assert len(given) == len(record) == 2 * 2 * (3 + 1)
    assert read_tensorboard(tmp_path / "tb") == expected_scalars(record)  # no point twice


def test_a_failing_listener_is_dropped_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    given: list[dict] = []
    calls = []

    def broken(row):
        calls.append(row)
        raise RuntimeError("the disk of the log is full")

    listened(monkeypatch, lambda: [broken, given.append])
    with caplog.at_level(logging.WARNING, logger="bnlab.lab.rundir"):
        run_experiment(CompareConfig(**TINY), tmp_path / "run")
    record = rows(tmp_path / "run")
    assert len(calls) == 1 and as_counts(given) == as_counts(record)
    assert len(record) == 2 * 2 * (3 + 1)
    warned = [r for r in caplog.records if "is given no more rows" in r.getMessage()]
    assert len(warned) == 1 and "the disk of the log is full" in caplog.text


def test_listeners_get_rows_as_recorded(tmp_path):
    """Non-finite floats arrive as None, as metrics.jsonl holds them; rows read back from an
    earlier session are not given."""
    cfg = CompareConfig(**TINY)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text(
        json.dumps({"unit": "bn-seed0", "config": cfg.digest(), "step": 1, "loss": 1.0}) + "\n")
    record = Record(tmp_path / "r", cfg)
    given: list[dict] = []
    record.listeners.append(given.append)
    record.unit(norm="bn", seed=1).write({"step": 1, "loss": float("nan"), "acc": 0.5})
    assert given == [{"unit": "bn-seed1", "config": cfg.digest(), "norm": "bn", "seed": 1,
                      "step": 1, "loss": None, "acc": 0.5}]
    assert read_rows(tmp_path / "r" / "metrics.jsonl")[-1] == given[0]


def test_a_run_logs_to_tensorboard_while_it_trains(tmp_path):
    cfg = CompareConfig(**TINY, tensorboard=str(tmp_path / "tb"))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "run", progress=stop_after(150))
    run_experiment(None, tmp_path / "run", resume=True, tensorboard=str(tmp_path / "tb"))
    assert read_tensorboard(tmp_path / "tb") == expected_scalars(rows(tmp_path / "run"))
    assert os.listdir(tmp_path / "tb") and cfg.digest() == CompareConfig(**TINY).digest()


def test_the_export_command_and_tensorboard_logging_from_the_command_line(tmp_path, capsys):
    from bnlab.cli import main

    flags = ["--epochs", "3", "--seeds", "1", "--width", "16"]
    tb, run = tmp_path / "tb", tmp_path / "run"
    with pytest.raises(SystemExit):  # --tensorboard is an option of the runs that train
        main(["run", "noise", "--tensorboard", str(tb)])
    assert "unrecognized arguments: --tensorboard" in capsys.readouterr().err
    assert main(["compare", *flags, "--out", str(run), "--tensorboard", str(tb)]) == 0
    assert read_tensorboard(tb) == expected_scalars(rows(run))
    capsys.readouterr()
    assert main(["export", str(run)]) == 2
    assert "give --csv DIR, --tensorboard DIR, or both" in capsys.readouterr().err
    assert main(["export", str(run), "--csv", str(tmp_path / "csv"),
                 "--tensorboard", str(tmp_path / "tb2")]) == 0
    out = capsys.readouterr().out
    assert "csv: metrics.csv, " in out and "tensorboard: 2 runs in" in out
    assert read_tensorboard(tmp_path / "tb2") == read_tensorboard(tb)
    pd.testing.assert_frame_equal(read_csv_as(tmp_path / "csv" / "metrics.csv",
                                              metrics_frame(run)), metrics_frame(run))
    assert main(["export", str(run), "--csv", str(tmp_path / "csv")]) == 2  # not mixed in
    assert "already holds files" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    assert main(["export", str(run), "--csv", str(tmp_path / "csv3"),
                 "--tensorboard", str(tmp_path / "used")]) == 2
    assert not (tmp_path / "csv3").exists()  # both checked before either is written
    assert main(["export", str(run), "--csv", str(tmp_path / "one"),
                 "--tensorboard", str(tmp_path / "one")]) == 2
    assert "given for both" in capsys.readouterr().err and not (tmp_path / "one").exists()


def test_a_resume_logs_on_where_the_last_session_did_and_nowhere_else(tmp_path):
    from bnlab.cli import main

    flags = ["--epochs", "3", "--seeds", "1", "--width", "16", "--workers", "1"]
    tb, run, other = tmp_path / "tb", tmp_path / "run", tmp_path / "other"
    other.mkdir()
    (other / "bn-seed0").mkdir()  # another run's TensorBoard folder
    with pytest.raises(KeyboardInterrupt):
        run_experiment(CompareConfig(epochs=3, seeds=1, width=16, tensorboard=str(tb)), run,
                       progress=stop_after(40))
    assert main(["compare", "--resume", str(run), "--tensorboard", str(other)]) == 2
    assert main(["compare", "--resume", str(run), "--tensorboard", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()  # the points are never split between folders
    assert main(["compare", "--resume", str(run)]) == 0  # the last session's folder
    assert read_tensorboard(tb) == expected_scalars(rows(run))
