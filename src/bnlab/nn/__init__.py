"""bnlab.nn: Batch Normalization from its equations, a drop-in for ``torch.nn.BatchNorm*d``.

Depends on torch only. ``bnlab.nn.functional`` holds the pure statistics and normalization
functions; the modules wire them; ``transforms`` converts, freezes and folds whole models.
"""

from . import functional
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, GhostBatchNorm
from .transforms import (convert_to_bnlab, convert_to_torch, fold, fold_weights, freeze,
                         unfreeze)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GhostBatchNorm",
    "convert_to_bnlab",
    "convert_to_torch",
    "fold",
    "fold_weights",
    "freeze",
    "functional",
    "unfreeze",
]
