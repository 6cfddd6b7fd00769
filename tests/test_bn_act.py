"""BatchNormAct1d/2d/3d: act(BN(x)) fused, against torch.nn.BatchNorm*d followed by torch's
activation, on the compiled kernels and on the torch-op path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.nn import _kernels as K
from bnlab.nn import _ops
from bnlab.nn.act import NO_DOUBLE_BACKWARD, Act, BatchNormActFunction

TORCH_ACT = {"relu": lambda: nn.ReLU(), "leaky_relu": lambda: nn.LeakyReLU(0.1),
             "silu": lambda: nn.SiLU(), "identity": lambda: nn.Identity()}
ACT_KW = {"leaky_relu": {"negative_slope": 0.1}}
OURS = {2: bnn.BatchNormAct1d, 3: bnn.BatchNormAct1d, 4: bnn.BatchNormAct2d, 5: bnn.BatchNormAct3d}
THEIRS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# (shape, memory format): rows and planes layouts of 1d, 2d and 3d inputs
CASES = [((16, 3), "c"), ((4, 3, 7), "c"), ((4, 3, 5, 6), "c"), ((4, 3, 5, 6), "last"),
         ((2, 3, 2, 3, 4), "c"), ((2, 3, 2, 3, 4), "last")]


@pytest.fixture(params=["kernels", "torch-ops"])
def path(request, monkeypatch):
    """Run on the compiled kernels (checking they ran), or with them off (BNLAB_KERNELS=0)."""
    calls = []
    if request.param == "kernels":
        if not K.available():
            pytest.skip(f"kernels: {K.unavailable_reason()}")
        run = _ops._run
        monkeypatch.setattr(_ops, "_run", lambda kind, *a: calls.append(kind) or run(kind, *a))
    else:
        monkeypatch.setattr(K, "_failure", "switched off by BNLAB_KERNELS=0")
    return request.param, calls


def make(shape, fmt="c", dtype=torch.float64, seed=0, offset=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)
    return x.contiguous(memory_format=LAST[len(shape)]) if fmt == "last" else x


def pair(shape, act, dtype=torch.float64, **kw):
    """A bnlab layer and torch's BN + activation with the same random affine parameters."""
    C = shape[1]
    ours = OURS[len(shape)](C, act=act, dtype=dtype, **ACT_KW.get(act, {}), **kw)
    theirs_bn = THEIRS[len(shape)](C, dtype=dtype, **{k: v for k, v in kw.items() if k != "bias"})
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 2.0)
            theirs_bn.weight.copy_(ours.weight)
            if ours.bias is None:  # bias=False: torch's layer with a fixed zero bias
                theirs_bn.bias.zero_().requires_grad_(False)
            else:
                ours.bias.normal_()
                theirs_bn.bias.copy_(ours.bias)
    return ours, nn.Sequential(theirs_bn, TORCH_ACT[act]())


def step(layer, x, grad):
    """Output and gradients (x, weight, bias) of one forward and backward."""
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(grad)
    params = [p.grad.clone() if p.grad is not None else None for p in layer.parameters()]
    return y.detach(), x.grad, params, x


def assert_close_all(a, b, tol=1e-10):
    for u, v in zip(a, b):
        if isinstance(u, list):
            assert_close_all(u, v, tol)
        elif u is None or v is None:
            assert u is None and v is None
        else:
            torch.testing.assert_close(u, v, rtol=tol, atol=tol)


@pytest.mark.parametrize("act", list(TORCH_ACT))
@pytest.mark.parametrize("shape,fmt", CASES, ids=[f"{s}-{f}" for s, f in CASES])
def test_train_and_eval_match_torch(shape, fmt, act, path):
    ours, theirs = pair(shape, act, momentum=0.3)
    for seed in range(2):  # two steps: the running statistics move twice
        x, grad = make(shape, fmt, seed=seed), make(shape, fmt, seed=seed + 10, offset=0.0)
        y, gx, gp, xin = step(ours, x, grad)
        ry, rgx, rgp, _ = step(theirs, x, grad)
        assert_close_all([y, gx, gp], [ry, rgx, rgp])
        assert y.stride() == xin.stride() and gx.stride() == xin.stride()
        ours.zero_grad()
        theirs.zero_grad()
    bn = theirs[0]
    torch.testing.assert_close(ours.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    assert int(ours.num_batches_tracked) == 2
    if path[0] == "kernels":
        kind = "forward_act_silu" if act == "silu" else "forward_act"
        assert path[1].count(kind) == 2 and len(path[1]) == 4, path[1]
    ours.eval()
    theirs.eval()
    x = make(shape, fmt, seed=5)
    assert_close_all(step(ours, x, x)[:3], step(theirs, x, x)[:3])


@pytest.mark.parametrize("options", [dict(affine=False), dict(track_running_stats=False),
                                     dict(momentum=None), dict(bias=False)], ids=str)
def test_options_match_torch(options, path):
    shape = (6, 4, 3, 5)
    ours, theirs = pair(shape, "relu" if "bias" in options else "leaky_relu", **options)
    for mode in ("train", "train", "train", "eval"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = make(shape, seed=len(mode))
        a, b = step(ours, x, x), step(theirs, x, x)
        torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a[1], b[1], rtol=1e-10, atol=1e-10)
        for p, q in zip(a[2], b[2]):  # torch's fixed zero bias has no gradient either
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)
    if theirs[0].track_running_stats:
        torch.testing.assert_close(ours.running_mean, theirs[0].running_mean)
        torch.testing.assert_close(ours.running_var, theirs[0].running_var)
        assert int(ours.num_batches_tracked) == int(theirs[0].num_batches_tracked) == 3
    else:
        assert ours.running_mean is None and ours.num_batches_tracked is None


@pytest.mark.parametrize("act", ["leaky_relu", "identity"])
@pytest.mark.parametrize("fmt", ["c", "last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_save_output_gives_the_default_gradients(act, fmt, dtype, path):
    shape = (5, 3, 4, 6)
    layers = [OURS[4](3, act=act, save=save, dtype=dtype, **ACT_KW.get(act, {}))
              for save in ("input", "output")]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.tensor([1.5, -0.7, 0.3]))
            layer.bias.copy_(torch.tensor([0.2, -0.1, 0.5]))
    x, grad = make(shape, fmt, dtype), make(shape, fmt, dtype, seed=3, offset=0.0)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_close_all(step(layers[0], x, grad)[:3], step(layers[1], x, grad)[:3], tol)
    assert "save='output'" in repr(layers[1])


def test_save_output_with_a_zero_weight_loses_only_its_weight_gradient(path):
    """|weight| is raised to eps to recover x_hat (Rota Bulo et al. 2018): a channel of
    weight 0 gets weight gradient 0; its input and bias gradients, and the other channels',
    stay exact."""
    x, grad = make((6, 2, 3, 3)), make((6, 2, 3, 3), seed=4, offset=0.0)
    layers = [bnn.BatchNormAct2d(2, act="leaky_relu", save=s, dtype=torch.float64)
              for s in ("input", "output")]
    for layer in layers:
        layer.weight.data[1] = 0.0
    (y0, gx0, (gw0, gb0), _), (y1, gx1, (gw1, gb1), _) = (step(m, x, grad) for m in layers)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gx1, gx0)
    torch.testing.assert_close(gb1, gb0)
    torch.testing.assert_close(gw1[0], gw0[0])
    assert float(gw0[1]) != 0.0 and float(gw1[1]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_keep_float32_running_stats(dtype, path):
    layer = bnn.BatchNormAct2d(3, act="silu")
    ref = bnn.BatchNormAct2d(3, act="silu")
    x = make((8, 3, 4, 4), dtype=dtype)
    y = layer(x)
    ref(x.float())  # the same half values, in float32
    assert y.dtype == dtype and layer.running_mean.dtype == torch.float32
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.float(), nn.SiLU()(nn.BatchNorm2d(3)(x.float())).to(dtype).float(),
                               rtol=0.02, atol=0.02)


@pytest.mark.parametrize("fmt", ["c", "last"])
def test_non_finite_batch_leaves_running_stats_alone(fmt, path):
    layer = bnn.BatchNormAct2d(3, act="relu")
    x = make((4, 3, 5, 5), fmt, torch.float32)
    x[1, 2, 0, 0] = float("nan")
    y = layer(x)
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert torch.equal(layer.running_var, torch.ones(3))


@pytest.mark.parametrize("act", list(TORCH_ACT))
@pytest.mark.parametrize("fmt", ["c", "last"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_and_torch_op_path_agree_in_float32(act, fmt, threads, monkeypatch):
    if not K.available():
        pytest.skip(f"kernels: {K.unavailable_reason()}")
    if threads == 2 and act in ("silu", "identity"):
        pytest.skip("threaded kernels: relu and leaky_relu cover them")
    monkeypatch.setattr(K, "SEGMENT", 64)  # several segments per plane
    monkeypatch.setattr(K, "ROWS_BLOCK", 600)  # several blocks of rows
    monkeypatch.setattr(K, "PARALLEL_MIN", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    shape = (9, 5, 7, 11)
    x, grad = make(shape, fmt, torch.float32), make(shape, fmt, torch.float32, seed=2, offset=0.0)
    results = []
    for off in (None, "switched off for the comparison"):
        monkeypatch.setattr(K, "_failure", off)
        torch.manual_seed(0)
        layer, _ = pair(shape, act, torch.float32, momentum=None)
        results.append([*step(layer, x, grad)[:3], layer.running_mean, layer.running_var])
    assert_close_all(results[0], results[1], 2e-5)


@pytest.mark.parametrize("act,save", [("relu", "input"), ("leaky_relu", "input"),
                                      ("leaky_relu", "output"), ("silu", "input"),
                                      ("identity", "output")])
@pytest.mark.parametrize("fmt", ["c", "last"])
def test_gradcheck_float64(act, save, fmt, path):
    x = make((3, 2, 2, 3), fmt).requires_grad_()
    w = torch.tensor([1.3, -0.8], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.3], dtype=torch.float64, requires_grad=True)
    spec = Act(act, {"relu": 0.0, "leaky_relu": 0.1, "silu": 0.0, "identity": 1.0}[act])
    config = (None, None, None, 0.1, 1e-5, spec, save)
    assert torch.autograd.gradcheck(lambda *a: BatchNormActFunction.apply(*a, config), (x, w, b))


def test_state_dict_round_trip_with_torch():
    theirs = nn.BatchNorm2d(4)
    theirs(make((5, 4, 3, 3), dtype=torch.float32))
    ours = bnn.BatchNormAct2d(4, act="silu")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    assert isinstance(ours, nn.BatchNorm2d) and isinstance(ours, bnn.BatchNorm2d)
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)


def test_timm_keywords():
    layer = bnn.BatchNormAct2d(4, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2},
                               inplace=False, drop_layer=nn.Identity)
    assert type(layer.act) is nn.LeakyReLU and layer.act.negative_slope == 0.2
    assert not layer.act.inplace and type(layer.drop) is nn.Identity
    assert type(bnn.BatchNormAct2d(4, apply_act=False).act) is nn.Identity
    assert type(bnn.BatchNormAct2d(4, act_layer=None).act) is nn.Identity
    assert type(bnn.BatchNormAct2d(4, act_layer="silu").act) is nn.SiLU
    assert type(bnn.BatchNormAct2d(4, act=None).act) is nn.Identity
    assert bnn.BatchNormAct2d(4, act=nn.ReLU()).act.inplace is False
    assert bnn.BatchNormAct2d(4, act="leaky_relu").act.negative_slope == 0.01


def test_refusals():
    with pytest.raises(ValueError, match="act must be one of 'relu', 'leaky_relu', 'silu'"):
        bnn.BatchNormAct2d(4, act="gelu")
    with pytest.raises(ValueError, match="got a GELU module"):
        bnn.BatchNormAct2d(4, act=nn.GELU())
    with pytest.raises(ValueError, match="act must be"):
        bnn.BatchNormAct2d(4, act_layer=nn.Tanh)
    with pytest.raises(ValueError, match="drop_layer: BatchNormAct layers apply no dropout"):
        bnn.BatchNormAct2d(4, drop_layer=nn.Dropout)
    for act, kw in (("relu", {}), ("silu", {}), ("leaky_relu", {"negative_slope": 0.0})):
        with pytest.raises(ValueError, match="save='output' .* needs an invertible activation"):
            bnn.BatchNormAct2d(4, act=act, save="output", **kw)
    with pytest.raises(ValueError, match="save must be 'input' or 'output'"):
        bnn.BatchNormAct2d(4, save="x")
    with pytest.raises(ValueError, match="negative_slope applies to act='leaky_relu' only"):
        bnn.BatchNormAct2d(4, negative_slope=0.2)
    with pytest.raises(ValueError, match="give the activation once"):
        bnn.BatchNormAct2d(4, act="silu", act_layer=nn.ReLU)
    with pytest.raises(ValueError, match=r"act_kwargs \['alpha'\] do not apply to 'relu'"):
        bnn.BatchNormAct2d(4, act_kwargs={"alpha": 1.0})
    with pytest.raises(ValueError, match="expected 4D input"):
        bnn.BatchNormAct2d(4)(torch.randn(3, 4))
    layer = bnn.BatchNormAct2d(4, act="leaky_relu", save="output")
    layer.act.negative_slope = 0.0  # set by hand after construction
    with pytest.raises(ValueError, match="needs an invertible activation"):
        layer(torch.randn(2, 4, 3, 3))


def test_double_backward_is_refused_by_name(path):
    layer = bnn.BatchNormAct2d(3, dtype=torch.float64)
    x = make((4, 3, 2, 2)).requires_grad_()
    (gx,) = torch.autograd.grad(layer(x).sum(), x)  # a first backward works
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    assert "bnlab.nn.BatchNorm" in NO_DOUBLE_BACKWARD and gx.shape == x.shape


def test_an_activation_set_by_hand_runs_after_bn():
    layer = bnn.BatchNormAct2d(3)
    layer.act = nn.GELU()
    x = make((4, 3, 2, 2), dtype=torch.float32)
    torch.testing.assert_close(layer(x), nn.GELU()(nn.BatchNorm2d(3)(x)))


def test_forward_mode_ad_and_torch_func_take_the_torch_op_form():
    layer = bnn.BatchNormAct2d(3, act="silu", dtype=torch.float64, track_running_stats=False)
    x, t = make((4, 3, 2, 2)), make((4, 3, 2, 2), seed=1)
    ref = nn.Sequential(nn.BatchNorm2d(3, dtype=torch.float64, track_running_stats=False),
                        nn.SiLU())
    _, jvp = torch.func.jvp(layer, (x,), (t,))
    _, rjvp = torch.func.jvp(ref, (x,), (t,))
    torch.testing.assert_close(jvp, rjvp)
    g = torch.func.grad(lambda v: layer(v).square().sum())(x)
    rg = torch.func.grad(lambda v: ref(v).square().sum())(x)
    torch.testing.assert_close(g, rg)
