"""The progress line and the work it reports: fixed widths, a time left only once it means
something, steps weighted by their cost, what the kernels' log says while they compile, and
a stream that fails without stopping the work."""

from __future__ import annotations

import errno
import gc
import io
import logging

import pytest

from bnlab.lab import progress as P
from bnlab.lab.experiments import batch_size, noise
from bnlab.lab.experiment_configs import BatchSizeConfig, NoiseConfig
from bnlab.lab.progress import ProgressBar
from bnlab.lab.train import Progress, label


class Tty(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(P.time, "monotonic", c)
    return c


def tty_bar(monkeypatch, columns=80):
    monkeypatch.setenv("COLUMNS", str(columns))
    stream = Tty()
    bar = ProgressBar(stream)
    return bar, stream


def lines(stream):
    return [s.rstrip("\n") for s in stream.getvalue().split("\r") if s.strip()]


def test_the_line_keeps_its_width_and_its_bar_whatever_the_note(monkeypatch, clock):
    bar, stream = tty_bar(monkeypatch, columns=80)
    for done, note in enumerate(["x", "ghost B=2 seed 0", "a much longer note " * 6, "y"], 1):
        clock.now += 1.0
        bar(done, 10, note)
    drawn = lines(stream)
    assert len(drawn) == 4 and {len(s) for s in drawn} == {79}
    assert len({s.index("%") for s in drawn}) == 1  # the fields do not move
    assert len({s.index("]") for s in drawn}) == 1  # nor does the bar's end
    bar.close()


def test_no_time_left_until_the_pace_means_something(monkeypatch, clock):
    bar, stream = tty_bar(monkeypatch)
    bar(0, 1000, "unit")
    clock.now = 1.0
    bar(1, 1000, "unit")  # 1 s and 0.1% in: an estimate would be a guess
    assert "left" not in lines(stream)[-1]
    clock.now = 4.0
    bar(40, 1000, "unit")  # 4 s and 4%: steady enough
    assert "~1:36 left" in lines(stream)[-1]
    bar.close()


def test_a_stopped_process_restarts_the_pace_instead_of_reading_years_left(monkeypatch, clock):
    monkeypatch.setattr(P.time, "process_time", lambda: 0.0)  # stopped: no CPU time passes
    bar, stream = tty_bar(monkeypatch, columns=120)
    for done in range(0, 11):  # 1% a second
        clock.now = float(done)
        bar(done, 1000, "unit")
    assert "~16:30 left" in lines(stream)[-1]
    clock.now += 600.0  # stopped (kill -STOP, a laptop asleep) for ten minutes, then
    bar(11, 1000, "unit")  # one more step: 1 step in 10 minutes is no pace
    assert "left" not in lines(stream)[-1]
    for done in range(12, 52):
        clock.now += 1.0
        bar(done, 1000, "unit")
    assert "~15:49 left" in lines(stream)[-1]  # the pace since the gap: 1 step a second
    bar.close()


def test_slow_steps_and_long_evaluations_are_no_pause(monkeypatch, clock):
    monkeypatch.setattr(P.time, "process_time", clock)  # computing all along
    bar, stream = tty_bar(monkeypatch)
    for done in range(0, 10):  # a step every 100 s
        clock.now = 100.0 * done
        bar(done, 20, "unit")
    assert "~18:20 left" in lines(stream)[-1]  # the pace of the last two minutes' steps
    bar.close()
    bar, stream = tty_bar(monkeypatch)
    for epoch in range(5):  # 100 quick steps, then an evaluation of 35 s, each epoch
        for step in range(100):
            clock.now += 0.01
            bar(epoch * 100 + step + 1, 1000, "unit")
        clock.now += 35.0
    bar(500, 1000, "unit")
    assert "left" in lines(stream)[-1]
    bar.close()


def test_a_compile_pause_is_shown_and_not_counted_in_the_pace(monkeypatch, clock):
    gc.collect()  # bars of other tests left open and since unreachable
    bar, stream = tty_bar(monkeypatch, columns=120)
    log = logging.getLogger(P.KERNELS_LOG)
    bar(0, 100, "bn seed 0")
    log.info("compiling", extra={"progress_status": "compiling BatchNorm kernels"})
    assert "compiling BatchNorm kernels" in lines(stream)[-1]
    clock.now = 60.0  # a minute compiling
    log.info("compiled", extra={"progress_status": ""})
    for done in range(1, 11):
        clock.now += 1.0
        bar(done, 100, "bn seed 0")
    assert "~1:30 left" in lines(stream)[-1]  # 1 step/s since the pause, not 10 in 70 s
    bar.close()
    assert not [h for h in log.handlers if isinstance(h, P._StatusHandler)]


def test_the_bar_keeps_the_kernels_info_off_the_log_and_passes_warnings(monkeypatch, clock,
                                                                        caplog):
    log = logging.getLogger(P.KERNELS_LOG)
    level, propagate = log.level, log.propagate
    gc.collect()  # bars of other tests left open and since unreachable
    for left in list(P._STATUS.bars):
        P._STATUS.detach(left)
    monkeypatch.setattr(log, "level", logging.WARNING)
    bar, _ = tty_bar(monkeypatch)
    with caplog.at_level(logging.WARNING):
        log.info("compiling", extra={"progress_status": "compiling"})
        log.warning("no writable folder to cache the kernels")
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    bar.close()
    assert (log.level, log.propagate) == (logging.WARNING, propagate)
    log.setLevel(level)


def test_bars_that_overlap_leave_the_log_as_they_found_it(monkeypatch, clock):
    log = logging.getLogger(P.KERNELS_LOG)
    gc.collect()
    for left in list(P._STATUS.bars):
        P._STATUS.detach(left)
    before = (log.level, log.propagate, list(log.handlers))
    first, _ = tty_bar(monkeypatch)
    second, stream = tty_bar(monkeypatch)
    first.close()
    log.info("compiling", extra={"progress_status": "compiling BatchNorm kernels"})
    assert "compiling BatchNorm kernels" in lines(stream)[-1]  # the open bar still shows it
    second.close()
    assert (log.level, log.propagate, list(log.handlers)) == before


class Failing(io.StringIO):
    def __init__(self, exc):
        super().__init__()
        self.exc, self.writes = exc, 0

    def write(self, text):
        self.writes += 1
        raise self.exc


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 BrokenPipeError(errno.EPIPE, "Broken pipe"),
                                 ValueError("I/O operation on closed file.")])
def test_a_failing_stream_never_stops_the_work(exc, clock):
    stream = Failing(exc)
    bar = ProgressBar(stream)
    progress = Progress(bar)
    progress.total = 5
    for _ in range(5):
        clock.now += 60
        progress.advance(1)
    bar.set_status("compiling")
    bar.close()
    assert stream.writes == 1 and bar.quiet  # tried once, then quiet


def test_a_closed_stream_is_quiet(clock):
    stream = io.StringIO()
    stream.close()
    bar = ProgressBar(stream)
    bar(1, 2, "unit")
    bar.close()
    assert bar.quiet


def test_weighted_work_sets_the_share_and_counts_stay_steps(monkeypatch, clock):
    bar, stream = tty_bar(monkeypatch)
    progress = Progress(bar)
    progress.plan(10, 1.0)  # ten cheap steps
    progress.plan(1, 90.0)  # and one dear one
    progress.total += 0  # the plain form plans steps of cost 1
    progress.advance(10, 1.0)
    assert (progress.done, progress.total) == (10, 11)
    assert " 10.0%" in lines(stream)[-1]
    progress.advance(1, 90.0)
    assert "100.0%" in lines(stream)[-1] and "done" in lines(stream)[-1]
    plain = Progress()
    plain.total += 4
    plain.advance(2)
    assert (plain.work_done, plain.work_total) == (2, 4)


def test_unit_labels_read_as_words_and_keys_stay():
    assert label({"arm": "ghost", "batch": 2, "seed": 0}) == "ghost B=2 seed 0"
    assert label({"lr": 0.1, "norm": "bn", "seed": 3}) == "lr=0.1 bn seed 3"
    progress = Progress()
    progress.labels["armghost-batch2-seed0"] = "ghost B=2 seed 0"
    progress.note = "armghost-batch2-seed0"
    assert progress.note == "ghost B=2 seed 0"
    progress.note = "bn-seed0 and 4 more"
    assert progress.note == "bn-seed0 and 4 more"


def test_a_pipe_gets_whole_lines_without_padding(clock):
    stream = io.StringIO()
    bar = ProgressBar(stream)
    for done in range(0, 11):
        clock.now += 1
        bar(done, 10, "unit")
    out = stream.getvalue().splitlines()
    assert "100.0%" in out[-1] and " done " in out[-1] and out[-1].endswith(" unit")
    assert all(s == s.rstrip() for s in out)
    assert "\r" not in stream.getvalue()


def test_batch_size_costs_weigh_a_step_by_its_batch():
    c, n = BatchSizeConfig(), 6400  # training examples
    small = batch_size.step_cost("bn", 2, c, n, 10000) * batch_size.plan("bn", 2, c, n)["steps"]
    big = batch_size.step_cost("bn", 64, c, n, 10000) * batch_size.plan("bn", 64, c, n)["steps"]
    ghost = (batch_size.step_cost("ghost", 2, c, n, 10000)
             * batch_size.plan("ghost", 2, c, n)["steps"])
    assert 1 < small / big < 5  # same examples; small batches pay a per-step price
    assert ghost < small  # 100 steps of 64, not 3200 of 2
    assert batch_size.plan("bn", 2, c, n)["steps"] == 32 * batch_size.plan("bn", 64, c, n)["steps"]


def test_noise_costs_weigh_rows_by_their_size():
    costs = noise.row_costs(NoiseConfig(), 60000, 784)
    assert costs[0] > costs[1]  # the set's summary comes with its first row
    assert costs[-1] > 10 * costs[1]  # m = 1024 against m = 4
