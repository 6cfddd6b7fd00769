"""The networks a compare-type experiment can train: one registry entry each.

An entry names a builder, ``build(norm, seed)``, that returns one ``torch.nn.Module`` for a
norm name (:mod:`bnlab.lab.norms`) and a seed; a builder that also takes the keyword
arguments ``in_features`` and ``classes`` is given the dataset's, so one builder serves
digits (64 features) and Fashion-MNIST (784). The built-in ``mlp`` is bnlab's own fully
connected network (:func:`~bnlab.lab.models.build_mlp`), shaped by the configs' ``depth``,
``width``, ``activation`` and ``init_scale``. A network of one's own is one call::

    register_model("wide", "mypackage.nets:wide_mlp", about="one hidden layer of 512")

and ``bnlab compare --model wide`` (or ``CompareConfig(model="wide")``) trains it for every
norm and seed. A builder places its norm layers with :func:`norm_layer`, so a norm of one's
own (:func:`~bnlab.lab.norms.register_norm`) reaches it too.

This module imports neither torch nor matplotlib: a builder given as ``"module:function"``
is imported when the first network is built.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

from .norms import norm as _norm

__all__ = ["DEFAULT_MODEL", "MODELS", "Model", "describe_models", "is_model", "model",
           "norm_layer", "register_model", "unregister_model"]

# (norm, seed[, in_features=, classes=]) -> the network, or "module:function" naming one
Builder = Union[Callable[..., Any], str]
DEFAULT_MODEL = "mlp"
_NAME = re.compile(r"[a-z0-9][a-z0-9_.+-]*")  # as a norm's: lower case, no comma or space
_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class Model:
    """One network. ``build`` makes it (see :func:`register_model`); ``about`` is a short
    note shown after the name where the models are listed."""

    name: str
    build: Builder
    about: str = ""

    def builder(self) -> Callable[..., Any]:
        """The builder, imported if it was given as ``"module:function"``; ValueError naming
        the model and the path if that import fails."""
        if callable(self.build):
            return self.build
        module, _, attr = self.build.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"the model {self.name}'s builder {self.build!r} cannot be "
                             f"imported ({type(exc).__name__}: {exc})") from exc

    def network(self, norm: str, seed: int, **options: Any) -> Any:
        """The network for the norm ``norm`` and ``seed``. Of ``options`` (bnlab passes
        ``in_features`` and ``classes``) the builder gets those its signature names, or all
        of them where it takes ``**kwargs``. TypeError if it returns anything but a
        ``torch.nn.Module``."""
        build = self.builder()
        net = build(norm, seed, **_accepted(build, options))
        import torch  # only here, where a network exists: the registry stays light

        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"the model {self.name}'s builder returned {type(net).__name__}, "
                            f"not a torch.nn.Module (for norm {norm}, seed {seed})")
        return net


def _accepted(build: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` that ``build`` takes by keyword."""
    try:
        params = inspect.signature(build).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): pass none
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(options)
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in options.items() if k in names}


_REGISTRY: dict[str, Model] = {}  # by name, in order of registration


def register_model(name: str, build: Builder, *, about: str = "") -> Model:
    """Add the network ``name`` to the ``model`` field of the compare-type experiments
    (``compare``, ``regularization``, ``lr-sweep``, ``smoothness``); returns its entry.

    Args:
        name: its one spelling, lower case, no comma or space.
        build: ``build(norm, seed)`` returning the network (a ``torch.nn.Module`` mapping
            ``(N, in_features)`` rows to ``(N, classes)`` logits) for the norm named ``norm``;
            given ``in_features=`` and ``classes=`` too where it takes them. bnlab seeds
            torch with ``seed`` before each call, so default initializations repeat. Or
            ``"module:function"`` naming one, imported at the first build.
        about: a short note shown after the name where the models are listed.
    """
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise ValueError("a model's name must be lower-case letters, digits and - _ . +, "
                         f"without comma or space (got {name!r})")
    if name in _REGISTRY:
        raise ValueError(f"the model {name} is already registered")
    if not (callable(build) or (isinstance(build, str) and _PATH.fullmatch(build))):
        raise TypeError(f"build must be a callable or 'module:function' (got {build!r})")
    if not (isinstance(about, str) and "\n" not in about):
        raise ValueError(f"about must be one line of text (got {about!r})")
    entry = Model(name, build, about)
    _REGISTRY[name] = entry
    return entry


def unregister_model(name: str) -> None:
    """Remove the model ``name``; the built-in ``mlp``, every config's default, stays."""
    if name == DEFAULT_MODEL:
        raise ValueError(f"the built-in model {DEFAULT_MODEL} is every config's default and "
                         "cannot be removed")
    if name not in _REGISTRY:
        raise ValueError(f"no model {name!r} is registered")
    del _REGISTRY[name]


def model(name: str) -> Model:
    """The entry of the model ``name``; ValueError for an unknown one."""
    if not is_model(name):
        raise ValueError(f"unknown model {name!r}; expected {describe_models()}")
    return _REGISTRY[name]


def is_model(name: Any) -> bool:
    return isinstance(name, str) and name in _REGISTRY


def describe_models() -> str:
    """The models as a check words them: "one of mlp (...) or wide"."""
    names = [e.name + (f" ({e.about})" if e.about else "") for e in _REGISTRY.values()]
    return "one of " + " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


class _Names(Sequence):
    """The registered models' names, in order of registration; live, so a model registered
    later is in it."""

    def __getitem__(self, i: Any) -> Any:
        return list(_REGISTRY)[i]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(list(_REGISTRY))

    def __contains__(self, name: object) -> bool:
        return is_model(name)

    def __repr__(self) -> str:
        return repr(tuple(_REGISTRY))


MODELS = _Names()


def norm_layer(norm: str, channels: int, seed: int, dims: int = 1) -> Any:
    """The layer of the norm ``norm`` (any registered one, a user's own included) after
    a linear map of ``channels`` outputs (``dims=1``) or a convolution of ``channels``
    channels (``dims=2``); None where the norm adds no layer (``none``). ``seed`` seeds what
    the layer draws (noisy BN's noise). A model's builder calls it to place the norm it is
    given; :func:`~bnlab.lab.models.build_mlp` does the same.

    Example::

        def builder(norm, seed, in_features, classes):
            bn = norm_layer(norm, 256, seed)
            return nn.Sequential(nn.Linear(in_features, 256, bias=bn is None),
                                 *([bn] if bn is not None else []), nn.ReLU(),
                                 nn.Linear(256, classes))
    """
    return _norm(norm).layer(channels, seed, dims)


register_model(DEFAULT_MODEL, "bnlab.lab.models:mlp",
               about="bnlab's fully connected network")
