"""Learning with size-varied ground truths (the LIIF paper, Sec. 5.3, CelebA-HQ)."""
import random

import numpy as np
import torch
from torch.utils import data as data

from basicsr.utils.registry import DATASET_REGISTRY

from .data_util import ImageSource, positive_int_option
from .image_io import to_float01
from .query_sampling import random_dihedral, sample_pixels
from .resize import bicubic_resize_native, check_kernel


@DATASET_REGISTRY.register()
class VariedSizeGTDataset(data.Dataset):
    """A fixed ``L x L`` input and a ground truth whose size varies from ``L`` to ``H``.

    The authors' recipe: the face image is bicubic-resized (PIL) to ``base_size`` (their
    256), the input is that resized to ``lq_size`` (L), the largest GT is it resized to
    ``gt_size_max`` (H); in training, image ``i`` of ``N`` gets a GT of side
    ``round(gt_size_min + (gt_size_max - gt_size_min) * i / (N - 1))`` resized from the H x H
    one (``gt_size_sampling: index``), so GT sizes are spread uniformly over the data set
    (``random`` draws the side uniformly per sample instead). Intermediate images stay 8-bit
    for 8-bit sources, as the authors' stored PNGs. Every image is made square.

    Options: dataroot_gt, io_backend, meta_info_file, lq_size (L), gt_size_max (H),
    gt_size_min (L), base_size (null = use the stored image as the base), gt_size_sampling
    ('index' | 'random'), downsample_kernel ('pil_bicubic'), use_hflip, sample_q (1024;
    null = all pixels), phase (BasicSR sets it).
    Returns in training (phase 'train'): lq (3, L, L), coord/cell (Q, 2), gt (Q, 3), scale (2,);
    otherwise lq (3, L, L), gt (3, H, H), scale (H / L,) * 2 -- the authors' paired evaluation.
    """

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.source = ImageSource(opt, 'dataroot_gt', 'gt')
        self.lq_size = positive_int_option(opt, 'lq_size', None)
        self.gt_size_max = positive_int_option(opt, 'gt_size_max', None)
        if self.lq_size is None or self.gt_size_max is None:
            raise ValueError('VariedSizeGTDataset needs lq_size (L) and gt_size_max (H)')
        self.gt_size_min = positive_int_option(opt, 'gt_size_min', self.lq_size)
        if self.gt_size_min > self.gt_size_max:
            raise ValueError(f'gt_size_min={self.gt_size_min} exceeds gt_size_max={self.gt_size_max}')
        self.base_size = positive_int_option(opt, 'base_size', None)
        self.sampling = opt.get('gt_size_sampling', 'index')
        if self.sampling not in ('index', 'random'):
            raise ValueError(f"gt_size_sampling: expected 'index' or 'random', got {self.sampling!r}")
        self.kernel = check_kernel(opt.get('downsample_kernel', 'pil_bicubic'))
        self.use_hflip = bool(opt.get('use_hflip', False))
        self.sample_q = positive_int_option(opt, 'sample_q', 1024)
        self.training = opt.get('phase', 'train') == 'train'
        if self.training and self.sample_q is not None and self.sample_q > self.gt_size_min**2:
            raise ValueError(f'sample_q={self.sample_q} exceeds the {self.gt_size_min}x{self.gt_size_min} pixels of '
                             'the smallest GT (gt_size_min)')

    def __len__(self):
        return len(self.source)

    def gt_side(self, index):
        if self.sampling == 'random':
            return random.randint(self.gt_size_min, self.gt_size_max)
        p = index / (len(self) - 1) if len(self) > 1 else 1.0
        return round(self.gt_size_min + (self.gt_size_max - self.gt_size_min) * p)

    @staticmethod
    def _chw(img):
        return torch.from_numpy(to_float01(np.ascontiguousarray(img))).permute(2, 0, 1).contiguous()

    def __getitem__(self, index):
        img, path = self.source.read(index)
        if self.base_size is not None:
            img = bicubic_resize_native(img, (self.base_size, self.base_size), self.kernel)
        lq = bicubic_resize_native(img, (self.lq_size, self.lq_size), self.kernel)
        gt = bicubic_resize_native(img, (self.gt_size_max, self.gt_size_max), self.kernel)
        if not self.training:
            side = self.gt_size_max
            return {
                'lq': self._chw(lq),
                'gt': self._chw(gt),
                'scale': torch.tensor([side / self.lq_size] * 2, dtype=torch.float32),
                'lq_path': path,
                'gt_path': path
            }

        side = self.gt_side(index)
        gt = bicubic_resize_native(gt, (side, side), self.kernel)
        augment = random_dihedral(use_hflip=self.use_hflip)
        lq, gt = augment(self._chw(lq)), augment(self._chw(gt))
        coord, cell, gt_q = sample_pixels(gt.contiguous(), self.sample_q)
        return {
            'lq': lq.contiguous(),
            'coord': coord,
            'cell': cell,
            'gt': gt_q,
            'scale': torch.tensor([side / self.lq_size] * 2, dtype=torch.float32),
            'lq_path': path,
            'gt_path': path
        }
