"""The Python API: bnlab.lab.run and load, the Result's tables, figures and page, resuming an
interrupted run from Python, errors that name Python arguments, every committed record read
as tables, and progress drawn in a notebook."""

from __future__ import annotations

import json
import numbers
import os
import re
import sys
import types
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

import bnlab.lab
from bnlab.lab import ConfigError
from bnlab.lab import progress as P
from bnlab.lab.results import metrics_frame, rows_frame
from bnlab.report import ReportError
from bnlab.report.build import section
from bnlab.report.frames import PROSE, summary_frames
from conftest import TINY

RECORDS = sorted(p for p in (Path(__file__).parents[1] / "docs" / "results").iterdir()
                 if (p / "config.json").is_file())
TITLE = section("compare").TITLE


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny compare run from Python into the default folder (runs/NAME-DATASET-TIMESTAMP
    under the current folder)."""
    where = tmp_path_factory.mktemp("api")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)
        r = bnlab.lab.run("compare", progress=False, **TINY)
    given = r.run_dir
    r.run_dir = where / given  # the tests' current folder is not the run's
    return given, r


def test_run_fills_a_default_folder_with_the_run_and_its_report(finished):
    given, r = finished
    assert re.fullmatch(r"compare-digits-\d{8}-\d{6}", given.name) and given.parent == Path("runs")
    assert r.report_path == r.run_dir / "report.html" and r.complete
    assert (r.run_dir / "summary.json").is_file() and any((r.run_dir / "figures").iterdir())
    assert r.name == "compare" and r.config.epochs == TINY["epochs"]
    assert "4 units, all finished" in repr(r) and "report.html" in repr(r)


def test_metrics_are_tidy_with_integer_columns(finished):
    _, r = finished
    m = r.metrics
    assert list(m.columns) == ["unit", "norm", "seed", "step", "epoch", "sgd_loss", "train_loss",
                               "train_acc", "test_loss", "test_acc", "finished"]
    assert len(m) == 2 * TINY["seeds"] * TINY["epochs"]  # no {"done": true} rows
    assert {str(m[c].dtype) for c in ("seed", "step", "epoch")} == {"int64"}
    assert m["finished"].dtype == bool and m["finished"].all()
    assert m["test_acc"].dtype == "float64" and m["test_acc"].between(0, 1).all()
    assert all(epochs == [1, 2, 3] for epochs in m.groupby("unit")["epoch"].apply(list))
    pd.testing.assert_frame_equal(m, bnlab.lab.load(r.run_dir).metrics)
    pd.testing.assert_frame_equal(m, metrics_frame(r.run_dir))


def test_summary_figures_verdict_and_page(finished):
    _, r = finished
    stored = json.loads((r.run_dir / "summary.json").read_text())
    assert r.summary_dict == stored
    frames = r.summary
    assert frames.keys() == summary_frames(stored).keys()
    for name, frame in summary_frames(stored).items():
        pd.testing.assert_frame_equal(frames[name], frame)
    variants = frames["variants"]
    assert set(variants["variant"]) == {"none", "bn"}
    assert variants["final_test_acc.mean"].dtype == "float64"
    assert variants["n"].tolist() == [TINY["seeds"]] * 2
    curves = frames["curves"]
    assert list(curves.columns[:3]) == ["variant", "metric", "epoch"]
    assert sorted(set(curves["epoch"])) == [1, 2, 3] and curves["epoch"].dtype == "int64"
    assert r.figures and all(isinstance(f, Figure) for f in r.figures.values())
    assert r.verdict and all(isinstance(line, str) and line for line in r.verdict)
    assert r.verdict == stored["measured"]
    page = r._repr_html_()
    assert page.count("<img") == len(r.figures) and TITLE in page


def stop_at(n: int):
    """A progress callback that interrupts the run once ``n`` steps are done."""
    def on_change(done, total, note):
        if done >= n:
            raise KeyboardInterrupt
    return on_change


def test_an_interrupted_run_is_readable_and_the_same_call_continues_it(tmp_path, finished,
                                                                        fake_kernel):
    out = tmp_path / "r"
    # one job at a time: the two plain networks (63 steps each) finish, the BN pair is
    # stopped after its first epoch's rows (21 steps each)
    with pytest.raises(KeyboardInterrupt) as stopped:
        bnlab.lab.run("compare", out, progress=stop_at(2 * 63 + 2 * 25), **TINY, workers=1)
    note = "\n".join(getattr(stopped.value, "__notes__", []))
    call = re.search(r"bnlab\.lab\.run\(.*?\)(?= continues it)", note).group()
    assert call.startswith(f"bnlab.lab.run('compare', out={str(out)!r}, ")
    assert all(f"{k}={v!r}" in call for k, v in {**TINY, "workers": 1}.items())
    assert f"bnlab.lab.load({str(out)!r}) reads what it holds" in note

    partial = bnlab.lab.load(out)
    m = partial.metrics
    assert set(m.loc[m["finished"], "norm"]) == {"none"}
    assert set(m.loc[~m["finished"], "norm"]) == {"bn"} and (~m["finished"]).sum() == 2
    assert "interrupted" in repr(partial) and "2 of 4 units started finished" in repr(partial)
    assert not partial.complete and partial.report_path is None

    r = eval(call, {"bnlab": bnlab})  # the call the note gives, drawing in a fake kernel
    pd.testing.assert_frame_equal(r.metrics, finished[1].metrics)  # nothing lost or repeated
    assert r.complete and r.report_path is not None
    drawn = fake_kernel.handles[-1].shown
    assert "100.0%" in drawn[-1] and "done" in drawn[-1]


def test_out_alone_continues_the_run_there_whatever_its_fields(tmp_path, finished):
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        bnlab.lab.run("compare", out, progress=stop_at(2 * 63 + 2 * 25), **TINY, workers=1)
    r = bnlab.lab.run("compare", out, progress=False)  # no field: the stored ones
    pd.testing.assert_frame_equal(r.metrics, finished[1].metrics)
    assert r.config == finished[1].config
    with pytest.raises(ConfigError, match="holds"):  # another field: another run
        bnlab.lab.run("compare", out, progress=False, seeds=3)
    with pytest.raises(ConfigError):  # another experiment's run is not continued
        bnlab.lab.run("regularization", out, progress=False)


def test_a_run_stopped_before_any_unit_finished_has_rows_but_no_summary(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        bnlab.lab.run("compare", out, progress=stop_at(30), **TINY, workers=1)
    r = bnlab.lab.load(out)
    assert not r.metrics["finished"].any()
    assert {"unit", "finished"} <= set(r.metrics.columns)
    with pytest.raises(ReportError, match="no unit has finished yet") as err:
        r.summary
    assert f"bnlab.lab.run('compare', out={str(out)!r}" in str(err.value)
    assert "--resume" not in str(err.value)
    page = r._repr_html_()
    assert "no unit has finished yet" in page and "--resume" not in page


def test_a_run_stopped_before_it_started_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from bnlab.lab import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_experiment", interrupted)
    with pytest.raises(KeyboardInterrupt) as stopped:
        bnlab.lab.run("compare", progress=False, **TINY)
    assert "nothing was written" in "\n".join(stopped.value.__notes__)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("fields, message", [
    ({"seeds": 0}, "seeds must be an integer from 1 to 1000 (got 0)"),
    ({"batch_size": 10, "norms": ("bn", "ghost-4")}, "divide batch_size=10"),
    ({"n_train": 100_000}, "n_train=100000 is more than the digits training set holds"),
    ({"norms": "bn"}, "norms must be 1 or more distinct values"),
    ({"nproc": 2}, "bnlab run compare --nproc 2"),
])
def test_errors_name_python_arguments_and_write_nothing(tmp_path, fields, message):
    with pytest.raises(ConfigError) as err:
        bnlab.lab.run("compare", tmp_path / "r", progress=False, **{**TINY, **fields})
    assert message in str(err.value) and "--" not in str(err.value).replace("--nproc", "")
    assert not (tmp_path / "r").exists()


def test_unknown_keywords_and_experiments_are_named():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'seed' for the compare "
                                        r"experiment \(did you mean seeds\?\); its fields are "
                                        r"dataset, seeds, .*epochs"):
        bnlab.lab.run("compare", seed=3)
    with pytest.raises(ValueError, match="unknown experiment 'comapre'; expected one of compare"):
        bnlab.lab.run("comapre")
    with pytest.raises(TypeError, match="progress must be True, False or a callable"):
        bnlab.lab.run("compare", progress="yes")


def test_out_is_named_as_the_argument(tmp_path, finished):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^out .*file exists and is not a folder; choose "
                                          r"another out$"):
        bnlab.lab.run("compare", tmp_path / "file", progress=False, **TINY)
    run_dir = str(finished[1].run_dir)
    with pytest.raises(ConfigError) as err:
        bnlab.lab.run("compare", run_dir, progress=False, **{**TINY, "epochs": 4})
    assert (f"out={run_dir!r} holds a compare run of another configuration (epochs=3 there, "
            f"4 here)") in str(err.value)
    assert f"bnlab.lab.load({run_dir!r})" in str(err.value)
    with pytest.raises(ConfigError, match="holds a compare run; choose another out"):
        bnlab.lab.run("lr-sweep", run_dir, progress=False)
    with pytest.raises(ConfigError, match="is not a run directory"):
        bnlab.lab.load(tmp_path)


# -- the committed records -------------------------------------------------------------------
def numbers_in(value, counter: Counter) -> Counter:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if value == value:  # NaN: a missing value in a table
            counter[value] += 1
    elif isinstance(value, dict):
        for v in value.values():
            numbers_in(v, counter)
    elif isinstance(value, (list, tuple)):
        for v in value:
            numbers_in(v, counter)
    return counter


def files(run_dir: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")}


@pytest.mark.parametrize("record", RECORDS, ids=[p.name for p in RECORDS])
def test_every_record_loads_as_tables_without_losing_a_number(record):
    before = files(record)
    stored = json.loads((record / "summary.json").read_text())
    frames = summary_frames(stored)
    cells = Counter()
    for frame in frames.values():
        for column in frame.columns:
            numbers_in([v for v in frame[column].tolist() if v is not pd.NA], cells)
    assert not numbers_in({k: v for k, v in stored.items() if k not in PROSE}, Counter()) - cells

    r = bnlab.lab.load(record)
    try:  # a summary.json the installed report still reads is the Result's summary
        section(r.name).measured(stored)
        current = True
    except (KeyError, TypeError, ValueError, IndexError):
        current = False  # written by an earlier design; the Result analyzes the rows anew
    if current:
        assert r.summary_dict == stored
        assert r.summary.keys() == frames.keys()
        for name, frame in frames.items():
            pd.testing.assert_frame_equal(r.summary[name], frame)
    else:
        assert r.summary_dict["experiment"] == stored["experiment"] and r.summary
    m = r.metrics
    assert m["finished"].all() and "config" not in m and "done" not in m
    assert all(str(m[c].dtype) == "int64" for c in ("seed", "step", "epoch", "m") if c in m)
    assert files(record) == before  # read only


def test_the_compare_record_is_its_summary(tmp_path):
    record = next(p for p in RECORDS if p.name == "compare-digits")
    r = bnlab.lab.load(record)
    assert r.summary_dict == json.loads((record / "summary.json").read_text())
    variants = r.summary["variants"].set_index("variant")
    assert variants.loc["bn", "final_test_acc.mean"] == r.summary_dict["variants"]["bn"][
        "final_test_acc"]["mean"]
    assert list(variants.columns[:5]) == ["best_test_acc.mean", "best_test_acc.low",
                                          "best_test_acc.high", "best_test_acc.n",
                                          "best_test_acc.confidence"]


# -- summary_frames on hand-made summaries -----------------------------------------------------
def interval(mean, n=3):
    return {"confidence": 0.95, "high": mean + 0.1, "low": mean - 0.1, "mean": mean, "n": n}


def test_summary_shapes_become_tables():
    summary = {
        "experiment": "mine", "epochs": 2, "threshold": 0.9, "expected": "words",
        "measured": ["more words"], "norms": ["none", "bn"], "values": [0.1, 0.01],
        "variants": {"none": {"final": interval(0.5), "diverged": 0, "per_seed": [1, None]},
                     "bn": {"final": interval(0.7), "diverged": 1, "per_seed": [2, 3]}},
        "curves": {"bn": {"acc": {"mean": [0.1, 0.2], "low": [0.0, 0.1], "high": [0.2, 0.3],
                                  "n": 3}}},
        "points": [{"bn": {"steps": 10, "hit": interval(0.1)}}, {"bn": {"steps": None,
                                                                        "hit": interval(0.2)}}],
        "diverged": [["none", 0], ["bn", 1]],
        "ratio": {"bn": 1.5},
        "slopes": {"inputs": interval(-0.5)},
    }
    frames = summary_frames(summary)
    assert set(frames) == {"summary", "norms", "values", "variants", "curves", "points",
                           "diverged", "ratio", "slopes"}
    assert frames["summary"].to_dict("records") == [{"experiment": "mine", "epochs": 2,
                                                     "threshold": 0.9}]
    v = frames["variants"]
    assert list(v.columns) == ["variant", "final.mean", "final.low", "final.high", "final.n",
                               "final.confidence", "diverged", "per_seed"]
    assert v["per_seed"].tolist() == [[1, None], [2, 3]] and v["diverged"].dtype == "int64"
    c = frames["curves"]
    where = {"variant": "bn", "metric": "acc"}
    assert c.to_dict("records") == [
        {**where, "epoch": 1, "mean": 0.1, "low": 0.0, "high": 0.2, "n": 3},
        {**where, "epoch": 2, "mean": 0.2, "low": 0.1, "high": 0.3, "n": 3}]
    p = frames["points"]
    assert p["value"].tolist() == [0.1, 0.01] and p["variant"].tolist() == ["bn", "bn"]
    assert str(p["steps"].dtype) == "Int64" and p["steps"].isna().tolist() == [False, True]
    assert frames["diverged"].to_dict("records") == [{"variant": "none", "diverged": 0},
                                                     {"variant": "bn", "diverged": 1}]
    assert frames["ratio"].to_dict("records") == [{"variant": "bn", "ratio": 1.5}]
    assert frames["slopes"]["metric"].tolist() == ["inputs"]  # statistics by name
    with pytest.raises(TypeError, match="summary must be a dict"):
        summary_frames([1, 2])


def test_rows_frame_keeps_integers_integers():
    f = rows_frame([{"a": 1, "b": 1.5, "c": True, "d": [1]}, {"a": None, "b": 2, "e": "x"},
                    {"a": 3}])
    assert [str(t) for t in f.dtypes] == ["Int64", "float64", "boolean", "object", "object"]
    assert f["a"].tolist()[::2] == [1, 3] and f["a"].isna().tolist() == [False, True, False]
    assert list(rows_frame([]).columns) == []


# -- progress in a notebook ----------------------------------------------------------------------
class Handle:
    def __init__(self, markup):
        self.shown = [markup]

    def update(self, obj):
        self.shown.append(obj.data)


class FakeKernel:
    """IPython as a Jupyter kernel has it: get_ipython() with a kernel; display(HTML(...),
    display_id=True) returns a handle to update."""

    def __init__(self):
        self.handles: list[Handle] = []
        ipython = types.ModuleType("IPython")
        ipython.get_ipython = lambda: types.SimpleNamespace(kernel=object())
        display = types.ModuleType("IPython.display")
        display.HTML = lambda markup: types.SimpleNamespace(data=markup)
        display.display = self.display
        ipython.display = display
        self.modules = {"IPython": ipython, "IPython.display": display}

    def display(self, obj, display_id=False):
        assert display_id is True
        self.handles.append(Handle(obj.data))
        return self.handles[-1]


@pytest.fixture
def fake_kernel(monkeypatch):
    kernel = FakeKernel()
    for name, module in kernel.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return kernel


def test_the_notebook_display_is_chosen_only_in_a_kernel(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert not P.in_notebook() and "IPython" not in sys.modules  # nothing imported to ask
    assert isinstance(P.display(), P.ProgressBar)
    shell = types.ModuleType("IPython")
    shell.get_ipython = lambda: types.SimpleNamespace()  # a terminal IPython: no kernel
    monkeypatch.setitem(sys.modules, "IPython", shell)
    assert not P.in_notebook()
    shell.get_ipython = lambda: None  # IPython imported, not running
    assert not P.in_notebook()


def test_notebook_progress_updates_in_place_at_most_four_times_a_second(fake_kernel,
                                                                       monkeypatch):
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(P.time, "monotonic", lambda: clock.now)
    bar = P.display()
    assert isinstance(bar, P.NotebookProgress) and len(fake_kernel.handles) == 1
    handle = fake_kernel.handles[0]
    for done in range(1, 81):  # 8 steps a second (0.125 s: exact in binary)
        clock.now += 0.125
        bar(done, 160, "bn <seed 0>")
    assert len(fake_kernel.handles) == 1  # one display, updated
    assert len(handle.shown) == 1 + 40  # the first, then 4 a second for 10 s
    last = handle.shown[-1]
    assert " 50.0%" in last and "0:10" in last and "~0:10 left" in last
    assert "bn &lt;seed 0&gt;" in last and '<progress value="0.5000"' in last
    bar.set_status("compiling BatchNorm kernels")
    assert "compiling BatchNorm kernels" in handle.shown[-1]
    bar.set_status("")
    bar(200, 200, "bn seed 1")
    assert "100.0%" in handle.shown[-1] and "done" in handle.shown[-1]
    bar.close()
    assert bar not in P._STATUS.bars


def test_a_failing_notebook_display_never_stops_the_work(fake_kernel):
    def broken(obj):
        raise RuntimeError("the front end went away")

    bar = P.display()
    fake_kernel.handles[0].update = broken
    bar(1, 2, "unit")
    bar(2, 2, "unit")
    bar.close()
    assert bar.quiet


def test_progress_false_shows_nothing(tmp_path, fake_kernel, finished, capfd):
    r = bnlab.lab.run("compare", finished[1].run_dir, progress=False, **TINY)
    assert r.complete and not fake_kernel.handles
    assert capfd.readouterr().err == ""


def test_importing_the_lab_stays_light():
    import subprocess

    code = ("import sys, bnlab.lab; heavy = [m for m in ('torch', 'pandas', 'matplotlib', "
            "'IPython') if m in sys.modules]; print(heavy); bnlab.lab.Result; "
            "print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}).stdout
    assert out.split("\n")[:2] == ["[]", "True"]


def test_help_starts_with_what_a_user_does():
    doc = bnlab.lab.__doc__
    assert doc.index('bnlab.lab.run("compare", epochs=20, seeds=3)') < doc.index("register_norm")
    assert "bnlab.lab.load(" in doc and "r.metrics" in doc
    for name in ("register_norm", "register_model", "register_experiment"):
        assert f":func:`{name}`" in doc and callable(getattr(bnlab.lab, name))


@pytest.mark.slow
def test_in_a_real_notebook(tmp_path):
    """A Jupyter kernel runs a cell that is interrupted, then the call its note gives: the
    note is in the traceback, progress is drawn under the cell, the Result shows its report,
    its figures show as images."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    fields = ", ".join(f"{k}={v!r}" for k, v in TINY.items())
    cells = [f"import bnlab.lab\ndef stop(done, total, note):\n"
             f"    if done >= 30: raise KeyboardInterrupt\n"
             f"bnlab.lab.run('compare', 'r', progress=stop, workers=1, {fields})",
             f"r = bnlab.lab.run('compare', 'r', workers=1, {fields})\nr",
             "r.figures['accuracy']"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    stopped, ran, figure = (c.outputs for c in nb.cells)
    assert stopped[-1].ename == "KeyboardInterrupt"
    assert "bnlab.lab.run('compare', out='r', " in "\n".join(stopped[-1].traceback)
    drawn = [o for o in ran if o.output_type == "display_data"]
    assert len(drawn) == 1 and "100.0%" in drawn[0].data["text/html"]
    result = next(o for o in ran if o.output_type == "execute_result")
    assert TITLE in result.data["text/html"] and "<img" in result.data["text/html"]
    assert "image/png" in figure[0].data


def test_a_run_whose_every_network_diverged_still_has_its_report(tmp_path):
    r = bnlab.lab.run("compare", tmp_path / "div", progress=False, epochs=3, seeds=2, width=16,
                      lr=1000.0, activation="relu", init_scale=5.0)
    assert r.complete and r.report_path.is_file()
    assert all(v["diverged"] == 2 for v in r.summary_dict["variants"].values())
    assert set(r.figures) and "<img" in r._repr_html_()
    assert any("diverged" in line for line in r.verdict)


def test_numpy_numbers_are_taken_as_python_numbers():
    import numpy as np

    config = bnlab.lab.CompareConfig(seeds=np.int64(2), lr=np.float64(0.1), epochs=np.int32(3))
    assert config == bnlab.lab.CompareConfig(seeds=2, lr=0.1, epochs=3)
    assert type(config.seeds) is int and type(config.lr) is float
    assert json.loads(json.dumps(config.to_dict()))["seeds"] == 2
    with pytest.raises(ConfigError, match=r"seeds must be an integer"):
        bnlab.lab.CompareConfig(seeds=np.float64(2.0))


def test_paths_given_with_a_tilde_mean_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    r = bnlab.lab.run("compare", "~/home-run", progress=False, **TINY)
    assert r.run_dir == tmp_path / "home-run" and not (tmp_path / "~").exists()
    assert bnlab.lab.load("~/home-run").metrics.equals(r.metrics)
