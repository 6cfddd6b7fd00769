"""``compare`` (the seed's experiment) and ``regularization``: every norm of the config,
trained seed by seed, with train and test loss and accuracy after every epoch.

Seeds run in order and, within a seed, every norm, so an interrupted run already holds
matched pairs.
"""

from __future__ import annotations

from . import Context


def run(ctx: Context) -> None:
    c = ctx.config
    units = [ctx.record.unit(norm=norm, seed=seed) for seed in range(c.seeds) for norm in c.norms]
    ctx.plan(len(units) * c.epochs * ctx.per_epoch)
    for unit in units:
        ctx.train_epochs(unit, c.epochs)
