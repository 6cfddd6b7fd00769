"""BatchNorm fused with its activation on the Triton kernels (bnlab.nn._triton with an
activation): forward and backward against torch's float64 BN + activation, the running
statistics they update, and their wiring into bnlab.nn.BatchNormAct*d.

Without CUDA they run in Triton's interpreter on CPU tensors (the layers take the kernels for
CPU tensors when the test switch is on). With a GPU, ``pytest tests/test_triton_act.py`` (or
``TRITON_INTERPRET=0 pytest ...``) runs the same tests compiled, on CUDA."""

from __future__ import annotations

import copy

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("triton")

from conftest import triton_compiled  # noqa: E402

import bnlab.nn as bnn  # noqa: E402
from bnlab.nn import _ops, _triton as T  # noqa: E402
from bnlab.nn import functional as F  # noqa: E402
from bnlab.nn._errors import ShapeError  # noqa: E402

COMPILED = triton_compiled()  # conftest sets TRITON_INTERPRET=1 where there is no CUDA
if COMPILED and not torch.cuda.is_available():
    pytest.skip("bnlab's Triton kernels are compiled in this process (TRITON_INTERPRET was not 1 "
                "when Triton was first imported) and need a CUDA device", allow_module_level=True)
DEVICE = "cuda" if COMPILED else "cpu"

# name: (torch's activation, the kernels' (slope, silu))
ACTS = {"relu": (nn.ReLU(), (0.0, False)), "leaky_relu": (nn.LeakyReLU(0.1), (0.1, False)),
        "silu": (nn.SiLU(), (1.0, True)), "identity": (nn.Identity(), (1.0, False))}
LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# how far a half output may be from float64: its rounding, a few times over
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-5, 2e-5),
       torch.float16: (0, 1.5e-2), torch.bfloat16: (0, 1.2e-1)}


@pytest.fixture
def on_cpu(monkeypatch):
    """CPU tensors take the kernels (in the interpreter); CUDA tensors always do."""
    monkeypatch.setattr(_ops, "_TRITON_ON_CPU", not COMPILED)


def make(shape, dtype, layout="nchw", seed=0, scale=1.5, offset=0.5):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=LAST[x.dim()])
    return x.to(DEVICE)


def parameters(c, dtype, seed=1):
    """A weight with both signs, away from 0, and a bias, in the parameters' dtype."""
    gen = torch.Generator().manual_seed(seed)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    sign = torch.tensor([1.0, -1.0]).repeat(c)[:c]
    weight = (torch.rand(c, generator=gen) + 0.5) * sign
    bias = torch.randn(c, generator=gen) * 0.5
    return weight.to(pdtype).to(DEVICE), bias.to(pdtype).to(DEVICE)


def reference(x, weight, bias, grad_y, act, eps=1e-5):
    """torch's training BN then the activation, in float64, with the gradients."""
    xr = x.double().requires_grad_()
    wr = weight.double().requires_grad_()
    br = bias.double().requires_grad_()
    y = ACTS[act][0](torch.nn.functional.batch_norm(xr, None, None, wr, br, True, 0.0, eps))
    y.backward(grad_y.double())
    return y.detach(), xr.grad, wr.grad, br.grad


# each (act, save) pair the layers allow on both layouts in float32, and in each other dtype
# on one layout
CASES = [(act, save, layout, dtype)
         for act, save in [("relu", "input"), ("leaky_relu", "input"), ("leaky_relu", "output"),
                           ("silu", "input"), ("identity", "output")]
         for layout, dtype in [("nchw", torch.float32), ("channels_last", torch.float32),
                               ("nchw", torch.float64), ("channels_last", torch.float16),
                               ("nchw", torch.bfloat16)]]


@pytest.mark.parametrize("act,save,layout,dtype", CASES,
                         ids=[f"{a}-{s}-{l}-{str(d)[6:]}" for a, s, l, d in CASES])
def test_forward_and_backward_against_float64(act, save, layout, dtype):
    shape = (6, 4, 3, 3)
    x = make(shape, dtype, layout)
    weight, bias = parameters(shape[1], dtype)
    grad_y = make(shape, dtype, layout, seed=2, scale=1.0, offset=0.0)
    slope, silu = ACTS[act][1]
    y, saved = T.forward(x, weight, bias, 1e-5, (None, None, None), None, slope, silu)
    v = y if save == "output" else x
    gx, gw, gb = T.backward(grad_y, v, weight, saved, 1e-5, True, bias, slope, silu,
                            save == "output")
    ry, rgx, rgw, rgb = reference(x, weight, bias, grad_y, act)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), ry, rtol=rtol, atol=atol)
    # the input gradient of a half y carries y's rounding through x_hat
    gtol = atol * (3 if save == "output" else 1)
    torch.testing.assert_close(gx.double(), rgx, rtol=rtol, atol=gtol)
    dims = F.reduce_dims(x.dim())
    torch.testing.assert_close(saved[0], x.double().mean(dims), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(saved[1], x.double().var(dims, unbiased=False), rtol=1e-5, atol=0)
    ptol = 1e-9 if dtype == torch.float64 else (1e-4 if dtype == torch.float32 else 0.25)
    torch.testing.assert_close(gw.double(), rgw, rtol=ptol, atol=ptol)
    torch.testing.assert_close(gb.double(), rgb, rtol=ptol, atol=ptol)
    assert y.dtype == x.dtype and y.stride() == x.stride() and gx.stride() == x.stride()
    assert gw.dtype == gb.dtype == weight.dtype and gw.data_ptr() != gb.data_ptr()


@pytest.mark.parametrize("shape,layout", [((300, 2), "nchw"), ((3, 5, 4), "nchw"),
                                          ((2, 3, 2, 3, 2), "channels_last")])
def test_rows_chunks_and_3d_without_parameters(shape, layout, monkeypatch):
    """(N, C) rows in five chunks (chunks halved for a GPU of 4 multiprocessors; their
    partial results merged by count, two a step), NCL, and channels_last 3d; no weight or
    bias (affine=False), SiLU."""
    monkeypatch.setattr(T, "CHUNK_ROWS", 256)
    monkeypatch.setattr(T, "MIN_CHUNK_ROWS", 64)
    monkeypatch.setattr(T, "_processors", lambda device: 4)
    monkeypatch.setattr(T, "MERGE_TILE", 32)
    assert T._chunk_rows(300, 2, torch.device(DEVICE)) == 64  # 5 chunks, 16 wanted
    x = make(shape, torch.float32, layout, offset=3.0)
    grad_y = make(shape, torch.float32, layout, seed=4, offset=0.0)
    y, saved = T.forward(x, None, None, 1e-5, (None, None, None), None, 1.0, True)
    gx, gw, gb = T.backward(grad_y, x, None, saved, 1e-5, True, None, 1.0, True)
    c = shape[1]
    ones = torch.ones(c, dtype=torch.float64, device=DEVICE)
    ry, rgx, rgw, rgb = reference(x, ones, 0 * ones, grad_y, "silu")
    torch.testing.assert_close(y.double(), ry, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(gx.double(), rgx, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(gw.double(), rgw, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gb.double(), rgb, rtol=1e-4, atol=1e-3)
    assert gw.dtype == torch.float32 and y.stride() == x.stride()
    _, gw2, gb2 = T.backward(grad_y, x, None, saved, 1e-5, False, None, 1.0, True)
    assert torch.equal(gw2, gw) and torch.equal(gb2, gb)  # no grad_x: the same sums


def test_save_output_with_a_zero_weight_loses_only_its_weight_gradient():
    """|weight| is raised to eps to recover x_hat (act.clamp_weight): channel 1's weight
    gradient is 0, its input and bias gradients and channel 0's stay exact."""
    x = make((6, 2, 3, 3), torch.float64)
    grad_y = make((6, 2, 3, 3), torch.float64, seed=3, offset=0.0)
    weight = torch.tensor([1.2, 0.0], dtype=torch.float64, device=DEVICE)
    bias = torch.tensor([0.1, -0.2], dtype=torch.float64, device=DEVICE)
    y, saved = T.forward(x, weight, bias, 1e-5, (None, None, None), None, 0.1, False)
    gx0, gw0, gb0 = T.backward(grad_y, x, weight, saved, 1e-5, True, bias, 0.1, False, False)
    gx1, gw1, gb1 = T.backward(grad_y, y, weight, saved, 1e-5, True, bias, 0.1, False, True)
    torch.testing.assert_close(gx1, gx0)
    torch.testing.assert_close(gb1, gb0)
    torch.testing.assert_close(gw1[0], gw0[0])
    # y / 0.1 misses bias -0.2 by rounding only: x_hat about 1e-17 / eps (the torch ops too)
    assert abs(float(gw0[1])) > 0.5 and abs(float(gw1[1])) < 1e-9


def _cpu_layer(layer):
    """A CPU copy of a layer (the reference: bnlab's CPU path)."""
    return copy.deepcopy(layer).cpu()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_stats_float32_for_half_inputs(dtype, momentum, on_cpu):
    ours = bnn.BatchNormAct2d(3, act="silu", momentum=momentum).to(DEVICE)
    ref = _cpu_layer(ours)
    for seed in range(2):
        x = make((5, 3, 2, 3), dtype, seed=seed, scale=2.0, offset=1.0)
        y = ours(x)
        with pytest.MonkeyPatch.context() as mp:  # the reference: the torch ops, on CPU
            mp.setattr(_ops, "_TRITON_ON_CPU", False)
            ref(x.cpu().float())  # the same half values, in float32
    assert y.dtype == dtype and ours.running_mean.dtype == torch.float32
    torch.testing.assert_close(ours.running_mean.cpu(), ref.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.running_var.cpu(), ref.running_var, rtol=1e-6, atol=1e-6)
    assert int(ours.num_batches_tracked) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["relu", None])  # None: plain BatchNorm2d
def test_a_half_module_keeps_half_parameters_and_buffers(dtype, act, on_cpu):
    """layer.to(half): weight, bias, running statistics and the parameters' gradients in the
    half dtype, each value as the torch ops on CPU round it; a batch that overflows the
    half buffers is skipped, counter included."""
    def build():
        torch.manual_seed(0)
        layer = bnn.BatchNorm2d(3) if act is None else bnn.BatchNormAct2d(3, act=act)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
        return layer.to(dtype)
    ours, ref = build().to(DEVICE), build()
    x = make((4, 3, 2, 2), dtype, scale=2.0, offset=2.0)
    grad = make((4, 3, 2, 2), dtype, seed=3)
    ours(x).backward(grad)
    with pytest.MonkeyPatch.context() as mp:  # the reference: the torch ops, on CPU
        mp.setattr(_ops, "_TRITON_ON_CPU", False)
        ref(x.cpu()).backward(grad.cpu())
    for name in ("running_mean", "running_var"):
        got, want = getattr(ours, name), getattr(ref, name)
        assert got.dtype == dtype and bool((got != 0).any()), (name, got)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-2, atol=1e-2)
    for name in ("weight", "bias"):
        got, want = getattr(ours, name).grad, getattr(ref, name).grad
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu(), want, rtol=2e-2, atol=2e-2)
    assert int(ours.num_batches_tracked) == 1
    before = [ours.running_mean.clone(), ours.running_var.clone()]
    ours(make((4, 3, 2, 2), torch.float32, scale=1e3, offset=0.0).to(dtype) * 300)  # var > 65504
    if dtype == torch.float16:
        assert int(ours.num_batches_tracked) == 1
        assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])


def test_a_non_finite_batch_leaves_the_running_stats_alone(on_cpu):
    """As functional.update_running_stats: all channels or none (here 20 channels merged by
    two programs, the NaN in the second's), the counter included."""
    assert T._merge_blocks(1, 20)[2] == 2
    layer = bnn.BatchNormAct2d(20, act="relu", momentum=None).to(DEVICE)
    layer(make((4, 20, 2, 2), torch.float32))
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    x = make((4, 20, 2, 2), torch.float32, seed=1)
    x[1, 18, 0, 0] = float("nan")
    y = layer(x)
    assert torch.isnan(y[:, 18]).all() and torch.isfinite(y[:, :18]).all()
    assert int(layer.num_batches_tracked) == 1
    assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's NumPy
def test_finite_in_float64_but_not_in_the_buffers_dtype_is_skipped():
    """A float64 batch whose variance overflows float32 running buffers: skipped, as
    functional.update_running_stats checks the values it would write."""
    x = make((4, 2, 3), torch.float64, scale=1e30, offset=0.0)
    buffers = [torch.zeros(2, device=DEVICE), torch.ones(2, device=DEVICE),
               torch.zeros((), dtype=torch.long, device=DEVICE)]
    _, saved = T.forward(x, None, None, 1e-5, tuple(buffers), 0.1)
    assert torch.isfinite(saved).all() and saved[1].max() > 1e40
    assert buffers[0].tolist() == [0.0, 0.0] and buffers[1].tolist() == [1.0, 1.0]
    assert int(buffers[2]) == 0


def test_buffers_the_kernel_cannot_write_are_updated_by_the_torch_ops():
    x = make((6, 3, 2, 2), torch.float32)
    store = torch.zeros(3, 2, device=DEVICE)
    strided = (store[:, 0], torch.ones(3, device=DEVICE), None)  # a non-contiguous mean
    dense = (torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), None)
    for running in (strided, dense):
        T.forward(x, None, None, 1e-5, running, 0.25, 0.0, False)
    torch.testing.assert_close(strided[0], dense[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(strided[1], dense[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dense[0], 0.25 * x.double().mean((0, 2, 3)).float())
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        T.forward(x, None, None, 1e-5, dense, None)


@pytest.mark.parametrize("act,save,layout", [("relu", "input", "nchw"),
                                             ("leaky_relu", "output", "channels_last"),
                                             ("silu", "input", "channels_last")])
def test_batchnormact2d_takes_the_kernels_and_matches_the_cpu_path(act, save, layout, on_cpu,
                                                                  monkeypatch):
    calls = []
    for name in ("forward", "backward"):
        original = getattr(T, name)
        monkeypatch.setattr(T, name, lambda *a, _f=original, _n=name: (calls.append(_n), _f(*a))[1])
    kw = {"negative_slope": 0.2} if act == "leaky_relu" else {}
    ours = bnn.BatchNormAct2d(4, act=act, save=save, momentum=0.2, **kw).to(DEVICE)
    with torch.no_grad():
        ours.weight.copy_(torch.tensor([1.5, -0.7, 0.3, 1.0]))
        ours.bias.copy_(torch.tensor([0.2, -0.1, 0.5, 0.0]))
    ref = _cpu_layer(ours)
    for seed in range(2):
        x = make((5, 4, 3, 3), torch.float32, layout, seed=seed)
        grad = make((5, 4, 3, 3), torch.float32, layout, seed=seed + 10, offset=0.0)
        xa, xb = x.clone().requires_grad_(), x.cpu().requires_grad_()
        ya = ours(xa)
        ya.backward(grad)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_ops, "_TRITON_ON_CPU", False)
            yb = ref(xb)
            yb.backward(grad.cpu())
        torch.testing.assert_close(ya.cpu(), yb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xa.grad.cpu(), xb.grad, rtol=1e-4, atol=1e-4)
        assert ya.stride() == x.stride() and xa.grad.stride() == x.stride()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean.cpu(), ref.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.running_var.cpu(), ref.running_var, rtol=1e-6, atol=1e-6)
    assert int(ours.num_batches_tracked) == 2
    assert calls == ["forward", "backward"] * 2


def test_cpu_tensors_without_the_switch_keep_the_cpu_path(monkeypatch):
    """Off the switch, a CPU tensor never reaches the Triton kernels."""
    def refuse(*args):
        raise AssertionError("the Triton kernels ran on a CPU tensor")
    monkeypatch.setattr(T, "forward", refuse)
    monkeypatch.setattr(T, "backward", refuse)
    for dtype in (torch.float32, torch.float16):  # the CPU kernels; the torch ops
        x = torch.randn(4, 3, 2, 2, dtype=dtype, requires_grad=True)
        bnn.BatchNormAct2d(3, act="silu")(x).sum().backward()
        assert x.grad.shape == x.shape


def test_wrong_sizes_are_refused_by_name(on_cpu):
    x = make((4, 3, 2), torch.float32)
    with pytest.raises(ShapeError, match="weight should contain 3 elements not 2"):
        _ops.act_forward(x, torch.ones(2, device=DEVICE), None, 1e-5, (None, None, None), 0.1,
                         0.0, False)
    _, saved = T.forward(x, None, None, 1e-5)
    with pytest.raises(ShapeError, match="do not fit x"):
        T.backward(make((4, 3, 3), torch.float32), x, None, saved, 1e-5, True)
    with pytest.raises(ShapeError, match="bias: expected 3 values"):
        T.backward(x, x, None, saved, 1e-5, True, torch.ones(4, device=DEVICE), 0.0)


@pytest.mark.parametrize("failing", ["forward", "normalize", "backward"])
def test_a_kernel_that_fails_switches_to_the_torch_ops(failing, on_cpu, monkeypatch):
    """The torch ops take over with a warning, and the running statistics are updated
    once: the normalizing pass, which writes them, is the forward's last."""
    def broken(*args):
        raise RuntimeError("no such GPU")
    monkeypatch.setattr(T, failing, broken)
    monkeypatch.setattr(_ops, "_T", None)
    layer = bnn.BatchNormAct2d(3, act="leaky_relu").to(DEVICE)
    ref = _cpu_layer(layer)
    x = make((6, 3, 2, 2), torch.float32).requires_grad_()
    with pytest.warns(RuntimeWarning, match="Triton BatchNorm kernels failed here"):
        layer(x).sum().backward()
    assert _ops._T is False  # switched off for the process (monkeypatch restores it)
    monkeypatch.setattr(_ops, "_TRITON_ON_CPU", False)
    xr = x.detach().cpu().requires_grad_()
    ref(xr).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad.cpu(), ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.running_var.cpu(), ref.running_var, rtol=1e-6, atol=1e-6)
    assert int(layer.num_batches_tracked) == 1
