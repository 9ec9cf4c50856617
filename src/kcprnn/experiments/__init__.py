"""Video experiments of the paper: training harness, demo and report.

The commands ``kcprnn train``, ``kcprnn demo`` and ``kcprnn report`` call the ``main`` functions
of :mod:`.train`, :mod:`.demo` and :mod:`.report`.
"""
