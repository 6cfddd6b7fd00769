"""Training many networks of one structure in lock-step, as one stacked model.

The networks of an experiment (seeds x variants x swept values) are small: one (60, 784) @
(784, 100) product is too little work to keep a core busy, and Python's cost per operation
is paid once per network. A :class:`Stack` holds M networks built by
:func:`~bnlab.lab.models.build_mlp` with one structure (depth, width, activation, and a norm
none or bn, :attr:`Stack.NORMS`) as stacked tensors, and runs each training step for all of them at
once: batched matrix products (``torch.bmm``, one product per network inside), bnlab's
BatchNorm kernels over the (M, N, C) activations with per-network statistics and running
statistics (:func:`bnlab.nn.kernels.stacked_forward`), the closed-form backward written out,
and one SGD update per tensor.

Each network keeps its own data order (its seed's :class:`~bnlab.lab.train.Batches`), and
every operation computes each network's slice as it would compute that network alone: the
results of a network do not depend on which others share its stack (tested bit for bit), so
a resumed run, whose stacks may hold fewer networks, ends with the metrics of an
uninterrupted one. Against the one-network engine (:class:`~bnlab.lab.train.Network`)
the arithmetic differs only in rounding order (float64: within 1e-10 over short runs).

A Stack is an engine of :func:`bnlab.lab.train.fit` (see :func:`engine`), the loop of every
network: its checkpoints are the one-network engine's (each unit's ``nn.Sequential``
state_dict and a ``torch.optim.SGD`` state_dict), so either engine resumes the other's units.

A Stack lives on its networks' device. On a GPU the probes below run there, and decide
there: whether a batched product, an activation over the whole stack or BN's statistics
over the whole stack (torch ops, where the CPU has kernels that are exact by construction)
give each network its bits alone.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

import bnlab.nn as bnn
from bnlab.nn import kernels
from .models import ACTIVATIONS
from .norms import STACKABLE
from .train import EvalResult, sgd_, sgd_state

__all__ = ["Stack", "engine", "prepare"]



def prepare(norms: Sequence[str]) -> None:
    """Where networks of ``norms`` will train in stacks that may use the stacked BN kernels
    (every stackable norm but none, gn and ln, a user's own included) and the kernels are
    not yet compiled (a first run), start compiling them in background processes, side by
    side and while the run loads its data (:func:`bnlab.nn.kernels.prepare_stacked`)."""
    if any(n in STACKABLE and n not in ("none", "gn", "ln") for n in norms):
        kernels.prepare_stacked(torch.float32)


class _Layer:
    """One linear map of every network, with the BN after it (``bn``) or its bias."""

    def __init__(self, linears: Sequence[nn.Linear], norms: Sequence[nn.Module] | None) -> None:
        self.weight = torch.stack([m.weight.detach() for m in linears])  # (M, out, in)
        self.bias = None if linears[0].bias is None else torch.stack(
            [m.bias.detach() for m in linears])  # (M, out)
        self.bn = None
        if norms is not None:
            first = norms[0]
            self.bn = {"weight": torch.stack([m.weight.detach() for m in norms]),
                       "bias": torch.stack([m.bias.detach() for m in norms]),
                       "running_mean": torch.stack([m.running_mean for m in norms]),
                       "running_var": torch.stack([m.running_var for m in norms]),
                       "num_batches_tracked": torch.stack([m.num_batches_tracked for m in norms]),
                       "eps": first.eps, "momentum": first.momentum}

    def params(self) -> list[Tensor]:
        """The trainable tensors, in the order of the network's ``parameters()``."""
        out = [self.weight] + ([] if self.bias is None else [self.bias])
        return out + ([] if self.bn is None else [self.bn["weight"], self.bn["bias"]])

    def keep(self, rows: Tensor) -> None:
        self.weight = self.weight[rows]
        self.bias = None if self.bias is None else self.bias[rows]
        if self.bn is not None:
            for k, v in self.bn.items():
                if isinstance(v, Tensor):
                    self.bn[k] = v[rows]


# Whole-stack operations are used only where they were checked to give every network
# exactly what the network-by-network form gives it: that is what makes a network's numbers
# independent of the stack it trains in (its size, its place in it), hence a resumed or
# rescheduled run identical to an uninterrupted one. Checked once per shape, on random data
# (the rounding depends on shapes and memory layout, not on values).
_CHECKED: dict[tuple, bool] = {}


def _choose(key: tuple, fast: Callable[..., Any], exact: Callable[..., Any],
            probe: Callable[[], tuple]) -> Callable[..., Any]:
    """``fast`` where it gave ``exact``'s bits on the probe's arguments, else ``exact``; the
    answer is kept by ``key``, which names the shapes, layout and device it holds for."""
    ok = _CHECKED.get(key)
    if ok is None:
        args = probe()
        ok = _CHECKED[key] = _equal(fast(*args), exact(*args))
    return fast if ok else exact


def _equal(a: Any, b: Any) -> bool:
    """Bit-equal tensors, or tuples of them (None where both are None)."""
    if isinstance(a, tuple):
        return len(a) == len(b) and all(map(_equal, a, b))
    return a is b if a is None or b is None else torch.equal(a, b)


def _on_cpu(t: Tensor) -> bool:
    """Whether ``t`` takes the CPU's forms of the ops below (exact by construction, or
    checked with the CPU's vector step in mind); elsewhere (a GPU) the checked forms."""
    return t.is_cpu


def _random_like(t: Tensor | None, seed: int) -> Tensor | None:
    """Random values in ``t``'s layout (a permuted view of a contiguous tensor included), on
    its device (drawn on the CPU, so a probe's values do not depend on the device)."""
    if t is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    base = torch.randn([t.shape[d] for d in order], generator=gen, dtype=t.dtype).to(t.device)
    return base.permute([order.index(d) for d in range(t.dim())])


def product(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a[m] @ b[m] (+ bias[m])`` for every network m, each equal to the product
    ``torch.mm`` (``torch.addmm``) gives for that network alone, on operands of its own:
    ``torch.bmm`` where checked (with MKL's strict reproducibility on, see
    ``bnlab/__init__``, it is for the lab's sizes), else one product per network, on
    copies, since MKL may round a product by where its operands lie in memory."""
    key = ("product", a.shape, a.stride(), b.shape, b.stride(), a.dtype, bias is None,
           a.device, torch.get_num_threads())
    fn = _choose(key, _batched, _one_by_one,
                 lambda: (_random_like(a, 0), _random_like(b, 1), _random_like(bias, 2)))
    return fn(a, b, bias)


def _batched(a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    return torch.bmm(a, b) if bias is None else torch.baddbmm(bias.unsqueeze(1), a, b)


def _one_by_one(a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    return torch.stack([torch.mm(a[m].clone(), b[m].clone()) if bias is None
                        else torch.addmm(bias[m].clone(), a[m].clone(), b[m].clone())
                        for m in range(len(a))])


def shared_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight[m].T (+ bias[m])`` for every network m on one shared input x (n, in):
    (M, n, out). One product with all networks' weights side by side where checked to equal
    the per-network products, one per network otherwise."""
    key = ("shared", x.shape, x.stride(), weight.shape, x.dtype, bias is None, x.device,
           torch.get_num_threads())
    fn = _choose(key, _side_by_side, _per_network,
                 lambda: (_random_like(x, 0), _random_like(weight, 1), _random_like(bias, 2)))
    return fn(x, weight, bias)


def _side_by_side(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    M, out, n_in = weight.shape
    w = weight.reshape(M * out, n_in).t()
    y = x @ w if bias is None else torch.addmm(bias.reshape(-1), x, w)
    return y.view(len(x), M, out).transpose(0, 1)


def _per_network(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.stack([x.clone() @ weight[m].t().clone() if bias is None
                        else torch.addmm(bias[m].clone(), x.clone(), weight[m].t().clone())
                        for m in range(len(weight))])


# Values a vectorized elementwise loop of torch's takes per step (two vectors of float32):
# 16 with AVX2, 32 with AVX-512; 64, a multiple of both, where the CPU's vectors are not known.
VECTOR_SPAN = {"AVX2": 16, "AVX512": 32}.get(torch.backends.cpu.get_cpu_capability(), 64)


def each(fn: Callable[..., Tensor], t: Tensor) -> Tensor:
    """``fn(t)`` (an elementwise op taking ``out=``) with each network's result what it is
    for that network alone. torch's vectorized exp, log, sigmoid and tanh round the last
    elements of a tensor (the part shorter than a vector step) differently from the rest,
    and only some values differ, so a random probe can miss it. The whole-stack call is
    used only where no network's slice can end inside a vector step: t contiguous, each
    slice a multiple of VECTOR_SPAN values, one thread (several split the range at other
    places); and checked equal besides. Otherwise one call per network. On a GPU, whose
    elementwise kernels compute every value by the same code wherever it lies, the
    whole-stack call wherever the check finds it equal."""
    cpu = _on_cpu(t)
    if cpu and not (t.is_contiguous() and (t[0].numel() % VECTOR_SPAN == 0 or len(t) == 1)
                    and torch.get_num_threads() == 1):
        return _each_network(fn, t)
    key = ("each", fn, t.shape, t.dtype) if cpu else ("each", fn, t.shape, t.stride(), t.dtype,
                                                      t.device)
    return _choose(key, fn, lambda u: _each_network(fn, u),
                   lambda: (_random_like(t, 0),))(t)


def _each_network(fn: Callable[..., Tensor], t: Tensor) -> Tensor:
    out = torch.empty_like(t)
    for m in range(len(t)):
        fn(t[m], out=out[m])
    return out


_ACTIVATIONS = {  # name: (forward, backward(grad of output, output))
    "sigmoid": (lambda z: each(torch.sigmoid, z), lambda g, a: g * (1 - a) * a),
    "tanh": (lambda z: each(torch.tanh, z), lambda g, a: g * (1 - a * a)),
    "relu": (torch.relu, lambda g, a: g * (a > 0)),  # exact: no rounding to depend on
}


def cross_entropy(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Each network's mean cross-entropy of (M, N, classes) logits against (M, N) labels:
    (the (M,) losses, the log-softmax), log-softmax written out with :func:`each` (torch's
    fused one may round a network's values by where they lie in the stack)."""
    shifted = z - z.amax(dim=2, keepdim=True)
    logp = shifted - each(torch.log, each(torch.exp, shifted).sum(dim=2, keepdim=True))
    return -logp.gather(2, y.unsqueeze(2)).squeeze(2).mean(1), logp


def cross_entropy_grad(logp: Tensor, y: Tensor) -> Tensor:
    """The gradient of :func:`cross_entropy`'s losses at the logits, from its log-softmax:
    (softmax - one-hot) / N, a new tensor."""
    grad = each(torch.exp, logp)
    grad.scatter_add_(2, y.unsqueeze(2), torch.full_like(grad[:, :, :1], -1.0))
    grad /= y.shape[1]
    return grad


# -- BN of every network: bnlab's stacked kernels on the CPU, checked torch ops elsewhere ------
def stacked_bn(x: Tensor, weight: Tensor | None, bias: Tensor | None, running: tuple,
               momentum: float | None, eps: float) -> tuple[Tensor, Tensor]:
    """Training BN of M networks' (M, N, C) rows, each network with its own statistics and
    parameters (:func:`bnlab.nn.kernels.stacked_forward`): ``(y, saved)``, saved (M, 2, C)
    float64 (mean, biased variance), the ``running`` statistics (running_mean, running_var,
    num_batches_tracked; Nones: none kept) updated. On the CPU the kernels compute each
    network alone by construction. Elsewhere (a GPU) the torch ops run over the whole stack
    where a probe found that each network gets the bits of its own call, one call per
    network otherwise, and the running statistics are folded in by :func:`fold_running`."""
    if _on_cpu(x):
        return kernels.stacked_forward(x, weight, bias, *running, momentum, eps)

    def fn(x: Tensor, w: Tensor | None, b: Tensor | None) -> tuple[Tensor, Tensor]:
        return kernels.stacked_forward(x, w, b, None, None, None, momentum, eps)

    key = ("stacked BN", x.shape, x.stride(), x.dtype, x.device, weight is None, bias is None,
           eps)
    probe = lambda: (_random_like(x, 0), _random_like(weight, 1), _random_like(bias, 2))  # noqa: E731
    y, saved = _choose(key, fn, lambda *a: _row_by_row(fn, *a), probe)(x, weight, bias)
    if running[0] is not None:
        fold_running(saved[:, 0], saved[:, 1], *running, x.shape[1], momentum)
    return y, saved


def stacked_bn_backward(grad: Tensor, x: Tensor, weight: Tensor | None, saved: Tensor,
                        eps: float, need_input: bool = True
                        ) -> tuple[Tensor | None, Tensor, Tensor]:
    """The closed-form backward of :func:`stacked_bn` (:func:`bnlab.nn.kernels.stacked_backward`):
    ``(grad_x or None, grad_weight, grad_bias)``, checked on a GPU as the forward is."""
    def fn(g: Tensor, x: Tensor, w: Tensor | None, s: Tensor) -> tuple:
        return kernels.stacked_backward(g, x, w, s, eps, need_input)

    if _on_cpu(x):
        return fn(grad, x, weight, saved)

    def probe() -> tuple:  # saved: the probe input's own statistics (a variance is positive)
        x_ = _random_like(x, 0)
        saved_ = kernels.stacked_forward(x_, None, None, None, None, None, None, eps)[1]
        return _random_like(grad, 2), x_, _random_like(weight, 1), saved_

    key = ("stacked BN backward", x.shape, x.stride(), grad.stride(), x.dtype, x.device,
           weight is None, eps, need_input)
    return _choose(key, fn, lambda *a: _row_by_row(fn, *a), probe)(grad, x, weight, saved)


def _row_by_row(fn: Callable[..., tuple], *tensors: Tensor | None) -> tuple:
    """``fn`` network by network on copies of each one's rows of ``tensors`` ((M, ...) each,
    or None), the outputs joined along the first dimension (None stays None)."""
    M = len(tensors[0])
    outs = [fn(*[None if t is None else t[m:m + 1].clone() for t in tensors]) for m in range(M)]
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outs))


@torch.no_grad()
def fold_running(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor,
                 tracked: Tensor | None, count: int, momentum: float | None) -> None:
    """:func:`bnlab.nn.functional.update_running_stats` for M networks, (M, C) statistics
    (mean, biased var) of ``count`` values per channel: each network's buffers, its counter
    included, are left alone when its statistics are not finite in the buffers' dtype. In
    float64, one rounding to the buffers' dtype, and elementwise (no fused multiply-add,
    whose use differs between the vector body and tail of a loop): a network's values do not
    depend on its neighbours."""
    dtype = running_mean.dtype
    mean, unbiased = mean.double(), var.double() * (count / max(count - 1, 1))
    ok = torch.isfinite(mean.to(dtype)).all(1) & torch.isfinite(unbiased.to(dtype)).all(1)
    if tracked is not None:
        tracked.add_(ok)
    factor = momentum if momentum is not None else \
        1.0 / tracked.clamp(min=1).double().unsqueeze(1)
    for running, new in ((running_mean, mean), (running_var, unbiased)):
        old = running.double()
        running.copy_(torch.where(ok.unsqueeze(1), old + factor * (new - old), old))


def network_losses(logits: Tensor, target: Tensor) -> Tensor:
    """Each network's summed cross-entropy of (M, n, classes) inference logits against the
    (n,) targets they share, (M,) float64: the sum ``cross_entropy(logits[m], target,
    reduction="sum")`` gives for that network alone (network by network, see :func:`each`),
    kept on the logits' device (a GPU waits for no value of it)."""
    return torch.stack([nn.functional.cross_entropy(h, target, reduction="sum")
                        for h in logits]).double()


def inference_bn(h: Tensor, t: dict, eps: float, shape: tuple) -> Tensor:
    """Eval-mode BN with each network's running statistics, ``t``'s (M, C) tensors
    (running_mean, running_var, weight, bias) viewed as ``shape`` against h, in the order of
    ``_BatchNorm._normalize_population``: (h - mean) * (rsqrt(var + eps) * weight) + bias."""
    scale = torch.rsqrt(t["running_var"].view(shape) + eps) * t["weight"].view(shape)
    return (h - t["running_mean"].view(shape)).mul_(scale).add_(t["bias"].view(shape))


class Stack:
    """M networks of one structure, built by ``build_mlp`` (the same depth, width and
    activation, and one norm of :attr:`NORMS`), trained by SGD with per-network learning
    rates and one momentum. ``models`` are the networks themselves: the stack copies their
    tensors in, and :meth:`export` writes them back."""

    NORMS = ("none", "bn")  # the norms a Stack holds

    def __init__(self, models: Sequence[nn.Sequential], activation: str, lrs: Sequence[float],
                 momentum: float) -> None:
        if not models:
            raise ValueError("a Stack needs at least one network")
        self.models = list(models)
        self.layers: list[_Layer] = []
        layout = [type(m) for m in models[0]]
        if any([type(m) for m in net] != layout for net in models):
            raise ValueError("the networks of a Stack must share one structure")
        j = 0
        while j < len(layout):  # linear, [BatchNorm1d], activation; ... ; linear
            norm = j + 1 < len(layout) and layout[j + 1] is bnn.BatchNorm1d
            after = j + (2 if norm else 1)
            if layout[j] is not nn.Linear or (after < len(layout)
                                              and layout[after] is not ACTIVATIONS[activation]):
                raise ValueError(f"a Stack holds only build_mlp's networks with norms "
                                 f"{', '.join(self.NORMS)} (got layers {layout})")
            self.layers.append(_Layer([net[j] for net in models],
                                      [net[j + 1] for net in models] if norm else None))
            j = after + 1
        self.forward_act, self.backward_act = _ACTIVATIONS[activation]
        self.lrs = list(lrs)
        self.momentum = momentum
        self.buffers: list[Tensor | None] = [None] * len(self.params())
        self.steps_taken = 0

    def __len__(self) -> int:
        return len(self.models)

    def params(self) -> list[Tensor]:
        return [p for layer in self.layers for p in layer.params()]

    # -- training -------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One SGD step of every network on its batch: ``x`` (M, N, features), ``y`` (M, N).
        Returns the (M,) training-mode losses."""
        cache = []
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            z = self._linear(layer, h)
            if i == last:
                break
            saved = None
            if layer.bn is not None:
                bn = layer.bn
                z_in = z
                z, saved = stacked_bn(
                    z_in, bn["weight"], bn["bias"],
                    (bn["running_mean"], bn["running_var"], bn["num_batches_tracked"]),
                    bn["momentum"], bn["eps"])
                cache.append((h, z_in, saved))
            else:
                cache.append((h, None, None))
            h = self.forward_act(z)
            cache[-1] += (h,)
        loss, logp = cross_entropy(z, y)
        grad = cross_entropy_grad(logp, y)
        grads: list[Tensor] = []
        for i in range(last, -1, -1):
            layer = self.layers[i]
            h_in = h
            if i < last:
                h_in, z_in, saved, a = cache[i]
                grad = self.backward_act(grad, a)
                if layer.bn is not None:
                    bn = layer.bn
                    grad, g_w, g_b = stacked_bn_backward(grad, z_in, bn["weight"], saved,
                                                         bn["eps"])
                    grads += [g_b, g_w]
            if layer.bias is not None:
                grads.append(grad.sum(1))
            grads.append(product(grad.transpose(1, 2), h_in))
            if i > 0:
                grad = product(grad, layer.weight)
        self._sgd(grads[::-1])
        self.steps_taken += 1
        return loss

    @staticmethod
    def _linear(layer: _Layer, h: Tensor) -> Tensor:
        return product(h, layer.weight.transpose(1, 2), layer.bias)

    def _sgd(self, grads: list[Tensor]) -> None:
        """The lab's SGD (:func:`~bnlab.lab.train.sgd_`), each network at its learning rate:
        runs of networks with one rate take one call."""
        sgd_(self.params(), grads, self.buffers, self.momentum, _runs(self.lrs))

    # -- as an engine of bnlab.lab.train.fit ---------------------------------------------------
    loss_dtype = torch.float64  # sgd_loss is summed so (the records were made so)

    def train_step(self, x: Tensor, y: Tensor, idx: Sequence[Tensor]) -> Tensor:
        """:meth:`step` with network m on the rows ``idx[m]`` of (x, y)."""
        rows = torch.cat(list(idx))  # every network's batch, one after another
        return self.step(x.index_select(0, rows).view(len(self), -1, *x.shape[1:]),
                         y.index_select(0, rows).view(len(self), -1))

    def before_measure(self, x: Tensor) -> None:
        pass

    def model(self, m: int) -> nn.Sequential:
        return self.export(m)[0]

    def state(self, m: int) -> dict:
        model, optimizer = self.export(m)
        return {"model": model.state_dict(), "optimizer": optimizer}

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, chunk: int = 2048) -> list[EvalResult]:
        """Inference-mode (loss, accuracy) of every network over the whole of (x, y), as
        :func:`~bnlab.lab.train.evaluate` gives for one. Chunks of rows small enough for the
        (M, chunk, width) activations to stay in cache; the first product is one per network,
        as its input is shared."""
        M = len(self)
        loss = torch.zeros(M, dtype=torch.float64, device=x.device)
        correct = torch.zeros(M, dtype=torch.long, device=x.device)
        first, last = self.layers[0], len(self.layers) - 1
        for start in range(0, len(x), chunk):
            xs, target = x[start:start + chunk], y[start:start + chunk]
            h = shared_product(xs, first.weight, first.bias).contiguous()  # (M, n, width)
            for i, layer in enumerate(self.layers):
                if i > 0:
                    h = self._linear(layer, h)
                if i == last:
                    break
                if layer.bn is not None:
                    h = inference_bn(h, layer.bn, layer.bn["eps"], (M, 1, -1))
                h = self.forward_act(h)
            loss += network_losses(h, target)
            correct += (h.argmax(dim=2) == target).sum(1)
        return [EvalResult(l / len(x), c / len(x)) for l, c in zip(loss.tolist(), correct.tolist())]

    # -- networks in and out ------------------------------------------------------------------
    def keep(self, rows: Sequence[int]) -> None:
        """Go on with the networks at ``rows`` only (the others diverged or are done)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.layers[0].weight.device)
        for layer in self.layers:
            layer.keep(index)
        self.buffers = [None if b is None else b[index] for b in self.buffers]
        self.models = [self.models[i] for i in rows]
        self.lrs = [self.lrs[i] for i in rows]

    @torch.no_grad()
    def export(self, m: int) -> tuple[nn.Sequential, dict]:
        """Network ``m`` as its ``nn.Sequential`` (tensors copied back in) and the state_dict
        of a ``torch.optim.SGD`` over its parameters: what the one-network engine saves."""
        model = self.models[m]
        for p, stacked in zip(model.parameters(), self.params()):
            p.copy_(stacked[m])
        j = 0
        for layer in self.layers:
            if layer.bn is not None:
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    getattr(model[j + 1], name).copy_(layer.bn[name][m])
            j += 3 if layer.bn is not None else 2
        return model, sgd_state(self.lrs[m], self.momentum,
                                [None if b is None else b[m].clone() for b in self.buffers])

    def load_buffers(self, buffers: Sequence[list[Tensor | None]]) -> None:
        """Take each network's momentum buffers (from
        :func:`~bnlab.lab.train.read_sgd_state`, in order)."""
        for k in range(len(self.buffers)):  # all or none: _load refuses a partial set
            column = [b[k] for b in buffers]
            self.buffers[k] = None if column[0] is None else torch.stack(column)


def _runs(values: Sequence[float]) -> list[tuple[float, int, int]]:
    """(value, start, stop) of each run of equal consecutive values."""
    runs: list[tuple[float, int, int]] = []
    for i, v in enumerate(values):
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1], i + 1)
        else:
            runs.append((v, i, i + 1))
    return runs


def engine(activation: str) -> Callable[..., Stack]:
    """The Stack engine of :func:`~bnlab.lab.train.fit` for networks of ``activation``:
    ``engine(activation)(models, lrs, momentum, buffers)``."""
    def build(models: Sequence[nn.Sequential], lrs: Sequence[float], momentum: float,
              buffers: Sequence[list[Tensor | None]]) -> Stack:
        stack = Stack(models, activation, lrs, momentum)
        stack.load_buffers(buffers)
        return stack
    return build
