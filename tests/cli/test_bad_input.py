"""Bad input, everywhere: one table, each case through the `basicsr` CLI (main(argv), in process).

A bad case must end with exit status 2, a single ``basicsr[ COMMAND]: error: ...`` line naming the
culprit (file or option), no traceback, and no checkpoint / output file. Odd but valid
images (grayscale, RGBA, 16-bit, CMYK JPEG) must train.
"""
import copy
import os
import pickle
import re
from collections import namedtuple

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import ciisr_plugin  # noqa: F401
from ciisr_plugin.cli import main

Case = namedtuple('Case', 'id make names')  # make(tmp_path) -> argv; names: regex the error must match

TINY_LIIF = {'type': 'LIIF', 'encoder': {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 1}, 'hidden_list': [16]}


def _png(path, size=32, channels=3, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    top = 65536 if dtype == np.uint16 else 256
    shape = (size, size) if channels == 1 else (size, size, channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rng.integers(0, top, shape).astype(dtype))
    return path


def _train_opt(tmp_path, data=None, **dataset):
    data = data or tmp_path / 'hr'
    if not data.exists():
        for i in range(2):
            _png(data / f'im{i}.png', seed=i)
    train = {'name': 't', 'type': 'ArbitraryScaleImageDataset', 'dataroot_gt': str(data), 'lq_size': 8,
             'scale_min': 1, 'scale_max': 3, 'sample_q': 16, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2}
    train.update(dataset)
    return {
        'name': 'bad', 'model_type': 'ArbitraryScaleSRModel', 'num_gpu': 0, 'manual_seed': 0,
        'network_g': copy.deepcopy(TINY_LIIF), 'datasets': {'train': train},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'scheduler': {'type': 'MultiStepLR', 'milestones': [9]},
                  'total_iter': 2, 'warmup_iter': -1, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 1, 'use_tb_logger': False},
    }


def _yml(tmp_path, opt, text=None):
    path = tmp_path / 'opt.yml'
    path.write_text(text if text is not None else yaml.safe_dump(opt, sort_keys=False))
    return path


def train_case(edit=None, text=None, **dataset):
    """argv of a training run whose options are the tiny ones, changed by ``edit(opt, tmp)`` / ``dataset``."""
    def make(tmp_path):
        opt = _train_opt(tmp_path, **dataset)
        if edit:
            edit(opt, tmp_path)
        return ['train', '-opt', str(_yml(tmp_path, opt, text))]
    return make


def one_bad_image(kind):
    """A training folder with one good image and one bad one called bad.png."""
    def write(folder):
        _png(folder / 'good.png')
        bad = folder / 'bad.png'
        if kind == 'corrupt':
            bad.write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
        elif kind == 'truncated':
            full = cv2.imencode('.png', np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))[1]
            bad.write_bytes(full.tobytes()[:len(full) // 2])
        elif kind == 'empty':
            bad.write_bytes(b'')
        elif kind == '1x1':
            _png(bad, size=1)
        elif kind == 'small':
            _png(bad, size=16)  # the HR crop is up to 8 * 3 = 24 px
    return write


def data_case(kind):
    def make(tmp_path):
        one_bad_image(kind)(tmp_path / 'hr')
        # several iterations so that both images are read whatever the order
        opt = _train_opt(tmp_path, scale_min=3 if kind == 'small' else 1)
        opt['train']['total_iter'] = 4
        return ['train', '-opt', str(_yml(tmp_path, opt))]
    return make


def set_in(path, value):
    def edit(opt, tmp_path):
        *parents, last = path
        node = opt
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


def delete(key):
    def edit(opt, tmp_path):
        del opt[key]
    return edit


def ckpt_case(obj=None, raw=None):
    """``basicsr convert`` of a checkpoint file holding ``obj`` (torch.save) or ``raw`` bytes."""
    def make(tmp_path):
        path = tmp_path / 'in.pth'
        if raw is not None:
            path.write_bytes(raw(tmp_path) if callable(raw) else raw)
        else:
            torch.save(obj() if callable(obj) else obj, path)
        return ['convert', str(path), str(tmp_path / 'out.pth')]
    return make


def upscale_case(*options, image='ok'):
    """``basicsr upscale`` of one small photo (or a bad/missing input) with a tiny LIIF checkpoint."""
    def make(tmp_path):
        from ciisr_plugin.checkpoint import describe
        from basicsr.archs import build_network
        model = tmp_path / 'tiny.pth'
        torch.save(describe(TINY_LIIF, build_network(TINY_LIIF).state_dict()), model)
        src = tmp_path / 'in.png'
        if image == 'ok':
            _png(src)
        elif image == 'corrupt':
            src.write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(100))
        elif image == 'folder':
            src = tmp_path / 'empty'
        return ['upscale', str(src), '-o', str(tmp_path / 'out.png'), '--model', str(model), *options]
    return make


class Gadget:
    """Anything not plain: unpickling it would import and call code."""

    def __reduce__(self):
        return (os.getcwd, ())


def _edsr_params():
    from basicsr.archs import build_network
    net = build_network({'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1,
                         'upscale': 2})
    return {'params': net.state_dict(), 'network_g': copy.deepcopy(TINY_LIIF)}


def _truncated_checkpoint(tmp_path):
    from basicsr.archs import build_network
    torch.save({'params': build_network(copy.deepcopy(TINY_LIIF)).state_dict(), 'network_g': TINY_LIIF}, tmp_path / 'x.pth')
    data = (tmp_path / 'x.pth').read_bytes()
    (tmp_path / 'x.pth').unlink()
    return data[:len(data) // 2]


def _truncated_state(opt, tmp_path):
    path = tmp_path / 'truncated.state'
    torch.save({'epoch': 0, 'iter': 1, 'optimizers': [], 'schedulers': []}, path)
    path.write_bytes(path.read_bytes()[:60])
    opt['path']['resume_state'] = str(path)


BAD = [
    Case('corrupt-image', data_case('corrupt'), r'bad\.png: cannot decode image'),
    Case('truncated-image', data_case('truncated'), r'bad\.png: cannot decode image'),
    Case('zero-byte-image', data_case('empty'), r'bad\.png: empty file'),
    Case('1x1-image', data_case('1x1'), r'bad\.png: 1x1 image is smaller than the \d+x\d+ HR crop'),
    Case('image-smaller-than-crop', data_case('small'), r'bad\.png: 16x16 image is smaller than the 24x24 HR crop'),
    Case('folder-without-images', train_case(lambda opt, tmp: opt['datasets']['train'].update(dataroot_gt=str(tmp / 'empty'))),
         r'dataroot_gt: folder .*empty contains no image files'),
    Case('fewer-images-than-a-batch', train_case(batch_size_per_gpu=3),
         r'datasets\.train: 2 sample\(s\) x dataset_enlarge_ratio 1 give no full batch of 3'),
    Case('scale-zero', train_case(scale_min=0), r'scale_min/scale_max: need 1 <= scale_min'),
    Case('scale-negative', train_case(scale_max=-2), r'scale_min/scale_max: .*-2'),
    Case('scale-nan', train_case(scale_max=float('nan')), r'scale_min/scale_max: .*nan'),
    Case('scale-inf', train_case(scale_max=float('inf')), r'scale_min/scale_max: .*inf'),
    Case('scale-absurd', train_case(scale_max=1e9), r'im\d\.png: 32x32 image is smaller than the \d+x\d+ HR crop'),
    Case('unknown-dataset-type', train_case(type='ArbitraryScaleImageDatset'),
         r"datasets\.train\.type: unknown dataset type 'ArbitraryScaleImageDatset' \(did you mean"),
    Case('unknown-arch-type', train_case(set_in(('network_g', 'encoder', 'type'), 'EDSREncodr')),
         r"network_g\.encoder\.type: unknown arch type 'EDSREncodr'"),
    Case('missing-keys', train_case(delete('datasets')), r"opt\.yml': missing required top-level key\(s\): datasets"),
    Case('not-a-mapping', train_case(text='- just\n- a list\n'), r"opt\.yml': expected a mapping"),
    Case('bad-yaml', train_case(text='name: [unclosed\n'), r"opt\.yml': invalid YAML"),
    Case('truncated-resume-state', train_case(_truncated_state),
         r"path\.resume_state '.*truncated\.state': not a readable training state"),
    Case('pretrain-of-another-arch', train_case(lambda opt, tmp: opt['path'].update(
        pretrain_network_g=str(ckpt_case(_edsr_params)(tmp)[1]))), r'in\.pth: does not fit LIIF; missing: .*unexpected'),
    Case('pretrain-random-pickle', train_case(lambda opt, tmp: opt['path'].update(
        pretrain_network_g=str(ckpt_case(lambda: {'params': Gadget()})(tmp)[1]))),
        r'in\.pth: refusing to unpickle arbitrary objects'),
    Case('checkpoint-of-another-arch', ckpt_case(_edsr_params), r'in\.pth: does not fit LIIF; missing: .*unexpected'),
    Case('random-pickle', ckpt_case(lambda: {'params': Gadget()}), r'in\.pth: refusing to unpickle arbitrary objects'),
    Case('plain-pickle-file', ckpt_case(raw=pickle.dumps({'a': Gadget()})),
         r'in\.pth: refusing to unpickle arbitrary objects'),
    Case('non-dict-checkpoint', ckpt_case([1, 2, 3]), r'in\.pth: expected a dict checkpoint, got list'),
    Case('zero-byte-checkpoint', ckpt_case(raw=b''), r'in\.pth: checkpoint file is empty'),
    Case('truncated-checkpoint', ckpt_case(raw=_truncated_checkpoint), r'in\.pth: not a readable torch checkpoint'),
    Case('upscale-scale-zero', upscale_case('--scale', '0'), r'--scale.*0'),
    Case('upscale-scale-negative', upscale_case('--scale', '-2'), r'--scale.*-2'),
    Case('upscale-scale-nan', upscale_case('--scale', 'nan'), r'--scale.*nan'),
    Case('upscale-scale-inf', upscale_case('--scale', 'inf'), r'--scale.*inf'),
    Case('upscale-absurd-size', upscale_case('--scale', '1e6'), r'out\.png.*--force'),
    Case('upscale-size-malformed', upscale_case('--size', '12by7'), r'--size.*12by7'),
    Case('upscale-corrupt-image', upscale_case('--scale', '2', image='corrupt'), r'in\.png'),
    Case('upscale-folder-without-images', upscale_case('--scale', '2', image='folder'), r'empty'),
    Case('missing-checkpoint', lambda tmp_path: ['convert', str(tmp_path / 'nope.pth'), str(tmp_path / 'o.pth')],
         r'nope\.pth: no such checkpoint file'),
]


def _outputs(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*')
                  if p.is_file() and p.suffix in ('.pth', '.state', '.png') and p.parent.name in
                  ('models', 'training_states', 'visualization') or p.name in ('out.pth', 'out.png') or '.tmp' in p.name)


@pytest.mark.parametrize('case', BAD, ids=[c.id for c in BAD])
def test_bad_input_is_one_line_exit_2(case, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv('CIISR_TRACEBACK', raising=False)
    (tmp_path / 'empty').mkdir()
    argv = case.make(tmp_path)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    assert 'Traceback' not in err
    last = err.strip().splitlines()[-1]
    assert re.match(r'basicsr( \w+)?: error: ', last) and len(re.findall(r': error: ', err)) == 1, err[-2000:]
    assert re.search(case.names, last), last
    assert _outputs(tmp_path) == []


def test_table_is_large_enough():
    assert len(BAD) >= 15
    assert any(c.id.startswith('upscale-') for c in BAD)


# ----------------------------------------------------------------------------------------------
# odd but valid images train
def _gray(path):
    _png(path, channels=1)


def _rgba(path):
    _png(path, channels=4)


def _sixteen_bit(path):
    _png(path, dtype=np.uint16)


def _cmyk_jpeg(path):
    rgb = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert('CMYK').save(path.with_suffix('.jpg'), 'JPEG', quality=95)
    with Image.open(path.with_suffix('.jpg')) as im:
        assert im.mode == 'CMYK'


@pytest.mark.parametrize('write', [_gray, _rgba, _sixteen_bit, _cmyk_jpeg], ids=['gray', 'rgba', '16bit', 'cmyk-jpeg'])
def test_odd_images_train(write, tmp_path, monkeypatch, capsys):
    folder = tmp_path / 'hr'
    folder.mkdir()
    write(folder / 'a.png')
    write(folder / 'b.png')
    opt = _train_opt(tmp_path, data=folder)
    monkeypatch.chdir(tmp_path)
    status = main(['train', '-opt', str(_yml(tmp_path, opt))])
    err = capsys.readouterr().err
    assert status == 0, err[-2000:]
    assert re.search(r'iter:\s+2, lr', err)
    assert (tmp_path / 'experiments' / 'bad' / 'models' / 'net_g_latest.pth').is_file()


# ----------------------------------------------------------------------------------------------
# untrusted checkpoints: no torch.load in the plugin may unpickle code unless asked to
def test_every_torch_load_in_the_plugin_is_weights_only():
    import ast
    from pathlib import Path

    calls = []
    for path in sorted(Path(ciisr_plugin.__file__).parent.rglob('*.py')):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'load'
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == 'torch'):
                flag = {k.arg: ast.unparse(k.value) for k in node.keywords}.get('weights_only')
                calls.append((path.name, node.lineno, flag))
    assert calls  # the scan finds them (checkpoint.py, compat.py, ...)
    for name, line, flag in calls:
        assert flag in ('True', 'not allow_pickle'), f'{name}:{line}: torch.load(..., weights_only={flag})'


def test_allow_pickle_is_the_explicit_way_in(tmp_path):
    from ciisr_plugin.checkpoint import CheckpointError, read_checkpoint
    torch.save({'obj': Gadget()}, tmp_path / 'p.pth')
    with pytest.raises(CheckpointError, match='refusing to unpickle'):
        read_checkpoint(str(tmp_path / 'p.pth'))
    assert read_checkpoint(str(tmp_path / 'p.pth'), allow_pickle=True)['obj'] == os.getcwd()
