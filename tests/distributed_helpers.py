"""Running a function in several processes joined by torch.distributed over loopback.

``run_world(fn, world, *args)`` starts ``world`` processes; each joins a gloo group on
127.0.0.1 and calls ``fn(rank, world, *args)``; what each returns comes back as a list,
rank by rank. An exception in any process is raised in the caller (the other processes are
stopped), and a collective left waiting fails after ``timeout`` seconds instead of hanging.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnlab.lab.distributed import free_port


def _entry(rank: int, fn: Callable, world: int, port: int, out: str, timeout: float,
           args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(fn: Callable, world: int, *args: Any, timeout: float = 30) -> list[Any]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_entry, args=(fn, world, free_port(), out, timeout, args),
                           nprocs=world, start_method="spawn")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
