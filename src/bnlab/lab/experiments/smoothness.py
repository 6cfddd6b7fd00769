"""``smoothness``: Santurkar et al. (2018) at small scale.

Expected (Santurkar, Tsipras, Ilyas & Madry 2018, Figures 4 and 7): along the gradient
direction, the loss of a BN network varies over a narrower range, its gradient changes less
(gradients are more predictive) and its effective beta-smoothness is smaller than a plain
network's; and "noisy BN", which adds random, time-varying shifts and scales after every BN
layer so that layer inputs are anything but stable, trains about as well as BN: the benefit
is not the stability of layer-input distributions.

Measured: every ``check_every`` steps, on the next training batch, the gradient g at the
current weights w; then for each step size eta in ``step_sizes`` (multiples of the learning
rate) the loss L(w - eta g) and gradient g_eta there, in training mode on that same batch.
Reported per checkpoint: loss range max - min over eta; gradient predictiveness
max ||g_eta - g||; effective beta-smoothness max ||g_eta - g|| / ||eta g||. Final test
accuracy of plain, BN and noisy BN over seeds.

Measured by bnlab (full setting: digits, 3 x 100 sigmoid, 5000 steps, n=5 seeds,
docs/RESULTS.md): as expected. Averaged over the checkpoints after step 0, plain vs BN: loss
range 0.034 vs 0.016, gradient change 0.45 vs 0.10, effective beta-smoothness 2.70 vs 1.56
(noisy BN: 0.024, 0.13, 1.44). Final test accuracy: plain 96.48%, BN 97.88%, noisy BN
97.60%: the noise-shifted layer inputs cost noisy BN almost nothing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

import bnlab.nn as bnn
from ..compare import CompareConfig
from ..data import Dataset
from ..models import build_mlp
from ..train import evaluate, seed_everything, sgd_step, step_batches
from .base import Experiment, ExperimentConfig, UnitStore, register


class NoisyAffine(nn.Module):
    """After a BN layer in training: y * scale + shift, scale ~ U(1 - s, 1 + s) and
    shift ~ U(-b, b) drawn per channel afresh at every step (Santurkar et al.'s control).
    The identity in eval."""

    def __init__(self, scale_noise: float, shift_noise: float, gen: torch.Generator) -> None:
        super().__init__()
        self.scale_noise, self.shift_noise, self.gen = scale_noise, shift_noise, gen
        self.hold = False  # reuse the last draw (probes compare points under one draw)
        self.noise: tuple[Tensor, Tensor] | None = None

    def forward(self, y: Tensor) -> Tensor:
        if not self.training:
            return y
        if not (self.hold and self.noise is not None):
            c = y.shape[1]
            self.noise = (1 + self.scale_noise * (2 * torch.rand(c, generator=self.gen) - 1),
                          self.shift_noise * (2 * torch.rand(c, generator=self.gen) - 1))
        scale, shift = self.noise
        return y * scale + shift


@dataclass(frozen=True)
class SmoothnessConfig(ExperimentConfig):
    HELP: ClassVar[dict[str, str]] = {**ExperimentConfig.HELP, "check_every": "steps between landscape probes", "step_sizes": "step sizes along -g, as multiples of lr", "noise_scale": "noisy BN: scale drawn from U(1 - s, 1 + s)", "noise_shift": "noisy BN: shift drawn from U(-b, b)"}
    dataset: str = "digits"
    steps: int = 1000
    check_every: int = 100
    step_sizes: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # multiples of lr
    lr: float = CompareConfig.lr
    batch_size: int = CompareConfig.batch_size
    depth: int = CompareConfig.depth
    width: int = CompareConfig.width
    activation: str = CompareConfig.activation
    init_scale: float = CompareConfig.init_scale
    noise_scale: float = 0.5
    noise_shift: float = 0.5

    def check(self) -> None:
        self.require(self.steps >= 1, "steps", "an integer >= 1")
        self.require(1 <= self.check_every <= self.steps, "check_every", "between 1 and steps")
        self.require(len(self.step_sizes) >= 2 and all(s > 0 for s in self.step_sizes),
                     "step_sizes", "two or more numbers > 0")


VARIANTS = ("none", "bn", "noisy-bn")


def _model(config: SmoothnessConfig, data: Dataset, variant: str, seed: int) -> nn.Sequential:
    model = build_mlp(data.num_features, len(data.classes), config.depth, config.width,
                      config.activation, "none" if variant == "none" else "bn", config.init_scale, seed)
    if variant == "noisy-bn":
        gen = torch.Generator().manual_seed(10_000 + seed)
        layers = []
        for m in model:
            layers.append(m)
            if isinstance(m, bnn.BatchNorm1d):
                layers.append(NoisyAffine(config.noise_scale, config.noise_shift, gen))
        model = nn.Sequential(*layers)
    return model


def _loss_and_grad(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def probe(model: nn.Module, x: Tensor, y: Tensor, etas: list[float]) -> dict:
    """Loss and gradient along -g at step sizes ``etas``, on a copy (the model is untouched)."""
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


def train_and_probe(config: SmoothnessConfig, data: Dataset, variant: str, seed: int) -> dict:
    seed_everything(seed)
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    model = _model(config, data, variant, seed)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    etas = [config.lr * s for s in config.step_sizes]
    checks = []
    batches = step_batches(len(x), config.batch_size, seed)
    for step in range(config.steps + 1):
        idx = next(batches)
        if step % config.check_every == 0:
            checks.append({"step": step, **probe(model, x[idx], y[idx], etas)})
        if step < config.steps:
            sgd_step(model, opt, x[idx], y[idx])
    test = evaluate(model, torch.from_numpy(data.test_x), torch.from_numpy(data.test_y))
    return {"variant": variant, "seed": seed, "checks": checks, "test_acc": test.accuracy}


def run(config: SmoothnessConfig, store: UnitStore, data: Dataset) -> dict:
    store.total = config.seeds * len(VARIANTS)
    runs = [store.get(f"{v}-seed{s}", lambda v=v, s=s: train_and_probe(config, data, v, s))
            for s in range(config.seeds) for v in VARIANTS]
    return {"runs": runs, "variants": list(VARIANTS)}


register(Experiment("smoothness", "loss and gradient along the gradient direction (Santurkar et al. 2018)",
                    SmoothnessConfig, {"seeds": 5, "steps": 5000, "check_every": 250}, run))
