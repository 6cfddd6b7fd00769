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

import copy

from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..models import NoisyAffine
from ..train import evaluate
from ..runner import Context


def probe(model: nn.Module, x: Tensor, y: Tensor, etas: list[float]) -> dict:
    """Loss and gradient along -g at step sizes ``etas``, on a deep copy: the model, its BN
    running statistics and its noise generators are untouched. Every NoisyAffine of the copy
    holds one draw, so all points are compared on the same function of w."""
    work = copy.deepcopy(model).train()
    for m in work.modules():
        if isinstance(m, NoisyAffine):
            m.hold, m.noise = True, None
    params = list(work.parameters())

    def loss_and_grad(w: Tensor) -> tuple[float, Tensor]:
        vector_to_parameters(w, params)
        work.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(work(x), y)
        loss.backward()
        return float(loss.detach()), parameters_to_vector([p.grad for p in params])

    w = parameters_to_vector(params).detach()
    loss, g = loss_and_grad(w)
    points = [loss_and_grad(w - eta * g) for eta in etas]
    losses = [loss] + [point_loss for point_loss, _ in points]
    changes = [float((g_eta - g).norm()) for _, g_eta in points]  # ||g_eta - g||
    moves = [eta * float(g.norm()) for eta in etas]  # ||eta g||
    return {"loss_range": max(losses) - min(losses), "grad_change": max(changes),
            "beta": max((c / d for c, d in zip(changes, moves) if d > 0), default=0.0)}


def run(ctx: Context) -> None:
    c = ctx.config
    etas = [c.lr * s for s in c.step_sizes]

    def measure(model: nn.Module, step: int, _sgd_loss: float, next_batch: Tensor) -> dict:
        row = probe(model, ctx.x[next_batch], ctx.y[next_batch], etas)
        return row | ({"test_acc": evaluate(model, ctx.test_x, ctx.test_y).accuracy}
                      if step == c.steps else {})

    for unit in ctx.units(c.steps):
        ctx.train(unit, steps=c.steps, eval_every=c.eval_every, at_start=True, measure=measure)
