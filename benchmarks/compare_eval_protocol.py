"""Does our ``basicsr test`` give the LTE authors' PSNR (their ``test.py`` ``eval_psnr``)?

    mkdir -p /tmp/lte && git --git-dir=<mirror of jaewon-lee-b/lte> archive a8815d6 | tar -x -C /tmp/lte
    python benchmarks/compare_eval_protocol.py --authors /tmp/lte            # ~8 min on 2 busy cores
    python benchmarks/compare_eval_protocol.py --authors /tmp/lte --only lte --scales 4 6 --keep

Issue #22: the two must agree to <= 0.005 dB. Both sides evaluate the same authors-format
checkpoints ``{'model': {name, args, sd}}`` on the same HR photos (PNG crops of
``skimage.data``, prime sizes so no side is a multiple of any scale) at x2 x3 x4 x6 x8, in
'div2k' (RGB, shave s + 6) and 'benchmark' (Y, shave s) mode, with cell clipping beyond x4
(their ``--scale_max 4``) and, for SwinIR, with and without their ``--window 8`` padding.

* Theirs: one subprocess (``--side theirs``) imports their ``datasets``, ``models``, ``utils``
  and ``test.py`` from ``--authors`` and calls ``eval_psnr`` per case on a loader built as their
  test yaml does (``image-folder`` + ``sr-implicit-downsampled``, ``-fast`` for LTE+ with
  ``fast=True`` as their test-fast yamls). Their files are not edited; at run time only
  ``.cuda()`` becomes a no-op (CPU), a stand-in ``tensorboardX`` is registered if missing
  (imported by their utils.py for logging only), and while a SwinIR model is built their
  registry entry 'swinir' points at their ``SwinIR`` class, because their ``make_swinir()``
  ignores its arguments (always the full 11.9 M model; the fixture's is small).
* Ours: ``basicsr test -opt <tmp yml>`` per (model, mode), the yml being one of our recipes
  (``_base_: options/test_lte_*.yml``) pointed at the photos and the checkpoint
  (``network_g: ~`` takes the network from it); PSNR read from ``results/<name>/results.md``
  (4 decimals, as BasicSR logs it).

Checkpoints (written by this script, torch only; weights not trained except the LIIF encoder):
  lte     LTE head of tests/authors_data/lte/lte_edsr_baseline_x3.pt on the LIIF authors'
          trained EDSR-baseline encoder (zoo liif-edsr-baseline; coef/freq convs zero-padded
          from 16 to its 64 input channels). Output ~ bilinear skip + residual: image-like.
  ltep    the same for LTE+ (ltep_edsr_baseline_x2.5x3.5.pt: 3 layers, hidden 256).
  metasr  metasr_edsr_baseline_x2.6.pt made image-like: encoder channels 0-2 = the input, the
          weight predictor's bias selects them at the centre tap, its random part x 0.3, the
          EDSR body's output conv x 0.1 (random weights alone give ~4 dB noise).
  swinir  lte_swinir_x2.5x3.5.pt as is (small SwinIR, window 4; output image-like).
The ``clip`` column is their PSNR without cell clipping minus with it (how much a wrong clipping
would show); what the window padding changes shows in the SwinIR rows with window 8 vs 0.
Exit status 1 if any |ours - theirs| > --tol (0.005 dB).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'authors_data', 'lte')
SCALES = [2, 3, 4, 6, 8]
SCALE_MAX = 4  # their --scale_max (our recipes' val.cell_clip_scale_max)
# (skimage.data name, top, left, height, width): prime sizes, ~180 px (runtime ~ pixels)
PHOTOS = [('astronaut', 100, 150, 179, 191), ('chelsea', 60, 120, 173, 197), ('coffee', 120, 200, 181, 193)]
# one row per (model, window): checkpoint and our recipe per mode; `val` = extra val options
CONFIGS = [
    dict(model='lte', window=0, recipe={'div2k': 'test_lte_div2k.yml', 'benchmark': 'test_lte_benchmark.yml'}),
    dict(model='ltep', window=0, recipe={'div2k': 'test_lte_div2k.yml', 'benchmark': 'test_lte_benchmark.yml'}),
    dict(model='metasr', window=0, recipe={'div2k': 'test_metasr_div2k.yml', 'benchmark': 'test_lte_benchmark.yml'}),
    dict(model='swinir', window=8, recipe={'div2k': 'test_lte_swinir_div2k.yml', 'benchmark': 'test_lte_benchmark.yml'},
         val={'benchmark': {'pad_to_window': 8}}),  # as test_lte_benchmark.yml's header says for SwinIR
    dict(model='swinir', window=0, recipe={'div2k': 'test_lte_div2k.yml', 'benchmark': 'test_lte_benchmark.yml'}),
]
MODES = ('div2k', 'benchmark')


# ------------------------------------------------------------------------------ inputs
def write_photos(folder):
    import numpy as np
    from PIL import Image
    from skimage import data
    os.makedirs(folder, exist_ok=True)
    for name, top, left, h, w in PHOTOS:
        img = getattr(data, name)()[top:top + h, left:left + w, :3]
        assert img.shape[:2] == (h, w), (name, img.shape)
        Image.fromarray(np.ascontiguousarray(img)).save(os.path.join(folder, f'{name}.png'))


def write_checkpoints(folder, liif_path):
    """The four authors-format checkpoints (see the module docstring); returns {model: path}."""
    import torch

    def fixture(name):
        return torch.load(os.path.join(FIXTURES, name), map_location='cpu', weights_only=False)['checkpoint']['model']

    def on_liif_encoder(spec, last):  # LTE / LTE+ head of a fixture on the LIIF EDSR-baseline encoder
        liif = torch.load(liif_path, map_location='cpu', weights_only=False)['model']['sd']
        sd = {k: v.clone() for k, v in spec['sd'].items() if not k.startswith('encoder.')}
        sd.update({k: v.clone() for k, v in liif.items() if k.startswith('encoder.')})
        n_feat = liif['encoder.head.0.weight'].shape[0]
        for k in ('coef.weight', 'freq.weight'):
            w = sd[k]
            sd[k] = torch.cat([w, w.new_zeros(w.shape[0], n_feat - w.shape[1], *w.shape[2:])], 1)
        assert last in sd
        args = dict(spec['args'], encoder_spec={'name': 'edsr-baseline', 'args': {'no_upsampling': True}})
        return {'name': spec['name'], 'args': args, 'sd': sd}

    def metasr_image_like(spec):
        sd = {k: v.clone() for k, v in spec['sd'].items()}
        sd['encoder.head.0.weight'][:3] = 0
        sd['encoder.head.0.bias'][:3] = 0
        sd['encoder.body.2.weight'] *= 0.1
        sd['encoder.body.2.bias'] *= 0.1
        sd['imnet.layers.2.weight'] *= 0.3
        sd['imnet.layers.2.bias'] *= 0.3
        for c in range(3):
            sd['encoder.head.0.weight'][c, c, 1, 1] = 1.0  # feature c = input channel c (+ body residual)
            sd['imnet.layers.2.bias'][(c * 9 + 4) * 3 + c] += 1.0  # rgb c += feature c at the centre tap
        return {'name': spec['name'], 'args': spec['args'], 'sd': sd}

    models = {
        'lte': on_liif_encoder(fixture('lte_edsr_baseline_x3.pt'), 'imnet.layers.6.weight'),
        'ltep': on_liif_encoder(fixture('ltep_edsr_baseline_x2.5x3.5.pt'), 'layers.6.weight'),
        'metasr': metasr_image_like(fixture('metasr_edsr_baseline_x2.6.pt')),
        'swinir': fixture('lte_swinir_x2.5x3.5.pt'),
    }
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for key, spec in models.items():
        paths[key] = os.path.join(folder, f'{key}.pth')
        torch.save({'model': spec, 'epoch': 1}, paths[key])
    return paths


# ------------------------------------------------------------------------------ their side
def theirs_main(authors, plan_file):
    """Run in a subprocess: their eval_psnr for every case of the plan; prints one JSON line each."""
    import importlib.util
    import types
    import warnings

    import torch
    from torch.utils.data import DataLoader

    torch.Tensor.cuda = lambda self, *a, **k: self  # CPU: their .cuda() calls become no-ops
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        sys.modules['tensorboardX'] = types.SimpleNamespace(SummaryWriter=None)
    sys.path.insert(0, authors)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        import datasets  # their packages
        import models
        spec = importlib.util.spec_from_file_location('authors_test', os.path.join(authors, 'test.py'))
        authors_test = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(authors_test)
    registry = models.models.models
    data_norm = {'inp': {'sub': [0.5], 'div': [0.5]}, 'gt': {'sub': [0.5], 'div': [0.5]}}  # their test yamls'

    with open(plan_file) as f:
        plan = json.load(f)
    for case in plan:
        model_spec = torch.load(case['checkpoint'], map_location='cpu', weights_only=False)['model']
        old = registry['swinir']
        registry['swinir'] = sys.modules['models.swinir'].SwinIR  # their make_swinir() drops its args
        try:
            model = models.make(model_spec, load_sd=True)
        finally:
            registry['swinir'] = old
        fast = model_spec['name'] == 'lte-fast'  # their test-fast-*.yaml + test.py --fast
        s = case['scale']
        dataset = datasets.make({'name': 'image-folder', 'args': {'root_path': case['hr']}})
        wrapper = 'sr-implicit-downsampled-fast' if fast else 'sr-implicit-downsampled'
        dataset = datasets.make({'name': wrapper, 'args': {'scale_min': s}}, args={'dataset': dataset})
        loader = DataLoader(dataset, batch_size=1, num_workers=0)
        out = dict(case)
        for key, scale_max in (('psnr', SCALE_MAX), ('psnr_noclip', s)):  # scale_max = s: no clipping
            if key == 'psnr_noclip' and s <= SCALE_MAX:
                continue
            out[key] = authors_test.eval_psnr(loader, model, data_norm=data_norm, eval_type=f"{case['mode']}-{s}",
                                              eval_bsize=300000 if fast else 30000, window_size=case['window'],
                                              scale_max=scale_max, fast=fast)
        print(json.dumps(out), flush=True)


# ------------------------------------------------------------------------------ our side
def ours(cfg, mode, checkpoint, hr, scales, workdir, cli):
    """``basicsr test`` of our recipe for ``mode`` on the photos; returns {scale: psnr}."""
    import yaml

    from ciisr_plugin.config import load_options  # the merge basicsr test does (ours only: no authors' code here)

    name = f"cmp_{cfg['model']}_w{cfg['window']}_{mode}"
    run_dir = os.path.join(workdir, 'ours', name)
    os.makedirs(run_dir, exist_ok=True)
    opt = {
        '_base_': os.path.join(REPO, 'options', cfg['recipe'][mode]),
        'name': name, 'num_gpu': 0,
        'network_g': None,  # taken from the checkpoint
        'datasets': {'_delete_': True, 'test_1': {
            'name': 'photos', 'type': 'ScaledHRImageDataset', 'dataroot_gt': hr,
            'downsample_kernel': 'pil_bicubic', 'scales': scales, 'io_backend': {'type': 'disk'}}},
        'path': {'pretrain_network_g': checkpoint},
        'val': dict(cfg.get('val', {}).get(mode, {})),
    }
    yml = os.path.join(run_dir, f'{name}.yml')
    with open(yml, 'w') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    merged = load_options(yml)  # the protocol must be the one this row claims
    val, metric = merged['val'], merged['val']['metrics']
    assert (val.get('cell_clip_scale_max'), val.get('pad_to_window') or 0) == (SCALE_MAX, cfg['window']), val
    assert [m['mode'] for m in metric.values()] == [mode], metric
    proc = subprocess.run(cli + ['test', '-opt', yml], cwd=run_dir, capture_output=True, text=True)
    report = os.path.join(run_dir, 'results', name, 'results.md')
    if proc.returncode or not os.path.isfile(report):
        sys.exit(f'basicsr test failed for {name} (rc {proc.returncode}):\n{proc.stderr[-3000:]}')
    rows = re.findall(r'^\| photos \| x([\d.]+) \| ([-\d.]+|inf) \|', open(report).read(), re.M)
    return {float(s): float(p) for s, p in rows}


# ------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--authors', required=True, help='work tree of jaewon-lee-b/lte (a8815d6)')
    ap.add_argument('--workdir', help='where to write everything (default: a new temporary folder)')
    ap.add_argument('--keep', action='store_true', help='keep the work folder (kept anyway on failure)')
    ap.add_argument('--tol', type=float, default=0.005, help='largest |ours - theirs| in dB (issue #22)')
    ap.add_argument('--only', nargs='*', choices=sorted({c['model'] for c in CONFIGS}), help='models to run')
    ap.add_argument('--scales', nargs='*', type=int, default=SCALES)
    ap.add_argument('--side', choices=['theirs'], help=argparse.SUPPRESS)  # internal: the subprocess
    ap.add_argument('--plan', help=argparse.SUPPRESS)
    args = ap.parse_args()
    authors = os.path.abspath(args.authors)
    if args.side == 'theirs':
        return theirs_main(authors, args.plan)
    if not os.path.isfile(os.path.join(authors, 'test.py')):
        sys.exit(f'{authors}: not the LTE repository (no test.py)')

    start = time.time()
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix='cmp_eval_protocol_'))
    hr = os.path.join(workdir, 'hr')
    write_photos(hr)
    cli = [os.path.join(os.path.dirname(sys.executable), 'basicsr')]
    if not os.path.isfile(cli[0]):
        cli = [sys.executable, '-m', 'ciisr_plugin']
    liif = subprocess.run(cli + ['zoo', 'path', 'liif-edsr-baseline'], capture_output=True, text=True)
    if liif.returncode:
        sys.exit('the LIIF authors\' EDSR-baseline weights are not cached: basicsr zoo get liif-edsr-baseline\n'
                 + liif.stderr)
    ckpts = write_checkpoints(os.path.join(workdir, 'checkpoints'), liif.stdout.strip().splitlines()[-1])
    configs = [c for c in CONFIGS if not args.only or c['model'] in args.only]

    # theirs: every case in one subprocess
    plan = [dict(model=c['model'], mode=m, scale=s, window=c['window'], checkpoint=ckpts[c['model']], hr=hr)
            for c in configs for m in MODES for s in args.scales]
    plan_file = os.path.join(workdir, 'plan.json')
    with open(plan_file, 'w') as f:
        json.dump(plan, f)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--side', 'theirs', '--authors', authors,
                           '--plan', plan_file], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f'their side failed:\n{proc.stderr[-3000:]}')
    theirs = {(r['model'], r['window'], r['mode'], r['scale']): r
              for r in map(json.loads, proc.stdout.splitlines()) if r}
    t_theirs = time.time() - start

    # ours: one basicsr test per (model, window, mode), every scale in it
    print(f"{'model':7} {'mode':9} {'scale':>5} {'window':>6} {'theirs':>9} {'ours':>9} {'diff':>8} {'clip':>7}")
    worst, failed = 0.0, 0
    for c in configs:
        for m in MODES:
            got = ours(c, m, ckpts[c['model']], hr, args.scales, workdir, cli)
            for s in args.scales:
                r = theirs[(c['model'], c['window'], m, s)]
                diff = got[float(s)] - r['psnr']
                worst = max(worst, abs(diff))
                failed += abs(diff) > args.tol
                clip = f"{r['psnr_noclip'] - r['psnr']:+7.3f}" if 'psnr_noclip' in r else ''
                print(f"{c['model']:7} {m:9} {'x%d' % s:>5} {c['window']:>6} {r['psnr']:9.4f} {got[float(s)]:9.4f} "
                      f"{diff:+8.4f} {clip:>7}{'  FAIL' if abs(diff) > args.tol else ''}", flush=True)
    total = time.time() - start
    print(f'{len(plan)} cases, max |diff| {worst:.5f} dB (tol {args.tol}), {failed} over; '
          f'theirs {t_theirs:.0f} s, total {total:.0f} s; work folder {workdir}'
          + ('' if failed or args.keep or args.workdir else ' (removed)'))
    if not (failed or args.keep or args.workdir):
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
