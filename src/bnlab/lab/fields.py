"""Configurations: frozen dataclasses whose fields carry their own help text and check.

Every experiment's config derives from :class:`Config`; the shared model and training fields
are defined once, in :data:`SHARED`, and an experiment only picks them (with its own default
through :func:`shared`) or adds its own with :func:`option`. The ``bnlab`` command line is
generated from these fields, so a flag, its help and its validation cannot drift apart.
Norm and model names are checked against their registries (:mod:`bnlab.lab.norms`,
:mod:`bnlab.lab.model_registry`), as they stand when a config is made: a norm or model
registered later is accepted too.

This module imports neither torch nor matplotlib: ``bnlab --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import math
import numbers
import os
import re
from argparse import ArgumentTypeError
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterator

from .model_registry import describe_models, is_model
from .norms import NORMS, SPLITTABLE, canonical_norm, describe_norms, is_norm, norm  # noqa: F401

__all__ = ["Check", "Config", "ConfigError", "DeviceError", "PARSE", "SESSION_FIELDS", "SHARED",
           "TrainConfig", "option", "parse_float", "parse_int", "shared", "spelled"]

DATASETS = ("digits", "fashion-mnist", "mnist")
ACTIVATIONS = ("sigmoid", "relu", "tanh")


class ConfigError(ValueError):
    """A configuration value is out of range or unknown; raised before any work starts."""


class DeviceError(ConfigError):
    """The device a run asks for (``device``, ``--device``) cannot be used here: torch sees no
    CUDA device, or not that one; raised before any work starts."""


@dataclass(frozen=True)
class Check:
    wording: str | Callable[[], str]  # completes "X must be ..."; a callable where the
    # choices can grow (norms registered after the fields were declared)
    ok: Callable[[Any], bool]
    canon: Callable[[Any], Any] = lambda v: v  # the one spelling of a value that passed
    why: Callable[[Any], str] = lambda v: ""  # what is wrong with one that failed, if more is known

    @property
    def what(self) -> str:
        return self.wording() if callable(self.wording) else self.wording


def _python_number(v: Any) -> Any:
    """A NumPy integer or float as Python's int or float (a loop over np.logspace gives
    those); Python's own unchanged, so an int stays an int in config.json."""
    if type(v) in (int, float):
        return v
    return int(v) if isinstance(v, numbers.Integral) else float(v)


def integer(lo: int, hi: int) -> Check:
    return Check(f"an integer from {lo} to {hi}",
                 lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
                 and lo <= v <= hi, _python_number)  # not bool, not float


def number(lo: float, hi: float, closed: bool = False) -> Check:
    """A finite number in (lo, hi], or [lo, hi) with ``closed``."""
    def ok(v: Any) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) \
            and (lo <= v < hi if closed else lo < v <= hi)
    return Check(f"a number in [{lo:g}, {hi:g})" if closed else f"a number in ({lo:g}, {hi:g}]",
                 ok, _python_number)


def one_of(*choices: str) -> Check:
    return Check(f"one of {', '.join(choices)}", lambda v: v in choices)


def optional(check: Check) -> Check:
    return Check(lambda: f"{check.what}, or unset", lambda v: v is None or check.ok(v),
                 lambda v: v if v is None else check.canon(v),
                 lambda v: "" if v is None else check.why(v))


def items(check: Check, min_len: int = 1) -> Check:
    """A tuple of ``min_len`` or more distinct values, each passing ``check``; values are
    distinct in their one spelling (``check.canon``), so ghost-6 and ghost-06 are one."""
    def ok(v: Any) -> bool:
        return (isinstance(v, tuple) and all(map(check.ok, v))
                and len(set(map(check.canon, v))) == len(v) >= min_len)

    def why(v: Any) -> str:
        if not isinstance(v, tuple):
            return ""
        bad = [x for x in v if not check.ok(x)]
        if bad:
            return check.why(bad[0]) or f"{_item(bad[0])} is not"
        spellings: dict[Any, list[str]] = {}  # one spelling -> the spellings given
        for x in v:
            spellings.setdefault(check.canon(x), []).append(_item(x))
        for canon, given in spellings.items():
            if len(given) > 1:
                given = list(dict.fromkeys(given))
                return (f"{given[0]} is given twice" if len(given) == 1
                        else f"{' and '.join(given)} both mean {_item(canon)}")
        return f"only {len(v)} given" if v else "none given"

    return Check(lambda: f"{min_len} or more distinct values, each {check.what}", ok,
                 lambda v: tuple(map(check.canon, v)), why)


def _unregistered(kind: str) -> Callable[[Any], str]:
    """What is wrong with a name that is not a registered ``kind`` ("norm", "model"): the
    module of one's own that registers it is not imported. A stored config (config.json)
    named a registered norm when its run started, so that is surely it; a norm typed now is
    as likely a slip, which the listed names show. Every model but ``mlp`` is one's own."""
    def why(v: Any) -> str:
        if not isinstance(v, str) or (kind == "norm" and _SPELLING.get() != "json"):
            return ""
        how = ("import that module first" if _SPELLING.get() == "python"
               else "pass that module with bnlab --import MODULE (in Python, import it first)")
        return (f"{_item(v)} is not a registered {kind}: a {kind} of your own is registered "
                f"by the module that defines it; {how}")
    return why


# a norm of the registry (bnlab.lab.norms), in its one spelling: ghost-06 is ghost-6
NORM = Check(describe_norms, is_norm, canonical_norm, _unregistered("norm"))
# a network of the registry (bnlab.lab.model_registry)
MODEL = Check(describe_models, is_model, why=_unregistered("model"))


def is_scheduler(value: Any) -> bool:
    """Whether ``value`` reads as a Dask scheduler: ``local:N`` (N worker processes started on
    this machine) or a scheduler's TCP address, ``tcp://HOST:PORT`` or ``HOST:PORT``."""
    if not isinstance(value, str) or not value or "\0" in value or value != value.strip():
        return False
    if value.startswith("local:"):
        n = value[len("local:"):]
        return n.isascii() and n.isdigit() and str(int(n)) == n and 1 <= int(n) <= 1024
    scheme, sep, rest = value.partition("://")
    host, colon, port = (rest if sep else value).rpartition(":")
    return bool(host) and colon == ":" and port.isascii() and port.isdigit() \
        and 0 < int(port) < 65536 and (not sep or scheme == "tcp")  # TLS needs certificates


SCHEDULER = Check("local:N (N worker processes here) or a Dask scheduler's address, "
                  "tcp://HOST:PORT", is_scheduler)


def is_device(value: Any) -> bool:
    """Whether ``value`` names a device the lab trains on: ``cpu``, ``cuda`` (the current CUDA
    device) or ``cuda:N`` (N in ASCII digits). Whether that device exists here is checked
    when a run starts (:func:`bnlab.lab.device.resolve`): this module imports no torch."""
    if not isinstance(value, str):
        return False
    kind, colon, index = value.partition(":")
    if not colon:
        return value in ("cpu", "cuda")
    return kind == "cuda" and index.isascii() and index.isdigit() and len(index) <= 6


def _device_canon(value: str) -> str:
    """cuda:01 is spelled cuda:1."""
    kind, colon, index = value.partition(":")
    return f"{kind}:{int(index)}" if colon else value


DEVICE = Check("cpu, cuda or cuda:N (the CUDA device of index N)", is_device, _device_canon,
               lambda v: "bnlab trains on the CPU or a CUDA GPU"
               if isinstance(v, str) and v.split(":")[0] in ("gpu", "mps", "xpu", "cuda") else "")
TEXT = Check("a path", lambda v: isinstance(v, str) and v != "" and "\0" not in v)


def option(default: Any, help: str, check: Check, *, session: bool = False,
           added: bool = False) -> Any:
    """A config field. ``session=True`` for a field that says how this session works, not
    what it computes (where the data lies, how many threads or processes share the work): it
    is neither stored in config.json nor counted in the digest, and a resume may give another.
    ``added=True`` for a field added after runs were recorded without it: at its default it
    is left out of config.json and the digest (so those runs keep their digest, resume and
    report), and a stored config without it reads as the default."""
    return field(default=default, metadata={"help": help, "check": check, "session": session,
                                            "added": added})


SHARED: dict[str, Any] = {
    "dataset": option("digits", "dataset", one_of(*DATASETS)),
    "seeds": option(5, "runs per variant, with seeds 0..N-1", integer(1, 1000)),
    "threads": option(1, "torch threads; part of the config, since another count can change "
                         "the last bits of results (1 was measured fastest for these networks)",
                      integer(1, 1024)),
    "workers": option(0, "networks trained side by side on this many threads, each running "
                         "torch with --threads threads (0: one per core); results do not "
                         "depend on it", integer(0, 1024), session=True),
    "nproc": option(1, "processes training each network data-parallel with torch.distributed "
                       "(gloo), each on its share of every batch, BatchNorm synchronized; the "
                       "metrics equal one process's to float rounding (under torchrun: its "
                       "process count)", integer(1, 1024), session=True),
    "scheduler": option(None, "run the networks as tasks on the Dask cluster of this scheduler "
                              "(tcp://HOST:PORT), or on local:N worker processes; results do "
                              "not depend on it; needs pip install 'bnlab[dask]'",
                        optional(SCHEDULER), session=True),
    "data_dir": option(None, "folder with the IDX files; when given, nothing else is searched",
                       optional(TEXT), session=True),
    "device": option("cpu", "where the networks train: cpu, or a CUDA GPU (cuda, cuda:N); "
                            "the numbers differ from the CPU's by float rounding (docs/lab.md, "
                            "On a GPU); a resume keeps the last session's device unless given "
                            "another", DEVICE, session=True),
    "tensorboard": option(None, "folder for TensorBoard event files written as the networks "
                                "train, one TensorBoard run per network (DIR/UNIT); needs "
                                "pip install 'bnlab[tensorboard]'. A new run needs a new or "
                                "empty folder; a resumed run adds to its own",
                          optional(TEXT), session=True),
    "n_train": option(None, "training examples used: the first N of the training set, or "
                            "'all'", optional(integer(2, 10**8))),
    "depth": option(3, "number of hidden layers", integer(1, 1000)),
    "width": option(100, "units per hidden layer", integer(1, 10**6)),
    "activation": option("sigmoid", "hidden activation", one_of(*ACTIVATIONS)),
    "init_scale": option(0.2, "standard deviation of the Gaussian initial weights", number(0, 1e6)),
    "lr": option(0.1, "SGD learning rate", number(0, 1e6)),
    "momentum": option(0.0, "SGD momentum (0: plain SGD)", number(0, 1, closed=True)),
    "batch_size": option(60, "mini-batch size (the last incomplete batch of an epoch is "
                              "dropped)", integer(2, 10**7)),
    "epochs": option(100, "training epochs per run", integer(1, 10**6)),
    "steps": option(3000, "training steps per run", integer(1, 10**9)),
    "eval_every": option(250, "steps between evaluations", integer(1, 10**9)),
    "norms": option(("none", "bn"), "variants, comma-separated ('none' is the plain baseline)",
                    items(NORM)),
}


SESSION_FIELDS = tuple(n for n, f in SHARED.items() if f.metadata["session"])


def shared(name: str, default: Any = dataclasses.MISSING) -> Any:
    """The shared field ``name``, optionally with another default."""
    f = SHARED[name]
    return option(f.default if default is dataclasses.MISSING else default, f.metadata["help"],
                  f.metadata["check"], session=f.metadata["session"],
                  added=f.metadata.get("added", False))


@dataclass(frozen=True)
class Config:
    """Fields every experiment has. An experiment's class names itself and its documented
    full setting: ``class X(TrainConfig, name=..., full={...})``; the experiment is then
    registered with its runner, report and summary
    (:func:`~bnlab.lab.experiment_configs.register_experiment`). It may add cross-field
    checks in :meth:`check` and checks against the data in :meth:`check_data`."""

    name: ClassVar[str] = ""
    FULL: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, name: str = "", full: dict[str, Any] | None = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name:
            cls.name, cls.FULL = name, full or {}

    dataset: str = shared("dataset")
    seeds: int = shared("seeds")
    threads: int = shared("threads")
    data_dir: str | None = shared("data_dir")
    device: str = shared("device")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # JSON has no tuples
                value = tuple(value)
            check: Check = f.metadata["check"]
            if not check.ok(value):
                why = check.why(value)
                raise ConfigError(f"{flag(f.name)} must be {check.what}{'; ' + why if why else ''} "
                                  f"(got {shown(value)})")
            object.__setattr__(self, f.name, check.canon(value))
        self.check()

    def check(self) -> None:
        """Cross-field checks; raise :class:`ConfigError`."""
        if self.dataset == "digits":
            self.require(self.data_dir is None, "data_dir", "unset for digits, which ships with "
                         "scikit-learn")
        if getattr(self, "scheduler", None) is not None:  # the cluster's workers train
            for name, alone in (("workers", 0), ("nproc", 1)):
                self.require(getattr(self, name, alone) == alone, name,
                             f"left out with {flag('scheduler')} (the cluster's workers share "
                             "the work)")
        if self.device != "cpu":  # processes and clusters of the lab train on CPUs
            for name, alone, why in (
                    ("nproc", 1, "data-parallel processes train on the CPU, joined by gloo"),
                    ("scheduler", None, "the cluster's workers train on their CPUs")):
                if getattr(self, name, alone) != alone:
                    raise ConfigError(f"{setting('device', self.device)} cannot be combined "
                                      f"with {setting(name, getattr(self, name))}: {why}; "
                                      f"leave one of them out")

    def check_data(self, n_train: int, n_test: int, n_features: int, n_classes: int) -> None:
        """Checks that need the dataset's size; run before anything is created."""

    def examples_used(self, n_train: int) -> int:
        """The training examples a run uses of the ``n_train`` the dataset holds (--n-train,
        when the config has it and it fits)."""
        n = getattr(self, "n_train", None)
        if n is not None and n > n_train:
            raise ConfigError(f"{setting('n_train', n)} is more than the {self.dataset} training set "
                              f"holds ({n_train})")
        return n_train if n is None else n

    def require(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{flag(name)} must be {what} (got {shown(getattr(self, name))})")

    def to_dict(self) -> dict[str, Any]:
        """The fields that describe the run, as config.json stores them: every field but the
        session ones (:data:`SESSION_FIELDS`), which a resume may change, and the ``added``
        ones at their defaults (see :func:`option`)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)
                  if not f.metadata["session"]
                  and not (f.metadata.get("added") and getattr(self, f.name) == f.default)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def digest(self) -> str:
        """A short hash of every field that can change the numbers: those of :meth:`to_dict`
        (runs recorded when config.json also held the session fields hash the same)."""
        text = json.dumps({"experiment": self.name, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> "Config":
        """A config from a stored dict, such as config.json holds: every field present but
        the ``added`` ones (see :func:`option`), no unknown ones; an ``experiment`` key, as
        config.json has, must name this config's experiment. Session fields are not read:
        they stay at their defaults (records written before they were left out of
        config.json hold them; they are ignored). Messages name the JSON keys."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} must hold a JSON object (got {type(d).__name__})")
        if "experiment" in d and d["experiment"] != cls.name:
            raise ConfigError(f"{source} holds a {shown(d['experiment'])} config, not a "
                              f"{cls.name} one")
        names = {f.name for f in fields(cls) if not f.metadata["session"]}
        optional_names = {f.name for f in fields(cls) if f.metadata.get("added")}
        given = {k: v for k, v in d.items() if k not in SESSION_FIELDS and k != "experiment"}
        unknown = sorted(set(given) - names)
        missing = sorted(names - set(given) - optional_names)
        if unknown or missing:
            raise ConfigError(f"{source} does not match a {cls.name} config: "
                              + "; ".join(p for p in (unknown and f"unknown {', '.join(unknown)}",
                                                      missing and f"missing {', '.join(missing)}") if p))
        with spelled("json"):
            try:
                return cls(**given)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None


# How messages name fields and show values: as the command line takes them ("cli"), as
# config.json holds them while a config is read from it ("json"), or as a Python caller
# passes them to bnlab.lab.run ("python").
_SPELLING = contextvars.ContextVar("bnlab_config_spelling", default="cli")


@contextlib.contextmanager
def spelled(spelling: str) -> Iterator[None]:
    """Within the block, messages spell fields and values as ``spelling`` ("cli", "json" or
    "python") does."""
    token = _SPELLING.set(spelling)
    try:
        yield
    finally:
        _SPELLING.reset(token)


def spelling_is(spelling: str) -> bool:
    """Whether messages now spell fields as ``spelling`` ("cli", "json", "python") does."""
    return _SPELLING.get() == spelling


def flag(name: str) -> str:
    """A field as the user gives it: --n-train on the command line, "n_train" in config.json,
    n_train to bnlab.lab.run."""
    spelling = _SPELLING.get()
    if spelling == "json":
        return json.dumps(name)
    return name if spelling == "python" else "--" + name.replace("_", "-")


def setting(name: str, value: Any) -> str:
    """A field and its value as the user gives them: --steps 100, "steps": 100, steps=100."""
    spelling = _SPELLING.get()
    if spelling == "python":
        return f"{name}={shown(value)}"
    return f"{flag(name)}: {shown(value)}" if spelling == "json" else f"{flag(name)} {shown(value)}"


def shown(value: Any) -> str:
    """A value as the user typed it: comma-separated on the command line, JSON in config.json,
    its repr in Python (a scalar on the command line keeps its Python form: 'cifar', 0.1,
    None)."""
    spelling = _SPELLING.get()
    if spelling == "json":
        return json.dumps(value, default=str)
    if isinstance(value, tuple) and spelling == "cli":
        return ",".join(map(_item, value)) or "nothing"
    return repr(value)


def _item(value: Any) -> str:
    spelling = _SPELLING.get()
    if spelling == "json":
        return json.dumps(value, default=str)
    return repr(value) if spelling == "python" else str(value)


# -- the command line's parsing of numbers: plain decimal, as a user means them ------------
_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|inf|infinity|nan)",
                    re.IGNORECASE)


def parse_int(text: str) -> int:
    """An integer given on the command line: ASCII digits, optionally signed. int() alone
    would also take "1_0" (10), " 1" and digits of other scripts."""
    if not _INT.fullmatch(text):
        raise ArgumentTypeError(f"invalid int value: {text!r} (expected decimal digits, such "
                                "as 10)")
    return int(text)


def parse_float(text: str) -> float:
    """A number given on the command line: decimal, optionally with an exponent (1e-3); inf
    and nan pass here so that the field's check can say what range it needs."""
    if not _FLOAT.fullmatch(text):
        raise ArgumentTypeError(f"invalid float value: {text!r} (expected a decimal number, "
                                "such as 0.1 or 1e-3)")
    return float(text)


PARSE: dict[type, Callable[[str], Any]] = {int: parse_int, float: parse_float}  # by annotation


@dataclass(frozen=True)
class TrainConfig(Config):
    """The model and training fields: ``in -> depth x (Linear -> [norm] -> activation) ->
    Linear``, trained by SGD."""

    depth: int = shared("depth")
    width: int = shared("width")
    activation: str = shared("activation")
    init_scale: float = shared("init_scale")
    lr: float = shared("lr")
    momentum: float = shared("momentum")
    batch_size: int = shared("batch_size")
    n_train: int | None = shared("n_train")
    norms: tuple[str, ...] = shared("norms")

    def check(self) -> None:
        super().check()
        ghosts = [m.k for m in map(norm, self.norms) if m.family == "ghost-K"]
        self.require(all(self.batch_size % k == 0 for k in ghosts), "norms",
                     f"ghost sizes that divide {setting('batch_size', self.batch_size)}")
        nproc = getattr(self, "nproc", 1)  # over several processes BN becomes SyncBatchNorm
        self.require(nproc == 1 or all(n in SPLITTABLE for n in self.norms), "norms",
                     f"{', '.join(SPLITTABLE)} with {setting('nproc', nproc)} (a batch split "
                     "between processes changes the others)")

    def check_data(self, n_train: int, n_test: int, n_features: int, n_classes: int) -> None:
        n = self.examples_used(n_train)
        if self.batch_size > n:
            raise ConfigError(f"{setting('batch_size', self.batch_size)} is larger than the training set "
                              f"({n} examples); choose at most {n}")
        need, have = self.memory_needed(n_features, n_classes), _memory_bytes()
        if need > have / 2:
            raise ConfigError(f"{setting('width', self.width)} and {setting('depth', self.depth)} need about "
                              f"{need / 2**30:.1f} GiB, more than half of this machine's "
                              f"{have / 2**30:.1f} GiB; choose a smaller network")

    def memory_needed(self, n_features: int, n_classes: int) -> int:
        """About the bytes one network of this shape needs: its float32 weights four times
        (values, gradients, momentum, a copy) and an evaluation chunk's activations. The
        host's memory is checked against it here, a GPU's when a run on it starts."""
        params = n_features * self.width + (self.depth - 1) * self.width ** 2 + self.width * n_classes
        return 16 * params + 4 * 8192 * self.width * (self.depth + 2)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30
