"""LIIF: Local Implicit Image Function (Chen, Liu & Wang, CVPR 2021).

The paper's model is :func:`paper_query`, written plainly; :class:`LIIF` computes the same
numbers faster (the latent part of the MLP's first layer once per latent, see
:mod:`implicit_query`), tested equal to it.
"""
import torch
import torch.nn.functional as F
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY
from ..ops.query_decode import dense_layers, mlp_decode, query_inputs
from .implicit_query import (ImplicitDecoder, ImplicitSRNet, Prepared, decode_lookup, grid_to_rows,
                             latent_conv, split_first_linear)


def paper_query(feat, coord, cell, mlp, local_ensemble=True, feat_unfold=True, cell_decode=True):
    """LIIF's prediction at the queries as the paper defines it (local ensemble, feature unfolding,
    cell decoding), in the form of the authors' ``query_rgb``: the plain reference of LIIF and of
    the archs that query like it (A-LIIF, LIIF-GAN).

    For a query ``x_q`` and each of its four nearest latents ``z*`` (one without the local
    ensemble), the MLP reads ``[z*, (x_q - v*), cell]``: ``z*`` with its 3x3 neighbours (feature
    unfolding), ``v*`` its centre, offset and cell in latent cells; the four predictions are
    blended by the area of the rectangle between ``x_q`` and the diagonally opposite latent.
    One MLP input vector per query and latent, so memory and time grow with queries x width.

    feat (B, C, h, w); coord, cell (B, N, 2), (row, col) in [-1, 1]; mlp (M, in) -> (M, out).
    Returns (B, N, out) in the network's normalised output space.
    """
    b, c, h, w = feat.shape
    if feat_unfold:
        feat = F.unfold(feat, 3, padding=1).view(b, c * 9, h, w)
    axes = []  # latent centres by the authors' formula, float32
    for n in (h, w):
        r = 1 / n
        axes.append((-1 + r) + (2 * r) * torch.arange(n, device=feat.device, dtype=torch.float32))
    centres = torch.stack(torch.meshgrid(*axes, indexing='ij')).unsqueeze(0).expand(b, 2, h, w)
    shifts, eps = ([-1, 1], 1e-6) if local_ensemble else ([0], 0)
    rx, ry = 2 / h / 2, 2 / w / 2  # half a latent cell

    preds, areas = [], []
    for vx in shifts:
        for vy in shifts:
            shifted = coord.clone()
            shifted[:, :, 0] += vx * rx + eps
            shifted[:, :, 1] += vy * ry + eps
            grid = shifted.clamp_(-1 + 1e-6, 1 - 1e-6).flip(-1).unsqueeze(1)  # grid_sample reads (x, y)
            z = F.grid_sample(feat, grid, mode='nearest', align_corners=False)[:, :, 0].permute(0, 2, 1)
            v = F.grid_sample(centres, grid, mode='nearest', align_corners=False)[:, :, 0].permute(0, 2, 1)
            rel_coord = coord - v
            rel_coord[:, :, 0] *= h
            rel_coord[:, :, 1] *= w
            inp = torch.cat([z, rel_coord], dim=-1)
            if cell_decode:
                rel_cell = cell.clone()
                rel_cell[:, :, 0] *= h
                rel_cell[:, :, 1] *= w
                inp = torch.cat([inp, rel_cell], dim=-1)
            preds.append(mlp(inp.view(-1, inp.shape[-1])).view(b, coord.shape[1], -1))
            areas.append(torch.abs(rel_coord[:, :, 0] * rel_coord[:, :, 1]) + 1e-9)

    total = torch.stack(areas).sum(dim=0)
    if local_ensemble:
        areas = areas[::-1]  # each prediction is weighted by its diagonal opposite's area
    return sum(pred * (area / total).unsqueeze(-1) for pred, area in zip(preds, areas))


def mlp_layers(in_dim, hidden_list, out_dim, layer=nn.Linear):
    """The LIIF codebase's ``mlp``: ``layer`` (+ ReLU) per hidden width, then ``layer`` to
    ``out_dim``, as one Sequential (so the authors' ``layers.{0,2,...}`` keys load unchanged).
    ``layer(in, out)`` builds each; LTE+ passes 1x1 convolutions, as its authors store them."""
    layers = []
    for hidden in hidden_list:
        layers += [layer(in_dim, hidden), nn.ReLU()]
        in_dim = hidden
    layers.append(layer(in_dim, out_dim))
    return nn.Sequential(*layers)


class MLPDecoder(ImplicitDecoder):
    """LIIF's MLP ``[latent, rel_coord, rel_cell] -> hidden... -> out`` (ReLU between layers).

    Parameters are stored as the authors' ``layers`` Sequential of Linears, so their
    weights load unchanged; the first Linear is evaluated in two parts (see
    :mod:`implicit_query`).
    """

    def __init__(self, latent_channels, extra_channels, hidden_list=(256, 256, 256, 256), out_channels=3,
                 unfold=True):
        super().__init__()
        self.latent_channels = latent_channels  # per latent, before unfolding
        self.unfold = unfold
        in_dim = latent_channels * (9 if unfold else 1) + extra_channels
        self.layers = mlp_layers(in_dim, hidden_list, out_channels)

    def grid_features(self, feat):
        first = self.layers[0]
        conv_weight, _ = split_first_linear(first.weight, self.latent_channels, self.unfold)
        return latent_conv(feat, conv_weight, first.bias, self.unfold)

    def decode_indexed(self, rows, index, rel_coord, rel_cell):
        # the first layer's latent part is the row table; the op adds the query part and runs
        # the rest (one fused kernel on CPU inference, torch otherwise)
        _, extra_weight = split_first_linear(self.layers[0].weight, self.latent_channels, self.unfold)
        layers = list(self.layers)
        first_relu = len(layers) > 1 and isinstance(layers[1], nn.ReLU)
        return mlp_decode(rows, index, query_inputs(rel_coord, rel_cell), extra_weight,
                          dense_layers(layers[2 if first_relu else 1:]), first_relu, owner=self)


@ARCH_REGISTRY.register()
class LIIF(ImplicitSRNet):
    """LIIF: encoder + one MLP queried at continuous coordinates.

    Args:
        encoder (dict): a registered encoder arch, e.g. ``{type: EDSREncoder}``.
        hidden_list (list[int]): MLP widths; the paper uses 4 x 256.
        local_ensemble, feat_unfold, cell_decode (bool): the paper's three design choices.
        data_mean, data_std: input normalisation ``(x - mean) / std``, inverted on the output
            (the authors' recipe is 0.5 / 0.5).
    """

    def __init__(self, encoder, hidden_list=(256, 256, 256, 256), local_ensemble=True, feat_unfold=True,
                 cell_decode=True, data_mean=0.5, data_std=0.5, out_channels=3):
        super().__init__(encoder, local_ensemble, feat_unfold, cell_decode, data_mean, data_std)
        self.decoder = MLPDecoder(self.encoder.out_channels, self.decoder_extra_channels, list(hidden_list),
                                  out_channels, feat_unfold)

    def reference_query(self, feat, coord, cell=None):
        """The paper's model, plainly: :func:`paper_query` with this MLP. :meth:`prepare` +
        :meth:`decode_prepared` give the same (B, N, out), normalised, faster."""
        return paper_query(feat, coord, cell, self.decoder.layers, self.local_ensemble, self.feat_unfold,
                           self.cell_decode)

    @property
    def decode_row_width(self):
        return self.decoder.layers[0].out_features

    def prepare(self, feat):
        return Prepared(grid_to_rows(self.decoder.grid_features(feat)), tuple(feat.shape[-2:]))

    def decode_prepared(self, prepared, lookup):
        return decode_lookup(self.decoder, prepared.rows, lookup, prepared.grid, self.cell_decode)

    # -- the authors' checkpoints ({'model': {'name': 'liif', 'args', 'sd'}}) ------------------
    authors_names = ('liif', )
    authors_decoder_keys = [(r'^imnet\.layers\.', 'decoder.layers.')]

    @classmethod
    def authors_options(cls, name, args, encoder):
        """The LIIF authors' spec -> our options; None for an A-LIIF spec (saved as 'liif' too)."""
        if is_aliif_spec(args):
            return None
        imnet = args.get('imnet_spec')
        if imnet is None:
            raise ValueError("authors' LIIF without imnet (nearest-neighbour sampling) is not supported")
        if imnet['name'] != 'mlp':
            raise ValueError(f"authors' imnet '{imnet['name']}' is not supported (known: mlp, mlp_pw)")
        imnet_args = imnet.get('args', {})
        return {
            'type': 'LIIF',
            'encoder': encoder,
            'hidden_list': list(imnet_args.get('hidden_list', [256] * 4)),
            'out_channels': imnet_args.get('out_dim', 3),
            **authors_liif_flags(args),
        }


def authors_liif_flags(args):
    """LIIF's three design choices from an authors' spec (their defaults: all on)."""
    return {k: args.get(k, True) for k in ('local_ensemble', 'feat_unfold', 'cell_decode')}


def is_aliif_spec(args):
    """Whether an authors' 'liif' spec is A-LIIF's (an expansion net and pointwise bases)."""
    imnet = args.get('imnet_spec') or {}
    return args.get('pdn_spec') is not None or imnet.get('name') == 'mlp_pw'
