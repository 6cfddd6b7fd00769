"""One module per experiment: ``TITLE``, ``EXPECTED``, ``analyze``, ``measured``, ``tables``
and ``figures`` (see :mod:`bnlab.report.build`)."""
