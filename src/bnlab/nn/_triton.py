"""BatchNorm kernels for CUDA tensors, in Triton (an optional dependency: ``bnlab[triton]``),
plain and fused with its activation (``y = act(BN(x))``, :mod:`bnlab.nn.act`).

The same arithmetic as the CPU kernels and the torch-op reference: per channel, a two-pass
mean and variance with a compensated mean, accumulated in float32 (float64 for float64
inputs), partial results of chunks of rows merged exactly by count (Chan, Golub & LeVeque)
in float64; then the normalization, and the closed-form backward
``dx = inv_std * weight * (g - mean(g) - x_hat * mean(g * x_hat))`` with ``g = dy * act'(z)``.

One set of kernels serves both: the activation is a compile-time parameter ``ACT`` (none, a
piecewise-linear slope below 0 -- ReLU 0, leaky ReLU its slope --, or SiLU), so plain BN is
``ACT=NONE`` and compiles to exactly the code it would have alone. A training step reads and
writes the activation tensor as little as two-pass BN allows:

* forward: the moments pass reads x (each chunk twice, the second time mostly from cache),
  a small pass merges the chunks' partial results into the mean and variance (and flags
  the channels whose statistics are not finite), and one pass reads x and writes
  ``y = act(z)``, ``z = weight * x_hat + bias``; its first row of programs writes the
  running statistics, last, so a kernel that fails to build leaves them for the torch ops;
* backward: one pass reads dy and x (or y, ``output=True``: in-place activated BN) and sums
  ``g`` and ``g * x_hat`` per chunk, a small pass merges them into the parameter gradients,
  and one pass reads dy and x (or y) again and writes dx. ``z`` and ``x_hat`` are recomputed
  from x exactly as the forward formed them, or recovered from y by inverting the activation
  and the affine map; nothing of the tensor's size is stored in between.

Per-channel coefficients (inv_std, weight * inv_std, ...) are computed inside the kernels
from the float64 statistics, so a step is three launches each way and no host-side torch
ops. Chunks are made shorter (down to MIN_CHUNK_ROWS) where the reducing passes would give
the GPU too few programs.

An input is read as rows of channels: element (n, c, s) of an (N, C, *S) tensor lies at
``n * stride_n + c * stride_c + s * stride_s``, which covers contiguous NCHW (and (N, C),
NCL, NCDHW) and channels_last alike; other layouts are copied to contiguous first.

Each function runs where Triton runs: on CUDA tensors, and on CPU tensors in Triton's
interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), which is how the tests
check them on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor

from ._errors import ShapeError
from .functional import merge_moments, update_running_stats

try:  # optional: bnlab works unchanged without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

__all__ = ["available", "backward", "forward", "local_moments", "normalize"]

BLOCK_ROWS, BLOCK_CHANNELS = 64, 16
CHUNK_ROWS = 4096  # rows one program reduces before its partial result is merged, at most
MIN_CHUNK_ROWS = 512  # ... and at least, where fewer rows give the GPU more programs
MERGE_TILE = 2048  # chunks x channels one step of a merging program holds
MAX_FLAGS = 256  # programs that merge the statistics, at most
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NONE, LINEAR, SILU = 0, 1, 2  # the kernels' ACT: none (plain BN), slope below 0, SiLU


def available() -> bool:
    return triton is not None


def usable(x: Tensor) -> bool:
    """Whether these kernels take ``x``: Triton installed, a floating dtype they cover, and
    values (an empty batch has nothing to reduce; the torch-op path handles it), fewer than
    2^31 of them (the kernels' offsets are 32-bit)."""
    return (triton is not None and x.dtype in _DTYPES and 0 < x.numel() < 2**31
            and x.numel() // x.shape[1] + CHUNK_ROWS < 2**31  # row indices past the end too
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
    _LINEAR = tl.constexpr(LINEAR)
    _SILU = tl.constexpr(SILU)
    _MAX_FLAGS = tl.constexpr(MAX_FLAGS)

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
    def _scalar(value, BC: tl.constexpr, ACC: tl.constexpr):
        """A float64 argument as BC copies in ACC (the interpreter passes a Python float,
        which tl.cast would round to float32 on the way)."""
        return (tl.zeros([BC], dtype=tl.float64) + value).to(ACC)

    @triton.jit
    def _inv_sqrt(v, ACC: tl.constexpr):
        """1 / sqrt(v), each step rounded as IEEE (Triton's float32 defaults approximate)."""
        if ACC == tl.float64:
            r = 1.0 / tl.sqrt(v)
        else:
            r = tl.div_rn(tl.full(v.shape, 1.0, ACC), tl.sqrt_rn(v))
        return r

    @triton.jit
    def _coefficients(mean_ptr, var_ptr, w_ptr, b_ptr, chans, cmask, eps,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
        """Per channel ``(mean, residual, inv_std, scale, shift)`` in ACC from the float64
        statistics: the mean as its ACC value plus the residual that value misses (so
        x - mean is exact for x near it), inv_std = 1 / sqrt(var + eps) in ACC as the
        torch-op path forms it, scale = inv_std * weight, shift = bias."""
        mean64 = tl.load(mean_ptr + chans, mask=cmask, other=0.0).to(tl.float64)
        var64 = tl.load(var_ptr + chans, mask=cmask, other=1.0).to(tl.float64)
        mean = mean64.to(ACC)
        residual = (mean64 - mean.to(tl.float64)).to(ACC)
        inv_std = _inv_sqrt((var64 + eps).to(ACC), ACC)
        scale = inv_std
        if HAS_W:
            scale = inv_std * tl.load(w_ptr + chans, mask=cmask, other=0.0).to(ACC)
        shift = tl.zeros(mean.shape, dtype=ACC)
        if HAS_B:
            shift = tl.load(b_ptr + chans, mask=cmask, other=0.0).to(ACC)
        return mean, residual, inv_std, scale, shift

    @triton.jit
    def _activate(z, slope, ACT: tl.constexpr):
        """act(z): z (NONE), z or slope * z below 0 (LINEAR), z * sigmoid(z) (SILU)."""
        if ACT == _LINEAR:
            z = tl.where(z > 0, z, z * slope)
        elif ACT == _SILU:
            z = z / (1.0 + tl.exp(-z))
        return z

    @triton.jit
    def _g_and_x_hat(dy, v, mean, residual, inv_std, scale, shift, w, slope,
                     ACT: tl.constexpr, OUTPUT: tl.constexpr, ACC: tl.constexpr):
        """Per element ``(g, x_hat)``: g = dy * act'(z), the gradient reaching BN's output z
        (act' at 0 the slope below, as torch's backward takes it), and the normalized input.
        v is x, from which z and x_hat are formed exactly as the forward formed them (so
        act' sees the forward's signs), or with OUTPUT the output y: z = act^-1(y) and
        x_hat = (z - bias) / w, w the weight with |weight| raised to eps (clamp_weight)."""
        if OUTPUT:  # divisions, as act.reference_backward: y / slope * slope is y again
            z = v
            if ACT == _LINEAR:
                z = tl.where(v > 0, v, _div(v, slope, ACC))
            x_hat = _div(z - shift, w, ACC)
        else:
            d = (v - mean) - residual
            x_hat = d * inv_std
            z = d * scale + shift
        g = dy
        if ACT == _LINEAR:
            g = tl.where(z > 0, dy, dy * slope)
        elif ACT == _SILU:
            s = 1.0 / (1.0 + tl.exp(-z))
            g = dy * (s * (1.0 + z * (1.0 - s)))
        return g, x_hat

    @triton.jit
    def _div(a, b, ACC: tl.constexpr):
        """a / b rounded as IEEE (Triton's float32 division defaults to an approximation)."""
        if ACC == tl.float64:
            q = a / b
        else:
            q = tl.div_rn(a, b)
        return q

    @triton.jit
    def _backward_coefficients(saved_ptr, w_ptr, b_ptr, chans, cmask, C, eps, slope,
                               HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                               BC: tl.constexpr, ACC: tl.constexpr):
        """:func:`_coefficients` of the saved statistics, the weight with its magnitude
        raised to at least eps (act.clamp_weight: what save="output" divides by) and the
        slope, per channel in ACC."""
        mean, residual, inv_std, scale, shift = _coefficients(
            saved_ptr, saved_ptr + C, w_ptr, b_ptr, chans, cmask, eps, HAS_W, HAS_B, ACC)
        clamped = tl.full([BC], 1.0, ACC)
        if HAS_W:
            w = tl.load(w_ptr + chans, mask=cmask, other=1.0).to(ACC)
            magnitude = tl.maximum(tl.abs(w), _scalar(eps, BC, ACC))
            clamped = tl.where(w < 0, -magnitude, magnitude)
        return mean, residual, inv_std, scale, shift, clamped, _scalar(slope, BC, ACC)

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
    def _merge(parts_ptr, G, C, chans, cmask, BG: tl.constexpr, BC: tl.constexpr):
        """Per channel (count, mean, M2) of the G partial results in parts (3, G, C) float64,
        merged exactly by count (functional.merge_moments)."""
        n = tl.zeros([BC], dtype=tl.float64)
        total = tl.zeros([BC], dtype=tl.float64)
        for g0 in range(0, G, BG):
            gs = g0 + tl.arange(0, BG)
            mask = (gs < G)[:, None] & cmask[None, :]
            off = gs[:, None] * C + chans[None, :]
            count = tl.load(parts_ptr + off, mask=mask, other=0.0)
            n += tl.sum(count, axis=0)
            total += tl.sum(count * tl.load(parts_ptr + G * C + off, mask=mask, other=0.0), axis=0)
        mean = total / tl.maximum(n, 1.0)
        m2 = tl.zeros([BC], dtype=tl.float64)
        for g0 in range(0, G, BG):
            gs = g0 + tl.arange(0, BG)
            mask = (gs < G)[:, None] & cmask[None, :]
            off = gs[:, None] * C + chans[None, :]
            count = tl.load(parts_ptr + off, mask=mask, other=0.0)
            d = tl.load(parts_ptr + G * C + off, mask=mask, other=0.0) - mean[None, :]
            m2 += tl.sum(tl.load(parts_ptr + 2 * G * C + off, mask=mask, other=0.0)
                         + count * d * d, axis=0)
        return n, mean, m2

    @triton.jit
    def _rounded(v, ty: tl.constexpr):
        """A float64 value in dtype ``ty``, as torch rounds a double to it: by way of float32
        for float16 and bfloat16 (also what Triton's interpreter gets right for bfloat16)."""
        if ty == tl.float64:
            return v
        return v.to(tl.float32).to(ty)

    @triton.jit
    def _running(mean, var, unbiased, rmean_ptr, rvar_ptr, big):
        """The batch's mean and unbiased variance in the running buffers' dtypes (back in
        float64), and whether both are finite there (functional.update_running_stats)."""
        rm = _rounded(mean, rmean_ptr.dtype.element_ty).to(tl.float64)
        rv = _rounded(var * unbiased, rvar_ptr.dtype.element_ty).to(tl.float64)
        return rm, rv, (tl.abs(rm) <= big) & (tl.abs(rv) <= big)  # False for inf and nan

    @triton.jit
    def _stats_kernel(parts_ptr, G, C, saved_ptr, rmean_ptr, rvar_ptr, tracked_ptr,
                      scratch_ptr, unbiased: tl.float64, big: tl.float64,
                      TRACK: tl.constexpr, COUNTER: tl.constexpr, BG: tl.constexpr,
                      BC: tl.constexpr):
        """saved (2, C) float64, each channel's mean and biased variance, from the moments'
        partial results, BC channels a program. With TRACK, for the pass that writes the
        running statistics: scratch[1 + program] is 1 when its channels' statistics are
        all finite in the buffers' dtype, and scratch[0] the counter as it is now."""
        pid = tl.program_id(0)
        chans = pid * BC + tl.arange(0, BC)
        cmask = chans < C
        n, mean, m2 = _merge(parts_ptr, G, C, chans, cmask, BG, BC)
        var = m2 / tl.maximum(n, 1.0)
        tl.store(saved_ptr + chans, mean, mask=cmask)
        tl.store(saved_ptr + C + chans, var, mask=cmask)
        if TRACK:
            rm, rv, finite = _running(mean, var, unbiased, rmean_ptr, rvar_ptr, big)
            first = tl.arange(0, 1)
            ok = tl.min(tl.where(finite | ~cmask, 1.0, 0.0), axis=0)
            tl.store(scratch_ptr + 1 + pid + first, ok + tl.zeros([1], dtype=tl.float64))
            if COUNTER:  # read here, written by the next pass: no program reads it late
                count = tl.load(tracked_ptr + first).to(tl.float64)
                tl.store(scratch_ptr + first, count, mask=pid + first == 0)

    @triton.jit
    def _update_running(mean_ptr, var_ptr, rmean_ptr, rvar_ptr, tracked_ptr, scratch_ptr,
                        NB, chans, cmask, momentum, unbiased, COUNTER: tl.constexpr,
                        CUMULATIVE: tl.constexpr, BC: tl.constexpr):
        """BC channels' running statistics, as functional.update_running_stats folds a
        batch in: skipped, counter included, unless every channel's statistics are finite
        (the NB flags of _stats_kernel); the factor momentum, or 1 / the count (CUMULATIVE),
        rounded to the buffers' dtype as torch's lerp takes it; the lerp in float64."""
        flags = tl.load(scratch_ptr + 1 + tl.arange(0, _MAX_FLAGS),
                        mask=tl.arange(0, _MAX_FLAGS) < NB, other=1.0)
        good = tl.min(flags, axis=0)
        factor = tl.zeros([BC], dtype=tl.float64) + momentum
        if COUNTER:
            first = tl.arange(0, 1)
            count = tl.load(scratch_ptr + first) + good
            tl.store(tracked_ptr + first, count.to(tl.int64), mask=tl.program_id(1) + first == 0)
            if CUMULATIVE:
                count = tl.max(count, axis=0)
                factor = tl.zeros([BC], dtype=tl.float64) + 1.0 / tl.maximum(count, 1.0)
        factor = _rounded(factor, rmean_ptr.dtype.element_ty).to(tl.float64)
        keep = cmask & ((tl.zeros([BC], dtype=tl.float64) + good) > 0)
        mean = tl.load(mean_ptr + chans, mask=cmask, other=0.0)
        var = tl.load(var_ptr + chans, mask=cmask, other=0.0)
        rm, rv, finite = _running(mean, var, unbiased, rmean_ptr, rvar_ptr, 0.0)
        old = tl.load(rmean_ptr + chans, mask=keep, other=0.0).to(tl.float64)
        tl.store(rmean_ptr + chans, _rounded(old + factor * (rm - old), rmean_ptr.dtype.element_ty),
                 mask=keep)
        old = tl.load(rvar_ptr + chans, mask=keep, other=0.0).to(tl.float64)
        tl.store(rvar_ptr + chans, _rounded(old + factor * (rv - old), rvar_ptr.dtype.element_ty),
                 mask=keep)

    @triton.jit
    def _affine_kernel(x_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, rmean_ptr, rvar_ptr,
                       tracked_ptr, scratch_ptr, NB, M, C, S, stride_n, stride_c, stride_s,
                       eps: tl.float64, slope: tl.float64, momentum: tl.float64,
                       unbiased: tl.float64, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       ACT: tl.constexpr, TRACK: tl.constexpr, COUNTER: tl.constexpr,
                       CUMULATIVE: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                       ACC: tl.constexpr):
        """y = act(((x - mean) - residual) * scale + shift), per channel, in x's layout;
        with TRACK the first row of programs also writes the running statistics (the last
        pass of the forward: a kernel that fails to build leaves them for the torch ops)."""
        chans, cmask, mask, off = _tile(M, C, S, stride_n, stride_c, stride_s, BM, BC)
        mean, residual, inv_std, scale, shift = _coefficients(
            mean_ptr, var_ptr, w_ptr, b_ptr, chans, cmask, eps, HAS_W, HAS_B, ACC)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        z = ((x - mean[None, :]) - residual[None, :]) * scale[None, :] + shift[None, :]
        y = _activate(z, _scalar(slope, BC, ACC)[None, :], ACT)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)
        if TRACK:
            if tl.program_id(0) == 0:
                _update_running(mean_ptr, var_ptr, rmean_ptr, rvar_ptr, tracked_ptr,
                                scratch_ptr, NB, chans, cmask, momentum, unbiased, COUNTER,
                                CUMULATIVE, BC)

    @triton.jit
    def _grad_sums_kernel(dy_ptr, v_ptr, saved_ptr, w_ptr, b_ptr, sums_ptr, M, C, S,
                          stride_n, stride_c, stride_s, eps: tl.float64, slope: tl.float64,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                          OUTPUT: tl.constexpr, CHUNK: tl.constexpr, BM: tl.constexpr,
                          BC: tl.constexpr, ACC: tl.constexpr):
        """Partial sums of g and g * x_hat over CHUNK rows for BC channels, into sums
        (2, G, C) float64 (see _g_and_x_hat)."""
        chans = tl.program_id(1) * BC + tl.arange(0, BC)
        first = tl.program_id(0) * CHUNK
        cmask = chans < C
        mean, residual, inv_std, scale, shift, clamped, sl = _backward_coefficients(
            saved_ptr, w_ptr, b_ptr, chans, cmask, C, eps, slope, HAS_W, HAS_B, BC, ACC)
        s1 = tl.zeros([BM, BC], dtype=ACC)
        s2 = tl.zeros([BM, BC], dtype=ACC)
        for start in range(first, tl.minimum(first + CHUNK, M), BM):
            rows = start + tl.arange(0, BM)
            mask = (rows < M)[:, None] & cmask[None, :]
            off = _offsets(rows, chans, S, stride_n, stride_c, stride_s)
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
            v = tl.load(v_ptr + off, mask=mask, other=0.0).to(ACC)
            g, x_hat = _g_and_x_hat(dy, v, mean[None, :], residual[None, :], inv_std[None, :],
                                    scale[None, :], shift[None, :], clamped[None, :],
                                    sl[None, :], ACT, OUTPUT, ACC)
            s1 += g
            s2 += tl.where(mask, g * x_hat, 0.0)
        out = tl.program_id(0) * C + chans
        G = tl.num_programs(0)
        tl.store(sums_ptr + out, tl.sum(s1, axis=0), mask=cmask)
        tl.store(sums_ptr + G * C + out, tl.sum(s2, axis=0), mask=cmask)

    @triton.jit
    def _grad_params_kernel(sums_ptr, G, C, M, gw_ptr, gb_ptr, means_ptr, BG: tl.constexpr,
                            BC: tl.constexpr):
        """dbias = sum(g), dweight = sum(g * x_hat) per channel (the partial sums added in
        float64), in the parameters' dtype; means (2, C) receives mean(g), mean(g * x_hat)."""
        chans = tl.program_id(0) * BC + tl.arange(0, BC)
        cmask = chans < C
        s1 = tl.zeros([BC], dtype=tl.float64)
        s2 = tl.zeros([BC], dtype=tl.float64)
        for g0 in range(0, G, BG):
            gs = g0 + tl.arange(0, BG)
            mask = (gs < G)[:, None] & cmask[None, :]
            off = gs[:, None] * C + chans[None, :]
            s1 += tl.sum(tl.load(sums_ptr + off, mask=mask, other=0.0), axis=0)
            s2 += tl.sum(tl.load(sums_ptr + G * C + off, mask=mask, other=0.0), axis=0)
        tl.store(gb_ptr + chans, _rounded(s1, gb_ptr.dtype.element_ty), mask=cmask)
        tl.store(gw_ptr + chans, _rounded(s2, gw_ptr.dtype.element_ty), mask=cmask)
        tl.store(means_ptr + chans, s1 / M, mask=cmask)
        tl.store(means_ptr + C + chans, s2 / M, mask=cmask)

    @triton.jit
    def _grad_input_kernel(dy_ptr, v_ptr, dx_ptr, saved_ptr, w_ptr, b_ptr, means_ptr, M, C,
                           S, stride_n, stride_c, stride_s, eps: tl.float64,
                           slope: tl.float64, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           ACT: tl.constexpr, OUTPUT: tl.constexpr, BM: tl.constexpr,
                           BC: tl.constexpr, ACC: tl.constexpr):
        """dx = inv_std * weight * (g - mean(g) - x_hat * mean(g * x_hat))."""
        chans, cmask, mask, off = _tile(M, C, S, stride_n, stride_c, stride_s, BM, BC)
        mean, residual, inv_std, scale, shift, clamped, sl = _backward_coefficients(
            saved_ptr, w_ptr, b_ptr, chans, cmask, C, eps, slope, HAS_W, HAS_B, BC, ACC)
        mean_g = tl.load(means_ptr + chans, mask=cmask, other=0.0)
        mean_g_xhat = tl.load(means_ptr + C + chans, mask=cmask, other=0.0)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + off, mask=mask, other=0.0).to(ACC)
        g, x_hat = _g_and_x_hat(dy, v, mean[None, :], residual[None, :], inv_std[None, :],
                                scale[None, :], shift[None, :], clamped[None, :], sl[None, :],
                                ACT, OUTPUT, ACC)
        dx = scale[None, :] * (g - mean_g[None, :] - x_hat * mean_g_xhat[None, :])
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _chunks(m: int) -> int:
    return triton.cdiv(m, CHUNK_ROWS)


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunk_rows(m: int, c: int, device: torch.device) -> int:
    """Rows a reducing program takes: CHUNK_ROWS, halved down to MIN_CHUNK_ROWS while the
    grid would give the GPU's multiprocessors fewer than 4 programs each (one program per
    multiprocessor, looping over its chunk, keeps too few loads in flight to fill HBM; the
    partial results that more chunks make are merged in parallel, one step for up to 128)."""
    chunk, blocks = CHUNK_ROWS, triton.cdiv(c, BLOCK_CHANNELS)
    while chunk > MIN_CHUNK_ROWS and triton.cdiv(m, chunk) * blocks < 4 * _processors(device):
        chunk //= 2
    return chunk


def _act(slope: float, silu: bool) -> int:
    """The kernels' ACT for an activation: identity (slope 1) is plain BN's NONE."""
    return SILU if silu else (NONE if slope == 1.0 else LINEAR)


def _merge_blocks(g: int, c: int) -> tuple[int, int, int]:
    """(chunks, channels) one step of a merging program takes, and how many programs: at
    most MAX_FLAGS, each with at least 16 channels."""
    bc = max(16, triton.next_power_of_2(triton.cdiv(c, MAX_FLAGS)))
    return max(1, min(triton.next_power_of_2(g), MERGE_TILE // bc)), bc, triton.cdiv(c, bc)


def _per_channel(x: Tensor, c: int, **tensors: Optional[Tensor]) -> list[Tensor]:
    """Weight, bias and the like as the kernels address them: C contiguous values on x's
    device (x itself stands in for one not given, which the kernels do not read)."""
    out = []
    for name, t in tensors.items():
        if t is None:
            out.append(x)
            continue
        if t.device != x.device or t.numel() != c:
            raise ShapeError(f"{name}: expected {c} values on {x.device} "
                             f"(got {t.numel()} on {t.device})")
        out.append(t.contiguous())
    return out


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
    total, mean64, var64 = merge_moments(torch.stack([count.double(), mean, m2.double()], dim=1))
    return torch.stack([total, mean64, var64 * total])


def normalize(x: Tensor, mean64: Tensor, var64: Tensor, weight: Optional[Tensor],
              bias: Optional[Tensor], eps: float, slope: float = 1.0, silu: bool = False,
              _update: Optional[tuple] = None) -> Tensor:
    """BN's steps 3 and 4 with given per-channel statistics (float64, on x's device):
    training's batch statistics, or inference's running ones; then the activation (slope
    below 0 of a piecewise-linear one, or SiLU; the default slope 1 is none). ``_update``:
    :func:`forward`'s running statistics to write, ``(running_mean, running_var,
    num_batches_tracked, momentum, count, scratch, programs)``."""
    original = x
    x, n, c, s, sn, sc, ss = _geometry(x)
    mean64, var64, w, b = _per_channel(x, c, mean=mean64, var=var64, weight=weight, bias=bias)
    running_mean, running_var, tracked, momentum, count, scratch, nb = \
        _update or (x, x, None, 0.0, 2, x, 0)
    y = torch.empty_like(x)
    m = n * s
    with _on(x):
        _affine_kernel[(triton.cdiv(m, BLOCK_ROWS), triton.cdiv(c, BLOCK_CHANNELS))](
            x, y, mean64, var64, w, b, running_mean, running_var,
            x if tracked is None else tracked, scratch, nb, m, c, s, sn, sc, ss, float(eps),
            float(slope), 0.0 if momentum is None else float(momentum),
            count / max(count - 1, 1), HAS_W=weight is not None, HAS_B=bias is not None,
            ACT=_act(slope, silu), TRACK=_update is not None, COUNTER=tracked is not None,
            CUMULATIVE=momentum is None, BM=BLOCK_ROWS, BC=BLOCK_CHANNELS, ACC=_tl(x.dtype))
    return _like(y, original)


def _in_kernel(x: Tensor, c: int, running_mean: Tensor, running_var: Tensor,
               tracked: Optional[Tensor]) -> bool:
    """Whether the kernels can update these running buffers themselves."""
    return (all(t.device == x.device and t.is_contiguous() and t.numel() == c
                and t.dtype == running_mean.dtype and t.is_floating_point()
                for t in (running_mean, running_var))
            and (tracked is None or (tracked.device == x.device and tracked.numel() == 1
                                     and tracked.dtype == torch.long)))


def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
            running: tuple = (None, None, None), momentum: Optional[float] = None,
            slope: float = 1.0, silu: bool = False) -> tuple[Tensor, Tensor]:
    """Training BN, then the activation (see :func:`normalize`): ``(y, saved)``, saved the
    (2, C) float64 mean and biased variance. ``running = (running_mean, running_var,
    num_batches_tracked)`` are updated when the two buffers are given, as
    :func:`bnlab.nn.functional.update_running_stats` does (momentum None: the cumulative
    average, which needs the counter)."""
    original = x
    x, n, c, s, sn, sc, ss = _geometry(x)
    m = n * s
    chunk = _chunk_rows(m, c, x.device)
    g = triton.cdiv(m, chunk)
    running_mean, running_var, tracked = running
    update = running_mean is not None and running_var is not None
    if update and momentum is None and tracked is None:
        raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
    in_kernel = update and _in_kernel(x, c, running_mean, running_var, tracked)
    bg, bc, nb = _merge_blocks(g, c)
    parts = torch.empty(3, g, c, dtype=torch.float64, device=x.device)  # count, mean, M2
    # saved (2, C), then the counter and one finite flag per merging program
    out = torch.empty(2 * c + 1 + nb, dtype=torch.float64, device=x.device)
    saved, scratch = out[:2 * c].view(2, c), out[2 * c:]
    with _on(x):
        _moments_kernel[(g, triton.cdiv(c, BLOCK_CHANNELS))](
            x, parts[0], parts[1], parts[2], m, c, s, sn, sc, ss, CHUNK=chunk,
            BM=BLOCK_ROWS, BC=BLOCK_CHANNELS, ACC=_tl(x.dtype))
        _stats_kernel[(nb,)](
            parts, g, c, saved, running_mean if in_kernel else out,
            running_var if in_kernel else out,
            tracked if in_kernel and tracked is not None else out, scratch, m / max(m - 1, 1),
            torch.finfo(running_mean.dtype).max if in_kernel else 0.0, TRACK=in_kernel,
            COUNTER=tracked is not None, BG=bg, BC=bc)
    y = normalize(x, saved[0], saved[1], weight, bias, eps, slope, silu,
                  (running_mean, running_var, tracked, momentum, m, scratch, nb)
                  if in_kernel else None)
    if update and not in_kernel:  # buffers the kernels cannot write: the torch ops
        update_running_stats(running_mean, running_var, tracked, saved[0], saved[1], m, momentum)
    return _like(y, original), saved


def backward(grad_y: Tensor, v: Tensor, weight: Optional[Tensor], saved: Tensor, eps: float,
             need_input: bool, bias: Optional[Tensor] = None, slope: float = 1.0,
             silu: bool = False, output: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The closed-form backward of :func:`forward` from ``saved``: ``(grad_x, grad_weight,
    grad_bias)``, the parameter gradients in the weight's dtype (the compute dtype without a
    weight), grad_x empty unless ``need_input``. ``v`` is the forward's input x, or with
    ``output`` its output y (in-place activated BN: an invertible activation, x_hat
    recovered as (act^-1(y) - bias) / weight, |weight| raised to at least eps)."""
    if grad_y.shape != v.shape or tuple(saved.shape) != (2, v.shape[1]):
        raise ShapeError(f"batch_norm_backward: grad_y {tuple(grad_y.shape)} and saved "
                         f"{tuple(saved.shape)} do not fit x {tuple(v.shape)}")
    original = v
    v, n, c, s, sn, sc, ss = _geometry(v)
    if grad_y.stride() != v.stride():
        grad_y = torch.empty_like(v).copy_(grad_y)  # read in v's layout
    w, b = _per_channel(v, c, weight=weight, bias=bias)
    saved = saved.to(v.device, torch.float64).contiguous()
    acc = _acc(v.dtype)
    m = n * s
    chunk = _chunk_rows(m, c, v.device)
    g = triton.cdiv(m, chunk)
    pdtype = acc if weight is None else weight.dtype
    sums = torch.empty(2, g, c, dtype=torch.float64, device=v.device)
    means = torch.empty(2, c, dtype=acc, device=v.device)  # mean(g), mean(g * x_hat)
    grad_w = torch.empty(c, dtype=pdtype, device=v.device)
    grad_b = torch.empty(c, dtype=pdtype, device=v.device)
    common = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=_act(slope, silu),
                  OUTPUT=bool(output), BM=BLOCK_ROWS, BC=BLOCK_CHANNELS, ACC=_tl(v.dtype))
    bg, bc, nb = _merge_blocks(g, c)
    grad_x = v.new_empty(0)
    with _on(v):
        _grad_sums_kernel[(g, triton.cdiv(c, BLOCK_CHANNELS))](
            grad_y, v, saved, w, b, sums, m, c, s, sn, sc, ss, float(eps), float(slope),
            CHUNK=chunk, **common)
        _grad_params_kernel[(nb,)](sums, g, c, m, grad_w, grad_b, means, BG=bg, BC=bc)
        if need_input:
            grad_x = torch.empty_like(v)
            _grad_input_kernel[(triton.cdiv(m, BLOCK_ROWS), triton.cdiv(c, BLOCK_CHANNELS))](
                grad_y, v, grad_x, saved, w, b, means, m, c, s, sn, sc, ss, float(eps),
                float(slope), **common)
            grad_x = _like(grad_x, original)
    return grad_x, grad_w, grad_b
