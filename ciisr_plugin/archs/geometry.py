"""Where queries read a latent grid: the geometry every implicit model shares.

* :func:`make_coord` / :func:`coord_axis` - pixel-centre coordinates, computed bit-for-bit as
  the LIIF authors do (queries that sit exactly on a latent centre depend on the last bits);
* :func:`lookup_latents` - nearest-latent index, relative coordinate, relative cell and
  local-ensemble weight for each query, for all four ensemble shifts at once;
* :class:`PixelGrid` - the same, bit for bit, for the pixels of an output image, computed
  per axis (what the renderer uses);
* :class:`LatentWindow` - one tile's window of a larger latent grid, so that a tile's
  queries read global coordinates;
* :func:`grid_blocks` - how the renderer cuts an output into blocks of queries.

Nothing here knows about networks; ``implicit_query`` builds the decoding engine on it.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F


# The authors nudge shifted queries off exact cell borders and keep them inside the image.
_ENSEMBLE_EPS = 1e-6
_CLAMP = 1 - 1e-6
_AREA_EPS = 1e-9


def coord_axis(n, device=None):
    """Centres of ``n`` equal cells on [-1, 1] in float32, exactly as the authors' helper:
    ``(-1 + r) + (2 * r) * i`` with ``r = 1 / n`` (a Python-float offset added to a float32
    product). Any other formula is off by an ulp and flips border queries."""
    r = 1 / n
    return (-1 + r) + (2 * r) * torch.arange(n, device=device, dtype=torch.float32)


def make_coord(shape, flatten=True, device=None):
    """Pixel-centre coordinates of an ``(H, W)`` grid, ``(H, W, 2)`` or ``(H*W, 2)``, (row, col)."""
    rows, cols = (coord_axis(n, device) for n in shape)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing='ij'), dim=-1)
    return grid.view(-1, 2) if flatten else grid


def make_cell(shape, num, device=None):
    """Cell size ``(2/H, 2/W)`` of every one of ``num`` queries on an ``(H, W)`` grid."""
    cell = torch.empty(num, 2, device=device, dtype=torch.float32)
    cell[:, 0] = 2 / shape[0]
    cell[:, 1] = 2 / shape[1]
    return cell


class LatentLookup(NamedTuple):
    """Where each query reads the latent grid; leading dim = ensemble shift (4 or 1)."""
    index: torch.Tensor  # (S, B, N) long, flat index into the h*w latents
    rel_coord: torch.Tensor  # (S, B, N, 2) query - latent centre, in latent-cell units
    rel_cell: torch.Tensor  # (S, B, N, 2) cell size in latent-cell units
    weight: torch.Tensor  # (S, B, N) local-ensemble blend weight


class LatentWindow(tuple):
    """``(rows, cols)`` of a window cut from a larger latent grid, for tiled inference.

    It unpacks like the ``grid_hw`` it replaces (the window's own size, which is what
    gathering from the window's rows needs), and tells :func:`lookup_latents` to place
    queries on the full grid: ``origin`` is the window's top-left latent and ``full_hw``
    the full grid's size, so nearest latents and relative coordinates are computed exactly
    as for the whole image and only the row index is shifted into the window.
    """

    def __new__(cls, size, origin, full_hw):
        window = super().__new__(cls, (int(size[0]), int(size[1])))
        window.origin = (int(origin[0]), int(origin[1]))
        window.full_hw = (int(full_hw[0]), int(full_hw[1]))
        return window


def _nearest_latent(shifted, h, w):
    """(row, col) of the latent ``grid_sample(mode='nearest')`` picks for each query, so ties
    resolve exactly as in the authors' code on every device. The index maps are stride-0
    views (never materialised), so this costs nothing per latent."""
    s, b, n, _ = shifted.shape
    grid = shifted.reshape(s * b, 1, n, 2).flip(-1)
    maps = (torch.arange(h, device=shifted.device, dtype=torch.float32).view(1, 1, h, 1),
            torch.arange(w, device=shifted.device, dtype=torch.float32).view(1, 1, 1, w))
    picked = [F.grid_sample(m.expand(s * b, 1, h, w), grid, mode='nearest', align_corners=False) for m in maps]
    return tuple(p.view(s, b, n).long() for p in picked)


def lookup_latents(coord, cell, grid_hw, local_ensemble=True, centre_hw=None):
    """Nearest latents of each query for every ensemble shift.

    Args:
        coord: (B, N, 2) query coordinates in [-1, 1], (row, col).
        cell: (B, N, 2) query cell sizes, or None.
        grid_hw: (h, w) of the latent grid, or a :class:`LatentWindow` of it (the index
            then points into the window's rows; every query must land inside it).
        local_ensemble: blend the four surrounding latents (LIIF's local ensemble).
        centre_hw: measure the relative coordinate from the nearest centre of this grid
            instead (still in units of the latent grid's cells). Only the LTE authors' model
            does, with the input's grid: it differs from the latent grid when the encoder
            pads its input (their SwinIR), and then the two nearest points differ too.
    """
    window = grid_hw if isinstance(grid_hw, LatentWindow) else None
    h, w = grid_hw if window is None else window.full_hw
    if local_ensemble:
        # Half a latent cell in each direction; the order (-,-), (-,+), (+,-), (+,+) matters
        # because each prediction is weighted by the area of its diagonal opposite.
        shifts = [(vy * (2 / h / 2) + _ENSEMBLE_EPS, vx * (2 / w / 2) + _ENSEMBLE_EPS) for vy in (-1, 1)
                  for vx in (-1, 1)]
    else:
        shifts = [(0, 0)]
    b, n = coord.shape[:2]
    shifted = torch.stack([torch.stack([coord[..., 0] + dy, coord[..., 1] + dx], dim=-1) for dy, dx in shifts])
    shifted = shifted.clamp_(-_CLAMP, _CLAMP)  # (S, B, N, 2)

    row_idx, col_idx = _nearest_latent(shifted, h, w)

    if centre_hw is None or tuple(centre_hw) == (h, w):
        centre_hw, centre_rows, centre_cols = (h, w), row_idx, col_idx
    else:
        centre_rows, centre_cols = _nearest_latent(shifted, *centre_hw)
    centre = torch.stack([coord_axis(centre_hw[0], coord.device)[centre_rows],
                          coord_axis(centre_hw[1], coord.device)[centre_cols]], dim=-1)
    rel_coord = coord.unsqueeze(0) - centre
    rel_coord[..., 0] *= h
    rel_coord[..., 1] *= w

    if cell is not None:
        rel_cell = cell.clone()
        rel_cell[..., 0] *= h
        rel_cell[..., 1] *= w
        rel_cell = rel_cell.unsqueeze(0).expand(len(shifts), b, n, 2)
    else:
        rel_cell = None

    weight = _ensemble_weight(rel_coord[..., 0], rel_coord[..., 1])
    if window is None:
        return LatentLookup(row_idx * w + col_idx, rel_coord, rel_cell, weight)
    row_idx, col_idx = _into_window(row_idx, col_idx, window, 'lookup_latents')
    return LatentLookup(row_idx * window[1] + col_idx, rel_coord, rel_cell, weight)


def _ensemble_weight(rel_y, rel_x):
    """Local-ensemble blend weights from relative coordinates with the shift as leading dim:
    each shift is weighted by the area of its diagonal opposite (``flip(0)`` pairs them in
    the order (-,-), (-,+), (+,-), (+,+)), normalised over the shifts."""
    area = (rel_y * rel_x).abs() + _AREA_EPS
    return area.flip(0) / area.sum(dim=0)


def _into_window(row_idx, col_idx, window, caller):
    """Global latent rows / cols -> the window's own; every one must lie inside it (an index
    outside would silently read a neighbouring row of features)."""
    row_idx, col_idx = row_idx - window.origin[0], col_idx - window.origin[1]
    if min(row_idx.min(), col_idx.min()) < 0 or row_idx.max() >= window[0] or col_idx.max() >= window[1]:
        raise ValueError(f'{caller}: queries reach latents outside the window {tuple(window)} at '
                         f'{window.origin} of the {window.full_hw} grid')
    return row_idx, col_idx


def _axis_nearest(shifted, n):
    """Index along one axis of ``n`` latents that ``grid_sample(mode='nearest')`` picks for
    each coordinate of ``shifted`` (S, L): the same arithmetic as :func:`_nearest_latent`
    (grid_sample treats each axis on its own), on an (n, 1) map."""
    s, length = shifted.shape
    grid = torch.stack([torch.zeros_like(shifted), shifted], dim=-1).view(s, 1, length, 2)  # (x = 0, y)
    index_map = torch.arange(n, device=shifted.device, dtype=torch.float32).view(1, 1, n, 1).expand(s, 1, n, 1)
    return F.grid_sample(index_map, grid, mode='nearest', align_corners=False).view(s, length).long()


def _axis_lookup(coord, n, local_ensemble):
    """Nearest latent index and relative coordinate (latent units) of the 1-D ``coord`` along
    an axis of ``n`` latents, for each ensemble shift along it: (2 or 1, L) each."""
    offsets = [v * (2 / n / 2) + _ENSEMBLE_EPS for v in (-1, 1)] if local_ensemble else [0]
    shifted = torch.stack([coord + d for d in offsets]).clamp_(-_CLAMP, _CLAMP)
    index = _axis_nearest(shifted, n)
    rel = (coord.unsqueeze(0) - coord_axis(n, coord.device)[index]) * n
    return index, rel


def _combine_axes(row_part, col_part, cell, grid_hw, batch):
    """The :class:`LatentLookup` of every (row, col) pair of two axis lookups, row-major, all
    with cell ``(cell_h, cell_w)``; the ensemble shifts in lookup_latents' order (-,-),
    (-,+), (+,-), (+,+)."""
    (row_idx, rel_row), (col_idx, rel_col) = row_part, col_part
    window = grid_hw if isinstance(grid_hw, LatentWindow) else None
    h, w = grid_hw if window is None else window.full_hw
    row_len = w
    if window is not None:
        row_idx, col_idx = _into_window(row_idx, col_idx, window, 'PixelGrid.lookup')
        row_len = window[1]
    sy, r = rel_row.shape
    sx, c = rel_col.shape
    s, n = sy * sx, r * c
    # shift k = (k // sx, k % sx): row shift outer, column shift inner
    rel_y = rel_row.view(sy, 1, r, 1).expand(sy, sx, r, c).reshape(s, r, c)
    rel_x = rel_col.view(1, sx, 1, c).expand(sy, sx, r, c).reshape(s, r, c)
    index = (row_idx * row_len).view(sy, 1, r, 1) + col_idx.view(1, sx, 1, c)
    rel_coord = torch.stack([rel_y, rel_x], dim=-1).view(s, 1, n, 2)
    weight = _ensemble_weight(rel_y, rel_x).view(s, 1, n)
    rel_cell = torch.tensor([cell[0], cell[1]], device=rel_row.device, dtype=torch.float32)
    rel_cell[0] *= h
    rel_cell[1] *= w
    rel_cell = rel_cell.view(1, 1, 1, 2).expand(s, batch, n, 2)
    return LatentLookup(index.view(s, 1, n).expand(s, batch, n), rel_coord.expand(s, batch, n, 2), rel_cell,
                        weight.expand(s, batch, n))


class PixelGrid:
    """The pixel centres of an ``(H, W)`` output image, rendered block by block.

    :meth:`lookup` is :func:`lookup_latents` for a block's pixels, computed per axis: on a
    grid the nearest latent row and relative row coordinate depend on the pixel's row only
    (and likewise for columns), so each axis is looked up once per latent grid, for all H
    rows and W columns, and a block's lookup is a few broadcasts of slices of them - the
    very same float operations as :func:`lookup_latents` on the pixels' coordinates, so
    the result is identical (tested bit for bit).

    Two evaluation-protocol knobs (both off by default; the LTE authors' ``test.py``):

    * ``cell_scale = (fy, fx)`` multiplies the cell every query carries, per axis, keeping
      the coordinates: the authors' cell clipping for extrapolation is
      ``cell * max(scale / scale_max, 1)``. The cell is computed in float32 as they do it:
      ``2 / H`` (or ``2 / extent``) rounded to float32, then times the factor in float32.
    * ``extent = (EH, EW)``: the pixels are the top-left ``(H, W)`` of a grid of ``EH x EW``
      equal cells on [-1, 1] (an int, a :class:`fractions.Fraction` or a float per axis,
      ``>=`` the rendered size; default ``(H, W)``). For an output rendered from an LR image
      padded at its bottom/right, ``EH = H * padded_h / h`` keeps the pixel pitch of the
      unpadded output (a whole number for integer scales, where the grid is exactly the
      authors' ``make_coord(EH)`` cropped). Cells are ``2 / EH``.
    """

    def __init__(self, out_hw, device=None, cell_scale=None, extent=None):
        self.out_hw = (int(out_hw[0]), int(out_hw[1]))
        extent = self.out_hw if extent is None else tuple(extent)
        if len(extent) != 2 or any(not e >= n for e, n in zip(extent, self.out_hw)):
            raise ValueError(f'PixelGrid: extent {extent} must be (EH, EW) >= the rendered size {self.out_hw}')
        self.extent = extent
        self.rows = self._axis(self.out_hw[0], extent[0], device)
        self.cols = self._axis(self.out_hw[1], extent[1], device)
        fy, fx = (1.0, 1.0) if cell_scale is None else (float(cell_scale[0]), float(cell_scale[1]))
        if not (0 < fy < float('inf') and 0 < fx < float('inf')):
            raise ValueError(f'PixelGrid: cell_scale must be two positive finite factors, got {cell_scale}')
        self.cell_scale = (fy, fx)
        self.cell = tuple(self._cell(e, f) for e, f in zip(extent, self.cell_scale))
        self._axes = {}

    @staticmethod
    def _axis(count, extent, device):
        """The first ``count`` of ``extent`` cell centres: :func:`coord_axis`'s formula with
        ``r = 1 / extent`` (correctly rounded, also for a fractional extent)."""
        if extent == count:
            return coord_axis(count, device)
        from fractions import Fraction
        r = float(1 / Fraction(extent))
        return (-1 + r) + (2 * r) * torch.arange(count, device=device, dtype=torch.float32)

    @staticmethod
    def _cell(extent, factor):
        """``2 / extent`` in float32, times ``factor`` as a float32 op; as a Python float."""
        from fractions import Fraction
        cell = torch.tensor(float(2 / Fraction(extent)), dtype=torch.float32)
        if factor != 1:
            cell = cell * factor
        return cell.item()

    def lookup(self, block, grid_hw, local_ensemble=True, batch=1):
        """:class:`LatentLookup` of the pixels ``block = (r0, r1, c0, c1)``."""
        full_hw = tuple(grid_hw.full_hw if isinstance(grid_hw, LatentWindow) else grid_hw)
        key = (full_hw, bool(local_ensemble))
        axes = self._axes.get(key)
        if axes is None:  # blocks may be decoded by several threads: the first result is kept
            axes = self._axes.setdefault(key, (_axis_lookup(self.rows, full_hw[0], local_ensemble),
                                               _axis_lookup(self.cols, full_hw[1], local_ensemble)))
        (row_idx, rel_row), (col_idx, rel_col) = axes
        r0, r1, c0, c1 = block
        return _combine_axes((row_idx[:, r0:r1], rel_row[:, r0:r1]), (col_idx[:, c0:c1], rel_col[:, c0:c1]),
                             self.cell, grid_hw, batch)

    def coords(self, block, batch=1):
        """(batch, N, 2) coordinates and cells of the block's pixels, for per-query paths."""
        r0, r1, c0, c1 = block
        coord = torch.stack(torch.meshgrid(self.rows[r0:r1], self.cols[c0:c1], indexing='ij'), dim=-1)
        coord = coord.view(1, -1, 2).expand(batch, -1, -1)
        cell = torch.tensor(self.cell, device=coord.device, dtype=torch.float32).repeat(coord.shape[1], 1)
        return coord, cell.unsqueeze(0).expand(batch, -1, -1)


def flat_index(lookup, grid_hw):
    """(S*B*N,) row of every (shift, batch, query) of ``lookup`` in a (B*h*w, D) row table."""
    s, b, n = lookup.index.shape
    offset = torch.arange(b, device=lookup.index.device).view(1, b, 1) * (grid_hw[0] * grid_hw[1])
    return (lookup.index + offset).view(-1)


def grid_blocks(row_span, col_span, chunk):
    """(r0, r1, c0, c1) blocks covering ``row_span`` x ``col_span`` with about ``chunk`` pixels
    each: bands of whole rows when a row fits, else pieces of single rows."""
    (i0, i1), (j0, j1) = row_span, col_span
    width = max(1, min(j1 - j0, chunk))
    band = max(1, chunk // width)
    for r0 in range(i0, i1, band):
        for c0 in range(j0, j1, width):
            yield r0, min(i1, r0 + band), c0, min(j1, c0 + width)
