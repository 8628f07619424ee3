"""The benchmark scripts run (they are measured by hand, not timed here)."""
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from ciisr_plugin.ops import fused_cpu
from conftest import REPO

PEAK = str(REPO / 'benchmarks' / 'bench_cpu_peak.py')


def _compiler_macros():
    """What ``-march=native`` turns on for this machine's compiler (an old one may lack a new format)."""
    out = subprocess.run([fused_cpu.compiler(), '-march=native', '-dM', '-E', '-'], input='', capture_output=True,
                         text=True)
    return {line.split()[1] for line in out.stdout.splitlines() if line.startswith('#define ')}


def _cpu_flags():
    try:
        with open('/proc/cpuinfo') as f:
            return next((set(line.split(':', 1)[1].split()) for line in f if line.startswith('flags')), set())
    except OSError:
        return set()


@pytest.mark.skipif(fused_cpu.compiler() is None, reason='needs a C compiler')
@pytest.mark.skipif(platform.machine() not in ('x86_64', 'AMD64'), reason='x86 intrinsics')
def test_cpu_peak_reports_what_this_cpu_has():
    out = subprocess.run([sys.executable, PEAK, '--repeats', '1'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    flags = _cpu_flags()
    fp32 = re.search(r'fp32-fma-(avx512|avx2)\s+([\d.]+) GFLOP/s', out.stdout)
    if 'avx512f' in flags or {'avx2', 'fma'} <= flags:
        assert fp32 and float(fp32.group(2)) > 1, out.stdout
        assert fp32.group(1) == ('avx512' if 'avx512f' in flags else 'avx2')
    # each reduced format is timed exactly where it is built, else said to be missing
    macros = _compiler_macros()
    for name, flag, macro in (('bf16', 'avx512_bf16', '__AVX512BF16__'), ('fp16', 'avx512_fp16', '__AVX512FP16__')):
        built = macro in macros
        assert flag in flags or not built or not flags  # -march=native never enables what the CPU lacks
        timed = re.search(rf'{name}-\S+\s+[\d.]+ GFLOP/s\s+\([\d.]+x fp32\)', out.stdout)
        assert bool(timed) == built, out.stdout
        assert (f'{name}: not available' in out.stdout) == (not built), out.stdout


def _peak_module():
    spec = importlib.util.spec_from_file_location('bench_cpu_peak', PEAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_peak_report_of_a_cpu_without_bf16_or_fp16():
    """What the timing program prints on an AVX2-only CPU (or a Zen 4 without AVX512-FP16) is
    parsed, whatever this machine has: its 'unavailable' lines, taken from the C source itself."""
    peak = _peak_module()
    missing = re.findall(r'printf\("(\S+ unavailable)\\n"\)', peak._SOURCE)
    assert {line.split()[0] for line in missing} == {'fp32-fma', 'bf16-dot', 'fp16-fma'}
    report = peak.parse_report('fp32-fma-avx2 70.25 1.5e+07\n' + '\n'.join(missing[1:]) + '\n')
    assert report == {'fp32-fma-avx2': 70.25, 'bf16-dot': None, 'fp16-fma': None}
    with pytest.raises(ValueError, match='unexpected line'):
        peak.parse_report('fp32-fma none\n')


def test_cpu_peak_without_a_working_compiler_is_one_line():
    env = dict(os.environ, CC=shutil.which('false') or '/bin/false')
    out = subprocess.run([sys.executable, PEAK, '--repeats', '1'], capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.returncode != 0
    assert out.stdout == ''
    assert len(out.stderr.strip().splitlines()) == 1 and 'bench_cpu_peak' in out.stderr


@pytest.mark.parametrize('option', ['--cores', '--repeats'])
def test_cpu_peak_refuses_nothing_to_run(option):
    out = subprocess.run([sys.executable, PEAK, option, '0'], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ''
    assert f'{option} must be at least 1, got 0' in out.stderr.strip().splitlines()[-1]


def test_gpu_check_runs_its_checks(tmp_path):
    """The prepared CUDA check, run small on the CPU: every check runs and passes here too."""
    script = str(REPO / 'benchmarks' / 'gpu_check.py')
    out = subprocess.run([sys.executable, script, '--device', 'cpu', '--quick'], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith('[')]
    assert [line.split(']')[1].split(':')[0].strip() for line in lines] == [
        'fixtures', 'train', 'tiling', 'bf16', 'speed'], out.stdout
    assert all(line.startswith('[PASS]') for line in lines), out.stdout
    assert 'aliif_edsr_baseline_x3.pt' in out.stdout and 'liif_edsr_baseline_x3.3.pt' in out.stdout
    if not torch.cuda.is_available():  # without CUDA the real run says so in one line
        cuda = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
        assert cuda.returncode != 0 and 'CUDA is not available' in cuda.stderr
