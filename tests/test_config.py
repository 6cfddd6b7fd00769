"""Configs as users give them: norm names in one spelling, numbers in plain decimal, messages
that name the flag (or the config.json key) and show values as typed, and the session fields
(where the data lies, how many threads and processes train) kept out of config.json."""

import dataclasses
import json
import shutil
import typing
from argparse import ArgumentTypeError
from pathlib import Path

import pytest

from bnlab.lab.fields import PARSE, SESSION_FIELDS, ConfigError, flag, parse_float, parse_int
from bnlab.lab.experiment_configs import EXPERIMENTS, BatchSizeConfig, CompareConfig, IcsConfig, NoiseConfig
from bnlab.lab.rundir import read_config

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


# -- norm names ---------------------------------------------------------------------------
def test_norm_names_take_one_spelling():
    cfg = CompareConfig(norms=("ghost-06", "bn", "ghost-0012"))
    assert cfg.norms == ("ghost-6", "bn", "ghost-12")
    assert cfg.digest() == CompareConfig(norms=("ghost-6", "bn", "ghost-12")).digest()
    assert cfg.to_dict()["norms"] == ["ghost-6", "bn", "ghost-12"]


@pytest.mark.parametrize("norms,msg", [
    (("ghost-6", "ghost-06"), r"; ghost-6 and ghost-06 both mean ghost-6 \(got ghost-6,ghost-06\)$"),
    (("ghost-06", "bn", "ghost-006"), r"; ghost-06 and ghost-006 both mean ghost-6 \(got "),
    (("bn", "bn"), r"; bn is given twice \(got bn,bn\)$"),
    (("bn", "ghost-01"), r"; ghost-01 is not \(got bn,ghost-01\)$"),  # ghost-1 is no ghost BN
])
def test_norms_that_are_the_same_after_spelling_are_refused(norms, msg):
    with pytest.raises(ConfigError, match=r"^--norms must be 1 or more distinct values, each "
                       r"one of none, bn, .*ghost-K .*" + msg):
        CompareConfig(norms=norms)


# -- values shown as typed ----------------------------------------------------------------
@pytest.mark.parametrize("cls,kw,msg", [
    (CompareConfig, dict(norms=("bn", "foo")), r"; foo is not \(got bn,foo\)$"),
    (CompareConfig, dict(norms=()), r"; none given \(got nothing\)$"),
    (NoiseConfig, dict(batch_sizes=(2, 4, 2)), r"; 2 is given twice \(got 2,4,2\)$"),
    (NoiseConfig, dict(batch_sizes=(2, 1)), r"; 1 is not \(got 2,1\)$"),
    (NoiseConfig, dict(batch_sizes=(8,)), r"; only 1 given \(got 8\)$"),
    (BatchSizeConfig, dict(arms=("bn", "in")), r"; in is not \(got bn,in\)$"),
])
def test_list_values_are_shown_comma_separated(cls, kw, msg):
    with pytest.raises(ConfigError, match=msg) as info:
        cls(**kw)
    assert "('" not in str(info.value) and "\n" not in str(info.value)  # no Python tuple


# -- every message: one line, naming the flag, or the key of config.json -------------------
def fields_of_every_experiment():
    return [(cls, f.name) for cls in EXPERIMENTS.values() for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls,name", fields_of_every_experiment())
def test_every_field_message_is_one_line_naming_the_flag(cls, name):
    with pytest.raises(ConfigError) as info:
        cls(**{name: {"not": "valid"}})
    msg = str(info.value)
    assert msg.startswith(f"{flag(name)} must be ") and msg.startswith("--" + name.replace("_", "-"))
    assert "\n" not in msg and msg.endswith(" (got {'not': 'valid'})")


@pytest.mark.parametrize("cls,name", [(c, n) for c, n in fields_of_every_experiment()
                                      if n not in SESSION_FIELDS])
def test_every_field_message_from_config_json_names_its_key(cls, name):
    stored = {**cls().to_dict(), name: {"not": "valid"}}
    with pytest.raises(ConfigError) as info:
        cls.from_dict(stored, source="r/config.json")
    msg = str(info.value)
    assert msg.startswith(f'r/config.json: "{name}" must be ') and "--" not in msg.split("(got")[-1]
    assert "\n" not in msg and msg.endswith(' (got {"not": "valid"})')


def test_config_json_messages_name_keys_in_cross_field_checks_too():
    stored = {**IcsConfig().to_dict(), "eval_every": 5000, "steps": 3000}
    with pytest.raises(ConfigError, match=r'^r/config.json: "eval_every" must be at most "steps": '
                                          r'3000 \(got 5000\)$'):
        IcsConfig.from_dict(stored, source="r/config.json")
    stored = {**CompareConfig().to_dict(), "norms": ["ghost-7"]}
    with pytest.raises(ConfigError, match=r'"norms" must be ghost sizes that divide "batch_size": '
                                          r'60 \(got \["ghost-7"\]\)$'):
        CompareConfig.from_dict(stored, source="r/config.json")
    with pytest.raises(ConfigError, match=r"^--eval-every must be at most --steps 3000 \(got 5000\)$"):
        IcsConfig(eval_every=5000)  # outside config.json: flags again
    stored = {**CompareConfig().to_dict(), "seeds": "10"}  # a JSON string is not an integer
    with pytest.raises(ConfigError, match=r'"seeds" must be an integer from 1 to 1000 \(got "10"\)$'):
        CompareConfig.from_dict(stored, source="r/config.json")


# -- numbers on the command line: plain decimal -------------------------------------------
@pytest.mark.parametrize("text,value", [("10", 10), ("0", 0), ("-1", -1), ("+3", 3), ("007", 7)])
def test_parse_int_takes_decimal_digits(text, value):
    assert parse_int(text) == value and type(parse_int(text)) is int


@pytest.mark.parametrize("text", ["1_0", " 1", "1 ", "", "1.0", "1e3", "0x10", "\u0661", "1,0",
                                  "--1"])
def test_parse_int_refuses_what_int_would_misread(text):
    with pytest.raises(ArgumentTypeError, match=r"^invalid int value: .* \(expected decimal "
                                                r"digits, such as 10\)$"):
        parse_int(text)


@pytest.mark.parametrize("text,value", [("0.1", 0.1), ("1e-3", 1e-3), (".5", 0.5), ("2", 2.0),
                                        ("-2.5E+2", -250.0), ("7.", 7.0)])
def test_parse_float_takes_decimal_numbers(text, value):
    assert parse_float(text) == value


@pytest.mark.parametrize("text", ["1_000.5", "0.1_0", " 1", "", "fast", "0x1p-2", "1e", "e3",
                                  "\u0661.5"])
def test_parse_float_refuses_what_float_would_misread(text):
    with pytest.raises(ArgumentTypeError, match=r"^invalid float value: "):
        parse_float(text)


def test_inf_and_nan_parse_so_the_field_check_names_the_range():
    assert parse_float("inf") == float("inf") and parse_float("nan") != parse_float("nan")


def test_every_numeric_annotation_has_a_strict_parser():
    seen = set()
    for cls in EXPERIMENTS.values():
        for typ in typing.get_type_hints(cls).values():
            for t in (typing.get_args(typ) or (typ,)):
                if t in (int, float):
                    seen.add(t)
                    assert t in PARSE
    assert seen == {int, float}


# -- session fields: not the config -------------------------------------------------------
def test_session_fields_are_neither_stored_nor_digested():
    assert set(SESSION_FIELDS) == {"workers", "nproc", "data_dir", "tensorboard", "scheduler", "device"}
    a = CompareConfig(dataset="mnist", workers=3, nproc=2, data_dir="/data")
    b = CompareConfig(dataset="mnist")
    assert a.to_dict() == b.to_dict() and a.digest() == b.digest()
    assert not set(SESSION_FIELDS) & set(a.to_dict())
    assert CompareConfig.from_dict(a.to_dict()) == b


def test_stored_session_fields_of_older_records_are_ignored():
    old = {**CompareConfig().to_dict(), "workers": 4, "nproc": 2, "data_dir": "/gone"}
    assert CompareConfig.from_dict(old) == CompareConfig()
    old["workers"] = -1  # not read at all, so not checked either
    assert CompareConfig.from_dict(old) == CompareConfig()
    with pytest.raises(ConfigError, match="unknown colour"):
        CompareConfig.from_dict({**old, "colour": "red"})


@pytest.mark.parametrize("run", sorted(p.parent.name for p in RESULTS.glob("*/metrics.jsonl")))
def test_recorded_runs_keep_their_digest(run):
    """A run recorded when config.json held the session fields reads back with the digest its
    rows carry, so resuming it passes the record's check (and an edited config.json fails it)."""
    with open(RESULTS / run / "metrics.jsonl", encoding="utf-8") as fh:
        recorded = json.loads(fh.readline())["config"]
    assert read_config(RESULTS / run).digest() == recorded


@pytest.mark.slow
def test_a_recorded_run_cut_short_resumes(tmp_path):
    """docs/results/compare-digits, its last unit's last 70 rows removed, resumes to the end:
    the stored config (with "workers" and "data_dir") loads, its rows pass the digest check,
    and the unit retrained from its start gives the recorded numbers."""
    from bnlab.lab.runner import run_experiment

    run = tmp_path / "run"
    shutil.copytree(RESULTS / "compare-digits", run,
                    ignore=shutil.ignore_patterns("figures", "summary.json", "report.html"))
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    assert "workers" in json.loads((run / "config.json").read_text())
    (run / "metrics.jsonl").write_text("".join(lines[:-70]), encoding="utf-8")
    run_experiment(None, run, resume=True)
    got = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in lines]
    assert [(r["unit"], r["config"], r.get("step")) for r in got] == \
        [(r["unit"], r["config"], r.get("step")) for r in want]
    for g, w in zip(got[-70:], want[-70:]):
        for key in ("train_loss", "test_loss", "test_acc"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6)
