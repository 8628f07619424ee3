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
