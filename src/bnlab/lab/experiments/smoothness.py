"""``smoothness``: Santurkar et al. (2018) at small scale.

At step 0, every ``eval_every`` steps and after the last, on the batch the next
step trains on, the gradient g at the current weights w; then for each step size eta in
``step_sizes`` (multiples of the learning rate) the loss L(w - eta g) and the gradient g_eta
there, in training mode on that same batch. Per checkpoint:

* loss range: max - min of L over {w} and every w - eta g;
* gradient change (predictiveness): max over eta of ||g_eta - g||;
* effective beta-smoothness: max over eta of ||g_eta - g|| / ||eta g||.

After the last step, the test accuracy.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..models import NoisyAffine
from ..train import evaluate
from . import Context


def _loss_and_grad(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def probe(model: nn.Module, x: Tensor, y: Tensor, etas: list[float]) -> dict:
    """Loss and gradient along -g at step sizes ``etas``, on a deep copy: the model, its BN
    running statistics and its noise generators are untouched. Every NoisyAffine of the copy
    holds one draw, so all points are compared on the same function of w."""
    work = copy.deepcopy(model)
    for m in work.modules():
        if isinstance(m, NoisyAffine):
            m.hold, m.noise = True, None
    loss0, g = _loss_and_grad(work, x, y)
    start = [p.detach().clone() for p in work.parameters()]
    losses, changes = [loss0], []
    for eta in etas:
        with torch.no_grad():
            offset = 0
            for p, p0 in zip(work.parameters(), start):
                n = p.numel()
                p.copy_(p0 - eta * g[offset:offset + n].view_as(p))
                offset += n
        loss, g_eta = _loss_and_grad(work, x, y)
        losses.append(loss)
        changes.append((float((g_eta - g).norm()), eta * float(g.norm())))
    return {"loss_range": max(losses) - min(losses),
            "grad_change": max(c for c, _ in changes),
            "beta": max(c / d for c, d in changes if d > 0) if g.norm() > 0 else 0.0}


def run(ctx: Context) -> None:
    c = ctx.config
    etas = [c.lr * s for s in c.step_sizes]
    units = [ctx.record.unit(norm=norm, seed=seed) for seed in range(c.seeds) for norm in c.norms]
    ctx.plan(len(units) * c.steps)

    def measure(model: nn.Module, step: int, _sgd_loss: float, next_batch: Tensor) -> dict:
        row = probe(model, ctx.x[next_batch], ctx.y[next_batch], etas)
        if step == c.steps:
            row["test_acc"] = evaluate(model, ctx.test_x, ctx.test_y).accuracy
        return row

    for unit in units:
        ctx.train(unit, steps=c.steps, eval_every=c.eval_every, at_start=True, measure=measure)
