"""bnlab.lab: run Batch Normalization experiments from Python, and read their results.

Run an experiment, and look at what it measured::

    import bnlab.lab
    r = bnlab.lab.run("compare", epochs=20, seeds=3)   # trains, then writes its report
    r.metrics                                           # a pandas DataFrame

:func:`run` takes the experiment's config fields as keywords (the ``bnlab run NAME``
options, spelled as Python names: ``n_train=500``, ``norms=("none", "bn", "ghost-8")``);
the experiments are listed by :func:`experiments` and ``bnlab run --help``. It runs into
``out=`` (default: a new ``runs/NAME-DATASET-TIMESTAMP``), shows progress under the cell in
a notebook (``progress=False`` for none), and an interrupted run continues with the same
call and the ``out=`` its message names. ``device="cuda"`` trains on a GPU (docs/lab.md,
"On a GPU"), where torch sees one (:class:`DeviceError` otherwise), and
:func:`compare_runs` says how closely two runs of one configuration agree, one on the CPU
and one on a GPU say. Open a run made earlier, from Python or the command line, finished or
interrupted (nothing is written into it)::

    r = bnlab.lab.load("runs/compare-digits-20250101-120000")

Both return a :class:`Result`:

* ``r.metrics``: a row per network and evaluation (``unit``, ``norm``, ``seed``, ``step``,
  ``epoch``, the measurements, and ``finished``);
* ``r.summary``: the summary's numbers as tables by name, e.g. ``r.summary["variants"]``
  (intervals over seeds as ``mean``, ``low``, ``high``, ``n``), ``r.summary["curves"]``;
  ``r.summary_dict``: the summary itself, as ``summary.json`` holds it;
* ``r.figures``: the report's figures, as matplotlib Figures by name;
* ``r.verdict``: the measured statements, the verdict on the literature's claim among them;
* ``r.config``, ``r.name``, ``r.run_dir``, ``r.report_path``; in a notebook ``r`` shows its
  report.

Your own variants, networks and experiments are registry entries: :func:`register_norm` adds
a normalization layer by name, which every experiment's ``norms`` then accepts;
:func:`register_model` a network that ``compare``, ``regularization``, ``lr-sweep`` and
``smoothness`` train as ``model=NAME`` (:func:`norm_layer` builds a registered norm's layer
inside it); :func:`register_experiment` an experiment (a config
class, the module that runs it and the report section that reads it) for :func:`run`, the
``bnlab`` command and the report. docs/extending.md shows one of each.

Inside: the configs (:mod:`bnlab.lab.fields`, :mod:`bnlab.lab.experiment_configs`) and the
registries (:mod:`bnlab.lab.norms`, :mod:`bnlab.lab.model_registry`) import neither torch
nor matplotlib, and importing this package imports neither them nor pandas (:func:`run`,
:func:`load` and :class:`Result` load on first use);
:func:`bnlab.lab.runner.run_experiment` runs one experiment on the one training loop of
:mod:`bnlab.lab.train`, into a run directory (:mod:`bnlab.lab.rundir`) that the report
(:mod:`bnlab.report`) reads. The lab uses :mod:`bnlab.nn` for the layers.
"""

from __future__ import annotations

import importlib
from typing import Any

from .fields import Config, ConfigError, DeviceError, TrainConfig
from .norms import NORMS, Norm, norm, register_norm, unregister_norm
from .model_registry import MODELS, Model, model, norm_layer, register_model, unregister_model
from .experiment_configs import (EXPERIMENTS, CompareConfig, Experiment, ModelConfig,
                                 experiment, experiments, register_experiment,
                                 unregister_experiment)

__all__ = ["EXPERIMENTS", "MODELS", "NORMS", "Agreement", "CompareConfig", "Config",
           "ConfigError", "DeviceError", "Experiment", "Model", "ModelConfig", "Norm", "Result",
           "TrainConfig", "compare_runs", "experiment", "experiments", "load", "model", "norm",
           "norm_layer", "register_experiment", "register_model", "register_norm", "run",
           "unregister_experiment", "unregister_model", "unregister_norm"]

_LAZY = {"Result": "results", "load": "results", "run": "results",  # they import pandas
         "Agreement": "agreement", "compare_runs": "agreement"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
