"""bnlab.lab.cluster: an experiment's jobs on a real Dask cluster (a scheduler and two worker
processes on 127.0.0.1), against the same run on one machine, line for line; workers,
drivers and schedulers killed mid-run; refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")

from bnlab.lab import cluster as cl  # noqa: E402
from bnlab.lab.fields import ConfigError, is_scheduler  # noqa: E402
from bnlab.lab.experiment_configs import InitSweepConfig  # noqa: E402
from bnlab.lab.runner import run_experiment  # noqa: E402

HANG = 900  # seconds: a guard against a hang, not a timing
# two jobs (a stack of plain networks, one of BN networks), two networks each
SWEEP = ["--dataset", "digits", "--scales", "1,0.1", "--depth", "2", "--width", "32"]
QUICK = SWEEP + ["--epochs", "5"]
LONG = SWEEP + ["--epochs", "300"]  # long enough to be killed mid-task (seconds per task)


def _python(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdin=subprocess.DEVNULL, **kw)


def _start_worker(address: str, preload: Path | None, modules: Path) -> subprocess.Popen:
    extra = ["--preload", str(preload)] if preload else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(modules), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return _python("-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                   "--no-nanny", "--no-dashboard", *extra, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(predicate, what: str, timeout: float = HANG, proc=None) -> None:
    """Wait until ``predicate()``; an AssertionError after ``timeout`` (a hang guard, not a
    speed check), or at once where ``proc``, the process that should bring it about, ended."""
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"the process ended (exit code {proc.returncode}) before "
                                 f"{what}: {err}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _workers(address: str) -> set[str]:
    with distributed.Client(address, timeout=30, set_as_default=False) as client:
        return set(client.scheduler_info()["workers"])


class Cluster:
    """A scheduler and its worker processes on 127.0.0.1."""

    def __init__(self, tmp: Path, workers: int = 2) -> None:
        # a module of one's own that the workers (and the tests) can import
        self.modules = tmp / "modules"
        self.modules.mkdir()
        (self.modules / "bnlab_cluster_own.py").write_text(
            "import dataclasses\nfrom bnlab.lab.experiment_configs import InitSweepConfig\n\n\n"
            "@dataclasses.dataclass(frozen=True)\n"
            "class MineConfig(InitSweepConfig, name='mine-sweep'):\n    pass\n")
        info = tmp / "scheduler.json"
        self.scheduler = _python("-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                 "--port", "0", "--no-dashboard", "--scheduler-file", str(info),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda: info.is_file() and info.stat().st_size > 0, "the scheduler")
        time.sleep(0.2)  # the file is written whole, but give it the moment
        self.address = json.loads(info.read_text())["address"]
        self.workers: list[subprocess.Popen] = []
        for _ in range(workers):
            self.add_worker()
        self.wait(workers)

    def wait(self, n: int) -> None:
        _wait_for(lambda: len(_workers(self.address)) == n, f"{n} workers")

    def add_worker(self, preload: Path | None = None) -> subprocess.Popen:
        worker = _start_worker(self.address, preload, self.modules)
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for p in [*self.workers, self.scheduler]:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.close()


def _bnlab(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnlab", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=HANG, **kw)


_ALONE: dict[tuple, bytes] = {}


def _alone(tmp: Path, args: list[str]) -> bytes:
    """metrics.jsonl of the run on one machine (run once per module)."""
    if tuple(args) not in _ALONE:
        done = _bnlab("run", "init-sweep", *args, "--out", str(tmp / "alone"), cwd=tmp)
        assert done.returncode == 0, done.stderr
        _ALONE[tuple(args)] = (tmp / "alone" / "metrics.jsonl").read_bytes()
    return _ALONE[tuple(args)]


def _rows(path: Path) -> list[dict]:
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- the address -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["tcp://127.0.0.1:8786", "tcp://node-3.cluster:8786",
                                   "10.0.0.5:8786", "local:1", "local:16"])
def test_scheduler_values_taken(value):
    assert is_scheduler(value)


@pytest.mark.parametrize("value", ["", "local", "local:0", "local:02", "local:x", "local:-1",
                                   "tcp://host", "tcp://host:0", "tcp://host:99999", "foo",
                                   " tcp://h:1", "tcp://h:1\0", 8786, None, "h:٣",
                                   "tls://h:8786", "ucx://h:8786", "inproc://h:1"])
def test_scheduler_values_refused(value):
    assert not is_scheduler(value)


def test_scheduler_is_a_session_field_refused_with_workers_or_elsewhere(tmp_path):
    config = InitSweepConfig(scheduler="local:2")
    assert config.digest() == InitSweepConfig().digest()  # the numbers do not depend on it
    assert "scheduler" not in config.to_dict()
    with pytest.raises(ConfigError, match="--workers must be left out with --scheduler"):
        InitSweepConfig(scheduler="local:2", workers=2)
    with pytest.raises(ConfigError, match="--nproc must be left out with --scheduler"):
        InitSweepConfig(scheduler="local:2", nproc=2)
    done = _bnlab("run", "init-sweep", "--scheduler", "nowhere", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "--scheduler must be local:N" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_without_dask_it_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed fails
    config = InitSweepConfig(**{"dataset": "digits", "scales": (1.0,), "epochs": 1,
                                "scheduler": "local:1"})
    with pytest.raises(cl.ClusterError, match=r"pip install 'bnlab\[dask\]'"):
        run_experiment(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unreachable_scheduler_one_line_nothing_made(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(cl, "CONNECT_SECONDS", 2)
    config = InitSweepConfig(dataset="digits", scales=(1.0,), epochs=1,
                             scheduler=f"tcp://127.0.0.1:{port}")
    with pytest.raises(cl.ClusterError) as err:
        run_experiment(config, tmp_path / "run")
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


# -- on a cluster ----------------------------------------------------------------------------
def test_cluster_run_equals_one_machine_line_for_line(cluster, tmp_path):
    alone = _alone(tmp_path, QUICK)
    done = _bnlab("run", "init-sweep", *QUICK, "--scheduler", cluster.address,
                  "--out", str(tmp_path / "cluster"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cluster" / "metrics.jsonl").read_bytes() == alone
    assert (tmp_path / "cluster" / "report.html").is_file()


def test_python_api_on_a_cluster(cluster, tmp_path):
    import bnlab.lab as lab

    alone = lab.run("init-sweep", out=tmp_path / "alone", progress=False, dataset="digits",
                    scales=(1.0, 0.1), depth=2, width=32, epochs=5)
    there = lab.run("init-sweep", out=tmp_path / "there", progress=False, dataset="digits",
                    scales=(1.0, 0.1), depth=2, width=32, epochs=5, scheduler=cluster.address)
    assert (tmp_path / "there" / "metrics.jsonl").read_bytes() \
        == (tmp_path / "alone" / "metrics.jsonl").read_bytes()
    assert there.metrics.equals(alone.metrics)


def test_worker_killed_mid_task_run_ends_identical(cluster, tmp_path):
    alone = _alone(tmp_path, LONG)
    out = tmp_path / "cluster"
    driver = subprocess.Popen([sys.executable, "-m", "bnlab", "run", "init-sweep", *LONG,
                               "--scheduler", cluster.address, "--out", str(out)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(_rows(out / "metrics.jsonl")) >= 8, "the first rows", proc=driver)
        # both tasks are mid-way: no unit has finished
        assert not any(r.get("done") for r in _rows(out / "metrics.jsonl"))
        victim = cluster.workers.pop(0)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        _, err = driver.communicate(timeout=HANG)
    finally:
        if driver.poll() is None:
            driver.kill()
        cluster.add_worker()
        cluster.wait(2)
    assert driver.returncode == 0, err
    assert (out / "metrics.jsonl").read_bytes() == alone


def test_driver_killed_then_resumed_ends_identical(cluster, tmp_path):
    alone = _alone(tmp_path, LONG)
    out = tmp_path / "cluster"
    driver = subprocess.Popen([sys.executable, "-m", "bnlab", "run", "init-sweep", *LONG,
                               "--scheduler", cluster.address, "--out", str(out)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: any((out / "checkpoints").glob("*.pt"))
                  and len(_rows(out / "metrics.jsonl")) >= 8, "the first checkpoints",
                  proc=driver)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert not any(r.get("done") for r in _rows(out / "metrics.jsonl"))
    done = _bnlab("run", "init-sweep", "--resume", str(out), "--scheduler", cluster.address,
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (out / "metrics.jsonl").read_bytes() == alone


def test_worker_of_another_version_refused_the_run_goes_on(cluster, tmp_path):
    import bnlab

    alone = _alone(tmp_path, QUICK)
    preload = tmp_path / "other_version.py"
    preload.write_text("import bnlab\nbnlab.__version__ = '0.0.0+other'\n")
    other = cluster.add_worker(preload)
    try:
        cluster.wait(3)
        done = _bnlab("run", "init-sweep", *QUICK, "--scheduler", cluster.address,
                      "--out", str(tmp_path / "run"), cwd=tmp_path)
    finally:
        cluster.workers.remove(other)
        other.kill()
        other.wait()
        cluster.wait(2)
    assert done.returncode == 0, done.stderr
    assert "refused: worker tcp://" in done.stderr
    assert f"bnlab 0.0.0+other (here {bnlab.__version__})" in done.stderr
    assert "the run goes on without it" in done.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == alone


def test_worker_without_the_data_refused_by_name(tmp_path):
    (tmp_path / "c").mkdir()
    preload = tmp_path / "no_data.py"
    preload.write_text("import bnlab.lab.runner as r\n\n\ndef missing(*args, **kwargs):\n"
                       "    raise OSError('no IDX files in /data')\n\n\nr.load_dataset = missing\n")
    blind = Cluster(tmp_path / "c", 0)
    try:
        worker = blind.add_worker(preload)
        blind.wait(1)
        done = _bnlab("run", "init-sweep", *QUICK, "--scheduler", blind.address,
                      "--out", str(tmp_path / "run"), cwd=tmp_path)
    finally:
        blind.close()
    said = [line for line in done.stderr.splitlines()
            if "WARNING" not in line and not line.startswith("[")]
    assert done.returncode == 2 and len(said) == 1, done.stderr
    assert "cannot load its digits data (no IDX files in /data), and no other worker is left" \
        in said[0] and said[0].count("refused: worker tcp://127.0.0.1:") == 1
    assert "Continue with: bnlab run init-sweep --resume" in said[0]
    del worker


def test_only_workers_of_another_version_run_refused(tmp_path):
    import bnlab

    (tmp_path / "c").mkdir()
    preload = tmp_path / "other_version.py"
    preload.write_text("import bnlab\nbnlab.__version__ = '0.0.0+other'\n")
    lone = Cluster(tmp_path / "c", 0)
    try:
        lone.add_worker(preload)
        lone.wait(1)
        done = _bnlab("run", "init-sweep", *QUICK, "--scheduler", lone.address,
                      "--out", str(tmp_path / "run"), cwd=tmp_path)
    finally:
        lone.close()
    said = [line for line in done.stderr.splitlines() if "WARNING" not in line]
    assert done.returncode == 2 and len(said) == 1, done.stderr
    assert "refused every worker" in said[0]
    assert f"bnlab 0.0.0+other (here {bnlab.__version__})" in said[0]
    assert not (tmp_path / "run").exists()


def test_not_a_scheduler_at_that_port_one_line(tmp_path, monkeypatch):
    """Something else listens there: Dask's handshake would wait forever."""
    import socket

    monkeypatch.setattr(cl, "CONNECT_SECONDS", 1)
    with socket.socket() as listener:  # accepts, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        config = InitSweepConfig(dataset="digits", scales=(1.0,), epochs=1,
                                 scheduler=f"tcp://127.0.0.1:{port}")
        with pytest.raises(cl.ClusterError, match="cannot reach the Dask scheduler at tcp://"
                                                  f"127.0.0.1:{port} .no Dask scheduler answered"):
            run_experiment(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_scheduler_lost_one_line_then_resume_elsewhere(tmp_path):
    alone = _alone(tmp_path, LONG)
    out = tmp_path / "cluster"
    (tmp_path / "doomed").mkdir()
    doomed = Cluster(tmp_path / "doomed", 1)
    try:
        driver = subprocess.Popen([sys.executable, "-m", "bnlab", "run", "init-sweep", *LONG,
                                   "--scheduler", doomed.address, "--out", str(out)],
                                  cwd=tmp_path, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: len(_rows(out / "metrics.jsonl")) >= 4, "the first rows", proc=driver)
        doomed.scheduler.send_signal(signal.SIGKILL)
        _, err = driver.communicate(timeout=HANG)
    finally:
        doomed.close()
    assert driver.returncode == 2
    said = [line for line in err.splitlines() if not line.startswith("[")]  # but the bar
    assert len(said) == 1, err
    assert f"lost the Dask scheduler at {doomed.address}" in err
    assert f"--resume {out}" in err
    # on another cluster: two local worker processes
    done = _bnlab("run", "init-sweep", "--resume", str(out), "--scheduler", "local:2",
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (out / "metrics.jsonl").read_bytes() == alone


def _scale(channels, seed, dims, k=2):
    """A toy norm family: the layer multiplies by 1/k."""
    import torch

    class Scale(torch.nn.Module):
        def forward(self, x):
            return x / k
    return Scale()


def test_own_norm_family_and_experiment_reach_the_workers(cluster, tmp_path):
    """A norm family registered in the driver (here: in this test module, which the workers
    cannot import) reaches the workers by value; an experiment of one's own, by reference
    to the module that defines it, which the workers import."""
    import cloudpickle

    from bnlab.lab.experiment_configs import register_experiment, unregister_experiment
    from bnlab.lab.norms import register_norm, unregister_norm

    sys.path.insert(0, str(cluster.modules))
    try:
        from bnlab_cluster_own import MineConfig
    finally:
        sys.path.remove(str(cluster.modules))
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    register_norm("scale-K", _scale, label="FC + scale 1/{k}", color="#111111")
    register_experiment(MineConfig, module="bnlab.lab.experiments.compare",
                        section="bnlab.report.sections.sweeps", summary="a sweep of one's own")
    try:  # the run, not its report (the sweeps section knows bnlab's own sweeps only)
        args = dict(dataset="digits", scales=(1.0,), depth=2, width=16, epochs=2,
                    norms=("scale-3", "bn"))
        run_experiment(MineConfig(**args), tmp_path / "alone")
        run_experiment(MineConfig(**args, scheduler=cluster.address), tmp_path / "there")
    finally:
        unregister_experiment("mine-sweep")
        unregister_norm("scale-K")
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (tmp_path / "there" / "metrics.jsonl").read_bytes() \
        == (tmp_path / "alone" / "metrics.jsonl").read_bytes()


def test_own_experiment_that_cannot_be_sent_refused(cluster, tmp_path):
    import dataclasses

    import cloudpickle

    from bnlab.lab.experiment_configs import register_experiment, unregister_experiment

    @dataclasses.dataclass(frozen=True)
    class LocalConfig(InitSweepConfig, name="local-sweep"):
        pass

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # as a notebook's would be
    register_experiment(LocalConfig, module="bnlab.lab.experiments.compare",
                        section="bnlab.report.sections.sweeps", summary="one's own")
    try:
        with pytest.raises(ConfigError, match="the experiment local-sweep cannot be sent to "
                                              "the cluster's workers"):
            run_experiment(LocalConfig(dataset="digits", scales=(1.0,), epochs=1,
                                       scheduler=cluster.address), tmp_path / "run")
    finally:
        unregister_experiment("local-sweep")
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_own_norm_workers_cannot_import_refused_in_one_line(cluster, tmp_path, monkeypatch):
    from bnlab.lab.norms import register_norm, unregister_norm

    (tmp_path / "mynorms_here_only.py").write_text(
        "def build(channels, seed, dims):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # in the driver only
    import mynorms_here_only

    register_norm("here-only", mynorms_here_only.build)
    try:
        config = InitSweepConfig(dataset="digits", scales=(1.0,), depth=2, width=16, epochs=2,
                                 norms=("here-only",), scheduler=cluster.address)
        with pytest.raises(cl.ClusterError) as err:
            run_experiment(config, tmp_path / "run")
    finally:
        unregister_norm("here-only")
    text = str(err.value)
    assert text.startswith("refused: worker tcp://") and "\n" not in text
    assert "No module named 'mynorms_here_only'" in text and "importable there" in text


def test_local_workers_all_gone_ends_in_one_line(tmp_path):
    out = tmp_path / "run"
    before = _local_workers()
    driver = subprocess.Popen([sys.executable, "-m", "bnlab", "run", "init-sweep", *LONG,
                               "--scheduler", "local:1", "--out", str(out)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(_rows(out / "metrics.jsonl")) >= 4, "the first rows", proc=driver)
        for pid in _local_workers() - before:
            os.kill(int(pid), signal.SIGKILL)
        _, err = driver.communicate(timeout=HANG)
    finally:
        if driver.poll() is None:
            driver.kill()
    said = [line for line in err.splitlines() if not line.startswith("[")]
    assert driver.returncode == 2 and len(said) == 1, err
    assert "the 1 local Dask workers have ended (exit codes -9)" in err
    assert f"--resume {out} [--scheduler ADDRESS]" in err


def _local_workers() -> set[str]:
    return set(subprocess.run(["pgrep", "-f", "dask_worker .* --name local-"],
                              capture_output=True, text=True).stdout.split())


def test_local_cluster_of_worker_processes(tmp_path):
    alone = _alone(tmp_path, QUICK)
    before = _local_workers()  # other runs' on this machine
    done = _bnlab("run", "init-sweep", *QUICK, "--scheduler", "local:2",
                  "--out", str(tmp_path / "local"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "local" / "metrics.jsonl").read_bytes() == alone
    assert not _local_workers() - before  # its workers ended with it
