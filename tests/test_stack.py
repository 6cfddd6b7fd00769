"""Stacked training (bnlab.lab.stack): many networks in lock-step give each network's own
numbers, and the lab's runs built on it stay deterministic and resumable."""

import json

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.lab import stack as S
from bnlab.lab import ConfigError
from bnlab.lab.experiment_configs import CompareConfig, LrSweepConfig
from bnlab.lab.runner import run_experiment
from bnlab.lab.models import build_mlp
from bnlab.lab.rundir import read_rows
from bnlab.lab.train import Progress, evaluate
from bnlab.lab.workers import run_jobs
from bnlab.nn import _kernels, _ops
from conftest import TINY, stop_after, train_alone


def metrics(run_dir):
    return [r for r in read_rows(run_dir / "metrics.jsonl") if "epoch" in r]


def nets(norm, n, dtype=torch.float32, activation="sigmoid", features=12, depth=2, width=9):
    return [build_mlp(features, 4, depth, width, activation, norm, 0.5, seed).to(dtype)
            for seed in range(n)]


def data(n=200, features=12, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n, features, generator=gen, dtype=dtype) * 2 + 1,
            torch.randint(0, 4, (n,), generator=gen))


def batches(step, m, n=200, size=20):
    gen = torch.Generator().manual_seed(step)
    return torch.stack([torch.randperm(n, generator=gen)[:size] for _ in range(m)])


def solo_steps(model, x, y, idx_per_step, lr, momentum, opt=None):
    """The one-network reference, trained in place (see conftest.train_alone)."""
    train_alone(model, x, y, idx_per_step, lr, momentum, opt)
    return model


# -- the stacked BN -------------------------------------------------------------------------
@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stacked_bn_equals_batchnorm1d_network_by_network(kernels, dtype, monkeypatch):
    if not kernels:
        monkeypatch.setattr(_kernels, "_failure", "switched off for this test")
    M, N, C = 4, 30, 5
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, N, C, generator=gen, dtype=dtype) * 3 + 1e4
    x[2, 0, 1] = float("nan")  # network 2's statistics are not finite: its buffers stay
    layers = [bnn.BatchNorm1d(C, dtype=dtype, momentum=0.3) for _ in range(M)]
    for m in layers:
        with torch.no_grad():
            m.weight.uniform_(0.5, 2, generator=gen)
            m.bias.uniform_(-1, 1, generator=gen)
    stacked = {k: torch.stack([getattr(m, k).detach() for m in layers]).clone()
               for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    y, saved = _ops.stacked_forward(x, stacked["weight"], stacked["bias"], stacked["running_mean"],
                                    stacked["running_var"], stacked["num_batches_tracked"], 0.3, 1e-5)
    g = torch.randn(M, N, C, generator=gen, dtype=dtype)
    gx, gw, gb = _ops.stacked_backward(g, x, stacked["weight"], saved, 1e-5)
    for i, layer in enumerate(layers):
        xi = x[i].clone().requires_grad_()
        yi = layer(xi)
        yi.backward(g[i])
        for ours, ref in ((y[i], yi), (gx[i], xi.grad), (gw[i], layer.weight.grad),
                          (gb[i], layer.bias.grad), (stacked["running_mean"][i], layer.running_mean),
                          (stacked["running_var"][i], layer.running_var),
                          (stacked["num_batches_tracked"][i], layer.num_batches_tracked)):
            torch.testing.assert_close(ours, ref, equal_nan=True, rtol=0, atol=0)
    assert stacked["num_batches_tracked"].tolist() == [1, 1, 0, 1]


def test_stacked_bn_refuses_buffers_that_do_not_fit():
    x = torch.randn(3, 10, 4)
    w = torch.ones(3, 4)
    with pytest.raises(ValueError, match="should contain 12 elements"):
        _ops.stacked_forward(x, torch.ones(3, 5), None, None, None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="num_batches_tracked of 3 values"):
        _ops.stacked_forward(x, w, w, torch.zeros(3, 4), torch.ones(3, 4),
                             torch.zeros(2, dtype=torch.long), 0.1, 1e-5)
    _, saved = _ops.stacked_forward(x, w, w, None, None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        _ops.stacked_backward(torch.randn(3, 10, 5), x, w, saved, 1e-5)


# -- the Stack against one network alone ------------------------------------------------------
@pytest.mark.parametrize("norm,activation,momentum", [
    ("bn", "sigmoid", 0.0), ("bn", "relu", 0.9), ("none", "tanh", 0.5), ("none", "sigmoid", 0.0)])
def test_a_stack_equals_each_network_trained_alone_in_float64(norm, activation, momentum):
    x, y = data(dtype=torch.float64)
    lrs = [0.1, 0.1, 0.3, 0.05]
    stack = S.Stack(nets(norm, 4, torch.float64, activation), activation, lrs, momentum)
    steps = [batches(s, 4) for s in range(25)]
    for idx in steps:
        stack.step(x[idx], y[idx])
    for m in range(4):
        ref = solo_steps(nets(norm, 4, torch.float64, activation)[m], x, y,
                         [idx[m] for idx in steps], lrs[m], momentum)
        model, _ = stack.export(m)
        for (name, ours), theirs in zip(model.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10, msg=name)
        loss, acc = evaluate(ref, x, y)
        assert stack.evaluate(x, y)[m] == pytest.approx((loss, acc), rel=1e-12)


def test_a_stack_in_float32_follows_the_one_network_loop_for_50_steps():
    x, y = data()
    stack = S.Stack(nets("bn", 3), "sigmoid", [0.2] * 3, 0.0)
    steps = [batches(s, 3) for s in range(50)]
    for idx in steps:
        stack.step(x[idx], y[idx])
    for m in range(3):
        ref = solo_steps(nets("bn", 3)[m], x, y, [idx[m] for idx in steps], 0.2, 0.0)
        for ours, theirs in zip(stack.export(m)[0].state_dict().values(), ref.state_dict().values()):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_a_network_gives_the_same_bits_whatever_stack_it_is_in():
    """What makes a resumed run, whose stacks may be smaller, end with the same metrics."""
    x, y = data()
    steps = [batches(s, 5) for s in range(30)]

    def train(members):
        stack = S.Stack([nets("bn", 5, activation="relu")[m] for m in members], "relu",
                        [0.1] * len(members), 0.9)
        for idx in steps:
            stack.step(x[idx[members]], y[idx[members]])
        return stack, [stack.export(i)[0].state_dict() for i in range(len(members))]

    whole, states = train(list(range(5)))
    for members in ([3], [0, 4], [1, 2, 3]):
        part, part_states = train(members)
        for i, m in enumerate(members):
            for a, b in zip(part_states[i].values(), states[m].values()):
                assert torch.equal(a, b)
        assert part.evaluate(x, y) == [whole.evaluate(x, y)[m] for m in members]


def test_the_optimizer_state_is_torch_sgds():
    x, y = data(dtype=torch.float64)
    stack = S.Stack(nets("bn", 2, torch.float64), "sigmoid", [0.1, 0.1], 0.9)
    steps = [batches(s, 2) for s in range(3)]
    for idx in steps:
        stack.step(x[idx], y[idx])
    _, state = stack.export(1)
    ref = nets("bn", 2, torch.float64)[1]
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    solo_steps(ref, x, y, [idx[1] for idx in steps], 0.1, 0.9, opt)
    theirs = opt.state_dict()
    assert state["param_groups"] == theirs["param_groups"]
    assert state["state"].keys() == theirs["state"].keys()
    for k, v in theirs["state"].items():
        torch.testing.assert_close(state["state"][k]["momentum_buffer"], v["momentum_buffer"],
                                   rtol=0, atol=1e-12)
    opt.load_state_dict(state)  # and torch takes it back


def test_stack_refuses_networks_it_cannot_hold():
    with pytest.raises(ValueError, match="only build_mlp's networks"):
        S.Stack(nets("ghost-2", 2), "sigmoid", [0.1] * 2, 0)
    with pytest.raises(ValueError, match="one structure"):
        S.Stack(nets("bn", 1) + nets("none", 1), "sigmoid", [0.1] * 2, 0)


# -- runs built on stacks ------------------------------------------------------------------------
@pytest.mark.parametrize("norms", [("none", "bn"), ("ghost-4", "renorm", "gn", "ln"),
                                   ("full-batch", "population")])
def test_stacked_run_matches_the_one_network_loop_and_does_not_depend_on_workers(
        tmp_path, monkeypatch, norms):
    """Every stackable norm, through the runner: the same rows with any number of workers,
    and the one-network engine's to float tolerance."""
    cfg = CompareConfig(**{**TINY, "norms": norms}, workers=1)
    run_experiment(cfg, tmp_path / "one")
    run_experiment(CompareConfig(**{**TINY, "norms": norms}, workers=2), tmp_path / "two")
    run_experiment(cfg, tmp_path / "again")
    monkeypatch.setattr("bnlab.lab.runner.STACKABLE", ())
    run_experiment(cfg, tmp_path / "solo")
    one, solo = metrics(tmp_path / "one"), metrics(tmp_path / "solo")
    assert metrics(tmp_path / "two") == one == metrics(tmp_path / "again")
    key = lambda r: (r["unit"], r["epoch"])  # noqa: E731
    one, solo = sorted(one, key=key), sorted(solo, key=key)
    assert [key(r) for r in one] == [key(r) for r in solo]
    for a, b in zip(one, solo):
        for f in ("sgd_loss", "train_loss", "test_loss"):
            assert a[f] == pytest.approx(b[f], rel=1e-4, abs=1e-6)
        assert abs(a["test_acc"] - b["test_acc"]) <= 2 / 360  # a borderline example may flip


def test_checkpoints_are_shared_with_the_one_network_loop(tmp_path, monkeypatch):
    """A run cut under one loop resumes under the other (same checkpoint format)."""
    cfg = CompareConfig(**TINY, workers=1)
    run_experiment(cfg, tmp_path / "full")

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", progress=stop_after(100))
    assert any((tmp_path / "cut" / "checkpoints").iterdir())
    monkeypatch.setattr("bnlab.lab.runner.STACKABLE", ())
    run_experiment(None, tmp_path / "cut", resume=True)
    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert len(full) == len(cut)
    for a, b in zip(sorted(full, key=lambda r: (r["unit"], r["epoch"])),
                    sorted(cut, key=lambda r: (r["unit"], r["epoch"]))):
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)


def test_a_diverging_network_leaves_its_stack_and_the_others_go_on(tmp_path):
    cfg = LrSweepConfig(seeds=1, epochs=3, width=16, lrs=(0.1, 1000.0), norms=("bn",),
                        activation="relu", workers=1)
    run_experiment(cfg, tmp_path / "r")
    rows = read_rows(tmp_path / "r" / "metrics.jsonl")
    by_unit = {}
    for r in rows:
        by_unit.setdefault(r["unit"], []).append(r)
    wild = next(v for k, v in by_unit.items() if "lr1000" in k)
    calm = next(v for k, v in by_unit.items() if "lr0.1" in k)
    assert any(r.get("diverged") for r in wild) and wild[-1].get("done")
    assert [r["epoch"] for r in calm if "epoch" in r] == [1, 2, 3] and calm[-1].get("done")
    alone = LrSweepConfig(seeds=1, epochs=3, width=16, lrs=(0.1, 10.0), norms=("bn",),
                          activation="relu", workers=1)
    run_experiment(alone, tmp_path / "alone")
    ref = [r for r in read_rows(tmp_path / "alone" / "metrics.jsonl")
           if "lr0.1" in r["unit"] and "epoch" in r]
    assert [r["test_loss"] for r in calm if "epoch" in r] == [r["test_loss"] for r in ref]


def test_the_first_failing_job_stops_the_others_and_is_raised():
    progress = Progress()
    progress.total = 10**6
    ran = []

    def run(job):
        if job == "bad":
            raise RuntimeError("this job failed")
        for _ in range(10**6):
            progress.advance(1)
            ran.append(job)

    with pytest.raises(RuntimeError, match="this job failed"):
        run_jobs(["long", "bad", "never"], run, 2, progress)
    assert "never" not in ran and len(ran) < 10**6


def test_workers_flag_is_not_part_of_the_digest_and_old_configs_load(tmp_path):
    assert CompareConfig(workers=1).digest() == CompareConfig(workers=3).digest()
    stored = {k: v for k, v in CompareConfig().to_dict().items() if k != "workers"}
    assert CompareConfig.from_dict(stored).workers == 0
    with pytest.raises(Exception, match="workers must be"):
        CompareConfig(workers=-1)
    assert json.dumps(CompareConfig().to_dict())


def test_resume_may_change_the_workers_and_nothing_else(tmp_path):
    from bnlab.cli import main

    out = tmp_path / "r"

    with pytest.raises(KeyboardInterrupt):
        run_experiment(CompareConfig(**TINY, workers=2), out, progress=stop_after(150))
    assert main(["compare", "--resume", str(out), "--workers", "1"]) == 0
    assert "workers" not in json.loads((out / "config.json").read_text())  # a session's, not the config's
    sessions = json.loads((out / "run.json").read_text())["sessions"]
    assert [s["settings"]["workers"] for s in sessions] == [2, 1]
    run_experiment(CompareConfig(**TINY, workers=1), tmp_path / "clean")
    assert read_rows(out / "metrics.jsonl") == read_rows(tmp_path / "clean" / "metrics.jsonl")
    assert main(["compare", "--resume", str(out), "--seeds", "3"]) == 2


@pytest.mark.parametrize("shape", [(2, 60, 5), (3, 60, 3), (2, 59, 100), (3, 100, 100),
                                   (2, 25, 100), (4, 16, 4)])
def test_elementwise_ops_give_each_network_its_own_bits(shape):
    """Vectorized sigmoid/exp/log round a tensor's last few values differently, and only some
    values differ: checked over many draws, not one."""
    gen = torch.Generator().manual_seed(3)
    for fn in (torch.sigmoid, torch.exp, torch.tanh):
        for _ in range(20):
            u = torch.randn(shape, generator=gen) * 4
            out = S.each(fn, u)
            for m in range(shape[0]):
                assert torch.equal(out[m], fn(u[m].clone()))


def test_a_narrow_network_gives_the_same_rows_in_stacks_of_any_size(tmp_path):
    runs = {}
    for seeds in (1, 3):
        out = tmp_path / f"s{seeds}"
        run_experiment(CompareConfig(epochs=4, seeds=seeds, width=5, norms=("none", "bn"),
                                     workers=1), out)
        runs[seeds] = {(r["unit"], r["epoch"]): {k: v for k, v in r.items() if k != "config"}
                       for r in metrics(out)}
    assert all(runs[3][k] == v for k, v in runs[1].items())


def test_a_momentum_checkpoint_without_buffers_is_refused_as_damaged(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(CompareConfig(**TINY, momentum=0.9, workers=1), out,
                       progress=stop_after(60))  # the first stack is past its first evaluation
    ckpt = next((out / "checkpoints").iterdir())
    state = torch.load(ckpt, weights_only=True)
    state["optimizer"]["state"] = {}
    torch.save(state, ckpt)
    with pytest.raises(ConfigError, match=r"lacks momentum buffers\); delete it"):
        run_experiment(None, out, resume=True)
