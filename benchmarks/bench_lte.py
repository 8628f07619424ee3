"""Speed and memory of our LTE, LTE+ and MetaSR against their authors' own code, on CPU.

    mkdir -p /tmp/lte_e && git --git-dir=<mirror of jaewon-lee-b/lte> archive HEAD | tar -x -C /tmp/lte_e
    python benchmarks/bench_lte.py --authors /tmp/lte_e                        # everything (~25 min on 2 quiet cores)
    python benchmarks/bench_lte.py --authors /tmp/lte_e --tasks infer --models lte,metasr --repeats 3
    python benchmarks/bench_lte.py --authors /tmp/lte_e --quick                # smoke run (12 processes, ~2-6 min)

The authors' repository is imported from ``--authors`` at run time (as
``benchmarks/make_lte_fixtures.py`` does it: their ``.cuda()`` calls made identities, a
stand-in for ``tensorboardX``); nothing of it is copied here.

Weights are RANDOM, at the papers' sizes (EDSR-baseline encoder, 16 blocks of 64 features;
LTE: hidden_dim 256, MLP 3 x 256; LTE+: num_layer 3, hidden_dim 256; MetaSR: the authors'
defaults). The parent builds each model with the authors' ``models.make`` (seeded), saves
its spec and state dict as an authors' checkpoint ``{'model': {name, args, sd}}``, and both
sides load that file: theirs through ``models.make(spec, load_sd=True)``, ours through
``ciisr_plugin.load_model``. Inputs and training batches are made once by the parent and
read from files by both sides.

Every measurement runs in its own subprocess (the script re-invokes itself with ``--side
ours|theirs``), so the peak RSS it reports (``ru_maxrss``) is that side's alone; the sides
alternate (ours, theirs, ours, theirs, ...) so that load from other processes hits both
alike, and medians over those repeats are reported. Both sides run with the same thread
count and the glibc allocator setting our CLI uses for the task (``ciisr_plugin.ops.allocator``).

Run it on a quiet machine (the load average is printed at the start and the end). With other busy
processes on the cores, every small parallel region waits for a descheduled OpenMP thread, and the
authors' side, which runs many more small operations, slows far more than ours: measured on 2 AMD
EPYC cores, LTE inference came out 6.1x at a load average of 4-8 and 2.1x at 1.7 (their time 58 s
vs 7.9 s, ours 9.6 s vs 3.8 s).

Tasks:
  infer  128x128 -> x4 (512x512), fp32, no autograd. Theirs as their ``test.py`` runs it:
         LTE / MetaSR through their ``batched_predict`` (``gen_feat``, then ``query_rgb`` on
         chunks of eval_bsize = 30000 queries); LTE+ through their "fast" path, one call
         ``model(inp, coord (1, H, W, 2), cell (1, 2))``; their data_norm (x - 0.5) / 0.5 and
         the inverse on the output, no clamp. Ours: ``ciisr_plugin.inference.upscale_tiled(net,
         lq, (512, 512))``, what ``basicsr upscale`` / ``basicsr test`` run. A measurement is
         the mean over back-to-back runs filling ``--window`` seconds, after a small warm-up.
         The outputs must agree within 1e-4.
  train  one step: batch 16, 48x48 LR patches (scale 3), 2304 queries per patch, L1 loss,
         backward, Adam (lr 1e-4). LTE / MetaSR: 2304 random pixels of the 144x144 HR grid
         per patch (their ``sr-implicit-downsampled`` wrapper). LTE+: a 48x48 window of that
         grid, coord (B, 48, 48, 2) and cell (B, 2) for theirs (their ``-fast`` wrapper), the
         same queries flattened to (B, 2304, 2) for ours. Theirs computes the loss in their
         normalised space, ours in [0, 1] (so theirs = 2 x ours, for the loss and every
         gradient). The first step (same parameters on both sides) is compared: predictions
         and loss within 1e-4; the warm-up steps are not timed.
"""
import argparse
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from bench_child import run_child  # beside this script

HERE = os.path.dirname(os.path.abspath(__file__))

ENCODER = {'name': 'edsr-baseline', 'args': {'no_upsampling': True}}  # 16 blocks, 64 features
SPECS = {
    'lte': {'name': 'lte',
            'args': {'encoder_spec': ENCODER, 'hidden_dim': 256,
                     'imnet_spec': {'name': 'mlp', 'args': {'out_dim': 3, 'hidden_list': [256, 256, 256]}}}},
    'ltep': {'name': 'lte-fast', 'args': {'encoder_spec': ENCODER, 'num_layer': 3, 'hidden_dim': 256, 'out_dim': 3}},
    'metasr': {'name': 'metasr', 'args': {'encoder_spec': ENCODER}},
}
LABELS = {'lte': 'LTE', 'ltep': 'LTE+', 'metasr': 'MetaSR'}
TARGETS = {('infer', 'lte'): 3, ('infer', 'ltep'): 2, ('infer', 'metasr'): 3,
           ('train', 'lte'): 1.25, ('train', 'ltep'): 1.25, ('train', 'metasr'): 1.25}
TOL = 1e-4
AUTHORS_EVAL_BSIZE = 30000  # eval_bsize of their test configs

FULL = dict(lr=128, scale=4, window=20, batch=16, patch=48, train_scale=3, warmup=2, steps=3, repeats=3)
QUICK = dict(lr=24, scale=4, window=0, batch=2, patch=16, train_scale=3, warmup=1, steps=1, repeats=1)


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), 'unknown')
    except OSError:
        return 'unknown'


def _import_authors(path):
    """Their ``models`` package, ``make_coord`` and ``test.batched_predict`` (CPU, see make_lte_fixtures)."""
    sys.path.insert(0, HERE)
    from make_lte_fixtures import import_authors
    models, make_coord = import_authors(path)
    import test as authors_test  # their test.py (sys.path now starts with their tree)
    return models, make_coord, authors_test.batched_predict


def _set_allocator(args, task):
    """Our CLI's glibc setting for ``task``, on either side. The module is loaded from its file
    (it needs only ctypes), so the authors' side does not import our package and its RSS stays its own."""
    if args.malloc != 'tuned':
        return
    import importlib.util
    path = os.path.join(os.path.dirname(HERE), 'ciisr_plugin', 'ops', 'allocator.py')
    spec = importlib.util.spec_from_file_location('_ciisr_allocator', path)
    allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(allocator)
    allocator.keep_freed_buffers(allocator.TRAINING if task == 'train' else allocator.INFERENCE)


# ----------------------------------------------------------------------------------------------
# the parent's inputs: checkpoints, images, batches
def make_checkpoint(models, model, path):
    spec = SPECS[model]
    torch.manual_seed(0)  # their default inits draw from the global generator
    net = models.make(copy.deepcopy(spec))
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save({'model': {'name': spec['name'], 'args': copy.deepcopy(spec['args']), 'sd': sd}}, path)


def make_batches(make_coord, model, cfg, path):
    """The training batches (LR in [0, 1], GT in [0, 1]), in the layout each side takes."""
    gen = torch.Generator().manual_seed(1)
    b, p = cfg['batch'], cfg['patch']
    hr = p * cfg['train_scale']
    q = p * p
    coord_hr = make_coord((hr, hr), flatten=False)  # (hr, hr, 2)
    batches = []
    for _ in range(cfg['warmup'] + cfg['steps']):
        lq = torch.rand(b, 3, p, p, generator=gen)
        if model == 'ltep':  # a p x p window of the HR grid, as their 'sr-implicit-downsampled-fast'
            origins = torch.randint(0, hr - p + 1, (b, 2), generator=gen)
            coord = torch.stack([coord_hr[y:y + p, x:x + p] for y, x in origins.tolist()])  # (B, p, p, 2)
            cell = torch.full((b, 2), 2 / hr)
            gt = torch.rand(b, 3, p, p, generator=gen)
        else:  # q random HR pixels, as their 'sr-implicit-downsampled' with sample_q
            idx = torch.stack([torch.randperm(hr * hr, generator=gen)[:q] for _ in range(b)])
            coord = coord_hr.reshape(-1, 2)[idx]  # (B, q, 2)
            cell = torch.full((b, q, 2), 2 / hr)
            gt = torch.rand(b, q, 3, generator=gen)
        batches.append({'lq': lq, 'coord': coord, 'cell': cell, 'gt': gt})
    torch.save(batches, path)


def _ours_batch(batch):
    """Our layout of a batch: flat (B, N, 2) queries and (B, N, 3) GT."""
    coord, cell, gt = batch['coord'], batch['cell'], batch['gt']
    if coord.dim() == 4:
        b, h, w, _ = coord.shape
        coord = coord.reshape(b, h * w, 2)
        cell = cell.unsqueeze(1).expand(b, h * w, 2).contiguous()
        gt = gt.permute(0, 2, 3, 1).reshape(b, h * w, -1)
    return batch['lq'], coord, cell, gt


# ----------------------------------------------------------------------------------------------
# children: one side, one measurement, in a fresh process
def _timed_window(run, window):
    """Mean seconds of back-to-back ``run()`` calls filling at least ``window`` seconds."""
    runs, start = 0, time.perf_counter()
    while True:
        out = run()
        runs += 1
        if time.perf_counter() - start >= window:
            break
    return (time.perf_counter() - start) / runs, runs, out


def child_infer(args, cfg, files):
    lq = torch.load(files['lq'])
    size = lq.shape[-1] * cfg['scale']
    stats = {}
    if args.side == 'ours':
        import ciisr_plugin
        from ciisr_plugin.inference import upscale_tiled
        from ciisr_plugin.ops import fused_cpu
        net = ciisr_plugin.load_model(torch.load(files['ckpt']))
        stats['fused_kernels'] = str(fused_cpu.kernels_built())
        stats['base_rss_mib'] = _peak_rss_mib()

        def run(x, out_size):
            return upscale_tiled(net, x, (out_size, out_size))
    else:
        models, make_coord, batched_predict = _import_authors(args.authors)
        ckpt = torch.load(files['ckpt'])
        net = models.make(ckpt['model'], load_sd=True).eval()
        del ckpt
        stats['base_rss_mib'] = _peak_rss_mib()
        grids = {}

        def grid(out_size):  # their data loader's work, not timed
            if out_size not in grids:
                if args.model == 'ltep':
                    coord = make_coord((out_size, out_size), flatten=False).unsqueeze(0)
                    cell = torch.tensor([[2 / out_size, 2 / out_size]])
                else:
                    coord = make_coord((out_size, out_size)).unsqueeze(0)
                    cell = torch.ones_like(coord) * (2 / out_size)
                grids[out_size] = coord, cell
            return grids[out_size]

        def run(x, out_size):
            coord, cell = grid(out_size)
            inp = (x - 0.5) / 0.5
            if args.model == 'ltep':
                with torch.no_grad():
                    pred = net(inp, coord, cell)  # (1, 3, H, W)
                return pred * 0.5 + 0.5
            pred = batched_predict(net, inp, coord, cell, AUTHORS_EVAL_BSIZE) * 0.5 + 0.5  # (1, H*W, 3)
            return pred.view(1, out_size, out_size, 3).permute(0, 3, 1, 2)

    with torch.no_grad():
        run(lq[..., :16, :16], 64)  # warm-up: thread pool, allocator, oneDNN primitives
        seconds, runs, out = _timed_window(lambda: run(lq, size), cfg['window'])
    stats.update(seconds=seconds, runs=runs, peak_rss_mib=_peak_rss_mib())
    torch.save({'out': out.contiguous()}, files['out'])
    return stats


def child_train(args, cfg, files):
    batches = torch.load(files['batches'])
    stats = {}
    if args.side == 'ours':
        import ciisr_plugin
        net = ciisr_plugin.load_model(torch.load(files['ckpt'])).train()
        batches = [_ours_batch(b) for b in batches]

        def forward(lq, coord, cell, gt):
            pred = net(lq, coord, cell)
            return pred, F.l1_loss(pred, gt)
    else:
        models, _, _ = _import_authors(args.authors)
        net = models.make(torch.load(files['ckpt'])['model'], load_sd=True).train()
        batches = [(b['lq'], b['coord'], b['cell'], b['gt']) for b in batches]
        loss_fn = torch.nn.L1Loss()

        def forward(lq, coord, cell, gt):  # their train.py: data_norm on input and GT
            pred = net((lq - 0.5) / 0.5, coord, cell)
            return pred, loss_fn(pred, (gt - 0.5) / 0.5)
    stats['base_rss_mib'] = _peak_rss_mib()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step(batch):
        pred, loss = forward(*batch)
        optimizer.zero_grad()
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in net.named_parameters() if p.grad is not None}
        optimizer.step()
        return pred.detach(), loss.detach(), grads

    # the first step (identical parameters on both sides) is the one compared; it and the other
    # warm-up steps are not timed (the first steps page-fault in the heap the allocator keeps)
    pred, loss, grads = step(batches[0])
    for batch in batches[1:cfg['warmup']]:
        step(batch)
    times = []
    for batch in batches[cfg['warmup']:]:
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    stats.update(seconds=statistics.mean(times), step_s=times, peak_rss_mib=_peak_rss_mib())
    torch.save({'out': pred, 'loss': loss, 'grads': grads}, files['out'])
    return stats


def child_main(args, cfg):
    torch.set_num_threads(args.threads)
    _set_allocator(args, args.task)
    files = json.loads(args.files)
    stats = (child_infer if args.task == 'infer' else child_train)(args, cfg, files)
    print(json.dumps(stats))
    return 0


# ----------------------------------------------------------------------------------------------
# parent
def run_side(args, task, model, side, files, tmpdir, index):
    out = os.path.join(tmpdir, f'{task}_{model}_{side}_{index}.pt')
    cmd = [sys.executable, os.path.abspath(__file__), '--side', side, '--task', task, '--models', model,
           '--authors', args.authors, '--threads', str(args.threads), '--malloc', args.malloc,
           '--files', json.dumps(dict(files, out=out))]
    cmd += ['--quick'] if args.quick else []
    cmd += ['--repeats', str(args.repeats)] if args.repeats else []
    cmd += ['--window', str(args.window)] if args.window is not None else []
    stats, tensors = run_child(cmd, out, f'{task}/{model}/{side}', args.omp_wait_policy)
    os.remove(out)
    return stats, tensors


def alternate(args, cfg, task, model, files, tmpdir):
    """Both sides ``repeats`` times, alternating; per side: all runs' stats and the last tensors."""
    runs = {'ours': [], 'theirs': []}
    for i in range(cfg['repeats']):
        for side in ('ours', 'theirs'):
            stats, tensors = run_side(args, task, model, side, files, tmpdir, i)
            runs[side].append((stats, tensors))
            print(f"    [{task} {LABELS[model]} {side} #{i + 1}] {stats['seconds']:.2f} s"
                  + (f" (mean of {stats['runs']})" if stats.get('runs', 1) > 1 else '')
                  + f", peak RSS {stats['peak_rss_mib']:.0f} MiB", flush=True)
    out = {}
    for side, results in runs.items():
        times = [s['seconds'] for s, _ in results]
        out[side] = dict(median=statistics.median(times), times=times,
                         rss=max(s['peak_rss_mib'] for s, _ in results),
                         base_rss=max(s['base_rss_mib'] for s, _ in results),
                         stats=results[-1][0], tensors=results[-1][1])
    return out


def _verdict(task, model, ratio, quick):
    target = TARGETS.get((task, model))
    if target is None or quick:
        return '(quick sizes: no target)' if quick else ''
    return f"(target >= {target}x: {'met' if ratio >= target else 'NOT met'})"


def _times(res):
    """'theirs 1.00, 1.10; ours 0.50, 0.52': every run's seconds, per side."""
    return '; '.join(f"{side} {', '.join(f'{t:.2f}' for t in res[side]['times'])}" for side in ('theirs', 'ours'))


def report_infer(args, cfg, model, res, summary):
    ours, theirs = res['ours'], res['theirs']
    diff = (ours['tensors']['out'] - theirs['tensors']['out']).abs().max().item()
    ratio = theirs['median'] / ours['median']
    lr, out = cfg['lr'], cfg['lr'] * cfg['scale']
    how = 'fast path, one call' if model == 'ltep' else f'batched_predict {AUTHORS_EVAL_BSIZE}'
    verdict = _verdict('infer', model, ratio, args.quick)
    line = (f"{LABELS[model]} infer {lr}x{lr}->{out}x{out} fp32: {ratio:.2f}x {verdict}"
            f" | theirs ({how}) {theirs['median']:.2f} s, ours (upscale_tiled) {ours['median']:.2f} s"
            f" [medians of {len(ours['times'])}; {_times(res)}]"
            f" | max |diff| {diff:.1e} (tol {TOL:g})"
            f" | peak RSS theirs {theirs['rss']:.0f} MiB, ours {ours['rss']:.0f} MiB"
            f" (after loading: {theirs['base_rss']:.0f} / {ours['base_rss']:.0f})")
    print(line, flush=True)
    summary.append(line)
    return diff <= TOL


def report_train(args, cfg, model, res, summary):
    from ciisr_plugin.checkpoint import convert_authors_checkpoint
    ours, theirs = res['ours'], res['theirs']
    o, t = ours['tensors'], theirs['tensors']
    pred_t = t['out'] * 0.5 + 0.5
    if pred_t.dim() == 4:  # LTE+: (B, 3, H, W) -> (B, H*W, 3)
        pred_t = pred_t.permute(0, 2, 3, 1).reshape(pred_t.shape[0], -1, pred_t.shape[1])
    pdiff = (o['out'] - pred_t).abs().max().item()
    ldiff = abs(2 * o['loss'].item() - t['loss'].item())
    # their gradients under our parameter names (the checkpoint converter's key rules)
    spec = SPECS[model]
    _, their_grads = convert_authors_checkpoint({'model': {'name': spec['name'], 'args': spec['args'],
                                                           'sd': t['grads']}})
    common = sorted(set(their_grads) & set(o['grads']))
    gdiff = max((2 * o['grads'][k] - their_grads[k]).abs().max().item() for k in common)
    gmax = max(their_grads[k].abs().max().item() for k in common)
    ratio = theirs['median'] / ours['median']
    b, p = cfg['batch'], cfg['patch']
    verdict = _verdict('train', model, ratio, args.quick)
    line = (f"{LABELS[model]} train step B{b} {p}px {p * p}q: {ratio:.2f}x {verdict}"
            f" | theirs {theirs['median']:.2f} s, ours {ours['median']:.2f} s"
            f" [medians of {len(ours['times'])}, each the mean of {cfg['steps']} steps; {_times(res)}]"
            f" | first step: max |pred diff| {pdiff:.1e}, |loss diff| {ldiff:.1e} (loss {t['loss'].item():.4f}),"
            f" max |grad diff| {gdiff:.1e} over {len(common)}/{len(their_grads)} params (max |grad| {gmax:.1e})"
            f" | peak RSS theirs {theirs['rss']:.0f} MiB, ours {ours['rss']:.0f} MiB")
    print(line, flush=True)
    summary.append(line)
    return pdiff <= TOL and ldiff <= TOL


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--authors', required=True, help="work tree of jaewon-lee-b/lte (git archive of the mirror)")
    parser.add_argument('--quick', action='store_true', help='small smoke run: 24x24 -> x4, batch 2 of 16px, 1 repeat')
    parser.add_argument('--tasks', default='infer,train', help='comma-separated: infer, train')
    parser.add_argument('--models', default='lte,ltep,metasr', help='comma-separated: lte, ltep, metasr')
    parser.add_argument('--repeats', type=int, default=None, help='alternating runs per side (default 3, quick 1)')
    parser.add_argument('--window', type=float, default=None,
                        help='seconds of back-to-back inference runs one measurement averages (default 20, quick 0)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--omp-wait-policy', default='', choices=['PASSIVE', 'ACTIVE', ''],
                        help="'' (default): leave OpenMP as users get it. PASSIVE makes idle threads sleep: on a "
                             'machine shared with other busy processes every small parallel region otherwise waits '
                             "for a descheduled thread (measured here, the load ~4 on 2 cores: one Adam step of "
                             "these models 2.1 s by default, 12 ms with PASSIVE), on both sides alike")
    parser.add_argument('--malloc', default='tuned', choices=['tuned', 'default'],
                        help="tuned: both sides run with the glibc setting our CLI uses for the task; "
                             "default: glibc's own")
    # a child's arguments
    parser.add_argument('--side', choices=['ours', 'theirs'], help=argparse.SUPPRESS)
    parser.add_argument('--task', choices=['infer', 'train'], help=argparse.SUPPRESS)
    parser.add_argument('--files', help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats:
        cfg['repeats'] = args.repeats
    if args.window is not None:
        cfg['window'] = args.window
    tasks = [t for t in args.tasks.split(',') if t]
    model_names = [m for m in args.models.split(',') if m]
    for name, given, known in (('task', tasks, ('infer', 'train')), ('model', model_names, SPECS)):
        bad = [x for x in given if x not in known]
        if bad:
            parser.error(f"unknown {name}(s) {', '.join(bad)} (known: {', '.join(known)})")
    if args.side:
        args.model = model_names[0]
        return child_main(args, cfg)

    torch.set_num_threads(args.threads)
    models, make_coord, _ = _import_authors(args.authors)
    import ciisr_plugin  # noqa: F401  (after the authors' import, which wants no top-level 'models' / 'utils')
    from ciisr_plugin.ops import fused_cpu
    print(f'torch {torch.__version__}, {args.threads} threads, malloc {args.malloc}, '
          f'OMP_WAIT_POLICY={args.omp_wait_policy or os.environ.get("OMP_WAIT_POLICY", "(unset)")}, '
          f'load average {os.getloadavg()}')
    print(f'CPU: {_cpu_model()}; our fused kernels: {fused_cpu.kernels_built()}')
    print(f'config: {cfg}')
    print('NOTE: weights are RANDOM (paper sizes); speed and agreement are what is measured.', flush=True)
    summary, ok = [], True
    with tempfile.TemporaryDirectory() as tmpdir:
        for model in model_names:
            files = {'ckpt': os.path.join(tmpdir, f'{model}_ckpt.pth')}
            make_checkpoint(models, model, files['ckpt'])
            if 'infer' in tasks:
                files['lq'] = os.path.join(tmpdir, 'lq.pt')
                torch.save(torch.rand(1, 3, cfg['lr'], cfg['lr'], generator=torch.Generator().manual_seed(2)),
                           files['lq'])
                print(f"\n{LABELS[model]} inference {cfg['lr']}x{cfg['lr']} -> x{cfg['scale']}", flush=True)
                ok &= report_infer(args, cfg, model, alternate(args, cfg, 'infer', model, files, tmpdir), summary)
            if 'train' in tasks:
                files['batches'] = os.path.join(tmpdir, f'{model}_batches.pt')
                make_batches(make_coord, model, cfg, files['batches'])
                print(f"\n{LABELS[model]} training step", flush=True)
                ok &= report_train(args, cfg, model, alternate(args, cfg, 'train', model, files, tmpdir), summary)
    print(f'\nload average at the end {os.getloadavg()}')
    print('summary (ratio = theirs / ours):\n  ' + '\n  '.join(summary))
    print('correctness checks:', 'all passed' if ok else 'FAILED')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
