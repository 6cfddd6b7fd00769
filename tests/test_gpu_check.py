"""scripts/gpu-check: what it reads from the benchmarks' output (their own printing code fed
with made-up results), its CPU/CUDA comparison of lab runs, and a whole run on a machine
without CUDA, whose summary must skip the CUDA steps. No assertion reads a time."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest
import torch

from bnlab.bench import layer, resnet

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check"


@pytest.fixture(scope="module")
def gpu_check():
    loader = SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    try:
        loader.exec_module(module)
        yield module
    finally:
        del sys.modules["gpu_check"]


def test_bench_rows_give_the_large_layers_targets(gpu_check):
    large = (256, 256, 56, 56)
    rows = [layer.Result("conv NCHW", large, "float16", "forward+backward", 1.0, 1.25, 0.8),
            layer.Result("conv NHWC", large, "bfloat16", "forward+backward", 1.2, 1.0, 0.9),
            layer.Result("conv NCHW", large, "bfloat16", "forward+backward", 1.0, 1.0, 0.6),
            layer.Result("conv NCHW", large, "float16", "forward", 1.0, 0.5, 0.4),
            layer.Result("conv NCHW", (32, 64, 56, 56), "float16", "forward+backward", 1, 2, 1),
            layer.Result("conv NCHW", large, "float32", "forward+backward", 1.0, 2.0, 0.9)]
    detail, targets = gpu_check.parse_bench("\n".join(map(layer.format_row, rows)))
    assert targets == [
        "met: BN fwd+bwd (256, 256, 56, 56) float16 NCHW 0.80x cuDNN (<= 1.0), 80% bw (>= 70%)",
        "MISSED: BN fwd+bwd (256, 256, 56, 56) bfloat16 NHWC 1.20x cuDNN (<= 1.0), 75% bw (>= 70%)",
        "MISSED: BN fwd+bwd (256, 256, 56, 56) bfloat16 NCHW 1.00x cuDNN (<= 1.0), 60% bw (>= 70%)"]
    assert "float32 NCHW 0.50x cuDNN at 90% bw" in detail


def test_fused_rows_are_measured_against_torch(gpu_check):
    rows = [layer.FusedResult("NCHW", (256, 256, 56, 56), 0.7, 1.4, "float16", 1.0, 0.56),
            layer.FusedResult("NHWC", (32, 64, 56, 56), 0.8, 1.0, "bfloat16", 1.0, 0.4),
            layer.FusedResult("NHWC", (32, 64, 56, 56), 0.5, 1.0, "float32", 1.0, 0.4)]
    detail, targets = gpu_check.parse_fused("\n".join(map(layer.format_fused_row, rows)))
    assert targets == [
        "met: fused BN+ReLU (256, 256, 56, 56) float16 NCHW 0.70x torch BN+ReLU (<= 0.75)",
        "MISSED: fused BN+ReLU (32, 64, 56, 56) bfloat16 NHWC 0.80x torch BN+ReLU (<= 0.75)"]
    assert ("(256, 256, 56, 56) float16 NCHW 0.70x torch BN+ReLU (0.50x bnlab BN then relu, "
            "80% bw)") in detail


def test_resnet_report_gives_the_fused_target(gpu_check):
    rows = [resnet.StepTime(layout, variant, ms, loss, torch_ms)
            for layout, variant, ms, loss, torch_ms in [
                ("nchw", "torch BN", 200.0, 6.91, 200.0), ("nchw", "bnlab BN", 196.0, 6.91, 200.0),
                ("nchw", "bnlab BN+act", 180.0, 6.91, 200.0),
                ("channels_last", "torch BN", 100.0, 6.91, 100.0),
                ("channels_last", "bnlab BN", 98.0, 6.91, 100.0),
                ("channels_last", "bnlab BN+act", 97.0, 6.92, 100.0)]]
    bench = resnet.ResnetBench("resnet50", 64, 224, "cuda", torch.float16, 8, rows, "note")
    detail, targets, found = gpu_check.parse_resnet("\n".join(resnet.report(bench)))
    assert found and targets == [
        "met: ResNet AMP step with fused BN+ReLU, nchw 0.90x torch's (<= 0.95)",
        "MISSED: ResNet AMP step with fused BN+ReLU, channels_last 0.97x torch's (<= 0.95)"]
    assert "nchw torch BN 200.0 ms" in detail and "channels_last bnlab BN 98.0 ms (0.98x)" in detail
    assert bench.loss_gap("channels_last") == pytest.approx(0.01 / 6.91)  # below float16's 5e-3
    assert "first-step losses agree (largest difference 0.0014)" in detail


@pytest.mark.slow
def test_lab_step_runs_and_compares_two_runs(gpu_check, tmp_path, monkeypatch):
    """The lab step for real, with the CPU standing in for the GPU: two identical runs."""
    runner = gpu_check.Runner(tmp_path, cuda=False)
    tiny = ["--dataset", "digits", "--epochs", "2", "--seeds", "1"]  # the step's loop, quickly
    monkeypatch.setattr(gpu_check, "LAB_RUNS", [("compare", tiny)])
    step = gpu_check.step_lab(runner, devices=("cpu", "cpu"))
    assert step.status == "PASS", step.detail
    names = [name for name, _ in gpu_check.LAB_RUNS]
    for name in names:
        assert f"{name} cpu/cpu: " in step.detail and (tmp_path / f"lab-{name}-cpu-1").is_dir()
    assert step.detail.count("they agree") == len(names)
    assert step.detail.endswith("compare twice on cpu: metrics identical")
    assert gpu_check.step_lab(runner).detail.startswith("needs CUDA")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run on a machine without CUDA")
def test_whole_run_without_cuda_skips_the_cuda_steps(tmp_path):
    # the Triton tests' own files run them in the interpreter: skipped here, as a rerun would
    done = subprocess.run([sys.executable, str(SCRIPT), "--skip", "triton-tests",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["nvidia-smi", "env", "cli", "triton-tests", "bench", "bench-fused",
                           "bench-resnet", "lab"]
    for name in ("bench", "bench-fused", "lab"):
        assert steps[name]["status"] == "SKIP" and "needs CUDA" in steps[name]["detail"]
    assert steps["env"]["status"] == steps["cli"]["status"] == "PASS"
    assert "no CUDA device" in steps["env"]["detail"] and "bnlab 0.1" in steps["cli"]["detail"]
    assert steps["triton-tests"] == {**steps["triton-tests"], "status": "SKIP",
                                     "detail": "skipped: --skip"}
    resnet_step = steps["bench-resnet"]
    assert (resnet_step["status"] == "PASS" and "first-step losses agree" in resnet_step["detail"]
            or resnet_step["status"] == "SKIP" and "torchvision" in resnet_step["detail"])
    assert not any(s["targets"] for s in steps.values())
    failed = any(s["status"] == "FAIL" for s in steps.values())
    assert done.returncode == (1 if failed else 0), done.stderr
    text = (tmp_path / "out" / "summary.txt").read_text()
    assert text.splitlines()[0].startswith("bnlab gpu-check: no CUDA device")
    assert "SKIP  bench-fused" in text and text in done.stdout
    for name in ("env", "cli"):
        assert list((tmp_path / "out").glob(f"*-{name}.stdout"))
    assert not list((tmp_path / "out").glob("*-triton-tests.stdout"))


def test_skip_names_only_steps(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--skip", "bench,nope", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--skip takes steps from cli, " in done.stderr
    assert "(got nope)" in done.stderr and not list(tmp_path.iterdir())
