"""Time bnlab's BatchNorm against torch.nn's, interleaved in one run.

    bnlab bench [--repeats 15] [--device cpu] [--dtype float32,float64,bfloat16] [--quick]
    bnlab bench --fused
    bnlab bench --latency
    bnlab bench lab          (the lab's training speed: bnlab bench lab --help)
    bnlab bench resnet       (a ResNet's training step: bnlab bench resnet --help)

For every shape and dtype, bnlab and torch alternate within each repeat (so a slow moment of
the machine hits both), and the ratio of the median times bnlab/torch is printed last: below
1 means bnlab is faster. Training-mode forward, and forward plus backward, are timed. Each
row also gives the memory floor: the time the bytes BN must move take at the machine's
copy bandwidth, measured at the start (forward: read x twice, write y; forward+backward:
also read x and dy twice each and write dx), bnlab's time as a multiple of it, and the
share of that bandwidth bnlab reaches (% bw). On a GPU two large layers, (256, 256, 56, 56)
in NCHW and NHWC, are added, torch's layer is cuDNN's, and the backward returns its
gradients rather than accumulating them into the input's ``.grad`` (on CPU it accumulates,
which both layers pay), so that the time is BN's own. A last line compares the accuracy of
both layers on a large-offset float32 input.

Then BatchNorm fused with ReLU (``bnlab.nn.BatchNormAct2d``) is timed, forward plus
backward, alternating within each repeat as above. On CPU against bnlab's BatchNorm2d
followed by ``torch.nn.functional.relu``, on (32, 64, 56, 56) float32 in NCHW and
channels_last: the ratio fused/unfused (below 1: the fusion saves time). On CUDA in each
``--dtype``, on the large layers too, against torch's BatchNorm2d followed by relu in place
(cuDNN; ``x torch``) and against bnlab's BatchNorm2d then relu (``x bnlab``), with the
fused layer's share of the copy bandwidth. ``--fused`` prints only these rows.

``--latency`` instead times the first training step (forward and backward) of two fresh
processes sharing an empty kernel cache: the first compiles bnlab's kernels, the second
loads them from the cache.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as TF

import bnlab.nn as bnn
from bnlab.nn import _kernels

# (label, input shape, memory format)
SHAPES: list[tuple[str, tuple[int, ...], torch.memory_format]] = [
    ("mlp", (60, 100), torch.contiguous_format),
    ("mlp", (256, 1024), torch.contiguous_format),
    ("conv NCHW", (32, 64, 56, 56), torch.contiguous_format),
    ("conv NHWC", (32, 64, 56, 56), torch.channels_last),
    ("conv NCHW", (128, 256, 14, 14), torch.contiguous_format),
    ("conv NHWC", (128, 256, 14, 14), torch.channels_last),
]
# on a GPU also large layers, where the share of the memory bandwidth reached is the measure
LARGE_SHAPES = [
    ("conv NCHW", (256, 256, 56, 56), torch.contiguous_format),
    ("conv NHWC", (256, 256, 56, 56), torch.channels_last),
]


@dataclass(frozen=True)
class Result:
    label: str
    shape: tuple[int, ...]
    dtype: str
    mode: str
    bnlab_ms: float
    torch_ms: float
    floor_ms: float  # the bytes that must move, at the measured copy bandwidth

    @property
    def ratio(self) -> float:
        return self.bnlab_ms / self.torch_ms


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor | None,
          after: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[], None]:
    """One call of ``after(layer(x))`` (``after`` None: ``layer(x)``), and with ``grad`` its
    backward. On CPU the backward accumulates into ``x.grad`` and the parameters' ``.grad``
    as a training step does to leaves; on CUDA it returns the gradients instead
    (``torch.autograd.grad``), so that the time is the layer's own, comparable with the
    memory floor, as it is for a layer inside a network, whose input is no leaf."""
    inputs = [x, *(p for p in layer.parameters() if p.requires_grad)]

    def run() -> None:
        y = layer(x) if after is None else after(layer(x))
        if grad is None:
            return
        if x.is_cuda:
            torch.autograd.grad(y, inputs, grad)
        else:
            y.backward(grad)
    return run


def time_pair(shape: tuple[int, ...], fmt: torch.memory_format, backward: bool, repeats: int,
              device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """Median milliseconds per call of (bnlab, torch), alternating the two each repeat."""
    make = {2: (bnn.BatchNorm1d, nn.BatchNorm1d), 4: (bnn.BatchNorm2d, nn.BatchNorm2d)}[len(shape)]
    x = torch.randn(*shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    x.requires_grad_(backward)
    grad = torch.randn_like(x) if backward else None
    runs = [_step(cls(shape[1], device=device, dtype=_param_dtype(dtype)), x, grad)
            for cls in make]
    ours, theirs = _alternate(runs, repeats, device)
    return ours, theirs


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    """BN's parameters for ``dtype`` inputs: float32, as under autocast, or float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _alternate(runs: list[Callable[[], None]], repeats: int, device: torch.device) -> list[float]:
    """Median milliseconds per call of each run, after two warm-up rounds; each repeat calls
    every run once, starting one further along the list each time (with two runs: alternately
    first), so that a slow moment of the machine hits all of them."""
    times: list[list[float]] = [[] for _ in runs]
    for i in range(repeats + 2):  # two warm-up rounds
        for k in range(len(runs)):
            j = (i + k) % len(runs)
            _sync(device)
            t0 = time.perf_counter()
            runs[j]()
            _sync(device)
            if i >= 2:
                times[j].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


# BatchNorm fused with ReLU against BatchNorm then ReLU: (label, shape, memory format)
FUSED_SHAPES = [
    ("NCHW", (32, 64, 56, 56), torch.contiguous_format),
    ("NHWC", (32, 64, 56, 56), torch.channels_last),
]
FUSED_LARGE_SHAPES = [  # on a GPU also the large layers, against cuDNN
    ("NCHW", (256, 256, 56, 56), torch.contiguous_format),
    ("NHWC", (256, 256, 56, 56), torch.channels_last),
]


@dataclass(frozen=True)
class FusedResult:
    label: str
    shape: tuple[int, ...]
    fused_ms: float  # bnlab.nn.BatchNormAct2d(act="relu"), forward + backward
    unfused_ms: float  # bnlab.nn.BatchNorm2d, then torch.nn.functional.relu
    dtype: str = "float32"
    torch_ms: float | None = None  # torch.nn.BatchNorm2d, then relu in place (on CUDA)
    floor_ms: float | None = None  # the fused layer's bytes at the copy bandwidth

    @property
    def ratio(self) -> float:
        return self.fused_ms / self.unfused_ms

    @property
    def torch_ratio(self) -> float | None:
        return None if self.torch_ms is None else self.fused_ms / self.torch_ms


def time_fused(shape: tuple[int, ...], fmt: torch.memory_format, repeats: int,
               device: torch.device, dtype: torch.dtype = torch.float32,
               against_torch: bool = False) -> list[float]:
    """Median milliseconds of a training forward and backward of BatchNormAct2d with ReLU
    and of bnlab's BatchNorm2d then relu (and, ``against_torch``, of torch's BatchNorm2d then
    relu in place, as torchvision's networks apply it) on ``shape``, alternating them."""
    x = torch.randn(*shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    x.requires_grad_()
    grad = torch.randn_like(x)
    params = dict(device=device, dtype=_param_dtype(dtype))
    runs = [_step(bnn.BatchNormAct2d(shape[1], act="relu", **params), x, grad),
            _step(bnn.BatchNorm2d(shape[1], **params), x, grad, after=TF.relu)]
    if against_torch:
        runs.append(_step(nn.BatchNorm2d(shape[1], **params), x, grad,
                          after=lambda v: TF.relu(v, inplace=True)))
    return _alternate(runs, repeats, device)


def run_fused(repeats: int = 15, device: str = "cpu",
              dtypes: tuple[str, ...] = ("float32",)) -> list[FusedResult]:
    """BatchNormAct2d(relu) against bnlab's BatchNorm2d then relu, on CPU in float32; on
    CUDA in each of ``dtypes``, on the large layers too, and against torch's BatchNorm2d then
    relu (cuDNN) as well, with the fused layer's memory floor."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return [FusedResult(label, shape, *time_fused(shape, fmt, repeats, dev))
                for label, shape, fmt in FUSED_SHAPES]
    bandwidth = copy_bandwidth(dev)
    results = []
    for dtype in dtypes:
        dt = getattr(torch, dtype)
        for label, shape, fmt in FUSED_SHAPES + FUSED_LARGE_SHAPES:
            fused, unfused, theirs = time_fused(shape, fmt, repeats, dev, dt, against_torch=True)
            floor = PASSES["forward+backward"] * _nbytes(shape, dt) / bandwidth * 1e3
            results.append(FusedResult(label, shape, fused, unfused, dtype, theirs, floor))
    return results


def large_offset_error(n: int = 512, channels: int = 3, offset: float = 1e7,
                       seed: int = 5) -> tuple[float, float]:
    """Largest |y - y_float64| of bnlab's and torch's float32 BatchNorm1d on ``offset`` plus
    unit noise (pytorch#5410), the reference being float64 BN of the same float32 values."""
    gen = torch.Generator().manual_seed(seed)
    x = (offset + torch.randn(n, channels, generator=gen, dtype=torch.float64)).float()
    ref = bnn.BatchNorm1d(channels, affine=False, dtype=torch.float64)(x.double())
    ours = bnn.BatchNorm1d(channels, affine=False)(x)
    theirs = nn.BatchNorm1d(channels, affine=False)(x)
    return float((ours.double() - ref).abs().max()), float((theirs.double() - ref).abs().max())


def copy_bandwidth(device: torch.device, repeats: int = 9, nbytes: int | None = None) -> float:
    """Bytes per second that a plain copy of ``nbytes`` moves (one read and one write of each
    byte): by default 64 MiB on CPU, and on a GPU 1 GiB, far past its last-level cache
    (50 MB on an H100), so that the copy runs at the speed of its memory."""
    if nbytes is None:
        nbytes = 1 << (30 if device.type == "cuda" else 26)
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[1:])


# Tensor-sized reads and writes at the least, for a reduction that does not fit in cache:
# the forward reads x for the statistics and again to normalize, and writes y; the backward
# reads dy and x for its two sums, again to form dx, and writes dx.
PASSES = {"forward": 3, "forward+backward": 8}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.finfo(dtype).bits // 8


def run(repeats: int = 15, device: str = "cpu", dtypes: tuple[str, ...] = ("float32",),
        quick: bool = False) -> list[Result]:
    dev = torch.device(device)
    bandwidth = copy_bandwidth(dev)
    results = []
    for dtype in dtypes:
        dt = getattr(torch, dtype)
        shapes = SHAPES[:3] if quick else SHAPES + (LARGE_SHAPES if dev.type == "cuda" else [])
        for label, shape, fmt in shapes:
            for mode, passes in PASSES.items():
                ours, theirs = time_pair(shape, fmt, mode != "forward", repeats, dev, dt)
                results.append(Result(label, shape, dtype, mode, ours, theirs,
                                      passes * _nbytes(shape, dt) / bandwidth * 1e3))
    return results


# One training step of a small and of a large layer, each timed from a fresh process.
_FIRST_STEP = """
import sys, time, torch, bnlab.nn as bnn
torch.set_num_threads(int(sys.argv[1]))
for layer, shape in ((bnn.BatchNorm1d(100), (60, 100)), (bnn.BatchNorm2d(64), (32, 64, 56, 56))):
    x = torch.randn(*shape, requires_grad=True)
    t0 = time.perf_counter()
    layer(x).sum().backward()
    print(time.perf_counter() - t0)
"""
LATENCY_SHAPES = ((60, 100), (32, 64, 56, 56))


def first_step_seconds(threads: int) -> list[list[float]]:
    """Seconds of the first training step per shape in LATENCY_SHAPES, in a first and a
    second process with one fresh, empty kernel cache between them."""
    with tempfile.TemporaryDirectory(prefix="bnlab-cache-") as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        runs = []
        for _ in range(2):
            done = subprocess.run([sys.executable, "-c", _FIRST_STEP, str(threads)], env=env,
                                  capture_output=True, text=True, check=True)
            runs.append([float(v) for v in done.stdout.split()])
        return runs


def parse_device(parser: argparse.ArgumentParser, text: str, what: str) -> torch.device:
    """``--device``'s value as a torch device that this machine has, cpu or cuda; else
    the parser's one-line error."""
    try:
        device = torch.device(text)
    except RuntimeError:
        parser.error(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {text}: this torch ({torch.__version__}) sees no CUDA "
                     "device; use --device cpu, or a CUDA build of torch on a machine with a GPU")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {text}: {what} runs on cpu or cuda")
    return device


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lab"]:
        from .lab import main as lab_main
        return lab_main(argv[1:])
    if argv[:1] == ["resnet"]:
        from .resnet import main as resnet_main
        return resnet_main(argv[1:])
    parser = argparse.ArgumentParser(prog="bnlab bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per layer (default 15)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default="float32,float64,bfloat16",
                        help="comma-separated from float32, float64, float16, bfloat16 "
                        "(default: float32,float64,bfloat16)")
    parser.add_argument("--quick", action="store_true", help="only the first three shapes")
    parser.add_argument("--fused", action="store_true",
                        help="only BatchNorm fused with ReLU against BatchNorm then ReLU")
    parser.add_argument("--latency", action="store_true",
                        help="time the first training step of a process, with an empty and "
                        "with a filled kernel cache, instead")
    parser.error = lambda message: parser.exit(2, f"bnlab bench: error: {message} "
                                                  "(see bnlab bench --help)\n")
    args = parser.parse_args(argv)
    if not 1 <= args.repeats <= 10_000:
        parser.error(f"--repeats must be from 1 to 10000 (got {args.repeats})")
    device = parse_device(parser, args.device, "bench")
    dtypes = tuple(d.strip() for d in args.dtype.split(",") if d.strip())
    bad = [d for d in dtypes if d not in ("float32", "float64", "float16", "bfloat16")]
    if bad or not dtypes:
        parser.error(f"--dtype {args.dtype!r}: expected float32, float64, float16 or bfloat16")
    if args.latency:
        print(f"first training step (forward + backward), {torch.get_num_threads()} threads; "
              f"bnlab kernels: {_kernels.describe()}")
        first, second = first_step_seconds(torch.get_num_threads())
        for shape, cold, warm in zip(LATENCY_SHAPES, first, second):
            print(f"{str(shape):<20} empty cache {cold:7.2f} s   filled cache {warm:7.2f} s")
        return 0
    print(f"torch {torch.__version__}, {describe_device(device)}, median of {args.repeats}")
    if args.fused:
        _print_fused(args.repeats, args.device, dtypes)
        print(f"bnlab kernels: {_kernels.describe() if device.type == 'cpu' else _gpu_kernels()}")
        return 0
    print(f"{'layer':<10} {'shape':<20} {'dtype':<9} {'mode':<17} {'bnlab ms':>9} {'torch ms':>9} "
          f"{'floor ms':>9} {'x floor':>8} {'% bw':>5} {'ratio':>6}")
    for r in run(args.repeats, args.device, dtypes, args.quick):
        print(format_row(r))
    ours, theirs = large_offset_error()
    print(f"accuracy, float32 input 1e7 + unit noise (512 x 3), max |y - y_float64|: "
          f"bnlab {ours:.2g}, torch {theirs:.2g}")
    _print_fused(args.repeats, args.device, dtypes)
    print(f"bnlab kernels: {_kernels.describe() if device.type == 'cpu' else _gpu_kernels()}")
    return 0


def _print_fused(repeats: int, device: str, dtypes: tuple[str, ...]) -> None:
    if torch.device(device).type != "cuda":
        print("BatchNorm2d + ReLU, float32, forward+backward: fused (BatchNormAct2d) against "
              "BatchNorm2d then relu")
        print(f"{'fused':<10} {'shape':<20} {'layout':<9} {'fused ms':>9} {'unfused ms':>10} "
              f"{'ratio':>6}")
        for r in run_fused(repeats, device):
            print(f"{'fused':<10} {str(r.shape):<20} {r.label:<9} {r.fused_ms:9.3f} "
                  f"{r.unfused_ms:10.3f} {r.ratio:6.3g}")
        return
    print("BatchNorm2d + ReLU, forward+backward: fused (BatchNormAct2d) against torch's "
          "BatchNorm2d then relu in place (cuDNN), and against bnlab's BatchNorm2d then relu")
    print(f"{'fused':<10} {'shape':<20} {'layout':<9} {'dtype':<9} {'fused ms':>9} "
          f"{'torch ms':>9} {'x torch':>8} {'bnlab ms':>9} {'x bnlab':>8} {'% bw':>5}")
    for r in run_fused(repeats, device, dtypes):
        print(format_fused_row(r))


def format_row(r: Result) -> str:
    """A row of the table: times, the memory floor, bnlab's multiple and share of it, the
    ratio bnlab/torch last."""
    return (f"{r.label:<10} {str(r.shape):<20} {r.dtype:<9} {r.mode:<17} {r.bnlab_ms:9.3f} "
            f"{r.torch_ms:9.3f} {r.floor_ms:9.3g} {r.bnlab_ms / r.floor_ms:8.1f} "
            f"{100 * r.floor_ms / r.bnlab_ms:5.0f} {r.ratio:6.3g}")


def format_fused_row(r: FusedResult) -> str:
    """A row of the fused table on CUDA (``r`` timed against torch's BN + relu too)."""
    return (f"{'fused':<10} {str(r.shape):<20} {r.label:<9} {r.dtype:<9} {r.fused_ms:9.3f} "
            f"{r.torch_ms:9.3f} {r.torch_ratio:8.3g} {r.unfused_ms:9.3f} {r.ratio:8.3g} "
            f"{100 * r.floor_ms / r.fused_ms:5.0f}")


def describe_device(device: torch.device) -> str:
    """The device as a benchmark's header names it: a GPU's model and CUDA version, or the
    CPU's model and torch's thread count."""
    if device.type == "cuda":
        return (f"{device} ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()})")
    return f"{device} ({_cpu_model()}), {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _gpu_kernels() -> str:
    from bnlab.nn import _triton

    if not _triton.available():
        return "Triton not installed: the torch-op path (pip install 'bnlab[triton]')"
    import triton

    return f"Triton {triton.__version__}"


if __name__ == "__main__":
    raise SystemExit(main())
