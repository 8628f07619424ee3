"""LIIF: Local Implicit Image Function (Chen, Liu & Wang, CVPR 2021)."""
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY
from ..ops import fused_cpu
from .cpu_linear import run_mlp
from .implicit_query import (ImplicitDecoder, ImplicitSRNet, Prepared, add_query_part, decode_lookup, grid_to_rows,
                             latent_conv, split_first_linear)


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
        layers = []
        for hidden in hidden_list:
            layers += [nn.Linear(in_dim, hidden), nn.ReLU()]
            in_dim = hidden
        layers.append(nn.Linear(in_dim, out_channels))
        self.layers = nn.Sequential(*layers)

    def grid_features(self, feat):
        first = self.layers[0]
        conv_weight, _ = split_first_linear(first.weight, self.latent_channels, self.unfold)
        return latent_conv(feat, conv_weight, first.bias, self.unfold)

    def decode(self, rows, rel_coord, rel_cell):
        _, extra_weight = split_first_linear(self.layers[0].weight, self.latent_channels, self.unfold)
        return run_mlp(self.layers[1:], add_query_part(rows, rel_coord, rel_cell, extra_weight))

    def decode_indexed(self, rows, index, rel_coord, rel_cell):
        if fused_cpu.applies(rows, rel_coord):
            out = self.decode_fused(rows, index, fused_cpu.query_inputs(rel_coord, rel_cell))
            if out is not None:
                return out
        return super().decode_indexed(rows, index, rel_coord, rel_cell)

    def decode_fused(self, rows, index, extra):
        """CPU inference: :meth:`decode_indexed` as one kernel from the row table to the output
        (:class:`fused_cpu.MLPKernel`); ``extra`` = :func:`fused_cpu.query_inputs`. None where
        the kernel is not available."""
        layers = list(self.layers)
        first_relu = len(layers) > 1 and isinstance(layers[1], nn.ReLU)
        later = layers[2 if first_relu else 1:]
        kernel = fused_cpu.cached_kernel(self, 'mlp', list(self.layers[1:].parameters()),
                                         lambda: fused_cpu.MLPKernel(self._later_layers(later)))
        _, extra_weight = split_first_linear(self.layers[0].weight, self.latent_channels, self.unfold)
        return kernel(rows, index, extra, extra_weight, first_relu)

    @staticmethod
    def _later_layers(layers):
        """``[(weight, bias, relu)]`` of a run of Linear (+ ReLU) modules."""
        out, i = [], 0
        while i < len(layers):
            relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
            out.append((layers[i].weight, layers[i].bias, relu))
            i += 2 if relu else 1
        return out


@ARCH_REGISTRY.register()
class LIIF(ImplicitSRNet):
    """LIIF: encoder + one MLP queried at continuous coordinates.

    Args:
        encoder (dict): a registered encoder arch, e.g. ``{type: EDSREncoder}``.
        hidden_list (list[int]): MLP widths; the paper uses 4 x 256.
        local_ensemble, feat_unfold, cell_decode (bool): the paper's three design choices.
        data_mean, data_std: input normalisation ``(x - mean) / std``, inverted on the output
            (the authors' recipe is 0.5 / 0.5).
        chunk_size (int): queries decoded at once by ``query``/``upscale``.
    """

    def __init__(self, encoder, hidden_list=(256, 256, 256, 256), local_ensemble=True, feat_unfold=True,
                 cell_decode=True, data_mean=0.5, data_std=0.5, chunk_size=4096, out_channels=3):
        super().__init__(encoder, local_ensemble, feat_unfold, cell_decode, data_mean, data_std, chunk_size)
        self.decoder = MLPDecoder(self.encoder.out_channels, self.decoder_extra_channels, list(hidden_list),
                                  out_channels, feat_unfold)

    @property
    def decode_row_width(self):
        return self.decoder.layers[0].out_features

    def prepare(self, feat):
        return Prepared(grid_to_rows(self.decoder.grid_features(feat)), tuple(feat.shape[-2:]))

    def decode_prepared(self, prepared, lookup):
        return decode_lookup(self.decoder, prepared.rows, lookup, prepared.grid, self.cell_decode)
