"""A-LIIF: our engine vs the authors' literal per-query formulation, on CPU.

Inference: EDSR-baseline A-LIIF (K=10, paper widths, random init), 128x128 -> x4
(512x512). Training: one step at the authors' config (batch 8, 48px LR, 2304 queries,
L1 + backward + Adam). Each (implementation, task) runs in its own subprocess so its peak
RSS is its own; the parent compares outputs and prints the ratios. Wall and CPU (user +
sys) time are both printed: on a shared machine wall time swings by 2-5x between runs.

    python benchmarks/bench_aliif.py            # full run (several minutes on 2 cores)
    python benchmarks/bench_aliif.py --quick    # smoke run
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FULL = dict(lr=128, scale=4, batch=8, patch=48, queries=2304, train_scale=3)
QUICK = dict(lr=32, scale=4, batch=2, patch=24, queries=256, train_scale=3)


def _rss_now_mib():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return float('nan')


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed(fn, *args):
    """[wall seconds, CPU seconds, result] of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return [time.perf_counter() - start, time.process_time() - cpu, result]


def _stats(times, base_rss):
    # The fastest repetition: on a shared machine the others measure the neighbours too.
    best = min(times)
    return {'seconds': best[0], 'cpu_seconds': best[1], 'all_seconds': [round(t[0], 3) for t in times],
            'peak_rss_mib': _peak_rss_mib(), 'base_rss_mib': base_rss}


def _build_net():
    import ciisr_plugin  # noqa: F401  (registers the archs)
    from ciisr_plugin.archs.aliif_arch import ALIIF
    torch.manual_seed(0)
    return ALIIF(encoder={'type': 'EDSREncoder'}, num_basis=10)


def _grid(h, w):
    """Pixel-centre coordinates and cells of an h x w output, (1, h*w, 2) each."""
    from literal_reference import grid_centres
    coord = grid_centres(h, w, 'cpu').permute(1, 2, 0).reshape(1, -1, 2)
    cell = torch.empty_like(coord)
    cell[..., 0], cell[..., 1] = 2 / h, 2 / w
    return coord, cell


def _child_infer(impl, cfg):
    from literal_reference import AUTHORS_TEST_BATCH, literal_aliif_forward
    net = _build_net().eval()
    torch.manual_seed(1)
    lq = torch.rand(1, 3, cfg['lr'], cfg['lr'])
    size = cfg['lr'] * cfg['scale']
    coord, cell = _grid(size, size)

    def run(x, out_size, c, ce):
        if impl == 'ours':
            return net.upscale(x, size=(out_size, out_size), chunk_size=cfg.get('chunk_size'))
        pred = literal_aliif_forward(net, x, c, ce, chunk=AUTHORS_TEST_BATCH)
        return pred.view(1, out_size, out_size, -1).permute(0, 3, 1, 2)

    with torch.no_grad():
        run(lq[..., :8, :8], 16, *_grid(16, 16))  # warm-up (thread pools, allocator)
        base = _rss_now_mib()
        times = []
        for _ in range(cfg['repeat']):
            times.append(_timed(run, lq, size, coord, cell))
            out = times[-1].pop()
    return _stats(times, base), {'out': out}


def _child_train(impl, cfg):
    from literal_reference import literal_aliif_forward
    net = _build_net().train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    torch.manual_seed(1)
    b, p, q = cfg['batch'], cfg['patch'], cfg['queries']
    hr = p * cfg['train_scale']
    batches = []
    for _ in range(cfg['repeat'] + 1):
        lq = torch.rand(b, 3, p, p)
        coord_all, cell_all = _grid(hr, hr)
        idx = torch.stack([torch.randperm(hr * hr)[:q] for _ in range(b)])
        coord = coord_all[0][idx]
        cell = cell_all[0][idx]
        batches.append((lq, coord, cell, torch.rand(b, q, 3)))

    def step(lq, coord, cell, gt):
        pred = net(lq, coord, cell) if impl == 'ours' else literal_aliif_forward(net, lq, coord, cell)
        loss = (pred - gt).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters()])
        optimizer.step()
        return pred.detach(), loss.detach(), grads

    # The first step (identical parameters in both implementations) is the one compared;
    # later steps are timed (Adam turns float-level gradient differences into ~lr-sized
    # parameter differences, so their outputs would no longer be comparable).
    pred, loss, grads = step(*batches[0])
    base = _rss_now_mib()
    times = [_timed(step, *batch)[:2] for batch in batches[1:]]
    return _stats(times, base), {
        'out': pred, 'loss': loss, 'grads': grads}


def _run_child(impl, task, quick, threads, chunk_size, repeat, tmpdir):
    path = os.path.join(tmpdir, f'{impl}_{task}.pt')
    cmd = [sys.executable, os.path.abspath(__file__), '--child', impl, task, path, '--threads', str(threads)]
    if quick:
        cmd.append('--quick')
    if chunk_size:
        cmd += ['--chunk-size', str(chunk_size)]
    cmd += ['--repeat', str(repeat)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f'{impl}/{task} child failed:\n{res.stderr[-3000:]}')
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    return stats, torch.load(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='small smoke run')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--tasks', nargs='+', default=['infer', 'train'], choices=['infer', 'train'])
    parser.add_argument('--repeat', type=int, default=1, help='timed runs (steps) per measurement; the fastest counts')
    parser.add_argument('--chunk-size', type=int, default=None, help="our upscale's chunk (default: the model's)")
    parser.add_argument('--child', nargs=3, metavar=('IMPL', 'TASK', 'OUT'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = dict(QUICK if args.quick else FULL, chunk_size=args.chunk_size, repeat=max(1, args.repeat))
    torch.set_num_threads(args.threads)

    if args.child:
        impl, task, out_path = args.child
        stats, tensors = (_child_infer if task == 'infer' else _child_train)(impl, cfg)
        torch.save(tensors, out_path)
        print(json.dumps(stats))
        return

    print(f'torch {torch.__version__}, {args.threads} threads, config: {cfg}')
    with tempfile.TemporaryDirectory() as tmpdir:
        for task in args.tasks:
            results = {
                impl: _run_child(impl, task, args.quick, args.threads, args.chunk_size, args.repeat, tmpdir)
                for impl in ('ours', 'literal')
            }
            (ours, ours_t), (lit, lit_t) = results['ours'], results['literal']
            if task == 'infer':
                title = f"inference {cfg['lr']}x{cfg['lr']} -> x{cfg['scale']}"
            else:
                title = (f"training step (batch {cfg['batch']}, {cfg['patch']}px LR, {cfg['queries']} queries, "
                         'L1 + backward + Adam)')
            print(f'\n== {title}')
            for name, s in (('ours', ours), ('literal', lit)):
                print(f"  {name:8s} {s['seconds']:8.3f} s wall {s['cpu_seconds']:8.3f} s CPU   "
                      f"peak RSS {s['peak_rss_mib']:6.0f} MiB "
                      f"(+{s['peak_rss_mib'] - s['base_rss_mib']:.0f} over {s['base_rss_mib']:.0f} before the run)"
                      + (f"   runs: {s['all_seconds']}" if len(s['all_seconds']) > 1 else ''))
            print(f"  max |out diff|  {(ours_t['out'] - lit_t['out']).abs().max().item():.3e}")
            if task == 'train':
                print(f"  |loss diff|     {(ours_t['loss'] - lit_t['loss']).abs().item():.3e}")
                gdiff = (ours_t['grads'] - lit_t['grads']).abs().max().item()
                print(f"  max |grad diff| {gdiff:.3e} (max |grad| {lit_t['grads'].abs().max().item():.3e})")
            extra_ours = ours['peak_rss_mib'] - ours['base_rss_mib']
            extra_lit = lit['peak_rss_mib'] - lit['base_rss_mib']
            print(f"  speed-up {lit['seconds'] / ours['seconds']:.2f}x wall, "
                  f"{lit['cpu_seconds'] / ours['cpu_seconds']:.2f}x CPU;   peak-RSS ratio "
                  f"{lit['peak_rss_mib'] / ours['peak_rss_mib']:.2f}x (extra over base: "
                  f'{extra_lit / max(extra_ours, 1):.2f}x)')


if __name__ == '__main__':
    main()
