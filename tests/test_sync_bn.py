"""SyncBatchNorm: over several processes it is BatchNorm on the concatenated batch.

Each multi-process test starts its processes once (gloo over 127.0.0.1) and checks several
cases in them; the reference is torch.nn.BatchNorm in float64 on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnlab.nn as bnn
from bnlab.nn.sync import merge_moments
from distributed_helpers import run_world

TOL = dict(rtol=1e-10, atol=1e-10)
# (input shape after N, batch sizes per rank, layout, affine, track_running_stats, momentum)
CASES = [
    ((3, 4, 5), (5, 0, 3), "contiguous", True, True, 0.1),  # uneven, one rank empty
    ((3, 4, 5), (2, 3, 4), "channels_last", True, True, 0.1),
    ((4,), (1, 1, 3), "contiguous", False, True, None),  # one value on a rank, cumulative
    ((2, 6), (3, 3, 3), "permuted", True, False, 0.1),  # no running statistics
]


def whole_batch(shape: tuple, sizes: tuple, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64) * 3 + 1e4  # a large offset
    return x, torch.randn(n, *shape, generator=gen, dtype=torch.float64)


def share(t: torch.Tensor, sizes: tuple, rank: int) -> torch.Tensor:
    lo = sum(sizes[:rank])
    return t[lo:lo + sizes[rank]]


def layout(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if how == "permuted":  # (N, C, L) stored as (L, N, C)
        return x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    return x


def layer(cls, c: int, affine: bool, track: bool, momentum) -> nn.Module:
    bn = cls(c, affine=affine, track_running_stats=track, momentum=momentum).double()
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 2, c))
            bn.bias.copy_(torch.linspace(-1, 1, c))
    if track:
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    return bn


def _cases(rank: int, world: int) -> list[dict]:
    results = []
    for i, (shape, sizes, how, affine, track, momentum) in enumerate(CASES):
        x, g = whole_batch(shape, sizes, seed=i)
        bn = layer(bnn.SyncBatchNorm, shape[0], affine, track, momentum)
        xs = layout(share(x, sizes, rank), how).requires_grad_()
        out = {}
        for step in range(2):  # two steps: the running statistics build on the first
            y = bn(xs)
            if step == 0:
                y.backward(share(g, sizes, rank))
                out["y"], out["dx"] = y.detach(), xs.grad
                out["stride_ok"] = xs.grad.stride() == xs.stride() or xs.numel() == 0
        out["params"] = {k: v.grad for k, v in bn.named_parameters()}
        out["buffers"] = {k: v.clone() for k, v in bn.named_buffers()}
        results.append(out)
    return results


@pytest.fixture(scope="module")
def three_ranks():
    return run_world(_cases, 3)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_equals_batchnorm_on_the_concatenated_batch(three_ranks, i):
    shape, sizes, how, affine, track, momentum = CASES[i]
    x, g = whole_batch(shape, sizes, seed=i)
    ref = layer(nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d, shape[0], affine,
                track, momentum)
    xr = x.clone().requires_grad_()
    y = ref(xr)
    y.backward(g)
    ref(x)
    per_rank = [r[i] for r in three_ranks]
    torch.testing.assert_close(torch.cat([r["y"] for r in per_rank]), y.detach(), **TOL)
    torch.testing.assert_close(torch.cat([r["dx"] for r in per_rank]), xr.grad, **TOL)
    assert all(r["stride_ok"] for r in per_rank)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(sum(r["params"][name] for r in per_rank), p.grad, **TOL)
    for name, b in ref.named_buffers():
        for r in per_rank:  # every process holds the same running statistics
            torch.testing.assert_close(r["buffers"][name], b, **TOL)


def _too_few(rank: int, world: int) -> tuple:
    bn = bnn.SyncBatchNorm(3)
    x = torch.randn(1 if rank == 0 else 0, 3)
    try:
        bn(x)
    except ValueError as exc:
        message = str(exc)
    else:
        message = "no error"
    # every share empty: as BatchNorm, an empty output, not counted, and a backward
    empty = torch.randn(0, 3, requires_grad=True)
    bn(empty).sum().backward()
    empty_ok = (empty.grad.shape == (0, 3) and int(bn.num_batches_tracked) == 0
                and torch.equal(bn.weight.grad, torch.zeros(3)))
    # eval needs no communication: only rank 0 calls the layer, twice, and nothing waits
    bn.eval()
    if rank == 0:
        bn(torch.randn(4, 3))
        bn(torch.randn(4, 3))
    dist.barrier()
    # eval without running statistics: each process's own batch statistics, refused locally
    # for one value per channel as torch refuses it (nothing is exchanged, nothing waits)
    local = bnn.SyncBatchNorm(3, track_running_stats=False).eval()
    try:
        local(torch.randn(1, 3) if rank == 0 else torch.randn(4, 3))
    except ValueError as exc:
        local_message = str(exc)
    else:
        local_message = "no error"
    return message, empty_ok, local_message


def test_one_value_in_all_raises_on_every_rank_and_eval_is_local():
    results = run_world(_too_few, 2)
    assert all(m.startswith("Expected more than 1 value per channel when training, got input "
                            "size torch.Size([")
               and "1 value per channel over all 2 processes" in m for m, _, _ in results)
    assert all(empty_ok for _, empty_ok, _ in results)
    assert results[0][2].startswith("Expected more than 1 value per channel when training, got "
                                    "input size torch.Size([1, 3]) (in eval too")
    assert results[1][2] == "no error"


def _channels_differ(rank: int, world: int) -> tuple:
    c = 3 + rank  # rank 0 builds SyncBatchNorm(3), rank 1 SyncBatchNorm(4)
    bn = bnn.SyncBatchNorm(c)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    errors = []
    for _ in range(2):  # a refused call is checked again the next time
        try:
            bn(torch.randn(4, c, 2))
        except Exception as exc:  # noqa: BLE001 (the test checks the type)
            errors.append((type(exc).__name__, isinstance(exc, ValueError), str(exc)))
        else:
            errors.append(None)
    error = errors[0] if errors[0] == errors[1] else ("differs", errors)
    unchanged = all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())
    # the group is still in step: a layer of one channel count works on both
    same = bnn.SyncBatchNorm(2)
    y = same(torch.randn(3, 2, generator=torch.Generator().manual_seed(rank)))
    return error, unchanged, tuple(y.shape)


def test_different_channel_counts_raise_the_same_error_on_every_rank():
    results = run_world(_channels_differ, 2)
    errors = [r[0] for r in results]
    assert errors[0] is not None and errors[0] == errors[1]  # the same error on both ranks
    name, is_value_error, message = errors[0]
    assert name == "ShapeError" and is_value_error
    assert "different channel counts (rank 0: 3, rank 1: 4)" in message
    assert "same num_features on every process" in message
    assert all(unchanged and shape == (3, 2) for _, unchanged, shape in results)


def test_merge_moments_is_exact_for_large_offsets():
    x = torch.randn(50, 2, dtype=torch.float64) + 1e8
    parts = torch.stack([torch.stack([torch.full((2,), float(len(p))), p.mean(0),
                                      (p - p.mean(0)).square().sum(0)]) for p in x.split(17)])
    n, mean, var = merge_moments(parts)
    assert n.tolist() == [50.0, 50.0]
    torch.testing.assert_close(mean, x.mean(0), rtol=0, atol=1e-7)
    # float64 holds 1e8 to 1.5e-8: the parts' means carry that much, E[x^2] - E[x]^2 far more
    torch.testing.assert_close(var, x.var(0, unbiased=False), rtol=1e-7, atol=0)
    naive = x.square().mean(0) - x.mean(0).square()
    assert ((naive - x.var(0, unbiased=False)).abs() > 1e-3).any()


def test_outside_a_process_group_it_is_batchnorm_exactly():
    x = torch.randn(8, 3, 4, 4)
    sync, bn = bnn.SyncBatchNorm(3), bnn.BatchNorm2d(3)
    assert torch.equal(sync(x), bn(x))
    assert torch.equal(sync.running_var, bn.running_var)
    assert list(sync.state_dict()) == list(nn.BatchNorm2d(3).state_dict())


def test_signature_and_repr_match_torch():
    import inspect
    ours = inspect.signature(bnn.SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(nn.SyncBatchNorm.__init__).parameters
    assert [(p.name, p.default) for p in ours.values()] == \
        [(p.name, p.default) for p in theirs.values()]
    assert repr(bnn.SyncBatchNorm(5)) == repr(nn.SyncBatchNorm(5))
    assert isinstance(bnn.SyncBatchNorm(5), nn.SyncBatchNorm)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        bnn.SyncBatchNorm(5)(torch.randn(5))


def test_convert_shares_state_and_leaves_variants():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3),
                          nn.Sequential(bnn.BatchNorm1d(4, affine=False), bnn.GhostBatchNorm(4, 2)),
                          bnn.BatchRenorm2d(3))
    model[1].eval()
    bn = model[1]
    converted = bnn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is bnn.SyncBatchNorm and type(converted[2][0]) is bnn.SyncBatchNorm
    assert converted[1].weight is bn.weight and converted[1].running_var is bn.running_var
    assert not converted[1].training and converted[2][0].weight is None
    assert type(converted[2][1]) is bnn.GhostBatchNorm
    assert type(converted[3]) is bnn.BatchRenorm2d
    single = bnn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(4))
    assert type(single) is bnn.SyncBatchNorm
