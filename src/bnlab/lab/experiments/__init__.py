"""Running an experiment: one protocol for all of them.

An experiment is a config class (:mod:`bnlab.lab.configs`) and a module here with
``run(ctx: Context)``, which trains its units through :meth:`Context.train` (one
:func:`~bnlab.lab.train.fit` loop) or measures them itself, writing rows through
``ctx.record``. :func:`run_experiment` does everything around that: validation against the
data before anything is created, the run directory, its lock, provenance, threads and
resuming.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from bnlab._io import write_json
from ..config import Config
from ..data import Dataset, load_dataset
from ..models import build_mlp
from ..rundir import (Record, RunDirLock, Unit, check_new_run_dir, clear_leftovers, read_config,
                      refuse_links, session)
from ..train import Progress, evaluate, fit

log = logging.getLogger(__name__)

__all__ = ["Context", "run_experiment"]


class Context:
    """What an experiment's ``run`` works with: its config, data, record and progress."""

    def __init__(self, config: Config, data: Dataset, record: Record, progress: Progress) -> None:
        self.config, self.data, self.record, self.progress = config, data, record, progress
        self.x, self.y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
        self.test_x, self.test_y = torch.from_numpy(data.test_x), torch.from_numpy(data.test_y)
        self.per_epoch = len(self.x) // config.batch_size  # steps

    def units(self, steps_each: int, key: str | None = None, values: tuple = (None,)) -> list[Unit]:
        """The units seed by seed and, within a seed, norm by norm (for each value of a swept
        field ``key``), so an interrupted run already holds matched pairs; work planned."""
        c = self.config
        units = [self.record.unit(**({key: v} if key else {}), norm=norm, seed=seed)
                 for v in values for seed in range(c.seeds) for norm in c.norms]
        self.progress.total += len(units) * steps_each
        return units

    def model(self, norm: str, seed: int, **overrides: Any) -> nn.Sequential:
        c = self.config
        hp = {k: getattr(c, k) for k in ("depth", "width", "activation", "init_scale")} | overrides
        random.seed(seed)  # one seed drives Python's random, NumPy and torch
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return build_mlp(self.data.num_features, len(self.data.classes), norm=norm, seed=seed, **hp)

    def train(self, unit: Unit, *, steps: int, eval_every: int,
              measure: Callable[[nn.Module, int, float, Tensor], Any] = lambda *_: None,
              norm: str | None = None, before: Callable[[nn.Module], None] | None = None,
              **options: Any) -> nn.Module | None:
        """Build the unit's network (its fields name ``seed``, and ``norm`` unless given),
        call ``before(model)``, and fit it (``options``: fit's, and ``lr``, ``init_scale``
        overrides); a unit finished earlier is skipped (returns None)."""
        if unit.done:
            self.progress.advance(steps)
            return None
        norm, seed = norm or unit.fields["norm"], unit.fields["seed"]
        hp = {k: options.pop(k, getattr(self.config, k)) for k in ("lr", "init_scale")}
        model = self.model(norm, seed, init_scale=hp["init_scale"])
        if before is not None:
            before(model)
        self.progress.note = unit.key
        fit(unit, model, self.x, self.y, norm=norm, seed=seed, lr=hp["lr"],
            momentum=self.config.momentum, batch_size=self.config.batch_size, steps=steps,
            eval_every=eval_every, progress=self.progress,
            measure=lambda step, loss, nxt: measure(model, step, loss, nxt), **options)
        return model

    def train_epochs(self, unit: Unit, epochs: int, **overrides: Any) -> nn.Module | None:
        """:meth:`train` with train and test loss and accuracy after every epoch."""
        def measure(model: nn.Module, step: int, sgd_loss: float, _next: Tensor) -> dict:
            train, test = evaluate(model, self.x, self.y), evaluate(model, self.test_x, self.test_y)
            return {"sgd_loss": sgd_loss, "train_loss": train.loss, "train_acc": train.accuracy,
                    "test_loss": test.loss, "test_acc": test.accuracy}
        return self.train(unit, steps=epochs * self.per_epoch, eval_every=self.per_epoch,
                          measure=measure, per_epoch=True, **overrides)


def load_data(config: Config) -> Dataset:
    """The config's dataset, cut to ``n_train`` examples, checked against the config."""
    data = load_dataset(config.dataset, config.data_dir)
    config.check_data(len(data.train_y), len(data.test_y), data.num_features, len(data.classes))
    n = getattr(config, "n_train", None)
    if n is not None:  # the first n (the loaders' order is fixed)
        data = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])
    return data


def run_experiment(config: Config | None, run_dir: str | Path, resume: bool = False,
                   progress: Progress | None = None, **overrides: Any) -> Config:
    """Run ``config`` into a new ``run_dir``, or with ``resume`` continue the run stored
    there (``overrides`` may set fields that cannot change the numbers, such as data_dir, for
    this session); returns the config used. Everything that can be checked, the data
    included, is checked before anything is created."""
    run_dir = Path(run_dir)
    if resume:
        refuse_links(run_dir)
    config = _stored(run_dir, overrides) if resume else config
    data = load_data(config)
    if not resume:
        check_new_run_dir(run_dir)
    runner = importlib.import_module(f"{__name__}.{config.module}")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with RunDirLock(run_dir):
            if resume:
                config = _stored(run_dir, overrides)  # as it is now, under the lock
            else:
                write_json(run_dir / "config.json", {"experiment": config.name, **config.to_dict()})
            record, previous = Record(run_dir, config), torch.get_num_threads()
            clear_leftovers(run_dir)
            torch.set_num_threads(config.threads)
            try:
                with session(run_dir, config.threads):
                    runner.run(Context(config, data, record, progress or Progress()))
            finally:
                torch.set_num_threads(previous)
    except BaseException:
        if created and run_dir.is_dir() and not (run_dir / "config.json").exists():
            (run_dir / ".lock").unlink(missing_ok=True)  # nothing to resume: leave nothing
            run_dir.rmdir()
        raise
    log.info("run complete: %s", run_dir)
    return config


def _stored(run_dir: Path, overrides: dict[str, Any]) -> Config:
    """The stored config with ``overrides``; one that changes the numbers is refused by the
    record's digest check."""
    return dataclasses.replace(read_config(run_dir), **overrides)
