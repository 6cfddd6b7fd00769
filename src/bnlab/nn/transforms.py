"""Model transforms. Each returns a new model (a deep copy) and leaves its argument alone.

* :func:`convert_to_bnlab` / :func:`convert_to_torch`: swap every BatchNorm1d/2d/3d between
  ``torch.nn`` and ``bnlab.nn``, keeping parameters, buffers, mode and ``requires_grad``.
* :func:`freeze` / :func:`unfreeze`: every BN layer frozen for good (see
  :meth:`bnlab.nn.BatchNorm2d.freeze`).
* :func:`fold`: fold each BN into the Linear or Conv that precedes it in an ``nn.Sequential``,
  for inference; :func:`fold_weights` is the pure function on tensors behind it.
* :func:`~bnlab.nn.fuse.fuse_bn_act` (in :mod:`bnlab.nn.fuse`): each BN whose output only its
  activation reads becomes one ``BatchNormAct*d``.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, fx, nn

from ._errors import ShapeError
from .act import _BatchNormAct
from .functional import affine_from_stats
from .modules import TORCH_HAS_BIAS_FLAG, BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["convert_to_bnlab", "convert_to_torch", "fold", "fold_weights", "freeze", "unfreeze"]

_TORCH_TO_BNLAB: dict[type, type] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_BNLAB_TO_TORCH = {v: k for k, v in _TORCH_TO_BNLAB.items()}
_ANY_BN = (nn.modules.batchnorm._BatchNorm, _BatchNorm)
_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _replace_modules(model: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Deep-copy ``model`` and replace each submodule m for which ``swap(m)`` is not None."""
    model = copy.deepcopy(model)
    replaced = swap(model)
    if replaced is not None:
        return replaced
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = swap(child)
            if new is not None:
                setattr(parent, name, new)
    return model


def _rebuild_bn(bn: nn.Module, cls: type) -> nn.Module:
    p = next(iter(bn.parameters(recurse=False)), bn.running_mean)
    kwargs = {}
    if bn.affine and bn.bias is None:
        if cls in _BNLAB_TO_TORCH.values() and not TORCH_HAS_BIAS_FLAG:
            raise ValueError("cannot convert a BatchNorm with bias=False: this torch "
                             f"{torch.__version__} has no bias flag")
        kwargs["bias"] = False
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats,
              device=None if p is None else p.device, dtype=None if p is None else p.dtype,
              **kwargs)
    new.load_state_dict(bn.state_dict())
    new.train(bn.training)
    for name, param in bn.named_parameters(recurse=False):
        getattr(new, name).requires_grad_(param.requires_grad)
    return new


def convert_to_bnlab(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``torch.nn.BatchNorm1d/2d/3d`` replaced by bnlab's."""
    return _replace_modules(model, lambda m: _rebuild_bn(m, _TORCH_TO_BNLAB[type(m)])
                            if type(m) in _TORCH_TO_BNLAB else None)


def convert_to_torch(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every bnlab BatchNorm1d/2d/3d replaced by ``torch.nn``'s.

    Frozen bnlab layers cannot keep their guarantee in torch and are refused, and so are
    ``BatchNormAct*d`` layers, which torch has no layer for.
    """
    fused = [name for name, m in model.named_modules() if isinstance(m, _BatchNormAct)]
    if fused:
        raise ValueError(
            f"cannot convert {', '.join(map(repr, fused[:3]))}{' ...' if len(fused) > 3 else ''} "
            f"({type(model.get_submodule(fused[0])).__name__}) to torch.nn: torch has no "
            "BatchNorm with an activation; convert the model before bnlab.nn.fuse_bn_act, "
            "or replace the layer by a torch BatchNorm and its .act yourself")
    def swap(m: nn.Module) -> nn.Module | None:
        if type(m) not in _BNLAB_TO_TORCH:
            return None
        if m.frozen:
            raise ValueError("cannot convert a frozen bnlab BatchNorm to torch.nn: torch's "
                             "layers would unfreeze on model.train(); unfreeze it first")
        return _rebuild_bn(m, _BNLAB_TO_TORCH[type(m)])
    return _replace_modules(model, swap)


def freeze(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BN layers (torch's converted to bnlab's) are all frozen.

    Frozen layers normalize with their running statistics, receive no gradient, never update
    their running statistics, and stay in eval mode through any later ``model.train()``.
    """
    model = convert_to_bnlab(model)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.freeze()
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every bnlab BN layer unfrozen and set to ``model``'s mode."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.unfreeze()
    return model.train(model.training)


def fold_weights(weight: Tensor, bias: Tensor | None, running_mean: Tensor, running_var: Tensor,
                 bn_weight: Tensor | None, bn_bias: Tensor | None,
                 eps: float) -> tuple[Tensor, Tensor]:
    """Fold inference-mode BN into the preceding layer's weight (out, in, *kernel) and bias.

    BN(W x + b) = scale * (W x + b) + shift = (scale * W) x + (scale * b + shift).
    """
    if weight.shape[0] != running_mean.shape[0]:
        raise ShapeError(f"layer has {weight.shape[0]} output features but BN has "
                         f"{running_mean.shape[0]} channels")
    scale, shift = affine_from_stats(running_mean, running_var, bn_weight, bn_bias, eps)
    new_weight = weight * scale.view([-1] + [1] * (weight.dim() - 1))
    new_bias = shift if bias is None else bias * scale + shift
    return new_weight, new_bias


def _fold_pair(layer: nn.Module, bn: nn.Module) -> nn.Module:
    if not bn.track_running_stats:
        raise ValueError("cannot fold a BN with track_running_stats=False: it normalizes with "
                         "batch statistics even in eval")
    new = copy.deepcopy(layer)
    with torch.no_grad():
        w, b = fold_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var,
                            bn.weight, bn.bias, bn.eps)
        new.weight.copy_(w)
        if new.bias is None:
            new.bias = nn.Parameter(b.to(new.weight.dtype))
        else:
            new.bias.copy_(b)
    return new


def fold(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference with each BN folded into the layer before it.

    A BN (torch's or bnlab's) directly after a Linear or Conv1d/2d/3d inside an
    ``nn.Sequential`` (where registration order is execution order) is merged into that
    layer and replaced by ``nn.Identity`` (a ``BatchNormAct*d`` by its activation). In a
    ``torch.fx.GraphModule`` (what :func:`fuse_bn_act` returns), so is a BN module call
    whose input is a Linear or Conv module call read by nothing else, where neither module
    is called anywhere else; the GraphModule keeps only its eval-mode graph. The result
    equals ``model`` in eval mode and costs no BN at all. Raises ``ValueError`` in training
    mode, where BN uses batch statistics and no fixed map exists.
    """
    if model.training or any(m.training for m in model.modules()):
        raise ValueError("fold() needs a model in eval mode (call model.eval() first): in "
                         "training BN uses batch statistics, which no folded layer can reproduce")
    model = copy.deepcopy(model)
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for prev, name in zip(names, names[1:]):
            layer, bn = seq._modules[prev], seq._modules[name]
            if isinstance(layer, _FOLDABLE) and isinstance(bn, _ANY_BN):
                seq._modules[prev] = _fold_pair(layer, bn)
                # a BatchNormAct keeps its activation (its drop is an identity)
                seq._modules[name] = bn.act if isinstance(bn, _BatchNormAct) else nn.Identity()
    if isinstance(model, fx.GraphModule):
        model = _fold_graph(model)
    return model


def _fold_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """``fold`` in a GraphModule's graph: each BN call on a Linear/Conv call's output."""
    from .fuse import _ModalGraphModule, _set_submodule  # fuse imports this module

    if isinstance(gm, _ModalGraphModule):  # the result is for inference: its graph
        gm = fx.GraphModule(gm, gm.graph, type(gm).__name__)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        prev = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1
                and calls[prev.target] == calls[node.target] == 1 and len(node.args) == 1
                and not node.kwargs):
            continue
        layer, bn = gm.get_submodule(prev.target), gm.get_submodule(node.target)
        if not (isinstance(layer, _FOLDABLE) and isinstance(bn, _ANY_BN)):
            continue
        _set_submodule(gm, prev.target, _fold_pair(layer, bn))
        if isinstance(bn, _BatchNormAct):  # the activation stays, under the BN's name
            _set_submodule(gm, node.target, bn.act)
        else:
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm
