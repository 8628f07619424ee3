"""Metrics against hand-computed values and independent re-computations."""
import math
import os

import numpy as np
import pytest
import torch

from basicsr.metrics import calculate_metric, calculate_psnr, calculate_ssim
from basicsr.utils import tensor2img

from ciisr_plugin.metrics import lpips_metric
from ciisr_plugin.metrics.lpips_metric import calculate_lpips
from ciisr_plugin.metrics.psnr_liif_metric import calculate_psnr_liif

Y_SUM = 65.738 + 129.057 + 25.064  # BT.601 luma weights (x256) of the authors' benchmark protocol


def psnr_of_mse(mse):
    return -10 * math.log10(mse)


def quantised(t):
    """What BasicSR's tensor2img keeps of a [0, 1] tensor, back as a (1, 3, H, W) RGB tensor."""
    return torch.from_numpy(np.ascontiguousarray(tensor2img([t])[..., ::-1])).permute(2, 0, 1)[None].float() / 255


def test_constant_offset_has_known_psnr():
    gt = torch.rand(1, 3, 40, 40) * 0.6 + 0.2
    out = gt + 0.1
    assert calculate_psnr_liif(out, gt) == pytest.approx(20.0, abs=1e-5)  # mse = 0.01
    assert calculate_psnr_liif(out, gt, scale=4, mode='div2k') == pytest.approx(20.0, abs=1e-5)
    # benchmark: Y of the difference, 0.1 * sum(w) / 256 everywhere
    assert calculate_psnr_liif(out, gt, scale=4, mode='benchmark') == pytest.approx(
        psnr_of_mse((0.1 * Y_SUM / 256)**2), abs=1e-5)
    # float output, not quantised: an offset of 0.001 is 60 dB (it would round away in 8 bit)
    assert calculate_psnr_liif(gt + 0.001, gt, scale=2, mode='div2k') == pytest.approx(60.0, abs=1e-3)
    assert calculate_psnr_liif(gt, gt) == float('inf')


def test_y_weights_per_channel():
    gt = torch.full((1, 3, 20, 20), 0.5)
    for c, weight in enumerate((65.738, 129.057, 25.064)):
        out = gt.clone()
        out[:, c] += 0.2
        expected = psnr_of_mse((0.2 * weight / 256)**2)
        assert calculate_psnr_liif(out, gt, scale=2, mode='benchmark') == pytest.approx(expected, abs=1e-5)
        assert calculate_psnr_liif(out, gt) == pytest.approx(psnr_of_mse(0.04 / 3), abs=1e-5)  # RGB


def one_bad_pixel(pos, size=32):
    gt = torch.zeros(1, 3, size, size)
    out = gt.clone()
    out[..., pos[0], pos[1]] = 1.0
    return out, gt


def test_shave_widths():
    # benchmark x4 shaves 4 px: a wrong pixel at index 3 is ignored, at index 4 it counts
    out, gt = one_bad_pixel((3, 10))
    assert calculate_psnr_liif(out, gt, scale=4, mode='benchmark') == float('inf')
    out, gt = one_bad_pixel((4, 10))
    expected = psnr_of_mse((Y_SUM / 256)**2 / (24 * 24))
    assert calculate_psnr_liif(out, gt, scale=4, mode='benchmark') == pytest.approx(expected, abs=1e-6)
    # div2k x2 shaves 2 + 6 = 8 px, on RGB
    out, gt = one_bad_pixel((7, 20))
    assert calculate_psnr_liif(out, gt, scale=2, mode='div2k') == float('inf')
    out, gt = one_bad_pixel((8, 20))
    assert calculate_psnr_liif(out, gt, scale=2, mode='div2k') == pytest.approx(psnr_of_mse(1 / (16 * 16)), abs=1e-6)
    # no mode: nothing shaved
    out, gt = one_bad_pixel((0, 0))
    assert calculate_psnr_liif(out, gt, scale=4) == pytest.approx(psnr_of_mse(1 / (32 * 32)), abs=1e-6)
    # non-integer scale: ceil(2.5) = 3; an integer-valued float is that integer
    out, gt = one_bad_pixel((2, 10))
    assert calculate_psnr_liif(out, gt, scale=2.5, mode='benchmark') == float('inf')
    out, gt = one_bad_pixel((3, 10))
    assert calculate_psnr_liif(out, gt, scale=2.5, mode='benchmark') < 100
    assert calculate_psnr_liif(out, gt, scale=3.0, mode='benchmark') < 100
    # anisotropic [2, 5]: rows shaved by 2, columns by 5
    out, gt = one_bad_pixel((2, 4))
    assert calculate_psnr_liif(out, gt, scale=[2, 5], mode='benchmark') == float('inf')
    out, gt = one_bad_pixel((2, 5))
    assert calculate_psnr_liif(out, gt, scale=[2, 5], mode='benchmark') == pytest.approx(
        psnr_of_mse((Y_SUM / 256)**2 / (28 * 22)), abs=1e-6)
    # explicit shave override
    out, gt = one_bad_pixel((1, 1))
    assert calculate_psnr_liif(out, gt, shave=2) == float('inf')


def test_output_is_clamped_to_0_1():
    gt = (torch.rand(3, 16, 16) > 0.5).float()
    out = gt * 2 - 0.5  # 1 -> 1.5, 0 -> -0.5: both clamp back onto the GT
    assert calculate_psnr_liif(out, gt) == float('inf')
    assert calculate_psnr_liif(out, gt * 0 + 0.5) == pytest.approx(psnr_of_mse(0.25), abs=1e-6)


def test_matches_a_literal_transcription_of_the_protocol():
    """The protocol as the paper's code computes it (float32, batch tensors), written out here."""
    torch.manual_seed(0)
    gt = torch.rand(1, 3, 45, 38)
    out = (gt + 0.05 * torch.randn_like(gt))
    for mode, scale in (('benchmark', 3), ('div2k', 4), (None, 1)):
        diff = out.clamp(0, 1) - gt
        shave = 0
        if mode == 'benchmark':
            shave = scale
            diff = (diff * torch.tensor([65.738, 129.057, 25.064]).view(1, 3, 1, 1) / 256).sum(1)
        elif mode == 'div2k':
            shave = scale + 6
        if shave:
            diff = diff[..., shave:-shave, shave:-shave]
        ref = (-10 * torch.log10(diff.pow(2).mean())).item()
        assert calculate_psnr_liif(out, gt, scale=scale, mode=mode) == pytest.approx(ref, abs=1e-4)


def test_basicsr_uint8_inputs_and_basicsr_metrics_unchanged():
    torch.manual_seed(1)
    gt = torch.rand(1, 3, 30, 30)
    out = (gt + 0.03 * torch.randn_like(gt)).clamp(0, 1)
    out_img, gt_img = tensor2img([out]), tensor2img([gt])  # HWC BGR uint8
    assert out_img.shape == (30, 30, 3) and out_img.dtype == np.uint8
    for mode in ('benchmark', 'div2k', None):
        assert calculate_psnr_liif(out_img, gt_img, scale=2, mode=mode) == pytest.approx(
            calculate_psnr_liif(quantised(out), quantised(gt), scale=2, mode=mode), abs=1e-6)
    # BasicSR's own metrics run on tensor2img output as always, and agree with ours on RGB
    basic = calculate_psnr(out_img, gt_img, crop_border=4)
    assert basic == pytest.approx(calculate_psnr_liif(out_img, gt_img, shave=4), abs=1e-6)
    assert 0 < calculate_ssim(out_img, gt_img, crop_border=4) < 1
    assert calculate_ssim(gt_img, gt_img, crop_border=4) == pytest.approx(1.0)
    # and through BasicSR's registry, as validation calls it
    via_registry = calculate_metric({'img': out, 'img2': gt, 'scale': [2.0, 2.0]},
                                    {'type': 'calculate_psnr_liif', 'mode': 'benchmark'})
    assert via_registry == pytest.approx(calculate_psnr_liif(out, gt, scale=2, mode='benchmark'))


def test_psnr_errors():
    a, b = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9)
    with pytest.raises(ValueError, match='different shapes'):
        calculate_psnr_liif(a, b)
    with pytest.raises(ValueError, match="mode 'benchmark' needs the evaluation scale"):
        calculate_psnr_liif(a, a, mode='benchmark')
    with pytest.raises(ValueError, match='mode must be one of'):
        calculate_psnr_liif(a, a, scale=2, mode='set5')
    with pytest.raises(ValueError, match='too small to shave'):
        calculate_psnr_liif(a, a, scale=4, mode='benchmark')


# ----------------------------------------------------------------------------- LPIPS
@pytest.fixture
def alexnet_home(tmp_path, monkeypatch):
    """A TORCH_HOME holding a randomly initialised torchvision AlexNet file under the real name."""
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.alexnet(weights=None)
    # only the conv features matter to LPIPS; keep the file small
    state = {k: v for k, v in net.state_dict().items() if k.startswith('features.')}
    ckpt_dir = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    ckpt_dir.mkdir(parents=True)
    torch.save(state, ckpt_dir / 'alexnet-owt-7be5be79.pth')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setattr(lpips_metric, '_MODELS', {})
    return state, ckpt_dir


def reference_lpips(x, y, features_state):
    """LPIPS written out from its definition: AlexNet relu1..5 features of the scaled [-1, 1]
    inputs, unit-normalised over channels, squared difference, 1x1 linear layer, spatial mean, sum."""
    import lpips
    import torchvision
    net = torchvision.models.alexnet(weights=None).features
    net.load_state_dict({k[len('features.'):]: v for k, v in features_state.items()})
    lin_path = os.path.join(os.path.dirname(lpips.__file__), 'weights', 'v0.1', 'alex.pth')
    lins = torch.load(lin_path, map_location='cpu', weights_only=True)
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)

    def feats(img):
        h, out = (img * 2 - 1 - shift) / scale, []
        for idx, layer in enumerate(net):
            h = layer(h)
            if idx in (1, 4, 7, 9, 11):
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = 0
    with torch.no_grad():
        for k, (fx, fy) in enumerate(zip(feats(x), feats(y))):
            w = lins[f'lin{k}.model.1.weight']
            total = total + torch.nn.functional.conv2d((fx - fy)**2, w).mean()
    return total.item()


def test_lpips_with_local_backbone(alexnet_home):
    state, ckpt_dir = alexnet_home
    torch.manual_seed(2)
    gt = torch.rand(1, 3, 64, 64)
    out = (gt + 0.1 * torch.randn_like(gt)).clamp(0, 1)
    assert calculate_lpips(gt, gt) == pytest.approx(0.0, abs=1e-7)
    d = calculate_lpips(out, gt)
    assert d > 0
    assert d == pytest.approx(reference_lpips(out, gt, state), rel=1e-4)
    # cached: one model per (net, file, device)
    model = lpips_metric.build_lpips('alex')
    assert lpips_metric.build_lpips('alex') is model and len(lpips_metric._MODELS) == 1
    # BasicSR's uint8 BGR images give the same as the quantised float tensors
    assert calculate_lpips(tensor2img([out]), tensor2img([gt])) == pytest.approx(
        calculate_lpips(quantised(out), quantised(gt)), abs=1e-6)
    # an explicit backbone file works without the hub cache
    moved = ckpt_dir.parent.parent / 'elsewhere.pth'
    os.replace(ckpt_dir / 'alexnet-owt-7be5be79.pth', moved)
    lpips_metric._MODELS.clear()
    assert calculate_lpips(out, gt, backbone_weights=str(moved)) == pytest.approx(d, rel=1e-6)


def test_lpips_missing_or_bad_backbone_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'nothing'))
    monkeypatch.setattr(lpips_metric, '_MODELS', {})
    x = torch.rand(1, 3, 32, 32)
    expected_dir = str(tmp_path / 'nothing' / 'hub' / 'checkpoints')
    with pytest.raises(FileNotFoundError) as err:
        calculate_lpips(x, x)
    assert 'alexnet-owt-7be5be79.pth' in str(err.value) and expected_dir in str(err.value)
    with pytest.raises(FileNotFoundError, match='vgg16-397923af.pth'):
        calculate_lpips(x, x, net='vgg')
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match=r'bad\.pth: cannot load LPIPS backbone weights'):
        calculate_lpips(x, x, backbone_weights=str(bad))
    torch.save({'something': torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=r"bad\.pth: not a torchvision alex checkpoint"):
        calculate_lpips(x, x, backbone_weights=str(bad))
    with pytest.raises(ValueError, match="net must be 'alex' or 'vgg'"):
        calculate_lpips(x, x, net='squeeze')
