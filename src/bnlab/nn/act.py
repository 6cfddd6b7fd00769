"""BatchNorm fused with its activation: ``y = act(BN(x))`` in one forward and one backward.

A network's ``BN -> ReLU`` reads and writes the activation tensor twice more than BN alone
in the forward (the activation reads BN's output and writes its own) and three times more in
the backward (it reads the gradient and the output, and writes BN's gradient). Fused, the
forward writes ``act(z)`` where it would have written ``z = weight * x_hat + bias``, and the
backward multiplies the incoming gradient by ``act'(z)`` while it forms BN's sums, with ``z``
recomputed from what was saved.

With ``g = dL/dy * act'(z)`` (the gradient reaching BN's output) and m values per channel,
the gradients are BN's closed form (see :mod:`bnlab.nn.functional`)::

    dL/dbias   = sum(g)
    dL/dweight = sum(g * x_hat)
    dL/dx      = weight * inv_std * (g - mean(g) - x_hat * mean(g * x_hat))

``save="output"`` is the in-place activated BN of Rota Bulo, Porzi & Kontschieder (2018):
the backward keeps the output y instead of the input x, and recovers
``z = act^-1(y)`` and ``x_hat = (z - bias) / weight``, so the input can be freed (with
leaky ReLU of slope > 0 or no activation, which are invertible).

On CPU the compiled kernels of :mod:`bnlab.nn._kernels` run both passes for float32 and
float64 inputs in a dense layout; on CUDA the Triton kernels of :mod:`bnlab.nn._triton`
(with Triton installed) run them for float16, bfloat16, float32 and float64 inputs, the
running statistics included; other devices, dtypes and layouts, and processes without the
kernels (``BNLAB_KERNELS=0``, Triton missing or failing here), run the same math in torch
ops (:func:`reference_forward`, :func:`reference_backward`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn import functional as TF

from . import _ops
from . import functional as F
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["ACTIVATIONS", "Act", "act_of", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "BatchNormActFunction", "reference_backward", "reference_forward"]

ACTIVATIONS = ("relu", "leaky_relu", "silu", "identity")
_MODULES = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU, "identity": nn.Identity}
_ALIASES = {"swish": "silu", "none": "identity", "linear": "identity"}
SAVES = ("input", "output")


class Act(NamedTuple):
    """What the fused step computes after BN: ``kind`` one of :data:`ACTIVATIONS`, and
    ``slope`` the slope below 0 of the piecewise-linear ones (ReLU 0, leaky ReLU its
    negative_slope, identity 1; 0 for SiLU)."""

    kind: str
    slope: float

    @property
    def invertible(self) -> bool:
        """Whether y determines z: identity, and leaky ReLU with a positive slope."""
        return self.kind == "identity" or (self.kind == "leaky_relu" and self.slope > 0)


def act_of(module: nn.Module) -> Optional[Act]:
    """The :class:`Act` a module computes, for the modules the fused step knows (exactly
    ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.SiLU``, ``nn.Identity``), else None."""
    t = type(module)
    if t is nn.ReLU:
        return Act("relu", 0.0)
    if t is nn.LeakyReLU:
        return Act("leaky_relu", float(module.negative_slope))
    if t is nn.SiLU:
        return Act("silu", 0.0)
    if t is nn.Identity:
        return Act("identity", 1.0)
    return None


# -- the activation, its derivative and its inverse, in torch ops ----------------------------
def activate(z: Tensor, act: Act) -> Tensor:
    if act.kind == "relu":
        return torch.relu(z)
    if act.kind == "leaky_relu":
        return TF.leaky_relu(z, act.slope)
    if act.kind == "silu":
        return TF.silu(z)
    return z


def _derivative(z: Tensor, act: Act) -> Optional[Tensor]:
    """act'(z), as torch's own backward takes it (at z = 0, the slope below); None for 1."""
    if act.kind == "identity":
        return None
    if act.kind == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    # the slope as a tensor of z's dtype: a Python float would be taken in float32
    return torch.where(z > 0, z.new_ones(()), z.new_full((), act.slope))


def _invert(y: Tensor, act: Act) -> Tensor:
    """z = act^-1(y) for an invertible act: y > 0 exactly where z > 0."""
    return y if act.kind == "identity" else torch.where(y > 0, y, y / act.slope)


def clamp_weight(weight: Tensor, eps: float) -> Tensor:
    """weight with |weight| raised to at least eps, its sign kept (0 becomes +eps): what
    ``save="output"`` divides by to recover x_hat (Rota Bulo et al. 2018, section 3)."""
    return torch.where(weight < 0, -1.0, 1.0).to(weight.dtype) * weight.abs().clamp(min=eps)


# -- the torch-op path ---------------------------------------------------------------------------
def reference_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                      running: tuple, momentum: Optional[float], act: Act
                      ) -> tuple[Tensor, Tensor]:
    """``(y, saved)``: y = act(BN(x)) with the batch statistics, in x's dtype and layout, and
    ``saved`` (2, C) float64, each channel's mean and biased variance; the running statistics
    ``running = (running_mean, running_var, num_batches_tracked)`` are updated when given
    (see :func:`bnlab.nn.functional.update_running_stats`)."""
    dims = F.reduce_dims(x.dim())
    shape = [1, -1] + [1] * (x.dim() - 2)
    with torch.no_grad():
        stats = F.batch_stats(x, dims)  # (1, C, 1, ...) each, in the compute dtype
        dtype = stats.mean.dtype
        inv_std = torch.rsqrt(stats.var + eps)
        z = (x.to(dtype) - stats.mean - stats.residual) * inv_std  # x_hat; x - mean is exact
        if weight is not None:
            z = z * weight.to(dtype).view(shape)
        if bias is not None:
            z = z + bias.to(dtype).view(shape)
        y = activate(z, act).to(x.dtype)
        if y.stride() != x.stride():  # the output keeps the input's layout
            y = torch.empty_like(x).copy_(y)
        mean = stats.full_mean()
        if _ops._updates(running, momentum):
            F.update_running_stats(*running, mean, stats.var, x.numel() // x.shape[1], momentum)
        saved = torch.stack([mean.reshape(-1), stats.var.reshape(-1)]).double()
    return y, saved


def reference_backward(grad_y: Tensor, v: Tensor, weight: Optional[Tensor],
                       bias: Optional[Tensor], saved: Tensor, eps: float, act: Act,
                       save: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` of :func:`reference_forward`; ``v`` is its input
    x (``save="input"``) or its output y (``save="output"``). The parameter gradients are
    (C,) in the weight's dtype (the compute dtype without a weight)."""
    dims = F.reduce_dims(v.dim())
    shape = [1, -1] + [1] * (v.dim() - 2)
    mean, residual, inv_std = _ops._stats(saved[0], saved[1], v.dtype, eps, shape)
    dtype = mean.dtype
    w = None if weight is None else weight.to(dtype).view(shape)
    b = None if bias is None else bias.to(dtype).view(shape)
    if save == "output":
        z = _invert(v.to(dtype), act)
        x_hat = z if b is None else z - b
        if w is not None:
            x_hat = x_hat / clamp_weight(w, eps)
    else:  # z exactly as the forward formed it, so act'(z) sees the same signs
        x_hat = (v.to(dtype) - mean - residual) * inv_std
        z = x_hat if w is None else x_hat * w
        z = z if b is None else z + b
    g = grad_y.to(dtype)  # (N, C, *): the gradient reaching BN's output z
    d = _derivative(z, act)
    if d is not None:
        g = g * d
    grad_bias = g.sum(dims)
    grad_weight = (g * x_hat).sum(dims)
    m = v.numel() // v.shape[1]
    scale = inv_std if w is None else inv_std * w
    grad_x = scale * (g - grad_bias.view(shape) / m - x_hat * (grad_weight.view(shape) / m))
    pdtype = dtype if weight is None else weight.dtype
    return grad_x.to(v.dtype), grad_weight.to(pdtype), grad_bias.to(pdtype)


# -- autograd ------------------------------------------------------------------------------------
NO_DOUBLE_BACKWARD = ("BatchNormAct*d has no double backward (a backward with "
                      "create_graph=True); for second derivatives use bnlab.nn.BatchNorm*d "
                      "followed by the activation")


class BatchNormActFunction(torch.autograd.Function):
    """Training-mode ``act(BN(x))`` with the batch statistics, running statistics folded in.

    ``config`` is ``(running_mean, running_var, num_batches_tracked, momentum, eps, act,
    save)``, one argument (apply() passes it faster than seven). The compiled kernels run
    where they take x, the torch ops otherwise; the backward runs on the forward's path.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                config: tuple) -> Tensor:
        running_mean, running_var, tracked, momentum, eps, act, save = config
        running = (running_mean, running_var, tracked)
        done = _ops.act_forward(x, weight, bias, eps, running, momentum, act.slope,
                                act.kind == "silu")
        y, saved = done if done is not None else \
            reference_forward(x, weight, bias, eps, running, momentum, act)
        ctx.save_for_backward(y if save == "output" else x, weight, bias)
        ctx.stats, ctx.eps, ctx.act, ctx.save = saved, eps, act, save
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(NO_DOUBLE_BACKWARD)
        v, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        act, saved, eps = ctx.act, ctx.stats, ctx.eps
        done = None
        if not _ops._functorch_active() and _ops._has_storage(grad_y):
            # the CPU kernels' saved statistics (a NumPy array) take them again; a tensor
            # takes the Triton kernels where they take v
            done = _ops.act_backward(grad_y, v, weight, bias, saved, eps, act.slope,
                                     act.kind == "silu", ctx.save == "output", need_x)
        if done is None and not isinstance(saved, Tensor):
            saved = torch.from_numpy(saved)
        gx, gw, gb = done if done is not None else \
            reference_backward(grad_y, v, weight, bias, saved.to(v.device), eps, act, ctx.save)
        return (gx if need_x else None, gw if need_w and weight is not None else None,
                gb if need_b and bias is not None else None, None)


# -- the layers ----------------------------------------------------------------------------------
class _Unset:
    def __repr__(self) -> str:
        return "<not given>"


_UNSET: Any = _Unset()


def _build_act(act: Any, negative_slope: Optional[float], act_kwargs: Optional[dict],
               inplace: bool) -> nn.Module:
    """The activation module for ``act``: a name, one of the module classes of
    :data:`_MODULES`, an instance of one, or None (identity)."""
    choices = (f"one of {', '.join(repr(a) for a in ACTIVATIONS)}, the matching torch.nn "
               "module class or instance (nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.Identity), or None")
    if act is None:
        act = "identity"
    if isinstance(act, nn.Module):
        if act_of(act) is None:
            raise ValueError(f"act must be {choices} (got a {type(act).__name__} module)")
        if act_kwargs or negative_slope is not None:
            raise ValueError("act_kwargs and negative_slope apply to an activation given by "
                             f"name or class, not to a module (got {act!r})")
        return act
    if isinstance(act, str):
        name = _ALIASES.get(act.lower(), act.lower())
        if name not in _MODULES:
            raise ValueError(f"act must be {choices} (got {act!r})")
    elif isinstance(act, type) and act in _MODULES.values():
        name = next(k for k, v in _MODULES.items() if v is act)
    else:
        raise ValueError(f"act must be {choices} (got {act!r})")
    kwargs = dict(act_kwargs or {})
    if negative_slope is not None:
        if name != "leaky_relu":
            raise ValueError(f"negative_slope applies to act='leaky_relu' only (got act={act!r})")
        if kwargs.setdefault("negative_slope", negative_slope) != negative_slope:
            raise ValueError(f"negative_slope={negative_slope} and act_kwargs"
                             f"['negative_slope']={kwargs['negative_slope']} disagree")
    allowed = {"relu": {"inplace"}, "leaky_relu": {"inplace", "negative_slope"},
               "silu": {"inplace"}, "identity": set()}[name]
    if set(kwargs) - allowed:
        raise ValueError(f"act_kwargs {sorted(set(kwargs) - allowed)} do not apply to {name!r} "
                         f"(it takes {sorted(allowed) or 'none'})")
    if "inplace" in allowed:
        kwargs.setdefault("inplace", bool(inplace))
    return _MODULES[name](**kwargs)


class _BatchNormAct(_BatchNorm):
    """Shared logic of :class:`BatchNormAct2d` and its 1d/3d versions."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None, *, act: Any = "relu", negative_slope: float | None = None,
                 save: str = "input", apply_act: bool = True, act_layer: Any = _UNSET,
                 act_kwargs: dict | None = None, inplace: bool = True, drop_layer: Any = None,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        if act_layer is not _UNSET:  # timm's name for it
            if not (isinstance(act, str) and act == "relu"):
                raise ValueError(f"give the activation once, as act or as act_layer (got "
                                 f"act={act!r} and act_layer={act_layer!r})")
            act = act_layer
        if drop_layer is not None and drop_layer is not nn.Identity \
                and type(drop_layer) is not nn.Identity:
            raise ValueError("drop_layer: BatchNormAct layers apply no dropout; pass None or "
                             f"nn.Identity, and put the dropout after the layer (got {drop_layer!r})")
        if save not in SAVES:
            raise ValueError(f"save must be 'input' or 'output' (got {save!r})")
        self.act = _build_act(act if apply_act else None, negative_slope, act_kwargs, inplace)
        self.drop = nn.Identity()
        self.save = save
        if save == "output" and not act_of(self.act).invertible:
            raise ValueError(_not_invertible(self.act))

    def extra_repr(self) -> str:
        return super().extra_repr() + (", save='output'" if self.save == "output" else "")

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)

    @torch.jit.unused
    def _forward(self, x: Tensor) -> Tensor:
        training = self.training and not self.frozen
        act = act_of(self.act)
        if act is None or type(self.drop) is not nn.Identity or not self._fusable(x, training):
            # eval with running statistics, forward-mode AD, torch.func transforms, a
            # compiler, or modules set by hand: BN, then the modules themselves
            return self.act(self.drop(super()._forward(x)))
        if self.save == "output" and not act.invertible:
            raise ValueError(_not_invertible(self.act))
        self._check_input(x, training)
        if self.eps <= 0:  # a constant channel would divide by zero
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        weight, bias, running_mean, running_var, tracked = self._state()
        if not (training and self.track_running_stats):
            running_mean = running_var = tracked = None
        return BatchNormActFunction.apply(x, weight, bias, (running_mean, running_var, tracked,
                                                            self.momentum, self.eps, act, self.save))

    def _fusable(self, x: Tensor, training: bool) -> bool:
        """Whether the fused step runs: batch statistics, in plain eager mode."""
        return (isinstance(x, Tensor) and self._uses_batch_stats(training)
                and not torch.compiler.is_compiling() and not _ops._functorch_active()
                and forward_ad.unpack_dual(x).tangent is None
                and _ops._plain(x) and _ops._plain(self.weight) and _ops._plain(self.bias))


def _not_invertible(act: nn.Module) -> str:
    return ("save='output' recovers the normalized value from the output, so it needs an "
            "invertible activation: leaky_relu with negative_slope > 0, or identity "
            f"(got {act!r}); use save='input'")


_DOC = r"""Batch Normalization followed by an activation, fused: ``y = act(BN(x))`` over a
    {shape} input.

    .. math::
        y = \mathrm{{act}}\left(\frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}}
            * \gamma + \beta\right)

    The BN part is :class:`bnlab.nn.{base}` exactly (statistics, eps, momentum with
    ``None`` for a cumulative average, ``num_batches_tracked``, half inputs reduced in
    float32, a non-finite batch leaving the running statistics alone), and the layer is one
    (``isinstance(layer, torch.nn.{base})`` holds); its ``state_dict`` has exactly the keys of
    ``torch.nn.{base}``'s and loads from and into one. In training, statistics,
    normalization and activation run in one forward and one backward (compiled kernels on
    CPU for float32 and float64, Triton kernels on CUDA); in eval it is the running-statistics affine map, then
    ``self.act``. No double backward; no TorchScript.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias:
            as :class:`bnlab.nn.{base}`.
        act (keyword only): "relu", "leaky_relu", "silu", "identity" (or the matching
            ``torch.nn`` module class or instance, or None for identity). Default: "relu".
        negative_slope (keyword only): leaky_relu's slope below 0. Default: 0.01.
        save (keyword only): what the backward keeps: "input" (x), or "output" (y; the
            in-place activated BN of Rota Bulo et al. 2018, which frees x and recovers
            x_hat = (act^-1(y) - bias) / weight; leaky_relu with negative_slope > 0 or
            identity only). With "output" the weight must stay away from 0: |weight| is
            raised to at least ``eps`` in that division, as the paper does, so a channel
            whose |weight| < eps gets a wrong weight gradient (0 for weight 0); its input
            and bias gradients stay exact. Default: "input".
        apply_act, act_layer, act_kwargs, inplace, drop_layer (keyword only): timm's
            ``BatchNormAct2d`` keywords: ``apply_act=False`` is identity, ``act_layer`` is
            ``act``, ``act_kwargs`` go to the activation's constructor, ``inplace`` to
            ``self.act`` (the fused step writes a new tensor either way); ``drop_layer`` must
            be None or ``nn.Identity`` (``self.drop`` is ``nn.Identity()``).

    Shape:
        - Input: {shape}
        - Output: same shape as the input

    Example::

        >>> layer = bnlab.nn.{name}(16, act="leaky_relu", negative_slope=0.1, save="output")
        >>> y = layer(torch.randn({example}))
    """


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    _accepted_dims = (2, 3)


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    _accepted_dims = (4,)


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    _accepted_dims = (5,)


BatchNormAct1d.__doc__ = _DOC.format(name="BatchNormAct1d", base="BatchNorm1d",
                                     shape="(N, C) or (N, C, L)", example="8, 16")
BatchNormAct2d.__doc__ = _DOC.format(name="BatchNormAct2d", base="BatchNorm2d",
                                     shape="(N, C, H, W)", example="8, 16, 5, 5")
BatchNormAct3d.__doc__ = _DOC.format(name="BatchNormAct3d", base="BatchNorm3d",
                                     shape="(N, C, D, H, W)", example="8, 16, 3, 5, 5")
