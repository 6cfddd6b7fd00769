"""bnlab.lab: datasets, models, training and experiments behind the ``bnlab`` command.

Uses :mod:`bnlab.nn` for the layers; hands finished run directories to :mod:`bnlab.report`.
The configs import neither torch nor matplotlib; the rest is loaded when first used.
"""

from .config import Config, ConfigError, TrainConfig
from .configs import EXPERIMENTS, CompareConfig

__all__ = ["EXPERIMENTS", "CompareConfig", "Config", "ConfigError", "TrainConfig",
           "run_experiment"]


def __getattr__(name: str):
    if name == "run_experiment":
        from .experiments import run_experiment

        return run_experiment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
