"""A-LIIF arch: the authors' fixture, a literal per-query transcription, chunking, gradients."""
import math

import pytest
import torch

import ciisr_plugin
from ciisr_plugin.archs.aliif_arch import ALIIF, normalise_coefficients
from literal_reference import literal_forward  # the arch's reference_query, as a whole network

ALIIF_FIXTURE = 'aliif_edsr_baseline_x3.pt'  # shared/fixtures/authors, found by conftest's authors_fixture
TINY_EDSR = {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 2}
TINY_RDN = {'type': 'RDNEncoder', 'num_feat': 8, 'config': 'A'}


def _tiny(encoder=TINY_EDSR, seed=0, **kwargs):
    """Tiny A-LIIF with decoder weights scaled up from the authors' (very small) init, so
    that every layer and every basis visibly shapes the output."""
    opts = dict(num_basis=3, basis_hidden=(6, 5), expansion_hidden=(12, 10))
    opts.update(kwargs)
    torch.manual_seed(seed)
    net = ALIIF(encoder=dict(encoder), **opts)
    with torch.no_grad():
        for i in range(net.basis.num_layers):
            d_in = net.basis.dims[i]
            getattr(net.basis, f'weight{i}').normal_(0, 1.5 / math.sqrt(d_in))
            getattr(net.basis, f'bias{i}').normal_(0, 0.3)
        if net.coeff_norm == 'sum':  # keep the coefficient sum well away from zero
            net.expansion.layers[-1].bias += 2.0
    return net


def _queries(b, out_hw, n_random, seed=1):
    """Pixel centres of an out_hw grid plus random points, (B, N, 2) each."""
    g = torch.Generator().manual_seed(seed)
    h, w = out_hw
    rows = (-1 + 1 / h) + (2 / h) * torch.arange(h, dtype=torch.float32)
    cols = (-1 + 1 / w) + (2 / w) * torch.arange(w, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing='ij'), dim=-1).view(1, -1, 2).expand(b, -1, -1)
    rand = torch.rand(b, n_random, 2, generator=g) * 2 - 1
    coord = torch.cat([grid, rand], dim=1)
    cell = torch.empty_like(coord)
    cell[..., 0], cell[..., 1] = 2 / h, 2 / w
    return coord, cell


# ----------------------------------------------------------------------------------------------
# the authors' fixture
@pytest.fixture
def aliif_fixture(authors_fixture):
    d = authors_fixture(ALIIF_FIXTURE)
    return d, ciisr_plugin.load_model(d['checkpoint'])


def test_fixture_forward_matches_authors(aliif_fixture):
    d, net = aliif_fixture
    assert isinstance(net, ALIIF)
    with torch.no_grad():
        out = net(d['lr'][None], d['coord'][None], d['cell'][None])[0]
    assert out.shape == d['expected'].shape
    err = (out - d['expected']).abs().max().item()
    assert err <= 1e-4, f'forward differs from the authors by {err:.3e}'


def test_fixture_upscale_matches_authors(aliif_fixture):
    d, net = aliif_fixture
    out_h, out_w = d['out_hw']
    with torch.no_grad():
        img = net.upscale(d['lr'][None], size=(out_h, out_w))[0]
    assert img.shape == (3, out_h, out_w)
    err = (img.permute(1, 2, 0).reshape(-1, 3) - d['expected']).abs().max().item()
    assert err <= 1e-4, f'upscale differs from the authors by {err:.3e}'


def test_default_parameters_have_authors_shapes(authors_fixture):
    """The paper configuration's basis / expansion tensors have exactly the shapes stored in
    the authors' checkpoint (renamed), and the bases start from the authors' init bounds."""
    sd = authors_fixture(ALIIF_FIXTURE)['checkpoint']['model']['sd']
    torch.manual_seed(0)
    net = ALIIF(encoder={'type': 'EDSREncoder'})
    ours = dict(net.named_parameters())
    for i in range(5):
        assert ours[f'basis.weight{i}'].shape == sd[f'basis.w{i}'].shape
        assert ours[f'basis.bias{i}'].shape == sd[f'basis.bias{i + 1}'].shape
    for key, value in sd.items():
        if key.startswith('pdn.'):
            assert ours[key.replace('pdn.', 'expansion.')].shape == value.shape
    # kaiming_uniform(a=sqrt(5)) on a (10, 16*580) tensor: bound 1/sqrt(9280); biases alike
    bound = 1 / math.sqrt(16 * 580)
    for name in ('weight0', 'bias0'):
        p = getattr(net.basis, name).abs().max().item()
        assert 0.9 * bound < p <= bound
    assert 0.9 / math.sqrt(48) < net.basis.bias4.abs().max().item() <= 1 / math.sqrt(48)


# ----------------------------------------------------------------------------------------------
# the literal per-query transcription
LITERAL_CASES = {
    'default': dict(),
    'no_local_ensemble': dict(local_ensemble=False),
    'no_feat_unfold': dict(feat_unfold=False),
    'no_cell_decode': dict(cell_decode=False),
    'all_flags_off': dict(local_ensemble=False, feat_unfold=False, cell_decode=False),
    'softmax': dict(coeff_norm='softmax'),
    'sum': dict(coeff_norm='sum'),
    'deeper_wider': dict(num_basis=5, basis_hidden=(7, 4, 9), expansion_hidden=(9, 11, 8), out_channels=2),
    'rdn': dict(encoder=TINY_RDN),
}


@pytest.mark.parametrize('case', sorted(LITERAL_CASES))
def test_fast_path_matches_literal(case):
    net = _tiny(**LITERAL_CASES[case]).eval()
    torch.manual_seed(3)
    lq = torch.rand(2, 3, 5, 7)  # anisotropic LR
    coord, cell = _queries(2, (13, 11), 40)  # non-integer, anisotropic scale + random points
    with torch.no_grad():
        ours = net(lq, coord, cell)
        ref = literal_forward(net, lq, coord, cell)
    assert ours.shape == ref.shape == (2, coord.shape[1], net.basis.dims[-1])
    assert ref.std() > 0.05  # the comparison is not between two near-constants
    err = (ours - ref).abs().max().item()
    assert err <= 1e-5, f'{case}: fast path differs from the literal formulation by {err:.3e}'


def test_upscale_matches_literal_on_grid():
    net = _tiny().eval()
    torch.manual_seed(4)
    lq = torch.rand(1, 3, 6, 4)
    coord, cell = _queries(1, (17, 9), 0)
    with torch.no_grad():
        img = net.upscale(lq, size=(17, 9))
        ref = literal_forward(net, lq, coord, cell, chunk=50)
    err = (img.permute(0, 2, 3, 1).reshape(1, -1, 3) - ref).abs().max().item()
    assert err <= 1e-5, err


def test_gradients_match_literal_and_reach_every_decoder_parameter():
    net = _tiny()
    torch.manual_seed(5)
    lq = torch.rand(2, 3, 5, 6)
    coord, cell = _queries(2, (11, 14), 30)
    gt = torch.rand(2, coord.shape[1], 3)

    def grads(fn):
        net.zero_grad()
        (fn(net, lq, coord, cell) - gt).abs().mean().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    ours = grads(lambda m, *a: m(*a))
    ref = grads(literal_forward)
    for name, g in ours.items():
        scale = ref[name].abs().max().item()
        assert (g - ref[name]).abs().max().item() <= 1e-5 * max(1.0, scale), name
        if name.startswith(('expansion.layers.', 'basis.')):
            assert torch.isfinite(g).all() and g.abs().max() > 0, f'no gradient reaches {name}'
    assert {f'basis.weight{i}' for i in range(3)} | {f'basis.bias{i}' for i in range(3)} <= set(ours)


def test_coefficient_normalisations_are_their_definitions():
    # the reference and the fast path share normalise_coefficients: here it meets the
    # definitions written out (F.normalize is x / max(||x||_2, eps))
    torch.manual_seed(7)
    logits = torch.randn(50, 6)
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    expected = {'l2': logits / logits.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12),
                'softmax': e / e.sum(dim=-1, keepdim=True),
                'sum': logits / logits.sum(dim=-1, keepdim=True)}
    for mode, want in expected.items():
        torch.testing.assert_close(normalise_coefficients(logits, mode), want, rtol=1e-6, atol=1e-7, msg=mode)
    assert torch.equal(normalise_coefficients(torch.zeros(2, 3), 'l2'), torch.zeros(2, 3))  # eps, no 0 / 0


# ----------------------------------------------------------------------------------------------
# chunking, options
def test_chunk_size_invariance():
    net = _tiny().eval()
    torch.manual_seed(6)
    lq = torch.rand(2, 3, 6, 5)
    coord, cell = _queries(2, (15, 12), 25)
    with torch.no_grad():
        whole = net(lq, coord, cell)
        chunked = net.query(lq, coord, cell, chunk_size=7)
        img_whole = net.upscale(lq, size=(15, 12), chunk_size=10**6)
        img_rows = net.upscale(lq, size=(15, 12), chunk_size=1)  # one output row per band
    assert (whole - chunked).abs().max().item() <= 1e-6
    assert (img_whole - img_rows).abs().max().item() <= 1e-6
    assert (img_whole.permute(0, 2, 3, 1).reshape(2, -1, 3) - whole[:, :180]).abs().max().item() <= 1e-6


def test_bad_coeff_norm_is_a_clear_error():
    with pytest.raises(ValueError, match="coeff_norm must be one of l2, softmax, sum; got 'l1'"):
        ALIIF(encoder=dict(TINY_EDSR), coeff_norm='l1')


@pytest.mark.parametrize('opt', [{'basis_hidden': 16}, {'expansion_hidden': []}, {'basis_hidden': [16, 0]}])
def test_bad_widths_are_a_clear_error(opt):
    with pytest.raises(ValueError, match='ALIIF: (basis|expansion)_hidden must be a non-empty list of positive ints'):
        ALIIF(encoder=dict(TINY_EDSR), **opt)


def test_registered_and_built_from_options():
    from basicsr.archs import build_network
    net = build_network({'type': 'ALIIF', 'encoder': dict(TINY_EDSR), 'num_basis': 4, 'basis_hidden': [8, 8]})
    assert isinstance(net, ALIIF)
    assert net.basis.weight0.shape == (4, 8 * (8 * 9 + 4))
    assert net.basis.weight2.shape == (4, 3 * 8)
