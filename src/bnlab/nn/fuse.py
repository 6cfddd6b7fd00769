"""BatchNorm followed by its activation, fused: :func:`fuse_bn_act` finds each BN whose output
only its activation reads in a torch.fx graph of the model (so functional activations and a
ReLU module called several times are handled) and puts one ``BatchNormAct*d`` in its place;
a :class:`BNActFusion` per BN says what happened and why.
"""

from __future__ import annotations

import copy
import logging
import operator
import os
import traceback
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import fx, nn
from torch.fx.graph_module import _CodeOnlyModule, _copy_attr, _format_import_block
from torch.fx.node import _get_qualified_name
from torch.package import sys_importer
from torch.nn import functional as TF

from .act import (_ALIASES, ACTIVATIONS, SAVES, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d,
                  _BatchNormAct, act_of)
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

from .transforms import _ANY_BN

__all__ = ["BNActFusion", "fuse_bn_act"]

logger = logging.getLogger(__name__)


# -- BatchNorm followed by its activation, fused ------------------------------------------------
_BN_TO_ACT: dict[type, type] = {
    nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d,
    nn.BatchNorm3d: BatchNormAct3d, BatchNorm1d: BatchNormAct1d, BatchNorm2d: BatchNormAct2d,
    BatchNorm3d: BatchNormAct3d,
}
# What a subclass may define and still compute exactly what its base does: a constructor
# (other defaults) and what Python adds to every class.
_HARMLESS = {"__init__", "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__",
             "__annotations__", "__firstlineno__", "__static_attributes__", "__orig_bases__",
             "__parameters__", "__type_params__"}
_BN_STATE = ({"weight", "bias"}, {"running_mean", "running_var", "num_batches_tracked"})
_DEFAULT_ACTS = ("relu", "leaky_relu", "silu")
# the activation functions recognized in a graph: their kind and parameter names
_FUNCTIONS: dict[Callable, tuple[str, tuple[str, ...]]] = {
    TF.relu: ("relu", ("input", "inplace")),
    torch.relu: ("relu", ("input",)),
    torch.relu_: ("relu", ("input",)),
    TF.leaky_relu: ("leaky_relu", ("input", "negative_slope", "inplace")),
    TF.leaky_relu_: ("leaky_relu", ("input", "negative_slope")),
    TF.silu: ("silu", ("input", "inplace")),
}
_METHODS = ("relu", "relu_")  # x.relu(), x.relu_()
_INPLACE = {torch.relu_, TF.leaky_relu_}


@dataclass(frozen=True)
class BNActFusion:
    """What :func:`fuse_bn_act` did with one BatchNorm layer of the model.

    Attributes:
        bn: the layer's name in the model (``"layer1.0.bn1"``), which the fused layer keeps.
        act: the node that reads the layer's output (``"layer1.0.relu (ReLU)"``,
            ``"torch.nn.functional.relu"``), or ``""``.
        fused: whether the layer became a ``BatchNormAct*d`` with that activation.
        save: the fused layer's ``save`` ("input" or "output"); None when not fused.
        reason: why the layer was left as it was, or why ``save="output"`` was not used;
            ``""`` otherwise.
    """

    bn: str
    act: str
    fused: bool
    save: str | None
    reason: str

    def __str__(self) -> str:
        if self.fused:
            note = f" ({self.reason})" if self.reason else ""
            return f"{self.bn} + {self.act}: fused, save={self.save!r}{note}"
        return f"{self.bn}: left: {self.reason}"


def fuse_bn_act(model: nn.Module, *, acts: Iterable[str] = _DEFAULT_ACTS, save: str = "input",
                return_report: bool = False
                ) -> fx.GraphModule | tuple[fx.GraphModule, list[BNActFusion]]:
    """A copy of ``model`` in which each BatchNorm followed by its activation is one
    :class:`bnlab.nn.BatchNormAct2d` (1d, 3d): act(BN(x)) in one forward and one backward.

    The model is traced with torch.fx (``symbolic_trace``'s tracer, which here also keeps
    every BatchNorm layer whole), or taken as it is when it is a ``torch.fx.GraphModule``
    already: trace it yourself to pass your own tracer or ``concrete_args``. A pair is fused
    when a BatchNorm module call (``torch.nn`` or ``bnlab.nn`` BatchNorm1d/2d/3d, or a
    subclass that changes only the constructor) is read by exactly one node, an activation
    of ``acts``: the modules ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.SiLU``, ``nn.Identity``
    (exactly these classes), the functions ``F.relu``, ``torch.relu``, ``F.leaky_relu``
    (with a constant slope), ``F.silu`` and their in-place forms, or ``x.relu()`` /
    ``x.relu_()``. Where anything else reads the BN's output too (a residual
    connection, a second branch), or the BN module is called again elsewhere with another
    follower, the BN is left as it was. Only the graph changes: the BN node calls the new
    layer, the activation node is gone, and an activation module called elsewhere (the one
    ReLU of a torchvision ResNet block, which also follows the residual add) keeps working
    there.

    The fused layer takes over the BN's parameters and buffers (the same tensors: running
    statistics, ``num_batches_tracked``, device, dtype, ``requires_grad``), its eps,
    momentum, affine, track_running_stats, training mode and frozen state, and lives under
    the BN's name, so ``state_dict`` keys are unchanged: a checkpoint of the model loads
    into the result and back, and a module registered under two names keeps both. Keys
    change only where torch.fx drops a module that forward never calls (the result holds
    only what the graph uses). torch.fx traces through containers (``nn.Sequential``, a
    ResNet's ``layer4``): they become plain ``nn.Module`` holding what the graph calls, so
    ``fused.layer4[-1]`` no longer indexes, and hooks on them (or on the model) would never
    run again: such hooks are refused. Every module keeps its training mode.

    The model is traced in training and in eval mode. Where the two graphs differ (a
    forward that branches on ``self.training``: ``F.dropout(x, p, self.training)``,
    stochastic depth, auxiliary outputs) the result holds both, and ``train()`` /
    ``eval()`` switch between them; deep copies, ``torch.save``/``torch.load`` and
    ``state_dict`` keep both. The fused layers refuse double backward
    (``create_graph=True``), and ``torch.jit.trace`` of the result in training mode fails
    (their backward is a Python autograd function): trace it in eval mode.

    Args:
        model: an ``nn.Module`` (deep-copied, then traced) or a ``torch.fx.GraphModule``
            (deep-copied).
        acts: the activations to fuse, among "relu", "leaky_relu", "silu", "identity"
            (or "swish" for "silu", "none" and "linear" for "identity").
            Default: ("relu", "leaky_relu", "silu"); a BN followed by ``nn.Identity`` is
            fused only when "identity" is named.
        save: "input", or "output" for the in-place activated BN (see
            :class:`bnlab.nn.BatchNormAct2d`) where the activation is invertible (leaky ReLU
            with a positive slope, identity) and nothing after it changes its output in place
            (``Dropout(inplace=True)``, ``x.add_(...)``); the other pairs are fused with
            "input", and the report says so.
        return_report: also return a :class:`BNActFusion` for every BatchNorm layer the
            graph calls: what was fused, what was left, and why.

    Returns:
        The new model, a ``torch.fx.GraphModule``; with ``return_report``,
        ``(model, report)``. A summary is logged at INFO, each layer at DEBUG.

    Raises:
        ValueError: the model cannot be traced by torch.fx in either mode (the message
            says where and what to do), hooks would be dropped, or ``acts`` / ``save`` name
            something else.
        TypeError: ``model`` is not an ``nn.Module``, or ``acts`` is not names.

    Example::

        >>> fused, report = bnlab.nn.fuse_bn_act(torchvision.models.resnet50(),
        ...                                      return_report=True)
        >>> sum(r.fused for r in report)
        33
    """
    kinds = _check_acts(acts)
    if save not in SAVES:
        raise ValueError(f"save must be 'input' or 'output' (got {save!r})")
    gm, aliases = _trace(model)
    graphs = _graphs(gm)
    by_target: dict[str, list[fx.Node]] = {}
    for graph in graphs:
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _ANY_BN):
                by_target.setdefault(node.target, []).append(node)
    removed: set[str] = set()  # the activation modules whose calls were fused
    report = [_fuse_calls(gm, target, nodes, kinds, save, removed)
              for target, nodes in by_target.items()]
    _drop_unused_modules(gm, removed)
    _register_aliases(gm, aliases)
    for graph in graphs:
        graph.lint()
    gm.recompile()
    fused = sum(r.fused for r in report)
    logger.info("fuse_bn_act: fused %d of %d BatchNorm layers with their activation, left %d",
                fused, len(report), len(report) - fused)
    for r in report:
        logger.debug("fuse_bn_act: %s", r)
    return (gm, report) if return_report else gm


def _check_acts(acts: Iterable[str]) -> frozenset[str]:
    if isinstance(acts, str):
        acts = (acts,)
    acts = tuple(acts) if isinstance(acts, Iterable) else acts
    if not isinstance(acts, tuple) or not all(isinstance(a, str) for a in acts):
        raise TypeError(f"acts must be a name or a sequence of names of activations among "
                        f"{', '.join(map(repr, ACTIVATIONS))} (got {acts!r})")
    kinds = frozenset(_ALIASES.get(a, a) for a in acts)
    unknown = sorted(str(a) for a in kinds - set(ACTIVATIONS))
    if unknown:
        raise ValueError(f"acts must name activations among {', '.join(map(repr, ACTIVATIONS))} "
                         f"(got {', '.join(unknown)})")
    return kinds


def _trace(model: nn.Module) -> tuple[fx.GraphModule, list[tuple[str, str]]]:
    """A deep copy of ``model`` as a GraphModule, or a ValueError that says why not; and the
    ``(alias, name)`` pairs of modules registered under several names."""
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
        return gm, _aliases(gm)
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("fuse_bn_act needs the Python module: torch.fx cannot trace a "
                        "TorchScript module (fuse before torch.jit.script)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_bn_act takes an nn.Module or a torch.fx.GraphModule "
                        f"(got {type(model).__name__})")
    root = copy.deepcopy(model)
    graphs, inlined = _trace_both_modes(root)
    hooked = [name or f"the model ({type(root).__name__})" for name in sorted(inlined)
              if _hooked(root.get_submodule(name))]
    if hooked:
        raise ValueError(
            f"fuse_bn_act would drop the hooks of {', '.join(hooked)}: torch.fx traces "
            "through these modules (their code becomes part of the graph), so their hooks "
            "would never run again. Remove the hooks and register them on the result (on "
            "the result itself, or on a layer it calls), or trace the model yourself with "
            "a torch.fx.Tracer whose is_leaf_module keeps these modules whole")
    name = type(root).__name__
    src = {mode: graph.python_code("self").src for mode, graph in graphs.items()}
    if src[True] == src[False]:
        gm = fx.GraphModule(root, graphs[root.training], name)
    else:
        gm = _ModalGraphModule(root, graphs, name)
    for qualified, module in gm.named_modules():
        original = root.get_submodule(qualified)
        if module is not original:  # a container torch.fx rebuilt as a plain nn.Module
            module.training = original.training
    return gm, _aliases(root)


def _trace_both_modes(root: nn.Module) -> tuple[dict[bool, fx.Graph], set[str]]:
    """``root``'s graph in training and in eval mode (a forward may branch on
    ``self.training``), and the names of the modules traced through ("" for ``root``);
    ``root`` is left in the modes it had."""
    modes = {name: m.training for name, m in root.named_modules()}
    graphs: dict[bool, fx.Graph] = {}
    inlined = {""}
    try:
        for mode in (True, False):
            tracer = _Tracer()
            graphs[mode] = tracer.trace(root.train(mode))
            inlined |= tracer.inlined
    except Exception as err:  # noqa: BLE001 - tracing runs the user's forward on proxies
        where = _user_frame(err)
        raise ValueError(
            f"fuse_bn_act cannot trace {type(root).__name__} with torch.fx in "
            f"{'training' if mode else 'eval'} mode (it traces both): "
            f"{type(err).__name__}: {err}{where}. Make that code traceable (torch.fx's "
            "'Limitations of Symbolic Tracing'), or trace the model yourself (a torch.fx."
            "Tracer whose is_leaf_module keeps the untraceable part whole, or concrete_args) "
            "and pass the GraphModule; or put bnlab.nn.BatchNormAct2d in the model by "
            "hand") from None
    finally:
        for name, m in root.named_modules():
            m.training = modes[name]
    return graphs, inlined


def _graphs(gm: fx.GraphModule) -> list[fx.Graph]:
    if isinstance(gm, _ModalGraphModule):
        return list(gm.mode_graphs.values())
    return [gm.graph]


class _ModalGraphModule(fx.GraphModule):
    """A GraphModule whose forward differs between training and eval (dropout,
    stochastic depth, auxiliary outputs): it holds one graph per mode, and ``train(mode)``
    (``eval()``) switches to that mode's graph. It holds the modules of both."""

    def __init__(self, root: nn.Module, graphs: dict[bool, fx.Graph],
                 class_name: str = "GraphModule") -> None:
        super().__init__(root, graphs[root.training], class_name)
        for graph in graphs.values():
            graph.owning_module = self
            for node in graph.nodes:
                if node.op in ("call_module", "get_attr") and not _has_attr(self, node.target):
                    _copy_attr(root, self, node.target)
        self.mode_graphs = graphs

    def train(self, mode: bool = True) -> _ModalGraphModule:
        super().train(mode)
        graph = self.mode_graphs[bool(mode)]
        if self.graph is not graph:
            self.graph = graph  # and recompiles forward
        return self

    def recompile(self):
        for graph in self.__dict__.get("mode_graphs", {}).values():
            graph.owning_module = self
        return super().recompile()

    def __deepcopy__(self, memo: dict) -> _ModalGraphModule:
        res = type(self).__new__(type(self))
        memo[id(self)] = res
        state = copy.deepcopy(self.__dict__, memo)
        _ModalGraphModule.__init__(res, _CodeOnlyModule(state), state["mode_graphs"],
                                   type(self).__name__)
        return res

    def __reduce__(self) -> tuple:
        # as GraphModule pickles: the Python code of each graph, traced again when loaded
        body = self.__dict__.copy()
        del body["_graph"], body["mode_graphs"]
        code = {}
        for mode, graph in self.mode_graphs.items():
            python_code = graph.python_code("self")
            code[mode] = (_format_import_block(python_code.globals, sys_importer),
                          python_code.src)
        return _load_modal_graph_module, (body, code, type(self).__name__)


def _load_modal_graph_module(body: dict, code: dict[bool, tuple[str, str]],
                             class_name: str) -> _ModalGraphModule:
    graphs = {mode: fx.graph_module.reduce_graph_module(dict(body, _code=src), imports).graph
              for mode, (imports, src) in code.items()}
    return _ModalGraphModule(_CodeOnlyModule(body), graphs, class_name)


def _has_attr(module: nn.Module, target: str) -> bool:
    try:
        module.get_submodule(target.rpartition(".")[0])
    except AttributeError:
        return False
    return hasattr(module.get_submodule(target.rpartition(".")[0]), target.rpartition(".")[2])


def _aliases(root: nn.Module) -> list[tuple[str, str]]:
    """``(alias, name)`` for each module registered under a second name (``self.b =
    self.a``), ``name`` being the one torch.fx calls it by."""
    first: dict[int, str] = {}
    pairs = []
    for name, m in root.named_modules(remove_duplicate=False):
        if id(m) in first:
            pairs.append((name, first[id(m)]))
        else:
            first[id(m)] = name
    return pairs


def _register_aliases(gm: fx.GraphModule, aliases: list[tuple[str, str]]) -> None:
    """Register each kept module under its aliases too, as the model did (state_dict keys)."""
    for alias, name in aliases:
        if not name or not _has_attr(gm, name) or alias.startswith(name + "."):
            continue
        parent = gm
        *path, leaf = alias.split(".")
        for i, item in enumerate(path):
            if not hasattr(parent, item):
                setattr(parent, item, nn.Module())
            parent = getattr(parent, item)
        setattr(parent, leaf, gm.get_submodule(name))


class _Tracer(fx.Tracer):
    """torch.fx's default tracer, which also keeps every BatchNorm layer whole: a subclass
    defined outside torch.nn would be traced into (and BN's forward cannot be)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inlined: set[str] = set()  # the modules traced through, whose hooks never run

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _ANY_BN) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            name = self.path_of_module(m)
        except NameError:  # not a submodule: torch.fx says so
            return super().call_module(m, forward, args, kwargs)
        if not self.is_leaf_module(m, name):
            self.inlined.add(name)
        return super().call_module(m, forward, args, kwargs)


def _user_frame(err: BaseException) -> str:
    """' (at file:line in function: code)' for the innermost frame of ``err``'s traceback
    outside torch and this module: the model's code that could not be traced."""
    skip = (os.path.dirname(torch.__file__) + os.sep, __file__)  # not torchvision/
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith(skip)]
    if not frames:
        return ""
    f = frames[-1]
    code = f": {f.line.strip()}" if f.line else ""
    return f" (at {os.path.basename(f.filename)}:{f.lineno} in {f.name}{code})"


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        name = _get_qualified_name(node.target)
        return name[1:] if name.startswith("_operator.") else name
    if node.op == "call_method":
        return f"Tensor.{node.target}()"
    if node.op == "output":
        return "the model's output"
    return node.name


def _fuse_calls(gm: fx.GraphModule, target: str, nodes: list[fx.Node], kinds: frozenset[str],
                save: str, removed: set[str]) -> BNActFusion:
    """Fuse BN module ``target`` with its activation at every node that calls it, or at none."""
    bn = gm.get_submodule(target)
    cls = _fusable_bn(bn)
    if isinstance(cls, str):
        return BNActFusion(target, "", False, None, cls)
    matches = [_activation(gm, node, kinds) for node in nodes]
    for found in matches:
        if isinstance(found[0], str):
            calls = max(sum(n.graph is g for n in nodes) for g in {n.graph for n in nodes})
            where = f"at one of its {calls} calls in forward, " if calls > 1 else ""
            return BNActFusion(target, found[1], False, None, where + found[0])
    acts = {act_of(module) for module, _, _ in matches}
    if len(acts) > 1:
        return BNActFusion(target, ", ".join(m[1] for m in matches), False, None,
                           f"called at {len(nodes)} places in forward, followed by different "
                           "activations")
    module, desc, _ = matches[0]
    act = act_of(module)
    note = ""
    mode = save
    if save == "output" and not act.invertible:
        mode = "input"
        note = (f"save='input': {desc} is not invertible, save='output' needs leaky_relu "
                "with a positive slope or identity")
    writer = next(filter(None, (_written_in_place(gm, act_node) for _, _, act_node in matches)),
                  None) if mode == "output" else None
    if writer:  # save="output" keeps the output for backward: it must stay as it is
        mode = "input"
        note = f"save='input': {writer} changes its output in place"
    try:
        new = _fused_layer(bn, cls, copy.deepcopy(module), mode)
    except ValueError as err:  # a value torch's BN takes and bnlab's refuses
        return BNActFusion(target, desc, False, None, f"BatchNormAct refuses it: {err}")
    _set_submodule(gm, target, new)
    for node, (_, _, act_node) in zip(nodes, matches):
        if act_node.op == "call_module":
            removed.add(act_node.target)
        act_node.replace_all_uses_with(node)
        act_node.graph.erase_node(act_node)
    calls = max(sum(n.graph is g for n in nodes) for g in {n.graph for n in nodes})
    if calls > 1:
        desc = f"{desc} (at {calls} calls)"
    return BNActFusion(target, desc, True, mode, note)


_VIEWS = {"view", "view_as", "reshape", "flatten", "unflatten", "transpose", "permute", "t",
          "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "chunk", "split", "unbind",
          "contiguous", "detach", "as_strided", operator.getitem, torch.flatten, torch.reshape,
          torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.chunk,
          torch.split, torch.narrow}


def _written_in_place(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The description of a node that changes ``node``'s value (or a view of it) in place:
    ``Dropout(inplace=True)``, ``x.add_(...)``, ``x[i] = ...``; None if there is none."""
    for user in node.users:
        if not user.args or user.args[0] is not node:
            continue
        if user.op == "call_module":
            inplace = getattr(gm.get_submodule(user.target), "inplace", False) is True
        else:
            name = user.target if isinstance(user.target, str) else getattr(
                user.target, "__name__", "")
            inplace = (user.target is operator.setitem or user.kwargs.get("inplace") is True
                       or name.endswith("_") and not name.endswith("__"))
        if inplace:
            return _describe(gm, user)
        if user.target in _VIEWS:
            found = _written_in_place(gm, user)
            if found:
                return found
    return None


def _fusable_bn(bn: nn.Module) -> type | str:
    """The BatchNormAct class that computes what ``bn`` computes, or why there is none."""
    name = type(bn).__name__
    if isinstance(bn, _BatchNormAct):
        return f"already a {name}"
    mro = type(bn).__mro__
    base = next((c for c in mro if c in _BN_TO_ACT), None)
    changed = [c for c in mro[:mro.index(base)] if set(vars(c)) - _HARMLESS] if base else []
    if base is None or changed and changed[0].__module__.startswith("bnlab."):
        return f"{name} has no fused form (torch.nn's and bnlab.nn's BatchNorm1d/2d/3d have)"
    if changed:
        own = sorted(set(vars(changed[0])) - _HARMLESS)
        return (f"{name} subclasses {base.__name__} and may compute something else "
                f"({changed[0].__name__} defines {', '.join(own[:4])}); a subclass is fused "
                "only when it changes nothing but __init__")
    if "forward" in vars(bn):
        return "its forward was replaced on the instance"
    if _hooked(bn):
        return "it has hooks, which the fused layer would not call"
    if bn._modules or not (set(bn._parameters) <= _BN_STATE[0]
                           and set(bn._buffers) <= _BN_STATE[1]):
        return "it holds submodules, parameters or buffers beyond BatchNorm's"
    return _BN_TO_ACT[base]


def _hooked(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _activation(gm: fx.GraphModule, bn_node: fx.Node, kinds: frozenset[str]
                ) -> tuple[nn.Module, str, fx.Node] | tuple[str, str]:
    """``(activation module, its description, its node)`` when ``bn_node``'s output is read
    only by an activation that can be fused, else ``(reason, description)``."""
    users = list(bn_node.users)
    if not users:
        return "its output is not used", ""
    if len(users) > 1:
        readers = ", ".join(_describe(gm, u) for u in users)
        return f"its output is read by {len(users)} nodes ({readers}), not by one activation", ""
    node = users[0]
    desc = _describe(gm, node)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if act_of(module) is None:
            return f"its output goes to {desc}, not an activation a BatchNormAct fuses", desc
        if _hooked(module):
            return f"{desc} has hooks, which the fused layer would not call", desc
        if tuple(node.args) != (bn_node,) or node.kwargs:
            return f"{desc} is called with more than the BN's output", desc
    else:
        module = _functional_module(node, bn_node)
        if isinstance(module, str):
            return f"its output goes to {desc}{module}", desc
    kind = act_of(module).kind
    if kind not in kinds:
        return f"{kind} is not among acts={tuple(sorted(kinds))}", desc
    return module, desc, node


def _functional_module(node: fx.Node, bn_node: fx.Node) -> nn.Module | str:
    """The activation module that computes what a call_function or call_method node does
    on the BN's output, or the end of a sentence saying why there is none."""
    if node.op == "call_method" and node.target in _METHODS:
        kind, names, inplace = "relu", ("input",), node.target == "relu_"
    elif node.op == "call_function" and node.target in _FUNCTIONS:
        (kind, names), inplace = _FUNCTIONS[node.target], node.target in _INPLACE
    else:
        return ", not an activation a BatchNormAct fuses"
    if len(node.args) > len(names) or set(node.kwargs) - set(names):
        return ", called with arguments it does not take"
    bound = dict(zip(names, node.args), **node.kwargs)
    if bound.get("input") is not bn_node or any(
            a is bn_node for k, a in bound.items() if k != "input"):
        return ", which takes the BN's output as another argument than its input"
    inplace = bound.get("inplace", inplace)
    slope = bound.get("negative_slope", 0.01)
    if not isinstance(inplace, bool):
        return ", whose inplace is not a constant bool"
    if isinstance(slope, bool) or not isinstance(slope, (int, float)):
        return ", whose negative_slope is not a constant number"
    if kind == "relu":
        return nn.ReLU(inplace=inplace)
    if kind == "silu":
        return nn.SiLU(inplace=inplace)
    return nn.LeakyReLU(float(slope), inplace=inplace)


def _fused_layer(bn: nn.Module, cls: type, act: nn.Module, save: str) -> nn.Module:
    """A ``cls`` (BatchNormAct*d) holding ``bn``'s own parameters and buffers."""
    kwargs = {} if not bn.affine or bn.bias is not None else {"bias": False}
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats, device="meta", act=act, save=save,
              **kwargs)
    # every entry taken from bn, None included: no tensor of the meta device is left
    for name in new._parameters:
        new._parameters[name] = bn._parameters.get(name)
    for name in new._buffers:
        new._buffers[name] = bn._buffers.get(name)
    new.frozen = getattr(bn, "frozen", False)
    return new.train(bn.training)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _drop_unused_modules(gm: fx.GraphModule, targets: set[str]) -> None:
    """Remove the activation modules among ``targets`` that no node calls any more (a
    shared one stays where it is still called)."""
    called = {n.target for g in _graphs(gm) for n in g.nodes if n.op == "call_module"}
    for target in sorted(targets - called):
        gm.delete_submodule(target)
