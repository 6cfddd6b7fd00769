"""The CNN registry, the batch-size experiment and its report section."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.lab.cli import main
from bnlab.lab.config import ConfigError
from bnlab.lab.configs import BatchSizeConfig
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
    assert header == ["arm", "test error with", "B=2", "B=64"] and len(body) == 4
    assert any("diverged" in line for line in section.measured(s))
    assert section.figures(s)["batch-size"] is not None
    one = section.analyze([r for r in rows if r["seed"] == 1], config)
    assert any("(one seed: no interval)" in line for line in section.measured(one))
