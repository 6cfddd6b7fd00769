"""bnlab noise and ics: the measurements on known cases, the analyses on hand-made rows, and
each experiment end to end on digits."""

import json

import numpy as np
import pytest
import torch

from bnlab.cli import main
from bnlab.lab.experiment_configs import IcsConfig, NoiseConfig
from bnlab.lab.runner import run_experiment
from bnlab.lab.experiments.noise import batch_noise
from bnlab.lab.train import Progress
from bnlab.report.sections import ics, noise
from bnlab.report.sections.noise import fit_slope

T_975_1 = 12.706204736  # Student t, 97.5th percentile, 1 degree of freedom


# -- noise: measurement -------------------------------------------------------------------
def test_batch_noise_follows_one_over_sqrt_m_on_gaussian_data():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 4, generator=gen, dtype=torch.float64) * 3 + 10
    rows = list(batch_noise(z, [4, 16, 64, 256], 400, gen))
    m = [r["m"] for r in rows]
    assert m == [4, 16, 64, 256]
    assert abs(fit_slope(m, [r["mean_err"] for r in rows]) + 0.5) < 0.06
    assert abs(fit_slope(m, [r["var_rel_err"] for r in rows]) + 0.5) < 0.12  # -1/2 for m >> 1
    for row in rows:
        assert row["mean_err"] == pytest.approx(row["mean_err_theory"], rel=0.15)
        assert row["live_features"] == 4
    assert rows[-1]["within3"] > 0.99


def test_batch_noise_ignores_constant_features():
    z = torch.cat([torch.randn(500, 2), torch.zeros(500, 1)], dim=1)
    rows = list(batch_noise(z, [4, 16], 50, torch.Generator().manual_seed(1)))
    assert [r["live_features"] for r in rows] == [2, 2]
    assert all(np.isfinite(r["mean_err"]) for r in rows)


def test_fit_slope_is_the_log_log_slope():
    assert fit_slope([1, 4, 16], [1.0, 0.5, 0.25]) == pytest.approx(-0.5)
    assert fit_slope([2, 4, 8], [3.0, 3.0, 3.0]) == pytest.approx(0.0)


# -- noise: analysis ----------------------------------------------------------------------
def _noise_rows():
    """Two seeds, two feature sets, m = 4, 16, 64. mean_err = 1/sqrt(m) (slope -1/2 for both
    seeds); var_rel_err = 1/m for seed 0 (slope -1) and 0.5 for seed 1 (slope 0)."""
    rows = []
    for seed in (0, 1):
        for name in ("inputs", "layer 1 pre-BN, init"):
            for m in (4, 16, 64):
                rows.append({"unit": f"seed{seed}", "seed": seed, "set": name, "m": m,
                             "mean_err": m ** -0.5, "mean_err_theory": m ** -0.5 * 0.9,
                             "var_rel_err": 1 / m if seed == 0 else 0.5,
                             "probe_xhat_sd": 2 * m ** -0.25, "within3": 0.99 - 0.02 * seed,
                             "live_features": 7})
        rows.append({"unit": f"seed{seed}", "seed": seed, "feature": 3 + seed,
                     "population_mean": 10.0, "batch_means": [10.1, 9.9], "m": 16})
    return rows


def test_noise_analysis_on_hand_made_rows():
    s = noise.analyze(_noise_rows(), NoiseConfig(dataset="digits", batch_sizes=(4, 16, 64)))
    json.dumps(s, allow_nan=False)
    assert s["sets"] == ["inputs", "layer 1 pre-BN, init"] and s["batch_sizes"] == [4, 16, 64]
    assert s["theory"] == pytest.approx([0.45, 0.225, 0.1125]) and s["near_m"] == 64
    slopes = s["slopes"]["inputs"]
    assert slopes["mean_err"]["mean"] == pytest.approx(-0.5)
    assert slopes["mean_err"]["low"] == pytest.approx(-0.5)  # both seeds agree: no width
    assert slopes["probe_xhat_sd"]["mean"] == pytest.approx(-0.25)
    # slopes -1 and 0: mean -1/2, SD sqrt(1/2), half-width t * SD / sqrt(2) = t / 2
    v = slopes["var_rel_err"]
    assert (v["mean"], v["low"], v["high"]) == pytest.approx((-0.5, -0.5 - T_975_1 / 2,
                                                              -0.5 + T_975_1 / 2))
    assert s["within3"]["inputs"]["mean"] == pytest.approx(0.98)
    assert s["inputs"]["mean_err"][1]["mean"] == pytest.approx(0.25)
    assert s["example"] == {"feature": 3, "population_mean": 10.0, "batch_means": [10.1, 9.9], "m": 16}
    lines = noise.measured(s)
    assert ("raw inputs (theory: -0.5 for both): mu_B's error -0.500 [-0.500, -0.500] (its "
            "interval holds -0.5); var_B's relative error -0.500 [" in lines[0])
    assert lines[0].endswith("(n=2 seeds).")
    assert "mu_B's error for all 2 feature sets (mean over seeds): -0.500 to -0.500" in lines[1]
    assert "feature 3 has population mean 10.00; two random mini-batches of 16 gave 10.10 and 9.90" in lines[3]
    (head, by_set), (_, per_m) = noise.tables(s)
    assert [r[0] for r in by_set] == s["sets"] and per_m[0][:3] == [4, 2, "0.450"]
    assert len(noise.figures(s)["noise"].axes) == 4  # three quantities and the legend


def test_noise_verdict_states_both_slopes_against_theory():
    iv = lambda mean, low, high: {"mean": mean, "low": low, "high": high, "n": 10}  # noqa: E731
    s = {"slopes": {"inputs": {"mean_err": iv(-0.502, -0.504, -0.5),
                               "var_rel_err": iv(-0.373, -0.388, -0.358)}},
         "var_tail": {"from_m": 64, "slope": iv(-0.465, -0.483, -0.447)}}
    line, = noise.verdict(s)
    assert "mu_B's error -0.502 [-0.504, -0.500] (its interval holds -0.5)" in line
    assert ("var_B's relative error -0.373 [-0.388, -0.358] (shallower than -0.5: its interval "
            "lies above)") in line
    assert "-0.465 [-0.483, -0.447] for m >= 64" in line and "(n=10 seeds)" in line
    s["slopes"]["inputs"]["var_rel_err"] = iv(-0.62, -0.66, -0.58)
    assert "(steeper than -0.5: its interval lies below)" in noise.verdict(s)[0]


# -- ics: analysis ------------------------------------------------------------------------
def _ics_unit(norm, seed, acc, p15, p50, p85, diverged_at=None):
    """Rows of one unit: evaluations at steps 10, 20, 30 (two hidden units each)."""
    rows = [{"unit": f"{norm}-seed{seed}", "norm": norm, "seed": seed, "step": 10 * (i + 1),
             "test_acc": acc[i], "p15": p15[i], "p50": p50[i], "p85": p85[i]} for i in range(len(acc))]
    if diverged_at is not None:
        rows.append({"unit": f"{norm}-seed{seed}", "norm": norm, "seed": seed, "step": diverged_at,
                     "diverged": True})
    return rows


def _ics_rows():
    # unit 0: spread 2 throughout; unit 1: median still, spread 2, 4, 2 (mean 8/3, ptp 2)
    p15, p85 = [[-1, 0]] * 3, [[1, 2], [1, 4], [1, 2]]
    return (_ics_unit("none", 0, [0.5, 0.6, 0.7], p15, [[0, 1], [1, 1], [0.5, 1]], p85)
            + _ics_unit("none", 1, [0.3, 0.6, 0.9], p15, [[0, 1], [0.5, 1], [0.5, 1]], p85)
            + _ics_unit("bn", 0, [0.8, 0.85, 0.9], p15, [[0, 1], [0.4, 1], [0, 1]], p85)
            + _ics_unit("bn", 1, [0.2], p15[:1], [[0, 1]], p85[:1], diverged_at=20))


def test_drift_in_units_of_the_spread():
    p15, p85 = np.array([[-1, 0]] * 3), np.array([[1, 2], [1, 4], [1, 2]])
    med, spread = ics.drift(p15, np.array([[0, 1], [1, 1], [0.5, 1]]), p85)
    assert med == pytest.approx((1 / 2 + 0) / 2)  # unit 0: median moves 1 in spreads of 2
    assert spread == pytest.approx((0 + 2 / (8 / 3)) / 2)  # unit 1: spread moves 2, mean 8/3


def test_ics_analysis_on_hand_made_rows():
    s = ics.analyze(_ics_rows(), IcsConfig(dataset="digits", steps=30, eval_every=10))
    json.dumps(s, allow_nan=False)
    assert s["norms"] == ["none", "bn"] and s["steps"] == [10, 20, 30]
    assert s["early_steps"] == [10, 30]  # 3 // 5 - 1 = -1: no "a fifth" evaluation
    plain, bn = s["variants"]["none"], s["variants"]["bn"]
    assert s["diverged"] == [["none", 0], ["bn", 1]]  # bn seed 1 is left out
    assert (plain["test_acc"][0]["n"], bn["test_acc"][0]["n"]) == (2, 1)
    assert [a["mean"] for a in plain["test_acc"]] == pytest.approx([0.4, 0.8])
    assert s["curves"]["none"]["mean"] == pytest.approx([0.4, 0.6, 0.8])
    # median drift per seed: (1/2 + 0)/2 and (0.5/2 + 0)/2; bn: (0.4/2 + 0)/2
    assert plain["median_drift"]["mean"] == pytest.approx((0.25 + 0.125) / 2)
    assert plain["spread_drift"]["mean"] == pytest.approx(0.375)
    assert bn["median_drift"]["mean"] == pytest.approx(0.1)
    assert s["neuron"]["none"] == {"seed": 0, "p15": [-1, -1, -1], "p50": [0, 1, 0.5], "p85": [1, 1, 1]}
    lines = ics.measured(s)
    assert lines[0].startswith("Test accuracy after 10 and 30 steps: plain FC 40.00%")
    assert "plain 0.188 vs BN 0.100, 1.9x" in lines[1]
    assert lines[2] == "FC + BN: 1 run(s) diverged (non-finite loss) and are left out."
    header, rows = ics.tables(s)[0]
    assert header[1:3] == ["test acc after 10 steps", "test acc after 30 steps"]
    assert rows[1][0] == "FC + BN" and rows[1][1] == "80.00% (n=1)"
    axes = ics.figures(s)["ics"].axes
    assert len(axes) == 3 and axes[1].get_shared_y_axes().joined(axes[1], axes[2])


# -- end to end ---------------------------------------------------------------------------
def _run_and_resume(argv, out):
    assert main([*argv, "--out", str(out)]) == 0
    metrics = (out / "metrics.jsonl").read_text()
    assert main(["run", argv[1], "--resume", str(out)]) == 0  # finished: nothing to add
    assert (out / "metrics.jsonl").read_text() == metrics
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == argv[1] and summary["measured"] and summary["expected"]
    return [json.loads(line) for line in metrics.splitlines()]


def test_noise_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "r"
    rows = _run_and_resume(["run", "noise", "--dataset", "digits", "--seeds", "1", "--draws", "10",
                            "--epochs", "1", "--batch-sizes", "2,8", "--width", "8", "--depth", "1"], out)
    # (inputs, layer 1 at init, layer 1 trained) x 2 sizes, the example, done
    assert [(r.get("set"), r.get("m")) for r in rows[:6]] == [
        (s, m) for s in ("inputs", "layer 1 pre-BN, init", "layer 1 pre-BN, trained") for m in (2, 8)]
    assert "feature" in rows[6] and rows[7]["done"] and len(rows) == 8
    assert (out / "figures" / "noise.png").is_file()
    # a unit cut after three rows (before its training was saved) is replayed from its start
    text = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text("".join(text.splitlines(keepends=True)[:3]))
    (out / "checkpoints" / "seed0.pt").unlink()
    progress = Progress()
    run_experiment(None, out, resume=True, progress=progress)
    assert (out / "metrics.jsonl").read_text() == text
    assert progress.done == progress.total == 6 + 1297 // 60  # (set, m) rows and training steps
    assert "Slopes against m for the raw inputs" in capsys.readouterr().out


def test_noise_refuses_batch_sizes_beyond_the_training_set(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "noise", "--dataset", "digits", "--batch-sizes", "2,5000", "--out", str(out)]) == 2
    assert "--batch-sizes holds 5000, not less than the training set" in capsys.readouterr().err
    assert not out.exists()


def test_ics_end_to_end_and_resume(tmp_path):
    out = tmp_path / "r"
    rows = _run_and_resume(["run", "ics", "--dataset", "digits", "--seeds", "1", "--steps", "20",
                            "--eval-every", "10", "--probe-size", "20", "--width", "8", "--depth", "2"], out)
    evals = [r for r in rows if not r.get("done")]
    assert [(r["unit"], r["step"]) for r in evals] == [
        ("none-seed0", 10), ("none-seed0", 20), ("bn-seed0", 10), ("bn-seed0", 20)]
    assert all(len(r["p15"]) == 8 and all(a <= b <= c for a, b, c in zip(r["p15"], r["p50"], r["p85"]))
               for r in evals)
    assert all(0 <= r["test_acc"] <= 1 for r in evals)
    assert (out / "figures" / "ics.png").is_file()
