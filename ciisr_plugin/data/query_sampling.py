"""Turning an HR patch into training queries: scattered pixels or a random group.

Coordinates are pixel centres on [-1, 1] in (row, col) order, made with the engine's
:func:`~ciisr_plugin.archs.implicit_query.make_coord` so they are bit-identical to the
coordinates the network sees at inference.
"""
import random

import numpy as np
import torch
import torch.nn.functional as F

from ciisr_plugin.archs.implicit_query import make_cell, make_coord


def sample_pixels(hr, sample_q=None):
    """LIIF's pixel sampling: ``sample_q`` distinct HR pixels (all when None).

    Args:
        hr: (3, H, W) HR patch.
    Returns:
        coord (Q, 2), cell (Q, 2), gt (Q, 3).
    """
    h, w = hr.shape[-2:]
    coord = make_coord((h, w))
    gt = hr.reshape(hr.shape[0], -1).t()
    if sample_q is not None:
        if sample_q > h * w:
            raise ValueError(f'sample_q={sample_q} exceeds the {h}x{w}={h * w} pixels of the HR patch')
        index = torch.from_numpy(np.random.choice(h * w, sample_q, replace=False))
        coord, gt = coord[index], gt[index]
    return coord, make_cell((h, w), coord.shape[0]), gt.contiguous()


def group_coords(hr_hw, top, left, size):
    """Coordinates of a ``size`` x ``size`` group of queries one HR pixel apart whose
    top-left query sits at (real-valued) pixel index ``(top, left)``: (size*size, 2), row-major.

    Pixel index ``i`` has centre ``-1 + (2 i + 1) / H``; for integer ``top``/``left`` the
    values are taken from :func:`make_coord` itself, so they equal the full-grid coords."""
    h, w = hr_hw
    if float(top).is_integer() and float(left).is_integer():
        grid = make_coord((h, w), flatten=False)[int(top):int(top) + size, int(left):int(left) + size]
        return grid.reshape(-1, 2)
    steps = torch.arange(size, dtype=torch.float64)
    rows = (-1 + (2 * (top + steps) + 1) / h).float()
    cols = (-1 + (2 * (left + steps) + 1) / w).float()
    return torch.stack(torch.meshgrid(rows, cols, indexing='ij'), dim=-1).reshape(-1, 2)


def sample_bilinear(hr, coord):
    """Bilinear values of ``hr`` (C, H, W) at ``coord`` (N, 2) [-1, 1] (row, col): (N, C).
    ``grid_sample`` with ``align_corners=False`` uses exactly the pixel-centre convention of
    :func:`make_coord` (pixel ``i`` at ``-1 + (2 i + 1) / H``)."""
    grid = coord.flip(-1).view(1, 1, -1, 2)
    out = F.grid_sample(hr.unsqueeze(0), grid, mode='bilinear', padding_mode='border', align_corners=False)
    return out.view(hr.shape[0], -1).t()


def sample_group(hr, size, subpixel=False):
    """LIIF-GAN's random group sampling: a ``size`` x ``size`` patch of queries.

    The group is a window of query points one HR pixel apart. Without ``subpixel`` its
    top-left is a uniformly random HR pixel, so the GT is exactly those HR pixels. With
    ``subpixel`` the top-left is a uniformly random real position in ``[0, H - size]`` x
    ``[0, W - size]`` (pixel-index units), every query stays between the centres of the
    outermost pixels, and the GT is the bilinear interpolation of the HR patch at exactly the
    returned coordinates.

    Returns:
        coord (size*size, 2) row-major, cell (size*size, 2) = (2/H, 2/W), gt (3, size, size).
    """
    h, w = hr.shape[-2:]
    if size > h or size > w:
        raise ValueError(f'group_size={size} exceeds the {h}x{w} HR patch')
    if subpixel:
        top, left = random.uniform(0, h - size), random.uniform(0, w - size)
        coord = group_coords((h, w), top, left, size)
        gt = sample_bilinear(hr, coord).t().reshape(hr.shape[0], size, size)
    else:
        top, left = random.randint(0, h - size), random.randint(0, w - size)
        coord = group_coords((h, w), top, left, size)
        gt = hr[:, top:top + size, left:left + size]
    return coord, make_cell((h, w), coord.shape[0]), gt.contiguous()


def random_dihedral(use_hflip=False, use_vflip=False, use_transpose=False):
    """Draw one flip/transpose combination; returns a function applying it to (C, H, W) tensors."""
    hflip = use_hflip and random.random() < 0.5
    vflip = use_vflip and random.random() < 0.5
    transpose = use_transpose and random.random() < 0.5

    def apply(x):
        if hflip:
            x = x.flip(-1)
        if vflip:
            x = x.flip(-2)
        if transpose:
            x = x.transpose(-2, -1)
        return x

    return apply
