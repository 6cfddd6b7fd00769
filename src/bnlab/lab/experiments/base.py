"""What every named experiment shares: a typed config, a run directory, resumable units.

An experiment is a function ``run(config, store, data) -> results`` that does its
work in *units* (one trained network, one sweep point), each computed through
:meth:`UnitStore.get` and saved as ``units/<key>.json`` the moment it finishes. A run that is
interrupted and started again with ``--resume`` skips the finished units, so nothing done is
lost and the results are the same as an uninterrupted run's. ``results.json`` holds the raw
measurements; :mod:`bnlab.report` turns it into figures, numbers and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from bnlab._io import write_json
from ..data import DATASETS, Dataset
from ..rundir import ConfigError, RunDirLock, config_from_dict, open_run_dir

log = logging.getLogger(__name__)

__all__ = ["EXPERIMENTS", "Experiment", "ExperimentConfig", "UnitStore", "register",
           "run_experiment", "subset"]


@dataclass(frozen=True)
class ExperimentConfig:
    """Fields every experiment has. Subclasses add theirs and check them in ``check``."""

    dataset: str = "digits"
    seeds: int = 2
    data_dir: str | None = None

    # one line per field for --help; subclasses extend it
    HELP: ClassVar[dict[str, str]] = {
        "dataset": "digits, fashion-mnist or mnist",
        "seeds": "runs per variant, with seeds 0..N-1",
        "data_dir": "folder with the IDX files (searched first)",
        "depth": "number of hidden layers",
        "width": "units per hidden layer",
        "activation": "sigmoid, relu or tanh",
        "lr": "SGD learning rate",
        "init_scale": "standard deviation of the Gaussian initial weights",
        "batch_size": "mini-batch size",
        "epochs": "training epochs per run",
        "steps": "training steps per run",
        "n_train": "training examples used (the first N of the training set)",
    }

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {', '.join(DATASETS)} (got {self.dataset!r})")
        if not isinstance(self.seeds, int) or isinstance(self.seeds, bool) or self.seeds < 1:
            raise ConfigError(f"seeds must be an integer >= 1 (got {self.seeds!r})")
        for f in dataclasses.fields(self):  # tuples from JSON lists
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        self._check_common()
        self.check()

    def _check_common(self) -> None:
        """Fields several experiments share, checked alike wherever they appear."""
        from ..models import ACTIVATIONS

        positive_ints = ("depth", "width", "steps", "epochs", "draws", "n_train", "eval_every",
                         "check_every", "probe_size")
        for name in positive_ints:
            if hasattr(self, name):
                v = getattr(self, name)
                self.require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name,
                             "an integer >= 1")
        if hasattr(self, "batch_size"):
            self.require(isinstance(self.batch_size, int) and self.batch_size >= 2, "batch_size",
                         "an integer >= 2")
        for name in ("lr", "init_scale"):
            if hasattr(self, name):
                self.require(isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0,
                             name, "a number > 0")
        if hasattr(self, "activation"):
            self.require(self.activation in ACTIVATIONS, "activation",
                         f"one of {', '.join(ACTIVATIONS)}")

    def check(self) -> None:
        """Raise :class:`ConfigError` for out-of-range values."""

    def require(self, ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{field} must be {what} (got {getattr(self, field)!r})")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        return config_from_dict(cls, d)

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


ProgressFn = Callable[[int, int, str], None]  # (units done, units in all, what just finished)


@dataclass(frozen=True)
class Experiment:
    name: str
    summary: str  # one line, for --help
    config_cls: type[ExperimentConfig]
    full: dict[str, Any]  # overrides giving the documented full setting
    run: Callable[..., dict]  # run(config, store, data) -> results


EXPERIMENTS: dict[str, Experiment] = {}


def register(exp: Experiment) -> Experiment:
    EXPERIMENTS[exp.name] = exp
    return exp


class UnitStore:
    """Finished units of work, one JSON file each under ``run_dir/units``."""

    def __init__(self, run_dir: Path, total: int = 0, progress: ProgressFn | None = None) -> None:
        self.dir = Path(run_dir) / "units"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.total, self.progress = total, progress
        self.done = 0

    def get(self, key: str, compute: Callable[[], dict]) -> dict:
        """The stored result of ``key``, or ``compute()``, saved atomically before returning."""
        path = self.dir / f"{key}.json"
        if path.is_file():
            result = json.loads(path.read_text())
        else:
            result = compute()
            write_json(path, _plain(result))
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, key)
        return result


def _plain(obj: Any) -> Any:
    """NumPy and torch values to plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _plain(obj.tolist())
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def subset(data: Dataset, n_train: int | None) -> Dataset:
    """The first ``n_train`` training examples (the loaders' order is fixed), all test ones."""
    if n_train is None or n_train >= len(data.train_y):
        return data
    return dataclasses.replace(data, train_x=data.train_x[:n_train], train_y=data.train_y[:n_train])


def prepare(run_dir: Path, exp: Experiment, config: ExperimentConfig | None,
            resume: bool) -> ExperimentConfig:
    record = None if resume else {"experiment": exp.name, **config.to_dict()}
    stored = dict(open_run_dir(run_dir, record, resume))
    if stored.pop("experiment", None) != exp.name:
        raise ConfigError(f"{run_dir} is not a {exp.name!r} run")
    return exp.config_cls.from_dict(stored)


def run_experiment(name: str, config: ExperimentConfig | None, run_dir: str | Path,
                   resume: bool = False, progress: ProgressFn | None = None,
                   data: Dataset | None = None) -> dict:
    """Run experiment ``name`` into ``run_dir`` and write ``results.json``; returns the results."""
    from ..data import load_dataset

    exp = EXPERIMENTS[name]
    run_dir = Path(run_dir)
    if data is None and not resume:  # a missing dataset must not leave an empty run behind
        data = load_dataset(config.dataset, config.data_dir)
    with RunDirLock(run_dir):
        config = prepare(run_dir, exp, config, resume)
        if data is None:
            data = load_dataset(config.dataset, config.data_dir)
        store = UnitStore(run_dir, progress=progress)
        results = exp.run(config, store, data)
        results = _plain({"experiment": name, "config": config.to_dict(), **results})
        write_json(run_dir / "results.json", results)
    return results
