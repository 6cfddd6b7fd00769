r"""Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
Dependence in Batch-Normalized Models", Algorithm 1).

BN normalizes each training batch with its own statistics and inference with the running
ones; for small or non-i.i.d. batches the two differ, and the network is trained on one
normalization and run with another. Batch Renorm corrects the batch normalization toward
the running statistics with a per-channel affine map that is held constant in backward:

.. math::
    r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big), \qquad
    d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big), \qquad
    \hat{x} = \frac{x - \mu_B}{\sigma_B} \cdot r + d, \qquad y = \gamma \hat{x} + \beta

with :math:`\sigma_B = \sqrt{\mathrm{Var}_B + \epsilon}` (biased batch variance) and
:math:`\mu, \sigma = \sqrt{\mathrm{Var} + \epsilon}` the running statistics before this step's
update. Unclipped, :math:`\hat{x} = (x - \mu) / \sigma`: training normalizes as inference does.

Since r and d are constants for autograd, :math:`y = (\gamma r)\, x_{BN} + (\gamma d + \beta)`
with :math:`x_{BN}` BN's normalized input: the layer is bnlab's BN step (closed-form backward,
running-statistics update, compiled kernels) with an effective weight and bias, and autograd
gives :math:`\partial L/\partial\gamma = \sum \partial L/\partial y \cdot \hat{x}`,
:math:`\partial L/\partial\beta = \sum \partial L/\partial y` and BN's input gradient scaled by r.
Only the statistics step is added; the layer is not copied.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import _ops
from . import functional as F
from ._errors import as_float, as_int
from .modules import _BatchNorm

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "renorm_correction",
           "renorm_limits"]


def renorm_limits(step: int, r_max: float, d_max: float, warmup_steps: int = 0,
                  ramp_steps: int = 0) -> tuple[float, float]:
    """The clip limits ``(r_max_t, d_max_t)`` at training step ``step`` (0 for the first).

    Plain BN (``(1, 0)``) for the first ``warmup_steps`` steps, then both limits grow
    linearly together over ``ramp_steps`` steps to ``(r_max, d_max)``::

        frac    = 1 if ramp_steps == 0 else min(1, (step - warmup_steps) / ramp_steps)
        r_max_t = 1 + (r_max - 1) * frac,   d_max_t = d_max * frac
    """
    if step < warmup_steps:
        return 1.0, 0.0
    if ramp_steps == 0 or step - warmup_steps >= ramp_steps:
        return float(r_max), float(d_max)  # exactly, not 1 + (r_max - 1) * 1.0
    frac = (step - warmup_steps) / ramp_steps
    return 1.0 + (r_max - 1.0) * frac, d_max * frac


def renorm_correction(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor,
                      eps: float, r_max: float, d_max: float) -> tuple[Tensor, Tensor]:
    """Algorithm 1's ``r`` and ``d`` per channel, detached, in the dtype of ``mean``.

    Args:
        mean, var: the batch mean and biased batch variance, (C,).
        running_mean, running_var: the running statistics before this step's update, (C,).
        eps: added to both variances, as BN adds it.
        r_max, d_max: the clip limits of this step (>= 1 and >= 0).
    """
    if not (r_max >= 1 and d_max >= 0):  # else the clip's lower bound passes its upper one
        raise ValueError(f"renorm_correction needs r_max >= 1 and d_max >= 0 (got r_max={r_max!r}, "
                         f"d_max={d_max!r})")
    dtype = mean.dtype
    sigma_batch = torch.sqrt(var.detach() + eps)
    sigma = torch.sqrt(running_var.detach().to(dtype) + eps)
    r = (sigma_batch / sigma).clamp(1.0 / r_max, r_max)
    d = ((mean.detach() - running_mean.detach().to(dtype)) / sigma).clamp(-d_max, d_max)
    return r, d


def _renorm_hyperparameters(r_max: Any, d_max: Any, warmup_steps: Any, ramp_steps: Any,
                            owner: str = "") -> tuple[float, float, int, int]:
    """(r_max, d_max, warmup_steps, ramp_steps) checked, as two floats and two ints; a
    message names ``owner`` (e.g. "BatchRenorm2d.") before the attribute when given."""
    limits = []
    for name, v, low in (("r_max", r_max, 1), ("d_max", d_max, 0)):
        value = as_float(v)
        if value is None or not math.isfinite(value) or value < low:
            raise ValueError(f"{owner}{name} must be a finite number >= {low} (got {v!r})")
        limits.append(value)
    steps = [as_int(v, f"{owner}{name}", 0, "an int >= 0")
             for name, v in (("warmup_steps", warmup_steps), ("ramp_steps", ramp_steps))]
    return limits[0], limits[1], steps[0], steps[1]


class _BatchRenorm(_BatchNorm):
    """Shared hyperparameters and training step of the BatchRenorm layers (see
    :class:`BatchRenorm2d`); state, eval and input checks are :class:`_BatchNorm`'s."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01,
                 affine: bool = True, track_running_stats: bool = True,
                 device: Any = None, dtype: Any = None, *, bias: bool = True,
                 r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 0,
                 ramp_steps: int = 0) -> None:
        r_max, d_max, warmup_steps, ramp_steps = _renorm_hyperparameters(
            r_max, d_max, warmup_steps, ramp_steps)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_steps = warmup_steps
        self.ramp_steps = ramp_steps

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}")

    def _forward_plain(self, x: Tensor) -> Tensor:
        raise RuntimeError("BatchRenorm has no TorchScript or forward-mode AD form yet; "
                           "use it eager (reverse mode) or with torch.compile")

    def _has_running_stats(self) -> bool:
        return self.running_mean is not None and self.running_var is not None

    def limits(self) -> tuple[float, float]:
        """``(r_max_t, d_max_t)``: the clip limits of the next training step.

        The step is ``num_batches_tracked`` (batches whose statistics were folded into the
        running ones); reading it costs one host synchronisation on an accelerator, paid only
        when ``warmup_steps`` or ``ramp_steps`` is set. Without running statistics the layer is
        BatchNorm, and the limits are ``(1.0, 0.0)``. The hyperparameters are checked here,
        where they are used, so a value set after construction is checked too."""
        r_max, d_max, warmup, ramp = _renorm_hyperparameters(
            self.r_max, self.d_max, self.warmup_steps, self.ramp_steps, f"{type(self).__name__}.")
        if not (self.track_running_stats and self._has_running_stats()):
            return 1.0, 0.0
        step = 0
        if (warmup or ramp) and self.num_batches_tracked is not None:
            step = int(self.num_batches_tracked)
        return renorm_limits(step, r_max, d_max, warmup, ramp)

    def _normalize_batch(self, x: Tensor, update: bool) -> Tensor:
        # update is False in eval without running statistics: nothing to correct toward.
        if not (update and self._has_running_stats()):
            return super()._normalize_batch(x, update)
        r_max, d_max = self.limits()
        if r_max == 1.0 and d_max == 0.0:  # r = 1, d = 0: BatchNorm itself, to the last bit
            return super()._normalize_batch(x, update)
        weight, bias, running_mean, running_var, tracked = self._state()
        pdtype = running_mean.dtype if weight is None else weight.dtype
        # r and d in at least the compute dtype (float32 for half inputs), then the
        # effective parameters in the parameters' dtype, as the BN step expects them.
        dtype = torch.promote_types(F.compute_dtype(x.dtype), pdtype)
        stats = F.batch_stats(x.detach(), F.reduce_dims(x.dim()))  # no gradient through r, d
        r, d = renorm_correction(stats.full_mean().reshape(-1).to(dtype),
                                 stats.var.reshape(-1).to(dtype), running_mean, running_var,
                                 self.eps, r_max, d_max)
        # y = weight * (x_bn * r + d) + bias = (weight * r) * x_bn + (weight * d + bias)
        if weight is None:
            weight_eff, bias_eff = r, d
        else:
            w = weight.to(dtype)
            weight_eff, bias_eff = w * r, w * d
        if bias is not None:
            bias_eff = bias_eff + bias.to(dtype)
        # the running statistics receive the batch's, exactly as BN's do (Algorithm 1, the
        # moving averages), so the state and eval are BatchNorm's
        return _ops.train_forward(x, weight_eff.to(pdtype), bias_eff.to(pdtype), running_mean,
                                  running_var, tracked, self.momentum, self.eps)


_DOC = r"""Batch Renormalization over a {shape} input (Ioffe 2017, Algorithm 1).

    .. math::
        r = \mathrm{{clip}}_{{[1/r_{{max}},\, r_{{max}}]}}\Big(\frac{{\sigma_B}}{{\sigma}}\Big),
        \quad d = \mathrm{{clip}}_{{[-d_{{max}},\, d_{{max}}]}}\Big(\frac{{\mu_B - \mu}}{{\sigma}}\Big),
        \quad y = \gamma \Big(\frac{{x - \mu_B}}{{\sigma_B}}\, r + d\Big) + \beta

    Per channel over {over}: :math:`\mu_B` and :math:`\sigma_B = \sqrt{{\mathrm{{Var}}_B +
    \epsilon}}` are the batch mean and the root of the biased batch variance, :math:`\mu` and
    :math:`\sigma = \sqrt{{\mathrm{{Var}} + \epsilon}}` the running mean and variance as they
    were before this step. r and d are computed in float32 at least and are constants for
    autograd (no gradient flows through them); gradients flow through :math:`\mu_B` and
    :math:`\sigma_B` as in BatchNorm. With r = 1 and d = 0 the layer is BatchNorm.

    Everything else is :class:`BatchNorm{dim}d`'s: the running statistics are updated as BN
    updates them (the mean and the *unbiased* variance, with momentum; the paper averages
    :math:`\sigma` itself), so ``state_dict`` has exactly BN's keys and loads into
    ``torch.nn.BatchNorm{dim}d`` for inference, and eval with running statistics is BN's
    eval. With ``track_running_stats=False`` there are no running statistics to correct
    toward, and the layer is BatchNorm exactly. Momentum is the weight of the new value, as
    in PyTorch: ``running = (1 - momentum) * running + momentum * batch`` (Keras'
    ``renorm_momentum=0.99`` is ``0.01`` here); ``momentum=None`` gives the cumulative
    average. The default 0.01 is slower than BN's 0.1: the running statistics now enter
    every training step, and should average over many batches.

    The limits follow a schedule over ``t = num_batches_tracked`` (0 at the first step; a
    batch with non-finite statistics is not counted): plain BN (r_max_t = 1, d_max_t = 0)
    while ``t < warmup_steps``, then ``frac = min(1, (t - warmup_steps) / ramp_steps)`` (1
    when ``ramp_steps == 0``), ``r_max_t = 1 + (r_max - 1) * frac``, ``d_max_t = d_max *
    frac``; :meth:`limits` returns them. The paper trained 5k steps of BN, then relaxed the
    limits to reach r_max = 3 at 40k steps and d_max = 5 at 25k; one ``ramp_steps`` ramps
    both together, e.g. ``warmup_steps=5000, ramp_steps=35000`` reaches both at 40k, and
    ``ramp_steps=20000`` both at 25k. Early in training the running statistics (0 and 1 at
    first) are poor estimates, which is what the warmup is for.

    Args:
        num_features: number of channels C.
        eps: added to the variances before the square root. Default: 1e-5.
        momentum: weight of the new batch in the running estimates, or ``None`` for a
            cumulative average. Default: 0.01.
        affine: learn ``weight`` (gamma) and ``bias`` (beta). Default: True.
        track_running_stats: keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked``; without them the layer is BatchNorm. Default: True.
        bias (keyword only): with ``affine``, also learn ``bias``. Default: True.
        r_max (keyword only): final limit of r, a finite number >= 1. Default: 3.0.
        d_max (keyword only): final limit of d, a finite number >= 0. Default: 5.0.
        warmup_steps (keyword only): steps of plain BN first. Default: 0.
        ramp_steps (keyword only): steps over which the limits then grow linearly from
            (1, 0) to (r_max, d_max); 0 applies them at once. Default: 0.

    Shape:
        - Input: {shape}
        - Output: same shape as the input

    Example::

        >>> bn = bnlab.nn.{name}(16, warmup_steps=5000, ramp_steps=20000)
        >>> y = bn(torch.randn({example}))
        >>> bn.limits()  # (r_max_t, d_max_t) of the next training step
        (1.0, 0.0)
    """


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    _accepted_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    _accepted_dims = (4,)


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    _accepted_dims = (5,)


BatchRenorm1d.__doc__ = _DOC.format(name="BatchRenorm1d", dim=1, shape="(N, C) or (N, C, L)",
                                    over="N (and L)", example="8, 16")
BatchRenorm2d.__doc__ = _DOC.format(name="BatchRenorm2d", dim=2, shape="(N, C, H, W)",
                                    over="N, H and W", example="8, 16, 5, 5")
BatchRenorm3d.__doc__ = _DOC.format(name="BatchRenorm3d", dim=3, shape="(N, C, D, H, W)",
                                    over="N, D, H and W", example="8, 16, 3, 5, 5")
