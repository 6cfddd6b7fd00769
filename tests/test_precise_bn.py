"""update_bn_stats: running statistics set to the exact population statistics of each BN
layer's inputs, and nothing else changed."""

import copy

import pytest
import torch
from torch import nn

import bnlab.nn as bnn


def model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), bnn.BatchNorm1d(5, momentum=0.3), nn.ReLU(),
                         nn.Dropout(0.5), nn.Linear(5, 4), nn.BatchNorm1d(4)).to(dtype)


def data(sizes=(7, 3, 12, 5), dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, 6, generator=gen, dtype=dtype) * 3 + 100 for n in sizes]


def test_sets_the_exact_population_statistics_of_every_layer():
    net, batches = model(), data()
    net.eval()  # dropout stays off; the BN layers run in training mode inside
    used = bnn.update_bn_stats(net, batches)
    assert used == 4
    first = torch.cat([net[0](x) for x in batches])  # layer 1 input: the linear map
    torch.testing.assert_close(net[1].running_mean, first.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[1].running_var, first.var(0, unbiased=True), rtol=1e-12,
                               atol=1e-12)
    # layer 2 sees layer 1 normalizing with each batch's own statistics, as in training
    second = []
    for x in batches:
        h = net[0](x)
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + net[1].eps)
        h = torch.relu(h * net[1].weight + net[1].bias)
        second.append(net[4](h))
    second = torch.cat(second)
    torch.testing.assert_close(net[5].running_mean, second.mean(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(net[5].running_var, second.var(0, unbiased=True), rtol=1e-10,
                               atol=1e-10)
    # not the mean of per-batch variances: that misses the spread of the batch means
    per_batch = torch.stack([net[0](x).var(0, unbiased=True) for x in batches]).mean(0)
    assert not torch.allclose(per_batch, net[1].running_var, rtol=1e-3)


def test_nothing_but_the_running_statistics_changes():
    net, batches = model(), data()
    net.train()
    net[3].eval()  # a mode of the user's own
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    momenta = [net[1].momentum, net[5].momentum]
    rng = torch.get_rng_state()
    bnn.update_bn_stats(net, [(x, torch.zeros(len(x))) for x in batches])  # (x, y) batches
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1.running_mean", "1.running_var", "5.running_mean", "5.running_var"}
    assert [m.training for m in net.modules()] == modes
    assert [net[1].momentum, net[5].momentum] == momenta
    assert torch.equal(torch.get_rng_state(), rng)


def test_torch_layers_channels_last_half_and_max_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 3, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
          for _ in range(5)]
    consumed = []

    def stream():
        for x in xs:
            consumed.append(x)
            yield x
    assert bnn.update_bn_stats(net, stream(), max_batches=3) == 3
    assert len(consumed) <= 4  # the generator is not drained
    z = torch.cat([net[0](x) for x in xs[:3]]).double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(net[1].running_mean, z.mean(1).float())
    torch.testing.assert_close(net[1].running_var, z.var(1).float())
    half = nn.Sequential(bnn.BatchNorm1d(3)).to(torch.bfloat16)
    bnn.update_bn_stats(half, [torch.randn(8, 3, generator=gen).to(torch.bfloat16)])
    assert half[0].running_var.dtype == torch.bfloat16


def test_frozen_layers_and_errors():
    net = model()
    net[1].freeze()
    kept = net[1].running_mean.clone()
    bnn.update_bn_stats(net, data())
    assert torch.equal(net[1].running_mean, kept) and net[1].frozen
    before = {k: v.clone() for k, v in model().state_dict().items()}
    fresh = model()
    with pytest.raises(ValueError, match="no batches"):
        bnn.update_bn_stats(fresh, [])
    with pytest.raises(TypeError, match="a batch must be a tensor"):
        bnn.update_bn_stats(fresh, ["not a tensor"])
    with pytest.raises(ValueError, match="max_batches must be"):
        bnn.update_bn_stats(fresh, data(), max_batches=0)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        bnn.update_bn_stats(nn.Linear(2, 2), data())
    for k, v in fresh.state_dict().items():  # a failed call changed nothing
        assert torch.equal(v, before[k]), k


def test_renorm_layers_read_the_running_statistics_training_left():
    """Batch Renorm's r and d come from the running statistics: during the pass they must
    stay what training left, so every batch sees the same correction."""
    torch.manual_seed(0)
    brn = bnn.BatchRenorm1d(3, r_max=2.0, d_max=1.0)
    brn.running_mean.fill_(5.0)  # far from the data: r and d clip
    brn.running_var.fill_(0.25)
    net = nn.Sequential(brn, nn.Linear(3, 3, bias=False), bnn.BatchNorm1d(3))
    batches = [torch.randn(8, 3) for _ in range(6)]
    with torch.no_grad():  # the second BN's inputs as training would make them
        held = [net[1](bnn.BatchRenorm1d.forward(copy.deepcopy(brn).train(), x)) for x in batches]
    bnn.update_bn_stats(net, batches)
    seen = torch.cat(held)
    torch.testing.assert_close(net[2].running_mean, seen.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net[2].running_var, seen.var(0), rtol=1e-5, atol=1e-6)


def test_a_layer_the_batches_never_reach_is_named():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = bnn.BatchNorm1d(3), bnn.BatchNorm1d(3)

        def forward(self, x):
            return self.used(x)

    net = Branchy()
    before = net.unused.running_var.clone()
    with pytest.raises(ValueError, match="layer unused saw 0 value"):
        bnn.update_bn_stats(net, [torch.randn(4, 3)])
    assert torch.equal(net.unused.running_var, before)


def test_a_bare_tensor_is_refused_naming_the_mistake():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), bnn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TypeError, match=r"batches must be an iterable of batches, not a tensor "
                       r"\(got a Tensor of size \(8, 3, 6, 6\)\); pass a DataLoader, or \[x\]"):
        bnn.update_bn_stats(net, torch.randn(8, 3, 6, 6))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    bnn.update_bn_stats(net, [torch.randn(8, 3, 6, 6)])  # as the message says


def test_non_finite_batches_are_left_out_as_the_layers_leave_them_out(caplog):
    """The layers skip a batch whose statistics are not finite (README); so does the pass,
    per layer, with a warning, and the statistics are those of the finite batches."""
    net, batches = model().eval(), data()  # dropout off: the same draws in both passes
    bad = batches[1].clone()
    bad[0, 2] = float("nan")  # reaches every channel of both layers through the Linear
    expected = model().eval()
    bnn.update_bn_stats(expected, [batches[0], batches[2], batches[3]])
    with caplog.at_level("WARNING", logger="bnlab.nn.precise"):
        assert bnn.update_bn_stats(net, [batches[0], bad, batches[2], batches[3]]) == 4
    for i in (1, 5):
        assert torch.isfinite(net[i].running_var).all()
        torch.testing.assert_close(net[i].running_mean, expected[i].running_mean, rtol=0, atol=0)
        torch.testing.assert_close(net[i].running_var, expected[i].running_var, rtol=0, atol=0)
    messages = [r.getMessage() for r in caplog.records]
    assert any("layer 1 left out 1 of 4 batches whose statistics are not finite" in m
               for m in messages), messages


def test_only_non_finite_batches_raise_and_change_nothing():
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    inf = torch.full((4, 6), float("inf"), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer 1 saw 0 value\(s\) per channel \(2 non-finite "
                       r"batches left out\); .*no running statistics were changed"):
        bnn.update_bn_stats(net, [inf, inf])
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
