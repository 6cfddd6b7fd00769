"""bnlab.lab: datasets, models, training and experiments behind the ``bnlab`` command.

Uses :mod:`bnlab.nn` for the layers; hands finished run directories to :mod:`bnlab.report`.
The configs import neither torch nor matplotlib; :func:`bnlab.lab.runner.run_experiment`
runs one.
"""

from .fields import Config, ConfigError, TrainConfig
from .experiment_configs import EXPERIMENTS, CompareConfig

__all__ = ["EXPERIMENTS", "CompareConfig", "Config", "ConfigError", "TrainConfig"]
