"""Literal, slow re-implementations of the authors' per-query formulations.

These evaluate our modules' parameters the way the papers' public code does - explicit
3x3 unfolding of the feature map, ``grid_sample`` nearest lookups of features and latent
centres, one MLP input vector per query, per-query weight matrices for A-LIIF - and share
no code with :mod:`ciisr_plugin.archs.implicit_query`. Tests compare the fast engine to
them; benchmarks time them. A plain module of functions.
"""
import torch
import torch.nn.functional as F

AUTHORS_TEST_BATCH = 30000  # queries per forward in the authors' test script (batched_predict)


def grid_centres(h, w, device=None):
    """(2, h, w) cell centres of an h x w grid, (row, col), by the authors' formula in float32."""
    axes = []
    for n in (h, w):
        r = 1 / n
        axes.append((-1 + r) + (2 * r) * torch.arange(n, device=device, dtype=torch.float32))
    return torch.stack(torch.meshgrid(*axes, indexing='ij'), dim=0)


def _normalise_literal(logits, mode):
    if mode == 'l2':  # the definition of F.normalize: x / max(||x||_2, eps)
        return logits / logits.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)
    if mode == 'softmax':
        e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
        return e / e.sum(dim=-1, keepdim=True)
    if mode == 'sum':
        return logits / logits.sum(dim=-1, keepdim=True)
    raise ValueError(f'unknown coeff_norm {mode!r}')


def _aliif_decode_literal(net, inp):
    """inp (M, in_dim) -> (M, out): expansion net on the full input, then per-query mixed
    weight matrices W_q = (c_q @ W).view(out, in), as the authors' pointwise MLP does."""
    logits = inp
    for layer in net.expansion.layers:  # Linear over the whole [latent, coord, cell] vector
        logits = layer(logits)
    coeff = _normalise_literal(logits, net.coeff_norm)
    basis = net.basis
    x = inp
    for i in range(basis.num_layers):
        d_in, d_out = basis.dims[i], basis.dims[i + 1]
        weight_q = torch.matmul(coeff, getattr(basis, f'weight{i}')).view(-1, d_out, d_in)  # (M, out, in)
        x = torch.sum(x.unsqueeze(1) * weight_q, dim=2) + torch.matmul(coeff, getattr(basis, f'bias{i}'))
        if i < basis.num_layers - 1:
            x = torch.relu(x)
    return x


def _query_literal(net, feat, coord, cell, decode):
    """The authors' ``query_rgb``: four shifted nearest lookups, blended by opposite areas."""
    if net.feat_unfold:
        feat = F.unfold(feat, 3, padding=1).view(feat.shape[0], feat.shape[1] * 9, feat.shape[2], feat.shape[3])
    h, w = feat.shape[-2:]
    if net.local_ensemble:
        shifts, eps = [-1, 1], 1e-6
    else:
        shifts, eps = [0], 0
    rx, ry = 2 / h / 2, 2 / w / 2
    centres = grid_centres(h, w, feat.device).unsqueeze(0).expand(feat.shape[0], 2, h, w)

    preds, areas = [], []
    for vx in shifts:
        for vy in shifts:
            coord_ = coord.clone()
            coord_[:, :, 0] += vx * rx + eps
            coord_[:, :, 1] += vy * ry + eps
            coord_.clamp_(-1 + 1e-6, 1 - 1e-6)
            grid = coord_.flip(-1).unsqueeze(1)
            q_feat = F.grid_sample(feat, grid, mode='nearest', align_corners=False)[:, :, 0, :].permute(0, 2, 1)
            q_coord = F.grid_sample(centres, grid, mode='nearest', align_corners=False)[:, :, 0, :].permute(0, 2, 1)
            rel_coord = coord - q_coord
            rel_coord[:, :, 0] *= h
            rel_coord[:, :, 1] *= w
            inp = torch.cat([q_feat, rel_coord], dim=-1)
            if net.cell_decode:
                rel_cell = cell.clone()
                rel_cell[:, :, 0] *= h
                rel_cell[:, :, 1] *= w
                inp = torch.cat([inp, rel_cell], dim=-1)
            b, q = coord.shape[:2]
            preds.append(decode(net, inp.view(b * q, -1)).view(b, q, -1))
            areas.append(torch.abs(rel_coord[:, :, 0] * rel_coord[:, :, 1]) + 1e-9)

    total = torch.stack(areas).sum(dim=0)
    if net.local_ensemble:
        areas = areas[::-1]  # each prediction is weighted by its diagonal opposite's area
    out = 0
    for pred, area in zip(preds, areas):
        out = out + pred * (area / total).unsqueeze(-1)
    return out


def _forward_literal(net, lq, coord, cell, decode, chunk):
    x = (lq - net.data_mean) / net.data_std
    if x.device.type == 'cpu':
        # the memory layout our engine gives the encoder on CPU, so that timing this against
        # it measures the per-query formulation, not the encoder's layout
        x = x.contiguous(memory_format=torch.channels_last)
    feat = net.encoder(x)
    n = coord.shape[1]
    step = chunk or n
    outs = [
        _query_literal(net, feat, coord[:, i:i + step], None if cell is None else cell[:, i:i + step], decode)
        for i in range(0, n, step)
    ]
    out = torch.cat(outs, dim=1)
    return out * net.data_std.view(1, 1, -1) + net.data_mean.view(1, 1, -1)


def literal_aliif_forward(net, lq, coord, cell, chunk=None):
    """Our ``ALIIF`` module's parameters evaluated the authors' per-query way.

    lq (B, 3, h, w) in [0, 1]; coord, cell (B, N, 2). ``chunk`` queries per pass as in the
    authors' test script (``None``: all at once, differentiable for training). -> (B, N, 3).
    """
    return _forward_literal(net, lq, coord, cell, _aliif_decode_literal, chunk)


def literal_liif_forward(net, lq, coord, cell=None, chunk=None):
    """Our ``LIIF`` module's parameters evaluated the paper's per-query way: the whole MLP on
    every (unfolded latent, rel_coord, rel_cell) vector of every query and shift."""
    return _forward_literal(net, lq, coord, cell, lambda net, inp: net.decoder.layers(inp), chunk)
