"""Stopping a bnlab process: Ctrl-C, SIGTERM and SIGHUP end it in one line with exit code
128 + the signal, saying how to continue a started run; a second or third signal while it
stops changes nothing; one during start-up waits until the imports are done."""

import os
import signal
import subprocess
import sys
import time

import pytest

from bnlab.lab import signals
from bnlab.lab.rundir import read_rows

FLAGS = ["--epochs", "300", "--seeds", "1", "--width", "16", "--depth", "2"]


@pytest.fixture
def routed():
    """SIGINT, SIGTERM and SIGHUP routed to bnlab.lab.signals for the test, then restored."""
    previous = signals.install()
    yield
    signals.restore(previous)


def test_first_signal_raises_later_ones_wait(routed):
    with pytest.raises(signals.Interrupted) as info:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at once; never reached
    assert signals.exit_code(info.value) == 128 + signal.SIGTERM
    os.kill(os.getpid(), signal.SIGINT)  # the cleanup goes on undisturbed
    os.kill(os.getpid(), signal.SIGHUP)


def test_a_signal_during_imports_waits_for_them(routed):
    done = []
    with pytest.raises(signals.Interrupted) as info:
        with signals.held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("imports")
    assert done == ["imports"] and signals.exit_code(info.value) == 130


def test_a_signal_ignored_at_start_stays_ignored():
    """nohup ignores SIGHUP, a shell ignores SIGINT for a background job: bnlab keeps that."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        previous = signals.install()
        try:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is signals._handler
            os.kill(os.getpid(), signal.SIGHUP)  # nothing happens
            time.sleep(0.05)
        finally:
            signals.restore(previous)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_held_without_routing_restores_what_was_there():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(signals.Interrupted):
        with signals.held():
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    with signals.held():
        pass
    assert signals.exit_code(KeyboardInterrupt()) == 130


def _default_signals() -> None:
    """In the child: the signals tested here as a shell gives them, even where the suite
    itself runs under nohup (bnlab keeps a signal ignored when it starts ignored)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def start(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "bnlab", "compare", *FLAGS, *extra,
                             "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)


def wait_for_rows(proc, out, n):
    """No speed is asserted: the deadline only keeps a hung child from hanging the suite."""
    deadline = time.monotonic() + 900
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the child wrote fewer than {n} rows (exit code {proc.poll()})")
        time.sleep(0.01)


def said(err):
    """stderr without the progress lines."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("[")]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_a_run_as_ctrl_c_does(tmp_path, sig):
    out = tmp_path / "run"
    proc = start(out)
    wait_for_rows(proc, out, 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 128 + sig
    assert said(err) == ["interrupted; finished work is saved. Continue with:",
                         f"  bnlab compare --resume {out}"], err
    assert not (out / ".lock").exists() and 3 <= len(read_rows(out / "metrics.jsonl"))


@pytest.mark.slow
def test_ctrl_c_pressed_again_and_again(tmp_path):
    """Ctrl-C every few milliseconds until the process has ended: the first stops the run,
    the others cut neither its cleanup nor the interpreter's exit into a traceback."""
    out = tmp_path / "run"
    proc = start(out)
    wait_for_rows(proc, out, 3)
    while proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.005)
    err = proc.stderr.read()
    assert proc.returncode == 130
    assert said(err) == ["interrupted; finished work is saved. Continue with:",
                         f"  bnlab compare --resume {out}"], err
    assert not (out / ".lock").exists()


def wait_for_library(proc, name):
    """Wait until the child has mapped a shared library whose path holds ``name``: it is
    then importing that module (Linux's /proc shows it)."""
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with open(f"/proc/{proc.pid}/maps") as fh:
                if name in fh.read():
                    return
        except OSError:
            pass
        time.sleep(0.001)
    pytest.fail(f"the child never loaded {name} (exit code {proc.poll()})")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc")
@pytest.mark.parametrize("library", ["libtorch", "numba", "ft2font"])
def test_ctrl_c_while_torch_numba_or_matplotlib_load(tmp_path, library):
    """An interrupt while an extension module initialises: exit code 130 and what to do,
    never an ImportError or an abort. torch and Numba load before the run starts (nothing
    is left behind); matplotlib, for the report, once training is done (the run is kept,
    and the message says how to write its report)."""
    out = tmp_path / "run"
    proc = start(out, "--epochs", "3")  # the report's matplotlib loads once training is done
    wait_for_library(proc, library)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 130, err
    if library == "ft2font":
        assert said(err) == ["interrupted; the run is complete. Write its report with:",
                             f"  bnlab report {out}"], err
        assert (out / "metrics.jsonl").is_file() and not (out / "report.html").exists()
        return
    assert said(err) in (["bnlab compare: interrupted"], ["interrupted; nothing was written"]), err
    assert not out.exists()
