"""Convolutions for CPU training: Winograd's algorithm for 3x3 ones, and oneDNN's kernels with
the bias gradient summed by torch for the rest in channels-last.

* 3x3, stride 1, zero padding 1 (every convolution of an EDSR / RDN body, LTE's estimator,
  LIIF's latent convolution), CPU float32 with autograd on, channels in whole vectors:
  forward and both gradients by Winograd's F(4x4, 3x3) (``fused_cpu``'s kernels: a quarter
  of the multiplications; 64 -> 64 on 16 x 48 x 48, 2 cores, forward + backward: ~1.5x
  oneDNN on an AVX-512 EPYC, ~2x held to AVX2, where oneDNN's direct convolution already
  runs at the FMA peak). Its rounding is a few times a direct convolution's (relative ~1e-5
  of the output's scale instead of ~1e-6): fine for training, so inference (no autograd)
  keeps the direct convolutions whose outputs match the authors' code to ~1e-7.
* Otherwise, channels-last: asked for the bias gradient too, oneDNN's channels-last
  backward-weights kernel is ~2.2 ms slower per convolution of an EDSR-baseline training
  step (batch 16 of 48 px, 64 -> 64, 3x3, 2 cores of an AVX-512 EPYC: 12.3 vs 10.1 ms), while
  the same sum as a torch reduction over the gradient takes ~0.1 ms. (In NCHW the difference
  was not measurable.)

The encoders' plain ``nn.Conv2d`` modules are switched to :class:`Conv2d` when they are built
(:func:`use_cpu_training_conv`: same parameters, same state dict), and the decoders' latent
convolutions call :func:`conv2d`. ``CIISR_FUSED_CPU=off`` turns the Winograd route off with
the other compiled kernels.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from . import fused_cpu
from .cpu_linear import eager_cpu_float32


class _SummedBiasConv(torch.autograd.Function):
    """``F.conv2d`` whose backward leaves the bias gradient out of the convolution's kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x or need_w:
            grad_out = grad_out.contiguous(memory_format=torch.channels_last)
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(grad_out, x, weight, None, stride, padding,
                                                                    dilation, False, [0, 0], groups,
                                                                    [need_x, need_w, False])
        if need_b:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d``; in CPU float32 training, 3x3 convolutions by Winograd's algorithm where
    :func:`~.fused_cpu.winograd_applies`, other channels-last ones with a bias through
    :class:`_SummedBiasConv`."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if (isinstance(padding, str) or x.dim() != 4 or not torch.is_grad_enabled()
            or not any(t.requires_grad for t in tensors) or not eager_cpu_float32(*tensors)):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    geometry = (_pair(stride), _pair(padding), _pair(dilation), groups)
    if fused_cpu.winograd_applies(x, weight, *geometry):
        return fused_cpu.winograd_conv2d(x, weight, bias)
    if bias is not None and x.is_contiguous(memory_format=torch.channels_last):
        return _SummedBiasConv.apply(x, weight, bias, *geometry)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose zero-padded convolutions go through :func:`conv2d`."""

    def _conv_forward(self, x, weight, bias):
        if self.padding_mode != 'zeros':
            return super()._conv_forward(x, weight, bias)
        return conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def use_cpu_training_conv(module):
    """Switch every plain ``nn.Conv2d`` in ``module`` (not subclasses: they may have their own
    forward) to :class:`Conv2d`, in place; returns ``module``."""
    for child in module.modules():
        if type(child) is nn.Conv2d:
            child.__class__ = Conv2d
    return module
