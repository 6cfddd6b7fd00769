"""bnlab.lab: datasets, models, training and experiments behind the ``bnlab`` command.

Uses :mod:`bnlab.nn` for the layers; hands finished run directories to :mod:`bnlab.report`.
Norms (:mod:`bnlab.lab.norms`) and experiments (:mod:`bnlab.lab.experiment_configs`) are
registry entries, so a user's own is one :func:`register_norm` or :func:`register_experiment`
call. The configs and both registries import neither torch nor matplotlib;
:func:`bnlab.lab.runner.run_experiment` runs one experiment.
"""

from .fields import Config, ConfigError, TrainConfig
from .norms import Norm, norm, register_norm
from .experiment_configs import (EXPERIMENTS, CompareConfig, Experiment, experiment,
                                 register_experiment)

__all__ = ["EXPERIMENTS", "CompareConfig", "Config", "ConfigError", "Experiment", "Norm",
           "TrainConfig", "experiment", "norm", "register_experiment", "register_norm"]
