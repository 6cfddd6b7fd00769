"""bnlab report's files and command: what it writes where, what it leaves alone, its
messages, the page's layout rules and the terminal summary's width."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import bnlab.report.build as build
from bnlab.cli import main
from bnlab.lab.experiment_configs import BatchSizeConfig, CompareConfig
from bnlab.report import ReportError
from bnlab.report.build import _provenance_text, build_report, setting, table
from bnlab.report.figures import MIN_TEXT_PX, png_bytes, smallest_text_px
from bnlab.report.text import report_command, summary_lines, text_table

TINY = ["--epochs", "2", "--seeds", "2", "--width", "8", "--depth", "1"]
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny compare run, copied afresh for each test."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["compare", *TINY, "--out", str(root / "r")]) == 0
    return root / "r"


@pytest.fixture
def run(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "r")
    return tmp_path / "r"


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_killed_reports_temporary_files_are_cleared_and_nothing_else(run):
    ours = [run / "figures" / ".accuracy.png.0123abcd.tmp", run / ".report.html.deadbeef.tmp",
            run / ".summary.json.00ff00ff.tmp"]
    others = [run / "figures" / ".notes.tmp", run / ".metrics.jsonl.deadbeef.tmp",
              run / "figures" / "mine.tmp"]
    for p in ours + others:
        p.write_text("x")
    build_report(run)
    assert [p for p in ours if p.exists()] == []
    assert all(p.exists() for p in others)


@pytest.mark.parametrize("name,make,what", [
    ("figures", lambda p: p.write_text("x"), "a file, where bnlab report writes the run's figures folder"),
    ("report.html", lambda p: p.mkdir(), "a folder, where bnlab report writes the run's report.html file"),
    ("summary.json", lambda p: p.mkdir(), "a folder, where bnlab report writes the run's summary.json file"),
])
def test_a_wrong_kind_of_path_is_named_with_what_to_do(run, name, make, what):
    shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    make(run / name)
    with pytest.raises(ReportError, match=rf"^{run / name} is {what}; move or remove it and "
                       rf"report again, or render the run elsewhere with bnlab report {run} "
                       r"--out FILE.html$"):
        build_report(run)
    code = main(["report", str(run)])
    assert code == 2


def test_out_renders_a_run_without_writing_into_it(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(run)
    printed = report_command([run], out=tmp_path / "page.html", width=100)
    assert snapshot(run) == before  # an archived, read-only run can be rendered
    page = (tmp_path / "page.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<img" in page and 'src="figures' not in page
    assert printed.endswith(f"report: {tmp_path / 'page.html'}") and "FC + BN" in printed


def test_a_run_directory_that_cannot_be_written_points_to_out(run, monkeypatch):
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(build, "atomic_write", refuse)
    with pytest.raises(ReportError, match=rf"summary.json: not writable, so the report cannot be "
                       rf"written into the run directory; render it elsewhere with bnlab report "
                       rf"{run} --out FILE.html"):
        build_report(run)


def test_report_rebuilds_each_run_and_writes_nothing_unasked(run, tmp_path, monkeypatch):
    other = tmp_path / "s"
    shutil.copytree(run, other)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    for r in (run, other):
        (r / "report.html").unlink()
    printed = report_command([run, other], width=100)
    assert (run / "report.html").is_file() and (other / "report.html").is_file()
    assert f"report: {run / 'report.html'}" in printed and f"report: {other / 'report.html'}" in printed
    assert list(work.iterdir()) == []  # nothing in the current folder
    before = snapshot(run)
    printed = report_command([run, other], out=work / "both.html")
    assert snapshot(run) == before
    page = (work / "both.html").read_text()
    assert page.count('<section>') == 2 and page.count("data:image/png;base64,") == 4
    assert printed.splitlines()[0] == f"report: {work / 'both.html'}, a section per run:"


def test_setting_says_default_full_or_custom():
    full = dict(seeds=5, epochs=3, n_train=10000)
    assert setting(BatchSizeConfig()) == (
        "the quick default (seeds=2, epochs=1, n_train=1000), not the documented full setting "
        "(--full: seeds=5, epochs=3, n_train=10000); rerun with --full for numbers to quote.")
    assert setting(BatchSizeConfig(**full)) == (
        "the documented full setting (--full: seeds=5, epochs=3, n_train=10000).")
    assert setting(BatchSizeConfig(**full, workers=3)).startswith("the documented")
    assert setting(BatchSizeConfig(**{**full, "seeds": 3})) == (
        "custom; it differs from the documented full setting in seeds=3 (--full: 5).")
    assert "dataset=digits (--full: fashion-mnist)" in setting(CompareConfig(seeds=10))


def test_the_default_run_says_so_in_page_and_terminal(run, tmp_path):
    printed = report_command([run], width=100)
    assert "setting: custom; it differs from the documented full setting in" in printed
    page = (run / "report.html").read_text()
    assert '<p class="setting"><b>Setting:</b> custom;' in page


def test_terminal_tables_fit_their_width_in_blocks():
    header = ["arm", "statistics", "n"] + [f"B={b}" for b in (2, 4, 8, 16, 32, 64)]
    rows = [["ghost BN (steps of max B)", "running", "5"] + ["15.28% [14.46, 16.10]"] * 6]
    assert max(map(len, text_table(header, rows, width=200).splitlines())) <= 200
    narrow = text_table(header, rows, width=80)
    assert max(map(len, narrow.splitlines())) <= 80
    assert narrow.count("ghost BN (steps of max B)") >= 2  # each block names the row
    assert "B=64" in narrow and "B=2" in narrow


def test_summary_lines_wrap_the_statements():
    summary = {"experiment": "batch-size", "setting": "the quick default " + "x " * 60,
               "measured": ["a " * 80], "arms": [], "sizes": [], "cells": {}, "failed": []}
    text = summary_lines(summary, width=60)
    assert max(map(len, text.splitlines())) <= 60
    assert text.startswith("setting: the quick default")


def test_html_cells_break_between_a_mean_and_its_interval():
    html = table(["a", "b"], [["x", "15.28% [14.46, 16.10] (n=5)"]])
    assert "<span>15.28%</span> <span>[14.46, 16.10]</span> <span>(n=5)</span>" in html
    assert html.startswith('<div class="scroll">')


def test_provenance_omits_a_threading_layer_that_never_started():
    p = {"bnlab": "0.1", "torch": "2", "python": "3", "threads": [1], "started": "today",
         "sessions": 1, "seconds": 60.0, "kernels": ["Numba 0.68.1, threading layer none started"]}
    assert "BatchNorm kernels: Numba 0.68.1;" in _provenance_text(p)
    assert "none started" not in _provenance_text(p)
    p["kernels"] = ["Numba 0.68.1, threading layer omp"]
    assert "BatchNorm kernels: Numba 0.68.1, threading layer omp;" in _provenance_text(p)


@pytest.mark.slow
@pytest.mark.skipif(not RESULTS.is_dir(), reason="no docs/results in this checkout")
@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.iterdir()) if RESULTS.is_dir() else [])
def test_every_figure_of_the_recorded_runs_is_legible_on_the_page(name):
    """Each figure's smallest text, at the size the page shows it, is at least MIN_TEXT_PX."""
    config, sec, summary = build.analyze_run(RESULTS / name)
    for key, fig in sec.figures(summary).items():
        png_bytes(fig)
        px, text = smallest_text_px(fig)
        assert px >= MIN_TEXT_PX, f"{name}/{key}: {text!r} is {px:.1f} px"
    json.dumps(summary, allow_nan=False)
