"""A literal, per-query transcription of the LIIF paper's formulation (Eq. 2-4 + local
ensemble), used only as a baseline: tests compare the fast engine against it, benchmarks
time it. It unfolds the whole feature map and runs the full MLP on every query and shift.
"""
import torch
import torch.nn.functional as F


def _centres(n):
    r = 1 / n
    return (-1 + r) + (2 * r) * torch.arange(n, dtype=torch.float32)


def literal_liif_forward(net, lq, coord, cell=None, chunk=None):
    """Evaluate our ``LIIF`` module ``net`` the slow way; returns (B, N, 3) in [0, 1]."""
    feat = net.encoder((lq - net.data_mean) / net.data_std)
    b, c, h, w = feat.shape
    if net.feat_unfold:
        feat = F.unfold(feat, 3, padding=1).view(b, c * 9, h, w)
    centres = torch.stack(torch.meshgrid(_centres(h), _centres(w), indexing='ij')).to(lq.device)
    centres = centres.unsqueeze(0).expand(b, 2, h, w)
    shifts = [(-1, -1), (-1, 1), (1, -1), (1, 1)] if net.local_ensemble else [(0, 0)]
    eps = 1e-6 if net.local_ensemble else 0
    mlp = net.decoder.layers

    def run(coord, cell):
        preds, areas = [], []
        for sy, sx in shifts:
            shifted = coord.clone()
            shifted[..., 0] += sy * (1 / h) + eps
            shifted[..., 1] += sx * (1 / w) + eps
            shifted.clamp_(-1 + 1e-6, 1 - 1e-6)
            grid = shifted.flip(-1).unsqueeze(1)
            q_feat = F.grid_sample(feat, grid, mode='nearest', align_corners=False)[:, :, 0].permute(0, 2, 1)
            q_coord = F.grid_sample(centres, grid, mode='nearest', align_corners=False)[:, :, 0].permute(0, 2, 1)
            rel = coord - q_coord
            rel[..., 0] *= h
            rel[..., 1] *= w
            inp = [q_feat, rel]
            if net.cell_decode:
                rel_cell = cell.clone()
                rel_cell[..., 0] *= h
                rel_cell[..., 1] *= w
                inp.append(rel_cell)
            preds.append(mlp(torch.cat(inp, dim=-1)))
            areas.append((rel[..., 0] * rel[..., 1]).abs() + 1e-9)
        total = torch.stack(areas).sum(0)
        areas = areas[::-1]  # each prediction is weighted by its diagonal opposite's area
        out = sum(p * (a / total).unsqueeze(-1) for p, a in zip(preds, areas))
        return out * net.data_std.view(1, 1, -1) + net.data_mean.view(1, 1, -1)

    n = coord.shape[1]
    chunk = chunk or n
    return torch.cat([run(coord[:, i:i + chunk], None if cell is None else cell[:, i:i + chunk])
                      for i in range(0, n, chunk)], dim=1)
