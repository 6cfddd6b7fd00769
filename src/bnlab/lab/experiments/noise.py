"""``noise``: the "true" mean against the mini-batch ("fake") mean.

One unit per seed. For the raw inputs and every BN layer's input of a BN network, at
initialization and after ``epochs`` epochs of SGD, a row per (set, m) measures ``draws``
mini-batches of m against the whole training set; a last row holds the source article's "10.1 vs 9.9"
example. One generator, seeded with the seed, draws everything in order.
"""

from typing import Iterator

import numpy as np
import torch
from torch import Tensor

import bnlab.nn as bnn
from ..train import label
from ..runner import Context

RAW_UNITS = {"digits": 16.0, "fashion-mnist": 255.0, "mnist": 255.0}  # [0, 1] -> the data's units
CHUNK = 2e7  # values per drawn chunk of mini-batches: memory stays flat whatever m and F
# What the work costs, for the progress display (ns on a 2-core CPU; only ratios matter):
# a set's values widened and summarized, per value; a mini-batch drawn, per training
# example (its permutation) and per value it holds; a training step, per example x weight.
PREP_COST, DRAW_COST, VALUE_COST, STEP_COST = 100, 20, 175, 1.4


def batch_noise(z: Tensor, sizes, draws: int, gen: torch.Generator) -> Iterator[dict]:
    """For each m in ``sizes``, the noise of the statistics of ``draws`` mini-batches of m
    rows of z (N, F) against the whole set's, averaged over the live (non-constant) features.
    Every batch holds row 0 (the probe) and m - 1 other rows drawn without replacement (by
    ``gen``, a CPU generator, whatever z's device)."""
    z = z.double()
    mu, var = z.mean(0), z.var(0, unbiased=False)
    live = var > 1e-12 * float(var.max())  # constant features have no noise to measure
    z, mu, var, n, f = z[:, live], mu[live], var[live], len(z), int(live.sum())
    for m in sizes:
        mean_sq, var_sq, probe, inside = 0.0, 0.0, [], 0.0
        chunk = max(1, int(CHUNK // (m * len(live))))
        for start in range(0, draws, chunk):
            others = torch.stack([torch.randperm(n - 1, generator=gen)[: m - 1] + 1
                                  for _ in range(min(chunk, draws - start))])  # (k, m - 1)
            others = others.to(z.device)
            batch = torch.cat([z[0].expand(len(others), 1, -1), z[others]], dim=1)  # (k, m, f)
            mu_b, var_b = batch.mean(1), batch.var(1, unbiased=False)
            x_hat = (batch - mu_b[:, None]) / (var_b[:, None] + 1e-5).sqrt()
            mean_sq = mean_sq + ((mu_b - mu) / var.sqrt()).square().sum(0)
            var_sq = var_sq + ((var_b - var) / var).square().sum(0)
            probe.append(x_hat[:, 0])
            inside += float((x_hat.abs() <= 3).double().sum())
        # errors: root-mean-square over draws (mu_B's in population SDs), then mean over features;
        # theory: sigma / sqrt(m) with the finite-population correction (no replacement)
        yield {"m": m, "mean_err": float((mean_sq / draws).sqrt().mean()),
               "mean_err_theory": float(np.sqrt((n - m) / (n - 1) / m)),
               "var_rel_err": float((var_sq / draws).sqrt().mean()),
               "probe_xhat_sd": float(torch.cat(probe).std(0).mean()),
               "within3": inside / (draws * m * f), "live_features": f}


@torch.no_grad()
def pre_bn(model: torch.nn.Sequential, x: Tensor, when: str) -> list[tuple[str, Tensor]]:
    """Every BN layer's input over the whole of x, in eval mode."""
    bns = [j for j, m in enumerate(model.eval()) if isinstance(m, bnn.BatchNorm1d)]
    return [(f"layer {i} pre-BN, {when}", model[:j](x)) for i, j in enumerate(bns, 1)]


def row_costs(config, n: int, features: int) -> list[float]:
    """The cost of each (set, m) row of a set of ``features`` columns over ``n`` examples, in
    the unit of :data:`STEP_COST` (the set's summary counted with its first row)."""
    costs = [config.draws * (DRAW_COST * n + VALUE_COST * m * features)
             for m in config.batch_sizes]
    costs[0] += PREP_COST * n * features
    return costs


def run(ctx: Context) -> None:
    """An unfinished seed is replayed from its start (its unit writes only new rows), its
    training from its checkpoint."""
    c, x = ctx.config, ctx.x
    steps = c.epochs * ctx.per_epoch
    params = x.shape[1] * c.width + (c.depth - 1) * c.width ** 2 + c.width * len(ctx.data.classes)
    step = STEP_COST * c.batch_size * params
    inputs, layer = row_costs(c, len(x), x.shape[1]), row_costs(c, len(x), c.width)
    trained = layer * c.depth if c.epochs else []  # the rows after training
    for _ in range(c.seeds):
        for cost in inputs + layer * c.depth + trained:
            ctx.progress.plan(1, cost)
        ctx.progress.plan(steps, step)
    for seed in range(c.seeds):
        unit, gen = ctx.record.unit(seed=seed), torch.Generator().manual_seed(seed)
        ctx.progress.labels[unit.key] = ctx.progress.note = label(unit.fields)
        ctx.progress.advance(0)  # shown at once: a set's first row takes a while
        if unit.done:  # finished in an earlier session
            _skip(ctx, inputs + layer * c.depth + trained + [step] * steps)
            continue

        def measure(sets: list[tuple[str, Tensor]]) -> None:
            for name, z in sets:
                costs = inputs if name == "inputs" else layer
                for row, cost in zip(batch_noise(z, c.batch_sizes, c.draws, gen), costs):
                    unit.write({"set": name, **row})
                    ctx.progress.advance(1, cost)

        model = ctx.train(unit, norm="bn", steps=steps, eval_every=max(steps, 1), finish=False,
                          before=lambda model: measure([("inputs", x), *pre_bn(model, x, "init")]),
                          cost=step)
        if unit.done:  # diverged in training: no rows after it
            _skip(ctx, trained)
            continue
        if c.epochs:
            measure(pre_bn(model, x, "trained"))
        raw = x.double() * RAW_UNITS.get(ctx.data.name, 1.0)  # "10.1 vs 9.9" in the data's units
        f = int(raw.mean(0).argmax())  # the feature with the largest mean
        means = [float(raw[torch.randperm(len(raw), generator=gen)[:16].to(raw.device), f].mean())
                 for _ in range(2)]
        unit.write({"feature": f, "population_mean": float(raw[:, f].mean()),
                    "batch_means": means, "m": 16})
        unit.finish()


def _skip(ctx: Context, costs: list[float]) -> None:
    """Advance the progress past work that will not run."""
    if costs:
        ctx.progress.advance(len(costs), sum(costs) / len(costs))
