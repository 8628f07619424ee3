"""Make the LTE-family reference fixtures by running the LTE authors' own code on CPU.

    git --git-dir=<mirror of jaewon-lee-b/lte> archive a8815d6 | tar -x -C /tmp/lte
    python benchmarks/make_lte_fixtures.py --authors /tmp/lte --out tests/authors_data/lte

The authors' repository is imported from ``--authors`` at run time; nothing of it is
copied here. Their modules call ``.cuda()``: before importing them this script makes
``torch.Tensor.cuda`` and ``nn.Module.cuda`` return ``self`` (their files are not edited).
Their ``utils.py`` imports ``tensorboardX`` at module level only for logging; when that
package is missing a stand-in module is registered so ``make_coord`` can be imported.

Each case builds the model through the authors' ``models.make(spec)``, perturbs every
parameter deterministically, runs the authors' forward pass in float32 under
``torch.no_grad()`` with their configs' data normalisation (input ``(lr - 0.5) / 0.5``,
output ``y * 0.5 + 0.5``, no clamp) and saves one ``.pt`` file in the format of the shared
fixtures (see ``tests/authors_data/lte/README.md``).

``--check`` re-runs every case and compares against the files already in ``--out``
(bit-identical ``expected``), and ``--diag`` prints conditioning diagnostics (float64 rerun
of the same forward pass, size of the learned part vs. the skip).
"""
import argparse
import contextlib
import copy
import math
import os
import sys
import types
import warnings

import numpy as np
import torch
import torch.nn as nn

# ---------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------

EDSR_SMALL = {'name': 'edsr-baseline',
              'args': {'no_upsampling': True, 'n_resblocks': 2, 'n_feats': 16}}

SWINIR_SMALL = {'name': 'swinir',
                'args': {'no_upsampling': True, 'img_size': 48, 'embed_dim': 24,
                         'depths': [2, 2], 'num_heads': [2, 2], 'window_size': 4,
                         'mlp_ratio': 2.0}}


def _lte(encoder, hidden_dim=64, hidden_list=(64, 64, 64)):
    return {'name': 'lte',
            'args': {'encoder_spec': copy.deepcopy(encoder),
                     'imnet_spec': {'name': 'mlp',
                                    'args': {'out_dim': 3, 'hidden_list': list(hidden_list)}},
                     'hidden_dim': hidden_dim}}


def _ltep(encoder, num_layer=3, hidden_dim=256):
    return {'name': 'lte-fast',
            'args': {'encoder_spec': copy.deepcopy(encoder), 'num_layer': num_layer,
                     'hidden_dim': hidden_dim, 'out_dim': 3}}


def _metasr(encoder):
    return {'name': 'metasr', 'args': {'encoder_spec': copy.deepcopy(encoder)}}


# photo: (skimage.data name, top, left, crop height, crop width) -> bicubic to in_hw
CASES = [
    dict(file='lte_edsr_baseline_x3.pt', seed=101, spec=_lte(EDSR_SMALL),
         photo=('chelsea', 40, 120, 180, 220), in_hw=(18, 22), out_hw=(54, 66)),
    dict(file='lte_rdn_x2.5.pt', seed=102,
         spec=_lte({'name': 'rdn', 'args': {'no_upsampling': True, 'G0': 16, 'RDNconfig': 'A'}}),
         photo=('coffee', 60, 180, 256, 320), in_hw=(16, 20), out_hw=(40, 50),
         float16=True),
    dict(file='lte_swinir_x2.5x3.5.pt', seed=103, spec=_lte(SWINIR_SMALL),
         photo=('astronaut', 20, 150, 216, 264), in_hw=(18, 22), out_hw=(45, 77)),
    dict(file='ltep_edsr_baseline_x2.5x3.5.pt', seed=104, spec=_ltep(EDSR_SMALL, 3, 256),
         photo=('rocket', 100, 200, 200, 260), in_hw=(20, 26), out_hw=(50, 91)),
    dict(file='ltep_l2_edsr_baseline_x4.pt', seed=105, spec=_ltep(EDSR_SMALL, 2, 64),
         photo=('astronaut', 240, 280, 150, 180), in_hw=(15, 18), out_hw=(60, 72)),
    dict(file='metasr_edsr_baseline_x2.6.pt', seed=106, spec=_metasr(EDSR_SMALL),
         photo=('coffee', 120, 40, 200, 250), in_hw=(20, 25), out_hw=(52, 65)),
    dict(file='metasr_edsr_baseline_x2x3.5.pt', seed=107, spec=_metasr(EDSR_SMALL),
         photo=('chelsea', 20, 60, 180, 200), in_hw=(18, 20), out_hw=(36, 70)),
    dict(file='lte_edsr_baseline_x6.pt', seed=108, spec=_lte(EDSR_SMALL),
         photo=('astronaut', 0, 120, 320, 320), in_hw=(40, 40), out_hw=(240, 240)),
    # RDNkSize sizes only RDN's shallow and global-fusion convs: its dense layers stay 3x3
    dict(file='metasr_rdn_k5_x2.8.pt', seed=109,
         spec=_metasr({'name': 'rdn', 'args': {'no_upsampling': True, 'G0': 8, 'RDNkSize': 5, 'RDNconfig': 'A'}}),
         photo=('rocket', 60, 120, 220, 260), in_hw=(14, 17), out_hw=(39, 48), float16=True),
]


# ---------------------------------------------------------------------------------------
# importing the authors' code
# ---------------------------------------------------------------------------------------

def _cpu_cuda(self, *args, **kwargs):
    return self


def import_authors(path):
    """Import the authors' ``models`` package and ``make_coord`` from ``path``."""
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, 'models', 'lte.py')):
        raise SystemExit(f'{path} does not look like the LTE repository (no models/lte.py)')
    torch.Tensor.cuda = _cpu_cuda
    nn.Module.cuda = _cpu_cuda
    try:
        import tensorboardX  # noqa: F401  (their utils.py imports it for logging only)
    except ImportError:
        stub = types.ModuleType('tensorboardX')
        stub.SummaryWriter = None
        sys.modules['tensorboardX'] = stub
    for name in ('models', 'utils'):
        if name in sys.modules:
            raise SystemExit(f'a module named {name!r} is already imported; run this script alone')
    sys.path.insert(0, path)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        import models  # their package
        import utils   # their utils.py
    return models, utils.make_coord


@contextlib.contextmanager
def small_swinir(models):
    """Let ``models.make`` build SwinIR with size arguments.

    Their registered ``make_swinir(no_upsampling=True)`` always returns the full
    ``SwinIR()``; their ``SwinIR.__init__`` itself takes the sizes (and swallows
    ``no_upsampling`` in ``**kwargs``), so the registry entry is pointed at the class for
    the duration of the build and restored afterwards.
    """
    registry = models.models.models
    old = registry['swinir']
    registry['swinir'] = sys.modules['models.swinir'].SwinIR
    try:
        yield
    finally:
        registry['swinir'] = old


# ---------------------------------------------------------------------------------------
# inputs, weights
# ---------------------------------------------------------------------------------------

def load_photo(name, top, left, ch, cw, hw):
    from PIL import Image
    from skimage import data
    img = getattr(data, name)()[top:top + ch, left:left + cw, :3]
    assert img.shape[:2] == (ch, cw), (name, img.shape)
    img = Image.fromarray(np.ascontiguousarray(img)).resize((hw[1], hw[0]), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def perturb(model, seed, float16=False):
    """Add seeded Gaussian noise to every parameter (buffers are left alone).

    1-d parameters (biases, LayerNorm scales/shifts) get sigma 0.05, so no zero-initialised
    bias can hide a term; tensors with more dimensions get sigma 0.3 / sqrt(fan_in)
    (fan_in = numel / out), comparable to their default init, so deep encoders (20 RDN
    blocks) do not blow up. With ``float16`` every parameter is then rounded to the nearest
    float16 value (exactly representable, so saving it as float16 loses nothing).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() <= 1:
                sigma = 0.05
            else:
                sigma = 0.3 / math.sqrt(p[0].numel())
            p.add_(sigma * noise)
            if float16:
                p.copy_(p.half().float())


def grid(make_coord, out_hw):
    """Query coordinates and cells exactly as the authors' data wrappers make them."""
    coord = make_coord(out_hw)  # (N, 2) float32, row-major, (row, col)
    cell = torch.ones_like(coord)
    cell[:, 0] *= 2 / out_hw[0]
    cell[:, 1] *= 2 / out_hw[1]
    return coord, cell


def run_case(models, make_coord, case, dtype=torch.float32, return_model=False):
    spec = case['spec']
    torch.manual_seed(case['seed'])  # their inits draw from the global generator
    with small_swinir(models), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = models.make(copy.deepcopy(spec))
    perturb(model, case['seed'] + 1000, case.get('float16', False))
    model.eval()

    lr = load_photo(*case['photo'], case['in_hw'])
    coord, cell = grid(make_coord, case['out_hw'])
    out_h, out_w = case['out_hw']

    if dtype != torch.float32:
        model = model.to(dtype)
    inp = ((lr.unsqueeze(0) - 0.5) / 0.5).to(dtype)  # their data_norm {sub: 0.5, div: 0.5}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if spec['name'] == 'lte-fast':
            # LTE+ takes a (B, H, W, 2) coordinate grid and one (B, 2) cell
            c4 = coord.view(1, out_h, out_w, 2).to(dtype)
            c2 = torch.tensor([[2 / out_h, 2 / out_w]], dtype=torch.float32).to(dtype)
            y = model(inp, c4, c2)  # (1, 3, H, W)
            y = y[0].permute(1, 2, 0).reshape(-1, 3)
        else:
            y = model(inp, coord.unsqueeze(0).to(dtype), cell.unsqueeze(0).to(dtype))[0]
    expected = y * 0.5 + 0.5  # their gt data_norm, not clamped

    sd = model.state_dict()
    if case.get('float16', False):
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    sd = {k: v.detach().clone() for k, v in sd.items()}
    fixture = {
        'checkpoint': {'model': {'name': spec['name'], 'args': copy.deepcopy(spec['args']),
                                 'sd': sd},
                       'epoch': 1},
        'lr': lr,
        'coord': coord,
        'cell': cell,
        'out_hw': (out_h, out_w),
        'expected': expected,
    }
    return (fixture, model, inp) if return_model else fixture


@contextlib.contextmanager
def float64_grids():
    """Make the authors' modules build their latent grids in float64 (diagnostics only)."""
    mods = [sys.modules[m] for m in ('models.lte', 'models.ltep', 'models.misc')]
    olds = [m.make_coord for m in mods]
    for m, old in zip(mods, olds):
        m.make_coord = lambda *a, _old=old, **k: _old(*a, **k).double()
    try:
        yield
    finally:
        for m, old in zip(mods, olds):
            m.make_coord = old


def diagnostics(models, make_coord, case, fixture):
    """Float64 rerun of the same forward pass and the size of the non-skip part."""
    with float64_grids():
        f64 = run_case(models, make_coord, case, dtype=torch.float64)['expected']
    e = fixture['expected']
    dev = (f64 - e.double()).abs()
    msg = (f"  range [{e.min():.3f}, {e.max():.3f}]  float64 vs float32: max {dev.max():.2e}"
           f" (>1e-5 at {(dev > 1e-5).sum().item()} of {dev.numel()})")
    spec = case['spec']
    if spec['name'] in ('lte', 'lte-fast'):
        import torch.nn.functional as F
        lr = fixture['lr'].unsqueeze(0)
        inp = (lr - 0.5) / 0.5
        skip = F.grid_sample(inp, fixture['coord'].flip(-1).view(1, 1, -1, 2), mode='bilinear',
                             padding_mode='border', align_corners=False)[0, :, 0].t()
        learned = (e - 0.5) / 0.5 - skip
        msg += f"  learned part: std {learned.std():.3f}, max |.| {learned.abs().max():.3f}"
    print(msg)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--authors', required=True, help='work tree of jaewon-lee-b/lte (a8815d6)')
    ap.add_argument('--out', default='tests/authors_data/lte')
    ap.add_argument('--only', nargs='*', help='file names of the cases to run (default: all)')
    ap.add_argument('--check', action='store_true',
                    help='do not write; compare with the files in --out (bit-identical)')
    ap.add_argument('--diag', action='store_true', help='print conditioning diagnostics')
    args = ap.parse_args()

    torch.set_num_threads(1)  # one thread: no thread-count-dependent reduction order
    models, make_coord = import_authors(args.authors)
    os.makedirs(args.out, exist_ok=True)
    failed = 0
    for case in CASES:
        if args.only and case['file'] not in args.only:
            continue
        fixture = run_case(models, make_coord, case)
        path = os.path.join(args.out, case['file'])
        n_params = sum(v.numel() for v in fixture['checkpoint']['model']['sd'].values())
        if args.check:
            old = torch.load(path, weights_only=False)
            same = (torch.equal(old['expected'], fixture['expected'])
                    and torch.equal(old['lr'], fixture['lr'])
                    and torch.equal(old['coord'], fixture['coord'])
                    and all(torch.equal(old['checkpoint']['model']['sd'][k], v)
                            for k, v in fixture['checkpoint']['model']['sd'].items()))
            failed += not same
            print(f"{case['file']}: {'identical' if same else 'DIFFERENT'}")
        else:
            torch.save(fixture, path)
            print(f"{case['file']}: {tuple(fixture['lr'].shape[1:])} -> {fixture['out_hw']}, "
                  f"{n_params} state values, {os.path.getsize(path) / 1e6:.2f} MB")
        if args.diag:
            diagnostics(models, make_coord, case, fixture)
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
