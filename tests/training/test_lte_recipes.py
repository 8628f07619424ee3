"""The LTE-family recipes train through `basicsr train` as shipped, shortened with --force_yml only."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from basicsr.archs import build_network
from PIL import Image

import ciisr_plugin
from ciisr_plugin.checkpoint import describe, save_atomic
from ciisr_plugin.config import load_options
from conftest import REPO

# The recipes' networks at full size (RDN-LTE 22M, SwinIR-LTE 12M parameters), on the bundled
# photos, on the CPU: smaller batches, patches and query sets so each run takes about a minute.
SHORTEN = [
    'num_gpu=0', 'datasets:train:dataroot_gt=skimage://train', 'datasets:train:cache_images=true',
    'datasets:train:num_worker_per_gpu=0', 'datasets:train:batch_size_per_gpu=2', 'datasets:train:lq_size=32',
    'datasets:train:sample_q=1024', 'datasets:train:dataset_enlarge_ratio=100', 'datasets:val:dataroot_gt=skimage://val',
    'train:total_iter=40', 'logger:print_freq=10', 'logger:use_tb_logger=false', 'logger:save_checkpoint_freq=1000000',
    'val:val_freq=1000000000'
]
# RDN (22M parameters) and SwinIR (12M, attention) cost ~20x EDSR-baseline per pixel: 16 px patches
HEAVY = ['datasets:train:lq_size=16', 'datasets:train:sample_q=256']
RECIPES = ['train_lte.yml', 'train_lte_plus.yml', 'train_lte_rdn.yml', 'train_lte_swinir.yml', 'train_metasr.yml']


def held_out_l1(net):
    """L1 of ``net`` on crops of a photo none of the training photos is (x2 and x3, PIL bicubic LR)."""
    from skimage import data
    hr = data.chelsea()[100:196, 150:246]  # skimage://val's cat, 96 x 96
    total = 0.0
    for scale in (2, 3):
        lr = np.asarray(Image.fromarray(hr).resize((96 // scale, 96 // scale), Image.BICUBIC), dtype=np.float32)
        lq = torch.from_numpy(lr / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            sr = net.upscale(lq, size=(96, 96))
        total += (sr.clamp(0, 1) - torch.from_numpy(hr / 255).permute(2, 0, 1)[None].float()).abs().mean().item()
    return total / 2


@pytest.mark.slow
@pytest.mark.parametrize('recipe', RECIPES)
def test_recipe_lowers_l1(recipe, tmp_path):
    """Start from known weights (the recipe's network at its own init, given as pretrain_network_g),
    train 40 iterations, and the held-out L1 must be lower than the start's - a loss logged per
    batch is too noisy over so few iterations to tell, especially with LTE's bilinear skip."""
    network_opt = load_options(str(REPO / 'options' / recipe))['network_g']
    torch.manual_seed(0)
    start = build_network(network_opt)
    save_atomic(describe(network_opt, start.state_dict()), str(tmp_path / 'start.pth'))
    env = dict(os.environ, CIISR_DATA_HOME=str(tmp_path / 'data'))
    shorten = SHORTEN + (HEAVY if recipe in ('train_lte_rdn.yml', 'train_lte_swinir.yml') else [])
    args = ['train', '-opt', str(REPO / 'options' / recipe), '--force_yml', f'name=smoke_{recipe[:-4]}', *shorten,
            f'path:pretrain_network_g={tmp_path / "start.pth"}']
    proc = subprocess.run([sys.executable, '-m', 'ciisr_plugin', *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    trained = ciisr_plugin.load_model(str(tmp_path / 'experiments' / f'smoke_{recipe[:-4]}' / 'models' /
                                          'net_g_latest.pth'))
    assert type(trained).__name__ == network_opt['type']
    before, after = held_out_l1(ciisr_plugin.load_model(str(tmp_path / 'start.pth'))), held_out_l1(trained)
    assert after < before, f'{recipe}: held-out L1 {before:.5f} -> {after:.5f}'


def test_recipes_follow_the_authors_configs():
    """The LTE authors' configs/train-div2k/*.yaml and test.py flags, line by line."""
    for recipe, lr, batch, milestones in (('train_lte.yml', 1e-4, 16, [200000, 400000, 600000, 800000]),
                                          ('train_lte_plus.yml', 1e-4, 16, [200000, 400000, 600000, 800000]),
                                          ('train_lte_rdn.yml', 1e-4, 16, [200000, 400000, 600000, 800000]),
                                          ('train_metasr.yml', 1e-4, 16, [200000, 400000, 600000, 800000]),
                                          ('train_lte_swinir.yml', 2e-4, 32, [250000, 400000, 450000, 475000])):
        opt = load_options(str(REPO / 'options' / recipe))
        train = opt['datasets']['train']
        assert (train['lq_size'], train['scale_min'], train['scale_max'], train['sample_q']) == (48, 1, 4, 2304)
        assert train['batch_size_per_gpu'] == batch and train['dataset_enlarge_ratio'] == 20
        assert opt['train']['optim_g']['lr'] == lr and opt['train']['scheduler']['milestones'] == milestones
        # 1000 epochs of 16000 samples
        assert opt['train']['total_iter'] == 1000 * 16000 // batch
        assert opt['train']['pixel_opt']['type'] == 'L1Loss'
        net = opt['network_g']
        assert net['data_mean'] == 0.5 and net['data_std'] == 0.5
    assert load_options(str(REPO / 'options/train_lte_rdn.yml'))['network_g']['encoder'] == {
        'type': 'RDNEncoder', 'num_feat': 64, 'config': 'B'}
    assert load_options(str(REPO / 'options/train_lte_swinir.yml'))['network_g']['encoder'] == {'type': 'SwinIREncoder'}
    for recipe, window in (('test_lte_div2k.yml', None), ('test_lte_swinir_div2k.yml', 8),
                           ('test_lte_benchmark.yml', None), ('test_metasr_div2k.yml', None)):
        val = load_options(str(REPO / 'options' / recipe))['val']
        assert val['cell_clip_scale_max'] == 4 and val.get('pad_to_window') == window
