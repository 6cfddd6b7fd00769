"""What a new user meets first: the compiled kernels compile only what a run uses, say so
while they do (and not when Numba's cache has them), run without a writable cache folder;
and a run whose progress cannot be written still finishes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab.nn import _kernels as K
from bnlab.nn import _ops

kernels = pytest.mark.skipif(not K.available(), reason=f"kernels: {K.unavailable_reason()}")


@kernels
def test_without_a_writable_cache_folder_the_kernels_still_compile(monkeypatch, caplog):
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # named so before 0.59
    monkeypatch.setattr(impl, "_locator_classes", [])  # nowhere to cache
    monkeypatch.setattr(K, "_cache_failure", None)

    def twice(a):
        return 2 * a

    with caplog.at_level(logging.WARNING, logger=K.__name__):
        fast = K._jit(twice)
        again = K._jit(twice)
    assert fast(np.float64(2.5)) == 5.0 and again(np.float64(1.0)) == 2.0
    ours = [r.getMessage() for r in caplog.records if r.name == K.__name__]
    assert len(ours) == 1 and "NUMBA_CACHE_DIR" in ours[0]  # said once


def stacked_call(dtype):
    M, N, C = 2, 5, 3
    x = torch.randn(M, N, C, dtype=dtype)
    y, saved = _ops.stacked_forward(x, torch.ones(M, C, dtype=dtype), None, None, None, None,
                                    0.1, 1e-5)
    torch.testing.assert_close(y.mean(1), torch.zeros(M, C, dtype=dtype), atol=1e-6, rtol=0)
    return y


@kernels
@pytest.mark.slow
def test_a_first_run_compiles_one_layout_says_so_and_a_cached_run_is_silent(
        monkeypatch, tmp_path, caplog):
    from numba.core import config, event

    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(K, "_compiled", {})
    with caplog.at_level(logging.INFO, logger=K.__name__), \
            event.install_recorder("numba:compile") as recorder:
        stacked_call(torch.float64)
    said = [r.getMessage() for r in caplog.records]
    assert any("compiling BatchNorm kernels (forward_stacked, float64, rows" in m for m in said)
    assert [getattr(r, "progress_status", None) for r in caplog.records] == \
        ["compiling BatchNorm kernels (first run only)", ""]
    ours = {ev.data["dispatcher"].py_func.__name__ for _, ev in recorder.buffer if K._ours(ev)}
    assert ours and all(name.endswith("_rows_ser") for name in ours)
    batch_stats = K._compiled[False, True, None]["forward_stacked"].py_func.__globals__["_batch_stats"]
    typed = next(iter(batch_stats.overloads.values())).type_annotation.typemap
    assert "K" in typed and "per" not in typed  # the planes branch was never typed

    monkeypatch.setattr(K, "_compiled", {})  # a new process, as it were: the cache has them
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=K.__name__):
        stacked_call(torch.float64)
    assert not [r for r in caplog.records if "compiling" in r.getMessage()]


PREPARED = """
import logging, sys
import torch
from numba.core import event
from bnlab.nn import _kernels as K, _ops
records = []
logging.getLogger(K.__name__).addHandler(logging.Handler())
logging.getLogger(K.__name__).handlers[-1].emit = records.append
logging.getLogger(K.__name__).setLevel(logging.INFO)
started = _ops.prepare_stacked(torch.float32)
if sys.argv[1] == "kill":  # a compile process that dies: the run compiles for itself
    for proc, _ in K._pending.values():
        proc.kill()
with event.install_recorder("numba:compile") as recorder:
    M, N, C = 3, 7, 4
    x = torch.randn(M, N, C)
    w, b = torch.rand(M, C) + 0.5, torch.randn(M, C)
    mean, var, tracked = torch.zeros(M, C), torch.ones(M, C), torch.zeros(M, dtype=torch.long)
    y, saved = _ops.stacked_forward(x, w, b, mean, var, tracked, 0.1, 1e-5)
    dx, dw, db = _ops.stacked_backward(torch.randn(M, N, C), x, w, saved, 1e-5)
compiled_here = sorted({ev.data["dispatcher"].py_func.__name__ for _, ev in recorder.buffer
                        if K._ours(ev)})
ref = torch.nn.functional.batch_norm(x[1], None, None, w[1], b[1], True, 0.1, 1e-5)
torch.testing.assert_close(y[1], ref)
import json
print(json.dumps([started, compiled_here, [r.getMessage() for r in records], _ops.prepare_stacked()]))
"""


@kernels
@pytest.mark.slow
@pytest.mark.parametrize("child", ["works", "kill"])
def test_a_first_run_compiles_its_stacked_kernels_side_by_side(tmp_path, child):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}  # an empty cache
    out = subprocess.run([sys.executable, "-c", PREPARED, child], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    started, here, said, again = json.loads(out.stdout.splitlines()[-1])
    assert started == ["forward_stacked", "backward_stacked"] and again == []
    if child == "works":  # compiled by the two processes, loaded here from the cache
        assert here == []
        if said:  # said while the processes still ran (not asserted: it depends on speed)
            assert said[0].startswith("compiling BatchNorm kernels (forward_stacked, "
                                      "backward_stacked, float32; first use only")
            assert said[-1].startswith("compiled BatchNorm kernels")
            assert "side by side" in said[-1]
    else:
        assert "_forward_stacked_at_rows_ser" in here and "_backward_stacked_at_rows_ser" in here


@pytest.mark.slow
def test_compare_finishes_when_stderr_cannot_be_written(tmp_path):
    out = tmp_path / "run"
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "bnlab", "compare", "--epochs", "2",
                               "--seeds", "2", "--width", "16", "--depth", "2", "--out", str(out)],
                              stderr=full, stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                              timeout=600)
    assert done.returncode == 0, done.stdout[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in rows if r.get("done")) == 4  # 2 norms x 2 seeds
    assert (out / "report.html").is_file() and "report:" in done.stdout
