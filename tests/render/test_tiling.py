"""Tiles: encoder receptive fields, the halo, tiled == whole image, tile and chunk sizing.

References are independent of the code under test: whole-image ``net.upscale`` (itself checked
against the paper's reference formulation and the authors' fixtures in tests/archs/) and
receptive fields measured by perturbing one input pixel.
"""
import pytest
import torch

import ciisr_plugin  # noqa: F401  (before basicsr: applies the compat fixes)
from basicsr.archs import build_network

from ciisr_plugin import inference
from ciisr_plugin.inference import encoder_receptive_radius, tile_halo, upscale_tiled
from render_support import TINY_ALIIF, TINY_EDSR, TINY_LIIF, build, whole

pytestmark = pytest.mark.usefixtures('one_thread')


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
    assert inference.default_chunk_size('cpu', footprint.row_width) == min(
        inference.QUERY_CHUNK, max(256, inference.CPU_CHUNK_BYTES // (4 * width * 4)))


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
