"""Evaluation at any (also non-integer or anisotropic) scale, with the LR made from the HR."""
import math

import torch
from torch.utils import data as data

from basicsr.utils.registry import DATASET_REGISTRY

from .data_util import ImageSource, parse_scale
from .image_io import to_float01
from .resize import bicubic_resize, check_kernel


def scaled_sizes(hr_hw, scale):
    """LIIF's arithmetic for an HR image evaluated at ``scale`` = (sh, sw):
    ``h_lr = floor(H / sh + 1e-9)``, HR kept = top-left ``round(h_lr * sh)`` rows (same for
    columns; Python's ``round``, as the authors). Returns ((h_lr, w_lr), (h_hr, w_hr))."""
    (hr_h, hr_w), (sh, sw) = hr_hw, scale
    lr_h, lr_w = math.floor(hr_h / sh + 1e-9), math.floor(hr_w / sw + 1e-9)
    return (lr_h, lr_w), (round(lr_h * sh), round(lr_w * sw))


@DATASET_REGISTRY.register()
class ScaledHRImageDataset(data.Dataset):
    """HR folder + one ``scale`` (number, or ``[sh, sw]`` for anisotropic) -> bicubic LR / HR pairs.

    The LIIF paper's protocol for x6..x30 (the authors' ``sr-implicit-downsampled`` with no
    crop size): HR cropped top-left so that its size is ``round(h_lr * s)``, LR = bicubic
    downsampling of that crop to ``(h_lr, w_lr)``.

    Options: dataroot_gt, io_backend, meta_info_file, scale, downsample_kernel
    ('pil_bicubic' default, the authors'; 'matlab_bicubic').
    Returns: lq (3, h_lr, w_lr), gt (3, H', W'), scale (2,) = the given (sh, sw), lq_path, gt_path.
    """

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        # with a `scales` list, ArbitraryScaleSRModel rebuilds this dataset once per scale
        scale = opt.get('scale') if opt.get('scale') is not None else (opt.get('scales') or [None])[0]
        if scale is None:
            raise ValueError(f"dataset {opt.get('name', '')!r}: ScaledHRImageDataset needs 'scale' (a number or "
                             "[sh, sw]) or 'scales' (a list of them)")
        self.scale = parse_scale(scale)
        self.kernel = check_kernel(opt.get('downsample_kernel', 'pil_bicubic'))
        self.source = ImageSource(opt, 'dataroot_gt', 'gt')

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        img, path = self.source.read(index)
        (lr_h, lr_w), (hr_h, hr_w) = scaled_sizes(img.shape[:2], self.scale)
        if lr_h < 1 or lr_w < 1:
            raise ValueError(f'{path}: {img.shape[0]}x{img.shape[1]} image is too small for scale '
                             f'{self.scale[0]:g}x{self.scale[1]:g} (the LR would be {lr_h}x{lr_w})')
        crop = img[:hr_h, :hr_w]
        lq = torch.from_numpy(bicubic_resize(crop, (lr_h, lr_w), self.kernel)).permute(2, 0, 1).contiguous()
        gt = torch.from_numpy(to_float01(crop)).permute(2, 0, 1).contiguous()
        return {
            'lq': lq,
            'gt': gt,
            'scale': torch.tensor(self.scale, dtype=torch.float32),
            'lq_path': path,
            'gt_path': path
        }
