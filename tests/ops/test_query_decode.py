"""The decoders' per-query ops (ciisr_plugin.ops.query_decode): each is one call that runs its
fused kernel where one applies and plain torch elsewhere, the same numbers either way."""
import pytest
import torch
from torch import nn

from ciisr_plugin.ops import fused_cpu, query_decode


@pytest.fixture(autouse=True)
def enabled(monkeypatch):
    monkeypatch.setattr(fused_cpu, '_ENABLED', True)


def _mlp(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _case(seed=1, n=7, m=40, d=32, e=4):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=gen), torch.randint(0, n, (m, ), generator=gen),
            torch.randn(m, e, generator=gen), torch.randn(d, e, generator=gen))


def _expected(mlp, table, index, extra, first_weight, first_relu=True):
    """What mlp_decode means, spelt out: the first layer's two parts added, then the rest."""
    h = table[index] + extra @ first_weight.t()
    return mlp(h.relu() if first_relu else h)


@pytest.mark.parametrize('grad', [False, True])
def test_mlp_decode_is_the_mlp_on_the_first_layer_parts(grad):
    mlp = _mlp([32, 24, 24, 3])
    table, index, extra, first_weight = _case()
    with torch.set_grad_enabled(grad):
        out = query_decode.mlp_decode(table, index, extra, first_weight, query_decode.dense_layers(mlp), owner=mlp)
        torch.testing.assert_close(out, _expected(mlp, table, index, extra, first_weight), rtol=1e-5, atol=1e-5)


def test_mlp_decode_runs_the_fused_kernel_on_cpu_inference_only(monkeypatch):
    if 'mlp' not in fused_cpu.kernels_built():
        pytest.skip('no MLP kernel built here (no C compiler)')
    calls = []
    real = fused_cpu.MLPKernel.__call__
    monkeypatch.setattr(fused_cpu.MLPKernel, '__call__', lambda self, *a: calls.append(1) or real(self, *a))
    mlp = _mlp([32, 24, 3])
    args = _case()
    layers = query_decode.dense_layers(mlp)
    with torch.no_grad():
        fused = query_decode.mlp_decode(*args, layers, owner=mlp)
    assert len(calls) == 1
    query_decode.mlp_decode(*args, layers, owner=mlp)  # autograd on: torch
    with torch.no_grad():
        query_decode.mlp_decode(*args, layers)  # no owner to cache the packing on: torch
    assert len(calls) == 1
    torch.testing.assert_close(fused, _expected(mlp, *args), rtol=1e-5, atol=1e-5)


def test_mlp_decode_gradients_are_those_of_the_plain_mlp():
    mlp = _mlp([32, 16, 3])
    table, index, extra, first_weight = _case()
    table.requires_grad_(True)
    first_weight.requires_grad_(True)
    query_decode.mlp_decode(table, index, extra, first_weight, query_decode.dense_layers(mlp)).square().sum().backward()
    ours = [t.grad.clone() for t in (table, first_weight, *mlp.parameters())]
    for t in (table, first_weight, *mlp.parameters()):
        t.grad = None
    _expected(mlp, table, index, extra, first_weight).square().sum().backward()
    for got, want in zip(ours, [t.grad for t in (table, first_weight, *mlp.parameters())]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('grad', [False, True])
def test_mlp_decode_without_index_reads_the_table_in_order_and_never_writes_it(grad):
    mlp = _mlp([32, 16, 3])
    table, _, extra, first_weight = _case(m=7)
    kept = table.clone()
    everything = torch.arange(len(table))
    with torch.set_grad_enabled(grad):
        for ex, fw in ((extra, first_weight), (None, None)):
            out = query_decode.mlp_decode(table, None, ex, fw, query_decode.dense_layers(mlp), owner=mlp)
            ex = torch.zeros(7, 4) if ex is None else ex
            fw = torch.zeros(32, 4) if fw is None else fw
            torch.testing.assert_close(out, _expected(mlp, table, everything, ex, fw), rtol=1e-5, atol=1e-5)
    assert torch.equal(table, kept)


def test_dense_layers_accept_linear_and_1x1_convs_only():
    conv = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    (w0, b0, r0), (w1, _, r1) = query_decode.dense_layers(conv)
    assert w0.shape == (4, 8) and w1.shape == (3, 4) and r0 and not r1 and b0 is conv[0].bias
    with pytest.raises(TypeError, match='Linear / 1x1 Conv2d'):
        query_decode.dense_layers(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))


@pytest.mark.parametrize('grad', [False, True])
def test_basis_decode_is_a_per_query_mixture_of_the_bases(grad):
    # the bases' mixture written with each query's own matrices W_q = sum_k c_k W_k (A-LIIF)
    gen = torch.Generator().manual_seed(3)
    k, dims, n, m, e = 5, [16, 8, 3], 6, 30, 4
    layers = [(torch.randn(k, d_out, d_in, generator=gen) / d_in**0.5, torch.randn(k, d_out, generator=gen))
              for d_in, d_out in zip(dims[:-1], dims[1:])]
    table, index = torch.randn(n, k * dims[0], generator=gen), torch.randint(0, n, (m, ), generator=gen)
    extra, first_weight = torch.randn(m, e, generator=gen), torch.randn(k * dims[0], e, generator=gen)
    coeff = torch.nn.functional.normalize(torch.randn(m, k, generator=gen), dim=1)
    owner = nn.Module()
    with torch.set_grad_enabled(grad):
        out = query_decode.basis_decode(table, index, extra, first_weight, coeff, layers, owner=owner)
    first = (table[index] + extra @ first_weight.t()).view(m, k, dims[0])
    h = (coeff.unsqueeze(-1) * first).sum(1)
    for i, (weight, bias) in enumerate(layers):
        weight_q = torch.einsum('mk,koi->moi', coeff, weight)
        h = torch.einsum('moi,mi->mo', weight_q, h.relu()) + coeff @ bias
    torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-5)
