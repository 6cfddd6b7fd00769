"""One training loop, :func:`fit`, for every experiment.

Determinism: the mini-batch order of an epoch depends only on (seed, epoch), so every
variant trained with one seed sees the same sequence of batches, and a run resumed from a
checkpoint sees the batches it would have seen had it never stopped. It is drawn on the CPU
on every device, so a run on a GPU trains on the batches the CPU run trains on.

Devices: :func:`fit` trains on the device of the data ``x`` and ``y``; the networks are there
already (:class:`~bnlab.lab.runner.Context` moves them), and so are the batches' indices and
the summed losses, so a step needs no transfer to or from the host.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .models import refresh_population
from bnlab._io import finite
from .distributed import DataParallel
from .rundir import Unit

log = logging.getLogger(__name__)

__all__ = ["Batches", "CHECKPOINT_SECONDS", "EvalResult", "Network", "Progress", "evaluate", "fit",
           "label", "per_network", "read_sgd_state", "restore", "sgd_", "sgd_state", "write_row"]


class Batches:
    """``batches(step)``: the indices of training step ``step`` (1-based), epoch after epoch.

    The order of an epoch is a function of (seed, epoch) alone, drawn on the CPU; an epoch's
    indices are then moved to ``device`` at once (default: kept on the CPU). Its last
    incomplete batch is dropped, so every step normalizes over the same number of samples
    (and BN never meets a batch of one); reshuffling each epoch means every sample is still
    used.
    """

    def __init__(self, n: int, batch_size: int, seed: int,
                 device: torch.device | str | None = None) -> None:
        assert batch_size <= n, "configs refuse a batch larger than the training set"
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.per_epoch = n // batch_size
        self.epoch, self.table = 0, None

    def __call__(self, step: int) -> Tensor:
        epoch, pos = divmod(step - 1, self.per_epoch)
        if epoch + 1 != self.epoch:
            self.epoch = epoch + 1
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=gen)[: self.per_epoch * self.batch_size]
            table = perm.view(self.per_epoch, self.batch_size)  # (steps, batch_size)
            self.table = table.to(self.device)
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


CHECKPOINT_SECONDS = 10.0  # the least time between two checkpoints of a unit


@torch.no_grad()
def sgd_(params: Sequence[Tensor], grads: Sequence[Tensor | None],
         buffers: list[Tensor | None], momentum: float, lr: float | Sequence[tuple]) -> None:
    """The lab's one SGD update, in place: ``torch.optim.SGD``'s (no dampening, weight decay
    or Nesterov), the same numbers. ``lr`` is a float, or for tensors that stack networks
    along their first dimension, (lr, start, stop) runs of networks with one rate each;
    ``buffers`` (one per parameter, None before its first step) hold the momentum. A
    parameter without a gradient is left alone, as torch.optim does."""
    for k, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        if momentum != 0:
            buf = buffers[k]
            if buf is None:
                buf = buffers[k] = g.clone()
            else:
                buf.mul_(momentum).add_(g)
            g = buf
        if isinstance(lr, (int, float)):
            p.add_(g, alpha=-lr)
            continue
        for rate, lo, hi in lr:
            (p if hi - lo == len(p) else p[lo:hi]).add_(g[lo:hi], alpha=-rate)


def sgd_state(lr: float, momentum: float, buffers: Sequence[Tensor | None]) -> dict:
    """``torch.optim.SGD(params, lr, momentum).state_dict()`` after steps that left
    ``buffers`` (one per parameter; None before the first step or without momentum), built
    without torch.optim, whose first use imports for about a second."""
    return {"state": {k: {"momentum_buffer": b} for k, b in enumerate(buffers) if b is not None},
            "param_groups": [{"lr": lr, "momentum": momentum, "dampening": 0, "weight_decay": 0,
                              "nesterov": False, "maximize": False, "foreach": None,
                              "differentiable": False, "fused": None,
                              "params": list(range(len(buffers)))}]}


def read_sgd_state(state: Any, params: Sequence[Tensor], momentum: float) -> list[Tensor | None]:
    """The momentum buffers of an SGD state_dict over ``params``, each on its parameter's
    device (a checkpoint holds CPU tensors); ValueError if it does not fit them."""
    groups = state["param_groups"]
    if not (isinstance(groups, list) and len(groups) == 1
            and groups[0]["params"] == list(range(len(params)))):
        raise ValueError("its optimizer state does not fit this network's parameters")
    out: list[Tensor | None] = []
    for k, p in enumerate(params):
        buf = state["state"].get(k, {}).get("momentum_buffer")
        if buf is not None and (not isinstance(buf, Tensor) or buf.shape != p.shape):
            raise ValueError(f"momentum buffer {k} does not fit its parameter")
        out.append(buf.to(p.device) if buf is not None and momentum != 0 else None)
    return out


class Network:
    """The engine of one network: autograd, any model and norm. ``statistics`` (see
    :func:`~bnlab.lab.models.step_statistics`) says where a step's BN statistics come from;
    with ``dp`` the network's every batch is split over the processes of a data-parallel
    group (:meth:`~bnlab.lab.distributed.DataParallel.step`)."""

    loss_dtype = torch.float32  # sgd_loss is summed so (the records were made so)

    def __init__(self, models: Sequence[nn.Module], lrs: Sequence[float], momentum: float,
                 buffers: Sequence[list[Tensor | None]], statistics: str = "batch",
                 dp: DataParallel | None = None) -> None:
        (self.net,), (self.lr,), (self.buffers,) = models, lrs, [list(b) for b in buffers]
        self.momentum, self.statistics, self.dp = momentum, statistics, dp
        if dp is not None and statistics != "batch":
            raise ValueError("this norm cannot be trained on a batch split between processes")
        self.params = list(self.net.parameters())

    def __len__(self) -> int:
        return 1

    def train_step(self, x: Tensor, y: Tensor, idx: Sequence[Tensor]) -> Tensor:
        """One SGD step on the batch ``idx[0]``; returns the (1,) training-mode loss. With
        statistics ``whole`` the whole of ``x`` goes through the network (BN statistics over
        all of it) and the loss is taken on the batch's rows."""
        model, rows = self.net, idx[0]
        if self.statistics == "population":  # the whole set's statistics before every step
            refresh_population(model, x)
        model.train()
        if self.dp is not None:
            loss = self.dp.step(model, x, y, rows)
        else:
            logits = model(x)[rows] if self.statistics == "whole" else model(x[rows])
            loss = nn.functional.cross_entropy(logits, y[rows])
            for p in self.params:
                p.grad = None
            loss.backward()
        sgd_(self.params, [p.grad for p in self.params], self.buffers, self.momentum, self.lr)
        return loss.detach().reshape(1)

    def before_measure(self, x: Tensor) -> None:
        if self.statistics == "population":
            refresh_population(self.net, x)

    def model(self, m: int) -> nn.Module:
        return self.net

    def evaluate(self, x: Tensor, y: Tensor) -> list[EvalResult]:
        return [evaluate(self.net, x, y)]

    def state(self, m: int) -> dict:
        return {"model": self.net.state_dict(),
                "optimizer": sgd_state(self.lr, self.momentum, self.buffers)}

    def keep(self, rows: Sequence[int]) -> None:
        assert list(rows) == [0], "one network: it goes on or it ends"


# measure(engine, step, sgd_losses, next_batches) -> one row (or None) per network
Measure = Callable[[Any, int, list, list], list]


def per_network(measure: Callable[[nn.Module, int, float, Tensor], Any]) -> Measure:
    """A measure of the engine's networks, one by one: ``measure(model, step, sgd_loss,
    next_batch)`` for each (not for a network whose loss is not finite: it has diverged)."""
    return lambda engine, step, losses, nexts: [
        measure(engine.model(m), step, loss, nexts[m]) if math.isfinite(loss) else None
        for m, loss in enumerate(losses)]


def fit(units: Sequence[Unit | None], models: Sequence[nn.Module], x: Tensor, y: Tensor, *,
        engine: Callable[..., Any], seeds: Sequence[int], lrs: Sequence[float],
        momentum: float, batch_size: int, steps: int, eval_every: int, measure: Measure | None,
        per_epoch: bool = False, at_start: bool = False, finish: bool = True,
        progress: Progress | None = None, dp: DataParallel | None = None,
        cost: float = 1.0) -> None:
    """Train the networks ``models`` (one per unit) by SGD on (x, y) for ``steps`` steps
    each, in lock-step, through ``engine(models, lrs, momentum, buffers)`` (:class:`Network`,
    or :class:`~bnlab.lab.stack.Stack` for many), recording through the units.

    Every ``eval_every`` steps and after the last one (and at step 0 with ``at_start``),
    ``measure(engine, step, sgd_losses, next_batches)`` returns each network's row, if any:
    ``sgd_losses`` the mean training-mode losses since the last evaluation, ``next_batches``
    the indices each network's next step trains on. Rows get ``step`` (and ``epoch`` with
    ``per_epoch``) added. A network whose loss or row is not finite has diverged: a row
    ``{"diverged": true}`` ends its unit and it leaves the group.

    Checkpoints (one rule for every engine): after a session's first evaluation, then at
    most every :data:`CHECKPOINT_SECONDS`; none after the last step, unless the caller
    finishes the units itself (``finish=False``: it records more after training). A unit with a checkpoint
    continues from it; units saved at different steps train in separate groups, and the rows
    a resumed unit recorded before are not written twice, so how often checkpoints are taken
    cannot change the numbers.

    With ``dp`` every process of a data-parallel group calls fit on the same one network;
    only rank 0 has units and a measure: it restores, evaluates and records, and the others
    follow its checkpoint and its decision to go on. Each network-step advances
    ``progress`` by one step of ``cost`` (see :class:`Progress`)."""
    progress = progress or Progress()
    lead = dp is None or dp.lead
    todo = [i for i, u in enumerate(units) if u is None or not u.done]
    progress.advance((len(units) - len(todo)) * steps, cost)
    groups: dict[tuple[int, bool], list[int]] = {}  # (step, from a checkpoint): units
    buffers: dict[int, list[Tensor | None]] = {}
    for i in todo:
        start, buffers[i] = _restore(units[i] if lead else None, models[i], momentum, steps, dp)
        groups.setdefault((max(start, 0), start >= 0), []).append(i)
        progress.advance(max(start, 0), cost)
    for (start, restored), members in sorted(groups.items()):
        group = engine([models[i] for i in members], [lrs[i] for i in members], momentum,
                       [buffers[i] for i in members])
        _train(group, [units[i] for i in members], [seeds[i] for i in members], x, y, start,
               batch_size=batch_size, steps=steps, eval_every=eval_every, measure=measure,
               per_epoch=per_epoch, at_start=at_start and not restored, finish=finish,
               progress=progress, dp=dp, cost=cost)


def _restore(unit: Unit | None, model: nn.Module, momentum: float, steps: int,
             dp: DataParallel | None) -> tuple[int, list[Tensor | None]]:
    """The unit's saved state loaded into ``model`` (on every process of ``dp``, from rank
    0's): (its step, or -1 without one; momentum buffers)."""
    params = list(model.parameters())
    buffers: list[Tensor | None] = [None] * len(params)

    def apply(state: dict) -> None:
        model.load_state_dict(state["model"])
        buffers[:] = read_sgd_state(state["optimizer"], params, momentum)

    state = restore(unit, steps, apply) if unit is not None else None
    if dp is not None:
        state = dp.share(state)
        if unit is None and state is not None:
            apply(state)
    if state is None:
        return -1, buffers
    if unit is not None and momentum != 0 and state["step"] > 0 and any(
            b is None for b in buffers):
        # SGD with momentum keeps a buffer for every parameter from its first step on
        raise unit.damaged(" (its optimizer state lacks momentum buffers)")
    return state["step"], buffers


def _train(engine: Any, units: list[Unit | None], seeds: list[int], x: Tensor, y: Tensor,
           start: int, *, batch_size: int, steps: int, eval_every: int, measure: Measure | None,
           per_epoch: bool, at_start: bool, finish: bool, progress: Progress,
           dp: DataParallel | None, cost: float) -> None:
    lead = dp is None or dp.lead
    orders = {s: Batches(len(x), batch_size, s, x.device) for s in set(seeds)}
    batches = [orders[s] for s in seeds]
    total = torch.zeros(len(engine), dtype=engine.loss_dtype, device=x.device)
    count, saved_at = 0, None

    def evaluation(step: int, losses: list[float]) -> list[int]:
        """Record the rows of ``step``; the networks that go on (on every process)."""
        nonlocal saved_at
        keep = list(range(len(engine)))
        if lead:
            engine.before_measure(x)
            rows = measure(engine, step, losses, [b(step + 1) for b in batches]) \
                if measure is not None else [None] * len(engine)
            keep = []
            for m, unit in enumerate(units):
                when = {"step": step, **({"epoch": step // batches[m].per_epoch}
                                         if per_epoch else {})}
                if write_row(unit, when, rows[m] if math.isfinite(losses[m]) else None,
                             losses[m]):
                    unit.finish()
                    progress.advance(steps - step, cost)
                else:
                    keep.append(m)
            if (step != steps or not finish) and (
                    saved_at is None or time.monotonic() - saved_at >= CHECKPOINT_SECONDS):
                for m in keep:
                    units[m].save({**engine.state(m), "step": step})
                saved_at = time.monotonic()
        return keep if dp is None else dp.share(keep)

    def prune(keep: list[int]) -> bool:
        """Go on with the networks ``keep`` only; whether any is left."""
        nonlocal units, batches, total
        if len(keep) < len(engine):
            if not keep:
                return False
            engine.keep(keep)
            units = [units[m] for m in keep]
            batches = [batches[m] for m in keep]
            total = total[keep]
        return True

    if at_start and not prune(evaluation(0, [0.0] * len(engine))):
        return
    for step in range(start + 1, steps + 1):
        total += engine.train_step(x, y, [b(step) for b in batches])
        count += 1
        progress.advance(len(engine), cost)
        if step % eval_every and step != steps:
            continue
        losses = (total / count).tolist()
        total.zero_()
        count = 0
        if not prune(evaluation(step, losses)):
            return
    if lead and finish:
        for unit in units:
            unit.finish()
