"""The seed's experiment: a fully connected network against the same network with BN.

A run directory holds:

* ``config.json``: the resolved :class:`CompareConfig`;
* ``metrics.jsonl``: one JSON line per (norm, seed, epoch) with train and test loss and
  accuracy (both in inference mode over the whole set) and the mean training-mode loss;
* ``checkpoints/<norm>-seed<k>.pt``: the state after the last completed epoch, from which
  ``--resume`` continues; ``metrics.jsonl`` is rebuilt from them on resume, so a line lost
  to a crash is restored and a half-written one dropped;
* ``summary.json``, ``figures/*.png`` and ``report.html``, written by :mod:`bnlab.report`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bnlab._io import append_jsonl, write_jsonl
from .data import DATASETS, Dataset, load_dataset
from .models import ACTIVATIONS, NORMS, build_mlp
from .rundir import ConfigError, RunDirLock, config_from_dict, open_run_dir
from .train import Checkpoint, batch_indices, evaluate, seed_everything, train_epoch

log = logging.getLogger(__name__)

__all__ = ["CompareConfig", "ConfigError", "run_compare"]

METRICS_FILE, CHECKPOINTS = "metrics.jsonl", "checkpoints"


@dataclass(frozen=True)
class CompareConfig:
    """Everything that determines a comparison's numbers. Defaults are the seed's claim on
    ``digits``; see the README section "Why these defaults" for how they were chosen."""

    dataset: str = "digits"
    epochs: int = 100
    seeds: int = 5
    batch_size: int = 60
    lr: float = 0.1
    momentum: float = 0.0
    depth: int = 3
    width: int = 100
    activation: str = "sigmoid"
    init_scale: float = 0.2
    norms: tuple[str, ...] = ("none", "bn")
    data_dir: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        checks = [
            (self.dataset in DATASETS, f"dataset must be one of {', '.join(DATASETS)}"),
            (_is_int(self.epochs) and self.epochs >= 1, "epochs must be an integer >= 1"),
            (_is_int(self.seeds) and self.seeds >= 1, "seeds must be an integer >= 1"),
            (_is_int(self.batch_size) and self.batch_size >= 2, "batch_size must be an integer >= 2"),
            (_is_num(self.lr) and self.lr > 0, "lr must be a number > 0"),
            (_is_num(self.momentum) and 0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (_is_int(self.depth) and self.depth >= 1, "depth must be an integer >= 1"),
            (_is_int(self.width) and self.width >= 1, "width must be an integer >= 1"),
            (self.activation in ACTIVATIONS, f"activation must be one of {', '.join(ACTIVATIONS)}"),
            (_is_num(self.init_scale) and self.init_scale > 0, "init_scale must be a number > 0"),
        ]
        for ok, message in checks:
            if not ok:
                name = message.split()[0]
                raise ConfigError(f"{message} (got {getattr(self, name)!r})")
        norms = tuple(self.norms)
        if not norms or any(n not in NORMS for n in norms) or len(set(norms)) != len(norms):
            raise ConfigError(f"norms must be distinct values from {', '.join(NORMS)} (got {norms!r})")
        object.__setattr__(self, "norms", norms)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["norms"] = list(self.norms)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompareConfig":
        return config_from_dict(cls, d)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives after each epoch."""

    done: int  # epochs completed over the whole run, resumed ones included
    total: int
    norm: str
    seed: int
    record: dict


ProgressFn = Callable[[Progress], None]


def prepare_run_dir(run_dir: Path, config: CompareConfig | None, resume: bool) -> CompareConfig:
    """Create ``run_dir`` for a new run, or check it for a resumed one.

    Returns the config to run with: on resume, the stored one.
    """
    return CompareConfig.from_dict(open_run_dir(run_dir, None if resume else config.to_dict(), resume))


def _tensors(data: Dataset) -> tuple[torch.Tensor, ...]:
    return (torch.from_numpy(data.train_x), torch.from_numpy(data.train_y),
            torch.from_numpy(data.test_x), torch.from_numpy(data.test_y))


def _checkpoint_path(run_dir: Path, norm: str, seed: int) -> Path:
    return run_dir / CHECKPOINTS / f"{norm}-seed{seed}.pt"


def train_variant(config: CompareConfig, data: Dataset, norm: str, seed: int, run_dir: Path,
                  on_epoch: Callable[[dict], None], ckpt: Checkpoint | None = None) -> list[dict]:
    """Train one (norm, seed) to ``config.epochs``, continuing from ``ckpt`` if given."""
    seed_everything(seed)
    train_x, train_y, test_x, test_y = _tensors(data)
    model = build_mlp(data.num_features, len(data.classes), config.depth, config.width,
                      config.activation, norm, config.init_scale, seed)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    path = _checkpoint_path(run_dir, norm, seed)
    records: list[dict] = []
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        opt.load_state_dict(ckpt.optimizer)
        start, records = ckpt.epoch, ckpt.records
    for epoch in range(start + 1, config.epochs + 1):
        t0 = time.perf_counter()
        batches = batch_indices(len(train_x), config.batch_size, seed, epoch)
        sgd_loss = train_epoch(model, opt, train_x, train_y, batches)
        train, test = evaluate(model, train_x, train_y), evaluate(model, test_x, test_y)
        record = {"norm": norm, "seed": seed, "epoch": epoch, "steps": epoch * len(batches),
                  "sgd_loss": sgd_loss, "train_loss": train.loss, "train_acc": train.accuracy,
                  "test_loss": test.loss, "test_acc": test.accuracy,
                  "seconds": time.perf_counter() - t0}
        records.append(record)
        Checkpoint(model.state_dict(), opt.state_dict(), epoch, records).save(path)
        on_epoch(record)
    return records


def _checkpoints(run_dir: Path, config: CompareConfig) -> dict[tuple[str, int], Checkpoint]:
    """The saved state of every (norm, seed) that has one, read once per run."""
    found = {}
    for seed in range(config.seeds):
        for norm in config.norms:
            path = _checkpoint_path(run_dir, norm, seed)
            if path.is_file():
                found[norm, seed] = Checkpoint.load(path)
    return found


def run_compare(config: CompareConfig | None, run_dir: str | Path, resume: bool = False,
                progress: ProgressFn | None = None, data: Dataset | None = None) -> CompareConfig:
    """Train every (seed, norm) of ``config`` into ``run_dir``; returns the config used.

    With ``resume`` the stored config is used and ``config`` may be None.

    Seeds run in order and, within a seed, every norm, so an interrupted run already holds
    matched pairs. The report is built by the caller (see :func:`bnlab.report.build_report`).
    """
    run_dir = Path(run_dir)
    if data is None and not resume:  # a missing dataset must not leave an empty run behind
        data = load_dataset(config.dataset, config.data_dir)
    with RunDirLock(run_dir):
        config = prepare_run_dir(run_dir, config, resume)
        if data is None:
            data = load_dataset(config.dataset, config.data_dir)
        _train_all(config, run_dir, data, progress)
    log.info("run complete: %s", run_dir)
    return config


def _train_all(config: CompareConfig, run_dir: Path, data: Dataset,
               progress: ProgressFn | None) -> None:
    metrics = run_dir / METRICS_FILE
    saved = _checkpoints(run_dir, config)
    done_rows = [r for ckpt in saved.values() for r in ckpt.records]
    write_jsonl(metrics, done_rows)  # consistent with the checkpoints, whatever happened before
    done, total = len(done_rows), config.seeds * len(config.norms) * config.epochs
    for seed in range(config.seeds):
        for norm in config.norms:
            def on_epoch(record: dict, norm: str = norm, seed: int = seed) -> None:
                nonlocal done
                append_jsonl(metrics, record)
                done += 1
                if progress is not None:
                    progress(Progress(done, total, norm, seed, record))
            train_variant(config, data, norm, seed, run_dir, on_epoch, saved.get((norm, seed)))
