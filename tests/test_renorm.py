"""Batch Renormalization against a float64 oracle written from Ioffe (2017), Algorithm 1;
its identities with BatchNorm (no correction, warmup, no running statistics, eval); the
schedule; the state_dict round trip; half inputs and layouts; and the error messages."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import bnlab.nn as bnn
from bnlab.nn.modules import TORCH_HAS_BIAS_FLAG
from bnlab.nn.renorm import (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, renorm_correction,
                             renorm_limits)

C = 6
# Per channel: batch std, batch mean, running var, running mean, chosen so that with
# r_max=2, d_max=1 channel 1 clips r above (sigma_B / sigma ~ 4), channel 2 below (~0.2),
# channel 3 clips d above (~3), channel 4 below (~-3), and channels 0 and 5 clip neither.
# (Channel 1's d is 0 +- 4 / sqrt(m): clipped or not, depending on the batch.)
STD = torch.tensor([1.0, 4.0, 0.2, 1.0, 1.0, 1.5], dtype=torch.float64)
MEAN = torch.tensor([0.3, 1.0, -1.0, 3.5, -2.0, -0.5], dtype=torch.float64)
RUNNING_VAR = torch.tensor([1.2, 1.0, 1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
RUNNING_MEAN = torch.tensor([0.0, 1.0, -1.0, 0.5, 1.0, -0.2], dtype=torch.float64)
R_ABOVE, R_BELOW, R_FREE = [1], [2], [0, 3, 4, 5]
D_CLIPPED, D_FREE = [3, 4], [0, 2, 5]

SHAPES = [(BatchRenorm1d, (16, C)), (BatchRenorm1d, (8, C, 5)), (BatchRenorm2d, (4, C, 3, 5)),
          (BatchRenorm3d, (2, C, 3, 2, 4))]
BN = {BatchRenorm1d: bnn.BatchNorm1d, BatchRenorm2d: bnn.BatchNorm2d, BatchRenorm3d: bnn.BatchNorm3d}


def _batch(shape, gen, dtype=torch.float64):
    view = [1, -1] + [1] * (len(shape) - 2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (x * STD.view(view) + MEAN.view(view)).to(dtype)


def _set_state(m, tracked=0):
    """Non-trivial parameters and running statistics, identical for every layer given them."""
    with torch.no_grad():
        if m.weight is not None:
            m.weight.copy_(torch.linspace(0.5, 2.0, C))
        if m.bias is not None:
            m.bias.copy_(torch.linspace(-1.0, 1.0, C))
        if m.running_mean is not None:
            m.running_mean.copy_(RUNNING_MEAN)
            m.running_var.copy_(RUNNING_VAR)
            m.num_batches_tracked.fill_(tracked)
    return m


def _oracle_step(x, weight, bias, running_mean, running_var, tracked, eps, momentum, r_max, d_max):
    """Algorithm 1 from its equations in float64 torch ops, r and d detached: ``y`` (in the
    autograd graph of x, weight and bias), the new running statistics, and the unclipped r, d."""
    dims = [0] + list(range(2, x.dim()))
    view = [1, -1] + [1] * (x.dim() - 2)
    m = x.numel() // x.shape[1]
    mu_b = x.mean(dims)
    var_b = (x - mu_b.view(view)).square().mean(dims)  # biased
    sigma_b = torch.sqrt(var_b + eps)
    sigma = torch.sqrt(running_var + eps)
    r_raw = (sigma_b / sigma).detach()
    d_raw = ((mu_b - running_mean) / sigma).detach()
    r = r_raw.clamp(1 / r_max, r_max)
    d = d_raw.clamp(-d_max, d_max)
    x_hat = (x - mu_b.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
    y = x_hat if weight is None else weight.view(view) * x_hat
    y = y if bias is None else y + bias.view(view)
    factor = 1 / (tracked + 1) if momentum is None else momentum  # momentum: new value's weight
    new_mean = (1 - factor) * running_mean + factor * mu_b.detach()
    new_var = (1 - factor) * running_var + factor * var_b.detach() * m / (m - 1)  # unbiased
    return y, new_mean, new_var, r_raw, d_raw


OPTIONS = [
    dict(),
    dict(affine=False),
    dict(momentum=None),
    dict(momentum=0.3, eps=1e-3),
] + ([dict(bias=False)] if TORCH_HAS_BIAS_FLAG else [])


@pytest.mark.parametrize("cls,shape", SHAPES, ids=lambda v: str(v) if isinstance(v, tuple) else v.__name__)
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_matches_oracle_over_two_steps(cls, shape, kw):
    gen = torch.Generator().manual_seed(len(shape) * 7 + len(kw))
    kw = {"momentum": 0.1, **kw}
    layer = _set_state(cls(C, dtype=torch.float64, r_max=2.0, d_max=1.0, **kw))
    eps, momentum = layer.eps, layer.momentum
    weight = None if layer.weight is None else layer.weight.detach().clone().requires_grad_()
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    mean, var = RUNNING_MEAN.clone(), RUNNING_VAR.clone()
    for step in range(2):
        x = _batch(shape, gen)
        grad_y = torch.randn(shape, generator=gen, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = layer(xa)
        yb, mean, var, r_raw, d_raw = _oracle_step(xb, weight, bias, mean, var, step, eps,
                                                   momentum, 2.0, 1.0)
        if step == 0:  # the data clip r and d where intended, and only there
            assert (r_raw[R_ABOVE] > 2.0).all() and (r_raw[R_BELOW] < 0.5).all()
            assert ((r_raw[R_FREE] < 2.0) & (r_raw[R_FREE] > 0.5)).all()
            assert (d_raw[D_CLIPPED].abs() > 1.0).all() and (d_raw[D_FREE].abs() < 1.0).all()
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-12, atol=1e-13)
        assert layer.num_batches_tracked.item() == step + 1
        (ya * grad_y).sum().backward()
        (yb * grad_y).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
        for ours, want in ((layer.weight, weight), (layer.bias, bias)):
            if ours is not None:
                torch.testing.assert_close(ours.grad, want.grad, rtol=1e-10, atol=1e-10)


def test_ramp_limits_are_applied_in_forward():
    """Mid-ramp, the forward clips at :meth:`limits`: (2, 1) and then (2.5, 1.5) here."""
    gen = torch.Generator().manual_seed(3)
    layer = _set_state(BatchRenorm2d(C, dtype=torch.float64, momentum=0.1, r_max=3.0, d_max=2.0,
                                     warmup_steps=2, ramp_steps=4), tracked=4)
    mean, var = RUNNING_MEAN.clone(), RUNNING_VAR.clone()
    for step, limits in ((4, (2.0, 1.0)), (5, (2.5, 1.5))):
        assert layer.limits() == limits
        x = _batch((4, C, 3, 3), gen)
        y = layer(x)
        want, mean, var, r_raw, d_raw = _oracle_step(x, layer.weight.detach(), layer.bias.detach(),
                                                     mean, var, step, layer.eps, 0.1, *limits)
        assert ((r_raw > limits[0]) | (r_raw < 1 / limits[0])).any()  # the limits matter
        assert (d_raw.abs() > limits[1]).any()
        torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-11)
    assert layer.limits() == (3.0, 2.0)


# -- identities with BatchNorm ------------------------------------------------------------------
def _run_pair(renorm, bn, shape, steps, gen, expect_equal):
    """Train both for ``steps`` steps on the same batches; expect_equal[i]: step i bitwise equal."""
    for step in range(steps):
        x = _batch(shape, gen, torch.float32)
        grad_y = torch.randn(shape, generator=gen)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = renorm(xa), bn(xb)
        ya.backward(grad_y)
        yb.backward(grad_y)
        same = torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
        if renorm.affine:
            same = same and torch.equal(renorm.weight.grad, bn.weight.grad) \
                and torch.equal(renorm.bias.grad, bn.bias.grad)
        assert same == expect_equal[step], f"step {step}"
        if renorm.running_mean is not None:  # the running statistics are BN's in every case
            assert torch.equal(renorm.running_mean, bn.running_mean)
            assert torch.equal(renorm.running_var, bn.running_var)
            assert torch.equal(renorm.num_batches_tracked, bn.num_batches_tracked)


@pytest.mark.parametrize("cls,shape", SHAPES, ids=lambda v: str(v) if isinstance(v, tuple) else v.__name__)
def test_no_correction_is_batchnorm_bitwise(cls, shape):
    gen = torch.Generator().manual_seed(0)
    renorm = _set_state(cls(C, r_max=1.0, d_max=0.0))
    bn = _set_state(BN[cls](C, momentum=0.01))
    _run_pair(renorm, bn, shape, 3, gen, [True] * 3)
    renorm.eval(), bn.eval()
    x = _batch(shape, gen, torch.float32)
    assert torch.equal(renorm(x), bn(x))  # eval: BN's, inherited


def test_warmup_is_batchnorm_bitwise_then_differs(monkeypatch):
    import bnlab.nn.renorm as renorm_module

    corrections = []  # BN's own step during warmup: r and d are not even computed
    real = renorm_module.renorm_correction
    monkeypatch.setattr(renorm_module, "renorm_correction",
                        lambda *a: corrections.append(1) or real(*a))
    gen = torch.Generator().manual_seed(1)
    renorm = _set_state(BatchRenorm2d(C, warmup_steps=3))
    bn = _set_state(bnn.BatchNorm2d(C, momentum=0.01))
    _run_pair(renorm, bn, (4, C, 3, 3), 3, gen, [True, True, True])
    assert corrections == []
    _run_pair(renorm, bn, (4, C, 3, 3), 2, gen, [False, False])
    assert corrections == [1, 1] and renorm.limits() == (3.0, 5.0)


def test_ramp_starts_from_batchnorm():
    """At t = warmup_steps the ramp's fraction is 0: still BN; from the next step it differs."""
    gen = torch.Generator().manual_seed(2)
    renorm = _set_state(BatchRenorm2d(C, warmup_steps=1, ramp_steps=10))
    bn = _set_state(bnn.BatchNorm2d(C, momentum=0.01))
    _run_pair(renorm, bn, (4, C, 3, 3), 3, gen, [True, True, False])


@pytest.mark.parametrize("training", [True, False])
def test_without_running_stats_is_batchnorm_bitwise(training):
    gen = torch.Generator().manual_seed(4)
    renorm = _set_state(BatchRenorm2d(C, track_running_stats=False).train(training))
    bn = _set_state(bnn.BatchNorm2d(C, track_running_stats=False).train(training))
    assert renorm.limits() == (1.0, 0.0)
    _run_pair(renorm, bn, (4, C, 3, 3), 2, gen, [True, True])


# -- schedule -----------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup,ramp,table", [
    (0, 0, {0: (3.0, 5.0), 7: (3.0, 5.0)}),
    (5, 0, {0: (1.0, 0.0), 4: (1.0, 0.0), 5: (3.0, 5.0), 100: (3.0, 5.0)}),
    (0, 4, {0: (1.0, 0.0), 1: (1.5, 1.25), 2: (2.0, 2.5), 4: (3.0, 5.0), 9: (3.0, 5.0)}),
    (5, 10, {0: (1.0, 0.0), 5: (1.0, 0.0), 6: (1.2, 0.5), 10: (2.0, 2.5), 14: (2.8, 4.5),
             15: (3.0, 5.0), 40: (3.0, 5.0)}),
])
def test_schedule(warmup, ramp, table):
    layer = BatchRenorm2d(C, warmup_steps=warmup, ramp_steps=ramp)
    for t, (r, d) in table.items():
        layer.num_batches_tracked.fill_(t)
        got = layer.limits()
        assert got == pytest.approx((r, d), rel=1e-15, abs=1e-15), f"t={t}"
        assert renorm_limits(t, 3.0, 5.0, warmup, ramp) == got


def test_schedule_follows_the_counter():
    """t is num_batches_tracked: each step advances it; a skipped (non-finite) batch does not."""
    layer = BatchRenorm1d(C, warmup_steps=0, ramp_steps=4)
    seen = []
    for _ in range(3):
        seen.append(layer.limits())
        layer(torch.randn(8, C))
    bad = torch.randn(8, C)
    bad[0, 0] = float("nan")
    layer(bad)
    seen.append(layer.limits())
    assert seen == [(1.0, 0.0), (1.5, 1.25), (2.0, 2.5), (2.5, 3.75)]


# -- state --------------------------------------------------------------------------------------
def test_state_dict_is_batchnorms_and_loads_into_torch():
    gen = torch.Generator().manual_seed(5)
    renorm = _set_state(BatchRenorm2d(C, dtype=torch.float64))
    for _ in range(3):
        renorm(_batch((4, C, 3, 3), gen))
    state = renorm.state_dict()
    assert list(state) == list(torch.nn.BatchNorm2d(C).state_dict()) \
        == list(bnn.BatchNorm2d(C).state_dict())
    theirs = torch.nn.BatchNorm2d(C, dtype=torch.float64)
    theirs.load_state_dict(state)
    ours = bnn.BatchNorm2d(C, dtype=torch.float64)
    ours.load_state_dict(state)
    renorm.eval(), theirs.eval(), ours.eval()
    x = _batch((4, C, 3, 3), gen)
    assert torch.equal(renorm(x), ours(x))
    torch.testing.assert_close(renorm(x), theirs(x), rtol=1e-12, atol=1e-12)
    back = BatchRenorm2d(C, dtype=torch.float64)  # and the other way
    back.load_state_dict(theirs.state_dict())
    assert torch.equal(back.eval()(x), renorm(x))


def test_types_repr_and_defaults():
    layer = BatchRenorm2d(C)
    assert isinstance(layer, torch.nn.BatchNorm2d) and isinstance(BatchRenorm1d(C), torch.nn.BatchNorm1d)
    assert isinstance(BatchRenorm3d(C), torch.nn.BatchNorm3d)
    assert layer.momentum == 0.01 and layer.limits() == (3.0, 5.0)
    assert repr(BatchRenorm2d(4, warmup_steps=2, ramp_steps=3)) == (
        repr(torch.nn.BatchNorm2d(4, momentum=0.01)).replace("BatchNorm2d", "BatchRenorm2d")[:-1]
        + ", r_max=3.0, d_max=5.0, warmup_steps=2, ramp_steps=3)")


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    (dict(r_max=0.5), r"r_max must be a finite number >= 1 \(got 0.5\)"),
    (dict(r_max=float("inf")), r"r_max must be a finite number >= 1 \(got inf\)"),
    (dict(r_max="3"), r"r_max must be a finite number >= 1 \(got '3'\)"),
    (dict(d_max=-1.0), r"d_max must be a finite number >= 0 \(got -1.0\)"),
    (dict(d_max=float("nan")), r"d_max must be a finite number >= 0 \(got nan\)"),
    (dict(warmup_steps=-1), r"warmup_steps must be an int >= 0 \(got -1\)"),
    (dict(warmup_steps=2.5), r"warmup_steps must be an int >= 0 \(got 2.5\)"),
    (dict(ramp_steps=True), r"ramp_steps must be an int >= 0 \(got True\)"),
    (dict(momentum=2.0), r"momentum must be None or a number in \[0, 1\] \(got 2.0\)"),
])
def test_hyperparameter_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        BatchRenorm2d(C, **kw)


@pytest.mark.parametrize("name,value,message", [
    ("r_max", 0.5, r"BatchRenorm2d.r_max must be a finite number >= 1 \(got 0.5\)"),
    ("r_max", float("nan"), r"BatchRenorm2d.r_max must be a finite number >= 1 \(got nan\)"),
    ("d_max", -1.0, r"BatchRenorm2d.d_max must be a finite number >= 0 \(got -1.0\)"),
    ("warmup_steps", -1, r"BatchRenorm2d.warmup_steps must be an int >= 0 \(got -1\)"),
    ("ramp_steps", 0.5, r"BatchRenorm2d.ramp_steps must be an int >= 0 \(got 0.5\)"),
])
def test_hyperparameters_set_after_construction_are_checked_where_used(name, value, message):
    layer = BatchRenorm2d(C)
    setattr(layer, name, value)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(4, C, 3, 3))  # a training step reads them
    with pytest.raises(ValueError, match=message):
        layer.limits()
    for k, v in layer.state_dict().items():  # the refused step changed nothing
        assert torch.equal(v, before[k]), k
    layer.eval()(torch.randn(4, C, 3, 3))  # eval does not read them: BatchNorm's eval


def test_renorm_correction_refuses_limits_out_of_range():
    stats = (torch.zeros(C), torch.ones(C), torch.zeros(C), torch.ones(C), 1e-5)
    with pytest.raises(ValueError, match=r"needs r_max >= 1 and d_max >= 0 \(got r_max=0.5"):
        renorm_correction(*stats, 0.5, 1.0)
    with pytest.raises(ValueError, match=r"d_max=-1.0\)"):
        renorm_correction(*stats, 2.0, -1.0)


def test_input_errors():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        BatchRenorm2d(C)(torch.randn(2, C, 3))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        BatchRenorm1d(C)(torch.randn(2, C, 3, 3))
    with pytest.raises(ValueError, match=r"expected 5D input \(got 4D input\)"):
        BatchRenorm3d(C)(torch.randn(2, C, 3, 3))
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        BatchRenorm1d(C)(torch.randn(1, C))


# torch's forward AD loads decompositions through torch.jit.script, deprecated in torch 2.13
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_ad_and_torchscript_refused():
    with pytest.raises(RuntimeError, match=r"BatchRenorm has no TorchScript or forward-mode AD"):
        with fwAD.dual_level():
            BatchRenorm1d(C)(fwAD.make_dual(torch.randn(4, C), torch.randn(4, C)))
    scripted = torch.jit.script(BatchRenorm2d(C))  # compiles; refuses when run
    with pytest.raises(torch.jit.Error, match=r"BatchRenorm has no TorchScript"):
        scripted(torch.randn(2, C, 3, 3))


# -- precision and layout -----------------------------------------------------------------------
@pytest.mark.parametrize("half,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_half_input_close_to_float32(half, tol):
    gen = torch.Generator().manual_seed(6)
    x = _batch((4, C, 3, 3), gen, torch.float32).to(half)  # the same values for both
    grad_y = torch.randn(x.shape, generator=gen)
    layers = [_set_state(BatchRenorm2d(C, momentum=0.1, r_max=2.0, d_max=1.0)) for _ in range(2)]
    xa, xb = x.clone().requires_grad_(), x.float().requires_grad_()
    ya, yb = layers[0](xa), layers[1](xb)
    assert ya.dtype == half and layers[0].running_mean.dtype == torch.float32
    ya.backward(grad_y.to(half))
    yb.backward(grad_y)
    torch.testing.assert_close(ya.float(), yb, rtol=tol, atol=tol)
    torch.testing.assert_close(xa.grad.float(), xb.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(layers[0].weight.grad, layers[1].weight.grad, rtol=tol, atol=tol)
    # statistics are reduced in float32 from the same values
    torch.testing.assert_close(layers[0].running_mean, layers[1].running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layers[0].running_var, layers[1].running_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls,shape,fmt", [(BatchRenorm2d, (4, C, 3, 5), torch.channels_last),
                                           (BatchRenorm3d, (2, C, 3, 2, 4), torch.channels_last_3d)])
def test_channels_last_equals_contiguous(cls, shape, fmt):
    gen = torch.Generator().manual_seed(7)
    x = _batch(shape, gen)
    grad_y = torch.randn(shape, generator=gen, dtype=torch.float64)
    layers = [_set_state(cls(C, dtype=torch.float64, momentum=0.1, r_max=2.0, d_max=1.0))
              for _ in range(2)]
    xa = x.clone().requires_grad_()
    xb = x.contiguous(memory_format=fmt).requires_grad_()
    ya, yb = layers[0](xa), layers[1](xb)
    assert yb.is_contiguous(memory_format=fmt)
    ya.backward(grad_y)
    yb.backward(grad_y)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-11, atol=1e-11)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(layers[0], name), getattr(layers[1], name),
                                   rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(layers[0].weight.grad, layers[1].weight.grad, rtol=1e-11, atol=1e-11)


def test_non_finite_batch_leaves_running_stats():
    layer = _set_state(BatchRenorm2d(C, momentum=0.1), tracked=3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4, C, 3, 3)
        x[1, 2, 0, 0] = bad
        layer(x)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), k
    layer(torch.randn(4, C, 3, 3))  # a finite batch is counted again
    assert layer.num_batches_tracked.item() == 4
