"""``init-sweep`` and ``lr-sweep``: where plain networks and BN networks learn.

Every (value, seed, norm) is trained like a ``compare`` unit, with the swept value
(``init_scale`` or ``lr``) in place of the config's.
"""

from __future__ import annotations

from . import Context

SWEPT = {"init-sweep": ("init_scale", "scales"), "lr-sweep": ("lr", "lrs")}


def run(ctx: Context) -> None:
    c = ctx.config
    key, values = SWEPT[c.name]
    for unit in ctx.units(c.epochs * ctx.per_epoch, key, getattr(c, values)):
        ctx.train_epochs(unit, c.epochs, **{key: unit.fields[key]})
