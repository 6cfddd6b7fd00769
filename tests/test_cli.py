"""The command line against hostile input and faults: every failure ends in one line that
names the value or file and what to do, exit code 2, no traceback, nothing overwritten, and
no run directory left that can neither be rerun nor resumed."""

import errno
import io
import json
import os
import signal
import subprocess
import sys

import pytest
from pathlib import Path

from bnlab.cli import main
from bnlab.lab.progress import ProgressBar

TINY = ["--epochs", "2", "--seeds", "1", "--width", "8", "--depth", "1"]


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """Run ``bnlab ARGV`` in tmp_path; returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)

    def run(*argv):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err
    return run


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no error message"
    assert "error" in lines[-1]
    return lines[-1]


@pytest.mark.parametrize("argv,msg", [
    (["compare", "--lr", "inf"], "--lr must be a number in (0, 1e+06] (got inf)"),
    (["compare", "--init-scale", "inf"], "--init-scale must be a number"),
    (["compare", "--lr", "1e300"], "--lr must be a number in (0, 1e+06] (got 1e+300)"),
    (["compare", "--lr", "nan"], "(got nan)"),
    (["compare", "--lr", "fast"], "invalid float value: 'fast'"),
    (["compare", "--epochs", "0"], "--epochs must be an integer from 1"),
    (["compare", "--norms", "bn,layer"], "--norms must be"),
    (["compare", "--batch-size", "100000"], "--batch-size 100000 is larger than the training set (1297"),
    (["run", "lr-sweep", "--batch-size", "5000"], "--batch-size 5000 is larger than the training set"),
    (["compare", "--width", "1000000", "--depth", "1000"], "choose a smaller network"),
    (["run", "noise", "--dataset", "digits", "--batch-sizes", "2,100000"], "--batch-sizes holds 100000"),
    (["run", "noise", "--dataset", "digits", "--batch-sizes", "2,1297"], "not less than the training set"),
    (["compare", "--norms", "none,ghost-\u00b2"], "--norms must be"),
    (["compare", "--data-dir", "/nonexistent"], "--data-dir must be unset for digits"),
    (["run", "regularization", "--dataset", "digits", "--n-train", "100000"],
     "--n-train 100000 is more than the digits training set holds (1297)"),
    (["run", "ics", "--dataset", "digits"], "--probe-size 1000 is more than the digits test set holds (500)"),
    (["compare", "--resume", "x", "--epochs", "3"], "do not combine it with --epochs"),
    (["compare", "--dataset", "fashion-mnist", "--data-dir", "no/such/folder"], "no/such/folder"),
])
def test_bad_values_are_refused_before_anything_is_created(cli, tmp_path, argv, msg):
    code, _, err = cli(*argv)
    assert code == 2 and msg in one_line_error(err)
    assert not (tmp_path / "runs").exists()


def test_out_that_cannot_hold_a_run(cli, tmp_path):
    (tmp_path / "file").write_text("keep")
    code, _, err = cli("compare", *TINY, "--out", "file")
    assert code == 2 and "exists and is not a folder" in one_line_error(err)
    code, _, err = cli("compare", *TINY, "--out", "file/run")
    assert code == 2 and "is a file, not a folder" in one_line_error(err)
    assert (tmp_path / "file").read_text() == "keep"


def test_resume_as_another_experiment(cli, tmp_path):
    assert cli("compare", *TINY, "--out", "r")[0] == 0
    code, _, err = cli("run", "smoothness", "--resume", "r")
    assert code == 2 and "holds a compare run; continue it with bnlab run compare --resume r" in err


def test_links_in_a_run_directory_are_refused(cli, tmp_path):
    assert cli("compare", *TINY, "--out", "r")[0] == 0
    (tmp_path / "elsewhere").mkdir()
    figures = tmp_path / "r" / "figures"
    for p in figures.iterdir():
        p.unlink()
    figures.rmdir()
    figures.symlink_to(tmp_path / "elsewhere")
    for argv in (["report", "r"], ["compare", "--resume", "r"]):
        code, _, err = cli(*argv)
        assert code == 2 and "figures is a link" in one_line_error(err)
    assert not list((tmp_path / "elsewhere").iterdir())


def test_resume_may_change_only_what_cannot_change_numbers(cli, tmp_path):
    assert cli("compare", *TINY, "--out", "r")[0] == 0
    for flag, value in (("--lr", "0.5"), ("--threads", "2")):  # threads change the last bits
        code, _, err = cli("compare", "--resume", "r", flag, value)
        assert code == 2 and f"do not combine it with {flag}" in one_line_error(err)


@pytest.mark.parametrize("argv, msg", [
    (["compare", "--seeds", "1_0"], "argument --seeds: invalid int value: '1_0'"),
    (["compare", "--lr", "1_0"], "argument --lr: invalid float value: '1_0'"),
    (["run", "noise", "--batch-sizes", "2,1_6"], "argument --batch-sizes: invalid"),
    (["compare", "--n-train", "1_000"], "argument --n-train: invalid int value: '1_000'"),
])
def test_numbers_are_plain_decimal(cli, tmp_path, argv, msg):
    code, _, err = cli(*argv, "--out", "r")
    assert code == 2 and msg in one_line_error(err) and not (tmp_path / "r").exists()


def test_a_resume_takes_up_the_last_sessions_data_folder(cli, tmp_path):
    import shutil

    data = tmp_path / "data" / "fashion-mnist"
    shutil.copytree("/usr/share/datasets/fashion-mnist", data)
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(data.parent), "--n-train", "120",
            "--epochs", "1", "--seeds", "1", "--width", "8", "--depth", "1"]
    assert cli("compare", *argv, "--out", "r")[0] == 0
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["sessions"][-1]["settings"]["data_dir"] == str(data.parent)
    assert "data_dir" not in json.loads((tmp_path / "r" / "config.json").read_text())
    code, _, err = cli("compare", "--resume", "r")
    assert code == 0 and f"resuming with --data-dir {data.parent}, as the last session" in err
    other = tmp_path / "other"
    shutil.copytree(data, other / "fashion-mnist")
    code, _, err = cli("compare", "--resume", "r", "--data-dir", str(other))  # told otherwise
    assert code == 0 and "resuming with" not in err
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["sessions"][-1]["settings"]["data_dir"] == str(other)


def test_optional_fields_can_be_unset(cli, tmp_path):
    code, _, err = cli("run", "regularization", "--dataset", "digits", "--n-train", "all",
                       "--epochs", "1", "--seeds", "1", "--width", "8", "--norms", "none,bn",
                       "--out", "r")
    assert code == 0 and json.loads((tmp_path / "r" / "config.json").read_text())["n_train"] is None


def test_resume_of_what_is_not_a_run(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = cli("compare", "--resume", "file")
    assert code == 2 and "is not a run directory" in one_line_error(err)
    code, _, err = cli("compare", "--resume", "nope/deeper")
    assert code == 2 and "nope/deeper does not exist" in one_line_error(err)
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("stored,msg", [
    ("[1, 2]", "does not name a bnlab experiment"),
    ("null", "does not name a bnlab experiment"),
    ("{not json", "is not valid JSON"),
    ('{"experiment": "compare", "width": 100}', "missing"),
])
def test_damaged_config_json(cli, tmp_path, stored, msg):
    assert cli("compare", *TINY, "--out", "r")[0] == 0
    (tmp_path / "r" / "config.json").write_text(stored)
    for argv in (["compare", "--resume", "r"], ["report", "r"]):
        code, _, err = cli(*argv)
        assert code == 2 and msg in one_line_error(err)


def test_tampered_values(cli, tmp_path):
    assert cli("compare", *TINY, "--out", "r")[0] == 0
    stored = json.loads((tmp_path / "r" / "config.json").read_text())
    (tmp_path / "r" / "config.json").write_text(json.dumps({**stored, "width": "wide"}))
    code, _, err = cli("report", "r")
    assert code == 2 and '"width" must be an integer' in one_line_error(err)
    (tmp_path / "r" / "config.json").write_text(json.dumps({**stored, "width": 9}))
    code, _, err = cli("compare", "--resume", "r")
    assert code == 2 and "config.json was changed after the run started" in one_line_error(err)


def test_relabelled_sweep_is_refused(cli, tmp_path):
    assert cli("run", "lr-sweep", "--epochs", "1", "--seeds", "1", "--width", "8", "--lrs", "0.01,1",
               "--out", "s")[0] == 0
    stored = json.loads((tmp_path / "s" / "config.json").read_text())
    (tmp_path / "s" / "config.json").write_text(json.dumps({**stored, "lrs": [0.02, 2.0]}))
    code, _, err = cli("report", "s")
    assert code == 2 and "computed under another configuration" in one_line_error(err)


def test_rows_that_lack_keys(cli, tmp_path):
    assert cli("compare", *TINY, "--out", "r")[0] == 0
    path = tmp_path / "r" / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for row in lines:
        row.pop("test_acc", None)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    code, _, err = cli("report", "r")
    assert code == 2 and "the record is damaged" in one_line_error(err)
    path.write_text("not json\n" + path.read_text())
    code, _, err = cli("report", "r")
    assert code == 2 and "line 1 is not a bnlab row" in one_line_error(err)


def test_report_out_a_directory(cli, tmp_path):
    assert cli("compare", *TINY, "--out", "r")[0] == 0
    assert cli("compare", *TINY, "--out", "s")[0] == 0
    (tmp_path / "page").mkdir()
    code, _, err = cli("report", "r", "s", "--out", "page")
    assert code == 2 and "--out page is a folder" in one_line_error(err)
    for out in ("/dev/null", "r/metrics.jsonl"):  # never a device, never a run's own files
        before = Path(out).stat() if out.startswith("/") else (tmp_path / out).read_bytes()
        code, _, err = cli("report", "r", "s", "--out", out)
        assert code == 2 and "only to an .html file" in one_line_error(err)
    assert Path("/dev/null").is_char_device() and before == (tmp_path / "r/metrics.jsonl").read_bytes()
    (tmp_path / "s" / "report.html").unlink()
    code, out, _ = cli("report", "r", "s")  # each run's own page, nothing in the current folder
    assert code == 0 and not (tmp_path / "bnlab-report.html").exists()
    assert (tmp_path / "s" / "report.html").is_file() and out.count("report: ") == 2
    assert cli("report", "r", "--out", "one.html")[0] == 0
    assert (tmp_path / "one.html").read_text().count("data:image/png;base64,") == 2


def test_disk_full_while_writing(cli, tmp_path, monkeypatch):
    import bnlab._io as io_
    import bnlab.report.build  # noqa: F401  imported with the real atomic_write, kept after

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "r" / "config.json"))

    monkeypatch.setattr(io_, "atomic_write", full)
    code, _, err = cli("compare", *TINY, "--out", "r")
    assert code == 2 and "No space left on device" in one_line_error(err)
    assert "--resume" not in err  # nothing was written
    assert not (tmp_path / "r").exists()  # nothing that could be resumed: nothing left


def test_disk_full_while_appending_a_row_names_the_record(cli, tmp_path, monkeypatch):
    import bnlab.lab.rundir as rundir

    def full(row):  # as a write to a full disk fails: an OSError without a file name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir, "dumps_row", full)
    code, _, err = cli("compare", *TINY, "--out", "r")
    assert code == 2
    assert one_line_error(err) == (f"bnlab compare: error: r{os.sep}metrics.jsonl: No space left on "
                                   "device; check the path and free space, then try again; "
                                   "finished work is saved. Continue with: bnlab compare --resume r")


def test_out_that_is_a_dangling_link(cli, tmp_path):
    (tmp_path / "r").symlink_to(tmp_path / "gone")
    code, _, err = cli("compare", *TINY, "--out", "r")
    assert code == 2 and f"--out r is a link to {tmp_path / 'gone'}, which does not exist" in err
    assert (tmp_path / "r").is_symlink() and not (tmp_path / "gone").exists()


class Broken(io.StringIO):
    """A standard stream whose writes fail, as a full disk or a closed pipe fails them."""

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_an_error_message_that_cannot_be_written_changes_nothing(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stderr", Broken())
    assert main(["compare", "--batch-size", "100000"]) == 2
    assert main(["-v", "compare", "--batch-size", "100000"]) == 2  # the traceback too
    monkeypatch.setattr(sys, "stderr", None)
    assert main(["compare", "--batch-size", "100000"]) == 2


def test_a_closed_stdout_does_not_fail_a_finished_run(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdout", Broken())
    assert main(["compare", *TINY, "--out", "r"]) == 0
    assert (tmp_path / "r" / "report.html").is_file()


def test_stdout_closed_at_start_does_not_fail_a_run(monkeypatch, tmp_path):
    """Started with stdout closed (``>&-``), Python's sys.stdout is None."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["compare", *TINY, "--out", "r"]) == 0
    assert main(["report", "r"]) == 0 and main(["report", "r", "--out", "p.html"]) == 0
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "p.html").is_file()


def test_a_run_going_in_out_is_named_as_such(cli, tmp_path):
    assert cli("compare", *TINY, "--out", "r")[0] == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open('r/.lock', os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'process 4242')\n"
         "print('locked', flush=True); time.sleep(60)"],
        cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = cli("compare", *TINY, "--out", "r")  # the same configuration
        assert code == 2 and "is in use by process 4242" in one_line_error(err)
        assert "--resume" not in err
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("argv, msg", [
    (["compare", "--out", ""], "argument --out: an empty path"),
    (["compare", "--resume", " "], "argument --resume: an empty path"),
    (["report", ""], "argument RUN_DIR: an empty path"),
    (["report", "nowhere"], "nowhere does not exist"),
    (["compare", "--resume", "nowhere"], "nowhere does not exist"),
])
def test_paths_that_name_nothing(cli, tmp_path, argv, msg):
    code, _, err = cli(*argv)
    assert code == 2 and msg in one_line_error(err)


def test_runs_a_file_where_runs_go(cli, tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    code, _, err = cli("compare", *TINY)
    assert code == 2 and "runs is a file, where bnlab keeps its runs" in one_line_error(err)


def test_error_to_a_full_stderr_keeps_its_exit_code(tmp_path):
    """The interpreter's exit flushes stderr once more: a full one must not make it 120."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "bnlab", "compare", "--lr", "inf"],
                              stderr=full, stdout=subprocess.PIPE, cwd=tmp_path)
    assert done.returncode == 2


@pytest.mark.parametrize("argv,msg", [
    (["--batch-size", "100000"], "--batch-size 100000 is larger than the training set (1297"),
    (["--dataset", "fashion-mnist", "--data-dir", "no/such/folder"], "no/such/folder"),
    (["--width", "1000000", "--depth", "1000"], "choose a smaller network"),
])
def test_nproc_checks_the_data_before_any_process_starts(cli, tmp_path, monkeypatch, argv, msg):
    import bnlab.lab.distributed as distributed

    def launch(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(distributed, "launch", launch)
    code, _, err = cli("compare", "--nproc", "2", *argv)
    assert code == 2 and msg in one_line_error(err) and "internal" not in err
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_during_start_up_and_report(cli, tmp_path, monkeypatch):
    import bnlab.lab.runner as experiments
    import bnlab.report.build as build

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(experiments, "load_dataset", interrupt)
        code, _, err = cli("compare", *TINY, "--out", "r")
    assert code == 130 and "nothing was written" in err and not (tmp_path / "r").exists()
    with monkeypatch.context() as m:
        m.setattr(build, "_run_files", interrupt)
        code, _, err = cli("compare", *TINY, "--out", "r")
        assert code == 130 and "the run is complete. Write its report with:\n  bnlab report r" in err
        assert cli("compare", "--resume", "r")[0] == 130  # the report again; the run is kept
    assert cli("report", "r")[0] == 0


def test_divergence_is_reported_not_claimed(cli, tmp_path):
    code, out, _ = cli("compare", "--epochs", "3", "--seeds", "2", "--width", "16", "--lr", "1000",
                       "--activation", "relu", "--out", "r")
    assert code == 0
    assert "Not assessed" in out and "diverged" in out and "fewer epochs" not in out
    assert "nan" not in out.lower()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert sum(v["diverged"] for v in summary["variants"].values()) >= 1


def test_bench_errors(cli):
    code, _, err = cli("bench", "--device", "cuda")
    assert code == 2 and "no CUDA device" in one_line_error(err)
    code, _, err = cli("-v", "bench", "--device", "cuda")
    assert code == 2 and "no CUDA device" in one_line_error(err)


def test_version_and_light_help():
    code = ("import sys; from bnlab.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('matplotlib', 'scipy', 'torch') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    out = subprocess.run([sys.executable, "-m", "bnlab", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("bnlab ")


def test_report_uses_no_pyplot_and_respects_the_umask(tmp_path):
    code = ("import os, sys; os.umask(0o077)\n"
            "from bnlab.cli import main\n"
            f"assert main(['compare', '--epochs', '2', '--seeds', '1', '--width', '8', '--out', {str(tmp_path / 'r')!r}]) == 0\n"
            "print('PYPLOT', 'matplotlib.pyplot' in sys.modules, oct(os.umask(0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "PYPLOT False 0o77" in out
    assert (tmp_path / "r" / "report.html").stat().st_mode & 0o777 == 0o600


def test_progress_fits_the_terminal_and_estimates_from_recent_steps(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("COLUMNS", "60")
    stream = Tty()
    bar = ProgressBar(stream, window=30.0)
    clock = iter([0.0, 100.0, 101.0, 102.0, 103.0])  # a slow first step, then 1 step per second
    now = [0.0]

    def tick():
        now[0] = next(clock)
        return now[0]

    monkeypatch.setattr("bnlab.lab.progress.time.monotonic", tick)
    monkeypatch.setattr("bnlab.lab.progress.time.process_time", lambda: now[0])  # computing
    bar.start = 0.0
    bar(1, 10, "a-very-long-unit-name-" * 5)  # t=0 ... the clock read inside
    for done in (2, 3, 4):
        bar(done, 10, "unit")
    drawn = [s for s in stream.getvalue().split("\r") if s]
    assert all(len(s.rstrip("\n")) <= 59 for s in drawn)
    assert "~0:06 left" in drawn[-1]  # 6 steps at the recent 1 step/s, not at the first step's pace


def test_ctrl_c_while_the_command_line_loads(monkeypatch, capsys):
    import types

    import bnlab.__main__ as entry

    slow = types.ModuleType("bnlab.cli")

    def interrupted():
        raise KeyboardInterrupt

    slow.main = interrupted
    monkeypatch.setitem(sys.modules, "bnlab.cli", slow)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        assert entry.main() == 130
        # the process is ending: a late signal can no longer cut its exit short
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert capsys.readouterr().err == "bnlab: interrupted\n"


def test_progress_with_stderr_closed(monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)
    bar = ProgressBar()
    bar(1, 2, "unit")
    bar(2, 2, "unit")


def test_divergence_in_noise_and_in_nested_values(cli, tmp_path, monkeypatch):
    # The compiled kernels reduce in float64 and stay finite far longer than the torch-op
    # path, whose float32 variance overflows at this learning rate: use the latter to
    # diverge within a few steps.
    from bnlab.nn import _kernels
    monkeypatch.setattr(_kernels, "_failure", "switched off for this test")
    code, out, _ = cli("run", "noise", "--dataset", "digits", "--epochs", "1", "--seeds", "2",
                       "--width", "8", "--depth", "2", "--activation", "relu", "--lr", "10000",
                       "--init-scale", "1", "--batch-sizes", "2,8,32", "--draws", "10", "--out", "n")
    assert code == 0 and "seeds diverged in training" in out
    code, _, err = cli("run", "ics", "--dataset", "digits", "--steps", "30", "--eval-every", "1",
                       "--seeds", "1", "--width", "8", "--depth", "2", "--activation", "relu",
                       "--lr", "10000", "--init-scale", "100", "--probe-size", "100", "--out", "i")
    rows = [json.loads(line) for line in (tmp_path / "i" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("diverged") for r in rows)  # found in the percentile lists
    assert code in (0, 2) and "Out of range float" not in err


def test_bench_latency_runs_two_processes_on_one_fresh_cache(cli, monkeypatch):
    """The layout, and that both processes share one new cache (the timings are faked)."""
    import subprocess

    from bnlab.bench import layer as bench
    seen = []

    def fake_run(cmd, env, **kwargs):
        seen.append(env["NUMBA_CACHE_DIR"])
        assert os.listdir(env["NUMBA_CACHE_DIR"]) == [] or len(seen) == 2
        return subprocess.CompletedProcess(cmd, 0, stdout="12.5\n20.25\n" if len(seen) == 1
                                           else "0.25\n0.5\n")
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    code, out, _ = cli("bench", "--latency")
    assert code == 0 and len(seen) == 2 and seen[0] == seen[1] and not os.path.exists(seen[0])
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "(60, 100) empty cache 12.50 s filled cache 0.25 s" in lines
    assert "(32, 64, 56, 56) empty cache 20.25 s filled cache 0.50 s" in lines


def test_bench_rows_carry_floor_and_ratio_last(cli):
    """The layout only: no assertion reads a time."""
    code, out, _ = cli("bench", "--repeats", "1", "--quick", "--dtype", "float32,bfloat16")
    rows = [line.split() for line in out.splitlines() if line.startswith(("mlp", "conv"))]
    assert code == 0 and len(rows) == 2 * 3 * 2  # dtypes x shapes x modes
    assert {r[-8] for r in rows} == {"float32", "bfloat16"}
    assert all(float(r[-1]) > 0 and float(r[-4]) > 0 for r in rows)  # floor ms, ratio last
    assert all(abs(float(r[-2]) - 100 * float(r[-4]) / float(r[-6])) <= 1 + 0.02 * float(r[-2])
               for r in rows)  # % bw: the floor's share of bnlab's time (printed rounded)
    assert "bnlab kernels: Numba" in out or "bnlab kernels: off" in out
    code, _, err = cli("bench", "--dtype", "float8")
    assert code == 2 and "--dtype 'float8'" in one_line_error(err)


def test_the_command_ends_fast_yet_flushes_a_user_modules_files(tmp_path):
    """The console script skips the interpreter's teardown (bnlab's own files are closed by
    then), but not where the user's modules were imported: their open files are flushed."""
    (tmp_path / "mylog.py").write_text('f = open("out.txt", "w")\nf.write("at import\\n")\n')
    done = subprocess.run([sys.executable, "-m", "bnlab", "--import", "mylog", "report",
                           "nowhere"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "nowhere does not exist" in done.stderr
    assert (tmp_path / "out.txt").read_text() == "at import\n"
    version = subprocess.run([sys.executable, "-m", "bnlab", "--version"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert version.returncode == 0 and version.stdout.startswith("bnlab ")
