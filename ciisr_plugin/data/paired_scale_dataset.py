"""Evaluation on stored LR/HR pairs (the official MATLAB-bicubic x2/x3/x4 sets)."""
import math

import torch
from torch.utils import data as data

from basicsr.utils.registry import DATASET_REGISTRY

from .data_util import paired_sources, parse_scale
from .image_io import to_float01


@DATASET_REGISTRY.register()
class PairedScaleImageDataset(data.Dataset):
    """Stored LR/HR pairs; the HR is cropped top-left to ``round(h_lr * sh) x round(w_lr * sw)``
    (``h_lr * s`` for the usual integer scales, as the authors' ``sr-implicit-paired``).

    Options: dataroot_gt, dataroot_lq, filename_tmpl ('{}'; e.g. '{}x4' for LR files named
    'babyx4.png'), io_backend, meta_info_file, scale (number or [sh, sw]; when absent it is
    inferred per image as ``H // h_lr``, ``W // w_lr`` like the authors).
    A pair whose sizes do not match the scale (HR smaller than the LR times the scale, or large
    enough for a bigger LR) raises a ValueError naming both files.
    Returns: lq (3, h_lr, w_lr), gt (3, H', W'), scale (2,), lq_path, gt_path.
    """

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.scale = None if opt.get('scale') is None else parse_scale(opt['scale'])
        self.gt_source, self.lq_source = paired_sources(opt, opt.get('filename_tmpl', '{}'))

    def __len__(self):
        return len(self.gt_source)

    def __getitem__(self, index):
        img_gt, gt_path = self.gt_source.read(index)
        img_lq, lq_path = self.lq_source.read(index)
        (lr_h, lr_w), (hr_h, hr_w) = img_lq.shape[:2], img_gt.shape[:2]
        if self.scale is None:
            scale = (hr_h // lr_h, hr_w // lr_w)
            if min(scale) < 1:
                raise ValueError(f'{lq_path}: LR {lr_h}x{lr_w} is larger than its HR {gt_path} ({hr_h}x{hr_w})')
        else:
            scale = self.scale
        crop_h, crop_w = round(lr_h * scale[0]), round(lr_w * scale[1])
        fits = hr_h >= crop_h and hr_w >= crop_w
        # An HR that would fit a larger LR at this scale means the pair is not at this scale.
        tight = hr_h < round((lr_h + 1) * scale[0]) and hr_w < round((lr_w + 1) * scale[1])
        if not (fits and tight):
            raise ValueError(f'{lq_path} ({lr_h}x{lr_w}) and {gt_path} ({hr_h}x{hr_w}) do not match scale '
                             f'{scale[0]:g}x{scale[1]:g} (the HR should be {crop_h}x{crop_w}, or larger by less '
                             f'than {math.ceil(scale[0])}x{math.ceil(scale[1])} px)')
        lq = torch.from_numpy(to_float01(img_lq)).permute(2, 0, 1).contiguous()
        gt = torch.from_numpy(to_float01(img_gt[:crop_h, :crop_w])).permute(2, 0, 1).contiguous()
        return {
            'lq': lq,
            'gt': gt,
            'scale': torch.tensor([float(scale[0]), float(scale[1])], dtype=torch.float32),
            'lq_path': lq_path,
            'gt_path': gt_path
        }
