"""Training primitives: deterministic mini-batches, one epoch of SGD, evaluation, checkpoints.

Determinism: the mini-batch order of an epoch depends only on (seed, epoch), so every
variant trained with one seed sees the same sequence of batches, and a run resumed from a
checkpoint sees the batches it would have seen had it never stopped.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from bnlab._io import atomic_write

log = logging.getLogger(__name__)

__all__ = ["Checkpoint", "EvalResult", "batch_indices", "evaluate", "seed_everything",
           "sgd_step", "step_batches", "train_epoch"]


def seed_everything(seed: int) -> None:
    """One seed drives Python's ``random``, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_indices(n: int, batch_size: int, seed: int, epoch: int) -> Tensor:
    """(num_batches, batch_size) sample indices for one epoch, a function of (seed, epoch).

    The last incomplete batch is dropped, so every step normalizes over the same number of
    samples (and BN never meets a batch of one); reshuffling each epoch means every sample
    is still used.
    """
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({n})")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    num = n // batch_size
    return perm[: num * batch_size].view(num, batch_size)


def step_batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Mini-batch indices step after step, epoch after epoch (see :func:`batch_indices`)."""
    for epoch in itertools.count(1):
        yield from batch_indices(n, batch_size, seed, epoch)


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
    """One optimizer step on the batch (x, y) in training mode; returns the detached loss."""
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                batches: Tensor) -> float:
    """One pass of SGD over ``batches``; returns the mean training-mode loss."""
    total = torch.zeros(())
    for idx in batches:
        total += sgd_step(model, optimizer, x[idx], y[idx])
    return float(total) / len(batches)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 8192) -> EvalResult:
    """Inference-mode loss and accuracy over the whole of (x, y)."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(x), chunk):
        logits = model(x[start:start + chunk])
        target = y[start:start + chunk]
        loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return EvalResult(loss / len(x), correct / len(x))


@dataclass
class Checkpoint:
    """Everything needed to continue a training run exactly: weights, optimizer state, the
    number of completed epochs and their metric records."""

    model: dict
    optimizer: dict
    epoch: int
    records: list[dict]

    def save(self, path: str | os.PathLike) -> None:
        buf = io.BytesIO()
        torch.save({"model": self.model, "optimizer": self.optimizer, "epoch": self.epoch,
                    "records": self.records}, buf)
        atomic_write(path, lambda fh: fh.write(buf.getvalue()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Checkpoint":
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls(state["model"], state["optimizer"], state["epoch"], state["records"])
