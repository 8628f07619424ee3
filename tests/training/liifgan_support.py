"""What the LIIF-GAN model and training tests share: tiny networks, images with structure at
several scales, and where the offline VGG19 file lies in ``torch_home``."""
import torch
import torch.nn.functional as F

TINY_EDSR = {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 2, 'mid_layer': 1}
TINY_D = {'type': 'UNetDiscriminatorSN', 'num_in_ch': 3, 'num_feat': 8}
GROUP = 16  # conv5_4 (after four poolings) needs 16 px; UNetDiscriminatorSN needs a multiple of 8


def vgg_file(home):
    return str(home / 'hub' / 'checkpoints' / 'vgg19-dcbb9e9d.pth')


def smooth_image(h, w, seed):
    """A (3, h, w) image with structure at several scales, in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    img = sum(F.interpolate(torch.rand(1, 3, h // k + 1, w // k + 1, generator=gen), size=(h, w), mode='bilinear',
                            align_corners=False) for k in (1, 3, 8)) / 3
    return img[0]
