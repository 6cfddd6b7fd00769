"""The experiment registry: an experiment is one entry (config, runner, report section,
summary), and the command, the report and the docs' list all read it."""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import bnlab.report.build as build
from bnlab.cli import main
from bnlab.lab.experiment_configs import (EXPERIMENTS, CompareConfig, experiment, experiments,
                                          experiments_markdown, register_experiment,
                                          unregister_experiment)
from bnlab.lab.fields import TrainConfig, integer, option

DOCS = Path(__file__).resolve().parent.parent / "docs" / "lab.md"
NAMES = ["compare", "noise", "ics", "regularization", "init-sweep", "lr-sweep", "smoothness",
         "batch-size"]


@dataclass(frozen=True)
class ToyConfig(TrainConfig, name="toy", full={"seeds": 3}):
    widgets: int = option(2, "widgets per run", integer(1, 10))


@pytest.fixture
def toy():
    """A user's experiment, registered for one test: runs with compare's runner, reported
    by compare's section."""
    entry = register_experiment(ToyConfig, module="bnlab.lab.experiments.compare",
                                section="bnlab.report.sections.compare",
                                summary="a toy experiment with widgets")
    yield entry
    unregister_experiment("toy")


def test_every_experiment_is_one_entry():
    assert [e.name for e in experiments()] == NAMES == list(EXPERIMENTS)
    for entry in experiments():
        assert EXPERIMENTS[entry.name] is entry.config and entry.config.name == entry.name
        assert callable(entry.runner().run)  # the runner's protocol: run(ctx)
        section = build.section(entry.name)
        assert all(callable(getattr(section, f)) for f in ("analyze", "measured", "tables",
                                                           "figures"))
    assert experiment("init-sweep").section == experiment("lr-sweep").section \
        == "bnlab.report.sections.sweeps"
    assert experiment("regularization").runner() is experiment("compare").runner()


def test_unknown_experiment_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"^unknown experiment 'nope'; expected one of "
                                         r"compare, noise, .*, batch-size$"):
        experiment("nope")


def test_the_command_lists_every_experiment_with_its_summary(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for entry in experiments():
        assert f"{entry.name} {entry.summary}" in out


def test_a_registered_experiment_is_a_subcommand_and_has_a_report(toy, capsys):
    assert "toy" in EXPERIMENTS and experiments()[-1] is toy
    with pytest.raises(SystemExit):
        main(["run", "toy", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "a toy experiment with widgets" in out
    assert "--widgets WIDGETS widgets per run (default: 2)" in out
    assert "--full start from the documented full setting: seeds=3" in out
    assert build.section("toy").__name__ == "bnlab.report.sections.compare"
    assert "| `toy` | a toy experiment with widgets | digits |" in experiments_markdown()


def test_an_unregistered_experiment_is_gone():
    register_experiment(ToyConfig, module="m", section="s", summary="soon gone")
    unregister_experiment("toy")
    assert "toy" not in EXPERIMENTS
    with pytest.raises(ValueError, match="no experiment 'toy' is registered"):
        unregister_experiment("toy")


@pytest.mark.parametrize("config,kwargs,error,msg", [
    (CompareConfig, {}, ValueError, "the experiment compare is already registered"),
    (TrainConfig, {}, TypeError, "config must be a Config subclass with a name"),
    (dict, {}, TypeError, r"\(got <class 'dict'>\)"),
    (ToyConfig, {"module": "my package"}, ValueError, "module must be a dotted module path"),
    (ToyConfig, {"section": ""}, ValueError, "section must be a dotted module path"),
    (ToyConfig, {"summary": "two\nlines"}, ValueError, "summary must be one line"),
    (ToyConfig, {"summary": " "}, ValueError, "summary must be one line"),
])
def test_bad_registrations_are_refused(config, kwargs, error, msg):
    args = {"module": "m", "section": "s", "summary": "one line", **kwargs}
    with pytest.raises(error, match=msg):
        register_experiment(config, **args)
    assert list(EXPERIMENTS) == NAMES


def _table(text: str) -> list[list[str]]:
    """The cells of the first Markdown table in ``text``, header and rule left out."""
    lines = re.search(r"(?m)^\|.*\|\n\|[-|]+\|\n((?:\|.*\|\n)+)", text).group(1)
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines.splitlines()]


def test_the_docs_list_the_registered_experiments():
    """docs/lab.md's table of experiments names each registered one in the registry's order
    with its default data, as experiments_markdown() does (compare, the command of its own,
    ``bnlab compare``, has its own section there)."""
    docs = _table(DOCS.read_text(encoding="utf-8").split("\n## The experiments\n", 1)[1])
    ours = _table(experiments_markdown())
    assert [(row[0], row[-1]) for row in docs] == [
        (row[0], row[-1]) for row in ours if row[0] != "`compare`"]
    assert ours[0] == ["`compare`", experiment("compare").summary, "digits"]
