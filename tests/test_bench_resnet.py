"""``bnlab bench resnet``: the three variants, their first-step losses, the table, and the
errors, on CPU at a tiny size. No assertion reads a time.

torchvision is not a dependency of bnlab (CI does not install it), so most tests give the
command a small residual network of the same make (conv, BN, ReLU; a block whose ReLU also
follows the residual addition, as torchvision's do); one test runs torchvision's own
resnet18 where torchvision imports."""

from __future__ import annotations

import importlib
import importlib.abc
import sys

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.bench import resnet
from bnlab.bench.layer import main as bench_main
from conftest import ResNetBlock


def small_resnet(name: str) -> nn.Module:
    assert name in resnet.MODELS
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU(inplace=True), ResNetBlock(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, resnet.NUM_CLASSES))


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(resnet, "torchvision_model", small_resnet)


def table(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.startswith(("nchw", "channels_last"))]


def test_main_times_three_variants_in_both_layouts(small, capsys):
    code = bench_main(["resnet", "--batch", "2", "--size", "32", "--repeats", "1",
                       "--model", "resnet18"])
    out = capsys.readouterr().out
    rows = table(out)
    assert code == 0, out
    assert [(r[0], " ".join(r[1:-3])) for r in rows] == [
        (lay, v) for lay in ("nchw", "channels_last") for v in resnet.VARIANTS]
    assert all(float(r[-3]) > 0 for r in rows)  # ms/step
    assert [float(r[-2]) for r in rows][::3] == [1.0, 1.0]  # torch's ratio to itself
    losses = [float(r[-1]) for r in rows]
    assert all(abs(v - losses[0]) < 0.05 for v in losses)  # same weights, same batch
    assert "cpu (" in out and "batch 2, 32x32, autocast" in out
    assert "2 of 3 BatchNorm layers fused" in out  # stem and bn1; bn2 meets the addition
    assert "first-step losses agree" in out


def test_run_returns_the_rows_and_the_same_first_loss(small):
    bench = resnet.run("resnet18", batch=2, size=32, repeats=1, layouts=("nchw",),
                       dtype="float32")
    assert bench.amp == torch.float32 and len(bench.rows) == 3
    assert {r.variant for r in bench.rows} == set(resnet.VARIANTS)
    assert bench.loss_gap("nchw") <= 1e-5 and bench.losses_agree
    # same weights as built from the seed: the loss of a fresh copy at the same batch
    torch.manual_seed(0)
    net = small_resnet("resnet18")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    y = torch.randint(0, resnet.NUM_CLASSES, (2,), generator=gen)
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(net.train()(x), y))
    assert bench.rows[0].first_loss == pytest.approx(loss, rel=1e-6)


def test_variants_share_weights_and_fuse_bn_relu():
    torch.manual_seed(1)
    net = small_resnet("resnet18")
    nets, note = resnet.variants(net)
    assert list(nets) == list(resnet.VARIANTS)
    assert sum(isinstance(m, bnn.BatchNorm2d) and not isinstance(m, bnn.BatchNormAct2d)
               for m in nets["bnlab BN"].modules()) == 3
    assert sum(isinstance(m, bnn.BatchNormAct2d) for m in nets["bnlab BN+act"].modules()) == 2
    keys = net.state_dict().keys()
    for other in list(nets.values())[1:]:
        state = other.state_dict()
        assert state.keys() == keys
        assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert note.startswith("bnlab BN+act: 2 of 3")


def test_disagreeing_losses_fail_the_command(small, monkeypatch, capsys):
    """A variant whose first loss differs beyond the tolerance makes the exit status 1."""
    real = resnet.variants

    def broken(model):
        nets, note = real(model)
        fused = nets["bnlab BN+act"]
        with torch.no_grad():
            next(m for m in fused.modules() if isinstance(m, nn.Linear)).bias[0] += 10.0
        return nets, note
    monkeypatch.setattr(resnet, "variants", broken)
    code = bench_main(["resnet", "--batch", "2", "--size", "32", "--repeats", "1",
                       "--layout", "nchw", "--dtype", "float32"])
    assert code == 1 and "first-step losses DISAGREE" in capsys.readouterr().out


def test_torchvision_absent_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision: ImportError
    code = bench_main(["resnet", "--batch", "2", "--size", "32", "--repeats", "1"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "needs torchvision: pip install torchvision" in err


class _BrokenTorchvision(importlib.abc.MetaPathFinder):
    """A torchvision built for another torch: its import fails, not with an ImportError."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


def test_torchvision_built_for_another_torch_is_one_line(monkeypatch, capsys):
    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTorchvision(), *sys.meta_path])
    code = bench_main(["resnet", "--batch", "2", "--size", "32", "--repeats", "1"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "torchvision could not be imported (RuntimeError: operator torchvision::nms" in err
    assert f"matches this torch ({torch.__version__})" in err


@pytest.mark.parametrize("args,message", [
    (["--batch", "1"], "--batch must be from 2 to 4096 (got 1)"),
    (["--size", "16"], "--size must be from 32 to 1024 pixels (got 16)"),
    (["--repeats", "0"], "--repeats must be from 1 to 10000 (got 0)"),
    (["--layout", "nchw,tiled"], "--layout must be among nchw, channels_last (got nchw, tiled)"),
    (["--dtype", "float8"], "--dtype must be auto, float16, bfloat16 or float32 (got 'float8')"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "mps"],
     "sees no CUDA device" if not torch.cuda.is_available() else "runs on cpu or cuda"),
    (["--model", "vgg11"], "invalid choice: 'vgg11'"),
])
def test_bad_options_are_one_line_errors(small, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        bench_main(["resnet", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1


def test_torchvision_resnet18_tiny(torchvision_models, capsys):
    code = bench_main(["resnet", "--batch", "2", "--size", "32", "--repeats", "1",
                       "--model", "resnet18", "--layout", "channels_last", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 0 and len(table(out)) == 3
    assert "9 of 20 BatchNorm layers fused" in out  # the stem's and each block's bn1
