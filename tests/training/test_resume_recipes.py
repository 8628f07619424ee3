"""Kill -9 and ``--auto_resume`` on the shipped recipes: every logged loss and the final weights
equal an uninterrupted run's.

``test_reliability.py`` checks the machinery on a tiny hand-written option file; this drives the
option files users run (the LIIF and A-LIIF demos, LIIF-GAN's paper recipe), shortened with
``--force_yml`` only: no data-loader workers (as the demos ship) and one, EMA on, the
discriminator and its optimizer, and kills during the first iterations (before any state exists),
mid-epoch, while a state or model is being written, and during validation.

Each run is a real ``basicsr train`` in a fresh interpreter, started through a wrapper that writes
every ``torch.save`` in slow chunks and announces validation on stderr, so that a kill can land
inside either (the plugin has no test hook).
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from offline_weights import write_torch_home
from test_reliability import SLOW_SAVE


# `[epoch:  1, iter:       7, lr:(5.000e-04,)] [eta: ..., time (data): ...] l_pix: 1.2e-01 ...`
LOG_LINE = re.compile(r'\[epoch:\s*(\d+), iter:\s*([\d,]+), lr:\(([^)]*)\)\]\s*\[[^]]*\]\s*(.*)')
LOSS = re.compile(r'(\w+): (-?[\d.]+e[+-]\d+)')

# Shortened, never changed: 5 training photos x ratio 8 = 40 samples, 5 batches of 8 an epoch, so
# the states at 3, 6, 9, 12 land mid-epoch 0, mid-epoch 1, at its end and mid-epoch 2 (a resume
# inside epoch 0 is its own case: the sampler starts there before the loop sets an epoch),
# validation on one held-out photo at x2.
DEMO_SHORT = ['train:total_iter=12', 'train:scheduler:milestones=[6,9]', 'datasets:train:dataset_enlarge_ratio=8',
              'logger:print_freq=1', 'logger:save_checkpoint_freq=3', 'val:val_freq=6',
              'datasets:val:first_k=1', 'datasets:val:scales=[2]']


def _logged(text):
    """[(iter, (epoch, lrs, {loss name: value}))] of every training log line, in order."""
    out = []
    for epoch, it, lrs, rest in LOG_LINE.findall(text):
        out.append((int(it.replace(',', '')), (int(epoch), lrs, dict(LOSS.findall(rest)))))
    return out


def _env(torch_home):
    env = {k: v for k, v in os.environ.items() if k != 'CIISR_TRACEBACK'}
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONWARNINGS='ignore', TORCH_HOME=str(torch_home),
               SLOW_SAVE_CHUNK=str(1 << 16))  # the recipes' checkpoints are larger than the tiny ones'
    return env


@pytest.fixture(scope='module')
def home(tmp_path_factory):
    """Random VGG19 / AlexNet weights where the perceptual loss and LPIPS look (no downloads)."""
    root = tmp_path_factory.mktemp('resume_recipes')
    write_torch_home(root / 'torch')
    (root / 'wrapper.py').write_text(SLOW_SAVE)
    return root


def _command(home, recipe, forced, resume):
    cmd = [sys.executable, str(home / 'wrapper.py'), 'train', '-opt', str(REPO / recipe)]
    return cmd + (['--auto_resume'] if resume else []) + ['--force_yml', *forced]


def _run(cwd, cmd, env, kill_at=None, timeout=300):
    """Run ``cmd``; with ``kill_at(stderr so far)``, SIGKILL it once that is true. Returns stderr."""
    cwd.mkdir(parents=True, exist_ok=True)
    err_path = cwd / f'run{len(list(cwd.glob("run*.err")))}.err'
    with open(err_path, 'w') as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            end = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < end:
                if kill_at is not None and kill_at(err_path.read_text()):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.005)
        finally:
            if proc.poll() is None and kill_at is None:
                proc.kill()
            proc.wait(60)
    text = err_path.read_text()
    if kill_at is None:
        assert proc.returncode == 0, text[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL, f'the run ended before its kill point:\n{text[-3000:]}'
    return text


def after_iter(it):
    return lambda text: re.search(rf'iter:\s+{it}, lr', text) is not None


def writing(name, chunks=1):
    """While ``name`` (or its temporary) is being written, ``chunks`` chunks in."""
    def point(text):
        m = re.search(rf'@@ writing (\.?{name}(?:\.tmp\d+)?)\n', text)
        if not m:
            return False
        point.since = getattr(point, 'since', time.monotonic())
        return time.monotonic() - point.since >= chunks * 0.01
    return point


def validating(nth=1):
    return lambda text: text.count('@@ validating') >= nth


def _weights(exp, net):
    return torch.load(exp / 'models' / f'net_{net}_latest.pth', map_location='cpu', weights_only=True)


def check_kill_and_resume(home, tmp_path, recipe, forced, kills, nets=('g', )):
    """An uninterrupted run, then one killed at each of ``kills`` in turn and resumed with
    ``--auto_resume`` until it finishes: same (epoch, lr, losses) at every logged iteration,
    bit-identical final weights (EMA included)."""
    env = _env(home / 'torch')
    name = re.search(r'name=(\S+)', ' '.join(forced))[1]
    plain = _run(tmp_path / 'plain', _command(home, recipe, forced, resume=False), env)
    expected = dict(_logged(plain))
    total = int(re.search(r'train:total_iter=(\d+)', ' '.join(forced))[1])
    assert sorted(expected) == list(range(1, total + 1)), plain[-2000:]

    cwd = tmp_path / 'killed'
    seen, starts = [], []
    for kill_at in kills:
        text = _run(cwd, _command(home, recipe, forced, resume=True), env, kill_at=kill_at)
        seen += _logged(text)
        starts += re.findall(r'Resuming training from epoch: \d+, iter: (\d+)\.', text)
    text = _run(cwd, _command(home, recipe, forced, resume=True), env)
    seen += _logged(text)
    starts += re.findall(r'Resuming training from epoch: \d+, iter: (\d+)\.', text)

    assert {it for it, _ in seen} == set(expected)
    for it, values in seen:
        assert values == expected[it], f'iteration {it}: {values} vs uninterrupted {expected[it]}'
    exp_plain, exp_killed = tmp_path / 'plain' / 'experiments' / name, cwd / 'experiments' / name
    for net in nets:
        ours, theirs = _weights(exp_killed, net), _weights(exp_plain, net)
        assert ours.keys() == theirs.keys()
        for key in ('params', 'params_ema'):
            assert (key in ours) == (key in theirs)
            for param in ours.get(key, {}):
                assert torch.equal(ours[key][param], theirs[key][param]), (net, key, param)
    return [int(s) for s in starts]


def test_liif_demo_recipe_resumes_exactly(home, tmp_path):
    """The README's demo, with a data-loader worker (it ships with none), killed at five points."""
    forced = ['name=resume_liif_demo', *DEMO_SHORT, 'datasets:train:num_worker_per_gpu=1']
    kills = [
        after_iter(1),                  # first iterations: no state yet, starts over
        writing(r'3\.state'),           # writing the first training state (mid-epoch: iteration 3)
        after_iter(5),                  # training, mid-epoch
        validating(1),                  # during the validation at iteration 6 (state 6 is saved first)
        writing(r'net_g_latest\.pth'),  # writing the final model
    ]
    starts = check_kill_and_resume(home, tmp_path, 'options/demo/train_liif_demo.yml', forced, kills)
    assert 3 in starts and 6 in starts, starts  # mid-epoch 0 and mid-epoch 1


def test_aliif_demo_with_ema_resumes_exactly(home, tmp_path):
    forced = ['name=resume_aliif_demo', *DEMO_SHORT, 'train:ema_decay=0.9']  # loads in-process, as shipped
    starts = check_kill_and_resume(home, tmp_path, 'options/demo/train_aliif_demo.yml', forced,
                                   [after_iter(4), validating(1)])
    assert starts == [3, 6], starts


def test_liifgan_recipe_resumes_exactly(home, tmp_path):
    """LIIF-GAN's paper recipe on the bundled photos, shrunk: generator, discriminator, both
    optimizers and both schedulers go through the state; GAN, perceptual and L1 losses logged.
    10 samples in batches of 2: states 3 and 6 lie in epochs 0 and 1."""
    forced = ['name=resume_liifgan', 'num_gpu=0', 'train:total_iter=8', 'train:scheduler:milestones=[4,6]',
              'datasets:train:dataroot_gt=skimage://train', 'datasets:val:dataroot_gt=skimage://val',
              'datasets:train:batch_size_per_gpu=2', 'datasets:train:num_worker_per_gpu=1',
              'datasets:train:dataset_enlarge_ratio=2', 'datasets:train:lq_size=24', 'datasets:train:group_size=24',
              'datasets:val:first_k=1', 'datasets:val:scales=[2]',
              'network_g:encoder:num_feat=16', 'network_g:encoder:num_block=2', 'network_g:encoder:mid_layer=1',
              'network_g:hidden_list=[32,32]', 'network_d:num_feat=16',
              'logger:print_freq=1', 'logger:save_checkpoint_freq=3', 'logger:use_tb_logger=false',
              'val:val_freq=3']
    starts = check_kill_and_resume(home, tmp_path, 'options/train_liifgan.yml', forced,
                                   [after_iter(4), validating(1)], nets=('g', 'd'))
    assert starts == [3, 6], starts
