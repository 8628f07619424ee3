"""``basicsr upscale``: sizes and scales, folders, grayscale, alpha, 16 bit, bf16 notes, bad input.

The reference is the model's own whole-image ``net.upscale`` of the same pixels; alpha is
compared with bicubic ``F.interpolate``.
"""
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ciisr_plugin.cli import main as cli_main
from ciisr_plugin.ops import cpu_features
from render_support import tiny_checkpoint, whole

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


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

    assert upscale_cli(src, '-o', tmp_path / 'sized.jpg', '--model', ckpt, '--size', '50x30',
                       '--chunk-size', '7') == 0
    assert cv2.imread(str(tmp_path / 'sized.jpg')).shape == (30, 50, 3)
    assert upscale_cli(src, '-o', tmp_path / 'aniso.webp', '--model', ckpt, '--scale', '2x3',
                       '--precision', 'bf16') == 0
    assert cv2.imread(str(tmp_path / 'aniso.webp')).shape == (72, 120, 3)
    assert sorted(os.listdir(tmp_path)) == ['aniso.webp', 'astronaut.png', 'sized.jpg', 'x3.7.png']


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
        'zero chunk size': [img, *out, '--scale', '2', '--chunk-size', '0'],
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
