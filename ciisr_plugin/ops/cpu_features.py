"""What this CPU offers the engine, read in one place: AMX tiles, oneDNN's bf16 products, and
which memory layout its convolutions run faster in."""
import torch

from . import fused_cpu
from .cpu_linear import onednn_runs

CPUINFO = '/proc/cpuinfo'


def cpu_flags():
    """The first ``flags`` line of /proc/cpuinfo as a set; None where there is none (not Linux x86)."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                if line.startswith('flags'):
                    return set(line.split(':', 1)[1].split())
    except OSError:
        pass
    return None


def cpu_has_amx():
    """Whether this CPU has AMX bf16 tile units (Linux's /proc/cpuinfo flags); None if unknown.

    Without AMX, bf16 matrix products run on AVX-512 at best at fp32's speed (measured on
    this project's AVX512-BF16 machine: 140 vs 230 GFLOP/s), so ``precision='bf16'`` only
    pays on AMX CPUs and GPUs."""
    flags = cpu_flags()
    return None if flags is None else 'amx_bf16' in flags


def cpu_has_bf16_matmul():
    """Whether oneDNN has bf16 matrix products on this CPU (AVX512-BF16 or AMX). Without them
    (e.g. AVX2-only CPUs) bf16 products are emulated: measured on a 2-core AVX2 machine,
    ~10 GFLOP/s vs ~70 for fp32. The same probe decides whether the decoders use it."""
    return onednn_runs(torch.bfloat16)


def channels_last_pays(training):
    """Whether the encoder should run channels-last on this CPU (oneDNN's NHWC convolutions).

    Inference: yes (EDSR-baseline on a 128x128 input, measured ~10% faster than NCHW on a
    2-core AVX2 EPYC). Training (forward + backward): where the Winograd training
    convolutions are built (:func:`~.fused_cpu.winograd_library`; they work on NHWC), and on
    AVX-512 CPUs, where channels-last was adopted after measuring ~10% faster EDSR-baseline
    steps (an earlier session's 2-core AVX-512 machine); without them, on the AVX2-only EPYC
    oneDNN's NHWC backward was slower - EDSR-baseline + a 3x3 head, batch 16 of 48 px,
    forward + backward: 3.09 s channels-last vs 2.74 s NCHW (median of 3, alternating).
    Elsewhere (no flags to read, other architectures) training keeps torch's default layout."""
    global _AVX512
    if not training:
        return True
    if _AVX512 is None:  # read once: this is asked every training step
        flags = cpu_flags()
        _AVX512 = flags is not None and 'avx512f' in flags
    return _AVX512 or fused_cpu.winograd_library() is not None


_AVX512 = None
