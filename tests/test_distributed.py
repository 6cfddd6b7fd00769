"""Data-parallel runs: --nproc N equals one process on the same global batch, a rank that
fails ends the run with a clear error, and --resume continues it. Processes meet on
127.0.0.1 only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bnlab.cli import main
from bnlab.lab.distributed import RankFailed, launch
from conftest import rows

FLAGS = ["--epochs", "3", "--seeds", "2", "--width", "16", "--depth", "2", "--batch-size", "61"]
MEASURED = ("sgd_loss", "train_loss", "train_acc", "test_loss", "test_acc")


def measured(run_dir):
    return {(r["unit"], r["epoch"]): [r[k] for k in MEASURED]
            for r in rows(run_dir) if not r.get("done")}


def assert_same_metrics(a, b):
    got, ref = measured(a), measured(b)
    assert got.keys() == ref.keys() and len(got) == 2 * 2 * 3
    for key in ref:  # float rounding apart; accuracies may differ by an example or two
        np.testing.assert_allclose(got[key], ref[key], rtol=2e-4, atol=2e-3, err_msg=str(key))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["compare", *FLAGS, "--out", str(out)]) == 0
    return out


def test_three_processes_equal_one(tmp_path, one_process, capsys):
    # 61 rows a step over 3 processes: shares of 21, 20 and 20
    out = tmp_path / "run"
    assert main(["compare", *FLAGS, "--nproc", "3", "--out", str(out)]) == 0
    assert_same_metrics(out, one_process)
    assert "nproc" not in json.loads((out / "config.json").read_text())  # a session field
    assert (out / "report.html").is_file()


def test_more_processes_than_rows_leaves_some_empty(tmp_path):
    out = tmp_path / "run"
    flags = ["--epochs", "1", "--seeds", "1", "--width", "8", "--depth", "1", "--batch-size", "2",
             "--n-train", "20"]
    assert main(["compare", *flags, "--nproc", "3", "--out", str(out)]) == 0
    ref = tmp_path / "ref"
    assert main(["compare", *flags, "--out", str(ref)]) == 0
    got, want = measured(out), measured(ref)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=2e-4, atol=2e-3)


def test_norms_a_split_would_change_are_refused(capsys):
    assert main(["compare", "--nproc", "2", "--norms", "none,ghost-2"]) == 2
    assert "--norms must be none, bn, sync, gn, ln with --nproc 2" in capsys.readouterr().err


def test_what_cannot_run_data_parallel_is_refused_before_anything_is_written(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun starts each process
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    assert main(["run", "smoothness", "--out", str(out)]) == 2
    assert "bnlab run smoothness does not train data-parallel; run it in one process " \
        "(data-parallel: compare, init-sweep, lr-sweep)" in capsys.readouterr().err
    assert main(["compare", "--norms", "bn,renorm", "--out", str(out)]) == 2
    assert "--norms must be none, bn, sync, gn, ln with --nproc 2" in capsys.readouterr().err
    assert not out.exists()


def test_more_processes_than_the_machine_holds_are_refused(capsys):
    assert main(["compare", "--nproc", "1000"]) == 2
    assert "--nproc 1000 is more than 4 processes per core" in capsys.readouterr().err


def test_sigterm_to_the_launcher_stops_every_process():
    code = ("import sys\n"
            "from bnlab.lab.distributed import launch\n"
            "launch([], 2, program=(sys.executable, '-c', 'import time; time.sleep(3600)'))\n")
    launcher = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 900  # only keeps a hung child from hanging the suite
    while len(children(launcher.pid)) < 2:
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    ranks = children(launcher.pid)
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=900)  # it waits for the processes it stops
    assert not [pid for pid in ranks if os.path.exists(f"/proc/{pid}")
                and "zombie" not in open(f"/proc/{pid}/status").read()]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_rank_that_fails_stops_the_others(tmp_path):
    # rank 0 would sleep for an hour: launch returns only because it was stopped
    pid_file = tmp_path / "rank0.pid"
    script = ("import os, sys, time\n"
              "if os.environ['RANK'] == '1': sys.exit(3)\n"
              f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
              "time.sleep(3600)\n")
    with pytest.raises(RankFailed, match="process 1 of 2 exited with code 3; the others"):
        launch([], 2, program=(sys.executable, "-c", script))
    if pid_file.exists():  # rank 0 got as far as writing it: it is gone now
        assert not os.path.exists(f"/proc/{pid_file.read_text()}")


@pytest.mark.slow
def test_killed_rank_ends_the_run_and_resume_completes_it(tmp_path, one_process):
    out = tmp_path / "run"
    flags = [*FLAGS[:1], "40", *FLAGS[2:]]  # 40 epochs: time to kill it midway, even when busy
    launcher = subprocess.Popen([sys.executable, "-m", "bnlab", "compare", *flags, "--nproc", "2",
                                 "--out", str(out)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900  # only keeps a hung child from hanging the suite
    while not ((out / "metrics.jsonl").is_file() and len(rows(out)) >= 3):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    ranks = {}
    for pid in children(launcher.pid):
        with open(f"/proc/{pid}/environ") as fh:
            env = dict(e.split("=", 1) for e in fh.read().split("\0") if "=" in e)
        ranks[int(env["RANK"])] = int(pid)
    os.kill(ranks[1], signal.SIGKILL)
    _, err = launcher.communicate(timeout=900)
    assert launcher.returncode == 2
    assert "process 1 of 2 was killed by signal 9" in err
    assert f"the run continues with: bnlab compare --resume {out}" in err
    assert "internal" not in err and "Traceback" not in err, err
    assert len(rows(out)) < 2 * 2 * 41  # stopped before the end
    done = subprocess.run([sys.executable, "-m", "bnlab", "compare", "--resume", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    full = tmp_path / "single"
    assert main(["compare", *flags, "--out", str(full)]) == 0
    got, ref = measured(out), measured(full)
    assert got.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-3, atol=5e-3, err_msg=str(key))
