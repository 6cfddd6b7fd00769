"""An experiment's jobs on a Dask cluster (``--scheduler``).

A run's jobs (a stack of networks, or one network, as :meth:`Context.run_jobs` groups them)
become Dask tasks; this process, the driver, alone writes the run directory. A task on a
worker rebuilds the experiment there (the config, the data from ``data_dir`` as it is on
that worker, the registered norms and models the config names), runs the experiment up to
its job, trains that job and sends back through the scheduler what a run writes: rows,
checkpoints, the end of each unit and the progress. The driver records them with the run's
own :class:`~bnlab.lab.rundir.Unit` objects, so a cluster run's ``metrics.jsonl`` is the one
the same command writes on one machine, line for line: a network's numbers do not depend on
the process or the stack that trains it.

Faults:

* a worker lost mid-task: Dask runs the task again on another worker; it starts with a
  handshake, in which the driver hands it each unit's last checkpoint (the rows recorded
  after it are not written twice), so the run ends as an uninterrupted one;
* the driver lost: the run directory holds what any run holds; ``--resume`` continues it, on
  this cluster, another one, or one machine;
* the scheduler unreachable or lost: :class:`ClusterError` (one line; nothing recorded is
  lost);
* a worker whose bnlab, its code, torch, NumPy, Python or BatchNorm code differ from the
  driver's is refused: the bits of its results could differ. So is a worker whose data
  differ from the driver's.

Dask is an optional dependency: ``pip install 'bnlab[dask]'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .fields import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Cluster", "ClusterError", "connect", "fingerprint"]

INSTALL = "pip install 'bnlab[dask]'"
CONNECT_SECONDS = 10  # to reach the scheduler
WORKERS_SECONDS = 60  # for a first worker to join
REPLY_SECONDS = 120  # a task waits this long for the driver's handshake
POLL_SECONDS = 0.05  # the driver takes what its tasks sent this often (a task waits for it to start)
FLUSH_SECONDS = 0.5  # a task sends its rows and progress at least this often
STOP_POLL_SECONDS = 1.0  # and asks whether the run was stopped


class ClusterError(ConfigError):
    """The cluster cannot run the job: unreachable, lost, refused or failed."""


class WorkerRefused(ClusterError):
    """A worker cannot take part in the run (its versions, its data, the user's code); its
    tasks go to the other workers."""

    def __init__(self, worker: str, why: str) -> None:
        super().__init__(f"refused: worker {worker} {why}")
        self.worker, self.why = worker, why

    def __reduce__(self) -> tuple:
        return WorkerRefused, (self.worker, self.why)


def _dask() -> Any:
    """The ``distributed`` module, or ClusterError saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise ClusterError(f"--scheduler needs Dask's distributed scheduler, which is not "
                           f"installed: {INSTALL}") from None
    return distributed


@functools.cache
def _code_digest() -> str:
    """A hash of bnlab's own Python files as they were when this process first needed it (a
    worker: when a run first contacted it). A worker started before bnlab changed on disk
    thus shows what it had loaded by then, which is the most of bnlab a run uses; restart
    workers after changing bnlab."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def fingerprint() -> dict[str, str]:
    """What the driver and every worker must share for their bits to agree: the versions of
    bnlab (and its code), torch, NumPy, Numba and Python, the code that computes BatchNorm,
    and the CPU's vector unit as torch uses it."""
    import torch

    import bnlab
    from .rundir import bn_code

    try:
        import numba
        numba_version = numba.__version__
    except ImportError:
        numba_version = "none"
    return {"bnlab": bnlab.__version__, "bnlab code": _code_digest(), "torch": torch.__version__,
            "numpy": np.__version__, "numba": numba_version,
            "python": "%d.%d.%d" % sys.version_info[:3], "BatchNorm code": bn_code(),
            "CPU vector unit": torch.backends.cpu.get_cpu_capability()}


def _differs(theirs: dict[str, str], ours: dict[str, str]) -> str:
    return ", ".join(f"{k} {theirs.get(k)} (here {v})" for k, v in ours.items()
                     if theirs.get(k) != v)


def _why(exc: BaseException) -> str:
    """An error of the connection in a few words."""
    cause = exc
    while cause.__cause__ is not None or cause.__context__ is not None:  # the root cause
        cause = cause.__cause__ or cause.__context__
    text = getattr(cause, "strerror", None) or " ".join(str(cause).split())
    text = text if len(text) <= 80 else text[:77] + "..."
    return text or type(cause).__name__


class _Quiet:
    """Dask's own log is silenced while bnlab talks to a cluster (a lost scheduler would
    print pages of tracebacks; bnlab says what happened in one line), unless bnlab's log is
    verbose."""

    def __init__(self) -> None:
        names = [n for n in list(logging.root.manager.loggerDict)
                 if n == "distributed" or n.startswith("distributed.")]
        self.levels = {n: logging.getLogger(n).level for n in names}
        if not log.isEnabledFor(logging.INFO):
            for name in names:
                logging.getLogger(name).setLevel(logging.CRITICAL + 1)

    def restore(self) -> None:
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)


def data_digest(data: Any) -> str:
    """A hash of a dataset's arrays: a worker must train on the driver's data."""
    h = hashlib.sha1()
    for a in (data.train_x, data.train_y, data.test_x, data.test_y):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()[:16]


def connect(address: str, wait: bool = True) -> "Cluster":
    """The cluster at ``address`` (``local:N`` starts N worker processes on this machine).
    With ``wait``, once a worker has joined (all N, for ``local:N``), every worker's
    :func:`fingerprint` checked against this process's; else call
    :meth:`Cluster.check_workers` before its first job."""
    distributed = _dask()
    quiet = _Quiet()
    local = None
    try:
        if address.startswith("local:"):
            local = _Local(distributed, int(address[len("local:"):]))
            client = distributed.Client(local.scheduler, set_as_default=False)
        else:
            client = _client(distributed, address)
    except BaseException as exc:
        if local is not None:
            local.close()
        quiet.restore()
        if not isinstance(exc, Exception):  # an interrupt
            raise
        raise ClusterError(f"cannot reach the Dask scheduler at {address} ({_why(exc)}); start one "
                           "with 'dask scheduler' and its workers with 'dask worker ADDRESS'"
                           ) from None
    cluster = Cluster(client, address, local)
    cluster.quiet = quiet
    if wait:
        try:
            cluster.check_workers()
        except BaseException:
            cluster.close()
            raise
    return cluster


def _client(distributed: Any, address: str) -> Any:
    """A client of the scheduler at ``address``, or an error within about CONNECT_SECONDS:
    Dask's own timeout does not cover its handshake, which never ends where something else
    listens at that port."""
    got: dict[str, Any] = {}

    def connect() -> None:
        try:
            got["client"] = distributed.Client(address, timeout=CONNECT_SECONDS,
                                               set_as_default=False)
        except BaseException as exc:  # noqa: BLE001  handed to the caller
            got["error"] = exc

    thread = threading.Thread(target=connect, name="bnlab-connect", daemon=True)
    thread.start()
    thread.join(CONNECT_SECONDS + 5)
    if thread.is_alive():
        raise TimeoutError(f"no Dask scheduler answered in {CONNECT_SECONDS + 5} s")
    if "error" in got:
        raise got["error"]
    return got["client"]


class _Local:
    """``local:N``: a scheduler in this process and N worker processes started as
    ``dask worker`` commands are (not forked or spawned from this process, which would run a
    script's own code again in each), that end with it."""

    def __init__(self, distributed: Any, n: int) -> None:
        self.cluster = distributed.LocalCluster(n_workers=0, processes=False, protocol="tcp",
                                                host="127.0.0.1", dashboard_address=":0",
                                                silence_logs=logging.ERROR)
        self.scheduler = self.cluster.scheduler_address
        self.workers = [subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", self.scheduler,
             "--nthreads", "1", "--no-nanny", "--no-dashboard", "--name", f"local-{i}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(n)]

    def close(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.terminate()
        for worker in self.workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        with contextlib.suppress(Exception):
            self.cluster.close(timeout=10)


class Cluster:
    """A client of a Dask scheduler (and the local cluster it started, for ``local:N``)."""

    def __init__(self, client: Any, address: str, local: Any = None) -> None:
        self.client, self.address, self.local = client, address, local
        self.ours = fingerprint()
        self.quiet: _Quiet | None = None
        self.checked, self.alone_since = 0.0, None  # check_alive's last look; since when
        # the scheduler has had no worker
        self.refused: set[str] = set()  # workers left out of the run
    def close(self) -> None:
        with contextlib.suppress(Exception):  # a lost scheduler: nothing left to close
            self.client.close(timeout=5)
        if self.local is not None:
            self.local.close()
        if self.quiet is not None:
            self.quiet.restore()

    def lost(self, what: str) -> ClusterError:
        return ClusterError(f"lost the Dask scheduler at {self.address} ({what})")

    def check_workers(self) -> None:
        """Wait for a first worker; refuse the run if any worker's fingerprint differs."""
        try:
            self.client.wait_for_workers(len(self.local.workers) if self.local else 1,
                                         timeout=WORKERS_SECONDS)
        except TimeoutError:
            if self.local is not None:
                raise ClusterError(f"the {len(self.local.workers)} local Dask workers did not "
                                   f"start in {WORKERS_SECONDS} s") from None
            raise ClusterError(f"no Dask worker joined the scheduler at {self.address} in "
                               f"{WORKERS_SECONDS} s; start them with 'dask worker "
                               f"{self.address}'") from None
        except OSError as exc:
            raise self.lost(_why(exc)) from None
        try:
            prints = self.client.run(fingerprint, on_error="return")
        except OSError as exc:
            raise self.lost(_why(exc)) from None
        bad = {w: (f"has no bnlab it can run ({type(p).__name__}: {_why(p)})"
                   if isinstance(p, BaseException) else "has " + _differs(p, self.ours))
               for w, p in prints.items() if p != self.ours}
        for worker, why in sorted(bad.items()):
            self.refuse(WorkerRefused(worker, why + " (its results could differ in their "
                                                    "bits; install the same versions there)"))
        if len(bad) == len(prints):
            raise ClusterError("refused every worker: " + "; ".join(
                f"{w} {d}" for w, d in sorted(bad.items())) + " (install the driver's versions "
                "there)")

    def refuse(self, exc: WorkerRefused) -> None:
        """Leave ``exc.worker`` out of the run from now on, and say so once."""
        if exc.worker not in self.refused:
            self.refused.add(exc.worker)
            log.warning("%s; the run goes on without it", exc)

    def good_workers(self) -> list[str] | None:
        """The workers a task may go to: None for any (none refused), else the others."""
        if not self.refused:
            return None
        try:
            return [w for w in self.client.nthreads() if w not in self.refused]
        except OSError as exc:
            raise self.lost(_why(exc)) from None

    def check_alive(self) -> None:
        """Every second or so: ClusterError when this run's local workers have all ended, or
        when the scheduler has had no worker for WORKERS_SECONDS (a run would wait forever)."""
        now = time.monotonic()
        if now - self.checked < 1.0:
            return
        self.checked = now
        if self.local is not None and all(w.poll() is not None for w in self.local.workers):
            raise ClusterError(f"the {len(self.local.workers)} local Dask workers have ended "
                               f"(exit codes {', '.join(str(w.returncode) for w in self.local.workers)})")
        try:
            workers = self.client.nthreads()
        except OSError as exc:
            raise self.lost(_why(exc)) from None
        if set(workers) - self.refused:
            self.alone_since = None
        elif self.alone_since is None:
            self.alone_since = now
        elif now - self.alone_since >= WORKERS_SECONDS:
            raise ClusterError(f"the Dask scheduler at {self.address} has had no worker "
                               f"{'but refused ones ' if self.refused else ''}for "
                               f"{WORKERS_SECONDS} s; start workers with 'dask worker "
                               f"{self.address}'")

    def run_jobs(self, ctx: Any, jobs: Sequence[list], run: Callable[[list], None]) -> None:
        """Every job of ``ctx``'s experiment as a task on the cluster (jobs whose units are
        all done run here: they only count their progress); returns when all have ended."""
        _Driver(self, ctx, jobs, run).run()


def _pack(value: Any) -> bytes:
    """``value`` as bytes that come back exactly (Dask's own encoding turns lists into
    tuples, which a checkpoint's optimizer state must not see)."""
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _unpack(data: bytes) -> Any:
    return pickle.loads(data)


# -- the driver's side ---------------------------------------------------------------------
class _Driver:
    """Submits one task per job, records what tasks send, hands a task its checkpoints."""

    def __init__(self, cluster: Cluster, ctx: Any, jobs: Sequence[list],
                 run: Callable[[list], None]) -> None:
        self.cluster, self.ctx, self.jobs, self.run_here = cluster, ctx, list(jobs), run
        self.token = uuid.uuid4().hex
        self.attempt: dict[int, str] = {}  # job: its current attempt
        self.counted: dict[int, list[float]] = {}  # job: progress its attempt advanced
        self.tries: dict[int, int] = {}  # job: tasks submitted for it
        self.units = {u.key: u for job in self.jobs for u in job}

    def spec(self) -> dict[str, Any]:
        import cloudpickle  # Dask's own: functions of a notebook or script go by value

        c, data = self.ctx.config, self.ctx.data
        return {"token": self.token, "experiment": c.name, "config": c.to_dict(),
                "data_dir": None if c.data_dir is None else os.path.abspath(c.data_dir),
                "data": data_digest(data), "fingerprint": self.cluster.ours,
                # bytes, so that the scheduler need not import the modules they come from
                "own": _own_bytes(cloudpickle, own_entries(c))}

    def run(self) -> None:
        d = _dask()
        client = self.cluster.client
        progress = self.ctx.progress
        up = d.Queue(f"bnlab-{self.token}", client=client)
        futures = {}
        try:
            spec = self.spec()
            for j, job in enumerate(self.jobs):
                if all(u.done for u in job):
                    self.run_here(job)  # only its progress
                    continue
                futures[j] = self.submit(spec, j)
            while futures:
                if progress.stop:
                    raise KeyboardInterrupt
                for message in self._wait(up):
                    self.handle(d, message)
                self.cluster.check_alive()
                for j, f in list(futures.items()):
                    if f.status == "finished":
                        del futures[j]
                    elif f.status == "error":
                        for message in self._get(up):  # what it sent before it failed
                            self.handle(d, message)
                        exc = self.failed(j, f)
                        if not isinstance(exc, WorkerRefused):
                            raise exc
                        self.cluster.refuse(exc)  # the job goes to the other workers
                        if not self.cluster.good_workers():
                            raise ClusterError(f"{exc}, and no other worker is left")
                        futures[j] = self.submit(spec, j)
                    elif f.status in ("cancelled", "lost") or client.status != "running":
                        raise self.cluster.lost(f"its task of {self.jobs[j][0].key} was "
                                                f"{f.status}")
            for message in self._get(up):  # every task has ended: all it sent is here
                self.handle(d, message)
            unfinished = [u.key for u in self.units.values() if not u.done]
            if unfinished:
                raise ClusterError(f"the cluster ended the tasks of {', '.join(unfinished[:3])}"
                                   f"{' and more' if len(unfinished) > 3 else ''} without "
                                   "their last rows; the saved work can be resumed")
        except BaseException:
            with contextlib.suppress(Exception):  # a task let go of stops within a second
                client.cancel(list(futures.values()))
            with contextlib.suppress(Exception):  # what they sent since: not to be kept
                up.get(batch=True, timeout=CONNECT_SECONDS)
            raise
        finally:
            with contextlib.suppress(Exception):
                up.close()

    def submit(self, spec: dict[str, Any], j: int) -> Any:
        """Job ``j`` as a task, on a worker that was not refused."""
        self.tries[j] = self.tries.get(j, 0) + 1
        return self.cluster.client.submit(
            _task, spec, j, [u.key for u in self.jobs[j]], pure=False,
            key=f"bnlab-{self.token}-job{j}-{self.tries[j]}",
            workers=self.cluster.good_workers(), allow_other_workers=False)

    def _wait(self, up: Any) -> list:
        """What the tasks sent, after POLL_SECONDS (a get that waits would log a traceback
        in the scheduler each time its timeout expired)."""
        time.sleep(POLL_SECONDS)
        return self._get(up)

    def _get(self, up: Any) -> list:
        """What the tasks sent, at once."""
        try:
            return up.get(batch=True, timeout=CONNECT_SECONDS)
        except (OSError, TimeoutError) as exc:
            raise self.cluster.lost(_why(exc)) from None

    def failed(self, j: int, future: Any) -> Exception:
        exc = future.exception()
        d = _dask()
        if isinstance(exc, d.KilledWorker):
            more = len(self.jobs[j]) - 1
            return ClusterError(f"the task of {self.jobs[j][0].key}"
                                f"{f' and {more} more networks' if more else ''} was on workers "
                                "that were lost several times (Dask gave up on it); the saved "
                                "work can be resumed")
        return exc

    def handle(self, d: Any, message: tuple) -> None:
        j, attempt, ops = message
        if ops == "start":
            self.start(d, j, attempt)
            return
        if self.attempt.get(j) != attempt:  # an attempt replaced by a newer one
            return
        progress, counted = self.ctx.progress, self.counted[j]
        for op, *args in _unpack(ops):
            if op == "write":
                unit = self.units[args[0]]
                unit.write(args[1])
                if args[1].get("diverged"):
                    unit.diverged = True
            elif op == "finish":
                self.units[args[0]].finish()
            elif op == "save":
                self.units[args[0]].save(args[1])
            elif op == "advance":
                progress.advance(*args)
                counted[0] += args[0]
                counted[1] += args[0] * args[1]
            elif op == "note":
                progress.note = args[0]

    def start(self, d: Any, j: int, attempt: str) -> None:
        """A task (or a task run again after its worker was lost) starts job ``j``: the
        progress its earlier attempt counted is taken back, each unit rolls back to its last
        checkpoint (rows past it are not recorded again), and the task is told where each
        unit stands."""
        progress = self.ctx.progress
        done, work = self.counted.get(j, (0, 0.0))
        if done:
            with progress._lock:
                progress.done -= done
                progress.work_done -= work
        self.attempt[j], self.counted[j] = attempt, [0, 0.0]
        states = {}
        for unit in self.jobs[j]:
            unit.recorded = max(unit.recorded, unit.written)
            unit.written = 0
            states[unit.key] = {"done": unit.done, "path": str(unit.path),
                                "state": None if unit.done else unit.load()}
        reply = d.Queue(f"bnlab-{self.token}-{attempt}", client=self.cluster.client)
        reply.put(_pack(states))
        reply.close()  # the task holds it till it has read it


def own_entries(config: Any) -> list[Any]:
    """The registry entries of the norms (a family's, for its members), the model and the
    experiment ``config`` names that were registered outside bnlab. A worker registers them
    as this process did: by reference to their module, which it must be able to import, or
    by value where they were defined in a notebook or script."""
    from . import experiment_configs, model_registry, norms

    own = []
    for name in getattr(config, "norms", ()):
        entry = norms._lookup(name)
        own.append(norms._REGISTRY[entry.family or entry.name])
    model = getattr(config, "model", model_registry.DEFAULT_MODEL)
    own += [model_registry._REGISTRY[model]] if model in model_registry._REGISTRY else []
    own = [e for e in own if not (isinstance(e.build, str) and e.build.startswith("bnlab."))]
    entry = experiment_configs.experiment(config.name)
    theirs = not (entry.module.startswith("bnlab.") and entry.config.__module__.startswith("bnlab."))
    return own + ([entry] if theirs else [])


def _own_bytes(cloudpickle: Any, entries: list[Any]) -> bytes:
    """``entries`` pickled for the workers; ConfigError naming the one that cannot be."""
    for entry in entries:
        try:
            cloudpickle.dumps(entry)
        except Exception as exc:  # noqa: BLE001  whatever the user's objects hold
            kind = {"Norm": "norm", "Model": "network"}.get(type(entry).__name__, "experiment")
            raise ConfigError(f"the {kind} {entry.name} cannot be sent to the cluster's workers "
                              f"({type(exc).__name__}: {_why(exc)}); define it in a module "
                              "they can import (bnlab --import MODULE, or import it before "
                              "bnlab.lab.run)") from None
    return cloudpickle.dumps(entries)


def install_own_entries(entries: list[Any]) -> None:
    """Register on this worker the entries the driver registered (see :func:`own_entries`)."""
    from . import experiment_configs, model_registry, norms

    for entry in entries:
        registry = (norms._REGISTRY if isinstance(entry, norms.Norm) else
                    model_registry._REGISTRY if isinstance(entry, model_registry.Model) else
                    experiment_configs._REGISTRY)
        registry[entry.name] = entry


# -- the worker's side ---------------------------------------------------------------------
class JobDone(Exception):
    """Raised on a worker once its job is trained: the experiment's run goes no further."""


class Stopped(Exception):
    """Raised in a task whose run the driver stopped (interrupted, or failed elsewhere)."""


_DATA: dict[tuple, tuple[Any, str]] = {}  # a worker's datasets, loaded once
_DATA_LOCK = threading.Lock()


class _Link:
    """A task's line to the driver: what it sends, in order, at least every FLUSH_SECONDS."""

    def __init__(self, d: Any, token: str, job: int) -> None:
        self.d, self.token, self.job = d, token, job
        self.attempt = uuid.uuid4().hex
        self.up = d.Queue(f"bnlab-{token}")
        self.ops: list[tuple] = []
        self.sent = self.polled = time.monotonic()
        self.lock = threading.Lock()
        try:  # the task's own key: released when its driver is gone
            from distributed import get_worker

            self.worker = get_worker()
            self.key = self.worker.get_current_task()
        except ValueError:  # not in a worker (tests call a task directly)
            self.worker = self.key = None

    def start(self) -> dict[str, dict]:
        self.up.put((self.job, self.attempt, "start"))
        reply = self.d.Queue(f"bnlab-{self.token}-{self.attempt}")
        try:
            return _unpack(reply.get(timeout=REPLY_SECONDS))
        finally:
            with contextlib.suppress(Exception):
                reply.close()

    def send(self, op: tuple, now: bool = False) -> None:
        with self.lock:
            self.ops.append(op)
            if now or time.monotonic() - self.sent >= FLUSH_SECONDS:
                self._flush()

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        if self.ops:
            self.up.put((self.job, self.attempt, _pack(self.ops)))
            self.ops = []
        self.sent = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.up.close()

    def stopped(self) -> bool:
        """Whether the driver let go of this task: it stopped the run, failed, or was lost."""
        if time.monotonic() - self.polled < STOP_POLL_SECONDS:
            return False
        self.polled = time.monotonic()
        if self.worker is None:
            return False
        task = self.worker.state.tasks.get(self.key)
        return task is None or task.state in ("cancelled", "released", "forgotten")


class _RemoteUnit:
    """A unit on a worker: what :class:`~bnlab.lab.rundir.Unit` does, sent to the driver."""

    def __init__(self, link: _Link, fields: dict[str, Any], state: dict | None) -> None:
        from .rundir import unit_key

        self.link, self.fields, self.key = link, fields, unit_key(fields)
        state = state or {}
        self.done, self.path = state.get("done", False), state.get("path", self.key)
        self._state, self.diverged = state.get("state"), False

    def write(self, row: dict) -> None:
        self.link.send(("write", self.key, row))

    def finish(self) -> None:
        self.link.send(("finish", self.key))
        self.done = True

    def save(self, state: dict) -> None:
        self.link.send(("save", self.key, state), now=True)

    def load(self) -> dict | None:
        return self._state

    def damaged(self, why: str) -> ConfigError:
        return ConfigError(f"checkpoint {self.path} is damaged{why}; delete it and resume again "
                           "(the unit restarts from its first step; recorded rows are kept)")


class _RemoteRecord:
    """The run's record on a worker: units whose state the driver handed over."""

    def __init__(self, link: _Link, states: dict[str, dict]) -> None:
        self.link, self.states, self.listeners = link, states, []

    def unit(self, **fields: Any) -> _RemoteUnit:
        from .rundir import unit_key

        return _RemoteUnit(self.link, fields, self.states.get(unit_key(fields)))


def _remote_progress(link: _Link) -> Any:
    from .train import Progress

    class RemoteProgress(Progress):
        """Counts what the task trains and sends it; stops when the driver says so."""

        def advance(self, n: int = 1, cost: float = 1.0) -> None:
            if self.stop or link.stopped():
                self.stop = True
                raise Stopped("the run was stopped")
            if n:
                link.send(("advance", n, cost))

        @Progress.note.setter
        def note(self, value: str) -> None:
            Progress.note.fset(self, value)
            link.send(("note", value))

    return RemoteProgress()


def _worker_data(config: Any, digest: str) -> Any:
    """The config's dataset as this worker has it (loaded once per process), which must be
    the driver's."""
    from .runner import load_data

    key = (config.dataset, config.data_dir, getattr(config, "n_train", None))
    with _DATA_LOCK:
        if key not in _DATA:
            try:
                data = load_data(config)
            except Exception as exc:  # noqa: BLE001  missing, damaged: this worker's data
                raise WorkerRefused(_address(), f"cannot load its {config.dataset} data "
                                                f"({_why(exc)})") from None
            _DATA[key] = (data, data_digest(data))
    data, ours = _DATA[key]
    if ours != digest:
        raise WorkerRefused(_address(), f"has other {config.dataset} data than the driver (in "
                                        f"{config.data_dir or 'its default places'}); give "
                                        "every worker the same files")
    return data


def _address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except Exception:  # noqa: BLE001  not in a worker
        return "(this process)"


def _task(spec: dict[str, Any], job: int, keys: list[str]) -> None:
    """One job of a run, on a worker (see the module's docstring)."""
    import torch

    from .experiment_configs import EXPERIMENTS, experiment
    from .runner import Context

    d = _dask()
    began = time.perf_counter()
    mine = fingerprint()
    if mine != spec["fingerprint"]:
        raise WorkerRefused(_address(), "has " + _differs(mine, spec["fingerprint"])
                            .replace("(here", "(the driver"))
    try:
        install_own_entries(pickle.loads(spec["own"]))
        runner = experiment(spec["experiment"]).runner()
    except Exception as exc:  # noqa: BLE001  an import of the user's code, on this worker
        raise WorkerRefused(_address(), "cannot load the norm, network or experiment of your "
                            f"own that the run uses ({type(exc).__name__}: {_why(exc)}); make "
                            "its module importable there") from None
    config = EXPERIMENTS[spec["experiment"]].from_dict(spec["config"])
    config = dataclasses.replace(config, data_dir=spec["data_dir"])
    data = _worker_data(config, spec["data"])
    link = _Link(d, spec["token"], job)
    loaded = time.perf_counter()
    previous = torch.get_num_threads()
    try:
        states = link.start()
        started = time.perf_counter()
        torch.set_num_threads(config.threads)
        ctx = Context(config, data, _RemoteRecord(link, states), _remote_progress(link))
        ctx.only = keys
        try:
            runner.run(ctx)
        except JobDone:
            pass
        else:
            raise ClusterError(f"the experiment {config.name} did not reach the job of "
                               f"{keys[0]} on worker {_address()}")
        link.flush()
    finally:
        torch.set_num_threads(previous)
        link.close()
    log.info("job %d (%s and %d more): %.2f s to set up, %.2f s of handshake, %.2f s to train",
             job, keys[0], len(keys) - 1, loaded - began, started - loaded,
             time.perf_counter() - started)

