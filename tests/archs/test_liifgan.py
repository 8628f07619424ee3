"""LIIF-GAN / LIIF-GAN-S arch: the two-decoder sum, the mid feature, tiling, the paper's reference.

Independent references: each decoder is compared with a LIIF net (tested against the authors'
fixture) carrying the same weights on a hand-built encoder feature; the whole net with the
paper's model written plainly (``LIIFGAN.reference_query``).
"""
import pytest
import torch
from basicsr.archs import build_network
from torch import nn

from ciisr_plugin.archs.implicit_query import make_cell, make_coord
from literal_reference import literal_forward

TINY_EDSR = {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 2, 'mid_layer': 1}
MEAN, STD = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]  # not 0.5 / 0.5: a mean added to the increment would show

pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_net(**kw):
    torch.manual_seed(0)
    opt = {'type': 'LIIFGAN', 'encoder': dict(TINY_EDSR), 'hidden_list': [16], 'data_mean': MEAN, 'data_std': STD,
           **kw}
    net = build_network(opt)
    with torch.no_grad():  # perturb everything so no term can hide behind a zero init
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


class HandMidFeature(nn.Module):
    """EDSREncoder's running feature after its first residual block, written out by hand."""

    def __init__(self, edsr):
        super().__init__()
        self.edsr, self.out_channels = edsr, edsr.out_channels

    def forward(self, x):
        return self.edsr.body[0](self.edsr.conv_first(x))


def liif_with(encoder, decoder):
    liif = build_network({'type': 'LIIF', 'encoder': dict(TINY_EDSR), 'hidden_list': [16], 'data_mean': MEAN,
                          'data_std': STD})
    liif.encoder = encoder
    liif.decoder.load_state_dict(decoder.state_dict())
    return liif


@pytest.mark.parametrize('kw', [{}, {'decoder1_feature': 'last'}, {'dual_decoder': False}],
                         ids=['mid', 'last', 'single'])
def test_fast_path_matches_the_reference_with_gradients(kw):
    net = tiny_net(**kw)
    lq = torch.rand(2, 3, 7, 9)
    coord = torch.cat([make_coord((23, 16)), torch.rand(40, 2) * 2 - 1]).unsqueeze(0).expand(2, -1, -1)
    cell = make_cell((23, 16), coord.shape[1]).unsqueeze(0).expand(2, -1, -1)
    gt = torch.rand(2, coord.shape[1], 3)

    def run(forward):
        net.zero_grad()
        out = forward(net, lq, coord, cell)
        (out - gt).abs().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    fast, fast_grads = run(lambda m, *a: m(*a))
    ref, ref_grads = run(literal_forward)
    assert ref.std() > 0.02  # not two near-constants
    assert (fast - ref).abs().max().item() <= 1e-5
    assert set(fast_grads) == set(ref_grads) and any(n.startswith('decoder1.') for n in ref_grads)
    assert any(n.startswith('decoder2.') for n in ref_grads) == net.dual_decoder
    for name, g in fast_grads.items():
        assert ref_grads[name].abs().max() > 0, name
        assert (g - ref_grads[name]).abs().max().item() <= 1e-5 * max(1.0, ref_grads[name].abs().max().item()), name


def test_parts_are_two_liif_decoders_and_sum_to_forward():
    net = tiny_net()
    lq = torch.rand(2, 3, 7, 9)
    coord = make_coord((23, 16)).unsqueeze(0).expand(2, -1, -1)  # anisotropic, non-integer scales
    cell = make_cell((23, 16), coord.shape[1]).unsqueeze(0).expand(2, -1, -1)
    mean = torch.tensor(MEAN)
    with torch.no_grad():
        ip1, ip2 = net.forward_parts(lq, coord, cell)
        out = net(lq, coord, cell)
        ref1 = liif_with(HandMidFeature(net.encoder), net.decoder1)(lq, coord, cell)
        ref2 = liif_with(net.encoder, net.decoder2)(lq, coord, cell) - mean  # increment: no mean
        up = net.upscale(lq, (23, 16), chunk_size=50)
    torch.testing.assert_close(ip1, ref1, rtol=0, atol=1e-6)
    torch.testing.assert_close(ip2, ref2, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, ip1 + ip2, rtol=0, atol=1e-6)
    torch.testing.assert_close(up.flatten(2).transpose(1, 2), out, rtol=0, atol=1e-6)


def test_decoder1_on_last_feature():
    net = tiny_net(decoder1_feature='last')
    lq = torch.rand(1, 3, 6, 6)
    coord = make_coord((15, 15)).unsqueeze(0)
    cell = make_cell((15, 15), coord.shape[1]).unsqueeze(0)
    with torch.no_grad():
        ip1, ip2 = net.forward_parts(lq, coord, cell)
        ref1 = liif_with(net.encoder, net.decoder1)(lq, coord, cell)
        ref2 = liif_with(net.encoder, net.decoder2)(lq, coord, cell) - torch.tensor(MEAN)
    torch.testing.assert_close(ip1, ref1, rtol=0, atol=1e-6)
    torch.testing.assert_close(ip2, ref2, rtol=0, atol=1e-6)


@pytest.mark.parametrize('num_block, after_blocks', [(1, 1), (2, 1), (5, 2), (0, 0)])
def test_default_mid_feature_is_after_half_the_blocks(num_block, after_blocks):
    torch.manual_seed(0)
    encoder = build_network({'type': 'EDSREncoder', 'num_feat': 4, 'num_block': num_block}).eval()
    x = torch.rand(1, 3, 5, 6)
    with torch.no_grad():
        mid, last = encoder(x, return_mid=True)
        ref = encoder.conv_first(x)
        for block in encoder.body[:after_blocks]:
            ref = block(ref)
    assert torch.equal(last, encoder(x)) and torch.equal(mid, ref)
    net = tiny_net(encoder={'type': 'EDSREncoder', 'num_feat': 8, 'num_block': num_block}).eval()
    with torch.no_grad():  # and LIIF-GAN's decoder 1 can read it
        assert net.upscale(torch.rand(1, 3, 4, 4), (9, 7)).shape == (1, 3, 9, 7)


def test_single_decoder_is_liif():
    net = tiny_net(dual_decoder=False)
    lq = torch.rand(1, 3, 6, 6)
    coord = make_coord((13, 17)).unsqueeze(0)
    cell = make_cell((13, 17), coord.shape[1]).unsqueeze(0)
    with torch.no_grad():
        ip1, ip2 = net.forward_parts(lq, coord, cell)
        ref = liif_with(net.encoder, net.decoder1)(lq, coord, cell)
        out = net(lq, coord, cell)
    assert ip2 is None and net.decoder2 is None
    torch.testing.assert_close(ip1, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match='dual_decoder'):
        net.forward_parts(lq, coord, cell, detach_increment_feature=True)


def test_tiled_inference_matches_whole_image():
    from ciisr_plugin.inference import upscale_tiled
    net = tiny_net()
    lq = torch.rand(1, 3, 13, 11)
    with torch.no_grad():
        whole = net.upscale(lq, (33, 29))
        tiled = upscale_tiled(net, lq, (33, 29), tile=4)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)


def test_detached_increment_feature_gives_same_values():
    net = tiny_net(decoder1_feature='last')
    lq = torch.rand(1, 3, 5, 5)
    coord = make_coord((9, 9)).unsqueeze(0)
    cell = make_cell((9, 9), coord.shape[1]).unsqueeze(0)
    a = net.forward_parts(lq, coord, cell)
    b = net(lq, coord, cell, parts=True, detach_increment_feature=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize('opt, match', [
    ({'decoder1_feature': 'middle'}, 'decoder1_feature must be one of'),
    ({'dual_decoder': False, 'decoder1_feature': 'mid'}, "must be 'last'"),
    ({'encoder': {'type': 'BasicSREncoder', 'arch': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8,
                  'num_block': 1, 'upscale': 2}}, 'needs an encoder with a mid-layer feature'),
])
def test_bad_arch_options(opt, match):
    with pytest.raises(ValueError, match=match):
        build_network({'type': 'LIIFGAN', 'encoder': dict(TINY_EDSR), 'hidden_list': [16], **opt})
