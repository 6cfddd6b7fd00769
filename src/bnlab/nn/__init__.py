"""bnlab.nn: Batch Normalization from its equations, a drop-in for ``torch.nn.BatchNorm*d``.

Depends on torch, and on Numba where it is installed. ``bnlab.nn.functional`` holds the pure
statistics and normalization functions in torch ops (the reference, and the path on devices
and layouts the compiled kernels do not cover); ``_kernels`` computes the same on CPU, behind
the torch operators of ``_ops``; the modules wire them; ``transforms`` converts, freezes and
folds whole models; ``precise`` sets running statistics to population statistics;
``renorm`` holds Batch Renormalization and ``sync`` the BatchNorm of a batch split over
processes; ``act`` holds BatchNorm fused with its activation (``BatchNormAct*d``: one
forward and one backward for ``act(BN(x))``, and the in-place activated BN's
``save="output"``). Shapes that do not fit raise :class:`ShapeError`, both a ``ValueError`` and
the ``RuntimeError`` torch raises for them.
"""

from . import functional
from .act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ._errors import ShapeError
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, GhostBatchNorm
from .precise import update_bn_stats
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .sync import SyncBatchNorm, SyncBatchNormAct
from .fuse import BNActFusion, fuse_bn_act
from .transforms import convert_to_bnlab, convert_to_torch, fold, fold_weights, freeze, unfreeze

__all__ = [
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "BNActFusion",
    "GhostBatchNorm",
    "ShapeError",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "convert_to_bnlab",
    "convert_to_torch",
    "fold",
    "fold_weights",
    "freeze",
    "functional",
    "fuse_bn_act",
    "unfreeze",
    "update_bn_stats",
]
