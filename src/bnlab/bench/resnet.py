"""``bnlab bench resnet``: one training step of torchvision's ResNet with torch's BatchNorm,
with bnlab's, and with bnlab's BatchNorm fused with its activation.

    bnlab bench resnet [--device cpu] [--model resnet50] [--batch 64] [--size 224]
                       [--repeats 10] [--layout nchw,channels_last] [--dtype auto]

A step is a forward, the cross-entropy loss, a backward and an SGD step (momentum 0.9) under
automatic mixed precision: ``torch.autocast`` in float16 on CUDA (with a gradient scaler),
bfloat16 on CPU (``--dtype`` chooses; float32 turns autocast off). The network is
``torchvision.models.NAME(weights=None)``, built once from one seed; the three variants are
copies of it with the same weights:

- ``torch BN``: the network as torchvision builds it;
- ``bnlab BN``: ``bnlab.nn.convert_to_bnlab`` of it;
- ``bnlab BN+act``: then ``bnlab.nn.fuse_bn_act``, which turns each BatchNorm followed by
  its ReLU into one ``BatchNormAct2d`` (a BatchNorm followed by the residual addition stays
  a BatchNorm).

For each layout (NCHW, channels_last: the network and its input), the variants alternate
within each repeat, after two warm-up rounds, and on CUDA each step ends with
``torch.cuda.synchronize``. The table gives the median milliseconds per step and the ratio to
torch's (below 1: faster than torch). The first step of every variant starts from the same
weights and batch, so the three first-step losses must agree within the rounding of the
autocast dtype; they are printed, and the command exits with status 1 where they do not.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as TF

from .layer import parse_device

import bnlab.nn as bnn

from .layer import _alternate, _sync, describe_device


MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
VARIANTS = ("torch BN", "bnlab BN", "bnlab BN+act")
# How far a first-step loss may fall from torch's, relative to max(1, |loss|): a few units
# of the autocast dtype's rounding (bfloat16 keeps 8 bits, float16 11, float32 24), as the
# three variants round their BatchNorm outputs at different places.
LOSS_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}
NUM_CLASSES = 1000
LR, MOMENTUM = 0.01, 0.9


class TorchvisionMissing(ImportError):
    """torchvision, which builds the network, cannot be imported."""


@dataclass(frozen=True)
class StepTime:
    layout: str  # "nchw" or "channels_last"
    variant: str  # one of VARIANTS
    ms: float  # median milliseconds per training step
    first_loss: float  # the loss of the variant's first step
    torch_ms: float  # torch BN's median in the same layout

    @property
    def ratio(self) -> float:
        return self.ms / self.torch_ms


@dataclass(frozen=True)
class ResnetBench:
    """What :func:`run` measured: a row per layout and variant, and what it ran."""

    model: str
    batch: int
    size: int
    device: str
    amp: torch.dtype  # the autocast dtype (float32: autocast off)
    repeats: int
    rows: list[StepTime]
    fused: str  # how many BatchNorm layers the fused variant fused, or why it is absent

    @property
    def tolerance(self) -> float:
        return LOSS_TOLERANCE[self.amp]

    def loss_gap(self, layout: str) -> float:
        """The largest |first loss - torch's first loss| / max(1, |torch's|) in ``layout``."""
        rows = [r for r in self.rows if r.layout == layout]
        ref = next(r.first_loss for r in rows if r.variant == VARIANTS[0])
        return max(abs(r.first_loss - ref) for r in rows) / max(1.0, abs(ref))

    @property
    def losses_agree(self) -> bool:
        return all(math.isfinite(r.first_loss) for r in self.rows) and all(
            self.loss_gap(layout) <= self.tolerance for layout in {r.layout for r in self.rows})


def torchvision_model(name: str) -> nn.Module:
    """``torchvision.models.<name>(weights=None)``, or :class:`TorchvisionMissing` that says
    how to install torchvision."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)} (got {name!r})")
    try:
        import torchvision.models
    except ImportError as exc:
        raise TorchvisionMissing(
            "bnlab bench resnet needs torchvision: pip install torchvision (the build that "
            f"matches this torch, {torch.__version__})") from exc
    except Exception as exc:  # noqa: BLE001 - a torchvision built for another torch fails anyhow
        raise TorchvisionMissing(
            f"torchvision could not be imported ({type(exc).__name__}: {exc}): it must be the "
            f"build that matches this torch ({torch.__version__}); reinstall it with pip "
            "install torchvision from the same index as torch") from exc
    return getattr(torchvision.models, name)(weights=None)


def variants(model: nn.Module) -> tuple[dict[str, nn.Module], str]:
    """The networks to time, with ``model``'s weights: torch's BN, bnlab's, and bnlab's BN
    fused with its activation; and a line on what the fusion did (or why it is absent)."""
    ours = bnn.convert_to_bnlab(model)
    nets = {VARIANTS[0]: model, VARIANTS[1]: ours}
    fuse = getattr(bnn, "fuse_bn_act", None)
    if fuse is None:
        return nets, "bnlab BN+act: absent, this bnlab has no bnlab.nn.fuse_bn_act"
    fused = fuse(ours)
    total = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    done = sum(isinstance(m, bnn.BatchNormAct2d) for m in fused.modules())
    nets[VARIANTS[2]] = fused
    return nets, (f"bnlab BN+act: {done} of {total} BatchNorm layers fused with the activation "
                  "after them")


def amp_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The autocast dtype for ``name`` ("auto": float16 on CUDA, bfloat16 elsewhere, float32
    where this torch has no autocast for the device)."""
    if name not in ("auto", "float16", "bfloat16", "float32"):
        raise ValueError(f"dtype must be auto, float16, bfloat16 or float32 (got {name!r})")
    if name == "auto":
        name = "float16" if device.type == "cuda" else "bfloat16"
    dtype = getattr(torch, name)
    if dtype != torch.float32:
        try:
            with torch.autocast(device.type, dtype=dtype):
                pass
        except (RuntimeError, ValueError) as exc:
            if name != "auto":
                raise ValueError(f"dtype {name}: this torch ({torch.__version__}) has no "
                                 f"autocast in {name} on {device.type} ({exc})") from exc
            return torch.float32
    return dtype


def training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                  amp: torch.dtype) -> Callable[[], torch.Tensor]:
    """One SGD training step of ``model`` on ``(x, target)`` under autocast in ``amp``
    (float16: with a gradient scaler, as mixed-precision training does); it returns the
    step's loss (not synchronised)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    scaler = _grad_scaler(x.device) if amp == torch.float16 else None

    def step() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=amp, enabled=amp != torch.float32):
            loss = TF.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return loss.detach()
    return step


def _grad_scaler(device: torch.device):
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler(enabled=device.type == "cuda")


def time_layout(nets: dict[str, nn.Module], layout: str, batch: int, size: int,
                device: torch.device, amp: torch.dtype, repeats: int,
                seed: int = 0) -> list[StepTime]:
    """Median milliseconds per training step of each network in ``layout``, alternating them
    within each repeat, with the loss of each one's first step (on the same batch)."""
    fmt = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device, memory_format=fmt)
    target = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    first: dict[str, float] = {}
    runs = []
    for name, net in nets.items():
        net = _copy_to(net, device, fmt)
        runs.append(_recording(training_step(net, x, target, amp), name, first))
    medians = _alternate(runs, repeats, device)
    return [StepTime(layout, name, ms, first[name], medians[0])
            for name, ms in zip(nets, medians)]


def _copy_to(net: nn.Module, device: torch.device, fmt: torch.memory_format) -> nn.Module:
    import copy

    net = copy.deepcopy(net).to(device).train()
    return net.to(memory_format=fmt)


def _recording(step: Callable[[], torch.Tensor], name: str,
               first: dict[str, float]) -> Callable[[], None]:
    """``step``, keeping its first loss in ``first[name]`` (read once, in the warm-up)."""
    def run() -> None:
        loss = step()
        if name not in first:
            first[name] = float(loss)
    return run


@contextlib.contextmanager
def _cudnn_autotuned(device: torch.device) -> Iterator[None]:
    """cuDNN's algorithm search on, as training scripts set it, for this run only."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda" or before
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def run(model: str = "resnet50", device: str = "cpu", batch: int = 64, size: int = 224,
        repeats: int = 10, layouts: tuple[str, ...] = ("nchw", "channels_last"),
        dtype: str = "auto", seed: int = 0) -> ResnetBench:
    """Time a training step of ``torchvision.models.<model>`` with each BatchNorm variant.

    Raises:
        TorchvisionMissing: torchvision cannot be imported.
        ValueError: an argument out of range (the message names it).
    """
    _check(model, batch, size, repeats, layouts)
    dev = torch.device(device)
    amp = amp_dtype(dev, dtype)
    with torch.random.fork_rng(devices=[]):  # the weights from ``seed``, torch's RNG untouched
        torch.manual_seed(seed)
        net = torchvision_model(model)
    nets, fused = variants(net)
    rows: list[StepTime] = []
    with _cudnn_autotuned(dev):
        for layout in layouts:
            rows += time_layout(nets, layout, batch, size, dev, amp, repeats, seed)
            if dev.type == "cuda":
                torch.cuda.empty_cache()  # the next layout's copies start from free memory
    _sync(dev)
    return ResnetBench(model, batch, size, str(dev), amp, repeats, rows, fused)


def _check(model: str, batch: int, size: int, repeats: int, layouts: tuple[str, ...]) -> None:
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)} (got {model!r})")
    if not 2 <= batch <= 4096:  # BN in training needs two values per channel at the 1x1 end
        raise ValueError(f"batch must be from 2 to 4096 (got {batch})")
    if not 32 <= size <= 1024:  # a ResNet halves the image five times
        raise ValueError(f"size must be from 32 to 1024 pixels (got {size})")
    if not 1 <= repeats <= 10_000:
        raise ValueError(f"repeats must be from 1 to 10000 (got {repeats})")
    bad = [lay for lay in layouts if lay not in LAYOUTS]
    if bad or not layouts:
        raise ValueError(f"layouts must be among nchw, channels_last (got {', '.join(layouts)})")


def _layouts(text: str) -> tuple[str, ...]:
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    return tuple(dict.fromkeys("channels_last" if n == "nhwc" else n for n in names))


def report(bench: ResnetBench) -> list[str]:
    """The lines ``bnlab bench resnet`` prints for ``bench``."""
    amp = "off (float32)" if bench.amp == torch.float32 else str(bench.amp).replace("torch.", "")
    lines = [f"{bench.model}, batch {bench.batch}, {bench.size}x{bench.size}, autocast {amp}; "
             f"training step (forward, backward, SGD step), median of {bench.repeats}",
             bench.fused,
             f"{'layout':<14} {'variant':<13} {'ms/step':>9} {'x torch':>8} {'first loss':>11}"]
    for r in bench.rows:
        lines.append(f"{r.layout:<14} {r.variant:<13} {r.ms:9.2f} {r.ratio:8.3f} "
                     f"{r.first_loss:11.5f}")
    gap = max(bench.loss_gap(layout) for layout in dict.fromkeys(r.layout for r in bench.rows))
    verdict = "agree" if bench.losses_agree else "DISAGREE"
    lines.append(f"first-step losses {verdict}: largest difference from torch's {gap:.2g} "
                 f"(relative to max(1, |loss|); tolerance {bench.tolerance:g} for autocast {amp})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bnlab bench resnet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--model", default="resnet50", choices=MODELS,
                        help="torchvision network (default resnet50)")
    parser.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--size", type=int, default=224,
                        help="image height and width in pixels (default 224)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed steps per variant and layout (default 10)")
    parser.add_argument("--layout", default="nchw,channels_last",
                        help="comma-separated from nchw, channels_last (default: both)")
    parser.add_argument("--dtype", default="auto",
                        help="autocast dtype: auto (float16 on CUDA, bfloat16 on CPU), float16, "
                        "bfloat16, or float32 for none (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and batch")
    parser.error = lambda message: parser.exit(2, f"bnlab bench resnet: error: {message} "
                                                  "(see bnlab bench resnet --help)\n")
    args = parser.parse_args(argv)
    device = parse_device(parser, args.device, "bench resnet")
    layouts = _layouts(args.layout)
    try:
        _check(args.model, args.batch, args.size, args.repeats, layouts)
        amp_dtype(device, args.dtype)
    except ValueError as exc:  # the message names the Python argument: name the option
        text = str(exc)
        for word, flag in (("batch", "--batch"), ("size", "--size"), ("repeats", "--repeats"),
                           ("layouts", "--layout"), ("dtype", "--dtype")):
            if text.startswith(word + " "):
                text = flag + text[len(word):]
        parser.error(text)
    try:
        bench = run(args.model, args.device, args.batch, args.size, args.repeats, layouts,
                    args.dtype, args.seed)
    except TorchvisionMissing as exc:
        print(f"bnlab bench resnet: {exc}", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {describe_device(device)}")
    for line in report(bench):
        print(line)
    return 0 if bench.losses_agree else 1
