"""The Triton kernels (bnlab.nn._triton) against float64 references, and their wiring: the
layers, eval and SyncBatchNorm's local statistics take them for the tensors they serve.

Without CUDA they run in Triton's interpreter on CPU tensors (the layers take the kernels for
CPU tensors when the test switch is on). With a GPU, ``pytest tests/test_triton.py`` (or
``TRITON_INTERPRET=0 pytest ...``) runs the same tests compiled, on CUDA."""

from __future__ import annotations

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from conftest import triton_compiled  # noqa: E402

import bnlab.nn as bnn  # noqa: E402
from bnlab.nn import _ops, _triton as T  # noqa: E402
from bnlab.nn import functional as F  # noqa: E402

HALF = {torch.float16: 2e-3, torch.bfloat16: 2e-2}  # output rounding of the dtype
COMPILED = triton_compiled()  # conftest sets TRITON_INTERPRET=1 where there is no CUDA
if COMPILED and not torch.cuda.is_available():
    pytest.skip("bnlab's Triton kernels are compiled in this process (TRITON_INTERPRET was not 1 "
                "when Triton was first imported) and need a CUDA device", allow_module_level=True)
DEVICE = "cuda" if COMPILED else "cpu"


@pytest.fixture
def on_cpu(monkeypatch):
    """CPU tensors take the kernels (in the interpreter); CUDA tensors always do."""
    monkeypatch.setattr(_ops, "_TRITON_ON_CPU", not COMPILED)


def reference(x, weight, bias, grad_y, eps=1e-5):
    """Training BN in float64 by torch, with its gradients."""
    xr = x.double().requires_grad_()
    wr = weight.double().requires_grad_()
    br = bias.double().requires_grad_()
    y = torch.nn.functional.batch_norm(xr, None, None, wr, br, True, 0.0, eps)
    y.backward(grad_y.double())
    dims = F.reduce_dims(x.dim())
    return y.detach(), xr.grad, wr.grad, br.grad, x.double().mean(dims), x.double().var(dims, unbiased=False)


CASES = [((16, 3, 5, 5), "nchw", torch.float32), ((16, 3, 5, 5), "channels_last", torch.float32),
         ((70, 20), "nchw", torch.float64), ((6, 4, 7), "nchw", torch.bfloat16),
         ((4, 5, 3, 3, 2), "channels_last", torch.float16)]


@pytest.mark.parametrize("shape,layout,dtype", CASES)
def test_forward_and_backward_against_float64(shape, layout, dtype):
    gen = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(*shape, generator=gen) * 3 + 50).to(dtype).to(DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)
    c = shape[1]
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.rand(c, generator=gen) + 0.5).to(pdtype).to(DEVICE)
    bias = torch.randn(c, generator=gen).to(pdtype).to(DEVICE)
    grad_y = torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)
    y, saved = T.forward(x, weight, bias, 1e-5)
    gx, gw, gb = T.backward(grad_y, x, weight, saved, 1e-5, True)
    ry, rgx, rgw, rgb, mean, var = reference(x, weight, bias, grad_y)
    tight = dtype in (torch.float32, torch.float64)
    tol = {"rtol": 1e-5, "atol": 1e-5} if tight else {"rtol": 0, "atol": 4 * HALF[dtype] * 3}
    torch.testing.assert_close(saved[0], mean, rtol=1e-9 if dtype == torch.float64 else 1e-7, atol=0)
    torch.testing.assert_close(saved[1], var, rtol=1e-9 if dtype == torch.float64 else 1e-5, atol=0)
    torch.testing.assert_close(y.double(), ry, **tol)
    torch.testing.assert_close(gx.double(), rgx, **tol)
    torch.testing.assert_close(gw.double(), rgw, rtol=1e-4, atol=1e-3 if tight else 0.05)
    torch.testing.assert_close(gb.double(), rgb, rtol=1e-4, atol=1e-3 if tight else 0.05)
    assert y.dtype == x.dtype and y.stride() == x.stride() and gx.stride() == x.stride()
    assert gw.dtype == pdtype


def test_a_large_offset_keeps_the_variance_and_chunks_merge_exactly():
    # 5000 rows: two chunks of CHUNK_ROWS merged by count; 1e4 + unit noise in float32
    assert 5000 > T.CHUNK_ROWS
    x = (torch.randn(5000, 2, generator=torch.Generator().manual_seed(3)) + 1e4).to(DEVICE)
    moments = T.local_moments(x)
    xd = x.double()
    assert moments[0].tolist() == [5000.0, 5000.0]
    torch.testing.assert_close(moments[1], xd.mean(0), rtol=0, atol=1e-4)
    torch.testing.assert_close(moments[2] / 5000, xd.var(0, unbiased=False), rtol=1e-4, atol=0)
    naive = (xd.square().float().mean(0) - xd.mean(0).float().square()).double()
    assert ((naive - xd.var(0, unbiased=False)).abs() > 0.5).any()  # what one pass would give


def test_layers_take_the_kernels_and_match_the_cpu_path(on_cpu, monkeypatch):
    calls = []
    for name in ("forward", "backward", "normalize"):
        original = getattr(T, name)
        monkeypatch.setattr(T, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    x = torch.randn(12, 4, 3, 3, generator=torch.Generator().manual_seed(5)) * 2 + 1
    ours, ref = bnn.BatchNorm2d(4, momentum=None), bnn.BatchNorm2d(4, momentum=None)
    if COMPILED:  # the reference: the same layer on CPU
        x, ours = x.to(DEVICE), ours.to(DEVICE)
    xa, xb = x.clone().requires_grad_(), x.cpu().requires_grad_()
    ya = ours(xa)
    ya.square().sum().backward()
    monkeypatch.setattr(_ops, "_TRITON_ON_CPU", False)
    yb = ref(xb)
    yb.square().sum().backward()
    torch.testing.assert_close(ya.cpu(), yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad.cpu(), xb.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.weight.grad.cpu(), ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_var.cpu(), ref.running_var, rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == 1
    monkeypatch.setattr(_ops, "_TRITON_ON_CPU", not COMPILED)
    with torch.no_grad():
        ye = ours.eval()(x)
    torch.testing.assert_close(ye.cpu(), ref.eval()(x.cpu()), rtol=1e-5, atol=1e-5)
    assert calls == ["forward", "normalize", "backward", "normalize"]  # forward normalizes


def test_sync_batchnorm_local_statistics(on_cpu):
    from bnlab.nn.sync import _local_moments

    x = (torch.randn(9, 3, 4, generator=torch.Generator().manual_seed(6)) * 5 - 2).to(DEVICE)
    got = _local_moments(x, (0, 2)).cpu()
    xd = x.cpu().double().transpose(0, 1).reshape(3, -1)
    assert got[0].tolist() == [36.0] * 3
    torch.testing.assert_close(got[1], xd.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[2], (xd - xd.mean(1, keepdim=True)).square().sum(1),
                               rtol=1e-5, atol=1e-5)


def test_what_the_kernels_do_not_take_runs_the_torch_ops(on_cpu):
    assert _ops.triton_kernels(torch.empty(0, 3, device=DEVICE)) is None  # an empty batch
    assert _ops.triton_kernels(torch.zeros(4, 3, dtype=torch.int32, device=DEVICE)) is None
    bn = bnn.BatchNorm1d(3).to(DEVICE)
    assert bn(torch.empty(0, 3, device=DEVICE)).shape == (0, 3)


def test_outputs_keep_a_permuted_layout_and_gradients_do_not_alias():
    """Found by review: a dense layout the kernels copy (sequence-first data) must come back
    in x's strides, as the operators' fake implementations promise; float64 parameter
    gradients must not share storage."""
    x = torch.randn(5, 4, 8, dtype=torch.float64, device=DEVICE).permute(1, 2, 0)  # (N, C, L)
    w = torch.ones(8, dtype=torch.float64, device=DEVICE)
    y, saved = T.forward(x, w, None, 1e-5)
    gx, gw, gb = T.backward(torch.randn_like(x), x, w, saved, 1e-5, True)
    assert y.stride() == x.stride() and gx.stride() == x.stride()
    assert gw.data_ptr() != gb.data_ptr()
    with pytest.raises(ValueError, match="do not fit x"):
        T.backward(torch.randn(2, 8, 5, dtype=torch.float64, device=DEVICE), x, w, saved, 1e-5, True)


def test_compiled_step_on_permuted_input(on_cpu):
    bn = bnn.BatchNorm1d(8).to(DEVICE)
    seq = torch.randn(5, 4, 8, device=DEVICE, requires_grad=True)  # (L, N, C)
    step = torch.compile(lambda s: bn(s.permute(1, 2, 0)).square().sum(), fullgraph=True)
    step(seq).backward()
    assert seq.grad.shape == seq.shape and torch.isfinite(seq.grad).all()


def test_a_kernel_that_fails_switches_to_the_torch_ops(on_cpu, monkeypatch):
    def broken(*args):
        raise RuntimeError("no such GPU")
    monkeypatch.setattr(T, "forward", broken)
    monkeypatch.setattr(_ops, "_T", None)
    x = torch.randn(6, 3, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="Triton BatchNorm kernels failed here"):
        y = bnn.BatchNorm1d(3).to(DEVICE)(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(3, device=DEVICE), atol=1e-5, rtol=0)
    assert _ops._T is False  # switched off for the process (monkeypatch restores it)
