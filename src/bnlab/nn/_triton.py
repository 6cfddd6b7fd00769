"""BatchNorm kernels for CUDA tensors, in Triton (an optional dependency: ``bnlab[triton]``).

The same arithmetic as the CPU kernels and the torch-op reference: per channel, a two-pass
mean and variance with a compensated mean, accumulated in float32 (float64 for float64
inputs), partial results of chunks of rows merged exactly by count (Chan, Golub & LeVeque)
in float64; then the normalization, and the closed-form backward
``dx = inv_std * weight * (dy - mean(dy) - x_hat * mean(dy * x_hat))``.

An input is read as rows of channels: element (n, c, s) of an (N, C, *S) tensor lies at
``n * stride_n + c * stride_c + s * stride_s``, which covers contiguous NCHW (and (N, C),
NCL, NCDHW) and channels_last alike; other layouts are copied to contiguous first.

Each function runs where Triton runs: on CUDA tensors, and on CPU tensors in Triton's
interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), which is how the tests
check them on machines without a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from ._errors import ShapeError

try:  # optional: bnlab works unchanged without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

__all__ = ["available", "backward", "forward", "local_moments", "normalize"]

BLOCK_ROWS, BLOCK_CHANNELS = 64, 16
CHUNK_ROWS = 4096  # rows one program reduces before its partial result is merged
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available() -> bool:
    return triton is not None


def usable(x: Tensor) -> bool:
    """Whether these kernels take ``x``: Triton installed, a floating dtype they cover, and
    values (an empty batch has nothing to reduce; the torch-op path handles it), fewer than
    2^31 of them (the kernels' offsets are 32-bit)."""
    return (triton is not None and x.dtype in _DTYPES and 0 < x.numel() < 2**31
            and x.dim() >= 2 and x.shape[1] <= MAX_CHANNELS)


MAX_CHANNELS = 65535 * BLOCK_CHANNELS  # channel blocks run on the grid's second axis


def _on(x: Tensor):
    """Launch on x's GPU (Triton launches on the current device), a no-op elsewhere."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _like(result: Tensor, x: Tensor) -> Tensor:
    """``result`` in x's layout (the kernels wrote a contiguous copy's)."""
    return result if result.stride() == x.stride() else torch.empty_like(x).copy_(result)


def _geometry(x: Tensor) -> tuple[Tensor, int, int, int, int, int, int]:
    """``(x, N, C, S, stride_n, stride_c, stride_s)`` with x in a layout the kernels read."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    if not x.is_contiguous() and not (x.dim() > 2 and x.stride(1) == 1
                                      and x.movedim(1, -1).is_contiguous()):
        x = x.contiguous()
    if x.is_contiguous():
        return x, n, c, s, c * s, s, 1
    return x, n, c, s, s * c, 1, c  # channels_last: rows of C contiguous channels


if triton is not None:
    @triton.jit
    def _offsets(rows, chans, S, stride_n, stride_c, stride_s):
        n = rows // S
        s = rows - n * S
        return n[:, None] * stride_n + s[:, None] * stride_s + chans[None, :] * stride_c

    @triton.jit
    def _tile(M, C, S, stride_n, stride_c, stride_s, BM: tl.constexpr, BC: tl.constexpr):
        """This program's BM rows x BC channels: (chans, cmask, mask, offsets)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        chans = tl.program_id(1) * BC + tl.arange(0, BC)
        cmask = chans < C
        mask = (rows < M)[:, None] & cmask[None, :]
        return chans, cmask, mask, _offsets(rows, chans, S, stride_n, stride_c, stride_s)

    @triton.jit
    def _moments_kernel(x_ptr, count_ptr, mean_ptr, m2_ptr, M, C, S, stride_n, stride_c,
                        stride_s, CHUNK: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                        ACC: tl.constexpr):
        """Partial (count, mean, M2) of CHUNK rows for BC channels: two passes over the
        chunk, the second also summing the deviations to correct the rounded mean."""
        chans = tl.program_id(1) * BC + tl.arange(0, BC)
        first = tl.program_id(0) * CHUNK
        cmask = chans < C
        last = tl.minimum(first + CHUNK, M)
        total = tl.zeros([BM, BC], dtype=ACC)
        for start in range(first, last, BM):
            rows = start + tl.arange(0, BM)
            mask = (rows < M)[:, None] & cmask[None, :]
            off = _offsets(rows, chans, S, stride_n, stride_c, stride_s)
            total += tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        count = tl.minimum(M - first, CHUNK).to(ACC)
        mean = tl.sum(total, axis=0) / count
        dev = tl.zeros([BM, BC], dtype=ACC)
        sq = tl.zeros([BM, BC], dtype=ACC)
        for start in range(first, last, BM):
            rows = start + tl.arange(0, BM)
            mask = (rows < M)[:, None] & cmask[None, :]
            off = _offsets(rows, chans, S, stride_n, stride_c, stride_s)
            d = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC) - mean[None, :]
            d = tl.where(mask, d, 0.0)
            dev += d
            sq += d * d
        residual = tl.sum(dev, axis=0)  # what the rounded mean missed, times count
        out = tl.program_id(0) * C + chans
        tl.store(count_ptr + out, count + tl.zeros([BC], dtype=ACC), mask=cmask)
        # float64: a float32 mean of values near 1e4 would be off by up to 5e-4
        tl.store(mean_ptr + out, mean.to(tl.float64) + (residual / count).to(tl.float64),
                 mask=cmask)
        tl.store(m2_ptr + out, tl.sum(sq, axis=0) - residual * residual / count, mask=cmask)

    @triton.jit
    def _affine_kernel(x_ptr, y_ptr, mean_ptr, residual_ptr, scale_ptr, shift_ptr, M, C, S,
                       stride_n, stride_c, stride_s, BM: tl.constexpr, BC: tl.constexpr,
                       ACC: tl.constexpr):
        """y = ((x - mean) - residual) * scale + shift, per channel, in x's layout."""
        chans, cmask, mask, off = _tile(M, C, S, stride_n, stride_c, stride_s, BM, BC)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        mean = tl.load(mean_ptr + chans, mask=cmask, other=0.0)
        residual = tl.load(residual_ptr + chans, mask=cmask, other=0.0)
        scale = tl.load(scale_ptr + chans, mask=cmask, other=0.0)
        shift = tl.load(shift_ptr + chans, mask=cmask, other=0.0)
        y = ((x - mean[None, :]) - residual[None, :]) * scale[None, :] + shift[None, :]
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _grad_sums_kernel(dy_ptr, x_ptr, mean_ptr, residual_ptr, inv_std_ptr, sum_ptr,
                          sum_xhat_ptr, M, C, S, stride_n, stride_c, stride_s,
                          CHUNK: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                          ACC: tl.constexpr):
        """Partial sums of dy and dy * x_hat over CHUNK rows for BC channels."""
        chans = tl.program_id(1) * BC + tl.arange(0, BC)
        first = tl.program_id(0) * CHUNK
        cmask = chans < C
        mean = tl.load(mean_ptr + chans, mask=cmask, other=0.0)
        residual = tl.load(residual_ptr + chans, mask=cmask, other=0.0)
        inv_std = tl.load(inv_std_ptr + chans, mask=cmask, other=0.0)
        s1 = tl.zeros([BM, BC], dtype=ACC)
        s2 = tl.zeros([BM, BC], dtype=ACC)
        for start in range(first, tl.minimum(first + CHUNK, M), BM):
            rows = start + tl.arange(0, BM)
            mask = (rows < M)[:, None] & cmask[None, :]
            off = _offsets(rows, chans, S, stride_n, stride_c, stride_s)
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
            x_hat = ((x - mean[None, :]) - residual[None, :]) * inv_std[None, :]
            s1 += dy
            s2 += tl.where(mask, dy * x_hat, 0.0)
        out = tl.program_id(0) * C + chans
        tl.store(sum_ptr + out, tl.sum(s1, axis=0), mask=cmask)
        tl.store(sum_xhat_ptr + out, tl.sum(s2, axis=0), mask=cmask)

    @triton.jit
    def _grad_input_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, residual_ptr, inv_std_ptr,
                           gain_ptr, mean_dy_ptr, mean_dy_xhat_ptr, M, C, S, stride_n,
                           stride_c, stride_s, BM: tl.constexpr, BC: tl.constexpr,
                           ACC: tl.constexpr):
        """dx = gain * (dy - mean(dy) - x_hat * mean(dy * x_hat)), gain = inv_std * weight."""
        chans, cmask, mask, off = _tile(M, C, S, stride_n, stride_c, stride_s, BM, BC)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        mean = tl.load(mean_ptr + chans, mask=cmask, other=0.0)
        residual = tl.load(residual_ptr + chans, mask=cmask, other=0.0)
        inv_std = tl.load(inv_std_ptr + chans, mask=cmask, other=0.0)
        gain = tl.load(gain_ptr + chans, mask=cmask, other=0.0)
        mean_dy = tl.load(mean_dy_ptr + chans, mask=cmask, other=0.0)
        mean_dy_xhat = tl.load(mean_dy_xhat_ptr + chans, mask=cmask, other=0.0)
        x_hat = ((x - mean[None, :]) - residual[None, :]) * inv_std[None, :]
        dx = gain[None, :] * (dy - mean_dy[None, :] - x_hat * mean_dy_xhat[None, :])
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _chunks(m: int) -> int:
    return triton.cdiv(m, CHUNK_ROWS)


def local_moments(x: Tensor) -> Tensor:
    """(3, C) float64: count, mean and M2 (sum of squared deviations) per channel of x."""
    x, n, c, s, sn, sc, ss = _geometry(x)
    m, acc = n * s, _acc(x.dtype)
    g = _chunks(m)
    count, m2 = (torch.empty(g, c, dtype=acc, device=x.device) for _ in range(2))
    mean = torch.empty(g, c, dtype=torch.float64, device=x.device)
    with _on(x):
        _moments_kernel[(g, triton.cdiv(c, BLOCK_CHANNELS))](
            x, count, mean, m2, m, c, s, sn, sc, ss, CHUNK=CHUNK_ROWS, BM=BLOCK_ROWS,
            BC=BLOCK_CHANNELS, ACC=_tl(x.dtype))
    from .functional import merge_moments

    total, mean64, var64 = merge_moments(torch.stack([count.double(), mean, m2.double()], dim=1))
    return torch.stack([total, mean64, var64 * total])


def _split(mean64: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A float64 mean as a value in ``dtype`` and the residual it misses."""
    mean = mean64.to(dtype)
    return mean, (mean64 - mean.double()).to(dtype)


def normalize(x: Tensor, mean64: Tensor, var64: Tensor, weight: Optional[Tensor],
              bias: Optional[Tensor], eps: float) -> Tensor:
    """BN's steps 3 and 4 with given per-channel statistics (float64): training's batch
    statistics, or inference's running ones."""
    original = x
    x, n, c, s, sn, sc, ss = _geometry(x)
    acc = _acc(x.dtype)
    mean, residual = _split(mean64, acc)
    scale = torch.rsqrt(var64 + eps)
    if weight is not None:
        scale = scale * weight.double()
    shift = torch.zeros_like(mean64) if bias is None else bias.double()
    y = torch.empty_like(x)
    m = n * s
    with _on(x):
        _affine_kernel[(triton.cdiv(m, BLOCK_ROWS), triton.cdiv(c, BLOCK_CHANNELS))](
            x, y, mean, residual, scale.to(acc), shift.to(acc), m, c, s, sn, sc, ss,
            BM=BLOCK_ROWS, BC=BLOCK_CHANNELS, ACC=_tl(x.dtype))
    return _like(y, original)


def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            eps: float) -> tuple[Tensor, Tensor]:
    """Training BN: ``(y, saved)``, saved the (2, C) float64 mean and biased variance."""
    moments = local_moments(x)
    mean64, var64 = moments[1], moments[2] / moments[0]
    return normalize(x, mean64, var64, weight, bias, eps), torch.stack([mean64, var64])


def backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], saved: Tensor, eps: float,
             need_input: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The closed-form backward from ``saved``: ``(grad_x, grad_weight, grad_bias)``, the
    parameter gradients in the weight's dtype (the compute dtype without a weight)."""
    if grad_y.shape != x.shape or tuple(saved.shape) != (2, x.shape[1]):
        raise ShapeError(f"batch_norm_backward: grad_y {tuple(grad_y.shape)} and saved "
                         f"{tuple(saved.shape)} do not fit x {tuple(x.shape)}")
    original = x
    x, n, c, s, sn, sc, ss = _geometry(x)
    if grad_y.stride() != x.stride():
        grad_y = torch.empty_like(x).copy_(grad_y)  # read in x's layout
    acc = _acc(x.dtype)
    m, g = n * s, _chunks(n * s)
    mean, residual = _split(saved[0].double(), acc)
    inv_std = torch.rsqrt(saved[1].double() + eps).to(acc)
    sums = torch.empty(2, g, c, dtype=acc, device=x.device)
    with _on(x):
        _grad_sums_kernel[(g, triton.cdiv(c, BLOCK_CHANNELS))](
            grad_y, x, mean, residual, inv_std, sums[0], sums[1], m, c, s, sn, sc, ss,
            CHUNK=CHUNK_ROWS, BM=BLOCK_ROWS, BC=BLOCK_CHANNELS, ACC=_tl(x.dtype))
    grad_bias, grad_weight = sums.double().sum(dim=1)  # (C,) each, views of one tensor
    pdtype = acc if weight is None else weight.dtype
    grad_x = x.new_empty(0)
    if need_input:
        grad_x = torch.empty_like(x)
        gain = inv_std.double() * (1.0 if weight is None else weight.double())
        with _on(x):
            _grad_input_kernel[(triton.cdiv(m, BLOCK_ROWS), triton.cdiv(c, BLOCK_CHANNELS))](
                grad_y, x, grad_x, mean, residual, inv_std, gain.to(acc),
                (grad_bias / m).to(acc), (grad_weight / m).to(acc), m, c, s, sn, sc, ss,
                BM=BLOCK_ROWS, BC=BLOCK_CHANNELS, ACC=_tl(x.dtype))
        grad_x = _like(grad_x, original)
    # copies: the two must not share storage (an operator's outputs may not alias)
    return grad_x, grad_weight.to(pdtype, copy=True), grad_bias.to(pdtype, copy=True)
