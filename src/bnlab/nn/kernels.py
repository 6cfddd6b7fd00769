"""bnlab.nn.kernels: the compiled CPU kernels behind bnlab's training BatchNorm.

On CPU, a BatchNorm layer in training computes its statistics, normalization and backward in
compiled kernels (Numba) where Numba is installed, else in torch ops (see docs/layer.md); so
do the ``BatchNormAct*d`` layers (:mod:`bnlab.nn.act`) for float32 and float64, with the
activation and its derivative inside the same passes.
This module tells which code is in use, and offers what the lab builds on:

* :func:`available`, :func:`unavailable_reason`, :func:`describe`: which code computes BN here,
  and why (for provenance); ``BNLAB_KERNELS=0`` switches the kernels off.
* :func:`stacked_forward`, :func:`stacked_backward`: training BN of M independent networks at
  once, each with its own (N, C) batch, statistics and parameters (no autograd).
* :func:`prepare_stacked`: on a first run, compile the stacked kernels in background processes
  while the caller starts up.
"""

from ._kernels import available, describe, unavailable_reason
from ._ops import prepare_stacked, stacked_backward, stacked_forward

__all__ = ["available", "describe", "prepare_stacked", "stacked_backward", "stacked_forward",
           "unavailable_reason"]
