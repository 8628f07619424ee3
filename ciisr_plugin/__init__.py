"""ciisr: arbitrary-scale super-resolution (LIIF, A-LIIF, LIIF-GAN) for BasicSR.

Importing this package registers every arch, dataset, model and metric into BasicSR's
registries. The only other import-time effect is the set of documented basicsr 1.4.2
compatibility fixes in :mod:`ciisr_plugin.compat`.
"""
from . import compat

compat.apply()

from . import archs, data, losses, metrics, models  # noqa: E402,F401  (registration)
from .checkpoint import load_model  # noqa: E402

__version__ = '0.1.0'
__all__ = ['load_model', '__version__']
