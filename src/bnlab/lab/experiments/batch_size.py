"""``batch-size``: BN's weak point, the small batch (Wu & He 2018, Figure 1, at small scale).

A CNN six norm layers deep (:func:`~bnlab.lab.models.build_cnn` with
:attr:`BatchSizeConfig.CNN <bnlab.lab.experiment_configs.BatchSizeConfig.CNN>`) trains at
each per-step batch size B for the same number of epochs on the first ``n_train`` training
examples (the paper trained every batch size for its full schedule), with the learning rate
scaled linearly (lr * B / max B), once per arm and seed. Arms: ``bn`` (BatchNorm2d), ``ghost`` (steps of max B examples, BN
statistics over virtual batches of B: the normalization batch alone made small), ``renorm``
(Batch Renorm, plain BN for the first tenth of the steps, then the limits r_max 3 and d_max 5
reached over the next four tenths, the paper's schedule shrunk to the run), ``gn``
(GroupNorm) and ``ln`` (LayerNorm, GroupNorm with one group). Each unit records its mean
training loss after every epoch (``sgd_loss``: has it converged?) and, after its last step,
test loss and accuracy with the running statistics and, for the BN arms, with precise
statistics (:func:`bnlab.nn.update_bn_stats` over ``precise_samples`` training examples in
batches of B, the normalization batch of training).
"""

from __future__ import annotations

import copy

from torch import nn

import bnlab.nn as bnn
from ..models import build_cnn
from ..rundir import Unit
from ..train import evaluate, label
from ..runner import Context

BN_ARMS = ("bn", "ghost", "renorm")
WARMUP, RAMP = 0.1, 0.4  # Batch Renorm's schedule, as fractions of the run's steps
# test examples per forward pass: 2048 took twice as long on a 2-core CPU, allocating afresh
EVAL_CHUNK = 256
# A unit's cost for the progress display, in training examples' worth of time (measured for
# the six-norm CNN on one thread): a step costs its batch plus STEP_COST; each evaluated
# example EVAL_COST; a forward pass of update_bn_stats FORWARD_COST plus 0.6 of its batch.
STEP_COST, EVAL_COST, FORWARD_COST = 9, 0.4, 6


def plan(arm: str, b: int, config, n_train: int) -> dict:
    """The norm, step batch, learning rate, steps per epoch and steps of ``arm`` at batch
    size ``b`` on ``n_train`` training examples."""
    big = max(config.batch_sizes)
    step_batch = big if arm == "ghost" else b
    per_epoch = n_train // step_batch  # the last incomplete batch is dropped
    return {"norm": f"ghost-{b}" if arm == "ghost" else arm, "batch_size": step_batch,
            "lr": config.lr * step_batch / big, "per_epoch": per_epoch,
            "steps": config.epochs * per_epoch}


def step_cost(arm: str, b: int, config, n_train: int, n_test: int) -> float:
    """What one step of the unit (``arm``, ``b``) costs, its final row's evaluations spread
    over its steps, in the unit of :data:`STEP_COST`: progress weighted by it advances at
    an even pace where counting steps would count a step of 2 examples as one of 64."""
    p = plan(arm, b, config, n_train)
    final = n_test * EVAL_COST
    if arm in BN_ARMS:
        precise = min(config.precise_samples, n_train)  # as final_row gathers them
        final += n_test * EVAL_COST + precise // b * (FORWARD_COST + 0.6 * b)
    return p["batch_size"] + STEP_COST + final / p["steps"]


def run(ctx: Context) -> None:
    c = ctx.config
    n_train = len(ctx.x)
    units = [ctx.record.unit(arm=arm, batch=b, seed=seed)
             for seed in range(c.seeds) for b in c.batch_sizes for arm in c.arms]
    costs = {u.key: step_cost(u.fields["arm"], u.fields["batch"], c, n_train, len(ctx.test_y))
             for u in units}
    for u in units:
        ctx.progress.plan(plan(u.fields["arm"], u.fields["batch"], c, n_train)["steps"],
                          costs[u.key])
        ctx.progress.labels[u.key] = label(u.fields)
    side = int(round(ctx.data.num_features ** 0.5))
    classes = len(ctx.data.classes)

    def train(job: list[Unit]) -> None:
        unit = job[0]
        arm, b = unit.fields["arm"], unit.fields["batch"]
        p = plan(arm, b, c, n_train)
        steps = p["steps"]
        if unit.done:  # finished in an earlier session
            ctx.progress.advance(steps, costs[unit.key])
            return

        def build(norm: str, seed: int) -> nn.Module:
            model = build_cnn(side, classes, norm, seed, **c.CNN)
            for m in model.modules():
                if isinstance(m, bnn.BatchRenorm2d):
                    m.warmup_steps, m.ramp_steps = round(WARMUP * steps), round(RAMP * steps)
            return model

        def measure(model: nn.Module, step: int, sgd_loss: float, _next) -> dict:
            if step < steps:  # the epoch's mean training loss: how far from converged
                return {"sgd_loss": sgd_loss}
            return final_row(ctx, model, arm, b, sgd_loss)

        ctx.train(unit, steps=steps, eval_every=p["per_epoch"], measure=measure,
                  per_epoch=True, norm=p["norm"], build=build, lr=p["lr"],
                  batch_size=p["batch_size"], cost=costs[unit.key])

    ctx.run_jobs([[u] for u in units], train)


def final_row(ctx: Context, model: nn.Module, arm: str, b: int, sgd_loss: float) -> dict:
    """Test loss and accuracy with the running statistics, and for BN arms with precise ones."""
    test = evaluate(model, ctx.test_x, ctx.test_y, chunk=EVAL_CHUNK)
    row = {"sgd_loss": sgd_loss, "test_loss": test.loss, "test_acc": test.accuracy}
    if arm in BN_ARMS:
        precise = copy.deepcopy(model)
        n = min(ctx.config.precise_samples, len(ctx.x)) // b * b
        bnn.update_bn_stats(precise, ctx.x[:n].split(b))
        test = evaluate(precise, ctx.test_x, ctx.test_y, chunk=EVAL_CHUNK)
        row |= {"precise_test_loss": test.loss, "precise_test_acc": test.accuracy}
    return row
