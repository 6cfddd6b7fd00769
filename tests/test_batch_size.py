"""The CNN registry, the batch-size experiment and its report section."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.cli import main
from bnlab.lab.fields import ConfigError
from bnlab.lab.experiment_configs import BatchSizeConfig
from bnlab.lab.experiments.batch_size import plan
from bnlab.lab.models import build_cnn, norm_layer
from bnlab.report.sections import batch_size as section

CNN_NORMS = {"none": None, "bn": bnn.BatchNorm2d, "torch-bn": nn.BatchNorm2d,
             "ghost-4": bnn.GhostBatchNorm, "renorm": bnn.BatchRenorm2d,
             "sync": bnn.SyncBatchNorm, "gn": nn.GroupNorm, "ln": nn.GroupNorm}


@pytest.mark.parametrize("norm", CNN_NORMS)
def test_cnn_for_each_norm(norm):
    model = build_cnn(28, 10, norm, seed=3)
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm,
                                                          nn.GroupNorm))]
    if CNN_NORMS[norm] is None:
        assert norms == []
    else:
        assert [type(m) for m in norms] == [CNN_NORMS[norm]] * 2
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert all((c.bias is None) == (CNN_NORMS[norm] is not None) for c in convs)
    out = model(torch.rand(8, 784))
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    # the same filters for every norm of one seed
    plain = [m.weight for m in build_cnn(28, 10, "none", seed=3) if isinstance(m, nn.Conv2d)]
    assert all(torch.equal(a.weight, b) for a, b in zip(convs, plain))


def test_layer_norm_of_a_cnn_normalizes_each_sample_over_all_its_features():
    ln = norm_layer("ln", 6, seed=0, dims=2)
    y = ln(torch.randn(3, 6, 4, 4) * 5 + 2)
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    assert norm_layer("gn", 6, seed=0, dims=2).num_groups == 2  # gcd(4, 6)


def test_fc_only_norms_refuse_a_cnn():
    with pytest.raises(ValueError, match="fully connected networks only"):
        build_cnn(28, 10, "population", seed=0)


def test_plan_scales_the_learning_rate_and_keeps_samples():
    c = BatchSizeConfig(samples=6400, lr=0.2)
    assert plan("bn", 2, c) == {"norm": "bn", "batch_size": 2, "lr": 0.2 * 2 / 64, "steps": 3200}
    assert plan("ghost", 8, c) == {"norm": "ghost-8", "batch_size": 64, "lr": 0.2, "steps": 100}
    assert plan("gn", 64, c)["steps"] == 100


@pytest.mark.parametrize("bad,match", [
    (dict(batch_sizes=(2, 3, 64)), "sizes that divide the largest"),
    (dict(samples=10), "at least the largest batch size 64"),
    (dict(arms=("bn", "instance")), "must be 1 or more distinct values, each one of bn"),
])
def test_config_checks(bad, match):
    with pytest.raises(ConfigError, match=match):
        BatchSizeConfig(**bad)


def test_batch_size_end_to_end_on_digits(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "batch-size", "--dataset", "digits", "--seeds", "2", "--samples", "256",
                 "--batch-sizes", "2,8", "--precise-samples", "64", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "test_acc" in r]
    assert len(final) == 5 * 2 * 2
    assert all(("precise_test_acc" in r) == (r["arm"] in ("bn", "ghost", "renorm")) for r in final)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"]["gn@2"]["n"] == 2 and "precise" not in summary["cells"]["gn@2"]
    printed = capsys.readouterr().out
    assert "Batch Renorm" in printed
    before = (out / "metrics.jsonl").read_bytes()
    assert main(["run", "batch-size", "--resume", str(out)]) == 0  # nothing to add
    assert (out / "metrics.jsonl").read_bytes() == before


def test_analyze_counts_diverged_runs_at_chance():
    config = BatchSizeConfig(arms=("bn", "gn"), batch_sizes=(2, 64), seeds=2)
    rows = [{"unit": f"a{arm}{b}{s}", "arm": arm, "batch": b, "seed": s, "step": 1,
             "test_acc": 0.9, "precise_test_acc": 0.92} for arm in ("bn", "gn")
            for b in (2, 64) for s in (0, 1)]
    rows[0] = {**rows[0], "diverged": True}
    del rows[0]["test_acc"]
    s = section.analyze(rows, config)
    assert s["cells"]["bn@2"]["diverged"] == 1
    assert s["cells"]["bn@2"]["running"]["mean"] == pytest.approx((0.9 + 0.1) / 2)
    assert s["cells"]["bn@64"]["precise"]["mean"] == pytest.approx(0.08)
    header, body = section.tables(s)[0]
    assert header == ["arm", "statistics", "n", "B=2", "B=64"] and len(body) == 4
    assert body[0][3] == "50.00% [0.00, 100.00] (1 of 2 failed)"  # clipped to what is possible
    assert any("BN at B=2, seed 0: diverged" in line for line in section.measured(s))
    assert section.figures(s)["batch-size"] is not None
    one = section.analyze([r for r in rows if r["seed"] == 1], config)
    assert any("(one seed: no interval)" in line for line in section.measured(one))


def test_a_run_with_no_rows_yet_has_no_verdict_and_no_error():
    s = section.analyze([], BatchSizeConfig(arms=("bn", "gn"), batch_sizes=(2, 64), seeds=2))
    assert s["sizes"] == [] and section.verdict(s) == []  # min() of no sizes raised here
    assert isinstance(section.measured(s), list)


def _cells(acc: dict, loss: float = 0.4) -> list[dict]:
    """Rows of arms x batch sizes x seeds; ``acc[(arm, b)]`` lists each seed's test accuracy."""
    return [{"unit": f"{arm}{b}s{i}", "arm": arm, "batch": b, "seed": i, "step": 1,
             "test_acc": a, "test_loss": 43.0 if a < 0.2 else loss,
             **({"precise_test_acc": a} if arm != "gn" else {})}
            for (arm, b), accs in acc.items() for i, a in enumerate(accs)]


def test_a_network_at_chance_is_flagged_in_table_text_and_figure():
    config = BatchSizeConfig(arms=("bn", "renorm", "gn"), batch_sizes=(2, 64), seeds=2)
    rows = _cells({("bn", 2): [0.8, 0.82], ("bn", 64): [0.85, 0.86],
                   ("renorm", 2): [0.8, 0.1], ("renorm", 64): [0.85, 0.86],
                   ("gn", 2): [0.84, 0.85], ("gn", 64): [0.84, 0.86]})
    s = section.analyze(rows, config)
    assert s["cells"]["renorm@2"]["failed"] == 1 and s["cells"]["renorm@2"]["diverged"] == 0
    assert s["failed"] == [{"arm": "renorm", "batch": 2, "seed": 1, "diverged": False,
                            "test_acc": 0.1, "test_loss": 43.0}]
    (_, body), _ = section.tables(s)
    renorm = [r for r in body if r[0] == "Batch Renorm"]
    assert all(r[3].endswith("(1 of 2 failed)") for r in renorm)
    assert not any("failed" in c for r in body if r[0] != "Batch Renorm" for c in r)
    assert ("Batch Renorm at B=2, seed 1: FAILED, at chance (test accuracy 10.00%, test loss "
            "43); its error counts in the mean.") in section.measured(s)
    ax = section.figures(s)["batch-size"].axes[0]
    assert "1 of 2 failed" in [t.get_text() for t in ax.texts]


def test_verdict_is_one_measured_line():
    config = BatchSizeConfig(arms=("bn", "gn"), batch_sizes=(2, 32), seeds=3)
    rises = section.analyze(_cells({("bn", 2): [0.70, 0.71, 0.72], ("bn", 32): [0.80, 0.81, 0.82],
                                    ("gn", 2): [0.80, 0.81, 0.82], ("gn", 32): [0.80, 0.82, 0.81]}),
                            config)
    line = section.measured(rises)[0]
    assert line.startswith("Wu & He's claim, BN's test error rises as the batch shrinks")
    assert (": observed in this run: from B=32 to B=2, BN's error changed by +10.00 points "
            "(intervals apart), GroupNorm's by +0.00 points (intervals overlap)") in line
    assert line.endswith("(n=3 seeds per arm and batch size).")
    falls = section.analyze(_cells({("bn", 2): [0.9, 0.9, 0.91], ("bn", 32): [0.8, 0.8, 0.81],
                                    ("gn", 2): [0.8, 0.8, 0.8], ("gn", 32): [0.8, 0.8, 0.8]}), config)
    assert ": NOT observed in this run: from B=32 to B=2, BN's error changed by -10.00" in \
        section.measured(falls)[0]
    failed = section.analyze(_cells({("bn", 2): [0.1, 0.9, 0.9], ("bn", 32): [0.8, 0.8, 0.8],
                                     ("gn", 2): [0.8, 0.8, 0.8], ("gn", 32): [0.8, 0.8, 0.8]}), config)
    assert "not assessed: 1 BN or GroupNorm network(s) at B=2 or B=32 diverged or ended at " \
        "chance" in section.measured(failed)[0]


def test_figure_bands_stay_possible_and_the_axis_spans_the_means():
    config = BatchSizeConfig(arms=("bn", "gn"), batch_sizes=(2, 64), seeds=3)
    s = section.analyze(_cells({("bn", 2): [0.85, 0.2 + 0.6, 0.99], ("bn", 64): [0.84, 0.86, 0.85],
                                ("gn", 2): [0.84, 0.85, 0.86], ("gn", 64): [0.83, 0.85, 0.87]}),
                        config)
    assert s["cells"]["bn@2"]["running"]["low"] < 0  # n=3 t-interval past 0% error
    ax = section.figures(s)["batch-size"].axes[0]
    bands = [c.get_paths()[0].vertices[:, 1] for c in ax.collections if c.get_paths()]
    assert bands and all(((0 <= y) & (y <= 1)).all() for y in bands)
    means = [c["running"]["mean"] for c in s["cells"].values()]
    low, high = ax.get_ylim()
    assert low <= min(means) and high >= max(means)
    assert high - low < 2 * (max(means) - min(means)) + 0.02  # the means, not the intervals


def test_the_terminal_table_fits_200_columns():
    from bnlab.report.text import summary_lines

    config = BatchSizeConfig(seeds=2)
    rows = _cells({(a, b): [0.8, 0.1] for a in config.arms for b in config.batch_sizes})
    s = {**section.analyze(rows, config), "experiment": "batch-size",
         "measured": [], "setting": None}
    assert max(map(len, summary_lines(s, width=200).splitlines())) <= 200
