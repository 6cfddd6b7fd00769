"""Statistics over seeds and the plain-language verdict, on curves with known answers."""

import numpy as np
import pytest

from bnlab.report import first_reaching, mean_interval, summarize_compare
from bnlab.report.build import verdict


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


def _curves(test, train=None):
    test = np.asarray(test, dtype=float)
    train = test + 0.01 if train is None else np.asarray(train, dtype=float)
    return {"test_acc": test, "train_acc": train, "test_loss": 1 - test, "train_loss": 1 - train}


def test_summary_epochs_to_target_and_milestones():
    epochs = np.arange(1, 101)
    plain = np.stack([1 - np.exp(-epochs / 40) + d for d in (0.0, 0.01, -0.01)])  # slow
    bn = np.stack([1 - np.exp(-epochs / 8) + d for d in (0.0, 0.01, -0.01)])  # 5x faster
    s = summarize_compare({"none": _curves(plain), "bn": _curves(bn)})
    target = s["epochs_to_target"]
    assert target["target_test_acc"] == pytest.approx(1 - np.exp(-100 / 40))
    assert target["variants"]["bn"]["epoch"] == 20  # 100 / 5
    assert target["variants"]["bn"]["ratio"] == pytest.approx(5.0)
    assert [m["baseline_epoch"] for m in s["milestones"]] == [10, 25, 50, 100]
    assert [m["epochs"]["bn"] for m in s["milestones"]] == [2, 5, 10, 20]
    lines = verdict(s)
    assert "at epoch 20, 5.0× fewer epochs" in lines[0]
    assert "holds: the 95% intervals do not overlap" in lines[1]


def test_verdict_says_when_the_claim_fails():
    epochs = np.arange(1, 21)
    plain = np.stack([0.9 - 0.5 * np.exp(-epochs / 3) + d for d in (0.0, 0.002)])
    bn = np.stack([0.85 - 0.3 * np.exp(-epochs) + d for d in (0.0, 0.002)])  # fast but lower
    s = summarize_compare({"none": _curves(plain), "bn": _curves(bn)})
    assert s["epochs_to_target"]["variants"]["bn"]["epoch"] is None
    lines = verdict(s)
    assert lines[0].startswith("Faster convergence: NOT observed")
    assert "NOT observed: BN's mean is not higher" in lines[1]
