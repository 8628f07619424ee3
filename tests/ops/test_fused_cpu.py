"""Fused CPU inference kernels (ciisr_plugin.ops.fused_cpu) vs the plain torch decoders."""
import logging
import os
import platform
import shutil

import pytest
import torch

from basicsr.archs import build_network
from ciisr_plugin.ops import fused_cpu, query_decode
from ciisr_plugin.inference import upscale_tiled

HAS_COMPILER = fused_cpu.compiler() is not None


@pytest.fixture(autouse=True)
def enabled(monkeypatch):
    monkeypatch.setattr(fused_cpu, '_ENABLED', True)


def _built():
    return fused_cpu.kernels_built()


def _spy(monkeypatch):
    """Count the fused kernels' runs (that they ran, not just that the output matches)."""
    calls = {'mlp': 0, 'basis': 0, 'fourier': 0}
    mlp, basis, fourier = fused_cpu.MLPKernel.__call__, fused_cpu.BasisKernel.__call__, fused_cpu.MLPKernel.fourier

    def mlp_spy(*args, **kwargs):
        out = mlp(*args, **kwargs)
        calls['mlp'] += out is not None
        return out

    def basis_spy(*args, **kwargs):
        out = basis(*args, **kwargs)
        calls['basis'] += out is not None
        return out

    def fourier_spy(*args, **kwargs):
        out = fourier(*args, **kwargs)
        calls['fourier'] += out is not None
        return out

    monkeypatch.setattr(fused_cpu.MLPKernel, '__call__', mlp_spy)
    monkeypatch.setattr(fused_cpu.MLPKernel, 'fourier', fourier_spy)
    monkeypatch.setattr(fused_cpu.BasisKernel, '__call__', basis_spy)
    return calls


def test_the_kernels_build_wherever_there_is_a_compiler(caplog):
    # CPU inference speed depends on them: with a C compiler they must build; without one the
    # decoders fall back to torch (tested below) and a warning must say why
    with caplog.at_level(logging.WARNING, logger='ciisr'):
        lib = fused_cpu.library()
    if HAS_COMPILER:
        assert lib is not None, caplog.text
    else:
        assert lib is None and 'no C compiler found' in caplog.text


def _cpu_flags():
    """x86 feature flags of this CPU from /proc/cpuinfo (empty where there is none)."""
    if not os.path.exists('/proc/cpuinfo'):
        return set()
    with open('/proc/cpuinfo') as f:
        return set(next((line for line in f if line.startswith('flags')), ':').split(':', 1)[1].split())


@pytest.mark.skipif(not HAS_COMPILER, reason='needs a C compiler')
def test_each_cpu_gets_the_kernels_measured_faster_there():
    flags = _cpu_flags()
    if 'avx512f' in flags:
        assert _built() == {'mlp', 'basis', 'winograd'}
    elif {'avx2', 'fma'} <= flags:
        assert _built() == {'mlp', 'winograd'}
    elif flags:
        assert _built() == set()


@pytest.mark.skipif(not HAS_COMPILER or platform.machine() not in ('x86_64', 'AMD64'), reason='x86 -march names')
@pytest.mark.parametrize('march, built', [('haswell', {'mlp', 'winograd'}), ('x86-64-v2', set())])
def test_builds_for_other_instruction_sets_decode_the_same(march, built, monkeypatch, tmp_path):
    # what a CPU without AVX-512 (AVX2) or without AVX2 (SSE4) gets, built here for that CPU:
    # only the kernels measured faster there, the rest on torch, the same numbers
    if march == 'haswell' and not {'avx2', 'fma'} <= _cpu_flags():
        pytest.skip('an AVX2 build cannot run on this CPU')
    net = _net('aliif')
    lq = torch.rand(1, 3, 9, 8, generator=torch.Generator().manual_seed(10))
    expected = upscale_tiled(net, lq, (23, 19))
    monkeypatch.setattr(fused_cpu, '_LIBRARIES', {})
    monkeypatch.setenv('CIISR_KERNEL_CACHE', str(tmp_path))
    monkeypatch.setattr(fused_cpu, '_FLAGS', tuple(f'-march={march}' if flag == '-march=native' else flag
                                                   for flag in fused_cpu._FLAGS))
    assert _built() == built
    calls = _spy(monkeypatch)
    out = upscale_tiled(net, lq, (23, 19))
    assert calls['basis'] == 0 and (calls['mlp'] > 0) == ('mlp' in built)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    if 'winograd' in built:  # this build's vector width and register tile (8 floats, 6 rows on AVX2)
        lib = fused_cpu.winograd_library()
        for seed, kwargs in ((0, {}), (1, dict(n=3, channels=(8, 5), size=(17, 11), bias=False))):
            for a, b in zip(*fused_cpu.winograd_case(lib, seed, **kwargs)):
                assert (a.double() - b).abs().max() <= 3e-5 * b.abs().max()  # as tests/ops/test_cpu_conv.py


# the MLP kernel itself (the decoders' torch path is tested wherever it is missing)
needs_mlp_kernel = pytest.mark.skipif('mlp' not in _built(), reason='no MLP kernel for this CPU (AVX2 / AVX-512 only)')


def _mlp_case(widths, e, rows, seed, relus=None):
    """A random MLP (first-layer width ``widths[0]``, then ``widths[1:]``) and its inputs."""
    gen = torch.Generator().manual_seed(seed)
    relus = relus or [True] * (len(widths) - 2) + [False]
    layers = [(torch.randn(d_out, d_in, generator=gen) / d_in**0.5, torch.randn(d_out, generator=gen), relu)
              for d_in, d_out, relu in zip(widths[:-1], widths[1:], relus)]
    table, extra = torch.randn(50, widths[0], generator=gen), torch.randn(rows, e, generator=gen)
    first_weight, index = torch.randn(widths[0], e, generator=gen), torch.randint(0, 50, (rows, ), generator=gen)
    return layers, (table, index, extra, first_weight)


def _mlp_expected(layers, table, index, extra, first_weight, first_relu):
    h = table[index] + extra @ first_weight.t()
    h = h.relu() if first_relu else h
    for weight, bias, relu in layers:
        h = h @ weight.t() + bias
        h = h.relu() if relu else h
    return h


@needs_mlp_kernel
@pytest.mark.parametrize('first_relu', [True, False])
@pytest.mark.parametrize('widths, e', [
    ((256, 256, 256, 256, 3), 4),  # LIIF's decoder: the 256-wide code path
    ((256, 256, 10), 4),  # an expansion net's head (K = 10)
    ((37, 20, 33, 5), 2),  # odd widths: 32- and 16-wide panels, padding
    ((16, ), 3),  # no layer after the first
    ((48, 64, 3), 3),
])
def test_mlp_kernel_matches_torch(widths, e, first_relu):
    layers, inputs = _mlp_case(widths, e, 333, seed=len(widths) + e)
    with torch.no_grad():
        out = fused_cpu.MLPKernel(layers)(*inputs, first_relu)
    torch.testing.assert_close(out, _mlp_expected(layers, *inputs, first_relu), rtol=1e-5, atol=1e-5)


@needs_mlp_kernel
def test_mlp_kernel_relus_follow_the_layers():
    layers, inputs = _mlp_case((24, 40, 40, 6), 4, 50, seed=9, relus=[False, True, True])  # ReLU on the output
    with torch.no_grad():
        out = fused_cpu.MLPKernel(layers)(*inputs, True)
    expected = _mlp_expected(layers, *inputs, True)
    assert (expected == 0).any() and (expected > 0).any()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_mlp_kernel
@pytest.mark.parametrize('first_relu', [True, False])
def test_inputs_zero_across_a_block_are_skipped_exactly(first_relu):
    # the kernel skips a layer's inputs that a ReLU zeroed in every row of a block: make most
    # units dead (very negative biases) but alive in a few rows, in every pattern of rows,
    # so that a skipped live input, a wrong list or a stale entry changes the output
    gen = torch.Generator().manual_seed(12)
    widths, rows = (256, 256, 256, 256, 3), 257
    layers, inputs = _mlp_case(widths, 4, rows, seed=12)
    table, index, extra, first_weight = inputs
    for i, (weight, bias, relu) in enumerate(layers[:-1]):
        bias = bias - 3 * (torch.rand(bias.shape, generator=gen) < 0.7)  # most units dead in most rows
        layers[i] = (weight, bias, relu)
    table = table - 3 * (torch.rand(table.shape, generator=gen) < 0.7)
    with torch.no_grad():
        out = fused_cpu.MLPKernel(layers)(table, index, extra, first_weight, first_relu)
        expected = _mlp_expected(layers, table, index, extra, first_weight, first_relu)
        hidden = torch.relu(table[index] + extra @ first_weight.t())[:rows // 6 * 6].view(-1, 6, 256)
    dead_in_block = (hidden == 0).all(1).float().mean()
    assert 0.1 < dead_in_block < 0.9  # the case does exercise skipping, and not of everything
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_mlp_kernel
@pytest.mark.parametrize('seed, half', [(0, 10), (1, 128), (2, 3)])
def test_fourier_kernel_matches_torch(seed, half):
    # LTE's Fourier feature formed in the kernel (vectorised sin / cos; libm beyond |a| = 8192)
    out, expected = fused_cpu.fourier_case(fused_cpu.library(), seed, half=half, rows=100)
    assert expected.std() > 0.1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-5)


@needs_mlp_kernel
@pytest.mark.parametrize('seed, half, rows', [(0, 10, 31), (1, 128, 300), (2, 3, 100)])
def test_fourier_training_op_matches_torch_autograd(seed, half, rows):
    # LTE's feature in training: the op's own backward (queries grouped by latent, one latent
    # read by none) against torch's autograd of the formula, libm branch included
    got, want = fused_cpu.fourier_training_case(fused_cpu.library(), seed, half=half, rows=rows)
    for name, x, y in zip(['feature', 'coef', 'freq_y', 'freq_x', 'phase'], got, want):
        assert y.abs().max() > 1, name  # a real gradient
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * y.abs().max().item(), msg=name)
    assert (got[1][-1] == 0).all() and (want[1][-1] == 0).all()  # the latent nobody read


@needs_mlp_kernel
def test_fourier_training_op_gives_the_same_table_gradients_on_any_thread_count(monkeypatch):
    # each latent's gradient is summed in one place in query order: bit-identical whatever the split
    monkeypatch.setattr(fused_cpu, '_ROWS_PER_THREAD', 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(fused_cpu.fourier_training_case(fused_cpu.library(), 3, half=20, rows=1000,
                                                           latents=40)[0])
    finally:
        torch.set_num_threads(threads)
    one, two = results
    for x, y in zip(one[:4], two[:4]):
        assert torch.equal(x, y)
    torch.testing.assert_close(one[4], two[4], rtol=1e-6, atol=0)  # the phase: per-thread partial sums


@needs_mlp_kernel
def test_fourier_training_op_refuses_bad_indices_and_differentiable_queries():
    tables = (torch.randn(4, 6), torch.randn(4, 3), torch.randn(4, 3))
    rel, cell, phase_weight = torch.zeros(2, 2), torch.zeros(2, 2), torch.randn(3, 2)
    with pytest.raises(IndexError, match='outside the latent table'):
        fused_cpu.fourier_feature(tables, torch.tensor([0, 4]), rel, cell, phase_weight)
    # a gradient wanted for the query inputs: not this op's (the torch path gives it)
    assert fused_cpu.fourier_feature(tables, torch.tensor([0, 1]), rel.requires_grad_(), cell, phase_weight) is None


@needs_mlp_kernel
def test_rows_split_across_threads_match(monkeypatch):
    monkeypatch.setattr(fused_cpu, '_ROWS_PER_THREAD', 64)
    layers, inputs = _mlp_case((64, 32, 3), 4, 1001, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            out = fused_cpu.MLPKernel(layers)(*inputs, True)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, _mlp_expected(layers, *inputs, True), rtol=1e-5, atol=1e-5)


@needs_mlp_kernel
def test_an_index_outside_the_table_raises_instead_of_reading_memory():
    layers, (table, _, extra, first_weight) = _mlp_case((32, 16, 3), 4, 5, seed=4)
    kernel = fused_cpu.MLPKernel(layers)
    for bad in (50, -1):
        index = torch.tensor([0, 3, bad, 1, 2])
        with torch.no_grad(), pytest.raises(IndexError, match='outside the latent table'):
            kernel(table, index, extra, first_weight, True)


@needs_mlp_kernel
def test_inconsistent_shapes_are_an_error_not_a_read_past_the_tensor():
    layers, (table, _, _, first_weight) = _mlp_case((32, 16, 3), 4, 3, seed=5)
    index = torch.tensor([0, 1, 2])
    kernel = fused_cpu.MLPKernel(layers)
    with torch.no_grad():
        with pytest.raises(ValueError, match='inconsistent inputs'):
            kernel(table, index, torch.randn(3, 2), first_weight, True)  # 2 query inputs, weight has 4
        with pytest.raises(ValueError, match='inconsistent inputs'):
            kernel(torch.randn(10, 40), index, torch.randn(3, 4), torch.randn(40, 4), True)  # table wider than layer 1


@pytest.mark.skipif('basis' not in _built(), reason='no basis kernel here (AVX-512 only)')
def test_inconsistent_basis_inputs_are_an_error_not_a_read_past_the_tensor():
    index = torch.tensor([0, 1, 2])
    net = _net('aliif')
    kernel = query_decode.basis_kernel(net, net.basis.dims[1], net.basis.later_layers(), 4)
    first_weight = net.basis.stacked_weight(0)[:, net.decoder_in_channels:]
    with torch.no_grad(), pytest.raises(ValueError, match='inconsistent inputs'):
        kernel(torch.randn(10, 64), index, torch.randn(3, 4), first_weight, torch.randn(2, 4))  # 2 coeff rows


def test_not_used_with_autograd_or_autocast():
    x = torch.randn(4, 8)
    assert not fused_cpu.applies(x)  # grad mode on
    with torch.no_grad():
        assert fused_cpu.applies(x)
        assert not fused_cpu.applies(x.double())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not fused_cpu.applies(x)


NETS = {
    'liif': {'type': 'LIIF', 'encoder': {'type': 'EDSREncoder', 'num_feat': 16, 'num_block': 2},
             'hidden_list': [32, 32]},
    'liif-no-cell-no-unfold': {'type': 'LIIF', 'encoder': {'type': 'EDSREncoder', 'num_feat': 16, 'num_block': 1},
                               'hidden_list': [24], 'cell_decode': False, 'feat_unfold': False},
    'liifgan': {'type': 'LIIFGAN', 'encoder': {'type': 'EDSREncoder', 'num_feat': 16, 'num_block': 2},
                'hidden_list': [32, 32]},
    'aliif': {'type': 'ALIIF', 'encoder': {'type': 'EDSREncoder', 'num_feat': 16, 'num_block': 2}, 'num_basis': 4,
              'basis_hidden': [16, 16], 'expansion_hidden': [32, 32]},
    # widths that are not whole 16-float vectors, K = 1, softmax coefficients, no cell input
    'aliif-odd': {'type': 'ALIIF', 'encoder': {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 1}, 'num_basis': 3,
                  'basis_hidden': [20, 7, 33], 'expansion_hidden': [24], 'coeff_norm': 'softmax',
                  'cell_decode': False, 'out_channels': 5},
    'aliif-one-basis': {'type': 'ALIIF', 'encoder': {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 1},
                        'num_basis': 1, 'basis_hidden': [16], 'expansion_hidden': [16], 'feat_unfold': False},
    'lte': {'type': 'LTE', 'encoder': {'type': 'EDSREncoder', 'num_feat': 16, 'num_block': 2}, 'hidden_dim': 32,
            'hidden_list': [32, 32]},
    # a Fourier feature of 10 + 10 channels: a partial last vector on every CPU
    'lte-plus-odd': {'type': 'LTEPlus', 'encoder': {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 1},
                     'hidden_dim': 20, 'num_layer': 2},
}


def _net(name):
    torch.manual_seed(0)
    net = build_network(dict(NETS[name])).eval()
    if hasattr(net, 'basis'):
        with torch.no_grad():  # the authors' init makes the bases almost silent; give them a say
            for p in net.basis.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    return net


@pytest.mark.parametrize('name', list(NETS))
def test_fused_inference_matches_the_torch_path(name, monkeypatch):
    net = _net(name)
    lq = torch.rand(2, 3, 13, 17, generator=torch.Generator().manual_seed(1))
    calls = _spy(monkeypatch)
    fused = upscale_tiled(net, lq, (29, 41), chunk_size=100)
    assert (calls['mlp' if name.startswith(('liif', 'aliif')) else 'fourier'] > 0) == ('mlp' in _built())
    assert (calls['basis'] > 0) == (name.startswith('aliif') and 'basis' in _built())
    fused_cpu.set_enabled(False)
    plain = upscale_tiled(net, lq, (29, 41), chunk_size=100)
    assert plain.std() > 0.02  # a real comparison, not of two near-constant images
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize('name', ['lte', 'lte-plus-odd'])
def test_lte_training_gradients_match_the_torch_path(name, monkeypatch):
    # the training forward / backward of LTE's feature on its own op, wherever the kernels build
    net = _net(name).train()
    gen = torch.Generator().manual_seed(4)
    lq, coord = torch.rand(2, 3, 11, 9, generator=gen), torch.rand(2, 300, 2, generator=gen) * 2 - 1
    cell, target = torch.full((2, 300, 2), 2 / 31.), torch.rand(2, 300, 3, generator=gen)
    ran, fused = [], fused_cpu.fourier_feature

    def spy(*args):  # the op's results (None: not available here)
        ran.append(fused(*args))
        return ran[-1]

    monkeypatch.setattr(fused_cpu, 'fourier_feature', spy)

    def step():
        net.zero_grad()
        loss = (net(lq, coord, cell) - target).abs().mean()
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}

    loss, grads = step()
    assert (len(ran) > 0 and all(out is not None for out in ran)) == ('mlp' in _built())
    fused_cpu.set_enabled(False)
    ran.clear()
    plain_loss, plain_grads = step()
    assert not ran
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    for key, grad in plain_grads.items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=key)


def test_arbitrary_queries_use_the_kernels_too(monkeypatch):
    net = _net('aliif')
    lq = torch.rand(1, 3, 9, 11, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    coord = torch.rand(1, 500, 2, generator=gen) * 2 - 1
    cell = torch.full((1, 500, 2), 2 / 37.)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        fused = net(lq, coord, cell)
    assert (calls['basis'] > 0) == ('basis' in _built())
    plain = net(lq, coord, cell)  # autograd on: the torch path
    torch.testing.assert_close(fused, plain.detach(), rtol=0, atol=1e-5)


def test_packed_basis_weights_follow_parameter_updates():
    net = _net('aliif')
    lq = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    upscale_tiled(net, lq, (20, 20))
    with torch.no_grad():
        net.basis.weight1.mul_(-1.5)  # in place, as an optimiser step
        net.basis.bias2.add_(0.3)
    fused = upscale_tiled(net, lq, (20, 20))
    fused_cpu.set_enabled(False)
    torch.testing.assert_close(fused, upscale_tiled(net, lq, (20, 20)), rtol=0, atol=1e-5)


def test_without_a_compiler_one_warning_then_the_torch_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(fused_cpu, '_LIBRARIES', {})
    monkeypatch.setattr(fused_cpu, '_WARNED', False)
    monkeypatch.setenv('CIISR_KERNEL_CACHE', str(tmp_path))
    monkeypatch.setenv('CC', shutil.which('false') or '/bin/false')
    net = _net('aliif')
    lq = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with caplog.at_level(logging.WARNING, logger='ciisr'):
        out = upscale_tiled(net, lq, (20, 20))
        upscale_tiled(net, lq, (20, 20))
    warnings = [r for r in caplog.records if 'fused CPU kernels unavailable' in r.getMessage()]
    assert len(warnings) == 1 and 'failed on fused_cpu.c' in warnings[0].getMessage()
    fused_cpu.set_enabled(False)
    torch.testing.assert_close(out, upscale_tiled(net, lq, (20, 20)), rtol=0, atol=0)


def test_a_net_that_ran_the_kernels_still_pickles_and_copies(tmp_path):
    import copy
    net = _net('aliif')
    lq = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    out = upscale_tiled(net, lq, (16, 16))
    torch.save(net, tmp_path / 'net.pt')  # whole-module pickle: no ctypes pointer may hang off it
    for other in (copy.deepcopy(net), torch.load(tmp_path / 'net.pt', weights_only=False)):
        torch.testing.assert_close(upscale_tiled(other, lq, (16, 16)), out, rtol=0, atol=0)


def test_aliif_without_its_basis_kernel_decodes_the_bases_on_torch(monkeypatch):
    # e.g. the compiler rejects one configuration: the bases fall back, the expansion net stays fused
    net = _net('aliif')
    lq = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    calls = _spy(monkeypatch)
    monkeypatch.setattr(fused_cpu.BasisKernel, 'available', lambda self: False)
    out = upscale_tiled(net, lq, (20, 20))
    assert (calls['mlp'] > 0) == ('mlp' in _built()) and calls['basis'] == 0
    fused_cpu.set_enabled(False)
    torch.testing.assert_close(out, upscale_tiled(net, lq, (20, 20)), rtol=0, atol=1e-5)


@pytest.mark.skipif('basis' not in _built(), reason='no basis kernel here (AVX-512 only)')
def test_a_basis_build_that_fails_its_check_is_not_used(monkeypatch, caplog):
    # stands in for a miscompiled build: the check on load must catch it and the decode fall back
    monkeypatch.setattr(fused_cpu, '_LIBRARIES', {})
    monkeypatch.setattr(fused_cpu, '_WARNED', False)
    reference = fused_cpu.BasisKernel.reference
    monkeypatch.setattr(fused_cpu.BasisKernel, 'reference', lambda self, *args: reference(self, *args) + 1e-3)
    net = _net('aliif')
    lq = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    calls = _spy(monkeypatch)
    with caplog.at_level(logging.WARNING, logger='ciisr'):
        out = upscale_tiled(net, lq, (20, 20))
    assert 'basis kernel disagrees with torch' in caplog.text
    assert calls['basis'] == 0 and (calls['mlp'] > 0) == ('mlp' in _built())  # the MLP build is unaffected
    fused_cpu.set_enabled(False)
    torch.testing.assert_close(out, upscale_tiled(net, lq, (20, 20)), rtol=0, atol=1e-5)


def test_an_unwritable_cache_falls_back_to_the_temp_dir(monkeypatch, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('not a directory')
    monkeypatch.setenv('CIISR_KERNEL_CACHE', str(blocker / 'kernels'))  # makedirs fails under a file
    monkeypatch.setattr(fused_cpu.tempfile, 'gettempdir', lambda: str(tmp_path))
    if not HAS_COMPILER:
        with pytest.raises(fused_cpu.KernelError, match='no C compiler'):
            fused_cpu._compile(())
        return
    path = fused_cpu._compile(())
    assert path.startswith(str(tmp_path / 'ciisr-kernels-')) and fused_cpu._load(path) is not None
