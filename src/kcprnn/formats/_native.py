"""Old import path of the compiled CPU kernels, now :mod:`kcprnn._cpu.native`; kept until
every caller imports them from there."""

from .._cpu.native import available, counting_macs, info

__all__ = ["available", "counting_macs", "info"]
