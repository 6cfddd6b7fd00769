"""Gradient checks, low precision, large offsets, non-finite batches, torch.compile."""

import pytest
import torch

import bnlab.nn as bnn
from bnlab.nn import functional as F


def _functional(ndim):
    def f(x, w, b):
        shape = [1, -1] + [1] * (ndim - 2)
        return F.batch_norm(x, w.view(shape), b.view(shape), 1e-5)[0]
    return f


@pytest.mark.parametrize("shape", [(4, 5), (3, 2, 4), (2, 3, 2, 2)])
def test_gradcheck_and_gradgradcheck(shape):
    gen = torch.Generator().manual_seed(1)
    x = (5 * torch.randn(*shape, generator=gen, dtype=torch.float64) + 12).requires_grad_()
    w = torch.randn(shape[1], generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64).requires_grad_()
    f = _functional(len(shape))
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_double_backward_matches_torch():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    grads = []
    for layer in (bnn.BatchNorm1d(4, dtype=torch.float64), torch.nn.BatchNorm1d(4, dtype=torch.float64)):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (g,) = torch.autograd.grad((y ** 3).sum(), xi, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), xi)
        grads.append(gg)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_float32_state_and_track_float64(dtype):
    gen = torch.Generator().manual_seed(4)
    x64 = torch.randn(32, 6, 5, 5, generator=gen, dtype=torch.float64) * 4 + 3
    bn = bnn.BatchNorm2d(6)
    ref = torch.nn.BatchNorm2d(6, dtype=torch.float64)
    x = x64.to(dtype).requires_grad_()
    xr = x.detach().double().requires_grad_()  # same values, float64
    y, yr = bn(x), ref(xr)
    assert y.dtype == dtype and bn.weight.dtype == bn.running_mean.dtype == torch.float32
    grad = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(grad.to(dtype))
    yr.backward(grad.to(dtype).double())
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y.double(), yr.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=tol, atol=tol)
    assert bn.weight.grad.dtype == torch.float32
    torch.testing.assert_close(bn.weight.grad.double(), ref.weight.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(bn.running_var.double(), ref.running_var, rtol=1e-5, atol=1e-6)
    bn.eval(), ref.eval()
    torch.testing.assert_close(bn(x.detach()).double(), ref(xr.detach()), rtol=tol, atol=tol)


def test_float64_stays_float64():
    bn = bnn.BatchNorm1d(3, dtype=torch.float64)
    assert bn(torch.randn(4, 3, dtype=torch.float64)).dtype == torch.float64


def test_large_offset_normalizes_as_well_as_float64():
    """pytorch#5410: 1e7 + unit noise. float32 holds the values to within 0.5, so compare
    against float64 BN of the very same float32 values."""
    gen = torch.Generator().manual_seed(5)
    x = (1e7 + 1000 * torch.randn(512, 3, generator=gen, dtype=torch.float64)).float()
    x_small = (1e7 + torch.randn(512, 3, generator=gen, dtype=torch.float64)).float()
    for data in (x, x_small):
        y = bnn.BatchNorm1d(3, affine=False)(data)
        y64 = bnn.BatchNorm1d(3, affine=False, dtype=torch.float64)(data.double())
        assert (y.double() - y64).abs().max() < 1e-3
        assert abs(y.var(0, unbiased=False).mean().item() - 1) < 1e-3


def test_bench_large_offset_error_is_float64_quality():
    from bnlab.bench.layer import large_offset_error

    ours, _ = large_offset_error()
    assert ours < 1e-6


def test_naive_variance_would_fail_the_large_offset_case():
    """The E[x^2] - E[x]^2 formula in float32 is far off here, so the test above is not idle."""
    gen = torch.Generator().manual_seed(5)
    x = (1e7 + torch.randn(512, 3, generator=gen, dtype=torch.float64) * 4).float()
    naive = (x.square().mean(0) - x.mean(0).square())
    stats = F.batch_stats(x, (0,))
    true = x.double().var(0, unbiased=False)
    assert ((naive.double() - true).abs() / true).max() > 0.5
    assert ((stats.var.double().view(-1) - true).abs() / true).max() < 1e-4
    # and the rounded float32 mean alone would centre x_hat off by a visible amount
    true_mean = x.double().mean(0)
    assert ((stats.mean.double().view(-1) - true_mean).abs() / true.sqrt()).max() > 0.05
    assert ((stats.full_mean().double().view(-1) - true_mean).abs() / true.sqrt()).max() > 0.05
    centred = (x - stats.mean - stats.residual).double()
    assert ((centred.mean(0) - 0).abs() / true.sqrt()).max() < 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_non_finite_batch_leaves_running_stats_untouched(bad, momentum):
    bn = bnn.BatchNorm1d(3, momentum=momentum)
    bn(torch.randn(8, 3))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(8, 3)
    x[2, 1] = bad
    bn(x)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    bn(torch.randn(8, 3))  # and a good batch after it still counts
    assert bn.num_batches_tracked.item() == 2
    assert torch.isfinite(bn.running_var).all()


def test_bnlab_differs_from_torch_on_non_finite_batch():
    """torch's layer is poisoned by the same batch (pytorch#88474): the fix is real."""
    x = torch.randn(8, 3)
    x[0, 0] = float("nan")
    t = torch.nn.BatchNorm1d(3)
    t(x)
    assert not torch.isfinite(t.running_mean).all()


@pytest.mark.parametrize("training", [True, False])
def test_torch_compile(training):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8, bias=False), bnn.BatchNorm1d(8), torch.nn.ReLU())
    ref = torch.nn.Sequential(torch.nn.Linear(5, 8, bias=False), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model)
    model.train(training), ref.train(training)
    for _ in range(3):
        x = torch.randn(16, 5, generator=gen)
        y, yr = compiled(x), ref(x)
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
        if training:
            y.square().sum().backward()
            yr.square().sum().backward()
            torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(model[1].weight.grad, ref[1].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)
    assert model[1].num_batches_tracked.item() == ref[1].num_batches_tracked.item()
    explained = torch._dynamo.explain(model)(torch.randn(16, 5, generator=gen))
    assert explained.graph_break_count == 0, explained.break_reasons
