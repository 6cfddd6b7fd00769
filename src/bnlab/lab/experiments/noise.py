"""``noise``: the "true" mean against the mini-batch ("fake") mean.

Expected (statistics; Ioffe & Szegedy 2015, section 3): mu_B is an unbiased estimate of the
population mean whose standard error is sigma / sqrt(m), so on log-log axes the error of
mu_B against m falls with slope -1/2; var_B's relative error falls the same way (for m much
larger than 1); the normalized output of one example moves from batch to batch by about
1/sqrt(m) standard deviations, which is the noise the seed calls medicine. Most of x_hat lies
in [-3, 3] (Chebyshev guarantees at least 8/9 for any distribution).

Measured: for the raw inputs and the pre-BN activations of each hidden layer of a BN
network, at initialization and after training, ``draws`` mini-batches of each size m are
drawn from the training set; the error of mu_B and var_B against the statistics of the full
training set, the spread of one probe example's x_hat across batches, and the share of
x_hat inside [-3, 3] are recorded, and the log-log slope is fitted.

Measured by bnlab (full setting: Fashion-MNIST, 300 batches per size, n=3,
docs/RESULTS.md): as expected. The error of mu_B follows sigma / sqrt(m) (raw pixels: 0.251
population SDs at m=16, theory 0.250; slopes -0.49 to -0.51 for every feature set, before
and after training); a probe image's x_hat moves by 0.27 SDs between batches of 16; raw
pixels' var_B converges more slowly (slope -0.38, heavy-tailed near-constant pixels); 99.2%
to 99.9% of x_hat lies in [-3, 3] at m=64, all of it for m <= 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

import bnlab.nn as bnn
from ..compare import CompareConfig
from ..data import Dataset
from ..models import build_mlp
from ..train import batch_indices, sgd_step, seed_everything
from .base import Experiment, ExperimentConfig, UnitStore, register

# multiply [0, 1] inputs by this to get the data's own units
RAW_UNITS = {"digits": 16.0, "fashion-mnist": 255.0, "mnist": 255.0}


@dataclass(frozen=True)
class NoiseConfig(ExperimentConfig):
    HELP: ClassVar[dict[str, str]] = {**ExperimentConfig.HELP, "batch_sizes": "mini-batch sizes m (comma-separated)", "draws": "mini-batches drawn per size", "train_epochs": "epochs of training before the 'trained' measurement"}
    dataset: str = "fashion-mnist"
    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    draws: int = 200  # mini-batches drawn per size
    train_epochs: int = 2  # for the "after training" activations
    seeds: int = 1
    depth: int = CompareConfig.depth
    width: int = CompareConfig.width
    lr: float = CompareConfig.lr
    init_scale: float = CompareConfig.init_scale
    batch_size: int = CompareConfig.batch_size

    def check(self) -> None:
        self.require(len(self.batch_sizes) >= 2 and all(isinstance(m, int) and m >= 2 for m in self.batch_sizes),
                     "batch_sizes", "two or more integers >= 2")
        self.require(self.draws >= 2, "draws", "an integer >= 2")
        self.require(self.train_epochs >= 0, "train_epochs", "an integer >= 0")


def _draw(z: torch.Tensor, m: int, draws: int, gen: torch.Generator):
    """Statistics of ``draws`` mini-batches of m rows of z, each holding row 0 (the probe)
    and m - 1 others; in chunks, so memory stays near 2e7 values whatever m and F."""
    chunk = max(1, int(2e7 // (m * z.shape[1])))
    for start in range(0, draws, chunk):
        k = min(chunk, draws - start)
        others = torch.stack([torch.randperm(len(z) - 1, generator=gen)[: m - 1] + 1 for _ in range(k)])
        batch = torch.cat([z[0].expand(k, 1, -1), z[others]], dim=1)  # (k, m, F), probe first
        mu_b, var_b = batch.mean(1), batch.var(1, unbiased=False)
        x_hat = (batch - mu_b[:, None]) / (var_b[:, None] + 1e-5).sqrt()
        yield mu_b, var_b, x_hat


def batch_noise(z: torch.Tensor, sizes: list[int], draws: int, gen: torch.Generator) -> dict:
    """Noise of mini-batch statistics of the features z (N, F) against the full set's."""
    z = z.double()
    mu, var = z.mean(0), z.var(0, unbiased=False)
    live = var > 1e-12 * float(var.max())  # constant features have no noise to measure
    sd = var.sqrt()
    rows = []
    for m in sizes:
        mean_sq, var_sq, probe, inside, count = 0.0, 0.0, [], 0.0, 0
        for mu_b, var_b, x_hat in _draw(z, m, draws, gen):
            mean_sq = mean_sq + ((mu_b - mu) / sd)[:, live].square().sum(0)
            var_sq = var_sq + ((var_b - var) / var)[:, live].square().sum(0)
            probe.append(x_hat[:, 0, live])
            inside += float((x_hat[:, :, live].abs() <= 3).double().sum())
            count += x_hat[:, :, live].numel()
        rows.append({
            "m": m,
            # root-mean-square error over draws, in population standard deviations, mean over features
            "mean_err": float((mean_sq / draws).sqrt().mean()),
            # sigma / sqrt(m) with the finite-population correction (rows drawn without replacement)
            "mean_err_theory": float(np.sqrt((len(z) - m) / (len(z) - 1) / m)),
            "var_rel_err": float((var_sq / draws).sqrt().mean()),
            "probe_xhat_sd": float(torch.cat(probe).std(0).mean()),
            "within3": inside / count,
        })
    return {"rows": rows, "live_features": int(live.sum()),
            "slopes": {k: fit_slope([r["m"] for r in rows], [r[k] for r in rows])
                       for k in ("mean_err", "var_rel_err", "probe_xhat_sd")}}


def fit_slope(m, err) -> float:
    """Least-squares slope of log(err) against log(m)."""
    return float(np.polyfit(np.log(np.asarray(m, float)), np.log(np.asarray(err, float)), 1)[0])


def seed_example(z: torch.Tensor, scale: float, gen: torch.Generator, m: int = 16) -> dict:
    """The seed's "10.1 vs 9.9": the feature with the largest mean, in the data's own units,
    and its mean in two random mini-batches of m."""
    z = z.double() * scale
    f = int(z.mean(0).argmax())
    a, b = (z[torch.randperm(len(z), generator=gen)[:m], f].mean() for _ in range(2))
    return {"feature": f, "population_mean": float(z[:, f].mean()), "batch_means": [float(a), float(b)], "m": m}


def _pre_bn_features(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Inputs to every BN layer over the whole of x, in inference mode."""
    feats: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach()))
             for m in model if isinstance(m, bnn.BatchNorm1d)]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return feats


def run(config: NoiseConfig, store: UnitStore, data: Dataset) -> dict:
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    sizes = [m for m in config.batch_sizes if m <= len(x)]
    store.total = config.seeds
    out = []
    for seed in range(config.seeds):
        def unit(seed: int = seed) -> dict:
            seed_everything(seed)
            gen = torch.Generator().manual_seed(seed)
            model = build_mlp(x.shape[1], len(data.classes), config.depth, config.width, "sigmoid",
                              "bn", config.init_scale, seed)
            sets = {"inputs": batch_noise(x, sizes, config.draws, gen)}
            for i, z in enumerate(_pre_bn_features(model, x), 1):
                sets[f"layer {i} pre-BN, init"] = batch_noise(z, sizes, config.draws, gen)
            opt = torch.optim.SGD(model.parameters(), lr=config.lr)
            for epoch in range(1, config.train_epochs + 1):
                for idx in batch_indices(len(x), config.batch_size, seed, epoch):
                    sgd_step(model, opt, x[idx], y[idx])
            if config.train_epochs:
                for i, z in enumerate(_pre_bn_features(model, x), 1):
                    sets[f"layer {i} pre-BN, trained"] = batch_noise(z, sizes, config.draws, gen)
            return {"seed": seed, "sets": sets,
                    "example": seed_example(x, RAW_UNITS.get(data.name, 1.0), gen)}
        out.append(store.get(f"seed{seed}", unit))
    return {"seeds": out, "batch_sizes": sizes}


register(Experiment("noise", "mini-batch statistics against population statistics, by batch size",
                    NoiseConfig, {"draws": 300, "seeds": 3, "train_epochs": 10}, run))
