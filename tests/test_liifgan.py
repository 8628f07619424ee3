"""LIIF-GAN / LIIF-GAN-S: gradient blocking, the encoder option, the two-decoder sum, patch
layout, offline VGG weights, and a CPU training run through the ``basicsr`` command.

Independent references: each decoder is compared with a LIIF net (tested against the
authors' fixture) carrying the same weights on a hand-built encoder feature; patches with
``net.upscale`` crops; the perceptual loss with VGG convolutions written out here.
"""
import copy
import logging
import math
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from basicsr.archs import build_network
from torch import nn

import ciisr_plugin
from ciisr_plugin.archs.implicit_query import make_cell, make_coord
from ciisr_plugin.cli import main as basicsr_main
from ciisr_plugin.config import load_options, validate_options
from ciisr_plugin.data.query_sampling import group_coords, sample_group
from ciisr_plugin.losses.perceptual_loss import LocalWeightsPerceptualLoss
from ciisr_plugin.models.liifgan_model import LIIFGANModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_SCALES = [2, 3, 4, 4.5, 5, 5.5, 6, 6.5, 7]  # Table 1
TINY_EDSR = {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 2, 'mid_layer': 1}
TINY_D = {'type': 'UNetDiscriminatorSN', 'num_in_ch': 3, 'num_feat': 8}
MEAN, STD = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]  # not 0.5 / 0.5: a mean added to the increment would show


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Tiny convolutions: a second thread only adds contention on a shared 2-core machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ----------------------------------------------------------------------------- offline weights
def _random_vgg19_state():
    """torchvision vgg19 keys/shapes: He-initialised convolutions; the classifier (never used
    by the perceptual loss) as zero tensors expanded from one element, so the file stays small."""
    import torchvision
    with torch.device('meta'):
        shapes = {k: v.shape for k, v in torchvision.models.vgg19().state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        if key.startswith('features') and key.endswith('weight'):
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=gen) * math.sqrt(2 / fan_in)
        elif key.startswith('features'):
            state[key] = 0.01 * torch.randn(shape, generator=gen)
        else:
            state[key] = torch.zeros(1).expand(shape)
    return state


def _random_alexnet_features_state():
    import torchvision
    with torch.device('meta'):
        shapes = {k: v.shape for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith('features')}
    gen = torch.Generator().manual_seed(1)
    return {k: torch.randn(s, generator=gen) * (math.sqrt(2 / math.prod(s[1:])) if len(s) > 1 else 0.01)
            for k, s in shapes.items()}


@pytest.fixture(scope='session')
def torch_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds random-init VGG19 and AlexNet files under
    torchvision's names (no downloads here)."""
    home = tmp_path_factory.mktemp('torch_home')
    checkpoints = home / 'hub' / 'checkpoints'
    checkpoints.mkdir(parents=True)
    torch.save(_random_vgg19_state(), checkpoints / 'vgg19-dcbb9e9d.pth')
    torch.save(_random_alexnet_features_state(), checkpoints / 'alexnet-owt-7be5be79.pth')
    return home


@pytest.fixture
def offline(torch_home, monkeypatch, tmp_path):
    monkeypatch.setenv('TORCH_HOME', str(torch_home))
    monkeypatch.chdir(tmp_path)  # BasicSR also looks in ./experiments/pretrained_models
    return torch_home


def vgg_file(home):
    return str(home / 'hub' / 'checkpoints' / 'vgg19-dcbb9e9d.pth')


# ----------------------------------------------------------------------------- builders
def tiny_net(**kw):
    torch.manual_seed(0)
    opt = {'type': 'LIIFGAN', 'encoder': dict(TINY_EDSR), 'hidden_list': [16], 'data_mean': MEAN, 'data_std': STD,
           **kw}
    net = build_network(opt)
    with torch.no_grad():  # perturb everything so no term can hide behind a zero init
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def model_opt(home, network_g=None, **train):
    train_opt = {
        'ema_decay': 0,
        'optim_g': {'type': 'Adam', 'lr': 1e-3},
        'optim_d': {'type': 'Adam', 'lr': 1e-3},
        'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
        'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0},
        'perceptual_opt': {'type': 'LocalWeightsPerceptualLoss', 'layer_weights': {'conv5_4': 1.0},
                           'vgg_weights_path': vgg_file(home)},
        'gan_opt': {'type': 'GANLoss', 'gan_type': 'vanilla', 'loss_weight': 5e-3},
        **train,
    }
    return {
        'name': 'unit', 'is_train': True, 'dist': False, 'num_gpu': 0, 'rank': 0, 'world_size': 1,
        'network_g': network_g or {'type': 'LIIFGAN', 'encoder': dict(TINY_EDSR), 'hidden_list': [16],
                                   'data_mean': MEAN, 'data_std': STD},
        'network_d': dict(TINY_D),
        'path': {'pretrain_network_g': None, 'pretrain_network_d': None, 'resume_state': None},
        'train': {k: v for k, v in train_opt.items() if v is not None},
    }


def build_model(home, network_g=None, **train):
    torch.manual_seed(0)
    model = LIIFGANModel(model_opt(home, network_g, **train))
    with torch.no_grad():
        for p in model.get_bare_model(model.net_g).parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def smooth_image(h, w, seed):
    """A (3, h, w) image with structure at several scales, in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    img = sum(F.interpolate(torch.rand(1, 3, h // k + 1, w // k + 1, generator=gen), size=(h, w), mode='bilinear',
                            align_corners=False) for k in (1, 3, 8)) / 3
    return img[0]


GROUP = 16  # conv5_4 (after four poolings) needs 16 px; UNetDiscriminatorSN needs a multiple of 8
HR_HW, LQ_HW = (20, 24), (10, 12)
CORNERS = [(1, 3), (4, 8)]


def group_batch(corners=CORNERS, subpixel=False):
    """Two random-group samples at known top-left corners of a 20x24 HR image (x2)."""
    lq, coord, gt = [], [], []
    for seed, (top, left) in enumerate(corners):
        hr = smooth_image(*HR_HW, seed)
        lq.append(F.interpolate(hr[None], size=LQ_HW, mode='bicubic', align_corners=False, antialias=True)[0])
        if subpixel:
            c, _, g = sample_group(hr, GROUP, subpixel=True)
        else:
            c = group_coords(HR_HW, top, left, GROUP)
            g = hr[:, top:top + GROUP, left:left + GROUP]
        coord.append(c)
        gt.append(g)
    n = GROUP * GROUP
    return {'lq': torch.stack(lq).clamp(0, 1), 'coord': torch.stack(coord),
            'cell': make_cell(HR_HW, n).unsqueeze(0).expand(len(corners), -1, -1).clone(), 'gt': torch.stack(gt),
            'scale': torch.tensor([[2.0, 2.0]] * len(corners))}


def grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def all_zero(gs):
    return all(g is None or torch.count_nonzero(g) == 0 for g in gs)


def all_nonzero(gs):
    return all(g is not None and torch.count_nonzero(g) > 0 for g in gs)


# ----------------------------------------------------------------------------- (a) gradient blocking
def test_decoder1_learns_from_l1_only(offline):
    model = build_model(offline)
    net = model.get_bare_model(model.net_g)
    model.feed_data(group_batch())
    losses = model.generator_losses()
    assert list(losses) == ['l_pix', 'l_percep', 'l_g_gan']
    dec1, dec2 = list(net.decoder1.parameters()), list(net.decoder2.parameters())
    for name in ('l_percep', 'l_g_gan'):
        assert all_zero(grads(losses[name], dec1)), f'{name} reaches decoder 1'
        assert all_nonzero(grads(losses[name], dec2)), f'{name} misses decoder 2'
    pix_grads = grads(losses['l_pix'], dec1)
    assert all_nonzero(pix_grads)
    assert all_zero(grads(losses['l_pix'], dec2))

    # the training step itself: decoder 1's gradient is exactly the L1 gradient
    model.optimize_parameters(1)
    for p, g in zip(dec1, pix_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-9)
    assert set(model.get_current_log()) == {'l_pix', 'l_percep', 'l_g_gan', 'l_d_real', 'out_d_real', 'l_d_fake',
                                            'out_d_fake'}


def test_single_decoder_gets_all_three_terms(offline):
    model = build_model(offline, {'type': 'LIIFGAN', 'encoder': dict(TINY_EDSR), 'hidden_list': [16],
                                  'dual_decoder': False})
    net = model.get_bare_model(model.net_g)
    assert net.decoder2 is None
    model.feed_data(group_batch())
    losses = model.generator_losses()
    assert model.output is model.output_d1  # L1, GAN and VGG on the same image
    params = list(net.decoder1.parameters()) + list(net.encoder.parameters())
    for name in ('l_pix', 'l_percep', 'l_g_gan'):
        assert all_nonzero(grads(losses[name], params)), name


# ----------------------------------------------------------------------------- (b) encoder_adv_grad
def test_encoder_adv_grad_default_reaches_whole_encoder(offline):
    model = build_model(offline)
    assert model.encoder_adv_grad is True
    net = model.get_bare_model(model.net_g)
    model.feed_data(group_batch())
    losses = model.generator_losses()
    enc = dict(net.encoder.named_parameters())
    lower = [enc[k] for k in enc if k.startswith(('conv_first', 'body.0'))]
    upper = [enc[k] for k in enc if k.startswith(('body.1', 'conv_after_body'))]
    for name in ('l_percep', 'l_g_gan'):
        assert all_nonzero(grads(losses[name], lower + upper)), name
    # decoder 1 reads the feature after block 1 (mid_layer 1): L1 never sees the layers above
    assert all_nonzero(grads(losses['l_pix'], lower))
    assert all_zero(grads(losses['l_pix'], upper))


def test_encoder_adv_grad_false_keeps_encoder_l1_only(offline):
    model = build_model(offline, {'type': 'LIIFGAN', 'encoder': dict(TINY_EDSR), 'hidden_list': [16],
                                  'decoder1_feature': 'last'}, encoder_adv_grad=False)
    net = model.get_bare_model(model.net_g)
    model.feed_data(group_batch())
    losses = model.generator_losses()
    enc = list(net.encoder.parameters())
    for name in ('l_percep', 'l_g_gan'):
        assert all_zero(grads(losses[name], enc)), name
        assert all_nonzero(grads(losses[name], list(net.decoder2.parameters()))), name
    assert all_nonzero(grads(losses['l_pix'], enc))


@pytest.mark.parametrize('network_g, train, match', [
    ({'dual_decoder': True}, {'encoder_adv_grad': False}, 'mid_layer without any gradient'),
    ({'dual_decoder': False}, {'encoder_adv_grad': False}, 'needs two decoders'),
    ({}, {'encoder_adv_grad': 'no'}, 'expected true or false'),
    ({}, {'pixel_opt': None}, 'pixel_opt is required'),
    ({}, {'gan_opt': None}, 'gan_opt is required'),
])
def test_bad_training_options(offline, network_g, train, match):
    net_opt = {'type': 'LIIFGAN', 'encoder': dict(TINY_EDSR), 'hidden_list': [16], **network_g}
    with pytest.raises(ValueError, match=match):
        LIIFGANModel(model_opt(offline, net_opt, **train))


def test_scattered_pixels_are_refused(offline):
    model = build_model(offline)
    batch = group_batch()
    batch['gt'] = batch['gt'].flatten(2).transpose(1, 2)  # (B, Q, 3)
    model.feed_data(batch)
    with pytest.raises(ValueError, match='group_size'):
        model.optimize_parameters(1)


# ----------------------------------------------------------------------------- (c) the arch
class HandMidFeature(nn.Module):
    """EDSREncoder's running feature after its first residual block, written out by hand."""

    def __init__(self, edsr):
        super().__init__()
        self.edsr, self.out_channels = edsr, edsr.out_channels

    def forward(self, x):
        return self.edsr.body[0](self.edsr.conv_first(x))


def liif_with(encoder, decoder):
    liif = build_network({'type': 'LIIF', 'encoder': dict(TINY_EDSR), 'hidden_list': [16], 'data_mean': MEAN,
                          'data_std': STD})
    liif.encoder = encoder
    liif.decoder.load_state_dict(decoder.state_dict())
    return liif


def test_parts_are_two_liif_decoders_and_sum_to_forward():
    net = tiny_net()
    lq = torch.rand(2, 3, 7, 9)
    coord = make_coord((23, 16)).unsqueeze(0).expand(2, -1, -1)  # anisotropic, non-integer scales
    cell = make_cell((23, 16), coord.shape[1]).unsqueeze(0).expand(2, -1, -1)
    mean = torch.tensor(MEAN)
    with torch.no_grad():
        ip1, ip2 = net.forward_parts(lq, coord, cell)
        out = net(lq, coord, cell)
        ref1 = liif_with(HandMidFeature(net.encoder), net.decoder1)(lq, coord, cell)
        ref2 = liif_with(net.encoder, net.decoder2)(lq, coord, cell) - mean  # increment: no mean
        up = net.upscale(lq, (23, 16), chunk_size=50)
    torch.testing.assert_close(ip1, ref1, rtol=0, atol=1e-6)
    torch.testing.assert_close(ip2, ref2, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, ip1 + ip2, rtol=0, atol=1e-6)
    torch.testing.assert_close(up.flatten(2).transpose(1, 2), out, rtol=0, atol=1e-6)


def test_decoder1_on_last_feature():
    net = tiny_net(decoder1_feature='last')
    lq = torch.rand(1, 3, 6, 6)
    coord = make_coord((15, 15)).unsqueeze(0)
    cell = make_cell((15, 15), coord.shape[1]).unsqueeze(0)
    with torch.no_grad():
        ip1, ip2 = net.forward_parts(lq, coord, cell)
        ref1 = liif_with(net.encoder, net.decoder1)(lq, coord, cell)
        ref2 = liif_with(net.encoder, net.decoder2)(lq, coord, cell) - torch.tensor(MEAN)
    torch.testing.assert_close(ip1, ref1, rtol=0, atol=1e-6)
    torch.testing.assert_close(ip2, ref2, rtol=0, atol=1e-6)


@pytest.mark.parametrize('num_block, after_blocks', [(1, 1), (2, 1), (5, 2), (0, 0)])
def test_default_mid_feature_is_after_half_the_blocks(num_block, after_blocks):
    torch.manual_seed(0)
    encoder = build_network({'type': 'EDSREncoder', 'num_feat': 4, 'num_block': num_block}).eval()
    x = torch.rand(1, 3, 5, 6)
    with torch.no_grad():
        mid, last = encoder(x, return_mid=True)
        ref = encoder.conv_first(x)
        for block in encoder.body[:after_blocks]:
            ref = block(ref)
    assert torch.equal(last, encoder(x)) and torch.equal(mid, ref)
    net = tiny_net(encoder={'type': 'EDSREncoder', 'num_feat': 8, 'num_block': num_block}).eval()
    with torch.no_grad():  # and LIIF-GAN's decoder 1 can read it
        assert net.upscale(torch.rand(1, 3, 4, 4), (9, 7)).shape == (1, 3, 9, 7)


def test_single_decoder_is_liif():
    net = tiny_net(dual_decoder=False)
    lq = torch.rand(1, 3, 6, 6)
    coord = make_coord((13, 17)).unsqueeze(0)
    cell = make_cell((13, 17), coord.shape[1]).unsqueeze(0)
    with torch.no_grad():
        ip1, ip2 = net.forward_parts(lq, coord, cell)
        ref = liif_with(net.encoder, net.decoder1)(lq, coord, cell)
        out = net(lq, coord, cell)
    assert ip2 is None and net.decoder2 is None
    torch.testing.assert_close(ip1, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match='dual_decoder'):
        net.forward_parts(lq, coord, cell, detach_increment_feature=True)


def test_tiled_inference_matches_whole_image():
    from ciisr_plugin.inference import upscale_tiled
    net = tiny_net()
    lq = torch.rand(1, 3, 13, 11)
    with torch.no_grad():
        whole = net.upscale(lq, (33, 29))
        tiled = upscale_tiled(net, lq, (33, 29), tile=4)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)


def test_detached_increment_feature_gives_same_values():
    net = tiny_net(decoder1_feature='last')
    lq = torch.rand(1, 3, 5, 5)
    coord = make_coord((9, 9)).unsqueeze(0)
    cell = make_cell((9, 9), coord.shape[1]).unsqueeze(0)
    a = net.forward_parts(lq, coord, cell)
    b = net(lq, coord, cell, parts=True, detach_increment_feature=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize('opt, match', [
    ({'decoder1_feature': 'middle'}, 'decoder1_feature must be one of'),
    ({'dual_decoder': False, 'decoder1_feature': 'mid'}, "must be 'last'"),
    ({'encoder': {'type': 'BasicSREncoder', 'arch': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8,
                  'num_block': 1, 'upscale': 2}}, 'needs an encoder with a mid-layer feature'),
])
def test_bad_arch_options(opt, match):
    with pytest.raises(ValueError, match=match):
        build_network({'type': 'LIIFGAN', 'encoder': dict(TINY_EDSR), 'hidden_list': [16], **opt})


# ----------------------------------------------------------------------------- (d) patch layout
def test_group_predictions_are_upscale_crops(offline):
    model = build_model(offline)
    net = model.get_bare_model(model.net_g)
    batch = group_batch()
    model.feed_data(batch)
    with torch.no_grad():
        model.forward_generator()
        full = net.upscale(batch['lq'], HR_HW)
    assert model.output.shape == model.output_d1.shape == (2, 3, GROUP, GROUP)
    for b, (top, left) in enumerate(CORNERS):
        torch.testing.assert_close(model.output[b], full[b, :, top:top + GROUP, left:left + GROUP], rtol=0,
                                   atol=1e-6)


def test_subpixel_group_matches_per_pixel_queries(offline):
    model = build_model(offline)
    net = model.get_bare_model(model.net_g)
    batch = group_batch(subpixel=True)
    model.feed_data(batch)
    perm = torch.randperm(GROUP * GROUP)
    with torch.no_grad():
        model.forward_generator()
        ip1, _ = net.forward_parts(batch['lq'], batch['coord'][:, perm], batch['cell'][:, perm])
    for q in range(0, GROUP * GROUP, 37):  # query q of the shuffled list is pixel perm[q] of the patch
        i, j = divmod(int(perm[q]), GROUP)
        torch.testing.assert_close(model.output_d1[:, :, i, j], ip1[:, q], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- VGG weights offline
def test_perceptual_loss_uses_the_local_file(offline):
    loss = LocalWeightsPerceptualLoss({'conv2_1': 1.0})
    state = torch.load(vgg_file(offline))
    x, y = torch.rand(2, 3, 12, 12), torch.rand(2, 3, 12, 12)

    def conv2_1(img):  # VGG19 up to conv2_1 (before relu2_1), by hand from the file
        img = (img - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        h = F.relu(F.conv2d(img, state['features.0.weight'], state['features.0.bias'], padding=1))
        h = F.relu(F.conv2d(h, state['features.2.weight'], state['features.2.bias'], padding=1))
        return F.conv2d(F.max_pool2d(h, 2), state['features.5.weight'], state['features.5.bias'], padding=1)

    percep, style = loss(x, y)
    assert style is None and loss.vgg_weights_path == vgg_file(offline)
    torch.testing.assert_close(percep, (conv2_1(x) - conv2_1(y)).abs().mean(), rtol=1e-5, atol=1e-6)


def test_missing_vgg_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty'))
    monkeypatch.chdir(tmp_path)
    expected = os.path.join(str(tmp_path / 'empty'), 'hub', 'checkpoints')
    with pytest.raises(FileNotFoundError) as err:
        LocalWeightsPerceptualLoss({'conv5_4': 1.0})
    assert 'vgg19-dcbb9e9d.pth' in str(err.value) and expected in str(err.value)
    with pytest.raises(FileNotFoundError, match='vgg_weights_path: no such file'):
        LocalWeightsPerceptualLoss({'conv5_4': 1.0}, vgg_weights_path=str(tmp_path / 'nope.pth'))
    # BasicSR's own PerceptualLoss would try to download: the model names the file first
    opt = model_opt(tmp_path)
    opt['train']['perceptual_opt'] = {'type': 'PerceptualLoss', 'layer_weights': {'conv5_4': 1.0}}
    with pytest.raises(FileNotFoundError, match=r'PerceptualLoss needs vgg19-dcbb9e9d\.pth'):
        LIIFGANModel(opt)


def test_unusable_vgg_weights_are_clear_errors(offline, tmp_path):
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='garbage.pth: not usable as torchvision vgg19 weights'):
        LocalWeightsPerceptualLoss({'conv5_4': 1.0}, vgg_weights_path=str(garbage))
    alexnet = str(offline / 'hub' / 'checkpoints' / 'alexnet-owt-7be5be79.pth')
    with pytest.raises(ValueError, match='alexnet-owt-7be5be79.pth: not usable'):
        LocalWeightsPerceptualLoss({'conv5_4': 1.0}, vgg_weights_path=alexnet)
    with pytest.raises(ValueError, match='unknown vgg19 layer'):
        LocalWeightsPerceptualLoss({'conv9_9': 1.0})


# ----------------------------------------------------------------------------- (e) training run
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
