"""LIIF inference and training speed: our engine vs the literal per-query formulation, on CPU.

Weights are RANDOM (no trained checkpoint is available offline), at the paper's widths:
EDSR-baseline encoder + 4 x 256 MLP. Every timing runs in its own subprocess (so its peak RSS
is its own), and the implementations alternate (ours, literal, ours, literal, ...) so that
load from other processes on a shared machine hits both alike; medians are reported.

1. inference 128x128 -> x4: ``upscale_tiled`` fp32 vs ``literal_liif_forward`` (fp32, chunks
   of 30000 queries as the authors' test script); outputs must agree within 1e-5.
2. the same with ``precision='bf16'`` vs literal fp32; plus the PSNR change bf16 makes on
   skimage's bundled photos (bicubic x4 down, model x4 up): PSNR(fp32 vs GT) - PSNR(bf16 vs
   GT), and PSNR(bf16 vs fp32) directly.
3. x30 of a 256x256 photo (7680x7680 output) through ``basicsr upscale``'s run(): time and
   peak RSS of the process (limit 2 GB).
4. one training step (batch 16, 48 px LR patches, 2304 queries, L1 + backward + Adam).

    python benchmarks/bench_inference.py            # full run (~10+ min on 2 cores)
    python benchmarks/bench_inference.py --quick    # smoke run (~1 min)
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FULL = dict(lr=128, scale=4, batch=16, patch=48, queries=2304, train_scale=3, steps=2, repeats=3, x30_lr=256,
            x30_scale=30, photo_crop=None)
QUICK = dict(lr=32, scale=4, batch=2, patch=24, queries=256, train_scale=3, steps=1, repeats=1, x30_lr=32,
             x30_scale=30, photo_crop=96)
AUTHORS_TEST_CHUNK = 30000
MALLOC_TUNING = {'MALLOC_MMAP_THRESHOLD_': str(64 << 20), 'MALLOC_TRIM_THRESHOLD_': str(128 << 20)}
RSS_LIMIT_MIB = 2048


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


NETWORK_OPT = {'type': 'LIIF', 'encoder': {'type': 'EDSREncoder'}, 'hidden_list': [256] * 4}  # the paper's


def _build_net():
    import ciisr_plugin  # noqa: F401  (registers the archs)
    from basicsr.archs import build_network
    torch.manual_seed(0)
    return build_network(NETWORK_OPT)


def _grid(h, w):
    from ciisr_plugin.archs.implicit_query import make_cell, make_coord
    coord = make_coord((h, w)).unsqueeze(0)
    return coord, make_cell((h, w), coord.shape[1]).unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# children
def _child_infer(impl, cfg):
    from ciisr_plugin.inference import upscale_tiled
    from literal_reference import literal_liif_forward
    net = _build_net().eval()
    torch.manual_seed(1)
    lq = torch.rand(1, 3, cfg['lr'], cfg['lr'])
    size = cfg['lr'] * cfg['scale']

    def run(x, out):
        if impl == 'literal':
            coord, cell = _grid(out, out)
            pred = literal_liif_forward(net, x, coord, cell, chunk=AUTHORS_TEST_CHUNK)
            return pred.view(1, out, out, -1).permute(0, 3, 1, 2)
        return upscale_tiled(net, x, (out, out), precision='bf16' if impl == 'bf16' else 'fp32')

    with torch.no_grad():
        run(lq[..., :16, :16], 64)  # warm-up: thread pool, allocator, oneDNN kernels
        start = time.perf_counter()
        out = run(lq, size)
        seconds = time.perf_counter() - start
    return {'seconds': seconds, 'peak_rss_mib': _peak_rss_mib()}, {'out': out}


def _child_train(impl, cfg):
    from literal_reference import literal_liif_forward
    net = _build_net().train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    torch.manual_seed(1)
    b, p, q = cfg['batch'], cfg['patch'], cfg['queries']
    hr = p * cfg['train_scale']
    coord_all, cell_all = _grid(hr, hr)
    batches = []
    for _ in range(cfg['steps'] + 1):
        idx = torch.stack([torch.randperm(hr * hr)[:q] for _ in range(b)])
        batches.append((torch.rand(b, 3, p, p), coord_all[0][idx], cell_all[0][idx], torch.rand(b, q, 3)))

    def step(lq, coord, cell, gt):
        pred = net(lq, coord, cell) if impl == 'ours' else literal_liif_forward(net, lq, coord, cell)
        loss = (pred - gt).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return pred.detach()

    step(*batches[0])  # warm-up step, not timed
    start = time.perf_counter()
    for batch in batches[1:]:
        pred = step(*batch)
    seconds = (time.perf_counter() - start) / cfg['steps']
    return {'seconds': seconds, 'peak_rss_mib': _peak_rss_mib()}, {'out': pred}


def _photo(name, crop=None):
    from skimage import data
    img = getattr(data, name)()
    if crop:
        img = img[:crop, :crop]
    h, w = img.shape[0] // 4 * 4, img.shape[1] // 4 * 4
    return np.ascontiguousarray(img[:h, :w, :3])


def _child_x30(impl, cfg):
    import argparse as _argparse

    import cv2

    from ciisr_plugin.checkpoint import describe
    from ciisr_plugin.data.resize import bicubic_resize
    from ciisr_plugin.tools import upscale
    net = _build_net()
    side = cfg['x30_lr']
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, 'liif.pth')
        torch.save(describe(NETWORK_OPT, net.state_dict()), ckpt)
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
        code = upscale.run(args)
        seconds = time.perf_counter() - start
        shape = cv2.imread(dst, cv2.IMREAD_UNCHANGED).shape if code == 0 else None
    return {'seconds': seconds, 'peak_rss_mib': _peak_rss_mib(), 'exit': code, 'shape': shape}, {}


CHILDREN = {'infer': _child_infer, 'train': _child_train, 'x30': _child_x30}


def _run_child(impl, task, args, tmpdir):
    path = os.path.join(tmpdir, f'{impl}_{task}.pt')
    cmd = [sys.executable, os.path.abspath(__file__), '--child', impl, task, path, '--threads', str(args.threads)]
    if args.quick:
        cmd.append('--quick')
    env = dict(os.environ)
    if args.omp_wait_policy:
        env['OMP_WAIT_POLICY'] = args.omp_wait_policy
    if args.malloc == 'tuned':
        env.update(MALLOC_TUNING)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f'{impl}/{task} child failed:\n{res.stderr[-3000:]}')
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    return stats, torch.load(path)


def _alternate(task, impls, args, cfg, tmpdir):
    """Run each implementation ``repeats`` times, alternating; medians of time, max of RSS."""
    runs = {impl: [] for impl in impls}
    for _ in range(cfg['repeats']):
        for impl in impls:
            runs[impl].append(_run_child(impl, task, args, tmpdir))
    summary = {}
    for impl, results in runs.items():
        times = [stats['seconds'] for stats, _ in results]
        summary[impl] = {'median_s': statistics.median(times), 'all_s': times,
                         'peak_rss_mib': max(stats['peak_rss_mib'] for stats, _ in results),
                         'out': results[-1][1].get('out')}
    return summary


# ----------------------------------------------------------------------------------------------
# PSNR: bf16 vs fp32 on real photos
def _psnr(a, b):
    mse = float(((a - b) ** 2).mean())
    return float('inf') if mse == 0 else 10 * np.log10(1 / mse)


def psnr_table(cfg):
    from ciisr_plugin.data.resize import bicubic_resize
    from ciisr_plugin.inference import upscale_tiled
    net = _build_net().eval()
    rows = []
    for name in ('astronaut', 'coffee', 'chelsea'):
        gt_native = _photo(name, cfg['photo_crop'])
        h, w = gt_native.shape[:2]
        gt = gt_native.astype(np.float32) / 255
        lq = torch.from_numpy(bicubic_resize(gt_native, (h // 4, w // 4))).permute(2, 0, 1).unsqueeze(0)
        outs = {p: upscale_tiled(net, lq, (h, w), precision=p)[0].clamp(0, 1).permute(1, 2, 0).numpy()
                for p in ('fp32', 'bf16')}
        rows.append((name, (w, h), _psnr(outs['fp32'], gt), _psnr(outs['bf16'], gt), _psnr(outs['bf16'], outs['fp32']),
                     float(np.abs(outs['bf16'] - outs['fp32']).max())))
    return rows


# ----------------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='small smoke run')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=None, help='runs per implementation (default 3, quick 1)')
    parser.add_argument('--tasks', nargs='+', default=['infer', 'psnr', 'train', 'x30'],
                        choices=['infer', 'psnr', 'train', 'x30'])
    parser.add_argument('--x30-precision', default='bf16', choices=['fp32', 'bf16'],
                        help='precision of the x30 run (fp32 takes about 4x longer)')
    parser.add_argument('--omp-wait-policy', default='PASSIVE', choices=['PASSIVE', 'ACTIVE', ''],
                        help="OpenMP idle threads sleep (PASSIVE) instead of spinning: on a machine shared with "
                             "other processes, spinning threads stall every parallel region ('' = leave as is)")
    parser.add_argument('--malloc', default='tuned', choices=['tuned', 'default'],
                        help='tuned: glibc keeps freed buffers under 64 MB instead of unmapping them and faulting '
                             'them back in on the next allocation (what basicsr upscale does itself); applied to '
                             'both implementations alike')
    parser.add_argument('--child', nargs=3, metavar=('IMPL', 'TASK', 'OUT'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats:
        cfg['repeats'] = args.repeats
    torch.set_num_threads(args.threads)

    if args.child:
        impl, task, out_path = args.child
        stats, tensors = CHILDREN[task](impl, cfg)
        torch.save(tensors, out_path)
        print(json.dumps(stats))
        return

    print(f'torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY={args.omp_wait_policy or "(unset)"}, '
          f'malloc {args.malloc}, load average {os.getloadavg()}, config: {cfg}')
    print('NOTE: weights are RANDOM (paper widths); speed and bf16-vs-fp32 differences are what is measured.')
    ok = True
    with tempfile.TemporaryDirectory() as tmpdir:
        if 'infer' in args.tasks:
            res = _alternate('infer', ('ours', 'bf16', 'literal'), args, cfg, tmpdir)
            ours, bf16, lit = res['ours'], res['bf16'], res['literal']
            diff = (ours['out'] - lit['out']).abs().max().item()
            bf_diff = (bf16['out'] - lit['out']).abs().max().item()
            title = f"inference {cfg['lr']}x{cfg['lr']} -> x{cfg['scale']} (literal: chunks of {AUTHORS_TEST_CHUNK})"
            print(f'\n{title}')
            for name, r in (('ours fp32', ours), ('ours bf16', bf16), ('literal fp32', lit)):
                print(f"  {name:13s} median {r['median_s']:7.2f} s  (runs {', '.join(f'{t:.2f}' for t in r['all_s'])})"
                      f"  peak RSS {r['peak_rss_mib']:6.0f} MiB")
            fp32_ratio = lit['median_s'] / ours['median_s']
            bf16_ratio = lit['median_s'] / bf16['median_s']
            print(f'  speed-up fp32: {fp32_ratio:.2f}x (target >= 4x)   max |ours - literal| = {diff:.2e} '
                  f'(must be <= 1e-5)')
            print(f'  speed-up bf16: {bf16_ratio:.2f}x (target >= 15x)  max |bf16 - literal fp32| = {bf_diff:.2e}')
            ok &= diff <= 1e-5

        if 'psnr' in args.tasks:
            print('\nbf16 vs fp32 on skimage photos (bicubic x4 down, model x4 up; RANDOM weights, so PSNR vs GT '
                  'is low - the difference is what matters)')
            for name, (w, h), p32, p16, p_direct, max_diff in psnr_table(cfg):
                print(f'  {name:10s} {w}x{h}: PSNR fp32 {p32:.4f} dB, bf16 {p16:.4f} dB, change {p32 - p16:+.4f} dB '
                      f'(target |change| <= 0.05); PSNR(bf16 vs fp32) {p_direct:.2f} dB, max |diff| {max_diff:.4f}')

        if 'train' in args.tasks:
            res = _alternate('train', ('ours', 'literal'), args, cfg, tmpdir)
            ours, lit = res['ours'], res['literal']
            diff = (ours['out'] - lit['out']).abs().max().item()
            print(f"\ntraining step (batch {cfg['batch']}, {cfg['patch']}px, {cfg['queries']} queries, "
                  'L1 + backward + Adam)')
            for name, r in (('ours', ours), ('literal', lit)):
                print(f"  {name:13s} median {r['median_s']:7.2f} s/step  (runs "
                      f"{', '.join(f'{t:.2f}' for t in r['all_s'])})  peak RSS {r['peak_rss_mib']:6.0f} MiB")
            print(f"  speed-up: {lit['median_s'] / ours['median_s']:.2f}x (target >= 1.25x)   "
                  f'max |pred ours - literal| after {cfg["steps"] + 1} steps = {diff:.2e}')

        if 'x30' in args.tasks:
            stats, _ = _run_child(args.x30_precision, 'x30', args, tmpdir)
            side = cfg['x30_lr']
            print(f"\nx{cfg['x30_scale']} of a {side}x{side} photo ({args.x30_precision}, basicsr upscale run(), "
                  f"8-bit PNG out): exit {stats['exit']}, output {stats['shape']}, {stats['seconds']:.1f} s, "
                  f"peak RSS {stats['peak_rss_mib']:.0f} MiB (limit {RSS_LIMIT_MIB})")
            ok &= stats['exit'] == 0 and stats['peak_rss_mib'] <= RSS_LIMIT_MIB
    print(f'\nload average at the end {os.getloadavg()}')
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
