"""``init-sweep`` and ``lr-sweep``: where plain networks and BN networks learn.

init-sweep. Expected ("Deep Learning from Scratch", section 6.3.2: 784 -> 5 x 100 ReLU -> 10,
1000 MNIST training images, SGD lr 0.01, batch 100, weight std over logspace(0, -4, 16)):
the BN network learns at nearly every initial scale, the plain one only in a narrow band
around std 0.1; BN also learns faster where both learn.

lr-sweep. Expected (Ioffe & Szegedy 2015, section 3.3; Santurkar et al. 2018, Figure 2;
CS231n): BN tolerates larger learning rates; plain networks diverge or stall at learning
rates where BN trains well, and BN reaches a threshold accuracy in fewer steps across the
range.

Measured: the training-accuracy curve of every (scale or learning rate, norm, seed), in
inference mode over the training set (init-sweep) or test accuracy over the test set
(lr-sweep), and from them where each variant learns.

Measured by bnlab (full settings, docs/RESULTS.md):

* init-sweep (Fashion-MNIST, 1000 images, 20 epochs, n=3 per scale): as expected. Final
  training accuracy >= 50% at 13 of 16 scales with BN (std 1 down to 0.00063) and 2 of 16
  without (0.29 and 0.16); the plain network diverges above that band and stays at chance
  below it.
* lr-sweep (digits, 3 x 100 sigmoid, 50 epochs, n=5 seeds per point): as expected. Every
  seed reached 90% test accuracy at 7 of 7 learning rates (0.01 to 10) with BN and at 3 of 7
  (0.32 to 3.2) without; plain diverged at lr 10 (10.2%) where BN ended at 97.8%. Where both
  reached 90%, plain needed 9.1x BN's steps on average. With its best learning rate (3.2)
  plain ended level with BN (97.6% vs 97.7%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..compare import CompareConfig
from ..data import Dataset
from ..models import build_mlp
from ..train import evaluate, seed_everything, sgd_step, step_batches
from .base import Experiment, ExperimentConfig, UnitStore, register, subset


def _curve(data: Dataset, norm: str, seed: int, depth: int, width: int, activation: str,
           init_scale: float, lr: float, batch_size: int, steps: int, eval_every: int,
           on: str) -> dict:
    """Train and record accuracy on ``on`` ("train" or "test") every ``eval_every`` steps."""
    seed_everything(seed)
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    ex, ey = (x, y) if on == "train" else (torch.from_numpy(data.test_x), torch.from_numpy(data.test_y))
    model = build_mlp(x.shape[1], len(data.classes), depth, width, activation, norm, init_scale, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    steps_at, acc, diverged = [], [], False
    for step, idx in enumerate(step_batches(len(x), batch_size, seed), 1):
        if not math.isfinite(float(sgd_step(model, opt, x[idx], y[idx]))):
            diverged = True
            break
        if step % eval_every == 0 or step == steps:
            steps_at.append(step)
            acc.append(evaluate(model, ex, ey).accuracy)
        if step == steps:
            break
    while len(acc) < math.ceil(steps / eval_every):  # a diverged run stays at chance
        steps_at.append(min((len(acc) + 1) * eval_every, steps))
        acc.append(1.0 / len(data.classes))
    return {"norm": norm, "seed": seed, "steps": steps_at, "acc": acc, "diverged": diverged}


@dataclass(frozen=True)
class InitSweepConfig(ExperimentConfig):
    HELP: ClassVar[dict[str, str]] = {**ExperimentConfig.HELP, "scales": "initial weight standard deviations (comma-separated)", "learned_threshold": "final training accuracy that counts as learning"}
    dataset: str = "fashion-mnist"
    seeds: int = 1
    n_train: int = 1000
    scales: tuple[float, ...] = tuple(float(s) for s in np.logspace(0, -4, 16))
    depth: int = 5
    width: int = 100
    activation: str = "relu"
    lr: float = 0.01
    batch_size: int = 100
    epochs: int = 20
    learned_threshold: float = 0.5  # "learns": final training accuracy at least this

    def check(self) -> None:
        self.require(len(self.scales) >= 1 and all(s > 0 for s in self.scales), "scales", "positive numbers")
        self.require(self.epochs >= 1, "epochs", "an integer >= 1")
        self.require(self.n_train >= self.batch_size, "n_train", "at least batch_size")
        self.require(0 < self.learned_threshold < 1, "learned_threshold", "in (0, 1)")


def _sweep(config, store, data: Dataset, key: str, values, on: str) -> dict:
    """Train plain and BN networks at every value of ``key`` (init_scale or lr), every seed,
    recording accuracy on ``on`` once per epoch."""
    per_epoch = len(data.train_y) // config.batch_size
    store.total = len(values) * 2 * config.seeds
    runs = []
    for i, value in enumerate(values):
        hp = {"init_scale": getattr(config, "init_scale", None), "lr": getattr(config, "lr", None), key: value}
        for seed in range(config.seeds):
            for norm in ("none", "bn"):
                r = store.get(f"{key}{i:02d}-{norm}-seed{seed}", lambda n=norm, k=seed, hp=hp: _curve(
                    data, n, k, config.depth, config.width, config.activation, hp["init_scale"],
                    hp["lr"], config.batch_size, config.epochs * per_epoch, per_epoch, on))
                runs.append({**r, key: value})
    return {"runs": runs, "steps_per_epoch": per_epoch, "swept": key}


def run_init_sweep(config: InitSweepConfig, store: UnitStore, data: Dataset) -> dict:
    return _sweep(config, store, subset(data, config.n_train), "init_scale", config.scales, "train")


@dataclass(frozen=True)
class LrSweepConfig(ExperimentConfig):
    HELP: ClassVar[dict[str, str]] = {**ExperimentConfig.HELP, "lrs": "learning rates (comma-separated, spanning >= 100x)", "threshold": "test accuracy for steps-to-threshold"}
    dataset: str = "digits"
    lrs: tuple[float, ...] = tuple(float(v) for v in np.logspace(-2, 1, 7))
    epochs: int = 30
    depth: int = CompareConfig.depth
    width: int = CompareConfig.width
    activation: str = CompareConfig.activation
    init_scale: float = CompareConfig.init_scale
    batch_size: int = CompareConfig.batch_size
    threshold: float = 0.9  # test accuracy defining "steps to threshold"

    def check(self) -> None:
        self.require(len(self.lrs) >= 2 and all(v > 0 for v in self.lrs), "lrs", "two or more numbers > 0")
        self.require(max(self.lrs) / min(self.lrs) >= 100, "lrs",
                     "a range spanning at least two orders of magnitude")
        self.require(self.epochs >= 1, "epochs", "an integer >= 1")
        self.require(0 < self.threshold < 1, "threshold", "in (0, 1)")


def run_lr_sweep(config: LrSweepConfig, store: UnitStore, data: Dataset) -> dict:
    return _sweep(config, store, data, "lr", config.lrs, "test")


register(Experiment("init-sweep", "BN vs plain across 16 initial weight scales (Deep Learning from Scratch 6.3)",
                    InitSweepConfig, {"seeds": 3}, run_init_sweep))
register(Experiment("lr-sweep", "BN vs plain across learning rates spanning three orders of magnitude",
                    LrSweepConfig, {"seeds": 5, "epochs": 50}, run_lr_sweep))
