"""bnlab.nn against float64 torch.nn.BatchNorm*d and an independent NumPy oracle."""

import numpy as np
import pytest
import torch

import bnlab.nn as bnn
from bnlab.nn.modules import TORCH_HAS_BIAS_FLAG

CASES = [
    (bnn.BatchNorm1d, torch.nn.BatchNorm1d, (16, 7)),
    (bnn.BatchNorm1d, torch.nn.BatchNorm1d, (5, 7, 9)),
    (bnn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 7, 5, 3)),
    (bnn.BatchNorm2d, torch.nn.BatchNorm2d, (2, 7, 1, 2)),
    (bnn.BatchNorm3d, torch.nn.BatchNorm3d, (3, 7, 2, 3, 4)),
]
OPTIONS = [
    dict(),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(momentum=None),
    dict(momentum=0.3, eps=1e-3),
    dict(affine=False, track_running_stats=False),
] + ([dict(bias=False)] if TORCH_HAS_BIAS_FLAG else [])


def _pair(ours, theirs, **kw):
    a = ours(7, dtype=torch.float64, **kw)
    b = theirs(7, dtype=torch.float64, **kw)
    if a.affine:  # non-trivial parameters, identical in both
        with torch.no_grad():
            for m in (a, b):
                m.weight.copy_(torch.linspace(0.5, 2.0, 7, dtype=torch.float64))
                if m.bias is not None:
                    m.bias.copy_(torch.linspace(-1.0, 1.0, 7, dtype=torch.float64))
    return a, b


def _close(x, y):
    torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-11)


# channels_last exists for 4D and 5D tensors only
LAYOUTS = [(*case, False) for case in CASES] + [(*case, True) for case in CASES if len(case[2]) in (4, 5)]


@pytest.mark.parametrize("ours,theirs,shape,channels_last", LAYOUTS)
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_matches_torch_over_several_steps(ours, theirs, shape, kw, channels_last):
    gen = torch.Generator().manual_seed(len(shape) * 31 + len(kw))
    a, b = _pair(ours, theirs, **kw)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    params_a = [p for p in (a.weight, a.bias) if p is not None]
    params_b = [p for p in (b.weight, b.bias) if p is not None]
    for step in range(4):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 + step
        if channels_last:
            x = x.contiguous(memory_format=fmt)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        _close(ya, yb)
        if channels_last:
            assert ya.is_contiguous(memory_format=fmt)
        grad = torch.randn(*shape, generator=gen, dtype=torch.float64)
        ga = torch.autograd.grad(ya, [xa] + params_a, grad)
        gb = torch.autograd.grad(yb, [xb] + params_b, grad)
        for u, v in zip(ga, gb):
            _close(u, v)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            u, v = getattr(a, name), getattr(b, name)
            assert (u is None) == (v is None)
            if u is not None:
                _close(u, v)
    a.eval(), b.eval()
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    _close(a(x), b(x))


def numpy_batch_norm(x, gamma, beta, eps):
    """Algorithm 1 of Ioffe & Szegedy, in float64 NumPy, channel axis 1."""
    axes = tuple(d for d in range(x.ndim) if d != 1)
    shape = [1, -1] + [1] * (x.ndim - 2)
    m = x.size // x.shape[1]
    mu = x.sum(axis=axes) / m
    var = ((x - mu.reshape(shape)) ** 2).sum(axis=axes) / m
    x_hat = (x - mu.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return gamma.reshape(shape) * x_hat + beta.reshape(shape), mu, var


def numpy_backward(x, gamma, dy, eps):
    """The staged backward of the computational graph, one node at a time (CS231n style)."""
    axes = tuple(d for d in range(x.ndim) if d != 1)
    shape = [1, -1] + [1] * (x.ndim - 2)
    m = x.size // x.shape[1]
    mu = x.mean(axis=axes, keepdims=True)
    xc = x - mu
    var = (xc ** 2).mean(axis=axes, keepdims=True)
    std = np.sqrt(var + eps)
    x_hat = xc / std
    dgamma = (dy * x_hat).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    dx_hat = dy * gamma.reshape(shape)
    dxc = dx_hat / std
    dstd = -(dx_hat * xc).sum(axis=axes, keepdims=True) / std ** 2
    dvar = dstd / (2 * std)
    dxc += 2 * xc * dvar / m
    dmu = -dxc.sum(axis=axes, keepdims=True)
    return dxc + dmu / m, dgamma, dbeta


@pytest.mark.parametrize("ours,shape", [(c[0], c[2]) for c in CASES])
def test_matches_numpy_oracle(ours, shape):
    rng = np.random.default_rng(7)
    x = 5 * rng.standard_normal(shape) + 12  # CS231n's check: offset and scale
    gamma, beta = rng.standard_normal(7), rng.standard_normal(7)
    dy = rng.standard_normal(shape)
    bn = ours(7, momentum=0.25, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
    xt = torch.from_numpy(x).requires_grad_()
    y = bn(xt)
    y.backward(torch.from_numpy(dy))
    y_ref, mu, var = numpy_batch_norm(x, gamma, beta, 1e-5)
    dx, dgamma, dbeta = numpy_backward(x, gamma, dy, 1e-5)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(xt.grad.numpy(), dx, rtol=1e-8, atol=1e-11)
    np.testing.assert_allclose(bn.weight.grad.numpy(), dgamma, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(bn.bias.grad.numpy(), dbeta, rtol=1e-10, atol=1e-11)
    m = x.size // 7
    np.testing.assert_allclose(bn.running_mean.numpy(), 0.25 * mu, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), 0.75 + 0.25 * var * m / (m - 1), rtol=1e-12)


def test_moving_average_closed_form():
    """After k batches with momentum a, running = (1-a)^k r0 + sum_j a (1-a)^(k-1-j) b_j."""
    gen = torch.Generator().manual_seed(3)
    bn = bnn.BatchNorm1d(4, momentum=0.2, dtype=torch.float64)
    batches = [torch.randn(10, 4, generator=gen, dtype=torch.float64) * (j + 1) for j in range(5)]
    for x in batches:
        bn(x)
    k, a = len(batches), 0.2
    expect_mean = sum(a * (1 - a) ** (k - 1 - j) * x.mean(0) for j, x in enumerate(batches))
    expect_var = (1 - a) ** k + sum(a * (1 - a) ** (k - 1 - j) * x.var(0, unbiased=True)
                                    for j, x in enumerate(batches))
    _close(bn.running_mean, expect_mean)
    _close(bn.running_var, expect_var)
    # momentum=None: the plain average of the batch statistics
    cum = bnn.BatchNorm1d(4, momentum=None, dtype=torch.float64)
    for x in batches:
        cum(x)
    _close(cum.running_mean, torch.stack([x.mean(0) for x in batches]).mean(0))
    assert cum.num_batches_tracked.item() == k


def test_normalized_output_has_zero_mean_unit_variance():
    x = torch.randn(256, 6, 4, 4, dtype=torch.float64) * torch.arange(1, 7).view(1, 6, 1, 1) + 40
    y = bnn.BatchNorm2d(6, affine=False, dtype=torch.float64)(x)
    _close(y.mean(dim=(0, 2, 3)), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(y.var(dim=(0, 2, 3), unbiased=False),
                               torch.ones(6, dtype=torch.float64), rtol=1e-4, atol=0)


def test_running_statistics_never_receive_gradients():
    bn = bnn.BatchNorm1d(3)
    y = bn(torch.randn(8, 3, requires_grad=True))
    y.sum().backward()
    assert not bn.running_mean.requires_grad and bn.running_mean.grad is None
    assert y.grad_fn is not None and bn.running_var.grad_fn is None


def test_state_dict_round_trip_both_ways():
    torch.manual_seed(0)
    for ours, theirs, shape in CASES:
        for kw in OPTIONS:
            t = theirs(7, **kw)
            t(torch.randn(*shape))  # non-default buffers
            if t.affine:
                with torch.no_grad():
                    for p in t.parameters():
                        p.uniform_()
            b = ours(7, **kw)
            assert list(b.state_dict()) == list(t.state_dict())
            b.load_state_dict(t.state_dict())
            back = theirs(7, **kw)
            back.load_state_dict(b.state_dict())
            for k, v in t.state_dict().items():
                assert torch.equal(b.state_dict()[k], v) and torch.equal(back.state_dict()[k], v)
            assert repr(b).split("(", 1)[1] == repr(t).split("(", 1)[1]
            assert [n for n, _ in b.named_parameters()] == [n for n, _ in t.named_parameters()]


def test_legacy_state_dict_without_num_batches_tracked_loads():
    sd = torch.nn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    bn = bnn.BatchNorm1d(3)
    bn.load_state_dict(sd)
    assert bn.num_batches_tracked.item() == 0


def test_defaults_match_torch_signature():
    import inspect
    for ours, theirs in [(bnn.BatchNorm1d, torch.nn.BatchNorm1d), (bnn.BatchNorm2d, torch.nn.BatchNorm2d),
                         (bnn.BatchNorm3d, torch.nn.BatchNorm3d)]:
        sig_a, sig_b = inspect.signature(ours), inspect.signature(theirs)
        a = [(p.name, p.default, p.kind) for p in sig_a.parameters.values()]
        b = [(p.name, p.default, p.kind) for p in sig_b.parameters.values()]
        if "bias" not in sig_b.parameters:  # torch before the keyword-only bias flag
            a = [t for t in a if t[0] != "bias"]
        assert a == b


@pytest.mark.parametrize("make", [bnn.BatchNorm1d, torch.nn.BatchNorm1d])
def test_state_without_counter_or_version_keeps_the_module_count(make):
    """A filtered state dict (a plain dict: no version metadata) without num_batches_tracked
    leaves the module's own count, as torch does; momentum=None averages depend on it."""
    bn = make(3, momentum=None)
    for _ in range(5):
        bn(torch.randn(8, 3))
    sd = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    bn.load_state_dict(sd, strict=False)
    assert bn.num_batches_tracked.item() == 5


@pytest.mark.parametrize("make", [bnn.BatchNorm1d, torch.nn.BatchNorm1d])
def test_eps_zero_is_refused_where_batch_statistics_normalize(make):
    bn = make(3, eps=0)
    with pytest.raises(ValueError, match="eps must be positive during training, but got 0"):
        bn(torch.randn(4, 3))
    bn.eval()
    assert bn(torch.randn(4, 3)).shape == (4, 3)  # running statistics: no division by zero


def test_an_empty_training_batch_is_not_counted():
    """A deliberate difference (README): torch counts an empty batch, bnlab does not."""
    ours, theirs = bnn.BatchNorm2d(3, momentum=None), torch.nn.BatchNorm2d(3, momentum=None)
    for bn in (ours, theirs):
        x = torch.randn(0, 3, 4, 4, requires_grad=True)
        bn(x).sum().backward()
        assert x.grad.shape == x.shape
    assert ours.num_batches_tracked.item() == 0 and theirs.num_batches_tracked.item() == 1
    assert torch.equal(ours.running_mean, torch.zeros(3))
    assert torch.equal(ours.running_var, torch.ones(3))


def test_layers_are_found_by_torch_types():
    """Scripts find BN layers by type to exclude them from weight decay, freeze or convert
    them; bnlab's layers must be found the same way."""
    from torch.nn.modules.batchnorm import _BatchNorm

    for ours, theirs in [(bnn.BatchNorm1d(3), torch.nn.BatchNorm1d), (bnn.BatchNorm2d(3), torch.nn.BatchNorm2d),
                         (bnn.BatchNorm3d(3), torch.nn.BatchNorm3d)]:
        assert isinstance(ours, theirs) and isinstance(ours, _BatchNorm)
    assert isinstance(bnn.GhostBatchNorm(3, 2), _BatchNorm)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), bnn.BatchNorm1d(3))
    no_decay = [p for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters()]
    assert len(no_decay) == 2


@pytest.mark.parametrize("track", [False])
def test_func_grad_and_vmap_in_training_match_torch(track):
    """torch.func transforms in training mode, where torch's layer supports them (without
    tracked statistics: an in-place update of a captured buffer is refused by torch.func)."""
    from torch.func import grad, vmap

    torch.manual_seed(0)
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    ours = bnn.BatchNorm1d(4, track_running_stats=track, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(4, track_running_stats=track, dtype=torch.float64)
    loss = lambda m: (lambda v: (m(v) ** 3).sum())  # noqa: E731
    torch.testing.assert_close(grad(loss(ours))(x[0]), grad(loss(ref))(x[0]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vmap(ours)(x), torch.stack([ref(v) for v in x]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vmap(grad(loss(ours)))(x), torch.stack([grad(loss(ref))(v) for v in x]),
                               rtol=1e-10, atol=1e-10)


def test_fx_keeps_the_layer_as_one_module_call():
    """FX-based tools (quantization, fusion) see a bnlab BN as torch's: one call_module node
    that runs bnlab's forward; pickling still finds bnlab's class."""
    import pickle

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnn.BatchNorm2d(4), torch.nn.ReLU())
    gm = torch.fx.symbolic_trace(model)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module",
                                              "call_module", "output"]
    assert gm.get_submodule("1") is model[1]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x))
    assert type(pickle.loads(pickle.dumps(model[1]))) is bnn.BatchNorm2d


@pytest.mark.parametrize("make,shape", [(bnn.BatchNorm1d, (6, 3)), (bnn.BatchNorm2d, (2, 3, 4, 4)),
                                        (bnn.BatchNorm3d, (2, 3, 2, 3, 3))])
def test_torchscript_matches_eager_and_saves(make, shape, tmp_path):
    torch.manual_seed(0)
    eager, scripted = make(3, dtype=torch.float64), torch.jit.script(make(3, dtype=torch.float64))
    x = torch.randn(shape, dtype=torch.float64) * 3 + 5
    for _ in range(2):  # training: batch statistics and the running update
        torch.testing.assert_close(scripted(x), eager(x), rtol=1e-10, atol=1e-10)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(scripted, name), getattr(eager, name))
    scripted.eval(), eager.eval()
    torch.testing.assert_close(scripted(x), eager(x), rtol=1e-10, atol=1e-10)
    torch.jit.save(scripted, tmp_path / "bn.pt")
    torch.testing.assert_close(torch.jit.load(tmp_path / "bn.pt")(x), eager(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5, 5)])
def test_forward_mode_ad_in_training_matches_torch(shape):
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp

    torch.manual_seed(0)
    make = {2: (bnn.BatchNorm1d, torch.nn.BatchNorm1d), 4: (bnn.BatchNorm2d, torch.nn.BatchNorm2d)}[len(shape)]
    ours, ref = (cls(3, dtype=torch.float64) for cls in make)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            m.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    x, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    with fwAD.dual_level():  # running statistics update too
        got = fwAD.unpack_dual(ours(fwAD.make_dual(x, t))).tangent
        want = fwAD.unpack_dual(ref(fwAD.make_dual(x, t))).tangent
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-10, atol=1e-12)
    plain = [cls(3, dtype=torch.float64, track_running_stats=False) for cls in make]
    torch.testing.assert_close(jvp(plain[0], (x,), (t,))[1], jvp(plain[1], (x,), (t,))[1],
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_vmap_over_stacked_models_updates_each_models_running_statistics(momentum):
    """Batched multi-model training (torch.func.stack_module_state + functional_call under
    vmap): every model's running statistics update exactly as if it ran alone."""
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 3), bnn.BatchNorm1d(3, momentum=momentum))
              for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    for _ in range(3):
        x = torch.randn(3, 8, 4)
        y = vmap(lambda p, b, xi: functional_call(base, (p, b), (xi,)))(params, buffers, x)
        alone = torch.stack([m(xi) for m, xi in zip(models, x)])
        torch.testing.assert_close(y, alone, rtol=0, atol=1e-6)
    for name, stacked in buffers.items():
        for i, m in enumerate(models):
            torch.testing.assert_close(stacked[i], m.state_dict()[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_transforms_and_export_in_train_and_eval(training):
    """grad, vmap and jvp from torch.func, torch.fx and torch.export, in both modes, agree
    with torch's layer (training without tracked statistics, as torch.func requires)."""
    from torch.func import grad, jvp, vmap

    torch.manual_seed(0)
    ours = bnn.BatchNorm1d(4, dtype=torch.float64, track_running_stats=not training).train(training)
    ref = torch.nn.BatchNorm1d(4, dtype=torch.float64, track_running_stats=not training).train(training)
    if not training:
        with torch.no_grad():
            for m in (ours, ref):
                m.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
                m.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 2.0]))
    x, t = torch.randn(3, 6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # noqa: E731
    loss = lambda m: (lambda v: (m(v) ** 3).sum())  # noqa: E731
    close(grad(loss(ours))(x[0]), grad(loss(ref))(x[0]))
    close(vmap(ours)(x), vmap(ref)(x))
    close(jvp(ours, (x[0],), (t,))[1], jvp(ref, (x[0],), (t,))[1])
    close(torch.fx.symbolic_trace(torch.nn.Sequential(ours))(x[0]), ref(x[0]))
    exported = torch.export.export(torch.nn.Sequential(ours), (x[0],)).module()
    close(exported(x[0]), ref(x[0]))
