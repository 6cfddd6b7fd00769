"""``bnlab bench lab``: the lab's training speed against a plain PyTorch loop and the
machine's matrix-product peak.

    bnlab bench lab [--epochs 1] [--seeds 10] [--skip-fashion]

1. The peak: float32 products of 2048 x 2048 matrices on all cores (and on one), in useful
   FLOP/s.
2. The default ``bnlab compare`` (digits: 10 networks, 100 epochs, train and test evaluation
   after every epoch), timed as bnlab runs it (a fresh run directory, checkpoints, reports
   excluded) and as a plain PyTorch loop on one thread doing the same work
   (``torch.nn.BatchNorm1d``, autograd, ``torch.optim.SGD``), back to back; then the whole
   ``bnlab compare`` command twice, as a user waits for it (a fresh process: start-up,
   data, training and report), against the plain loop's time.
3. Fashion-MNIST (when installed): ``--epochs`` epochs of the full comparison with
   ``--seeds`` seeds per variant, bnlab and the plain loop; the useful work (forward,
   backward and evaluation products, counted from the network's shape) per second, and its
   fraction of the peak.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bnlab.lab.fields import ConfigError
from bnlab.lab.experiment_configs import CompareConfig
from bnlab.lab.data import load_dataset
from bnlab.lab.runner import load_data, run_experiment
from bnlab.lab.models import build_mlp
from bnlab.lab.rundir import RUN
from bnlab.lab.train import Batches, evaluate
from bnlab.lab.workers import cores


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an (n, n) @ (n, n) float32 product on ``threads`` threads (median)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return 2 * n ** 3 / statistics.median(times)
    finally:
        torch.set_num_threads(previous)


def useful_flops(config: CompareConfig, features: int, classes: int, n_train: int,
                 n_test: int) -> float:
    """The products a comparison must compute: per training sample forward (2 x MACs),
    weight gradients (2 x MACs) and input gradients of all but the first layer; per
    evaluated sample, forward."""
    c = config
    macs = features * c.width + (c.depth - 1) * c.width ** 2 + c.width * classes
    train = 6 * macs - 2 * features * c.width
    steps = n_train // c.batch_size * c.epochs
    nets = c.seeds * len(c.norms)
    return nets * (steps * c.batch_size * train + c.epochs * (n_train + n_test) * 2 * macs)


def plain_loop(config: CompareConfig) -> float:
    """Seconds for the work of ``config`` as a plain PyTorch loop on one thread: the same
    networks and batches, torch's BatchNorm1d, autograd and torch.optim.SGD."""
    data = load_data(config)
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    tx, ty = torch.from_numpy(data.test_x), torch.from_numpy(data.test_y)
    c = config
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        for seed in range(c.seeds):
            for norm in c.norms:
                model = build_mlp(x.shape[1], len(data.classes), c.depth, c.width, c.activation,
                                  "torch-bn" if norm == "bn" else norm, c.init_scale, seed)
                opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum)
                batches = Batches(len(x), c.batch_size, seed)
                for step in range(1, c.epochs * batches.per_epoch + 1):
                    idx = batches(step)
                    model.train()
                    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if step % batches.per_epoch == 0:
                        evaluate(model, x, y), evaluate(model, tx, ty)
    finally:
        torch.set_num_threads(previous)
    return time.perf_counter() - t0


def bnlab_run(config: CompareConfig) -> float:
    """Seconds of the training session of ``config`` run by bnlab, from its run.json."""
    import json

    with tempfile.TemporaryDirectory(prefix="bnlab-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        run_experiment(config, run_dir)
        info = json.loads((run_dir / RUN).read_text(encoding="utf-8"))
        return sum(s["seconds"] for s in info["sessions"])


def whole_command(argv: list[str]) -> float:
    """Seconds of ``bnlab *argv`` as a user waits for it, in a fresh process (start-up, data,
    training, report), into a run directory of its own."""
    with tempfile.TemporaryDirectory(prefix="bnlab-bench-") as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bnlab", *argv, "--out", str(Path(tmp) / "run")],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bnlab bench lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1,
                        help="epochs of the Fashion-MNIST comparison (default 1)")
    parser.add_argument("--seeds", type=int, default=10,
                        help="seeds per variant of the Fashion-MNIST comparison (default 10)")
    parser.add_argument("--skip-fashion", action="store_true",
                        help="time only the default comparison")
    parser.error = lambda message: parser.exit(2, f"bnlab bench lab: error: {message} "
                                                  "(see bnlab bench lab --help)\n")
    args = parser.parse_args(argv)
    if not 1 <= args.epochs <= 1000:
        parser.error(f"--epochs must be from 1 to 1000 (got {args.epochs})")
    if not 1 <= args.seeds <= 1000:
        parser.error(f"--seeds must be from 1 to 1000 (got {args.seeds})")
    n = cores()
    peak, peak1 = matmul_peak(n), matmul_peak(1)
    print(f"torch {torch.__version__}, {n} cores; matrix-product peak (float32, 2048^3): "
          f"{peak / 1e9:.1f} GFLOP/s on {n} threads, {peak1 / 1e9:.1f} on one")
    default = CompareConfig()
    plain, ours = plain_loop(default), bnlab_run(default)
    print(f"default bnlab compare (digits, {default.seeds} seeds x {len(default.norms)} "
          f"variants, {default.epochs} epochs): plain PyTorch loop, one thread {plain:.1f} s; "
          f"bnlab {ours:.1f} s; {plain / ours:.2f}x faster")
    whole = [whole_command(["compare"]) for _ in range(2)]  # the kernels are cached by now
    print(f"the whole `bnlab compare` command as a user waits for it (start-up, data, "
          f"training, report; warm kernel cache), twice: {whole[0]:.1f} s and {whole[1]:.1f} s, "
          f"{min(whole) / plain:.2f}-{max(whole) / plain:.2f}x the plain loop's time")
    if args.skip_fashion:
        return 0
    try:
        config = CompareConfig(dataset="fashion-mnist", seeds=args.seeds, epochs=args.epochs)
        data = load_dataset(config.dataset, config.data_dir)
    except (ConfigError, OSError) as exc:
        print(f"Fashion-MNIST: skipped ({exc})")
        return 0
    work = useful_flops(config, data.num_features, len(data.classes), len(data.train_y),
                        len(data.test_y))
    ours = bnlab_run(config)
    plain_config = CompareConfig(dataset="fashion-mnist", seeds=1, epochs=args.epochs)
    plain = plain_loop(plain_config) * config.seeds  # one seed's pair, scaled to all seeds
    print(f"Fashion-MNIST compare, {config.seeds} seeds x {len(config.norms)} variants, "
          f"{config.epochs} epoch(s), {work / 1e12:.2f} TFLOP of products:")
    print(f"  plain PyTorch loop, one thread: {plain:.1f} s (one seed timed, x{config.seeds}), "
          f"{work / plain / 1e9:.1f} GFLOP/s, {work / plain / peak:.0%} of peak")
    print(f"  bnlab: {ours:.1f} s, {work / ours / 1e9:.1f} GFLOP/s, {work / ours / peak:.0%} "
          f"of peak; 100 epochs would take about {ours * 100 / config.epochs / 60:.1f} min")
    return 0 if math.isfinite(ours) else 1
