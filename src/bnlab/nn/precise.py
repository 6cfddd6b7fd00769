"""Precise BatchNorm statistics: running statistics set to the population statistics of
each layer's inputs, instead of an exponential moving average of batch statistics.

The running averages lag the weights (they mix statistics of older weights in) and carry
the noise of small batches; Wu & Johnson (2021, "Rethinking 'Batch' in BatchNorm", section
3) and fvcore's ``precise_bn`` recompute them after training. :func:`update_bn_stats` does
this exactly: per channel, the mean and the unbiased variance of every value the layer saw,
merged across batches by count (Chan, Golub & LeVeque), in float64.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from . import functional as F
from ._errors import as_int

__all__ = ["update_bn_stats"]

logger = logging.getLogger(__name__)

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

    A batch whose statistics at a layer are not all finite (a NaN or inf reached it) is left
    out of that layer's statistics, as the layers leave such a batch out of their running
    statistics in training, and a warning is logged naming the layer and the count. A layer
    left with fewer than 2 values per channel raises ``ValueError``, and then no layer's
    running statistics change.
    """
    if isinstance(batches, Tensor):  # iterating it would give its samples one by one
        raise TypeError(f"update_bn_stats: batches must be an iterable of batches, not a tensor "
                        f"(got a Tensor of size {tuple(batches.shape)}); pass a DataLoader, or "
                        "[x] for one batch")
    if max_batches is not None:
        max_batches = as_int(max_batches, "max_batches", 1, "a positive int or None")
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
    names = {mod: name or "the model" for name, mod in model.named_modules()}
    for m, p in parts.items():
        finite = [t for t in p if bool(torch.isfinite(t).all())]
        if len(finite) < len(p):
            logger.warning("update_bn_stats: layer %s left out %d of %d batches whose statistics "
                           "are not finite (NaN or inf in its input)", names[m],
                           len(p) - len(finite), len(p))
        seen = int(sum(t[0, 0] for t in finite))
        if seen < 2:
            skipped = f" ({len(p) - len(finite)} non-finite batches left out)" \
                if len(finite) < len(p) else ""
            raise ValueError(f"update_bn_stats: layer {names[m]} saw {seen} value(s) per channel"
                             f"{skipped}; it needs at least 2 for an unbiased variance; no "
                             "running statistics were changed")
        parts[m] = finite
    merged = {m: F.merge_moments(torch.stack(p)) for m, p in parts.items()}  # (n, mean, var)
    for m, (n, mean, var) in merged.items():
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_((var * n / (n - 1)).to(m.running_var.dtype))
    return used
