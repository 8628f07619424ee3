"""LIIFGANModel: gradient blocking, the encoder option, patch layout, offline VGG weights.

Independent references: gradients of each loss term taken one by one; patches compared with
``net.upscale`` crops; the perceptual loss with VGG convolutions written out here. The arch
itself is tested in tests/archs/test_liifgan.py, whole training runs in test_liifgan_training.py.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from ciisr_plugin.archs.implicit_query import make_cell
from ciisr_plugin.data.query_sampling import group_coords, sample_group
from ciisr_plugin.losses.perceptual_loss import LocalWeightsPerceptualLoss
from ciisr_plugin.models.liifgan_model import LIIFGANModel
from liifgan_support import GROUP, TINY_D, TINY_EDSR, smooth_image, vgg_file

MEAN, STD = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]  # not 0.5 / 0.5: a mean added to the increment would show

pytestmark = pytest.mark.usefixtures('one_thread')


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
