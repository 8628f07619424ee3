"""SwinIREncoder is the LTE authors' SwinIR encoder: BasicSR's SwinIR body (the same code as
theirs) with the same weights gives the same numbers, on the padded, uncropped grid."""
import inspect
import re

import pytest
import torch
from basicsr.archs import build_network

import ciisr_plugin
from ciisr_plugin.archs.implicit_query import make_cell, make_coord
from ciisr_plugin.archs.swinir_encoder_arch import SwinIREncoder
from ciisr_plugin.checkpoint import CheckpointError, _authors_encoder_opt
from ciisr_plugin.inference import tile_halo
from literal_reference import literal_liif_forward

# small SwinIR: two RSTBs of two blocks (one shifted each), windows of 4, masks cached at 8x8
SIZES = {'img_size': 8, 'embed_dim': 8, 'depths': [2, 2], 'num_heads': [2, 2], 'window_size': 4, 'mlp_ratio': 2.}
DERIVED = ('attn_mask', 'relative_position_index')


def queries(out_hw, b=1):
    coord = make_coord(out_hw).unsqueeze(0).expand(b, -1, -1)
    return coord, make_cell(out_hw, coord.shape[1]).unsqueeze(0).expand(b, -1, -1)


def perturb(net, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # no zero bias or unit norm weight can hide a mix-up
            p.add_(0.05 * torch.randn_like(p))
    return net


def basicsr_swinir(**sizes):
    """BasicSR's SwinIR. Its forward subtracts a mean and scales by img_range, which the LTE
    authors' copy comments out; the tests read its body instead (:func:`swinir_features`)."""
    torch.manual_seed(1)
    net = build_network({'type': 'SwinIR', 'upscale': 2, 'upsampler': 'pixelshuffle', **SIZES, **sizes})
    return perturb(net.eval(), 1)


def reflect_pad(x, multiple):
    """Bottom/right reflection to whole windows, built from flips (not F.pad)."""
    for dim in (2, 3):
        pad = -x.shape[dim] % multiple
        x = torch.cat([x, x.flip(dim).narrow(dim, 1, pad)], dim=dim)
    return x


def swinir_features(net, x, window_size=4):
    """The authors' encoder forward, on BasicSR's modules: pad, body, the conv + LeakyReLU
    before the upsampler (its 64 channels are the authors' out_dim)."""
    first = net.conv_first(reflect_pad(x, window_size))
    return net.conv_before_upsample(net.conv_after_body(net.forward_features(first)) + first)


def in_authors_keys(net):
    """BasicSR SwinIR weights and buffers under the LTE authors' keys (the same SwinIR names)."""
    return {f'encoder.{k}': v for k, v in net.state_dict().items() if not k.startswith(('upsample.', 'conv_last.'))}


def authors_liif_checkpoint(sd, num_feat=64, hidden=16):
    torch.manual_seed(2)
    for i, (d_in, d_out) in enumerate([(num_feat * 9 + 4, hidden), (hidden, hidden), (hidden, 3)]):
        sd[f'imnet.layers.{2 * i}.weight'] = torch.randn(d_out, d_in) / d_in**0.5  # outputs O(1)
        sd[f'imnet.layers.{2 * i}.bias'] = 0.1 * torch.randn(d_out)
    return {'model': {'name': 'liif', 'args': {
        'encoder_spec': {'name': 'swinir', 'args': {'no_upsampling': True, **SIZES}},
        'imnet_spec': {'name': 'mlp', 'args': {'out_dim': 3, 'hidden_list': [hidden, hidden]}}}, 'sd': sd}}


def test_authors_swinir_checkpoint_is_basicsr_swinir_on_the_padded_grid():
    reference = basicsr_swinir()
    sd = in_authors_keys(reference)
    assert any(k.endswith('.attn_mask') for k in sd) and any(k.endswith('.relative_position_index') for k in sd)
    net = ciisr_plugin.load_model(authors_liif_checkpoint(sd))  # strict: every key placed
    assert type(net.encoder) is SwinIREncoder and net.encoder.out_channels == 64
    x = torch.randn(2, 3, 6, 7)  # not whole windows of 4: padded to 8 x 8
    with torch.no_grad():
        expected = swinir_features(reference, x)
        out = net.encoder(x)
        assert out.shape == (2, 64, 8, 8)  # the padding stays: the latent grid is 8 x 8
        assert (out - expected).abs().max().item() <= 1e-5
        # every size goes through the same masks: whole windows (cached at img_size 8) and others
        for hw in ((8, 8), (4, 12), (9, 5)):
            x = torch.randn(1, 3, *hw)
            assert (net.encoder(x) - swinir_features(reference, x)).abs().max().item() <= 1e-5
        # the decoder spans the padded grid, as the authors' LIIF does with feat.shape
        lq = torch.rand(1, 3, 6, 7)
        coord, cell = queries((13, 15))
        assert (net(lq, coord, cell) - literal_liif_forward(net, lq, coord, cell)).abs().max().item() <= 1e-5
    assert tile_halo(net) is None  # window attention and size-dependent padding: rendered untiled


def test_derived_buffers_are_recomputed_not_saved():
    reference = basicsr_swinir()
    ours = build_network({'type': 'SwinIREncoder', **SIZES}).eval()
    assert not [k for k in ours.state_dict() if k.endswith(DERIVED)]
    # what the rules drop from the authors' keys is what ours computes for itself
    buffers = dict(ours.named_buffers())
    stored = {k: v for k, v in reference.state_dict().items() if k.endswith(DERIVED)}
    assert stored.keys() == buffers.keys()
    assert all(torch.equal(v, buffers[k]) for k, v in stored.items())
    # so the state dict does not depend on the size the masks are cached at
    ours.load_state_dict(perturb(ours, 3).state_dict())
    other = build_network({'type': 'SwinIREncoder', **SIZES, 'img_size': 16}).eval()
    other.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(other(x), ours(x))


def test_key_rules_map_every_authors_key():
    ours = build_network({'type': 'SwinIREncoder', **SIZES})
    sd = in_authors_keys(basicsr_swinir())
    mapped = set()
    for key in sd:
        for pattern, repl in SwinIREncoder.authors_key_rules(SIZES):
            if re.match(pattern, key):
                key = None if repl is None else re.sub(pattern, repl, key)
                break
        if key is not None:
            mapped.add(key)
    assert mapped == {f'encoder.{k}' for k in ours.state_dict()}


def test_liif_on_swinir_builds_and_renders_untiled():
    torch.manual_seed(0)
    net = build_network({'type': 'LIIF', 'encoder': {'type': 'SwinIREncoder', 'num_feat': 8, **SIZES},
                         'hidden_list': [16, 16]})
    net = perturb(net.eval(), 0)
    assert net.encoder.receptive_radius is None and tile_halo(net) is None
    lq = torch.rand(1, 3, 5, 7)
    coord, cell = queries((12, 17))
    with torch.no_grad():
        up = net.upscale(lq, (12, 17))
        direct = net(lq, coord, cell).view(1, 12, 17, 3).permute(0, 3, 1, 2)
    assert up.shape == (1, 3, 12, 17)
    assert (up - direct).abs().max().item() <= 1e-5


def test_liifgan_cannot_read_a_mid_feature():
    encoder = {'type': 'SwinIREncoder', 'num_feat': 8, **SIZES}
    with pytest.raises(ValueError, match='SwinIREncoder'):
        build_network({'type': 'LIIFGAN', 'encoder': encoder, 'hidden_list': [16]})
    build_network({'type': 'LIIFGAN', 'encoder': encoder, 'hidden_list': [16], 'decoder1_feature': 'last'})


def test_authors_spec_defaults_are_their_swinir():
    # their make_swinir builds SwinIR() whatever the args: a real spec maps to our defaults
    assert _authors_encoder_opt({'name': 'swinir', 'args': {'no_upsampling': True}}) == {'type': 'SwinIREncoder'}
    assert _authors_encoder_opt({'name': 'swinir'}) == {'type': 'SwinIREncoder'}
    defaults = {k: p.default for k, p in inspect.signature(SwinIREncoder).parameters.items()}
    theirs = {'num_in_ch': 3, 'num_feat': 64, 'img_size': 48, 'embed_dim': 180, 'depths': (6, ) * 6,
              'num_heads': (6, ) * 6, 'window_size': 8, 'mlp_ratio': 2., 'qkv_bias': True, 'drop_path_rate': 0.1,
              'patch_norm': True, 'resi_connection': '1conv'}
    assert defaults == theirs
    opt = _authors_encoder_opt({'name': 'swinir', 'args': {'in_chans': 1, 'upscale': 4, **SIZES}})
    assert opt == {'type': 'SwinIREncoder', 'num_in_ch': 1, **SIZES}
    with pytest.raises(CheckpointError, match='ape'):
        _authors_encoder_opt({'name': 'swinir', 'args': {'ape': True}})


@pytest.mark.parametrize('bad, match', [
    ({'depths': [2, 2], 'num_heads': [2]}, 'one entry per RSTB'),
    ({'embed_dim': 10, 'num_heads': [2, 3]}, 'divisible'),
    ({'resi_connection': '2conv'}, 'resi_connection'),
])
def test_bad_sizes_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SwinIREncoder(**{**SIZES, **bad})


def test_too_small_to_pad_is_refused():
    net = SwinIREncoder(**SIZES).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 3, 6)).shape[-2:] == (4, 8)  # 3 rows reflect 1 more, 6 columns 2
        with pytest.raises(ValueError, match='too small'):
            net(torch.rand(1, 3, 2, 5))  # 2 rows cannot reflect 2 more
