"""PSNR exactly as the LIIF paper reports it (the authors' ``utils.calc_psnr``)."""
import math

import torch

from basicsr.utils.registry import METRIC_REGISTRY

from .metric_inputs import check_same_shape, scale_pair, shave_border, to_rgb_tensor

# ITU-R BT.601 luma weights scaled to [0, 1] input; applied to the *difference*, so the
# +16 offset of Y cancels.
Y_WEIGHTS = (65.738 / 256, 129.057 / 256, 25.064 / 256)
MODES = ('benchmark', 'div2k', 'none')


def liif_shave(scale, mode):
    """Border pixels removed per side, ``(rows, cols)``.

    ``benchmark``: the scale; ``div2k``: the scale + 6; ``none``: 0. The authors only use
    integer scales (``shave = scale``); for a non-integer scale we shave ``ceil(scale)``, so
    the removed border is never narrower than the scale, and an anisotropic ``(sh, sw)``
    shaves rows by ``sh`` and columns by ``sw``.
    """
    if mode == 'none':
        return 0, 0
    shave = [math.ceil(s - 1e-9) for s in scale_pair(scale)]  # 4.0 -> 4, 2.5 -> 3
    extra = 6 if mode == 'div2k' else 0
    return shave[0] + extra, shave[1] + extra


def _parse_shave(shave):
    values = list(shave) if isinstance(shave, (list, tuple)) else [shave, shave]
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f'calculate_psnr_liif: shave must be a non-negative int or [rows, cols], got {shave!r}')
    return values[0], values[1]


@METRIC_REGISTRY.register()
def calculate_psnr_liif(img, img2, scale=None, mode='none', shave=None, **kwargs):
    """PSNR of the LIIF protocol: float images in [0, 1] (clamped, not quantised).

    Args:
        img, img2: output and ground truth; RGB float tensors in [0, 1] (the protocol), or
            BasicSR's HWC BGR uint8 arrays (see :mod:`.metric_inputs`).
        scale: the evaluation scale, ``s`` or ``[sh, sw]`` (needed unless ``mode`` is none).
        mode: ``'benchmark'`` (Y of the difference, shave ``scale``), ``'div2k'`` (RGB,
            shave ``scale + 6``) or ``'none'`` / None (RGB, no shave).
        shave: override of the border shaved per side (int or ``[rows, cols]``).

    Returns:
        float PSNR in dB (``inf`` for identical images).
    """
    mode = 'none' if mode is None else str(mode).lower()
    if mode not in MODES:
        raise ValueError(f"calculate_psnr_liif: mode must be one of {list(MODES)} or None, got {mode!r}")
    x, y = to_rgb_tensor(img, 'img'), to_rgb_tensor(img2, 'img2')
    check_same_shape(x, y)
    diff = x.double() - y.double()
    if mode == 'benchmark' and diff.shape[1] == 3:
        weights = torch.tensor(Y_WEIGHTS, dtype=diff.dtype, device=diff.device).view(1, 3, 1, 1)
        diff = (diff * weights).sum(dim=1, keepdim=True)
    if shave is not None:
        rows, cols = _parse_shave(shave)
    elif mode == 'none':
        rows, cols = 0, 0
    elif scale is None:
        raise ValueError(f"calculate_psnr_liif: mode '{mode}' needs the evaluation scale (scale=...)")
    else:
        rows, cols = liif_shave(scale, mode)
    diff = shave_border(diff, rows, cols)
    mse = diff.pow(2).mean().item()
    return float('inf') if mse == 0 else -10 * math.log10(mse)
