"""Meta-SR (Hu et al., CVPR 2019) as the LIIF and LTE codebases implement it ('metasr').

A weight-prediction network maps, per output pixel, its offset inside the LR pixel it
falls in and the inverse scale to the weights of a filter over that pixel's 3x3-unfolded
feature: ``rgb = f_unf . reshape(MLP(dy, dx, 1/s), (C*9, 3))``, the MLP being
``3 -> 256 -> C*9*3``. The LR pixel and the offset are taken at the output pixel's top-left
corner (``coord - cell / 2``), not at its centre, and there is no ensemble.

Engine mapping: the predicted filter is linear in the MLP's hidden layer ``z`` (256), so
``rgb_c = sum_k z_k (sum_j f_j W[(j, c), k]) + sum_j f_j b[(j, c)]``. The bracketed sums
depend on the latent alone: :meth:`MetaSR.prepare` computes them on the LR grid as one
convolution (``256 * 3 + 3`` channels), and a query costs the 3 -> 256 layer and a
256 x 3 product instead of the authors' 256 -> C*9*3 layer (1728 outputs for C = 64).
"""
import torch
import torch.nn.functional as F

from basicsr.utils.registry import ARCH_REGISTRY
from .geometry import LatentWindow, _into_window, _nearest_latent, coord_axis
from .implicit_query import ImplicitSRNet, Prepared, grid_to_rows, latent_conv, take_rows
from .lte_arch import _MLP

# The authors nudge the corner off cell borders and keep it inside the image, as LIIF's shifts.
_CORNER_EPS = 1e-6
_CLAMP = 1 - 1e-6


@ARCH_REGISTRY.register()
class MetaSR(ImplicitSRNet):
    """Meta-SR's meta-upscale module on a latent encoder.

    Args:
        encoder (dict): a registered encoder arch, e.g. ``{type: EDSREncoder}``.
        hidden (int): width of the weight-prediction MLP's hidden layer (the authors': 256).
        data_mean, data_std: input normalisation ``(x - mean) / std``, inverted on the output.
        out_channels (int): output channels.
    """
    authors_names = ('metasr', )

    def __init__(self, encoder, hidden=256, data_mean=0.5, data_std=0.5, out_channels=3):
        super().__init__(encoder, local_ensemble=False, feat_unfold=True, cell_decode=True, data_mean=data_mean,
                         data_std=data_std)
        self.out_channels = int(out_channels)
        self.hidden = int(hidden)
        # the authors' key names: imnet.layers.0 (3 -> hidden), imnet.layers.2 (hidden -> C*9*out)
        self.imnet = _MLP(3, [self.hidden], self.decoder_in_channels * self.out_channels)

    # -- latent tables ------------------------------------------------------------------------
    def grid_features(self, feat):
        """(B, hidden * out + out, h, w): per latent, ``sum_j f_j W[(j, c), k]`` laid out (k, c),
        then ``sum_j f_j b[(j, c)]``, with ``f`` the 3x3-unfolded latent (zero padded, as
        ``F.unfold``; its channel-major, then (ky, kx) order is a conv kernel's)."""
        c, out, hidden = self.encoder.out_channels, self.out_channels, self.hidden
        last = self.imnet.layers[2]
        weight = last.weight.view(c, 3, 3, out, hidden).permute(4, 3, 0, 1, 2).reshape(hidden * out, c, 3, 3)
        bias = last.bias.view(c, 3, 3, out).permute(3, 0, 1, 2)
        return latent_conv(feat, torch.cat([weight, bias]), None, unfold=True)

    @property
    def decode_row_width(self):
        return self.hidden * self.out_channels + self.out_channels

    def prepare(self, feat):
        return Prepared(grid_to_rows(self.grid_features(feat)), tuple(feat.shape[-2:]))

    # -- queries -------------------------------------------------------------------------------
    def corner_lookup(self, coord, cell, grid_hw):
        """``(index (B, N), offset (B, N, 2))``: the latent under each query's top-left corner
        (nudged by 1e-6 and clamped, as the authors) and the corner's offset from that latent's
        top-left corner, scaled by ``(h / 2, w / 2)`` as the authors do; float operations in
        their order. ``index`` points into ``grid_hw``'s rows (a window's own, for a tile)."""
        window = grid_hw if isinstance(grid_hw, LatentWindow) else None
        h, w = grid_hw if window is None else window.full_hw
        corner = torch.stack([coord[..., 0] - cell[..., 0] / 2, coord[..., 1] - cell[..., 1] / 2], dim=-1)
        probe = (corner + _CORNER_EPS).clamp(-_CLAMP, _CLAMP)
        row, col = (t[0] for t in _nearest_latent(probe.unsqueeze(0), h, w))
        latent_corner = torch.stack([coord_axis(h, coord.device)[row] - (2 / h) / 2,
                                     coord_axis(w, coord.device)[col] - (2 / w) / 2], dim=-1)
        offset = corner - latent_corner
        offset[..., 0] *= h / 2
        offset[..., 1] *= w / 2
        if window is not None:
            row, col = _into_window(row, col, window, 'MetaSR')
            w = window[1]
        return row * w + col, offset

    def query_prepared(self, prepared, coord, cell):
        if cell is None:
            raise ValueError('MetaSR: queries need their cell (the filter is predicted from the scale)')
        grid = prepared.grid
        index, offset = self.corner_lookup(coord, cell, grid)
        b, n = index.shape
        h, w = grid  # a window unpacks as its own size: the rows are the window's
        rows = take_rows(prepared.rows, (index + torch.arange(b, device=index.device).view(b, 1) * (h * w)).view(-1))
        # the authors' third input, the inverse scale along rows: cell_h * (full grid's h) / 2
        full_h = grid.full_hw[0] if isinstance(grid, LatentWindow) else h
        inverse_scale = cell[..., :1] * (full_h / 2)
        z = self.imnet.layers[1](self.imnet.layers[0](torch.cat([offset, inverse_scale], dim=-1).view(b * n, 3)))
        hidden, out = self.hidden, self.out_channels
        filt = rows[:, :hidden * out].view(b * n, hidden, out)
        pred = torch.bmm(z.unsqueeze(1), filt).squeeze(1) + rows[:, hidden * out:]
        return pred.view(b, n, out)

    def reference_query(self, feat, coord, cell):
        """The authors' formulation written literally (tests compare the fast path with it):
        unfold the latent grid, predict a (C*9, out) filter per query with the whole MLP, apply it
        to the unfolded latent under the query's corner. Normalised (B, N, out)."""
        b, c, h, w = feat.shape
        unfolded = F.unfold(feat, 3, padding=1).view(b, c * 9, h * w)
        index, offset = self.corner_lookup(coord, cell, (h, w))
        q_feat = torch.gather(unfolded, 2, index.unsqueeze(1).expand(b, c * 9, index.shape[1])).permute(0, 2, 1)
        inp = torch.cat([offset, cell[..., :1] * (h / 2)], dim=-1)
        filt = self.imnet.layers(inp).view(b, -1, c * 9, self.out_channels)
        return (q_feat.unsqueeze(-2) @ filt).squeeze(-2)

    # -- the authors' checkpoints --------------------------------------------------------------
    @classmethod
    def authors_options(cls, name, args, encoder):
        return {'type': 'MetaSR', 'encoder': encoder}

