"""``ics``: Ioffe & Szegedy's Figure 1, internal covariate shift made visible.

Every (norm, seed) is trained for ``steps`` steps; every ``eval_every`` steps a row holds
the test accuracy and the 15th, 50th and 85th percentiles of the input to every unit of the
last hidden layer's activation over a fixed held-out batch (the first ``probe_size`` test
examples), in inference mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models import ACTIVATIONS
from ..train import evaluate
from . import Context

PERCENTILES = (0.15, 0.50, 0.85)
KEYS = ("p15", "p50", "p85")


@torch.no_grad()
def last_inputs(model: nn.Module, x: Tensor, activation: str) -> Tensor:
    """(N, width) inputs to the last hidden layer's activation, in inference mode."""
    last = [m for m in model.modules() if isinstance(m, ACTIVATIONS[activation])][-1]
    captured: list[Tensor] = []
    handle = last.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    model.eval()
    model(x)
    handle.remove()
    return captured[0]


def run(ctx: Context) -> None:
    c = ctx.config
    probe = ctx.test_x[: c.probe_size]
    q = torch.tensor(PERCENTILES, dtype=torch.float64)

    def measure(model: nn.Module, step: int, sgd_loss: float, _next: Tensor) -> dict:
        z = last_inputs(model, probe, c.activation).double()  # (probe_size, width)
        pct = torch.quantile(z, q, dim=0)  # (3, width)
        return {"test_acc": evaluate(model, ctx.test_x, ctx.test_y).accuracy,  # 7 digits: float32
                **{k: [float(f"{v:.7g}") for v in p.tolist()] for k, p in zip(KEYS, pct)}}

    units = [ctx.record.unit(norm=norm, seed=seed) for seed in range(c.seeds) for norm in c.norms]
    ctx.plan(len(units) * c.steps)
    for unit in units:
        ctx.train(unit, steps=c.steps, eval_every=c.eval_every, measure=measure)
