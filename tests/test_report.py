"""Statistics over seeds and the compare section, on hand-made rows with known answers."""

import json

import pytest

from bnlab.lab.experiment_configs import CompareConfig
from bnlab.report import first_reaching, mean_interval
from bnlab.report.sections import compare


def test_mean_interval_matches_the_t_distribution():
    iv = mean_interval([1.0, 2.0, 3.0, 4.0])
    # t(0.975, 3) = 3.1824463; sd = 1.2909944; half-width = t * sd / 2
    assert iv.mean == 2.5 and iv.n == 4
    assert iv.high - iv.mean == pytest.approx(3.1824463 * 1.2909944 / 2, rel=1e-6)
    one = mean_interval([0.7])
    assert one.low == one.high == 0.7 and one.n == 1
    with pytest.raises(ValueError, match="non-empty 1-D"):
        mean_interval([])


def test_first_reaching_is_one_based():
    assert first_reaching([0.1, 0.5, 0.9, 0.95], 0.9) == 3
    assert first_reaching([0.1, 0.2], 0.9) is None


def rows_of(norm, seed, test_accs, diverged_at=None):
    """Rows as a finished compare unit writes them (train accuracy 0.1 above test)."""
    out = []
    for e, acc in enumerate(test_accs, 1):
        if diverged_at == e:
            out.append({"unit": f"{norm}-seed{seed}", "norm": norm, "seed": seed, "epoch": e,
                        "step": 10 * e, "diverged": True})
            break
        out.append({"unit": f"{norm}-seed{seed}", "norm": norm, "seed": seed, "epoch": e,
                    "step": 10 * e, "sgd_loss": 1.0, "train_loss": 1.0, "test_loss": 1.0,
                    "train_acc": acc + 0.1, "test_acc": acc})
    return out


CONFIG = CompareConfig(epochs=4, seeds=2)


def test_epochs_to_target_milestones_and_verdict():
    rows = (rows_of("none", 0, [0.2, 0.4, 0.5, 0.6]) + rows_of("bn", 0, [0.5, 0.7, 0.8, 0.8])
            + rows_of("none", 1, [0.2, 0.4, 0.6, 0.8]) + rows_of("bn", 1, [0.5, 0.7, 0.8, 0.9]))
    s = json.loads(json.dumps(compare.analyze(rows, CONFIG), allow_nan=False))
    # plain's mean final = (0.6 + 0.8) / 2 = 0.7; BN's mean curve 0.5, 0.7, 0.8, 0.85 first
    # reaches it at epoch 2: 4 / 2 = 2x. Per seed: seed 0 BN reaches 0.6 at 2, seed 1 0.8 at 3.
    t = s["epochs_to_target"]
    assert t["target_test_acc"] == pytest.approx(0.7)
    assert t["variants"]["bn"]["epoch"] == 2 and t["variants"]["bn"]["ratio"] == 2.0
    assert t["variants"]["bn"]["per_seed_epochs"] == [2, 3]
    assert s["variants"]["bn"]["final_test_acc"]["mean"] == pytest.approx(0.85)
    assert s["variants"]["none"]["final_gap"]["mean"] == pytest.approx(0.1)
    # milestones: only the last horizon (4) fits the run; plain's mean there is 0.7
    assert [(m["baseline_epoch"], m["epochs"]["bn"]) for m in s["milestones"]] == [(4, 2)]
    lines = compare.measured(s)
    assert "at epoch 2, 2.0x fewer epochs" in lines[0]
    assert "higher on average, but the 95% intervals overlap" in lines[1]
    assert compare.tables(s)[0][1][0][:2] == ["plain FC", 2]
    assert set(compare.figures(s)) == {"accuracy", "loss"}


def test_a_diverged_seed_is_counted_at_chance_and_no_speed_up_is_claimed():
    rows = (rows_of("none", 0, [0.2, 0.4, 0.5, 0.6]) + rows_of("bn", 0, [0.5, 0.7, 0.8, 0.8])
            + rows_of("none", 1, [0.2, 0.4, 0.6, 0.8]) + rows_of("bn", 1, [0.5, 0.7, 0.8, 0.9], diverged_at=3))
    s = json.loads(json.dumps(compare.analyze(rows, CONFIG), allow_nan=False))
    bn = s["variants"]["bn"]
    assert bn["diverged"] == 1 and bn["n"] == 2
    assert bn["final_test_acc"]["mean"] == pytest.approx((0.8 + 0.1) / 2)  # chance after divergence
    assert s["curves"]["bn"]["test_loss"]["n"] == 2  # the band says n; NaN losses are left out
    lines = compare.measured(s)
    assert lines[0].startswith("Not assessed: 1 of 2 BN") and not any("fewer" in x for x in lines)
    compare.figures(s)


def test_a_plain_network_at_chance_gives_no_verdict():
    rows = rows_of("none", 0, [0.1, 0.1]) + rows_of("bn", 0, [0.5, 0.9])
    s = compare.analyze(rows, CompareConfig(epochs=2, seeds=1))
    assert compare.measured(s)[0].startswith("Not assessed: the plain network stayed near chance")


def test_a_unit_missing_epochs_is_damage_not_data():
    rows = rows_of("none", 0, [0.2, 0.4])[:1] + rows_of("bn", 0, [0.5, 0.9])
    with pytest.raises(ValueError, match="without a row for every epoch"):
        compare.analyze(rows, CompareConfig(epochs=2, seeds=1))


def test_the_t_table_is_scipys_to_the_last_bit():
    import numpy as np
    from scipy import stats as scipy_stats

    from bnlab.report import stats

    df = np.arange(1, 101)
    assert np.array_equal(stats.t_quantile(0.5 + 0.95 / 2, df), scipy_stats.t.ppf(0.975, df))
    assert np.array_equal(stats.t_quantile(0.975, np.array([3, 100, 1, 250])),
                          scipy_stats.t.ppf(0.975, [3, 100, 1, 250]))  # past the table
    assert np.array_equal(stats.t_quantile(0.95, df), scipy_stats.t.ppf(0.95, df))
