"""``regularization``: is the noise of mini-batch statistics medicine?

Expected (the seed; Ioffe & Szegedy 2015, section 3.4; Hoffer et al. 2017): BN's noisy batch
statistics regularize, so on a training set small enough to overfit the BN network has a
smaller generalization gap and a higher test accuracy than the plain one; more noise (smaller
ghost batches) regularizes more, up to the point where the noise hurts fitting; BN with the
noise removed keeps less of the gain.

Measured: plain, BN, ghost BN with virtual batches from 2 up to the batch, and two
noise-free controls. "Full-batch BN" is BN computed exactly as in training, gradient
through the statistics included, but with the statistics of the whole training subset at
every step (the subset goes through the network, the loss is taken on the mini-batch's
rows): it differs from BN in the batch noise alone. "Population BN" normalizes with the
whole subset's statistics recomputed before every step but treated as constants, so no
gradient flows through them: Ioffe & Szegedy (section 2) predict that gradient descent then
fights the normalization. Final train and test accuracy (inference mode), their gap, the
loss gap, and the share of BN's test-accuracy gain over plain that the noise explains:
(BN - full-batch BN) / (BN - plain).

Measured by bnlab (full setting: 1000 Fashion-MNIST images, 100 epochs, n=5,
docs/RESULTS.md): the noise is a mild medicine, and BN as a whole is not a regularizer here.
Full-batch BN (no noise) ends 0.4 points below BN (77.3% vs 77.7%); virtual batches of 4 do
best (78.3%, gap 17.8 vs 22.3 points), of 2 fail to fit (43%). Plain generalizes at least
as well (78.5%), with a smaller gap (20.0) than BN; population BN, without gradient through
the statistics, reaches only 67.2%.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

import bnlab.nn as bnn
from ..data import Dataset
from ..models import build_mlp
from ..train import batch_indices, evaluate, seed_everything, train_epoch
from .base import Experiment, ExperimentConfig, UnitStore, register, subset


class PopulationBatchNorm1d(bnn.BatchNorm1d):
    """BN whose training-mode statistics are set from outside (no batch noise).

    :func:`refresh_population` runs the whole training set through the model with every
    such layer collecting: each stores its input's mean and variance in the running buffers
    and normalizes with them. Training steps then normalize with those stored statistics,
    as inference does, with gradients for weight and bias only.
    """

    collecting = False

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, False)
        if self.collecting:
            with torch.no_grad():
                self.running_mean.copy_(x.mean(0))
                self.running_var.copy_(x.var(0, unbiased=False))
        return self._normalize_population(x)


@torch.no_grad()
def refresh_population(model: nn.Module, x: Tensor) -> None:
    layers = [m for m in model.modules() if isinstance(m, PopulationBatchNorm1d)]
    for m in layers:
        m.collecting = True
    model(x)
    for m in layers:
        m.collecting = False


@dataclass(frozen=True)
class RegularizationConfig(ExperimentConfig):
    HELP: ClassVar[dict[str, str]] = {**ExperimentConfig.HELP, "ghost_sizes": "virtual batch sizes for ghost BN (comma-separated, dividing batch_size)"}
    dataset: str = "fashion-mnist"
    n_train: int = 1000
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    depth: int = 3
    width: int = 100
    activation: str = "relu"
    init_scale: float = 0.1
    ghost_sizes: tuple[int, ...] = (2, 4, 8, 16, 32)

    def check(self) -> None:
        self.require(self.n_train >= self.batch_size, "n_train", "at least batch_size")
        self.require(self.epochs >= 1, "epochs", "an integer >= 1")
        self.require(all(self.batch_size % g == 0 and g >= 2 for g in self.ghost_sizes),
                     "ghost_sizes", f"integers >= 2 dividing batch_size={self.batch_size}")

    def variants(self) -> list[str]:
        return (["none", "bn"] + [f"ghost-{g}" for g in self.ghost_sizes]
                + ["full-batch-bn", "population-bn"])


def _build(config: RegularizationConfig, data: Dataset, variant: str, seed: int) -> nn.Sequential:
    norm = "none" if variant == "none" else "bn"
    model = build_mlp(data.num_features, len(data.classes), config.depth, config.width,
                      config.activation, norm, config.init_scale, seed)
    for i, m in enumerate(model):
        if isinstance(m, bnn.BatchNorm1d):
            if variant.startswith("ghost-"):
                model[i] = bnn.GhostBatchNorm(m.num_features, virtual_batch_size=int(variant[6:]))
            elif variant == "population-bn":
                model[i] = PopulationBatchNorm1d(m.num_features)
    return model


def full_batch_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
                    idx: Tensor) -> None:
    """One SGD step on the rows ``idx``, with BN statistics taken over all of ``x``."""
    model.train()
    loss = nn.functional.cross_entropy(model(x)[idx], y[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def train_variant(config: RegularizationConfig, data: Dataset, variant: str, seed: int) -> dict:
    seed_everything(seed)
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    tx, ty = torch.from_numpy(data.test_x), torch.from_numpy(data.test_y)
    model = _build(config, data, variant, seed)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    curve = []
    for epoch in range(1, config.epochs + 1):
        batches = batch_indices(len(x), config.batch_size, seed, epoch)
        if variant == "population-bn":
            for idx in batches:  # statistics of the whole subset before every step
                refresh_population(model, x)
                train_epoch(model, opt, x, y, idx[None])
            refresh_population(model, x)
        elif variant == "full-batch-bn":
            for idx in batches:
                full_batch_step(model, opt, x, y, idx)
        else:
            train_epoch(model, opt, x, y, batches)
        train, test = evaluate(model, x, y), evaluate(model, tx, ty)
        curve.append({"epoch": epoch, "train_acc": train.accuracy, "test_acc": test.accuracy,
                      "train_loss": train.loss, "test_loss": test.loss})
    return {"variant": variant, "seed": seed, "curve": curve}


def run(config: RegularizationConfig, store: UnitStore, data: Dataset) -> dict:
    data = subset(data, config.n_train)
    variants = config.variants()
    store.total = config.seeds * len(variants)
    runs = [store.get(f"{v}-seed{s}", lambda v=v, s=s: train_variant(config, data, v, s))
            for s in range(config.seeds) for v in variants]
    return {"runs": runs, "variants": variants, "n_train": len(data.train_y)}


register(Experiment("regularization", "generalization gap of plain, BN, ghost BN and noise-free BN",
                    RegularizationConfig, {"seeds": 5, "epochs": 100}, run))
