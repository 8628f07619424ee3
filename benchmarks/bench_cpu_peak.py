"""Peak multiply-add throughput of this CPU per core, by number format: can bf16 pay here?

The bf16 target in ``bench_speed.py`` (15x the literal fp32 formulation) assumes bf16 matrix
products far faster than fp32 ones. Without AMX the only bf16 product instruction on x86 is
AVX512-BF16's ``vdpbf16ps`` (two products per fp32 lane); this script measures it next to the
fp32 FMA our fused kernels use (and AVX512-FP16's FMA, for reference), in registers only, so
that what it prints is the instruction's own throughput: no memory, no torch.

It compiles a small C program with the compiler our fused kernels use (``$CC``, else ``cc``; see
``ciisr_plugin.archs.fused_cpu.compiler``) for this CPU (``-march=native``); a format that this CPU
(or a compiler too old for it) lacks is reported as such.

    python benchmarks/bench_cpu_peak.py            # one core
    python benchmarks/bench_cpu_peak.py --cores 2  # that many copies at once, as a loaded machine
"""
import argparse
import os
import subprocess
import sys
import tempfile

# 24 independent accumulators per loop: enough to hide every FMA latency seen on x86.
_SOURCE = r'''
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define ACC 24
#define STEPS 8000000L

#define RUN(name, type, init, step, opnd, lanes_x_2, reduce)                                   \
    {                                                                                      \
        type acc[ACC];                                                                     \
        for (int i = 0; i < ACC; i++)                                                      \
            acc[i] = init;                                                                 \
        double t = seconds();                                                              \
        for (long n = 0; n < STEPS; n++) {                                                 \
            _Pragma("GCC unroll 24") for (int i = 0; i < ACC; i++) acc[i] = step;          \
            __asm__ volatile("" : "+x"(opnd)); /* opaque operand: not hoisted or folded */ \
        }                                                                                  \
        t = seconds() - t;                                                                 \
        float s = 0;                                                                       \
        for (int i = 0; i < ACC; i++)                                                      \
            s += reduce;                                                                   \
        printf("%s %.2f %g\n", name, STEPS * (double)ACC * (lanes_x_2) / t / 1e9, s);      \
    }

int main(void)
{
#if defined(__AVX512F__)
    __m512 a = _mm512_set1_ps(1.0001f);
    const __m512 b = _mm512_set1_ps(0.9999f);
    RUN("fp32-fma-avx512", __m512, _mm512_set1_ps(0.0f), _mm512_fmadd_ps(a, b, acc[i]), a, 32,
        _mm512_reduce_add_ps(acc[i]))
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a = _mm256_set1_ps(1.0001f);
    const __m256 b = _mm256_set1_ps(0.9999f);
    RUN("fp32-fma-avx2", __m256, _mm256_set1_ps(0.0f), _mm256_fmadd_ps(a, b, acc[i]), a, 16, acc[i][0])
#else
    printf("fp32-fma unavailable\n");
#endif
#if defined(__AVX512BF16__)
    __m512bh x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0f), _mm512_set1_ps(1.0f));
    const __m512bh y = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.0f), _mm512_set1_ps(0.0f));
    RUN("bf16-dot-avx512", __m512, _mm512_set1_ps(0.0f), _mm512_dpbf16_ps(acc[i], x, y), x, 64,
        _mm512_reduce_add_ps(acc[i]))
#else
    printf("bf16-dot unavailable\n");
#endif
#if defined(__AVX512FP16__)
    __m512h p = _mm512_set1_ph((_Float16)1.0f);
    const __m512h q = _mm512_set1_ph((_Float16)0.0f);
    RUN("fp16-fma-avx512", __m512h, _mm512_set1_ph((_Float16)0.0f), _mm512_fmadd_ph(p, q, acc[i]), p, 64,
        (float)_mm512_reduce_add_ph(acc[i]))
#else
    printf("fp16-fma unavailable\n");
#endif
    return 0;
}
'''


def build(tmp):
    from ciisr_plugin.ops.fused_cpu import compiler as find_compiler
    compiler = find_compiler()
    if not compiler:
        sys.exit('bench_cpu_peak: no C compiler found (set CC, or install gcc)')
    src, exe = os.path.join(tmp, 'peak.c'), os.path.join(tmp, 'peak')
    with open(src, 'w') as f:
        f.write(_SOURCE)
    result = subprocess.run([compiler, '-O2', '-march=native', '-o', exe, src], capture_output=True, text=True)
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ['(no message)'])[0]
        sys.exit(f'bench_cpu_peak: {compiler} failed: {first}')
    return exe


def parse_report(text):
    """``{name: GFLOP/s}`` from the timing program's output; ``None`` for a format it lacks.

    Each line is ``<name> <GFLOP/s> <checksum>``, or ``<format> unavailable`` where this CPU
    (or compiler) has no such instruction - the usual case for bf16 / fp16 outside recent Intel
    and AMD server parts, so it must not break the report.
    """
    report = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1] == 'unavailable':
            report[fields[0]] = None
        elif len(fields) == 3:
            report[fields[0]] = float(fields[1])
        elif fields:
            raise ValueError(f'bench_cpu_peak: unexpected line from the timing program: {line!r}')
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cores', type=int, default=1, help='copies run at once (default 1)')
    parser.add_argument('--repeats', type=int, default=3, help='rounds; each format\'s best is shown (default 3)')
    args = parser.parse_args()
    for option in ('cores', 'repeats'):
        if getattr(args, option) < 1:
            parser.error(f'--{option} must be at least 1, got {getattr(args, option)}')
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(tmp)
        best = {}
        for _ in range(args.repeats):
            procs = [subprocess.Popen([exe], stdout=subprocess.PIPE, text=True) for _ in range(args.cores)]
            for proc in procs:
                out, _ = proc.communicate()
                try:
                    report = parse_report(out)
                except ValueError as err:
                    sys.exit(str(err))
                for name, value in report.items():
                    best[name] = value if best.get(name) is None else max(best[name], value or 0.0)
    print(f'peak multiply-add throughput per core, best of {args.repeats} rounds, {args.cores} core(s) busy:')
    fp32 = next((v for k, v in best.items() if k.startswith('fp32') and v), None)
    for name, value in best.items():
        if value is None:
            print(f'  {name.split("-")[0]}: not available (this CPU, or this compiler, lacks the instruction)')
            continue
        ratio = f'  ({value / fp32:.2f}x fp32)' if fp32 and not name.startswith('fp32') else ''
        print(f'  {name:18s} {value:7.1f} GFLOP/s{ratio}')


if __name__ == '__main__':
    main()
