"""Run directories under faults: folders claimed once, a run's files never overwritten by a
second run, a damaged record named for what it is, one BatchNorm code per run, provenance
that a killed session leaves current, and no lock file left behind."""

import json
import os
from datetime import datetime

import pytest

from bnlab._io import write_json
from bnlab.lab import ConfigError
from bnlab.cli import main
from bnlab.lab.experiment_configs import CompareConfig
from bnlab.lab.runner import run_experiment
from bnlab.lab.rundir import RunDirLock, Session, claim_run_dir, read_rows
from bnlab.nn import _kernels
from conftest import TINY, stop_after

FLAGS = ["--epochs", "2", "--seeds", "1", "--width", "8", "--depth", "1"]


@pytest.fixture
def cut(tmp_path):
    """A TINY run interrupted with a checkpoint and rows of unfinished units."""
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(CompareConfig(**TINY, workers=1), out, progress=stop_after(150))
    assert list((out / "checkpoints").glob("*.pt"))
    return out


# -- names and the lock -------------------------------------------------------------------
def test_default_names_never_collide(tmp_path, monkeypatch, capsys):
    class Frozen(datetime):  # every run starts in the same second
        @classmethod
        def now(cls, tz=None):
            return datetime(2024, 5, 1, 12, 0, 0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("bnlab.lab.rundir.datetime", Frozen)
    assert main(["compare", *FLAGS]) == 0
    assert main(["compare", *FLAGS, "--lr", "0.05"]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["compare-digits-20240501-120000", "compare-digits-20240501-120000-2"]
    lrs = [json.loads((tmp_path / "runs" / r / "config.json").read_text())["lr"] for r in runs]
    assert lrs == [0.1, 0.05]
    assert claim_run_dir(tmp_path / "runs" / runs[0]).name == runs[0] + "-3"


def test_an_existing_run_is_resumed_only_when_it_is_the_same_configuration(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["compare", *FLAGS, "--out", str(out)]) == 0
    assert main(["compare", *FLAGS, "--lr", "0.05", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a compare run of another configuration; choose another --out" in err
    assert "--resume" not in err
    assert main(["compare", *FLAGS, "--out", str(out)]) == 2
    assert f"of this configuration; continue it with --resume {out}" in capsys.readouterr().err


def test_a_run_started_meanwhile_is_found_under_the_lock(tmp_path, monkeypatch):
    """Another process started a run in the folder after this one checked it unlocked:
    its config.json stays as it is, and this run is refused."""
    import bnlab.lab.runner as experiments

    out = tmp_path / "r"
    run_experiment(CompareConfig(**{**TINY, "seeds": 1, "epochs": 1}), out)
    before = (out / "config.json").read_bytes()
    monkeypatch.setattr(experiments, "check_new_run_dir", lambda *a: None)  # checked too early
    with pytest.raises(ConfigError, match="already holds a compare run of another configuration"):
        run_experiment(CompareConfig(**{**TINY, "seeds": 1, "epochs": 1, "lr": 0.05}), out)
    assert (out / "config.json").read_bytes() == before
    run_experiment(None, out, resume=True)  # and it can still be resumed and reported


def test_exclusive_write_never_replaces(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("first")
    with pytest.raises(FileExistsError):
        write_json(path, {"second": 1}, exclusive=True)
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_the_lock_file_goes_when_the_run_ends(tmp_path, cut):
    assert not (cut / ".lock").exists()  # interrupted
    run_experiment(None, cut, resume=True)
    assert not (cut / ".lock").exists()  # finished


def test_a_lock_opened_before_its_removal_is_not_held_twice(tmp_path, monkeypatch):
    """A process that opened .lock just before its holder removed it and let it go locks a
    file no longer at that name: it opens the name again, so a third process finds it held."""
    first = RunDirLock(tmp_path).__enter__()
    stale = os.open(tmp_path / ".lock", os.O_RDWR)  # the second process's open, too early
    opened, real_open = [], RunDirLock._open

    def open_stale_first(self):
        opened.append(1)
        return stale if len(opened) == 1 else real_open(self)

    monkeypatch.setattr(RunDirLock, "_open", open_stale_first)
    first.__exit__(None, None, None)
    assert not (tmp_path / ".lock").exists()
    second = RunDirLock(tmp_path).__enter__()
    assert len(opened) == 2 and os.fstat(second.fd).st_ino == os.stat(tmp_path / ".lock").st_ino
    monkeypatch.setattr(RunDirLock, "_open", real_open)
    with pytest.raises(ConfigError, match=r"is in use by process \d+"):
        RunDirLock(tmp_path).__enter__()
    second.__exit__(None, None, None)


# -- a damaged record ---------------------------------------------------------------------
@pytest.mark.parametrize("damage,msg", [
    (lambda p: p.unlink(), r"metrics.jsonl is missing: the run's record of measurements is lost"),
    (lambda p: (p.unlink(), p.mkdir()), r"metrics.jsonl is not a file")])
def test_a_lost_record_is_named_not_a_checkpoint(cut, damage, msg):
    damage(cut / "metrics.jsonl")
    with pytest.raises(ConfigError, match=msg):
        run_experiment(None, cut, resume=True)
    for ckpt in (cut / "checkpoints").iterdir():  # no checkpoint is to blame
        with pytest.raises(ConfigError, match=msg):
            run_experiment(None, cut, resume=True)
        ckpt.unlink()


def test_a_repeated_row_is_refused_on_resume(cut):
    path = cut / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2] + lines[1:2] + lines[2:]))  # line 3 repeats line 2
    with pytest.raises(ConfigError, match=r"line 3 repeats line 2 \(unit [a-z]+-seed\d\); the "
                                          r"record is damaged: delete line 3 if it is a copy"):
        run_experiment(None, cut, resume=True)
    path.write_text("".join(lines))
    run_experiment(None, cut, resume=True)


def test_a_row_after_a_units_last_is_refused(tmp_path):
    out = tmp_path / "r"
    run_experiment(CompareConfig(**{**TINY, "seeds": 1}), out)
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    last = next(i for i, line in enumerate(lines) if '"done":true' in line)
    first_row = dict(json.loads(lines[0]), step=10**6)
    path.write_text("".join(lines[:last + 1]) + json.dumps(first_row) + "\n"
                    + "".join(lines[last + 1:]))
    with pytest.raises(ConfigError, match=rf"line {last + 2} follows the last row of unit"):
        read_rows(path)


def test_deeply_nested_json_is_a_damaged_file(tmp_path):
    out = tmp_path / "r"
    run_experiment(CompareConfig(**{**TINY, "seeds": 1, "epochs": 1}), out)
    deep = "[" * 100_000 + "]" * 100_000
    path = out / "metrics.jsonl"
    path.write_text(deep + "\n" + path.read_text())
    with pytest.raises(ConfigError, match="line 1 is not a bnlab row"):
        run_experiment(None, out, resume=True)
    path.write_text(path.read_text().split("\n", 1)[1])
    (out / "run.json").write_text(deep)
    with pytest.raises(ConfigError, match="run.json is damaged; delete it"):
        run_experiment(None, out, resume=True)
    (out / "run.json").unlink()
    (out / "config.json").write_text(deep)
    with pytest.raises(ConfigError, match="config.json is not valid JSON .nested too deeply"):
        run_experiment(None, out, resume=True)


# -- the BatchNorm code and provenance ----------------------------------------------------
needs_kernels = pytest.mark.skipif(not _kernels.available(), reason="the compiled kernels are off")


@needs_kernels
def test_a_resume_with_the_kernels_off_is_refused(cut, monkeypatch):
    before = read_rows(cut / "metrics.jsonl")
    monkeypatch.setattr(_kernels, "_failure", "switched off by BNLAB_KERNELS=0")
    with pytest.raises(ConfigError, match=r"computed with bnlab's compiled BatchNorm kernels, which "
                                          r"are off here .* resume it without BNLAB_KERNELS=0"):
        run_experiment(None, cut, resume=True)
    assert read_rows(cut / "metrics.jsonl") == before


@needs_kernels
def test_a_resume_with_the_kernels_on_is_refused_for_a_torch_ops_run(tmp_path, monkeypatch):
    out = tmp_path / "r"
    with monkeypatch.context() as m:
        m.setattr(_kernels, "_failure", "switched off by BNLAB_KERNELS=0")
        with pytest.raises(KeyboardInterrupt):
            run_experiment(CompareConfig(**TINY, workers=1), out, progress=stop_after(150))
        assert json.loads((out / "run.json").read_text())["sessions"][0]["code"] == "torch ops"
    with pytest.raises(ConfigError, match="computed with the torch ops .* resume it with "
                                          "BNLAB_KERNELS=0 set"):
        run_experiment(None, out, resume=True)
    monkeypatch.setattr(_kernels, "_failure", "switched off by BNLAB_KERNELS=0")
    run_experiment(None, out, resume=True)


@needs_kernels
def test_kernels_that_stop_working_mid_run_stop_the_run(tmp_path, monkeypatch):
    """The kernels fail (a broken cache) after the run's first rows: no row computed by the
    torch ops is recorded, and a resume says how to get the kernels back."""
    out = tmp_path / "r"
    monkeypatch.setattr(_kernels, "_failure", None)

    def break_kernels(done):
        if done >= 100 and _kernels.available():
            _kernels.disable("NumbaError: cannot load the cache")

    with pytest.raises(ConfigError, match="kernels, which stopped working in this session .Numba"
                                          "Error: cannot load the cache.* clear Numba's cache"):
        run_experiment(CompareConfig(**TINY, workers=1), out, progress=stop_after(10**9, break_kernels))
    rows = read_rows(out / "metrics.jsonl")
    assert rows and all(r["step"] <= 100 for r in rows if "step" in r)
    with pytest.raises(ConfigError, match="are off here .NumbaError"):
        run_experiment(None, out, resume=True)


def test_run_json_is_current_while_the_run_goes(tmp_path, monkeypatch):
    """What a process killed outright leaves: its session with versions, the BatchNorm code
    and about the time it had run, not 0 s."""
    monkeypatch.setattr(Session, "EVERY", 0.0)
    out, seen = tmp_path / "r", []

    def look(done):
        if done == 150:
            seen.append(json.loads((out / "run.json").read_text())["sessions"][-1])

    with pytest.raises(KeyboardInterrupt):
        run_experiment(CompareConfig(**TINY, workers=1), out, progress=stop_after(151, look))
    entry = seen[0]
    assert entry["finished"] is False and entry["seconds"] > 0
    assert entry["kernels"] == _kernels.describe() and entry["code"] in ("compiled kernels", "torch ops")
