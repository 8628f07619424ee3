"""Fused CPU kernels for the decoders' inference, compiled for this machine at first use.

Between and around its big matrix products, an implicit decoder in torch makes passes over
(M, width) activations that plain ops cannot fuse: gathering the latent rows, adding the
query's coordinate part, a ReLU, and writing every layer's output to memory and reading it
back; A-LIIF's ten 16-wide basis MLPs are tiny products on wide outer products
(memory-bound in torch, measured ~1 s of a 128 -> x4 upscale on 2 cores). ``fused_cpu.c``
runs each decoder from the latent row table to its output in one kernel, a block of rows
at a time, with the activations in L1:

* :class:`MLPKernel` - an MLP whose first layer's latent part was precomputed on the LR
  grid (LIIF, both LIIF-GAN decoders, A-LIIF's expansion net), or an MLP on LTE's Fourier
  feature, formed per row in the kernel (:meth:`MLPKernel.fourier`);
* :class:`BasisKernel` - A-LIIF's bases, mixed per query.

The C source is compiled with the system C compiler (``$CC``, else ``cc``) for this CPU
(``-march=native``) and cached under ``$CIISR_KERNEL_CACHE`` (default
``~/.cache/ciisr/kernels``), keyed by source, options, compiler and CPU. Each library is
checked against torch on small cases before use. Where no compiler works, a warning
says so once and the ops of :mod:`.query_decode` run their plain torch path - the same
numbers (to float rounding, ~1e-7 relative), slower. Archs never call these kernels directly:
they call :mod:`.query_decode`, which picks.

The decoders use them in inference: float32 on CPU, autograd off, not tracing / exporting /
compiling, no autocast. Training uses two, under the same conditions with autograd on:
:func:`fourier_feature` (LTE's feature with its own backward) and :func:`winograd_conv2d`
(3x3 convolutions, forward and backward, by Winograd's F(4x4, 3x3); :mod:`.cpu_conv` routes
the encoders' convolutions to it). ``CIISR_FUSED_CPU=off`` (or :func:`set_enabled`) turns
them all off, e.g. to compare.
"""
import concurrent.futures
import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import weakref

import torch
import torch.nn.functional as F

from .cpu_linear import eager_cpu_float32

logger = logging.getLogger('ciisr')

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fused_cpu.c')
_X86 = platform.machine().lower() in ('x86_64', 'amd64', 'i386', 'i686')
# x86 compilers default to 256-bit vectors even on AVX-512 CPUs; other compilers reject the option
_FLAGS = ('-O3', '-march=native', *(('-mprefer-vector-width=512', ) if _X86 else ()), '-std=gnu11', '-shared', '-fPIC')
_LIBS = ('-lm', )  # sinf / cosf for the Fourier feature's rare huge angles
_ENABLED = os.environ.get('CIISR_FUSED_CPU', 'on').lower() not in ('off', '0', 'false', 'no')
_LIBRARIES = {}  # defines -> ctypes library, or None when it could not be built / failed its check
_LOCK = threading.Lock()
_WARNED = False
# rows below which splitting one call across threads costs more than it saves
_ROWS_PER_THREAD = 4096
_POOL = None
_KERNELS = weakref.WeakKeyDictionary()  # module -> {name: (parameter versions, packed kernel)}


class KernelError(RuntimeError):
    pass


def set_enabled(enabled):
    """Use the fused kernels where they apply (True, the default) or never (False)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def applies(*tensors):
    """The fused kernels may run on these tensors here: inference on CPU in float32."""
    if torch.is_grad_enabled():
        return False
    return applies_with_autograd(*tensors) and not any(t.requires_grad for t in tensors)


def applies_with_autograd(*tensors):
    """The ops that carry their own backward (:func:`fourier_feature`) may run on these
    tensors here: CPU float32, no autocast, not tracing / exporting / compiling."""
    return _ENABLED and eager_cpu_float32(*tensors)


# ----------------------------------------------------------------------------------------------
# building
def cache_dir():
    root = os.environ.get('CIISR_KERNEL_CACHE')
    if not root:
        root = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'ciisr', 'kernels')
    return root


def _cpu_signature():
    """What -march=native compiles for: a library built on another CPU may not run here."""
    text = platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'model name', 'Features')):
                    text += line
                    if line.startswith(('flags', 'Features')):
                        break
    except OSError:
        text += platform.processor()
    return text


def compiler():
    """The C compiler the kernels are built with: ``$CC``, else cc, gcc or clang on PATH; None if none."""
    return os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc') or shutil.which('clang')


def _compile(defines):
    """Path of the shared library for ``defines`` (compiled now unless cached)."""
    cc = compiler()
    if not cc:
        raise KernelError('no C compiler found (set CC, or install gcc)')
    with open(_SOURCE) as f:
        source = f.read()
    header = ''.join(f'#define {name} {value}\n' for name, value in defines)
    key = hashlib.sha256('\0'.join([header, source, cc, ' '.join(_FLAGS + _LIBS), _cpu_signature()
                                    ]).encode()).hexdigest()[:20]
    root = cache_dir()
    try:
        os.makedirs(root, exist_ok=True)
    except OSError:
        user = os.getuid() if hasattr(os, 'getuid') else os.environ.get('USERNAME', 'user')  # no getuid on Windows
        root = os.path.join(tempfile.gettempdir(), f'ciisr-kernels-{user}')
        os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f'fused_cpu_{key}.so')
    if os.path.exists(path):
        return path
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        c_file = os.path.join(tmp, 'fused_cpu.c')
        with open(c_file, 'w') as f:
            f.write(header + source)
        built = os.path.join(tmp, 'fused_cpu.so')
        start = time.perf_counter()
        result = subprocess.run([cc, *_FLAGS, '-o', built, c_file, *_LIBS], capture_output=True, text=True)
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ['(no message)'])[0]
            raise KernelError(f'{cc} failed on fused_cpu.c: {first}')
        os.replace(built, path)  # atomic: a concurrent build of the same key just replaces it
    logger.info('compiled fused CPU kernels in %.1f s: %s', time.perf_counter() - start, path)
    return path


def _load(path):
    lib = ctypes.CDLL(path)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ciisr_kernels.argtypes = []
    lib.ciisr_kernels.restype = ctypes.c_int
    if hasattr(lib, 'ciisr_mlp_decode'):
        lib.ciisr_mlp_decode.argtypes = [i64, i64, ctypes.c_int, ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, i64,
                                         ptr]
        lib.ciisr_mlp_decode.restype = ctypes.c_int
        lib.ciisr_fourier_mlp_decode.argtypes = [i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr,
                                                 ptr, i64, ptr]
        lib.ciisr_fourier_mlp_decode.restype = ctypes.c_int
        lib.ciisr_fourier_feature.argtypes = [i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr]
        lib.ciisr_fourier_feature.restype = ctypes.c_int
        lib.ciisr_queries_by_latent.argtypes = [i64, ptr, i64, ptr, ptr]
        lib.ciisr_queries_by_latent.restype = ctypes.c_int
        lib.ciisr_fourier_feature_backward.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                                       ptr, ptr, ptr]
        lib.ciisr_fourier_feature_backward.restype = None
    if hasattr(lib, 'ciisr_winograd_conv'):
        lib.ciisr_winograd_vector.restype = lib.ciisr_winograd_rows.restype = ctypes.c_int
        lib.ciisr_winograd_conv.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64]
        lib.ciisr_winograd_conv.restype = ctypes.c_int
        lib.ciisr_winograd_weight_grad.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, i64, i64]
        lib.ciisr_winograd_weight_grad.restype = ctypes.c_int
    if hasattr(lib, 'ciisr_basis_decode'):
        lib.ciisr_basis_decode.argtypes = [i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
        lib.ciisr_basis_decode.restype = ctypes.c_int
    return lib


def _self_check(lib):
    """The MLP kernel agrees with torch on small random cases, both of its code paths (the
    papers' 256-wide layers; odd widths, in 32- and 16-wide panels), over full blocks of
    rows and a remainder: a wrong build, ABI or compiler bug shows here, not in an image."""
    if not hasattr(lib, 'ciisr_mlp_decode'):
        return
    gen = torch.Generator().manual_seed(0)
    for widths in ((256, 256, 3), (37, 20, 33, 5)):
        layers = [(torch.randn(d_out, d_in, generator=gen) / d_in**0.5, torch.randn(d_out, generator=gen), True)
                  for d_in, d_out in zip(widths[:-1], widths[1:])]
        layers[-1] = layers[-1][:2] + (False, )
        kernel = MLPKernel(layers)
        rows, e = 31, 4  # several blocks and a remainder for each block size fused_cpu.c picks (14, 6)
        table, extra = torch.randn(5, widths[0], generator=gen), torch.randn(rows, e, generator=gen)
        first_weight, index = torch.randn(widths[0], e, generator=gen), torch.randint(0, 5, (rows, ), generator=gen)
        out = kernel.launch(lib, table, index, extra, first_weight, True)
        expected = kernel.reference(table, index, extra, first_weight, True)
        if not torch.allclose(out, expected, rtol=1e-5, atol=1e-5):
            raise KernelError('the compiled MLP kernel disagrees with torch on a test case')
    out, expected = fourier_case(lib, seed=1)
    if not torch.allclose(out, expected, rtol=1e-4, atol=1e-4):
        raise KernelError('the compiled Fourier-feature kernel disagrees with torch on a test case')
    for got, want in zip(*fourier_training_case(lib, seed=2)):
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise KernelError('the compiled Fourier-feature training op disagrees with torch on a test case')
    if hasattr(lib, 'ciisr_winograd_conv'):
        for got, want in zip(*winograd_case(lib, seed=3)):
            if not torch.allclose(got, want.float(), rtol=0, atol=1e-4 * want.abs().max().item()):
                raise KernelError('the compiled Winograd convolution disagrees with torch on a test case')


def winograd_case(lib, seed, n=2, channels=(2, 3), size=(9, 6), bias=True):
    """``([output, grad_x, grad_w, grad_b] of the Winograd op, the same from float64
    F.conv2d)`` for a random 3x3 convolution and output gradient; ``channels`` in vectors of
    this build (by default 3 output vectors: a last register tile of one vector; input
    channels not whole blocks of rows), ``size`` not whole 4x4 tiles."""
    gen = torch.Generator().manual_seed(seed)
    vec = lib.ciisr_winograd_vector()
    cin, cout = channels[0] * vec, channels[1] * vec
    x = torch.randn(n, cin, *size, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 3, 3, generator=gen) / (3 * cin**0.5)
    b = torch.randn(cout, generator=gen) if bias else None
    grad = torch.randn(n, cout, *size, generator=gen)
    results = []
    for conv, dtype in ((lambda *t: _WinogradConv.apply(lib, *t), torch.float32),
                        (lambda *t: F.conv2d(*t, padding=1), torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (x, weight, *(() if b is None else (b, )))]
        with torch.enable_grad():
            out = conv(*leaves, *(() if b is not None else (None, )))
            results.append([out.detach(), *torch.autograd.grad(out, leaves, grad.to(dtype))])
    return results


def _fourier_inputs(gen, half, rows, latents=5):
    """Random Fourier-feature inputs (tables, index, rel, cell, phase_weight): angles in every
    quadrant and, in the first row, angles beyond the polynomial's range (the libm branch),
    formed exactly (d = (1, 0), no cell) so that the kernel and torch round the same float
    angle; latent 0 is read by row 0 alone."""
    tables = (torch.randn(latents, 2 * half, generator=gen), 20 * torch.randn(latents, half, generator=gen),
              20 * torch.randn(latents, half, generator=gen))
    rel, cell = 2 * torch.rand(rows, 2, generator=gen) - 1, torch.rand(rows, 2, generator=gen) / 4
    phase_weight, index = torch.randn(half, 2, generator=gen), torch.randint(1, latents, (rows, ), generator=gen)
    tables[1][0, :3] = torch.tensor([9000.5, -2e5, 3e7])
    index[0], rel[0], cell[0] = 0, torch.tensor([1.0, 0.0]), 0.0
    return tables, index, rel, cell, phase_weight


def reference_fourier_feature(tables, index, rel_coord, rel_cell, phase_weight):
    """LTE's Fourier feature of ``tables`` read at ``index``, in plain torch (what the kernels
    form; :func:`.query_decode.fourier_feature` is the decoders' own torch path)."""
    coef, freq_y, freq_x = (t[index] for t in tables)
    angle = math.pi * (freq_y * rel_coord[:, :1] + freq_x * rel_coord[:, 1:] + rel_cell @ phase_weight.t())
    return coef * torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)


def fourier_case(lib, seed, half=10, rows=31):
    """(kernel output, torch's) for a random MLP on random Fourier features (see
    :func:`_fourier_inputs`); by default a partial last vector (half = 10)."""
    gen = torch.Generator().manual_seed(seed)
    layers = [(torch.randn(16, 2 * half, generator=gen) / half**0.5, torch.randn(16, generator=gen), True),
              (torch.randn(3, 16, generator=gen) / 4, torch.randn(3, generator=gen), False)]
    inputs = _fourier_inputs(gen, half, rows)
    kernel = MLPKernel(layers)
    return kernel.launch_fourier(lib, *inputs), kernel.reference_fourier(*inputs)


def fourier_training_case(lib, seed, half=10, rows=31, latents=5):
    """``([feature, grad_coef, grad_fy, grad_fx, grad_phase] from the training op,
    the same from torch's autograd)`` on random inputs (see :func:`_fourier_inputs`) and a
    random output gradient; one latent that no query reads (its gradient: zeros)."""
    gen = torch.Generator().manual_seed(seed)
    tables, index, rel, cell, phase_weight = _fourier_inputs(gen, half, rows, latents + 1)
    index[index == latents] = 1
    grad = torch.randn(rows, 2 * half, generator=gen)
    results = []
    for feature in (lambda t, *args: _FourierFeature.apply(lib, *t, *args), reference_fourier_feature):
        leaves = [t.clone().requires_grad_() for t in (*tables, phase_weight)]
        with torch.enable_grad():
            out = feature(tuple(leaves[:3]), index, rel, cell, leaves[3])
            results.append([out.detach(), *torch.autograd.grad(out, leaves, grad)])
    return results


def library(defines=(), check=None):
    """The compiled kernels for ``defines`` (a tuple of (name, value)), or None if unavailable.
    ``check(lib)`` (raising :class:`KernelError`) vets the kernels these defines configure,
    once, when they are built; the MLP kernel is always checked."""
    global _WARNED
    defines = tuple(defines)
    lib = _LIBRARIES.get(defines, False)
    if lib is not False:
        return lib
    with _LOCK:
        if defines not in _LIBRARIES:
            try:
                path = _compile(defines)
                try:
                    lib = _load(path)
                except (OSError, AttributeError) as exc:
                    raise KernelError(f'cannot load {path} ({exc}); delete it to rebuild') from exc
                _self_check(lib)
                if check is not None:
                    check(lib)
            except (KernelError, OSError) as exc:
                lib = None
                if not _WARNED:
                    _WARNED = True
                    logger.warning('fused CPU kernels unavailable (%s): decoding runs on plain torch ops, the same '
                                   'numbers, slower. CIISR_FUSED_CPU=off silences this.', exc)
            _LIBRARIES[defines] = lib
    return _LIBRARIES[defines]


# ----------------------------------------------------------------------------------------------
# calling
def kernels_built():
    """The kernels this CPU gets: ``{'mlp', 'winograd', 'basis'}`` on AVX-512, ``{'mlp',
    'winograd'}`` on AVX2, else none (see ``fused_cpu.c``: each is built only where it was
    measured faster than torch)."""
    lib = library()
    if lib is None:
        return set()
    flags = lib.ciisr_kernels()
    built = {name for bit, name in ((1, 'mlp'), (2, 'basis')) if flags & bit}
    return built | ({'winograd'} if hasattr(lib, 'ciisr_winograd_conv') else set())


def _parts(m):
    """Into how many parts ``m`` rows are split across the intra-op threads (the kernels are
    single-threaded; inside ``decode_in_order`` there is one thread)."""
    return max(1, min(torch.get_num_threads(), m // _ROWS_PER_THREAD))


def _in_parallel(bounds, run):
    """``[run(bounds[i], bounds[i + 1]) for i]``, the parts on a thread pool when several."""
    global _POOL
    if len(bounds) <= 2:
        return [run(bounds[0], bounds[-1])]
    if _POOL is None:
        with _LOCK:
            if _POOL is None:
                _POOL = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix='ciisr-fused')
    return list(_POOL.map(lambda i: run(bounds[i], bounds[i + 1]), range(len(bounds) - 1)))


def _split_rows(m, run):
    """``run(start, stop)`` over the rows, on the intra-op threads when there are enough rows."""
    parts = _parts(m)
    return _in_parallel([m * i // parts for i in range(parts + 1)], run)


def _check_shapes(what, ok, **tensors):
    """The C code trusts its shapes: a mismatch must stop here, not read past a tensor."""
    if not ok:
        shapes = ', '.join(f'{name} {tuple(t.shape)} {t.dtype}' for name, t in tensors.items())
        raise ValueError(f'{what}: inconsistent inputs: {shapes}')


def _check(codes, what):
    if 2 in codes:
        raise MemoryError(f'{what}: cannot allocate the activation buffers')
    if any(codes):
        raise IndexError(f'{what}: a query index is outside the latent table')


def cached_kernel(owner, name, params, build):
    """``build()``'s packed kernel for ``owner`` (a module), kept until a tensor of ``params``
    changes (in place, as an optimiser step does, or replaced). Outside the module, so that
    pickling or copying it never meets a ctypes pointer."""
    key = tuple((p.data_ptr(), p._version) for p in params)
    kernels = _KERNELS.setdefault(owner, {})
    if name not in kernels or kernels[name][0] != key:
        kernels[name] = key, build()
    return kernels[name][1]


def _aligned(t):
    """``t`` as a contiguous float32 copy whose data starts on a 64-byte boundary (the
    kernels' aligned vector loads)."""
    flat = t.detach().float().reshape(-1)
    buf = torch.empty(flat.numel() + 16)
    start = (-buf.data_ptr() // 4) % 16
    out = buf[start:start + flat.numel()]
    out.copy_(flat)
    return out.view(t.shape)


def _padded(n):
    return -(-n // 16) * 16


class MLPKernel:
    """An MLP's layers after its first, packed for ``ciisr_mlp_decode``.

    ``layers`` is ``[(weight (out, in), bias (out,) or None, relu), ...]`` in order. Each
    weight is cut into panels of 32 output columns (the last 16 wide when the padded width
    is an odd number of vectors), each stored ``(in, panel width)``; output columns are
    zero-padded to whole 16-float vectors.
    """

    def __init__(self, layers):
        self.layers = [(w.detach(), None if b is None else b.detach(), bool(relu)) for w, b, relu in layers]
        self.widths = [layers[0][0].shape[1]] + [w.shape[0] for w, _, _ in layers] if layers else None
        self.weights, self.biases = [], []
        for weight, bias, _ in self.layers:
            d_out, d_in = weight.shape
            padded = weight.new_zeros(_padded(d_out), d_in)
            padded[:d_out] = weight
            self.weights.append(_aligned(torch.cat([padded[c:c + 32].t().reshape(-1)
                                                    for c in range(0, padded.shape[0], 32)])))
            padded_bias = weight.new_zeros(_padded(d_out))
            if bias is not None:
                padded_bias[:d_out] = bias
            self.biases.append(_aligned(padded_bias))
        count = max(1, len(self.layers))
        self._weight_ptrs = (ctypes.c_void_p * count)(*[w.data_ptr() for w in self.weights])
        self._bias_ptrs = (ctypes.c_void_p * count)(*[b.data_ptr() for b in self.biases])
        self._relus = (ctypes.c_int * count)(*[int(relu) for _, _, relu in self.layers])

    def reference(self, table, index, extra, first_weight, first_relu):
        """What the kernel computes, in plain torch."""
        h = table[index] + extra @ first_weight.t()
        return self._layers_reference(h.relu() if first_relu else h)

    def reference_fourier(self, tables, index, rel_coord, rel_cell, phase_weight):
        """What :meth:`fourier` computes, in plain torch."""
        return self._layers_reference(reference_fourier_feature(tables, index, rel_coord, rel_cell, phase_weight))

    def _layers_reference(self, h):
        """The packed layers on ``h``, in plain torch."""
        for weight, bias, relu in self.layers:
            h = F.linear(h, weight, bias)
            h = h.relu() if relu else h
        return h

    def fourier(self, tables, index, rel_coord, rel_cell, phase_weight):
        """(M, out): the MLP (all its layers packed here) on LTE's Fourier feature
        ``c * [cos(pi a), sin(pi a)]``, ``a = f_y d_y + f_x d_x + phase_weight @ rel_cell``, of
        ``tables`` = (coefficient (N, 2H), f_y (N, H), f_x (N, H)) read at ``index`` (M,), the
        relative coordinates ``rel_coord`` (M, 2) and cells ``rel_cell`` (M, 2), ``phase_weight``
        (H, 2); None where the kernels are not available."""
        lib = library()
        if lib is None or not hasattr(lib, 'ciisr_fourier_mlp_decode'):
            return None
        return self.launch_fourier(lib, tables, index, rel_coord, rel_cell, phase_weight)

    def launch_fourier(self, lib, tables, index, rel_coord, rel_cell, phase_weight):
        coef, freq_y, freq_x = (t.contiguous() for t in tables)
        index, rel_coord, rel_cell = index.contiguous(), rel_coord.float().contiguous(), rel_cell.float().contiguous()
        phase_t = phase_weight.detach().t().float().contiguous()
        n, half, m = freq_y.shape[0], freq_y.shape[1], index.shape[0]
        _check_shapes('fourier_mlp_decode', self.widths is not None and self.widths[0] == 2 * half
                      and coef.shape == (n, 2 * half) and freq_x.shape == (n, half) and phase_t.shape == (2, half)
                      and rel_coord.shape == (m, 2) and rel_cell.shape == (m, 2) and index.dtype == torch.int64
                      and all(t.dtype == torch.float32 for t in (coef, freq_y, freq_x)), coefficient=coef,
                      frequency_y=freq_y, frequency_x=freq_x, index=index, rel_coord=rel_coord, rel_cell=rel_cell,
                      phase_weight=phase_weight)
        widths_t = torch.tensor(self.widths, dtype=torch.int64)
        stride = max(_padded(w) for w in self.widths)
        out = torch.empty(m, self.widths[-1])

        def run(a, b):
            return lib.ciisr_fourier_mlp_decode(b - a, half, coef.data_ptr(), freq_y.data_ptr(), freq_x.data_ptr(),
                                                n, index[a:].data_ptr(), rel_coord[a:].data_ptr(),
                                                rel_cell[a:].data_ptr(), phase_t.data_ptr(), len(self.layers),
                                                widths_t.data_ptr(), self._relus, self._weight_ptrs,
                                                self._bias_ptrs, stride, out[a:].data_ptr())

        _check(_split_rows(m, run), 'fourier_mlp_decode')
        return out

    def __call__(self, table, index, extra, first_weight, first_relu):
        """(M, out): the MLP on ``table[index] + extra @ first_weight.T`` (ReLU'd if
        ``first_relu``), ``table`` (N, D) the first layer's latent part, ``index`` (M,) int64,
        ``extra`` (M, E) the query inputs, ``first_weight`` (D, E) their columns of the first
        layer; None where the kernels are not available."""
        lib = library()
        if lib is None or not hasattr(lib, 'ciisr_mlp_decode'):
            return None
        return self.launch(lib, table, index, extra, first_weight, first_relu)

    def launch(self, lib, table, index, extra, first_weight, first_relu):
        table, index, extra = table.contiguous(), index.contiguous(), extra.float().contiguous()
        weight_t = first_weight.detach().t().float().contiguous()
        (n, d), (m, e) = table.shape, extra.shape
        widths = self.widths or [d]  # no later layer: the first is the output
        _check_shapes('mlp_decode', widths[0] == d and weight_t.shape == (e, d) and index.shape == (m, )
                      and index.dtype == torch.int64 and table.dtype == torch.float32, table=table, index=index,
                      extra=extra, first_weight=first_weight)
        widths_t = torch.tensor(widths, dtype=torch.int64)
        stride = max(_padded(w) for w in widths)  # floats per row of the kernel's activation buffers
        out = torch.empty(m, widths[-1])

        def run(a, b):
            return lib.ciisr_mlp_decode(b - a, e, int(bool(first_relu)), table.data_ptr(), n, index[a:].data_ptr(),
                                        extra[a:].data_ptr(), weight_t.data_ptr(), len(self.layers),
                                        widths_t.data_ptr(), self._relus, self._weight_ptrs, self._bias_ptrs, stride,
                                        out[a:].data_ptr())

        _check(_split_rows(m, run), 'mlp_decode')
        return out


class BasisKernel:
    """A-LIIF's basis MLPs for the fused kernel: compile-time dimensions, packed weights.

    ``layers`` is ``[(weight_i, bias_i), ...]`` for the layers after the first, each weight
    ``(K, d_out, d_in)`` and bias ``(K, d_out)``; ``first_width`` the first layer's width.
    """

    def __init__(self, num_basis, first_width, layers, extra_channels):
        dims = [first_width] + [w.shape[1] for w, _ in layers]
        vectors = [_padded(d) // 16 for d in dims[1:]]
        calls, buffers = [], ('ha', 'hb')
        for i, (d_in, nv) in enumerate(zip(dims[:-1], vectors)):
            relu = int(i < len(layers) - 1)
            calls.append(f'mixed_layer(nr, {d_in}, {nv}, {relu}, c, {buffers[i % 2]}, {buffers[1 - i % 2]}, '
                         f'ws[{i}], bs[{i}]);')
        self.defines = (('BASIS_K', num_basis), ('BASIS_E', extra_channels), ('BASIS_H0', first_width),
                        ('BASIS_OUT', dims[-1]), ('BASIS_STRIDE', max(_padded(d) for d in dims)),
                        ('BASIS_LAYERS(nr)', ' '.join(calls)), ('BASIS_RESULT', buffers[len(layers) % 2]))
        self.num_basis, self.first_width, self.extra_channels, self.dims = num_basis, first_width, extra_channels, dims
        self.out_channels = dims[-1]
        self.layers = [(weight.detach(), bias.detach()) for weight, bias in layers]
        self.weights, self.biases = [], []
        for (weight, bias), nv in zip(self.layers, vectors):
            k, d_out, d_in = weight.shape
            packed = weight.new_zeros(k, d_in, nv * 16)
            packed[:, :, :d_out] = weight.transpose(1, 2)
            padded_bias = bias.new_zeros(k, nv * 16)
            padded_bias[:, :d_out] = bias
            self.weights.append(packed.float().contiguous())
            self.biases.append(padded_bias.float().contiguous())
        self._weight_ptrs = (ctypes.c_void_p * len(layers))(*[w.data_ptr() for w in self.weights])
        self._bias_ptrs = (ctypes.c_void_p * len(layers))(*[b.data_ptr() for b in self.biases])

    def available(self):
        """Whether this CPU gets the kernel and it compiled and passed its check (both happen on
        the first call)."""
        return self._library() is not None

    def _library(self):
        # not built for this CPU: no library for these defines is compiled at all
        return library(self.defines, check=self._self_check) if 'basis' in kernels_built() else None

    def _self_check(self, lib):
        """This build against :meth:`reference` on random bases of the same sizes, over a full
        block of rows and a remainder (the kernel's two code paths)."""
        gen = torch.Generator().manual_seed(0)
        k, width, e = self.num_basis, self.first_width, self.extra_channels
        layers = [(torch.randn(k, d_out, d_in, generator=gen) / d_in**0.5, torch.randn(k, d_out, generator=gen))
                  for d_in, d_out in zip(self.dims[:-1], self.dims[1:])]
        probe = BasisKernel(k, width, layers, e)
        rows = 2 * 16 + 3
        table, extra = torch.randn(5, k * width, generator=gen), torch.randn(rows, e, generator=gen)
        first_weight, coeff = torch.randn(k * width, e, generator=gen), torch.randn(rows, k, generator=gen)
        coeff = coeff / coeff.norm(dim=1, keepdim=True)  # as A-LIIF mixes: values stay O(1)
        index = torch.randint(0, 5, (rows, ), generator=gen)
        out = probe.launch(lib, table, index, extra, first_weight, coeff)
        expected = probe.reference(table, index, extra, first_weight, coeff)
        if out is None or not torch.allclose(out, expected, rtol=1e-5, atol=1e-5):
            raise KernelError('the compiled basis kernel disagrees with torch on a test case')

    def reference(self, table, index, extra, first_weight, coeff):
        """What the kernel computes, in plain torch."""
        k, width = self.num_basis, self.first_width
        pre = (table[index] + extra @ first_weight.t()).view(-1, k, width)
        h = (coeff.unsqueeze(-1) * pre).sum(1).relu()
        for i, (weight, bias) in enumerate(self.layers):
            h = torch.einsum('mk,kod,md->mo', coeff, weight, h) + coeff @ bias
            h = h.relu() if i < len(self.layers) - 1 else h
        return h

    def __call__(self, table, index, extra, first_weight, coeff):
        """(M, out): the bases decoded from their first-layer latent parts ``table`` (N, K * H0)
        read at ``index``, query inputs ``extra`` (M, E) through ``first_weight`` (K * H0, E),
        mixed by ``coeff`` (M, K); None where the kernels are not available."""
        lib = self._library()
        return None if lib is None else self.launch(lib, table, index, extra, first_weight, coeff)

    def launch(self, lib, table, index, extra, first_weight, coeff):
        table, index, extra = table.contiguous(), index.contiguous(), extra.float().contiguous()
        coeff = coeff.float().contiguous()
        weight_t = first_weight.detach().t().float().contiguous()
        n, m = table.shape[0], extra.shape[0]
        k, width, e = self.num_basis, self.first_width, self.extra_channels
        _check_shapes('basis_decode', table.shape[1] == k * width and weight_t.shape == (e, k * width)
                      and extra.shape == (m, e) and coeff.shape == (m, k) and index.shape == (m, )
                      and index.dtype == torch.int64, table=table, index=index, extra=extra,
                      first_weight=first_weight, coeff=coeff)
        out = torch.empty(m, self.out_channels)

        def run(a, b):
            return lib.ciisr_basis_decode(b - a, table.data_ptr(), n, index[a:].data_ptr(), extra[a:].data_ptr(),
                                          weight_t.data_ptr(), coeff[a:].data_ptr(), self._weight_ptrs,
                                          self._bias_ptrs, out[a:].data_ptr())

        _check(_split_rows(m, run), 'basis_decode')
        return out


# ----------------------------------------------------------------------------------------------
# training
class _FourierFeature(torch.autograd.Function):
    """LTE's Fourier feature with forward and backward in ``fused_cpu.c`` (see
    :func:`fourier_feature`)."""

    @staticmethod
    def forward(ctx, lib, coef, freq_y, freq_x, index, rel_coord, rel_cell, phase_weight):
        coef, freq_y, freq_x, index = (t.contiguous() for t in (coef, freq_y, freq_x, index))
        rel_coord, rel_cell = rel_coord.contiguous(), rel_cell.contiguous()
        phase_t = phase_weight.detach().t().contiguous()
        n, half, m = freq_y.shape[0], freq_y.shape[1], index.shape[0]
        _check_shapes('fourier_feature', coef.shape == (n, 2 * half) and freq_x.shape == (n, half)
                      and phase_t.shape == (2, half) and index.shape == (m, ) and index.dtype == torch.int64
                      and rel_coord.shape == (m, 2) and rel_cell.shape == (m, 2), coefficient=coef,
                      frequency_y=freq_y, frequency_x=freq_x, index=index, rel_coord=rel_coord, rel_cell=rel_cell,
                      phase_weight=phase_weight)
        out = torch.empty(m, 2 * half)

        def run(a, b):
            return lib.ciisr_fourier_feature(b - a, half, coef.data_ptr(), freq_y.data_ptr(), freq_x.data_ptr(), n,
                                             index[a:].data_ptr(), rel_coord[a:].data_ptr(), rel_cell[a:].data_ptr(),
                                             phase_t.data_ptr(), out[a:].data_ptr())

        _check(_split_rows(m, run), 'fourier_feature')
        ctx.lib = lib
        ctx.save_for_backward(coef, freq_y, freq_x, index, rel_coord, rel_cell, phase_weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        coef, freq_y, freq_x, index, rel_coord, rel_cell, phase_weight = ctx.saved_tensors
        lib, grad = ctx.lib, grad.float().contiguous()
        n, half, m = freq_y.shape[0], freq_y.shape[1], index.shape[0]
        phase_t = phase_weight.detach().t().contiguous()
        starts, order = torch.empty(n + 1, dtype=torch.int64), torch.empty(m, dtype=torch.int64)
        _check([lib.ciisr_queries_by_latent(m, index.data_ptr(), n, starts.data_ptr(), order.data_ptr())],
               'fourier_feature')
        grad_coef, grad_fy, grad_fx = torch.empty(n, 2 * half), torch.empty(n, half), torch.empty(n, half)
        # threads take runs of latents holding about equal numbers of queries
        parts = _parts(m)
        cuts = torch.searchsorted(starts, torch.arange(1, parts) * m // parts).tolist()
        bounds = sorted({0, n, *cuts})

        def run(t0, t1):  # -> this part's share of the phase weight's gradient
            grad_phase = torch.zeros(2, half, dtype=torch.float64)
            lib.ciisr_fourier_feature_backward(t0, t1, half, coef.data_ptr(), freq_y.data_ptr(), freq_x.data_ptr(),
                                               starts.data_ptr(), order.data_ptr(), rel_coord.data_ptr(),
                                               rel_cell.data_ptr(), phase_t.data_ptr(), grad.data_ptr(),
                                               grad_coef.data_ptr(), grad_fy.data_ptr(), grad_fx.data_ptr(),
                                               grad_phase.data_ptr())
            return grad_phase

        grad_phase = sum(_in_parallel(bounds, run))
        needs = ctx.needs_input_grad
        return (None, grad_coef if needs[1] else None, grad_fy if needs[2] else None, grad_fx if needs[3] else None,
                None, None, None, grad_phase.t().float() if needs[7] else None)


def fourier_feature(tables, index, rel_coord, rel_cell, phase_weight):
    """(M, 2H) LTE's Fourier feature ``c * [cos(pi a), sin(pi a)]``, ``a = f_y d_y + f_x d_x +
    rel_cell @ phase_weight.T``, of ``tables`` = (c (N, 2H), f_y (N, H), f_x (N, H)) read at
    ``index`` (M,), differentiable in the tables and ``phase_weight`` (H, 2) (the query inputs
    ``rel_coord``, ``rel_cell`` (M, 2) are data: they must not need a gradient). None where the
    kernels are not available. The backward groups the queries by latent, so each latent's
    gradient is a sum made in one place (no scatter-add).

    Values: within a few float ulps of the torch formula; gradients agree to float rounding."""
    if rel_coord.requires_grad or rel_cell.requires_grad:
        return None
    lib = library()
    if lib is None or not hasattr(lib, 'ciisr_fourier_feature'):
        return None
    return _FourierFeature.apply(lib, *tables, index, rel_coord, rel_cell, phase_weight)


# ----------------------------------------------------------------------------------------------
# Winograd 3x3 convolutions for training
# F(4x4, 3x3)'s weight transform G (Lavin & Gray, 2016, with interpolation points 0, +-1, +-2,
# infinity); the data and output transforms are written out in fused_cpu.c.
_WINOGRAD_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                            [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
# tiles (4x4 outputs) below which splitting a convolution across threads costs more than it saves
_TILES_PER_THREAD = 64
# On AVX-512 (16-float vectors) oneDNN's direct convolution is fast enough that Winograd pays only
# on larger convolutions: tiles x input x output channels at least this (2 cores of an AVX-512
# EPYC, forward + backward against oneDNN: 16 x 48 px 64 -> 64 1.5-1.9x, 8 x 48 px 64 -> 64
# 1.4x, 1 x 128 px 64 -> 64 1.4x; below it, 8 x 48 px 32 -> 32 0.9-1.1x, 1 x 48 px 64 -> 64
# 0.7-0.8x). With 8-float vectors (AVX2) it was faster on every case measured (1.3-2.5x).
_AVX512_MIN_WORK = 1 << 22


# (9, 36): row (a, b) of a 3x3 kernel to the 6x6 transform G g G^T, position (i, j) = G[i, a] G[j, b]
_WINOGRAD_K = torch.einsum('ia,jb->abij', _WINOGRAD_G, _WINOGRAD_G).reshape(9, 36).float()


def _winograd_weight(weight):
    """(cout, cin, 3, 3) -> the transformed weight (36, cin, cout), G g G^T per channel pair."""
    cout, cin = weight.shape[:2]
    return weight.detach().reshape(-1, 9).mm(_WINOGRAD_K).t().reshape(36, cout, cin).transpose(1, 2).contiguous()


def _tiles(x):
    n, _, h, w = x.shape
    return n * ((h + 3) // 4) * ((w + 3) // 4)


def _tile_bounds(x):
    """``x``'s tiles split across the intra-op threads when there are enough of them."""
    tiles = _tiles(x)
    parts = max(1, min(torch.get_num_threads(), tiles // _TILES_PER_THREAD))
    return [tiles * i // parts for i in range(parts + 1)]


def _winograd_apply(lib, x, u, bias):
    """conv(x, w) + bias, x channels-last contiguous float32, u = _winograd_weight(w)."""
    n, cin, h, w = x.shape
    cout = u.shape[2]
    y = torch.empty(n, cout, h, w, memory_format=torch.channels_last)
    bias = None if bias is None else bias.detach().contiguous()  # kept alive while the kernel reads it

    def run(t0, t1):
        return lib.ciisr_winograd_conv(h, w, cin, cout, x.data_ptr(), u.data_ptr(),
                                       None if bias is None else bias.data_ptr(), y.data_ptr(), t0, t1)

    if any(_in_parallel(_tile_bounds(x), run)):
        raise MemoryError('winograd_conv2d: cannot allocate the transform buffers')
    return y


def _winograd_weight_grad(lib, x, grad):
    """The weight gradient (cout, cin, 3, 3) of conv(x, w) for the output gradient ``grad``
    (both channels-last contiguous): per thread the transformed sum, then G^T (sum) G."""
    n, cin, h, w = x.shape
    cout = grad.shape[1]
    rows = lib.ciisr_winograd_rows()
    cin_pad = -(-cin // rows) * rows

    def run(t0, t1):
        du = torch.zeros(36, cin_pad, cout)
        if lib.ciisr_winograd_weight_grad(h, w, cin, cout, x.data_ptr(), grad.data_ptr(), du.data_ptr(), t0, t1):
            raise MemoryError('winograd_conv2d: cannot allocate the transform buffers')
        return du

    du = sum(_in_parallel(_tile_bounds(x), run))
    # G^T du G per channel pair: the transpose of the weight's transform
    return du[:, :cin].reshape(36, -1).t().mm(_WINOGRAD_K.t()).reshape(cin, cout, 3, 3).transpose(0, 1).contiguous()


class _WinogradConv(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 weight, forward and backward by the
    Winograd kernels; the output is channels-last."""

    @staticmethod
    def forward(ctx, lib, x, weight, bias):
        x = x.contiguous(memory_format=torch.channels_last)
        ctx.lib = lib
        ctx.save_for_backward(x, weight)
        return _winograd_apply(lib, x, _winograd_weight(weight), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        lib, grad = ctx.lib, grad.contiguous(memory_format=torch.channels_last)
        need_x, need_w, need_b = ctx.needs_input_grad[1:4]
        # the input gradient is the same convolution of the output gradient with the weight
        # flipped and its channels swapped (stride 1, padding 1)
        grad_x = _winograd_apply(lib, grad, _winograd_weight(weight.flip(2, 3).transpose(0, 1)), None) if need_x else None
        grad_w = _winograd_weight_grad(lib, x, grad) if need_w else None
        grad_b = grad.sum((0, 2, 3)) if need_b else None
        return None, grad_x, grad_w, grad_b


# CIISR_WINOGRAD=off: train with oneDNN's direct convolutions (their float rounding) but keep
# the other kernels
_WINOGRAD = os.environ.get('CIISR_WINOGRAD', 'on').lower() not in ('off', '0', 'false', 'no')


def winograd_library():
    """The kernels with the Winograd convolutions, or None where they are not built (or
    switched off: ``CIISR_WINOGRAD=off``, or all kernels with ``CIISR_FUSED_CPU=off``)."""
    lib = library() if _ENABLED and _WINOGRAD else None
    return lib if lib is not None and hasattr(lib, 'ciisr_winograd_conv') else None


def winograd_applies(x, weight, stride, padding, dilation, groups):
    """Whether :func:`winograd_conv2d` takes this convolution of CPU float32 training (the
    caller, :func:`.cpu_conv.conv2d`, has checked that): a 3x3 kernel with stride 1, zero
    padding 1, no dilation or groups, channels in whole vectors of the build (8 floats on
    AVX2, 16 on AVX-512) and, on AVX-512, enough work to pay (see ``_AVX512_MIN_WORK``)."""
    if not (tuple(weight.shape[2:]) == (3, 3) and tuple(stride) == (1, 1) and tuple(padding) == (1, 1)
            and tuple(dilation) == (1, 1) and groups == 1):
        return False
    lib = winograd_library()
    if lib is None:
        return False
    vec = lib.ciisr_winograd_vector()
    cout, cin = weight.shape[:2]
    return (x.shape[1] == cin and cout % vec == 0 and cin % vec == 0
            and (vec < 16 or _tiles(x) * cin * cout >= _AVX512_MIN_WORK))


def winograd_conv2d(x, weight, bias=None):
    """``F.conv2d(x, weight, bias, padding=1)`` (3x3, stride 1) with autograd, by Winograd's
    F(4x4, 3x3) on the CPU: a quarter of the direct convolution's multiplications, in a
    few transform passes that stay in cache. Output channels-last. Callers check
    :func:`winograd_applies` first.

    Rounding: the transforms add and scale values before the products, so results are a few
    times a direct convolution's float32 rounding from the exact ones (relative ~1e-6 to 1e-5
    of the output's scale), for values and gradients alike. Training only: inference keeps
    the direct convolutions, whose outputs match the authors' code to ~1e-7."""
    return _WinogradConv.apply(winograd_library(), x, weight, bias)
