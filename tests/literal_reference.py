"""The papers' models run literally as whole networks: the side the tests compare the fast engine
with, and the side ``benchmarks/bench_speed.py`` times it against.

The per-query formulation itself is written beside each fast path, in the arch files:
``reference_query`` of LIIF, ALIIF and LIIFGAN, built on
:func:`ciisr_plugin.archs.liif_arch.paper_query` - explicit 3x3 unfolding of the feature map,
``grid_sample`` nearest lookups of latents and their centres, one MLP input vector per query and
latent, A-LIIF's per-query weight matrices. It shares none of
:mod:`ciisr_plugin.archs.implicit_query`'s lookup, row tables or kernels. This module adds the
encoder, the queries ``chunk`` at a time as in the authors' test script, and the denormalisation.
"""
import torch

AUTHORS_TEST_BATCH = 30000  # queries per forward in the authors' test script (batched_predict)


def literal_forward(net, lq, coord, cell=None, chunk=None):
    """``net``'s parameters evaluated the paper's way (its ``reference_query``).

    lq (B, 3, h, w) in [0, 1]; coord, cell (B, N, 2). ``chunk`` queries per pass as in the
    authors' test script (``None``: all at once, differentiable for training). -> (B, N, out).
    """
    feat = net.encode(lq)  # on CPU channels-last, as the engine's: timings compare the queries alone
    n = coord.shape[1]
    step = chunk or n
    outs = [
        net.reference_query(feat, coord[:, i:i + step], None if cell is None else cell[:, i:i + step])
        for i in range(0, n, step)
    ]
    return net.denormalise(torch.cat(outs, dim=1))


# the names tests and scripts used when each arch had its own literal forward here
literal_liif_forward = literal_aliif_forward = literal_forward
