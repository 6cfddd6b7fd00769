"""``noise``: the "true" mean against the mini-batch ("fake") mean.

One unit per seed. For the raw inputs and each hidden layer's pre-BN activations of a BN
network, at initialization and after ``epochs`` epochs of SGD, a row per (set, m) measures
``draws`` mini-batches of m against the whole training set; a last row holds the seed's
"10.1 vs 9.9" example. One generator, seeded with the seed, draws everything in order.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

import bnlab.nn as bnn
from ..train import batch_indices, sgd_step
from . import Context

RAW_UNITS = {"digits": 16.0, "fashion-mnist": 255.0, "mnist": 255.0}  # [0, 1] -> the data's units
CHUNK = 2e7  # values per drawn chunk of mini-batches: memory stays flat whatever m and F


def _draw(z: Tensor, m: int, draws: int, gen: torch.Generator) -> Iterator[tuple[Tensor, ...]]:
    """mu_B, var_B and x_hat of ``draws`` mini-batches of m rows of z, each holding row 0
    (the probe) and m - 1 others drawn without replacement, in chunks."""
    chunk = max(1, int(CHUNK // (m * z.shape[1])))
    for start in range(0, draws, chunk):
        k = min(chunk, draws - start)
        others = torch.stack([torch.randperm(len(z) - 1, generator=gen)[: m - 1] + 1
                              for _ in range(k)])  # (k, m - 1) rows other than the probe
        batch = torch.cat([z[0].expand(k, 1, -1), z[others]], dim=1)  # (k, m, F), probe first
        mu_b, var_b = batch.mean(1), batch.var(1, unbiased=False)
        x_hat = (batch - mu_b[:, None]) / (var_b[:, None] + 1e-5).sqrt()
        yield mu_b, var_b, x_hat


def batch_noise(z: Tensor, sizes: list[int], draws: int, gen: torch.Generator) -> Iterator[dict]:
    """For each m in ``sizes``, a row of the noise of mini-batch statistics of the features
    z (N, F) against the whole set's, averaged over the live (non-constant) features."""
    z = z.double()
    mu, var = z.mean(0), z.var(0, unbiased=False)
    live = var > 1e-12 * float(var.max())  # constant features have no noise to measure
    sd = var.sqrt()
    for m in sizes:
        mean_sq, var_sq, probe, inside, count = 0.0, 0.0, [], 0.0, 0
        for mu_b, var_b, x_hat in _draw(z, m, draws, gen):
            mean_sq = mean_sq + ((mu_b - mu) / sd)[:, live].square().sum(0)
            var_sq = var_sq + ((var_b - var) / var)[:, live].square().sum(0)
            probe.append(x_hat[:, 0, live])
            inside += float((x_hat[:, :, live].abs() <= 3).double().sum())
            count += x_hat[:, :, live].numel()
        yield {
            "m": m,
            # root-mean-square over draws, in population SDs, then the mean over features
            "mean_err": float((mean_sq / draws).sqrt().mean()),
            # sigma / sqrt(m) with the finite-population correction (drawn without replacement)
            "mean_err_theory": float(np.sqrt((len(z) - m) / (len(z) - 1) / m)),
            "var_rel_err": float((var_sq / draws).sqrt().mean()),
            "probe_xhat_sd": float(torch.cat(probe).std(0).mean()),
            "within3": inside / count,
            "live_features": int(live.sum()),
        }


def seed_example(z: Tensor, scale: float, gen: torch.Generator, m: int = 16) -> dict:
    """The seed's "10.1 vs 9.9": the feature with the largest mean, in the data's own units,
    and its mean in two random mini-batches of m."""
    z = z.double() * scale
    f = int(z.mean(0).argmax())
    a, b = (z[torch.randperm(len(z), generator=gen)[:m], f].mean() for _ in range(2))
    return {"feature": f, "population_mean": float(z[:, f].mean()),
            "batch_means": [float(a), float(b)], "m": m}


@torch.no_grad()
def pre_bn_features(model: nn.Sequential, x: Tensor) -> list[Tensor]:
    """The input to every BN layer over the whole of x, in inference mode."""
    model.eval()
    return [model[:j](x) for j, m in enumerate(model) if isinstance(m, bnn.BatchNorm1d)]


def run(ctx: Context) -> None:
    """Each seed's rows; an unfinished seed is replayed from its start (its unit writes only
    the rows not yet recorded)."""
    c, x, y = ctx.config, ctx.x, ctx.y
    per_seed = (1 + c.depth * (2 if c.epochs else 1)) * len(c.batch_sizes)  # (set, m) pairs
    ctx.plan(c.seeds * per_seed)
    for seed in range(c.seeds):
        unit = ctx.record.unit(seed=seed)
        if unit.done:
            ctx.progress.advance(per_seed)
            continue
        gen = torch.Generator().manual_seed(seed)
        model = ctx.model("bn", seed)
        ctx.progress.note = unit.key

        def measure(name: str, z: Tensor) -> None:
            for row in batch_noise(z, list(c.batch_sizes), c.draws, gen):
                unit.write({"set": name, **row})
                ctx.progress.advance(1)

        measure("inputs", x)
        for i, z in enumerate(pre_bn_features(model, x), 1):
            measure(f"layer {i} pre-BN, init", z)
        if c.epochs:  # the batches fit would draw: batch_indices of each epoch
            opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum)
            for epoch in range(1, c.epochs + 1):
                for idx in batch_indices(len(x), c.batch_size, seed, epoch):
                    sgd_step(model, opt, x[idx], y[idx])
            for i, z in enumerate(pre_bn_features(model, x), 1):
                measure(f"layer {i} pre-BN, trained", z)
        unit.write(seed_example(x, RAW_UNITS.get(ctx.data.name, 1.0), gen))
        unit.finish()
