"""Models, with their normalization built by name from one registry.

A norm name (``none``, ``bn``, ``torch-bn``, ``ghost-K``, ``renorm``, ``sync``, ``gn``,
``ln``, ``full-batch``, ``population``, ``noisy``, or one registered since) picks the layer
placed after each hidden linear map of :func:`build_mlp`, or after each convolution of
:func:`build_cnn` (``full-batch``, ``population`` and ``noisy`` exist for the fully connected
networks only). The names, and how each is built, are entries of :mod:`bnlab.lab.norms`; the
built-in ones are built by the functions below (``layer(channels, seed, dims)``), and any
norm's layer by :func:`norm_layer` (:mod:`bnlab.lab.model_registry`, where a network of
one's own is registered).
``full-batch`` and ``population`` also change how a training step gathers statistics;
:func:`step_statistics` tells the trainer which.
"""

from __future__ import annotations

import math
import torch
from torch import Tensor, nn

import bnlab.nn as bnn
from .model_registry import norm_layer
from .norms import norm

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
NOISE_SCALE, NOISE_SHIFT = 0.5, 0.5  # noisy BN: scale ~ U(1 -+ 0.5), shift ~ U(-+0.5)


class NoisyAffine(nn.Module):
    """After a BN layer in training: ``y * scale + shift`` with scale ~ U(1 - s, 1 + s) and
    shift ~ U(-b, b) drawn per channel afresh at every step (Santurkar et al. 2018's control:
    layer inputs anything but stable). The identity in eval. The generator's state travels
    in ``state_dict``, so a resumed run draws what it would have drawn. The noise is drawn
    on the CPU and moved to the input's device: a network on a GPU gets the CPU's draws."""

    def __init__(self, scale_noise: float, shift_noise: float, seed: int) -> None:
        super().__init__()
        self.scale_noise, self.shift_noise = scale_noise, shift_noise
        self.gen = torch.Generator().manual_seed(seed)
        self.hold = False  # reuse the last draw (a probe compares points under one draw)
        self.noise: tuple[Tensor, Tensor] | None = None

    def forward(self, y: Tensor) -> Tensor:
        if not self.training:
            return y
        if not (self.hold and self.noise is not None):
            c = y.shape[1]
            self.noise = (1 + self.scale_noise * (2 * torch.rand(c, generator=self.gen) - 1),
                          self.shift_noise * (2 * torch.rand(c, generator=self.gen) - 1))
        scale, shift = (t.to(y.device) for t in self.noise)
        return y * scale + shift

    def get_extra_state(self) -> Tensor:
        return self.gen.get_state()

    def set_extra_state(self, state: Tensor) -> None:
        self.gen.set_state(state)


class PopulationBatchNorm1d(nn.Module):
    """BN with statistics set from outside and treated as constants (no gradient flows
    through them), as inference uses them. :func:`refresh_population` sets them to the
    whole training set's mean and biased variance."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("var", torch.ones(num_features))
        self.collecting = False

    def forward(self, x: Tensor) -> Tensor:  # (N, C)
        if self.collecting:
            with torch.no_grad():
                self.mean.copy_(x.mean(0))
                self.var.copy_(x.var(0, unbiased=False))
        scale, shift = bnn.functional.affine_from_stats(self.mean, self.var, self.weight,
                                                        self.bias, self.eps)
        return x * scale + shift


@torch.no_grad()
def refresh_population(model: nn.Module, x: Tensor) -> None:
    """Set every :class:`PopulationBatchNorm1d` to the statistics of its input over ``x``."""
    layers = [m for m in model.modules() if isinstance(m, PopulationBatchNorm1d)]
    for m in layers:
        m.collecting = True
    model(x)
    for m in layers:
        m.collecting = False


GN_GROUPS = 4  # GroupNorm's groups (fewer where the channels do not divide by 4)
RENORM_LIMITS = {"r_max": 3.0, "d_max": 5.0}  # Ioffe (2017)'s final limits

_BN = {1: bnn.BatchNorm1d, 2: bnn.BatchNorm2d}
_TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_RENORM = {1: bnn.BatchRenorm1d, 2: bnn.BatchRenorm2d}


# The built-in norms' layers (see bnlab.lab.norms): ``channels`` outputs of a linear map
# (dims 1) or of a convolution (dims 2)
def no_layer(channels: int, seed: int, dims: int) -> None:
    return None


def batch_norm(channels: int, seed: int, dims: int) -> nn.Module:
    return _BN[dims](channels)


def torch_batch_norm(channels: int, seed: int, dims: int) -> nn.Module:
    return _TORCH_BN[dims](channels)


def batch_renorm(channels: int, seed: int, dims: int) -> nn.Module:
    return _RENORM[dims](channels, **RENORM_LIMITS)


def sync_batch_norm(channels: int, seed: int, dims: int) -> nn.Module:
    return bnn.SyncBatchNorm(channels)


def ghost_batch_norm(channels: int, seed: int, dims: int, k: int) -> nn.Module:
    return bnn.GhostBatchNorm(channels, virtual_batch_size=k)


def group_norm(channels: int, seed: int, dims: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(GN_GROUPS, channels), channels)


def layer_norm(channels: int, seed: int, dims: int) -> nn.Module:
    # over each sample's every feature: (C,) after a linear map, (C, H, W) after a convolution
    return nn.LayerNorm(channels) if dims == 1 else nn.GroupNorm(1, channels)


def population_batch_norm(channels: int, seed: int, dims: int) -> nn.Module:
    return PopulationBatchNorm1d(channels)


def noisy_batch_norm(channels: int, seed: int, dims: int) -> nn.Module:
    return nn.Sequential(bnn.BatchNorm1d(channels),
                         NoisyAffine(NOISE_SCALE, NOISE_SHIFT, 10_000 + seed))


def step_statistics(name: str) -> str:
    """Where a training step's BN statistics come from: ``batch`` (the mini-batch), ``whole``
    (the whole training set goes through the network, the loss is taken on the batch's rows:
    BN without batch noise) or ``population`` (refreshed before each step, no gradient)."""
    return norm(name).statistics


def build_mlp(in_features: int, num_classes: int, depth: int, width: int, activation: str,
              norm: str, init_scale: float, seed: int) -> nn.Sequential:
    """``in -> depth x (Linear -> [norm] -> activation) -> Linear -> logits``.

    The norm sits between the linear map and the nonlinearity (Ioffe & Szegedy, section 3.2),
    and a linear layer followed by a norm has no bias: BN's beta takes its place. Weights are
    drawn from N(0, init_scale^2) by a generator seeded with ``seed`` in the same order for
    every norm, so the plain and BN networks of one seed start from the same weight matrices.
    """
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    fan_in = in_features
    for i in range(depth):
        norm_module = norm_layer(norm, width, 1000 * seed + i)  # a seed of its own per layer
        layers.append(_linear(fan_in, width, norm_module is None, init_scale, gen))
        if norm_module is not None:
            layers.append(norm_module)
        layers.append(ACTIVATIONS[activation]())
        fan_in = width
    layers.append(_linear(fan_in, num_classes, True, init_scale, gen))
    return nn.Sequential(*layers)


def mlp(norm: str, seed: int, *, in_features: int, classes: int, depth: int = 3,
        width: int = 100, activation: str = "sigmoid", init_scale: float = 0.2) -> nn.Sequential:
    """The registered model ``mlp`` (:mod:`bnlab.lab.model_registry`): :func:`build_mlp`
    with the configs' default shape unless told otherwise."""
    return build_mlp(in_features, classes, depth, width, activation, norm, init_scale, seed)


def _linear(fan_in: int, fan_out: int, bias: bool, std: float, gen: torch.Generator) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(fan_out, fan_in, generator=gen) * std)
        if bias:
            layer.bias.zero_()
    return layer


def build_cnn(side: int, num_classes: int, norm: str, seed: int,
              channels: tuple[int, ...] = (8, 16), pool_every: int = 1) -> nn.Sequential:
    """A CNN for ``side x side`` grey images given as flat rows (28 for Fashion-MNIST): for
    each entry of ``channels`` a ``Conv 3x3 -> [norm] -> ReLU`` with that many output
    channels, a ``MaxPool 2`` after every ``pool_every`` of them, then ``Linear -> logits``.
    The default is two stages, ``2 x (Conv 3x3 -> [norm] -> ReLU -> MaxPool 2)``; a deeper
    network pools every two convolutions (``batch-size``'s: ``channels=(8, 8, 16, 16, 32,
    32), pool_every=2``, six norm layers).

    As in :func:`build_mlp`, a convolution followed by a norm has no bias, and weights come
    from a generator seeded with ``seed`` in the same order for every norm (He-normal for the
    convolutions, N(0, 1/fan_in) for the classifier), so every norm of one seed starts from
    the same filters. ValueError if ``side`` is too small for the poolings."""
    if not channels or pool_every < 1:
        raise ValueError(f"build_cnn needs one or more channels and pool_every >= 1 (got "
                         f"channels={channels!r}, pool_every={pool_every})")
    pools = len(channels) // pool_every
    if side >> pools < 1:
        raise ValueError(f"a {side}x{side} image is too small for {pools} 2x2 poolings; "
                         f"expected a side of at least {2 ** pools}")
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Unflatten(1, (1, side, side))]  # (N, side^2) -> (N, 1, side, side)
    c_in = 1
    for i, c_out in enumerate(channels):
        norm_module = norm_layer(norm, c_out, 1000 * seed + i, dims=2)
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm_module is None)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen)
                              * math.sqrt(2 / (c_in * 9)))
            if conv.bias is not None:
                conv.bias.zero_()
        layers += [conv] + ([norm_module] if norm_module is not None else []) + [nn.ReLU()]
        c_in = c_out
        if (i + 1) % pool_every == 0:
            layers.append(nn.MaxPool2d(2))
            side //= 2
    layers += [nn.Flatten(), _linear(c_in * side * side, num_classes, True,
                                     math.sqrt(1 / (c_in * side * side)), gen)]
    return nn.Sequential(*layers)
