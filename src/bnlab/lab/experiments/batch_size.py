"""``batch-size``: BN's weak point, the small batch (Wu & He 2018, Figure 1, at small scale).

A CNN (:func:`~bnlab.lab.models.build_cnn`) trains at each per-step batch size B on the same
number of examples, with the learning rate scaled linearly (lr * B / max B), once per arm and
seed. Arms: ``bn`` (BatchNorm2d), ``ghost`` (steps of max B examples, BN statistics over
virtual batches of B: the normalization batch alone made small), ``renorm`` (Batch Renorm,
plain BN for the first tenth of the steps, then the limits r_max 3 and d_max 5 reached over
the next four tenths, the paper's schedule shrunk to the run), ``gn`` (GroupNorm) and ``ln``
(LayerNorm, GroupNorm with one group). Each unit's one row, after its last step: test loss and
accuracy with the running statistics and, for the BN arms, with precise statistics
(:func:`bnlab.nn.update_bn_stats` over ``precise_samples`` training examples in batches of B,
the normalization batch of training).
"""

from __future__ import annotations

import copy

from torch import nn

import bnlab.nn as bnn
from ..models import build_cnn
from ..rundir import Unit
from ..train import evaluate
from ..workers import run_jobs
from . import Context

BN_ARMS = ("bn", "ghost", "renorm")
WARMUP, RAMP = 0.1, 0.4  # Batch Renorm's schedule, as fractions of the run's steps
EVAL_CHUNK = 2048  # test examples per forward pass


def plan(arm: str, b: int, config) -> dict:
    """The norm, step batch, learning rate and steps of ``arm`` at batch size ``b``."""
    big = max(config.batch_sizes)
    step_batch = big if arm == "ghost" else b
    return {"norm": f"ghost-{b}" if arm == "ghost" else arm, "batch_size": step_batch,
            "lr": config.lr * step_batch / big, "steps": config.samples // step_batch}


def run(ctx: Context) -> None:
    c = ctx.config
    units = [ctx.record.unit(arm=arm, batch=b, seed=seed)
             for seed in range(c.seeds) for b in c.batch_sizes for arm in c.arms]
    ctx.progress.total += sum(plan(u.fields["arm"], u.fields["batch"], c)["steps"] for u in units)
    side = int(round(ctx.data.num_features ** 0.5))
    classes = len(ctx.data.classes)

    def train(job: list[Unit]) -> None:
        unit = job[0]
        arm, b = unit.fields["arm"], unit.fields["batch"]
        p = plan(arm, b, c)
        steps = p["steps"]

        def build(norm: str, seed: int) -> nn.Module:
            model = build_cnn(side, classes, norm, seed)
            for m in model.modules():
                if isinstance(m, bnn.BatchRenorm2d):
                    m.warmup_steps, m.ramp_steps = round(WARMUP * steps), round(RAMP * steps)
            return model

        def measure(model: nn.Module, step: int, sgd_loss: float, _next) -> dict | None:
            return final_row(ctx, model, arm, b, sgd_loss) if step == steps else None

        ctx.train(unit, steps=steps, eval_every=max(1, steps // 5), measure=measure,
                  norm=p["norm"], build=build, lr=p["lr"], batch_size=p["batch_size"])

    run_jobs([[u] for u in units], train, ctx.workers(), ctx.progress)


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
