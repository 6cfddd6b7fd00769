"""Report sections of the per-epoch experiments: regularization, init-sweep and lr-sweep.

Each ``analyze`` is checked on hand-made rows whose answers are worked out here; each
experiment runs once end to end through the command line on tiny settings.
"""

import json

import pytest

from bnlab.cli import main
from bnlab.lab.experiment_configs import InitSweepConfig, LrSweepConfig, RegularizationConfig
from bnlab.report.sections import regularization, sweeps

T975_1 = 12.706204736174707  # Student t, 97.5% quantile, 1 degree of freedom


def _rows(fields: dict, per_epoch: int, curve: list[dict], diverged_at: int | None = None) -> list[dict]:
    """One unit's rows as fit writes them (no "done" row: the report drops it)."""
    key = "-".join(f"{v}" if k == "norm" else f"{k}{v}" for k, v in fields.items())
    rows = [{"unit": key, "config": "x", **fields, "step": e * per_epoch, "epoch": e, **m}
            for e, m in enumerate(curve, 1)]
    if diverged_at is not None:
        rows.append({"unit": key, "config": "x", **fields, "step": diverged_at * per_epoch,
                     "epoch": diverged_at, "diverged": True})
    return rows


def _acc(train: float, test: float, train_loss: float = 0.5, test_loss: float = 1.0) -> dict:
    return {"train_loss": train_loss, "train_acc": train, "test_loss": test_loss, "test_acc": test}


# -- regularization -------------------------------------------------------------------------
def _regularization_rows() -> list[dict]:
    def u(norm, seed, *curve, **kw):
        return _rows({"norm": norm, "seed": seed}, 15, list(curve), **kw)

    return (u("none", 0, _acc(0.6, 0.5), _acc(0.9, 0.7)) + u("none", 1, _acc(0.6, 0.5), _acc(0.8, 0.7))
            + u("bn", 0, _acc(0.9, 0.82), _acc(1.0, 0.8)) + u("bn", 1, _acc(0.9, 0.7), _acc(1.0, 0.76))
            + u("full-batch", 0, _acc(0.9, 0.7), _acc(1.0, 0.75))
            + u("full-batch", 1, _acc(0.9, 0.7), _acc(1.0, 0.75))
            + u("ghost-4", 0, _acc(0.9, 0.7), _acc(0.95, 0.79))
            + u("ghost-4", 1, _acc(0.9, 0.7), _acc(0.95, 0.79))
            + u("ghost-2", 0, _acc(0.5, 0.4), diverged_at=2)  # at chance from epoch 2
            + u("ghost-2", 1, _acc(0.5, 0.4), _acc(0.55, 0.5, train_loss=1.25, test_loss=1.5)))


def test_regularization_analyze_on_hand_made_rows():
    config = RegularizationConfig(epochs=2, seeds=2,
                                  norms=("none", "bn", "ghost-4", "ghost-2", "full-batch"))
    s = regularization.analyze(_regularization_rows(), config)
    v = s["variants"]
    assert s["norms"] == ["none", "bn", "ghost-4", "ghost-2", "full-batch"]
    assert s["ghosts"] == ["ghost-2", "ghost-4"]  # by virtual batch size, not config order
    assert v["none"]["final_test_acc"]["mean"] == pytest.approx(0.7)
    assert v["none"]["final_train_acc"]["mean"] == pytest.approx(0.85)
    assert v["none"]["final_gap"]["mean"] == pytest.approx((0.2 + 0.1) / 2)
    # gaps 0.2 and 0.1: sd = 0.1 / sqrt(2), half-width = t * sd / sqrt(2) = t * 0.05
    assert v["none"]["final_gap"]["high"] == pytest.approx(0.15 + T975_1 * 0.05)
    assert v["bn"]["final_test_acc"]["mean"] == pytest.approx(0.78)
    assert v["bn"]["best_test_acc"]["mean"] == pytest.approx((0.82 + 0.76) / 2)
    assert v["bn"]["final_gap"]["mean"] == pytest.approx((0.2 + 0.24) / 2)
    # the diverged seed counts at chance (0.1) and has no final loss
    assert v["ghost-2"]["diverged"] == 1 and v["ghost-2"]["n"] == 2
    assert v["ghost-2"]["final_test_acc"]["mean"] == pytest.approx((0.1 + 0.5) / 2)
    assert v["ghost-2"]["final_loss_gap"]["mean"] == pytest.approx(1.5 - 1.25)
    assert v["ghost-2"]["final_loss_gap"]["n"] == 1
    assert s["best_ghost"] == "ghost-4"
    assert s["bn_gain"] == pytest.approx(0.78 - 0.7)
    assert s["noise_share"] == pytest.approx((0.78 - 0.75) / (0.78 - 0.7))  # 0.375
    assert s["curves"]["bn"]["test_acc"]["mean"] == pytest.approx([(0.82 + 0.7) / 2, 0.78])
    json.dumps(s, allow_nan=False)
    lines = regularization.measured(s)
    assert "plain FC 70.00%" in lines[0] and "FC + full-batch BN (no batch noise) 75.00%" in lines[0]
    assert any("best: FC + ghost BN (4)" in line for line in lines)
    assert any("batch noise explains" in line and "38%" in line for line in lines)
    assert any(line.startswith("FC + ghost BN (2): 1 of 2 runs diverged") for line in lines)
    (header, rows), = regularization.tables(s)
    assert [r[0] for r in rows] == ["plain FC", "FC + BN", "FC + ghost BN (4)", "FC + ghost BN (2)",
                                    "FC + full-batch BN"]
    assert rows[0][header.index("final test acc [95% CI]")] == "70.00% [70.00, 70.00]"


def test_regularization_without_a_gain_explains_nothing():
    rows = [r for r in _regularization_rows() if r["norm"] in ("none", "bn")]
    for r in rows:
        if r["norm"] == "bn" and r["epoch"] == 2:
            r["test_acc"] = 0.65
    s = regularization.analyze(rows, RegularizationConfig(epochs=2, seeds=2, norms=("none", "bn")))
    assert s["bn_gain"] == pytest.approx(-0.05) and s["noise_share"] is None
    assert s["ghosts"] == [] and s["best_ghost"] is None
    assert any("did not beat plain FC" in line and "-5.00 points" in line
               for line in regularization.measured(s))


def test_ghost_colours_are_one_graded_family():
    cs = regularization.colors(["none", "bn", "ghost-2", "ghost-8", "ghost-32"])
    ghosts = [cs[g] for g in ("ghost-2", "ghost-8", "ghost-32")]
    assert len(set(ghosts)) == 3 and cs["none"] not in ghosts and cs["bn"] not in ghosts
    brightness = [sum(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in ghosts]
    assert brightness == sorted(brightness, reverse=True)  # darker as K grows


# -- init-sweep ----------------------------------------------------------------------------
def _sweep_rows(key: str, metric: str, per_epoch: int, curves: dict) -> list[dict]:
    """``curves[(value, norm, seed)]`` = accuracies per epoch, or ("diverged", epoch, accs)."""
    rows = []
    for (value, norm, seed), c in curves.items():
        fields = {key: value, "norm": norm, "seed": seed}
        if c[0] == "diverged":
            rows += _rows(fields, per_epoch, [{metric: a} for a in c[2]], diverged_at=c[1])
        else:
            rows += _rows(fields, per_epoch, [{metric: a} for a in c])
    return rows


def test_init_sweep_analyze_on_hand_made_rows():
    config = InitSweepConfig(scales=(1.0, 0.1, 0.01), seeds=2, epochs=2, learned_threshold=0.5)
    rows = _sweep_rows("init_scale", "train_acc", 10, {
        (1.0, "none", 0): ("diverged", 1, []), (1.0, "none", 1): ("diverged", 1, []),
        (1.0, "bn", 0): [0.3, 0.5], (1.0, "bn", 1): [0.3, 0.7],
        (0.1, "none", 0): [0.4, 0.6], (0.1, "none", 1): [0.4, 0.5],
        (0.1, "bn", 0): [0.8, 0.9], (0.1, "bn", 1): [0.8, 0.9],
        (0.01, "none", 0): [0.2, 0.2], (0.01, "none", 1): [0.2, 0.15],
        (0.01, "bn", 0): [0.3, 0.45], (0.01, "bn", 1): [0.3, 0.5]})
    s = sweeps.analyze(rows, config)
    assert s["kind"] == "init-sweep" and s["steps_per_epoch"] == 10
    assert s["values"] == [1.0, 0.1, 0.01] and s["norms"] == ["none", "bn"]
    plain_1 = s["points"][0]["none"]
    assert plain_1["diverged"] == 2 and plain_1["final"]["mean"] == pytest.approx(0.1)  # chance
    assert s["points"][0]["bn"]["final"]["mean"] == pytest.approx(0.6)
    assert s["points"][2]["bn"]["final"]["mean"] == pytest.approx(0.475)  # below 0.5: no
    assert s["learns"] == {"none": [0.1], "bn": [1.0, 0.1]}  # mean 0.55 and 0.6 count
    assert s["curves"][1]["none"]["mean"] == pytest.approx([0.4, 0.55])
    json.dumps(s, allow_nan=False)
    assert sweeps.title(s).startswith("init-sweep")
    assert "Deep Learning from Scratch" in sweeps.expected(s)
    lines = sweeps.measured(s)
    assert lines[0] == ("Mean final training accuracy >= 50% at 1 of 3 scales with plain FC and "
                        "2 of 3 scales with FC + BN.")
    assert "FC + BN learns at weight std 1 to 0.1." in lines
    assert any(line.startswith("plain FC: 2 of 6 runs diverged") and "weight std 1;" in line
               for line in lines)
    assert ("plain FC stays near chance (mean final accuracy below 20%) without diverging at "
            "weight std 0.01." in lines)  # 0.175; the diverged scale is counted apart
    (header, table), = sweeps.tables(s)
    assert header == ["weight std", "plain FC final train acc", "FC + BN final train acc"]
    # BN at std 1: 0.5 and 0.7, half-width t * 0.1 > 0.6: the interval is clipped to [0, 100]%
    assert table[0] == ["1", "10.00% [10.00, 10.00], 2 of 2 diverged", "60.00% [0.00, 100.00]"]


def test_spans_names_runs_of_consecutive_values():
    values = [1.0, 0.5, 0.25, 0.125, 0.0625]
    assert sweeps.spans(values, [1.0, 0.5, 0.125]) == "1 to 0.5, 0.125"
    assert sweeps.spans(values, []) == "none"


# -- lr-sweep ------------------------------------------------------------------------------
def _lr_summary() -> dict:
    config = LrSweepConfig(lrs=(0.01, 0.1, 1.0), seeds=2, epochs=3, threshold=0.9)
    rows = _sweep_rows("lr", "test_acc", 5, {
        (0.01, "none", 0): [0.5, 0.6, 0.7], (0.01, "none", 1): [0.5, 0.6, 0.7],
        (0.01, "bn", 0): [0.9, 0.92, 0.93], (0.01, "bn", 1): [0.8, 0.91, 0.93],
        (0.1, "none", 0): [0.5, 0.8, 0.95], (0.1, "none", 1): [0.91, 0.92, 0.93],
        (0.1, "bn", 0): [0.95, 0.96, 0.97], (0.1, "bn", 1): [0.95, 0.96, 0.97],
        (1.0, "none", 0): [0.5, 0.8, 0.9], (1.0, "none", 1): [0.5, 0.8, 0.85],
        (1.0, "bn", 0): ("diverged", 2, [0.92]), (1.0, "bn", 1): [0.95, 0.96, 0.97]})
    return sweeps.analyze(rows, config)


def test_lr_sweep_analyze_on_hand_made_rows():
    s = _lr_summary()
    assert s["kind"] == "lr-sweep" and s["steps_per_epoch"] == 5
    p = s["points"]
    assert p[0]["none"]["missed"] == 2 and p[0]["none"]["steps"] is None
    assert p[0]["bn"]["epochs_to_threshold"] == [1, 2] and p[0]["bn"]["steps"] == 7.5
    assert p[1]["none"]["epochs_to_threshold"] == [3, 1] and p[1]["none"]["steps"] == 10  # (15+5)/2
    assert p[1]["bn"]["steps"] == 5
    assert p[2]["none"]["missed"] == 1 and p[2]["none"]["steps"] is None
    # the diverged seed reached 90% before diverging; afterwards it is at chance
    assert p[2]["bn"]["diverged"] == 1 and p[2]["bn"]["steps"] == 5
    assert p[2]["bn"]["final"]["mean"] == pytest.approx((0.1 + 0.97) / 2)
    assert s["reaches"] == {"none": [0.1], "bn": [0.01, 0.1, 1.0]}
    assert s["step_ratio"] == {"bn": 2.0}  # 10 / 5 at lr 0.1, the only lr both reach
    json.dumps(s, allow_nan=False)
    assert sweeps.title(s).startswith("lr-sweep") and "Ioffe" in sweeps.expected(s)
    lines = sweeps.measured(s)
    assert lines[0] == ("Every seed reached 90% test accuracy at 1 of 3 learning rates with "
                        "plain FC (lr 0.1) and 3 of 3 learning rates with FC + BN (lr 0.01 to 1).")
    assert "Where both reach it (lr 0.1), plain FC needs 2.0x the steps of FC + BN on average." in lines
    assert ("Best mean final test accuracy: plain FC 94.00% at lr 0.1; FC + BN 97.00% at lr 0.1."
            in lines)
    (header, table), = sweeps.tables(s)
    assert header[3:] == ["plain FC steps to 90%", "FC + BN steps to 90%"]
    assert [r[3] for r in table] == ["not reached by 2 of 2", "10", "not reached by 1 of 2"]
    assert [r[4] for r in table] == ["8", "5", "5"]


def test_lr_sweep_figure_marks_thresholds_not_reached():
    s = _lr_summary()
    ax = sweeps.plot_steps(s)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "plain FC: not reached (k/n seeds missed)" in legend
    assert sorted(t.get_text() for t in ax.texts) == ["1/2", "2/2"]
    assert set(sweeps.figures(s)) == {"lr_sweep"}


def test_init_sweep_panels_share_their_y_axis():
    config = InitSweepConfig(scales=(1.0, 0.1, 0.01, 0.001, 0.0001), seeds=1, epochs=2)
    rows = _sweep_rows("init_scale", "train_acc", 10, {
        (v, n, 0): [0.2, 0.6] for v in config.scales for n in ("none", "bn")})
    figs = sweeps.figures(sweeps.analyze(rows, config))
    assert set(figs) == {"init_sweep"}
    panels = [a for a in figs["init_sweep"].axes if a.get_visible() and a.axison]
    assert len(panels) == 5 and all(a.get_shared_y_axes().joined(panels[0], a) for a in panels)


# -- end to end ----------------------------------------------------------------------------
TINY = {
    "regularization": ["--dataset", "digits", "--n-train", "192", "--epochs", "2", "--width", "16",
                       "--norms", "none,bn,ghost-4,full-batch,population"],
    "init-sweep": ["--dataset", "digits", "--n-train", "200", "--epochs", "2", "--scales", "1,0.01",
                   "--width", "16", "--depth", "2"],
    "lr-sweep": ["--epochs", "2", "--lrs", "0.01,1,100", "--width", "16", "--depth", "2"],
}
FIGURES = {"regularization": {"regularization.png"}, "init-sweep": {"init_sweep.png"},
           "lr-sweep": {"lr_sweep.png"}}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_end_to_end_and_resume_changes_nothing(name, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", name, *TINY[name], "--seeds", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"] == name and config["seeds"] == 1
    metrics = (out / "metrics.jsonl").read_bytes()
    rows = [json.loads(line) for line in metrics.splitlines()]
    units = {r["unit"] for r in rows}
    assert {r["unit"] for r in rows if r.get("done")} == units
    swept = {"init-sweep": 2, "lr-sweep": 3}.get(name, 1)
    assert len(units) == swept * len(config["norms"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == name and summary["measured"] and summary["expected"]
    assert {p.name for p in (out / "figures").iterdir()} == FIGURES[name]
    page = (out / "report.html").read_text()
    assert "expected (literature)" in page and page.count("data:image/png;base64,") == len(FIGURES[name])
    assert main(["run", name, "--resume", str(out)]) == 0
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert json.loads((out / "summary.json").read_text())["measured"] == summary["measured"]
