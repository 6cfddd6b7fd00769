"""Training many networks of one structure in lock-step, any model the lab builds, by autograd.

A :class:`StackedNets` holds M networks built by :func:`~bnlab.lab.models.build_mlp` or
:func:`~bnlab.lab.models.build_cnn` with one structure and one norm of :data:`NORMS`, as
stacked tensors, and trains them by SGD at per-network learning rates, all in one pass per
step. Each layer of the networks is one stacked op, and autograd composes the ops' backward:
the stacked gradients come out of ``torch.autograd.grad``, and a new layer type is one op.

The activations lie in one of two layouts:

* rows (M, N, C): each network's mini-batch after the others'. Linear maps are batched
  products (:func:`~bnlab.lab.stack.product`), BN the stacked kernels
  (:func:`bnlab.nn.kernels.stacked_forward`; ghost batches are more stacked problems),
  activations :func:`~bnlab.lab.stack.each`, LayerNorm and GroupNorm per row;
* wide (N, M * C, H, W), from build_cnn's ``Unflatten`` to its ``Flatten``: the networks side
  by side as channel groups of one wide network, each group fed its own network's batch. A
  convolution is one grouped convolution (groups=M); BN, GroupNorm, ReLU and max-pooling act
  per channel or channel group, hence per network.

Where a norm's statistics come from the whole training set (the norm registry's
``statistics``), every step takes all of it: full-batch BN (``whole``) sends the whole set
through every network, the first linear map one product of the shared input with all
networks' weights (:func:`~bnlab.lab.stack.shared_product`, forward and the weights'
gradients), and takes each network's loss on its batch's rows; population BN
(``population``) sets each network's statistics over the whole set by the inference forward
before every step and every measurement, constants of the step.

A network's numbers do not depend on which networks share its stack (its size, its place in
it), so a resumed run, whose stacks may be smaller, ends as an uninterrupted one. The ops
that are not exact by construction (a grouped convolution, GroupNorm, the BN operator over
the wide channels, ...) run on the whole stack only where a probe on random data found them
to give every network, forward and backward, the bits the op gives it alone on copies of its
own tensors (as :func:`~bnlab.lab.stack.product` does); one call per network otherwise.
(oneDNN's float32 grouped convolution with one input channel per group, build_cnn's first,
is not exact, and runs network by network.) Running statistics are folded in per network,
each skipped alone when its batch statistics are not finite.

For build_mlp's networks with norm ``none`` or ``bn`` the ops, loss and SGD are
:class:`~bnlab.lab.stack.Stack`'s, and so are the numbers, bit for bit. Against one network
trained alone with autograd and ``torch.optim.SGD`` the arithmetic differs in rounding order
only (float64: within 1e-10 over short runs). Checkpoints are the one-network loop's: each
network's ``nn.Sequential`` and a ``torch.optim.SGD`` state_dict (:meth:`StackedNets.export`).

Speed (one thread, ten networks, batch 60; measured on a shared 2-core machine, n=7 paired
rounds): compare's MLP takes 1.17 (none) and 1.21 to 1.26 (bn) times Stack's time per step,
the difference being autograd's own work (tens of microseconds per node), and a third to a half of one network's at a time with
autograd; build_cnn's CNN (side 28, bn) takes the time of one network at a time to within
10%: its every op already holds 10^5 values or more per network, and the wide tensors
outgrow the caches.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import bnlab.nn as bnn
from bnlab.nn.renorm import renorm_correction, renorm_limits
from .models import ACTIVATIONS, PopulationBatchNorm1d
from .norms import STATISTICS
from .stack import (_ACTIVATIONS, Stack, _choose, _random_like, _runs, cross_entropy,
                    cross_entropy_grad, fold_running, inference_bn, network_losses, product,
                    shared_product, stacked_bn, stacked_bn_backward)
from .train import EvalResult, sgd_, sgd_state

__all__ = ["NORMS", "StackedNets"]

NORMS = {"mlp": ("none", "bn", "ghost-K", "renorm", "gn", "ln", "full-batch", "population"),
         "cnn": ("none", "bn", "renorm", "gn", "ln")}  # norms whose networks stack
EVAL_ROWS = {"rows": 2048, "wide": 128}  # rows per chunk in evaluate: 128 for convolutional
#                                          networks, whose activations per row are larger


# -- whole stack, or network by network -----------------------------------------------------
def _by_network(key: tuple, fn: Callable[..., Any], x: Tensor, params: Sequence[Tensor | None],
                dim: int, M: int) -> Any:
    """``fn(x, *params)`` for M networks side by side along x's ``dim`` (params: one row per
    network), each network's part what ``fn`` gives it alone on copies of its own tensors.
    One call on the whole stack where a probe found it so, forward and (for the inputs that
    need one) backward; one call per network otherwise. The rounding depends on shapes and
    layout, not values: a probe on random data answers for its key."""
    inputs = (x, *params)
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in inputs)
    key = ("by network", key, x.shape, x.stride(), dim, x.dtype, x.device,
           torch.get_num_threads(), tuple(None if p is None else p.shape for p in params), needs)
    whole = _probe_of(fn, needs)
    apart = _probe_of(lambda *a: _apart(fn, a[0], a[1:], dim, M), needs)
    probe = lambda: tuple(_random_like(t, k) for k, t in enumerate(inputs))  # noqa: E731
    if _choose(key, whole, apart, probe) is whole:
        return fn(x, *params)
    return _apart(fn, x, params, dim, M)


def _apart(fn: Callable[..., Any], x: Tensor, params: Sequence[Tensor | None], dim: int,
           M: int) -> Any:
    """``fn`` network by network, on copies (a product may round by where its operands lie),
    the results joined along ``dim``."""
    outs = [fn(part.clone(memory_format=torch.contiguous_format),
               *[None if p is None else p[m:m + 1].clone() for p in params])
            for m, part in enumerate(x.split(x.shape[dim] // M, dim))]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts, dim) for parts in zip(*outs))
    return torch.cat(outs, dim)


def _probe_of(call: Callable[..., Any], needs: tuple[bool, ...]) -> Callable[..., Tensor]:
    """``call``'s outputs, and the gradients of the inputs that ``needs`` one under a random
    output gradient, as one float64 vector: what must agree bit for bit for a whole-stack
    call to be used."""
    def run(*args: Tensor | None) -> Tensor:
        with torch.enable_grad():
            args = tuple(a if a is None else a.detach().requires_grad_(need)
                         for a, need in zip(args, needs))
            out = call(*args)
            outs = out if isinstance(out, tuple) else (out,)
            inputs = [a for a, need in zip(args, needs) if need]
            grads = torch.autograd.grad(outs[0], inputs, _random_like(outs[0], len(args))) \
                if inputs else ()
        return torch.cat([t.detach().reshape(-1).double() for t in (*outs, *grads)])
    return run


# -- ops with a hand-written backward: Stack's arithmetic ---------------------------------------
# An activation right after a linear map or BN runs inside their node, as an epilogue: one
# autograd node less per layer (a node costs some 40 us, a tenth of Stack's step of ten
# small networks); :class:`_Activation` is the same activation as a node of its own.
def _activate(z: Tensor, act: str | None) -> Tensor:
    return z if act is None else _ACTIVATIONS[act][0](z)


def _deactivate(grad: Tensor, act: str | None, a: Tensor | None) -> Tensor:
    """The gradient at the activation's input, from the one at its output ``a``."""
    return grad if act is None else _ACTIVATIONS[act][1](grad, a)


class _Linear(torch.autograd.Function):
    """``act(h[m] @ weight[m].T + bias[m])`` of (M, N, in) rows, by :func:`product` both ways."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, act: str | None) -> Tensor:
        a = _activate(product(h, weight.transpose(1, 2), bias), act)
        ctx.save_for_backward(h, weight, None if act is None else a)
        ctx.act = act
        return a

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight, a = ctx.saved_tensors
        grad = _deactivate(grad, ctx.act, a)
        need_h, need_w, need_b, _ = ctx.needs_input_grad
        return (product(grad, weight) if need_h else None,
                product(grad.transpose(1, 2), h) if need_w else None,
                grad.sum(1) if need_b else None, None)


class _SharedLinear(torch.autograd.Function):
    """``act(x @ weight[m].T + bias[m])`` of one input x (n, in) that every network takes:
    (M, n, out) by :func:`shared_product`, and the weights' gradients ``x.T @ grad[m]`` by
    it too (all networks' gradients side by side in one product, where checked exact)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, act: str | None) -> Tensor:
        a = _activate(shared_product(x, weight, bias).contiguous(), act)
        ctx.save_for_backward(x, None if act is None else a)
        ctx.act = act
        return a

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, a = ctx.saved_tensors
        grad = _deactivate(grad, ctx.act, a)
        _, need_w, need_b, _ = ctx.needs_input_grad
        grad_w = shared_product(x.t(), grad.transpose(1, 2), None).transpose(1, 2).contiguous() \
            if need_w else None  # (M, out, in)
        return None, grad_w, grad.sum(1) if need_b else None, None


class _RowsBatchNorm(torch.autograd.Function):
    """Training BN of (M, N, C) rows, each network with its own statistics, by bnlab's
    stacked kernels (:func:`~bnlab.lab.stack.stacked_bn`), then ``act``; returns ``(y,
    saved)``, saved (M, 2, C) float64 (batch mean and biased variance). ``running`` is
    (running_mean, running_var, num_batches_tracked, momentum, eps), one argument (the
    buffers are updated in place, no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running: tuple,
                act: str | None):
        y, saved = stacked_bn(x, weight, bias, running[:3], *running[3:])
        a = _activate(y, act)
        ctx.save_for_backward(x, weight, None if act is None else a)
        ctx.saved, ctx.eps, ctx.act = saved, running[4], act
        ctx.mark_non_differentiable(saved)
        ctx.set_materialize_grads(False)
        return a, saved

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_saved: None):
        x, weight, a = ctx.saved_tensors
        need_x, need_w, need_b, _, _ = ctx.needs_input_grad
        gx, gw, gb = stacked_bn_backward(_deactivate(grad, ctx.act, a), x, weight, ctx.saved,
                                         ctx.eps, need_x)
        return gx, gw if need_w else None, gb if need_b else None, None, None


class _Activation(torch.autograd.Function):
    """An activation of (M, N, C) rows, as :class:`~bnlab.lab.stack.Stack` computes it."""

    @staticmethod
    def forward(ctx, z: Tensor, act: str) -> Tensor:
        a = _activate(z, act)
        ctx.save_for_backward(a)
        ctx.act = act
        return a

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, = ctx.saved_tensors
        return _deactivate(grad, ctx.act, a), None


class _CrossEntropy(torch.autograd.Function):
    """Each network's mean cross-entropy of (M, N, classes) logits against (M, N) labels:
    (M,), as :class:`~bnlab.lab.stack.Stack` computes it (:func:`~bnlab.lab.stack.cross_entropy`)."""

    @staticmethod
    def forward(ctx, z: Tensor, y: Tensor) -> Tensor:
        loss, logp = cross_entropy(z, y)
        ctx.save_for_backward(logp, y)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logp, y = ctx.saved_tensors
        return cross_entropy_grad(logp, y).mul_(grad_loss.view(-1, 1, 1)), None


# -- the layers ---------------------------------------------------------------------------------
class _Op:
    """One layer of every network: the stacked parameters and buffers of the layer's modules
    (``tensors``, by their names, (M, *shape) each) and its training and inference forward on
    one layout. ``train`` is differentiated by autograd."""

    layout = "rows"  # the layout it takes; its output's, unless it changes the layout
    act: str | None = None  # an activation fused after it (set where the op takes one)
    takes_act = False

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        first = modules[0]
        self.module = first
        self.index = 0  # the module's place in the Sequential
        self.param_names = [name for name, _ in first.named_parameters(recurse=False)]
        names = self.param_names + [name for name, _ in first.named_buffers(recurse=False)]
        self.tensors = {name: self._stack([getattr(m, name).detach() for m in modules], name)
                        for name in names}
        self.key = (type(first).__name__, first.extra_repr())

    def _stack(self, tensors: list[Tensor], name: str) -> Tensor:
        t = torch.stack(tensors)
        return t.requires_grad_() if name in self.param_names else t

    def params(self) -> list[Tensor]:
        """The trainable tensors, in the order of the module's ``parameters()``."""
        return [self.tensors[name] for name in self.param_names]

    def train(self, h: Tensor, M: int) -> Tensor:
        raise NotImplementedError

    def infer(self, h: Tensor, M: int) -> Tensor:
        return self.train(h, M)

    def spread(self, x: Tensor, M: int) -> Tensor:
        """An input all networks share, one copy per network in the op's layout."""
        return x.expand(M, *x.shape).contiguous() if self.layout == "rows" else \
            x.repeat(1, M, 1, 1)

    def train_shared(self, x: Tensor, M: int) -> Tensor:
        """:meth:`train` on an input all networks share (the whole training set)."""
        return self.train(self.spread(x, M), M)

    def infer_shared(self, x: Tensor, M: int) -> tuple[Tensor, bool]:
        """Inference on an input all networks share: (output, still shared)."""
        return self.infer(self.spread(x, M), M), False

    def keep(self, index: Tensor) -> None:
        self.tensors = {name: t.detach()[index].requires_grad_(name in self.param_names)
                        for name, t in self.tensors.items()}

    def export(self, m: int, module: nn.Module) -> None:
        for name, t in self.tensors.items():
            getattr(module, name).copy_(t[m])


class _LinearOp(_Op):
    takes_act = True

    def train(self, h: Tensor, M: int) -> Tensor:
        return _Linear.apply(h, self.tensors["weight"], self.tensors.get("bias"), self.act)

    def infer(self, h: Tensor, M: int) -> Tensor:
        w, b = self.tensors["weight"], self.tensors.get("bias")
        return _activate(product(h, w.transpose(1, 2), b), self.act)

    def train_shared(self, x: Tensor, M: int) -> Tensor:
        return _SharedLinear.apply(x, self.tensors["weight"], self.tensors.get("bias"), self.act)

    def infer_shared(self, x: Tensor, M: int) -> tuple[Tensor, bool]:
        h = shared_product(x, self.tensors["weight"], self.tensors.get("bias")).contiguous()
        return _activate(h, self.act), False


class _ActivationOp(_Op):
    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__(modules)
        self.name = next(k for k, v in ACTIVATIONS.items() if v is type(modules[0]))

    def train(self, h: Tensor, M: int) -> Tensor:
        return _Activation.apply(h, self.name)

    def infer(self, h: Tensor, M: int) -> Tensor:
        return _activate(h, self.name)


class _ChannelwiseOp(_Op):
    """A layer without state acting on each channel alone (ReLU, max-pooling), exactly:
    the module itself over the wide channels."""

    layout = "wide"

    def train(self, h: Tensor, M: int) -> Tensor:
        return self.module(h)


class _UnflattenOp(_Op):
    """build_cnn's ``Unflatten(1, (C, H, W))``: rows (M, N, C*H*W) -> wide (N, M*C, H, W)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__(modules)
        if self.module.dim != 1 or len(self.module.unflattened_size) != 3:
            raise ValueError(f"StackedNets takes Unflatten(1, (C, H, W)) only (got "
                             f"{self.module!r})")

    def train(self, h: Tensor, M: int) -> Tensor:
        c, height, width = self.module.unflattened_size
        return h.view(M, -1, c, height, width).transpose(0, 1).reshape(-1, M * c, height, width)

    def infer_shared(self, x: Tensor, M: int) -> tuple[Tensor, bool]:
        return x.view(len(x), *self.module.unflattened_size), True


class _FlattenOp(_Op):
    """``Flatten()``: wide (N, M*C, H, W) -> rows (M, N, C*H*W), a view."""

    layout = "wide"

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__(modules)
        if (self.module.start_dim, self.module.end_dim) not in ((1, -1), (1, 3)):
            raise ValueError(f"StackedNets takes Flatten() of whole images only (got "
                             f"{self.module!r})")

    def train(self, h: Tensor, M: int) -> Tensor:
        return h.reshape(len(h), M, -1).transpose(0, 1)


class _ConvOp(_Op):
    """A convolution of every network: one grouped convolution over the wide channels."""

    layout = "wide"

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__(modules)
        if self.module.padding_mode != "zeros":
            raise ValueError(f"StackedNets takes convolutions with zero padding (got "
                             f"{self.module!r})")

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        c = self.module  # (k, out, in / groups, kh, kw) weights, k networks' filters in a row
        return F.conv2d(x, weight.flatten(0, 1), None if bias is None else bias.flatten(),
                        c.stride, c.padding, c.dilation, groups)

    def train(self, h: Tensor, M: int) -> Tensor:
        fn = lambda x, w, b: self._conv(x, w, b, self.module.groups * len(w))  # noqa: E731
        return _by_network(self.key, fn, h, [self.tensors["weight"], self.tensors.get("bias")],
                           1, M)

    def infer_shared(self, x: Tensor, M: int) -> tuple[Tensor, bool]:
        """All networks' filters over one input: one convolution where checked, as
        :func:`~bnlab.lab.stack.shared_product`."""
        if self.module.groups != 1:
            return super().infer_shared(x, M)
        w, b = self.tensors["weight"], self.tensors.get("bias")
        whole = lambda x, w, b: self._conv(x, w, b, 1)  # noqa: E731
        apart = lambda x, w, b: torch.cat([  # noqa: E731
            self._conv(x.clone(), w[m:m + 1].clone(), None if b is None else b[m:m + 1].clone(), 1)
            for m in range(len(w))], 1)
        key = ("shared conv", self.key, x.shape, x.stride(), x.dtype, M, x.device,
               torch.get_num_threads())
        probe = lambda: (_random_like(x, 0), _random_like(w, 1), _random_like(b, 2))  # noqa: E731
        return _choose(key, whole, apart, probe)(x, w, b), False


class _BatchNormOp(_Op):
    """BN of every network with its own batch statistics: the stacked kernels on rows, the
    BN operator over the wide channels (each channel its own statistics), running statistics
    folded in per network."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__(modules)
        first = modules[0]
        if not (first.affine and first.track_running_stats) or first.bias is None:
            raise ValueError(f"StackedNets takes BN layers with weight, bias and running "
                             f"statistics (got {first!r})")
        self.eps, self.momentum = first.eps, first.momentum
        self.layout = "wide" if isinstance(first, nn.BatchNorm2d) else "rows"
        self.takes_act = type(self) is _BatchNormOp and self.layout == "rows"

    def shape(self, M: int) -> tuple:
        """(M, C) tensors viewed against the activations."""
        return (M, 1, -1) if self.layout == "rows" else (1, -1, 1, 1)

    def normalize(self, h: Tensor, M: int, weight: Tensor | None,
                  bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Training BN (and the fused activation), running statistics updated: (y, mean,
        biased var), the last two (M, C) float64."""
        t = self.tensors
        running = (t["running_mean"], t["running_var"], t["num_batches_tracked"])
        if self.layout == "rows":
            y, saved = _RowsBatchNorm.apply(h, weight, bias, (*running, self.momentum, self.eps),
                                            self.act)
            return y, saved[:, 0], saved[:, 1]
        eps = self.eps

        def fn(x: Tensor, w: Tensor | None = None, b: Tensor | None = None) -> tuple:
            return torch.ops.bnlab.batch_norm(x, None if w is None else w.reshape(-1),
                                              None if b is None else b.reshape(-1), eps)
        params = [] if weight is None else [weight, bias]
        y, saved = _by_network(("BN", eps, len(params)), fn, h, params, 1, M)
        mean, var = saved[0].view(M, -1), saved[1].view(M, -1)
        fold_running(mean, var, *running, h.numel() // h.shape[1], self.momentum)
        return y, mean, var

    def train(self, h: Tensor, M: int) -> Tensor:
        return self.normalize(h, M, self.tensors["weight"], self.tensors["bias"])[0]

    def infer(self, h: Tensor, M: int) -> Tensor:
        return _activate(inference_bn(h, self.tensors, self.eps, self.shape(M)), self.act)


class _GhostOp(_BatchNormOp):
    """Ghost BN (rows): every virtual batch of every network one problem of the stacked
    kernels; the running statistics get the whole batch's, pooled from them exactly."""

    def train(self, h: Tensor, M: int) -> Tensor:
        N, C = h.shape[1:]
        v = self.module.virtual_batch_size
        if N % v:
            raise ValueError(f"virtual_batch_size={v} must divide the batch size (got batch "
                             f"size {N})")
        G = N // v
        if G == 1:  # one virtual batch: BatchNorm, as the layer computes it
            return super().train(h, M)
        t = self.tensors
        # each network's weight and bias once per virtual batch, contiguous (the kernels'
        # layout, also for M = 1, where a reshape would give a strided view)
        w, b = (t[k].unsqueeze(1).expand(M, G, C).contiguous().view(M * G, C)
                for k in ("weight", "bias"))
        y, saved = _RowsBatchNorm.apply(h.reshape(M * G, N // G, C), w, b,
                                        (None, None, None, self.momentum, self.eps), None)
        mean_g, var_g = saved[:, 0].view(M, G, C), saved[:, 1].view(M, G, C)
        mean = mean_g.mean(1)  # total variance: mean of the variances + variance of the means
        var = var_g.mean(1) + (mean_g - mean.unsqueeze(1)).square().mean(1)
        fold_running(mean, var, t["running_mean"], t["running_var"], t["num_batches_tracked"],
                     N, self.momentum)
        return y.view(M, N, C)


class _RenormOp(_BatchNormOp):
    """Batch Renorm (Ioffe 2017): BN's normalization, then ``x_bn * (weight * r) + (weight *
    d + bias)`` with r and d from the batch and the running statistics before this step's
    update, constants for autograd. With r = 1 and d = 0 (the limits of a warmup) this is BN
    to rounding: the layer's plain-BN path is not taken, as whether it applies may differ
    between the networks of a stack."""

    def train(self, h: Tensor, M: int) -> Tensor:
        t = self.tensors
        limits = self.limits()
        before = t["running_mean"].clone(), t["running_var"].clone()
        x_bn, mean, var = self.normalize(h, M, None, None)
        dtype = torch.promote_types(bnn.functional.compute_dtype(h.dtype), t["weight"].dtype)
        mean, var = mean.to(dtype), var.to(dtype)
        if len(set(limits)) == 1:
            r, d = renorm_correction(mean, var, *before, self.eps, *limits[0])
        else:  # network by network: the limits follow each one's count of steps
            r, d = (torch.stack(c) for c in zip(*[
                renorm_correction(mean[m], var[m], before[0][m], before[1][m], self.eps, *lim)
                for m, lim in enumerate(limits)]))
        w, shape = t["weight"], self.shape(M)
        return x_bn * (w * r.to(w.dtype)).view(shape) + (w * d.to(w.dtype) + t["bias"]).view(shape)

    def limits(self) -> list[tuple[float, float]]:
        """Each network's (r_max, d_max) for this step (one pair when they cannot differ)."""
        m = self.module
        if not (m.warmup_steps or m.ramp_steps):
            return [(m.r_max, m.d_max)]
        return [renorm_limits(step, m.r_max, m.d_max, m.warmup_steps, m.ramp_steps)
                for step in self.tensors["num_batches_tracked"].tolist()]


class _PopulationOp(_Op):
    """:class:`~bnlab.lab.models.PopulationBatchNorm1d` (rows): ``h * scale + shift`` from
    each network's statistics, constants for autograd; :meth:`collect` sets them."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__(modules)
        self.eps = self.module.eps

    def _affine(self, h: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                var: Tensor) -> Tensor:
        scale, shift = bnn.functional.affine_from_stats(mean, var, weight, bias, self.eps)
        return h * scale.unsqueeze(1) + shift.unsqueeze(1)

    def train(self, h: Tensor, M: int) -> Tensor:
        t = self.tensors
        return _by_network(self.key, self._affine, h,
                           [t["weight"], t["bias"], t["mean"], t["var"]], 0, M)

    @torch.no_grad()
    def collect(self, h: Tensor, M: int) -> None:
        """Each network's statistics: the mean and biased variance of its rows of h (M, n,
        C), as the layer collects them."""
        stats = lambda x: (x.mean(1), x.var(1, unbiased=False))  # noqa: E731
        mean, var = _by_network(("population statistics",), stats, h, [], 0, M)
        self.tensors["mean"].copy_(mean)
        self.tensors["var"].copy_(var)


class _GroupNormOp(_Op):
    """GroupNorm (and build_mlp's LayerNorm): per sample, hence per network in either layout;
    the wide form is one GroupNorm of M times the groups."""

    def __init__(self, modules: Sequence[nn.Module], layout: str) -> None:
        super().__init__(modules)
        self.layout = layout

    def _rows(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.LayerNorm):
            x_hat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        else:
            x_hat = F.group_norm(x.reshape(-1, x.shape[-1]), m.num_groups, None, None,
                                 m.eps).view(x.shape)
        return x_hat * weight.unsqueeze(1) + bias.unsqueeze(1)

    def _wide(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return F.group_norm(x, self.module.num_groups * len(weight), weight.reshape(-1),
                            bias.reshape(-1), self.module.eps)

    def train(self, h: Tensor, M: int) -> Tensor:
        fn, dim = (self._rows, 0) if self.layout == "rows" else (self._wide, 1)
        return _by_network(self.key, fn, h, self.params(), dim, M)


# -- reading the networks -----------------------------------------------------------------------
_OPS: dict[type, Callable[[Sequence[nn.Module], str], _Op]] = {
    nn.Linear: lambda ms, layout: _LinearOp(ms),
    nn.Conv2d: lambda ms, layout: _ConvOp(ms),
    bnn.BatchNorm1d: lambda ms, layout: _BatchNormOp(ms),
    bnn.BatchNorm2d: lambda ms, layout: _BatchNormOp(ms),
    bnn.GhostBatchNorm: lambda ms, layout: _GhostOp(ms),
    bnn.BatchRenorm1d: lambda ms, layout: _RenormOp(ms),
    bnn.BatchRenorm2d: lambda ms, layout: _RenormOp(ms),
    PopulationBatchNorm1d: lambda ms, layout: _PopulationOp(ms),
    nn.GroupNorm: _GroupNormOp,
    nn.LayerNorm: _GroupNormOp,
    nn.Sigmoid: lambda ms, layout: _ActivationOp(ms),
    nn.Tanh: lambda ms, layout: _ActivationOp(ms),
    nn.ReLU: lambda ms, layout: _ActivationOp(ms) if layout == "rows" else _ChannelwiseOp(ms),
    nn.MaxPool2d: lambda ms, layout: _ChannelwiseOp(ms),
    nn.Unflatten: lambda ms, layout: _UnflattenOp(ms),
    nn.Flatten: lambda ms, layout: _FlattenOp(ms),
}
_NEXT_LAYOUT = {_UnflattenOp: "wide", _FlattenOp: "rows"}


def _check_structure(models: Sequence[nn.Module]) -> None:
    """ValueError unless the networks are Sequentials of one structure: layer types,
    hyperparameters (``extra_repr``), and names, shapes and dtypes of tensors."""
    if not models:
        raise ValueError("StackedNets needs at least one network")
    for i, net in enumerate(models):
        if not isinstance(net, nn.Sequential):
            raise TypeError(f"StackedNets takes nn.Sequential networks (network {i} is a "
                            f"{type(net).__name__})")
    first = models[0]
    for i, net in enumerate(models[1:], 1):
        if [type(m) for m in net] != [type(m) for m in first]:
            raise ValueError(f"the networks of a StackedNets must share one structure: network "
                             f"{i} has layers {_names(net)}, network 0 {_names(first)}")
        for j, (a, b) in enumerate(zip(first, net)):
            if a.extra_repr() != b.extra_repr() or _tensor_kinds(a) != _tensor_kinds(b):
                raise ValueError(f"the networks of a StackedNets must share one structure: "
                                 f"layer {j} of network {i} is {b!r}, of network 0 {a!r}")


def _names(net: nn.Sequential) -> str:
    return ", ".join(type(m).__name__ for m in net)


def _tensor_kinds(m: nn.Module) -> list[tuple]:
    return [(name, t.shape, t.dtype, t.device) for name, t in
            (*m.named_parameters(), *m.named_buffers())]


def _build_ops(models: Sequence[nn.Sequential]) -> list[_Op]:
    ops: list[_Op] = []
    layout = "rows"
    for j, first in enumerate(models[0]):
        make = _OPS.get(type(first))
        if make is None:
            raise ValueError(f"StackedNets cannot stack layer {j}, {type(first).__module__}."
                             f"{type(first).__name__}: it holds networks of build_mlp (norms "
                             f"{', '.join(NORMS['mlp'])}) and build_cnn (norms "
                             f"{', '.join(NORMS['cnn'])})")
        op = make([net[j] for net in models], layout)
        if op.layout != layout:
            raise ValueError(f"StackedNets cannot stack layer {j}, {type(first).__name__}, "
                             f"where its input is {'an image' if layout == 'wide' else 'flat'}")
        op.index = j
        if isinstance(op, _ActivationOp) and ops and ops[-1].takes_act and ops[-1].act is None:
            ops[-1].act = op.name  # run inside the node before it
            continue
        ops.append(op)
        layout = _NEXT_LAYOUT.get(type(op), layout)
    if layout != "rows" or not isinstance(ops[-1], _LinearOp):
        raise ValueError("StackedNets needs networks that end with a linear map to the logits")
    return ops


# -- the stack -----------------------------------------------------------------------------------
class StackedNets:
    """M networks of one structure (built by ``build_mlp`` or ``build_cnn``, one norm of
    :data:`NORMS`, the same hyperparameters), trained by SGD with per-network learning rates
    ``lrs`` and one ``momentum``. ``models`` are the networks themselves: their tensors are
    copied in, and :meth:`export` writes them back. ``buffers``: each network's momentum
    buffers, as :meth:`load_buffers` takes them (None: a fresh optimizer).

    ``statistics`` (one of :data:`~bnlab.lab.norms.STATISTICS`, the norm's entry) says where
    a step's statistics come from, as for :class:`~bnlab.lab.train.Network`: ``batch``, each
    network's own batch of the step; ``whole`` (full-batch BN), the whole training set
    through every network and each network's loss on its batch's rows (:meth:`train_step`);
    ``population``, the networks' :class:`~bnlab.lab.models.PopulationBatchNorm1d`
    statistics set over the whole training set before every step and every measurement
    (:meth:`refresh`). The class is an engine of :func:`~bnlab.lab.train.fit`
    (``engine=functools.partial(StackedNets, statistics=...)``)."""

    def __init__(self, models: Sequence[nn.Sequential], lrs: Sequence[float], momentum: float,
                 buffers: Sequence[list[Tensor | None]] | None = None,
                 statistics: str = "batch") -> None:
        _check_structure(models)
        if len(lrs) != len(models):
            raise ValueError(f"StackedNets needs one learning rate per network ({len(models)} "
                             f"networks, got {len(lrs)} rates)")
        if statistics not in STATISTICS:
            raise ValueError(f"statistics must be one of {', '.join(STATISTICS)} (got "
                             f"{statistics!r})")
        self.statistics = statistics
        self.models = list(models)
        self.lrs = list(lrs)
        self.momentum = momentum
        self.ops = _build_ops(self.models)
        if statistics != "population" and any(isinstance(op, _PopulationOp) for op in self.ops):
            raise ValueError(f"PopulationBatchNorm1d takes the whole training set's statistics: "
                             f"StackedNets needs statistics='population' for it (got "
                             f"{statistics!r})")
        self.chunk = EVAL_ROWS["wide" if any(op.layout == "wide" for op in self.ops) else "rows"]
        self._params = [p for op in self.ops for p in op.params()]
        self.buffers: list[Tensor | None] = [None] * len(self._params)
        if buffers is not None:
            self.load_buffers(buffers)

    def __len__(self) -> int:
        return len(self.models)

    def params(self) -> list[Tensor]:
        """The stacked trainable tensors, (M, *shape) each, in the order of a network's
        ``parameters()``."""
        return self._params

    # -- training -------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One SGD step of every network on its batch: ``x`` (M, N, features), ``y`` (M, N).
        Returns the (M,) training-mode losses."""
        M = len(self)
        if x.shape[0] != M or y.shape != x.shape[:2]:
            raise ValueError(f"StackedNets of {M} networks expects x (M={M}, N, features) and "
                             f"y (M, N) (got x {tuple(x.shape)}, y {tuple(y.shape)})")
        h = x
        for op in self.ops:
            h = op.train(h, M)
        return self._descend(h, y)

    def step_whole(self, x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        """One SGD step of every network with BN statistics over the whole training set:
        all of ``x`` (n, features) goes through every network (its first layer one shared
        product), and network m's loss is its mean over the rows ``idx[m]`` of (x, y), idx
        (M, B). Returns the (M,) training-mode losses."""
        M = len(self)
        if idx.dim() != 2 or len(idx) != M:
            raise ValueError(f"StackedNets of {M} networks expects idx (M={M}, B) (got "
                             f"{tuple(idx.shape)})")
        h = self.ops[0].train_shared(x, M)  # (M, n, ...)
        for op in self.ops[1:]:
            h = op.train(h, M)
        rows = h.gather(1, idx.unsqueeze(2).expand(-1, -1, h.shape[2]))  # (M, B, classes)
        return self._descend(rows, y[idx])

    def _descend(self, logits: Tensor, y: Tensor) -> Tensor:
        """The SGD update from (M, B, classes) training-mode logits: the (M,) losses."""
        loss = _CrossEntropy.apply(logits, y)
        grads = torch.autograd.grad(loss, self._params, torch.ones_like(loss))
        sgd_(self._params, grads, self.buffers, self.momentum, _runs(self.lrs))
        return loss.detach()

    @torch.no_grad()
    def refresh(self, x: Tensor) -> None:
        """Set every PopulationBatchNorm1d's statistics to those of its input over the whole
        of ``x`` (n, features), network by network: what
        :func:`~bnlab.lab.models.refresh_population` sets for one network."""
        self._infer(x, collect=True)

    # -- as an engine of bnlab.lab.train.fit ---------------------------------------------------
    loss_dtype = Stack.loss_dtype
    model = Stack.model
    state = Stack.state

    def train_step(self, x: Tensor, y: Tensor, idx: Sequence[Tensor]) -> Tensor:
        """One SGD step of network m on the rows ``idx[m]`` of (x, y), as
        :class:`~bnlab.lab.train.Network` takes it for its ``statistics``: with ``whole``
        the whole of x goes through (:meth:`step_whole`); with ``population`` the statistics
        are refreshed over x first (:meth:`refresh`)."""
        if self.statistics == "whole":
            return self.step_whole(x, y, torch.stack(list(idx)))
        if self.statistics == "population":
            self.refresh(x)
        return Stack.train_step(self, x, y, idx)  # network m's rows, one batch after another

    def before_measure(self, x: Tensor) -> None:
        if self.statistics == "population":
            self.refresh(x)

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, chunk: int | None = None) -> list[EvalResult]:
        """Inference-mode (loss, accuracy) of every network over the whole of (x, y), as
        :func:`~bnlab.lab.train.evaluate` gives for one, in chunks of rows (by default
        :data:`EVAL_ROWS`, whatever the stack's size). The first layer takes the shared
        input once for all networks where checked exact."""
        M = len(self)
        chunk = chunk or self.chunk
        loss = torch.zeros(M, dtype=torch.float64, device=x.device)
        correct = torch.zeros(M, dtype=torch.long, device=x.device)
        for start in range(0, len(x), chunk):
            h, target = self._infer(x[start:start + chunk]), y[start:start + chunk]
            loss += network_losses(h, target)
            correct += (h.argmax(dim=2) == target).sum(1)
        return [EvalResult(l / len(x), c / len(x)) for l, c in zip(loss.tolist(), correct.tolist())]

    def _infer(self, x: Tensor, collect: bool = False) -> Tensor:
        """Every network's inference-mode logits (M, n, classes) of ``x`` (n, features),
        which the first layer takes once for all networks where checked exact; with
        ``collect``, each PopulationBatchNorm1d first takes its statistics from its input."""
        M = len(self)
        h, shared = x, True
        for op in self.ops:
            if collect and isinstance(op, _PopulationOp):
                op.collect(op.spread(h, M) if shared else h, M)
            h, shared = op.infer_shared(h, M) if shared else (op.infer(h, M), False)
        return h

    # -- networks in and out ----------------------------------------------------------------------
    def keep(self, rows: Sequence[int]) -> None:
        """Go on with the networks at ``rows`` only (the others diverged or are done)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self._params[0].device)
        for op in self.ops:
            op.keep(index)
        self._params = [p for op in self.ops for p in op.params()]
        self.buffers = [None if b is None else b[index] for b in self.buffers]
        self.models = [self.models[i] for i in rows]
        self.lrs = [self.lrs[i] for i in rows]

    @torch.no_grad()
    def export(self, m: int) -> tuple[nn.Sequential, dict]:
        """Network ``m`` as its ``nn.Sequential`` (tensors copied back in) and the state_dict
        of a ``torch.optim.SGD`` over its parameters: what the one-network loop saves."""
        model = self.models[m]
        for op in self.ops:
            op.export(m, model[op.index])
        return model, sgd_state(self.lrs[m], self.momentum,
                                [None if b is None else b[m].clone() for b in self.buffers])

    def load_buffers(self, buffers: Sequence[list[Tensor | None]]) -> None:
        """Take each network's momentum buffers (one list per network, as
        :func:`~bnlab.lab.train.read_sgd_state` reads them from its checkpoint)."""
        if len(buffers) != len(self):
            raise ValueError(f"load_buffers needs the buffers of {len(self)} networks (got "
                             f"{len(buffers)})")
        for k in range(len(self.buffers)):  # all or none, as a checkpoint holds them
            column = [b[k] for b in buffers]
            self.buffers[k] = None if column[0] is None else torch.stack(column)
