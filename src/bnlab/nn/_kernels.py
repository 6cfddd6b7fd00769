"""Compiled CPU kernels for BatchNorm's training forward and backward (Numba, LLVM).

The kernels compute what :mod:`bnlab.nn.functional` computes, in fewer passes over memory
and on the threads torch is told to use:

* Statistics are gathered per *segment*: a run of one channel's values that fits in cache
  (part of an (n, c) plane for NCHW-like inputs, a block of rows for channels-last ones).
  Each segment takes two passes: the sum in float64, then the squared deviations from the
  segment's mean rounded to the compute type (so x - mean is exact for x near it), summed
  in the compute type over short runs and added in float64; the correction term comes from
  the exact sum (the corrected two-pass algorithm). Segments are merged exactly (Chan,
  Golub & LeVeque): M2 = sum M2_k + sum n_k (mean_k - mean)^2, never E[x^2] - E[x]^2.
  The second pass reads the segment from cache, so x comes from memory once for the
  statistics and once to be normalized.
* float16 and bfloat16 are widened to float32 on load and rounded to nearest even on store;
  float32 and float64 are normalized in their own precision.
* No ``nnan``/``ninf`` fast-math flags, and NumPy's error model (a division by zero gives
  inf or nan, as in torch): non-finite values propagate as in the torch-op path.
* Inner loops index slices from 0 (``xs = x[start:start + n]; xs[i]``): an index that may
  be negative makes Numba wrap it around, which keeps LLVM from vectorizing the loop.

A forward or a backward is one call into compiled code (its own small per-channel work
included), so small inputs pay one dispatch, not a dozen torch ops. Tensors arrive as
addresses (``Tensor.data_ptr()``) in one of two layouts: ``rows`` (R, C) with C contiguous
((N, C), channels_last, channels_last_3d) and ``planes`` (N, C, S) with S contiguous (NCL,
NCHW, NCDHW); half tensors are read as 16-bit integers (``uint16`` for bfloat16, ``int16``
for float16). The caller (:mod:`bnlab.nn._ops`) checks every size and dtype first.

Numba is optional: :func:`available` is False when it is missing or fails here, and bnlab
runs its torch-op path instead (the same numbers to float tolerance, slower).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np

try:
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic, overload
except Exception as exc:  # ImportError, or a numba that cannot initialise on this machine
    numba = None
    _failure: str | None = f"numba is not importable ({type(exc).__name__}: {exc})"
else:
    _failure = None

log = logging.getLogger(__name__)

__all__ = ["available", "unavailable_reason", "describe", "disable", "compiled", "plan", "launch",
           "prepare", "SEGMENT", "ROWS_BLOCK", "HAS_W", "HAS_B", "TRACK", "CUMULATIVE", "NEED_DX", "NEED_DW",
           "NEED_DB"]

SEGMENT = 2048  # values per plane segment: in L1 for the second pass, and short enough to sum
#                 deviations in float32 (about 32 values per vector lane)
ROWS_BLOCK = 1 << 16  # values per block of rows: 256 KiB of float32, within a core's L2
# Constants read inside the compiled kernels (fixed at compile time, and in the disk cache):
RUN = 16  # rows whose deviations are summed in the compute type before float64
WIDE = 1024  # values per wide row (rows layout): k = WIDE // C rows at a time
CHUNK = 2048  # values of a plane whose gradient sums are summed in the compute type
PARALLEL_MIN = 1 << 15  # fewer values than this run on one thread: a launch costs more
_FASTMATH = {"reassoc", "contract", "nsz"}  # reorder sums to vectorize; inf and nan stay exact

# flags of forward
HAS_W, HAS_B, TRACK, CUMULATIVE = 1, 2, 4, 8
# flags of backward (HAS_W as above)
NEED_DX, NEED_DW, NEED_DB = 16, 32, 64


def load(a, i):
    """a[i] widened to the compute type (float32, or float64 for float64 arrays)."""
    raise RuntimeError("load() runs inside compiled kernels only")


def like(zero, v):
    """v in the type of ``zero`` (the compute type)."""
    raise RuntimeError("like() runs inside compiled kernels only")


def store(a, i, v):
    """a[i] = v rounded to a's type (nearest even for half types)."""
    raise RuntimeError("store() runs inside compiled kernels only")


if numba is not None:
    def _bitcast(name, src, dst, build):
        def typer(typingctx, value):
            if value != src:
                return None

            def codegen(context, builder, signature, args):
                return build(builder, args[0])
            return dst(src), codegen
        typer.__name__ = name
        return intrinsic(typer)

    @intrinsic
    def _bits_to_f32(typingctx, bits):
        """The float32 whose bit pattern is the low 32 bits of an unsigned integer."""
        if not isinstance(bits, types.Integer) or bits.signed:
            return None

        def codegen(context, builder, signature, args):
            low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
            return builder.bitcast(low, ir.FloatType())
        return types.float32(bits), codegen

    _f32_to_bits = _bitcast("_f32_to_bits", types.float32, types.uint32,
                            lambda b, v: b.bitcast(v, ir.IntType(32)))
    _half_to_f32 = _bitcast("_half_to_f32", types.int16, types.float32,
                            lambda b, v: b.fpext(b.bitcast(v, ir.HalfType()), ir.FloatType()))
    _f32_to_half = _bitcast("_f32_to_half", types.float32, types.int16,  # nearest even
                            lambda b, v: b.bitcast(b.fptrunc(v, ir.HalfType()), ir.IntType(16)))

    @intrinsic
    def _pointer(typingctx, address, proto):
        """A pointer to the memory at an integer address, typed as ``proto``'s type."""
        if not isinstance(address, types.Integer) or not isinstance(proto, types.Number):
            return None
        ptr = types.CPointer(proto)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr))
        return ptr(address, proto), codegen

    @overload(load, inline="always")
    def _load(a, i):
        if a.dtype == types.uint16:  # bfloat16: the high half of a float32
            return lambda a, i: _bits_to_f32(np.uint32(a[i]) << 16)
        if a.dtype == types.int16:
            return lambda a, i: _half_to_f32(a[i])
        return lambda a, i: a[i]

    @overload(like, inline="always")
    def _like(zero, v):
        if zero == types.float32:
            return lambda zero, v: np.float32(v)
        return lambda zero, v: np.float64(v)

    @overload(store, inline="always")
    def _store(a, i, v):
        if a.dtype == types.uint16:
            def store_bfloat16(a, i, v):
                bits = _f32_to_bits(np.float32(v))
                if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # nan: keep it quiet
                    a[i] = np.uint16((bits >> np.uint32(16)) | np.uint32(0x40))
                else:  # round to nearest, ties to even, as torch converts
                    bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
                    a[i] = np.uint16(bits >> np.uint32(16))
            return store_bfloat16
        if a.dtype == types.int16:
            def store_float16(a, i, v):
                a[i] = _f32_to_half(np.float32(v))
            return store_float16
        def store_float(a, i, v):
            a[i] = v
        return store_float


# -- layouts --------------------------------------------------------------------------------------
# rows:   x is (N, C) in memory, C contiguous. Rows are processed k = max(1, WIDE // C) at a
#         time as one "wide row" of W = k * C values, against per-channel arrays tiled k
#         times, so that an inner loop is long enough to vectorize well when C is small.
#         A block is `seg` rows (a multiple of k but for the last), handled by one thread.
# planes: x is (N, C, S) in memory, S contiguous. A segment is up to `seg` values of one
#         (n, c) plane; segments are visited in memory order, which the hardware prefetcher
#         follows (taking one channel at a time from cache measured slower: its planes lie
#         C * S values apart).
# Each table of kernels (:func:`compiled`) is for one layout: ROWS is a constant of its
# namespace, so Numba prunes the other layout's branches before typing them, and a run
# compiles only the code of the layouts it meets (both together took twice as long).
ROWS = None  # set in each table's namespace; the functions here are never run uncompiled
# The tables of BatchNorm fused with its activation (bnlab.nn.act) set these too: ACT (an
# activation follows the affine map), SILU (it is SiLU, else piecewise linear with a slope
# below 0: ReLU 0, leaky ReLU its slope, identity 1) and OUTPUT (the backward reads the
# output y and inverts the activation, instead of reading x). BatchNorm's tables set all False.
ACT = SILU = OUTPUT = None


def _block(b, N, seg, k):
    """Rows of block b: [r0, full) in wide rows of k rows, then [full, r1) one at a time."""
    r0 = b * seg
    r1 = min(N, r0 + seg)
    return r0, r0 + (r1 - r0) // k * k, r1


def _segment(j, per, S, seg, C):
    """Channel, start and length of planes segment j (piece j % per of plane j // per)."""
    q = j % per
    return (j // per) % C, (j // per) * S + q * seg, min(seg, S - q * seg)


def _tile(a, k, zero):
    """``a`` (C,) repeated k times, in the compute type of ``zero``."""
    C = a.shape[0]
    out = np.full(k * C, zero)
    for j in range(k):
        for c in range(C):
            out[j * C + c] = a[c]
    return out


def _fold(w, C, out):
    """out[c] = sum over j of w[j * C + c]."""
    for c in range(C):
        out[c] = 0.0
    for j in range(w.shape[0] // C):
        for c in range(C):
            out[c] += w[j * C + c]


def _rows_block_stats(x, r0, r1, C, zero, out):
    """(count, mean, M2) of each channel over rows [r0, r1), in float64 (see _plane_stats):
    the sums in float64, then the squared deviations from the block mean in the compute type
    over runs of RUN rows, added in float64."""
    k = max(1, WIDE // C)
    W = k * C
    n = r1 - r0
    full = r0 + (n // k) * k
    sw = np.zeros(W)
    for r in range(r0, full, k):
        xr = x[r * C:(r + k) * C]
        for i in range(W):
            sw[i] += load(xr, i)
    for r in range(full, r1):
        xr = x[r * C:(r + 1) * C]
        for c in range(C):
            sw[c] += load(xr, c)
    total = out[0]
    mean = out[1]
    m2 = out[2]
    _fold(sw, C, total)
    center = np.full(C, zero)
    for c in range(C):
        center[c] = total[c] / n
    cw = _tile(center, k, zero)
    d2 = np.zeros(W)
    t2 = np.empty_like(cw)
    for q in range(r0, full, k * RUN):
        t2[:] = 0.0
        for r in range(q, min(full, q + k * RUN), k):
            xr = x[r * C:(r + k) * C]
            for i in range(W):
                d = load(xr, i) - cw[i]
                t2[i] += d * d
        for i in range(W):
            d2[i] += t2[i]
    for r in range(full, r1):
        xr = x[r * C:(r + 1) * C]
        for c in range(C):
            d = load(xr, c) - cw[c]
            d2[c] += d * d
    _fold(d2, C, m2)
    for c in range(C):
        e1 = total[c] - n * np.float64(center[c])  # sum of the deviations from center
        mean[c] = center[c] + e1 / n  # the compensated mean
        m2[c] = max(m2[c] - e1 * e1 / n, 0.0)
        total[c] = n


def _plane_stats(xs, zero):
    """(mean, M2) of one run of at most SEGMENT values, the corrected two-pass algorithm
    (Chan, Golub & LeVeque): the sum in float64; the mean rounded to the compute type as the
    center, so x - center is exact for x near it; the squared deviations from the center
    summed in the compute type over the short run; and the correction from the exact sum of
    the deviations, sum - n * center, which also gives the compensated mean."""
    n = xs.shape[0]
    s = 0.0
    for i in range(n):
        s += load(xs, i)
    center = like(zero, s / n)
    d2 = zero
    for i in range(n):
        d = load(xs, i) - center
        d2 += d * d
    e1 = s - n * np.float64(center)
    return center + e1 / n, max(np.float64(d2) - e1 * e1 / n, 0.0)


def _merge(count, means, m2s):
    """Exact merge of groups (Chan, Golub & LeVeque): the two-pass formula over the group
    means, M2 = sum M2_k + sum n_k (mean_k - mean)^2. Returns (mean, biased var)."""
    total = 0.0
    mean = 0.0
    for k in range(count.shape[0]):
        total += count[k]
        mean += count[k] * means[k]
    mean /= total
    m2 = 0.0
    for k in range(count.shape[0]):
        delta = means[k] - mean
        m2 += m2s[k] + count[k] * delta * delta
    return mean, m2 / total


def _batch_stats(x, N, C, S, seg, zero):
    """Per-channel (mean, biased var) in float64 over the whole batch."""
    mean = np.empty(C)
    var = np.empty(C)
    if ROWS:
        K = (N + seg - 1) // seg
        part = np.empty((K, 3, C))
        for b in prange(K):
            _rows_block_stats(x, b * seg, min(N, (b + 1) * seg), C, zero, part[b])
        for c in range(C):
            mean[c], var[c] = _merge(part[:, 0, c], part[:, 1, c], part[:, 2, c])
    else:
        per = (S + seg - 1) // seg
        part = np.empty((3, N * C * per))
        for j in prange(N * C * per):
            _, start, n = _segment(j, per, S, seg, C)
            part[0, j] = n
            part[1, j], part[2, j] = _plane_stats(x[start:start + n], zero)
        for c in prange(C):
            idx = np.empty(N * per, dtype=np.int64)
            for n in range(N):
                for q in range(per):
                    idx[n * per + q] = (n * C + c) * per + q
            mean[c], var[c] = _merge(part[0][idx], part[1][idx], part[2][idx])
    return mean, var


def _act(z, slope, one):
    """The activation of z in the act tables (see ACT), z itself in BatchNorm's. ``slope``
    and ``one`` are in z's type: a float64 literal would widen float32 work to float64."""
    if ACT:
        if SILU:
            return z / (one + np.exp(-z))
        return z if z > 0 else z * slope
    return z


def _plane_affine(xs, ys, m, a, b, slope, one):
    for i in range(xs.shape[0]):
        store(ys, i, _act((load(xs, i) - m) * a + b, slope, one))


def _affine(x, y, N, C, S, seg, center, scale, shift, slope, one, zero):
    """y = act((x - center) * scale + shift) per channel (act: see _act); the subtraction
    is exact near center."""
    if ROWS:
        k = max(1, WIDE // C)
        W = k * C
        cw = _tile(center, k, zero)
        aw = _tile(scale, k, zero)
        bw = _tile(shift, k, zero)
        for b in prange((N + seg - 1) // seg):
            r0, full, r1 = _block(b, N, seg, k)
            for r in range(r0, full, k):
                xr = x[r * C:(r + k) * C]
                yr = y[r * C:(r + k) * C]
                for i in range(W):
                    store(yr, i, _act((load(xr, i) - cw[i]) * aw[i] + bw[i], slope, one))
            for r in range(full, r1):
                xr = x[r * C:(r + 1) * C]
                yr = y[r * C:(r + 1) * C]
                for i in range(C):
                    store(yr, i, _act((load(xr, i) - cw[i]) * aw[i] + bw[i], slope, one))
    else:
        per = (S + seg - 1) // seg
        for j in prange(N * C * per):
            c, start, n = _segment(j, per, S, seg, C)
            _plane_affine(x[start:start + n], y[start:start + n], center[c], scale[c], shift[c],
                          slope, one)


def _forward(x, y, N, C, S, seg, weight, bias, running_mean, running_var, tracked,
             momentum, eps, flags, saved, slope, zero):
    """Training forward: batch statistics, normalization into y (then the activation, in
    the act tables: ``slope`` as _act takes it), running statistics.

    ``saved`` (2, C) float64 receives the mean and the biased variance for the backward.
    ``tracked`` is num_batches_tracked as a one-element int64 array. ``zero`` is 0 in the
    compute type (float32 or float64) and selects it.
    """
    mean, var = _batch_stats(x, N, C, S, seg, zero)
    center = np.full(C, zero)
    scale = np.empty_like(center)
    shift = np.empty_like(center)
    for c in range(C):
        invstd = 1.0 / np.sqrt(var[c] + eps)
        a = invstd * load(weight, c) if flags & HAS_W else invstd
        center[c] = mean[c]
        b = load(bias, c) if flags & HAS_B else 0.0
        scale[c] = a
        shift[c] = b - (mean[c] - center[c]) * a  # the part of the mean center misses
    _affine(x, y, N, C, S, seg, center, scale, shift, like(zero, slope), like(zero, 1.0), zero)
    for c in range(C):
        saved[0, c] = mean[c]
        saved[1, c] = var[c]
    if flags & TRACK:
        m = N * S
        unbiased = m / (m - 1) if m > 1 else 1.0
        # A batch whose statistics are not finite in the buffers' dtype leaves every buffer
        # untouched (checked after rounding to that dtype, as the torch-op path does).
        probe = np.empty(2, running_mean.dtype)  # two values of the buffers' dtype
        finite = True
        for c in range(C):
            store(probe, 0, mean[c])
            store(probe, 1, var[c] * unbiased)
            finite = finite and np.isfinite(load(probe, 0)) and np.isfinite(load(probe, 1))
        if finite:
            tracked[0] += 1
            f = 1.0 / tracked[0] if flags & CUMULATIVE else momentum
            for c in range(C):
                rm = load(running_mean, c)
                rv = load(running_var, c)
                store(running_mean, c, rm + f * (mean[c] - rm))
                store(running_var, c, rv + f * (var[c] * unbiased - rv))


def _plane_grad_sums(dys, xs, m, zero):
    """sum(dy) and sum(dy * (x - m)) over one run: pieces of CHUNK values summed in the
    compute type, added in float64."""
    g = 0.0
    gx = 0.0
    n = xs.shape[0]
    for q in range(0, n, CHUNK):
        dyq = dys[q:q + CHUNK]
        xq = xs[q:q + CHUNK]
        a = zero
        b = zero
        for i in range(xq.shape[0]):
            d = load(dyq, i)
            a += d
            b += d * (load(xq, i) - m)
        g += a
        gx += b
    return g, gx


def _plane_grad_input(dys, xs, dxs, m, a, b, e):
    for i in range(xs.shape[0]):
        store(dxs, i, load(dys, i) * a + (load(xs, i) - m) * b + e)


def _grad_sums(dy, x, N, C, S, seg, center, zero):
    """Per channel, in float64: sum(dy) and sum(dy * (x - center))."""
    g = np.zeros(C)
    gx = np.zeros(C)
    if ROWS:
        k = max(1, WIDE // C)
        W = k * C
        cw = _tile(center, k, zero)
        K = (N + seg - 1) // seg
        part = np.empty((K, 2, W))
        for b in prange(K):
            r0, full, r1 = _block(b, N, seg, k)
            pg = part[b, 0]
            pgx = part[b, 1]
            pg[:] = 0.0
            pgx[:] = 0.0
            t1 = np.empty_like(cw)
            t2 = np.empty_like(cw)
            for q in range(r0, full, k * RUN):  # short runs in the compute type, as above
                t1[:] = 0.0
                t2[:] = 0.0
                for r in range(q, min(full, q + k * RUN), k):
                    dyr = dy[r * C:(r + k) * C]
                    xr = x[r * C:(r + k) * C]
                    for i in range(W):
                        d = load(dyr, i)
                        t1[i] += d
                        t2[i] += d * (load(xr, i) - cw[i])
                for i in range(W):
                    pg[i] += t1[i]
                    pgx[i] += t2[i]
            for r in range(full, r1):
                dyr = dy[r * C:(r + 1) * C]
                xr = x[r * C:(r + 1) * C]
                for i in range(C):
                    d = load(dyr, i)
                    pg[i] += d
                    pgx[i] += d * (load(xr, i) - cw[i])
        total = np.zeros((2, W))
        for b in range(K):
            for i in range(W):
                total[0, i] += part[b, 0, i]
                total[1, i] += part[b, 1, i]
        _fold(total[0], C, g)
        _fold(total[1], C, gx)
    else:
        per = (S + seg - 1) // seg
        part = np.empty((N * C * per, 2))
        for j in prange(N * C * per):
            c, start, n = _segment(j, per, S, seg, C)
            part[j, 0], part[j, 1] = _plane_grad_sums(dy[start:start + n], x[start:start + n],
                                                      center[c], zero)
        for j in range(N * C * per):
            c = (j // per) % C
            g[c] += part[j, 0]
            gx[c] += part[j, 1]
    return g, gx


def _grad_input(dy, x, dx, N, C, S, seg, center, k1, k2, k3, zero):
    """dx = k1 * dy + k2 * (x - center) + k3, per channel."""
    if ROWS:
        k = max(1, WIDE // C)
        W = k * C
        cw = _tile(center, k, zero)
        aw = _tile(k1, k, zero)
        bw = _tile(k2, k, zero)
        ew = _tile(k3, k, zero)
        for b in prange((N + seg - 1) // seg):
            r0, full, r1 = _block(b, N, seg, k)
            for r in range(r0, full, k):
                dyr = dy[r * C:(r + k) * C]
                xr = x[r * C:(r + k) * C]
                dxr = dx[r * C:(r + k) * C]
                for i in range(W):
                    store(dxr, i, load(dyr, i) * aw[i] + (load(xr, i) - cw[i]) * bw[i] + ew[i])
            for r in range(full, r1):
                dyr = dy[r * C:(r + 1) * C]
                xr = x[r * C:(r + 1) * C]
                dxr = dx[r * C:(r + 1) * C]
                for i in range(C):
                    store(dxr, i, load(dyr, i) * aw[i] + (load(xr, i) - cw[i]) * bw[i] + ew[i])
    else:
        per = (S + seg - 1) // seg
        for j in prange(N * C * per):
            c, start, n = _segment(j, per, S, seg, C)
            _plane_grad_input(dy[start:start + n], x[start:start + n], dx[start:start + n],
                              center[c], k1[c], k2[c], k3[c])


def _coefficients(c, g, gx, m, saved, weight, grad_weight, grad_bias, flags, zero):
    """dweight[c], dbias[c] and (center, k1, k2, k3) of dx = k1 dy + k2 (x - center) + k3:
    the closed form dx = w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))."""
    invstd = saved[1, c]
    center = like(zero, saved[0, c])
    residual = saved[0, c] - center
    gxhat = invstd * (gx - residual * g)  # sum dy * x_hat
    if flags & NEED_DW:
        store(grad_weight, c, gxhat)
    if flags & NEED_DB:
        store(grad_bias, c, g)
    w = load(weight, c) if flags & HAS_W else 1.0
    return (center, like(zero, w * invstd), like(zero, -w * invstd * invstd * gxhat / m),
            like(zero, w * invstd * (residual * invstd * gxhat - g) / m))


def _backward(dy, x, dx, N, C, S, seg, weight, saved, grad_weight, grad_bias, flags,
              zero):
    """Closed-form backward (see functional._backward): dweight, dbias and dx in two passes.
    ``saved`` (2, C) float64 holds the batch mean and 1/sqrt(var + eps)."""
    center = np.full(C, zero)
    for c in range(C):
        center[c] = saved[0, c]
    g, gx = _grad_sums(dy, x, N, C, S, seg, center, zero)
    k1 = np.empty_like(center)
    k2 = np.empty_like(center)
    k3 = np.empty_like(center)
    for c in range(C):
        center[c], k1[c], k2[c], k3[c] = _coefficients(c, g[c], gx[c], N * S, saved, weight,
                                                       grad_weight, grad_bias, flags, zero)
    if flags & NEED_DX:
        _grad_input(dy, x, dx, N, C, S, seg, center, k1, k2, k3, zero)


def _view(address, n, proto):
    """The n values of ``proto``'s type at ``address`` as an array (n = 0: nothing is read)."""
    return numba.carray(_pointer(address, proto), n)


def _forward_at(x_at, y_at, weight_at, bias_at, mean_at, var_at, tracked_at, rows, N, C, S,
                seg, momentum, eps, flags, proto, param_proto, zero):
    """:func:`_forward` on tensors given by address (torch's ``data_ptr()``), which costs
    less to call than converting each tensor to an array; returns ``saved``. ``rows`` is
    the layout, which :func:`launch` answers by running the table compiled for it."""
    numel = N * C * S
    saved = np.empty((2, C))
    _forward(_view(x_at, numel, proto), _view(y_at, numel, proto), N, C, S, seg,
             _view(weight_at, C if flags & HAS_W else 0, param_proto),
             _view(bias_at, C if flags & HAS_B else 0, param_proto),
             _view(mean_at, C if flags & TRACK else 0, param_proto),
             _view(var_at, C if flags & TRACK else 0, param_proto),
             _view(tracked_at, 1 if flags & TRACK else 0, np.int64(0)), momentum, eps, flags,
             saved, 0.0, zero)
    return saved


def _backward_at(dy_at, x_at, dx_at, weight_at, grad_weight_at, grad_bias_at, saved, rows, N,
                 C, S, seg, eps, flags, proto, param_proto, zero):
    """:func:`_backward` on tensors given by address; ``saved`` holds mean and biased var."""
    numel = N * C * S
    mean_invstd = np.empty((2, C))
    for c in range(C):
        mean_invstd[0, c] = saved[0, c]
        mean_invstd[1, c] = 1.0 / np.sqrt(saved[1, c] + eps)
    _backward(_view(dy_at, numel, proto), _view(x_at, numel, proto),
              _view(dx_at, numel if flags & NEED_DX else 0, proto), N, C, S, seg,
              _view(weight_at, C if flags & HAS_W else 0, param_proto), mean_invstd,
              _view(grad_weight_at, C, param_proto), _view(grad_bias_at, C, param_proto),
              flags, zero)


def _forward_stacked_at(x_at, y_at, weight_at, bias_at, mean_at, var_at, tracked_at, M, N, C,
                        seg, momentum, eps, flags, proto, param_proto, zero):
    """:func:`_forward` on M independent (N, C) row problems stored one after another
    (x and y (M, N, C)), each with its own parameters and buffers ((M, C); tracked (M,)):
    the stacked networks of the lab. Returns ``saved`` (M, 2, C). (Slices of an absent
    tensor's empty view are empty, as the per-problem call expects.)"""
    numel = N * C
    saved = np.empty((M, 2, C))
    xs = _view(x_at, M * numel, proto)
    ys = _view(y_at, M * numel, proto)
    w = _view(weight_at, M * C if flags & HAS_W else 0, param_proto)
    b = _view(bias_at, M * C if flags & HAS_B else 0, param_proto)
    rm = _view(mean_at, M * C if flags & TRACK else 0, param_proto)
    rv = _view(var_at, M * C if flags & TRACK else 0, param_proto)
    tr = _view(tracked_at, M if flags & TRACK else 0, np.int64(0))
    for m in range(M):
        lo, hi = m * C, (m + 1) * C
        _forward(xs[m * numel:(m + 1) * numel], ys[m * numel:(m + 1) * numel], N, C, 1,
                 seg, w[lo:hi], b[lo:hi], rm[lo:hi], rv[lo:hi], tr[m:m + 1], momentum, eps,
                 flags, saved[m], 0.0, zero)
    return saved


def _backward_stacked_at(dy_at, x_at, dx_at, weight_at, grad_weight_at, grad_bias_at, saved, M,
                         N, C, seg, eps, flags, proto, param_proto, zero):
    """:func:`_backward` on the M row problems of :func:`_forward_stacked_at`; ``saved`` is
    what it returned. Gradients of the weight and bias are (M, C)."""
    numel = N * C
    dys = _view(dy_at, M * numel, proto)
    xs = _view(x_at, M * numel, proto)
    dxs = _view(dx_at, M * numel if flags & NEED_DX else 0, proto)
    w = _view(weight_at, M * C if flags & HAS_W else 0, param_proto)
    gw = _view(grad_weight_at, M * C, param_proto)
    gb = _view(grad_bias_at, M * C, param_proto)
    mean_invstd = np.empty((2, C))
    for m in range(M):
        lo, hi = m * C, (m + 1) * C
        for c in range(C):
            mean_invstd[0, c] = saved[m, 0, c]
            mean_invstd[1, c] = 1.0 / np.sqrt(saved[m, 1, c] + eps)
        _backward(dys[m * numel:(m + 1) * numel], xs[m * numel:(m + 1) * numel],
                  dxs[m * numel:(m + 1) * numel], N, C, 1, seg, w[lo:hi], mean_invstd,
                  gw[lo:hi], gb[lo:hi], flags, zero)


# -- BatchNorm fused with its activation: the backward ------------------------------------------
# With g = dy * act'(z), the gradient reaching BN's output z, the backward is BN's closed form
# in g. Each element is read through a coordinate t from which z and x_hat are affine per
# channel: t = x - center, z = t * scale + shift, x_hat = t * invstd - residual * invstd
# (saving the input), or t = act^-1(y) = z, x_hat = (t - bias) / weight (OUTPUT). Then
# sum(g * x_hat) = P * sum(g * t) + Q * sum(g), and dx = k1 * g + k2 * t + k3.
def _act_g_t(dy, v, i, cw, aw, bw, slope, inv_slope, one):
    """(g, t) of element i (see above); cw, aw, bw: center, scale, shift of its channel."""
    if OUTPUT:
        yv = load(v, i)
        t = yv if yv > 0 else yv * inv_slope
        z = t
    else:
        t = load(v, i) - cw
        z = t * aw + bw
    if SILU:
        s = one / (one + np.exp(-z))
        d = s * (one + z * (one - s))
    else:
        d = one if z > 0 else slope  # at z = 0 the slope below, as torch's backward
    return load(dy, i) * d, t


def _plane_act_sums(dys, vs, m, a, b, slope, inv_slope, one, zero):
    """sum(g) and sum(g * t) over one run: CHUNK values summed in the compute type, the
    pieces in float64 (as _plane_grad_sums)."""
    g = 0.0
    gt = 0.0
    n = vs.shape[0]
    for q in range(0, n, CHUNK):
        dyq = dys[q:q + CHUNK]
        vq = vs[q:q + CHUNK]
        sg = zero
        sgt = zero
        for i in range(vq.shape[0]):
            gi, ti = _act_g_t(dyq, vq, i, m, a, b, slope, inv_slope, one)
            sg += gi
            sgt += gi * ti
        g += sg
        gt += sgt
    return g, gt


def _plane_act_input(dys, vs, dxs, m, a, b, slope, inv_slope, one, k1, k2, k3):
    for i in range(vs.shape[0]):
        gi, ti = _act_g_t(dys, vs, i, m, a, b, slope, inv_slope, one)
        store(dxs, i, gi * k1 + ti * k2 + k3)


def _act_sums(dy, v, N, C, S, seg, center, scale, shift, slope, inv_slope, one, zero):
    """Per channel, in float64: sum(g) and sum(g * t)."""
    g = np.zeros(C)
    gt = np.zeros(C)
    if ROWS:
        k = max(1, WIDE // C)
        W = k * C
        cw = _tile(center, k, zero)
        aw = _tile(scale, k, zero)
        bw = _tile(shift, k, zero)
        K = (N + seg - 1) // seg
        part = np.empty((K, 2, W))
        for b in prange(K):
            r0, full, r1 = _block(b, N, seg, k)
            pg = part[b, 0]
            pgt = part[b, 1]
            pg[:] = 0.0
            pgt[:] = 0.0
            t1 = np.empty_like(cw)
            t2 = np.empty_like(cw)
            for q in range(r0, full, k * RUN):  # short runs in the compute type
                t1[:] = 0.0
                t2[:] = 0.0
                for r in range(q, min(full, q + k * RUN), k):
                    dyr = dy[r * C:(r + k) * C]
                    vr = v[r * C:(r + k) * C]
                    for i in range(W):
                        gi, ti = _act_g_t(dyr, vr, i, cw[i], aw[i], bw[i], slope, inv_slope, one)
                        t1[i] += gi
                        t2[i] += gi * ti
                for i in range(W):
                    pg[i] += t1[i]
                    pgt[i] += t2[i]
            for r in range(full, r1):
                dyr = dy[r * C:(r + 1) * C]
                vr = v[r * C:(r + 1) * C]
                for i in range(C):
                    gi, ti = _act_g_t(dyr, vr, i, cw[i], aw[i], bw[i], slope, inv_slope, one)
                    pg[i] += gi
                    pgt[i] += gi * ti
        total = np.zeros((2, W))
        for b in range(K):
            for i in range(W):
                total[0, i] += part[b, 0, i]
                total[1, i] += part[b, 1, i]
        _fold(total[0], C, g)
        _fold(total[1], C, gt)
    else:
        per = (S + seg - 1) // seg
        part = np.empty((N * C * per, 2))
        for j in prange(N * C * per):
            c, start, n = _segment(j, per, S, seg, C)
            part[j, 0], part[j, 1] = _plane_act_sums(dy[start:start + n], v[start:start + n],
                                                     center[c], scale[c], shift[c], slope,
                                                     inv_slope, one, zero)
        for j in range(N * C * per):
            c = (j // per) % C
            g[c] += part[j, 0]
            gt[c] += part[j, 1]
    return g, gt


def _act_input(dy, v, dx, N, C, S, seg, center, scale, shift, slope, inv_slope, one, k1, k2,
               k3, zero):
    """dx = k1 * g + k2 * t + k3, per channel."""
    if ROWS:
        k = max(1, WIDE // C)
        W = k * C
        cw = _tile(center, k, zero)
        aw = _tile(scale, k, zero)
        bw = _tile(shift, k, zero)
        k1w = _tile(k1, k, zero)
        k2w = _tile(k2, k, zero)
        k3w = _tile(k3, k, zero)
        for b in prange((N + seg - 1) // seg):
            r0, full, r1 = _block(b, N, seg, k)
            for r in range(r0, full, k):
                dyr = dy[r * C:(r + k) * C]
                vr = v[r * C:(r + k) * C]
                dxr = dx[r * C:(r + k) * C]
                for i in range(W):
                    gi, ti = _act_g_t(dyr, vr, i, cw[i], aw[i], bw[i], slope, inv_slope, one)
                    store(dxr, i, gi * k1w[i] + ti * k2w[i] + k3w[i])
            for r in range(full, r1):
                dyr = dy[r * C:(r + 1) * C]
                vr = v[r * C:(r + 1) * C]
                dxr = dx[r * C:(r + 1) * C]
                for i in range(C):
                    gi, ti = _act_g_t(dyr, vr, i, cw[i], aw[i], bw[i], slope, inv_slope, one)
                    store(dxr, i, gi * k1w[i] + ti * k2w[i] + k3w[i])
    else:
        per = (S + seg - 1) // seg
        for j in prange(N * C * per):
            c, start, n = _segment(j, per, S, seg, C)
            _plane_act_input(dy[start:start + n], v[start:start + n], dx[start:start + n],
                             center[c], scale[c], shift[c], slope, inv_slope, one, k1[c], k2[c],
                             k3[c])


def _backward_act(dy, v, dx, N, C, S, seg, weight, bias, saved, grad_weight, grad_bias, eps,
                  flags, slope, zero):
    """The backward of _forward in an act table: dweight, dbias and dx in two passes over
    dy and v (x, or y with OUTPUT). ``saved`` (2, C) float64: mean and biased variance."""
    center = np.full(C, zero)
    scale = np.empty_like(center)
    shift = np.empty_like(center)
    P = np.empty(C)
    Q = np.empty(C)
    for c in range(C):  # z's map exactly as _forward formed it, so act'(z) sees its signs
        invstd = 1.0 / np.sqrt(saved[1, c] + eps)
        w = load(weight, c) if flags & HAS_W else 1.0
        bc = load(bias, c) if flags & HAS_B else 0.0
        a = invstd * w
        center[c] = saved[0, c]
        residual = saved[0, c] - center[c]
        scale[c] = a
        shift[c] = bc - residual * a
        if OUTPUT:  # x_hat = (z - bias) / weight, |weight| raised to eps (Rota Bulo et al.)
            wc = max(abs(w), eps)
            wc = -wc if w < 0 else wc
            P[c] = 1.0 / wc
            Q[c] = -bc / wc
        else:
            P[c] = invstd
            Q[c] = -residual * invstd
    one = like(zero, 1.0)
    sl = like(zero, slope)
    inv_slope = like(zero, 1.0 / slope if slope != 0 else 0.0)
    g, gt = _act_sums(dy, v, N, C, S, seg, center, scale, shift, sl, inv_slope, one, zero)
    m = N * S
    k1 = np.empty_like(center)
    k2 = np.empty_like(center)
    k3 = np.empty_like(center)
    for c in range(C):
        gx = P[c] * gt[c] + Q[c] * g[c]  # sum(g * x_hat)
        store(grad_weight, c, gx)
        store(grad_bias, c, g[c])
        invstd = 1.0 / np.sqrt(saved[1, c] + eps)
        a = invstd * (load(weight, c) if flags & HAS_W else 1.0)
        k1[c] = a
        k2[c] = -a * P[c] * gx / m
        k3[c] = -a * (g[c] + Q[c] * gx) / m
    if flags & NEED_DX:
        _act_input(dy, v, dx, N, C, S, seg, center, scale, shift, sl, inv_slope, one, k1, k2,
                   k3, zero)


def _forward_act_at(x_at, y_at, weight_at, bias_at, mean_at, var_at, tracked_at, rows, N, C,
                    S, seg, momentum, eps, flags, slope, proto, param_proto, zero):
    """:func:`_forward_at` in an act table: y = act(BN(x)); returns ``saved``."""
    numel = N * C * S
    saved = np.empty((2, C))
    _forward(_view(x_at, numel, proto), _view(y_at, numel, proto), N, C, S, seg,
             _view(weight_at, C if flags & HAS_W else 0, param_proto),
             _view(bias_at, C if flags & HAS_B else 0, param_proto),
             _view(mean_at, C if flags & TRACK else 0, param_proto),
             _view(var_at, C if flags & TRACK else 0, param_proto),
             _view(tracked_at, 1 if flags & TRACK else 0, np.int64(0)), momentum, eps, flags,
             saved, slope, zero)
    return saved


def _backward_act_at(dy_at, v_at, dx_at, weight_at, bias_at, grad_weight_at, grad_bias_at,
                     rows, N, C, S, seg, saved, eps, flags, slope, proto, param_proto, zero):
    """:func:`_backward_act` on tensors given by address."""
    numel = N * C * S
    _backward_act(_view(dy_at, numel, proto), _view(v_at, numel, proto),
                  _view(dx_at, numel if flags & NEED_DX else 0, proto), N, C, S, seg,
                  _view(weight_at, C if flags & HAS_W else 0, param_proto),
                  _view(bias_at, C if flags & HAS_B else 0, param_proto), saved,
                  _view(grad_weight_at, C, param_proto), _view(grad_bias_at, C, param_proto),
                  eps, flags, slope, zero)


_HELPERS = ("_block", "_segment", "_tile", "_fold", "_rows_block_stats", "_plane_stats",
            "_merge", "_batch_stats", "_plane_affine", "_affine", "_forward", "_plane_grad_sums",
            "_plane_grad_input", "_grad_sums", "_grad_input", "_coefficients", "_backward",
            "_act", "_act_g_t", "_plane_act_sums", "_plane_act_input", "_act_sums", "_act_input",
            "_backward_act")
_INLINE = ("_block", "_segment", "_tile", "_fold", "_plane_stats", "_merge", "_plane_affine",
           "_plane_grad_sums", "_plane_grad_input", "_coefficients", "_act", "_act_g_t",
           "_plane_act_sums", "_plane_act_input")
_THREADED = ("_batch_stats", "_affine", "_grad_sums", "_grad_input", "_act_sums",
             "_act_input")  # with parallel loops


_ENTRIES = {"forward": _forward_at, "backward": _backward_at}
# the act tables' entries; a table of BatchNorm's answers the names "forward_act",
# "forward_act_silu", "backward_act", "backward_act_silu", "backward_act_out" from them
_ACT_ENTRIES = {"forward": _forward_act_at, "backward": _backward_act_at}
_STACKED = {"forward_stacked": _forward_stacked_at, "backward_stacked": _backward_stacked_at}
_compiled: dict[tuple, dict] = {}
_tables_lock = threading.Lock()


def compiled(parallel: bool, rows: bool = True) -> dict:
    """The kernels of one layout (``rows``, else planes; the stacked kernels are rows'),
    threaded or single-threaded. Nothing is compiled here: Numba compiles a kernel on its
    first call per type signature, so a run compiles only the layouts, dtypes and threading
    it uses, and keeps the result in its disk cache (see :func:`_jit`) for later runs."""
    if _pending:
        _await(parallel, rows)
    return _table_of(parallel, rows)


def _table_of(parallel: bool, rows: bool, act: tuple | None = None) -> dict:
    key = (parallel, rows, act)
    table = _compiled.get(key)
    if table is None:
        with _tables_lock:
            table = _compiled.get(key) or _table(parallel, rows, act)
            _compiled[key] = table
    return table


class _Table(dict):
    """BatchNorm's kernels of one layout and threading; the fused BatchNorm + activation
    kernels ("forward_act", "backward_act_silu_out", ...) are looked up in their own
    tables, built on first use."""

    def __init__(self, entries: dict, parallel: bool, rows: bool) -> None:
        super().__init__(entries)
        self.parallel, self.rows = parallel, rows

    def __missing__(self, kernel: str):
        base, _, variant = kernel.partition("_act")
        parts = variant.split("_")
        if base not in _ACT_ENTRIES or set(parts) - {"", "silu", "out"}:
            raise KeyError(kernel)
        # the forward does not depend on OUTPUT: one compiled forward serves both saves
        act = ("silu" in parts, "out" in parts and base == "backward")
        fn = _table_of(self.parallel, self.rows, act)[base]
        self[kernel] = fn
        return fn


def _table(parallel: bool, rows: bool, act: tuple | None = None) -> dict:
    """The kernels of one layout and threading: BatchNorm's, or with ``act = (silu,
    output)`` those of BatchNorm fused with its activation."""
    _watch_compiles()
    env = dict(globals())  # the variants call each other through this namespace
    env["ROWS"] = rows
    env["ACT"], (env["SILU"], env["OUTPUT"]) = act is not None, act or (False, False)
    env["_view"] = njit(inline="always")(_view)
    suffix = ("_rows" if rows else "_planes") + ("_par" if parallel else "_ser")
    if act is not None:  # names of their own, for the disk cache (see _variant)
        suffix = "_act" + ("_silu" if act[0] else "") + ("_out" if act[1] else "") + suffix
    for name in _HELPERS:
        env[name] = _variant(globals()[name], parallel and name in _THREADED, suffix, env)
    if act is not None:
        return {kernel: _variant(fn, False, suffix, env) for kernel, fn in _ACT_ENTRIES.items()}
    entries = _ENTRIES | (_STACKED if rows else {})
    return _Table({kernel: _variant(fn, False, suffix, env) for kernel, fn in entries.items()},
                  parallel, rows)


def _variant(fn, threaded: bool, suffix: str, env: dict):
    """``fn`` compiled under a name of its own per table (``suffix``), so Numba's on-disk
    cache keeps the tables' builds apart; its globals are ``env``. The small per-run helpers
    are inlined where they are called."""
    variant = type(fn)(fn.__code__, env, fn.__name__ + suffix)
    variant.__qualname__ = variant.__name__
    variant.__module__ = fn.__module__
    inline = "always" if fn.__name__ in _INLINE else "never"
    return _jit(variant, parallel=threaded, fastmath=_FASTMATH, nogil=True, inline=inline,
                error_model="numpy")


_cache_failure: str | None = None  # why compiled kernels are not cached on disk, if so


def _jit(fn, **options):
    """``njit(**options)(fn)``, cached on disk where Numba finds a writable place:
    ``NUMBA_CACHE_DIR`` if set, else the ``__pycache__`` folder beside this file, else the
    user's cache folder (``~/.cache/numba``). Where none is writable the kernels still run,
    compiled anew in each process, and the log says so once."""
    global _cache_failure
    if _cache_failure is None:
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            _cache_failure = str(exc)
            log.warning("bnlab: no writable folder to cache the compiled BatchNorm kernels in "
                        "(%s); they compile again in every process. Set NUMBA_CACHE_DIR to a "
                        "writable folder to keep them", exc)
    return njit(cache=False, **options)(fn)


# what the compile log names: a kernel's layout and dtype, from its table and arguments
_DTYPES = {"float32": "float32", "float64": "float64", "int16": "float16", "uint16": "bfloat16"}
_compiling = {"depth": 0, "since": 0.0}
_watching = False


_STATUS = "compiling BatchNorm kernels (first run only)"


def _watch_compiles() -> None:
    """Log, at INFO, when a kernel is compiled (not when Numba loads it from its cache): what,
    then how long it took and where it is cached. The records carry ``progress_status``, what
    a progress display may show meanwhile ("" once done): a first run otherwise sits silent
    while the kernels compile."""
    global _watching
    if _watching:
        return
    _watching = True
    from numba.core import event

    class Listener(event.Listener):
        def on_start(self, ev):
            if _ours(ev):
                if _compiling["depth"] == 0:
                    _compiling["since"] = time.perf_counter()
                    log.info("compiling BatchNorm kernels (%s; first use only, then cached)",
                             _what(ev), extra={"progress_status": _STATUS})
                _compiling["depth"] += 1

        def on_end(self, ev):
            if _ours(ev):
                _compiling["depth"] -= 1
                if _compiling["depth"] == 0:
                    log.info("compiled BatchNorm kernels (%s) in %.1f s%s", _what(ev),
                             time.perf_counter() - _compiling["since"], _cached_in(ev),
                             extra={"progress_status": ""})

    event.register("numba:compile", Listener())


def _ours(ev) -> bool:
    """Whether a compile event is of a kernel of the tables (not of an overload's lambda)."""
    fn = ev.data["dispatcher"].py_func
    return getattr(fn, "__module__", None) == __name__ and fn.__name__.endswith(_TABLES)


_TABLES = ("_rows_ser", "_rows_par", "_planes_ser", "_planes_par")  # the variants' suffixes


def _what(ev) -> str:
    """'forward_stacked, float32, rows' from a compile event of an entry kernel."""
    fn = ev.data["dispatcher"].py_func
    name, _, suffix = fn.__name__.lstrip("_").rpartition("_at_")
    try:
        proto = ev.data["args"][fn.__code__.co_varnames.index("proto")]
        dtype = _DTYPES.get(str(proto), str(proto))
    except (ValueError, IndexError):  # a helper compiled on its own
        return fn.__name__.lstrip("_")
    *variant, layout, threads = suffix.split("_")  # variant: ["act", "silu", "out"] or none
    name = "_".join([name] + variant[1:]) if variant else name
    return f"{name}, {dtype}, {layout}" + (", threaded" if threads == "par" else "")


def _cached_in(ev) -> str:
    cache = getattr(ev.data["dispatcher"], "_cache", None)
    path = getattr(cache, "cache_path", None)
    return f"; cached in {path}" if path else "; not cached"


if _failure is None and os.environ.get("BNLAB_KERNELS", "1") == "0":
    _failure = "switched off by BNLAB_KERNELS=0"


def available() -> bool:
    """Whether the compiled kernels are in use: Numba importable, not switched off by the
    environment variable ``BNLAB_KERNELS=0`` (read at import), and no compile failure in this
    process."""
    return _failure is None


def unavailable_reason() -> str | None:
    """Why the kernels are not in use, or None."""
    return _failure


def describe() -> str:
    """Which code computes bnlab's training BatchNorm on CPU in this process, for provenance:
    the Numba version and its threading layer, or the torch-op path and why."""
    if not available():
        return f"off, torch-op path ({_failure})"
    try:
        layer = numba.threading_layer()
    except ValueError:  # no threaded kernel has run yet
        layer = "none started"
    return f"Numba {numba.__version__}, threading layer {layer}"


def disable(reason: str) -> None:
    """Stop using the kernels in this process, keeping why."""
    global _failure
    _failure = reason


def plan(rows: bool, N: int, C: int, S: int, threads: int) -> tuple[bool, int]:
    """(threaded?, segment size) for a kernel call.

    Serial below PARALLEL_MIN values or with one thread. Rows: blocks of about ROWS_BLOCK
    values in whole wide rows, at least one block per thread. Planes: segments of at most
    SEGMENT values."""
    parallel = threads > 1 and N * C * S >= PARALLEL_MIN
    if rows:
        k = max(1, WIDE // C)
        per_thread = -(-N // (threads if parallel else 1))
        if C > ROWS_BLOCK:  # rows longer than a block: one block per thread, so the per-block
            return parallel, per_thread  # partial sums (3 * C values each) stay few
        seg = max(k, ROWS_BLOCK // C // k * k)
        if parallel:
            seg = min(seg, max(k, per_thread // k * k))
        return parallel, min(seg, N)
    return parallel, min(S, SEGMENT)


_launch_lock = threading.Lock()
_threadsafe: bool | None = None  # whether the threading layer allows concurrent launches
_threads_failure: str | None = None


def launch(kernel, parallel: bool, threads: int, *args):
    """Call ``kernel`` (from :func:`compiled`) on ``threads`` threads when ``parallel``;
    ``args`` as the kernel takes them, the layout (``rows``) eighth, which picks the table.

    Numba's threaded kernels use its threading layer (TBB, OpenMP or its own workqueue,
    whichever loads here). The workqueue layer aborts the process when two Python threads
    launch at once, so launches are serialized until the layer is known to be another; a
    layer that cannot load at all leaves the single-threaded kernels in use."""
    global _threadsafe, _threads_failure
    rows = args[7]
    if not parallel or _threads_failure is not None:
        return compiled(False, rows)[kernel](*args)
    if _threadsafe:
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        return compiled(True, rows)[kernel](*args)
    with _launch_lock:
        try:
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
            out = compiled(True, rows)[kernel](*args)
        except ValueError as exc:  # "No threading layer could be loaded"
            if "threading layer" not in str(exc):
                raise
            _threads_failure = str(exc)
            return compiled(False, rows)[kernel](*args)
        _threadsafe = numba.threading_layer() != "workqueue"
        return out


# -- compiling ahead, side by side -----------------------------------------------------------
# A first run would otherwise compile its kernels one after the other, in the run's own
# process, at its first step. prepare() compiles each in a process of its own, which writes
# it to the disk cache; the run's first call waits for that process and loads the kernel.
_pending: dict[tuple[str, str, bool, bool], tuple[subprocess.Popen, float]] = {}
_pending_lock = threading.Lock()
_CHILD = """import importlib.util, os, sys, threading, time
path, kernel, dtype, parallel, rows, parent = sys.argv[1:]
def orphaned():  # the run that asked is gone: stop
    while os.getppid() == int(parent):
        time.sleep(0.2)
    os._exit(1)
threading.Thread(target=orphaned, daemon=True).start()
spec = importlib.util.spec_from_file_location("bnlab.nn._kernels", path)
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
module._sample_call(kernel, dtype, parallel == "1", rows == "1")
"""


def prepare(kernels, dtype: str = "float32", parallel: bool = False, rows: bool = True
            ) -> list[str]:
    """Start compiling ``kernels`` (names of the tables' entries: "forward", "backward",
    "forward_stacked", "backward_stacked") for ``dtype`` tensors ("float32" or "float64",
    parameters of the same dtype) where the disk cache lacks them, each in a background
    process of its own: they compile side by side, and beside the caller's own start-up.
    The caller's first call of such a kernel waits for its process, then loads the kernel from
    the cache (or compiles it itself if the process failed). Returns the kernels started;
    nothing is started where the kernels are off, already cached, or cannot be cached."""
    started: list[str] = []
    if not available() or not sys.executable:
        return started
    for kernel in kernels:
        key = (kernel, dtype, parallel, rows)
        with _pending_lock:
            if key in _pending or _cached(*key):
                continue
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _CHILD, __file__, kernel, dtype, str(int(parallel)),
                     str(int(rows)), str(os.getpid())], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except OSError as exc:  # no process to spare: compile at the first call
                log.debug("bnlab: kernels compile in this process (%s)", exc)
                return started
            _pending[key] = proc, time.perf_counter()
            started.append(kernel)
    return started


def _cached(kernel: str, dtype: str, parallel: bool, rows: bool) -> bool:
    """Whether the disk cache holds ``kernel`` for the types :func:`_sample` gives; True
    where that cannot be told (nothing to gain from compiling elsewhere then)."""
    try:
        dispatcher = _table_of(parallel, rows)[kernel]
        index = dispatcher._cache._cache_file._load_index()
        args, _ = _sample(kernel, dtype, rows)
        sig = tuple(numba.typeof(a) for a in args)
        magic = dispatcher.targetctx.codegen().magic_tuple()
    except Exception:  # no disk cache, or a Numba whose cache is laid out otherwise
        return True
    return any(key[0] == sig and key[1] == magic for key in index)


def _sample(kernel: str, dtype: str, rows: bool) -> tuple[tuple, list]:
    """Arguments of the types :mod:`bnlab.nn._ops` passes to ``kernel`` for ``dtype`` tensors
    and parameters, on small arrays; and the arrays, to keep alive during the call."""
    t = np.dtype(dtype).type
    n, c, zero = 2, 2, t(0)
    x, y, dx = (np.zeros(n * c, t) for _ in range(3))
    w, b, mean, var = (np.ones(c, t) for _ in range(4))
    tracked = np.zeros(1, np.int64)
    keep = [x, y, dx, w, b, mean, var, tracked]
    at = [a.ctypes.data for a in keep]
    if kernel == "forward_stacked":
        args = (*at[:2], *at[3:8], 1, n, c, n, 0.1, 1e-5, HAS_W | HAS_B | TRACK, zero, zero, zero)
    elif kernel == "backward_stacked":
        saved = np.ones((1, 2, c))
        keep.append(saved)
        args = (*at[:4], at[4], at[5], saved, 1, n, c, n, 1e-5,
                HAS_W | NEED_DX | NEED_DW | NEED_DB, zero, zero, zero)
    elif kernel == "forward":
        args = (*at[:2], *at[3:8], rows, n, c, 1, n, 0.1, 1e-5, HAS_W | HAS_B | TRACK, zero,
                zero, zero)
    elif kernel == "backward":
        saved = np.ones((2, c))
        keep.append(saved)
        args = (*at[:4], at[4], at[5], saved, rows, n, c, 1, n, 1e-5,
                HAS_W | NEED_DX | NEED_DW | NEED_DB, zero, zero, zero)
    else:
        raise ValueError(f"no kernel named {kernel!r}")
    return args, keep


def _sample_call(kernel: str, dtype: str, parallel: bool, rows: bool) -> None:
    """Compile ``kernel`` (into the disk cache) by calling it on :func:`_sample`."""
    args, keep = _sample(kernel, dtype, rows)
    compiled(parallel, rows)[kernel](*args)
    del keep


def _await(parallel: bool, rows: bool) -> None:
    """Wait for the processes compiling kernels of the (parallel, rows) table, saying so."""
    with _pending_lock:
        keys = [key for key in _pending if key[2:] == (parallel, rows)]
        if not keys:
            return
        running = [key for key in keys if _pending[key][0].poll() is None]
        what = f"{', '.join(k[0] for k in keys)}, {keys[0][1]}"
        since = min(_pending[key][1] for key in keys)
        if running:
            log.info("compiling BatchNorm kernels (%s; first use only, then cached)", what,
                     extra={"progress_status": _STATUS})
        for key in keys:  # they leave _pending once done: other threads see them till then
            proc, _ = _pending[key]
            try:
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:  # stuck: compile here instead
                proc.kill()
                proc.wait()
        for key in keys:
            del _pending[key]
        if running:
            log.info("compiled BatchNorm kernels (%s) in %.1f s, side by side", what,
                     time.perf_counter() - since, extra={"progress_status": ""})
