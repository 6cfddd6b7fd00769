"""One training loop, :func:`fit`, for every experiment.

Determinism: the mini-batch order of an epoch depends only on (seed, epoch), so every
variant trained with one seed sees the same sequence of batches, and a run resumed from a
checkpoint sees the batches it would have seen had it never stopped.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from .models import refresh_population, step_statistics
from bnlab._io import finite
from .distributed import DataParallel
from .rundir import Unit

log = logging.getLogger(__name__)

__all__ = ["Batches", "EvalResult", "Progress", "evaluate", "fit", "label", "restore", "sgd_step",
           "write_row"]


class Batches:
    """``batches(step)``: the indices of training step ``step`` (1-based), epoch after epoch.

    The order of an epoch is a function of (seed, epoch) alone. Its last incomplete batch is
    dropped, so every step normalizes over the same number of samples (and BN never meets a
    batch of one); reshuffling each epoch means every sample is still used.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        assert batch_size <= n, "configs refuse a batch larger than the training set"
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self.epoch, self.table = 0, None

    def __call__(self, step: int) -> Tensor:
        epoch, pos = divmod(step - 1, self.per_epoch)
        if epoch + 1 != self.epoch:
            self.epoch = epoch + 1
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=gen)[: self.per_epoch * self.batch_size]
            self.table = perm.view(self.per_epoch, self.batch_size)  # (steps, batch_size)
        return self.table[pos]


class Progress:
    """Work done against work in all, for a progress display: ``on_change(done, total, note)``
    is called whenever work advances. Jobs on several threads share one; setting ``stop``
    makes the next ``advance`` of every job raise KeyboardInterrupt.

    ``done`` and ``total`` count steps (training steps, measurements). Steps may cost more
    or less than others (a batch of 64 against one of 2): ``plan(steps, cost)`` and
    ``advance(steps, cost)`` also sum ``work_done`` and ``work_total`` in a cost unit the
    experiment chooses (``total += n`` plans n steps of cost 1), which a display reads for
    its share done and time left; an ``on_change`` with a ``follow`` method is handed the
    Progress for that. ``note`` says what is being worked on: a unit key with a label in
    ``labels`` reads as its label."""

    def __init__(self, on_change: Callable[[int, int, str], None] | None = None) -> None:
        self.done, self._total, self._note = 0, 0, ""
        self.work_done, self.work_total = 0.0, 0.0
        self.labels: dict[str, str] = {}
        self.on_change = on_change
        self.stop = False
        self._lock = threading.Lock()
        if hasattr(on_change, "follow"):
            on_change.follow(self)

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        self.work_total += value - self._total
        self._total = value

    @property
    def note(self) -> str:
        return self._note

    @note.setter
    def note(self, value: str) -> None:
        self._note = self.labels.get(value, value)

    def plan(self, steps: int, cost: float = 1.0) -> None:
        """Add ``steps`` steps of ``cost`` each to the work in all."""
        self._total += steps
        self.work_total += steps * cost

    def advance(self, n: int = 1, cost: float = 1.0) -> None:
        if self.stop:
            raise KeyboardInterrupt
        with self._lock:
            self.done += n
            self.work_done += n * cost
            if self.on_change is not None:
                self.on_change(self.done, self.total, self.note)


_LABELS = {"norm": "{}", "arm": "{}", "batch": "B={}", "seed": "seed {}"}


def label(fields: dict) -> str:
    """A unit's fields as a person reads them: ``{"arm": "ghost", "batch": 2, "seed": 0}``
    -> "ghost B=2 seed 0" (unit keys stay as they are: they name checkpoints)."""
    return " ".join(_LABELS.get(k, k + "={}").format(v) for k, v in fields.items())


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
             rows: Tensor | None = None) -> Tensor:
    """One optimizer step in training mode; returns the detached loss. With ``rows``, the
    whole of ``x`` goes through the network (BN statistics over all of it) and the loss is
    taken on those rows."""
    model.train()
    logits = model(x)
    loss = nn.functional.cross_entropy(logits if rows is None else logits[rows],
                                       y if rows is None else y[rows])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


class EvalResult(NamedTuple):
    loss: float
    accuracy: float


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 8192) -> EvalResult:
    """Inference-mode loss and accuracy over the whole of (x, y)."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(x), chunk):
        logits = model(x[start:start + chunk])
        target = y[start:start + chunk]
        loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return EvalResult(loss / len(x), correct / len(x))


def write_row(unit: Unit, when: dict, row: dict | None, sgd_loss: float) -> bool:
    """Record an evaluation's ``row`` (if any) at ``when`` (step, epoch); returns whether the
    unit diverged: its loss or a measured value is not finite, which a ``{"diverged": true}``
    row records (the unit is then finished by its caller)."""
    diverged = not math.isfinite(sgd_loss) or finite(row) != row  # NaN != NaN, lists too
    if row:
        unit.write({**when, **row})
    if diverged:
        log.warning("%s diverged at step %d", unit.key, when["step"])
        unit.write({**when, "diverged": True})
        unit.diverged = True
    return diverged


def restore(unit: Unit, steps: int, apply: Callable[[dict], Any]) -> dict | None:
    """The unit's saved state (None without one), after ``apply(state)`` loaded it into the
    network and optimizer; a state that does not fit them, or lies past step ``steps``, is
    a damaged checkpoint."""
    state = unit.load()
    if state is None:
        return None
    try:
        apply(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise unit.damaged(f" (it does not fit this network: {' '.join(str(exc).split())[:80]})") from None
    if state["step"] > steps:
        raise unit.damaged(f" (step {state['step']} is past the last, {steps})")
    return state


def fit(unit: Unit | None, model: nn.Module, x: Tensor, y: Tensor, *, norm: str, seed: int,
        lr: float, momentum: float, batch_size: int, steps: int, eval_every: int,
        measure: Callable[[int, float, Tensor], dict | None] | None, per_epoch: bool = False,
        at_start: bool = False, finish: bool = True, progress: Progress | None = None,
        dp: DataParallel | None = None, cost: float = 1.0) -> None:
    """Train ``model`` by SGD on (x, y) for ``steps`` steps, recording through ``unit``.

    Every ``eval_every`` steps and after the last one (and at step 0 with ``at_start``),
    ``measure(step, sgd_loss, next_batch)`` returns the row to record, if any: ``sgd_loss`` is
    the mean training-mode loss since the last evaluation, ``next_batch`` the indices the next
    step will train on. Rows get ``step`` (and ``epoch`` with ``per_epoch``) added. The state
    is saved after each evaluation; a unit with a saved state continues from it. With
    ``finish=False`` the caller records more and finishes the unit itself (unless it diverged).

    A run whose loss becomes non-finite has diverged: a row ``{"diverged": true}`` ends it.

    With ``dp`` every process of the group calls fit on the same network, and each step
    trains on the global batch split between them (:mod:`bnlab.lab.distributed`); only rank
    0 has a ``unit`` and a ``measure``: it restores, evaluates and records, and the others
    follow its checkpoint and its decision to go on.

    Each step advances ``progress`` by one step of ``cost`` (see :class:`Progress`).
    """
    progress = progress or Progress()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    lead = dp is None or dp.lead

    def load(state: dict) -> None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])

    state = restore(unit, steps, load) if lead else None
    if dp is not None:
        state = dp.share(state)
        if not lead and state is not None:
            load(state)
    start = 0 if state is None else state["step"]
    progress.advance(start, cost)
    batches = Batches(len(x), batch_size, seed)
    statistics = step_statistics(norm)
    if dp is not None and statistics != "batch":
        raise ValueError(f"norm {norm!r} cannot be trained on a batch split between processes")

    def record(step: int, sgd_loss: float) -> bool:
        go_on = lead and _record(step, sgd_loss)
        return go_on if dp is None else dp.share(go_on)

    def _record(step: int, sgd_loss: float) -> bool:
        when = {"step": step, **({"epoch": step // batches.per_epoch} if per_epoch else {})}
        row = measure(step, sgd_loss, batches(step + 1)) if math.isfinite(sgd_loss) else None
        if write_row(unit, when, row, sgd_loss):
            return False
        unit.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step})
        return True

    if at_start and state is None and not record(0, 0.0):
        return unit.finish() if lead else None  # diverged before the first step
    total, count = torch.zeros(()), 0
    for step in range(start + 1, steps + 1):
        idx = batches(step)
        if statistics == "population":  # the whole set's statistics before every step
            refresh_population(model, x)
        if dp is not None:
            total += dp.step(model, opt, x, y, idx)
        elif statistics == "whole":
            total += sgd_step(model, opt, x, y, rows=idx)
        else:
            total += sgd_step(model, opt, x[idx], y[idx])
        count += 1
        progress.advance(1, cost)
        if step % eval_every == 0 or step == steps:
            if statistics == "population":
                refresh_population(model, x)
            if not record(step, float(total) / count):
                break
            total, count = torch.zeros(()), 0
    if lead and (finish or unit.diverged):  # a diverged unit has nothing more to record
        unit.finish()
