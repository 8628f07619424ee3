"""Bicubic downsampling to an exact output size, as the LR inputs are made.

Two kernels:

* ``'pil_bicubic'`` - ``PIL.Image.resize(..., BICUBIC)``, the LIIF authors' recipe (their
  ``resize_fn`` round-trips the [0, 1] tensor through an 8-bit PIL image, which is exact for
  8-bit sources). 8-bit images are resized as 8-bit images (so the LR is quantised, as
  theirs); 16-bit / float images are resized per channel in PIL's 32-bit float mode.
* ``'matlab_bicubic'`` - MATLAB ``imresize`` (antialiased bicubic), the kernel of the official
  DIV2K / benchmark LR sets. The weights come from
  ``basicsr.utils.matlab_functions.calculate_weights_indices`` (so they equal
  ``basicsr.utils.matlab_functions.imresize``), applied per axis with its own scale so
  anisotropic output sizes are exact. 8-bit sources are rounded to 8 bit afterwards, as MATLAB
  does for ``uint8`` input (and as the official LR files are stored).

Both take the native array of :mod:`ciisr_plugin.data.image_io` and return float32 [0, 1].
"""
import numpy as np
from PIL import Image

from basicsr.utils.matlab_functions import calculate_weights_indices

from .image_io import to_float01

DOWNSAMPLE_KERNELS = ('pil_bicubic', 'matlab_bicubic')


def check_kernel(kernel, option_name='downsample_kernel'):
    if kernel not in DOWNSAMPLE_KERNELS:
        raise ValueError(f"{option_name}: unknown kernel '{kernel}', expected one of {list(DOWNSAMPLE_KERNELS)}")
    return kernel


def pil_bicubic_planes(planes, out_h, out_w):
    """(N, h, w) float planes -> (N, out_h, out_w) float32 by PIL's bicubic kernel (a = -0.5) in
    its 32-bit float mode, unclipped: the one PIL float resize, for arrays here and tensors in
    :func:`ciisr_plugin.archs.fixed_scale_arch.pil_bicubic_resize`."""
    out = np.empty((planes.shape[0], out_h, out_w), dtype=np.float32)
    for i, plane in enumerate(planes):
        plane = np.ascontiguousarray(plane, dtype=np.float32)
        out[i] = np.asarray(Image.fromarray(plane, mode='F').resize((out_w, out_h), Image.BICUBIC))
    return out


def _pil_resize(img, out_h, out_w):
    if img.dtype == np.uint8:
        return to_float01(np.asarray(Image.fromarray(img).resize((out_w, out_h), Image.BICUBIC)))
    planes = pil_bicubic_planes(np.moveaxis(to_float01(img), 2, 0), out_h, out_w)
    return np.clip(np.moveaxis(planes, 0, 2), 0, 1).astype(np.float32)


def _matlab_axis(img, axis, out_len):
    """Resize ``img`` (float64) along ``axis`` with MATLAB's antialiased bicubic weights."""
    in_len = img.shape[axis]
    if in_len == out_len:
        return img
    weights, indices, sym_start, _ = calculate_weights_indices(in_len, out_len, out_len / in_len, 'cubic', 4, True)
    # BasicSR indexes a symmetrically padded copy; map back to 0-based source indices and
    # mirror (edge included) instead of padding.
    src = indices.numpy().astype(np.int64) - sym_start
    src = np.where(src < 0, -src - 1, src)
    src = np.where(src >= in_len, 2 * in_len - 1 - src, src)
    gathered = np.take(img, src, axis=axis)  # axis -> (out_len, taps)
    shape = [1] * gathered.ndim
    shape[axis], shape[axis + 1] = weights.shape
    return (gathered * weights.numpy().astype(np.float64).reshape(shape)).sum(axis=axis + 1)


def _matlab_resize(img, out_h, out_w):
    out = _matlab_axis(to_float01(img).astype(np.float64), 0, out_h)
    out = _matlab_axis(out, 1, out_w)
    if img.dtype == np.uint8:
        out = np.round(np.clip(out * 255, 0, 255)) / 255
    return np.clip(out, 0, 1).astype(np.float32)


def bicubic_resize(img, size, kernel='pil_bicubic'):
    """Native HxWx3 array -> float32 ``size`` = (h, w) image in [0, 1]."""
    out_h, out_w = int(size[0]), int(size[1])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f'bicubic_resize: output size must be positive, got {out_h}x{out_w}')
    if check_kernel(kernel) == 'pil_bicubic':
        return _pil_resize(img, out_h, out_w)
    return _matlab_resize(img, out_h, out_w)


def bicubic_resize_native(img, size, kernel='pil_bicubic'):
    """:func:`bicubic_resize` that stays 8-bit for 8-bit input (for chains of resizes that
    mirror images stored as 8-bit files between steps); other inputs give float32 [0, 1]."""
    out = bicubic_resize(img, size, kernel)
    if img.dtype == np.uint8:
        return np.round(out * 255).astype(np.uint8)
    return out
