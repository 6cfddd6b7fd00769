"""PyTorch's generic module tests (``test/test_modules.py``, class ``TestModule``), ported for
the BatchNorm1d/2d/3d entries of ``module_db`` in ``torch/testing/_internal/common_modules.py``.

Each test runs on bnlab's layer, one item per parameter set, and on torch's (which proves the
port) all at once in ``test_port_on_torch``, marked ``port``. The inputs are those of
``module_inputs_torch_nn_BatchNorm1d/2d/3d`` and ``module_error_inputs_torch_nn_BatchNorm1d_2d_3d``
(torch 2.13): the same constructor arguments and input shapes, with values from
``torch.testing.make_tensor`` (uniform in [-9, 9]). The ModuleInfo entries set
``train_and_eval_differ=True`` (so every test runs in train and in eval mode),
``dtypes=floating_types()`` (float32, float64) and ``module_memformat_affects_out=False``.

Not ported, because they need CUDA: ``test_multiple_device_transfer`` and
``test_cpu_gpu_parity``. ``test_check_inplace`` does not apply (BatchNorm has no ``inplace``).
"""

from __future__ import annotations

import copy
import inspect
import io
import itertools

import pytest
import torch
from torch.testing import make_tensor

import bnlab.nn
from conftest import ported_tests, run_ported_on_torch

IMPLS = {"torch": torch.nn, "bnlab": bnlab.nn}
KINDS = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
DTYPES = [torch.float32, torch.float64]
TRAINING = [True, False]

# TestModule sets precision = rel_tol = 1e-5; TestCase.assertEqual uses max(dtype default, those).
TOL = {"rtol": 1e-5, "atol": 1e-5}

TORCH_HAS_BIAS_FLAG = "bias" in inspect.signature(torch.nn.BatchNorm1d.__init__).parameters


def module_inputs(kind, dtype, requires_grad=False, device="cpu"):
    """(desc, constructor args, constructor kwargs, forward input) as in
    module_inputs_torch_nn_BatchNorm{1,2,3}d."""
    def mk(*shape):
        return make_tensor(shape, device=device, dtype=dtype, requires_grad=requires_grad)

    if kind == "BatchNorm1d":
        cases = [
            ("affine", (10,), {}, (4, 10)),
            ("3d_input", (5,), {}, (4, 5, 3)),
            ("affine_simple_average", (10, 1e-3, None), {}, (4, 10)),
            ("not_affine", (10, 1e-3, 0.3, False), {}, (4, 10)),
            ("not_tracking_stats", (10, 1e-3, 0.3, True, False), {}, (4, 10)),
            ("3d_input_not_affine", (5, 1e-3, 0.3, False), {}, (4, 5, 3)),
            ("zero_batch", (5, 1e-3, 0.3, False), {}, (0, 5, 9)),
            ("affine_not_bias", (10,), {"bias": False}, (4, 10)),
        ]
    elif kind == "BatchNorm2d":
        cases = [
            ("", (3,), {}, (2, 3, 6, 6)),
            ("2d_simple_average", (3, 1e-3, None), {}, (2, 3, 6, 6)),
            ("momentum", (3, 1e-3, 0.8), {}, (2, 3, 6, 6)),
            ("not_affine", (3, 1e-3, 0.8, False), {}, (2, 3, 6, 6)),
            ("not_tracking_stats", (3, 1e-3, 0.8, True, False), {}, (2, 3, 6, 6)),
            ("zero_batch", (5, 1e-3, 0.3, False), {}, (0, 5, 2, 2)),
            ("affine_not_bias", (3,), {"bias": False}, (2, 3, 6, 6)),
        ]
    else:
        cases = [
            ("", (3,), {}, (2, 3, 4, 4, 4)),
            ("3d_simple_average", (3, 1e-3, None), {}, (2, 3, 4, 4, 4)),
            ("momentum", (3, 1e-3, 0.7), {}, (2, 3, 4, 4, 4)),
            ("not_affine", (3, 1e-3, 0.7, False), {}, (2, 3, 4, 4, 4)),
            ("not_tracking_stats", (3, 1e-3, 0.7, True, False), {}, (2, 3, 4, 4, 4)),
            ("zero_batch", (5, 1e-3, 0.3, False), {}, (0, 5, 2, 2, 2)),
            ("affine_not_bias", (3,), {"bias": False}, (2, 3, 4, 4, 4)),
        ]
    if not TORCH_HAS_BIAS_FLAG:  # the bias= flag (and these inputs) arrived with torch 2.13
        cases = [c for c in cases if "bias" not in c[2]]
    return [(desc, args, dict(kwargs), mk(*shape)) for desc, args, kwargs, shape in cases]


def module_cls(lib, kind):
    return getattr(IMPLS[lib], kind)


# One pytest item per (layer, input), so that a failing input does not hide the ones after it.
CASES = [f"{kind}-{desc or 'default'}" for kind in KINDS
         for desc, *_ in module_inputs(kind, torch.float32)]


def case_inputs(case, dtype, requires_grad=False):
    """(kind, [the one input of module_inputs(kind) named by case])."""
    kind, name = case.split("-", 1)
    found = [c for c in module_inputs(kind, dtype, requires_grad)
             if (c[0] or "default") == name]
    assert len(found) == 1, case
    return kind, found


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_params_and_buffers_are(m, device, dtype):
    # TestModule._assert_module_parameters_and_buffer_are
    device = torch.device(device)
    for what, items in (("Parameter", m.named_parameters()), ("Buffer", m.named_buffers())):
        for name, t in items:
            assert t.device == device, f"{what} {name} is on {t.device}, expected {device}"
            if t.dtype.is_floating_point:
                assert t.dtype == dtype, f"{what} {name} is {t.dtype}, expected {dtype}"


def over(*names: str):
    """Parametrize a test over the named axes, in this order: case, training, dtype (``lib`` is
    conftest's fixture: bnlab here, torch in ``test_port_on_torch``)."""
    values = {"case": CASES, "training": TRAINING, "dtype": DTYPES}

    def decorate(test):
        for name in reversed(names):
            test = pytest.mark.parametrize(name, values[name])(test)
        return test
    return decorate


def build(lib, kind, args, kwargs, dtype, training):
    m = module_cls(lib, kind)(*args, **kwargs)
    m.to("cpu").to(dtype)
    m.train(training)
    return m


# --- test_forward ---------------------------------------------------------------------------
@over("case", "training", "dtype")
def test_forward(lib, case, training, dtype):
    """Port of TestModule.test_forward (no reference_fn for BatchNorm inputs): forward runs,
    then .float()/.double() keeps parameters and buffers on the device in the dtype."""
    kind, inputs = case_inputs(case, dtype)
    for desc, args, kwargs, x in inputs:
        m = build(lib, kind, args, kwargs, dtype, training)
        out = m(x)
        assert out.shape == x.shape and out.dtype == dtype, desc
        {torch.float32: m.float, torch.float64: m.double}[dtype]()
        m(x)
        assert_params_and_buffers_are(m, "cpu", dtype)


# --- test_factory_kwargs --------------------------------------------------------------------
@over("case", "training", "dtype")
def test_factory_kwargs(lib, case, training, dtype):
    """Port of TestModule.test_factory_kwargs: device=/dtype= reach every created parameter and
    buffer. (Upstream first checks with mocks that the module creates parameters or buffers;
    every BatchNorm input does, asserted directly here.)"""
    kind, inputs = case_inputs(case, dtype)
    for desc, args, kwargs, _ in inputs:
        m = module_cls(lib, kind)(*args, **kwargs)
        m.train(training)
        assert list(m.parameters()) or list(m.buffers()), desc
        m = module_cls(lib, kind)(*args, **kwargs, device="cpu", dtype=dtype)
        m.train(training)
        assert_params_and_buffers_are(m, "cpu", dtype)


# --- test_repr ------------------------------------------------------------------------------
@over("case", "training", "dtype")
def test_repr(lib, case, training, dtype):
    """Port of TestModule.test_repr: repr() and str() do not raise. (Added: bnlab's repr equals
    torch's for the same constructor arguments, its documented drop-in promise.)"""
    kind, inputs = case_inputs(case, dtype)
    for desc, args, kwargs, _ in inputs:
        m = build(lib, kind, args, kwargs, dtype, training)
        m.__repr__()
        str(m)
        ref = build("torch", kind, args, kwargs, dtype, training)
        assert repr(m) == repr(ref), desc


# --- test_pickle ----------------------------------------------------------------------------
@over("case", "training", "dtype")
def test_pickle(lib, case, training, dtype):
    """Port of TestModule.test_pickle: torch.save/torch.load of the whole module, and the copy
    gives the same output. (torch.load needs weights_only=False for a whole module.)"""
    kind, inputs = case_inputs(case, dtype)
    for desc, args, kwargs, x in inputs:
        m = build(lib, kind, args, kwargs, dtype, training)
        out = m(x)
        f = io.BytesIO()
        torch.save(m, f)
        f.seek(0)
        m_copy = torch.load(f, weights_only=False)
        assert type(m_copy) is type(m), desc
        torch.testing.assert_close(m_copy(x), out, **TOL, msg=desc)


# --- test_non_contiguous_tensors ------------------------------------------------------------
def _non_contiguous(t):
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    out.requires_grad = t.requires_grad
    return out


@over("case", "training", "dtype")
def test_non_contiguous_tensors(lib, case, training, dtype):
    """Port of TestModule.test_non_contiguous_tensors: contiguous and non-contiguous inputs and
    output gradients (every combination) give the same output and gradients; input gradients to
    atol=1e-4."""
    kind, inputs = case_inputs(case, dtype, requires_grad=True)
    for desc, args, kwargs, x in inputs:
        m = build(lib, kind, args, kwargs, dtype, training)
        params = list(m.parameters())
        x.retain_grad()
        default_out = m(x)
        g = default_out.clone().detach_().normal_()
        default_out.backward(g, retain_graph=True)
        default_x_grad = copy.deepcopy(x.grad)
        default_p_grad = [copy.deepcopy(p.grad) for p in params]

        nc_x, nc_g = _non_contiguous(x), _non_contiguous(g)
        if x.numel() > 0:
            assert not nc_x.is_contiguous()
        for xin, gout in itertools.product([x, nc_x], [g, nc_g]):
            xin.grad = None
            for p in params:
                p.grad = None
            out = m(xin)
            out.backward(copy.deepcopy(gout), retain_graph=True)
            torch.testing.assert_close(out, default_out, **TOL, msg=desc)
            torch.testing.assert_close(xin.grad, default_x_grad, atol=1e-4, rtol=1e-5, msg=desc)
            for p, dp in zip(params, default_p_grad):
                torch.testing.assert_close(p.grad, dp, **TOL, msg=desc)


# --- test_grad / test_gradgrad --------------------------------------------------------------
def _check_gradients(lib, case, training, check):
    """TestModule._test_gradients_helper in float64: the total derivative over (input, *params),
    then each parameter's partial derivative alone (with the input). The upstream wrappers of
    gradcheck/gradgradcheck (common_utils) set check_batched_grad=True and fast_mode=True."""
    dtype = torch.float64
    kind, inputs = case_inputs(case, dtype, requires_grad=True)
    for desc, args, kwargs, x in inputs:
        m = build(lib, kind, args, kwargs, dtype, training)
        params = tuple(m.parameters())

        def fn(x, *_params):  # the parameters are the module's own: gradcheck perturbs them
            return m(x)

        flat = (x,) + params
        assert check(fn, flat, check_batched_grad=True, fast_mode=True), desc
        old = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad = False
        for p, was in zip(params, old):
            p.requires_grad = was
            assert check(fn, (x,) + params, check_batched_grad=True, fast_mode=True), desc
            p.requires_grad = False


# Under pytest's warning capture, torch's layer through gradcheck/gradgradcheck with
# check_batched_grad=True runs about ten times slower (measured: 50 s instead of 4 s for these
# items, torch 2.13 CPU), though no warning reaches the report. Ignoring warnings in these two
# tests keeps the file fast and changes no check.
_QUIET_VMAP_FALLBACK = pytest.mark.filterwarnings("ignore")


@over("case", "training")
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck],
                         ids=["grad", "gradgrad"])
@_QUIET_VMAP_FALLBACK
def test_grad_and_gradgrad(lib, case, training, check):
    """Ports of TestModule.test_grad and test_gradgrad (allowed_dtypes=[torch.double];
    supports_gradgrad=True for BatchNorm)."""
    _check_gradients(lib, case, training, check)


# --- test_memory_format ---------------------------------------------------------------------
@over("case", "training", "dtype")
def test_memory_format(lib, case, training, dtype):
    """Port of TestModule.test_memory_format: for 4D inputs channels_last, for 5D
    channels_last_3d, else contiguous only; every (input format, module format) gives the
    (contiguous, contiguous) output and, in training, the same gradients (input and
    parameters, one fixed rand_like output gradient); the output and the gradients keep the
    input's format (module_memformat_affects_out=False). Default tolerances (CPU)."""
    kind, inputs = case_inputs(case, dtype, requires_grad=True)
    for desc, args, kwargs, x in inputs:
        if x.dim() == 4:
            in_fmts = [torch.contiguous_format, torch.channels_last]
            mod_fmts = [torch.preserve_format, torch.contiguous_format, torch.channels_last]
        elif x.dim() == 5:
            in_fmts = [torch.contiguous_format, torch.channels_last_3d]
            mod_fmts = [torch.preserve_format, torch.contiguous_format, torch.channels_last_3d]
        else:
            in_fmts = [torch.contiguous_format]
            mod_fmts = [torch.preserve_format, torch.contiguous_format]

        m = build(lib, kind, args, kwargs, dtype, training)
        desired = m(x)
        params = tuple(m.parameters())
        if training:
            ref_gy = torch.rand_like(desired)
            ref_grads = torch.autograd.grad(desired, (x,) + params, grad_outputs=ref_gy)

        def check_fmt(t, in_fmt, what):
            msg = f"{desc}: {what} (shape {tuple(t.shape)}, strides {t.stride()}) is not {in_fmt}"
            if t.dim() == 4 and in_fmt == torch.channels_last:
                assert t.is_contiguous(memory_format=torch.channels_last), msg
            elif t.dim() == 5 and in_fmt == torch.channels_last_3d:
                assert t.is_contiguous(memory_format=torch.channels_last_3d), msg
            else:
                assert t.is_contiguous(), msg

        for in_fmt in in_fmts:
            if (in_fmt == torch.channels_last and x.dim() == 4) or \
                    (in_fmt == torch.channels_last_3d and x.dim() == 5):
                xi = x.clone().to(memory_format=in_fmt).detach().requires_grad_(True)
            else:
                xi = x.clone().detach().requires_grad_(True)
            for mod_fmt in mod_fmts:
                m.to(memory_format=mod_fmt)
                out = m(xi)
                if in_fmt != torch.contiguous_format or mod_fmt != torch.contiguous_format:
                    torch.testing.assert_close(out, desired, msg=desc)
                check_fmt(out, in_fmt, "output")
                if training:
                    params = tuple(m.parameters())
                    gy = torch.empty_like(out).copy_(ref_gy)
                    grads = torch.autograd.grad(out, (xi,) + params, grad_outputs=gy)
                    if in_fmt != torch.contiguous_format or mod_fmt != torch.contiguous_format:
                        torch.testing.assert_close(grads, ref_grads, msg=desc)
                    names = ["input grad"] + [f"{n} grad" for n, _ in m.named_parameters()]
                    for what, t in zip(names, grads):
                        check_fmt(t, in_fmt, what)


# --- test_if_train_and_eval_modes_differ ----------------------------------------------------
@over("case", "dtype")
def test_if_train_and_eval_modes_differ(lib, case, dtype):
    """Port of TestModule.test_if_train_and_eval_modes_differ (train_only): with the
    ``training`` attribute deleted, forward either works or raises an AttributeError naming
    'training'; the latter is what train_and_eval_differ=True records. (Added: that it does
    read the flag, and that the two modes give different outputs where running statistics
    are tracked.)"""
    kind, inputs = case_inputs(case, dtype)
    for desc, args, kwargs, x in inputs:
        m = build(lib, kind, args, kwargs, dtype, True)
        delattr(m, "training")
        with pytest.raises(AttributeError, match="'training'"):
            m(x)
        m = build(lib, kind, args, kwargs, dtype, True)
        if m.track_running_stats and x.numel() > 0:
            y_train = m(x)
            m.eval()
            assert not torch.allclose(m(x), y_train), desc


# --- test_device_ctx_init -------------------------------------------------------------------
@over("case", "training", "dtype")
def test_device_ctx_init(lib, case, training, dtype):
    """Port of TestModule.test_device_ctx_init (onlyCPU): a module built under
    ``with torch.device('meta')`` has meta parameters and buffers with the CPU module's metadata
    (shape, dtype, stride, requires_grad; upstream: assert_metadata_eq)."""
    kind, inputs = case_inputs(case, dtype)
    for desc, args, kwargs, _ in inputs:
        m_cpu = module_cls(lib, kind)(*args, **kwargs)
        with torch.device("meta"):
            m = module_cls(lib, kind)(*args, **kwargs)
        pairs = (list(zip(m.parameters(), m_cpu.parameters()))
                 + list(zip(m.buffers(), m_cpu.buffers())))
        assert len(pairs) == len(list(m_cpu.parameters())) + len(list(m_cpu.buffers())), desc
        for p_meta, p_cpu in pairs:
            assert p_meta.is_meta, desc
            assert (p_meta.shape, p_meta.dtype, p_meta.stride(), p_meta.requires_grad) == \
                (p_cpu.shape, p_cpu.dtype, p_cpu.stride(), p_cpu.requires_grad), desc


# --- test_to / test_to_empty ----------------------------------------------------------------
class _swap_on_conversion:
    """What upstream's wrapSwapTensorsTest does: set the global flag, restore it after."""

    def __init__(self, swap):
        self.swap = swap

    def __enter__(self):
        self.old = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(self.swap)

    def __exit__(self, *exc):
        torch.__future__.set_swap_module_params_on_conversion(self.old)


@over("case", "training")
@pytest.mark.parametrize("swap", [True, False])
@pytest.mark.parametrize("set_grad", [True, False])
def test_to(lib, case, training, swap, set_grad):
    """Port of TestModule.test_to (allowed_dtypes=[float32], CPU only here): ``m.to(dtype)``
    keeps Parameters, moves .grad along, and swaps (swap=True: same ids, new _cdata) or sets
    .data in place (swap=False: same ids and _cdata)."""
    dtype = torch.float32
    with _swap_on_conversion(swap):
        kind, inputs = case_inputs(case, dtype)
        for desc, args, kwargs, x in inputs:
            m = module_cls(lib, kind)(*args, **kwargs)
            # upstream sets parameters and buffers by hand, not with .to(), which is under test
            for n, p in list(m.named_parameters(recurse=False)):
                new_p = torch.nn.Parameter(p.detach().clone().to("cpu", dtype))
                setattr(m, n, new_p)
                if set_grad:
                    new_p.grad = torch.randn_like(new_p)
            for n, b in list(m.named_buffers(recurse=False)):
                setattr(m, n, b.detach().clone().to("cpu", dtype))
            has_params = len(list(m.parameters())) > 0
            if swap and not set_grad and has_params:
                m(x).sum().backward()
                m.to(dtype=torch.half)
                m.to(dtype=torch.float32)
            prev = dtype
            for dtype_ in DTYPES:
                g_no_swap = dtype_ == prev
                prev = dtype_
                ids = [id(p) for p in m.parameters()]
                cdatas = [p._cdata for p in m.parameters()]
                if set_grad:
                    g_ids = [id(p.grad) for p in m.parameters()]
                    g_cdatas = [p.grad._cdata for p in m.parameters()]
                m.to(device="cpu", dtype=dtype_)
                assert all(isinstance(p, torch.nn.Parameter) for p in m.parameters()), desc
                assert all(p.device.type == "cpu" and p.dtype == dtype_
                           for p in m.parameters()), desc
                ids_after = [id(p) for p in m.parameters()]
                cdatas_after = [p._cdata for p in m.parameters()]
                if set_grad:
                    assert all(p.grad.dtype == dtype_ for p in m.parameters()), desc
                    g_ids_after = [id(p.grad) for p in m.parameters()]
                    g_cdatas_after = [p.grad._cdata for p in m.parameters()]
                if swap:
                    assert ids == ids_after, desc
                    assert all(a != b for a, b in zip(cdatas, cdatas_after)), desc
                    if set_grad:
                        assert all((a == b) if g_no_swap else (a != b)
                                   for a, b in zip(g_cdatas, g_cdatas_after)), desc
                else:
                    assert ids == ids_after and cdatas == cdatas_after, desc
                    if set_grad:
                        assert g_ids == g_ids_after and g_cdatas == g_cdatas_after, desc


@over("case", "training")
@pytest.mark.parametrize("swap", [True, False])
def test_to_empty(lib, case, training, swap):
    """Port of TestModule.test_to_empty (float32): a module built on meta moves to CPU with
    to_empty(); parameters stay Parameters with the device and dtype; swap=True keeps ids,
    swap=False replaces them."""
    dtype = torch.float32
    with _swap_on_conversion(swap):
        kind, inputs = case_inputs(case, dtype)
        for desc, args, kwargs, _ in inputs:
            with torch.device("meta"):
                m = module_cls(lib, kind)(*args, **kwargs)
            ids = [id(p) for p in m.parameters()]
            cdatas = [p._cdata for p in m.parameters()]
            m.to_empty(device=torch.device("cpu"))
            assert all(isinstance(p, torch.nn.Parameter) for p in m.parameters()), desc
            assert all(p.device.type == "cpu" and p.dtype == dtype for p in m.parameters()), desc
            assert all(b.device.type == "cpu" for b in m.buffers()), desc
            ids_after = [id(p) for p in m.parameters()]
            cdatas_after = [p._cdata for p in m.parameters()]
            if swap:
                assert ids == ids_after, desc
            else:
                assert all(a != b for a, b in zip(ids, ids_after)), desc
            assert all(a != b for a, b in zip(cdatas, cdatas_after)), desc


# --- test_errors ----------------------------------------------------------------------------
ERROR_INPUT_SHAPES = {"BatchNorm1d": (2, 10), "BatchNorm2d": (2, 10, 5, 5),
                      "BatchNorm3d": (2, 10, 4, 4, 4)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_errors(lib, kind, dtype):
    """Port of TestModule.test_errors with module_error_inputs_torch_nn_BatchNorm1d_2d_3d:
    BatchNorm(10, eps=-1.0) and BatchNorm(10, eps=0.0), built in the default (training) mode,
    raise ValueError matching "eps must be positive" at forward (FORWARD_ERROR). Upstream
    parametrizes over training too, but never calls train(), so one mode is enough."""
    cls = module_cls(lib, kind)
    x = make_tensor(ERROR_INPUT_SHAPES[kind], device="cpu", dtype=dtype)

    # eps=-1.0
    if lib == "bnlab":
        # deliberate difference: bnlab validates eps when the layer is built, and raises
        # ValueError with its own message, instead of failing at the first forward.
        with pytest.raises(ValueError, match=r"eps must be a finite number >= 0 \(got -1.0\)"):
            cls(10, eps=-1.0)
    else:
        m = cls(10, eps=-1.0)
        with pytest.raises(ValueError, match="eps must be positive"):
            m(x)

    # eps=0.0: allowed at construction (eval with running statistics needs no eps), refused
    # at a training forward
    m = cls(10, eps=0.0)
    with pytest.raises(ValueError, match="eps must be positive"):
        m(x)


# --- the port itself: every test above on torch.nn, one item each ----------------------------
@pytest.mark.port
@pytest.mark.parametrize("test", ported_tests(dict(globals())), ids=lambda t: t.__name__)
def test_port_on_torch(test):
    run_ported_on_torch(test)
