"""Synchronized BatchNorm: the statistics of a mini-batch split over processes.

Under data parallelism each process sees only its share of the batch; normalizing with the
share's statistics makes BN's batch smaller than the optimizer's (and differ from process to
process). :class:`SyncBatchNorm` normalizes every share with the statistics of the whole
batch, which makes N processes equal one process on the concatenated batch.

Forward: each process computes its count, mean and sum of squared deviations (M2) per
channel in two passes, and one ``all_gather`` exchanges these (3, C) triples; every process
merges them in float64 by count (Chan, Golub & LeVeque 1979)::

    n = sum n_r,   mean = sum n_r * mean_r / n,   M2 = sum M2_r + sum n_r * (mean_r - mean)^2

never as E[x^2] - E[x]^2 (which cancels for large offsets, as detectron2's NaiveSyncBatchNorm
and Flax's cross-device statistics do). Backward: with x_hat and the global statistics,

    dL/dx = inv_std * (g - sum(g) / n - x_hat * sum(g * x_hat) / n),   g = weight * dL/dy

where the two sums run over the whole batch: one ``all_reduce`` of (sum dy, sum dy * x_hat).
Each process's ``weight.grad`` and ``bias.grad`` are its own share's sums; summed over
processes (as data-parallel training does) they are BatchNorm's gradients on the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import _ops
from . import functional as F
from ._errors import ShapeError, one_value_message
from .functional import merge_moments
from .modules import GhostBatchNorm, _BatchNorm
from .renorm import _BatchRenorm

__all__ = ["SyncBatchNorm"]


def _world(group: Any) -> int:
    """Processes in ``group``; 1 when torch.distributed is not in use."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _local_moments(xc: Tensor, dims: tuple[int, ...]) -> Tensor:
    """(3, C) float64: this process's count, mean and M2 per channel (zeros when empty):
    the Triton kernels' on a GPU, else :func:`bnlab.nn.functional.moments`."""
    if (moments := _ops.triton_call("local_moments", xc, xc)) is not None:
        return moments
    return F.moments(xc, dims)


def _check_channels(x: Tensor, group: Any, world: int) -> None:
    """The same channel count on every process of ``group``, or the same ``ShapeError`` on
    every one. A tiny all_gather of each count, before the moments': that one pairs tensors
    of (3, C) values, and with different C it would abort inside the backend on one process
    and give another wrong statistics."""
    mine = torch.tensor([x.shape[1]], dtype=torch.long, device=x.device)
    seen = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(seen, mine, group=group)
    counts = torch.cat(seen).tolist()
    if len(set(counts)) > 1:
        ranks = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
        raise ShapeError(f"SyncBatchNorm: the processes of the group give it different channel "
                         f"counts ({ranks}); build the layer with the same num_features on "
                         "every process")


class _SyncFunction(torch.autograd.Function):
    """Training-mode BN over the batch every process of ``group`` holds a part of."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                group: Any, world: int, running: tuple) -> Tensor:
        dims = F.reduce_dims(x.dim())
        dtype = F.compute_dtype(x.dtype)
        xc = x.to(dtype)
        local = _local_moments(xc, dims)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)  # the one collective of the forward
        n, mean64, var64 = merge_moments(torch.stack(parts))
        count = int(n[0]) if n.numel() else 0
        ctx.count = count
        if count == 0:  # every share empty: as BatchNorm, an empty output, nothing counted
            ctx.save_for_backward(x, weight)
            ctx.has_bias = bias is not None
            return torch.empty_like(x)
        if count == 1:  # every process sees the same count, so all raise together
            raise ValueError(one_value_message(
                x, f" here, and 1 value per channel over all {world} processes"))
        running_mean, running_var, tracked, momentum = running
        if running_mean is not None and running_var is not None:
            F.update_running_stats(running_mean, running_var, tracked, mean64, var64, count,
                                   momentum)
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = mean64.to(dtype).view(shape)
        inv_std = torch.rsqrt(var64 + eps).to(dtype).view(shape)
        x_hat = (xc - mean) * inv_std
        y = x_hat if weight is None else x_hat * weight.to(dtype).view(shape)
        y = y if bias is None else y + bias.to(dtype).view(shape)
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.group, ctx.has_bias = group, bias is not None
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        if ctx.count == 0:  # on every process: nothing to exchange
            x, weight = ctx.saved_tensors
            zeros = None if weight is None else torch.zeros_like(weight)
            return (torch.zeros_like(x), zeros, zeros if ctx.has_bias else None,
                    None, None, None, None)
        x, weight, mean, inv_std = ctx.saved_tensors
        dims = F.reduce_dims(x.dim())
        dtype = mean.dtype
        dy = grad_y.to(dtype)
        x_hat = (x.to(dtype) - mean) * inv_std
        sums = torch.stack([dy.sum(dims), (dy * x_hat).sum(dims)])  # (2, C), this share's
        grad_bias, grad_weight = sums[0].clone(), sums[1].clone()
        total = sums.double()
        dist.all_reduce(total, group=ctx.group)  # the one collective of the backward
        shape = mean.shape
        mean_dy = (total[0] / ctx.count).to(dtype).view(shape)
        mean_dy_xhat = (total[1] / ctx.count).to(dtype).view(shape)
        grad_x = (dy - mean_dy - x_hat * mean_dy_xhat) * inv_std
        if weight is not None:
            grad_x = grad_x * weight.to(dtype).view(shape)
        pdtype = dtype if weight is None else weight.dtype
        return (grad_x.to(x.dtype), None if weight is None else grad_weight.to(pdtype),
                grad_bias.to(pdtype) if ctx.has_bias else None, None, None, None, None)


class SyncBatchNorm(_BatchNorm, nn.SyncBatchNorm):
    r"""Batch Normalization over a mini-batch split across processes: a drop-in for
    ``torch.nn.SyncBatchNorm`` that also runs on CPU (gloo) as well as CUDA (nccl).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In training, mean and biased variance are those of the whole batch, over every process
    of ``process_group``: one ``all_gather`` of each process's (count, mean, M2) per channel,
    merged exactly in float64; the backward is one ``all_reduce`` of (sum dy, sum dy * x_hat).
    Shares may differ in size, and a process may hold none (an empty batch). The running
    statistics receive the whole batch's mean and unbiased variance, identically on every
    process. In eval the running statistics are used and nothing is exchanged; with
    ``track_running_stats=False`` eval normalizes each process's batch with its own
    statistics (also without communication), as ``torch.nn.SyncBatchNorm`` does. Outside a
    process group (torch.distributed not initialized, or one process) it is
    :class:`BatchNorm2d` exactly.

    Over N processes it equals BatchNorm on the concatenated batch: the output, the input
    gradient, the running statistics, and the parameter gradients summed over processes.
    Every process must call the layer the same number of times in training mode (each call
    is a collective). The first training call in a group also gathers each process's channel
    count, and raises the same ``ShapeError`` on every process when they differ.

    Args:
        num_features: number of channels C (input (N, C, ...)).
        eps, momentum, affine, track_running_stats: as :class:`BatchNorm2d`.
        process_group: the processes whose batches are one; ``None`` is the default group.
        bias (keyword only): as :class:`BatchNorm2d`.

    Shape:
        - Input: (N, C, *) with at least 2 dimensions; N may differ between processes and
          may be 0
        - Output: same shape as the input

    Example::

        >>> model = bnlab.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Any = None, device: Any = None, dtype: Any = None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ShapeError(f"expected at least 2D input (got {x.dim()}D input)")

    def _check_values_per_channel(self, x: Tensor, training: bool) -> None:
        # Synced, the check is made on the whole batch, in forward (a process's share may
        # hold one value, or none); statistics of this process alone are checked here.
        if not (training and _world(self.process_group) > 1):
            super()._check_values_per_channel(x, training)

    def _forward_plain(self, x: Tensor) -> Tensor:
        if _world(self.process_group) > 1 and self.training and not self.frozen:
            raise RuntimeError("SyncBatchNorm has no TorchScript or forward-mode AD form over "
                               "several processes; use it eager (reverse mode)")
        return super()._forward_plain(x)

    def _normalize_batch(self, x: Tensor, update: bool) -> Tensor:
        world = _world(self.process_group)
        if world == 1 or not self.training or self.frozen:
            return super()._normalize_batch(x, update)
        self._check_channels_once(x, world)
        weight, bias, running_mean, running_var, tracked = self._state()
        running = (running_mean, running_var, tracked, self.momentum) if update \
            else (None, None, None, None)
        return _SyncFunction.apply(x, weight, bias, self.eps, self.process_group, world, running)

    def _check_channels_once(self, x: Tensor, world: int) -> None:
        """:func:`_check_channels` at the layer's first training call with each group (by
        its ranks) and channel count. That call is the same collective on every process of
        the group, as every training call is, so all check together; later calls skip the
        extra collective, which costs as much time as the moments' own."""
        group = self.process_group
        ranks = tuple(dist.get_process_group_ranks(dist.group.WORLD if group is None else group))
        checked = self.__dict__.setdefault("_channels_checked", set())
        if (ranks, x.shape[1]) not in checked:
            _check_channels(x, group, world)
            checked.add((ranks, x.shape[1]))

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """``module`` with every BatchNorm layer (torch's or bnlab's ``BatchNorm*d``, and
        ``torch.nn.SyncBatchNorm``) replaced by a :class:`SyncBatchNorm` sharing its
        parameters and buffers, mode and freezing; a BatchNorm ``module`` itself is returned
        converted. Variants whose statistics differ (``GhostBatchNorm``, ``BatchRenorm*d``)
        are left as they are. A ``BatchNormAct*d`` becomes a :class:`SyncBatchNormAct` that
        keeps its activation."""
        from .act import _BatchNormAct

        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) \
                and not isinstance(module, (GhostBatchNorm, _BatchRenorm)):
            acting = isinstance(module, _BatchNormAct) and not issubclass(cls, SyncBatchNormAct)
            out = (SyncBatchNormAct if acting else cls)(
                module.num_features, module.eps, module.momentum, module.affine,
                module.track_running_stats, process_group, device=_device_of(module),
                bias=getattr(module, "bias", None) is not None or not module.affine)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            out.frozen = getattr(module, "frozen", False)
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


class SyncBatchNormAct(SyncBatchNorm):
    """:class:`SyncBatchNorm` followed by an activation: what
    :meth:`SyncBatchNorm.convert_sync_batchnorm` makes of a ``BatchNormAct*d``, so that the
    activation is kept. ``act`` and ``drop`` are the layer's (``act``: any module, default
    identity); the state_dict is SyncBatchNorm's. The statistics are synchronized as
    SyncBatchNorm's; the activation runs after them, not fused."""

    def __init__(self, *args: Any, act: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.act = act if act is not None else nn.Identity()
        self.drop = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def _device_of(module: nn.Module) -> Any:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        return t.device
    return None
