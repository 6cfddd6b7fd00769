"""Every experiment, one registry entry each: its config class (the ``bnlab`` command's
options, generated without importing torch), the module that runs it, the report section that
reads its rows, and a one-line summary. The command's subcommands and their help, the runner,
the report and the docs' list of experiments all read the registry; a user's own experiment
is one :func:`register_experiment` call.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any, ClassVar, Iterator

import numpy as np

from .fields import (MODEL, Config, ConfigError, TrainConfig, integer, items, number, one_of,
                     option, optional, setting, shared, flag)
from .model_registry import DEFAULT_MODEL

__all__ = ["EXPERIMENTS", "MLP_FIELDS", "BatchSizeConfig", "CompareConfig", "Experiment",
           "IcsConfig", "InitSweepConfig", "LrSweepConfig", "ModelConfig", "NoiseConfig",
           "RegularizationConfig", "SmoothnessConfig", "experiment", "experiments", "experiments_markdown",
           "register_experiment", "unregister_experiment"]


@dataclass(frozen=True)
class Experiment:
    """One experiment. ``config`` is its config class, which names it; ``module`` the module
    that runs it (see :mod:`bnlab.lab.runner`); ``section`` the report section that turns its
    rows into a summary, figures and a page (see :mod:`bnlab.report.build`), named by path
    so that the lab never imports the report; ``summary`` one line for the command's help
    and the docs."""

    config: type[Config]
    module: str
    section: str
    summary: str

    @property
    def name(self) -> str:
        return self.config.name

    def runner(self) -> ModuleType:
        """The module that runs the experiment, imported."""
        return importlib.import_module(self.module)


_REGISTRY: dict[str, Experiment] = {}  # by name, in order of registration
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def register_experiment(config: type[Config], *, module: str, section: str,
                        summary: str) -> Experiment:
    """Add the experiment of ``config`` (a :class:`~bnlab.lab.fields.Config` subclass with
    a ``name``) to the ``bnlab`` command, the runner and the report; returns its entry.
    ``module`` and ``section`` are dotted module paths, imported when the experiment runs
    and when its report is built; ``summary`` is one line."""
    if not (isinstance(config, type) and issubclass(config, Config) and config.name):
        raise TypeError("config must be a Config subclass with a name, as in class "
                        f"MyConfig(TrainConfig, name='mine') (got {config!r})")
    if config.name in _REGISTRY:
        raise ValueError(f"the experiment {config.name} is already registered")
    for arg, path in (("module", module), ("section", section)):
        if not (isinstance(path, str) and _MODULE.fullmatch(path)):
            raise ValueError(f"{arg} must be a dotted module path, such as mypackage.mine "
                             f"(got {path!r})")
    if not (isinstance(summary, str) and summary.strip() and "\n" not in summary):
        raise ValueError(f"summary must be one line of text (got {summary!r})")
    entry = Experiment(config, module, section, summary)
    _REGISTRY[config.name] = entry
    return entry


def unregister_experiment(name: str) -> None:
    """Remove the experiment ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"no experiment {name!r} is registered")
    del _REGISTRY[name]


def experiment(name: str) -> Experiment:
    """The entry of the experiment ``name``; ValueError for an unknown one."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown experiment {name!r}; expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def experiments() -> list[Experiment]:
    """Every experiment, in order of registration."""
    return list(_REGISTRY.values())


class _Configs(Mapping):
    """The experiments' config classes by name, as the registry holds them now."""

    def __getitem__(self, name: str) -> type[Config]:
        return _REGISTRY[name].config

    def __iter__(self) -> Iterator[str]:
        return iter(list(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return repr({name: e.config for name, e in _REGISTRY.items()})


EXPERIMENTS = _Configs()


def experiments_markdown() -> str:
    """The experiments as a Markdown table of name, summary and default dataset, in order
    of registration (docs/lab.md lists them so)."""
    rows = [f"| `{e.name}` | {e.summary} | {e.config().dataset} |" for e in experiments()]
    return "\n".join(["| name | summary | default data |", "|---|---|---|", *rows]) + "\n"


_RUNNERS, _SECTIONS = "bnlab.lab.experiments.", "bnlab.report.sections."

MLP_FIELDS = ("depth", "width", "activation", "init_scale")  # shape the built-in MLP only


@dataclass(frozen=True)
class ModelConfig(TrainConfig):
    """:class:`~bnlab.lab.fields.TrainConfig` and the network it trains: ``model`` names an
    entry of :mod:`bnlab.lab.model_registry`, the built-in ``mlp`` by default. Any other is
    built by its builder for every norm and seed and trained one network at a time with
    autograd (:class:`~bnlab.lab.train.Network`). The fields that shape the built-in MLP
    alone (:data:`MLP_FIELDS`) then stay at their defaults, and ``nproc`` at 1: bnlab cannot
    tell which layers of a network of one's own a batch split between processes changes."""

    model: str = option(DEFAULT_MODEL, "network trained for every norm and seed: mlp is "
                        "shaped by --depth, --width, --activation and --init-scale; the "
                        "others are registered with register_model (bnlab --import MODULE)",
                        MODEL, added=True)

    def check(self) -> None:
        super().check()
        if self.model == DEFAULT_MODEL:
            return
        defaults = {f.name: f.default for f in fields(self)}
        shaped = [k for k in MLP_FIELDS if getattr(self, k) != defaults[k]]
        if shaped:
            given = ", ".join(setting(k, getattr(self, k)) for k in shaped)
            mlp = ", ".join(map(flag, MLP_FIELDS[:-1])) + " and " + flag(MLP_FIELDS[-1])
            raise ConfigError(f"{given} {'shapes' if len(shaped) == 1 else 'shape'} the "
                              f"built-in MLP only, and {setting('model', self.model)} is "
                              f"built by its own builder; leave {mlp} at their defaults")
        self.require(getattr(self, "nproc", 1) == 1, "nproc",
                     f"1 with {setting('model', self.model)} (bnlab cannot tell whether a "
                     "batch split between processes changes a network of one's own)")


@dataclass(frozen=True)
class CompareConfig(ModelConfig, name="compare", full={"dataset": "fashion-mnist", "seeds": 10}):
    """The source article's experiment. Defaults: its claim on ``digits`` in about ten seconds
    of training (docs/lab.md, "Why `compare` has these defaults")."""

    epochs: int = shared("epochs")
    workers: int = shared("workers")
    scheduler: str | None = shared("scheduler")
    tensorboard: str | None = shared("tensorboard")
    nproc: int = shared("nproc")


register_experiment(CompareConfig, module=_RUNNERS + "compare", section=_SECTIONS + "compare",
                    summary="plain FC network vs the same network with BN, over several seeds")


@dataclass(frozen=True)
class NoiseConfig(TrainConfig, name="noise", full={"draws": 300, "seeds": 10, "epochs": 10}):
    dataset: str = shared("dataset", "fashion-mnist")
    seeds: int = shared("seeds", 1)
    norms: tuple[str, ...] = shared("norms", ("bn",))
    epochs: int = option(2, "epochs of training before the 'trained' measurement (0: none)",
                         integer(0, 10**6))
    batch_sizes: tuple[int, ...] = option((2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
                                          "mini-batch sizes m, comma-separated",
                                          items(integer(2, 10**7), min_len=2))
    draws: int = option(200, "mini-batches drawn per size", integer(2, 10**6))

    def check(self) -> None:
        super().check()
        self.require(self.norms == ("bn",), "norms", "bn (the statistics are BN's inputs)")

    def check_data(self, n_train: int, n_test: int, n_features: int, n_classes: int) -> None:
        super().check_data(n_train, n_test, n_features, n_classes)
        n = self.examples_used(n_train)
        if max(self.batch_sizes) >= n:  # a batch of the whole set has no noise to measure
            raise ConfigError(f"{flag('batch_sizes')} holds {max(self.batch_sizes)}, not less than the "
                              f"training set ({n} examples); use sizes below {n}")


register_experiment(NoiseConfig, module=_RUNNERS + "noise", section=_SECTIONS + "noise",
                    summary="mini-batch statistics against population statistics, by batch size")


@dataclass(frozen=True)
class IcsConfig(TrainConfig, name="ics", full={"steps": 50000, "eval_every": 1000, "seeds": 10}):
    dataset: str = shared("dataset", "fashion-mnist")
    seeds: int = shared("seeds", 2)
    steps: int = shared("steps", 3000)
    eval_every: int = shared("eval_every", 250)
    probe_size: int = option(1000, "held-out examples whose activation inputs are measured",
                             integer(10, 10**7))
    workers: int = shared("workers")
    scheduler: str | None = shared("scheduler")
    tensorboard: str | None = shared("tensorboard")

    def check(self) -> None:
        super().check()
        self.require(self.eval_every <= self.steps, "eval_every",
                     f"at most {setting('steps', self.steps)}")

    def check_data(self, n_train: int, n_test: int, n_features: int, n_classes: int) -> None:
        super().check_data(n_train, n_test, n_features, n_classes)
        if self.probe_size > n_test:
            raise ConfigError(f"{setting('probe_size', self.probe_size)} is more than the {self.dataset} "
                              f"test set holds ({n_test}); choose at most {n_test}")


register_experiment(IcsConfig, module=_RUNNERS + "ics", section=_SECTIONS + "ics",
                    summary="Ioffe & Szegedy's Figure 1: accuracy and sigmoid-input "
                            "percentiles over training")


@dataclass(frozen=True)
class RegularizationConfig(ModelConfig, name="regularization",
                           full={"seeds": 10, "epochs": 100}):
    dataset: str = shared("dataset", "fashion-mnist")
    seeds: int = shared("seeds", 2)
    n_train: int | None = shared("n_train", 1000)
    epochs: int = shared("epochs", 30)
    batch_size: int = shared("batch_size", 64)
    lr: float = shared("lr", 0.05)
    activation: str = shared("activation", "relu")
    init_scale: float = shared("init_scale", 0.1)
    norms: tuple[str, ...] = shared("norms", ("none", "bn", "ghost-2", "ghost-4", "ghost-8",
                                              "ghost-16", "ghost-32", "full-batch", "population"))
    workers: int = shared("workers")
    scheduler: str | None = shared("scheduler")
    tensorboard: str | None = shared("tensorboard")


register_experiment(RegularizationConfig, module=_RUNNERS + "compare",
                    section=_SECTIONS + "regularization",
                    summary="generalization gap of plain, BN, ghost BN and noise-free BN")


@dataclass(frozen=True)
class InitSweepConfig(TrainConfig, name="init-sweep", full={"seeds": 10}):
    dataset: str = shared("dataset", "fashion-mnist")
    seeds: int = shared("seeds", 1)
    n_train: int | None = shared("n_train", 1000)
    depth: int = shared("depth", 5)
    activation: str = shared("activation", "relu")
    lr: float = shared("lr", 0.01)
    batch_size: int = shared("batch_size", 100)
    epochs: int = shared("epochs", 20)
    scales: tuple[float, ...] = option(tuple(map(float, np.logspace(0, -4, 16))), "initial weight standard "
                                       "deviations, comma-separated", items(number(0, 1e6)))
    learned_threshold: float = option(0.5, "final training accuracy that counts as learning",
                                      number(0, 1))
    workers: int = shared("workers")
    scheduler: str | None = shared("scheduler")
    tensorboard: str | None = shared("tensorboard")
    nproc: int = shared("nproc")


register_experiment(InitSweepConfig, module=_RUNNERS + "compare", section=_SECTIONS + "sweeps",
                    summary="BN vs plain across 16 initial weight scales "
                            "(Deep Learning from Scratch 6.3)")


@dataclass(frozen=True)
class LrSweepConfig(ModelConfig, name="lr-sweep", full={"seeds": 10, "epochs": 50}):
    seeds: int = shared("seeds", 2)
    epochs: int = shared("epochs", 30)
    lrs: tuple[float, ...] = option(tuple(map(float, np.logspace(-2, 1, 7))), "learning rates, comma-separated, "
                                    "spanning at least 100x", items(number(0, 1e6), min_len=2))
    threshold: float = option(0.9, "test accuracy for steps-to-threshold", number(0, 1))
    workers: int = shared("workers")
    scheduler: str | None = shared("scheduler")
    tensorboard: str | None = shared("tensorboard")
    nproc: int = shared("nproc")

    def check(self) -> None:
        super().check()
        self.require(max(self.lrs) >= 100 * min(self.lrs), "lrs",
                     "a range spanning at least two orders of magnitude")


register_experiment(LrSweepConfig, module=_RUNNERS + "compare", section=_SECTIONS + "sweeps",
                    summary="BN vs plain across learning rates spanning three orders of magnitude")


@dataclass(frozen=True)
class SmoothnessConfig(ModelConfig, name="smoothness",
                       full={"seeds": 10, "steps": 5000, "eval_every": 250}):
    seeds: int = shared("seeds", 2)
    norms: tuple[str, ...] = shared("norms", ("none", "bn", "noisy"))
    steps: int = shared("steps", 1000)
    eval_every: int = shared("eval_every", 100)
    step_sizes: tuple[float, ...] = option((0.25, 0.5, 1.0, 2.0, 4.0), "step sizes along -g, "
                                           "as multiples of --lr", items(number(0, 1e6), min_len=2))
    tensorboard: str | None = shared("tensorboard")

    def check(self) -> None:
        super().check()
        self.require(self.eval_every <= self.steps, "eval_every",
                     f"at most {setting('steps', self.steps)}")


register_experiment(SmoothnessConfig, module=_RUNNERS + "smoothness",
                    section=_SECTIONS + "smoothness",
                    summary="loss and gradient along the gradient direction (Santurkar et al. 2018)")


BATCH_ARMS = ("bn", "ghost", "renorm", "gn", "ln")


@dataclass(frozen=True)
class BatchSizeConfig(Config, name="batch-size",
                      full={"seeds": 5, "epochs": 3, "n_train": 10000}):
    """Every arm at every batch size B trains ``epochs`` epochs on the first ``n_train``
    training examples (an epoch: the whole steps that fit), with the learning rate
    ``lr * B / max(batch_sizes)``; ``ghost`` takes steps of max(batch_sizes) examples with
    BN statistics over virtual batches of B (the normalization batch alone made small). The
    network is :data:`CNN`, six norm layers deep. Records written before ``epochs``, which
    trained every arm on ``samples`` examples with build_cnn's two-stage default, load as
    :class:`SamplesBatchSizeConfig`."""

    # build_cnn's settings: 3 x (2 x (Conv 3x3 -> norm -> ReLU) -> MaxPool 2) for 28x28 images
    CNN: ClassVar[dict[str, Any]] = {"channels": (8, 8, 16, 16, 32, 32), "pool_every": 2}

    dataset: str = shared("dataset", "fashion-mnist")
    seeds: int = shared("seeds", 2)
    n_train: int | None = shared("n_train", 1000)
    arms: tuple[str, ...] = option(BATCH_ARMS, "norms compared, comma-separated",
                                   items(one_of(*BATCH_ARMS)))
    batch_sizes: tuple[int, ...] = option((2, 4, 8, 16, 32, 64), "per-step batch sizes B, "
                                          "comma-separated", items(integer(2, 10**6)))
    epochs: int = option(1, "training epochs per run at every batch size B (each the whole "
                            "steps of B that fit; of max B for ghost)", integer(1, 10**6))
    lr: float = option(0.05, "SGD learning rate at the largest batch size (scaled linearly "
                             "with B)", number(0, 1e6))
    momentum: float = shared("momentum", 0.9)
    precise_samples: int = option(4096, "training examples whose statistics update_bn_stats "
                                        "gathers for the 'precise' evaluation",
                                  integer(2, 10**8))
    workers: int = shared("workers")
    scheduler: str | None = shared("scheduler")
    tensorboard: str | None = shared("tensorboard")

    def check(self) -> None:
        super().check()
        big = max(self.batch_sizes)
        self.require(self.precise_samples >= big, "precise_samples",
                     f"at least the largest batch size {big}")
        if "ghost" in self.arms:
            self.require(all(big % b == 0 for b in self.batch_sizes), "batch_sizes",
                         f"sizes that divide the largest, {big}, for the ghost arm's virtual "
                         f"batches")

    def check_data(self, n_train: int, n_test: int, n_features: int, n_classes: int) -> None:
        n = self.examples_used(n_train)
        if max(self.batch_sizes) > n:
            raise ConfigError(f"{flag('batch_sizes')} holds {max(self.batch_sizes)}, more than the "
                              f"training set ({n} examples)")
        side, least = math.isqrt(n_features), 2 ** (len(self.CNN["channels"])
                                                     // self.CNN["pool_every"])
        if side * side != n_features or side < least:
            raise ConfigError(f"the CNN needs square images of side {least} or more; "
                              f"{self.dataset} has {n_features} features")

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> Config:
        """A config from a stored dict; a record that counts ``samples`` instead of
        ``epochs`` is one of :class:`SamplesBatchSizeConfig`."""
        if isinstance(d, dict) and "samples" in d and "epochs" not in d:
            return SamplesBatchSizeConfig.from_dict(d, source)
        return super().from_dict(d, source)


@dataclass(frozen=True)
class SamplesBatchSizeConfig(BatchSizeConfig, name="batch-size"):
    """A ``batch-size`` record written before ``epochs``: every arm saw ``samples`` training
    examples, on build_cnn's default two-stage CNN. It loads, with its digest, for the report;
    it cannot be continued (:meth:`check_data` says so), and has no documented full setting
    now (its ``--full`` was seeds=5, samples=20000)."""

    epochs: int | None = option(None, "unset: these runs were counted in samples",
                                optional(integer(1, 10**6)))
    samples: int = option(4096, "training examples seen per run at every batch size B "
                          "(rounded down to whole steps)", integer(1, 10**9))

    def check(self) -> None:
        super().check()
        self.require(self.epochs is None, "epochs", "unset in a record counted in samples")
        big = max(self.batch_sizes)
        self.require(self.samples >= big, "samples", f"at least the largest batch size {big}")

    def check_data(self, n_train: int, n_test: int, n_features: int, n_classes: int) -> None:
        raise ConfigError("this batch-size record trained every arm on a number of examples "
                          f"(samples: {self.samples}), as bnlab did before --epochs, with "
                          "a two-stage CNN; bnlab reports it (bnlab report RUN_DIR) but no "
                          "longer trains it: start a new run")

    def to_dict(self) -> dict[str, Any]:
        """The fields as such a record stores them: ``samples``, no ``epochs``."""
        return {k: v for k, v in super().to_dict().items() if k != "epochs"}

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> Config:
        return super().from_dict({"epochs": None, **d} if isinstance(d, dict) else d, source)


register_experiment(BatchSizeConfig, module=_RUNNERS + "batch_size",
                    section=_SECTIONS + "batch_size",
                    summary="a small CNN at batch sizes 2..64: BN, ghost BN, Batch Renorm, "
                            "GroupNorm, LayerNorm (the Group Norm paper's Figure 1)")
