"""smoothness: the landscape probe, the report's analysis on hand-made rows, resume, and the
command line end to end on digits."""

import copy
import json

import pytest
import torch

from bnlab.cli import main
from bnlab.lab.experiment_configs import SmoothnessConfig
from bnlab.lab.runner import run_experiment
from bnlab.lab.experiments.smoothness import probe
from bnlab.lab.models import NoisyAffine, build_mlp
from bnlab.lab.train import Progress
from bnlab.report.sections import smoothness as section

T1 = 12.706204736174694  # Student-t 97.5% quantile, 1 degree of freedom (two seeds)


# -- probe --------------------------------------------------------------------------------
def test_noisy_affine_is_identity_in_eval_and_can_hold_its_draw():
    layer = NoisyAffine(0.5, 0.5, seed=0)
    y = torch.randn(8, 3)
    assert torch.equal(layer.eval()(y), y)
    layer.train()
    assert not torch.equal(layer(y), layer(y))
    layer.hold = True
    assert torch.equal(layer(y), layer(y))


@pytest.mark.parametrize("norm", ["bn", "noisy"])
def test_probe_leaves_the_model_untouched(norm):
    torch.manual_seed(0)
    model = build_mlp(5, 3, 2, 8, "relu", norm, 1.0, seed=0)
    before = copy.deepcopy(model.state_dict())  # noisy: the generators' states included
    out = probe(model, torch.randn(16, 5), torch.randint(0, 3, (16,)), [0.1, 0.2, 0.4])
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert out["loss_range"] > 0 and out["grad_change"] > 0 and out["beta"] > 0


def test_probe_compares_points_under_one_noise_draw():
    """At eta -> 0 the gradient cannot change, unless the probe drew new noise per point."""
    torch.manual_seed(0)
    model = build_mlp(5, 3, 2, 8, "relu", "noisy", 1.0, seed=0)
    out = probe(model, torch.randn(16, 5), torch.randint(0, 3, (16,)), [1e-6, 2e-6])
    assert out["grad_change"] < 1e-4 and out["loss_range"] < 1e-5


# -- analysis -----------------------------------------------------------------------------
def _rows():
    """Checkpoints 0, 2, 4. Plain: both seeds finish. BN: seed 1 diverges at step 4 after
    its step-2 probe. Noisy: its only seed diverges at step 0."""
    def probe_row(norm, seed, step, value, **extra):
        return {"unit": f"{norm}-seed{seed}", "norm": norm, "seed": seed, "step": step,
                "loss_range": value, "grad_change": 10 * value, "beta": value + 1, **extra}
    return [
        probe_row("none", 0, 0, 9.0), probe_row("none", 0, 2, 1.0),
        probe_row("none", 0, 4, 3.0, test_acc=0.8),
        probe_row("none", 1, 0, 9.0), probe_row("none", 1, 2, 3.0),
        probe_row("none", 1, 4, 5.0, test_acc=0.9),
        probe_row("bn", 0, 0, 9.0), probe_row("bn", 0, 2, 0.5),
        probe_row("bn", 0, 4, 1.5, test_acc=0.95),
        probe_row("bn", 1, 0, 9.0), probe_row("bn", 1, 2, 2.0),
        {"unit": "bn-seed1", "norm": "bn", "seed": 1, "step": 4, "diverged": True},
        {"unit": "noisy-seed0", "norm": "noisy", "seed": 0, "step": 0, "diverged": True},
    ]


def test_analyze_by_hand():
    config = SmoothnessConfig(steps=4, eval_every=2, seeds=2)
    s = section.analyze(_rows(), config)
    assert s["norms"] == ["none", "bn", "noisy"] and s["steps"] == [0, 2, 4]
    plain, bn, noisy = (s["variants"][n] for n in s["norms"])
    # plain: per-seed means after step 0 are 2 and 4: mean 3, sd sqrt(2), half-width T1
    assert plain["loss_range"]["mean"] == pytest.approx(3.0)
    assert plain["loss_range"]["low"] == pytest.approx(3.0 - T1)
    assert plain["grad_change"]["mean"] == pytest.approx(30.0)
    assert plain["beta"]["high"] == pytest.approx(4.0 + T1)
    assert plain["final_test_acc"]["mean"] == pytest.approx(0.85)
    assert (plain["n"], plain["diverged"]) == (2, 0)
    # BN: seed 0 (0.5 + 1.5) / 2 = 1, seed 1 only its step-2 value 2: mean 1.5, sd 1/sqrt(2)
    assert bn["loss_range"]["mean"] == pytest.approx(1.5)
    assert bn["loss_range"]["high"] == pytest.approx(1.5 + T1 * 0.5)
    assert bn["final_test_acc"]["mean"] == pytest.approx((0.95 + 0.1) / 2)  # diverged: chance
    assert (bn["n"], bn["diverged"]) == (2, 1)
    assert noisy["loss_range"] is None and noisy["final_test_acc"]["mean"] == pytest.approx(0.1)
    # curves: geometric means over seeds per checkpoint, a diverged seed left out
    assert s["curves"]["none"]["loss_range"]["mean"] == pytest.approx([9.0, 3 ** 0.5, 15 ** 0.5])
    assert s["curves"]["bn"]["loss_range"]["mean"] == pytest.approx([9.0, 1.0, 1.5])
    assert s["curves"]["noisy"]["beta"]["mean"] == [None, None, None]


def test_report_text_tables_and_figures():
    s = json.loads(json.dumps(section.analyze(_rows(), SmoothnessConfig(steps=4, eval_every=2)),
                              allow_nan=False))
    lines = section.measured(s)
    assert "loss range along -g 1.50 vs 3.00 (smaller, intervals overlap)" in lines[0]
    assert "Final test accuracy: plain FC 85.00% (n=2), FC + BN 52.50% (n=2)" in lines[1]
    assert "FC + BN: 1 of 2 runs diverged" in lines[2] and "FC + noisy BN: 1 of 1" in lines[3]
    (header, rows), = section.tables(s)
    assert len(header) == len(rows[0]) == 7
    assert rows[2][:4] == ["FC + noisy BN", 1, "10.00%", "-"]
    fig = section.figures(s)["smoothness"]
    axes = fig.get_axes()
    assert len(axes) == 3 and all(ax.get_yscale() == "log" for ax in axes)
    assert all(len(ax.get_legend().get_texts()) == 3 for ax in axes)
    assert axes[0].get_shared_x_axes().joined(axes[0], axes[2])


# -- runs ---------------------------------------------------------------------------------
def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Interrupted inside a noisy-BN unit, past its step-4 checkpoint: the resumed unit
    must draw the noise it would have drawn (the generators travel in the checkpoint)."""
    config = SmoothnessConfig(seeds=1, steps=8, eval_every=2, width=8, depth=2,
                              norms=("none", "noisy"))
    run_experiment(config, tmp_path / "full")

    def stop(done, _total, _note):
        if done == 8 + 5:  # the plain unit, then step 5 of the noisy one
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "cut", progress=Progress(stop))
    full = (tmp_path / "full" / "metrics.jsonl").read_text()
    cut = (tmp_path / "cut" / "metrics.jsonl").read_text()
    assert full.startswith(cut) and cut.count("\n") == 6 + 3  # plain done; noisy at 0, 2, 4
    run_experiment(None, tmp_path / "cut", resume=True)
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == full


def test_end_to_end_on_digits_and_resume_of_a_finished_run(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "smoothness", "--dataset", "digits", "--seeds", "1", "--steps", "4",
                 "--eval-every", "2", "--width", "8", "--depth", "1", "--out", str(out)]) == 0
    assert "Final test accuracy" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["unit"] for r in rows] == [u for u in ("none-seed0", "bn-seed0", "noisy-seed0")
                                         for _ in range(4)]
    assert [r.get("step") for r in rows[:4]] == [0, 2, 4, None] and rows[3]["done"] is True
    assert "test_acc" in rows[2] and "test_acc" not in rows[1]
    for name in ("config.json", "summary.json", "report.html", "figures/smoothness.png"):
        assert (out / name).is_file()
    before = (out / "metrics.jsonl").read_bytes()
    assert main(["run", "smoothness", "--resume", str(out)]) == 0
    assert (out / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("cut_at", [1, 3])
def test_resume_from_the_step_0_checkpoint_records_step_0_once(tmp_path, cut_at):
    config = SmoothnessConfig(seeds=1, steps=4, eval_every=2, width=8, depth=1, norms=("none",))
    run_experiment(config, tmp_path / "full")

    def stop(done, _total, _note):
        if done == cut_at:  # after the step-0 probe was saved, before the step-2 one
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "cut", progress=Progress(stop))
    run_experiment(None, tmp_path / "cut", resume=True)
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == \
        (tmp_path / "full" / "metrics.jsonl").read_text()
