"""The decoders' dense layers on oneDNN (ciisr_plugin.ops.cpu_linear) vs F.linear."""
import pytest
import torch
import torch.nn.functional as F

from ciisr_plugin.ops import cpu_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason='this torch build has no oneDNN')


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    monkeypatch.setattr(cpu_linear, '_AVAILABLE', {})
    monkeypatch.setattr(cpu_linear, '_ENABLED', True)


def _case(m=300, k=256, n=64, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if bias else None
    return x, w, b


def test_cpu_float32_takes_the_onednn_route():
    x, w, _ = _case()
    assert cpu_linear._compute_dtype(x, w) == torch.float32


BF16_ON_ONEDNN = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # AVX512-BF16 or AMX


def test_first_use_inside_bf16_autocast_does_not_disable_the_route():
    # the availability probe must not run its check under the caller's autocast
    x, w, _ = _case()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert cpu_linear._compute_dtype(x, w) == (torch.bfloat16 if BF16_ON_ONEDNN else None)
    assert cpu_linear._compute_dtype(x, w) == torch.float32


def test_a_cpu_without_onednn_bf16_keeps_float32_on_onednn_and_bf16_on_autocast(monkeypatch):
    # an AVX2-only CPU: oneDNN has no bf16 inner product there and raises when asked for one
    onednn = cpu_linear._onednn

    def float32_only(x, *args):
        if x.dtype == torch.bfloat16:
            raise RuntimeError('could not create a primitive descriptor for the inner product')
        return onednn(x, *args)

    monkeypatch.setattr(cpu_linear, '_onednn', float32_only)
    x, w, b = _case()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert cpu_linear._compute_dtype(x, w) is None
        ours = cpu_linear.linear(x, w, b, relu=True)
        ref = F.linear(x, w, b).relu()
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert cpu_linear._compute_dtype(x, w) == torch.float32


@pytest.mark.parametrize('relu', [False, True])
@pytest.mark.parametrize('bias', [False, True])
def test_forward_matches_f_linear(relu, bias):
    x, w, b = _case(bias=bias)
    ref = F.linear(x, w, b)
    ref = ref.relu() if relu else ref
    out = cpu_linear.linear(x, w, b, relu=relu)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input():
    x, w, b = _case()
    wide = torch.cat([x, x], dim=1)[:, ::2]  # strided view
    torch.testing.assert_close(cpu_linear.linear(wide, w, b), F.linear(wide, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('relu', [False, True])
def test_gradients_match_f_linear(relu):
    x, w, b = _case(m=500, k=64, n=32)
    grad_out = torch.randn(500, 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (cpu_linear.linear, None):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        out = fn(xs, ws, bs, relu=relu) if fn else F.linear(xs, ws, bs)
        if fn is None and relu:
            out = out.relu()
        out.backward(grad_out)
        grads.append((out.detach(), xs.grad, ws.grad, bs.grad))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_matches_autocast_f_linear():
    x, w, b = _case()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        ours = cpu_linear.linear(x, w, b, relu=True)
        ref = F.linear(x, w, b).relu()
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_disabled_falls_back_to_f_linear(monkeypatch):
    x, w, b = _case()
    calls = []
    monkeypatch.setattr(cpu_linear, '_onednn', lambda *a: calls.append(a))
    cpu_linear.set_enabled(False)
    torch.testing.assert_close(cpu_linear.linear(x, w, b), F.linear(x, w, b))
    assert not calls
    cpu_linear.set_enabled(True)
    cpu_linear.linear(x, w, b)
    assert calls


@pytest.mark.parametrize('rows', [1, 63, 64, 640, 1000])
def test_weight_gradient_is_the_transposed_product(rows):
    # below one line of the convolution's image, a whole number of lines, and a remainder
    gen = torch.Generator().manual_seed(rows)
    grad_out, x = torch.randn(rows, 24, generator=gen), torch.randn(rows, 40, generator=gen)
    out = cpu_linear.weight_gradient(grad_out, x)
    assert out.shape == (24, 40) and out.is_contiguous()
    # within float32's bound for summing `rows` products in any order (rows * eps * sum |terms|);
    # a lost or misplaced row is off by a whole product
    err = (out.double() - grad_out.double().t() @ x.double()).abs()
    assert (err <= rows * 2**-24 * (grad_out.abs().double().t() @ x.abs().double())).all()


def test_layer_weight_gradient_takes_weight_gradient(monkeypatch):
    calls = []

    def spy(grad_out, x):
        calls.append(grad_out.shape)
        return grad_out.t().mm(x)

    monkeypatch.setattr(cpu_linear, 'weight_gradient', spy)
    x, w, b = _case(m=200, k=16, n=8)
    w.requires_grad_()
    cpu_linear.linear(x, w, b, relu=True).sum().backward()
    assert calls == [(200, 8)]
