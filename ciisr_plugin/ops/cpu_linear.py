"""Dense layers of the implicit decoders, routed to oneDNN on CPU.

Almost all of an implicit decoder's arithmetic is ``(M, 256) x (256, 256)`` matrix
products over millions of query rows. On CPU, ``F.linear`` in float32 goes to MKL's
sgemm, which on AMD processors runs well below the AVX-512 peak (measured on a 2-core AMD
machine: ~200 GFLOP/s, vs ~490 for oneDNN's kernel on the same shapes); on Intel Xeons
the two are on par (measured end to end on a 2-core Xeon: equal within noise). Compare on
your machine by running ``benchmarks/bench_speed.py`` with and without
``CIISR_CPU_LINEAR=native``. oneDNN's kernel is IEEE float32 (no reduced precision), so
results agree with ``F.linear`` to rounding (~1e-7 relative). Its ReLU is fused into the
product, which saves a pass over each (M, 256) activation.

:func:`linear` uses oneDNN where it can and ``F.linear`` everywhere else: other devices,
tracing or export, and builds without oneDNN. In a bf16 ``torch.autocast`` region it
runs the product autocast would (bf16 inputs and weights, on oneDNN too) with the ReLU
fused. Gradients flow through a small autograd function whose
backward products also run on oneDNN. ``CIISR_CPU_LINEAR=native`` (or
:func:`set_enabled`) turns the route off, e.g. to compare.
"""
import os
import platform

import torch
import torch.nn.functional as F

_ENABLED = os.environ.get('CIISR_CPU_LINEAR', 'onednn').lower() != 'native'
_AVAILABLE = {}  # dtype -> whether oneDNN runs it here, probed on first use


def set_enabled(enabled):
    """Route CPU float32 linears through oneDNN (True, the default) or ``F.linear`` (False)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def _probe(dtype):
    """oneDNN's linear exists in this build, runs ``dtype`` on this CPU and agrees with F.linear
    on a small case. bf16 needs AVX512-BF16 or AMX: on an AVX2-only CPU oneDNN has no bf16
    inner product at all (it raises), and autocast's own F.linear is used instead."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=gen) for s in ((5, 7), (3, 7), (3, )))
        with torch.no_grad(), torch.autocast('cpu', enabled=False):  # may be first called in a bf16 region
            expected = F.linear(x, w, b).relu()
            out = _onednn(x.to(dtype), w.to(dtype), b.to(dtype), True)
            return bool(torch.allclose(out.float(), expected, atol=1e-5 if dtype == torch.float32 else 0.1))
    except (AttributeError, RuntimeError):
        return False


def exporting():
    """Inside a trace, a script or an ONNX export, where only plain ops should be recorded."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def eager_cpu_float32(*tensors):
    """All ``tensors`` are CPU float32 and ops run eagerly as written: no autocast, not tracing /
    exporting / compiling. Where the CPU ops with their own backward may replace torch's."""
    if exporting() or torch.compiler.is_compiling() or torch.is_autocast_enabled('cpu'):
        return False
    return all(t.device.type == 'cpu' and t.dtype == torch.float32 for t in tensors)


def _compute_dtype(x, weight):
    """The dtype oneDNN should compute in here, or None to use ``F.linear``."""
    if not (_ENABLED and x.device.type == 'cpu' and weight.dtype == torch.float32):
        return None
    if exporting() or torch.compiler.is_compiling():
        return None
    if torch.is_autocast_enabled('cpu'):
        # bf16 autocast (inference): the same product autocast would run, with the ReLU fused
        dtype = torch.bfloat16 if torch.get_autocast_dtype('cpu') == torch.bfloat16 else None
    else:
        dtype = torch.float32 if x.dtype == torch.float32 else None
    if dtype is None:
        return None
    return dtype if onednn_runs(dtype) else None


def onednn_runs(dtype):
    """Whether oneDNN's linear runs ``dtype`` on this CPU (probed once per dtype)."""
    if dtype not in _AVAILABLE:
        _AVAILABLE[dtype] = _probe(dtype)
    return _AVAILABLE[dtype]


def _onednn(x, weight, bias, relu):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'relu' if relu else 'none', [], '')


# rows per line of the channels-last image :func:`weight_gradient` views its operands as
_GRAD_ROW_WIDTH = 64
# measured on x86 only; elsewhere oneDNN's convolutions may not be the fast kernels
_CONV_WEIGHT_GRADIENT = platform.machine().lower() in ('x86_64', 'amd64')


def weight_gradient(grad_out, x):
    """``grad_out.T @ x`` (out, in) for contiguous (M, out) and (M, in) rows: a layer's weight
    gradient, summed over millions of query rows.

    ``grad_out.t().mm(x)`` goes to MKL, which runs this shape at half oneDNN's speed on AMD
    (2 cores, M = 147456, 256 x 256: 106 ms vs 54 ms this way on an AVX-512 EPYC; 109 vs 97 ms
    with it capped at AVX2). oneDNN has no transposed product to call from torch, but a 1x1
    convolution's weight gradient is the same sum, and its backward-weights kernel reads the
    rows where they lie: each operand is viewed, uncopied, as a channels-last (1, C, M / w, w)
    image. Rows past the last full line of that image are added with one small product."""
    m, width = grad_out.shape[0], _GRAD_ROW_WIDTH
    lines = m // width
    if lines == 0 or not _CONV_WEIGHT_GRADIENT:
        return grad_out.t().mm(x)
    full = lines * width

    def image(rows):
        return rows[:full].contiguous().view(1, lines, width, rows.shape[1]).permute(0, 3, 1, 2)

    kernel = x.new_empty(grad_out.shape[1], x.shape[1], 1, 1)  # only its shape is read
    grad_w = torch.ops.aten.convolution_backward(image(grad_out), image(x), kernel, None, [1, 1], [0, 0], [1, 1],
                                                 False, [0, 0], 1, [False, True, False])[1]
    grad_w = grad_w.view(grad_out.shape[1], x.shape[1])
    return grad_w.addmm_(grad_out[full:].t(), x[full:]) if full < m else grad_w


class _OneDNNLinear(torch.autograd.Function):
    """``relu?(x @ weight.T + bias)`` with forward and backward products on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias, relu):
        out = _onednn(x, weight, bias, relu)
        ctx.relu = relu
        ctx.save_for_backward(x, weight, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, out = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if ctx.relu:  # what ReLU's own backward runs (a boolean-mask product is ~2x slower)
            grad_out = torch.ops.aten.threshold_backward(grad_out, out, 0)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad_out, weight.t().contiguous(), None, False)
        if ctx.needs_input_grad[1]:
            grad_w = weight_gradient(grad_out, x)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b, None


def linear(x, weight, bias=None, relu=False):
    """``F.linear(x, weight, bias)``, then ReLU if ``relu``; x is (M, in)."""
    dtype = _compute_dtype(x, weight) if x.dim() == 2 else None
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if dtype == torch.float32:
        x = x.contiguous()
        return _OneDNNLinear.apply(x, weight, bias, relu) if needs_grad else _onednn(x, weight, bias, relu)
    if dtype == torch.bfloat16 and not needs_grad:
        with torch.autocast('cpu', enabled=False):
            return _onednn(x.to(dtype).contiguous(), weight.to(dtype), None if bias is None else bias.to(dtype), relu)
    out = F.linear(x, weight, bias)
    return out.relu_() if relu else out
