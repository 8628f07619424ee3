"""Fixed-scale BasicSR networks (EDSR, RRDBNet/ESRGAN, ...) in the arbitrary-scale harness."""
import torch
from torch import nn
from torch.nn import functional as F

from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY


@ARCH_REGISTRY.register()
class FixedScaleSR(nn.Module):
    """Evaluate a fixed-scale network at any output size, as the LIIF-GAN paper does for its
    baselines: bicubic-resize the input so that the network's x``net_scale`` output lands on
    the target size (a final bicubic resize absorbs rounding when the size is not a multiple).

    Args:
        net (dict): the BasicSR network, e.g. ``{type: RRDBNet, num_in_ch: 3, ..., scale: 4}``.
        net_scale (int): its upscaling factor.

    State dicts of the bare BasicSR network load directly (``pretrain_network_g`` can point
    at BasicSR's released EDSR / ESRGAN files).
    """

    def __init__(self, net, net_scale=4):
        super().__init__()
        self.net = build_network(net)
        self.net_scale = net_scale
        self._register_load_state_dict_pre_hook(self._accept_bare_keys)

    @staticmethod
    def _accept_bare_keys(state_dict, prefix, *args):
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + 'net.')]:
            state_dict[prefix + 'net.' + key[len(prefix):]] = state_dict.pop(key)

    def upscale(self, lq, size, chunk_size=None):
        out_h, out_w = int(size[0]), int(size[1])
        in_size = (max(1, round(out_h / self.net_scale)), max(1, round(out_w / self.net_scale)))
        x = F.interpolate(lq, size=in_size, mode='bicubic', align_corners=False, antialias=True).clamp(0, 1)
        out = self.net(x)
        if tuple(out.shape[-2:]) != (out_h, out_w):
            out = F.interpolate(out, size=(out_h, out_w), mode='bicubic', align_corners=False, antialias=True)
        return out

    def forward(self, lq, coord, cell):
        """Query contract: render at the size the cell implies, then read the queried pixels."""
        size = (round(2 / cell[0, 0, 0].item()), round(2 / cell[0, 0, 1].item()))
        img = self.upscale(lq, size)
        picked = F.grid_sample(img, coord.flip(-1).unsqueeze(1), mode='nearest', align_corners=False)
        return picked[:, :, 0].transpose(1, 2)


def pil_bicubic_resize(img, size):
    """Resize (B, C, h, w) float images with PIL's bicubic kernel (a = -0.5, as MATLAB's
    imresize and the PIL downsampling that makes the LR inputs) in float32, per channel."""
    from ..data.resize import pil_bicubic_planes  # (data imports archs: not at module level)

    out_h, out_w = int(size[0]), int(size[1])
    b, c, h, w = img.shape
    planes = pil_bicubic_planes(img.detach().float().cpu().numpy().reshape(b * c, h, w), out_h, out_w)
    return torch.from_numpy(planes.reshape(b, c, out_h, out_w)).to(img.device)


@ARCH_REGISTRY.register()
class BicubicSR(nn.Module):
    """Bicubic interpolation as a network: the reference every SR model must beat.

    ``kernel``: 'pil' (a = -0.5, the kernel the LR inputs are made with) or 'torch'
    (``F.interpolate``, a = -0.75).
    """

    def __init__(self, kernel='pil'):
        super().__init__()
        if kernel not in ('pil', 'torch'):
            raise ValueError(f"BicubicSR: kernel must be 'pil' or 'torch', got '{kernel}'")
        self.kernel = kernel

    def upscale(self, lq, size, chunk_size=None):
        if self.kernel == 'pil':
            return pil_bicubic_resize(lq, size)
        return F.interpolate(lq, size=tuple(int(s) for s in size), mode='bicubic', align_corners=False)

    def forward(self, lq, coord, cell):
        size = (round(2 / cell[0, 0, 0].item()), round(2 / cell[0, 0, 1].item()))
        picked = F.grid_sample(self.upscale(lq, size), coord.flip(-1).unsqueeze(1), mode='nearest',
                               align_corners=False)
        return picked[:, :, 0].transpose(1, 2)
