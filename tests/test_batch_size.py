"""The CNN registry, the batch-size experiment and its report section."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.cli import main
from bnlab.lab.fields import ConfigError
from bnlab.lab.experiment_configs import BatchSizeConfig, SamplesBatchSizeConfig
from bnlab.lab.experiments.batch_size import plan
from bnlab.lab.models import build_cnn, norm_layer
from bnlab.lab.rundir import read_config, read_rows
from bnlab.lab.runner import run_experiment
from bnlab.report.build import analyze_run
from bnlab.report.sections import batch_size as section
from conftest import rows as run_rows, stop_after

RECORD = Path(__file__).parent / "records" / "batch-size-samples"  # made with samples (an older bnlab)

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


def test_the_default_cnn_is_the_two_stage_network_with_its_weights():
    """Other experiments and their records use build_cnn's default: it must not move."""
    model = build_cnn(28, 10, "bn", seed=3)
    assert [type(m).__name__ for m in model] == [
        "Unflatten", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
        "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Flatten", "Linear"]
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode()), digest.update(value.numpy().tobytes())
    assert digest.hexdigest()[:16] == "32042c3ac2a9a4b2"


@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
def test_a_deep_cnn_pools_every_two_convolutions(norm):
    model = build_cnn(28, 10, norm, seed=1, **BatchSizeConfig.CNN)
    names = [type(m).__name__ for m in model]
    assert names.count("Conv2d") == 6 and names.count("MaxPool2d") == 3
    assert sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
               for m in model) == (0 if norm == "none" else 6)
    assert names[-3:] == ["MaxPool2d", "Flatten", "Linear"] and model[-1].in_features == 32 * 3 * 3
    assert model(torch.rand(4, 784)).shape == (4, 10)
    assert build_cnn(8, 10, norm, seed=1, **BatchSizeConfig.CNN)(torch.rand(2, 64)).shape == (2, 10)


def test_a_cnn_too_deep_for_its_images_is_refused():
    with pytest.raises(ValueError, match="a 4x4 image is too small for 3 2x2 poolings; expected "
                                         "a side of at least 8"):
        build_cnn(4, 10, "bn", seed=0, **BatchSizeConfig.CNN)
    with pytest.raises(ValueError, match="pool_every >= 1 .got channels=\\(8,\\), pool_every=0"):
        build_cnn(28, 10, "bn", seed=0, channels=(8,), pool_every=0)


def test_layer_norm_of_a_cnn_normalizes_each_sample_over_all_its_features():
    ln = norm_layer("ln", 6, seed=0, dims=2)
    y = ln(torch.randn(3, 6, 4, 4) * 5 + 2)
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    assert norm_layer("gn", 6, seed=0, dims=2).num_groups == 2  # gcd(4, 6)


def test_fc_only_norms_refuse_a_cnn():
    with pytest.raises(ValueError, match="fully connected networks only"):
        build_cnn(28, 10, "population", seed=0)


def test_plan_scales_the_learning_rate_and_keeps_the_epochs():
    c = BatchSizeConfig(epochs=3, lr=0.2)
    assert plan("bn", 2, c, 1000) == {"norm": "bn", "batch_size": 2, "lr": 0.2 * 2 / 64,
                                      "per_epoch": 500, "steps": 1500}
    assert plan("ghost", 8, c, 1000) == {"norm": "ghost-8", "batch_size": 64, "lr": 0.2,
                                         "per_epoch": 15, "steps": 45}  # 1000 // 64: 15 whole steps
    assert plan("gn", 64, c, 1000)["steps"] == 45


@pytest.mark.parametrize("bad,match", [
    (dict(batch_sizes=(2, 3, 64)), "sizes that divide the largest"),
    (dict(epochs=0), "--epochs must be an integer from 1"),
    (dict(precise_samples=32), "--precise-samples must be at least the largest batch size 64"),
    (dict(arms=("bn", "instance")), "must be 1 or more distinct values, each one of bn"),
])
def test_config_checks(bad, match):
    with pytest.raises(ConfigError, match=match):
        BatchSizeConfig(**bad)


def test_the_image_side_must_fit_the_cnn():
    with pytest.raises(ConfigError, match="the CNN needs square images of side 8 or more; "
                                          "fashion-mnist has 49 features"):
        BatchSizeConfig().check_data(60000, 10000, 49, 10)
    BatchSizeConfig().check_data(60000, 10000, 64, 10)


@pytest.mark.slow
def test_batch_size_end_to_end_on_digits(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "batch-size", "--dataset", "digits", "--seeds", "2", "--epochs", "2",
                 "--n-train", "128", "--batch-sizes", "2,8", "--precise-samples", "64",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "test_acc" in r]
    assert len(final) == 5 * 2 * 2
    assert all(("precise_test_acc" in r) == (r["arm"] in ("bn", "ghost", "renorm")) for r in final)
    # every arm trains two epochs: a step of 2 examples 64 times an epoch, of 8 (ghost) 16 times
    assert {(r["arm"], r["batch"], r["step"]) for r in final} == {
        (a, b, 2 * 128 // (8 if a == "ghost" else b)) for a in section.LABELS for b in (2, 8)}
    epoch_rows = [r for r in rows if "sgd_loss" in r and "test_acc" not in r]
    assert len(epoch_rows) == 20 and all(r["epoch"] == 1 and set(r) == {
        "unit", "config", "arm", "batch", "seed", "step", "epoch", "sgd_loss"} for r in epoch_rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"]["gn@2"]["n"] == 2 and "precise" not in summary["cells"]["gn@2"]
    assert summary["trained"] == "2 epochs of 128 examples"
    assert set(summary["cells"]["gn@2"]["sgd_loss"]) == {"last", "before"}
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


def test_a_record_counted_in_samples_loads_with_its_digest_and_reports():
    config = read_config(RECORD)
    assert type(config) is SamplesBatchSizeConfig and config.samples == 20000
    assert config.epochs is None and "epochs" not in config.to_dict()
    assert {r["config"] for r in read_rows(RECORD / "metrics.jsonl")} == {config.digest()}
    _, _, summary = analyze_run(RECORD)  # reads only
    assert summary["trained"] == "20000 examples" and summary["setting"] is None
    assert summary["cells"]["bn@2"]["n"] == 5 and "sgd_loss" not in summary["cells"]["bn@2"]
    assert len(section.tables(summary)) == 2  # no epochs: no table of training losses


def test_a_record_counted_in_samples_is_not_continued(tmp_path, capsys):
    out = tmp_path / "old"
    stored = json.loads((RECORD / "config.json").read_text())
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**stored, "dataset": "digits"}))
    assert main(["run", "batch-size", "--resume", str(out)]) == 2
    assert ("trained every arm on a number of examples (samples: 20000), as bnlab did before "
            "--epochs") in capsys.readouterr().err
    del stored["experiment"]
    with pytest.raises(ConfigError, match='"samples" must be at least the largest batch size 64'):
        BatchSizeConfig.from_dict({**stored, "samples": 10})
    with pytest.raises(ConfigError, match="unknown samples"):
        BatchSizeConfig.from_dict({**stored, "epochs": 2})
    with pytest.raises(ConfigError, match="missing epochs"):
        BatchSizeConfig.from_dict({k: v for k, v in stored.items() if k != "samples"})


@pytest.mark.slow
def test_resume_after_interrupt_equals_uninterrupted(tmp_path):
    config = BatchSizeConfig(dataset="digits", seeds=1, arms=("bn", "gn"), batch_sizes=(2, 8),
                             epochs=3, n_train=256, precise_samples=64, workers=1)
    run_experiment(config, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):  # bn at B=2, past its first epoch (128 steps)
        run_experiment(config, tmp_path / "cut", progress=stop_after(200))
    assert list((tmp_path / "cut" / "checkpoints").iterdir())
    run_experiment(None, tmp_path / "cut", resume=True)
    assert run_rows(tmp_path / "cut") == run_rows(tmp_path / "full")


def _epochs(acc: dict, losses: dict) -> list[dict]:
    """Final rows as :func:`_cells` makes them, with ``losses[(arm, b)]``, each seed's
    training loss per epoch, as the epochs' rows and the final rows' sgd_loss."""
    final, before = _cells(acc), []
    for r in final:
        *early, last = losses[(r["arm"], r["batch"])][r["seed"]]
        r |= {"epoch": len(early) + 1, "sgd_loss": last}
        before += [{"unit": r["unit"], "arm": r["arm"], "batch": r["batch"], "seed": r["seed"],
                    "epoch": e, "sgd_loss": loss} for e, loss in enumerate(early, 1)]
    return before + final


def test_training_losses_say_how_close_to_converged_each_cell_ended():
    config = BatchSizeConfig(arms=("bn", "gn"), batch_sizes=(2, 64), seeds=2, epochs=3)
    acc = {(a, b): [0.8, 0.82] for a in ("bn", "gn") for b in (2, 64)}
    losses = {("bn", 2): [[1.0, 0.5, 0.4], [1.0, 0.5, 0.6]], ("bn", 64): [[1.0, 0.8, 0.6]] * 2,
              ("gn", 2): [[1.0, 0.5, 0.5]] * 2, ("gn", 64): [[1.0, 0.9, 0.8]] * 2}
    s = section.analyze(_epochs(acc, losses), config)
    assert s["cells"]["bn@2"]["sgd_loss"] == pytest.approx({"last": 0.5, "before": 0.5})
    assert s["cells"]["gn@64"]["sgd_loss"] == pytest.approx({"last": 0.8, "before": 0.9})
    assert s["trained"] == "3 epochs of 1000 examples"
    (header, body) = section.tables(s)[2]
    assert header[:3] == ["arm", "training loss", "n"]
    assert body == [["BN", "last epoch (change)", "2", "0.500 (+0%)", "0.600 (-25%)"],
                    ["GroupNorm", "last epoch (change)", "2", "0.500 (+0%)", "0.800 (-11%)"]]
    assert ("Trained to the end? At B=64, the fewest steps, the last epoch's mean training loss "
            "(and its change from the epoch before) is 0.600 (-25%) for BN, 0.800 (-11%) for "
            "GroupNorm.") in section.measured(s)
    one = BatchSizeConfig(arms=("bn", "gn"), batch_sizes=(2, 64), seeds=2, epochs=1, n_train=None)
    s = section.analyze(_epochs(acc, {k: [[0.7], [0.7]] for k in losses}), one)
    assert s["trained"] == "1 epoch" and s["cells"]["bn@2"]["sgd_loss"]["before"] is None
    assert section.tables(s)[2][1][0][3] == "0.700" and section.convergence(s) == []
