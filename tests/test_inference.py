"""Tiled / bf16 inference, ``basicsr upscale`` and ``basicsr export``.

References are independent of the code under test: whole-image ``net.upscale`` (itself
checked against the literal LIIF formulation and the authors' fixtures in test_liif.py),
receptive fields measured by perturbing one input pixel, bicubic alpha from
``F.interpolate``, and torch for the ONNX graph.
"""
import os
import threading
import time

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ciisr_plugin  # noqa: F401  (before basicsr: applies the compat fixes)
from basicsr.archs import build_network

from ciisr_plugin import inference
from ciisr_plugin.archs.implicit_query import (ImplicitSRNet, LatentWindow, PixelGrid, grid_blocks, lookup_latents,
                                               make_cell, make_coord)
from ciisr_plugin.checkpoint import describe
from ciisr_plugin.cli import main as cli_main
from ciisr_plugin.inference import encoder_receptive_radius, tile_halo, upscale_tiled
from ciisr_plugin.ops import cpu_features


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    # tiny tensors: one thread is faster, and immune to stalls when other processes share the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_EDSR = {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 1}
TINY_LIIF = {'type': 'LIIF', 'encoder': TINY_EDSR, 'hidden_list': [16, 16]}
TINY_ALIIF = {'type': 'ALIIF', 'encoder': TINY_EDSR, 'num_basis': 3, 'basis_hidden': [8, 8],
              'expansion_hidden': [16]}


def build(opt, **flags):
    torch.manual_seed(0)
    net = build_network({**opt, **flags}).eval()
    with torch.no_grad():  # no zero biases: every term must matter
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def whole(net, lq, size):
    with torch.no_grad():
        return net.upscale(lq, size=size)


# ----------------------------------------------------------------------------------------------
# receptive field
def measured_radius(encoder, width):
    """Farthest output column that responds to one lit pixel of a dark 1-row image. With
    non-negative weights and no biases nothing cancels and ReLUs pass everything, so the
    response is non-zero exactly on the receptive field (which depends only on the wiring)."""
    encoder = encoder.double().eval()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            p.abs_() if name.endswith('weight') else p.zero_()
        if hasattr(getattr(encoder, 'net', None), 'mean'):
            encoder.net.mean = torch.zeros_like(encoder.net.mean)  # BasicSR's mean shift
        x = torch.zeros(1, 3, 1, width, dtype=torch.float64)
        x[..., width // 2] = 1
        cols = torch.nonzero(encoder(x).amax(dim=(0, 1, 2)) > 0).flatten()
    return int(max(width // 2 - cols.min(), cols.max() - width // 2))


@pytest.mark.parametrize('opt, expected', [
    ({'type': 'EDSREncoder', 'num_feat': 4, 'num_block': 2}, 6),
    ({'type': 'EDSREncoder', 'num_feat': 4}, 34),  # EDSR-baseline depth: 16 blocks
    ({'type': 'RDNEncoder', 'num_feat': 4, 'config': 'A'}, 123),
    ({'type': 'BasicSREncoder', 'arch': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 4, 'num_block': 2,
      'upscale': 2}, 6),
])
def test_receptive_radius_is_the_measured_one(opt, expected):
    torch.manual_seed(0)
    encoder = build_network(opt)
    assert encoder_receptive_radius(encoder) == expected
    assert measured_radius(encoder, 2 * expected + 9) == expected


def test_nonlocal_encoder_has_no_radius_and_is_not_tiled():
    rcan = build_network({'type': 'BasicSREncoder', 'arch': 'RCAN', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8,
                          'num_group': 1, 'num_block': 1, 'squeeze_factor': 4, 'upscale': 2})
    assert encoder_receptive_radius(rcan) is None  # channel attention pools the whole image
    net = build({'type': 'LIIF', 'hidden_list': [8], 'encoder': {
        'type': 'BasicSREncoder', 'arch': 'RCAN', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_group': 1,
        'num_block': 1, 'squeeze_factor': 4, 'upscale': 2}})
    assert tile_halo(net) is None
    lq = torch.rand(1, 3, 12, 10)
    assert (upscale_tiled(net, lq, (30, 17)) - whole(net, lq, (30, 17))).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match='not local'):
        upscale_tiled(net, lq, (30, 17), tile=4)


# ----------------------------------------------------------------------------------------------
# the engine's window lookup
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


class OwnQueries(ImplicitSRNet):
    """An arch that implements ``query_prepared`` itself (no ``decode_prepared``): grids must
    reach it as per-query coordinates."""

    def __init__(self):
        super().__init__({'type': 'EDSREncoder', 'num_feat': 4, 'num_block': 1})
        self.calls = 0

    def prepare(self, feat):
        return feat, feat.shape[-2:]

    def query_prepared(self, prepared, coord, cell):
        self.calls += 1
        feat, _ = prepared
        picked = F.grid_sample(feat[:, :3], coord.flip(-1).unsqueeze(1), mode='bilinear', align_corners=False)
        return picked[:, :, 0].permute(0, 2, 1) + cell.sum(-1, keepdim=True)


def test_archs_with_their_own_query_prepared_render_through_it():
    torch.manual_seed(0)
    net = OwnQueries().eval()
    lq = torch.rand(2, 3, 6, 5)
    coord = make_coord((13, 11)).unsqueeze(0).expand(2, -1, -1)
    cell = make_cell((13, 11), coord.shape[1]).unsqueeze(0).expand(2, -1, -1)
    with torch.no_grad():
        ref = net(lq, coord, cell).view(2, 13, 11, 3).permute(0, 3, 1, 2)
        net.calls = 0
        got = net.upscale(lq, (13, 11), chunk_size=20)
    assert net.calls == 13 and torch.equal(got, ref)  # 13 rows of 11 queries fit in 20-query blocks


def test_forward_without_autograd_decodes_in_chunks():
    net = build({**TINY_LIIF, 'chunk_size': 50})
    lq = torch.rand(2, 3, 7, 6)
    coord = torch.rand(2, 237, 2) * 2 - 1
    cell = torch.full((2, 237, 2), 0.1)
    calls = []
    original = net.query_prepared

    def spy(prepared, coord, cell):
        calls.append(coord.shape[1])
        return original(prepared, coord, cell)

    net.query_prepared = spy
    with_grad = net(lq, coord, cell)  # autograd on: one batch, as training needs
    assert calls == [237] and with_grad.requires_grad
    calls.clear()
    with torch.no_grad():
        chunked = net(lq, coord, cell)
    assert calls == [50, 50, 50, 50, 37]
    assert (chunked - with_grad.detach()).abs().max().item() <= 1e-6


def test_wide_outputs_are_decoded_in_pieces_of_a_row():
    net = build(TINY_LIIF)
    lq = torch.rand(1, 3, 4, 30)
    seen = []
    original = net.query_grid

    def spy(prepared, grid, block, batch):
        r0, r1, c0, c1 = block
        seen.append((r1 - r0) * (c1 - c0))
        return original(prepared, grid, block, batch)

    net.query_grid = spy
    with torch.no_grad():
        img = net.upscale(lq, (8, 75), chunk_size=32)
        tiled = upscale_tiled(net, lq, (8, 75), chunk_size=32)
    assert max(seen) <= 32 and sum(seen) == 2 * 8 * 75
    del net.query_grid
    with torch.no_grad():
        ref = net.upscale(lq, (8, 75), chunk_size=10**6)
    assert (img - ref).abs().max().item() <= 1e-6 and (tiled - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_decoding_threads_give_the_same_image_and_ordered_blocks(precision):
    net = build(TINY_ALIIF)
    lq = torch.rand(1, 3, 14, 11)
    size = (40, 29)

    def render(workers):
        img, calls = torch.full((1, 3) + size, float('nan')), []

        def sink(top, left, block):
            calls.append((top, left, threading.get_ident()))
            assert not block.requires_grad and block.dtype == torch.float32
            img[:, :, top:top + block.shape[-2], left:left + block.shape[-1]] = block

        upscale_tiled(net, lq, size, tile=6, chunk_size=50, precision=precision, workers=workers, sink=sink)
        return img, calls

    before = torch.get_num_threads()
    ref, ref_calls = render(1)
    got, calls = render(3)
    assert torch.get_num_threads() == before
    assert torch.equal(got, ref)  # every pixel written, with the same numbers
    assert [c[:2] for c in calls] == [c[:2] for c in ref_calls] and len(calls) > 6  # same blocks, same order
    assert {ident for *_, ident in calls} == {threading.get_ident()}  # the sink runs in the caller's thread


def test_decode_in_order_keeps_order_and_bounds_the_blocks_in_flight():
    lock, running, peak = threading.Lock(), [0], [0]

    def decode(block):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002 * (block % 3))  # finish out of order
        with lock:
            running[0] -= 1
        return block * 10

    out = list(inference.decode_in_order(decode, iter(range(40)), workers=4))
    assert out == [(i, i * 10) for i in range(40)]
    assert peak[0] <= 4
    with pytest.raises(RuntimeError, match='boom'):
        list(inference.decode_in_order(lambda b: (_ for _ in ()).throw(RuntimeError('boom')), range(5), workers=2))


# ----------------------------------------------------------------------------------------------
# tiling
class CountingEncodes:
    """Records the LR crop sizes the net encodes."""

    def __init__(self, net):
        self.shapes = []
        self.encode = net.encode
        net.encode = self

    def __call__(self, lq):
        self.shapes.append(tuple(lq.shape[-2:]))
        return self.encode(lq)


@pytest.mark.parametrize('opt', [TINY_LIIF, TINY_ALIIF], ids=['LIIF', 'ALIIF'])
@pytest.mark.parametrize('flags', [{}, {'feat_unfold': False}, {'local_ensemble': False}, {'cell_decode': False}])
def test_tiled_equals_whole_image(opt, flags):
    net = build(opt, **flags)
    lq = torch.rand(2, 3, 23, 19)
    for size, tile, chunk in [((71, 40), 4, 97), ((69, 57), 7, 1000), ((80, 95), 1, 50), ((17, 11), 5, 64)]:
        ref = whole(net, lq, size)  # anisotropic non-integer, integer x3, x3.5/x5, downscale
        counter = CountingEncodes(net)
        out = upscale_tiled(net, lq, size, tile=tile, chunk_size=chunk)
        del net.encode
        assert any(s != (23, 19) for s in counter.shapes), 'no real tile was cut'
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 1e-5, (size, tile)


def test_edsr_baseline_depth_tiles_exactly():
    net = build({'type': 'LIIF', 'hidden_list': [16], 'encoder': {'type': 'EDSREncoder', 'num_feat': 4}})
    assert tile_halo(net) == 34 + 1 + 2
    lq = torch.rand(1, 3, 85, 81)
    ref = whole(net, lq, (197, 230))
    counter = CountingEncodes(net)
    out = upscale_tiled(net, lq, (197, 230), tile=20, chunk_size=4096)
    assert min(counter.shapes) < (85, 81)
    assert (out - ref).abs().max().item() <= 1e-5


def test_too_small_halo_is_wrong():
    # the test above could not pass with a halo that misses context
    net = build(TINY_LIIF)
    lq = torch.rand(1, 3, 23, 19)
    ref = whole(net, lq, (71, 40))
    out = upscale_tiled(net, lq, (71, 40), tile=4, halo=tile_halo(net) - 3)
    assert (out - ref).abs().max().item() > 1e-4


def test_sink_gets_every_pixel_once_and_auto_tile_follows_the_budget(monkeypatch):
    net = build(TINY_LIIF)
    lq = torch.rand(1, 3, 40, 33)
    ref = whole(net, lq, (101, 77))
    monkeypatch.setattr(inference, 'memory_budget', lambda device: 400_000)  # bytes: forces ~4 tiles
    counter = CountingEncodes(net)
    hits = torch.zeros(101, 77, dtype=torch.int32)
    got = torch.zeros(1, 3, 101, 77)

    def sink(top, left, block):
        hits[top:top + block.shape[-2], left:left + block.shape[-1]] += 1
        got[:, :, top:top + block.shape[-2], left:left + block.shape[-1]] = block

    assert upscale_tiled(net, lq, (101, 77), sink=sink) is None
    assert 1 < len(counter.shapes) < 40
    assert torch.equal(hits, torch.ones_like(hits))
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize('opt, width', [
    (TINY_LIIF, 16),  # the MLP's first layer
    (TINY_ALIIF, 16 + 3 * 8),  # expansion net + K bases, gathered from two tables for one decode
    ({'type': 'LIIFGAN', 'encoder': TINY_EDSR, 'hidden_list': [16, 16]}, 16),  # two decoders, one at a time
])
def test_default_chunk_follows_the_widest_first_layer_activation(opt, width):
    net = build(opt)
    footprint = inference._Footprint(net, torch.rand(1, 3, 20, 20))
    assert footprint.row_width == width
    assert inference.default_chunk_size(net, 'cpu', footprint.row_width) == min(
        net.chunk_size, max(256, inference.CPU_CHUNK_BYTES // (4 * width * 4)))


def test_auto_tile_is_whole_image_when_it_fits():
    assert inference.choose_tile((1, 3, 50, 70), per_latent=1000, halo=37, budget=10 ** 9) == 70
    assert inference.choose_tile((1, 3, 5000, 7000), per_latent=1000, halo=37, budget=10 ** 8) == 316 - 74


def test_arch_without_window_support_renders_untiled(monkeypatch):
    net = build(TINY_LIIF)
    lq = torch.rand(1, 3, 23, 19)

    def unsupported(feat, window):
        raise AssertionError('an arch declaring tileable = False is never asked for a window')
    monkeypatch.setattr(net, 'prepare_window', unsupported)
    net.tileable = False
    assert (upscale_tiled(net, lq, (40, 33), tile=4) - whole(net, lq, (40, 33))).abs().max().item() <= 1e-5


def test_prepare_must_return_prepared_to_tile():
    net = build(TINY_LIIF)
    real = net.prepare
    net.prepare = lambda feat: tuple(real(feat))  # a plain tuple, as archs returned before
    with pytest.raises(TypeError, match=r'must return Prepared\(rows, grid\).*tileable = False'):
        upscale_tiled(net, torch.rand(1, 3, 23, 19), (40, 33), tile=4)


def test_fixed_scale_models_use_their_own_upscale():
    net = build_network({'type': 'BicubicSR', 'kernel': 'torch'})
    lq = torch.rand(1, 3, 9, 8)
    assert torch.equal(upscale_tiled(net, lq, (20, 30)), net.upscale(lq, (20, 30)))


# ----------------------------------------------------------------------------------------------
# bf16
def test_bf16_latent_choice_stays_float32():
    coord = make_coord((37, 29)).unsqueeze(0)
    cell = make_cell((37, 29), coord.shape[1]).unsqueeze(0)
    ref = lookup_latents(coord, cell, (11, 9))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = lookup_latents(coord, cell, (11, 9))
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize('opt', [TINY_LIIF, TINY_ALIIF], ids=['LIIF', 'ALIIF'])
def test_bf16_close_to_fp32(opt):
    # bfloat16 keeps 8 significant bits (relative rounding 2**-9 per operation); through a
    # few layers that stays well inside one 8-bit output level (1/255), which is the bound:
    # bf16 output must not change a saved 8-bit image by more than one level.
    net = build(opt)
    lq = torch.rand(1, 3, 23, 19)
    ref = whole(net, lq, (71, 40))
    out = upscale_tiled(net, lq, (71, 40), tile=6, precision='bf16')
    err = (out - ref).abs()
    assert out.dtype == torch.float32
    assert err.max().item() <= 1 / 255
    assert err.max().item() > 1e-6  # it did run in bf16


# ----------------------------------------------------------------------------------------------
# basicsr upscale
@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    net = build(TINY_LIIF)
    path = tmp_path_factory.mktemp('ckpt') / 'tiny_liif.pth'
    torch.save(describe(TINY_LIIF, net.state_dict()), path)
    return str(path), net


def upscale_cli(*argv):
    return cli_main(['upscale', *(str(a) for a in argv)])


def expected_image(net, rgb01, size):
    """The model's output of an HxWx3 [0, 1] image at ``size``, as HxWx3 floats in [0, 1]."""
    lq = torch.from_numpy(rgb01).permute(2, 0, 1).unsqueeze(0).float()
    return whole(net, lq, size)[0].clamp(0, 1).permute(1, 2, 0).numpy()


def photo(size=(36, 40)):
    from skimage import data
    return cv2.resize(data.astronaut(), (size[1], size[0]), interpolation=cv2.INTER_AREA)  # RGB uint8


def test_upscale_photo_non_integer_scale_and_size(tmp_path, checkpoint):
    ckpt, net = checkpoint
    rgb = photo()
    src = tmp_path / 'astronaut.png'
    cv2.imwrite(str(src), rgb[:, :, ::-1])
    assert upscale_cli(src, '-o', tmp_path / 'x3.7.png', '--model', ckpt, '--scale', '3.7', '--tile', '8') == 0
    got = cv2.imread(str(tmp_path / 'x3.7.png'), cv2.IMREAD_UNCHANGED)[:, :, ::-1]
    assert got.shape == (133, 148, 3)  # round(36 * 3.7), round(40 * 3.7)
    want = expected_image(net, rgb / np.float32(255), (133, 148)) * 255
    assert np.abs(got - want).max() <= 0.5 + 1e-3

    assert upscale_cli(src, '-o', tmp_path / 'sized.jpg', '--model', ckpt, '--size', '50x30') == 0
    assert cv2.imread(str(tmp_path / 'sized.jpg')).shape == (30, 50, 3)
    assert upscale_cli(src, '-o', tmp_path / 'aniso.webp', '--model', ckpt, '--scale', '2x3',
                       '--precision', 'bf16') == 0
    assert cv2.imread(str(tmp_path / 'aniso.webp')).shape == (72, 120, 3)
    assert sorted(os.listdir(tmp_path)) == ['aniso.webp', 'astronaut.png', 'sized.jpg', 'x3.7.png']


def test_amx_is_read_from_the_cpu_flags(tmp_path, monkeypatch):
    info = tmp_path / 'cpuinfo'
    monkeypatch.setattr(cpu_features, 'CPUINFO', str(info))
    info.write_text('processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n')
    assert cpu_features.cpu_has_amx() is False
    info.write_text('processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n')
    assert cpu_features.cpu_has_amx() is True
    monkeypatch.setattr(cpu_features, 'CPUINFO', str(tmp_path / 'missing'))
    assert cpu_features.cpu_has_amx() is None


@pytest.mark.parametrize('amx, bf16_matmul', [(False, True), (False, False), (True, True), (None, False)])
def test_bf16_upscale_notes_a_cpu_without_amx(tmp_path, checkpoint, monkeypatch, capsys, amx, bf16_matmul):
    ckpt, _ = checkpoint
    monkeypatch.setattr(cpu_features, 'cpu_has_amx', lambda: amx)
    monkeypatch.setattr(cpu_features, 'cpu_has_bf16_matmul', lambda: bf16_matmul)
    cv2.imwrite(str(tmp_path / 'a.png'), photo((10, 12)))
    assert upscale_cli(tmp_path / 'a.png', '-o', tmp_path / 'b.png', '--model', ckpt, '--scale', '2',
                       '--precision', 'bf16', '--device', 'cpu') == 0
    err = capsys.readouterr().err
    assert ('no AMX' in err) == (amx is False)
    assert ('several times slower' in err) == (amx is False and not bf16_matmul)
    assert cv2.imread(str(tmp_path / 'b.png')).shape == (20, 24, 3)


def test_bf16_matmul_support_agrees_with_onednn():
    # where oneDNN says bf16 is supported its bf16 product must run; where not, it raises
    x = torch.randn(4, 8).bfloat16()
    w = torch.randn(3, 8).bfloat16()
    if cpu_features.cpu_has_bf16_matmul():
        torch.ops.mkldnn._linear_pointwise(x, w, None, 'none', [], '')
    else:
        with pytest.raises(RuntimeError):
            torch.ops.mkldnn._linear_pointwise(x, w, None, 'none', [], '')


def test_upscale_folder_keeps_names_and_formats(tmp_path, checkpoint):
    ckpt, _ = checkpoint
    (tmp_path / 'in').mkdir()
    cv2.imwrite(str(tmp_path / 'in' / 'a.png'), photo((10, 12)))
    cv2.imwrite(str(tmp_path / 'in' / 'b.tif'), photo((8, 9)))
    (tmp_path / 'in' / 'notes.txt').write_text('not an image')
    assert upscale_cli(tmp_path / 'in', '-o', tmp_path / 'out', '--model', ckpt, '--scale', '2') == 0
    assert sorted(os.listdir(tmp_path / 'out')) == ['a.png', 'b.tif']
    assert cv2.imread(str(tmp_path / 'out' / 'b.tif')).shape == (16, 18, 3)


def test_upscale_grayscale_stays_gray(tmp_path, checkpoint):
    ckpt, net = checkpoint
    gray = cv2.cvtColor(photo(), cv2.COLOR_RGB2GRAY)
    cv2.imwrite(str(tmp_path / 'g.png'), gray)
    assert upscale_cli(tmp_path / 'g.png', '-o', tmp_path / 'o.png', '--model', ckpt, '--scale', '2') == 0
    got = cv2.imread(str(tmp_path / 'o.png'), cv2.IMREAD_UNCHANGED)
    assert got.shape == (72, 80) and got.dtype == np.uint8
    out = expected_image(net, np.repeat(gray[:, :, None] / np.float32(255), 3, axis=2), (72, 80))
    want = (out @ np.array([0.299, 0.587, 0.114], np.float32)) * 255
    assert np.abs(got - want).max() <= 0.5 + 1e-3


def test_upscale_rgba_reattaches_bicubic_alpha(tmp_path, checkpoint):
    ckpt, net = checkpoint
    rgb = photo((20, 24))
    alpha = np.tile(np.linspace(0, 255, 24, dtype=np.float32), (20, 1)).astype(np.uint8)
    alpha[5:9, 5:9] = 0
    cv2.imwrite(str(tmp_path / 'a.png'), np.dstack([rgb[:, :, ::-1], alpha]))
    assert upscale_cli(tmp_path / 'a.png', '-o', tmp_path / 'o.png', '--model', ckpt, '--scale', '2.5') == 0
    got = cv2.imread(str(tmp_path / 'o.png'), cv2.IMREAD_UNCHANGED)
    assert got.shape == (50, 60, 4)
    want_rgb = expected_image(net, rgb / np.float32(255), (50, 60)) * 255
    assert np.abs(got[:, :, 2::-1] - want_rgb).max() <= 0.5 + 1e-3
    want_alpha = F.interpolate(torch.from_numpy(alpha / np.float32(255))[None, None], size=(50, 60),
                               mode='bicubic', align_corners=False).clamp(0, 1)[0, 0].numpy() * 255
    assert np.abs(got[:, :, 3] - want_alpha).max() <= 0.5 + 1e-3


def test_upscale_16bit_png_stays_16bit(tmp_path, checkpoint):
    ckpt, net = checkpoint
    rgb16 = (photo((18, 16)).astype(np.uint16) * 257 + np.arange(16, dtype=np.uint16)[None, :, None])
    cv2.imwrite(str(tmp_path / 'd.png'), rgb16[:, :, ::-1])
    assert upscale_cli(tmp_path / 'd.png', '-o', tmp_path / 'o.png', '--model', ckpt, '--scale', '3') == 0
    got = cv2.imread(str(tmp_path / 'o.png'), cv2.IMREAD_UNCHANGED)
    assert got.dtype == np.uint16 and got.shape == (54, 48, 3)
    want = expected_image(net, rgb16 / np.float32(65535), (54, 48)) * 65535
    assert np.abs(got[:, :, ::-1] - want).max() <= 0.5 + 0.05
    assert len(np.unique(got)) > 256  # really 16-bit content, not 8-bit scaled up


def _bad_cases(tmp, ckpt):
    img = tmp / 'ok.png'
    (tmp / 'empty.png').write_bytes(b'')
    (tmp / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + os.urandom(200))
    (tmp / 'noimages').mkdir()
    (tmp / 'noimages' / 'readme.txt').write_text('x')
    (tmp / 'bad.pth').write_bytes(b'not a checkpoint')
    out = ['-o', tmp / 'out' / 'r.png', '--model', ckpt]
    return {
        'missing file': [tmp / 'nope.png', *out, '--scale', '2'],
        'zero-byte image': [tmp / 'empty.png', *out, '--scale', '2'],
        'corrupt image': [tmp / 'corrupt.png', *out, '--scale', '2'],
        'folder without images': [tmp / 'noimages', '-o', tmp / 'out', '--model', ckpt, '--scale', '2'],
        'scale 0': [img, *out, '--scale', '0'],
        'negative scale': [img, *out, '--scale', '-2'],
        'nan scale': [img, *out, '--scale', 'nan'],
        'inf scale': [img, *out, '--scale', '2xinf'],
        'not a scale': [img, *out, '--scale', 'big'],
        'zero size': [img, *out, '--size', '0x10'],
        'absurd size': [img, *out, '--size', '100000x100000'],
        'webp too large': [img, '-o', tmp / 'out' / 'r.webp', '--model', ckpt, '--size', '20000x10'],
        'scale and size': [img, *out, '--scale', '2', '--size', '10x10'],
        'neither scale nor size': [img, *out],
        'file output, two inputs': [img, img, *out, '--scale', '2'],
        'unwritable format': [img, '-o', tmp / 'out' / 'r.gif', '--model', ckpt, '--scale', '2'],
        'bad checkpoint': [img, '-o', tmp / 'out' / 'r.png', '--model', tmp / 'bad.pth', '--scale', '2'],
        'missing checkpoint': [img, '-o', tmp / 'out' / 'r.png', '--model', tmp / 'no.pth', '--scale', '2'],
        'zero tile': [img, *out, '--scale', '2', '--tile', '0'],
        'overwrite input': [img, '-o', img, '--model', ckpt, '--scale', '2'],
    }


def test_upscale_bad_input_exits_2_with_one_line_and_no_output(tmp_path, checkpoint, capsys):
    ckpt, _ = checkpoint
    cv2.imwrite(str(tmp_path / 'ok.png'), photo((8, 8)))
    before = set(os.listdir(tmp_path))
    cases = _bad_cases(tmp_path, ckpt)
    created = set(os.listdir(tmp_path)) - before
    for name, argv in cases.items():
        capsys.readouterr()
        assert upscale_cli(*argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith('basicsr upscale: error: '), (name, err)
        assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out'), name
        assert set(os.listdir(tmp_path)) - before == created, name  # nothing written, no temp files
    assert (tmp_path / 'ok.png').stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# basicsr export
def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        if os.environ.get('CIISR_ALLOW_NO_ONNX'):
            pytest.skip('onnxruntime not installed (CIISR_ALLOW_NO_ONNX set)')
        pytest.fail('ONNX export tests need the onnx extra: pip install -e ".[onnx]" '
                    '(or set CIISR_ALLOW_NO_ONNX=1 to skip them)')
    return onnxruntime


def export_cli(*argv):
    return cli_main(['export', *(str(a) for a in argv)])


@pytest.mark.parametrize('opt', [TINY_LIIF, TINY_ALIIF], ids=['LIIF', 'ALIIF'])
def test_onnx_export_matches_torch_at_any_size(tmp_path, opt):
    ort = _onnxruntime()
    net = build(opt)
    ckpt = tmp_path / 'm.pth'
    torch.save(describe(opt, net.state_dict()), ckpt)
    assert export_cli('--model', ckpt, '-o', tmp_path / 'm.onnx') == 0
    session = ort.InferenceSession(str(tmp_path / 'm.onnx'), providers=['CPUExecutionProvider'])
    torch.manual_seed(3)
    for b, (h, w), out_hw in [(1, (12, 10), (31, 27)), (3, (7, 19), (20, 50))]:
        lq = torch.rand(b, 3, h, w)
        coord = torch.cat([make_coord(out_hw), torch.rand(100, 2) * 2 - 1]).unsqueeze(0).repeat(b, 1, 1)
        cell = make_cell(out_hw, coord.shape[1]).unsqueeze(0).repeat(b, 1, 1)
        got = session.run(None, {'lq': lq.numpy(), 'coord': coord.numpy(), 'cell': cell.numpy()})[0]
        with torch.no_grad():
            want = net(lq, coord, cell).numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4


def test_export_bad_input(tmp_path, checkpoint, capsys):
    ckpt, _ = checkpoint
    for argv in (['--model', ckpt, '-o', tmp_path / 'm.onnx', '--opset', '15'],
                 ['--model', ckpt, '-o', tmp_path / 'm.txt'],
                 ['--model', tmp_path / 'missing.pth', '-o', tmp_path / 'm.onnx']):
        capsys.readouterr()
        assert export_cli(*argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith('basicsr export: error: '), err
    assert os.listdir(tmp_path) == []
