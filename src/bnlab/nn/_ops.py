"""bnlab's BatchNorm training step as torch custom operators, and its eager fast path.

Three operators are registered with :mod:`torch.library`, each with a fake (meta)
implementation and a vmap rule, and the first with an autograd formula, so
``torch.compile(fullgraph=True)``, ``torch.export`` and ``torch.func`` see opaque operators
of known shapes:

* ``bnlab::batch_norm(x, weight, bias, eps) -> (y, saved)``: normalization with the batch
  statistics; ``saved`` is a float64 (2, C) tensor of each channel's mean and biased
  variance, all that the backward needs besides x, the weight and eps;
* ``bnlab::batch_norm_backward(grad_y, x, weight, saved, eps, need_input)``: the closed
  form, returning ``(grad_x, grad_weight, grad_bias)``;
* ``bnlab::update_running_stats(running_mean!, running_var!, num_batches_tracked!, saved,
  count, momentum)``: the running statistics, in place.

In plain eager mode (no compiler, no torch.func transform, plain tensors) the layer skips
the dispatcher: one ``autograd.Function`` runs the forward, statistics update included, as
one call into the compiled kernels. Under torch.func transforms the layer runs its torch-op
form, which they differentiate and batch op by op (``torch.func.grad`` cannot reach a custom
operator's autograd formula); the operators' vmap rules serve direct calls. The arithmetic
is the same on every path.

On CPU, for float16, bfloat16, float32 and float64 inputs in a dense layout ((N, C) rows,
channels_last, or NCHW-like planes), the compiled kernels of :mod:`bnlab.nn._kernels` run;
anything else (other devices, strided inputs, Numba missing) runs the torch-op reference of
:mod:`bnlab.nn.functional`, with the same numerics.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import _kernels as K
from . import functional as F
from ._errors import ShapeError

__all__ = ["act_backward", "act_forward", "train_forward", "kernel_layout", "reference_backward",
           "stacked_forward", "stacked_backward", "prepare_stacked"]

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# how the kernels read each dtype: a NumPy value of the element type (half types as 16-bit
# integers), and 0 in the compute type
_PROTO = {torch.float32: np.float32(0), torch.float64: np.float64(0),
          torch.float16: np.int16(0), torch.bfloat16: np.uint16(0)}
_ZERO = {torch.float32: np.float32(0), torch.float64: np.float64(0),
         torch.float16: np.float32(0), torch.bfloat16: np.float32(0)}
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def _has_storage(t: Tensor) -> bool:
    """False for the wrappers of torch.func and of the older vmap (gradcheck's batched
    gradients), whose data the kernels cannot read: those take the torch-op path."""
    return not (_is_wrapped(t) or _is_legacy_batched(t))


def kernel_layout(x: Tensor) -> Optional[tuple[bool, int, int, int]]:
    """``(rows, N, C, S)`` when the compiled kernels can read ``x`` in place, else None.

    rows: x's memory is (R, C) with C contiguous, R = N * S ((N, C), channels_last);
    otherwise (N, C, S) planes with S contiguous (contiguous NCL, NCHW, NCDHW)."""
    if not (x.is_cpu and x.dtype in _PROTO and K.available()) or x.numel() == 0:
        return None
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    if x.is_contiguous():
        return (True, n, c, 1) if s == 1 else (False, n, c, s)
    if x.stride(1) == 1 and x.movedim(1, -1).is_contiguous():
        return True, n * s, c, 1
    return None


def _same_dtype_cpu(dtype: torch.dtype, *tensors: Optional[Tensor]) -> bool:
    """Parameters and buffers the kernels can read and write in place: CPU, contiguous, and
    all of one floating dtype."""
    for t in tensors:
        if t is not None and not (t.dtype == dtype and t.is_cpu and t.is_contiguous()):
            return False
    return True


_COMPUTE = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
            torch.float32: torch.float32, torch.float64: torch.float64}


def _at(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _run(kind: str, layout: tuple[bool, int, int, int], *args):
    """Run a compiled kernel on ``layout`` (see :func:`_guarded`)."""
    rows, n, c, s = layout
    threads = torch.get_num_threads()
    parallel, seg = K.plan(rows, n, c, s, threads)
    # seven tensor addresses (the backward: six and saved) come first
    return _guarded(K.launch, kind, parallel, threads, *args[:7], rows, n, c, s, seg, *args[7:])


def _guarded(call, *args):
    """``call(*args)``'s result; if the kernel cannot be compiled here, warn, switch the
    kernels off for the process and return False (the caller takes the torch-op path).
    Errors while it runs (out of memory) are raised."""
    try:
        return call(*args)
    except MemoryError:
        raise
    except Exception as exc:  # Numba's errors while typing or compiling for this machine
        if not K.available():
            raise
        K.disable(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"bnlab: the compiled BatchNorm kernels failed here and are switched off "
                      f"({type(exc).__name__}: {str(exc)[:200]}); using the torch-op path",
                      RuntimeWarning, stacklevel=4)
        return False


_NAMES = ("weight", "bias", "running_mean", "running_var")


def _check_sizes(C: int, *tensors: Optional[Tensor]) -> None:
    """The per-channel tensors the kernels address (weight, bias, running_mean, running_var,
    in that order) hold exactly C values: the operators are public, and nothing else checks
    them before raw memory is read or written."""
    for name, t in zip(_NAMES, tensors):
        if t is not None and t.numel() != C:
            raise ShapeError(f"{name} should contain {C} elements not {t.numel()}")


def _shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _updates(running: tuple, momentum: Optional[float]) -> bool:
    """Whether the running statistics are updated: both buffers given, and a counter for
    the cumulative average (momentum None)."""
    running_mean, running_var, tracked = running
    return running_mean is not None and running_var is not None \
        and (tracked is not None or momentum is not None)


_TRITON_ON_CPU = False  # tests: CPU tensors take the Triton kernels (in its interpreter)
_T: object = None  # bnlab.nn._triton once imported; False without Triton


def triton_kernels(x: Tensor):
    """:mod:`bnlab.nn._triton` when its kernels take ``x`` (a CUDA tensor, Triton installed),
    else None. Imported on first use: CPU-only work never imports Triton."""
    global _T
    if not (x.is_cuda or (_TRITON_ON_CPU and x.is_cpu)):
        return None
    if _T is None:
        from . import _triton
        _T = _triton if _triton.available() else False
    return _T if _T and _T.usable(x) else None


def triton_call(name: str, x: Tensor, *args):
    """``_triton.name(*args)`` when the Triton kernels take the input ``x``; None when they do
    not, or when they fail to compile or launch here, which switches them off for the process
    with a warning (the caller then runs the torch ops). Errors of the input and
    out-of-memory errors are raised."""
    global _T
    T = triton_kernels(x)
    if T is None:
        return None
    try:
        return getattr(T, name)(*args)
    except (MemoryError, ValueError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:  # Triton's compiler and driver errors
        _T = False
        warnings.warn(f"bnlab: the Triton BatchNorm kernels failed here and are switched off "
                      f"({type(exc).__name__}: {str(exc)[:200]}); using the torch-op path",
                      RuntimeWarning, stacklevel=3)
        return None


def _forward_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  running: tuple = (None, None, None), momentum: Optional[float] = None):
    """``(y, saved)``, and the running statistics updated when ``running`` holds the buffers.
    ``saved`` is a (2, C) float64 NumPy array from the kernels, a tensor from the torch ops."""
    running_mean, running_var, tracked = running
    update = _updates(running, momentum)
    layout = kernel_layout(x)
    if layout is None or _TRITON_ON_CPU:  # not a CPU kernel's: a GPU's, perhaps
        _check_sizes(x.shape[1], weight, bias, running_mean, running_var)
        # the kernels update the running statistics in their last pass
        if (done := triton_call("forward", x, x, weight, bias, eps,
                                running if update else (None, None, None), momentum)) is not None:
            return done
    pdtype = _COMPUTE.get(x.dtype) if weight is None else weight.dtype
    if layout is not None and pdtype in _PROTO \
            and _same_dtype_cpu(pdtype, weight, bias, running_mean, running_var) \
            and (tracked is None or (tracked.dtype == torch.long and tracked.is_cpu)):
        y, counter, flags = _forward_setup(x, weight, bias, running, momentum, update)
        saved = _run("forward", layout, x.data_ptr(), y.data_ptr(), _at(weight), _at(bias),
                     _at(running_mean), _at(running_var), _at(counter),
                     0.0 if momentum is None else float(momentum), float(eps), flags,
                     _PROTO[x.dtype], _PROTO[pdtype], _ZERO[x.dtype])
        if saved is not False:
            return y, saved
    y, mean, var = _reference_forward(x, weight, bias, eps, running, momentum)
    if y.stride() != x.stride():  # the operator's output has x's layout, as its fake says
        y = torch.empty_like(x).copy_(y)
    return y, torch.stack([mean.reshape(-1), var.reshape(-1)]).double()


def _backward_impl(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], saved, eps: float,
                   need_input: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The closed-form backward; ``saved`` as :func:`_forward_impl` returns it."""
    layout = kernel_layout(x)
    if (layout is None or _TRITON_ON_CPU) and isinstance(saved, Tensor):
        _check_sizes(x.shape[1], weight)
        done = triton_call("backward", x, grad_y, x, weight, saved, eps, need_input)
        if done is not None:
            return done
    pdtype = _COMPUTE.get(x.dtype) if weight is None else weight.dtype
    if layout is not None and pdtype in _PROTO and _same_dtype_cpu(pdtype, weight):
        C = x.shape[1]
        _check_sizes(C, weight)
        if grad_y.shape != x.shape or tuple(saved.shape) != (2, C):
            raise ShapeError(f"batch_norm_backward: grad_y {tuple(grad_y.shape)} and saved "
                             f"{tuple(saved.shape)} do not fit x {tuple(x.shape)}")
        if grad_y.stride() != x.stride() or grad_y.dtype != x.dtype or not grad_y.is_cpu:
            grad_y = torch.empty_like(x).copy_(grad_y)  # the kernels read both in x's layout
        grad_x = torch.empty_like(x) if need_input else x.new_empty(0)
        grad_w = torch.empty(C, dtype=pdtype, device=x.device)
        grad_b = torch.empty(C, dtype=pdtype, device=x.device)
        flags = (K.HAS_W if weight is not None else 0) | K.NEED_DW | K.NEED_DB \
            | (K.NEED_DX if need_input else 0)
        done = _run("backward", layout, grad_y.data_ptr(), x.data_ptr(), _at(grad_x),
                    _at(weight), grad_w.data_ptr(), grad_b.data_ptr(),
                    saved if isinstance(saved, np.ndarray) else saved.cpu().numpy(),
                    float(eps), flags, _PROTO[x.dtype], _PROTO[pdtype], _ZERO[x.dtype])
        if done is not False:
            return grad_x, grad_w, grad_b
    if isinstance(saved, np.ndarray):
        saved = torch.from_numpy(saved).to(x.device)
    gx, gw, gb = reference_backward(grad_y, x, weight, saved, eps)
    if need_input and gx.stride() != x.stride() and x.numel() == 0:
        gx = torch.empty_like(x)  # an empty channels_last x: keep its layout
    return (gx if need_input else x.new_empty(0)), gw, gb


def reference_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor],
                       saved: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The closed form in torch ops (:func:`bnlab.nn.functional.closed_form_backward`) from
    ``saved``; with ``saved=None`` the statistics are recomputed from ``x`` inside the graph,
    so the result can be differentiated again (double backward)."""
    shape = _shape(x)
    stats = None if saved is None else _stats(saved[0], saved[1], x.dtype, eps, shape)
    gx, gw, gb = F.closed_form_backward(grad_y, x, None if weight is None else weight.view(shape),
                                        eps, F.reduce_dims(x.dim()), stats)
    return gx, gw.reshape(-1), gb.reshape(-1)


def _stats(mean64: Tensor, var64: Tensor, dtype: torch.dtype, eps: float,
           shape: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, residual, inv_std) in the compute dtype of ``dtype``, viewed as ``shape``, from
    the float64 saved mean and biased variance: what the closed-form backward takes."""
    dtype = F.compute_dtype(dtype)
    mean = mean64.to(dtype)
    residual = (mean64 - mean.to(mean64.dtype)).to(dtype)
    return mean.view(shape), residual.view(shape), torch.rsqrt(var64.to(dtype) + eps).view(shape)


def _reference_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       running: tuple, momentum: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Training BN in torch ops (:func:`bnlab.nn.functional.batch_norm`), and the running
    statistics updated when ``running`` holds the buffers: ``(y, mean, var)``."""
    view = lambda t: None if t is None else t.view(_shape(x))  # noqa: E731
    y, mean, var = F.batch_norm(x, view(weight), view(bias), eps)
    running_mean, running_var, tracked = running
    if _updates(running, momentum):
        F.update_running_stats(running_mean, running_var, tracked, mean, var,
                               x.numel() // x.shape[1], momentum)
    return y, mean, var


def _grads(ctx, grad_y: Tensor, x: Tensor, weight: Optional[Tensor], saved: Tensor, eps: float,
           has_bias: bool) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph: a differentiable backward (double backward)
        gx, gw, gb = reference_backward(grad_y, x, weight, None, eps)
    elif _functorch_active() or not _has_storage(grad_y):  # vmap over the gradient: torch ops
        stats = torch.from_numpy(saved) if isinstance(saved, np.ndarray) else saved
        gx, gw, gb = reference_backward(grad_y, x, weight, stats, eps)
    elif ctx.eager:
        gx, gw, gb = _backward_impl(grad_y, x, weight, saved, eps, need_x)
    else:
        gx, gw, gb = torch.ops.bnlab.batch_norm_backward(grad_y, x, weight, saved, eps, need_x)
    if need_x and x.numel() == 0 and gx.stride() != x.stride():  # an empty channels_last x
        gx = torch.empty_like(x)
    return (gx if need_x else None, gw if need_w and weight is not None else None,
            gb if need_b and has_bias else None)


# -- operators ---------------------------------------------------------------------------------
@torch.library.custom_op("bnlab::batch_norm", mutates_args=())
def batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float) -> tuple[Tensor, Tensor]:
    """Training-mode BN of ``x`` (N, C, *) with its batch statistics: ``(y, saved)``."""
    y, saved = _forward_impl(x, weight, bias, eps)
    return y, saved if isinstance(saved, Tensor) else torch.from_numpy(saved)


@batch_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x), x.new_empty((2, x.shape[1]), dtype=torch.float64)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.eps, ctx.has_bias, ctx.eager = eps, bias is not None, False


def _batch_norm_grads(ctx, grad_y: Tensor, _grad_saved: Tensor):
    x, weight, saved = ctx.saved_tensors
    return *_grads(ctx, grad_y, x, weight, saved, ctx.eps, ctx.has_bias), None


batch_norm.register_autograd(_batch_norm_grads, setup_context=_setup_context)


@torch.library.custom_op("bnlab::batch_norm_backward", mutates_args=())
def batch_norm_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], saved: Tensor,
                        eps: float, need_input: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The closed-form backward of ``bnlab::batch_norm``: ``(grad_x, grad_weight,
    grad_bias)``; grad_x is empty unless ``need_input``; the parameter gradients are in the
    weight's dtype (the compute dtype without a weight)."""
    return _backward_impl(grad_y, x, weight, saved, eps, need_input)


@batch_norm_backward.register_fake
def _(grad_y, x, weight, saved, eps, need_input):
    pdtype = F.compute_dtype(x.dtype) if weight is None else weight.dtype
    C = x.shape[1]
    return (torch.empty_like(x) if need_input else x.new_empty(0),
            x.new_empty(C, dtype=pdtype), x.new_empty(C, dtype=pdtype))


@torch.library.custom_op("bnlab::update_running_stats",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def update_running_stats(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Optional[Tensor], saved: Tensor, count: int,
                         momentum: Optional[float]) -> None:
    """Fold a batch's ``saved`` statistics into the running buffers (see
    :func:`bnlab.nn.functional.update_running_stats`)."""
    F.update_running_stats(running_mean, running_var, num_batches_tracked, saved[0], saved[1],
                           count, momentum)


@update_running_stats.register_fake
def _(running_mean, running_var, num_batches_tracked, saved, count, momentum):
    return None


# -- vmap: the vmapped dimension becomes more channels -------------------------------------------
def _fold_input(t: Tensor, dim: Optional[int], size: int) -> Tensor:
    """(B at dim) x (N, C, *S) -> (N, B * C, *S): B models' channels side by side."""
    t = t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.movedim(0, 1).reshape(t.shape[1], size * t.shape[2], *t.shape[3:])


def _fold_channels(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """(B at dim) x (C,) -> (B * C,)."""
    if t is None:
        return None
    return t.repeat(size) if dim is None else t.movedim(dim, 0).reshape(-1)


def _unfold(t: Tensor, size: int) -> Tensor:
    """(N, B * C, *S) -> (N, B, C, *S)."""
    return t.view(t.shape[0], size, t.shape[1] // size, *t.shape[2:])


@batch_norm.register_vmap
def _(info, in_dims, x, weight, bias, eps):
    B = info.batch_size
    y, saved = torch.ops.bnlab.batch_norm(_fold_input(x, in_dims[0], B),
                                          _fold_channels(weight, in_dims[1], B),
                                          _fold_channels(bias, in_dims[2], B), eps)
    return (_unfold(y, B), saved.view(2, B, -1)), (1, 1)


@batch_norm_backward.register_vmap
def _(info, in_dims, grad_y, x, weight, saved, eps, need_input):
    B = info.batch_size
    saved = saved.unsqueeze(1).expand(2, B, *saved.shape[1:]) if in_dims[3] is None \
        else saved.movedim(in_dims[3], 1)
    gx, gw, gb = torch.ops.bnlab.batch_norm_backward(
        _fold_input(grad_y, in_dims[0], B), _fold_input(x, in_dims[1], B),
        _fold_channels(weight, in_dims[2], B), saved.reshape(2, -1), eps, need_input)
    gx = _unfold(gx, B) if need_input else gx
    return (gx, gw.view(B, -1), gb.view(B, -1)), (1 if need_input else None, 0, 0)


@update_running_stats.register_vmap
def _(info, in_dims, running_mean, running_var, num_batches_tracked, saved, count, momentum):
    B = info.batch_size
    if in_dims[0] is None or in_dims[1] is None \
            or (num_batches_tracked is not None and in_dims[2] is None):
        # Unbatched buffers would be updated once per batch element, or with B different
        # statistics at once: refused, as torch's own layer refuses it.
        raise RuntimeError(
            "vmap: BatchNorm's running statistics, which are updated in place, must be batched "
            "whenever anything else is; stack one set of buffers per model (e.g. "
            "torch.func.stack_module_state) or use track_running_stats=False")
    saved = saved.unsqueeze(0).expand(B, *saved.shape) if in_dims[3] is None \
        else saved.movedim(in_dims[3], 0)
    tracked = None if num_batches_tracked is None else num_batches_tracked.movedim(in_dims[2], 0)
    for i in range(B):  # each model's own finite guard and counter
        torch.ops.bnlab.update_running_stats(
            running_mean.movedim(in_dims[0], 0)[i], running_var.movedim(in_dims[1], 0)[i],
            None if tracked is None else tracked[i], saved[i], count, momentum)
    return None, None


# -- the eager fast path ------------------------------------------------------------------------
class _Train(torch.autograd.Function):
    """Eager training forward: kernels called directly, running statistics included."""

    @staticmethod
    def forward(ctx, x, weight, bias, running):
        # running: (running_mean, running_var, num_batches_tracked, momentum, eps), one
        # argument rather than five, which apply() passes faster
        y, saved = _forward_impl(x, weight, bias, running[4], running[:3], running[3])
        ctx.save_for_backward(x, weight)
        ctx.stats, ctx.eps, ctx.has_bias, ctx.eager = saved, running[4], bias is not None, True
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        return *_grads(ctx, grad_y, x, weight, ctx.stats, ctx.eps, ctx.has_bias), None


def _plain(t: Optional[Tensor]) -> bool:
    return t is None or ((type(t) is Tensor or type(t) is torch.nn.Parameter) and _has_storage(t))


def train_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                  eps: float) -> Tensor:
    """Training-mode BN with batch statistics, folding them into the running buffers when
    given: the operators under a compiler, one direct call in plain eager mode, and the
    torch-op form under torch.func transforms (which differentiate and batch it op by op;
    torch.func.grad does not reach the autograd formula of a custom operator)."""
    compiling = torch.compiler.is_compiling()
    if not compiling and _functorch_active():
        return _reference_forward(x, weight, bias, eps,
                                  (running_mean, running_var, num_batches_tracked), momentum)[0]
    if not compiling and _plain(x) and _plain(weight) and _plain(bias):  # plain eager
        return _Train.apply(x, weight, bias,
                            (running_mean, running_var, num_batches_tracked, momentum, eps))
    y, saved = torch.ops.bnlab.batch_norm(x, weight, bias, eps)
    if running_mean is not None and running_var is not None:
        torch.ops.bnlab.update_running_stats(running_mean, running_var, num_batches_tracked,
                                             saved, x.numel() // x.shape[1], momentum)
    return y


def _forward_setup(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   running: tuple, momentum: Optional[float], update: bool
                   ) -> tuple[Tensor, Optional[Tensor], int]:
    """What a training forward kernel takes besides the tensors: the output ``y``, the
    step counter (num_batches_tracked, or a scratch one when only running means are kept)
    and the flags; the sizes checked first."""
    running_mean, running_var, tracked = running
    _check_sizes(x.shape[1], weight, bias, running_mean, running_var)
    if tracked is not None and tracked.numel() != 1:
        raise ShapeError(f"num_batches_tracked should hold one value not {tracked.numel()}")
    counter = tracked if tracked is not None or not update else \
        torch.zeros((), dtype=torch.long, device=x.device)
    flags = ((K.HAS_W if weight is not None else 0) | (K.HAS_B if bias is not None else 0)
             | (K.TRACK if update else 0) | (K.CUMULATIVE if momentum is None else 0))
    return torch.empty_like(x), counter, flags


# -- BatchNorm fused with its activation (bnlab.nn.act) ---------------------------------------------
_ACT_DTYPES = (torch.float32, torch.float64)


def act_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                running: tuple, momentum: Optional[float], slope: float, silu: bool):
    """``(y, saved)`` of training ``act(BN(x))`` from the compiled kernels, the running
    statistics updated when ``running`` holds the buffers; ``saved`` is the (2, C) float64
    NumPy array of mean and biased variance. None where the kernels do not take x (not a
    float32/float64 CPU tensor in a dense layout, parameters of another dtype, kernels off):
    the caller then runs :func:`bnlab.nn.act.reference_forward`. ``slope`` is the slope
    below 0 of a piecewise-linear activation (ReLU 0, identity 1), ``silu`` selects SiLU.

    Tensors the CPU kernels do not take (CUDA tensors; any, with the test switch) go to the
    Triton kernels where they take them (:func:`triton_call`); ``saved`` is then a (2, C)
    float64 tensor on x's device."""
    running_mean, running_var, tracked = running
    layout = kernel_layout(x)
    if (layout is None or _TRITON_ON_CPU) and triton_kernels(x) is not None:
        _check_sizes(x.shape[1], weight, bias, running_mean, running_var)
        if tracked is not None and tracked.numel() != 1:
            raise ShapeError(f"num_batches_tracked should hold one value not {tracked.numel()}")
        done = triton_call("forward", x, x, weight, bias, eps,
                           running if _updates(running, momentum) else (None, None, None),
                           momentum, slope, silu)
        if done is not None:
            return done
    if layout is None or x.dtype not in _ACT_DTYPES or _TRITON_ON_CPU \
            or not _same_dtype_cpu(x.dtype, weight, bias, running_mean, running_var) \
            or not (tracked is None or (tracked.dtype == torch.long and tracked.is_cpu)):
        return None
    y, counter, flags = _forward_setup(x, weight, bias, running, momentum,
                                       _updates(running, momentum))
    saved = _run("forward_act_silu" if silu else "forward_act", layout, x.data_ptr(),
                 y.data_ptr(), _at(weight), _at(bias), _at(running_mean), _at(running_var),
                 _at(counter), 0.0 if momentum is None else float(momentum), float(eps), flags,
                 float(slope), _PROTO[x.dtype], _PROTO[x.dtype], _ZERO[x.dtype])
    return None if saved is False else (y, saved)


def act_backward(grad_y: Tensor, v: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 saved, eps: float, slope: float, silu: bool, output: bool, need_input: bool):
    """``(grad_x, grad_weight, grad_bias)`` of :func:`act_forward` from the kernels, or None
    where they do not take ``v`` (the caller runs the torch ops). ``v`` is the forward's
    input, or its output when ``output`` (save="output"); grad_x is empty unless
    ``need_input``. ``saved`` as the forward returned it: a NumPy array from the CPU
    kernels, a tensor from the Triton kernels or the torch ops (then the Triton kernels run
    where they take ``v``, as for :func:`act_forward`)."""
    layout = kernel_layout(v)
    if isinstance(saved, Tensor):
        if (layout is not None and not _TRITON_ON_CPU) or triton_kernels(v) is None:
            return None
        _check_sizes(v.shape[1], weight, bias)
        return triton_call("backward", v, grad_y, v, weight, saved, eps, need_input, bias,
                           slope, silu, output)
    if layout is None or v.dtype not in _ACT_DTYPES or not _same_dtype_cpu(v.dtype, weight, bias):
        return None
    C = v.shape[1]
    _check_sizes(C, weight, bias)
    if grad_y.shape != v.shape or tuple(saved.shape) != (2, C):
        raise ShapeError(f"batch_norm_act backward: grad_y {tuple(grad_y.shape)} and saved "
                         f"{tuple(saved.shape)} do not fit {tuple(v.shape)}")
    if grad_y.stride() != v.stride() or grad_y.dtype != v.dtype or not grad_y.is_cpu:
        grad_y = torch.empty_like(v).copy_(grad_y)  # the kernels read both in one layout
    grad_x = torch.empty_like(v) if need_input else v.new_empty(0)
    grad_w = torch.empty(C, dtype=v.dtype)
    grad_b = torch.empty(C, dtype=v.dtype)
    flags = ((K.HAS_W if weight is not None else 0) | (K.HAS_B if bias is not None else 0)
             | (K.NEED_DX if need_input else 0))
    kind = "backward_act" + ("_silu" if silu else "") + ("_out" if output else "")
    done = _run(kind, layout, grad_y.data_ptr(), v.data_ptr(), _at(grad_x), _at(weight),
                _at(bias), grad_w.data_ptr(), grad_b.data_ptr(), saved, float(eps), flags,
                float(slope), _PROTO[v.dtype], _PROTO[v.dtype], _ZERO[v.dtype])
    return None if done is False else (grad_x, grad_w, grad_b)


# -- stacked networks -------------------------------------------------------------------------
def stacked_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    tracked: Optional[Tensor], momentum: Optional[float],
                    eps: float) -> tuple[Tensor, Tensor]:
    """Training BN of M networks at once: ``x`` (M, N, C) holds each network's (N, C) batch,
    normalized with its own statistics and parameters (weight, bias, running_mean and
    running_var (M, C); tracked (M,)); the running statistics are updated when given, each
    network's skipped alone when its batch statistics are not finite. No autograd: returns
    ``(y, saved)`` with ``saved`` (M, 2, C) float64 (mean and biased variance) for
    :func:`stacked_backward`. The arithmetic is BatchNorm1d's, network by network."""
    M, N, C = x.shape
    pdtype = _COMPUTE.get(x.dtype) if weight is None else weight.dtype
    update = running_mean is not None and running_var is not None
    if K.available() and x.is_cpu and x.dtype in _PROTO and pdtype in _PROTO \
            and x.is_contiguous() and x.numel() > 0 \
            and _same_dtype_cpu(pdtype, weight, bias, running_mean, running_var) \
            and (tracked is None or (tracked.dtype == torch.long and tracked.is_cpu
                                     and tracked.is_contiguous())):
        _check_sizes(M * C, weight, bias, running_mean, running_var)
        if update and (tracked is None or tracked.numel() != M):
            raise ShapeError(f"stacked BN of {M} networks needs num_batches_tracked of {M} values")
        y = torch.empty_like(x)
        flags = ((K.HAS_W if weight is not None else 0) | (K.HAS_B if bias is not None else 0)
                 | (K.TRACK if update else 0) | (K.CUMULATIVE if momentum is None else 0))
        saved = _guarded(K.compiled(False)["forward_stacked"], x.data_ptr(), y.data_ptr(),
                         _at(weight), _at(bias), _at(running_mean), _at(running_var),
                         _at(tracked if update else None), M, N, C, K.plan(True, N, C, 1, 1)[1],
                         0.0 if momentum is None else float(momentum), float(eps), flags,
                         _PROTO[x.dtype], _PROTO[pdtype], _ZERO[x.dtype])
        if saved is not False:
            return y, torch.from_numpy(saved)
    view = lambda t: None if t is None else t.view(M, 1, C)  # noqa: E731
    with torch.no_grad():
        y, mean, var = F.batch_norm(x, view(weight), view(bias), eps, dims=(1,))
        if update:
            for m in range(M):
                F.update_running_stats(running_mean[m], running_var[m],
                                       None if tracked is None else tracked[m], mean[m], var[m],
                                       N, momentum)
    return y, torch.stack([mean.reshape(M, C), var.reshape(M, C)], 1).double()


def prepare_stacked(dtype: torch.dtype = torch.float32) -> list[str]:
    """Start compiling the stacked kernels for ``dtype`` in background processes where the
    disk cache lacks them (see :func:`bnlab.nn._kernels.prepare`); returns those started."""
    if dtype not in (torch.float32, torch.float64) or not K.available():
        return []
    return K.prepare(("forward_stacked", "backward_stacked"), str(dtype).split(".")[-1])


def stacked_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], saved: Tensor,
                     eps: float, need_input: bool = True
                     ) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """The closed-form backward of :func:`stacked_forward`: ``(grad_x or None, grad_weight,
    grad_bias)``, the last two (M, C)."""
    M, N, C = x.shape
    pdtype = _COMPUTE.get(x.dtype) if weight is None else weight.dtype
    if tuple(grad_y.shape) != (M, N, C) or tuple(saved.shape) != (M, 2, C):
        raise ShapeError(f"stacked_backward: grad_y {tuple(grad_y.shape)} and saved "
                         f"{tuple(saved.shape)} do not fit x {tuple(x.shape)}")
    if K.available() and x.is_cpu and x.dtype in _PROTO and pdtype in _PROTO \
            and x.is_contiguous() and x.numel() > 0 and _same_dtype_cpu(pdtype, weight):
        _check_sizes(M * C, weight)
        grad_y = grad_y.to(x.dtype).contiguous()
        grad_x = torch.empty_like(x) if need_input else None
        grad_w = torch.empty(M, C, dtype=pdtype)
        grad_b = torch.empty(M, C, dtype=pdtype)
        flags = (K.HAS_W if weight is not None else 0) | K.NEED_DW | K.NEED_DB \
            | (K.NEED_DX if need_input else 0)
        done = _guarded(K.compiled(False)["backward_stacked"], grad_y.data_ptr(), x.data_ptr(),
                        _at(grad_x), _at(weight), grad_w.data_ptr(), grad_b.data_ptr(),
                        saved.numpy(), M, N, C, K.plan(True, N, C, 1, 1)[1], float(eps), flags,
                        _PROTO[x.dtype], _PROTO[pdtype], _ZERO[x.dtype])
        if done is not False:
            return grad_x, grad_w, grad_b
    shape = [M, 1, C]
    with torch.no_grad():
        gx, gw, gb = F.closed_form_backward(
            grad_y, x, None if weight is None else weight.view(shape), eps, (1,),
            _stats(saved[:, 0], saved[:, 1], x.dtype, eps, shape))
    return (gx if need_input else None), gw.reshape(M, C), gb.reshape(M, C)
