"""Tiny networks the render tests share: every parameter perturbed, so no term can hide behind
a zero init, and the whole-image reference they are compared with."""
import torch

import ciisr_plugin  # noqa: F401  (before basicsr: applies the compat fixes)
from basicsr.archs import build_network

from ciisr_plugin.checkpoint import describe

TINY_EDSR = {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 1}
TINY_LIIF = {'type': 'LIIF', 'encoder': TINY_EDSR, 'hidden_list': [16, 16]}
TINY_ALIIF = {'type': 'ALIIF', 'encoder': TINY_EDSR, 'num_basis': 3, 'basis_hidden': [8, 8],
              'expansion_hidden': [16]}


def build(opt, **flags):
    torch.manual_seed(0)
    net = build_network({**opt, **flags}).eval()
    with torch.no_grad():  # no zero biases: every term must matter
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def whole(net, lq, size):
    with torch.no_grad():
        return net.upscale(lq, size=size)


def tiny_checkpoint(tmp_path_factory):
    """(path of a self-describing tiny LIIF checkpoint, the net it holds)."""
    net = build(TINY_LIIF)
    path = tmp_path_factory.mktemp('ckpt') / 'tiny_liif.pth'
    torch.save(describe(TINY_LIIF, net.state_dict()), path)
    return str(path), net
