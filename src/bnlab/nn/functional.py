"""Batch Normalization as pure functions, written as the four steps of Ioffe & Szegedy (2015).

For one channel over a mini-batch B = {x_1 .. x_m} (m = N, or N*H*W for convolutions):

1. mean    mu_B    = 1/m * sum_i x_i
2. var     var_B   = 1/m * sum_i (x_i - mu_B)^2          (biased: this is what normalizes)
3. x_hat   x_hat_i = (x_i - mu_B) / sqrt(var_B + eps)
4. y       y_i     = weight * x_hat_i + bias              (gamma and beta in the paper)

Statistics (steps 1-2, :func:`batch_stats`) are kept apart from normalization (steps 3-4,
:class:`BatchNormFunction`), so a variant can replace how statistics are gathered (ghost
batches, population statistics) without copying the layer.

Conventions, stated once here and used throughout:

* Reductions run in at least float32: float16/bfloat16 inputs are reduced and normalized in
  float32 and the output is cast back; float64 stays float64.
* Variance is computed in two passes (mean first, then the mean squared deviation), never as
  E[x^2] - E[x]^2, which cancels catastrophically for large offsets (pytorch#5410).
* The running variance stores the unbiased estimate m/(m-1) * var_B (paper, Algorithm 2),
  and momentum is the weight of the new value, as in PyTorch:
  ``running = (1 - momentum) * running + momentum * batch``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "BatchNormFunction",
    "BatchStats",
    "affine_from_stats",
    "batch_norm",
    "batch_stats",
    "closed_form_backward",
    "compute_dtype",
    "merge_moments",
    "moments",
    "reduce_dims",
    "update_running_stats",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions run in: float32 for half types, the input's own dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def reduce_dims(ndim: int, channel_dim: int = 1) -> tuple[int, ...]:
    """Every axis but the channel axis: (0,) for (N, C), (0, 2, 3) for (N, C, H, W)."""
    return tuple(d for d in range(ndim) if d != channel_dim)


class BatchStats(NamedTuple):
    """Per-channel batch statistics, shaped to broadcast against the input.

    The mean is carried as two parts, ``mean + residual``: in float32 a mean near 1e7 is
    only known to within 0.5, which would shift every x_hat by 0.5 / std. ``x - mean`` is
    exact for values near the mean, and subtracting the small ``residual`` afterwards keeps
    the centring accurate (the corrected two-pass algorithm, Chan, Golub & LeVeque 1983).
    """

    mean: Tensor
    var: Tensor  # biased, 1/m
    residual: Tensor

    def full_mean(self) -> Tensor:
        return self.mean + self.residual


def batch_stats(x: Tensor, dims: Sequence[int]) -> BatchStats:
    """Steps 1 and 2: per-channel mean and biased variance over ``dims``, kept for broadcasting.

    Two passes, never E[x^2] - E[x]^2: the deviation is formed before it is squared, so an
    input of 1e7 plus unit noise keeps its unit variance. Half inputs reduce in float32.
    """
    dims = tuple(dims)
    xc = x.to(compute_dtype(x.dtype))
    mean = xc.mean(dim=dims, keepdim=True)
    dev = xc - mean
    residual = dev.mean(dim=dims, keepdim=True)  # what the rounded mean missed
    var = (dev.square().mean(dim=dims, keepdim=True) - residual.square()).clamp(min=0)
    return BatchStats(mean, var, residual)


def affine_from_stats(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Steps 3 and 4 as one affine map ``y = scale * x + shift`` for fixed statistics.

    With population statistics (inference) BN is exactly this map, which is also what
    folding into the previous layer uses (paper, Algorithm 2, line 11).
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def _normalize(x: Tensor, mean: Tensor, residual: Tensor, inv_std: Tensor,
               weight: Tensor | None, bias: Tensor | None) -> Tensor:
    x_hat = (x - mean - residual) * inv_std  # step 3; left to right: x - mean is exact
    y = x_hat if weight is None else x_hat * weight  # step 4
    return y if bias is None else y + bias


def _backward(grad_y: Tensor, x: Tensor, mean: Tensor, residual: Tensor, inv_std: Tensor,
              weight: Tensor | None, dims: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form gradient through all four steps (differentiable, for double backward).

    With g = dL/dx_hat = grad_y * weight and m values per channel:
        dL/dx = inv_std * (g - mean(g) - x_hat * mean(g * x_hat))
    mean(g) is the path through mu_B; mean(g * x_hat) the path through var_B
    (d var_B / d mu_B = 0, since sum(x - mu_B) = 0).
    """
    x_hat = (x - mean - residual) * inv_std
    grad_bias = grad_y.sum(dim=dims, keepdim=True)
    grad_weight = (grad_y * x_hat).sum(dim=dims, keepdim=True)
    m = x.numel() // mean.numel()
    if weight is None:
        g_mean, gx_mean, g = grad_bias / m, grad_weight / m, grad_y
    else:
        g_mean, gx_mean, g = grad_bias * weight / m, grad_weight * weight / m, grad_y * weight
    grad_x = inv_std * (g - g_mean - x_hat * gx_mean)
    return grad_x, grad_weight, grad_bias


class BatchNormFunction(torch.autograd.Function):
    """Normalize ``x`` with given batch statistics; the backward is the closed form.

    ``mean``, ``residual`` and ``var`` must be the batch statistics of ``x`` over ``dims``
    (from :func:`batch_stats`): the backward differentiates through them analytically and
    returns no gradient for them. Only ``x``, the weight and the statistics are saved;
    ``x_hat`` is recomputed in backward rather than stored.
    """

    generate_vmap_rule = True  # every step is a torch op: torch.func.vmap batches them

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                residual: Tensor, var: Tensor, eps: float, dims: tuple[int, ...]) -> Tensor:
        dtype = mean.dtype
        inv_std = torch.rsqrt(var + eps)
        y = _normalize(x.to(dtype), mean, residual, inv_std, _cast(weight, dtype), _cast(bias, dtype))
        return y.to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        x, weight, bias, mean, residual, var, eps, dims = inputs
        inv_std = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, residual, inv_std)
        ctx.eps, ctx.dims, ctx.has_bias = eps, dims, bias is not None

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, mean, residual, inv_std = ctx.saved_tensors
        # Double backward: the statistics must be functions of x for the second derivative
        # to see their dependence on it, so they are recomputed in the graph.
        stats = None if torch.is_grad_enabled() else (mean, residual, inv_std)
        grad_x, grad_w, grad_b = closed_form_backward(grad_y, x, weight, ctx.eps, ctx.dims, stats)
        if x.numel() == 0 and grad_x.stride() != x.stride():  # an empty channels_last x
            grad_x = torch.empty_like(x)  # keeps its layout (and copying would trip vmap)
        return (grad_x, None if weight is None else grad_w, grad_b if ctx.has_bias else None,
                None, None, None, None, None)


def closed_form_backward(grad_y: Tensor, x: Tensor, weight: Tensor | None, eps: float,
                         dims: tuple[int, ...], stats: tuple[Tensor, Tensor, Tensor] | None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of training-mode BN with respect to x, weight and bias (kept for
    broadcasting), in the dtypes of x and of the weight (the compute dtype without one).

    ``weight`` broadcasts against ``x``. ``stats`` is ``(mean, residual, inv_std)`` in the
    compute dtype, shaped to broadcast; ``None`` recomputes them from ``x`` inside the graph,
    so that the result can be differentiated again."""
    dtype = compute_dtype(x.dtype)
    xc = x.to(dtype)
    if stats is None:
        mean, var, residual = batch_stats(xc, dims)
        stats = (mean, residual, torch.rsqrt(var + eps))
    grad_x, grad_w, grad_b = _backward(grad_y.to(dtype), xc, *stats, _cast(weight, dtype), dims)
    param_dtype = dtype if weight is None else weight.dtype
    return grad_x.to(x.dtype), grad_w.to(param_dtype), grad_b.to(param_dtype)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5,
               dims: Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN of ``x`` with its own batch statistics.

    ``weight`` and ``bias`` must already broadcast against ``x`` (e.g. shape (1, C, 1, 1)).
    Returns ``(y, mean, var)`` with the detached batch mean and biased variance, for the
    caller to fold into running estimates.
    """
    dims = tuple(reduce_dims(x.dim()) if dims is None else dims)
    with torch.no_grad():
        stats = batch_stats(x, dims)
    y = BatchNormFunction.apply(x, weight, bias, stats.mean, stats.residual, stats.var, eps, dims)
    return y, stats.full_mean(), stats.var


def update_running_stats(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Optional[Tensor], mean: Tensor, var: Tensor,
                         count: int, momentum: Optional[float]) -> None:
    """Fold one batch's statistics into the running estimates, in place.

    ``var`` is the biased batch variance over ``count`` values per channel; the running
    variance receives the unbiased ``count / (count - 1) * var``. ``momentum=None`` gives the
    cumulative average (factor 1 / num_batches_tracked). A batch whose statistics are not all
    finite leaves every buffer, ``num_batches_tracked`` included, unchanged (pytorch#88474);
    the check is done with tensor ops, so it costs no host synchronisation. (Written so that
    TorchScript compiles it too.)
    """
    with torch.no_grad():
        mean = mean.reshape(-1).to(running_mean.dtype)
        var = (var.reshape(-1) * (count / max(count - 1, 1))).to(running_var.dtype)
        ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
        if num_batches_tracked is not None:
            num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
        if momentum is None:
            assert num_batches_tracked is not None, "momentum=None needs num_batches_tracked"
            factor = 1.0 / num_batches_tracked.clamp(min=1).to(running_mean.dtype)
        else:
            factor = torch.full((), momentum, dtype=running_mean.dtype, device=running_mean.device)
        # where(), not a multiply: 0 * nan is nan, and a skipped batch must leave no trace.
        running_mean.copy_(torch.where(ok, torch.lerp(running_mean, mean, factor), running_mean))
        running_var.copy_(torch.where(ok, torch.lerp(running_var, var, factor), running_var))


def moments(x: Tensor, dims: Sequence[int]) -> Tensor:
    """(3, C) float64: the count, mean and M2 (sum of squared deviations) per channel of
    ``x`` over ``dims``, from :func:`batch_stats` (two passes in x's compute dtype); zeros
    for an empty ``x``. :func:`merge_moments` merges such triples of disjoint sets."""
    c = x.shape[1]
    out = torch.zeros(3, c, dtype=torch.float64, device=x.device)
    n = x.numel() // c
    if n == 0:
        return out
    stats = batch_stats(x, dims)
    out[0] = n
    out[1] = stats.full_mean().reshape(-1).double()
    out[2] = stats.var.reshape(-1).double() * n
    return out


def merge_moments(parts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, mean, biased var)`` per channel from ``parts`` (R, 3, C) float64: the moments
    of R disjoint sets merged exactly by count."""
    counts, means, m2s = parts[:, 0], parts[:, 1], parts[:, 2]  # (R, C) each
    n = counts.sum(0)
    total = n.clamp(min=1)
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return n, mean, m2 / total
