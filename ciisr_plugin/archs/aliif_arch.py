"""A-LIIF: Adaptive Local Implicit Image Function (Li, Dai, Li, Zou & Xia, ICIP 2022).

Each query is decoded by its own MLP, a combination of ``K`` shared basis MLPs whose
weights and biases are mixed with coefficients from an expansion network:
``W_q = sum_k c_k W_k``, ``b_q = sum_k c_k b_k`` at every layer.

The authors materialise ``W_q`` for every query (a 16 x 580 matrix each). Because
``(sum_k c_k W_k) h + sum_k c_k b_k = sum_k c_k (W_k h + b_k)``, we never do: the first
layer of both the expansion net and the bases reads the unfolded latent, so that part runs
once per latent on the LR grid as one convolution (see :mod:`implicit_query`) and its K
outputs are mixed per query; every later layer is one product of the stacked bases with
the outer product ``c (x) h`` (:func:`ciisr_plugin.ops.query_decode.basis_mixture`). The same
numbers, to float rounding, without the per-query matrices; CPU inference runs the bases from
their row table to the output in one fused kernel where it is built.
:meth:`ALIIF.reference_query` is the paper's model written plainly, per-query matrices and
all; the fast path is tested equal to it.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from basicsr.utils.registry import ARCH_REGISTRY
from ..ops.query_decode import basis_decode, query_inputs
from .implicit_query import (ImplicitDecoder, ImplicitSRNet, Prepared, decode_lookup, grid_to_rows, latent_conv,
                             split_first_linear)
from .liif_arch import MLPDecoder, authors_liif_flags, is_aliif_spec, paper_query

COEFF_NORMS = ('l2', 'softmax', 'sum')


def normalise_coefficients(logits, mode):
    """Expansion-net outputs -> mixing coefficients along the last dim (K).

    'l2': unit L2 norm, as the authors' code does (``F.normalize``, eps 1e-12);
    'softmax': positive, summing to one; 'sum': divided by their sum, the paper's wording
    ("normalised so that the sum is 1") taken literally - unbounded when the sum nears 0.
    """
    if mode == 'l2':
        return F.normalize(logits, p=2, dim=-1)
    if mode == 'softmax':
        return torch.softmax(logits, dim=-1)
    if mode == 'sum':
        return logits / logits.sum(dim=-1, keepdim=True)
    raise ValueError(f"ALIIF: coeff_norm must be one of {', '.join(COEFF_NORMS)}; got '{mode}'")


class PointwiseBasis(nn.Module):
    """``K`` MLPs ``in_dim -> hidden... -> out`` whose per-query mixture decodes a query.

    Stored in the authors' layout so their weights load unchanged: ``weight{i}`` is
    ``(K, out_i * in_i)`` with basis ``k``'s matrix flattened row-major (output rows), and
    ``bias{i}`` is ``(K, out_i)``. A parameter container: the decoding is
    :func:`ciisr_plugin.ops.query_decode.basis_decode` (fused on CPU inference, else
    :func:`~ciisr_plugin.ops.query_decode.basis_mixture`, without per-query matrices).
    """

    def __init__(self, num_basis, in_dim, hidden_list, out_channels):
        super().__init__()
        self.num_basis = num_basis
        self.dims = [in_dim, *hidden_list, out_channels]
        for i, (d_in, d_out) in enumerate(zip(self.dims[:-1], self.dims[1:])):
            self.register_parameter(f'weight{i}', nn.Parameter(torch.empty(num_basis, d_out * d_in)))
            self.register_parameter(f'bias{i}', nn.Parameter(torch.empty(num_basis, d_out)))
        self.reset_parameters()

    @property
    def num_layers(self):
        return len(self.dims) - 1

    def reset_parameters(self):
        # The authors' init, computed on their (K, out * in) tensors: the fan-in is out * in,
        # so the weights start much smaller than an nn.Linear of the same shape would.
        for i in range(self.num_layers):
            weight, bias = getattr(self, f'weight{i}'), getattr(self, f'bias{i}')
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(bias, -bound, bound)

    def stacked_weight(self, i):
        """Layer ``i`` of all bases as one Linear weight ``(K * out_i, in_i)``, rows (k, o)."""
        return getattr(self, f'weight{i}').view(self.num_basis * self.dims[i + 1], self.dims[i])

    def stacked_bias(self, i):
        return getattr(self, f'bias{i}').view(-1)

    def later_layers(self):
        """``[(weight (K, out_i, in_i), bias (K, out_i))]`` of the layers after the first."""
        return [(getattr(self, f'weight{i}').view(self.num_basis, self.dims[i + 1], self.dims[i]),
                 getattr(self, f'bias{i}')) for i in range(1, self.num_layers)]


@ARCH_REGISTRY.register()
class ALIIF(ImplicitSRNet, ImplicitDecoder):
    """A-LIIF: encoder + expansion net + ``K`` basis MLPs mixed per query.

    The arch is its own :class:`ImplicitDecoder` (its ``expansion`` and ``basis`` sit at the
    top level, where the authors' checkpoints put them).

    Args:
        encoder (dict): a registered encoder arch, e.g. ``{type: EDSREncoder}``.
        num_basis (int): K, the number of basis MLPs (paper: 10).
        basis_hidden (list[int]): hidden widths of each basis MLP (paper: 4 x 16).
        expansion_hidden (list[int]): hidden widths of the expansion net (paper: 4 x 256).
        coeff_norm (str): how expansion outputs become coefficients: 'l2' (authors' code),
            'softmax' or 'sum'.
        local_ensemble, feat_unfold, cell_decode (bool): LIIF's three design choices.
        data_mean, data_std: input normalisation ``(x - mean) / std``, inverted on the output.
        out_channels (int): output channels.
    """

    def __init__(self, encoder, num_basis=10, basis_hidden=(16, 16, 16, 16), expansion_hidden=(256, 256, 256, 256),
                 coeff_norm='l2', local_ensemble=True, feat_unfold=True, cell_decode=True, data_mean=0.5,
                 data_std=0.5, out_channels=3):
        if coeff_norm not in COEFF_NORMS:
            raise ValueError(f"ALIIF: coeff_norm must be one of {', '.join(COEFF_NORMS)}; got '{coeff_norm}'")
        if int(num_basis) < 1:
            raise ValueError(f'ALIIF: num_basis must be at least 1, got {num_basis}')
        for name, widths in (('basis_hidden', basis_hidden), ('expansion_hidden', expansion_hidden)):
            if (not isinstance(widths, (list, tuple)) or not widths
                    or not all(isinstance(v, int) and v > 0 for v in widths)):
                raise ValueError(f'ALIIF: {name} must be a non-empty list of positive ints, got {widths!r}')
        super().__init__(encoder, local_ensemble, feat_unfold, cell_decode, data_mean, data_std)
        self.coeff_norm = coeff_norm
        latent = self.encoder.out_channels
        self.expansion = MLPDecoder(latent, self.decoder_extra_channels, list(expansion_hidden), int(num_basis),
                                    feat_unfold)
        self.basis = PointwiseBasis(
            int(num_basis), self.decoder_in_channels + self.decoder_extra_channels, list(basis_hidden), out_channels)

    def reference_query(self, feat, coord, cell=None):
        """The paper's model, plainly: LIIF's query (:func:`paper_query`) where each query's input
        ``x`` goes through its own MLP, whose layers are ``W_q = sum_k c_k W_k``, ``b_q = sum_k c_k
        b_k`` with ``c`` = the expansion net's normalised output on the same ``x`` - each ``W_q``
        materialised, as in the authors' code. :meth:`prepare` + :meth:`decode_prepared` give the
        same (B, N, out), normalised, faster."""
        basis = self.basis

        def per_query_mlp(x):
            coeff = normalise_coefficients(self.expansion.layers(x), self.coeff_norm)  # (M, K)
            for i in range(basis.num_layers):
                weight_q = (coeff @ getattr(basis, f'weight{i}')).view(-1, basis.dims[i + 1], basis.dims[i])
                x = (x.unsqueeze(1) * weight_q).sum(dim=2) + coeff @ getattr(basis, f'bias{i}')
                if i < basis.num_layers - 1:
                    x = torch.relu(x)
            return x

        return paper_query(feat, coord, cell, per_query_mlp, self.local_ensemble, self.feat_unfold, self.cell_decode)

    # -- ImplicitDecoder ---------------------------------------------------------------------
    def _first_layer_weights(self):
        """First layers of the expansion net and of all bases as one (E + K * hidden0, in) matrix."""
        return torch.cat([self.expansion.layers[0].weight, self.basis.stacked_weight(0)])

    def grid_features(self, feat):
        """(B, E + K * hidden0, h, w): the latent part of the expansion net's first layer and
        of every basis's first layer, biases included, as one convolution."""
        bias = torch.cat([self.expansion.layers[0].bias, self.basis.stacked_bias(0)])
        conv_weight, _ = split_first_linear(self._first_layer_weights(), self.encoder.out_channels, self.feat_unfold)
        return latent_conv(feat, conv_weight, bias, self.feat_unfold)

    def _basis_query_weight(self):
        """The coord / cell columns of every basis's first layer, (K * hidden0, 2 or 4)."""
        return self.basis.stacked_weight(0)[:, self.decoder_in_channels:]

    def decode_indexed(self, rows, index, rel_coord, rel_cell):
        # ``rows`` = (expansion part, basis part), separate tables: a column slice of one
        # (M, E + K * hidden0) gather would need a copy before the expansion net's next layer
        # (measured ~20% of that layer's time). The expansion net gives the coefficients that
        # mix the bases; each is one op (a fused kernel on CPU inference where built, torch
        # otherwise), so no (M, 256) or (M, K * 16) activation is written on that path.
        expansion_rows, basis_rows = rows
        coeff = normalise_coefficients(self.expansion.decode_indexed(expansion_rows, index, rel_coord, rel_cell),
                                       self.coeff_norm)
        return basis_decode(basis_rows, index, query_inputs(rel_coord, rel_cell), self._basis_query_weight(), coeff,
                            self.basis.later_layers(), owner=self)

    # -- ImplicitSRNet -----------------------------------------------------------------------
    @property
    def decode_row_width(self):
        # the expansion net's and the bases' first-layer rows are gathered for the same queries
        return self.expansion.layers[0].out_features + self.basis.num_basis * self.basis.dims[1]

    def prepare(self, feat):
        grid = self.grid_features(feat)
        width = self.expansion.layers[0].out_features
        return Prepared((grid_to_rows(grid[:, :width]), grid_to_rows(grid[:, width:])), tuple(feat.shape[-2:]))

    def decode_prepared(self, prepared, lookup):
        return decode_lookup(self, prepared.rows, lookup, prepared.grid, self.cell_decode)

    # -- the A-LIIF authors' checkpoints (saved as 'liif', with pdn_spec / basis_spec) ---------
    authors_names = ('liif', )
    authors_decoder_keys = [
        (r'^pdn\.layers\.', 'expansion.layers.'),
        (r'^basis\.w(\d+)$', r'basis.weight\1'),
        # their biases are numbered 1..5 while the weights are 0..4; ours share one index
        (r'^basis\.bias(\d+)$', lambda m: f'basis.bias{int(m.group(1)) - 1}'),
    ]

    @classmethod
    def authors_options(cls, name, args, encoder):
        if not is_aliif_spec(args):
            return None
        imnet_args = args['imnet_spec'].get('args', {})
        pdn_args = args['pdn_spec'].get('args', {})
        basis_args = args['basis_spec'].get('args', {})
        return {
            'type': 'ALIIF',
            'encoder': encoder,
            'num_basis': basis_args.get('basis_num', pdn_args.get('out_dim', 10)),
            'basis_hidden': [basis_args.get('hidden', 16)] * len(imnet_args.get('hidden_list', [16] * 4)),
            'expansion_hidden': list(pdn_args.get('hidden_list', [256] * 4)),
            'coeff_norm': 'l2',
            'out_channels': imnet_args.get('out_dim', 3),
            **authors_liif_flags(args),
        }
