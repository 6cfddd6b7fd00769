"""Fully connected networks with a choice of normalization, as in the seed's experiment."""

from __future__ import annotations

import torch
from torch import nn

import bnlab.nn as bnn

NORMS = ("none", "bn", "torch-bn")
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}

__all__ = ["ACTIVATIONS", "NORMS", "build_mlp"]


def _norm_layer(norm: str, width: int) -> nn.Module | None:
    if norm == "bn":
        return bnn.BatchNorm1d(width)
    if norm == "torch-bn":
        return nn.BatchNorm1d(width)
    if norm == "none":
        return None
    raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")


def build_mlp(in_features: int, num_classes: int, depth: int, width: int, activation: str,
              norm: str, init_scale: float, seed: int) -> nn.Sequential:
    """``in -> depth x (Linear -> [BN] -> activation) -> Linear -> logits``.

    BN sits between the linear map and the nonlinearity (Ioffe & Szegedy, section 3.2), and
    a linear layer followed by BN has no bias: BN's beta takes its place. Weights are drawn
    from N(0, init_scale^2) by a generator seeded with ``seed`` in the same order for every
    ``norm``, so the plain and BN networks of one seed start from the same weight matrices.
    Biases start at 0.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    fan_in = in_features
    for _ in range(depth):
        norm_layer = _norm_layer(norm, width)
        layers.append(_linear(fan_in, width, norm_layer is None, init_scale, gen))
        if norm_layer is not None:
            layers.append(norm_layer)
        layers.append(ACTIVATIONS[activation]())
        fan_in = width
    layers.append(_linear(fan_in, num_classes, True, init_scale, gen))
    return nn.Sequential(*layers)


def _linear(fan_in: int, fan_out: int, bias: bool, std: float, gen: torch.Generator) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(fan_out, fan_in, generator=gen) * std)
        if bias:
            layer.bias.zero_()
    return layer
