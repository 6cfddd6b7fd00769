"""A norm, a network and an experiment of one's own: registered in Python or imported with
``bnlab --import``, they run through compare and the report as bnlab's own do; what cannot
work is refused with a message that says why; and docs/extending.md runs as written."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from bnlab.cli import main
from bnlab.lab.experiment_configs import (EXPERIMENTS, CompareConfig, LrSweepConfig,
                                          RegularizationConfig, SmoothnessConfig,
                                          unregister_experiment)
from bnlab.lab.fields import SESSION_FIELDS, ConfigError, spelled
from bnlab.lab.model_registry import (MODELS, describe_models, model, norm_layer,
                                      register_model, unregister_model)
from bnlab.lab.norms import NORMS, register_norm, unregister_norm
from bnlab.lab.rundir import read_config
from bnlab.lab.runner import run_experiment
from bnlab.report import build_report
from conftest import rows as read_rows

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "extending.md"
RESULTS = ROOT / "docs" / "results"
TINY = dict(epochs=2, seeds=2)  # digits: 21 steps an epoch
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
ENV.pop("BNLAB_IMPORT", None)


class NoMeanBatchNorm1d(nn.Module):
    """BN without mean subtraction: ``y = weight * x / sqrt(E[x^2] + eps) + bias``, E over
    the batch (training) or its running estimate (eval)."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_sq", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C)
        if self.training:
            mean_sq = x.pow(2).mean(0)
            with torch.no_grad():
                self.running_sq.lerp_(mean_sq, self.momentum)
        else:
            mean_sq = self.running_sq
        return self.weight * x / (mean_sq + self.eps).sqrt() + self.bias


BUILT: list[tuple] = []  # (norm, seed, in_features, classes) of every network "mine" built


def mine(norm: str, seed: int, in_features: int, classes: int) -> nn.Sequential:
    """A network of one's own: one ReLU layer of 24 units, its norm from the registry."""
    BUILT.append((norm, seed, in_features, classes))
    layer = norm_layer(norm, 24, seed)
    return nn.Sequential(nn.Linear(in_features, 24), *([layer] if layer is not None else []),
                         nn.ReLU(), nn.Linear(24, classes))


@pytest.fixture
def registered():
    """nomean and the model mine, registered for one test; anything a test registers on top
    (through the docs' modules) is removed after it, and those modules forgotten."""
    before = {"norms": list(NORMS), "models": list(MODELS), "experiments": list(EXPERIMENTS)}
    layers: list[NoMeanBatchNorm1d] = []

    def no_mean(channels: int, seed: int, dims: int) -> nn.Module:
        layers.append(NoMeanBatchNorm1d(channels))
        return layers[-1]

    register_norm("nomean", no_mean, label="FC + BN without mean", color="#8c564b")
    register_model("mine", mine, about="one ReLU layer of 24")
    BUILT.clear()
    yield layers
    for name in [n for n in NORMS if n not in before["norms"]]:
        unregister_norm(name)
    for name in [n for n in MODELS if n not in before["models"]]:
        unregister_model(name)
    for name in [n for n in EXPERIMENTS if n not in before["experiments"]]:
        unregister_experiment(name)
    for name in [m for m in sys.modules if m.split(".")[0] in ("mynorms", "mynets", "depthexp")]:
        del sys.modules[name]


def _final(run_dir: Path, epochs: int) -> dict[str, list[float]]:
    """Each norm's final test accuracies, seed by seed."""
    out: dict[str, list[float]] = {}
    for r in read_rows(run_dir):
        if r.get("epoch") == epochs:
            out.setdefault(r["norm"], []).append(r["test_acc"])
    return out


# -- from Python ---------------------------------------------------------------------------
def test_a_norm_of_ones_own_trains_in_compares_mlp(registered, tmp_path):
    config = CompareConfig(norms=("none", "bn", "nomean"), width=16, depth=2, activation="relu",
                           **TINY)
    run_experiment(config, tmp_path / "r")
    # one layer checked before the run starts, then 2 seeds x 2 hidden layers
    assert len(registered) == 1 + 2 * 2 and {m.weight.shape[0] for m in registered} == {16}
    assert BUILT == []  # the built-in MLP, not the registered model
    final = _final(tmp_path / "r", TINY["epochs"])
    assert {n: len(v) for n, v in final.items()} == {"none": 2, "bn": 2, "nomean": 2}
    assert min(final["bn"] + final["nomean"]) > 0.5  # 10 classes: chance is 0.1
    build_report(tmp_path / "r")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["norms"] == ["none", "bn", "nomean"]
    assert summary["variants"]["nomean"]["n"] == 2
    assert "FC + BN without mean" in (tmp_path / "r" / "report.html").read_text()


def test_a_model_of_ones_own_trains_every_norm_in_compare(registered, tmp_path):
    config = CompareConfig(norms=("none", "bn", "nomean"), model="mine", **TINY)
    run_experiment(config, tmp_path / "r")
    # the check before the run (seed 0 of each norm), then every unit, with digits' shape
    assert BUILT[:3] == [(n, 0, 64, 10) for n in config.norms]
    assert sorted(BUILT[3:]) == sorted((n, s, 64, 10) for n in config.norms for s in (0, 1))
    final = _final(tmp_path / "r", TINY["epochs"])
    assert sorted(final) == ["bn", "nomean", "none"] and all(len(v) == 2 for v in final.values())
    assert min(final["bn"] + final["nomean"]) > 0.5
    stored = json.loads((tmp_path / "r" / "config.json").read_text())
    assert stored["model"] == "mine" and read_config(tmp_path / "r") == config
    build_report(tmp_path / "r")
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["variants"]["nomean"]["n"] == 2


def test_a_model_of_ones_own_repeats_on_threads_side_by_side(registered, tmp_path):
    """Built under one lock with its seed set, every network repeats bit for bit, however
    many train side by side."""
    config = CompareConfig(norms=("none", "bn"), model="mine", epochs=1, seeds=2, workers=2)
    run_experiment(config, tmp_path / "a")
    run_experiment(CompareConfig(norms=("none", "bn"), model="mine", epochs=1, seeds=2,
                                 workers=1), tmp_path / "b")
    assert read_rows(tmp_path / "a") == read_rows(tmp_path / "b")


@pytest.mark.parametrize("cls,fields", [
    (RegularizationConfig, dict(norms=("bn", "population", "full-batch"), epochs=1, n_train=300)),
    (LrSweepConfig, dict(lrs=(0.001, 0.1), epochs=1)),
    (SmoothnessConfig, dict(norms=("none", "nomean"), steps=10, eval_every=5)),
], ids=lambda p: getattr(p, "name", ""))
def test_the_other_experiments_with_a_model_field_train_it(registered, cls, fields, tmp_path):
    config = cls(model="mine", seeds=1, **fields)
    run_experiment(config, tmp_path / "r")
    units = {r["unit"] for r in read_rows(tmp_path / "r") if r.get("done")}
    assert len(units) == len(config.norms) * len(getattr(config, "lrs", (None,)))
    features = {"digits": 64, "fashion-mnist": 784}[config.dataset]  # regularization's: 784
    assert {b[0] for b in BUILT} == set(config.norms)
    assert {b[2:] for b in BUILT} == {(features, 10)}
    build_report(tmp_path / "r")


def test_a_builder_gets_the_keywords_it_takes():
    seen = []
    builders = {
        "plain": lambda norm, seed: seen.append(("plain",)) or nn.Linear(64, 10),
        "kw": lambda norm, seed, **kw: seen.append(("kw", sorted(kw))) or nn.Linear(64, 10),
        "classes": lambda norm, seed, *, classes: seen.append(("classes", classes))
        or nn.Linear(64, classes),
    }
    for name, build in builders.items():
        register_model(f"b-{name}", build)
    try:
        for name in builders:
            model(f"b-{name}").network("bn", 0, in_features=64, classes=10)
    finally:
        for name in builders:
            unregister_model(f"b-{name}")
    assert seen == [("plain",), ("kw", ["classes", "in_features"]), ("classes", 10)]


def test_the_builtin_mlp_is_a_registered_model():
    assert list(MODELS)[0] == "mlp" and describe_models().startswith("one of mlp (bnlab's fully")
    net = model("mlp").network("bn", 3, in_features=64, classes=10, width=8, depth=2)
    assert [type(m).__name__ for m in net] == ["Linear", "BatchNorm1d", "Sigmoid", "Linear",
                                               "BatchNorm1d", "Sigmoid", "Linear"]
    assert net[0].weight.shape == (8, 64) and net[-1].weight.shape == (10, 8)


# -- what is refused -----------------------------------------------------------------------
def test_an_unknown_model_is_named_with_the_known_ones(registered):
    with pytest.raises(ConfigError, match=r"^--model must be one of mlp \(.*\) or mine \(one "
                                          r"ReLU layer of 24\); nope is not a registered model"
                                          r".*bnlab --import MODULE.* \(got 'nope'\)$"):
        CompareConfig(model="nope")
    with pytest.raises(ValueError, match=r"^unknown model 'nope'; expected one of mlp"):
        model("nope")


@pytest.mark.parametrize("fields,msg", [
    ({"depth": 2}, r"^--depth 2 shapes the built-in MLP only, and --model 'mine' is built by "
                   r"its own builder; leave --depth, --width, --activation and --init-scale at "
                   r"their defaults$"),
    ({"width": 8, "init_scale": 0.5}, r"^--width 8, --init-scale 0.5 shape the built-in MLP"),
    ({"nproc": 2, "norms": ("bn",)}, r"^--nproc must be 1 with --model 'mine' \(bnlab cannot "
                                     r"tell .*\) \(got 2\)$"),
])
def test_fields_of_the_builtin_mlp_are_refused_with_a_model_of_ones_own(registered, fields, msg):
    with pytest.raises(ConfigError, match=msg):
        CompareConfig(model="mine", **fields)
    CompareConfig(**fields)  # with the built-in MLP they are its shape
    with spelled("python"), pytest.raises(ConfigError, match=r"depth=5 shapes the built-in"):
        RegularizationConfig(model="mine", depth=5)


@pytest.mark.parametrize("args,error,msg", [
    (("mlp", "m:f"), ValueError, "the model mlp is already registered"),
    (("Big", "m:f"), ValueError, r"lower-case .* \(got 'Big'\)"),
    (("a,b", "m:f"), ValueError, "without comma or space"),
    (("x", 3), TypeError, r"build must be a callable or 'module:function' \(got 3\)"),
    (("x", "no function"), TypeError, "build must be a callable or 'module:function'"),
])
def test_bad_model_registrations_are_refused(args, error, msg):
    before = list(MODELS)
    with pytest.raises(error, match=msg):
        register_model(*args)
    assert list(MODELS) == before
    with pytest.raises(ValueError, match="the built-in model mlp .* cannot be removed"):
        unregister_model("mlp")
    with pytest.raises(ValueError, match="no model 'x' is registered"):
        unregister_model("x")


@pytest.mark.parametrize("build,msg", [
    (lambda norm, seed: 3, r"^the model bad fails for the norm none on digits \(64 features, "
                           r"10 classes\): TypeError: the model bad's builder returned int, not "
                           r"a torch.nn.Module"),
    (lambda norm, seed: nn.Linear(64, 3), r"^the model bad's network for the norm none maps 2 "
                                          r"digits examples of 64 features to shape \(2, 3\); "
                                          r"expected \(2, 10\)"),
    (lambda norm, seed: nn.Linear(784, 10), r"fails for the norm none .*RuntimeError: .*shapes"),
    ("nosuch_module_x:build", r"fails for the norm none .*ValueError: the model bad's builder "
                              r"'nosuch_module_x:build' cannot be imported \(ModuleNotFoundError"),
])
def test_a_bad_builder_is_refused_before_anything_is_written(build, msg, tmp_path):
    register_model("bad", build)
    try:
        with pytest.raises(ConfigError, match=msg):
            run_experiment(CompareConfig(model="bad", seeds=1, epochs=1), tmp_path / "r")
    finally:
        unregister_model("bad")
    assert not (tmp_path / "r").exists()


# -- from the command line -----------------------------------------------------------------
MODULE = '''
import torch
from torch import nn
from bnlab.lab.model_registry import norm_layer, register_model
from bnlab.lab.norms import register_norm


class NoMean(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(0) + 1e-5).sqrt() + self.bias


def mine(norm, seed, in_features, classes):
    layer = norm_layer(norm, 24, seed)
    return nn.Sequential(nn.Linear(in_features, 24), *([layer] if layer is not None else []),
                         nn.ReLU(), nn.Linear(24, classes))


register_norm("nomean", lambda channels, seed, dims: NoMean(channels))
register_model("mine", mine)
'''


def _bnlab(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The installed ``bnlab`` command, whose path does not hold the current folder (as
    ``python -m`` would): --import must find a module there itself."""
    script = Path(sys.executable).parent / "bnlab"
    command = [sys.executable, str(script)] if script.is_file() else [sys.executable, "-m", "bnlab"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True,
                          env={**ENV, **env}, timeout=600)


def test_the_command_imports_a_module_of_the_current_folder(tmp_path):
    (tmp_path / "extmod.py").write_text(MODULE)
    help = _bnlab("--import", "extmod", "compare", "--help", cwd=tmp_path)
    assert help.returncode == 0
    text = " ".join(help.stdout.split())
    assert "ghost-K (virtual batches of K >= 2) or nomean (default: none,bn)" in text
    assert "or mine (default: mlp)" in text
    done = _bnlab("--import", "extmod", "compare", "--norms", "none,nomean", "--model", "mine",
                  "--epochs", "2", "--seeds", "1", "--out", "r", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "FC + BN" not in done.stdout and re.search(r"(?m)^nomean +1 ", done.stdout)
    stored = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (stored["model"], stored["norms"]) == ("mine", ["none", "nomean"])

    alone = _bnlab("report", "r", cwd=tmp_path)  # the module is not imported: say so
    assert alone.returncode == 2 and alone.stdout == ""
    assert alone.stderr.count("\n") == 1 and re.search(
        r"r/config.json: \"norms\" must be .*; \"nomean\" is not a registered norm: a norm of your "
        r"own is registered by the module that defines it; pass that module with bnlab --import "
        r"MODULE \(in Python, import it first\) \(got \[\"none\", \"nomean\"\]\)$", alone.stderr)
    again = _bnlab("report", "r", cwd=tmp_path, BNLAB_IMPORT="extmod")
    assert again.returncode == 0 and "report: r/report.html" in again.stdout


def test_a_resume_names_the_unknown_model(registered, tmp_path, capsys, monkeypatch):
    run_experiment(CompareConfig(model="mine", epochs=1, seeds=1), tmp_path / "r")
    unregister_model("mine")
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--resume", "r"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"bnlab compare: error: r/config.json: \"model\" must be one of mlp "
                        r"\(.*\); \"mine\" is not a registered model: .*bnlab --import MODULE "
                        r"\(in Python, import it first\) \(got \"mine\"\)\n", err)


@pytest.mark.parametrize("argv,env,msg", [
    (["--import", "nosuch_mod", "compare"], {}, r"cannot import nosuch_mod \(named by --import\): "
     r"ModuleNotFoundError: No module named 'nosuch_mod' \(-v shows where\)"),
    (["--imp=fails", "report", "x"], {}, r"cannot import fails \(named by --import\): "
     r"ZeroDivisionError: division by zero \(-v shows where\)"),
    (["compare"], {"BNLAB_IMPORT": " ,fails"}, r"cannot import fails \(named by BNLAB_IMPORT\): "
     r"ZeroDivisionError: division by zero \(-v shows where\)"),
    (["--import", "a/b.py", "compare"], {}, r"cannot import 'a/b.py' \(named by --import\): not "
     r"a module name; give a dotted name such as mynorms \(for mynorms.py in the current folder "
     r"or on the Python path\)"),
])
def test_an_import_failure_is_one_line(argv, env, msg, tmp_path, capsys, monkeypatch):
    (tmp_path / "fails.py").write_text("1 / 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BNLAB_IMPORT", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    path = list(sys.path)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and re.fullmatch(f"bnlab: error: {msg}\n", err)
    assert sys.path == path and "fails" not in sys.modules


def test_an_imported_experiment_is_a_subcommand(tmp_path, monkeypatch, capsys):
    """A module given to --import adds its experiment to ``bnlab run`` (the parser is made
    from the registry as it stands once the modules are imported); bench, which parses its
    own options, still follows the global ones."""
    (tmp_path / "toyexp.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from bnlab.lab.experiment_configs import register_experiment
        from bnlab.lab.fields import TrainConfig


        @dataclass(frozen=True)
        class ToyConfig(TrainConfig, name="toy-ext"):
            pass


        register_experiment(ToyConfig, module="toyexp", section="toyexp", summary="a toy")
    '''))
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit):
            main(["--import", "toyexp", "run", "--help"])
        assert "toy-ext a toy" in " ".join(capsys.readouterr().out.split())
        with pytest.raises(SystemExit):
            main(["-v", "--import", "toyexp", "bench", "--help"])
        assert capsys.readouterr().out.startswith("usage: bnlab bench")
    finally:
        unregister_experiment("toy-ext")
        sys.modules.pop("toyexp", None)


# -- records made before the model field ---------------------------------------------------
def test_every_committed_record_keeps_its_digest_and_config():
    runs = sorted(p for p in RESULTS.iterdir() if (p / "config.json").is_file())
    assert len(runs) >= 10
    for run in runs:
        config = read_config(run)
        stored = json.loads((run / "config.json").read_text())
        assert {"experiment": config.name, **config.to_dict()} == {
            k: v for k, v in stored.items() if k not in SESSION_FIELDS}, run.name
        digests = {json.loads(line)["config"] for line in
                   (run / "metrics.jsonl").read_text().splitlines() if line.strip()}
        assert digests == {config.digest()}, run.name
        assert "model" not in config.to_dict() and getattr(config, "model", "mlp") == "mlp"


def test_a_model_of_ones_own_is_stored_and_counted(registered):
    ours, builtin = CompareConfig(model="mine"), CompareConfig()
    assert ours.digest() != builtin.digest() and ours.to_dict()["model"] == "mine"
    assert CompareConfig.from_dict(ours.to_dict()) == ours
    assert CompareConfig.from_dict(builtin.to_dict()).model == "mlp"


# -- the docs ------------------------------------------------------------------------------
def _blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"```(python|bash)\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_the_extending_guide_runs_as_written(registered, tmp_path, monkeypatch):
    """docs/extending.md's blocks, in order, in an empty folder: a block that starts with a
    file's name (``# mynorms.py``) is that file; the others run (Python here, bash through
    the installed command)."""
    unregister_norm("nomean")  # the guide registers its own
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {}
    blocks = _blocks(DOC.read_text(encoding="utf-8"))
    assert [kind for kind, _ in blocks].count("bash") == 3
    bin_dir = str(Path(sys.executable).parent)
    for kind, code in blocks:
        name = re.match(r"# ([\w/]+\.py)\n", code)
        if name:
            (tmp_path / name.group(1)).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name.group(1)).write_text(code)
            importlib.invalidate_caches()
        elif kind == "python":
            exec(compile(code, str(DOC), "exec"), namespace)
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=600,
                                  env={**ENV, "PATH": bin_dir + os.pathsep + ENV["PATH"]})
            assert done.returncode == 0, f"{code}\n{done.stderr}"
    for run in ("nomean", "funnel", "funnel-cli", "depth", "depth-cli"):
        assert (tmp_path / "runs" / run / "report.html").is_file(), run
    assert read_config(tmp_path / "runs" / "funnel-cli").model == "funnel"
    final = _final(tmp_path / "runs" / "funnel", 5)
    assert sorted(final) == ["bn", "nomean", "none"] and min(final["bn"] + final["nomean"]) > 0.5
    depth = json.loads((tmp_path / "runs" / "depth-cli" / "summary.json").read_text())
    assert depth["norms"] == ["none", "bn", "nomean"] and depth["depths"] == [1, 4]


def test_the_guides_error_message_is_bnlabs(registered, tmp_path):
    """The message the guide shows for a report without --import is the one bnlab gives."""
    shown = re.search(r"```text\n\$ bnlab report runs/funnel-cli\n(.*?)```",
                      DOC.read_text(encoding="utf-8"), flags=re.S).group(1)
    head, tail = " ".join(shown.split()).split(" ...; ")
    config = CompareConfig(norms=("none", "bn", "nomean")).to_dict()
    run = tmp_path / "runs" / "funnel-cli"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"experiment": "compare", **config}))
    unregister_norm("nomean")
    with pytest.raises(ConfigError) as caught:
        read_config(run)
    message = f"bnlab report: error: {caught.value}".replace(str(tmp_path) + "/", "")
    assert message.startswith(head.replace(" ...", "")) and message.endswith(tail)


@pytest.mark.parametrize("build, why", [
    (lambda c, s, d: __import__("torch").nn.Linear(c, c + 1), "maps a batch of shape (4, 16) to (4, 17)"),
    (lambda c, s, d: "a layer", "returned str, not a torch.nn.Module"),
    (lambda c, s, d: 1 / 0, "ZeroDivisionError"),
])
def test_a_broken_norm_of_ones_own_is_refused_before_anything_is_written(tmp_path, build, why):
    import bnlab.lab

    bnlab.lab.register_norm("broken", build)
    try:
        with pytest.raises(ConfigError, match="the norm broken fails") as refused:
            bnlab.lab.run("compare", tmp_path / "r", progress=False, norms=("none", "broken"),
                          epochs=2, seeds=1, width=16)
        assert why in str(refused.value) and not (tmp_path / "r").exists()
    finally:
        bnlab.lab.unregister_norm("broken")


def test_a_run_of_an_unregistered_experiment_says_to_import_its_module(tmp_path, capsys):
    from bnlab.cli import main

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text('{"experiment": "depth-sweep", "seeds": 2}')
    assert main(["report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "the experiment 'depth-sweep', which is not registered" in err
    assert "bnlab --import MODULE" in err
