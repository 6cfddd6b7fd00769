"""The device a run trains on (--device, device=): refused in one line where it cannot be
used, before anything is made; the CPU named explicitly is the default, byte for byte; data,
networks, stacks and batches on the requested device; checkpoints in CPU tensors; a run
resumed across devices; two runs of one configuration compared (compare_runs).

There is no GPU here: where the checks that accept a CUDA device are tested, torch.cuda is
made to report devices, and no network is trained."""

from __future__ import annotations

import collections
import json
import shutil
import types

import pytest
import torch

import bnlab.lab
from bnlab.cli import build_parser, main
from bnlab.lab import device as devices
from bnlab.lab.distributed import check_data_parallel
from bnlab.lab.engine import StackedNets
from bnlab.lab.experiment_configs import CompareConfig, experiments
from bnlab.lab.fields import SESSION_FIELDS, ConfigError, DeviceError
from bnlab.lab.rundir import read_rows, session
from bnlab.lab.runner import Context, load_data, run_experiment, stack_size
from bnlab.lab.stack import Stack
from bnlab.lab.train import Network, Progress
from bnlab.nn import _kernels
from conftest import TINY, stop_after

TINY_ARGS = ["--epochs", "2", "--seeds", "1", "--width", "8", "--depth", "1"]


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """Run ``bnlab ARGV`` in tmp_path; returns (exit code, stdout, stderr lines)."""
    monkeypatch.chdir(tmp_path)

    def run(*argv):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, [line for line in err.splitlines() if line.strip()]
    return run


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda reports two devices, the current one cuda:1 (nothing may run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


def no_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# -- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_device_is_one_line_and_exit_2_before_anything(cli, monkeypatch,
                                                                      tmp_path, device):
    no_gpu(monkeypatch)
    code, out, err = cli("compare", "--device", device, *TINY_ARGS)
    assert code == 2 and out == "" and len(err) == 1
    assert err[0].startswith(f"bnlab compare: error: --device '{device}': ")
    assert "CUDA" in err[0] and "train on the CPU (--device 'cpu', the default)" in err[0]
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, nothing


@pytest.mark.parametrize("device", ["gpu", "mps", "CUDA", "cuda:", "cuda:x", "cuda:-1",
                                    "cpu:0", " cuda", "cuda:1234567"])
def test_unknown_devices_are_refused_by_the_field(cli, tmp_path, device):
    code, _, err = cli("run", "noise", "--device", device)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("bnlab run noise: error: --device must be cpu, cuda or cuda:N")
    assert err[0].endswith(f"(got {device!r})") and list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match=r"^device must be cpu, cuda or cuda:N"):
        bnlab.lab.run("noise", tmp_path / "r", progress=False, device=device)


def test_the_api_raises_device_error_and_makes_no_folder(tmp_path, monkeypatch):
    no_gpu(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for out in (None, tmp_path / "r"):
        with pytest.raises(DeviceError, match=r"^device='cuda': .*train on the CPU "
                                              r"\(device='cpu', the default\)$"):
            bnlab.lab.run("compare", out, progress=False, device="cuda", **TINY)
    assert list(tmp_path.iterdir()) == []
    assert issubclass(DeviceError, ConfigError) and bnlab.lab.DeviceError is DeviceError
    with pytest.raises(DeviceError):  # the runner checks too, for its own callers
        run_experiment(CompareConfig(**TINY, device="cuda"), tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv,other", [
    (["run", "init-sweep", "--nproc", "2"], "--nproc 2: data-parallel processes train on the CPU"),
    (["run", "ics", "--scheduler", "local:2"], "--scheduler 'local:2': the cluster's workers"),
])
def test_processes_and_clusters_take_no_gpu(cli, two_gpus, argv, other):
    code, _, err = cli(*argv, "--device", "cuda")
    assert code == 2 and len(err) == 1
    assert f"--device 'cuda' cannot be combined with {other}" in err[0]


def test_a_launcher_s_processes_take_no_gpu():
    with pytest.raises(ConfigError, match="cannot be combined with --nproc 2"):
        check_data_parallel(CompareConfig, CompareConfig(**TINY), {"device": "cuda"}, 2)


def test_the_acceptance_path_names_the_devices_there_are(two_gpus):
    assert devices.resolve("cuda") == torch.device("cuda", 1)  # the current device
    assert devices.resolve("cuda:0") == torch.device("cuda", 0)
    assert devices.resolve("cuda:01") == torch.device("cuda", 1)
    assert devices.resolve("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"--device 'cuda:2': torch sees 2 CUDA devices here "
                                          r"\(cuda:0 to cuda:1\); choose one of them"):
        devices.resolve("cuda:2")


def test_the_command_passes_an_available_device_to_the_run(cli, two_gpus, monkeypatch):
    """Past the device's check the run starts with it (stopped there: nothing trains)."""
    from bnlab.lab import runner

    seen = []

    def started(config, run_dir, **kwargs):
        seen.append(config.device)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_experiment", started)
    code, _, err = cli("compare", "--device", "cuda:1", *TINY_ARGS)
    assert code == 130 and seen == ["cuda:1"] and "nothing was written" in err[-1]


def test_a_gpu_out_of_memory_ends_the_command_in_one_line(cli, monkeypatch):
    from bnlab.lab import runner

    def full(config, run_dir, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 "
                                          "has a total capacity of 79.19 GiB of which 1.2 GiB "
                                          "is free. Including non-PyTorch memory, ...")

    monkeypatch.setattr(runner, "run_experiment", full)
    code, _, err = cli("compare", *TINY_ARGS)
    assert code == 2 and len(err) == 1
    assert err[0] == ("bnlab compare: error: CUDA out of memory. Tried to allocate 2.00 GiB: "
                      "the GPU's memory is full; train fewer or smaller networks at once "
                      "(fewer --workers, a smaller --width), or on the CPU (--device cpu)")


# -- the field: a session's, on every experiment ------------------------------------------------
def test_every_experiment_takes_a_device_that_is_not_in_its_config():
    assert "device" in SESSION_FIELDS
    for entry in experiments():
        cls = entry.config
        assert cls().device == "cpu"
        config = cls(device="cuda:1")
        assert "device" not in config.to_dict() and config.digest() == cls().digest()
        assert cls.from_dict({**cls().to_dict(), "device": "cuda"}).device == "cpu"
    args = build_parser().parse_args(["run", "smoothness", "--device", "cuda:0"])
    assert args.device == "cuda:0"


def test_an_explicit_cpu_is_the_default_byte_for_byte(tmp_path):
    run_experiment(CompareConfig(**TINY), tmp_path / "default")
    run_experiment(CompareConfig(**TINY, device="cpu"), tmp_path / "cpu")
    for name in ("config.json", "metrics.jsonl"):
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "cpu" / name).read_bytes()
    session = json.loads((tmp_path / "cpu" / "run.json").read_text())["sessions"][-1]
    assert session["device"] == "cpu" and session["settings"]["device"] == "cpu"


# -- everything on the device -----------------------------------------------------------------
def tensors_of(engine) -> list[torch.Tensor]:
    """Every tensor an engine trains with: stacked parameters and buffers, momentum."""
    if isinstance(engine, Stack):
        found = [t for layer in engine.layers for t in layer.params()]
        found += [v for layer in engine.layers if layer.bn
                  for v in layer.bn.values() if isinstance(v, torch.Tensor)]
    elif isinstance(engine, StackedNets):
        found = [t for op in engine.ops for t in op.tensors.values()]
    else:
        found = [*engine.net.parameters(), *engine.net.buffers()]
    return found + [b for b in engine.buffers if b is not None]


def test_data_networks_engines_and_batches_live_on_the_requested_device(tmp_path, monkeypatch):
    """compare's stacks (Stack, StackedNets) and one network alone (torch-bn), with momentum:
    every tensor of every engine, the data, the batches' indices and the models."""
    import bnlab.lab.train as train

    device = torch.device("cpu")
    engines, batches = [], []
    fit = train.fit

    def spying_fit(units, models, x, y, *, engine, **kwargs):
        def build(*args, **kw):
            engines.append(engine(*args, **kw))
            return engines[-1]
        assert x.device == device and y.device == device
        assert all(t.device == device for m in models for t in (*m.parameters(), *m.buffers()))
        return fit(units, models, x, y, engine=build, **kwargs)

    class SpyingBatches(train.Batches):
        def __call__(self, step):
            batches.append(super().__call__(step))
            return batches[-1]

    from bnlab.lab import runner
    monkeypatch.setattr(runner, "fit", spying_fit)
    monkeypatch.setattr(train, "Batches", SpyingBatches)
    config = CompareConfig(**TINY, norms=("none", "bn", "ghost-6", "torch-bn"), momentum=0.5,
                           device="cpu")
    run_experiment(config, tmp_path / "r")
    assert {type(e) for e in engines} == {Stack, StackedNets, Network}
    assert all(t.device == device for e in engines for t in tensors_of(e))
    assert all(e.buffers and all(b is not None for b in e.buffers) for e in engines)  # momentum
    assert batches and all(b.device == device for b in batches)

    ctx = Context(config, load_data(config), None, Progress(), device=device)
    assert all(t.device == device for t in (ctx.x, ctx.y, ctx.test_x, ctx.test_y))
    assert all(p.device == device for p in ctx.model("bn", 0).parameters())


def test_data_and_networks_are_moved_to_another_device(monkeypatch):
    """On the meta device (shapes without values: nothing trains), as they would be on a GPU:
    the data moved once, every network after it was built on the CPU from its seed; one
    worker by default, and the GPU's stack sizes."""
    config = CompareConfig(**TINY)
    meta = torch.device("meta")
    ctx = Context(config, load_data(config), None, Progress(), device=meta)
    assert all(t.device == meta for t in (ctx.x, ctx.y, ctx.test_x, ctx.test_y))
    assert ctx.x.shape == (1297, 64) and ctx.test_y.shape == (500,)
    net = ctx.model("bn", 3)
    assert all(t.device == meta for t in (*net.parameters(), *net.buffers()))
    assert ctx.workers() == 1
    from bnlab.lab import runner

    monkeypatch.setattr(runner, "memory_bytes", lambda device: 80 * 2**30)
    gpu = torch.device("cuda", 0)
    assert stack_size(64, 10, 100, 3, gpu) == devices.STACK_LIMIT["cuda"] == 1024
    assert stack_size(64, 10, 100, 3) == 32
    monkeypatch.setattr(runner, "memory_bytes", lambda device: 8 * 2**30)
    assert 1 < stack_size(784, 10, 1000, 3, gpu) < 32  # by the GPU's memory
    assert stack_size(784, 10, 100, 3, gpu, rows=60_000) < stack_size(784, 10, 100, 3, gpu) \
        == stack_size(784, 10, 100, 3, gpu, rows=60)  # full-batch BN's whole set, every step


def test_the_stacks_gpu_forms_run_on_the_cpu_too(tmp_path, monkeypatch):
    """The forms the stacks take off the CPU (BN's statistics over the whole stack by torch
    ops where a probe found them exact, else network by network, running statistics folded
    elementwise; activations over the whole stack where checked), taken on the CPU with the
    torch ops, as on a GPU: the numbers of the CPU's forms, to rounding."""
    import bnlab.lab.stack as stack

    monkeypatch.setattr(_kernels, "_failure", "switched off by BNLAB_KERNELS=0")
    config = CompareConfig(**TINY, norms=("none", "bn", "ghost-6", "renorm", "full-batch"),
                           momentum=0.5, n_train=300)
    run_experiment(config, tmp_path / "cpu")
    monkeypatch.setattr(stack, "_on_cpu", lambda t: False)
    monkeypatch.setattr(stack, "_CHECKED", {})
    run_experiment(config, tmp_path / "gpu-forms")
    probed = {key[0] for key in stack._CHECKED}
    assert {"stacked BN", "stacked BN backward", "each"} <= probed
    agreement = bnlab.lab.compare_runs(tmp_path / "cpu", tmp_path / "gpu-forms", acc=0, rel=1e-5)
    assert agreement.ok and agreement.compared == 5 * 2 * 3 * 5, agreement


def test_a_gpu_session_records_its_device(tmp_path, monkeypatch):
    """What run.json keeps of a session on a GPU (torch.cuda made to describe one; nothing
    trains), and a session on the CPU after it."""
    gpu = types.SimpleNamespace(name="NVIDIA Test GPU", major=9, minor=0, total_memory=2**36)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: gpu.name)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with session(tmp_path, 1, {"device": "cuda:1"}, torch.device("cuda", 1)) as s:
        s.check_code()  # as before a row
    with session(tmp_path, 1, {"device": "cpu"}) as s:
        s.check_code()
    on_gpu, on_cpu = json.loads((tmp_path / "run.json").read_text())["sessions"]
    assert (on_gpu["device"], on_gpu["device_name"], on_gpu["capability"], on_gpu["cuda"]) \
        == ("cuda:1", "NVIDIA Test GPU", "9.0", "12.8")
    assert on_gpu["code"] == "cuda" and on_gpu["kernels"].startswith("NVIDIA Test GPU, CUDA 12.8: ")
    assert on_gpu["finished"] and on_gpu["settings"] == {"device": "cuda:1"}
    assert on_cpu["device"] == "cpu" and on_cpu["code"] in ("compiled kernels", "torch ops")


def float32_settings() -> tuple:
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    return (cudnn.deterministic, cudnn.benchmark, matmul.fp32_precision,
            cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)


def test_gpu_sessions_compute_in_float32_deterministically_and_restore():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before, flags = float32_settings(), (matmul.allow_tf32, cudnn.allow_tf32)
    with devices.exact_float32(torch.device("cpu")):
        assert float32_settings() == before
    with devices.exact_float32(torch.device("cuda", 0)):
        assert cudnn.deterministic and not cudnn.benchmark
        assert not matmul.allow_tf32 and not cudnn.allow_tf32  # both kinds of settings
        assert "tf32" not in float32_settings()
    assert float32_settings() == before and (matmul.allow_tf32, cudnn.allow_tf32) == flags
    # a process that set fp32_precision alone (the flags' getters raise): kept to it
    cudnn.conv.fp32_precision = "ieee"
    try:
        mixed = float32_settings()
        with devices.exact_float32(torch.device("cuda", 0)):
            assert float32_settings()[2:] == ("ieee", "ieee", "ieee")
        assert float32_settings() == mixed
    finally:
        cudnn.conv.fp32_precision = before[3]
    assert (matmul.allow_tf32, cudnn.allow_tf32) == flags


class OnDevice(torch.Tensor):
    """A tensor that stands for one on a GPU: ``cpu()`` returns a new CPU tensor."""

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()


def test_checkpoints_are_brought_to_the_cpu():
    model = torch.nn.BatchNorm1d(3).state_dict()
    on_cpu = {"model": model, "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}}}
    assert devices.to_cpu(on_cpu) is on_cpu  # nothing to move: the very same objects
    with_w = collections.OrderedDict(model, w=torch.ones(2).as_subclass(OnDevice))
    with_w._metadata = model._metadata
    moved = devices.to_cpu({"model": with_w, "buffers": [torch.zeros(1).as_subclass(OnDevice), None], "step": 7})
    assert type(moved["model"]["w"]) is torch.Tensor and type(moved["buffers"][0]) is torch.Tensor
    assert moved["model"]._metadata == model._metadata  # the state_dict's versions
    assert moved["buffers"][1] is None and moved["step"] == 7


def test_checkpoints_load_on_the_cpu_and_a_run_resumes_on_the_device_asked_for(tmp_path,
                                                                               monkeypatch):
    """A run stopped after its first checkpoints: each loads with map_location cpu; resumed
    with device='cpu' (the API's and the command's resume take up the last session's
    device otherwise) it ends with the uninterrupted run's record."""
    config = CompareConfig(**TINY, momentum=0.5, workers=1)
    run_experiment(config, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "cut", progress=stop_after(150))
    saved = list((tmp_path / "cut" / "checkpoints").glob("*.pt"))
    assert saved
    for path in saved:
        state = torch.load(path, map_location="cpu", weights_only=True)
        tensors = [*state["model"].values(),
                   *(s["momentum_buffer"] for s in state["optimizer"]["state"].values())]
        assert tensors and all(t.device.type == "cpu" for t in tensors)
    bnlab.lab.run("compare", tmp_path / "cut", progress=False, device="cpu")
    assert (tmp_path / "cut" / "metrics.jsonl").read_bytes() == \
        (tmp_path / "whole" / "metrics.jsonl").read_bytes()


@pytest.fixture
def after_gpu(tmp_path):
    """A run stopped midway whose last session's entry in run.json stands for a session on
    a GPU (its rows computed there, on cuda)."""
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(CompareConfig(**TINY, workers=1), out, progress=stop_after(150))
    info = json.loads((out / "run.json").read_text())
    gpu = {**info["sessions"][-1], "device": "cuda:0", "device_name": "a GPU", "code": "cuda"}
    gpu["settings"] = {**gpu["settings"], "device": "cuda"}
    info["sessions"].append(gpu)
    (out / "run.json").write_text(json.dumps(info))
    return out


def test_a_resume_keeps_the_last_session_s_device_and_says_how_to_go_on(cli, after_gpu,
                                                                         monkeypatch):
    no_gpu(monkeypatch)
    before = (after_gpu / "metrics.jsonl").read_bytes()
    code, _, err = cli("compare", "--resume", after_gpu)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("bnlab compare: error: --device 'cuda': ")
    assert err[0].endswith("continue the run here with --device 'cpu' (its last session "
                           "trained on cuda)")
    with pytest.raises(DeviceError, match=r"continue the run here with device='cpu'"):
        bnlab.lab.run("compare", after_gpu, progress=False)
    assert (after_gpu / "metrics.jsonl").read_bytes() == before


@pytest.mark.skipif(not _kernels.available(), reason="the compiled kernels are off")
def test_rows_of_another_device_let_a_session_go_on_with_other_code(after_gpu, tmp_path,
                                                                    monkeypatch):
    """The CPU's rows were computed by the compiled kernels; after the GPU's, a session on
    the CPU with the torch ops is asked for by its device, and goes on (without the GPU
    session between, test_rundir_records refuses it)."""
    monkeypatch.setattr(_kernels, "_failure", "switched off by BNLAB_KERNELS=0")
    run_experiment(None, after_gpu, resume=True, device="cpu")
    last = json.loads((after_gpu / "run.json").read_text())["sessions"][-1]
    assert (last["device"], last["code"], last["finished"]) == ("cpu", "torch ops", True)
    assert sum(bool(r.get("done")) for r in read_rows(after_gpu / "metrics.jsonl")) == 4


# -- two runs compared -------------------------------------------------------------------------
def test_compare_runs_finds_agreement_and_names_what_differs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_experiment(CompareConfig(**TINY, norms=("bn",)), a)
    shutil.copytree(a, b)
    same = bnlab.lab.compare_runs(a, b)
    assert same.ok and same.compared == 2 * 3 * 5  # 2 seeds x 3 epochs x 5 numbers
    assert set(same.worst) == {"sgd_loss", "train_loss", "train_acc", "test_loss", "test_acc"}
    assert all(d == 0 for d, _ in same.worst.values()) and "they agree" in str(same)
    rows = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    rows[2]["test_acc"] += 0.015  # bn-seed0's last epoch: 1.5 points off
    rows[1]["test_loss"] *= 1.0005  # within 1e-3 relative
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    off = bnlab.lab.compare_runs(a, b)
    assert not off.ok and len(off.failures) == 1
    assert off.failures[0].startswith("bn-seed0@") and "test_acc" in off.failures[0]
    assert off.worst["test_acc"][1] == off.failures[0].split(":")[0]
    assert bnlab.lab.compare_runs(a, b, acc=0.02).ok
    assert not bnlab.lab.compare_runs(a, b, acc=0.02, rel=1e-4).ok
    run_experiment(CompareConfig(**TINY, norms=("bn",), lr=0.2), tmp_path / "c")
    with pytest.raises(ConfigError, match="not runs of one configuration"):
        bnlab.lab.compare_runs(a, tmp_path / "c")

