"""Errors of bnlab.nn as torch's callers expect them: shape mismatches are ShapeError (both
ValueError and RuntimeError), and torch's refusals are made with torch's exception type and
text; hyperparameters torch takes are taken."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.nn import _ops


def _stacked_backward_misfit():
    x = torch.randn(2, 4, 3)
    _ops.stacked_backward(torch.randn(2, 4, 2), x, None, torch.zeros(2, 2, 3), 1e-5)


def _wrong_weight(cls=bnn.BatchNorm1d, x=torch.randn(4, 3)):
    m = cls(3)
    m.weight = nn.Parameter(torch.ones(4))
    m(x)


def _op_wrong_weight():
    torch.ops.bnlab.batch_norm(torch.randn(4, 3), torch.ones(2), None, 1e-5)


SHAPE_MISMATCHES = {
    "rank": (lambda: bnn.BatchNorm2d(3)(torch.randn(2, 3, 4)),
             r"expected 4D input \(got 3D input\)"),
    "channels": (lambda: bnn.BatchNorm2d(3)(torch.randn(2, 5, 4, 4)),
                 r"expected input with 3 channels at dim 1 \(num_features\), got 5"),
    "channels in eval": (lambda: bnn.BatchNorm1d(3).eval()(torch.randn(2, 5)),
                         r"expected input with 3 channels"),
    "weight": (_wrong_weight, "weight should contain 3 elements not 4"),
    "renorm weight": (lambda: _wrong_weight(bnn.BatchRenorm1d), "weight should contain 3"),
    "ghost weight": (lambda: _wrong_weight(lambda c: bnn.GhostBatchNorm(c, 2)),
                     "weight should contain 3"),
    "sync rank": (lambda: bnn.SyncBatchNorm(3)(torch.randn(3)),
                  r"expected at least 2D input \(got 1D input\)"),
    "ghost split": (lambda: bnn.GhostBatchNorm(3, 4)(torch.randn(6, 3)),
                    "virtual_batch_size=4 must divide the batch size"),
    "fold_weights": (lambda: bnn.fold_weights(torch.ones(4, 3), None, torch.zeros(5),
                                              torch.ones(5), None, None, 1e-5),
                     "layer has 4 output features but BN has 5 channels"),
    "operator": (_op_wrong_weight, "weight should contain 3 elements not 2"),
    "stacked_backward": (_stacked_backward_misfit, r"grad_y \(2, 4, 2\) .* do not fit x"),
}


@pytest.mark.parametrize("case", SHAPE_MISMATCHES)
def test_every_shape_mismatch_is_a_shape_error_both_value_and_runtime(case):
    call, msg = SHAPE_MISMATCHES[case]
    with pytest.raises(bnn.ShapeError, match=msg) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


def test_code_written_for_torch_catches_bnlab_shape_errors():
    for lib in (nn, bnn):  # the same except clause serves both
        m = lib.BatchNorm1d(3)
        m.running_mean = torch.zeros(4)
        with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):
            m(torch.randn(2, 3))
    assert issubclass(bnn.ShapeError, ValueError) and "ShapeError" in bnn.__all__
