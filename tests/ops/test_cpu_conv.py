"""Channels-last CPU training convolutions with the bias gradient summed by torch (ciisr_plugin.ops.cpu_conv)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ciisr_plugin.ops import cpu_conv

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
    assert cpu_conv.use_summed_bias_gradient(net) is net
    assert [type(m) for m in net if isinstance(m, nn.Conv2d)] == [cpu_conv.Conv2d] * 3
    assert net.state_dict().keys() == state.keys()
    torch.testing.assert_close(net(x), before)
    # a non-zero padding mode keeps nn.Conv2d's own padding, through the same module
    out = net[3](x.new_ones(1, 4, 5, 5).contiguous(memory_format=torch.channels_last))
    assert out.shape == (1, 4, 5, 5)


def test_encoders_switch_and_train_as_before():
    from ciisr_plugin.archs.implicit_query import build_encoder
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
