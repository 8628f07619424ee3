"""Latent-grid encoders: CNN backbones with their upsampling tail removed.

Every encoder returns a feature map at the LR resolution and exposes ``out_channels``.
``forward(x, return_mid=True)`` additionally returns a mid-layer feature (LIIF-GAN's
decoder 1 reads it); ``mid_layer`` says which block's output that is.
"""
import torch
from torch import nn
from torch.nn import functional as F

from basicsr.archs.arch_util import ResidualBlockNoBN
from basicsr.utils.registry import ARCH_REGISTRY


def _check_mid_layer(mid_layer, num_blocks, name):
    if mid_layer is None:  # half of them, and at least one block when there is one
        return max(1, num_blocks // 2) if num_blocks else 0
    if not 1 <= mid_layer <= num_blocks:
        raise ValueError(f'{name}: mid_layer must be in [1, {num_blocks}] (blocks), got {mid_layer}')
    return mid_layer


def _global_skip_body(net, stages, x, return_mid):
    """EDSR's and RCAN's shape: conv_first, the stages, conv_after_body, a skip around all
    of it; the mid-layer feature is the running feature after stage ``net.mid_layer``."""
    x = net.conv_first(x)
    res, mid = x, (x if net.mid_layer == 0 else None)  # 0: a body without stages
    for i, stage in enumerate(stages, start=1):
        res = stage(res)
        if i == net.mid_layer:
            mid = res
    res = net.conv_after_body(res) + x
    return (mid, res) if return_mid else res


# The LIIF authors' encoders keep EDSR-PyTorch's names. Each encoder below maps them onto its own
# with ``authors_key_rules(opt)``: (pattern, replacement) pairs for the state-dict keys under
# ``encoder.``, tried in order, the first match applied; a None replacement drops the key.
_EDSR_PYTORCH_HEAD_KEYS = [
    (r'^encoder\.(sub_mean|add_mean)\..*', None),  # mean shift: stored but unused by their forward
    (r'^encoder\.head\.0\.', 'encoder.conv_first.'),
]


@ARCH_REGISTRY.register()
class EDSREncoder(nn.Module):
    """EDSR body without mean shift or upsampler, as used by LIIF.

    Defaults are EDSR-baseline (16 blocks, 64 channels, res_scale 1); EDSR proper is
    ``num_block=32, num_feat=256, res_scale=0.1``. The mid-layer feature is the body's
    running feature after ``mid_layer`` residual blocks (default: half of them).
    """

    def __init__(self, num_in_ch=3, num_feat=64, num_block=16, res_scale=1.0, mid_layer=None):
        super().__init__()
        self.out_channels = num_feat
        self.mid_layer = _check_mid_layer(mid_layer, num_block, 'EDSREncoder')
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.ModuleList(
            [ResidualBlockNoBN(num_feat=num_feat, res_scale=res_scale, pytorch_init=True) for _ in range(num_block)])
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

    def forward(self, x, return_mid=False):
        return _global_skip_body(self, self.body, x, return_mid)

    @staticmethod
    def authors_key_rules(opt):
        return _EDSR_PYTORCH_HEAD_KEYS + [
            (r'^encoder\.body\.(\d+)\.body\.0\.', r'encoder.body.\1.conv1.'),
            (r'^encoder\.body\.(\d+)\.body\.2\.', r'encoder.body.\1.conv2.'),
            # the body's final conv is entry num_block of their Sequential
            (rf'^encoder\.body\.{opt.get("num_block", 16)}\.', 'encoder.conv_after_body.'),
        ]


class _DenseLayer(nn.Module):
    """conv-relu whose output is concatenated to its input (RDN's growth step)."""

    def __init__(self, in_ch, growth, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, growth, kernel_size, padding=kernel_size // 2)

    def forward(self, x):
        return torch.cat([x, F.relu(self.conv(x))], dim=1)


class _ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat, growth, num_layers):
        super().__init__()
        # 3x3 whatever the encoder's kernel_size: the reference RDN code builds its dense
        # layers without passing its kSize on (only the shallow and global-fusion convs use it)
        self.layers = nn.Sequential(*[_DenseLayer(num_feat + i * growth, growth, 3) for i in range(num_layers)])
        self.fuse = nn.Conv2d(num_feat + num_layers * growth, num_feat, 1)  # local feature fusion

    def forward(self, x):
        return self.fuse(self.layers(x)) + x


@ARCH_REGISTRY.register()
class RDNEncoder(nn.Module):
    """Residual Dense Network (Zhang et al., CVPR'18) without upsampler, as used by LIIF.

    ``config``: 'A' = 20 blocks x 6 layers x growth 32, 'B' = 16 x 8 x 64 (LIIF's choice).
    ``kernel_size`` (the authors' ``RDNkSize``) sizes the shallow and global-fusion convs;
    the dense layers are 3x3 (as in the reference code). The mid-layer feature is the output
    of dense block ``mid_layer``.
    """
    CONFIGS = {'A': (20, 6, 32), 'B': (16, 8, 64)}

    def __init__(self, num_in_ch=3, num_feat=64, config='B', kernel_size=3, mid_layer=None):
        super().__init__()
        if config not in self.CONFIGS:
            raise ValueError(f"RDNEncoder: config must be one of {sorted(self.CONFIGS)}, got '{config}'")
        num_blocks, num_layers, growth = self.CONFIGS[config]
        self.out_channels = num_feat
        self.mid_layer = _check_mid_layer(mid_layer, num_blocks, 'RDNEncoder')
        pad = kernel_size // 2
        self.conv_shallow1 = nn.Conv2d(num_in_ch, num_feat, kernel_size, padding=pad)
        self.conv_shallow2 = nn.Conv2d(num_feat, num_feat, kernel_size, padding=pad)
        self.blocks = nn.ModuleList(
            [_ResidualDenseBlock(num_feat, growth, num_layers) for _ in range(num_blocks)])
        # global feature fusion: 1x1 over all block outputs, then a 3x3
        self.fuse_global = nn.Conv2d(num_blocks * num_feat, num_feat, 1)
        self.conv_after_fuse = nn.Conv2d(num_feat, num_feat, kernel_size, padding=pad)

    def forward(self, x, return_mid=False):
        shallow = self.conv_shallow1(x)
        x = self.conv_shallow2(shallow)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        feat = self.conv_after_fuse(self.fuse_global(torch.cat(outs, dim=1))) + shallow
        return (outs[self.mid_layer - 1], feat) if return_mid else feat

    @staticmethod
    def authors_key_rules(opt):
        return [
            (r'^encoder\.SFENet1\.', 'encoder.conv_shallow1.'),
            (r'^encoder\.SFENet2\.', 'encoder.conv_shallow2.'),
            (r'^encoder\.RDBs\.(\d+)\.convs\.(\d+)\.conv\.0\.', r'encoder.blocks.\1.layers.\2.conv.'),
            (r'^encoder\.RDBs\.(\d+)\.LFF\.', r'encoder.blocks.\1.fuse.'),
            (r'^encoder\.GFF\.0\.', 'encoder.fuse_global.'),
            (r'^encoder\.GFF\.1\.', 'encoder.conv_after_fuse.'),
        ]


class _ChannelAttention(nn.Module):
    """Rescale channels by a gate computed from their global average (RCAN's CA layer)."""

    def __init__(self, num_feat, reduction):
        super().__init__()
        self.down = nn.Conv2d(num_feat, num_feat // reduction, 1)
        self.up = nn.Conv2d(num_feat // reduction, num_feat, 1)

    def forward(self, x):
        gate = torch.sigmoid(self.up(F.relu(self.down(x.mean(dim=(2, 3), keepdim=True)))))
        return x * gate


class _ChannelAttentionBlock(nn.Module):
    """conv-relu-conv, channel attention, identity skip (RCAN's RCAB; no residual scaling,
    which the LIIF authors' RCAN leaves out too)."""

    def __init__(self, num_feat, reduction):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.attention = _ChannelAttention(num_feat, reduction)

    def forward(self, x):
        return x + self.attention(self.conv2(F.relu(self.conv1(x))))


class _ResidualGroup(nn.Module):
    def __init__(self, num_feat, num_block, reduction):
        super().__init__()
        self.blocks = nn.Sequential(*[_ChannelAttentionBlock(num_feat, reduction) for _ in range(num_block)])
        self.conv = nn.Conv2d(num_feat, num_feat, 3, padding=1)

    def forward(self, x):
        return x + self.conv(self.blocks(x))


@ARCH_REGISTRY.register()
class RCANEncoder(nn.Module):
    """Residual Channel Attention Network (Zhang et al., ECCV'18) without mean shift or
    upsampler, as the LIIF authors' ``rcan`` encoder.

    Defaults are theirs: 10 residual groups of 20 blocks, 64 channels, channel reduction 16.
    (BasicSR's own ``RCAN`` also subtracts a dataset mean and scales to 0-255 first; use it
    through ``BasicSREncoder`` for BasicSR-trained weights.) The mid-layer feature is the
    output of residual group ``mid_layer``.
    """

    # channel attention averages over the whole image: no finite halo makes a tile exact
    receptive_radius = None

    def __init__(self, num_in_ch=3, num_feat=64, num_group=10, num_block=20, reduction=16, mid_layer=None):
        super().__init__()
        if num_feat // reduction < 1:
            raise ValueError(f'RCANEncoder: num_feat ({num_feat}) must be at least reduction ({reduction})')
        self.out_channels = num_feat
        self.mid_layer = _check_mid_layer(mid_layer, num_group, 'RCANEncoder')
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, padding=1)
        self.groups = nn.ModuleList([_ResidualGroup(num_feat, num_block, reduction) for _ in range(num_group)])
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, padding=1)

    def forward(self, x, return_mid=False):
        return _global_skip_body(self, self.groups, x, return_mid)

    @staticmethod
    def authors_key_rules(opt):
        groups, blocks = opt.get('num_group', 10), opt.get('num_block', 20)
        return _EDSR_PYTORCH_HEAD_KEYS + [
            (r'^encoder\.body\.(\d+)\.body\.(\d+)\.body\.0\.', r'encoder.groups.\1.blocks.\2.conv1.'),
            (r'^encoder\.body\.(\d+)\.body\.(\d+)\.body\.2\.', r'encoder.groups.\1.blocks.\2.conv2.'),
            (r'^encoder\.body\.(\d+)\.body\.(\d+)\.body\.3\.conv_du\.0\.',
             r'encoder.groups.\1.blocks.\2.attention.down.'),
            (r'^encoder\.body\.(\d+)\.body\.(\d+)\.body\.3\.conv_du\.2\.',
             r'encoder.groups.\1.blocks.\2.attention.up.'),
            # a group's final conv follows its num_block blocks; the body's follows its num_group groups
            (rf'^encoder\.body\.(\d+)\.body\.{blocks}\.', r'encoder.groups.\1.conv.'),
            (rf'^encoder\.body\.{groups}\.', 'encoder.conv_after_body.'),
        ]


def _normalise_like(net, x):
    """EDSR/RCAN/SwinIR subtract their dataset mean and scale by img_range first."""
    net.mean = net.mean.type_as(x)
    return (x - net.mean) * net.img_range


def _edsr_like_features(net, x):  # EDSR, RCAN: conv_first -> body -> conv_after_body, global skip
    x = net.conv_first(_normalise_like(net, x))
    return net.conv_after_body(net.body(x)) + x


def _rrdb_features(net, x):
    feat = net.conv_first(x)
    return feat + net.conv_body(net.body(feat))


def _swinir_features(net, x):
    # attention windows need sizes divisible by the window: reflect-pad, then crop back
    h, w = x.shape[2:]
    win = net.window_size_for_encoder
    x = F.pad(x, (0, (-w) % win, 0, (-h) % win), mode='reflect')
    x = net.conv_first(_normalise_like(net, x))
    x = net.conv_after_body(net.forward_features(x)) + x
    return x[:, :, :h, :w]


# arch type -> (features function, option key holding the channel count)
_BASICSR_FEATURES = {
    'EDSR': (_edsr_like_features, 'num_feat'),
    'RCAN': (_edsr_like_features, 'num_feat'),
    'RRDBNet': (_rrdb_features, 'num_feat'),
    'SwinIR': (_swinir_features, 'embed_dim'),
}
_DEFAULT_CHANNELS = {'num_feat': 64, 'embed_dim': 96}


@ARCH_REGISTRY.register()
class BasicSREncoder(nn.Module):
    """Use one of BasicSR's own SR archs as a LIIF encoder, upsampling tail removed.

    ``arch`` is the BasicSR type (EDSR, RCAN, RRDBNet, SwinIR); other options go to it
    unchanged, so a pretrained BasicSR checkpoint's ``network_g`` section fits as is. The
    upsampler's weights stay in the module (so such checkpoints load) but never run.
    """

    def __init__(self, arch, **arch_opt):
        super().__init__()
        if arch not in _BASICSR_FEATURES:
            raise ValueError(f"BasicSREncoder: arch '{arch}' is not supported as an encoder; "
                             f'choose one of {sorted(_BASICSR_FEATURES)}')
        from basicsr.archs import build_network
        if arch == 'RRDBNet':
            arch_opt.setdefault('scale', 4)  # scale 1/2 would pixel-unshuffle the input first
        self.arch = arch
        self.net = build_network({'type': arch, **arch_opt})
        if arch == 'SwinIR':
            self.net.window_size_for_encoder = arch_opt.get('window_size', 7)
        self._features, key = _BASICSR_FEATURES[arch]
        self.out_channels = arch_opt.get(key, _DEFAULT_CHANNELS[key])

    def forward(self, x):
        return self._features(self.net, x)
