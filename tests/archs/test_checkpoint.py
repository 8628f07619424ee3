"""Checkpoints: every way a network is saved and read back.

Our self-describing checkpoints (``load_model``, ``basicsr test`` taking ``network_g`` from them,
refusing a differing one), the LIIF authors' checkpoints translated (keys, spec flags, the RDN
encoder, ``basicsr convert``), and the errors of files that are neither. References: the net that
was saved, the authors' outputs (shared/fixtures/authors) and PSNRs recomputed here.
"""
import copy
import re

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network

import ciisr_plugin
from ciisr_plugin.checkpoint import CheckpointError, convert_authors_checkpoint, describe
from ciisr_plugin.cli import main
from test_liif import TINY_EDSR, TINY_RDN, tiny_liif


def _last_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0, err
    assert re.match(r'basicsr( \w+)?: error: ', err), err
    return err


# ----------------------------------------------------------------------------------------------
# load_model
def test_own_checkpoint_round_trip(tmp_path):
    net = tiny_liif(encoder=TINY_RDN, cell_decode=False)
    opt = {'type': 'LIIF', 'encoder': TINY_RDN, 'hidden_list': [16, 16], 'cell_decode': False}
    path = tmp_path / 'net_g.pth'
    torch.save(describe(opt, net.state_dict()), path)
    loaded = ciisr_plugin.load_model(str(path))
    lq = torch.rand(1, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(loaded.upscale(lq, (11, 9)), net.upscale(lq, (11, 9)))


def test_checkpoints_written_with_a_chunk_size_still_load(tmp_path):
    # chunk_size was a network option before it became a render setting: such checkpoints load
    net = tiny_liif()
    path = tmp_path / 'old.pth'
    opt = {'type': 'LIIF', 'encoder': TINY_EDSR, 'hidden_list': [16, 16], 'chunk_size': 777}
    torch.save(describe(opt, net.state_dict()), path)
    loaded = ciisr_plugin.load_model(str(path))
    assert 'chunk_size' not in loaded.network_opt
    lq = torch.rand(1, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(loaded.upscale(lq, (11, 9)), net.upscale(lq, (11, 9)))


def test_authors_rdn_checkpoint_is_translated():
    # build an authors'-format checkpoint from our tiny RDN LIIF by renaming keys back
    net = tiny_liif(encoder={'type': 'RDNEncoder', 'num_feat': 8, 'config': 'A'})
    back = {'conv_shallow1': 'SFENet1', 'conv_shallow2': 'SFENet2', 'fuse_global': 'GFF.0',
            'conv_after_fuse': 'GFF.1'}
    sd = {}
    for k, v in net.state_dict().items():
        k = k.replace('decoder.layers', 'imnet.layers')
        for ours, theirs in back.items():
            k = k.replace(f'encoder.{ours}.', f'encoder.{theirs}.')
        k = k.replace('.fuse.', '.LFF.').replace('encoder.blocks.', 'encoder.RDBs.')
        if '.layers.' in k and k.startswith('encoder.'):
            k = k.replace('.layers.', '.convs.').replace('.conv.', '.conv.0.')
        sd[k] = v
    ckpt = {'model': {'name': 'liif', 'args': {
        'encoder_spec': {'name': 'rdn', 'args': {'G0': 8, 'RDNconfig': 'A', 'no_upsampling': True}},
        'imnet_spec': {'name': 'mlp', 'args': {'out_dim': 3, 'hidden_list': [16, 16]}}}, 'sd': sd}}
    loaded = ciisr_plugin.load_model(ckpt)
    lq = torch.rand(1, 3, 4, 6)
    with torch.no_grad():
        assert torch.equal(loaded.upscale(lq, (9, 13)), net.upscale(lq, (9, 13)))


def test_mismatched_authors_checkpoint_lists_keys(authors_fixture):
    ckpt = copy.deepcopy(authors_fixture('liif_edsr_baseline_x3.3.pt')['checkpoint'])
    del ckpt['model']['sd']['imnet.layers.2.weight']
    ckpt['model']['sd']['imnet.bogus'] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r'missing: decoder\.layers\.2\.weight.*unexpected: imnet\.bogus'):
        ciisr_plugin.load_model(ckpt)


def test_unknown_formats_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match='unknown checkpoint format'):
        ciisr_plugin.load_model({'foo': 1})
    with pytest.raises(CheckpointError, match='without .network_g'):
        ciisr_plugin.load_model({'params': {}})
    bad = tmp_path / 'junk.pth'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='junk.pth'):
        ciisr_plugin.load_model(str(bad))


def test_authors_spec_flags_are_mapped(authors_fixture):
    ckpt = copy.deepcopy(authors_fixture('liif_edsr_baseline_x3.3.pt')['checkpoint'])
    ckpt['model']['args'].update(local_ensemble=False, cell_decode=False)
    opt, _ = convert_authors_checkpoint({'model': {**ckpt['model'], 'sd': {}}})
    assert opt['local_ensemble'] is False and opt['cell_decode'] is False and opt['feat_unfold'] is True
    assert opt['encoder'] == {'type': 'EDSREncoder', 'num_block': 16, 'num_feat': 64, 'res_scale': 1.0}


# ----------------------------------------------------------------------------------------------
# convert
def test_convert_authors_checkpoint(tmp_path, capsys, authors_fixture):
    case = authors_fixture('liif_edsr_baseline_x3.3.pt')  # the authors' checkpoint + their outputs
    src, out = tmp_path / 'authors.pth', tmp_path / 'liif.pth'
    torch.save(case['checkpoint'], src)
    assert main(['convert', str(src), str(out)]) == 0
    assert capsys.readouterr().out.strip() == f'wrote {out} (LIIF, encoder EDSREncoder)'
    ckpt = torch.load(out, map_location='cpu', weights_only=True)
    assert set(ckpt) == {'params', 'network_g'} and ckpt['network_g']['type'] == 'LIIF'
    net = ciisr_plugin.load_model(out)
    queries = slice(0, None, 16)  # every 16th of the authors' query points keeps this quick
    with torch.no_grad():
        pred = net(case['lr'][None], case['coord'][None, queries], case['cell'][None, queries])[0]
    assert (pred - case['expected'][queries]).abs().max().item() <= 1e-4


def test_convert_errors(tmp_path, capsys):
    out = tmp_path / 'out.pth'
    assert main(['convert', str(tmp_path / 'nope.pt'), str(out)]) == 2
    assert 'nope.pt: no such checkpoint file' in _last_line_error(capsys)
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    assert main(['convert', str(tmp_path / 'junk.pt'), str(out)]) == 2
    assert 'junk.pt' in _last_line_error(capsys)
    assert main(['convert', str(tmp_path / 'junk.pt'), str(tmp_path / 'junk.pt')]) == 2
    assert 'is the input file' in _last_line_error(capsys)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ['junk.pt']


# ----------------------------------------------------------------------------------------------
# basicsr test with the network taken from the checkpoint
TINY_LIIF = {'type': 'LIIF', 'encoder': {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 2},
             'hidden_list': [16, 16]}


@pytest.fixture(scope='module')
def checkpoint_only(tmp_path_factory):
    """A self-describing LIIF checkpoint and an option file naming only it (no network_g)."""
    from ciisr_plugin.checkpoint import describe, save_atomic

    root = tmp_path_factory.mktemp('checkpoint_only')
    (root / 'hr').mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        img = cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (24, 24), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(root / 'hr' / f'im{i}.png'), img)
    torch.manual_seed(3)
    net = build_network(dict(TINY_LIIF, encoder=dict(TINY_LIIF['encoder'])))
    save_atomic(describe(TINY_LIIF, net.state_dict()), root / 'tiny_liif.pth')
    opt = {'name': 'from_ckpt', 'model_type': 'ArbitraryScaleSRModel', 'num_gpu': 0,
           'datasets': {'test_1': {'name': 'tinyhr', 'type': 'ScaledHRImageDataset', 'dataroot_gt': str(root / 'hr'),
                                   'io_backend': {'type': 'disk'}, 'scales': [2]}},
           'path': {'pretrain_network_g': str(root / 'tiny_liif.pth')},
           'val': {'save_img': False, 'metrics': {'psnr': {'type': 'calculate_psnr_liif', 'mode': 'div2k'}}}}
    return root, opt


def _test_run(root, opt, name, capsys):
    path = root / f'{name}.yml'
    path.write_text(yaml.safe_dump(dict(opt, name=name), sort_keys=False))
    code = main(['test', '-opt', str(path)])
    return code, capsys.readouterr().err


def _logged_psnr(root, name):
    log = next((root / 'results' / name).glob(f'test_{name}_*.log')).read_text()
    return float(re.search(r'# psnr: ([0-9.]+)', log).group(1)), log


def test_test_takes_network_g_from_the_checkpoint(checkpoint_only, capsys, monkeypatch):
    root, opt = checkpoint_only
    monkeypatch.chdir(root)
    code, err = _test_run(root, opt, 'no_network_g', capsys)
    assert code == 0, err[-3000:]
    assert f"network_g taken from {root / 'tiny_liif.pth'} (LIIF, encoder EDSREncoder)" in err
    taken, log = _logged_psnr(root, 'no_network_g')
    assert "type: EDSREncoder" in log and 'Loading LIIF model from' in log
    # the same checkpoint with network_g written out (defaults too) gives the same numbers
    full = dict(TINY_LIIF, local_ensemble=True, chunk_size=777)
    code, err = _test_run(root, dict(opt, network_g=full), 'with_network_g', capsys)
    assert code == 0, err[-3000:]
    assert 'taken from' not in err
    assert _logged_psnr(root, 'with_network_g')[0] == taken


@pytest.mark.parametrize('change, named', [
    ({'local_ensemble': False}, "local_ensemble: False here vs True"),  # no parameter shows it: strict load passes
    ({'encoder': {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 3}}, 'encoder.num_block: 3 here vs 2'),
    ({'type': 'ALIIF', 'hidden_list': None}, "type: 'ALIIF' here vs 'LIIF'"),
])
def test_test_refuses_network_g_that_differs_from_the_checkpoint(checkpoint_only, capsys, monkeypatch, change,
                                                                 named):
    root, opt = checkpoint_only
    monkeypatch.chdir(root)
    network_g = {k: v for k, v in dict(TINY_LIIF, **change).items() if v is not None}
    code, err = _test_run(root, dict(opt, network_g=network_g), 'differs', capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith('basicsr test: error: ') and 'network_g differs from the network stored in' in line, err
    assert named in line, line
    assert not (root / 'results' / 'differs').exists()


def test_test_without_network_g_and_a_checkpoint_without_options(checkpoint_only, capsys, monkeypatch):
    root, opt = checkpoint_only
    monkeypatch.chdir(root)
    bare = root / 'bare.pth'
    torch.save({'params': torch.load(root / 'tiny_liif.pth', weights_only=True)['params']}, bare)
    code, err = _test_run(root, dict(opt, path={'pretrain_network_g': str(bare)}), 'bare', capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert 'network_g is not given and path.pretrain_network_g cannot provide it' in line
    assert "without 'network_g' options" in line


def test_test_runs_the_authors_checkpoint_without_network_g(checkpoint_only, capsys, monkeypatch, authors_fixture):
    root, opt = checkpoint_only
    monkeypatch.chdir(root)
    case = authors_fixture('liif_edsr_baseline_x3.3.pt')
    torch.save(case['checkpoint'], root / 'authors.pth')
    code, err = _test_run(root, dict(opt, path={'pretrain_network_g': str(root / 'authors.pth')}), 'authors', capsys)
    assert code == 0, err[-3000:]
    assert 'network_g taken from' in err and '(LIIF, encoder EDSREncoder)' in err
    psnr, log = _logged_psnr(root, 'authors')
    assert "with param key: [authors' sd]" in log
    # the logged PSNR is the authors' network's: recompute it with load_model + upscale
    from ciisr_plugin import load_model
    from ciisr_plugin.data.scaled_hr_dataset import ScaledHRImageDataset
    from ciisr_plugin.metrics.psnr_liif_metric import calculate_psnr_liif
    net = load_model(root / 'authors.pth')
    ds = ScaledHRImageDataset({'dataroot_gt': str(root / 'hr'), 'scale': 2, 'phase': 'test'})
    values = []
    for i in range(len(ds)):
        s = ds[i]
        with torch.no_grad():
            sr = net.upscale(s['lq'][None], size=s['gt'].shape[-2:])
        values.append(calculate_psnr_liif(sr, s['gt'][None], scale=2, mode='div2k'))
    assert abs(np.mean(values) - psnr) < 1e-3, (values, psnr)
