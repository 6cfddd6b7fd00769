"""Ghost BN, freezing, conversion, folding, and the error messages users see."""

import copy

import pytest
import torch
from torch import nn

import bnlab.nn as bnn


# -- ghost --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 4), (6, 4, 3, 3)])
def test_ghost_with_one_virtual_batch_equals_batchnorm(shape):
    gen = torch.Generator().manual_seed(0)
    ghost = bnn.GhostBatchNorm(4, virtual_batch_size=shape[0], dtype=torch.float64)
    plain = (bnn.BatchNorm1d if len(shape) == 2 else bnn.BatchNorm2d)(4, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ghost(xa), plain(xb)
        torch.testing.assert_close(ya, yb, rtol=0, atol=1e-14)
        (ya * x).sum().backward()
        (yb * x).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-13)
    torch.testing.assert_close(ghost.running_var, plain.running_var, rtol=0, atol=1e-14)
    assert ghost.num_batches_tracked.item() == plain.num_batches_tracked.item() == 3


def test_ghost_normalizes_each_virtual_batch_and_updates_once_per_step():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    x[4:8] += 10  # the middle virtual batch has its own centre
    ghost = bnn.GhostBatchNorm(3, virtual_batch_size=4, momentum=1.0, affine=False,
                               dtype=torch.float64)
    y = ghost(x)
    for chunk in y.split(4):
        torch.testing.assert_close(chunk.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert ghost.num_batches_tracked.item() == 1
    # momentum 1: running stats are exactly the whole batch's (unbiased variance)
    torch.testing.assert_close(ghost.running_mean, x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, x.var(0, unbiased=True), rtol=1e-12, atol=1e-12)


def test_ghost_errors():
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 must divide the batch size \(got batch size 10\)"):
        bnn.GhostBatchNorm(3, virtual_batch_size=4)(torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, "
                       r"got input size torch.Size\(\[10, 3\]\) \(1 per channel in each virtual "
                       r"batch of virtual_batch_size=1\).*use a virtual_batch_size of 2 or more"):
        bnn.GhostBatchNorm(3, virtual_batch_size=1)(torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"virtual_batch_size must be a positive int \(got 0\)"):
        bnn.GhostBatchNorm(3, virtual_batch_size=0)
    assert "virtual_batch_size=4" in repr(bnn.GhostBatchNorm(3, virtual_batch_size=4))
    bnn.GhostBatchNorm(3, virtual_batch_size=4).eval()(torch.randn(10, 3))  # any size in eval
    no_stats = bnn.GhostBatchNorm(3, virtual_batch_size=4, track_running_stats=False).eval()
    x = torch.randn(10, 3)
    torch.testing.assert_close(no_stats(x), bnn.BatchNorm1d(3, track_running_stats=False)(x))


# -- freezing -----------------------------------------------------------------------------
def _mlp(bn_cls=nn.BatchNorm1d):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), bn_cls(6), nn.ReLU(), nn.Linear(6, 2))


def test_frozen_layer_stays_frozen_through_parent_train():
    model = bnn.freeze(_mlp())
    bn = model[1]
    assert isinstance(bn, bnn.BatchNorm1d) and bn.frozen
    before = copy.deepcopy(bn.state_dict())
    model.train()
    assert model.training and not bn.training
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4) * 5 + 3).square().mean().backward()
        opt.step()
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert bn.weight.grad is None
    thawed = bnn.unfreeze(model)
    assert thawed[1].training and not thawed[1].frozen and thawed[1].weight.requires_grad
    thawed(torch.randn(8, 4))
    assert thawed[1].num_batches_tracked.item() == before["num_batches_tracked"].item() + 1


def test_frozen_flag_survives_training_attribute_set_directly():
    bn = bnn.BatchNorm1d(3).freeze()
    bn.training = True  # bypassing train(); forward still treats it as frozen
    bn(torch.randn(4, 3))
    assert bn.num_batches_tracked.item() == 0


def test_torch_requires_grad_false_does_not_freeze():
    """The complaint bnlab fixes (pytorch#86590)."""
    bn = nn.BatchNorm1d(3).requires_grad_(False)
    bn(torch.randn(4, 3))
    assert bn.num_batches_tracked.item() == 1


# -- conversion ---------------------------------------------------------------------------
def test_convert_round_trip_keeps_state_mode_and_output():
    model = _mlp()
    model(torch.randn(16, 4))
    model[1].weight.requires_grad_(False)
    model.eval()
    ours = bnn.convert_to_bnlab(model)
    assert isinstance(ours[1], bnn.BatchNorm1d) and isinstance(model[1], nn.BatchNorm1d)
    assert not ours[1].training and not ours[1].weight.requires_grad
    back = bnn.convert_to_torch(ours)
    assert type(back[1]) is nn.BatchNorm1d
    x = torch.randn(5, 4)
    torch.testing.assert_close(ours(x), model(x))
    torch.testing.assert_close(back(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v) and torch.equal(back.state_dict()[k], v)


def test_convert_handles_a_bare_layer_and_refuses_frozen():
    assert isinstance(bnn.convert_to_bnlab(nn.BatchNorm2d(3)), bnn.BatchNorm2d)
    with pytest.raises(ValueError, match="cannot convert a frozen bnlab BatchNorm"):
        bnn.convert_to_torch(bnn.BatchNorm2d(3).freeze())


# -- folding ------------------------------------------------------------------------------
@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, bnn.BatchNorm2d])
def test_fold_conv_and_linear_equal_unfolded_in_eval(bn_cls):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), bn_cls(8), nn.ReLU(),
        nn.Conv2d(8, 4, 3, groups=2), bn_cls(4), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5))
    for _ in range(5):
        model(torch.randn(16, 3, 8, 8) * 2 + 1)
    model.eval()
    folded = bnn.fold(model)
    x = torch.randn(7, 3, 8, 8)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, bnn.BatchNorm2d)) for m in folded.modules())
    assert any(isinstance(m, (nn.BatchNorm2d, bnn.BatchNorm2d)) for m in model.modules())


def test_fold_refuses_training_mode_and_batch_statistics():
    model = nn.Sequential(nn.Linear(3, 4), bnn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="needs a model in eval mode"):
        bnn.fold(model)
    model = nn.Sequential(nn.Linear(3, 4), bnn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bnn.fold(model)


def test_fold_weights_reports_both_sizes():
    with pytest.raises(ValueError, match="layer has 4 output features but BN has 5 channels"):
        bnn.fold_weights(torch.ones(4, 3), None, torch.zeros(5), torch.ones(5), None, None, 1e-5)


# -- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,x,msg", [
    (bnn.BatchNorm1d, torch.randn(2, 3, 4, 5), r"expected 2D or 3D input \(got 4D input\)"),
    (bnn.BatchNorm2d, torch.randn(2, 3, 4), r"expected 4D input \(got 3D input\)"),
    (bnn.BatchNorm3d, torch.randn(2, 3, 4, 4), r"expected 5D input \(got 4D input\)"),
    (bnn.BatchNorm2d, torch.randn(2, 5, 4, 4), r"expected input with 3 channels at dim 1 \(num_features\), got 5"),
    (bnn.BatchNorm1d, torch.randn(1, 3), r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 3\]\)"),
    (bnn.BatchNorm2d, torch.randn(1, 3, 1, 1), r"more than 1 value per channel"),
])
def test_bad_input_messages(cls, x, msg):
    with pytest.raises(ValueError, match=msg):
        cls(3)(x)


def test_single_value_is_fine_in_eval_and_type_errors():
    bnn.BatchNorm1d(3).eval()(torch.randn(1, 3))
    with pytest.raises(TypeError, match=r"expected a floating-point input \(got torch.int64\)"):
        bnn.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"expected a torch.Tensor input \(got list\)"):
        bnn.BatchNorm1d(3)([[1.0, 2.0, 3.0]])


@pytest.mark.parametrize("kw,msg", [
    (dict(num_features=0), r"num_features must be a positive int \(got 0\)"),
    (dict(num_features=3.0), r"num_features must be a positive int \(got 3.0\)"),
    (dict(num_features=3, eps=-1.0), r"eps must be a finite number >= 0 \(got -1.0\)"),
    (dict(num_features=3, momentum=0.99 + 1), r"momentum must be None or a number in \[0, 1\] \(got 1.99\)"),
])
def test_bad_hyperparameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        bnn.BatchNorm1d(**kw)
