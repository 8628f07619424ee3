"""Compatibility fixes for basicsr 1.4.2 on current torch / torchvision.

Every fix is explicit, names the upstream issue, and is applied once by :func:`apply`
(called when ``ciisr_plugin`` is imported). Each has a test in ``tests/test_compat.py``
that fails without it.
"""
import sys
import types

_applied = False


def _shim_functional_tensor():
    """basicsr#650: ``basicsr.data.degradations`` imports ``rgb_to_grayscale`` from
    ``torchvision.transforms.functional_tensor``, removed in torchvision 0.17. Provide
    that module name, backed by the public ``torchvision.transforms.functional``."""
    name = 'torchvision.transforms.functional_tensor'
    if name in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401  (old torchvision: nothing to do)
        return
    except ImportError:
        pass
    from torchvision.transforms import functional
    shim = types.ModuleType(name)
    shim.rgb_to_grayscale = functional.rgb_to_grayscale
    sys.modules[name] = shim


def apply():
    global _applied
    if _applied:
        return
    _shim_functional_tensor()
    _applied = True
