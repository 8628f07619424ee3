"""SwinIR as a latent-grid encoder: the LTE authors' ``swinir`` encoder (jaewon-lee-b/lte).

Built from BasicSR's own SwinIR blocks (RSTB, PatchEmbed, PatchUnEmbed): they are the same
code as the authors' copy and give the same numbers at every input size (shifted-window
masks, relative position index; drop path is the identity in eval).
"""
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from basicsr.archs.arch_util import trunc_normal_
from basicsr.archs.swinir_arch import RSTB, PatchEmbed, PatchUnEmbed, SwinTransformerBlock, WindowAttention
from basicsr.utils.registry import ARCH_REGISTRY

_RESI_CONNECTIONS = ('1conv', '3conv')


def _residual_conv(dim, resi_connection):
    """The conv closing the body (SwinIR's ``conv_after_body``; RSTB builds its own alike)."""
    if resi_connection == '1conv':
        return nn.Conv2d(dim, dim, 3, 1, 1)
    # '3conv': a bottleneck that saves parameters; same layer order as SwinIR, so the keys match
    return nn.Sequential(
        nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
        nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(dim // 4, dim, 3, 1, 1))


def _unsaved(module, name):
    """Keep buffer ``name`` of ``module`` but out of the state dict."""
    value = getattr(module, name)
    delattr(module, name)
    module.register_buffer(name, value, persistent=False)


@ARCH_REGISTRY.register()
class SwinIREncoder(nn.Module):
    """SwinIR (Liang et al., ICCVW'21) without upsampler, as the LTE authors' encoder.

    Defaults are theirs (``make_swinir`` always builds them): 6 RSTBs of 6 blocks, 180
    channels, 6 heads, window 8, MLP ratio 2, drop path 0.1. Their forward, kept here:
    no mean shift or ``img_range`` scaling; the input is reflect-padded on the bottom and
    right to whole windows and **not** cropped back, so the latent grid is the padded size
    (the implicit decoder then spans that padded grid); the 3x3 conv + LeakyReLU(0.01)
    that SwinIR puts before its upsampler gives the ``num_feat`` (64) output channels.

    ``img_size`` only says at which size the shifted-window masks are cached; other sizes
    compute theirs on the fly, to the same values. When it is at most ``window_size`` the
    blocks use one window of that size and no shift (SwinIR's rule), which changes the
    relative position tables - keep the value a checkpoint was trained with.

    There is no mid-layer feature: an RSTB's output is a 180-channel token sequence before
    the final norm, not a feature of the output width, so LIIF-GAN's decoder 1 cannot read
    it (LIIFGAN refuses ``decoder1_feature: mid`` with this encoder).
    """

    # window attention, and padding that depends on the image size: a tile's latents are not the image's
    receptive_radius = None

    def __init__(self, num_in_ch=3, num_feat=64, img_size=48, embed_dim=180, depths=(6, 6, 6, 6, 6, 6),
                 num_heads=(6, 6, 6, 6, 6, 6), window_size=8, mlp_ratio=2., qkv_bias=True, drop_path_rate=0.1,
                 patch_norm=True, resi_connection='1conv'):
        super().__init__()
        depths, num_heads = list(depths), list(num_heads)
        if len(depths) != len(num_heads):
            raise ValueError(f'SwinIREncoder: depths ({depths}) and num_heads ({num_heads}) need one entry per RSTB')
        if any(embed_dim % h for h in num_heads):
            raise ValueError(f'SwinIREncoder: embed_dim ({embed_dim}) must be divisible by every num_heads {num_heads}')
        if resi_connection not in _RESI_CONNECTIONS:
            raise ValueError(f'SwinIREncoder: resi_connection must be one of {_RESI_CONNECTIONS}, '
                             f'got {resi_connection!r}')
        self.out_channels = num_feat
        self.window_size = window_size
        self.conv_first = nn.Conv2d(num_in_ch, embed_dim, 3, 1, 1)
        # patch size 1: the "patches" are the pixels; these only flatten to tokens and back
        self.patch_embed = PatchEmbed(img_size, 1, embed_dim, embed_dim, nn.LayerNorm if patch_norm else None)
        self.patch_unembed = PatchUnEmbed(img_size, 1, embed_dim, embed_dim)
        resolution = tuple(self.patch_embed.patches_resolution)
        # stochastic depth grows linearly over all blocks (float32 steps, as SwinIR's)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        with warnings.catch_warnings():  # BasicSR's blocks call torch.meshgrid without indexing= ('ij' is meant)
            warnings.filterwarnings('ignore', message='torch.meshgrid')
            for i, (depth, heads) in enumerate(zip(depths, num_heads)):
                first = sum(depths[:i])
                self.layers.append(
                    RSTB(embed_dim, resolution, depth, heads, window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         drop_path=rates[first:first + depth], img_size=img_size, patch_size=1,
                         resi_connection=resi_connection))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = _residual_conv(embed_dim, resi_connection)
        self.conv_out = nn.Conv2d(embed_dim, num_feat, 3, 1, 1)
        self.apply(self._init_weights)
        # the masks and position indices follow from the sizes alone: recomputed, not saved, so a
        # checkpoint does not depend on img_size and cannot carry stale copies
        for m in self.modules():
            if isinstance(m, WindowAttention):
                _unsaved(m, 'relative_position_index')
            elif isinstance(m, SwinTransformerBlock) and m.attn_mask is not None:
                _unsaved(m, 'attn_mask')

    @staticmethod
    def _init_weights(m):  # SwinIR's
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x):
        size = (x.shape[2], x.shape[3])  # a tuple: RSTB compares it with its cached mask's size
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x, size)
        return self.patch_unembed(self.norm(x), size)

    def forward(self, x):
        h, w = x.shape[2:]
        win = self.window_size
        pad_h, pad_w = (-h) % win, (-w) % win
        if pad_h >= h or pad_w >= w:  # a reflection reaches at most size - 1 pixels beyond the edge
            raise ValueError(f'SwinIREncoder: a {h}x{w} input is too small to reflect-pad to whole windows of {win}')
        # the authors' check_image_size: whole windows, never cropped back
        x = F.pad(x, (0, pad_w, 0, pad_h), mode='reflect')
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        return F.leaky_relu(self.conv_out(x), 0.01)  # nn.LeakyReLU's default slope, as theirs

    @staticmethod
    def authors_key_rules(opt):
        return [
            # persistent buffers in their SwinIR, derived from the sizes: ours recomputes them
            (r'^encoder\..*\.(attn_mask|relative_position_index)$', None),
            (r'^encoder\.conv_before_upsample\.0\.', 'encoder.conv_out.'),
        ]
