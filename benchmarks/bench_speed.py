"""Speed and memory of our implicit-query engine vs the literal per-query formulations, on CPU.

Weights are RANDOM (no trained checkpoint is available offline), at the papers' widths:
EDSR-baseline encoder, LIIF's 4 x 256 MLP, A-LIIF's K = 10 bases of 4 x 16 mixed by a 4 x 256
expansion net. The literal side is ``tests/literal_reference.py`` running each arch's
``reference_query``: the authors' formulation written plainly (3x3-unfolded features, one 580-wide
MLP input per query and shift, A-LIIF's per-query weight matrices), on the same parameters.

Every measurement runs in its own subprocess (so its peak RSS is its own), and the
implementations alternate (ours, literal, ours, literal, ...) so that load from other
processes hits both alike; medians over those repeats are reported. An inference
measurement is the mean over back-to-back runs filling at least 20 s (this machine's speed
drifts by +-30% within seconds, and one literal A-LIIF run alone takes ~40 s). Both sides run under the same process
settings: the thread count, OpenMP's defaults and the glibc allocator setting that our CLI
uses for that task (``ciisr_plugin.allocator``). Run it on an otherwise idle machine.

Tasks:
  infer  128x128 -> x4 (512x512): ``upscale_tiled`` in fp32 and bf16 vs the literal fp32
         forward (chunks of 30000 queries, as the authors' test script); fp32 must agree
         within 1e-5.
  psnr   the PSNR change bf16 makes on skimage's photos (bicubic x4 down, model x4 up).
  train  one step (batch 16, 48px LR, 2304 queries, L1 + backward + Adam); the first step's
         predictions and gradients are compared, the following steps timed.
  x30    a 256x256 photo to 7680x7680 through ``basicsr upscale``'s run(): time, peak RSS.

    python benchmarks/bench_speed.py                      # everything (~40 min on 2 cores)
    python benchmarks/bench_speed.py --arch ALIIF --tasks infer train
    python benchmarks/bench_speed.py --quick              # smoke run (~2 min)
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from bench_child import run_child  # beside this script

# the literal per-query formulation the engine is measured against lives with the tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))

FULL = dict(lr=128, scale=4, window=20, batch=16, patch=48, queries=2304, train_scale=3, warmup=2, steps=3,
            repeats=3, x30_lr=256, x30_scale=30, photo_crop=None)
QUICK = dict(lr=32, scale=4, window=0, batch=2, patch=24, queries=256, train_scale=3, warmup=1, steps=1,
             repeats=1, x30_lr=32, x30_scale=30, photo_crop=96)
NETWORKS = {  # the papers' widths
    'LIIF': {'type': 'LIIF', 'encoder': {'type': 'EDSREncoder'}, 'hidden_list': [256] * 4},
    'ALIIF': {'type': 'ALIIF', 'encoder': {'type': 'EDSREncoder'}, 'num_basis': 10, 'basis_hidden': [16] * 4,
              'expansion_hidden': [256] * 4},
}
TARGETS = {  # speed-ups asked for in the issues (ours / literal fp32)
    ('infer', 'LIIF', 'fp32'): 4, ('infer', 'LIIF', 'bf16'): 15, ('infer', 'ALIIF', 'fp32'): 15,
    ('train', 'LIIF', 'ours'): 1.25, ('train', 'ALIIF', 'ours'): 3,
}
EXACT_TOL = 1e-5
PSNR_TOL_DB = 0.05
RSS_LIMIT_MIB = 2048


def _cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), 'unknown')
    except OSError:
        return 'unknown'


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _build_net(arch):
    import ciisr_plugin  # noqa: F401  (registers the archs)
    from basicsr.archs import build_network
    torch.manual_seed(0)
    return build_network(dict(NETWORKS[arch]))


def _literal_forward():
    import literal_reference
    return literal_reference.literal_forward  # runs each arch's own reference_query


def _grid(h, w):
    from ciisr_plugin.archs.geometry import make_cell, make_coord
    coord = make_coord((h, w)).unsqueeze(0)
    return coord, make_cell((h, w), coord.shape[1]).unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# children: one measurement each, in a fresh process
def _child_infer(arch, impl, cfg):
    from ciisr_plugin.inference import upscale_tiled
    from literal_reference import AUTHORS_TEST_BATCH
    net = _build_net(arch).eval()
    literal = _literal_forward()
    torch.manual_seed(1)
    lq = torch.rand(1, 3, cfg['lr'], cfg['lr'])
    size = cfg['lr'] * cfg['scale']

    def run(x, out):
        if impl == 'literal':
            coord, cell = _grid(out, out)
            pred = literal(net, x, coord, cell, chunk=AUTHORS_TEST_BATCH)
            return pred.view(1, out, out, -1).permute(0, 3, 1, 2)
        return upscale_tiled(net, x, (out, out), precision=impl)

    with torch.no_grad():
        run(lq[..., :16, :16], 64)  # warm-up: thread pool, allocator, oneDNN kernels
        # mean over back-to-back runs filling at least ``window`` seconds, so that both sides
        # average this machine's speed over a similar stretch of time (one literal A-LIIF run
        # takes ~40 s; ours ~3 s would otherwise sample a single fast or slow moment)
        runs, start = 0, time.perf_counter()
        while True:
            out = run(lq, size)
            runs += 1
            if time.perf_counter() - start >= cfg['window']:
                break
        seconds = (time.perf_counter() - start) / runs
    return {'seconds': seconds, 'peak_rss_mib': _peak_rss_mib(), 'runs': runs}, {'out': out}


def _child_train(arch, impl, cfg):
    net = _build_net(arch).train()
    literal = _literal_forward()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    torch.manual_seed(1)
    b, p, q = cfg['batch'], cfg['patch'], cfg['queries']
    hr = p * cfg['train_scale']
    coord_all, cell_all = _grid(hr, hr)
    batches = []
    for _ in range(cfg['warmup'] + cfg['steps']):
        idx = torch.stack([torch.randperm(hr * hr)[:q] for _ in range(b)])
        batches.append((torch.rand(b, 3, p, p), coord_all[0][idx], cell_all[0][idx], torch.rand(b, q, 3)))

    def step(lq, coord, cell, gt):
        pred = net(lq, coord, cell) if impl == 'ours' else literal(net, lq, coord, cell)
        loss = (pred - gt).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters()])
        optimizer.step()
        return pred.detach(), grads

    # The first step (identical parameters on both sides) is the one compared; it and the
    # next warm-up steps are not timed: the first steps of a process page-fault in the heap
    # the allocator then keeps (measured: ~0.8 s of system time in step 1, none from step 3),
    # which a training run pays once. Adam turns float-level gradient differences into
    # lr-sized parameter differences, so later outputs are no longer comparable.
    pred, grads = step(*batches[0])
    for batch in batches[1:cfg['warmup']]:
        step(*batch)
    start = time.perf_counter()
    for batch in batches[cfg['warmup']:]:
        step(*batch)
    seconds = (time.perf_counter() - start) / cfg['steps']
    return {'seconds': seconds, 'peak_rss_mib': _peak_rss_mib()}, {'out': pred, 'grads': grads}


def _photo(name, crop=None):
    from skimage import data
    img = getattr(data, name)()
    if crop:
        img = img[:crop, :crop]
    h, w = img.shape[0] // 4 * 4, img.shape[1] // 4 * 4
    return np.ascontiguousarray(img[:h, :w, :3])


def _child_x30(arch, impl, cfg):
    import argparse as _argparse

    import cv2

    from ciisr_plugin.checkpoint import describe
    from ciisr_plugin.data.resize import bicubic_resize
    from ciisr_plugin.tools import upscale
    net = _build_net(arch)
    side = cfg['x30_lr']
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, 'net.pth')
        torch.save(describe(NETWORKS[arch], net.state_dict()), ckpt)
        del net
        lr = bicubic_resize(_photo('astronaut'), (side, side))
        src = os.path.join(tmp, 'in.png')
        cv2.imwrite(src, (lr[:, :, ::-1] * 255 + 0.5).astype(np.uint8))
        dst = os.path.join(tmp, 'out.png')
        parser = _argparse.ArgumentParser()
        upscale.add_arguments(parser)
        args = parser.parse_args([src, '-o', dst, '--model', ckpt, '--scale', str(cfg['x30_scale']), '--device', 'cpu',
                                  '--precision', impl])
        start = time.perf_counter()
        code = upscale.run(args)  # applies allocator.INFERENCE itself, as the CLI does
        seconds = time.perf_counter() - start
        shape = cv2.imread(dst, cv2.IMREAD_UNCHANGED).shape if code == 0 else None
    return {'seconds': seconds, 'peak_rss_mib': _peak_rss_mib(), 'exit': code, 'shape': shape}, {}


CHILDREN = {'infer': _child_infer, 'train': _child_train, 'x30': _child_x30}


def _child_main(args, cfg):
    from ciisr_plugin.ops import allocator
    task, arch, impl, out_path = args.child
    if args.malloc == 'tuned' and task != 'x30':
        allocator.keep_freed_buffers(allocator.TRAINING if task == 'train' else allocator.INFERENCE)
    stats, tensors = CHILDREN[task](arch, impl, cfg)
    torch.save(tensors, out_path)
    print(json.dumps(stats))


# ----------------------------------------------------------------------------------------------
# parent
def _run_child(task, arch, impl, args, tmpdir):
    path = os.path.join(tmpdir, f'{task}_{arch}_{impl}.pt')
    cmd = [sys.executable, os.path.abspath(__file__), '--child', task, arch, impl, path, '--threads',
           str(args.threads), '--malloc', args.malloc] + (['--quick'] if args.quick else [])
    return run_child(cmd, path, f'{task}/{arch}/{impl} child', args.omp_wait_policy)


def _alternate(task, arch, impls, args, cfg, tmpdir):
    """Each implementation ``repeats`` times, alternating: median time, max RSS, last tensors."""
    runs = {impl: [] for impl in impls}
    for _ in range(cfg['repeats']):
        for impl in impls:
            runs[impl].append(_run_child(task, arch, impl, args, tmpdir))
    summary = {}
    for impl, results in runs.items():
        times = [stats['seconds'] for stats, _ in results]
        summary[impl] = dict(results[-1][1], median_s=statistics.median(times), all_s=times,
                             inner=[stats.get('runs', 1) for stats, _ in results],
                             peak_rss_mib=max(stats['peak_rss_mib'] for stats, _ in results))
    return summary


def _print_runs(rows, unit='s'):
    for name, r in rows:
        repeats = ', '.join(f'{t:.2f}' + (f' [mean of {n}]' if n > 1 else '') for t, n in zip(r['all_s'], r['inner']))
        print(f"  {name:14s} median {r['median_s']:7.2f} {unit}  (repeats {repeats})  "
              f"peak RSS {r['peak_rss_mib']:6.0f} MiB")


class Report:
    """Collects the targets' verdicts for the summary; ``ok`` is about correctness only."""

    def __init__(self, quick):
        self.lines, self.ok, self.quick = [], True, quick

    def ratio(self, key, ratio, note=''):
        target = TARGETS.get(key)
        verdict = ''
        if target is not None and not self.quick:
            verdict = f"(target >= {target}x: {'met' if ratio >= target else 'NOT met'})"
        line = f"{key[1]} {key[0]} {key[2] if key[0] == 'infer' else ''}".replace('  ', ' ')
        print(f'  speed-up {ratio:.2f}x {verdict} {note}'.rstrip())
        self.lines.append(f'{line:20s} {ratio:6.2f}x {verdict}')

    def check(self, what, passed):
        if not passed:
            print(f'  FAILED: {what}')
        self.ok &= bool(passed)


def _psnr(a, b):
    mse = float(((a - b) ** 2).mean())
    return float('inf') if mse == 0 else 10 * np.log10(1 / mse)


def psnr_rows(cfg):
    from ciisr_plugin.data.resize import bicubic_resize
    from ciisr_plugin.inference import upscale_tiled
    net = _build_net('LIIF').eval()
    for name in ('astronaut', 'coffee', 'chelsea'):
        gt_native = _photo(name, cfg['photo_crop'])
        h, w = gt_native.shape[:2]
        gt = gt_native.astype(np.float32) / 255
        lq = torch.from_numpy(bicubic_resize(gt_native, (h // 4, w // 4))).permute(2, 0, 1).unsqueeze(0)
        outs = {p: upscale_tiled(net, lq, (h, w), precision=p)[0].clamp(0, 1).permute(1, 2, 0).numpy()
                for p in ('fp32', 'bf16')}
        yield name, (w, h), _psnr(outs['fp32'], gt), _psnr(outs['bf16'], gt), float(
            np.abs(outs['bf16'] - outs['fp32']).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='small smoke run')
    parser.add_argument('--arch', nargs='+', default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument('--tasks', nargs='+', default=['infer', 'psnr', 'train', 'x30'],
                        choices=['infer', 'psnr', 'train', 'x30'])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=None, help='runs per implementation (default 3, quick 1)')
    parser.add_argument('--x30-precision', default='bf16', choices=['fp32', 'bf16'])
    parser.add_argument('--omp-wait-policy', default='', choices=['PASSIVE', 'ACTIVE', ''],
                        help="'' (default): leave OpenMP as users get it. PASSIVE makes idle threads sleep, "
                             'which helps on a machine busy with other processes but costs ~40%% on a quiet '
                             "one for code with many small parallel regions (measured on A-LIIF's decoder)")
    parser.add_argument('--malloc', default='tuned', choices=['tuned', 'default'],
                        help="tuned: both sides run with the glibc setting our CLI uses for the task "
                             "(ciisr_plugin.allocator); default: glibc's own")
    parser.add_argument('--child', nargs=4, metavar=('TASK', 'ARCH', 'IMPL', 'OUT'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats:
        cfg['repeats'] = args.repeats
    torch.set_num_threads(args.threads)
    if args.child:
        return _child_main(args, cfg)

    from ciisr_plugin.ops.cpu_features import cpu_has_amx
    print(f'torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY={args.omp_wait_policy or "(unset)"}, '
          f'malloc {args.malloc}, load average {os.getloadavg()}')
    print(f'CPU: {_cpu_model()}, AMX bf16: {cpu_has_amx()}')
    print(f'config: {cfg}')
    print('NOTE: weights are RANDOM (paper widths); speed and precision differences are what is measured.')
    report = Report(args.quick)  # quick sizes are too small for the targets to apply
    with tempfile.TemporaryDirectory() as tmpdir:
        for arch in args.arch:
            if 'infer' in args.tasks:
                res = _alternate('infer', arch, ('fp32', 'bf16', 'literal'), args, cfg, tmpdir)
                lit = res['literal']
                print(f"\n{arch} inference {cfg['lr']}x{cfg['lr']} -> x{cfg['scale']}")
                _print_runs((('ours fp32', res['fp32']), ('ours bf16', res['bf16']), ('literal fp32', lit)))
                for precision in ('fp32', 'bf16'):
                    diff = (res[precision]['out'] - lit['out']).abs().max().item()
                    report.ratio(('infer', arch, precision), lit['median_s'] / res[precision]['median_s'],
                                 f'[{precision}] max |ours - literal fp32| = {diff:.2e}')
                    if precision == 'fp32':
                        report.check(f'{arch} fp32 output within {EXACT_TOL}', diff <= EXACT_TOL)

            if 'train' in args.tasks:
                res = _alternate('train', arch, ('ours', 'literal'), args, cfg, tmpdir)
                ours, lit = res['ours'], res['literal']
                print(f"\n{arch} training step (batch {cfg['batch']}, {cfg['patch']}px, {cfg['queries']} queries, "
                      'L1 + backward + Adam)')
                _print_runs((('ours', ours), ('literal', lit)), 's/step')
                diff = (ours['out'] - lit['out']).abs().max().item()
                gdiff = (ours['grads'] - lit['grads']).abs().max().item()
                report.ratio(('train', arch, 'ours'), lit['median_s'] / ours['median_s'],
                             f'  first step: max |pred diff| {diff:.2e}, max |grad diff| {gdiff:.2e} '
                             f"(max |grad| {lit['grads'].abs().max().item():.2e})")
                report.check(f'{arch} training predictions within {EXACT_TOL}', diff <= EXACT_TOL)

        if 'psnr' in args.tasks:
            print('\nLIIF bf16 vs fp32 on skimage photos (bicubic x4 down, model x4 up; random weights, so PSNR vs '
                  'GT is low: the change is what matters)')
            for name, (w, h), p32, p16, max_diff in psnr_rows(cfg):
                print(f'  {name:10s} {w}x{h}: PSNR fp32 {p32:.4f} dB, bf16 {p16:.4f} dB, change {p32 - p16:+.4f} dB '
                      f'(target |change| <= {PSNR_TOL_DB}), max |bf16 - fp32| {max_diff:.4f}')
                report.check(f'{name}: bf16 PSNR change within {PSNR_TOL_DB} dB', abs(p32 - p16) <= PSNR_TOL_DB)

        if 'x30' in args.tasks:
            stats, _ = _run_child('x30', 'LIIF', args.x30_precision, args, tmpdir)
            side = cfg['x30_lr']
            print(f"\nLIIF x{cfg['x30_scale']} of a {side}x{side} photo ({args.x30_precision}, basicsr upscale run(), "
                  f"8-bit PNG out): exit {stats['exit']}, output {stats['shape']}, {stats['seconds']:.1f} s, "
                  f"peak RSS {stats['peak_rss_mib']:.0f} MiB (limit {RSS_LIMIT_MIB})")
            report.check('x30 within the RSS limit', stats['exit'] == 0 and stats['peak_rss_mib'] <= RSS_LIMIT_MIB)

    print(f'\nload average at the end {os.getloadavg()}')
    if report.lines:
        print('speed-ups vs the literal fp32 formulation:\n  ' + '\n  '.join(report.lines))
    print('correctness checks:', 'all passed' if report.ok else 'FAILED')
    return 0 if report.ok else 1


if __name__ == '__main__':
    sys.exit(main())
