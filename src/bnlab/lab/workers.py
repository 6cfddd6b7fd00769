"""Jobs of one experiment trained side by side, one Python thread per core.

A job is a list of units that one thread trains (a stack, or networks one by one). torch's
products and bnlab's kernels release the GIL, so threads running one torch thread each keep
the cores busy; they share the data, the run's record (rows are appended one whole line at a
time) and its progress. Which thread trains a unit does not change its numbers: every
operation computes a network's slice as it would alone, on ``threads`` torch threads, so the
number of workers may differ between a run and its resumption.

The first error in any job stops the others at their next step, and is raised; finished
units and checkpoints stay, and ``--resume`` continues.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Callable, Sequence

__all__ = ["cores", "run_jobs"]


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_jobs(jobs: Sequence[Any], run: Callable[[Any], None], workers: int, progress: Any) -> None:
    """``run(job)`` for every job, on ``workers`` threads taking jobs in order. ``progress``
    (a :class:`~bnlab.lab.train.Progress`) is shared; its ``stop`` makes every job raise
    KeyboardInterrupt at its next step."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            run(job)
        return
    lock = threading.Lock()
    pending = list(jobs)

    def worker() -> None:
        while not progress.stop:
            with lock:
                if not pending:
                    return
                job = pending.pop(0)
            run(job)

    with ThreadPoolExecutor(max_workers=min(workers, len(jobs)),
                            thread_name_prefix="bnlab-worker") as pool:
        futures = [pool.submit(worker) for _ in range(min(workers, len(jobs)))]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C in the main thread: stop the workers, then re-raise
            progress.stop = True
            wait(futures)
            raise
        failed = [f for f in done if f.exception() is not None]
        if failed:
            progress.stop = True  # the others stop at their next step
            wait(futures)
            raise failed[0].exception()
