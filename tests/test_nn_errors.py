"""Errors of bnlab.nn as torch's callers expect them: shape mismatches are ShapeError (both
ValueError and RuntimeError), and torch's refusals are made with torch's exception type and
text; hyperparameters torch takes are taken."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.nn import _ops


def _stacked_backward_misfit():
    x = torch.randn(2, 4, 3)
    _ops.stacked_backward(torch.randn(2, 4, 2), x, None, torch.zeros(2, 2, 3), 1e-5)


def _wrong_weight(cls=bnn.BatchNorm1d, x=torch.randn(4, 3)):
    m = cls(3)
    m.weight = nn.Parameter(torch.ones(4))
    m(x)


def _op_wrong_weight():
    torch.ops.bnlab.batch_norm(torch.randn(4, 3), torch.ones(2), None, 1e-5)


SHAPE_MISMATCHES = {
    "rank": (lambda: bnn.BatchNorm2d(3)(torch.randn(2, 3, 4)),
             r"expected 4D input \(got 3D input\)"),
    "channels": (lambda: bnn.BatchNorm2d(3)(torch.randn(2, 5, 4, 4)),
                 r"expected input with 3 channels at dim 1 \(num_features\), got 5"),
    "channels in eval": (lambda: bnn.BatchNorm1d(3).eval()(torch.randn(2, 5)),
                         r"expected input with 3 channels"),
    "weight": (_wrong_weight, "weight should contain 3 elements not 4"),
    "renorm weight": (lambda: _wrong_weight(bnn.BatchRenorm1d), "weight should contain 3"),
    "ghost weight": (lambda: _wrong_weight(lambda c: bnn.GhostBatchNorm(c, 2)),
                     "weight should contain 3"),
    "sync rank": (lambda: bnn.SyncBatchNorm(3)(torch.randn(3)),
                  r"expected at least 2D input \(got 1D input\)"),
    "ghost split": (lambda: bnn.GhostBatchNorm(3, 4)(torch.randn(6, 3)),
                    "virtual_batch_size=4 must divide the batch size"),
    "fold_weights": (lambda: bnn.fold_weights(torch.ones(4, 3), None, torch.zeros(5),
                                              torch.ones(5), None, None, 1e-5),
                     "layer has 4 output features but BN has 5 channels"),
    "operator": (_op_wrong_weight, "weight should contain 3 elements not 2"),
    "stacked_backward": (_stacked_backward_misfit, r"grad_y \(2, 4, 2\) .* do not fit x"),
}


@pytest.mark.parametrize("case", SHAPE_MISMATCHES)
def test_every_shape_mismatch_is_a_shape_error_both_value_and_runtime(case):
    call, msg = SHAPE_MISMATCHES[case]
    with pytest.raises(bnn.ShapeError, match=msg) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


def test_code_written_for_torch_catches_bnlab_shape_errors():
    for lib in (nn, bnn):  # the same except clause serves both
        m = lib.BatchNorm1d(3)
        m.running_mean = torch.zeros(4)
        with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):
            m(torch.randn(2, 3))
    assert issubclass(bnn.ShapeError, ValueError) and "ShapeError" in bnn.__all__


# -- one value per channel: refused wherever torch refuses it ------------------------------
def _bnlab_layer(kind: str, dim: int, track: bool) -> nn.Module:
    if kind == "bn":
        return getattr(bnn, f"BatchNorm{dim}d")(3, track_running_stats=track)
    if kind == "renorm":
        return getattr(bnn, f"BatchRenorm{dim}d")(3, track_running_stats=track)
    if kind == "ghost":
        return bnn.GhostBatchNorm(3, 1, track_running_stats=track)
    return bnn.SyncBatchNorm(3, track_running_stats=track)  # outside a group: local statistics


ONE_VALUE = [(1, (1, 3)), (1, (1, 3, 1)), (2, (1, 3, 1, 1)), (3, (1, 3, 1, 1, 1))]
# train; eval without running statistics (batch statistics, as torch decides); the same
# with the layer frozen (bnlab's freeze() is eval for good)
MODES = ["train", "eval without running statistics", "frozen without running statistics"]


@pytest.mark.parametrize("kind", ["bn", "renorm", "ghost", "sync"])
@pytest.mark.parametrize("dim,shape", ONE_VALUE)
@pytest.mark.parametrize("mode", MODES)
def test_one_value_per_channel_refused_as_torch_refuses_it(kind, dim, shape, mode):
    track = mode == "train"
    reference = getattr(nn, f"BatchNorm{dim}d")(3, track_running_stats=track)
    layer = _bnlab_layer(kind, dim, track)
    if mode != "train":
        reference.eval()
        layer.freeze() if mode.startswith("frozen") else layer.eval()
    x = torch.randn(shape)
    with pytest.raises(ValueError) as theirs:
        reference(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") \
            as ours:
        layer(x)
    assert str(theirs.value) in str(ours.value)  # torch's whole text, then bnlab's advice
    assert type(ours.value) is ValueError


def test_one_value_in_eval_with_running_statistics_is_fine_as_in_torch():
    for layer in (bnn.BatchNorm1d(3), bnn.BatchRenorm1d(3), bnn.GhostBatchNorm(3, 1),
                  bnn.SyncBatchNorm(3)):
        assert layer.eval()(torch.randn(1, 3)).shape == (1, 3)


def test_ghost_refuses_one_value_in_a_virtual_batch_with_torchs_text():
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, "
                       r"got input size torch.Size\(\[6, 3\]\) \(1 per channel in each virtual "
                       r"batch of virtual_batch_size=1\)"):
        bnn.GhostBatchNorm(3, 1)(torch.randn(6, 3))
    bnn.GhostBatchNorm(3, 1)(torch.randn(6, 3, 2))  # 2 values per channel in each: fine


# -- empty batches ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 2, 2)])
def test_ghost_on_an_empty_batch_is_batchnorm_on_an_empty_batch(shape):
    ghost, bn = bnn.GhostBatchNorm(3, 4), bnn.BatchNorm2d(3) if len(shape) == 4 \
        else bnn.BatchNorm1d(3)
    outputs = []
    for layer in (ghost, bn):
        x = torch.randn(shape, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        outputs.append((y.shape, x.grad.shape, layer.weight.grad.clone(),
                        int(layer.num_batches_tracked), layer.running_mean.clone(),
                        layer.running_var.clone()))
    (ys, gs, gw, n, mean, var), (ys2, gs2, gw2, n2, mean2, var2) = outputs
    assert ys == ys2 == shape and gs == gs2
    assert torch.equal(gw, gw2) and n == n2 == 0
    assert torch.equal(mean, mean2) and torch.equal(var, var2)


# -- hyperparameters torch takes ----------------------------------------------------------
INTEGER_LIKE = [np.int64(8), np.int32(8), torch.tensor(8)]


@pytest.mark.parametrize("n", INTEGER_LIKE, ids=lambda n: type(n).__name__)
def test_integer_like_sizes_are_taken_as_torch_takes_them(n):
    assert repr(bnn.BatchNorm1d(n)) == repr(nn.BatchNorm1d(8))
    for layer in (bnn.BatchNorm2d(n), bnn.SyncBatchNorm(n), bnn.GhostBatchNorm(n, n),
                  bnn.BatchRenorm3d(n, warmup_steps=n, ramp_steps=n)):
        assert type(layer.num_features) is int and layer.running_mean.shape == (8,)
    ghost = bnn.GhostBatchNorm(3, n)
    assert type(ghost.virtual_batch_size) is int and ghost(torch.randn(16, 3)).shape == (16, 3)
    renorm = bnn.BatchRenorm1d(3, warmup_steps=n, ramp_steps=n)
    assert (renorm.warmup_steps, renorm.ramp_steps) == (8, 8)


@pytest.mark.parametrize("n", INTEGER_LIKE, ids=lambda n: type(n).__name__)
def test_converters_take_torch_layers_built_with_integer_like_sizes(n):
    model = nn.Sequential(nn.Conv2d(2, 8, 1), nn.BatchNorm2d(n), nn.Flatten(), nn.BatchNorm1d(n * 4))
    x = torch.randn(4, 2, 2, 2)
    for converted in (bnn.convert_to_bnlab(model), bnn.freeze(model),
                      bnn.SyncBatchNorm.convert_sync_batchnorm(bnn.convert_to_bnlab(model))):
        assert converted[1].num_features == 8 and type(converted[1].num_features) is int
        converted(x)
    back = bnn.convert_to_torch(bnn.convert_to_bnlab(model))
    assert back[3].num_features == 32
    used = bnn.update_bn_stats(bnn.convert_to_bnlab(model), [x, x, x], max_batches=n // 4)
    assert used == 2


@pytest.mark.parametrize("bad", [True, 8.0, torch.tensor(8.0), "8", 0])
def test_sizes_that_are_not_positive_integers_are_refused(bad):
    with pytest.raises(ValueError, match=r"num_features must be a positive int \(got "):
        bnn.BatchNorm1d(bad)
    with pytest.raises(ValueError, match=r"virtual_batch_size must be a positive int \(got "):
        bnn.GhostBatchNorm(3, bad)


@pytest.mark.parametrize("eps", [torch.tensor(1e-3), torch.tensor(1e-3, dtype=torch.float64),
                                 np.float32(1e-3), np.float64(1e-3)], ids=repr)
def test_eps_and_momentum_as_0d_tensors_or_numpy_scalars(eps):
    x = torch.randn(6, 3)
    for cls in (bnn.BatchNorm1d, bnn.BatchRenorm1d, bnn.SyncBatchNorm,
                lambda c, **kw: bnn.GhostBatchNorm(c, 3, **kw)):
        ours, plain = cls(3, eps=eps, momentum=torch.tensor(0.25)), cls(3, eps=float(eps), momentum=0.25)
        assert type(ours.eps) is float and type(ours.momentum) is float
        torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)
        torch.testing.assert_close(ours.running_var, plain.running_var, rtol=0, atol=0)
        torch.testing.assert_close(ours.eval()(x), plain.eval()(x), rtol=0, atol=0)
    torch_layer = nn.BatchNorm1d(3, eps=torch.tensor(1e-3))  # torch takes it; so do converters
    assert bnn.convert_to_bnlab(torch_layer).eps == pytest.approx(1e-3)


@pytest.mark.parametrize("eps", [torch.tensor([1e-5, 1e-5]), torch.tensor(-1e-5), True,
                                 torch.tensor(float("nan"))], ids=repr)
def test_eps_that_is_not_one_real_number_is_refused(eps):
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0 \(got "):
        bnn.BatchNorm1d(3, eps=eps)


# -- forward-mode tangents on the running statistics ----------------------------------------
VARIANTS = {
    "BatchNorm1d": lambda: bnn.BatchNorm1d(2),
    "GhostBatchNorm": lambda: bnn.GhostBatchNorm(2, 3),
    "BatchRenorm1d": lambda: bnn.BatchRenorm1d(2),
    "SyncBatchNorm": lambda: bnn.SyncBatchNorm(2),
    "torch": lambda: nn.BatchNorm1d(2),
}


def _jvp_in_eval(layer, primals: dict):
    """torch.func.jvp of the eval-mode layer with respect to ``primals`` (names among input,
    weight, running_mean, running_var): the output's tangent."""
    layer.eval()
    names = list(primals)
    x = torch.randn(3, 2, 5)

    def f(*values):
        given = dict(zip(names, values))
        return torch.func.functional_call(layer, {k: v for k, v in given.items() if k != "input"},
                                          (given.get("input", x),))
    values = tuple(primals.values())
    return torch.func.jvp(f, values, tuple(torch.rand_like(v) for v in values))[1]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind", VARIANTS)
def test_running_statistics_with_tangents_are_refused_under_torch_func(kind):
    x, mean, var, weight = torch.randn(3, 2, 5), torch.randn(2), torch.rand(2) + 1, torch.randn(2)
    msg = "batch_norm is not differentiable wrt running_mean and running_var"
    for primals in ({"input": x, "running_mean": mean}, {"input": x, "running_var": var},
                    {"weight": weight, "running_mean": mean}):
        with pytest.raises(RuntimeError, match=msg):
            _jvp_in_eval(VARIANTS[kind](), primals)
    # a tangent on the running statistics alone: no tangent comes out of them, as in torch
    tangent = _jvp_in_eval(VARIANTS[kind](), {"running_mean": mean, "running_var": var})
    assert torch.equal(tangent, torch.zeros_like(tangent))
    # on the input alone: differentiable as before
    tangent = _jvp_in_eval(VARIANTS[kind](), {"input": x})
    assert tangent.abs().sum() > 0
