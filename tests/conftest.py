"""What several test files share: the tiny compare run, its interruption and its rows, and the
check that runs a ported PyTorch test on torch's own layers (the ``port`` marker).

pytest puts ``tests/`` on the path, so test files import these as ``from conftest import ...``.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

# bnlab's Triton kernels run in Triton's interpreter, on CPU tensors, where there is no CUDA
# device; this must be set before Triton is first imported. With a GPU they run compiled.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from bnlab.lab.rundir import read_rows
from bnlab.lab.train import Progress

# A compare run small enough to train in a second or two: 2 seeds x 3 epochs of a 2x16 MLP.
TINY = dict(epochs=3, seeds=2, width=16, depth=2)


def rows(run_dir) -> list[dict]:
    """Every row of a run's metrics.jsonl, as read back on resume."""
    return read_rows(Path(run_dir) / "metrics.jsonl")


def stop_after(n: int, then: Callable[[int], None] | None = None) -> Progress:
    """A progress callback that interrupts the run after ``n`` training steps (summed over the
    networks trained side by side); ``then(done)`` runs at every step before."""
    def on_change(done, total, note):
        if then is not None:
            then(done)
        if done >= n:
            raise KeyboardInterrupt
    return Progress(on_change)


def pytest_collection_modifyitems(config, items) -> None:
    """The ``port`` items prove the ports of PyTorch's tests on torch's own layers: they test
    the ported files, not bnlab, and take a minute and a half, so they run when asked for
    (``-m port``, or any ``-m`` naming port) and are skipped otherwise."""
    if "port" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="proves a ported PyTorch test on torch's layers; -m port runs it")
    for item in items:
        if item.get_closest_marker("port") is not None:
            item.add_marker(skip)


# -- ported PyTorch tests -----------------------------------------------------------------------
@pytest.fixture
def lib() -> str:
    """Which layers a ported test runs on: bnlab's; ``run_ported_on_torch`` passes "torch"."""
    return "bnlab"


def _grid(test: Callable) -> list[dict]:
    """Every combination of a test's ``pytest.mark.parametrize`` values, as keyword arguments."""
    axes = []
    for mark in getattr(test, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        values = [getattr(v, "values", v) for v in values]  # pytest.param(...) -> its values
        axes.append([dict(zip(names, v if len(names) > 1 else (v,))) for v in values])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def run_ported_on_torch(test: Callable) -> None:
    """Run a ported test on ``torch.nn`` over all its parameters, each from seed 0 as its own
    pytest item would. A pass proves the port (the inputs, tolerances and expectations), not
    bnlab, so one item per test does it; torch's own warnings are not ours to check."""
    for params in _grid(test):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            test(lib="torch", **params)


def ported_tests(namespace: dict) -> list[Callable]:
    """The test functions of a module namespace that take ``lib``, for ``run_ported_on_torch``."""
    return [f for name, f in namespace.items()
            if name.startswith("test_") and "lib" in inspect.signature(f).parameters]


def train_alone(model, x, y, idx_per_step, lr, momentum, opt=None):
    """The one-network reference of the stacked engines: ``model`` trained with autograd and
    ``torch.optim.SGD`` on the batches ``idx_per_step``; returns the training losses."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses = []
    for idx in idx_per_step:
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


# -- Triton ---------------------------------------------------------------------------------------
def triton_compiled() -> bool:
    """Whether bnlab's Triton kernels are compiled in this process (not interpreted): what
    TRITON_INTERPRET said when Triton and bnlab's kernels were imported. A skip where the two
    differ (Triton imported before TRITON_INTERPRET=1 was set): its own functions are then
    compiled ones, which interpreted kernels cannot call."""
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction

    from bnlab.nn import _triton

    ours = isinstance(_triton._affine_kernel, InterpretedFunction)
    if ours != isinstance(triton.language.standard.sum, InterpretedFunction):
        pytest.skip("Triton was imported before TRITON_INTERPRET was set (e.g. by a plugin), "
                    "so its functions and bnlab's kernels are not in the same mode; set "
                    "TRITON_INTERPRET=1 (or 0 on a GPU) in the environment", allow_module_level=True)
    return not ours


# -- ResNets ---------------------------------------------------------------------------------------
class ResNetBlock(nn.Module):
    """A ResNet basic block as torchvision writes it: ONE ReLU module, called after bn1 and
    again after the residual add (bn2's output goes to the add, not to an activation)."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


@pytest.fixture(scope="module")
def torchvision_models():
    """torchvision.models, or a skip. A torchvision wheel built for a CUDA torch beside a
    CPU-only torch (as pip installs them) fails to register its detection operators
    (RuntimeError: operator torchvision::nms does not exist), which the classification
    models never use: then the module that registers them is left out, for the tests of one
    module (sys.modules is restored after them)."""
    before = {n: m for n, m in sys.modules.items() if n.split(".")[0] == "torchvision"}
    try:
        models = importlib.import_module("torchvision.models")
    except ImportError as err:
        pytest.skip(f"torchvision: {err}")
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("stub")
        models = importlib.import_module("torchvision.models")
    yield models
    for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
        del sys.modules[name]
    sys.modules.update(before)
