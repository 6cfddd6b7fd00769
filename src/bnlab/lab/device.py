"""Where the lab trains: the CPU (the default) or a CUDA GPU (``--device``, ``device=``).

A run on a GPU computes what the same run computes on the CPU. Everything it trains and
measures lives on the device: the data (moved there once, when the run starts), every
network, the stacks of networks, the evaluation. What is drawn at random is drawn on the CPU,
as on a CPU run, and then moved: the seeds and initial weights, each network's order of
mini-batches, noisy BN's noise, the noise experiment's batches. So the two runs differ only
by floating-point arithmetic (other summation orders in products and reductions, other
``exp``): docs/lab.md, "On a GPU", says by how much. To keep it so, a session on a GPU
turns off TF32 (float32 products and convolutions at 10 bits of mantissa would differ from
the CPU by far more than rounding) and picks cuDNN's deterministic algorithms
(:func:`exact_float32`).

The device is a session field (:data:`bnlab.lab.fields.SESSION_FIELDS`), as ``workers`` is:
it says where this session computes, not what the run is, so it is not in ``config.json``
nor in the digest. ``run.json`` records it for every session (:func:`describe`), and
checkpoints hold CPU tensors (:func:`to_cpu`), so a run continues on another device when
its user asks for one; a resume keeps the last session's device otherwise.

This module: the device's checks (:func:`resolve`), what a session records of it, the float32
settings of a session on a GPU, checkpoints brought to the CPU, and how large a stack of
networks a device takes (:func:`stack_limit`, :func:`memory_bytes`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
from typing import Any, Iterator

import torch

from .fields import Config, DeviceError, _memory_bytes, is_device, setting

__all__ = ["STACK_LIMIT", "check_memory", "describe", "exact_float32", "gpu_code",
           "memory_bytes", "resolve", "stack_limit", "to_cpu"]

# Networks per stack at most, by device type. On the CPU a stack gains nothing past about
# 32 small networks (each already keeps a core busy), so more only costs memory; on a GPU
# every operation's launch is shared by all the networks of the stack, and memory (an
# eighth of the device's, see bnlab.lab.runner.stack_size) is the limit that binds.
STACK_LIMIT = {"cpu": 32, "cuda": 1024}


def resolve(name: str, last_session: bool = False) -> torch.device:
    """The torch device of ``name`` (``cpu``, ``cuda``, ``cuda:N``); :class:`DeviceError`,
    in one line, where torch sees no CUDA device or not that one (``last_session``: the name
    was taken from the run's last session, and the message says how to go on here)."""
    if not is_device(name):
        raise DeviceError(f"{setting('device', name)} is not a device bnlab trains on: give "
                          "cpu, cuda or cuda:N")
    if name == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        built = torch.version.cuda is not None
        why = ("torch sees no CUDA device here (no GPU, no driver, or CUDA_VISIBLE_DEVICES "
               "hides them)" if built else
               f"this torch ({torch.__version__}) is built without CUDA")
        fix = None if built else "install a CUDA build of torch"
    else:
        index = torch.cuda.current_device() if name == "cuda" else int(name.partition(":")[2])
        if index < count:
            return torch.device("cuda", index)
        seen = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        why = f"torch sees {count} CUDA device{'s' if count > 1 else ''} here ({seen})"
        fix = "choose one of them"
    go_on = (f"continue the run here with {setting('device', 'cpu')}"
             + (f" or {setting('device', 'cuda:0')}" if count else "")
             + f" (its last session trained on {name})" if last_session else
             f"train on the CPU ({setting('device', 'cpu')}, the default)")
    raise DeviceError(f"{setting('device', name)}: {why}; "
                      + (f"{fix}, or {go_on}" if fix else go_on))


def memory_bytes(device: torch.device) -> int:
    """The memory of ``device``: the machine's for the CPU, the GPU's own for a CUDA device."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return _memory_bytes()


def stack_limit(device: torch.device) -> int:
    """The most networks a stack holds on ``device`` (:data:`STACK_LIMIT`)."""
    return STACK_LIMIT.get(device.type, STACK_LIMIT["cpu"])


def check_memory(config: Config, n_features: int, n_classes: int,
                 device: torch.device) -> None:
    """A GPU too small for one network of ``config`` (the host's memory is checked with the
    config, :meth:`~bnlab.lab.fields.TrainConfig.check_data`): DeviceError."""
    if device.type == "cpu" or not hasattr(config, "memory_needed"):
        return
    need, have = config.memory_needed(n_features, n_classes), memory_bytes(device)
    if need > have / 2:
        raise DeviceError(f"{setting('width', config.width)} and "
                          f"{setting('depth', config.depth)} need about {need / 2**30:.1f} "
                          f"GiB, more than half of {device}'s {have / 2**30:.1f} GiB; choose "
                          "a smaller network")


def describe(device: torch.device) -> dict[str, Any]:
    """What ``run.json`` records of a session's device: ``{"device": "cpu"}``, or for a GPU
    its index, name, compute capability and torch's CUDA version."""
    if device.type != "cuda":
        return {"device": str(device)}
    props = torch.cuda.get_device_properties(device)
    return {"device": str(device), "device_name": props.name,
            "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}


def gpu_code(device: torch.device) -> str:
    """Which code computes BatchNorm in a session on a GPU, for provenance (``run.json``'s
    ``kernels``, shown in the report): bnlab's Triton kernels where Triton is installed and
    they take a layer's input, else torch ops (stacks of networks always use torch ops)."""
    name = torch.cuda.get_device_name(device)
    if importlib.util.find_spec("triton") is None:
        return f"{name}, CUDA {torch.version.cuda}: torch ops (Triton not installed)"
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        version = "of unknown version"
    return (f"{name}, CUDA {torch.version.cuda}: Triton {version} kernels for single "
            "networks' layers, torch ops for stacks")


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """For the block, where ``device`` is a GPU: float32 products and convolutions in
    float32 (TF32 off: it keeps 10 bits of mantissa), and cuDNN's deterministic algorithms,
    chosen without benchmarking (its fastest may differ from run to run), so that a run
    repeats itself and agrees with the CPU to float32 rounding. The process's settings are
    restored after; nothing changes for the CPU.

    TF32 is switched off by the ``allow_tf32`` flags, which torch 2.9 and later keep in step
    with their ``fp32_precision`` settings (setting only the latter leaves the flags'
    getters raising), and by ``fp32_precision`` where the process already mixed the two."""
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    places = [p for p in (matmul, getattr(cudnn, "conv", None), getattr(cudnn, "rnn", None))
              if hasattr(p, "fp32_precision")]  # torch 2.9 and later
    precisions = [p.fp32_precision for p in places]
    try:
        flags = (matmul.allow_tf32, cudnn.allow_tf32)
    except RuntimeError:  # the two kinds of settings were mixed: keep to fp32_precision
        flags = None
    algorithms = (cudnn.deterministic, cudnn.benchmark)
    if flags is not None:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
    else:
        for place in places:
            place.fp32_precision = "ieee"
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        if flags is not None:
            matmul.allow_tf32, cudnn.allow_tf32 = flags
        for place, precision in zip(places, precisions):  # as they were, to the letter
            place.fp32_precision = precision
        cudnn.deterministic, cudnn.benchmark = algorithms


def to_cpu(state: Any) -> Any:
    """``state`` (a checkpoint: dicts, lists and tuples of tensors and plain values) with
    every tensor on the CPU, so that it loads on a machine without the GPU that wrote it.
    What holds no tensor elsewhere is returned as it is (a CPU run's checkpoints are
    unchanged, a state_dict's ``_metadata`` included)."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        moved = {k: to_cpu(v) for k, v in state.items()}
        if all(moved[k] is v for k, v in state.items()):
            return state
        out = type(state)(moved)
        if hasattr(state, "__dict__"):  # a state_dict's _metadata
            out.__dict__.update(vars(state))
        return out
    if isinstance(state, (list, tuple)):
        moved_items = [to_cpu(v) for v in state]
        if all(a is b for a, b in zip(moved_items, state)):
            return state
        return type(state)(moved_items)
    return state
