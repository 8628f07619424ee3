"""``basicsr export``: the ONNX graph against torch at any batch, LR size and query count; bad input."""
import os

import numpy as np
import pytest
import torch

from ciisr_plugin.archs.implicit_query import make_cell, make_coord
from ciisr_plugin.checkpoint import describe
from ciisr_plugin.cli import main as cli_main
from render_support import TINY_ALIIF, TINY_LIIF, build, tiny_checkpoint

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


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
