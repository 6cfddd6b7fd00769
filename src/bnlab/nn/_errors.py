"""The exception bnlab.nn raises for a shape that does not fit."""

from __future__ import annotations

__all__ = ["ShapeError"]


class ShapeError(ValueError, RuntimeError):
    """A tensor, parameter or buffer whose shape does not fit the layer or the operation.

    Both a ``ValueError`` (bad input is the caller's) and a ``RuntimeError``, which is what
    ``torch.nn.BatchNorm*d`` raises for a wrong channel count or a wrong-sized parameter or
    buffer: code written for torch that catches ``RuntimeError`` catches bnlab's too.
    """
