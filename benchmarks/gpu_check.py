"""CUDA readiness in one run: the checks a machine with a GPU must pass, one summary line each.

    python benchmarks/gpu_check.py                      # on a CUDA machine (< 8 min on one GPU)
    python benchmarks/gpu_check.py --device cpu --quick # the script itself, small, on CPU (tested)

Checks (TF32 off, so CUDA float32 products are float32):
  fixtures  every authors' reference case in ``$CIISR_FIXTURES`` (default ``../shared/fixtures/authors``)
            through ``net(lq, coord, cell)`` and through the renderer, max error <= 1e-4; a case of
            a model this plugin does not implement yet is listed as such
  train     50 iterations of the LIIF demo recipe through ``basicsr train`` (``num_gpu: 1``):
            finishes, the L1 loss goes down
  tiling    ``upscale_tiled`` with small tiles == without tiles, LIIF and A-LIIF, <= 1e-5
  bf16      PSNR change bf16 makes on the bundled photos (x4 down, model x4 up), <= 0.05 dB
  speed     LIIF / A-LIIF 512x512 -> x4: ours vs the literal per-query formulation (chunks of
            30000 queries, as the authors' test script), and their max difference (<= 1e-4)

Random weights at the papers' widths where no trained checkpoint is needed (as bench_speed.py).
Exit status 0 when every check passed, 1 otherwise.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests'))  # literal_reference: the per-query formulation

FIXTURE_TOL, TILE_TOL, PSNR_TOL_DB = 1e-4, 1e-5, 0.05
FULL = dict(train_iters=50, tile_lr=96, tile=24, photo_crop=None, speed_lr=512, speed_repeats=3)
QUICK = dict(train_iters=12, tile_lr=24, tile=8, photo_crop=64, speed_lr=24, speed_repeats=1)
NETWORKS = {
    'LIIF': {'type': 'LIIF', 'encoder': {'type': 'EDSREncoder'}, 'hidden_list': [256] * 4},
    'ALIIF': {'type': 'ALIIF', 'encoder': {'type': 'EDSREncoder'}, 'num_basis': 10, 'basis_hidden': [16] * 4,
              'expansion_hidden': [256] * 4},
}


class Summary:
    def __init__(self):
        self.failed = 0

    def line(self, name, passed, text):
        self.failed += not passed
        print(f'[{"PASS" if passed else "FAIL"}] {name}: {text}', flush=True)


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _net(arch, device):
    from basicsr.archs import build_network
    torch.manual_seed(0)
    return build_network(dict(NETWORKS[arch])).to(device).eval()


def check_fixtures(summary, device, folder):
    from ciisr_plugin import load_model
    from ciisr_plugin.checkpoint import CheckpointError
    cases = sorted(folder.glob('*.pt'))
    if not cases:
        summary.line('fixtures', False, f'no *.pt in {folder} (set CIISR_FIXTURES)')
        return
    worst, done, unsupported = 0.0, [], []
    for path in cases:
        case = torch.load(path, weights_only=False)
        try:
            net = load_model(case['checkpoint'], device=device)
        except CheckpointError as err:
            unsupported.append(f'{path.name} ({" ".join(str(err).split())[:80]})')
            continue
        lq, coord, cell = (case[k].unsqueeze(0).to(device) for k in ('lr', 'coord', 'cell'))
        with torch.no_grad():
            direct = net(lq, coord, cell)[0]
            rendered = net.upscale(lq, size=tuple(case['out_hw']))[0].permute(1, 2, 0).reshape(-1, direct.shape[-1])
        expected = case['expected'].to(device)
        err = max((direct - expected).abs().max().item(), (rendered - expected).abs().max().item())
        worst = max(worst, err)
        done.append(f'{path.name} {err:.1e}')
    text = f'{len(done)} case(s), max error {worst:.1e} (<= {FIXTURE_TOL:g}): {", ".join(done)}'
    if unsupported:
        text += f'; not implemented yet: {", ".join(unsupported)}'
    summary.line('fixtures', bool(done) and worst <= FIXTURE_TOL, text)


def check_training(summary, device, cfg):
    iters = cfg['train_iters']
    num_gpu = 1 if device.type == 'cuda' else 0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, '-m', 'ciisr_plugin', 'train', '-opt', str(REPO / 'options/demo/train_liif_demo.yml'),
               '--force_yml', 'name=gpu_check', f'num_gpu={num_gpu}', f'train:total_iter={iters}',
               f'train:scheduler:milestones=[{iters}]', 'logger:print_freq=1', f'logger:save_checkpoint_freq={iters}',
               'val:val_freq=1000000', 'datasets:val:first_k=1', 'datasets:val:scales=[2]']
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    losses = [float(v) for v in re.findall(r'l_pix: ([\d.e+-]+)', log)]
    if proc.returncode != 0 or len(losses) != iters:
        tail = ' | '.join(log.strip().splitlines()[-3:])
        summary.line('train', False, f'basicsr train exited {proc.returncode}, {len(losses)} losses logged: {tail}')
        return
    k = max(1, iters // 5)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    summary.line('train', last < first, f'{iters} iterations of the LIIF demo recipe (num_gpu: {num_gpu}) in '
                 f'{seconds:.1f} s; L1 {first:.4f} -> {last:.4f} (mean of first / last {k})')


def check_tiling(summary, device, cfg):
    from ciisr_plugin.inference import upscale_tiled, tile_halo
    torch.manual_seed(1)
    n = cfg['tile_lr']
    lq = torch.rand(1, 3, n, n + 5, device=device)
    size = (round(n * 3.3), round((n + 5) * 2.7))
    texts, worst = [], 0.0
    for arch in NETWORKS:
        net = _net(arch, device)
        whole = upscale_tiled(net, lq, size, tile=None)
        tiled = upscale_tiled(net, lq, size, tile=cfg['tile'], halo=tile_halo(net))
        err = (whole - tiled).abs().max().item()
        worst = max(worst, err)
        texts.append(f'{arch} {err:.1e}')
    summary.line('tiling', worst <= TILE_TOL, f'{n}x{n + 5} -> {size[0]}x{size[1]}, tile {cfg["tile"]} vs whole '
                 f'image: {", ".join(texts)} (<= {TILE_TOL:g})')


def check_bf16(summary, device, cfg):
    from ciisr_plugin.data.demo_data import load_skimage_photo
    from ciisr_plugin.data.resize import bicubic_resize
    from ciisr_plugin.inference import upscale_tiled
    from ciisr_plugin.metrics.psnr_liif_metric import calculate_psnr_liif  # clamps to [0, 1]
    net = _net('LIIF', device)
    texts, worst = [], 0.0
    for name in ('astronaut', 'coffee', 'chelsea'):
        photo = load_skimage_photo(name)
        if cfg['photo_crop']:
            photo = np.ascontiguousarray(photo[:cfg['photo_crop'], :cfg['photo_crop']])
        h, w = photo.shape[:2]
        gt = torch.from_numpy(photo.astype(np.float32) / 255).permute(2, 0, 1).unsqueeze(0).to(device)
        lq = torch.from_numpy(bicubic_resize(photo, (h // 4, w // 4))).permute(2, 0, 1).unsqueeze(0).to(device)
        psnr = {p: calculate_psnr_liif(upscale_tiled(net, lq, (h, w), precision=p), gt) for p in ('fp32', 'bf16')}
        change = psnr['bf16'] - psnr['fp32']
        worst = max(worst, abs(change))
        texts.append(f'{name} {change:+.4f} dB')
    summary.line('bf16', worst <= PSNR_TOL_DB, f'PSNR bf16 - fp32 at x4: {", ".join(texts)} (|change| <= '
                 f'{PSNR_TOL_DB} dB; random LIIF weights)')


def check_speed(summary, device, cfg):
    import literal_reference
    from ciisr_plugin.archs.geometry import make_cell, make_coord
    from ciisr_plugin.inference import upscale_tiled
    n = cfg['speed_lr']
    out = 4 * n
    torch.manual_seed(2)
    lq = torch.rand(1, 3, n, n, device=device)
    coord = make_coord((out, out), device=device).unsqueeze(0)
    cell = make_cell((out, out), coord.shape[1], device=device).unsqueeze(0)
    literal = literal_reference.literal_forward
    texts, ok = [], True
    for arch in ('LIIF', 'ALIIF'):
        net = _net(arch, device)

        def ours():
            return upscale_tiled(net, lq, (out, out))

        def theirs():
            pred = literal(net, lq, coord, cell, chunk=literal_reference.AUTHORS_TEST_BATCH)
            return pred.view(1, out, out, -1).permute(0, 3, 1, 2)

        with torch.no_grad():
            upscale_tiled(net, lq[..., :16, :16], (64, 64))  # warm-up: kernels, allocator
            times, results = {}, {}
            for name, fn in (('ours', ours), ('literal', theirs)) * cfg['speed_repeats']:
                _sync(device)
                start = time.perf_counter()
                results[name] = fn()
                _sync(device)
                times.setdefault(name, []).append(time.perf_counter() - start)
        diff = (results['ours'] - results['literal']).abs().max().item()
        ok &= diff <= FIXTURE_TOL
        t_ours, t_lit = min(times['ours']), min(times['literal'])
        texts.append(f'{arch} {t_ours:.3f} s vs {t_lit:.3f} s = {t_lit / t_ours:.1f}x (max diff {diff:.1e})')
        del results
    summary.line('speed', ok, f'{n}x{n} -> x4, ours vs literal, best of {cfg["speed_repeats"]}: {"; ".join(texts)}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda', help="torch device (default cuda; 'cpu' to test the script)")
    parser.add_argument('--quick', action='store_true', help='small sizes (a smoke run of the script)')
    parser.add_argument('--fixtures', default=os.environ.get('CIISR_FIXTURES', str(REPO.parent / 'shared' /
                                                                               'fixtures' / 'authors')))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit('gpu_check: CUDA is not available on this machine (use --device cpu --quick to test the script)')
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import ciisr_plugin  # noqa: F401  (registers the archs)

    cfg = QUICK if args.quick else FULL
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    print(f'gpu_check on {name}, torch {torch.__version__}, {"quick" if args.quick else "full"} sizes', flush=True)
    summary = Summary()
    start = time.perf_counter()
    for check in (lambda: check_fixtures(summary, device, Path(args.fixtures)), lambda: check_training(
            summary, device, cfg), lambda: check_tiling(summary, device, cfg), lambda: check_bf16(
                summary, device, cfg), lambda: check_speed(summary, device, cfg)):
        check()
    print(f'gpu_check: {5 - summary.failed} of 5 checks passed in {time.perf_counter() - start:.0f} s')
    return 1 if summary.failed else 0


if __name__ == '__main__':
    sys.exit(main())
