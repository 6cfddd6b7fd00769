"""StackedNets (bnlab.lab.engine): many networks of any model the lab builds, trained in
lock-step by autograd over stacked ops, each with the bits it would get in any other stack,
Stack's bits where Stack can hold the networks, and the one-network loop's numbers."""

import pytest
import torch
from torch import nn

from bnlab.lab import engine as E
from bnlab.lab import stack as S
from bnlab.lab.models import build_cnn, build_mlp
from bnlab.lab.norms import norm as norm_entry
from bnlab.lab.train import Network, evaluate, read_sgd_state
from conftest import train_alone

MLP_NORMS = ["none", "bn", "ghost-4", "renorm", "gn", "ln"]
CNN_NORMS = ["none", "bn", "renorm", "gn", "ln"]
WHOLE_SET = ["full-batch", "population"]  # statistics from the whole training set
ALL = [("mlp", n) for n in MLP_NORMS] + [("cnn", n) for n in CNN_NORMS]
FEATURES = {"mlp": 12, "cnn": 64}  # the CNN's images are 8 x 8


@pytest.fixture(autouse=True)
def one_thread():
    """The lab's default (--threads 1), under which the whole-stack forms are checked; with
    more threads than free cores torch's products wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def nets(kind, norm, seeds, dtype=torch.float32, activation="relu"):
    if kind == "mlp":
        return [build_mlp(12, 4, 2, 9, activation, norm, 0.5, s).to(dtype) for s in seeds]
    return [build_cnn(8, 4, norm, s).to(dtype) for s in seeds]


def data(kind, dtype=torch.float32, n=120):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n, FEATURES[kind], generator=gen, dtype=dtype) * 2 + 1,
            torch.randint(0, 4, (n,), generator=gen))


def batches(step, m=5, n=120, size=16):
    gen = torch.Generator().manual_seed(step)
    return torch.stack([torch.randperm(n, generator=gen)[:size] for _ in range(m)])


def perturb_norms(model, seed):
    """Other weights, biases and running statistics in the norm layers. (Batch Renorm with
    running statistics (0, 1) and a zero bias maps an input of 0 to 0 give or take rounding,
    whose sign then decides what a ReLU lets through: comparisons of rounding orders are
    ill-conditioned there.)"""
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for module in model:
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            for name, t in [*module.named_parameters(recurse=False),
                            *module.named_buffers(recurse=False)]:
                if t.is_floating_point():
                    t.mul_(torch.empty_like(t).uniform_(0.5, 1.5, generator=gen))
                    if name != "running_var":
                        t.add_(torch.empty_like(t).uniform_(-0.2, 0.2, generator=gen))
    return model


solo = train_alone


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the bits of Stack ----------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["none", "bn"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_stacked_nets_give_stacks_bits_for_the_default_compare_network(norm, momentum):
    """compare's network (64 -> 3 x 100 sigmoid -> 10, init 0.2, batch 60, lr 0.1), whose
    committed results Stack made: 30 steps, the same losses, tensors and evaluation."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(600, 64, generator=gen), torch.randint(0, 10, (600,), generator=gen)
    def make():
        return [build_mlp(64, 10, 3, 100, "sigmoid", norm, 0.2, s) for s in range(3)]
    lrs = [0.1, 0.1, 0.05]
    stack, ours = S.Stack(make(), "sigmoid", lrs, momentum), E.StackedNets(make(), lrs, momentum)
    for step in range(30):
        idx = batches(step, 3, 600, 60)
        assert torch.equal(stack.step(x[idx], y[idx]), ours.step(x[idx], y[idx])), step
    for m in range(3):
        (a, opt_a), (b, opt_b) = stack.export(m), ours.export(m)
        assert states_equal(a.state_dict(), b.state_dict())
        for k, v in opt_a["state"].items():
            assert torch.equal(v["momentum_buffer"], opt_b["state"][k]["momentum_buffer"])
    assert stack.evaluate(x, y) == ours.evaluate(x, y)


def test_a_compare_run_through_stacked_nets_records_what_stack_recorded(tmp_path, monkeypatch):
    """The whole loop (bnlab.lab.train.fit with StackedNets as its engine): the same rows."""
    from conftest import TINY, rows
    from bnlab.lab.experiment_configs import CompareConfig
    from bnlab.lab.runner import run_experiment

    run_experiment(CompareConfig(**TINY, workers=1), tmp_path / "stack")
    stacks = []
    monkeypatch.setattr("bnlab.lab.runner.stack_engine", lambda activation: lambda *args: (
        stacks.append(E.StackedNets(*args)) or stacks[-1]))
    run_experiment(CompareConfig(**TINY, workers=1), tmp_path / "nets")
    assert stacks
    assert rows(tmp_path / "nets") == rows(tmp_path / "stack")


# -- a network's numbers, whatever its stack ------------------------------------------------------
def train(kind, norm, members, steps=6, momentum=0.9):
    """Networks ``members`` of five (other seeds, learning rates and norm tensors), trained
    together as the lab's loop trains them (``train_step``, ``before_measure``): the stack,
    each step's losses, and the data."""
    x, y = data(kind)
    models = [perturb_norms(m, s) if s != 3 else m
              for m, s in zip(nets(kind, norm, members), members)]
    stack = E.StackedNets(models, [0.05 + 0.05 * s for s in members], momentum,
                          statistics=norm_entry(norm).statistics)
    losses = torch.stack([stack.train_step(x, y, list(idx[members]))
                          for idx in (batches(s) for s in range(steps))])
    stack.before_measure(x)
    return stack, losses, x, y


def assert_same_networks(part, members, whole, part_losses, whole_losses, x, y):
    for i, m in enumerate(members):
        assert torch.equal(part_losses[:, i], whole_losses[:, m])
        (a, opt_a), (b, opt_b) = part.export(i), whole.export(m)
        assert states_equal(a.state_dict(), b.state_dict())
        assert all(torch.equal(v["momentum_buffer"], opt_b["state"][k]["momentum_buffer"])
                   for k, v in opt_a["state"].items())
    results = whole.evaluate(x, y)
    assert part.evaluate(x, y) == [results[m] for m in members]


@pytest.mark.parametrize("kind,norm", ALL + [("mlp", n) for n in WHOLE_SET])
def test_a_network_gives_the_same_bits_in_a_stack_of_one_and_of_five(kind, norm):
    whole, whole_losses, x, y = train(kind, norm, [0, 1, 2, 3, 4])
    part, part_losses, _, _ = train(kind, norm, [3])
    assert_same_networks(part, [3], whole, part_losses, whole_losses, x, y)


class _Apart(dict):
    """A probe record where no whole-stack form was found exact: every op network by network."""

    def get(self, key, default=None):
        return False


@pytest.mark.parametrize("kind,norm", [("cnn", "bn"), ("cnn", "gn"), ("mlp", "ln"),
                                       ("mlp", "full-batch"), ("mlp", "population")])
def test_the_network_by_network_forms_give_the_same_bits(kind, norm, monkeypatch):
    """What a stack falls back on where a probe finds a whole-stack op inexact."""
    whole, whole_losses, x, y = train(kind, norm, [0, 1, 2, 3, 4])
    monkeypatch.setattr(S, "_CHECKED", _Apart())
    apart, apart_losses, _, _ = train(kind, norm, [0, 1, 2, 3, 4])
    assert_same_networks(apart, range(5), whole, apart_losses, whole_losses, x, y)


def test_keep_goes_on_as_a_stack_of_those_networks_alone():
    x, y = data("cnn")
    steps = [batches(s) for s in range(6)]
    lrs = [0.05, 0.1, 0.15, 0.2, 0.25]
    full = E.StackedNets(nets("cnn", "bn", range(5)), lrs, 0.9)
    few = E.StackedNets(nets("cnn", "bn", [1, 4]), [lrs[1], lrs[4]], 0.9)
    for s, idx in enumerate(steps):
        if s == 3:
            full.keep([1, 4])
        rows = idx if s < 3 else idx[[1, 4]]
        out = full.step(x[rows], y[rows])
        assert torch.equal(out[[1, 4]] if s < 3 else out, few.step(x[idx[[1, 4]]], y[idx[[1, 4]]]))
    for i in range(2):
        assert states_equal(full.export(i)[0].state_dict(), few.export(i)[0].state_dict())


def test_a_network_whose_statistics_are_not_finite_leaves_its_running_statistics_alone():
    x, y = data("cnn")
    stack = E.StackedNets(nets("cnn", "bn", range(3)), [0.1] * 3, 0.0)
    before = [m.state_dict() for m in (stack.export(i)[0] for i in range(3))]
    before = [{k: v.clone() for k, v in s.items()} for s in before]
    batch = x[batches(0, 3)].clone()
    batch[1, 0, 5] = float("nan")
    stack.step(batch, y[batches(0, 3)])
    after = [stack.export(i)[0].state_dict() for i in range(3)]
    for name in ("2.running_mean", "2.running_var", "2.num_batches_tracked"):
        assert torch.equal(after[1][name], before[1][name])
        assert not torch.equal(after[0][name], before[0][name])
    assert [int(s["2.num_batches_tracked"]) for s in after] == [1, 0, 1]


# -- the one-network loop's numbers ---------------------------------------------------------------
@pytest.mark.parametrize("kind,norm", ALL)
def test_stacked_nets_follow_the_one_network_loop_in_float64(kind, norm):
    x, y = data(kind, torch.float64)
    lrs, steps = [0.05, 0.1, 0.02], [batches(s, 3) for s in range(5)]
    make = lambda m: perturb_norms(nets(kind, norm, [m], torch.float64)[0], m)  # noqa: E731
    stack = E.StackedNets([make(m) for m in range(3)], lrs, 0.5)
    losses = torch.stack([stack.step(x[idx], y[idx]) for idx in steps])
    results = stack.evaluate(x, y)
    for m in range(3):
        ref = make(m)
        ref_losses = solo(ref, x, y, [idx[m] for idx in steps], lrs[m], 0.5)
        torch.testing.assert_close(losses[:, m], ref_losses, rtol=0, atol=1e-10)
        for (name, ours), theirs in zip(stack.export(m)[0].state_dict().items(),
                                        ref.state_dict().values()):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10, msg=name)
        assert results[m] == pytest.approx(tuple(evaluate(ref, x, y)), rel=1e-10)


@pytest.mark.parametrize("norm", WHOLE_SET)
def test_whole_set_statistics_follow_the_one_network_engine_in_float64(norm):
    """Full-batch BN (the whole set through the network, the loss on the batch's rows) and
    population BN (statistics refreshed over the whole set before every step and every
    measurement), against bnlab.lab.train.Network on each network alone."""
    x, y = data("mlp", torch.float64)
    lrs, steps = [0.05, 0.1, 0.02], [batches(s, 3) for s in range(5)]
    statistics = norm_entry(norm).statistics
    make = lambda m: perturb_norms(nets("mlp", norm, [m], torch.float64)[0], m)  # noqa: E731
    stack = E.StackedNets([make(m) for m in range(3)], lrs, 0.5, statistics=statistics)
    losses = torch.stack([stack.train_step(x, y, list(idx)) for idx in steps])
    stack.before_measure(x)
    results = stack.evaluate(x, y)
    for m in range(3):
        ref = make(m)
        alone = Network([ref], [lrs[m]], 0.5, [[None] * len(list(ref.parameters()))],
                        statistics=statistics)
        ref_losses = torch.cat([alone.train_step(x, y, [idx[m]]) for idx in steps])
        alone.before_measure(x)
        torch.testing.assert_close(losses[:, m], ref_losses, rtol=0, atol=1e-10)
        for (name, ours), theirs in zip(stack.export(m)[0].state_dict().items(),
                                        ref.state_dict().values()):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10, msg=name)
        assert results[m] == pytest.approx(tuple(evaluate(ref, x, y)), rel=1e-10)


@pytest.mark.parametrize("kind,norm", [("mlp", "bn"), ("cnn", "bn"), ("cnn", "gn")])
def test_stacked_nets_in_float32_follow_the_one_network_loop(kind, norm):
    x, y = data(kind)
    steps = [batches(s, 2) for s in range(20)]
    stack = E.StackedNets(nets(kind, norm, range(2)), [0.05] * 2, 0.0)
    for idx in steps:
        stack.step(x[idx], y[idx])
    for m in range(2):
        ref = nets(kind, norm, [m])[0]
        solo(ref, x, y, [idx[m] for idx in steps], 0.05, 0.0)
        for ours, theirs in zip(stack.export(m)[0].state_dict().values(),
                                ref.state_dict().values()):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# -- checkpoints both ways ------------------------------------------------------------------------
@pytest.mark.parametrize("kind,norm", [("mlp", "bn"), ("cnn", "renorm")])
def test_export_resumes_in_the_one_network_loop_and_back(kind, norm):
    x, y = data(kind, torch.float64)
    steps = [batches(s, 2) for s in range(6)]
    lr, momentum = 0.05, 0.9
    through = nets(kind, norm, [1], torch.float64)[0]  # six steps in the one-network loop
    ref_losses = solo(through, x, y, [idx[1] for idx in steps], lr, momentum)

    stack = E.StackedNets(nets(kind, norm, range(2), torch.float64), [lr] * 2, momentum)
    losses = [stack.step(x[idx], y[idx])[1] for idx in steps[:3]]
    model, state = stack.export(1)  # stack -> one network
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    opt.load_state_dict(state)
    losses += list(solo(model, x, y, [idx[1] for idx in steps[3:5]], lr, momentum, opt))
    buffers = read_sgd_state(opt.state_dict(), list(model.parameters()), momentum)
    back = E.StackedNets([model], [lr], momentum, [buffers])  # one network -> stack
    losses.append(back.step(x[steps[5][1:]], y[steps[5][1:]])[0])

    torch.testing.assert_close(torch.stack(losses), ref_losses, rtol=0, atol=1e-10)
    for ours, theirs in zip(back.export(0)[0].state_dict().values(), through.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_the_optimizer_state_is_torch_sgds():
    x, y = data("cnn", torch.float64)
    stack = E.StackedNets(nets("cnn", "gn", range(2), torch.float64), [0.1, 0.1], 0.9)
    for s in range(2):
        idx = batches(s, 2)
        stack.step(x[idx], y[idx])
    model, state = stack.export(1)
    theirs = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()
    assert state["param_groups"] == theirs["param_groups"]
    assert sorted(state["state"]) == list(range(len(list(model.parameters()))))


# -- what cannot be stacked -----------------------------------------------------------------------
@pytest.mark.parametrize("models,error,match", [
    (lambda: [], ValueError, "at least one network"),
    (lambda: nets("mlp", "bn", [0]) + nets("mlp", "none", [1]), ValueError,
     "share one structure: network 1 has layers Linear, ReLU"),
    (lambda: nets("mlp", "ghost-2", [0]) + nets("mlp", "ghost-4", [1]), ValueError,
     "layer 1 of network 1 is GhostBatchNorm.*virtual_batch_size=4"),
    (lambda: [build_mlp(12, 4, 2, 9, "relu", "bn", 0.5, 0), build_mlp(12, 4, 2, 8, "relu", "bn",
                                                                      0.5, 1)],
     ValueError, "layer 0 of network 1 is Linear.*out_features=8"),
    (lambda: nets("mlp", "bn", [0]) + nets("mlp", "bn", [1], torch.float64), ValueError,
     "share one structure"),
    (lambda: nets("mlp", "torch-bn", [0]), ValueError,
     r"cannot stack layer 1, torch.nn.modules.batchnorm.BatchNorm1d: .*norms none, bn"),
    (lambda: nets("mlp", "noisy", [0]), ValueError, "cannot stack layer 1, .*Sequential"),
    (lambda: nets("mlp", "population", [0]), ValueError,
     r"PopulationBatchNorm1d .* needs statistics='population' for it \(got 'batch'\)"),
    (lambda: nets("cnn", "ghost-2", [0]), ValueError,
     "cannot stack layer 2, GhostBatchNorm, where its input is an image"),
    (lambda: [nn.Linear(3, 2)], TypeError, r"nn.Sequential networks \(network 0 is a Linear\)"),
    (lambda: [nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 2, 3, padding_mode="reflect"),
                            nn.Flatten(), nn.Linear(72, 4))], ValueError,
     "convolutions with zero padding"),
    (lambda: [nn.Sequential(nn.Unflatten(1, (8, 8)), nn.Flatten(), nn.Linear(64, 4))],
     ValueError, r"Unflatten\(1, \(C, H, W\)\) only"),
    (lambda: [nn.Sequential(nn.Linear(64, 4), nn.MaxPool2d(2))], ValueError,
     "cannot stack layer 1, MaxPool2d, where its input is flat"),
])
def test_networks_that_cannot_be_stacked_are_refused(models, error, match):
    with pytest.raises(error, match=match):
        E.StackedNets(models(), [0.1] * len(models()), 0.0)


def test_bad_calls_are_refused():
    with pytest.raises(ValueError, match=r"one learning rate per network \(2 networks, got 1"):
        E.StackedNets(nets("mlp", "bn", range(2)), [0.1], 0.0)
    stack = E.StackedNets(nets("mlp", "bn", range(2)), [0.1] * 2, 0.0)
    with pytest.raises(ValueError, match=r"expects x \(M=2, N, features\).*got x \(3, 8, 12\)"):
        stack.step(torch.zeros(3, 8, 12), torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="buffers of 2 networks"):
        stack.load_buffers([[None] * 5])
    with pytest.raises(ValueError, match=r"statistics must be one of batch, whole, .*'all'"):
        E.StackedNets(nets("mlp", "bn", range(2)), [0.1] * 2, 0.0, statistics="all")
    with pytest.raises(ValueError, match=r"expects idx \(M=2, B\) \(got \(3, 4\)\)"):
        stack.step_whole(torch.zeros(8, 12), torch.zeros(8, dtype=torch.long),
                         torch.zeros(3, 4, dtype=torch.long))
    ghost = E.StackedNets(nets("mlp", "ghost-4", range(2)), [0.1] * 2, 0.0)
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 must divide .*batch size 10\)"):
        ghost.step(torch.zeros(2, 10, 12), torch.zeros(2, 10, dtype=torch.long))
