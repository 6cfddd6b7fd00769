"""The lab's protocol: configs, models by name, one training loop, the record, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.lab import ConfigError
from bnlab.cli import main
from bnlab.lab.experiment_configs import EXPERIMENTS, CompareConfig, LrSweepConfig, RegularizationConfig
from bnlab.lab.runner import run_experiment
from bnlab.lab.models import PopulationBatchNorm1d, build_mlp, norm_layer, refresh_population
from conftest import TINY, rows, stop_after



# -- configs ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(epochs=0), r"--epochs must be an integer from 1 to 1000000 \(got 0\)"),
    (dict(lr=-0.1), r"--lr must be a number in \(0, 1e\+06\] \(got -0.1\)"),
    (dict(lr=float("inf")), r"--lr must be a number .* \(got inf\)"),
    (dict(lr=float("nan")), r"--lr must be a number .* \(got nan\)"),
    (dict(init_scale=float("inf")), r"--init-scale must be a number"),
    (dict(lr=1e300), r"--lr must be a number in \(0, 1e\+06\]"),
    (dict(dataset="cifar"), r"--dataset must be one of digits, fashion-mnist, mnist \(got 'cifar'\)"),
    (dict(activation="gelu"), r"--activation must be one of sigmoid, relu, tanh"),
    (dict(norms=("bn", "bn")), r"--norms must be 1 or more distinct values"),
    (dict(norms=("bn", "group")), r"--norms must be .* ghost-K"),
    (dict(norms=("ghost-7",)), r"--norms must be ghost sizes that divide --batch-size 60"),
    (dict(batch_size=1), r"--batch-size must be an integer from 2"),
    (dict(momentum=1.0), r"--momentum must be a number in \[0, 1\)"),
    (dict(epochs=True), r"--epochs must be an integer"),
    (dict(width=2.5), r"--width must be an integer"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        CompareConfig(**kw)


def test_config_round_trip_digest_and_stored_checks():
    cfg = CompareConfig(**TINY)
    assert CompareConfig.from_dict(cfg.to_dict()) == cfg
    assert CompareConfig(**TINY, threads=2).digest() != cfg.digest()  # can change the last bits
    assert CompareConfig(**TINY, data_dir="x", dataset="mnist").digest() == \
        CompareConfig(**TINY, dataset="mnist").digest()  # where the data lies cannot
    assert CompareConfig(**{**TINY, "lr": 0.2}).digest() != cfg.digest()
    with pytest.raises(ConfigError, match="unknown colour"):
        CompareConfig.from_dict({**cfg.to_dict(), "colour": "red"})
    with pytest.raises(ConfigError, match="missing width"):
        CompareConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "width"})
    with pytest.raises(ConfigError, match="must hold a JSON object .got list"):
        CompareConfig.from_dict([1, 2])


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_has_valid_defaults_and_full_settings(name):
    cls = EXPERIMENTS[name]
    default, full = cls(), cls(**cls.FULL)
    assert all(getattr(full, key) == value for key, value in cls.FULL.items())
    assert full != default and cls.from_dict(full.to_dict()) == full


def test_data_dependent_checks():
    with pytest.raises(ConfigError, match="--batch-size 5000 is larger than the training set .1297"):
        LrSweepConfig(batch_size=5000).check_data(1297, 500, 64, 10)
    with pytest.raises(ConfigError, match="--n-train 100000 is more than the digits training set"):
        RegularizationConfig(dataset="digits", n_train=100000).check_data(1297, 500, 64, 10)
    with pytest.raises(ConfigError, match="GiB, more than half of this machine"):
        CompareConfig(width=10**6, depth=1000).check_data(1297, 500, 64, 10)


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
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        build_mlp(64, 10, 1, 8, "relu", "layer", 0.1, seed=0)


@pytest.mark.parametrize("name,kind", [
    ("bn", bnn.BatchNorm1d), ("torch-bn", nn.BatchNorm1d), ("ghost-4", bnn.GhostBatchNorm),
    ("full-batch", bnn.BatchNorm1d), ("population", PopulationBatchNorm1d), ("noisy", nn.Sequential),
    ("renorm", bnn.BatchRenorm1d), ("sync", bnn.SyncBatchNorm), ("gn", nn.GroupNorm),
    ("ln", nn.LayerNorm)])
def test_every_norm_is_one_registry_entry(name, kind):
    layer = norm_layer(name, 8, seed=0)
    assert isinstance(layer, kind)
    assert layer(torch.randn(12, 8)).shape == (12, 8)
    assert norm_layer("none", 8, seed=0) is None


def test_population_bn_normalizes_with_whole_set_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), PopulationBatchNorm1d(4))
    x = torch.randn(200, 5) * 3 + 1
    refresh_population(model, x)
    z = model(x).detach()  # weight 1, bias 0: exactly standardized over the whole set
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z.var(0, unbiased=False), torch.ones(4), atol=1e-3)
    model[1].weight.grad = None
    model(x[:10]).sum().backward()  # no gradient flows through the constant statistics
    assert model[0].weight.grad is not None and model[1].weight.grad is not None


# -- the record and resume ----------------------------------------------------------------
def full_and_cut(tmp_path, steps):
    """A finished TINY run, and the same run interrupted after ``steps`` training steps."""
    cfg = CompareConfig(**TINY)
    run_experiment(cfg, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", progress=stop_after(steps))
    return tmp_path / "full", tmp_path / "cut"


def test_same_config_gives_the_same_rows(tmp_path):
    cfg = CompareConfig(**TINY)
    run_experiment(cfg, tmp_path / "a")
    run_experiment(cfg, tmp_path / "b")
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert a == b and len(a) == 2 * 2 * (3 + 1)  # 3 epochs and a "done" row per unit
    first = a[0]
    assert first["unit"] == "none-seed0" and first["step"] == 1297 // 60 and first["epoch"] == 1
    assert first["config"] == cfg.digest() and 0 <= first["test_acc"] <= 1
    text = (tmp_path / "a" / "metrics.jsonl").read_text()
    assert ", " not in text.splitlines()[0]  # compact rows
    session = json.loads((tmp_path / "a" / "run.json").read_text())["sessions"][0]
    assert session["threads"] == 1 and session["finished"] and session["torch"] == torch.__version__
    from bnlab.nn import _kernels
    assert session["kernels"].startswith("Numba" if _kernels.available() else "off")
    from bnlab.report.build import _provenance_text, provenance
    assert session["kernels"].split(",")[0] in _provenance_text(provenance(tmp_path / "a"))


def test_resume_after_interrupt_equals_uninterrupted(tmp_path):
    full_and_cut(tmp_path, 150)
    partial = rows(tmp_path / "cut")
    assert 0 < len(partial) < len(rows(tmp_path / "full"))
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as fh:  # a write cut short by a crash
        fh.write('{"unit": "bn-se')
    (tmp_path / "cut" / ".metrics.jsonl.dead.tmp").write_text("x")  # a killed atomic write
    run_experiment(None, tmp_path / "cut", resume=True)
    assert rows(tmp_path / "cut") == rows(tmp_path / "full")
    assert not list((tmp_path / "cut").glob(".*.tmp"))
    sessions = json.loads((tmp_path / "cut" / "run.json").read_text())["sessions"]
    assert [s["finished"] for s in sessions] == [False, True]


def test_resume_without_checkpoints_keeps_every_recorded_row(tmp_path):
    full_and_cut(tmp_path, 150)
    before = rows(tmp_path / "cut")
    for ckpt in (tmp_path / "cut" / "checkpoints").iterdir():
        ckpt.unlink()
    run_experiment(None, tmp_path / "cut", resume=True)  # retrains, rows already there stay
    after = rows(tmp_path / "cut")
    assert all(r in after for r in before) and after == rows(tmp_path / "full")


def test_resume_refuses_a_changed_config(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(CompareConfig(**TINY), out, progress=stop_after(150))
    stored = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**stored, "lr": 0.5}))
    with pytest.raises(ConfigError, match="computed under another configuration"):
        run_experiment(None, out, resume=True)


@pytest.mark.parametrize("content,msg", [
    (b"", "is damaged; delete it"), (b"PK\x03\x04garbage", "is damaged; delete it"),
    (os.urandom(300), "is damaged; delete it")])
def test_damaged_checkpoint_is_refused_with_what_to_do(tmp_path, content, msg):
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):  # the first stack past its first evaluation, unfinished
        run_experiment(CompareConfig(**TINY, workers=1), out, progress=stop_after(60))
    ckpt = next((out / "checkpoints").iterdir())
    ckpt.write_bytes(content)
    with pytest.raises(ConfigError, match=msg):
        run_experiment(None, out, resume=True)
    ckpt.unlink()  # what the message says to do
    run_experiment(None, out, resume=True)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):  # the first stack past its first evaluation, unfinished
        run_experiment(CompareConfig(**TINY, workers=1), out, progress=stop_after(60))
    ckpt = next((out / "checkpoints").iterdir())
    state = torch.load(ckpt, weights_only=True)
    for bad, msg in (({**state, "step": 10**6}, "past the last"), ({**state, "rows": -5}, "damaged"),
                     ({**state, "model": {}}, "does not fit this network")):
        torch.save(bad, ckpt)
        with pytest.raises(ConfigError, match=msg):
            run_experiment(None, out, resume=True)


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path):
    full_and_cut(tmp_path, 150)
    path = tmp_path / "cut" / "metrics.jsonl"
    path.write_bytes(path.read_bytes()[:-1])  # a whole row, its newline lost
    run_experiment(None, tmp_path / "cut", resume=True)
    assert rows(tmp_path / "cut") == rows(tmp_path / "full")


def test_lock_refuses_a_second_process_and_follows_no_link(tmp_path):
    from bnlab.lab.rundir import RunDirLock

    cfg = CompareConfig(**{**TINY, "seeds": 1, "epochs": 1})
    (tmp_path / "busy").mkdir()
    with RunDirLock(tmp_path / "busy"):  # as if another bnlab held it
        with pytest.raises(ConfigError, match=r"busy is in use by process \d+"):
            run_experiment(cfg, tmp_path / "busy")
    run_experiment(cfg, tmp_path / "busy")  # free again
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / ".lock").symlink_to(victim)
    with pytest.raises(ConfigError, match="is a link or not a file"):
        run_experiment(cfg, tmp_path / "planted")
    assert victim.read_text() == "precious"


def test_divergence_is_recorded_and_stops_the_unit(tmp_path):
    cfg = CompareConfig(epochs=3, seeds=1, width=16, lr=1000.0, activation="relu")
    run_experiment(cfg, tmp_path / "r")
    got = rows(tmp_path / "r")
    assert any(r.get("diverged") for r in got)
    text = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads((tmp_path / "r" / "config.json").read_text())  # valid JSON throughout


def wait_for_rows(proc, metrics, n):
    """Wait until the child has written n rows. No speed is asserted: the deadline only
    keeps a hung child from hanging the suite (a cold Numba cache on a busy machine takes
    tens of seconds before the first row)."""
    deadline = time.monotonic() + 900
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the child wrote fewer than {n} rows (exit code {proc.poll()})")
        time.sleep(0.01)


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_rows(tmp_path):
    """SIGKILL (no cleanup at all) in the middle of a run, then --resume."""
    flags = ["--epochs", "150", "--seeds", "2", "--width", "16", "--depth", "2"]
    cmd = [sys.executable, "-m", "bnlab", "compare", *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    wait_for_rows(proc, metrics, 15)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 15 <= len(rows(tmp_path / "killed")) < 4 * (150 + 1)  # killed before the end
    subprocess.run([sys.executable, "-m", "bnlab", "compare", "--resume", str(tmp_path / "killed")],
                   env=env, check=True, capture_output=True)
    subprocess.run(cmd + ["--out", str(tmp_path / "clean")], env=env, check=True, capture_output=True)
    assert rows(tmp_path / "killed") == rows(tmp_path / "clean")


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "bnlab", "compare", "--epochs", "200", "--seeds", "1",
                             "--width", "16", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_rows(proc, out / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130
    assert f"bnlab compare --resume {out}" in err and "Traceback" not in err


def test_end_to_end_compare_and_bn_against_torch_bn(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["compare", "--epochs", "4", "--seeds", "2", "--width", "32", "--norms", "none,bn,torch-bn",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "100.0%" in printed.err  # progress
    assert "final test acc" in printed.out and "report:" in printed.out
    assert (out / "report.html").is_file()
    got = [r for r in rows(out) if not r.get("done")]
    ours = [r["test_loss"] for r in got if r["norm"] == "bn"]
    ref = [r["test_loss"] for r in got if r["norm"] == "torch-bn"]
    np.testing.assert_allclose(ours, ref, rtol=1e-3)  # same init, same batches
    before = (out / "metrics.jsonl").read_bytes()
    assert main(["compare", "--resume", str(out)]) == 0  # a finished run: nothing to add
    assert (out / "metrics.jsonl").read_bytes() == before
