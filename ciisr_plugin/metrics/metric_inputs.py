"""The two image conventions our metrics accept.

* torch tensors: RGB, ``(N, C, H, W)`` / ``(C, H, W)`` / ``(H, W)``, float in [0, 1] (the
  LIIF protocol: the float network output, not quantised); values are clamped to [0, 1].
* numpy arrays: BasicSR's metric convention (what ``tensor2img`` returns): ``HWC`` BGR or
  ``HW`` gray, in [0, 255] (uint8 or float).
"""
import math

import numpy as np
import torch


def to_rgb_tensor(img, name='img'):
    """-> float (N, C, H, W) RGB tensor in [0, 1], on the input's device."""
    if isinstance(img, torch.Tensor):
        x = img.detach()
        if x.dim() == 2:
            x = x[None, None]
        elif x.dim() == 3:
            x = x[None]
        elif x.dim() != 4:
            raise ValueError(f'{name}: expected a (N, C, H, W), (C, H, W) or (H, W) tensor, got shape {tuple(x.shape)}')
        x = x.float() / 255 if not x.is_floating_point() else x
        return x.clamp(0, 1)
    if isinstance(img, np.ndarray):
        if img.ndim == 2:
            img = img[:, :, None]
        if img.ndim != 3:
            raise ValueError(f'{name}: expected an HWC or HW array, got shape {img.shape}')
        if img.dtype not in (np.uint8, np.float32, np.float64):
            raise ValueError(f'{name}: expected uint8 or float pixels in [0, 255], got {img.dtype}')
        if img.shape[2] == 3:
            img = img[:, :, ::-1]  # BGR -> RGB
        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 255
        return x.clamp(0, 1)
    raise ValueError(f'{name}: expected a torch tensor or a numpy array, got {type(img).__name__}')


def check_same_shape(x, y):
    if x.shape != y.shape:
        raise ValueError(f'img and img2 have different shapes: {tuple(x.shape)} vs {tuple(y.shape)}')


def scale_pair(scale, name='scale'):
    """``s`` / ``[sh, sw]`` / tensor -> (sh, sw) floats."""
    if isinstance(scale, torch.Tensor):
        scale = scale.flatten().tolist()
    values = list(scale) if isinstance(scale, (list, tuple)) else [scale, scale]
    if len(values) == 1:
        values = values * 2
    try:
        sh, sw = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f'{name}: expected a number or [sh, sw], got {scale!r}') from None
    if not (math.isfinite(sh) and math.isfinite(sw) and sh > 0 and sw > 0):
        raise ValueError(f'{name}: expected positive scales, got {scale!r}')
    return sh, sw


def shave_border(x, rows, cols):
    """Remove ``rows`` / ``cols`` pixels from each border of (..., H, W)."""
    h, w = x.shape[-2:]
    if 2 * rows >= h or 2 * cols >= w:
        raise ValueError(f'image of {h}x{w} is too small to shave {rows} rows / {cols} columns from each border')
    return x[..., rows:h - rows, cols:w - cols]
