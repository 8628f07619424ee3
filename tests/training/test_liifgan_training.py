"""LIIF-GAN and LIIF-GAN-S through the ``basicsr`` command on the CPU: train, save, resume,
validate with LPIPS, test with the shipped recipe; and the shipped recipes themselves."""
import copy
import logging
import os

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network

import ciisr_plugin
from ciisr_plugin.cli import main as basicsr_main
from ciisr_plugin.config import load_options, validate_options
from conftest import REPO
from liifgan_support import GROUP, TINY_D, TINY_EDSR, smooth_image

PAPER_SCALES = [2, 3, 4, 4.5, 5, 5.5, 6, 6.5, 7]  # Table 1

pytestmark = pytest.mark.usefixtures('one_thread')


def write_png(path, chw):
    rgb = (chw.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))


SMOKE_NET = {'type': 'LIIFGAN', 'encoder': dict(TINY_EDSR), 'hidden_list': [16]}


def smoke_options(root):
    (root / 'train').mkdir()
    (root / 'val').mkdir()
    for i in range(4):
        write_png(root / 'train' / f't{i}.png', smooth_image(32, 32, 10 + i))
    for i in range(2):
        write_png(root / 'val' / f'v{i}.png', smooth_image(64, 64, 20 + i))
    return {
        'name': 'liifgan_smoke', 'model_type': 'LIIFGANModel', 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {
            'train': {'name': 'smoke_train', 'type': 'ArbitraryScaleImageDataset', 'dataroot_gt': str(root / 'train'),
                      'io_backend': {'type': 'disk'}, 'lq_size': 8, 'scale_min': 2, 'scale_max': 3,
                      'group_size': GROUP, 'use_hflip': True, 'use_rot': True, 'num_worker_per_gpu': 0,
                      'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 1, 'prefetch_mode': None},
            'val': {'name': 'smoke_val', 'type': 'ScaledHRImageDataset', 'dataroot_gt': str(root / 'val'),
                    'io_backend': {'type': 'disk'}, 'scale': 2, 'scales': [2, 3]},
        },
        'network_g': copy.deepcopy(SMOKE_NET),
        'network_d': dict(TINY_D),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {
            'ema_decay': 0.9,
            'optim_g': {'type': 'Adam', 'lr': 1e-4, 'betas': [0.9, 0.99]},
            'optim_d': {'type': 'Adam', 'lr': 1e-4, 'betas': [0.9, 0.99]},
            'scheduler': {'type': 'MultiStepLR', 'milestones': [15], 'gamma': 0.5},
            'total_iter': 20, 'warmup_iter': -1,
            'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0},
            'perceptual_opt': {'type': 'LocalWeightsPerceptualLoss', 'layer_weights': {'conv5_4': 1.0}},
            'gan_opt': {'type': 'GANLoss', 'gan_type': 'vanilla', 'loss_weight': 5e-3},
            'net_d_iters': 1, 'net_d_init_iters': 0,
        },
        'val': {'val_freq': 10, 'save_img': False, 'metrics': {
            'psnr': {'type': 'calculate_psnr_liif', 'mode': 'div2k'},
            'lpips': {'type': 'calculate_lpips', 'net': 'alex'}}},
        'logger': {'print_freq': 5, 'save_checkpoint_freq': 10, 'use_tb_logger': False,
                   'wandb': {'project': None, 'resume_id': None}},
    }


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_train_save_resume_validate(offline, tmp_path):
    opt_path = tmp_path / 'train_liifgan_smoke.yml'
    opt_path.write_text(yaml.safe_dump(smoke_options(tmp_path), sort_keys=False))
    records = Records()
    logger = logging.getLogger('basicsr')
    # BasicSR's logger does not propagate, and stays at WARNING when an earlier get_root_logger()
    # call (here: the unit tests' models) initialised it without a log file
    saved_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(records)
    try:
        assert basicsr_main(['train', '-opt', str(opt_path)]) == 0
        exp = tmp_path / 'experiments' / 'liifgan_smoke'
        states = exp / 'training_states'
        assert sorted(os.listdir(states)) == ['10.state', '20.state']
        first_state_mtime = (states / '20.state').stat().st_mtime_ns
        for name in ('net_g_10.pth', 'net_g_20.pth', 'net_g_latest.pth', 'net_d_20.pth', 'net_d_latest.pth'):
            assert (exp / 'models' / name).is_file(), name
        lines_first = len(records.lines)

        assert basicsr_main(['train', '-opt', str(opt_path), '--auto_resume', '--force_yml', 'train:total_iter=30']) == 0
        resumed = records.lines[lines_first:]
    finally:
        logger.removeHandler(records)
        logger.setLevel(saved_level)

    assert any('Resuming training from epoch' in line and 'iter: 20' in line for line in resumed)
    assert any('net_d_20.pth' in line and 'Loading' in line for line in resumed)  # the discriminator too
    assert not [d for d in os.listdir(tmp_path / 'experiments') if 'archived' in d]  # not restarted
    assert (states / '20.state').stat().st_mtime_ns == first_state_mtime
    assert (states / '30.state').is_file() and (exp / 'models' / 'net_g_30.pth').is_file()

    # losses logged like SRGANModel's, and validation with LPIPS at both scales
    text = '\n'.join(records.lines)
    for key in ('l_pix', 'l_percep', 'l_g_gan', 'l_d_real', 'l_d_fake', 'out_d_real', 'out_d_fake'):
        assert f'{key}: ' in text, key
    for scale in ('x2', 'x3'):
        block = text.split(f'Validation smoke_val_{scale}')[-1]
        lpips = float(block.split('# lpips: ')[1].split()[0])
        assert 0 < lpips < 2, lpips

    # the self-describing checkpoint rebuilds the trained net (EMA weights)
    net = ciisr_plugin.load_model(str(exp / 'models' / 'net_g_30.pth'))
    ckpt = torch.load(exp / 'models' / 'net_g_30.pth')
    assert type(net).__name__ == 'LIIFGAN' and net.dual_decoder
    assert torch.equal(net.decoder2.layers[0].weight, ckpt['params_ema']['decoder2.layers.0.weight'])
    with torch.no_grad():
        out = net.upscale(torch.rand(1, 3, 8, 8), (20, 20))
    assert out.shape == (1, 3, 20, 20) and torch.isfinite(out).all()

    # the shipped test recipe, pointed at this run's checkpoint and images (all paper scales)
    test_opt = load_options(os.path.join(REPO, 'options', 'test_liifgan_div2k.yml'))
    test_opt.update(name='liifgan_smoke_test', num_gpu=0, network_g=copy.deepcopy(SMOKE_NET))
    test_opt['datasets']['test_div2k']['dataroot_gt'] = str(tmp_path / 'val')
    test_opt['path']['pretrain_network_g'] = str(exp / 'models' / 'net_g_latest.pth')
    test_path = tmp_path / 'test_liifgan_smoke.yml'
    test_path.write_text(yaml.safe_dump(test_opt, sort_keys=False))
    assert basicsr_main(['test', '-opt', str(test_path)]) == 0
    report = (tmp_path / 'results' / 'liifgan_smoke_test' / 'results.md').read_text()
    for word in ('psnr', 'ssim', 'lpips', '6.5'):
        assert word in report, word


# ----------------------------------------------------------------------------- recipes
RECIPES = {
    'train_liifgan.yml': 'train', 'train_liifgan_s.yml': 'train', 'test_liifgan_div2k.yml': 'test',
    'test_edsr_x4_div2k.yml': 'test', 'test_esrgan_x4_div2k.yml': 'test', 'test_realesrgan_x4_div2k.yml': 'test',
}


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_recipes_are_valid(name):
    opt = load_options(os.path.join(REPO, 'options', name))
    validate_options(opt, name, RECIPES[name])
    if name.startswith('train'):
        train = opt['datasets']['train']
        assert (train['lq_size'], train['group_size'], train['scale_min'], train['scale_max']) == (48, 48, 1, 4)
        assert opt['train']['optim_g']['lr'] == 1e-4 and opt['train']['scheduler']['gamma'] == 0.5
        g = opt['network_g']
        assert g['encoder']['type'] == 'EDSREncoder' and g['hidden_list'] == [256] * 4
        expected = (True, 'mid') if name == 'train_liifgan.yml' else (False, 'last')
        assert (g['dual_decoder'], g['decoder1_feature']) == expected
        net = build_network(copy.deepcopy(g))
        assert (net.decoder2 is not None) == g['dual_decoder']
        d = build_network(copy.deepcopy(opt['network_d']))
        assert d(torch.rand(1, 3, 48, 48)).shape == (1, 1, 48, 48)  # the discriminator takes 48px patches
    elif name == 'test_liifgan_div2k.yml':
        assert opt['datasets']['test_div2k']['scales'] == PAPER_SCALES
        assert set(opt['val']['metrics']) == {'psnr', 'ssim', 'lpips'}
    else:
        assert opt['network_g']['type'] == 'FixedScaleSR' and opt['network_g']['net_scale'] == 4


def test_liifgan_s_trains_and_tests_through_the_cli(offline, tmp_path):
    """LIIF-GAN-S (one decoder: L1 + GAN + VGG on its output) through `basicsr train` / `basicsr test`."""
    opt = smoke_options(tmp_path)
    opt['name'] = 'liifgan_s_smoke'
    opt['network_g']['dual_decoder'] = False
    opt['train']['total_iter'] = 10
    opt_path = tmp_path / 'train_liifgan_s_smoke.yml'
    opt_path.write_text(yaml.safe_dump(opt, sort_keys=False))
    assert basicsr_main(['train', '-opt', str(opt_path)]) == 0
    ckpt = tmp_path / 'experiments' / 'liifgan_s_smoke' / 'models' / 'net_g_latest.pth'
    net = ciisr_plugin.load_model(str(ckpt))
    assert type(net).__name__ == 'LIIFGAN' and not net.dual_decoder and net.decoder2 is None

    test_opt = load_options(os.path.join(REPO, 'options', 'test_liifgan_div2k.yml'))
    test_opt.update(name='liifgan_s_smoke_test', num_gpu=0, network_g=copy.deepcopy(opt['network_g']))
    test_opt['datasets']['test_div2k']['dataroot_gt'] = str(tmp_path / 'val')
    test_opt['path']['pretrain_network_g'] = str(ckpt)
    test_path = tmp_path / 'test_liifgan_s_smoke.yml'
    test_path.write_text(yaml.safe_dump(test_opt, sort_keys=False))
    assert basicsr_main(['test', '-opt', str(test_path)]) == 0
    table = (tmp_path / 'results' / 'liifgan_s_smoke_test' / 'results.md').read_text()
    assert '| DIV2K_val | x7 |' in table and 'lpips' in table
