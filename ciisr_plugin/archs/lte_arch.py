"""LTE: Local Texture Estimator (Lee & Jin, CVPR 2022), and LTE+ ('lte-fast' in their code).

LTE replaces LIIF's unfolded latent by a Fourier feature of the relative coordinate: two
3x3 convolutions on the latent grid estimate per latent a coefficient ``c`` and a set of
frequencies ``f = (f_y, f_x)`` (each 128 pairs for ``hidden_dim`` 256); a bias-free Linear
on the cell gives a phase ``p``. A query at relative coordinate ``d`` from a latent reads

    x = c * [cos(pi (f_y d_y + f_x d_x + p)), sin(pi (...))]

and an MLP decodes ``x``. The four nearest latents are blended by area (LIIF's local
ensemble), and the bilinear (border-padded) interpolation of the normalised input is
added, so the network learns a residual.

Engine mapping: both convolutions depend on the latent alone, so :meth:`LTE.prepare` runs
them once on the LR grid and tabulates ``c``, ``f_y``, ``f_x`` per latent (this is where the authors'
per-shift ``grid_sample`` of 512 channels goes); the per-query rest - the Fourier feature
and the MLP - is :meth:`LTE.decode_indexed`, one op (fused on CPU inference). The skip is an
input-space term, added per query in :meth:`LTE.query_prepared` / :meth:`LTE.query_grid`.

LTE and LTE+ differ in how the frequency channels pair with the two coordinate axes
(the authors' two files differ, and each checkpoint only works with its own): LTE splits
the channels into consecutive pairs ``(2j, 2j+1)``, LTE+ into halves ``(j, j + H/2)``.
LTE+ also stores its MLP as 1x1 convolutions (``layers``) instead of an ``imnet``.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY
from ..ops.cpu_conv import Conv2d
from ..ops.query_decode import dense_layers, fourier_feature, fourier_mlp_decode
from .geometry import LatentWindow, lookup_latents, make_coord
from .implicit_query import ImplicitDecoder, ImplicitSRNet, Prepared, decode_lookup, grid_to_rows
from .liif_arch import mlp_layers

FREQUENCY_PAIRINGS = ('pairs', 'halves')


class LocalTextureEstimator(nn.Module):
    """The coefficient / frequency / phase estimator and its Fourier feature.

    Parameter names are the authors' (``coef``, ``freq``, ``phase``) so their weights load
    as they are; ``pairing`` says how frequency channels meet the (row, col) coordinate.
    """

    def __init__(self, latent_channels, hidden_dim=256, pairing='pairs'):
        super().__init__()
        if pairing not in FREQUENCY_PAIRINGS:
            raise ValueError(f"LTE: frequency pairing must be one of {', '.join(FREQUENCY_PAIRINGS)}, got {pairing!r}")
        if hidden_dim % 2:
            raise ValueError(f'LTE: hidden_dim must be even (cos and sin halves), got {hidden_dim}')
        self.hidden_dim = hidden_dim
        self.pairing = pairing
        self.coef = Conv2d(latent_channels, hidden_dim, 3, padding=1)
        self.freq = Conv2d(latent_channels, hidden_dim, 3, padding=1)
        self.phase = nn.Linear(2, hidden_dim // 2, bias=False)

    def row_tables(self, feat):
        """``(coefficient, frequency_y, frequency_x)`` row tables, (B*h*w, hidden), (B*h*w, hidden/2)
        twice: every latent's estimates, split by axis once on the grid. Per query each is one
        contiguous gather; slicing one gathered ``[c, f]`` row instead costs a strided pass per
        slice and, in training, a zero-filled full-width gradient per slice."""
        freq = self.freq(feat)
        if self.pairing == 'pairs':
            freq_y, freq_x = freq[:, 0::2], freq[:, 1::2]
        else:
            half = self.hidden_dim // 2
            freq_y, freq_x = freq[:, :half], freq[:, half:]
        return tuple(grid_to_rows(t) for t in (self.coef(feat), freq_y, freq_x))

    def fourier_feature(self, rows, rel_coord, rel_cell):
        """(M, hidden) ``c * [cos(pi a), sin(pi a)]`` from gathered :meth:`row_tables` rows."""
        return fourier_feature(rows, rel_coord, rel_cell, self.phase.weight)


class _MLP(nn.Module):
    """The LIIF codebase's ``mlp`` module (its ``layers`` keys kept): LTE's and MetaSR's ``imnet``."""

    def __init__(self, in_dim, hidden_list, out_dim):
        super().__init__()
        self.layers = mlp_layers(in_dim, hidden_list, out_dim)


def _conv1x1(in_dim, out_dim):
    return nn.Conv2d(in_dim, out_dim, 1)


def bilinear_skip(image, coord, window=None):
    """(B, N, C) bilinear, border-padded samples of ``image`` (B, C, h, w) at ``coord`` (B, N, 2)
    in [-1, 1], (row, col), as ``grid_sample(align_corners=False)`` samples the whole image.

    ``window``: ``image`` is a :class:`LatentWindow` crop of a larger image; the coordinates
    are moved into the crop's frame (the pixel position ``((y + 1) * H - 1) / 2`` minus the
    crop's origin), so inside the crop the samples are those of the whole image."""
    if window is not None:
        (full_h, full_w), (oy, ox) = window.full_hw, window.origin
        coord = torch.stack([((coord[..., 0] + 1) * full_h - 2 * oy) / window[0] - 1,
                             ((coord[..., 1] + 1) * full_w - 2 * ox) / window[1] - 1], dim=-1)
    grid = coord.flip(-1).unsqueeze(1).to(image.dtype)
    out = F.grid_sample(image, grid, mode='bilinear', padding_mode='border', align_corners=False)
    return out[:, :, 0, :].permute(0, 2, 1)


@ARCH_REGISTRY.register()
class LTE(ImplicitSRNet, ImplicitDecoder):
    """LTE: encoder + local texture estimator + MLP, with LIIF's local ensemble.

    Args:
        encoder (dict): a registered encoder arch, e.g. ``{type: EDSREncoder}``.
        hidden_dim (int): coefficient / frequency channels (paper: 256); the phase has half.
        hidden_list (list[int]): MLP hidden widths (paper: 3 x 256).
        pairing (str): 'pairs' (LTE) or 'halves' (LTE+) - see the module docstring.
        data_mean, data_std: input normalisation ``(x - mean) / std``, inverted on the output.
        out_channels (int): output channels.
    """
    authors_names = ('lte', )

    def __init__(self, encoder, hidden_dim=256, hidden_list=(256, 256, 256), pairing='pairs', data_mean=0.5,
                 data_std=0.5, out_channels=3):
        # the estimator's 3x3 convolutions read each latent's neighbours (as LIIF's unfolding)
        super().__init__(encoder, local_ensemble=True, feat_unfold=True, cell_decode=True, data_mean=data_mean,
                         data_std=data_std)
        self.hidden_dim = int(hidden_dim)
        self.estimator = LocalTextureEstimator(self.encoder.out_channels, self.hidden_dim, pairing)
        self._build_mlp(list(hidden_list), out_channels)

    def _build_mlp(self, hidden_list, out_channels):
        self.imnet = _MLP(self.hidden_dim, hidden_list, out_channels)

    def mlp_layers(self):
        return dense_layers(self.imnet.layers)

    # -- engine: what the renderer needs --------------------------------------------------
    @property
    def decode_row_width(self):
        # the gathered [coefficient, frequency] rows; the MLP's activations are narrower
        return 2 * self.hidden_dim

    def encode(self, lq):
        """(latent grid, normalised input): the input feeds the bilinear skip."""
        x = self.encoder_input(lq)
        return self.encoder(x), x

    def prepare(self, encoded):
        feat, x = encoded
        return Prepared((self.estimator.row_tables(feat), x), tuple(feat.shape[-2:]))

    # -- ImplicitDecoder -------------------------------------------------------------------
    def decode_indexed(self, rows, index, rel_coord, rel_cell):
        return fourier_mlp_decode(rows, index, rel_coord, rel_cell, self.estimator.phase.weight, self.mlp_layers(),
                                  owner=self)

    # -- queries -----------------------------------------------------------------------------
    def decode_prepared(self, prepared, lookup):
        return decode_lookup(self, prepared.rows[0], lookup, prepared.grid, cell_decode=True)

    def prepare_window(self, encoded, window, lq=None):
        prepared = super().prepare_window(encoded, window, lq)
        if lq is None:
            return prepared
        # the skip samples the whole input at the queries' own coordinates, as without tiles:
        # moved into a crop's frame, a coordinate is rounded again (~1e-5 px on a 1000 px image)
        return prepared._replace(rows=(prepared.rows[0], self.encoder_input(lq)))

    def _skip(self, prepared, coord):
        grid, image = prepared.grid, prepared.rows[1]
        cropped = isinstance(grid, LatentWindow) and tuple(image.shape[-2:]) != grid.full_hw
        return bilinear_skip(image, coord, grid if cropped else None)

    # LTE measures relative coordinates from the input's pixel centres, LTE+ from the latents'
    # (the same grid, unless the encoder pads: the authors' SwinIR)
    centres_from_input = True

    def _centre_grid(self, prepared):
        """The grid relative coordinates are measured on, where it is not the latent grid."""
        input_hw = tuple(prepared.rows[1].shape[-2:])
        if not self.centres_from_input or isinstance(prepared.grid, LatentWindow) or input_hw == tuple(prepared.grid):
            return None
        return input_hw

    def query_prepared(self, prepared, coord, cell):
        if cell is None:
            raise ValueError(f'{type(self).__name__}: queries need their cell (the phase is estimated from it)')
        lookup = lookup_latents(coord, cell, prepared.grid, self.local_ensemble, self._centre_grid(prepared))
        return self.decode_prepared(prepared, lookup) + self._skip(prepared, coord)

    def query_grid(self, prepared, grid, block, batch):
        coord, cell = grid.coords(block, batch)
        if self._centre_grid(prepared) is not None:  # the per-axis lookup assumes one grid
            return self.query_prepared(prepared, coord, cell)
        out = self.decode_prepared(prepared, grid.lookup(block, prepared.grid, self.local_ensemble, batch))
        return out + self._skip(prepared, coord)

    def reference_query(self, encoded, coord, cell):
        """The paper's model written literally (tests compare the fast path with it): for each of
        the four shifted queries sample the coefficient and frequency maps at the nearest latent
        (``grid_sample`` 'nearest'), form the Fourier feature, run the MLP; blend by the opposite
        areas; add the bilinear skip of the input. ``encoded`` as :meth:`encode` returns it;
        normalised (B, N, out) like :meth:`query_prepared`."""
        feat, x = encoded
        est = self.estimator
        coef, freq = est.coef(feat), est.freq(feat)
        h, w = feat.shape[-2:]
        preds, areas = [], []
        for vy in (-1, 1):
            for vx in (-1, 1):
                shifted = coord.clone()
                shifted[..., 0] += vy / h + 1e-6
                shifted[..., 1] += vx / w + 1e-6
                grid = shifted.clamp(-1 + 1e-6, 1 - 1e-6).flip(-1).unsqueeze(1)

                def sample(t):
                    return F.grid_sample(t, grid, mode='nearest', align_corners=False)[:, :, 0].permute(0, 2, 1)

                centres = make_coord(x.shape[-2:] if self.centres_from_input else (h, w), flatten=False)
                centre = sample(centres.permute(2, 0, 1).unsqueeze(0).expand(len(feat), -1, -1, -1))
                rel = (coord - centre) * torch.tensor([h, w], dtype=coord.dtype)
                q_freq = sample(freq)
                if est.pairing == 'pairs':
                    q_freq = q_freq.view(*q_freq.shape[:-1], -1, 2)
                    angle = (q_freq * rel.unsqueeze(-2)).sum(-1)
                else:
                    half = q_freq.shape[-1] // 2
                    angle = q_freq[..., :half] * rel[..., :1] + q_freq[..., half:] * rel[..., 1:]
                angle = angle + est.phase(cell * torch.tensor([h, w], dtype=cell.dtype))
                inp = sample(coef) * torch.cat([torch.cos(math.pi * angle), torch.sin(math.pi * angle)], dim=-1)
                out = inp
                for weight, bias, relu in self.mlp_layers():
                    out = F.linear(out, weight, bias)
                    out = out.relu() if relu else out
                preds.append(out)
                areas.append((rel[..., 0] * rel[..., 1]).abs() + 1e-9)
        total = sum(areas)
        blended = sum(p * (a / total).unsqueeze(-1) for p, a in zip(preds, reversed(areas)))
        return blended + bilinear_skip(x, coord)

    # -- the authors' checkpoints --------------------------------------------------------------
    @classmethod
    def authors_options(cls, name, args, encoder):
        """The LTE authors' ``{'name': 'lte', 'args'}`` -> our options (``encoder`` converted)."""
        imnet = args.get('imnet_spec') or {}
        imnet_args = imnet.get('args', {})
        if imnet.get('name', 'mlp') != 'mlp':
            raise ValueError(f"authors' LTE imnet '{imnet.get('name')}' is not supported (known: mlp)")
        return {
            'type': 'LTE',
            'encoder': encoder,
            'hidden_dim': args.get('hidden_dim', 256),
            'hidden_list': list(imnet_args.get('hidden_list', [256, 256, 256])),
            'out_channels': imnet_args.get('out_dim', 3),
        }

    # our parameters sit one level down; the authors' at the top
    authors_decoder_keys = [(r'^(coef|freq|phase)\.', r'estimator.\1.')]


@ARCH_REGISTRY.register()
class LTEPlus(LTE):
    """LTE+ ('lte-fast' in the authors' code): LTE with the frequency channels split in halves
    and the MLP stored as 1x1 convolutions (``layers``; ``num_layer`` hidden layers of
    ``hidden_dim``). The same model otherwise, queried per pixel by our engine."""
    authors_names = ('lte-fast', )
    centres_from_input = False

    def __init__(self, encoder, hidden_dim=256, num_layer=3, data_mean=0.5, data_std=0.5, out_channels=3):
        self.num_layer = int(num_layer)
        super().__init__(encoder, hidden_dim, [hidden_dim] * self.num_layer, 'halves', data_mean, data_std,
                         out_channels)

    def _build_mlp(self, hidden_list, out_channels):
        # LTE+'s MLP: the same layers as 1x1 convolutions (its authors' parameter shapes)
        self.layers = mlp_layers(self.hidden_dim, hidden_list, out_channels, layer=_conv1x1)

    def mlp_layers(self):
        return dense_layers(self.layers)

    @classmethod
    def authors_options(cls, name, args, encoder):
        return {
            'type': 'LTEPlus',
            'encoder': encoder,
            'hidden_dim': args.get('hidden_dim', 256),
            'num_layer': args.get('num_layer', 3),
            'out_channels': args.get('out_dim', 3),
        }

