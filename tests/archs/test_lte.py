"""LTE, LTE+ and MetaSR are their authors' models: same weights -> same numbers, any size, tiled or not."""
from pathlib import Path

import pytest
import torch
from basicsr.archs import build_network

import ciisr_plugin
from ciisr_plugin.archs.implicit_query import make_cell, make_coord
from ciisr_plugin.checkpoint import CheckpointError
from ciisr_plugin.inference import tile_halo, upscale_tiled
from ciisr_plugin.ops import fused_cpu

LTE_FIXTURES = Path(__file__).resolve().parents[1] / 'authors_data' / 'lte'
TINY_EDSR = {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 2}
TINY = {
    'LTE': {'type': 'LTE', 'encoder': TINY_EDSR, 'hidden_dim': 16, 'hidden_list': [16, 16]},
    'LTEPlus': {'type': 'LTEPlus', 'encoder': TINY_EDSR, 'hidden_dim': 16, 'num_layer': 2},
    'MetaSR': {'type': 'MetaSR', 'encoder': TINY_EDSR, 'hidden': 16},
}


def queries(out_hw, b=1):
    coord = make_coord(out_hw).unsqueeze(0).expand(b, -1, -1)
    return coord, make_cell(out_hw, coord.shape[1]).unsqueeze(0).expand(b, -1, -1)


def tiny(kind):
    torch.manual_seed(0)
    net = build_network(TINY[kind]).eval()
    with torch.no_grad():  # no zero bias may hide a term
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _check_fixture(d, tol=1e-4):
    ckpt = d['checkpoint']
    ckpt['model']['sd'] = {k: v.float() if v.is_floating_point() else v for k, v in ckpt['model']['sd'].items()}
    net = ciisr_plugin.load_model(ckpt)
    lr = d['lr'][None].float()
    with torch.no_grad():
        out = net(lr, d['coord'][None], d['cell'][None])[0]
        up = net.upscale(lr, size=d['out_hw'])[0]
    assert (out - d['expected']).abs().max().item() <= tol
    assert tuple(up.shape[-2:]) == tuple(d['out_hw'])
    assert (up.permute(1, 2, 0).reshape(-1, 3) - d['expected']).abs().max().item() <= tol
    return net


def test_shared_lte_fixture(authors_fixture):
    net = _check_fixture(authors_fixture('lte_edsr_baseline_x2.7.pt'))
    assert type(net).__name__ == 'LTE'


def _lte_fixture_files():
    return sorted(LTE_FIXTURES.glob('*.pt'))


def test_lte_fixture_set_is_complete():
    names = [p.name for p in _lte_fixture_files()]
    for prefix in ('lte_', 'ltep_', 'metasr_'):
        assert any(n.startswith(prefix) for n in names), f'no {prefix}* fixture in {LTE_FIXTURES}'
    assert any('swinir' in n for n in names) and any('rdn' in n for n in names)


@pytest.mark.parametrize('path', _lte_fixture_files(), ids=lambda p: p.stem)
def test_authors_lte_family_fixture(path):
    """Every case made by running the authors' code (benchmarks/make_lte_fixtures.py)."""
    _check_fixture(torch.load(path, weights_only=False))


@pytest.mark.parametrize('kind', ['LTE', 'LTEPlus'])
def test_fast_path_is_the_literal_formulation(kind):
    net = tiny(kind).train()
    lq = torch.rand(2, 3, 9, 7)
    coord = torch.rand(2, 300, 2) * 2 - 1
    cell = torch.rand(2, 300, 2) * 0.3 + 0.02
    fast = net(lq, coord, cell)
    literal = net.denormalise(net.reference_query(net.encode(lq), coord, cell))
    assert (fast - literal).abs().max().item() < 1e-5
    weights = torch.rand_like(fast)
    g_fast = torch.autograd.grad((fast * weights).sum(), list(net.parameters()))
    g_lit = torch.autograd.grad((literal * weights).sum(), list(net.parameters()))
    for a, b in zip(g_fast, g_lit):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def test_lte_and_lte_plus_pair_frequencies_differently():
    """The authors' two files differ in how frequency channels meet the axes: the same weights
    must give different outputs, or one of the two pairings is not implemented."""
    lte = tiny('LTE')
    plus = build_network({**TINY['LTE'], 'pairing': 'halves'}).eval()
    plus.load_state_dict(lte.state_dict())
    lq = torch.rand(1, 3, 6, 6)
    coord, cell = queries((15, 15))
    with torch.no_grad():
        assert (lte(lq, coord, cell) - plus(lq, coord, cell)).abs().max().item() > 1e-3


def test_metasr_is_the_literal_formulation():
    net = tiny('MetaSR').train()
    lq = torch.rand(2, 3, 9, 7)
    coord, cell = queries((23, 16), b=2)
    fast = net(lq, coord, cell)
    literal = net.denormalise(net.reference_query(net.encode(lq), coord, cell))
    assert (fast - literal).abs().max().item() < 1e-5
    g_fast = torch.autograd.grad(fast.sum(), list(net.parameters()))
    g_lit = torch.autograd.grad(literal.sum(), list(net.parameters()))
    for a, b in zip(g_fast, g_lit):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize('kind', sorted(TINY))
def test_tiled_equals_whole_image(kind):
    net = tiny(kind)
    # the encoder's six 3x3 convs, the 3x3 reach of the estimator / unfolding, the ensemble neighbour + margin
    assert tile_halo(net) == 6 + 1 + 2
    lq = torch.rand(2, 3, 37, 29)
    with torch.no_grad():
        whole = upscale_tiled(net, lq, (90, 101), tile=1000)
        tiled = upscale_tiled(net, lq, (90, 101), tile=9)
        coord, cell = queries((90, 101), b=2)
        direct = net(lq, coord, cell)
    assert (whole - tiled).abs().max().item() <= 1e-5
    assert (whole.permute(0, 2, 3, 1).reshape(2, -1, 3) - direct).abs().max().item() <= 1e-6


@pytest.mark.parametrize('kind', ['LTE', 'LTEPlus'])
def test_tiles_of_a_wide_image_add_the_whole_images_skip(kind):
    # a query's coordinate moved into a tile's frame rounds again (~1e-5 px this far from the
    # origin); the bilinear skip of sharp content turned that into >1e-5 (the decoded part of a
    # query is the same arithmetic tiled or not)
    net = tiny(kind)
    lq = torch.rand(1, 3, 16, 400, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = upscale_tiled(net, lq, (24, 600), tile=1000)
        tiled = upscale_tiled(net, lq, (24, 600), tile=64)
    assert (whole - tiled).abs().max().item() <= 1e-6


@pytest.mark.parametrize('kind', ['LTE', 'LTEPlus'])
def test_fused_kernel_and_torch_paths_agree(kind):
    net = tiny(kind)
    lq = torch.rand(1, 3, 12, 10)
    try:
        with torch.no_grad():
            fused_cpu.set_enabled(True)
            a = net.upscale(lq, size=(31, 27))
            fused_cpu.set_enabled(False)
            b = net.upscale(lq, size=(31, 27))
    finally:
        fused_cpu.set_enabled(True)
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize('kind', sorted(TINY))
def test_cell_is_required(kind):
    net = tiny(kind)
    coord, _ = queries((5, 5))
    with pytest.raises(ValueError, match='cell'):
        net(torch.rand(1, 3, 4, 4), coord, None)


@pytest.mark.parametrize('kind', sorted(TINY))
def test_onnx_export_matches_torch(kind, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    from ciisr_plugin.tools.export import export_onnx
    net = tiny(kind)
    export_onnx(net, str(tmp_path / 'm.onnx'))
    session = ort.InferenceSession(str(tmp_path / 'm.onnx'))
    lq, coord, cell = torch.rand(2, 3, 11, 13), torch.rand(2, 50, 2) * 2 - 1, torch.full((2, 50, 2), 0.05)
    with torch.no_grad():
        ref = net(lq, coord, cell)
    out = session.run(None, {'lq': lq.numpy(), 'coord': coord.numpy(), 'cell': cell.numpy()})[0]
    assert abs(out - ref.numpy()).max() <= 1e-4


def test_authors_checkpoint_of_unknown_model_lists_known_names():
    ckpt = {'model': {'name': 'nope', 'args': {'encoder_spec': {'name': 'edsr-baseline', 'args': {}}}, 'sd': {}}}
    with pytest.raises(CheckpointError, match=r"known: .*lte, lte-fast, metasr"):
        ciisr_plugin.load_model(ckpt)
