"""bnlab.nn: Batch Normalization from its equations, a drop-in for ``torch.nn.BatchNorm*d``.

Depends on torch, and on Numba where it is installed. ``bnlab.nn.functional`` holds the pure
statistics and normalization functions in torch ops (the reference, and the path on devices
and layouts the compiled kernels do not cover); ``_kernels`` computes the same on CPU, behind
the torch operators of ``_ops``; the modules wire them; ``transforms`` converts, freezes and
folds whole models; ``precise`` sets running statistics to population statistics.
"""

from . import functional
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, GhostBatchNorm
from .precise import update_bn_stats
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
    "update_bn_stats",
]
