"""Training data for arbitrary-scale SR: random-scale HR crops and their bicubic LR."""
import contextlib
import math
import random

import numpy as np
import torch
from torch.utils import data as data

from basicsr.utils.registry import DATASET_REGISTRY

from .data_util import ImageSource, positive_int_option
from .image_io import to_float01
from .query_sampling import random_dihedral, sample_group, sample_pixels
from .resize import bicubic_resize, check_kernel


@DATASET_REGISTRY.register()
class ArbitraryScaleImageDataset(data.Dataset):
    """HR images -> (LR patch, queries, GT) at a random continuous scale (LIIF's recipe).

    Per sample: ``s ~ U(scale_min, scale_max)`` (``sh``, ``sw`` drawn independently when
    ``anisotropic``); a ``round(lq_size * sh) x round(lq_size * sw)`` HR patch is cropped at a
    random place and downsampled to ``lq_size x lq_size``; both are flipped/transposed alike;
    then queries are drawn from the HR patch: ``sample_q`` scattered pixels, or (``group_size``)
    one ``P x P`` group (LIIF-GAN's random group sampling).

    Options: dataroot_gt, io_backend, meta_info_file, lq_size (48), scale_min (1), scale_max (4),
    anisotropic (false), downsample_kernel ('pil_bicubic' | 'matlab_bicubic'), use_hflip,
    use_vflip, use_transpose, use_rot (= use_vflip + use_transpose, BasicSR's name),
    sample_q (2304; null = every pixel), group_size (null), group_subpixel (false).
    A group must fit the smallest HR patch, ``group_size <= round(lq_size * scale_min)``
    (checked at construction; the paper's ``group_size = lq_size`` always fits); queries
    are one HR pixel apart, so the cell is the HR patch's ``(2/H, 2/W)`` in both modes.

    Returns: lq (3, lq_size, lq_size), coord (Q, 2), cell (Q, 2), gt (Q, 3) or (3, P, P),
    scale (2,) = realised (H_hr / lq_size, W_hr / lq_size) after augmentation, lq_path, gt_path.

    Randomness: an index from BasicSR's training sampler (``resume.ResumableSampler``) names its
    draw ``(seed, epoch, slot)``; the sample's random numbers are derived from it alone, so a
    sample is the same whatever the number of workers or processes and after a resume. A plain
    int index draws from the global ``random`` / ``numpy.random`` as before.
    """

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.source = ImageSource(opt, 'dataroot_gt', 'gt')
        self.lq_size = positive_int_option(opt, 'lq_size', 48)
        self.scale_min = float(opt.get('scale_min', 1))
        scale_max = opt.get('scale_max', 4)
        self.scale_max = self.scale_min if scale_max is None else float(scale_max)  # None: fixed scale
        if not (1 <= self.scale_min <= self.scale_max) or not math.isfinite(self.scale_max):
            raise ValueError(f'scale_min/scale_max: need 1 <= scale_min <= scale_max, got {self.scale_min}, '
                             f'{self.scale_max}')
        self.anisotropic = bool(opt.get('anisotropic', False))
        self.kernel = check_kernel(opt.get('downsample_kernel', 'pil_bicubic'))
        use_rot = bool(opt.get('use_rot', False))
        self.use_hflip = bool(opt.get('use_hflip', False))
        self.use_vflip = bool(opt.get('use_vflip', False)) or use_rot
        self.use_transpose = bool(opt.get('use_transpose', False)) or use_rot

        self.group_size = positive_int_option(opt, 'group_size', None)
        self.group_subpixel = bool(opt.get('group_subpixel', False))
        self.sample_q = positive_int_option(opt, 'sample_q', 2304)
        smallest = round(self.lq_size * self.scale_min)  # HR side at scale_min, the smallest patch
        if self.group_size is not None and self.group_size > smallest:
            raise ValueError(f'group_size={self.group_size} does not fit the {smallest}x{smallest} HR patch at '
                             f'scale_min={self.scale_min:g} (lq_size {self.lq_size}): use group_size <= {smallest} '
                             f'or scale_min >= {self.group_size / self.lq_size:g}')
        if self.group_size is None and self.sample_q is not None and self.sample_q > smallest * smallest:
            raise ValueError(f'sample_q={self.sample_q} exceeds the {smallest}x{smallest} HR patch at scale_min='
                             f'{self.scale_min:g} (lq_size {self.lq_size})')

    def __len__(self):
        return len(self.source)

    def draw_scale(self):
        sh = random.uniform(self.scale_min, self.scale_max)
        sw = random.uniform(self.scale_min, self.scale_max) if self.anisotropic else sh
        return sh, sw

    def __getitem__(self, index):
        with seeded_global_rng(getattr(index, 'key', None)):
            return self.make_sample(int(index))

    def make_sample(self, index):
        img, path = self.source.read(index)
        sh, sw = self.draw_scale()
        hr_h, hr_w = round(self.lq_size * sh), round(self.lq_size * sw)
        img_h, img_w = img.shape[:2]
        if img_h < hr_h or img_w < hr_w:
            need = round(self.lq_size * self.scale_max)
            raise ValueError(f'{path}: {img_h}x{img_w} image is smaller than the {hr_h}x{hr_w} HR crop drawn at scale '
                             f'{sh:.3g}x{sw:.3g} (lq_size {self.lq_size}); training images need >= {need} px per side')
        top, left = random.randint(0, img_h - hr_h), random.randint(0, img_w - hr_w)
        crop = img[top:top + hr_h, left:left + hr_w]
        lq = bicubic_resize(crop, (self.lq_size, self.lq_size), self.kernel)

        augment = random_dihedral(self.use_hflip, self.use_vflip, self.use_transpose)
        hr = augment(torch.from_numpy(to_float01(crop)).permute(2, 0, 1)).contiguous()
        lq = augment(torch.from_numpy(lq).permute(2, 0, 1)).contiguous()

        if self.group_size is not None:
            coord, cell, gt = sample_group(hr, self.group_size, self.group_subpixel)
        else:
            coord, cell, gt = sample_pixels(hr, self.sample_q)
        scale = torch.tensor([hr.shape[-2] / lq.shape[-2], hr.shape[-1] / lq.shape[-1]], dtype=torch.float32)
        return {'lq': lq, 'coord': coord, 'cell': cell, 'gt': gt, 'scale': scale, 'lq_path': path, 'gt_path': path}


@contextlib.contextmanager
def seeded_global_rng(key):
    """Run the block with ``random`` and ``numpy.random`` seeded from ``key`` (a tuple of
    ints), restoring their previous states after it; no-op for ``key=None``. (The sampling
    helpers draw from these global generators.)"""
    if key is None:
        yield
        return
    entropy = np.random.SeedSequence([int(k) for k in key]).generate_state(4)
    saved = random.getstate(), np.random.get_state()
    random.seed(int.from_bytes(entropy.tobytes(), 'little'))
    np.random.seed(entropy)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
