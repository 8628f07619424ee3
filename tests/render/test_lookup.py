"""Where queries read: the latent lookup of a tile's window, the pixel grid's lookup (bit for bit
the per-query one), the blocks a render is cut into, and float32 latent choice under bf16."""
import pytest
import torch

from ciisr_plugin.archs.implicit_query import (LatentWindow, PixelGrid, grid_blocks, lookup_latents, make_cell,
                                               make_coord)


def test_window_lookup_is_the_global_lookup_shifted():
    h, w = 9, 11
    coord = make_coord((31, 26)).unsqueeze(0)
    cell = make_cell((31, 26), coord.shape[1]).unsqueeze(0)
    # the queries whose latents all lie in rows 2..6, cols 3..9
    full = lookup_latents(coord, cell, (h, w))
    rows, cols = full.index // w, full.index % w
    inside = ((rows >= 2) & (rows < 7) & (cols >= 3) & (cols < 10)).all(dim=0)[0]
    sub_coord, sub_cell = coord[:, inside], cell[:, inside]
    ref = lookup_latents(sub_coord, sub_cell, (h, w))
    got = lookup_latents(sub_coord, sub_cell, LatentWindow((5, 7), (2, 3), (h, w)))
    assert torch.equal(got.index, (ref.index // w - 2) * 7 + (ref.index % w - 3))
    for a, b in ((got.rel_coord, ref.rel_coord), (got.rel_cell, ref.rel_cell), (got.weight, ref.weight)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match='outside the window'):
        lookup_latents(coord, cell, LatentWindow((5, 7), (2, 3), (h, w)))


# (latent grid, output size): odd integer scales put queries exactly on latent centres at the
# border, where the ensemble weights are decided by the last bits; the rest are non-integer,
# anisotropic, down-scaling, and a grid of one latent
GRID_CASES = [((24, 30), (72, 90)), ((24, 30), (79, 99)), ((5, 7), (13, 11)), ((3, 3), (9, 9)), ((7, 5), (21, 35)),
              ((10, 10), (10, 10)), ((6, 4), (17, 9)), ((9, 12), (4, 5)), ((1, 1), (3, 2))]


@pytest.mark.parametrize('local_ensemble', [True, False])
@pytest.mark.parametrize('grid_hw,out_hw', GRID_CASES)
def test_pixel_grid_lookup_is_bit_identical_to_the_per_query_lookup(grid_hw, out_hw, local_ensemble):
    grid = PixelGrid(out_hw)
    blocks = list(grid_blocks((0, out_hw[0]), (0, out_hw[1]), 37))  # ragged blocks, some mid-row
    blocks.append((out_hw[0] // 3, out_hw[0], out_hw[1] // 4, out_hw[1]))  # away from the image corner
    for block in blocks:
        coord, cell = grid.coords(block, batch=2)
        ref = lookup_latents(coord, cell, grid_hw, local_ensemble)
        got = grid.lookup(block, grid_hw, local_ensemble, batch=2)
        for name in ref._fields:
            assert torch.equal(getattr(got, name), getattr(ref, name)), (block, name)


def test_pixel_grid_lookup_in_a_window_matches_the_window_lookup():
    h, w, out_hw = 9, 11, (31, 26)
    window = LatentWindow((5, 7), (2, 3), (h, w))
    grid = PixelGrid(out_hw)
    block = (9, 21, 9, 21)  # pixels whose latents all lie in the window's rows 2..6, cols 3..9
    coord, cell = grid.coords(block)
    ref = lookup_latents(coord, cell, window)
    got = grid.lookup(block, window)
    for name in ref._fields:
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    with pytest.raises(ValueError, match='outside the window'):
        grid.lookup((0, 31, 9, 21), window)


def test_grid_blocks_cover_the_span_once_within_the_chunk():
    cases = ((((0, 7), (0, 50)), 16), (((3, 20), (5, 9)), 10), (((0, 4), (0, 4)), 100), (((0, 3), (2, 5)), 1))
    for span, chunk in cases:
        seen = torch.zeros(span[0][1], span[1][1], dtype=torch.int64)
        for r0, r1, c0, c1 in grid_blocks(*span, chunk):
            assert (r1 - r0) * (c1 - c0) <= chunk
            seen[r0:r1, c0:c1] += 1
        (i0, i1), (j0, j1) = span
        assert (seen[i0:i1, j0:j1] == 1).all() and seen.sum() == (i1 - i0) * (j1 - j0)


def test_bf16_latent_choice_stays_float32():
    coord = make_coord((37, 29)).unsqueeze(0)
    cell = make_cell((37, 29), coord.shape[1]).unsqueeze(0)
    ref = lookup_latents(coord, cell, (11, 9))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = lookup_latents(coord, cell, (11, 9))
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)
