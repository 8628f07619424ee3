"""LIIF is the authors' model: same weights -> same numbers (fixture), every flag, any size."""
import re

import pytest
import torch
from basicsr.archs import build_network

import ciisr_plugin
from ciisr_plugin.archs.implicit_query import make_cell, make_coord
from ciisr_plugin.inference import tile_halo
from literal_reference import literal_forward

TINY_EDSR = {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 2}
TINY_RDN = {'type': 'RDNEncoder', 'num_feat': 8, 'config': 'A'}


def queries(out_hw, b=1):
    coord = make_coord(out_hw).unsqueeze(0).expand(b, -1, -1)
    return coord, make_cell(out_hw, coord.shape[1]).unsqueeze(0).expand(b, -1, -1)


def tiny_liif(encoder=TINY_EDSR, **flags):
    torch.manual_seed(0)
    net = build_network({'type': 'LIIF', 'encoder': encoder, 'hidden_list': [16, 16], **flags}).eval()
    # biases are zero-initialised nowhere; perturb everything so no term can hide
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_authors_fixture_forward_and_upscale(authors_fixture):
    d = authors_fixture('liif_edsr_baseline_x3.3.pt')
    net = ciisr_plugin.load_model(d['checkpoint'])
    with torch.no_grad():
        out = net(d['lr'][None], d['coord'][None], d['cell'][None])[0]
        up = net.upscale(d['lr'][None], size=d['out_hw'])[0]
    assert (out - d['expected']).abs().max().item() <= 1e-4
    assert tuple(up.shape[-2:]) == tuple(d['out_hw'])
    assert (up.permute(1, 2, 0).reshape(-1, 3) - d['expected']).abs().max().item() <= 1e-4


def test_upscale_grid_is_the_authors_grid(authors_fixture):
    d = authors_fixture('liif_edsr_baseline_x3.3.pt')
    assert torch.equal(make_coord(d['out_hw']), d['coord'])
    assert torch.equal(make_cell(d['out_hw'], d['coord'].shape[0]), d['cell'])


@pytest.mark.parametrize('flags', [
    {},
    {'feat_unfold': False},
    {'local_ensemble': False},
    {'cell_decode': False},
    {'feat_unfold': False, 'local_ensemble': False, 'cell_decode': False},
])
def test_matches_literal_formulation_for_each_flag(flags):
    net = tiny_liif(**flags)
    lq = torch.rand(2, 3, 7, 9)
    coord, cell = queries((23, 16), b=2)  # anisotropic, non-integer scales
    with torch.no_grad():
        fast = net(lq, coord, cell)
        slow = literal_forward(net, lq, coord, cell)
    assert fast.shape == (2, 23 * 16, 3)
    assert (fast - slow).abs().max().item() <= 1e-5


def test_rdn_encoder_matches_literal():
    net = tiny_liif(encoder=TINY_RDN)
    lq = torch.rand(1, 3, 6, 5)
    coord, cell = queries((17, 31))
    with torch.no_grad():
        assert (net(lq, coord, cell) - literal_forward(net, lq, coord, cell)).abs().max().item() <= 1e-5


def test_odd_integer_scale_border_queries_match_literal():
    # at odd integer scales some queries sit exactly on latent centres at the border
    net = tiny_liif()
    lq = torch.rand(1, 3, 5, 6)
    coord, cell = queries((15, 18))
    with torch.no_grad():
        assert (net(lq, coord, cell) - literal_forward(net, lq, coord, cell)).abs().max().item() <= 1e-5


@pytest.mark.parametrize('chunk', [1, 7, 100, 10 ** 6])
def test_upscale_and_query_are_chunk_size_invariant(chunk):
    net = tiny_liif()
    lq = torch.rand(2, 3, 6, 7)
    coord, cell = queries((13, 29), b=2)
    with torch.no_grad():
        ref = net(lq, coord, cell)
        out = net.upscale(lq, size=(13, 29), chunk_size=chunk)
        chunked = net.query(lq, coord, cell, chunk_size=chunk)
    assert out.shape == (2, 3, 13, 29)
    assert (out - ref.view(2, 13, 29, 3).permute(0, 3, 1, 2)).abs().max().item() <= 1e-6
    assert (chunked - ref).abs().max().item() <= 1e-6


def test_gradients_reach_encoder_and_decoder():
    net = tiny_liif().train()
    lq = torch.rand(2, 3, 8, 8)
    coord, cell = queries((12, 12), b=2)
    net(lq, coord, cell).abs().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradients_match_the_reference():
    net = tiny_liif().train()
    lq = torch.rand(2, 3, 6, 7)
    coord, cell = queries((15, 11), b=2)
    gt = torch.rand(2, coord.shape[1], 3)

    def grads(forward):
        net.zero_grad()
        (forward(net, lq, coord, cell) - gt).abs().mean().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    ours, ref = grads(lambda m, *a: m(*a)), grads(literal_forward)
    for name, g in ours.items():
        assert ref[name].abs().max() > 0, name
        assert (g - ref[name]).abs().max().item() <= 1e-5 * max(1.0, ref[name].abs().max().item()), name


def basicsr_rcan(num_group=2, num_block=2):
    """BasicSR's RCAN with its mean shift and 0-255 scaling neutralised: then its body is the
    LIIF authors' RCAN encoder, an implementation independent of ours."""
    torch.manual_seed(1)
    net = build_network({'type': 'RCAN', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_group': num_group,
                         'num_block': num_block, 'squeeze_factor': 4, 'upscale': 2, 'img_range': 1.0,
                         'rgb_mean': [0.0, 0.0, 0.0]}).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def basicsr_rcan_features(net, x, groups=None):
    """The feature map before BasicSR's RCAN upsamples (or after its first ``groups`` groups)."""
    first = net.conv_first(x)
    if groups is not None:
        return net.body[:groups](first)
    return net.conv_after_body(net.body(first)) + first


def rcan_in_authors_keys(net, num_block):
    """BasicSR RCAN weights under the key names of the LIIF authors' ``rcan`` encoder."""
    sd = {}
    for k, v in net.state_dict().items():
        if k.startswith(('upsample.', 'conv_last.')):
            continue  # their encoder has no tail when no_upsampling is set
        k = k.replace('conv_first.', 'head.0.').replace('conv_after_body.', f'body.{len(net.body)}.')
        k = k.replace('.residual_group.', '.body.').replace('.rcab.3.attention.1.', '.body.3.conv_du.0.')
        k = k.replace('.rcab.3.attention.3.', '.body.3.conv_du.2.').replace('.rcab.', '.body.')
        k = re.sub(r'^body\.(\d+)\.conv\.', rf'body.\1.body.{num_block}.', k)
        sd['encoder.' + k] = v
    for name in ('sub_mean', 'add_mean'):  # stored by them, never applied
        sd[f'encoder.{name}.weight'], sd[f'encoder.{name}.bias'] = torch.eye(3).view(3, 3, 1, 1), torch.zeros(3)
    return sd


def test_rcan_encoder_is_the_authors_rcan():
    reference = basicsr_rcan()
    ours = build_network({'type': 'RCANEncoder', 'num_feat': 8, 'num_group': 2, 'num_block': 2, 'reduction': 4,
                          'mid_layer': 1}).eval()
    ckpt = {'model': {'name': 'liif', 'args': {
        'encoder_spec': {'name': 'rcan', 'args': {'n_resgroups': 2, 'n_resblocks': 2, 'n_feats': 8, 'reduction': 4,
                                                  'no_upsampling': True}},
        'imnet_spec': {'name': 'mlp', 'args': {'out_dim': 3, 'hidden_list': [16, 16]}}}}}
    sd = rcan_in_authors_keys(reference, num_block=2)
    torch.manual_seed(2)
    for i, (d_in, d_out) in enumerate([(8 * 9 + 4, 16), (16, 16), (16, 3)]):  # Linear-init scale: outputs O(1)
        sd[f'imnet.layers.{2 * i}.weight'] = torch.randn(d_out, d_in) / d_in**0.5
        sd[f'imnet.layers.{2 * i}.bias'] = 0.1 * torch.randn(d_out)
    ckpt['model']['sd'] = sd
    loaded = ciisr_plugin.load_model(ckpt)
    ours.load_state_dict(loaded.encoder.state_dict())
    x = torch.rand(2, 3, 9, 7)
    with torch.no_grad():
        expected = basicsr_rcan_features(reference, x)
        assert (loaded.encoder(x) - expected).abs().max().item() <= 1e-5
        mid, last = ours(x, return_mid=True)
        assert (last - expected).abs().max().item() <= 1e-5
        assert (mid - basicsr_rcan_features(reference, x, groups=1)).abs().max().item() <= 1e-5
        coord, cell = queries((19, 15))
        assert (loaded(x[:1], coord, cell) - literal_forward(loaded, x[:1], coord, cell)).abs().max() <= 1e-5
    assert tile_halo(loaded) is None  # channel attention sees the whole image: never tiled


@pytest.mark.parametrize('arch,opt', [
    ('EDSR', {'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'upscale': 2}),
    ('RCAN', {'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_group': 1, 'num_block': 1, 'squeeze_factor': 4,
              'upscale': 2}),
    ('RRDBNet', {'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'num_grow_ch': 4}),
    ('SwinIR', {'upscale': 2, 'in_chans': 3, 'img_size': 8, 'window_size': 4, 'embed_dim': 12, 'depths': [1],
                'num_heads': [2], 'mlp_ratio': 1, 'upsampler': 'pixelshuffle'}),
])
def test_basicsr_archs_as_encoders(arch, opt):
    net = build_network({'type': 'LIIF', 'encoder': {'type': 'BasicSREncoder', 'arch': arch, **opt},
                         'hidden_list': [16]}).eval()
    lq = torch.rand(1, 3, 7, 10)  # not a multiple of SwinIR's window
    with torch.no_grad():
        out = net.upscale(lq, (15, 21))
    assert out.shape == (1, 3, 15, 21) and torch.isfinite(out).all()
