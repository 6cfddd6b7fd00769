"""bnlab.lab: datasets, models, training and experiments behind the ``bnlab`` command.

Uses :mod:`bnlab.nn` for the layers; hands finished run directories to :mod:`bnlab.report`.
"""

from .compare import CompareConfig, run_compare
from .rundir import ConfigError
from .data import DATASETS, DataError, Dataset, load_dataset
from .models import NORMS, build_mlp

__all__ = ["DATASETS", "NORMS", "CompareConfig", "ConfigError", "DataError", "Dataset",
           "build_mlp", "load_dataset", "run_compare"]
