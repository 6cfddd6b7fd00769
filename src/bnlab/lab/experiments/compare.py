"""``compare`` (the seed's experiment) and ``regularization``: every norm of the config,
trained seed by seed, with train and test loss and accuracy after every epoch."""

from __future__ import annotations

from . import Context


def run(ctx: Context) -> None:
    c = ctx.config
    for unit in ctx.units(c.epochs * ctx.per_epoch):
        ctx.train_epochs(unit, c.epochs)
