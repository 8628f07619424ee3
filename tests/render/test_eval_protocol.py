"""The LTE authors' evaluation protocol as options of the renderer and of ``basicsr test``:
cell clipping for extrapolation (``cell * max(scale / scale_max, 1)``) and window padding
(symmetric padding to ``(h // window + 1) * window``, render on the padded grid, crop).

The references are written out here the authors' way: the query cell multiplied by hand and
``net(lq, coord, cell)``; the input padded by ``cat([x, flip(x)])`` and rendered whole.
"""
import re

import cv2
import numpy as np
import pytest
import torch
import yaml

from ciisr_plugin.archs.implicit_query import PixelGrid, lookup_latents, make_cell, make_coord
from ciisr_plugin.cli import main
from ciisr_plugin.inference import pad_symmetric, upscale_tiled, window_padding
from ciisr_plugin.metrics.psnr_liif_metric import calculate_psnr_liif
from ciisr_plugin.models.arbitrary_scale_sr_model import clipped_cell_scale
from render_support import TINY_LIIF, build, tiny_checkpoint

pytestmark = pytest.mark.usefixtures('one_thread')


def forward_image(net, lq, coord, cell, out_hw):
    """``net(lq, coord, cell)`` as a (B, 3, H, W) image."""
    with torch.no_grad():
        pred = net(lq, coord, cell)
    return pred.view(lq.shape[0], out_hw[0], out_hw[1], -1).permute(0, 3, 1, 2)


def authors_pad(x, window):
    """The LTE authors' test.py padding, literally (each side once)."""
    h, w = x.shape[-2:]
    h_pad, w_pad = (h // window + 1) * window - h, (w // window + 1) * window - w
    x = torch.cat([x, torch.flip(x, [2])], 2)[:, :, :h + h_pad, :]
    return torch.cat([x, torch.flip(x, [3])], 3)[:, :, :, :w + w_pad]


# ----------------------------------------------------------------------------------------------
# cell clipping
@pytest.mark.parametrize('out_hw, factor', [((27, 21), (1.5, 1.5)), ((23, 30), (1.75, 2.5))])
def test_cell_factor_reaches_the_decoder(out_hw, factor):
    net = build(TINY_LIIF)
    torch.manual_seed(1)
    lq = torch.rand(1, 3, 9, 7)
    coord = make_coord(out_hw).unsqueeze(0)
    cell = make_cell(out_hw, coord.shape[1]).unsqueeze(0)
    expected = forward_image(net, lq, coord, cell * torch.tensor(factor), out_hw)
    got = upscale_tiled(net, lq, out_hw, cell_scale=factor)
    assert (got - expected).abs().max().item() <= 1e-6
    plain = upscale_tiled(net, lq, out_hw)
    assert (got - plain).abs().max().item() > 1e-3  # the factor changes what the decoder sees
    # a factor of 1 changes nothing, bit for bit
    assert torch.equal(upscale_tiled(net, lq, out_hw, cell_scale=(1, 1)), plain)


def test_clipped_cell_is_the_authors_cell_bit_for_bit():
    """Isotropic: ``make_cell(...) * max(scale / scale_max, 1)`` as the authors compute it, for
    the grid's lookup (rel_cell) and for per-query paths (coords)."""
    out_hw, grid_hw, scale, scale_max = (42, 35), (7, 5), 6, 4
    factor = max(scale / scale_max, 1)
    grid = PixelGrid(out_hw, cell_scale=clipped_cell_scale([scale, scale], scale_max))
    coord = make_coord(out_hw).unsqueeze(0)
    authors_cell = make_cell(out_hw, coord.shape[1]).unsqueeze(0) * factor
    got_coord, got_cell = grid.coords((0, out_hw[0], 0, out_hw[1]))
    assert torch.equal(got_coord, coord) and torch.equal(got_cell, authors_cell)
    expected = lookup_latents(coord, authors_cell, grid_hw)
    assert torch.equal(grid.lookup((0, out_hw[0], 0, out_hw[1]), grid_hw).rel_cell, expected.rel_cell)


def test_clipped_cell_scale_per_axis():
    assert clipped_cell_scale([2, 3], 4) == (1, 1)
    assert clipped_cell_scale([6, 8], 4) == (1.5, 2.0)
    assert clipped_cell_scale([3, 12], 4) == (1, 3.0)
    assert clipped_cell_scale([6, 6], None) is None


# ----------------------------------------------------------------------------------------------
# window padding
def test_symmetric_padding_repeats_the_edge():
    x = torch.arange(5.).view(1, 1, 5, 1).expand(1, 1, 5, 2)
    assert window_padding(5, 8) == 3 and window_padding(8, 8) == 8  # a whole window more when a multiple
    assert pad_symmetric(x, 3, 0)[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 4, 3, 2]
    y = torch.rand(1, 2, 5, 7)
    assert torch.equal(pad_symmetric(y, 3, 1), authors_pad(y, 8))
    # a pad longer than the image mirrors again (the authors' single flip would come out short)
    assert pad_symmetric(x, 11, 0)[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 0, 1, 2, 3, 4, 4]


@pytest.mark.parametrize('lq_hw, scale', [((13, 11), 3), ((8, 10), 2), ((9, 16), 4)])
def test_padding_and_crop_equal_rendering_the_padded_input(lq_hw, scale):
    net = build(TINY_LIIF)
    torch.manual_seed(2)
    lq = torch.rand(1, 3, *lq_hw)
    out_hw = (scale * lq_hw[0], scale * lq_hw[1])
    padded = authors_pad(lq, 8)
    padded_out = (scale * padded.shape[-2], scale * padded.shape[-1])
    # the authors' queries: the padded output grid, cell 2 / padded_h / scale
    coord = make_coord(padded_out).unsqueeze(0)
    cell = torch.ones_like(coord)
    cell[:, :, 0] *= 2 / padded.shape[-2] / scale
    cell[:, :, 1] *= 2 / padded.shape[-1] / scale
    expected = forward_image(net, padded, coord, cell, padded_out)[..., :out_hw[0], :out_hw[1]]
    got = upscale_tiled(net, lq, out_hw, pad_to_window=8)
    assert got.shape[-2:] == out_hw
    assert (got - expected).abs().max().item() <= 1e-6
    # tiles (each encoded with its halo) give the same image
    tiled = upscale_tiled(net, lq, out_hw, pad_to_window=8, tile=5)
    assert (tiled - got).abs().max().item() <= 1e-5
    # with the cell clipping on top: the authors' cell * factor
    got = upscale_tiled(net, lq, out_hw, pad_to_window=8, cell_scale=(1.5, 1.5))
    expected = forward_image(net, padded, coord, cell * 1.5, padded_out)[..., :out_hw[0], :out_hw[1]]
    assert (got - expected).abs().max().item() <= 1e-6


def test_padding_at_a_non_integer_scale_keeps_the_pixel_pitch():
    """x2.5 on 9x7 -> 22x18 (the GT size): padded to 16x8, the padded output spans
    22 * 16 / 9 x 18 * 8 / 7 pixels (not whole); the rendered pixel centres keep the unpadded
    output's pitch, and its top-left 22x18 is returned."""
    net = build(TINY_LIIF)
    torch.manual_seed(3)
    lq = torch.rand(1, 3, 9, 7)
    out_hw = (round(9 * 2.5), round(7 * 2.5))  # (22, 18)
    padded = pad_symmetric(lq, window_padding(9, 8), window_padding(7, 8))
    assert padded.shape[-2:] == (16, 8)
    extent = [out_hw[0] * 16 / 9, out_hw[1] * 8 / 7]
    axes = [torch.tensor([-1 + (2 * i + 1) / e for i in range(n)], dtype=torch.float64).float()
            for n, e in zip(out_hw, extent)]
    coord = torch.stack(torch.meshgrid(*axes, indexing='ij'), dim=-1).view(1, -1, 2)
    cell = torch.tensor([2 / extent[0], 2 / extent[1]]).expand_as(coord)
    expected = forward_image(net, padded, coord, cell, out_hw)
    got = upscale_tiled(net, lq, out_hw, pad_to_window=8)
    assert (got - expected).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------
# basicsr test
@pytest.fixture(scope='module')
def tiny_test(tmp_path_factory):
    root = tmp_path_factory.mktemp('eval_protocol')
    (root / 'hr').mkdir()
    rng = np.random.default_rng(4)
    for i in range(2):
        # 32 rows: the x2 LR has 16, a multiple of the window (the authors then pad a whole window)
        img = cv2.resize(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), (30, 32), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(root / 'hr' / f'im{i}.png'), img)
    ckpt, net = tiny_checkpoint(tmp_path_factory)
    opt = {'model_type': 'ArbitraryScaleSRModel', 'num_gpu': 0,
           'datasets': {'test_1': {'name': 'tinyhr', 'type': 'ScaledHRImageDataset', 'dataroot_gt': str(root / 'hr'),
                                   'io_backend': {'type': 'disk'}, 'scales': [2, 6]}},
           'path': {'pretrain_network_g': ckpt},
           'val': {'save_img': True, 'bicubic_baseline': True,
                   'metrics': {'psnr': {'type': 'calculate_psnr_liif', 'mode': 'div2k'}}}}
    return root, opt, net


def _run(root, opt, name, capsys):
    path = root / f'{name}.yml'
    path.write_text(yaml.safe_dump(dict(opt, name=name), sort_keys=False))
    code = main(['test', '-opt', str(path)])
    return code, capsys.readouterr().err


def _logged(root, name):
    """{dataset: (model psnr, bicubic psnr)} from the run's log."""
    log = next((root / 'results' / name).glob(f'test_{name}_*.log')).read_text()
    model = dict(re.findall(r'Validation (\S+)\n\t # psnr: ([0-9.]+)', log))
    bicubic = dict(re.findall(r'Validation (\S+) \(bicubic interpolation, same protocol\)\n\t # psnr: ([0-9.]+)', log))
    return {k: (float(model[k]), float(bicubic[k])) for k in model}


def test_basicsr_test_runs_the_lte_protocol(tiny_test, capsys, monkeypatch):
    root, opt, net = tiny_test
    monkeypatch.chdir(root)
    code, err = _run(root, opt, 'liif_protocol', capsys)
    assert code == 0, err[-3000:]
    lte_opt = dict(opt, val=dict(opt['val'], cell_clip_scale_max=4, pad_to_window=8))
    code, err = _run(root, lte_opt, 'lte_protocol', capsys)
    assert code == 0, err[-3000:]
    liif, lte = _logged(root, 'liif_protocol'), _logged(root, 'lte_protocol')
    assert sorted(lte) == ['tinyhr_x2', 'tinyhr_x6']
    from basicsr.utils import tensor2img
    from ciisr_plugin.data.scaled_hr_dataset import ScaledHRImageDataset
    for name, scale in (('tinyhr_x2', 2), ('tinyhr_x6', 6)):
        # what the options mean, computed here: the renderer with the clipped cell and padding
        dataset = ScaledHRImageDataset({'dataroot_gt': str(root / 'hr'), 'io_backend': {'type': 'disk'},
                                        'scale': scale})
        psnrs = []
        for index in range(len(dataset)):
            item = dataset[index]  # the LR the test made (PIL bicubic of the HR)
            lq, gt = item['lq'][None], item['gt'][None]
            # the authors' queries on their padded input, cropped (see the tests above)
            padded = authors_pad(lq, 8)
            padded_out = (scale * padded.shape[-2], scale * padded.shape[-1])
            coord = make_coord(padded_out).unsqueeze(0)
            cell = torch.ones_like(coord)
            cell[:, :, 0] *= 2 / padded.shape[-2] / scale
            cell[:, :, 1] *= 2 / padded.shape[-1] / scale
            sr = forward_image(net, padded, coord, cell * max(scale / 4, 1), padded_out)[..., :gt.shape[-2], :gt.shape[-1]]
            psnrs.append(calculate_psnr_liif(sr.clamp(0, 1), gt, scale=scale, mode='div2k'))
            # the written images: these very outputs (to the 8-bit rounding), not the LIIF protocol's
            stem = f'im{index}'
            saved = {run: cv2.imread(str(root / 'results' / run / 'visualization' / name / f'{stem}_{run}.png'))
                     for run in ('lte_protocol', 'liif_protocol')}
            assert np.abs(saved['lte_protocol'].astype(int) - tensor2img([sr.clamp(0, 1)]).astype(int)).max() <= 1
            assert np.abs(saved['lte_protocol'].astype(int) - saved['liif_protocol'].astype(int)).max() >= 2
        assert lte[name][0] == pytest.approx(sum(psnrs) / len(psnrs), abs=1e-4)
        assert lte[name][1] == liif[name][1]  # the bicubic baseline is measured as without the options


@pytest.mark.parametrize('val, named', [({'cell_clip_scale_max': 'four'}, 'val.cell_clip_scale_max'),
                                        ({'cell_clip_scale_max': 0}, 'val.cell_clip_scale_max'),
                                        ({'pad_to_window': -8}, 'val.pad_to_window'),
                                        ({'pad_to_window': 8.5}, 'val.pad_to_window')])
def test_bad_protocol_options_are_one_line_errors(tiny_test, capsys, monkeypatch, val, named):
    root, opt, _ = tiny_test
    monkeypatch.chdir(root)
    code, err = _run(root, dict(opt, val=dict(opt['val'], **val)), 'bad_protocol', capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert named in last and 'bad_protocol.yml' in last and 'Traceback' not in err
    assert not (root / 'results' / 'bad_protocol').exists()  # refused before anything ran


def test_upscale_command_takes_the_cell_clipping(tiny_test, tmp_path, capsys):
    root, opt, net = tiny_test
    img = np.random.default_rng(5).integers(0, 65536, (7, 6, 3), dtype=np.uint16)  # 16 bit: fine enough to see
    cv2.imwrite(str(tmp_path / 'in.png'), img)
    args = ['upscale', str(tmp_path / 'in.png'), '--model', opt['path']['pretrain_network_g'], '--scale', '6x8']
    assert main(args + ['-o', str(tmp_path / 'clip.png'), '--cell-clip', '4']) == 0
    assert main(args + ['-o', str(tmp_path / 'plain.png')]) == 0
    lq = torch.from_numpy(img[:, :, ::-1] / 65535.).float().permute(2, 0, 1)[None]
    sr = upscale_tiled(net, lq, (42, 48), cell_scale=(1.5, 2.0)).clamp(0, 1)[0].permute(1, 2, 0).numpy()[:, :, ::-1]
    clip, plain = (cv2.imread(str(tmp_path / f'{n}.png'), cv2.IMREAD_UNCHANGED).astype(int) for n in ('clip', 'plain'))
    assert np.abs(clip - np.round(sr * 65535)).max() <= 1
    assert np.abs(clip - plain).max() >= 50
    capsys.readouterr()
    assert main(args + ['-o', str(tmp_path / 'bad.png'), '--cell-clip', '0']) == 2
    assert '--cell-clip' in capsys.readouterr().err.strip().splitlines()[-1]
