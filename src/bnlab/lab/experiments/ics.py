"""``ics``: Ioffe & Szegedy's Figure 1, internal covariate shift made visible.

Every (norm, seed) is trained for ``steps`` steps; every ``eval_every`` steps a row holds
the test accuracy and the 15th, 50th and 85th percentiles of the input to every unit of the
last hidden layer's activation over the first ``probe_size`` test examples, in inference mode.
"""

import torch
from torch import Tensor, nn

from ..models import ACTIVATIONS
from ..train import evaluate, per_network
from ..runner import Context

STACKS = True  # trains through Context.train_all, in stacks (see bnlab.lab.stack.prepare)


def run(ctx: Context) -> None:
    c = ctx.config
    probe = ctx.test_x[: c.probe_size]
    q = torch.tensor((0.15, 0.50, 0.85), dtype=torch.float64, device=ctx.device)

    @torch.no_grad()
    def measure(model: nn.Sequential, step: int, sgd_loss: float, _next: Tensor) -> dict:
        last = max(j for j, m in enumerate(model) if isinstance(m, ACTIVATIONS[c.activation]))
        z = model.eval()[:last](probe).double()  # (probe_size, width)
        pct = [[float(f"{v:.7g}") for v in p.tolist()] for p in torch.quantile(z, q, dim=0)]
        return {"test_acc": evaluate(model, ctx.test_x, ctx.test_y).accuracy,
                **dict(zip(("p15", "p50", "p85"), pct))}  # percentiles to 7 digits: float32

    ctx.train_all(ctx.units(c.steps), steps=c.steps, eval_every=c.eval_every,
                  measure=per_network(measure))
