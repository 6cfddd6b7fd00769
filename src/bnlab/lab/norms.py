"""The norms a lab network can hold: one registry entry each.

An entry says everything bnlab knows of a norm: how to build its layer after a linear map
(``dims=1``, :func:`~bnlab.lab.models.build_mlp`) and after a convolution (``dims=2``,
:func:`~bnlab.lab.models.build_cnn`), or that it has no CNN form; whether a batch split
between processes leaves its training unchanged (``splittable``); whether a stack of networks
(:mod:`bnlab.lab.stack`) can hold it (``stackable``); where a training step's statistics come
from (``statistics``); and its label and colour in figures. The configs' checks, the models,
the trainer and the report all read it, so a new norm is one call::

    register_norm("nomean", "mypackage.layers:no_mean_bn", cnn=True,
                  label="FC + BN without mean", color="#8c564b")

A name ending in ``-K`` registers a family: ``ghost-K`` is ghost-2, ghost-3, ... (K >= 2 in
ASCII digits; ghost-06 is spelled ghost-6), each built with ``k=K``.

This module imports neither torch nor matplotlib: a builder given as ``"module:function"`` is
imported when a layer is first built.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

__all__ = ["NORMS", "SPLITTABLE", "STACKABLE", "STATISTICS", "Norm", "canonical_norm",
           "describe_norms", "is_norm", "norm", "register_norm", "unregister_norm"]

# (channels, seed, dims[, k=K]) -> the layer (None: no layer), or "module:function" naming one
Builder = Union[Callable[..., Any], str]
STATISTICS = ("batch", "whole", "population")
_NAME = re.compile(r"[a-z0-9][a-z0-9_.+-]*")  # no comma, space or capital: a --norms item


@dataclass(frozen=True)
class Norm:
    """One norm. ``name`` is its one spelling (``ghost-6``); a family's member has
    ``family`` (``ghost-K``) and ``k`` (6); the family's own entry has ``k`` None.

    ``statistics`` says where a training step's statistics come from: ``batch`` (the
    mini-batch), ``whole`` (the whole training set goes through the network and the loss is
    taken on the batch's rows: BN without batch noise) or ``population`` (refreshed before
    each step, as constants; see :func:`~bnlab.lab.models.refresh_population`). ``about``
    is a short note shown after the name where the norms are listed."""

    name: str
    build: Builder
    cnn: bool = False
    splittable: bool = False
    stackable: bool = False
    statistics: str = "batch"
    label: str = ""
    color: str | None = None
    about: str = ""
    family: str | None = None
    k: int | None = None

    def layer(self, channels: int, seed: int, dims: int = 1) -> Any:
        """The layer after a linear map (``dims=1``) or a convolution (``dims=2``) of
        ``channels`` outputs; None where the norm adds none. ``seed`` seeds what the layer
        draws (noisy BN's noise)."""
        if dims != 1 and not self.cnn:
            raise ValueError("this norm exists for the fully connected networks only")
        if self.family is not None and self.k is None:
            raise ValueError(f"{self.name} names a family of norms; give K, as in "
                             f"{_prefix(self.name)}2")
        params = {} if self.k is None else {"k": self.k}
        return _load(self.build)(channels, seed, dims, **params)


_REGISTRY: dict[str, Norm] = {}  # by registered name, in order of registration


def _prefix(family: str) -> str:
    return family[:-1]  # "ghost-K" -> "ghost-"


def _load(build: Builder) -> Callable[..., Any]:
    if callable(build):
        return build
    module, _, attr = build.partition(":")
    return getattr(importlib.import_module(module), attr)


def _lookup(name: Any) -> Norm | None:
    """The entry of ``name``: a registered name (a family's too), or a family's member."""
    if not isinstance(name, str):
        return None
    if name in _REGISTRY:
        entry = _REGISTRY[name]  # a family's label is a template: "FC + ghost BN ({k})"
        return entry if entry.family is None else dataclasses.replace(
            entry, label=entry.label.format(k="K"))
    for family in (e for e in _REGISTRY.values() if e.family is not None):
        prefix = _prefix(family.name)
        if name.startswith(prefix) and re.fullmatch(r"[0-9]+", name[len(prefix):]):
            k = int(name[len(prefix):])
            return None if k < 2 else dataclasses.replace(
                family, name=f"{prefix}{k}", k=k, label=family.label.format(k=k))
    return None


def norm(name: str) -> Norm:
    """The entry of the norm ``name`` (any spelling: ghost-06 gives ghost-6's; a family's
    registered name, ghost-K, gives the family's own); ValueError for an unknown name."""
    entry = _lookup(name)
    if entry is None:
        raise ValueError(f"unknown norm {name!r}; expected {describe_norms()}")
    return entry


def is_norm(name: Any) -> bool:
    """Whether a network can hold the norm ``name`` (a family's member, not the family)."""
    entry = _lookup(name)
    return entry is not None and not (entry.family is not None and entry.k is None)


def canonical_norm(name: Any) -> Any:
    """A norm's one spelling: ghost-06 is ghost-6 (anything else is returned as given)."""
    entry = _lookup(name)
    return name if entry is None else entry.name


def describe_norms() -> str:
    """The norms as a check words them: "one of none, bn, ... or ghost-K (virtual batches
    of K >= 2)"."""
    names = [e.name + (f" ({e.about})" if e.about else "") for e in _REGISTRY.values()]
    return "one of " + " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


class _Names(Sequence):
    """The registered names (a family as ``ghost-K``) whose entry has ``flag`` set, in order
    of registration; live, so a norm registered later is in it. ``in`` takes any spelling
    of a norm (``"ghost-06" in NORMS``)."""

    def __init__(self, flag: str | None = None) -> None:
        self._flag = flag

    def _names(self) -> list[str]:
        return [n for n, e in _REGISTRY.items() if self._flag is None or getattr(e, self._flag)]

    def __getitem__(self, i: Any) -> Any:
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        entry = _lookup(name)
        return entry is not None and (self._flag is None or getattr(entry, self._flag))

    def __repr__(self) -> str:
        return repr(tuple(self._names()))


NORMS = _Names()
SPLITTABLE = _Names("splittable")  # a batch split between processes leaves training unchanged
STACKABLE = _Names("stackable")  # a stack of networks (bnlab.lab.stack) can hold them


def register_norm(name: str, build: Builder, *, cnn: bool = False, splittable: bool = False,
                  stackable: bool = False, statistics: str = "batch", label: str | None = None,
                  color: str | None = None, about: str = "") -> Norm:
    """Add the norm ``name`` (``prefix-K`` for a family) to every list of norms, the configs'
    checks, the models and the figures; returns its entry.

    Args:
        name: its one spelling, lower case, no comma or space; ending in ``-K``, a family.
        build: ``build(channels, seed, dims)`` (a family's also gets ``k=K``) returning the
            layer after a linear map (``dims=1``) or a convolution (``dims=2``), or None for
            no layer; or ``"module:function"`` naming one, imported at the first build.
        cnn: whether ``build`` has a form after a convolution (default: no).
        splittable: whether splitting every batch between processes, BN synchronized,
            leaves the training unchanged (default: no; such runs are refused).
        stackable: whether a stack of networks can train it (default: no).
        statistics: where a step's statistics come from, one of :data:`STATISTICS`.
        label: its name in tables and legends (default: ``name``); a family's may hold
            ``{k}``.
        color: its colour in figures (default: matplotlib's next).
        about: a short note shown after the name where the norms are listed.
    """
    _check_new(name)
    if not (callable(build) or (isinstance(build, str) and re.fullmatch(r"[\w.]+:\w+", build))):
        raise TypeError(f"build must be a callable or 'module:function' (got {build!r})")
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {', '.join(STATISTICS)} (got {statistics!r})")
    family = name if name.endswith("-K") else None
    label = label if label is not None else _prefix(name) + "{k}" if family else name
    if family:
        try:
            label.format(k=2)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"a family's label may hold {{k}} and no other field (got "
                             f"{label!r}: {exc})") from None
    entry = Norm(name, build, cnn=cnn, splittable=splittable, stackable=stackable,
                 statistics=statistics, label=label, color=color, about=about, family=family)
    _REGISTRY[name] = entry
    return entry


def _check_new(name: Any) -> None:
    if not (isinstance(name, str) and (_NAME.fullmatch(name) or (
            name.endswith("-K") and _NAME.fullmatch(name[:-1])))):
        raise ValueError("a norm's name must be lower-case letters, digits and - _ . + (or "
                         f"end in -K, for a family), without comma or space (got {name!r})")
    taken = _lookup(name)
    if taken is not None:
        also = f" (a member of {taken.family})" if taken.k is not None else ""
        raise ValueError(f"the norm {name} is already registered{also}; to replace it, "
                         f"unregister_norm({taken.family or name!r}) first")
    if name.endswith("-K"):
        prefix = _prefix(name)
        members = [n for n in _REGISTRY if n.startswith(prefix)
                   and re.fullmatch(r"[0-9]+", n[len(prefix):])]
        if members:
            raise ValueError(f"the family {name} would take the registered norm {members[0]}")


def unregister_norm(name: str) -> None:
    """Remove the norm ``name`` (as registered; a family by ``prefix-K``)."""
    if name not in _REGISTRY:
        raise ValueError(f"no norm {name!r} is registered")
    del _REGISTRY[name]


# The built-in norms, in the colours the figures have given them (renorm, gn, ln and ghost
# BN: the batch-size figure's). A batch split between processes leaves BN's training
# unchanged as BN becomes SyncBatchNorm; GroupNorm and LayerNorm normalize each example alone.
_MODELS = "bnlab.lab.models:"
register_norm("none", _MODELS + "no_layer", cnn=True, splittable=True, stackable=True,
              label="plain FC", color="#555555")
register_norm("bn", _MODELS + "batch_norm", cnn=True, splittable=True, stackable=True,
              label="FC + BN", color="#1f77b4")
register_norm("torch-bn", _MODELS + "torch_batch_norm", cnn=True, label="FC + BN (torch.nn)",
              color="#ff7f0e")
register_norm("renorm", _MODELS + "batch_renorm", cnn=True, stackable=True, color="#2ca02c")
register_norm("sync", _MODELS + "sync_batch_norm", cnn=True, splittable=True)
register_norm("gn", _MODELS + "group_norm", cnn=True, splittable=True, stackable=True,
              color="#d62728")
register_norm("ln", _MODELS + "layer_norm", cnn=True, splittable=True, stackable=True,
              color="#9467bd")
register_norm("full-batch", _MODELS + "batch_norm", stackable=True, statistics="whole",
              label="FC + full-batch BN", color="#9467bd")
register_norm("population", _MODELS + "population_batch_norm", stackable=True,
              statistics="population", label="FC + population BN", color="#d62728")
register_norm("noisy", _MODELS + "noisy_batch_norm", label="FC + noisy BN", color="#2ca02c")
register_norm("ghost-K", _MODELS + "ghost_batch_norm", cnn=True, stackable=True,
              label="FC + ghost BN ({k})",
              color="#17becf", about="virtual batches of K >= 2")
