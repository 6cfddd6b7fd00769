"""bnlab: Batch Normalization written from its equations, and a lab that measures it.

Three layers, one direction: ``bnlab.nn`` (the layers; torch only), ``bnlab.lab`` (data,
models, training, experiments, the ``bnlab`` command) and ``bnlab.report`` (statistics,
figures and HTML from run directories).
"""

__version__ = "0.1.0"
