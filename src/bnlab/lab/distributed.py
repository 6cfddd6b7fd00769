"""Data-parallel training over processes with torch.distributed, and its launcher.

Rank 0 runs the experiment as one process would: it owns the run directory, decides what to
train, evaluates and records. For each network it trains, it sends the other ranks a job
(norm, seed, steps and the checkpoint to start from); every rank builds the same network,
with its BatchNorm layers converted to :class:`bnlab.nn.SyncBatchNorm`, and each training
step splits the global mini-batch between the ranks: each computes its share's summed loss
over the global batch size, one ``all_reduce`` sums the gradients (and the loss), and every
rank takes the same SGD step. So N processes compute what one computes on the global batch,
to float rounding. The other ranks never touch the run directory: ``torchrun`` across
machines needs only the data on each.

:func:`launch` starts the N processes on this machine (as ``torchrun --standalone`` would):
the same command line with torchrun's environment variables; when one rank ends with an
error, the others are stopped and the run can be continued with ``--resume``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab.nn import ShapeError

from . import signals
from .fields import Config, ConfigError, _memory_bytes, setting
from .experiment_configs import EXPERIMENTS
from .workers import cores

log = logging.getLogger(__name__)

__all__ = ["DataParallel", "RankFailed", "check_data_parallel", "check_fits", "free_port",
           "launch", "world_from_env"]

TIMEOUT = timedelta(minutes=30)  # a collective waiting longer than this fails


def world_from_env() -> int:
    """The number of processes a launcher (torchrun, or :func:`launch`) started; 1 without one."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer (got {text!r})") from None


def check_data_parallel(cls: type[Config], config: Config | None, overrides: dict,
                        world: int) -> None:
    """Refuse what ``world`` processes cannot run: an experiment without data-parallel
    training, or a config whose norms a split batch would change."""
    if not _parallel(cls):
        able = [n for n, c in EXPERIMENTS.items() if _parallel(c)]
        raise ConfigError(f"bnlab run {cls.name} does not train data-parallel; run it in one "
                          f"process (data-parallel: {', '.join(able)})")
    if config is not None:
        dataclasses.replace(config, **{**overrides, "nproc": world})  # its checks


def _parallel(cls: type[Config]) -> bool:
    return any(f.name == "nproc" for f in dataclasses.fields(cls))


RANK_BYTES = 512 * 2**20  # a process of the lab holds about 400 MiB (torch, the data)


def check_fits(nproc: int) -> None:
    """Refuse more processes than this machine can run side by side."""
    if nproc > 4 * cores():
        raise ConfigError(f"{setting('nproc', nproc)} is more than 4 processes per core ({cores()} cores "
                          f"here); choose at most {4 * cores()}")
    if nproc * RANK_BYTES > _memory_bytes() / 2:
        raise ConfigError(f"{setting('nproc', nproc)} needs about {nproc * RANK_BYTES / 2**30:.1f} GiB, more "
                          f"than half of this machine's {_memory_bytes() / 2**30:.1f} GiB")


class RankFailed(ValueError):
    """A process of a data-parallel run ended with an error (a ValueError, as the other
    errors a command reports in one line)."""


class DataParallel:
    """This process's place in the group: ``rank`` of ``world``."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls) -> "DataParallel":
        """Join the group torchrun's variables describe (MASTER_ADDR, MASTER_PORT, RANK,
        WORLD_SIZE), over gloo: the lab trains on CPU."""
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if k not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start the "
                             "processes with torchrun, or with bnlab's --nproc")
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method="env://", timeout=TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size())

    def finish(self) -> None:
        """Leave the group once every process is done with it."""
        with self._peers():
            dist.barrier()
        dist.destroy_process_group()

    def share(self, obj: Any = None) -> Any:
        """Rank 0's ``obj``, on every rank."""
        box = [obj]
        with self._peers():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def _peers(self) -> Iterator[None]:
        """Collectives fail when another process is gone: say so in one line (that
        process's own error, if it had one, is the one to read)."""
        try:
            yield
        except ShapeError:  # a RuntimeError too, but the network's own, not a lost peer
            raise
        except RuntimeError as exc:  # gloo's errors (DistBackendError is one)
            raise RankFailed(f"process {self.rank} of {self.world} lost the other processes "
                             f"of the run ({' '.join(str(exc).split())[:120]})") from None

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's contiguous share of a batch's indices (sizes differ by at most one)."""
        return torch.tensor_split(idx, self.world)[self.rank]

    def step(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        """The gradients of the global batch ``idx``, of which this rank computes its share,
        left in the parameters' ``.grad`` (the same on every rank, for the same SGD step);
        returns the global batch's mean loss (detached), the same on every rank."""
        model.train()
        share = self.shard(idx)
        with self._peers():  # SyncBatchNorm's collectives run in forward and backward
            loss = nn.functional.cross_entropy(model(x[share]), y[share], reduction="sum") / len(idx)
            model.zero_grad(set_to_none=False)
            loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # unused here: still a place in the sum
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1)])
        with self._peers():
            dist.all_reduce(flat)  # the gradients of the global batch, and its loss
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return flat[-1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: Sequence[str], nproc: int, poll: float = 0.1,
           program: Sequence[str] = (sys.executable, "-m", "bnlab")) -> int:
    """Run ``program *argv`` (``python -m bnlab``) in ``nproc`` processes joined over
    127.0.0.1; returns 0 when all succeed. When one fails the others are stopped and
    :class:`RankFailed` names the first that failed. Ctrl-C, SIGTERM or SIGHUP stop them
    all (each saves its finished work) and raise :class:`~bnlab.lab.signals.Interrupted`,
    whose ``lead_code`` is process 0's exit code (128 + a signal: it said where the run
    stands); should this process be killed outright, the operating system interrupts them
    (Linux)."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    previous = signals.install()  # a second signal must not cut short the stopping
    try:
        for rank in range(nproc):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "WORLD_SIZE": str(nproc), "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(nproc)}
            procs.append(subprocess.Popen([*program, *argv], env=env, preexec_fn=_with_parent,
                                          stdout=None if rank == 0 else subprocess.DEVNULL))
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # polled every 0.1 s: the first to fail, as a rule; where several have ended
                # by the same poll, one a signal killed (the cause: the others then lose it
                # and exit with code 2) before one that exited
                rank, code = min(failed, key=lambda rc: (rc[1] >= 0, rc[0]))
                _stop(procs)
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                raise RankFailed(f"process {rank} of {nproc} {how}; the others were stopped")
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll)
    except KeyboardInterrupt as exc:
        _stop(procs)
        exc.lead_code = procs[0].returncode if procs else None  # how process 0 ended
        raise
    finally:
        signals.restore(previous)


def _with_parent() -> None:
    """In a child, before it runs: be interrupted (SIGINT) when the launcher dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the launcher's own handlers must do
        pass


def _stop(procs: list[subprocess.Popen], sig: int = signal.SIGINT, grace: float = 10.0) -> None:
    """Interrupt the processes still running (each saves what it finished and releases the
    run directory), and kill any that has not ended after ``grace`` seconds."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
