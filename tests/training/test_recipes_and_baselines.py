"""Every recipe under options/ validates; fixed-scale baselines run in the arbitrary-scale harness."""
import pytest
import torch
from basicsr.archs import build_network
from torch.nn import functional as F

from ciisr_plugin.config import load_options, validate_options
from conftest import REPO

OPTIONS = sorted(p for p in (REPO / 'options').rglob('*.yml')
                 if not p.name.startswith('base_'))  # bases are not runnable on their own


@pytest.mark.parametrize('path', OPTIONS, ids=[p.name for p in OPTIONS])
def test_every_recipe_validates(path):
    opt = load_options(str(path))
    validate_options(opt, str(path), 'train' if path.name.startswith('train') else 'test')
    if not path.name.startswith('train'):  # a test file must not drag the base's train set in
        assert 'train' not in opt['datasets']


def test_liif_test_recipes_follow_the_paper():
    div2k = load_options('options/test_liif_div2k.yml')
    paired = sorted(d['scale'] for d in div2k['datasets'].values() if d['type'] == 'PairedScaleImageDataset')
    scaled = [d['scales'] for d in div2k['datasets'].values() if d['type'] == 'ScaledHRImageDataset']
    assert paired == [2, 3, 4] and scaled == [[6, 12, 18, 24, 30]]
    assert div2k['val']['metrics']['psnr'] == {'type': 'calculate_psnr_liif', 'mode': 'div2k'}
    bench = load_options('options/test_liif_benchmark.yml')
    names = {d['name'].split('_')[0] for d in bench['datasets'].values()}
    assert names == {'Set5', 'Set14', 'B100', 'Urban100'}
    assert bench['val']['metrics']['psnr']['mode'] == 'benchmark'


EDSR_X4 = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'upscale': 4}


def test_fixed_scale_baseline_resizes_its_input_to_land_on_the_target():
    net = build_network({'type': 'FixedScaleSR', 'net': EDSR_X4, 'net_scale': 4}).eval()
    lq = torch.rand(1, 3, 10, 12)
    with torch.no_grad():
        # x6 on 10x12 -> 60x72: the x4 network must see a bicubic 15x18 input
        out = net.upscale(lq, (60, 72))
        expected = net.net(F.interpolate(lq, size=(15, 18), mode='bicubic', align_corners=False,
                                         antialias=True).clamp(0, 1))
        assert out.shape == (1, 3, 60, 72)
        assert torch.equal(out, expected)
        # a size that is not a multiple of 4 still comes out exactly that size
        assert net.upscale(lq, (23, 37)).shape == (1, 3, 23, 37)
        # the query contract reads the rendered image at the queried pixel centres
        from ciisr_plugin.archs.implicit_query import make_cell, make_coord
        coord, cell = make_coord((60, 72)).unsqueeze(0), make_cell((60, 72), 60 * 72).unsqueeze(0)
        assert torch.equal(net(lq, coord, cell), out.flatten(2).transpose(1, 2))


def test_fixed_scale_baseline_loads_a_bare_basicsr_state_dict():
    bare = build_network(EDSR_X4)
    net = build_network({'type': 'FixedScaleSR', 'net': EDSR_X4, 'net_scale': 4})
    net.load_state_dict(bare.state_dict(), strict=True)  # BasicSR's released files have no 'net.' prefix
    for (k, v), (k2, v2) in zip(bare.state_dict().items(), net.net.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_bicubic_baseline_is_pil_bicubic():
    from PIL import Image
    import numpy as np
    lq = torch.rand(1, 3, 7, 9)
    out = build_network({'type': 'BicubicSR'}).upscale(lq, (14, 20))
    ref = np.stack([np.asarray(Image.fromarray(lq[0, c].numpy(), mode='F').resize((20, 14), Image.BICUBIC))
                    for c in range(3)])
    assert torch.allclose(out[0], torch.from_numpy(ref), atol=0, rtol=0)
