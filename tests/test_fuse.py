"""bnlab.nn.fuse_bn_act: each BatchNorm whose output only its activation reads becomes one
BatchNormAct*d, found in a torch.fx graph. The fused model equals the original (float64:
outputs, gradients, running statistics, in train and eval), keeps its state_dict keys, and
leaves every BN that something else reads (a residual, a second branch) as it was."""

from __future__ import annotations

import copy
import io
import logging
import re
from pathlib import Path

import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

import bnlab.nn as bnn
from bnlab.nn.modules import TORCH_HAS_BIAS_FLAG
from conftest import ResNetBlock

FUSED = {1: bnn.BatchNormAct1d, 2: bnn.BatchNormAct2d, 3: bnn.BatchNormAct3d}
LAYER_MD = Path(__file__).resolve().parents[1] / "docs" / "layer.md"


# -- models -----------------------------------------------------------------------------------
class ReadTwice(nn.Module):
    """bn's output goes to the ReLU and to the sum: a fused layer would lose the BN output."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(x)
        return F.relu(y) + y


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in float64 with BN weights, biases and running statistics away from their
    defaults, so that a parameter or buffer not carried over shows."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t in (m.weight, m.bias):
                    if t is not None:
                        t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
                if m.running_mean is not None:
                    m.running_mean.normal_(generator=gen)
                    m.running_var.uniform_(0.5, 2.0, generator=gen)
                    m.num_batches_tracked.fill_(7)
    return model


def _x(shape=(4, 3, 5, 5), seed=1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float,
           what: str) -> None:
    """|actual - expected| <= atol + rtol * max|expected| everywhere: relative to the
    tensor's scale (and a tenth of the time assert_close takes on ResNet's gradients)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    bound = atol + rtol * (expected.double().abs().max().item() if actual.numel() else 0.0)
    assert err <= bound, f"{what}: largest difference {err:.3g} > {bound:.3g}"


def _assert_same(model: nn.Module, fused: nn.Module, x: torch.Tensor, *, rtol=1e-10,
                 atol=1e-12) -> None:
    """Outputs, input and parameter gradients, and state after a training step; then eval
    outputs and input gradients."""
    for m in (model, fused):
        m.train()
        m.zero_grad()
    x, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_fused = model(x), fused(x_fused)
    _close(y_fused, y, rtol, atol, "training output")
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    (y * w).sum().backward()
    (y_fused * w).sum().backward()
    _close(x_fused.grad, x.grad, rtol, atol, "input gradient")
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, p in fused.named_parameters():
        assert p.grad is not None, name
        _close(p.grad, grads[name], rtol, atol, f"gradient of {name}")
    want = model.state_dict()
    for key, value in fused.state_dict().items():
        _close(value, want[key], rtol, atol, key)
    x, x_fused = x.detach().requires_grad_(), x.detach().requires_grad_()
    y, y_fused = model.eval()(x), fused.eval()(x_fused)  # running statistics
    _close(y_fused, y, rtol, atol, "eval output")
    (y * w).sum().backward()
    (y_fused * w).sum().backward()
    _close(x_fused.grad, x.grad, rtol, atol, "eval input gradient")


def _by_bn(report) -> dict:
    return {r.bn: r for r in report}


# -- the ResNet pattern -------------------------------------------------------------------------
def test_resnet_block_fuses_bn1_and_keeps_the_shared_relu_for_the_add():
    model = _seeded(ResNetBlock())
    fused, report = bnn.fuse_bn_act(model, return_report=True)
    assert isinstance(fused, fx.GraphModule)
    r = _by_bn(report)
    assert r["bn1"].fused and r["bn1"].act == "relu (ReLU)" and r["bn1"].save == "input"
    assert not r["bn2"].fused and "operator.add" in r["bn2"].reason
    assert str(r["bn2"]).startswith("bn2: left: its output goes to operator.add")
    assert type(fused.bn1) is bnn.BatchNormAct2d and type(fused.bn1.act) is nn.ReLU
    assert type(fused.bn2) is nn.BatchNorm2d and type(fused.relu) is nn.ReLU  # still called
    calls = [n.target for n in fused.graph.nodes if n.op == "call_module"]
    assert calls == ["conv1", "bn1", "conv2", "bn2", "relu"]
    assert type(model.bn1) is nn.BatchNorm2d  # the argument is left alone
    _assert_same(model, fused, _x())


def test_an_activation_module_no_node_calls_any_more_is_removed():
    model = _seeded(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 2, 1)))
    fused = bnn.fuse_bn_act(model)
    assert type(fused.get_submodule("1")) is bnn.BatchNormAct2d
    assert not hasattr(fused, "2")
    assert list(fused.state_dict()) == list(model.state_dict())
    _assert_same(model, fused, _x())


# -- activations ------------------------------------------------------------------------------
FUNCTIONS = {
    "F.relu": (lambda y: F.relu(y), "relu"),
    "F.relu(inplace=True)": (lambda y: F.relu(y, inplace=True), "relu"),
    "torch.relu": (lambda y: torch.relu(y), "relu"),
    "torch.relu_": (lambda y: torch.relu_(y), "relu"),
    "F.relu_": (lambda y: F.relu_(y), "relu"),
    "Tensor.relu": (lambda y: y.relu(), "relu"),
    "Tensor.relu_": (lambda y: y.relu_(), "relu"),
    "F.leaky_relu": (lambda y: F.leaky_relu(y, 0.2), "leaky_relu"),
    "F.leaky_relu(kw, inplace)": (lambda y: F.leaky_relu(y, negative_slope=0.3, inplace=True),
                                  "leaky_relu"),
    "F.leaky_relu_": (lambda y: F.leaky_relu_(y, 0.25), "leaky_relu"),
    "F.silu": (lambda y: F.silu(y), "silu"),
    "F.silu(inplace=True)": (lambda y: F.silu(y, inplace=True), "silu"),
}


class Functional(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)
        self.fn = fn

    def forward(self, x):
        return self.head(self.fn(self.bn(self.conv(x))))


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_functional_activations(name):
    fn, kind = FUNCTIONS[name]
    model = _seeded(Functional(fn))
    fused, report = bnn.fuse_bn_act(model, return_report=True)
    assert [r.fused for r in report] == [True], report
    act = fused.bn.act
    assert bnn.act.act_of(act).kind == kind
    if kind == "leaky_relu":
        assert act.negative_slope == {"F.leaky_relu": 0.2, "F.leaky_relu_": 0.25}.get(name, 0.3)
    assert not any(n.op in ("call_function", "call_method") for n in fused.graph.nodes)
    _assert_same(model, fused, _x())


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.1), nn.SiLU(), nn.Identity()])
@pytest.mark.parametrize("lib", ["torch", "bnlab"])
def test_each_activation_module_and_dimension(act, dim, lib):
    bn = {"torch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
          "bnlab": {1: bnn.BatchNorm1d, 2: bnn.BatchNorm2d, 3: bnn.BatchNorm3d}}[lib][dim](3)
    model = _seeded(nn.Sequential(bn, act, nn.Tanh()))
    fused, report = bnn.fuse_bn_act(model, acts=bnn.act.ACTIVATIONS, return_report=True)
    assert report[0].fused and report[0].act.endswith(f"({type(act).__name__})")
    layer = fused.get_submodule("0")
    assert type(layer) is FUSED[dim] and bnn.act.act_of(layer.act) == bnn.act.act_of(act)
    assert layer.act is not act  # a copy: the original's activation module stays its own
    shape = {1: (6, 3, 4), 2: (4, 3, 3, 3), 3: (2, 3, 2, 3, 2)}[dim]
    _assert_same(model, fused, _x(shape))


def test_acts_chooses_which_activations_are_fused():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.SiLU(), nn.BatchNorm1d(3), nn.ReLU(),
                          nn.BatchNorm1d(3), nn.Identity())
    fused, report = bnn.fuse_bn_act(model, acts=["relu"], return_report=True)
    r = _by_bn(report)
    assert [r[k].fused for k in "024"] == [False, True, False]
    assert r["0"].reason == "silu is not among acts=('relu',)"
    assert r["4"].reason == "identity is not among acts=('relu',)"
    default = _by_bn(bnn.fuse_bn_act(model, return_report=True)[1])  # identity needs naming
    assert [default[k].fused for k in "024"] == [True, True, False]
    assert bnn.fuse_bn_act(model, acts="identity", return_report=True)[1][2].fused


def test_save_output_where_the_activation_is_invertible():
    model = _seeded(nn.Sequential(nn.BatchNorm1d(3), nn.LeakyReLU(0.1), nn.BatchNorm1d(3),
                                  nn.ReLU(), nn.BatchNorm1d(3), nn.LeakyReLU(0.0)))
    fused, report = bnn.fuse_bn_act(model, save="output", return_report=True)
    r = _by_bn(report)
    assert r["0"].fused and r["0"].save == "output" and r["0"].reason == ""
    assert fused.get_submodule("0").save == "output"
    for k in "24":  # relu, and leaky relu of slope 0: not invertible, fused keeping the input
        assert r[k].fused and r[k].save == "input" and fused.get_submodule(k).save == "input"
        assert "not invertible" in r[k].reason and "not invertible" in str(r[k])
    _assert_same(model, fused, _x((8, 3)))


class WrittenAfter(nn.Module):
    """The activation's output changed in place (through a view) after the fused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = F.leaky_relu(self.bn(x), 0.1)
        y.flatten(1).mul_(2)
        return y


def test_save_output_is_not_used_where_the_output_is_changed_in_place():
    dropout = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.LeakyReLU(0.1),
                            nn.Dropout(0.5, inplace=True))
    for model, writer in ((dropout, "3 (Dropout)"), (WrittenAfter(), "Tensor.mul_()")):
        model = _seeded(model)
        fused, report = bnn.fuse_bn_act(model, save="output", return_report=True)
        assert report[0].fused and report[0].save == "input", report[0]
        assert report[0].reason == f"save='input': {writer} changes its output in place"
        # with save="output", backward would find its saved output modified in place
        copy.deepcopy(fused)(_x().requires_grad_()).sum().backward()
    _assert_same(model, fused, _x())  # WrittenAfter


# -- what is left ------------------------------------------------------------------------------
def test_a_bn_read_twice_is_left():
    model = _seeded(ReadTwice())
    fused, report = bnn.fuse_bn_act(model, return_report=True)
    assert not report[0].fused and type(fused.bn) is nn.BatchNorm2d
    assert report[0].reason == ("its output is read by 2 nodes (torch.nn.functional.relu, "
                                "operator.add), not by one activation")
    _assert_same(model, fused, _x())


def test_the_bn_output_as_the_model_output_is_left():
    model = nn.Sequential(nn.BatchNorm2d(3))
    fused, report = bnn.fuse_bn_act(model, return_report=True)
    assert not report[0].fused and "the model's output" in report[0].reason


class Twice(nn.Module):
    """One BN module called twice: fused at both calls, or at none."""

    def __init__(self, second) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.second = second

    def forward(self, x):
        return F.relu(self.bn(x)) * self.second(self.bn(x * 2))


@pytest.mark.parametrize("second, fused_at_both", [(torch.relu, True), (torch.tanh, False),
                                                   (F.silu, False)])
def test_a_bn_called_twice_is_fused_at_both_calls_or_left(second, fused_at_both):
    model = _seeded(Twice(second))
    fused, report = bnn.fuse_bn_act(model, return_report=True)
    assert report[0].fused is fused_at_both
    if fused_at_both:
        assert report[0].act == "torch.nn.functional.relu (at 2 calls)"
        assert type(fused.bn) is bnn.BatchNormAct2d
    elif second is F.silu:
        assert report[0].reason == ("called at 2 places in forward, followed by different "
                                    "activations")
    else:
        assert report[0].reason.startswith("at one of its 2 calls in forward, its output goes "
                                           "to torch.tanh")
    _assert_same(model, fused, _x())


class OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class OwnDefaults(nn.BatchNorm2d):
    """Only the constructor differs: fused."""

    def __init__(self, c: int) -> None:
        super().__init__(c, eps=1e-3, momentum=0.3)


def test_bn_layers_that_are_not_exactly_batchnorm_are_left():
    hooked = nn.BatchNorm2d(3)
    hooked.register_forward_hook(lambda m, i, o: o)
    patched = nn.BatchNorm2d(3)
    patched.forward = lambda x: x
    cases = {
        "already a BatchNormAct2d": bnn.BatchNormAct2d(3, act="identity"),
        "OwnForward subclasses BatchNorm2d and may compute something else (OwnForward "
        "defines forward)": OwnForward(3),
        "BatchRenorm2d has no fused form": bnn.BatchRenorm2d(3),
        "GhostBatchNorm has no fused form": bnn.GhostBatchNorm(3, 2),
        "SyncBatchNorm has no fused form": nn.SyncBatchNorm(3),
        "it has hooks, which the fused layer would not call": hooked,
        "its forward was replaced on the instance": patched,
    }
    for reason, bn in cases.items():
        fused, report = bnn.fuse_bn_act(nn.Sequential(bn, nn.ReLU()), return_report=True)
        assert not report[0].fused and report[0].reason.startswith(reason), report[0].reason
        assert type(fused.get_submodule("0")) is type(bn)
    fused, report = bnn.fuse_bn_act(nn.Sequential(OwnDefaults(3), nn.ReLU()), return_report=True)
    layer = fused.get_submodule("0")
    assert report[0].fused and (layer.eps, layer.momentum) == (1e-3, 0.3)


def test_an_activation_module_with_a_hook_is_left():
    relu = nn.ReLU()
    relu.register_forward_pre_hook(lambda m, i: None)
    _, report = bnn.fuse_bn_act(nn.Sequential(nn.BatchNorm2d(3), relu), return_report=True)
    assert report[0].reason == "1 (ReLU) has hooks, which the fused layer would not call"


class Slope(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.leaky_relu(self.bn(x), x.mean())  # a graph value, not a constant


def test_a_computed_negative_slope_is_left():
    _, report = bnn.fuse_bn_act(Slope(), return_report=True)
    assert not report[0].fused and report[0].reason == (
        "its output goes to torch.nn.functional.leaky_relu, whose negative_slope is not a "
        "constant number")


# -- state ------------------------------------------------------------------------------------
def test_state_dict_round_trip_and_nothing_shared_with_the_original():
    model = _seeded(ResNetBlock())
    fused = bnn.fuse_bn_act(model)
    assert list(fused.state_dict()) == list(model.state_dict())
    other = _seeded(ResNetBlock(), seed=5)
    fused.load_state_dict(other.state_dict())  # strict: the same keys both ways
    model.load_state_dict(fused.state_dict())
    for key, value in other.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert fused.bn1.weight.data_ptr() != model.bn1.weight.data_ptr()
    assert fused.bn1.weight.data_ptr() == fused.state_dict()["bn1.weight"].data_ptr()


@pytest.mark.parametrize("kw", [
    dict(eps=1e-3, momentum=None),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False),
    pytest.param(dict(bias=False), marks=pytest.mark.skipif(
        not TORCH_HAS_BIAS_FLAG, reason="this torch's BatchNorm has no bias flag")),
])
def test_the_bn_hyperparameters_are_kept(kw):
    model = _seeded(nn.Sequential(nn.BatchNorm2d(3, **kw), nn.ReLU()))
    layer = bnn.fuse_bn_act(model).get_submodule("0")
    bn = model[0]
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
        assert getattr(layer, name) == getattr(bn, name), name
    assert list(layer.state_dict()) == list(bn.state_dict())
    assert (layer.bias is None) is (bn.bias is None)
    _assert_same(model, bnn.fuse_bn_act(model), _x())


class Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.BatchNorm1d(3)
        self.b = self.a

    def forward(self, x):
        return F.relu(self.b(x))


def test_a_bn_registered_under_two_names_keeps_both():
    model = _seeded(Aliased())
    fused = bnn.fuse_bn_act(model)
    assert type(fused.a) is bnn.BatchNormAct1d and fused.b is fused.a
    assert list(fused.state_dict()) == list(model.state_dict())
    fused.load_state_dict(model.state_dict())
    _assert_same(model, fused, _x((6, 3)))


def test_convert_to_torch_refuses_a_fused_layer():
    fused = bnn.fuse_bn_act(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()))
    with pytest.raises(ValueError, match=r"cannot convert '0' \(BatchNormAct2d\) to torch.nn: "
                       r"torch has no BatchNorm with an activation"):
        bnn.convert_to_torch(fused)


def test_mode_dtype_requires_grad_bias_and_frozen_are_kept():
    bn = bnn.BatchNorm1d(3, bias=False, dtype=torch.float64)
    bn.weight.requires_grad_(False)
    fused = bnn.fuse_bn_act(nn.Sequential(bn, nn.ReLU()).eval())
    layer = fused.get_submodule("0")
    assert not fused.training
    assert not layer.training and layer.bias is None and layer.weight.dtype == torch.float64
    assert not layer.weight.requires_grad and layer.num_batches_tracked.dtype == torch.long
    frozen = bnn.BatchNorm1d(3)
    frozen.freeze()
    layer = bnn.fuse_bn_act(nn.Sequential(frozen, nn.ReLU())).train().get_submodule("0")
    assert layer.frozen and not layer.training  # train() leaves a frozen layer in eval


def test_fusing_again_changes_nothing_and_the_result_pickles():
    fused = bnn.fuse_bn_act(_seeded(ResNetBlock()))
    again, report = bnn.fuse_bn_act(fused, return_report=True)
    assert [str(r) for r in report] == [
        "bn1: left: already a BatchNormAct2d",
        "bn2: left: its output goes to operator.add, not an activation a BatchNormAct fuses"]
    buffer = io.BytesIO()
    torch.save(again, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.bn1) is bnn.BatchNormAct2d
    _assert_same(fused, loaded, _x())


def test_a_graph_module_is_taken_as_traced_and_left_alone():
    traced = fx.symbolic_trace(_seeded(ResNetBlock()))
    fused = bnn.fuse_bn_act(traced)
    assert type(traced.bn1) is nn.BatchNorm2d and type(fused.bn1) is bnn.BatchNormAct2d
    _assert_same(traced, fused, _x())


def test_the_summary_is_logged(caplog):
    with caplog.at_level(logging.DEBUG, logger="bnlab.nn.fuse"):
        bnn.fuse_bn_act(ResNetBlock())
    lines = [r.getMessage() for r in caplog.records]
    assert "fuse_bn_act: fused 1 of 2 BatchNorm layers with their activation, left 1" in lines
    assert "fuse_bn_act: bn1 + relu (ReLU): fused, save='input'" in lines


# -- modes ------------------------------------------------------------------------------------
class Dropped(nn.Module):
    """A forward that branches on self.training: dropout only in training."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4), nn.ReLU())
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        y = F.dropout(self.body(x), 0.5, self.training)
        return F.relu(self.bn(y)) if self.training else self.bn(y).relu()


def _reload(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("start", ["train", "eval"])
def test_a_forward_that_depends_on_the_mode_keeps_both_modes(start):
    model = getattr(_seeded(Dropped()), start)()
    fused, report = bnn.fuse_bn_act(model, return_report=True)
    assert [r.fused for r in report] == [True, True] and fused.training == model.training
    x = _x((6, 3, 5))
    for copied in (fused, copy.deepcopy(fused), _reload(fused), _reload(copy.deepcopy(fused))):
        assert list(copied.state_dict()) == list(model.state_dict())
        copied.load_state_dict(model.state_dict())
        assert type(copied.bn) is bnn.BatchNormAct1d and type(copied.body.get_submodule("1")) \
            is bnn.BatchNormAct1d
        model.eval(), copied.eval()
        _close(copied(x), model(x), 1e-10, 1e-12, "eval output")  # no dropout
        assert "training = False" in copied.code
        model.train(), copied.train()
        torch.manual_seed(0)
        y = model(x)
        torch.manual_seed(0)
        _close(copied(x), y, 1e-10, 1e-12, "training output")  # the same dropout mask
        assert "training = True" in copied.code and (y == 0).any()


def test_modules_keep_their_mode_and_fold_folds_the_fused_graph():
    model = _seeded(nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), nn.Flatten(),
        nn.Linear(36, 5), nn.BatchNorm1d(5), nn.LeakyReLU(0.1))).eval()
    fused = bnn.fuse_bn_act(model)
    assert not any(m.training for m in fused.modules())
    assert type(fused.get_submodule("0")) is nn.Module  # torch.fx rebuilds containers
    folded = bnn.fold(fused)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert type(folded.get_submodule("0.1")) is nn.ReLU and not hasattr(folded.get_submodule("1"), "1")
    x = _x((4, 3, 5, 5))
    _close(folded(x), model(x), 1e-10, 1e-12, "folded output")
    with pytest.raises(ValueError, match="needs a model in eval mode"):
        bnn.fold(fused.train())


def test_hooks_on_modules_torch_fx_traces_through_are_refused():
    model = _seeded(nn.Sequential(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), nn.ReLU()))
    model[0].register_forward_hook(lambda m, i, o: o)
    with pytest.raises(ValueError, match=r"would drop the hooks of 0: torch.fx traces "
                       r"through these modules"):
        bnn.fuse_bn_act(model)
    model[0]._forward_hooks.clear()
    model.register_forward_pre_hook(lambda m, i: None)
    with pytest.raises(ValueError, match=r"hooks of the model \(Sequential\)"):
        bnn.fuse_bn_act(model)
    model._forward_pre_hooks.clear()
    model[1].register_forward_hook(lambda m, i, o: o)  # a leaf: called by the graph, kept
    fused = bnn.fuse_bn_act(model)
    assert fused.get_submodule("1")._forward_hooks


# -- errors -----------------------------------------------------------------------------------
class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:
            return F.relu(self.bn(x))
        return self.bn(x)


def test_a_model_fx_cannot_trace_is_one_clear_error():
    with pytest.raises(ValueError, match=r"cannot trace Branchy with torch.fx in training mode "
                       r"\(it traces both\): "
                       r"TraceError: symbolically traced variables cannot be used as inputs "
                       r"to control flow \(at test_fuse.py:\d+ in forward: if x.sum\(\) > 0:\)"
                       r"\. Make that code traceable") as info:
        bnn.fuse_bn_act(Branchy())
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "pass the GraphModule" in str(info.value)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_bad_arguments():
    with pytest.raises(ValueError, match=r"acts must name activations among 'relu', "
                       r"'leaky_relu', 'silu', 'identity' \(got gelu\)"):
        bnn.fuse_bn_act(ResNetBlock(), acts=("relu", "gelu"))
    with pytest.raises(TypeError, match=r"acts must be a name or a sequence of names of "
                       r"activations among 'relu', .* \(got None\)"):
        bnn.fuse_bn_act(ResNetBlock(), acts=None)
    for alias, layer in {"swish": nn.SiLU(), "none": nn.Identity(), "linear": nn.Identity()}.items():
        _, report = bnn.fuse_bn_act(nn.Sequential(nn.BatchNorm1d(3), layer), acts=alias,
                                    return_report=True)
        assert report[0].fused, alias
    with pytest.raises(ValueError, match=r"save must be 'input' or 'output' \(got 'x'\)"):
        bnn.fuse_bn_act(ResNetBlock(), save="x")
    with pytest.raises(TypeError, match=r"takes an nn.Module or a torch.fx.GraphModule "
                       r"\(got function\)"):
        bnn.fuse_bn_act(lambda x: x)
    with pytest.raises(TypeError, match="torch.fx cannot trace a TorchScript module"):
        bnn.fuse_bn_act(torch.jit.script(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU())))


# -- torchvision ------------------------------------------------------------------------------
def test_torchvision_resnet18(torchvision_models):
    torch.manual_seed(0)
    model = _seeded(torchvision_models.resnet18(num_classes=10))
    fused, report = bnn.fuse_bn_act(model, return_report=True)
    left = [r.bn for r in report if not r.fused]
    assert sum(r.fused for r in report) == 9 and len(report) == 20  # bn1 of each block + stem
    assert all(re.fullmatch(r"layer\d\.\d\.(bn2|downsample\.1)", b) for b in left)
    assert list(fused.state_dict()) == list(model.state_dict())
    relu = fused.get_submodule("layer1.0.relu")  # the block's ReLU, still after the add
    assert type(relu) is nn.ReLU and "layer1.0.relu" in {n.target for n in fused.graph.nodes}
    _assert_same(model, fused, _x((4, 3, 24, 24)))  # 4 values per channel in layer4


def test_the_layer_md_example_runs(torchvision_models):
    """docs/layer.md's resnet50 example, kept out of the page's ```python blocks (which
    test_readme runs without torchvision)."""
    text = LAYER_MD.read_text()
    block = text.split("<!-- fuse-example -->", 1)[1].split("```py\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(block, str(LAYER_MD), "exec"), scope)
    assert sum(r.fused for r in scope["report"]) == 33 and len(scope["report"]) == 53


def test_an_untraceable_torchvision_model_names_its_line(torchvision_models):
    with pytest.raises(ValueError, match=r"\(at densenet.py:\d+ in any_requires_grad: if "
                       r"tensor.requires_grad:\)"):
        bnn.fuse_bn_act(torchvision_models.densenet121(memory_efficient=True))
