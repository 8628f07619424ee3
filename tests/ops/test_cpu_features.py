"""The CPU probes (ciisr_plugin.ops.cpu_features): AMX from the CPU flags, oneDNN's bf16 support."""
import pytest
import torch

from ciisr_plugin.ops import cpu_features


def test_amx_is_read_from_the_cpu_flags(tmp_path, monkeypatch):
    info = tmp_path / 'cpuinfo'
    monkeypatch.setattr(cpu_features, 'CPUINFO', str(info))
    info.write_text('processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n')
    assert cpu_features.cpu_has_amx() is False
    info.write_text('processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n')
    assert cpu_features.cpu_has_amx() is True
    monkeypatch.setattr(cpu_features, 'CPUINFO', str(tmp_path / 'missing'))
    assert cpu_features.cpu_has_amx() is None


def test_bf16_matmul_support_agrees_with_onednn():
    # where oneDNN says bf16 is supported its bf16 product must run; where not, it raises
    x = torch.randn(4, 8).bfloat16()
    w = torch.randn(3, 8).bfloat16()
    if cpu_features.cpu_has_bf16_matmul():
        torch.ops.mkldnn._linear_pointwise(x, w, None, 'none', [], '')
    else:
        with pytest.raises(RuntimeError):
            torch.ops.mkldnn._linear_pointwise(x, w, None, 'none', [], '')


@pytest.mark.parametrize('flags, winograd, trains_channels_last', [
    ('fpu avx2 fma', False, False),  # AVX2-only, no kernels: oneDNN's NHWC backward measured slower there
    ('fpu avx2 fma', True, True),  # the Winograd training convolutions work on NHWC
    ('fpu avx2 avx512f avx512bw', False, True),
    (None, False, False),  # no flags to read (not Linux x86), no kernels: torch's default layout
])
def test_the_encoder_layout_follows_the_cpu(tmp_path, monkeypatch, flags, winograd, trains_channels_last):
    from ciisr_plugin.ops import fused_cpu
    info = tmp_path / 'cpuinfo'
    if flags is not None:
        info.write_text(f'processor\t: 0\nflags\t\t: {flags}\n')
    monkeypatch.setattr(cpu_features, 'CPUINFO', str(info))
    monkeypatch.setattr(cpu_features, '_AVX512', None)
    monkeypatch.setattr(fused_cpu, 'winograd_library', lambda: object() if winograd else None)
    assert cpu_features.channels_last_pays(training=False)
    assert cpu_features.channels_last_pays(training=True) is trains_channels_last
    # and the encoder input takes that layout
    import ciisr_plugin  # noqa: F401
    from basicsr.archs import build_network
    net = build_network({'type': 'LIIF', 'encoder': {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 1},
                         'hidden_list': [8]})
    lq = torch.rand(2, 3, 6, 5)
    with torch.no_grad():
        assert net.encoder_input(lq).is_contiguous(memory_format=torch.channels_last)
    assert net.encoder_input(lq).is_contiguous(memory_format=torch.channels_last) is trains_channels_last
