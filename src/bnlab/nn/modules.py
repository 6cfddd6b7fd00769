"""BatchNorm layers: drop-ins for ``torch.nn.BatchNorm1d/2d/3d``, plus ghost batches.

The layers share one base class, :class:`_BatchNorm`, which holds the state (named and shaped
exactly as PyTorch's, so ``state_dict`` files move both ways) and the forward logic.
Subclasses only check the input's rank, or, for :class:`GhostBatchNorm`, replace how batch
statistics are gathered.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from . import _ops  # (importing it registers the torch.ops.bnlab operators)
from . import functional as F
from ._errors import NO_RUNNING_TANGENT, ShapeError, as_float, as_int, one_value_message

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GhostBatchNorm"]

# torch 2.13 added a keyword-only ``bias`` flag (and "bias=" in the repr); bnlab accepts the
# flag with any torch and prints it exactly when the installed torch does.
TORCH_HAS_BIAS_FLAG = "bias" in inspect.signature(nn.BatchNorm1d.__init__).parameters


class _BatchNorm(nn.modules.batchnorm._BatchNorm):
    """Shared state and forward of bnlab's BatchNorm layers (see :class:`BatchNorm2d`).

    The layers are instances of torch's classes (``torch.nn.BatchNorm2d``, its base
    ``_BatchNorm``), so code that finds BN layers by type (to exclude them from weight
    decay, freeze or convert them) finds bnlab's too; the state is built and the forward
    computed here, with bnlab's math."""

    _version = 2  # as torch's _NormBase: version 2 added num_batches_tracked
    _accepted_dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 device: Any = None, dtype: Any = None, *, bias: bool = True) -> None:
        num_features, eps, momentum = _hyperparameters(num_features, eps, momentum)
        factory = {"device": device, "dtype": dtype}
        nn.Module.__init__(self)  # not torch's _NormBase.__init__: the same state is built below
        # torch.fx keeps modules of torch.nn as single call_module nodes (as fusion and
        # quantization passes expect of BN) and traces into others: be one for it, per
        # instance, so pickling still finds the class by its real module.
        self.__module__ = nn.modules.batchnorm.__name__
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.frozen = False
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # -- state ------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        bias = f"bias={self.bias is not None}, " if TORCH_HAS_BIAS_FLAG else ""
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, {bias}track_running_stats={self.track_running_stats}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs) -> None:
        # A state without num_batches_tracked and without version >= 2 (written before the
        # counter existed, or filtered) keeps the module's own count, as torch's layers do.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            own = self.num_batches_tracked
            state_dict[key] = own if own is not None and own.device.type != "meta" else \
                torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    # -- freezing ---------------------------------------------------------------------------
    def freeze(self) -> "_BatchNorm":
        """Freeze in place: parameters get no gradient and running statistics stop updating.

        The layer normalizes with its running statistics from then on, and ``train()``
        (including a parent's ``model.train()``) leaves it in eval mode until
        :meth:`unfreeze`. ``requires_grad=False`` alone would not stop the running statistics
        (pytorch#86590), and a parent's ``train()`` would undo a plain ``eval()`` (pytorch#66073).
        """
        self.frozen = True
        for p in self.parameters(recurse=False):
            p.requires_grad_(False)
        return super().train(False)

    def unfreeze(self) -> "_BatchNorm":
        """Undo :meth:`freeze`: parameters trainable again; the mode is left to ``train()``."""
        self.frozen = False
        for p in self.parameters(recurse=False):
            p.requires_grad_(True)
        return self

    def train(self, mode: bool = True) -> "_BatchNorm":
        return super().train(mode and not self.frozen)

    # -- forward ----------------------------------------------------------------------------
    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self._accepted_dims:
            expected = " or ".join(f"{d}D" for d in self._accepted_dims)
            raise ShapeError(f"expected {expected} input (got {x.dim()}D input)")

    def _check_input(self, x: Tensor, training: bool) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor input (got {type(x).__name__})")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input (got {x.dtype})")
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ShapeError(f"expected input with {self.num_features} channels at dim 1 "
                             f"(num_features), got {x.shape[1]} (input size {tuple(x.shape)})")
        for t, name in zip(self._state(), ("weight", "bias", "running_mean", "running_var")):
            if t is not None and t.numel() != self.num_features:  # replaced by hand?
                raise ShapeError(f"{name} should contain {self.num_features} elements not {t.numel()}")
        self._check_values_per_channel(x, training)

    def _uses_batch_stats(self, training: bool) -> bool:
        """Whether the layer normalizes with batch statistics: in training, and in eval
        without running statistics (as torch's layers decide)."""
        return training or self.running_mean is None or self.running_var is None

    def _check_values_per_channel(self, x: Tensor, training: bool) -> None:
        """torch's refusal of batch statistics from one value per channel (its variance is
        0, and the output would be the bias whatever the input)."""
        if self._uses_batch_stats(training) and x.numel() // x.shape[1] == 1:
            raise ValueError(one_value_message(x) if training else one_value_message(
                x, " (in eval too: the layer has no running statistics)",
                "pass a batch of 2 or more samples, or keep running statistics"))

    def _param_view(self, t: Tensor | None, ndim: int) -> Tensor | None:
        # (C,) -> (1, C, 1, ...) to broadcast against an (N, C, *spatial) input
        return None if t is None else t.view([1, -1] + [1] * (ndim - 2))

    def _normalize_batch(self, x: Tensor, update: bool) -> Tensor:
        """Normalize with batch statistics (steps 1-4) and, if ``update``, fold them into the
        running statistics (see :mod:`bnlab.nn._ops`)."""
        weight, bias, running_mean, running_var, tracked = self._state()
        if not update:
            running_mean = running_var = tracked = None
        return _ops.train_forward(x, weight, bias, running_mean, running_var, tracked,
                                  self.momentum, self.eps)

    def _state(self) -> tuple:
        """(weight, bias, running_mean, running_var, num_batches_tracked), read from the
        module's dictionaries when they hold them (faster than attribute access), and as
        attributes otherwise (a parametrized weight is a property computed on access)."""
        p, b = self._parameters, self._buffers
        return (p["weight"] if "weight" in p else self.weight,
                p["bias"] if "bias" in p else self.bias,
                b["running_mean"] if "running_mean" in b else self.running_mean,
                b["running_var"] if "running_var" in b else self.running_var,
                b["num_batches_tracked"] if "num_batches_tracked" in b else self.num_batches_tracked)

    def _population_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(running_mean, running_var) for inference. BN is not differentiable with respect
        to them, as torch's is not: forward-mode tangents on them are refused when the input,
        weight or bias carries one too (the output's tangent would depend on them), and
        dropped otherwise (torch's output then carries no tangent)."""
        mean, var = self.running_mean, self.running_var
        if _has_tangent(mean) or _has_tangent(var):
            if any(_has_tangent(t) for t in (x, self.weight, self.bias)):
                raise RuntimeError(f"{NO_RUNNING_TANGENT}; give the layer running statistics "
                                   "without tangents (e.g. running_mean.detach())")
            mean, var = mean.detach(), var.detach()
        return mean, var

    def _normalize_population(self, x: Tensor, running_mean: Tensor,
                              running_var: Tensor) -> Tensor:
        """Inference (paper, Algorithm 2): the running statistics make BN an affine map."""
        if _ops.triton_kernels(x) is not None and not (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, self.weight, self.bias))):
            y = _ops.triton_call("normalize", x, x, running_mean.double(),
                                 running_var.double(), self.weight, self.bias, self.eps)
            if y is not None:  # one pass on a GPU, no autograd
                return y
        dtype = F.compute_dtype(x.dtype)
        view = lambda t: self._param_view(None if t is None else t.to(dtype), x.dim())  # noqa: E731
        scale = torch.rsqrt(view(running_var) + self.eps)
        if self.weight is not None:
            scale = scale * view(self.weight)
        # (x - mean) * scale, not x * scale - mean * scale: the subtraction is exact for
        # nearby values, the product difference is not.
        y = (x.to(dtype) - view(running_mean)) * scale
        if self.bias is not None:
            y = y + view(self.bias)
        return y.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._forward_plain(x)
        return self._forward(x)

    def _forward_plain(self, x: Tensor) -> Tensor:
        """The same four steps and two-pass statistics in plain torch ops, which autograd
        differentiates itself: for TorchScript, which cannot compile an autograd.Function,
        and for forward-mode AD (a tangent on the input), which the closed form lacks."""
        training = self.training and not self.frozen
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        running_mean, running_var = self.running_mean, self.running_var
        if not training and running_mean is not None and running_var is not None:
            mean, var = running_mean.to(xc.dtype).view(shape), running_var.to(xc.dtype).view(shape)
        else:
            mean = xc.mean(dims, keepdim=True)
            dev = xc - mean
            residual = dev.mean(dims, keepdim=True)
            var = (dev.square().mean(dims, keepdim=True) - residual.square()).clamp(min=0)
            mean = mean + residual
            if training and running_mean is not None and running_var is not None:
                F.update_running_stats(running_mean, running_var, self.num_batches_tracked,
                                       mean.detach(), var.detach(), x.numel() // x.shape[1],
                                       self.momentum)
        y = (xc - mean) * torch.rsqrt(var + self.eps)
        weight, bias = self.weight, self.bias
        if weight is not None:
            y = y * weight.to(y.dtype).view(shape)
        if bias is not None:
            y = y + bias.to(y.dtype).view(shape)
        return y.to(x.dtype)

    @torch.jit.unused
    def _forward(self, x: Tensor) -> Tensor:
        training = self.training and not self.frozen
        self._check_input(x, training)
        population = not self._uses_batch_stats(training)
        if population:
            running_mean, running_var = self._population_stats(x)
        if forward_ad.unpack_dual(x).tangent is not None:
            # eval with running statistics is BatchNorm's eval in every variant
            return _BatchNorm._forward_plain(self, x) if population else self._forward_plain(x)
        if population:
            return self._normalize_population(x, running_mean, running_var)
        if self.eps <= 0:  # a constant channel would divide by zero
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        return self._normalize_batch(x, training and self.track_running_stats)


def _has_tangent(t: Tensor | None) -> bool:
    """Whether ``t`` carries a forward-mode tangent (torch.autograd.forward_ad, torch.func.jvp);
    outside forward-mode AD this is a comparison, no tensor work."""
    return t is not None and forward_ad.unpack_dual(t).tangent is not None


def _hyperparameters(num_features: Any, eps: Any, momentum: Any
                     ) -> tuple[int, float, float | None]:
    """(num_features, eps, momentum) checked, as an int, a float and a float or None."""
    num_features = as_int(num_features, "num_features", 1, "a positive int")
    value = as_float(eps)
    if value is None or not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be a finite number >= 0 (got {eps!r})")
    if momentum is None:
        return num_features, value, None
    rate = as_float(momentum)
    if rate is None or not 0 <= rate <= 1:
        raise ValueError(f"momentum must be None or a number in [0, 1] (got {momentum!r})")
    return num_features, value, rate


_DOC = r"""Batch Normalization over a {shape} input, written from Ioffe & Szegedy (2015).

    .. math::
        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} * \gamma + \beta

    Mean and variance are computed per channel over {over}. In training the biased batch
    variance normalizes and the unbiased one (m/(m-1)) enters ``running_var``; in eval the
    running statistics are used, unless ``track_running_stats=False``, in which case batch
    statistics are used in eval too. Momentum is the weight of the new value, as in PyTorch:
    ``running = (1 - momentum) * running + momentum * batch`` (Keras' ``momentum=0.99`` is
    PyTorch's ``0.01``); ``momentum=None`` gives the cumulative average.

    Differences from ``torch.nn.{name}``, all in the user's favour: the backward is bnlab's
    own closed form; half inputs reduce in float32 and the variance is computed in two passes
    (no cancellation for large offsets); a batch whose statistics are not finite leaves the
    running statistics and ``num_batches_tracked`` untouched; bad input raises ``ValueError``
    naming expected and actual values (a shape that does not fit: :class:`ShapeError`, also
    the ``RuntimeError`` torch raises); :meth:`freeze` freezes for good.

    Args:
        num_features: number of channels C.
        eps: added to the variance before the square root. Default: 1e-5.
        momentum: weight of the new batch in the running estimates, or ``None`` for a
            cumulative average. Default: 0.1.
        affine: learn ``weight`` (gamma) and ``bias`` (beta). Default: True.
        track_running_stats: keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` for inference. Default: True.
        bias (keyword only): with ``affine``, also learn ``bias``; ``False`` keeps only the
            scale. Default: True.

    Shape:
        - Input: {shape}
        - Output: same shape as the input

    Example::

        >>> bn = bnlab.nn.{name}(16)
        >>> y = bn(torch.randn({example}))
    """


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    _accepted_dims = (2, 3)


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    _accepted_dims = (4,)


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    _accepted_dims = (5,)


BatchNorm1d.__doc__ = _DOC.format(name="BatchNorm1d", shape="(N, C) or (N, C, L)",
                                  over="N (and L)", example="8, 16")
BatchNorm2d.__doc__ = _DOC.format(name="BatchNorm2d", shape="(N, C, H, W)",
                                  over="N, H and W", example="8, 16, 5, 5")
BatchNorm3d.__doc__ = _DOC.format(name="BatchNorm3d", shape="(N, C, D, H, W)",
                                  over="N, D, H and W", example="8, 16, 3, 5, 5")


class GhostBatchNorm(_BatchNorm):
    """Ghost Batch Normalization (Hoffer et al. 2017): statistics per virtual batch.

    In training the mini-batch of N samples is split into N / ``virtual_batch_size``
    consecutive virtual batches, and each is normalized with its own mean and variance, which
    keeps the noise of small-batch statistics inside a large batch. The running statistics
    receive one update per step, from the statistics of the whole mini-batch (pooled exactly
    from the virtual batches by the law of total variance), not one per virtual batch. Eval
    is identical to :class:`BatchNorm2d`. With ``virtual_batch_size`` equal to the batch size
    the layer equals BatchNorm exactly.

    Args:
        num_features: number of channels C.
        virtual_batch_size: samples per virtual batch; must divide every training batch size.
        eps, momentum, affine, track_running_stats: as :class:`BatchNorm2d`.

    Shape:
        - Input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)
        - Output: same shape as the input
    """

    _accepted_dims = (2, 3, 4, 5)

    def __init__(self, num_features: int, virtual_batch_size: int = 128, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None,
                 *, bias: bool = True) -> None:
        virtual_batch_size = as_int(virtual_batch_size, "virtual_batch_size", 1, "a positive int")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.virtual_batch_size = virtual_batch_size

    def _forward_plain(self, x: Tensor) -> Tensor:
        raise RuntimeError("GhostBatchNorm has no TorchScript or forward-mode AD form yet; "
                           "use it eager (reverse mode) or with torch.compile")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def _check_values_per_channel(self, x: Tensor, training: bool) -> None:
        if not training:  # eval without running statistics: the whole batch, as BatchNorm
            return super()._check_values_per_channel(x, training)
        n, v = x.shape[0], self.virtual_batch_size
        if n % v != 0:
            raise ShapeError(f"virtual_batch_size={v} must divide the batch size (got batch "
                             f"size {n}); drop or pad the last batch")
        if n > 0 and math.prod(x.shape[2:]) * v == 1:  # an empty batch: as BatchNorm's
            raise ValueError(one_value_message(
                x, f" (1 per channel in each virtual batch of virtual_batch_size={v})",
                "use a virtual_batch_size of 2 or more"))

    def _normalize_batch(self, x: Tensor, update: bool) -> Tensor:
        if not self.training or self.frozen:
            # eval without running statistics: the whole batch, whatever its size
            return super()._normalize_batch(x, update)
        groups = x.shape[0] // self.virtual_batch_size
        if groups <= 1:  # one virtual batch (or an empty batch): BatchNorm itself, to the last bit
            return super()._normalize_batch(x, update)
        xg = x.reshape(groups, self.virtual_batch_size, *x.shape[1:])  # (G, N/G, C, *spatial)
        dims = (1,) + tuple(range(3, xg.dim()))
        w, b = self._param_view(self.weight, x.dim()), self._param_view(self.bias, x.dim())
        w = None if w is None else w.unsqueeze(0)
        b = None if b is None else b.unsqueeze(0)
        y, mean_g, var_g = F.batch_norm(xg, w, b, self.eps, dims)
        # Pool the equal-sized groups: total variance = mean of variances + variance of means.
        mean = mean_g.mean(dim=0)
        var = var_g.mean(dim=0) + (mean_g - mean).square().mean(dim=0)
        if update:
            F.update_running_stats(self.running_mean, self.running_var, self.num_batches_tracked,
                                   mean, var, x.numel() // x.shape[1], self.momentum)
        return y.reshape(x.shape)
