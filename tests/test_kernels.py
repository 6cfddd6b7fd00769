"""The compiled CPU kernels and the torch custom operators around them.

Every case is checked against a float64 torch-op reference of the same math, on shapes
chosen to hit the kernels' edges: one channel, two values per channel, sizes that are not
multiples of the vector width, many channels with tiny planes, planes split into several
segments, wide rows with leftover rows, channels_last(_3d), and every dtype. Each case runs
on the single-threaded and the threaded kernels.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import bnlab.nn as bnn
from bnlab.nn import _kernels as K
from bnlab.nn import _ops

pytestmark = pytest.mark.skipif(not K.available(), reason=f"kernels: {K.unavailable_reason()}")

LAYERS = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}
LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# (shape, memory format): the layouts and edges the kernels see
CASES = [
    ((7, 1), "c"),              # one channel
    ((2, 5), "c"),              # two values per channel
    ((33, 17), "c"),            # rows, not a multiple of the vector width
    ((130, 300), "c"),          # wide rows of 3 rows each, and leftover rows
    ((3, 1, 2), "c"),           # NCL, one channel
    ((5, 3, 37), "c"),          # planes of 37 values
    ((2, 4, 1000), "c"),        # planes split into segments (SEGMENT is lowered below)
    ((4, 300, 2, 2), "c"),      # many channels, tiny planes
    ((4, 300, 2, 2), "last"),   # the same, channels_last: rows of 300
    ((3, 5, 4, 6), "last"),
    ((2, 3, 2, 3, 3), "c"),
    ((2, 3, 2, 3, 3), "last"),  # channels_last_3d
]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(params=["serial", "threaded"])
def kernel_mode(request, monkeypatch):
    """Force each code path of the kernels on small inputs; count kernel calls."""
    monkeypatch.setattr(K, "SEGMENT", 64)  # several segments per plane
    monkeypatch.setattr(K, "ROWS_BLOCK", 600)  # several blocks of rows
    if request.param == "serial":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    else:
        monkeypatch.setattr(K, "PARALLEL_MIN", 0)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls = []
    run = _ops._run
    monkeypatch.setattr(_ops, "_run", lambda kind, *a: calls.append(kind) or run(kind, *a))
    return calls


def make_input(shape, fmt, dtype, offset=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset
    x = x.to(dtype)
    if fmt == "last":
        x = x.contiguous(memory_format=LAST[len(shape)])
    return x


def reference(x, weight, bias, grad, eps=1e-5):
    """float64 BN of the same values by the torch-op path: y, dx, dweight, dbias, mean, var."""
    xr = x.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_()
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = xr.mean(dims, keepdim=True)
    var = (xr - mean).square().mean(dims, keepdim=True)
    y = (xr - mean) / torch.sqrt(var + eps) * w.view(shape) + b.view(shape)
    y.backward(grad.double())
    return y.detach(), xr.grad, w.grad, b.grad, mean.reshape(-1).detach(), var.reshape(-1).detach()


def close(actual, expected, tol):
    actual = actual.detach()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    err = float((actual.double() - expected).abs().max()) if expected.numel() else 0.0
    assert err <= tol * scale, f"max error {err:.3g} > {tol:.1g} * {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("shape,fmt", CASES, ids=[f"{s}-{f}" for s, f in CASES])
def test_forward_backward_and_running_stats_match_float64(shape, fmt, dtype, kernel_mode):
    C = shape[1]
    layer = LAYERS[len(shape)](C, momentum=0.3)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.normal_()
    x = make_input(shape, fmt, dtype).requires_grad_()
    grad = make_input(shape, fmt, dtype, offset=0.0, seed=1)
    y = layer(x)
    y.backward(grad)
    ry, rdx, rdw, rdb, mean, var = reference(x, layer.weight, layer.bias, grad.to(dtype))
    assert kernel_mode == ["forward", "backward"]
    assert y.dtype == dtype and y.stride() == x.stride() and x.grad.stride() == x.stride()
    tol = TOL[dtype]
    close(y, ry, tol)
    close(x.grad, rdx, tol * 4)
    close(layer.weight.grad, rdw, max(tol, 1e-5) * 4)
    close(layer.bias.grad, rdb, max(tol, 1e-5) * 4)
    m = x.numel() // C
    close(layer.running_mean, 0.3 * mean, 1e-6)
    close(layer.running_var, 0.7 + 0.3 * var * m / max(m - 1, 1), 1e-6)
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("shape,fmt", [((512, 3), "c"), ((64, 8, 5, 5), "c"), ((64, 8, 5, 5), "last"),
                                       ((4, 2, 3000), "c")])
def test_large_offset_stays_within_1e6_of_float64(shape, fmt, kernel_mode):
    """1e7 plus unit noise in float32 (pytorch#5410): the two-pass statistics keep the
    normalized values within 1e-6 of float64 BN of the same float32 numbers."""
    x = (1e7 + make_input(shape, "c", torch.float64, offset=0.0) / 2).float()
    if fmt == "last":
        x = x.contiguous(memory_format=LAST[len(shape)])
    layer = LAYERS[len(shape)](shape[1], affine=False)
    ref = LAYERS[len(shape)](shape[1], affine=False, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    assert kernel_mode == ["forward"]
    torch.testing.assert_close(y.double(), ref(x.double()).detach(), rtol=0, atol=1e-6)


def test_momentum_none_and_repeated_batches_match_the_torch_op_path(kernel_mode, monkeypatch):
    """Cumulative averages over several batches, with and without the kernels."""
    layers = [bnn.BatchNorm2d(4, momentum=None), bnn.BatchNorm2d(4, momentum=None)]
    for i in range(3):
        x = make_input((6, 4, 3, 5), "c", torch.float32, seed=i)
        layers[0](x)
        monkeypatch.setattr(K, "_failure", "switched off for the comparison")
        layers[1](x)
        monkeypatch.setattr(K, "_failure", None)
    torch.testing.assert_close(layers[0].running_mean, layers[1].running_mean)
    torch.testing.assert_close(layers[0].running_var, layers[1].running_var)
    assert int(layers[0].num_batches_tracked) == int(layers[1].num_batches_tracked) == 3
    assert kernel_mode.count("forward") == 3


@pytest.mark.parametrize("fmt", ["c", "last"])
def test_non_finite_batch_leaves_buffers_untouched(fmt, kernel_mode):
    layer = bnn.BatchNorm2d(3)
    x = make_input((4, 3, 5, 5), fmt, torch.float32)
    x[1, 2, 0, 0] = float("nan")
    y = layer(x)
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert torch.equal(layer.running_var, torch.ones(3))
    x[1, 2, 0, 0] = float("inf")
    assert torch.isnan(layer(x)[:, 2]).all()


def test_threads_give_the_same_numbers_every_time():
    """Deterministic: the same input and thread count give bit-identical results."""
    x = make_input((16, 32, 9, 9), "c", torch.float32)
    outs = [bnn.BatchNorm2d(32)(x) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


def test_strided_input_takes_the_torch_op_path_and_agrees():
    x = make_input((6, 4, 5, 7), "c", torch.float32)[:, :, ::2, 1:]  # not dense
    assert _ops.kernel_layout(x) is None
    layer = bnn.BatchNorm2d(4)
    ry, *_ = reference(x, layer.weight, layer.bias, torch.ones_like(x))
    close(layer(x), ry, 2e-6)


def test_a_compile_failure_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(K, "_failure", None)

    def broken(parallel, rows=True):
        raise RuntimeError("no code generator for this machine")
    monkeypatch.setattr(K, "compiled", broken)
    x = make_input((8, 3), "c", torch.float32)
    layer = bnn.BatchNorm1d(3)
    with pytest.warns(RuntimeWarning, match="switched off"):
        y = layer(x)
    assert not K.available() and "no code generator" in K.unavailable_reason()
    ry, *_ = reference(x, layer.weight, layer.bias, torch.ones_like(x))
    close(y, ry, 2e-6)
    assert int(layer.num_batches_tracked) == 1


def test_operators_refuse_sizes_that_do_not_fit():
    """The operators are public: sizes are checked before the kernels address memory."""
    x = make_input((4, 8, 5), "c", torch.float32)
    with pytest.raises(ValueError, match="weight should contain 8 elements not 2"):
        torch.ops.bnlab.batch_norm(x, torch.ones(2), None, 1e-5)
    big = torch.zeros(8)
    with pytest.raises(ValueError, match="running_mean should contain 8 elements not 2"):
        _ops.train_forward(x, None, None, big[:2], torch.ones(8), torch.tensor(0), 0.5, 1e-5)
    assert torch.equal(big, torch.zeros(8))
    _, saved = torch.ops.bnlab.batch_norm(x, None, None, 1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        torch.ops.bnlab.batch_norm_backward(torch.ones(2, 8, 5), x, None, saved, 1e-5, True)
    with pytest.raises(ValueError, match="do not fit"):
        torch.ops.bnlab.batch_norm_backward(torch.ones_like(x), x, None, saved[:, :3], 1e-5, True)


def test_zero_eps_on_a_constant_channel_gives_nan_and_keeps_the_kernels():
    y, _ = torch.ops.bnlab.batch_norm(torch.ones(4, 3, 5), None, None, 0.0)
    assert torch.isnan(y).all() and K.available()


def test_statistics_beyond_the_buffers_dtype_leave_them_untouched():
    """float64 input whose variance overflows float32 buffers: skipped, as a non-finite
    batch, the same as on the torch-op path."""
    layer = bnn.BatchNorm1d(2)
    layer(torch.randn(16, 2, dtype=torch.float64) * 1e100)
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_var, torch.ones(2))


def test_parametrized_weight_is_used_in_training():
    import torch.nn.utils.parametrize as parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w
    layer = bnn.BatchNorm2d(3)
    parametrize.register_parametrization(layer, "weight", Double())
    x = make_input((8, 3, 4, 4), "c", torch.float32)
    y = layer(x)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.full((3,), 2.0),
                               rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert layer.parametrizations.weight.original.grad is not None


def test_without_numba_bnlab_runs_its_torch_op_path():
    """A machine where Numba cannot be imported: bnlab imports, says why, and computes."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch, bnlab.nn as bnn\n"
        "from bnlab.nn import _kernels as K\n"
        "assert not K.available() and 'numba' in K.unavailable_reason()\n"
        "x = torch.randn(8, 3, 4, 4, requires_grad=True)\n"
        "bnn.BatchNorm2d(3)(x).sum().backward()\n"
        "assert x.grad.abs().max() < 1e-4\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_kernels_switched_off_by_environment_variable():
    code = ("from bnlab.nn import _kernels as K\n"
            "print(K.available(), K.unavailable_reason())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"BNLAB_KERNELS": "0", "PATH": ""})
    assert out.stdout.split()[0] == "False" and "BNLAB_KERNELS=0" in out.stdout, out.stderr


# -- the operators ------------------------------------------------------------------------------
def op_args(dtype=torch.float64, fmt="c"):
    x = make_input((6, 3, 4, 5), fmt, dtype)
    w = torch.rand(3, dtype=dtype) + 0.5
    b = torch.randn(3, dtype=dtype)
    return x, w, b


@pytest.mark.parametrize("fmt", ["c", "last"])
def test_opcheck_of_every_operator(fmt):
    x, w, b = op_args(fmt=fmt)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    torch.library.opcheck(torch.ops.bnlab.batch_norm.default, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.bnlab.batch_norm.default, (x, None, None, 1e-5))
    _, saved = torch.ops.bnlab.batch_norm(x.detach(), w.detach(), b.detach(), 1e-5)
    grad = torch.randn_like(x)
    for need in (True, False):
        torch.library.opcheck(torch.ops.bnlab.batch_norm_backward.default,
                              (grad, x.detach(), w.detach(), saved, 1e-5, need))
    rm, rv, n = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.tensor(0)
    torch.library.opcheck(torch.ops.bnlab.update_running_stats.default, (rm, rv, n, saved, 120, 0.1))


def test_operator_gradients_pass_gradcheck():
    x, w, b = op_args()
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    fn = lambda *a: torch.ops.bnlab.batch_norm(*a, 1e-5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_operator_vmap_rules_equal_a_loop():
    from torch.func import vmap
    xs = torch.stack([op_args()[0] * (i + 1) for i in range(3)])
    ws = torch.rand(3, 3, dtype=torch.float64) + 0.5
    y, saved = vmap(lambda x, w: torch.ops.bnlab.batch_norm(x, w, None, 1e-5))(xs, ws)
    for i in range(3):
        yi, si = torch.ops.bnlab.batch_norm(xs[i], ws[i], None, 1e-5)
        torch.testing.assert_close(y[i], yi)
        torch.testing.assert_close(saved[i], si)
    grads = torch.randn_like(xs)
    gx, gw, gb = vmap(lambda g, x, w, s: torch.ops.bnlab.batch_norm_backward(g, x, w, s, 1e-5, True))(
        grads, xs, ws, saved)
    for i in range(3):
        ref = torch.ops.bnlab.batch_norm_backward(grads[i], xs[i], ws[i], saved[i], 1e-5, True)
        for a, r in zip((gx[i], gw[i], gb[i]), ref):
            torch.testing.assert_close(a, r)
    means, variances = torch.zeros(3, 3, dtype=torch.float64), torch.ones(3, 3, dtype=torch.float64)
    counts = torch.zeros(3, dtype=torch.long)
    vmap(lambda m, v, n, s: (torch.ops.bnlab.update_running_stats(m, v, n, s, 120, None), m)[1])(
        means, variances, counts, saved)
    assert counts.tolist() == [1, 1, 1]
    torch.testing.assert_close(means, saved[:, 0])
    with pytest.raises(RuntimeError, match="running statistics"):
        vmap(lambda s: (torch.ops.bnlab.update_running_stats(
            torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.tensor(0),
            s, 120, 0.1), s)[1])(saved)


@pytest.mark.parametrize("fmt", ["c", "last"])
def test_compile_fullgraph_and_export_run_the_operators(fmt):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnn.BatchNorm2d(4), torch.nn.ReLU())
    twin = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnn.BatchNorm2d(4), torch.nn.ReLU())
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(2):
        x = torch.randn(5, 3, 8, 8, generator=gen)
        if fmt == "last":
            x = x.contiguous(memory_format=torch.channels_last)
        y, ref = compiled(x), twin(x)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        y.square().sum().backward()
        ref.square().sum().backward()
        # the compiled graph sums the convolution's weight gradient (over 5 x 6 x 6 positions,
        # terms near 1) in another order: float32 rounding of that size, not a wrong gradient
        torch.testing.assert_close(model[0].weight.grad, twin[0].weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)
    assert int(model[1].num_batches_tracked) == int(twin[1].num_batches_tracked) == 2
    exported = torch.export.export(twin, (x,))
    assert any("bnlab.batch_norm" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), twin(x), rtol=1e-5, atol=1e-5)


def test_concurrent_python_threads_and_a_missing_threading_layer(monkeypatch):
    """Layers used from several Python threads at once give each thread's own result; and
    where no threading layer can load, the single-threaded kernels run instead."""
    import threading

    monkeypatch.setattr(K, "PARALLEL_MIN", 0)
    xs = [make_input((16, 8, 6, 6), "c", torch.float32, seed=i) for i in range(4)]
    expected = [bnn.BatchNorm2d(8)(x) for x in xs]
    got = [None] * 4

    def work(i):
        got[i] = bnn.BatchNorm2d(8)(xs[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, g in zip(expected, got):
        assert torch.equal(e, g)

    def no_layer(n):
        raise ValueError("No threading layer could be loaded.")
    monkeypatch.setattr(K, "_threadsafe", None)
    monkeypatch.setattr(K, "_threads_failure", None)
    monkeypatch.setattr(K.numba, "set_num_threads", no_layer)
    x = make_input((64, 8, 9, 9), "c", torch.float32)
    layer = bnn.BatchNorm2d(8)
    ry, *_ = reference(x, layer.weight, layer.bias, torch.ones_like(x))
    close(layer(x), ry, 2e-6)
    assert "threading layer" in K._threads_failure and K.available()
