"""Running an experiment: one protocol for all of them.

An experiment is a config class (:mod:`bnlab.lab.experiment_configs`) and a module in :mod:`bnlab.lab.experiments` with
``run(ctx: Context)``, which trains its units through :meth:`Context.train` (one
:func:`~bnlab.lab.train.fit` loop) or measures them itself, writing rows through
``ctx.record``. :func:`run_experiment` does everything around that: validation against the
data before anything is created, the run directory, its lock, provenance, threads, the
device (:mod:`bnlab.lab.device`) and resuming.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

import bnlab.nn as bnn
from .fields import SESSION_FIELDS, Config, ConfigError, flag, setting
from .experiment_configs import EXPERIMENTS, experiment
from .data import Dataset, load_dataset
from .device import check_memory, exact_float32, memory_bytes, resolve, stack_limit
from .distributed import DataParallel, check_data_parallel
from .rundir import (Record, RunDirLock, Unit, check_new_run_dir, clear_leftovers,
                     last_settings, read_config, refuse_links, session, start_run)
from .engine import StackedNets
from .norms import STACKABLE, norm as norm_entry
from .stack import Stack
from .stack import engine as stack_engine
from .stack import prepare as prepare_stacks
from .model_registry import DEFAULT_MODEL
from .model_registry import model as registered_model
from .models import build_mlp, step_statistics
from .train import EvalResult, Measure, Network, Progress, evaluate, fit, label, per_network
from .workers import cores, run_jobs

log = logging.getLogger(__name__)

__all__ = ["Context", "build_network", "check_model", "run_experiment"]


def stack_size(features: int, classes: int, width: int, depth: int,
               device: torch.device | None = None, rows: int = 0) -> int:
    """Networks per stack on ``device`` (default the CPU): at most its
    :func:`~bnlab.lab.device.stack_limit` (32 on the CPU, 1024 on a GPU), and as many as fit
    in an eighth of its memory: each network's weights, gradients and momentum, and the
    larger of the evaluation's (2048, width) activations and those a training step keeps
    for its backward of the ``rows`` it sends through the network (its batch, or the whole
    training set for full-batch and population BN), some four per layer."""
    device = torch.device("cpu") if device is None else device
    params = features * width + (depth - 1) * width ** 2 + width * classes
    each = 16 * params + 4 * width * max(2048 * 3, rows * (4 * depth + 2))
    return max(1, min(stack_limit(device), int(memory_bytes(device) / 8 // each)))


# Networks of one's own draw their first weights from torch's global generator, which
# networks built side by side (--workers) would share: one is built at a time.
_BUILDING = threading.Lock()


class Context:
    """What an experiment's ``run`` works with: its config, data, record and progress.

    A config's ``model`` (:class:`~bnlab.lab.experiment_configs.ModelConfig`), when not the
    built-in ``mlp``, is built by its registered builder and trained one network at a time
    with autograd; the built-in MLP of a stackable norm trains in stacks.

    Everything trains on ``device`` (default the CPU): the data tensors ``x``, ``y``,
    ``test_x`` and ``test_y`` are moved there once, here, and every network once built (on
    the CPU, from its seed: :meth:`model`, :meth:`train`'s ``build``). An experiment that
    makes tensors of its own makes them on ``ctx.device``."""

    def __init__(self, config: Config, data: Dataset, record: Record | None, progress: Progress,
                 dp: DataParallel | None = None, device: torch.device | None = None) -> None:
        self.config, self.data, self.record, self.progress = config, data, record, progress
        self.dp = dp  # data-parallel over processes (rank 0 has the record)
        self.device = torch.device("cpu") if device is None else device
        self.custom = getattr(config, "model", DEFAULT_MODEL) != DEFAULT_MODEL  # one's own
        self.x, self.y = (torch.from_numpy(a).to(self.device) for a in (data.train_x, data.train_y))
        self.test_x, self.test_y = (torch.from_numpy(a).to(self.device)
                                    for a in (data.test_x, data.test_y))
        self.per_epoch = len(self.x) // getattr(config, "batch_size", 1)  # steps
        self.cluster: Any = None  # a Dask cluster the jobs run on (bnlab.lab.cluster)
        self.only: list[str] | None = None  # on a cluster's worker: the units of its one job

    def units(self, steps_each: int, key: str | None = None, values: tuple = (None,)) -> list[Unit]:
        """The units seed by seed and, within a seed, norm by norm (for each value of a swept
        field ``key``), so an interrupted run already holds matched pairs; work planned."""
        c = self.config
        units = [self.record.unit(**({key: v} if key else {}), norm=norm, seed=seed)
                 for v in values for seed in range(c.seeds) for norm in c.norms]
        self.progress.total += len(units) * steps_each
        self.progress.labels.update((u.key, label(u.fields)) for u in units)
        return units

    def model(self, norm: str, seed: int, **overrides: Any) -> nn.Module:
        """The network of ``norm`` and ``seed``, every seed of Python, NumPy and torch set to
        ``seed`` first: the config's ``model`` (see :func:`build_network`), or the built-in
        MLP of the config's shape (``overrides`` replace its depth, width, activation or
        init_scale); built on the CPU, then moved to the context's device."""
        c = self.config
        if self.custom:
            return build_network(c.model, norm, seed, self.data.num_features,
                                 len(self.data.classes)).to(self.device)
        hp = {k: getattr(c, k) for k in ("depth", "width", "activation", "init_scale")} | overrides
        seed_all(seed)
        return build_mlp(self.data.num_features, len(self.data.classes), norm=norm, seed=seed,
                         **hp).to(self.device)

    def recipe(self, unit: Unit, **overrides: Any) -> dict[str, Any]:
        """How the unit's network trains, in one place: its ``norm`` and ``seed`` (from its
        fields unless given), ``lr``, ``init_scale`` and ``batch_size`` (the config's unless
        given) and ``momentum``."""
        c = self.config
        out = {"norm": overrides.pop("norm", None) or unit.fields["norm"],
               "seed": unit.fields["seed"], "momentum": c.momentum}
        for k in ("lr", "init_scale", "batch_size"):
            out[k] = overrides.pop(k, getattr(c, k, None))
        if overrides:
            raise TypeError(f"unknown training settings: {', '.join(overrides)}")
        return out

    def train(self, unit: Unit, *, steps: int, eval_every: int,
              measure: Callable[[nn.Module, int, float, Tensor], Any] = lambda *_: None,
              before: Callable[[nn.Module], None] | None = None,
              build: Callable[[str, int], nn.Module] | None = None, per_epoch: bool = False,
              at_start: bool = False, finish: bool = True, cost: float = 1.0,
              **settings: Any) -> nn.Module | None:
        """Build the unit's network (see :meth:`recipe`, whose ``settings`` override the
        config's; ``build(norm, seed)`` instead of the config's MLP, built on the CPU and
        moved to the context's device), call ``before(model)``,
        and :func:`~bnlab.lab.train.fit` it alone with ``measure(model, step, sgd_loss,
        next_batch)`` (see fit for the rest); a unit finished earlier is skipped (returns
        None)."""
        return self._train_one(unit, steps=steps, eval_every=eval_every,
                               measure=per_network(measure), before=before, build=build,
                               per_epoch=per_epoch, at_start=at_start, finish=finish, cost=cost,
                               **settings)

    def _train_one(self, unit: Unit, *, steps: int, eval_every: int, measure: Measure,
                   before: Callable[[nn.Module], None] | None = None,
                   build: Callable[[str, int], nn.Module] | None = None,
                   per_epoch: bool = False, at_start: bool = False, finish: bool = True,
                   cost: float = 1.0, **settings: Any) -> nn.Module | None:
        """:meth:`train` with a measure of the engine (see :func:`~bnlab.lab.train.fit`)."""
        if unit.done:
            self.progress.advance(steps, cost)
            return None
        r = self.recipe(unit, **settings)
        if build is None:
            model = self.model(r["norm"], r["seed"], init_scale=r["init_scale"])
        else:
            seed_all(r["seed"])
            model = build(r["norm"], r["seed"]).to(self.device)
        if before is not None:
            before(model)
        self.progress.note = unit.key
        if self.dp is not None:  # the other ranks train the same network (see follow)
            assert build is None, "data-parallel runs train the config's MLP only"
            self.dp.share({**r, "steps": steps, "eval_every": eval_every, "per_epoch": per_epoch,
                           "at_start": at_start, "finish": finish, "cost": cost})
            model = self._synced(model)
        self._fit([unit], [model], [r], steps=steps, eval_every=eval_every, measure=measure,
                  per_epoch=per_epoch, at_start=at_start, finish=finish, cost=cost)
        return model

    def _fit(self, units: list[Unit | None], models: list[nn.Module], recipes: list[dict],
             stacked: bool = False, **options: Any) -> None:
        """:func:`~bnlab.lab.train.fit` the networks (of one recipe but for seed and lr), in
        a Stack when ``stacked``, else the one network with autograd."""
        r = recipes[0]
        if stacked and r["norm"] in Stack.NORMS:  # its written-out step: the fastest
            engine = stack_engine(self.config.activation)
        elif stacked:
            engine = functools.partial(StackedNets, statistics=step_statistics(r["norm"]))
        else:
            engine = functools.partial(Network, statistics=step_statistics(r["norm"]),
                                       dp=self.dp)
        fit(units, models, self.x, self.y, engine=engine, seeds=[q["seed"] for q in recipes],
            lrs=[q["lr"] for q in recipes], momentum=r["momentum"], batch_size=r["batch_size"],
            progress=self.progress, dp=self.dp, **options)

    @staticmethod
    def _synced(model: nn.Module) -> nn.Module:
        return bnn.SyncBatchNorm.convert_sync_batchnorm(model)

    def follow(self) -> None:
        """A rank other than 0: train each network rank 0 announces, on this rank's share of
        every batch, until it announces the end."""
        while (job := self.dp.share()) is not None:
            r = {k: job.pop(k) for k in ("norm", "seed", "momentum", "lr", "init_scale",
                                         "batch_size")}
            model = self._synced(self.model(r["norm"], r["seed"], init_scale=r["init_scale"]))
            self._fit([None], [model], [r], measure=None, **job)

    def train_epochs(self, unit: Unit, epochs: int, **settings: Any) -> nn.Module | None:
        """:meth:`train` with train and test loss and accuracy after every epoch."""
        return self.train(unit, steps=epochs * self.per_epoch, eval_every=self.per_epoch,
                          measure=self._epoch_row, per_epoch=True, **settings)

    def _epoch_row(self, model: nn.Module, _step: int, sgd_loss: float, _next: Tensor) -> dict:
        return _row(sgd_loss, evaluate(model, self.x, self.y),
                    evaluate(model, self.test_x, self.test_y))

    def _epoch_rows(self, engine: Any, _step: int, losses: list[float], _nexts: list) -> list:
        """:meth:`_epoch_row` for every network of an engine, evaluated together."""
        return list(map(_row, losses, engine.evaluate(self.x, self.y),
                        engine.evaluate(self.test_x, self.test_y)))

    def train_all_epochs(self, units: list[Unit], epochs: int, key: str | None = None) -> None:
        """:meth:`train_epochs` for every unit: :meth:`train_all` with the epoch rows."""
        self.train_all(units, steps=epochs * self.per_epoch, eval_every=self.per_epoch,
                       measure=self._epoch_rows, key=key, per_epoch=True)

    def train_all(self, units: list[Unit], *, steps: int, eval_every: int, measure: Measure,
                  key: str | None = None, per_epoch: bool = False) -> None:
        """Train every unit (``key``: a swept field the units name, which overrides the
        config's) through :func:`~bnlab.lab.train.fit` with ``measure(engine, step,
        sgd_losses, next_batches)``. Networks of a norm in
        :data:`~bnlab.lab.norms.STACKABLE` train together in stacks (none and bn in a
        :class:`~bnlab.lab.stack.Stack`, the others, full-batch and population BN included,
        in a :class:`~bnlab.lab.engine.StackedNets`), other units one by one; these jobs run
        through :meth:`run_jobs` (on threads side by side, or on a Dask cluster)."""
        options = {"steps": steps, "eval_every": eval_every, "per_epoch": per_epoch}

        def recipe(unit: Unit) -> dict:
            return self.recipe(unit, **({key: unit.fields[key]} if key else {}))

        if self.dp is not None:  # one network at a time, over all processes
            for unit in units:
                self._train_one(unit, measure=measure, **options,
                                **({key: unit.fields[key]} if key else {}))
            return

        def run(job: list[Unit]) -> None:
            stacked = self.stackable(job[0].fields["norm"])
            recipes = [recipe(u) for u in job]
            models = [self.model(r["norm"], r["seed"], init_scale=r["init_scale"])
                      for r in recipes]
            first = label(job[0].fields)
            self.progress.note = f"{first} and {len(job) - 1} more" if len(job) > 1 else first
            self._fit(job, models, recipes, stacked=stacked, measure=measure, **options)

        self.run_jobs(self._jobs(units), run)

    def run_jobs(self, jobs: list[list[Unit]], run: Callable[[list[Unit]], None]) -> None:
        """``run(job)`` for every job (a list of units trained together): on ``workers``
        threads side by side (:mod:`bnlab.lab.workers`), or as tasks on the run's Dask
        cluster (:mod:`bnlab.lab.cluster`). On a worker of that cluster, only the job of the
        units it was given, after which the experiment goes no further."""
        if self.only is not None:
            from .cluster import JobDone

            units = {u.key: u for job in jobs for u in job}
            run([units[key] for key in self.only])
            raise JobDone
        if self.cluster is not None:
            self.cluster.run_jobs(self, jobs, run)
        else:
            run_jobs(jobs, run, self.workers(), self.progress)

    def workers(self) -> int:
        """Threads training side by side: --workers, or by default one per core divided by
        --threads on the CPU, and one on a GPU (its stacks hold hundreds of networks, and
        one thread keeps it busy)."""
        if self.device.type != "cpu":
            return getattr(self.config, "workers", 1) or 1
        return getattr(self.config, "workers", 1) or max(1, cores() // self.config.threads)

    def stackable(self, norm: str) -> bool:
        """Whether networks of ``norm`` train in stacks: the built-in MLP's of a norm in
        :data:`~bnlab.lab.norms.STACKABLE` (the stacks know no other network)."""
        return not self.custom and norm in STACKABLE

    def _jobs(self, units: list[Unit]) -> list[list[Unit]]:
        """Stacks of at most :func:`stack_size` networks per stackable norm, then the other
        units one by one."""
        c, jobs = self.config, []
        for norm in dict.fromkeys(u.fields["norm"] for u in units):
            group = [u for u in units if u.fields["norm"] == norm]
            if self.stackable(norm):
                whole = norm_entry(norm).statistics != "batch"  # the training set each step
                size = stack_size(self.data.num_features, len(self.data.classes), c.width,
                                  c.depth, self.device, len(self.x) if whole else c.batch_size)
                jobs += [group[lo:lo + size] for lo in range(0, len(group), size)]
        return jobs + [[u] for u in units if not self.stackable(u.fields["norm"])]


def seed_all(seed: int) -> None:
    """One seed drives Python's random, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_network(model: str, norm: str, seed: int, in_features: int, classes: int) -> nn.Module:
    """The registered ``model``'s network for ``norm`` and ``seed`` (for ``in_features``
    inputs and ``classes`` classes), every seed set to ``seed`` first, as for the built-in
    MLP: its default initializations repeat, and match across norms where its builder
    creates the same layers in the same order."""
    entry = registered_model(model)
    with _BUILDING:
        seed_all(seed)
        return entry.network(norm, seed, in_features=in_features, classes=classes)


def check_model(config: Config, data: Dataset) -> None:
    """Before a run of a network of one's own starts: its builder imports, builds a network
    for every norm of the config, and each maps two training examples to one logit per
    class (in eval mode); ConfigError saying which model, norm and what went wrong."""
    name = getattr(config, "model", DEFAULT_MODEL)
    if name == DEFAULT_MODEL:
        _check_own_norms(config)
        return
    x = torch.from_numpy(data.train_x[:2])  # (2, features)
    classes = len(data.classes)
    for norm in config.norms:
        try:
            net = build_network(name, norm, 0, data.num_features, classes)
            with torch.no_grad():
                shape = tuple(net.eval()(x).shape)
        except Exception as exc:  # noqa: BLE001  the user's code: any error is theirs
            raise ConfigError(f"the model {name} fails for the norm {norm} on {config.dataset} "
                              f"({data.num_features} features, {classes} classes): "
                              f"{type(exc).__name__}: {exc}") from exc
        if shape != (2, classes):
            raise ConfigError(f"the model {name}'s network for the norm {norm} maps 2 "
                              f"{config.dataset} examples of {data.num_features} features to "
                              f"shape {shape}; expected (2, {classes}), a logit per class")


def _check_own_norms(config: Config) -> None:
    """Before a run of bnlab's fully connected network starts: the layer of each norm of
    one's own (registered outside bnlab) builds, is a torch.nn.Module or None, and keeps
    the shape of a batch in training and in eval mode; ConfigError naming the norm and what
    went wrong, before anything is written."""
    width = getattr(config, "width", None)
    for name in getattr(config, "norms", ()):
        entry = norm_entry(name)
        build = entry.build
        if width is None or (isinstance(build, str) and build.startswith("bnlab.")):
            continue
        try:
            layer = entry.layer(width, 0, dims=1)
            if layer is not None and not isinstance(layer, nn.Module):
                raise TypeError(f"its builder returned {type(layer).__name__}, not a "
                                "torch.nn.Module (or None, for no layer)")
            x = torch.linspace(-1.0, 1.0, 4 * width).reshape(4, width)
            for training in ((True, False) if layer is not None else ()):
                with torch.no_grad():
                    shape = tuple(layer.train(training)(x).shape)
                if shape != (4, width):
                    raise ValueError(f"its layer maps a batch of shape (4, {width}) to {shape} "
                                     f"in {'training' if training else 'eval'} mode; a norm "
                                     "keeps the shape")
        except Exception as exc:  # noqa: BLE001  the user's code: any error is theirs
            raise ConfigError(f"the norm {name} fails in {config.name}'s network (width "
                              f"{width}): {type(exc).__name__}: {exc}") from exc


def _row(sgd_loss: float, train: EvalResult, test: EvalResult) -> dict:
    """An epoch's row: the training-mode loss since the last one, and the evaluation."""
    return {"sgd_loss": sgd_loss, "train_loss": train.loss, "train_acc": train.accuracy,
            "test_loss": test.loss, "test_acc": test.accuracy}


def load_data(config: Config) -> Dataset:
    """The config's dataset, cut to ``n_train`` examples, checked against the config."""
    data = load_dataset(config.dataset, config.data_dir)
    config.check_data(len(data.train_y), len(data.test_y), data.num_features, len(data.classes))
    n = getattr(config, "n_train", None)
    if n is not None:  # the first n (the loaders' order is fixed)
        data = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])
    return data


def run_experiment(config: Config | None, run_dir: str | Path, resume: bool = False,
                   progress: Progress | None = None, dp: DataParallel | None = None,
                   **overrides: Any) -> Config:
    """Run ``config`` into a new ``run_dir``, or with ``resume`` continue the run stored
    there (``overrides`` may set fields that cannot change the numbers, such as data_dir, for
    this session); returns the config used. Everything that can be checked, the data
    included, is checked before anything is created; a ``device`` that is not here first of
    all (:class:`~bnlab.lab.fields.DeviceError`).

    With ``dp`` (data-parallel processes), rank 0 does all of this and the other ranks only
    train with it (they never read or write ``run_dir``)."""
    if dp is not None and not dp.lead:
        return _follow(dp, progress or Progress(), overrides)
    run_dir = Path(run_dir)
    if resume:
        refuse_links(run_dir)
    config = _stored(run_dir, overrides) if resume else config
    device = resolve(config.device)
    runner = experiment(config.name).runner()
    cluster = None
    if getattr(config, "scheduler", None) is not None:  # its workers start as the data loads
        from .cluster import connect

        if not resume:  # a folder that is not this run's is refused before that
            check_new_run_dir(run_dir, config)
        cluster = connect(config.scheduler, wait=False)
    elif getattr(runner, "STACKS", False) and dp is None and device.type == "cpu" \
            and getattr(config, "model", DEFAULT_MODEL) == DEFAULT_MODEL:
        prepare_stacks(getattr(config, "norms", ()))  # CPU kernels
    try:
        return _run(config, run_dir, resume, runner, cluster, progress, dp, overrides, device)
    finally:
        if cluster is not None:
            cluster.close()


def _run(config: Config, run_dir: Path, resume: bool, runner: Any, cluster: Any,
         progress: Progress | None, dp: DataParallel | None, overrides: dict[str, Any],
         device: torch.device) -> Config:
    """:func:`run_experiment` once its cluster, if any, is started."""
    data = load_data(config)
    check_model(config, data)
    check_memory(config, data.num_features, len(data.classes), device)
    if not resume:
        check_new_run_dir(run_dir, config)
    scalars = _scalar_log(config, run_dir, resume)  # checked, tensorboardX imported: first
    created = not run_dir.exists()
    try:
        if cluster is not None:  # its workers, checked before anything is made
            cluster.check_workers()
        run_dir.mkdir(parents=True, exist_ok=True)
        with RunDirLock(run_dir):
            if resume:
                config = _stored(run_dir, overrides)  # as it is now, under the lock
            else:
                start_run(run_dir, config)  # checked again, under the lock
            record, previous = Record(run_dir, config), torch.get_num_threads()
            if scalars is not None:
                record.listeners.append(scalars.add)
            clear_leftovers(run_dir)
            torch.set_num_threads(config.threads)
            try:
                settings = {k: getattr(config, k) for k in SESSION_FIELDS if hasattr(config, k)}
                for key in ("data_dir", "tensorboard"):  # a resume may start elsewhere
                    if settings.get(key) is not None:
                        settings[key] = os.path.abspath(settings[key])
                if dp is not None:
                    settings["nproc"] = dp.world
                with session(run_dir, config.threads, settings, device) as record.session, \
                        exact_float32(device):
                    if dp is not None:
                        check_data_parallel(type(config), config, {}, dp.world)
                        dp.share({"experiment": config.name, **config.to_dict()})
                    ctx = Context(config, data, record, progress or Progress(), dp, device)
                    ctx.cluster = cluster
                    runner.run(ctx)
                    if dp is not None:
                        dp.share(None)  # the end, for the other ranks
                    record.put_in_order()
            finally:
                torch.set_num_threads(previous)
    except BaseException:
        if created and run_dir.is_dir() and not (run_dir / "config.json").exists():
            try:  # nothing to resume: leave nothing (the lock removed its own file)
                run_dir.rmdir()
            except OSError:  # another process is starting a run in it: leave it to that one
                pass
        raise
    finally:
        if scalars is not None:
            scalars.close()
    log.info("run complete: %s", run_dir)
    return config


def _scalar_log(config: Config, run_dir: Path, resume: bool) -> Any:
    """The TensorBoard log the run writes while it trains (``tensorboard``), or None. A
    resumed run adds to the folder its last session logged to; any other folder must be new
    or empty (another run's lines are never continued)."""
    if getattr(config, "tensorboard", None) is None:
        return None
    from .tblog import ScalarLog

    last = last_settings(run_dir).get("tensorboard") if resume else None
    same = last is not None and os.path.abspath(last) == os.path.abspath(config.tensorboard)
    if last is not None and not same:  # the points would be split between two folders
        raise ConfigError(f"{run_dir} logs to TensorBoard in {last}; continue it there "
                          f"({setting('tensorboard', last)}, or leave {flag('tensorboard')} "
                          "out: a resume keeps it)")
    return ScalarLog(config.tensorboard, append=same)


def _follow(dp: DataParallel, progress: Progress, overrides: dict[str, Any]) -> Config:
    """A rank other than 0: rank 0's config (with this process's session fields, such as
    where its data lies), then training with it until it ends."""
    stored = dp.share()
    config = EXPERIMENTS[stored.pop("experiment")].from_dict(stored)
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    data = load_data(config)
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        Context(config, data, None, progress, dp).follow()
    finally:
        torch.set_num_threads(previous)
    return config


def _stored(run_dir: Path, overrides: dict[str, Any]) -> Config:
    """The stored config with ``overrides``; one that changes the numbers is refused by the
    record's digest check."""
    return dataclasses.replace(read_config(run_dir), **overrides)
