"""Precise BatchNorm statistics: running statistics set to the population statistics of
each layer's inputs, instead of an exponential moving average of batch statistics.

The running averages lag the weights (they mix statistics of older weights in) and carry
the noise of small batches; Wu & Johnson (2021, "Rethinking 'Batch' in BatchNorm", section
3) and fvcore's ``precise_bn`` recompute them after training. :func:`update_bn_stats` does
this exactly: per channel, the mean and the unbiased variance of every value the layer saw,
merged across batches by count (Chan, Golub & LeVeque), in float64.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from . import functional as F

__all__ = ["update_bn_stats"]

_BN = nn.modules.batchnorm._BatchNorm  # torch's and bnlab's BatchNorm*d, GhostBatchNorm, ...


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches: Iterable[Any], *,
                    max_batches: int | None = None) -> int:
    """Set the running statistics of every BatchNorm layer of ``model`` to the population
    statistics of its inputs over ``batches``; returns the number of batches used.

    Each element of ``batches`` is the model's input, or a tuple or list whose first element
    is (as a data loader yields ``(x, y)``). The batches run through the model with its BN
    layers in training mode, so each normalizes with its batch's statistics as in training
    (as fvcore's precise BN does); every other module keeps the mode it has. A layer's
    ``running_mean`` becomes the mean and ``running_var`` the unbiased variance of all the
    values it saw, weighted by count: not a moving average, and not a mean of per-batch
    variances (which would miss the spread between batch means).

    Nothing else changes: each layer's momentum, ``num_batches_tracked`` and mode, every
    parameter and other buffer, and the random number generators' state are as before.
    Frozen layers (``layer.freeze()``, :func:`bnlab.nn.freeze`) and layers without running
    statistics are left alone.
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None (got {max_batches!r})")
    layers = [m for m in model.modules() if isinstance(m, _BN) and m.running_mean is not None
              and m.running_var is not None and not getattr(m, "frozen", False)]
    if not layers:
        raise ValueError("the model has no BatchNorm layer with running statistics to update")
    parts: dict[nn.Module, list[Tensor]] = {m: [] for m in layers}  # (3, C) per batch
    modes = {m: m.training for m in model.modules()}
    saved = {m: (m.running_mean.clone(), m.running_var.clone(),
                 None if m.num_batches_tracked is None else m.num_batches_tracked.clone(),
                 m.momentum)
             for m in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args: parts[mod].append(
        F.moments(args[0].detach().double(), F.reduce_dims(args[0].dim()))))
             for m in layers]
    used = 0
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and \
        torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):  # dropout and the like draw nothing
            for m in layers:
                # momentum 0 holds the running statistics during the pass, so layers that
                # read them in training (Batch Renorm's r and d) see what training left
                m.train()
                m.momentum = 0.0
            for batch in batches:
                if max_batches is not None and used >= max_batches:
                    break
                if isinstance(batch, (tuple, list)):
                    if not batch:
                        raise ValueError("update_bn_stats: a batch is an empty tuple or list")
                    batch = batch[0]
                if not isinstance(batch, Tensor):
                    raise TypeError(f"update_bn_stats: a batch must be a tensor, or a tuple or "
                                    f"list whose first element is one (got {type(batch).__name__})")
                model(batch)
                used += 1
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for m, (mean, var, tracked, momentum) in saved.items():
            m.momentum = momentum
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
    if used == 0:
        raise ValueError("update_bn_stats: no batches")
    for m, p in parts.items():
        seen = int(sum(t[0, 0] for t in p))
        if seen < 2:
            name = next(k for k, mod in model.named_modules() if mod is m) or "the model"
            raise ValueError(f"update_bn_stats: layer {name} saw {seen} value(s) per channel; "
                             "it needs at least 2 for an unbiased variance")
    merged = {m: F.merge_moments(torch.stack(p)) for m, p in parts.items()}  # (n, mean, var)
    for m, (n, mean, var) in merged.items():
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_((var * n / (n - 1)).to(m.running_var.dtype))
    return used
