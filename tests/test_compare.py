"""bnlab compare: models, determinism, resume, report, command line, end to end on digits."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab._io import read_jsonl
from bnlab.lab import CompareConfig, ConfigError, build_mlp, run_compare
from bnlab.lab.cli import main
from bnlab.lab.data import load_digits
from bnlab.report import build_report

TINY = dict(epochs=3, seeds=2, width=16, depth=2)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _rows(run_dir):
    """Metrics without wall-clock times, in a canonical order."""
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]
    return sorted(rows, key=lambda r: (r["norm"], r["seed"], r["epoch"]))


# -- models -------------------------------------------------------------------------------
def test_mlp_layout_and_shared_init():
    plain = build_mlp(64, 10, 3, 20, "sigmoid", "none", 0.1, seed=4)
    bn = build_mlp(64, 10, 3, 20, "sigmoid", "bn", 0.1, seed=4)
    ref = build_mlp(64, 10, 3, 20, "relu", "torch-bn", 0.1, seed=4)
    assert [type(m) for m in bn] == [nn.Linear, bnn.BatchNorm1d, nn.Sigmoid] * 3 + [nn.Linear]
    assert isinstance(ref[1], nn.BatchNorm1d) and isinstance(ref[2], nn.ReLU)
    assert all(m.bias is None for m in bn if isinstance(m, nn.Linear) and m is not bn[-1])
    assert all(m.bias is not None for m in plain if isinstance(m, nn.Linear))
    plain_w = [m.weight for m in plain if isinstance(m, nn.Linear)]
    bn_w = [m.weight for m in bn if isinstance(m, nn.Linear)]
    assert all(torch.equal(a, b) for a, b in zip(plain_w, bn_w))  # paired starts
    assert abs(plain_w[1].std().item() - 0.1) < 0.01
    assert bn(torch.randn(7, 64)).shape == (7, 10)
    with pytest.raises(ValueError, match="unknown norm 'ln'"):
        build_mlp(64, 10, 1, 8, "relu", "ln", 0.1, seed=0)


# -- config -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(epochs=0), r"epochs must be an integer >= 1 \(got 0\)"),
    (dict(lr=-0.1), r"lr must be a number > 0 \(got -0.1\)"),
    (dict(dataset="cifar"), r"dataset must be one of digits, fashion-mnist, mnist \(got 'cifar'\)"),
    (dict(activation="gelu"), r"activation must be one of sigmoid, relu, tanh \(got 'gelu'\)"),
    (dict(norms=("bn", "bn")), r"norms must be distinct values"),
    (dict(norms=("bn", "group")), r"norms must be distinct values from none, bn, torch-bn"),
    (dict(batch_size=1), r"batch_size must be an integer >= 2"),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        CompareConfig(**kw)


def test_config_round_trip_rejects_unknown_keys():
    cfg = CompareConfig(**TINY)
    assert CompareConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config keys for CompareConfig: colour"):
        CompareConfig.from_dict({**cfg.to_dict(), "colour": "red"})


# -- training -----------------------------------------------------------------------------
def test_same_config_and_seed_give_the_same_numbers(tmp_path, digits):
    cfg = CompareConfig(**TINY)
    run_compare(cfg, tmp_path / "a", data=digits)
    run_compare(cfg, tmp_path / "b", data=digits)
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert a == b and len(a) == 2 * 2 * 3
    assert a[0]["steps"] == 1297 // 60 and a[2]["steps"] == 3 * (1297 // 60) and 0 <= a[0]["test_acc"] <= 1


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, digits):
    cfg = CompareConfig(**TINY)
    run_compare(cfg, tmp_path / "full", data=digits)

    def stop_after_five(p):
        if p.done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, tmp_path / "cut", progress=stop_after_five, data=digits)
    assert len(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == 5
    # a crash can leave a half-written metrics line; resume rebuilds the file from checkpoints
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as fh:
        fh.write('{"norm": "bn", "se')
    seen = []
    run_compare(cfg, tmp_path / "cut", resume=True, progress=lambda p: seen.append(p.done), data=digits)
    assert seen == list(range(6, 13))
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")


def test_new_run_refuses_an_existing_run_dir(tmp_path, digits):
    cfg = CompareConfig(**{**TINY, "seeds": 1, "epochs": 1})
    run_compare(cfg, tmp_path / "r", data=digits)
    with pytest.raises(ConfigError, match="already holds a run; use --resume"):
        run_compare(cfg, tmp_path / "r", data=digits)
    with pytest.raises(ConfigError, match="cannot resume: .*config.json does not exist"):
        run_compare(cfg, tmp_path / "nothing", resume=True, data=digits)


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_numbers(tmp_path, digits):
    """SIGKILL (no cleanup at all) in the middle of a run, then --resume."""
    flags = ["--epochs", "12", "--seeds", "1", "--width", "16", "--depth", "2"]
    cmd = [sys.executable, "-m", "bnlab", "compare", *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 15:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_jsonl(metrics))
    assert 15 <= done < 24, f"kill landed after {done} of 24 epochs"
    subprocess.run([sys.executable, "-m", "bnlab", "compare", "--resume", str(tmp_path / "killed")],
                   env=env, check=True, capture_output=True)
    subprocess.run(cmd + ["--out", str(tmp_path / "clean")], env=env, check=True, capture_output=True)
    assert _rows(tmp_path / "killed") == _rows(tmp_path / "clean")


def test_a_second_process_cannot_work_in_a_busy_run_dir(tmp_path, digits):
    from bnlab.lab.rundir import RunDirLock

    cfg = CompareConfig(**{**TINY, "seeds": 1, "epochs": 1})
    with RunDirLock(tmp_path / "busy"):  # as if another bnlab held it
        with pytest.raises(ConfigError, match=r"busy is in use by process \d+"):
            run_compare(cfg, tmp_path / "busy", data=digits)
    run_compare(cfg, tmp_path / "busy", data=digits)  # free again: works, leaves no lock
    assert not (tmp_path / "busy" / ".lock").exists()


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "bnlab", "compare", "--epochs", "200", "--seeds", "1",
                             "--width", "16", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"bnlab compare --resume {out}" in err and "Traceback" not in err
    assert not (out / ".lock").exists()


# -- report -------------------------------------------------------------------------------
def test_report_rebuilds_from_stored_metrics_alone(tmp_path, digits):
    run = tmp_path / "r"
    run_compare(CompareConfig(**TINY), run, data=digits)
    first = build_report(run)
    summary = json.loads((run / "summary.json").read_text())
    for name in ("report.html", "summary.json", "figures/accuracy.png", "figures/loss.png"):
        (run / name).unlink()
    for ckpt in (run / "checkpoints").iterdir():
        ckpt.unlink()  # the report needs no model state
    assert build_report(run) == first
    assert json.loads((run / "summary.json").read_text()) == summary
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<img" in page and 'src="figures' not in page
    assert "Epochs to target" in page and "(n=2, 2)" in page
    v = summary["variants"]["bn"]["final_test_acc"]
    assert v["n"] == 2 and v["low"] <= v["mean"] <= v["high"]


# -- command line -------------------------------------------------------------------------
@pytest.mark.parametrize("argv,msg", [
    (["compare", "--epochs", "0"], "epochs must be an integer >= 1 (got 0)"),
    (["compare", "--norms", "bn,layer"], "norms must be distinct values from none, bn, torch-bn"),
    (["compare", "--dataset", "imagenet"], "dataset must be one of"),
    (["compare", "--resume", "x", "--epochs", "3"], "do not combine it with --epochs"),
    (["report", "does-not-exist"], "is not a run directory: config.json is missing"),
])
def test_cli_errors_before_any_work(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_missing_dataset_leaves_no_run_behind(tmp_path, monkeypatch, capsys):
    from bnlab.lab import data as D

    monkeypatch.setattr(D, "SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    offline = dataclasses.replace(D.MNIST, urls=("http://127.0.0.1:9/",))  # refused at once
    monkeypatch.setitem(D.IDX_SPECS, "mnist", offline)
    out = tmp_path / "run"
    assert main(["compare", "--dataset", "mnist", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mnist not found" in err and "bnlab download mnist" in err
    assert not out.exists()


def test_cli_rejects_malformed_numbers(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compare", "--lr", "fast"])
    assert info.value.code == 2 and "invalid float value: 'fast'" in capsys.readouterr().err


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    for flag in ("--dataset", "--epochs", "--seeds", "--batch-size", "--lr", "--momentum", "--depth",
                 "--width", "--activation", "--init-scale", "--norms", "--out", "--resume"):
        assert flag in out
    assert "(default: 100)" in out and "(default: none,bn)" in out


def test_end_to_end_compare_on_digits(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["compare", "--epochs", "4", "--seeds", "2", "--width", "32", "--norms", "none,bn,torch-bn",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "epochs" in printed.err  # progress
    assert "final test acc" in printed.out and "report:" in printed.out
    assert "Faster convergence" in printed.out
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 4 and config["norms"] == ["none", "bn", "torch-bn"]
    assert (out / "report.html").is_file() and len(read_jsonl(out / "metrics.jsonl")) == 24
    # bnlab's BN and torch's BN train to the same numbers (same init, same batches)
    rows = _rows(out)
    ours = [r["test_loss"] for r in rows if r["norm"] == "bn"]
    ref = [r["test_loss"] for r in rows if r["norm"] == "torch-bn"]
    np.testing.assert_allclose(ours, ref, rtol=1e-3)
    assert main(["report", str(out)]) == 0


def test_bench_command_prints_ratios(capsys):
    assert main(["bench", "--repeats", "1", "--quick"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("mlp", "conv"))]
    assert len(lines) == 6 and all(float(line.split()[-1]) > 0 for line in lines)
    assert "max |y - y_float64|: bnlab" in out
