"""CPU training convolutions (ciisr_plugin.ops.cpu_conv): Winograd 3x3 convolutions, and channels-last ones with
the bias gradient summed by torch."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ciisr_plugin.ops import cpu_conv, fused_cpu

WINOGRAD = fused_cpu.winograd_library()
needs_winograd = pytest.mark.skipif(WINOGRAD is None, reason="no Winograd kernels here (AVX2 / AVX-512 builds)")

GEOMETRIES = [  # (in, out, kernel, stride, padding, dilation, groups)
    (8, 6, 3, 1, 1, 1, 1),
    (8, 6, 1, 1, 0, 1, 1),
    (8, 6, 3, 2, 1, 1, 1),
    (8, 6, 3, 1, 2, 2, 1),
    (8, 6, 3, 1, 1, 1, 2),
    (3, 5, (3, 1), 1, (1, 0), 1, 1),
]


def _grads(conv_fn, x, weight, bias, grad_out, **geometry):
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    out = conv_fn(x, weight, bias, **geometry)
    out.backward(grad_out)
    return out.detach(), x.grad, weight.grad, bias.grad


@pytest.mark.parametrize('cin, cout, k, stride, padding, dilation, groups', GEOMETRIES)
def test_values_and_gradients_match_f_conv2d(cin, cout, k, stride, padding, dilation, groups, monkeypatch):
    gen = torch.Generator().manual_seed(cin * cout)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(3, cin, 11, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin // groups, kh, kw, generator=gen)
    bias = torch.randn(cout, generator=gen)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    out_shape = F.conv2d(x, weight, bias, **geometry).shape
    grad_out = torch.randn(out_shape, generator=gen)
    calls = []
    original = cpu_conv._SummedBiasConv.backward

    def spy(ctx, grad):
        calls.append(grad.shape)
        return original(ctx, grad)

    monkeypatch.setattr(cpu_conv._SummedBiasConv, 'backward', staticmethod(spy))
    ours = _grads(cpu_conv.conv2d, x, weight, bias, grad_out, **geometry)
    assert calls == [out_shape]  # the summed-bias route ran
    ref = _grads(F.conv2d, x, weight, bias, grad_out, **geometry)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_only_what_needs_a_gradient_gets_one():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(5, 4, 3, 3, generator=gen), torch.randn(5, generator=gen).requires_grad_()
    cpu_conv.conv2d(x, weight, bias, padding=1).sum().backward()
    assert bias.grad is not None and weight.grad is None and x.grad is None
    torch.testing.assert_close(bias.grad, torch.full((5, ), 2.0 * 7 * 7))


@pytest.mark.parametrize('case', ['nchw', 'no-grad', 'no-bias', 'float64'])
def test_other_inputs_take_f_conv2d(case, monkeypatch):
    monkeypatch.setattr(cpu_conv._SummedBiasConv, 'apply', lambda *a: pytest.fail('summed-bias route taken'))
    x = torch.randn(2, 4, 6, 6)
    weight, bias = torch.randn(3, 4, 3, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    if case != 'nchw':
        x = x.contiguous(memory_format=torch.channels_last)
    if case == 'no-bias':
        bias = None
    if case == 'float64':
        x, weight, bias = x.double(), weight.detach().double().requires_grad_(), bias.detach().double()
    with torch.set_grad_enabled(case != 'no-grad'):
        out = cpu_conv.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, padding=1))


def test_modules_are_switched_in_place_keeping_their_state():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1),
                        nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'))
    state = copy.deepcopy(net.state_dict())
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    before = net(x)
    assert cpu_conv.use_cpu_training_conv(net) is net
    assert [type(m) for m in net if isinstance(m, nn.Conv2d)] == [cpu_conv.Conv2d] * 3
    assert net.state_dict().keys() == state.keys()
    torch.testing.assert_close(net(x), before)
    # a non-zero padding mode keeps nn.Conv2d's own padding, through the same module
    out = net[3](x.new_ones(1, 4, 5, 5).contiguous(memory_format=torch.channels_last))
    assert out.shape == (1, 4, 5, 5)


def test_encoders_switch_and_train_as_before(monkeypatch):
    from ciisr_plugin.archs.implicit_query import build_encoder
    monkeypatch.setattr(fused_cpu, 'winograd_applies', lambda *a: False)  # the summed-bias route, exactly
    torch.manual_seed(0)
    encoder = build_encoder({'type': 'EDSREncoder', 'num_block': 2, 'num_feat': 8})
    plain = copy.deepcopy(encoder)
    for m in plain.modules():
        if isinstance(m, cpu_conv.Conv2d):
            m.__class__ = nn.Conv2d
    assert any(isinstance(m, cpu_conv.Conv2d) for m in encoder.modules())
    x = torch.rand(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    for net in (encoder, plain):
        net(x).square().sum().backward()
    for (name, a), b in zip(encoder.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# Winograd F(4x4, 3x3)
# Its rounding is a few times a direct float32 convolution's: measured up to ~6e-6 of each
# tensor's largest value against float64 on these cases, so 3e-5 of it; a wrong transform
# coefficient, tile offset or border is off by O(1).
WINOGRAD_TOL = 3e-5


def _close_to_scale(got, want, what):
    err = (got.double() - want).abs().max().item()
    assert err <= WINOGRAD_TOL * want.abs().max().item(), f'{what}: max error {err:.2e}'


@needs_winograd
@pytest.mark.parametrize('n, channels, size, bias', [
    (2, (2, 3), (9, 6), True),  # partial tiles, a one-vector last register tile, channels not whole row blocks
    (1, (1, 1), (1, 1), True),  # one pixel: everything but the centre tap is padding
    (3, (1, 2), (4, 4), False),  # whole tiles, no bias
    (2, (4, 4), (48, 48), True),  # 288 tiles: split across threads
    (1, (2, 16), (5, 3), True),  # many output vectors (a 256-wide estimator at 16-float vectors)
])
def test_winograd_values_and_gradients_match_float64(n, channels, size, bias):
    got, want = fused_cpu.winograd_case(WINOGRAD, seed=sum(size), n=n, channels=channels, size=size, bias=bias)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for name, a, b in zip(['output', 'grad_x', 'grad_w', 'grad_b'], got, want):
        assert a.shape == b.shape and a.dtype == torch.float32
        _close_to_scale(a, b, name)


@needs_winograd
def test_winograd_route_in_training_only(monkeypatch):
    monkeypatch.setattr(fused_cpu, '_AVX512_MIN_WORK', 0)  # small, on any build
    vec = WINOGRAD.ciisr_winograd_vector()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, vec, 7, 10, generator=gen)
    weight = torch.randn(2 * vec, vec, 3, 3, generator=gen, requires_grad=True)
    bias = torch.randn(2 * vec, generator=gen, requires_grad=True)
    calls = []
    original = fused_cpu._WinogradConv.forward

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(fused_cpu._WinogradConv, 'forward', staticmethod(spy))
    out = cpu_conv.conv2d(x, weight, bias, padding=1)  # NCHW in: taken all the same
    assert calls == [1] and out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    want = F.conv2d(x.double(), weight.detach().double(), bias.detach().double(), padding=1)
    _close_to_scale(out.detach(), want, 'output')
    _close_to_scale(bias.grad, torch.full_like(want[0, :, 0, 0], 2 * 7 * 10), 'grad_b')
    with torch.no_grad():  # inference: oneDNN's direct convolution, bit for bit
        assert torch.equal(cpu_conv.conv2d(x, weight, bias, padding=1), F.conv2d(x, weight, bias, padding=1))
    assert calls == [1]


@needs_winograd
@pytest.mark.parametrize('case', ['stride', 'padding', 'dilation', 'groups', '1x1', 'channels', 'float64',
                                  'no-grad', 'disabled'])
def test_winograd_only_where_it_applies(case, monkeypatch):
    vec = WINOGRAD.ciisr_winograd_vector()
    cin, cout, k = vec, vec, 3
    geometry = dict(stride=1, padding=1, dilation=1, groups=1)
    if case in ('stride', 'padding', 'dilation'):
        geometry[case] = 2
    elif case == 'groups':
        geometry['groups'], cin = 2, 2 * vec
    elif case == '1x1':
        k, geometry['padding'] = 1, 0
    elif case == 'channels':
        cout = vec + 2
    x = torch.randn(1, cin, 9, 9)
    weight = torch.randn(cout, cin // geometry['groups'], k, k, requires_grad=True)
    bias = torch.randn(cout, requires_grad=True)
    if case == 'float64':
        x, weight, bias = x.double(), weight.detach().double().requires_grad_(), bias.detach().double()
    if case == 'disabled':
        monkeypatch.setattr(fused_cpu, '_ENABLED', False)
    monkeypatch.setattr(fused_cpu._WinogradConv, 'apply', lambda *a: pytest.fail('Winograd route taken'))
    with torch.set_grad_enabled(case != 'no-grad'):
        out = cpu_conv.conv2d(x, weight, bias, **geometry)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, **geometry))


@needs_winograd
def test_winograd_reads_strided_weights_and_biases(monkeypatch):
    # LIIF's latent convolution is a view of a wider first layer; a bias may be a strided view too
    monkeypatch.setattr(fused_cpu, '_AVX512_MIN_WORK', 0)
    vec = WINOGRAD.ciisr_winograd_vector()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, vec, 9, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    wide = torch.randn(2 * vec, 2 * vec, 3, 3, generator=gen, requires_grad=True)
    both = torch.randn(4 * vec, generator=gen, requires_grad=True)
    weight, bias = wide[:, :vec], both[::2]
    assert not weight.is_contiguous() and not bias.is_contiguous()
    calls = []
    original = fused_cpu._WinogradConv.forward
    monkeypatch.setattr(fused_cpu._WinogradConv, 'forward', staticmethod(lambda *a: calls.append(1) or original(*a)))
    out = cpu_conv.conv2d(x, weight, bias, padding=1)
    assert calls == [1]
    out.square().sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (wide, both)]
    want = F.conv2d(x.double(), leaves[0][:, :vec], leaves[1][::2], padding=1)
    want.square().sum().backward()
    _close_to_scale(out.detach(), want.detach(), 'output')
    _close_to_scale(wide.grad, leaves[0].grad, 'grad_w')
    _close_to_scale(both.grad, leaves[1].grad, 'grad_b')


@needs_winograd
def test_winograd_takes_small_convolutions_on_avx2_builds_only():
    vec = WINOGRAD.ciisr_winograd_vector()
    weight = torch.randn(64, 64, 3, 3, requires_grad=True)
    geometry = ((1, 1), (1, 1), (1, 1), 1)
    small, large = torch.randn(1, 64, 48, 48), torch.randn(8, 64, 48, 48)  # 144 and 1152 tiles
    assert fused_cpu.winograd_applies(large, weight, *geometry)
    assert fused_cpu.winograd_applies(small, weight, *geometry) == (vec == 8)


@needs_winograd
def test_encoder_trains_through_winograd(monkeypatch):
    """An EDSR-baseline-shaped encoder (head 3 -> C, then C -> C 3x3 convolutions): every body
    convolution takes the Winograd route, and its gradients agree with float64 F.conv2d's."""
    from ciisr_plugin.archs.implicit_query import build_encoder
    monkeypatch.setattr(fused_cpu, '_AVX512_MIN_WORK', 0)  # small, on any build
    vec = WINOGRAD.ciisr_winograd_vector()
    torch.manual_seed(0)
    encoder = build_encoder({'type': 'EDSREncoder', 'num_block': 2, 'num_feat': vec})
    plain = copy.deepcopy(encoder).double()
    for m in plain.modules():
        if isinstance(m, cpu_conv.Conv2d):
            m.__class__ = nn.Conv2d
    calls = []
    original = fused_cpu._WinogradConv.forward
    monkeypatch.setattr(fused_cpu._WinogradConv, 'forward', staticmethod(lambda *a: calls.append(1) or original(*a)))
    x = torch.rand(2, 3, 14, 10).contiguous(memory_format=torch.channels_last)
    out = encoder(x)
    out.square().sum().backward()
    plain_out = plain(x.double())
    plain_out.square().sum().backward()
    assert len(calls) == 2 * 2 + 1  # the blocks' and the body's closing 3x3s; not the 3-channel head
    _close_to_scale(out.detach(), plain_out.detach(), 'output')
    for (name, a), b in zip(encoder.named_parameters(), plain.parameters()):
        _close_to_scale(a.grad, b.grad, name)
