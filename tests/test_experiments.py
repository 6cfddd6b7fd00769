"""Named experiments: their measurements on known cases, resume, and each end to end."""

import copy
import json

import numpy as np
import pytest
import torch

from bnlab.lab import ConfigError
from bnlab.lab.cli import main
from bnlab.lab.data import load_digits
from bnlab.lab.experiments import EXPERIMENTS, run_experiment
from bnlab.lab.experiments.noise import batch_noise, fit_slope
from bnlab.lab.experiments.regularization import PopulationBatchNorm1d, refresh_population
from bnlab.lab.experiments.smoothness import NoisyAffine, probe

TINY = {
    "noise": ["--dataset", "digits", "--draws", "20", "--train-epochs", "1", "--batch-sizes", "2,8,32"],
    "ics": ["--dataset", "digits", "--steps", "60", "--eval-every", "20", "--seeds", "2", "--probe-size", "50"],
    "regularization": ["--dataset", "digits", "--n-train", "192", "--epochs", "2", "--seeds", "2",
                       "--width", "16", "--ghost-sizes", "4,16"],
    "init-sweep": ["--dataset", "digits", "--n-train", "200", "--epochs", "2", "--scales", "1,0.01",
                   "--seeds", "2", "--width", "16"],
    "lr-sweep": ["--epochs", "2", "--seeds", "2", "--lrs", "0.01,1,100", "--width", "16"],
    "smoothness": ["--steps", "20", "--check-every", "10", "--seeds", "2", "--width", "16"],
}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_each_experiment_end_to_end(name, tmp_path, capsys):
    out = tmp_path / name
    assert main(["run", name, *TINY[name], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expected:" in printed and "report:" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == name and summary["measured"] and summary["expected"]
    page = (out / "report.html").read_text()
    assert "expected (literature)" in page and "measured (this run)" in page
    assert "data:image/png;base64," in page
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["dataset"] == "digits"
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()


def test_one_combined_report_for_several_runs(tmp_path, capsys):
    runs = []
    for name in ("lr-sweep", "smoothness"):
        runs.append(str(tmp_path / name))
        assert main(["run", name, *TINY[name], "--out", runs[-1]]) == 0
    runs.append(str(tmp_path / "compare"))
    assert main(["compare", "--epochs", "2", "--seeds", "2", "--width", "8", "--out", runs[-1]]) == 0
    out = tmp_path / "all.html"
    assert main(["report", *runs, "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("<section>") == 3 and page.count('href="#run') == 3
    assert "lr-sweep: learning rate" in page and "Fully connected vs fully connected" in page
    assert page.count("data:image/png;base64,") == 4  # 1 + 1 + 2 figures


def test_units_resume_to_the_same_results(tmp_path):
    data = load_digits()
    cfg = EXPERIMENTS["lr-sweep"].config_cls(epochs=2, seeds=1, lrs=(0.01, 0.1, 1.0), width=16)
    full = run_experiment("lr-sweep", cfg, tmp_path / "full", data=data)

    def stop(done, total, key):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment("lr-sweep", cfg, tmp_path / "cut", progress=stop, data=data)
    assert len(list((tmp_path / "cut" / "units").iterdir())) == 3
    seen = []
    resumed = run_experiment("lr-sweep", None, tmp_path / "cut", resume=True,
                             progress=lambda d, t, k: seen.append(d), data=data)
    assert resumed == full and seen == list(range(1, 7))
    with pytest.raises(ConfigError, match="is not a 'noise' run"):
        run_experiment("noise", None, tmp_path / "cut", resume=True, data=data)


def test_batch_noise_follows_one_over_sqrt_m_on_gaussian_data():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 4, generator=gen, dtype=torch.float64) * 3 + 10
    out = batch_noise(z, [4, 16, 64, 256], 400, gen)
    assert abs(out["slopes"]["mean_err"] + 0.5) < 0.06
    assert abs(out["slopes"]["var_rel_err"] + 0.5) < 0.12  # -1/2 for m >> 1
    for row in out["rows"]:
        assert row["mean_err"] == pytest.approx(row["mean_err_theory"], rel=0.15)
    assert out["rows"][-1]["within3"] > 0.99
    assert fit_slope([1, 4, 16], [1.0, 0.5, 0.25]) == pytest.approx(-0.5)


def test_batch_noise_ignores_constant_features():
    z = torch.cat([torch.randn(500, 2), torch.zeros(500, 1)], dim=1)
    out = batch_noise(z, [4, 16], 50, torch.Generator().manual_seed(1))
    assert out["live_features"] == 2 and all(np.isfinite(r["mean_err"]) for r in out["rows"])


def test_population_bn_normalizes_with_whole_set_statistics():
    torch.manual_seed(0)
    layer = PopulationBatchNorm1d(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), layer)
    x = torch.randn(200, 4) * 2 + 1
    refresh_population(model, x)
    h = model[0](x).detach()
    torch.testing.assert_close(layer.running_mean, h.mean(0))
    model.train()
    y_small = model(x[:5])  # a batch of 5 normalized with the 200-sample statistics
    expect = (h[:5] - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(y_small, expect, rtol=1e-5, atol=1e-5)
    assert layer.num_batches_tracked.item() == 0


def test_noisy_affine_is_identity_in_eval_and_can_hold_its_draw():
    layer = NoisyAffine(0.5, 0.5, torch.Generator().manual_seed(0))
    y = torch.randn(8, 3)
    assert torch.equal(layer.eval()(y), y)
    layer.train()
    assert not torch.equal(layer(y), layer(y))
    layer.hold = True
    assert torch.equal(layer(y), layer(y))


def test_probe_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8, bias=False), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 3))
    before = copy.deepcopy(model.state_dict())
    out = probe(model, torch.randn(16, 5), torch.randint(0, 3, (16,)), [0.1, 0.2, 0.4])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert out["loss_range"] > 0 and out["grad_change"] > 0 and out["beta"] > 0


@pytest.mark.parametrize("argv,msg", [
    (["run", "lr-sweep", "--lrs", "0.1,0.2"], "lrs must be a range spanning at least two orders of magnitude"),
    (["run", "regularization", "--ghost-sizes", "5"], "ghost_sizes must be integers >= 2 dividing batch_size=64"),
    (["run", "smoothness", "--activation", "gelu"], "activation must be one of sigmoid, relu, tanh (got 'gelu')"),
    (["run", "ics", "--steps", "0"], "steps must be an integer >= 1 (got 0)"),
    (["run", "noise", "--batch-sizes", "1,4"], "batch_sizes must be two or more integers >= 2"),
    (["run", "noise", "--resume", "x", "--seeds", "3"], "give no other options"),
])
def test_run_errors_before_any_work(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_full_settings_are_valid_configs():
    for exp in EXPERIMENTS.values():
        full = exp.config_cls(**exp.full)
        assert full != exp.config_cls()


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_run_help_explains_every_field(name, capsys):
    with pytest.raises(SystemExit):
        main(["run", name, "--help"])
    out = capsys.readouterr().out
    cls = EXPERIMENTS[name].config_cls
    for field in cls.field_types():
        assert "--" + field.replace("_", "-") in out
        assert field in cls.HELP, f"{name}: no help text for {field}"
    assert "--full" in out and "--resume" in out


def test_full_batch_step_takes_statistics_over_the_whole_set():
    from bnlab.lab.experiments.regularization import full_batch_step
    import bnlab.nn as bnn

    torch.manual_seed(0)
    bn = bnn.BatchNorm1d(3, momentum=1.0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), bn, torch.nn.Linear(3, 2))
    x, y = torch.randn(50, 4) * 3 + 2, torch.randint(0, 2, (50,))
    h = model[0](x).detach()
    full_batch_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, torch.arange(5))
    torch.testing.assert_close(bn.running_mean, h.mean(0))  # 50 rows, not the 5 of the loss
