"""``compare``, ``regularization`` and the sweeps: every norm of the config (for
``init-sweep`` and ``lr-sweep``, at every value of the swept field), trained seed by seed, with
train and test loss and accuracy after every epoch."""

from ..runner import Context

SWEPT = {"init-sweep": ("init_scale", "scales"), "lr-sweep": ("lr", "lrs")}  # field, values

STACKS = True  # trains through Context.train_all, in stacks (see bnlab.lab.stack.prepare)


def run(ctx: Context) -> None:
    c = ctx.config
    key, values = SWEPT.get(c.name, (None, None))
    units = ctx.units(c.epochs * ctx.per_epoch, key, getattr(c, values) if key else (None,))
    ctx.train_all_epochs(units, c.epochs, key)
