"""The decoders' per-query ops: one call each, whatever the device or mode.

An implicit decoder's first layer reads the latent, so its latent part is computed once per
latent on the LR grid and kept as a row table (see ``archs/implicit_query.py``); per query,
only the rest runs. These ops are that rest:

* :func:`mlp_decode` - ``relu?(table[index] + extra @ first_weight.T)``, then an MLP (LIIF,
  both LIIF-GAN decoders, A-LIIF's expansion net);
* :func:`fourier_mlp_decode` - LTE's Fourier feature of the estimator's tables read at
  ``index``, then its MLP;
* :func:`basis_decode` - A-LIIF's ``K`` basis MLPs, mixed per query by coefficients.

Each op owns both of its implementations: on CPU float32 inference the fused kernel of
:mod:`.fused_cpu` (packed once per owning module and parameter version, cached beside it);
everywhere else - autograd, autocast, GPUs, tracing / export, a CPU where the kernel did not
build - plain torch ops, the same numbers to float rounding (in CPU float32 training, LTE's
Fourier feature is a fused op with its own backward). An arch calls the op and never asks
which one ran.
"""
import math

import torch
from torch import nn

from . import fused_cpu
from .cpu_linear import exporting, linear


def dense_layers(layers):
    """``[(weight (out, in), bias, relu)]`` of a run of Linear or 1x1 Conv2d modules, each
    optionally followed by a ReLU (LTE+ stores its MLP as 1x1 convolutions)."""
    layers, out, i = list(layers), [], 0
    while i < len(layers):
        layer = layers[i]
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f'expected Linear / 1x1 Conv2d layers, got {type(layer).__name__}')
        relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
        out.append((layer.weight.view(layer.weight.shape[0], -1), layer.bias, relu))
        i += 2 if relu else 1
    return out


def query_inputs(rel_coord, rel_cell):
    """(M, 2 or 4) rows ``[rel_coord, rel_cell]``: what the first layer reads per query."""
    extra = rel_coord if rel_cell is None else torch.cat([rel_coord, rel_cell], dim=-1)
    return extra.contiguous()


def _relu(h):
    # in place (these are the largest per-query tensors) unless autograd needs the input
    return h.relu() if torch.is_grad_enabled() and h.requires_grad else h.relu_()


def first_layer(table, index, extra, first_weight):
    """``table[index] + extra @ first_weight.T`` as a fresh (M, D) tensor. The query part is
    added in place into the gather: a K = 2..4 product out of place costs more than a 256 x 256
    layer (a new (M, D) tensor, then an add); in place ~5x less. ``table`` may be bfloat16
    (autocast does not cover in-place ops)."""
    h = table.index_select(0, index)
    if extra is not None:
        h = h.addmm_(extra.to(h.dtype), first_weight.t().to(h.dtype))
    return h


def mlp_decode(table, index, extra, first_weight, layers, first_relu=True, owner=None):
    """(M, out): ``layers`` applied to ``relu?(table[index] + extra @ first_weight.T)``.

    ``table`` (N, D) the first layer's latent part per latent, bias included; ``index`` (M,)
    int64 rows (None: the table's rows in order); ``extra`` (M, E) query inputs and
    ``first_weight`` (D, E) their columns of the first layer (None: no query part); ``layers``
    ``[(weight, bias, relu)]`` after the first (see :func:`dense_layers`); ``owner`` the module
    holding these layers, on which the fused kernel's packed copy is cached (None: never fused).
    """
    if owner is not None and fused_cpu.applies(table, *(() if extra is None else (extra, ))):
        out = _fused_mlp(owner, table, index, extra, first_weight, layers, first_relu)
        if out is not None:
            return out
    if index is None:
        # the caller's table itself: a query part or a ReLU must not write into it
        h = table if extra is None else torch.addmm(table, extra.to(table.dtype), first_weight.t().to(table.dtype))
        h = h.relu() if first_relu else h
    else:
        h = first_layer(table, index, extra, first_weight)
        h = _relu(h) if first_relu else h
    for weight, bias, relu in layers:
        h = linear(h, weight, bias, relu=relu)
    return h


def mlp_kernel(owner, layers):
    """``layers`` packed for :class:`fused_cpu.MLPKernel`, cached on ``owner`` (rebuilt whenever
    a parameter changes)."""
    params = [p for w, b, _ in layers for p in (w, b) if p is not None]
    return fused_cpu.cached_kernel(owner, 'mlp', params, lambda: fused_cpu.MLPKernel(layers))


def _fused_mlp(owner, table, index, extra, first_weight, layers, first_relu):
    kernel = mlp_kernel(owner, layers)
    if index is None:
        index = torch.arange(table.shape[0])
    if extra is None:  # a zero-width query part
        extra, first_weight = table.new_zeros(index.shape[0], 0), table.new_zeros(table.shape[1], 0)
    return kernel(table, index, extra.float(), first_weight, first_relu)


# ----------------------------------------------------------------------------------------------
# LTE's Fourier feature
def fourier_feature(rows, rel_coord, rel_cell, phase_weight):
    """(M, 2H) ``c * [cos(pi a), sin(pi a)]``, ``a = f_y d_y + f_x d_x + rel_cell @ phase_weight.T``,
    from gathered rows ``(c (M, 2H), f_y (M, H), f_x (M, H))``, which it may overwrite."""
    coef, freq_y, freq_x = rows
    phase = torch.nn.functional.linear(rel_cell, phase_weight)
    if torch.is_grad_enabled() or exporting():
        # the authors' order: the two products summed, then the phase added
        angle = math.pi * (freq_y * rel_coord[:, :1] + freq_x * rel_coord[:, 1:] + phase)
        return coef * torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)
    # inference: the same arithmetic in place on the fresh gathers, no temporaries
    angle = freq_y.mul_(rel_coord[:, :1]).add_(freq_x.mul_(rel_coord[:, 1:])).add_(phase).mul_(math.pi)
    half = angle.shape[1]
    out = torch.empty_like(coef)
    torch.cos(angle, out=out[:, :half])
    torch.sin(angle, out=out[:, half:])
    return out.mul_(coef)


def fourier_mlp_decode(tables, index, rel_coord, rel_cell, phase_weight, layers, owner=None):
    """(M, out): ``layers`` (all of the MLP's, see :func:`dense_layers`) on LTE's
    :func:`fourier_feature` of ``tables`` = (coefficient (N, 2H), f_y (N, H), f_x (N, H)) read at
    ``index`` (M,) int64, ``rel_coord`` and ``rel_cell`` (M, 2), ``phase_weight`` (H, 2).

    On CPU inference the fused kernel forms the feature per row (vectorised sin / cos, within a
    few float ulps of torch's) and runs the MLP on it, so neither the (M, 3H) gathers nor the
    (M, 2H) feature are written out; ``owner`` as in :func:`mlp_decode`. On CPU training the
    feature alone is one fused op with its own backward (:func:`fused_cpu.fourier_feature`),
    the MLP the usual layers."""
    if owner is not None and fused_cpu.applies(*tables, rel_coord, rel_cell):
        out = mlp_kernel(owner, layers).fourier(tables, index, rel_coord, rel_cell, phase_weight)
        if out is not None:
            return out
    feature = None
    if torch.is_grad_enabled() and fused_cpu.applies_with_autograd(*tables, rel_coord, rel_cell, phase_weight):
        feature = fused_cpu.fourier_feature(tables, index, rel_coord, rel_cell, phase_weight)
    if feature is None:
        rows = tuple(t.index_select(0, index) for t in tables)
        feature = fourier_feature(rows, rel_coord, rel_cell, phase_weight)
    return mlp_decode(feature, None, None, None, layers, first_relu=False)


# ----------------------------------------------------------------------------------------------
# A-LIIF's bases
def mix_bases(stacked, coeff):
    """(M, K * out) outputs of every basis -> (M, out) blended with ``coeff`` (M, K).

    Without autograd: one multiply-add per basis on (M, out) slices (a single broadcast
    multiply over the (M, K, out) view, then a sum, measured ~1.8x slower on CPU for
    inference: out = 16 is too short an inner loop). With autograd, the broadcast form:
    each slice's backward writes a zero-filled (M, K * out) gradient, K full passes per
    call (measured 34 vs 6 ms forward + backward at M = 32768, K = 10). Float32 even under
    bf16 autocast (CPU's bf16 elementwise ops are slower)."""
    stacked, coeff = stacked.float(), coeff.float()
    k = coeff.shape[1]
    width = stacked.shape[1] // k
    if torch.is_grad_enabled() and (stacked.requires_grad or coeff.requires_grad):
        return (stacked.view(-1, k, width) * coeff.unsqueeze(-1)).sum(1)
    out = stacked[:, :width] * coeff[:, :1]
    for i in range(1, k):
        out = out.addcmul_(stacked[:, i * width:(i + 1) * width], coeff[:, i:i + 1])
    return out


def basis_mixture(first, coeff, layers):
    """Decode from every basis's first-layer pre-activation ``first`` (M, K * hidden0), bias
    included, mixed with ``coeff`` (M, K): (M, out). ``layers`` = ``[(weight (K, out, in),
    bias (K, out))]`` for the layers after the first.

    Later layers use ``sum_k c_k (W_k h + b_k) = [W_1 .. W_K] (c (x) h) + B c``: one
    (M, K * in) x (K * in, out) product on the outer product ``c (x) h`` per layer, so
    the K outputs are never written out and mixed (measured ~1.3x faster on CPU
    than applying all K bases, then mixing), and the biases of all layers come from one
    (M, K) x (K, sum out) product."""
    h = mix_bases(first, coeff)
    coeff = coeff.float()
    biases = coeff @ torch.cat([bias for _, bias in layers], dim=1) if layers else None
    offset = 0
    for weight, _ in layers:
        k, d_out, d_in = weight.shape
        mixing = weight.transpose(0, 1).reshape(d_out, k * d_in)  # columns (k, j), as c (x) h is laid out
        outer = (coeff.unsqueeze(-1) * torch.relu(h.float()).unsqueeze(1)).flatten(1)
        h = torch.addmm(biases[:, offset:offset + d_out], outer, mixing.t())
        offset += d_out
    return h


def basis_decode(table, index, extra, first_weight, coeff, layers, owner=None):
    """(M, out): A-LIIF's bases decoded from their first-layer latent parts ``table``
    (N, K * hidden0) read at ``index`` (M,), the query inputs ``extra`` (M, E) through
    ``first_weight`` (K * hidden0, E), mixed by ``coeff`` (M, K); ``layers`` as
    :func:`basis_mixture` takes them; ``owner`` as in :func:`mlp_decode`."""
    if owner is not None and fused_cpu.applies(table, extra, coeff):
        kernel = basis_kernel(owner, table.shape[1] // coeff.shape[1], layers, extra.shape[1])
        if kernel.available():
            return kernel(table, index, extra, first_weight, coeff)
    return basis_mixture(first_layer(table, index, extra, first_weight), coeff, layers)


def basis_kernel(owner, first_width, layers, extra_channels):
    """``layers`` packed for :class:`fused_cpu.BasisKernel`, cached on ``owner`` (rebuilt
    whenever a parameter changes)."""
    params = [p for pair in layers for p in pair]
    num_basis = layers[0][0].shape[0] if layers else 1
    return fused_cpu.cached_kernel(owner, f'basis-{extra_channels}', params,
                                   lambda: fused_cpu.BasisKernel(num_basis, first_width, layers, extra_channels))
