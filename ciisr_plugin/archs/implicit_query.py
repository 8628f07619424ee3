"""The implicit-query engine shared by every model family (LIIF, A-LIIF, LIIF-GAN, LTE, MetaSR).

A local implicit image function predicts the value at a continuous coordinate from the
nearest latent code, the offset to that code and the size of the queried cell. *Where* to
look is :mod:`.geometry` (coordinates, nearest latents, local-ensemble weights, pixel grids,
tiles' windows); this module drives the decoders:

* :func:`decode_lookup` - gathers the latent rows, runs a decoder on all shifts as one
  batch and blends the predictions;
* :class:`ImplicitSRNet` - the encoder / normalisation / chunked-query scaffolding the
  concrete archs inherit: they implement ``prepare`` and ``decode_prepared`` only.

Decoders only say *what* to compute. They split their first layer in two: the part that
reads the (unfolded) latent runs once per latent on the LR grid as a convolution
(:meth:`ImplicitDecoder.grid_features`), the part that reads the relative coordinate
and cell runs per query (:meth:`ImplicitDecoder.decode_indexed`, through the ops of
:mod:`ciisr_plugin.ops.query_decode`). This is the same linear algebra as the authors'
per-query MLP, without ever materialising the 3x3-unfolded feature map.
"""
from typing import NamedTuple

import torch
from torch import nn

from basicsr.archs import build_network
from ..ops.cpu_conv import conv2d, use_cpu_training_conv
from ..ops.cpu_features import channels_last_pays
from ..ops.cpu_linear import exporting
# the geometry's public names are also importable from here, where they lived before
from .geometry import (LatentLookup, LatentWindow, PixelGrid, coord_axis, flat_index, grid_blocks,  # noqa: F401
                       lookup_latents, make_cell, make_coord)


class Prepared(NamedTuple):
    """What an arch's :meth:`ImplicitSRNet.prepare` hands its decoders for one latent grid.

    ``rows``: the per-latent tables its decoders gather from (one table, or a tuple of them:
    their structure is the arch's own). ``grid``: the grid's ``(h, w)``, or, for one tile of
    a larger grid, a :class:`LatentWindow`. The engine reads only ``grid``."""
    rows: object
    grid: tuple


def grid_to_rows(grid):
    """(B, D, h, w) latent-grid features -> (B*h*w, D) rows, laid out once for gathering.
    Contiguous: with B = 1 the reshape alone is a column-major view, and gathering rows
    from it reads D scattered cache lines per row (several times slower)."""
    return grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1]).contiguous()


def take_rows(rows, index):
    """``rows[index]``: (M, D); for a tuple of row tables (a decoder whose first layer feeds
    several nets), a tuple of such gathers."""
    if isinstance(rows, tuple):
        return tuple(take_rows(table, index) for table in rows)
    return rows.index_select(0, index)


def decode_lookup(decoder, rows, lookup, grid_hw, cell_decode=True):
    """Run ``decoder`` on every shift of ``lookup`` as one batch and blend: (B, N, out)."""
    s, b, n = lookup.index.shape
    rel_cell = lookup.rel_cell.reshape(-1, 2) if (cell_decode and lookup.rel_cell is not None) else None
    pred = decoder.decode_indexed(rows, flat_index(lookup, grid_hw), lookup.rel_coord.reshape(-1, 2), rel_cell)
    pred = pred.view(s, b, n, -1)
    out = pred[0] * lookup.weight[0].unsqueeze(-1)
    for k in range(1, s):
        out = out + pred[k] * lookup.weight[k].unsqueeze(-1)
    return out


class ImplicitDecoder(nn.Module):
    """Interface of a decoder the engine can drive.

    ``grid_features(feat)`` -> (B, D, h, w): everything that depends only on the latent
    (and its 3x3 neighbourhood when ``unfold``), computed once on the LR grid.
    ``decode_indexed(rows, index, rel_coord, rel_cell)`` -> (M, out): the rest, per query, on
    the rows ``index`` (M,) of the prepared table(s) ``rows``. A decoder whose per-query part
    is an MLP after a first layer calls :func:`ciisr_plugin.ops.query_decode.mlp_decode` (or
    ``basis_decode``), which reads the table itself: fused on CPU inference, torch elsewhere.
    A decoder may instead implement ``decode(rows, rel_coord, rel_cell)`` on a fresh gather
    (a tuple of them for a tuple of tables), which it may overwrite.
    """

    def grid_features(self, feat):
        raise NotImplementedError

    def decode(self, rows, rel_coord, rel_cell):
        raise NotImplementedError(f'{type(self).__name__} implements neither decode nor decode_indexed')

    def decode_indexed(self, rows, index, rel_coord, rel_cell):
        """``decode`` on the rows ``index`` of ``rows``: this default gathers, then decodes."""
        return self.decode(take_rows(rows, index), rel_coord, rel_cell)


def split_first_linear(weight, in_channels, unfold):
    """Split a first Linear over ``[unfolded latent, rel_coord, rel_cell]`` into a conv
    kernel for the latent part and a matrix for the rest. ``F.unfold`` orders the latent
    inputs channel-major then (ky, kx), which is exactly a conv kernel's layout."""
    k = 3 if unfold else 1
    latent_dim = in_channels * k * k
    conv_weight = weight[:, :latent_dim].reshape(weight.shape[0], in_channels, k, k)
    return conv_weight, weight[:, latent_dim:]


def latent_conv(feat, weight, bias, unfold):
    """The latent part of a first Linear, applied to the whole LR grid at once."""
    return conv2d(feat, weight, bias, padding=1 if unfold else 0)


def build_encoder(encoder_opt):
    """Any registered arch can be an encoder; it must expose ``out_channels``."""
    encoder = build_network(encoder_opt)
    if not hasattr(encoder, 'out_channels'):
        raise ValueError(f"encoder type '{encoder_opt.get('type')}' has no 'out_channels'; LIIF-style models need "
                         'an encoder without upsampling tail (e.g. EDSREncoder, RDNEncoder, BasicSREncoder)')
    return use_cpu_training_conv(encoder)



# Queries decoded at once without autograd, unless the caller says otherwise (a render setting:
# ``val.chunk_size``, ``basicsr upscale --chunk-size``, never part of a network). 4096 keeps each
# per-chunk tensor small enough for the allocator to reuse instead of mapping fresh memory each
# chunk: measured ~1.5x faster on CPU than 65536.
QUERY_CHUNK = 4096


def _as_channel_tensor(value):
    return torch.tensor(value if isinstance(value, (list, tuple)) else [value], dtype=torch.float32).view(1, -1, 1, 1)


class ImplicitSRNet(nn.Module):
    """Scaffolding shared by every implicit SR arch.

    Subclasses implement :meth:`prepare` (latent grid -> a :class:`Prepared`: the decoders'
    row tables and the grid size) and :meth:`decode_prepared` (a :class:`LatentLookup` ->
    normalised output per query); the engine finds the latents (:meth:`query_prepared` for
    arbitrary coordinates, :meth:`query_grid` for pixel grids). An arch may instead override
    ``query_prepared`` itself; grids then go through it. What the renderer needs is declared:
    :attr:`tileable` (whether a tile's latents can stand in for the whole grid's) and
    :attr:`decode_row_width` (the widest per-query activation a decode gathers, for chunk
    sizing); the encoder declares its ``receptive_radius`` when its modules do not tell it.
    See ``docs/adding_a_model.md``.
    Inputs and outputs are [0, 1] images, BasicSR's convention; the authors'
    ``(x - mean) / std`` normalisation is applied inside.

    Query contract: ``net(lq, coord, cell) -> (B, N, 3)`` with ``coord``/``cell`` (B, N, 2)
    in (row, col) order; ``net.upscale(lq, size=(H, W)) -> (B, 3, H, W)``.
    """

    def __init__(self, encoder, local_ensemble=True, feat_unfold=True, cell_decode=True, data_mean=0.5,
                 data_std=0.5):
        super().__init__()
        self.encoder = build_encoder(encoder)
        self.local_ensemble = local_ensemble
        self.feat_unfold = feat_unfold
        self.cell_decode = cell_decode
        self.register_buffer('data_mean', _as_channel_tensor(data_mean), persistent=False)
        self.register_buffer('data_std', _as_channel_tensor(data_std), persistent=False)

    @property
    def decoder_in_channels(self):
        """Latent channels a decoder sees per query (before rel_coord / rel_cell)."""
        return self.encoder.out_channels * (9 if self.feat_unfold else 1)

    @property
    def decoder_extra_channels(self):
        return 2 + (2 if self.cell_decode else 0)

    def encoder_input(self, lq):
        """``lq`` normalised as the authors do, laid out for the encoder: channels-last on CPU
        where oneDNN's convolutions run faster on NHWC (always for inference, for training only
        on AVX-512 CPUs: see :func:`~ciisr_plugin.ops.cpu_features.channels_last_pays`); the
        latent grid then also flattens into rows without a copy. Left as is on other devices
        and when tracing. The layout changes no result beyond float rounding."""
        x = (lq - self.data_mean) / self.data_std
        if (x.device.type == 'cpu' and x.dim() == 4 and not exporting()
                and channels_last_pays(training=torch.is_grad_enabled())):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def encode(self, lq):
        return self.encoder(self.encoder_input(lq))

    # the renderer may encode tiles (with a halo) and decode each tile's queries against its latents
    tileable = True

    @property
    def decode_row_width(self):
        """Width of the widest first-layer activation one decode gathers per query (the
        renderer sizes its query chunks by it); LIIF's 256 unless an arch says otherwise."""
        return 256

    def prepare(self, feat):
        """The latent grid ``feat`` -> :class:`Prepared` (row tables, ``feat``'s ``(h, w)``)."""
        raise NotImplementedError(f'{type(self).__name__} must implement prepare()')

    def prepare_window(self, feat, window, lq=None):
        """``prepare`` for the latents of one tile, ``window`` (a :class:`LatentWindow`) of the
        full grid, so that queries read global coordinates against it. ``lq``: the whole input
        the tile was cut from, for archs that sample the input itself (LTE's skip)."""
        prepared = self.prepare(feat)
        if not isinstance(prepared, Prepared) or tuple(prepared.grid) != tuple(window):
            raise TypeError(f'{type(self).__name__}.prepare() must return Prepared(rows, grid) with the grid '
                            f"size (got {type(prepared).__name__}); or set tileable = False")
        return prepared._replace(grid=window)

    def decode_prepared(self, prepared, lookup):
        """Normalised (B, N, out) predictions for the queries of ``lookup``."""
        raise NotImplementedError

    def _decodes_lookups(self):
        return type(self).decode_prepared is not ImplicitSRNet.decode_prepared

    def query_prepared(self, prepared, coord, cell):
        """Normalised (B, N, out) predictions at ``coord`` (B, N, 2) with cells ``cell``."""
        if not self._decodes_lookups():
            raise NotImplementedError(f'{type(self).__name__} implements neither decode_prepared nor query_prepared')
        return self.decode_prepared(prepared, lookup_latents(coord, cell, prepared.grid, self.local_ensemble))

    def query_grid(self, prepared, grid, block, batch):
        """Normalised (B, N, out) predictions at the pixels ``block = (r0, r1, c0, c1)`` of the
        :class:`PixelGrid` ``grid`` (row-major): :meth:`query_prepared` on those queries."""
        if self._decodes_lookups():
            return self.decode_prepared(prepared, grid.lookup(block, prepared.grid, self.local_ensemble, batch))
        return self.query_prepared(prepared, *grid.coords(block, batch))

    def denormalise(self, out):
        return out * self.data_std.view(1, 1, -1) + self.data_mean.view(1, 1, -1)

    def forward(self, lq, coord, cell=None):
        """(B, N, out) at ``coord``. Without autograd (``no_grad`` / ``inference_mode``) the
        queries are decoded :data:`QUERY_CHUNK` at a time - the same numbers, with memory bounded
        by the chunk instead of growing with N (a 2000x2000 output at once would gather
        16M latent rows); with autograd all at once, as training needs."""
        prepared = self.prepare(self.encode(lq))
        if torch.is_grad_enabled() or exporting() or torch.compiler.is_compiling():
            return self.denormalise(self.query_prepared(prepared, coord, cell))
        return self._query_chunks(prepared, coord, cell, QUERY_CHUNK)

    def query(self, lq, coord, cell=None, chunk_size=None):
        """``forward`` with the queries processed ``chunk_size`` at a time (inference)."""
        return self._query_chunks(self.prepare(self.encode(lq)), coord, cell, chunk_size or QUERY_CHUNK)

    def _query_chunks(self, prepared, coord, cell, chunk):
        if coord.shape[1] <= chunk:
            return self.denormalise(self.query_prepared(prepared, coord, cell))
        outs = [
            self.denormalise(self.query_prepared(prepared, coord[:, i:i + chunk], None if cell is None else
                                                 cell[:, i:i + chunk])) for i in range(0, coord.shape[1], chunk)
        ]
        return torch.cat(outs, dim=1)

    def upscale(self, lq, size, chunk_size=None):
        """Render a (B, 3, H, W) image of any size: the one renderer,
        :func:`ciisr_plugin.inference.upscale_tiled` (tiles sized from free memory, blocks of about
        ``chunk_size`` queries, no autograd), as ``basicsr upscale`` / ``test`` and validation use."""
        from ..inference import upscale_tiled  # the renderer sits above the archs
        return upscale_tiled(self, lq, size, chunk_size=chunk_size)
