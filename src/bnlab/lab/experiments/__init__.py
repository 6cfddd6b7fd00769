"""The experiments: one module each, named by its config's ``module``, with
``run(ctx: Context)`` (see :mod:`bnlab.lab.runner`, which runs them)."""
