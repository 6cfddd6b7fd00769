"""bnlab: Batch Normalization written from its equations, and a lab that measures it.

Three layers, one direction: ``bnlab.nn`` (the layers; torch only), ``bnlab.lab`` (data,
models, training, experiments, the ``bnlab`` command) and ``bnlab.report`` (statistics,
figures and HTML from run directories).
"""

import os

# Intel MKL (torch's BLAS on x86) rounds a matrix product differently depending on where
# its operands lie in memory, unless its strict reproducibility mode is on. The lab trains
# many networks as slices of one tensor and promises each network the bits it would get
# alone, whatever its neighbours; this mode makes that hold at no measured cost. It must be
# set before the process's first MKL call (importing bnlab before any product suffices); a
# value the user set is kept. bnlab.lab.stack checks the products either way.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
