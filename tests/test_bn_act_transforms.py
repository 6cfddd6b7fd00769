"""BatchNormAct*d through bnlab.nn's model transforms: each keeps the activation (a
converter that drops it, as timm#1254 reports of convert_sync_batchnorm, changes the model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn as bnn


def _model(act: str = "leaky_relu") -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), bnn.BatchNormAct2d(4, act=act), nn.Conv2d(4, 2, 1))
    with torch.no_grad():  # running statistics and an affine map that are not the defaults
        m(torch.randn(8, 3, 7, 7) * 3 + 1)
        m[1].weight.uniform_(0.5, 2.0)
        m[1].bias.uniform_(-1.0, 1.0)
    return m


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu"])
def test_convert_sync_batchnorm_keeps_the_activation(act):
    model = _model(act).eval()
    sync = bnn.SyncBatchNorm.convert_sync_batchnorm(model)
    layer = sync[1]
    assert type(layer) is bnn.SyncBatchNormAct and isinstance(layer, bnn.SyncBatchNorm)
    assert layer.act is model[1].act and type(layer.drop) is nn.Identity
    assert list(layer.state_dict()) == list(model[1].state_dict())
    assert layer.weight is model[1].weight and layer.running_mean is model[1].running_mean
    x = torch.randn(5, 3, 7, 7)
    with torch.no_grad():  # eval: running statistics, no collective needed
        assert torch.allclose(sync(x), model(x), atol=1e-6)
        bn = model[1]
        without = model[2](nn.functional.batch_norm(model[0](x), bn.running_mean,
                                                    bn.running_var, bn.weight, bn.bias,
                                                    False, 0.0, bn.eps))
        assert not torch.allclose(sync(x), without, atol=1e-3)  # the activation counts here


def test_sync_batchnorm_act_alone():
    layer = bnn.SyncBatchNormAct(4, act=nn.ReLU()).eval()
    x = torch.randn(3, 4, 2, 2)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.relu(x / (1 + 1e-5) ** 0.5))
    assert type(bnn.SyncBatchNormAct(4).act) is nn.Identity


def test_fold_keeps_the_activation():
    model = _model("relu").eval()
    folded = bnn.fold(model)
    assert type(folded[1]) is nn.ReLU
    x = torch.randn(5, 3, 7, 7)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_freeze_keeps_the_activation():
    model = _model("leaky_relu")
    frozen = bnn.freeze(model).train()  # frozen layers stay in eval
    x = torch.randn(5, 3, 7, 7)
    with torch.no_grad():
        assert torch.allclose(frozen(x), model.eval()(x), atol=1e-6)
        z = model[0](x)
        bn_only = nn.functional.batch_norm(z, model[1].running_mean, model[1].running_var,
                                           model[1].weight, model[1].bias, False, 0.0, 1e-5)
        assert torch.allclose(frozen[1](z), nn.functional.leaky_relu(bn_only, 0.01), atol=1e-6)
