"""The errors bnlab.nn raises, with torch's texts where torch raises them too, and the checks
that turn hyperparameters torch takes (NumPy scalars, 0-d tensors) into Python numbers."""

from __future__ import annotations

import numbers
import operator
from typing import Any

from torch import Tensor

__all__ = ["NO_RUNNING_TANGENT", "ShapeError", "as_float", "as_int", "one_value_message"]


class ShapeError(ValueError, RuntimeError):
    """A tensor, parameter or buffer whose shape does not fit the layer or the operation.

    Both a ``ValueError`` (bad input is the caller's) and a ``RuntimeError``, which is what
    ``torch.nn.BatchNorm*d`` raises for a wrong channel count or a wrong-sized parameter or
    buffer: code written for torch that catches ``RuntimeError`` catches bnlab's too.
    """


# torch's text, which code written for torch may match
NO_RUNNING_TANGENT = ("batch_norm is not differentiable wrt running_mean and running_var, "
                      "they cannot have forward grad defined")


def one_value_message(x: Tensor, where: str = "",
                      fix: str = "pass a batch of 2 or more samples") -> str:
    """torch's refusal of one value per channel (its exact text first), then bnlab's advice."""
    return (f"Expected more than 1 value per channel when training, got input size {x.shape}"
            f"{where}: batch statistics need 2 or more values per channel; {fix}")


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def as_int(value: Any, name: str, minimum: int, expected: str) -> int:
    """``value`` as an int when it is integer-like (an int, a NumPy integer, an integer 0-d
    tensor: what ``operator.index`` takes, as torch takes sizes) and >= ``minimum``; a bool
    is refused. Otherwise ``ValueError`` saying "``name`` must be ``expected``"."""
    if not _is_bool(value):
        try:
            n = operator.index(value)
        except TypeError:
            n = None
        if n is not None and n >= minimum:
            return n
    raise ValueError(f"{name} must be {expected} (got {value!r})")


def as_float(value: Any) -> float | None:
    """``value`` as a float when it is a real number (an int, a float, a NumPy scalar, a real
    0-d tensor, as torch takes eps and momentum), else None; a bool is not one."""
    if _is_bool(value):
        return None
    if isinstance(value, Tensor):
        ok = value.dim() == 0 and not value.is_complex()
        return float(value) if ok else None
    return float(value) if isinstance(value, numbers.Real) else None
