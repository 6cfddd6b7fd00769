"""The norm registry: every norm is one entry, and a new one is one registration that the
configs, the models, the trainer and the figures all see."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from bnlab.lab import norms
from bnlab.lab.experiment_configs import CompareConfig, RegularizationConfig
from bnlab.lab.fields import ConfigError
from bnlab.lab.models import build_cnn, build_mlp, norm_layer, step_statistics
from bnlab.lab.norms import (NORMS, SPLITTABLE, STACKABLE, canonical_norm, is_norm, norm,
                             register_norm, unregister_norm)
from bnlab.report.figures import color, label
from bnlab.report.sections import batch_size, regularization


class NoMeanBatchNorm(nn.Module):
    """BN without mean subtraction: ``y = weight * x / sqrt(E[x^2] + eps) + bias``, E over
    the batch (and the positions of a feature map)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C) or (N, C, H, W)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean_sq = x.pow(2).mean(dims, keepdim=True)
        return self.weight.view(shape) * x / (mean_sq + self.eps).sqrt() + self.bias.view(shape)


@pytest.fixture
def nomean():
    """The toy norm, registered for one test."""
    entry = register_norm("nomean", lambda channels, seed, dims: NoMeanBatchNorm(channels),
                          cnn=True, label="FC + BN without mean", color="#8c564b")
    yield entry
    unregister_norm("nomean")


# -- the built-in norms, as they were before the registry ----------------------------------
def test_builtin_lists_and_messages():
    assert list(NORMS) == ["none", "bn", "torch-bn", "renorm", "sync", "gn", "ln", "full-batch",
                           "population", "noisy", "ghost-K"]
    assert list(SPLITTABLE) == ["none", "bn", "sync", "gn", "ln"]
    assert list(STACKABLE) == ["none", "bn", "renorm", "gn", "ln", "full-batch", "population",
                               "ghost-K"]
    assert "ghost-4" in STACKABLE and "noisy" not in STACKABLE
    assert norms.describe_norms() == ("one of none, bn, torch-bn, renorm, sync, gn, ln, "
                                      "full-batch, population, noisy or ghost-K (virtual "
                                      "batches of K >= 2)")
    assert [step_statistics(n) for n in ("bn", "ghost-4", "full-batch", "population")] == [
        "batch", "batch", "whole", "population"]


def test_builtin_labels_and_colours():
    assert {n: (label(n), color(n)) for n in ("none", "bn", "torch-bn", "noisy", "population",
                                              "full-batch", "sync")} == {
        "none": ("plain FC", "#555555"), "bn": ("FC + BN", "#1f77b4"),
        "torch-bn": ("FC + BN (torch.nn)", "#ff7f0e"), "noisy": ("FC + noisy BN", "#2ca02c"),
        "population": ("FC + population BN", "#d62728"),
        "full-batch": ("FC + full-batch BN", "#9467bd"), "sync": ("sync", None)}
    assert label("ghost-08") == "FC + ghost BN (8)" and label("ghost-K") == "FC + ghost BN (K)"
    assert label("ghost") == "ghost" and color("ghost") is None  # no norm of that name
    assert {a: batch_size._color(a) for a in batch_size.LABELS} == {
        "bn": "#1f77b4", "ghost": "#17becf", "renorm": "#2ca02c", "gn": "#d62728",
        "ln": "#9467bd"}


def test_a_family_is_one_entry_with_one_spelling_per_member():
    six = norm("ghost-06")
    assert (six.name, six.family, six.k, six.cnn) == ("ghost-6", "ghost-K", 6, True)
    assert canonical_norm("ghost-0012") == "ghost-12" and canonical_norm("foo") == "foo"
    assert [is_norm(n) for n in ("ghost-2", "ghost-1", "ghost-K", "ghost-\u00b2", "ghost-", 2,
                                 ["bn"])] == [True, False, False, False, False, False, False]
    assert "ghost-06" in NORMS and "ghost-4" not in SPLITTABLE and "ghost-K" in NORMS
    with pytest.raises(ValueError, match="ghost-K names a family of norms; give K, as in ghost-2"):
        norm("ghost-K").layer(8, seed=0)
    with pytest.raises(ValueError, match=r"^unknown norm 'ghost-1'; expected one of none, bn"):
        norm("ghost-1")


def test_regularization_finds_ghosts_through_the_registry():
    assert regularization.ghosts(["bn", "ghost-16", "ghost-2", "none"]) == ["ghost-2", "ghost-16"]


# -- a new norm is one registration --------------------------------------------------------
def test_a_registered_norm_is_accepted_built_trained_and_drawn(nomean):
    assert nomean.name == "nomean" and "nomean" in NORMS and list(NORMS)[-1] == "nomean"
    config = CompareConfig(norms=("none", "bn", "nomean"))
    assert config.norms == ("none", "bn", "nomean")
    with pytest.raises(ConfigError, match=r"or nomean; foo is not \(got nomean,foo\)$"):
        CompareConfig(norms=("nomean", "foo"))

    mlp = build_mlp(64, 10, 2, 16, "relu", "nomean", 0.1, seed=0)
    assert sum(isinstance(m, NoMeanBatchNorm) for m in mlp) == 2
    assert all(m.bias is None for m in mlp[:-1] if isinstance(m, nn.Linear))  # beta instead
    cnn = build_cnn(8, 10, "nomean", seed=0, channels=(4, 6))
    assert [m.weight.shape[0] for m in cnn if isinstance(m, NoMeanBatchNorm)] == [4, 6]
    assert cnn(torch.rand(5, 64)).shape == (5, 10)
    y = norm_layer("nomean", 3, seed=0, dims=2)(torch.randn(7, 3, 4, 4) * 3 + 2)
    torch.testing.assert_close(y.pow(2).mean((0, 2, 3)), torch.ones(3), rtol=1e-4, atol=0)

    assert step_statistics("nomean") == "batch"
    assert (label("nomean"), color("nomean")) == ("FC + BN without mean", "#8c564b")


def test_a_registered_norm_keeps_its_flags(nomean):
    assert "nomean" not in SPLITTABLE and "nomean" not in STACKABLE  # unless it says so
    with pytest.raises(ConfigError, match=r"--norms must be none, bn, sync, gn, ln with "
                                          r"--nproc 2"):
        CompareConfig(norms=("nomean",), nproc=2)


def test_unregistered_norm_is_gone():
    register_norm("nomean", lambda channels, seed, dims: None, label="gone soon")
    unregister_norm("nomean")
    assert "nomean" not in NORMS and label("nomean") == "nomean"
    with pytest.raises(ConfigError, match=r"; nomean is not"):
        CompareConfig(norms=("nomean",))
    with pytest.raises(ValueError, match="no norm 'nomean' is registered"):
        unregister_norm("nomean")


def test_a_norm_without_cnn_form_refuses_a_cnn():
    register_norm("fc-only", "bnlab.lab.models:batch_norm", statistics="whole")
    try:
        assert step_statistics("fc-only") == "whole"
        assert type(norm_layer("fc-only", 4, seed=0)).__name__ == "BatchNorm1d"
        with pytest.raises(ValueError, match="fully connected networks only"):
            build_cnn(8, 10, "fc-only", seed=0)
    finally:
        unregister_norm("fc-only")


def test_a_registered_family():
    register_norm("scaled-K", lambda channels, seed, dims, k: nn.Identity() if k else None,
                  label="x{k}")
    try:
        assert canonical_norm("scaled-03") == "scaled-3" and label("scaled-3") == "x3"
        config = RegularizationConfig(norms=("bn", "scaled-03"))
        assert config.norms == ("bn", "scaled-3")
        assert isinstance(norm_layer("scaled-3", 4, seed=0), nn.Identity)
        assert regularization.ghosts(list(config.norms)) == []  # another family
    finally:
        unregister_norm("scaled-K")
    assert not is_norm("scaled-3")


@pytest.mark.parametrize("args,kwargs,error,msg", [
    (("bn", "m:f"), {}, ValueError, "the norm bn is already registered"),
    (("ghost-4", "m:f"), {}, ValueError, r"ghost-4 is already registered \(a member of ghost-K\)"),
    (("x-K", "m:f"), {"label": "x {j}"}, ValueError, "may hold {k} and no other field"),
    (("a,b", "m:f"), {}, ValueError, "without comma or space"),
    (("BN2", "m:f"), {}, ValueError, "lower-case"),
    (("", "m:f"), {}, ValueError, "got ''"),
    (("x", "no function"), {}, TypeError, "build must be a callable or 'module:function'"),
    (("x", 3), {}, TypeError, r"\(got 3\)"),
    (("x", "m:f"), {"statistics": "running"}, ValueError,
     "statistics must be one of batch, whole, population"),
])
def test_bad_registrations_are_refused(args, kwargs, error, msg):
    before = list(NORMS)
    with pytest.raises(error, match=msg):
        register_norm(*args, **kwargs)
    assert list(NORMS) == before


def test_a_family_may_not_take_a_registered_name():
    register_norm("v-12", "m:f")
    try:
        with pytest.raises(ValueError, match="the family v-K would take the registered norm v-12"):
            register_norm("v-K", "m:f")
    finally:
        unregister_norm("v-12")


def test_the_registry_and_the_configs_import_without_torch_or_matplotlib():
    code = ("import sys\nimport bnlab.lab.norms, bnlab.lab.fields, bnlab.lab.experiment_configs\n"
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
