"""Training reliability: kill -9 and resume, determinism, distributed = single process.

Every run here is a real ``basicsr train`` in a fresh interpreter (CPU, one thread) with
ArbitraryScaleSRModel + a tiny LIIF on four 32x32 PNGs: 2 iterations per epoch, a
checkpoint every 3 iterations (so states are saved mid-epoch), print_freq 1.

What is compared against what:
* the losses / lrs / epochs logged by every (killed, resumed, finished) run against an
  uninterrupted run, iteration by iteration, and the final weights bit for bit;
* two runs with the same seed (and one with data-loader workers) against each other, and a
  run with another seed, which must differ;
* a 2-process gloo run against a single process with the same global batch.
The kills target checkpoint writing itself: the runs are started through a wrapper that
writes every ``torch.save`` in small, slow chunks and says on stderr when it starts a file,
so that SIGKILL can land mid-write (the checkpoints are tiny and would be written in
microseconds otherwise). Nothing in the plugin has a test hook.
"""
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import ciisr_plugin  # noqa: F401  (applies compat)
from ciisr_plugin import resume
from ciisr_plugin.data.arbitrary_scale_dataset import ArbitraryScaleImageDataset
from ciisr_plugin.resume import rng_states, set_rng_states

BIN = Path(sys.executable).parent
TOTAL_ITER = 14

TRAIN_OPT = {
    'name': 'rel',
    'model_type': 'ArbitraryScaleSRModel',
    'num_gpu': 0,
    'manual_seed': 7,
    'network_g': {'type': 'LIIF', 'encoder': {'type': 'EDSREncoder', 'num_feat': 8, 'num_block': 1},
                  'hidden_list': [16]},
    'datasets': {'train': {
        'name': 'tiny', 'type': 'ArbitraryScaleImageDataset', 'dataroot_gt': None, 'io_backend': {'type': 'disk'},
        'lq_size': 8, 'scale_min': 1, 'scale_max': 3, 'sample_q': 32, 'use_hflip': True, 'use_rot': True,
        'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2}},
    'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
    'train': {
        'ema_decay': 0.9,
        'optim_g': {'type': 'Adam', 'lr': 1e-2, 'weight_decay': 0, 'betas': [0.9, 0.99]},
        'scheduler': {'type': 'MultiStepLR', 'milestones': [7], 'gamma': 0.5},
        'total_iter': TOTAL_ITER, 'warmup_iter': -1,
        'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}},
    'logger': {'print_freq': 1, 'save_checkpoint_freq': 3, 'use_tb_logger': False},
    'dist_params': {'backend': 'gloo', 'port': 29500},
}

# torch.save in small slow chunks (SLOW_SAVE_CHUNK bytes, every 10 ms), announced on stderr, and
# validation announced too (then 0.3 s of sleep): lets the tests kill mid-write or mid-validation
SLOW_SAVE = """\
import io, os, sys, time
import torch
import ciisr_plugin
from ciisr_plugin import cli
from ciisr_plugin.models.arbitrary_scale_sr_model import ArbitraryScaleSRModel
CHUNK = int(os.environ.get('SLOW_SAVE_CHUNK', 2048))
_save = torch.save
def slow_save(obj, f, *args, **kwargs):
    buf = io.BytesIO()
    _save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    print(f'@@ writing {os.path.basename(f.name)}', file=sys.stderr, flush=True)
    for i in range(0, len(data), CHUNK):
        f.write(data[i:i + CHUNK])
        f.flush()
        time.sleep(0.01)
    print(f'@@ wrote {os.path.basename(f.name)}', file=sys.stderr, flush=True)
torch.save = slow_save
_validate = ArbitraryScaleSRModel.nondist_validation
def announced_validation(self, *args, **kwargs):
    print('@@ validating', file=sys.stderr, flush=True)
    time.sleep(0.3)
    return _validate(self, *args, **kwargs)
ArbitraryScaleSRModel.nondist_validation = announced_validation
sys.exit(cli.main(sys.argv[1:]))
"""

LOG_LINE = re.compile(r'\[epoch:\s*(\d+), iter:\s*([\d,]+), lr:\(([^)]*)\)\].*?l_pix: (\S+)')


def _env():
    env = {k: v for k, v in os.environ.items() if k != 'CIISR_TRACEBACK'}
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    return env


def logged(text):
    """{iter: (epoch, lrs, l_pix)} of every training log line in ``text`` (a later line for the
    same iteration must agree: checked by the callers through ``all_logged``)."""
    return {int(m[1].replace(',', '')): (int(m[0]), m[2], m[3]) for m in LOG_LINE.findall(text)}


def all_logged(text):
    return [(int(m[1].replace(',', '')), (int(m[0]), m[2], m[3])) for m in LOG_LINE.findall(text)]


def _write_images(folder, n=4, size=32, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        # smooth-ish content so that the loss moves
        base = cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f'im{i}.png'), base)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('reliability')
    _write_images(root / 'hr')
    (root / 'slow_save.py').write_text(SLOW_SAVE)
    return root


def _option_file(folder, data_dir, **changes):
    opt = yaml.safe_load(yaml.safe_dump(TRAIN_OPT))
    opt['datasets']['train']['dataroot_gt'] = str(data_dir / 'hr')
    for key, value in changes.items():  # 'a.b.c' -> nested
        *parents, last = key.split('.')
        node = opt
        for p in parents:
            node = node[p]
        node[last] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / 'train.yml'
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return path


def _train(cwd, opt_file, *extra, timeout=120):
    cmd = [sys.executable, '-m', 'ciisr_plugin', 'train', '-opt', str(opt_file), *extra]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.fixture(scope='module')
def uninterrupted(data_dir):
    cwd = data_dir / 'plain'
    err = _train(cwd, _option_file(cwd, data_dir))
    lines = logged(err)
    assert sorted(lines) == list(range(1, TOTAL_ITER + 1))
    return lines, cwd / 'experiments' / 'rel'


# ----------------------------------------------------------------------------------------------
# in-process units: the sampler, the keyed dataset randomness, the RNG states, state choice
def test_resumable_sampler_keeps_basicsr_order_and_skips_consumed_batches():
    from basicsr.data.data_sampler import EnlargedSampler
    import basicsr.train
    assert basicsr.train.EnlargedSampler is resume.ResumableSampler
    data = list(range(5))
    for world, rank, ratio in ((1, 0, 1), (2, 1, 3), (3, 2, 2)):
        ours, theirs = resume.ResumableSampler(data, world, rank, ratio), EnlargedSampler(data, world, rank, ratio)
        for epoch in (0, 3):
            ours.set_epoch(epoch), theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
    # resumed at iteration 7 of epoch 2 with 2 samples per iteration and 6 per epoch: 3
    # iterations per epoch, so iteration 7 is the first of epoch 2 -> skip 1 batch (2 samples)
    sampler = resume.ResumableSampler(list(range(6)), 1, 0)
    sampler.resume(3, (2, 7), 2)
    sampler.set_epoch(2)
    full = resume.ResumableSampler(list(range(6)), 1, 0)
    full.resume(3)
    full.set_epoch(2)
    assert list(sampler) == list(full)[2:]
    assert list(sampler) == list(full)[2:]  # every pass over the resumed epoch skips them
    sampler.set_epoch(3), full.set_epoch(3)
    assert list(sampler) == list(full)  # later epochs are whole
    keys = [i.key for i in sampler]
    assert keys[0][:2] == (3, 3) and sorted(k[2] for k in keys) == list(range(6))


@pytest.mark.parametrize('workers', [0, 1])
def test_resumed_epoch_behind_basicsr_prefetcher(workers):
    """basicsr.train builds CPUPrefetcher(loader) (which calls iter(loader)) before the loop's
    set_epoch + reset; with workers that first iterator already draws from the sampler. The
    loop's pass must still start after the consumed batches (it restarted the epoch before)."""
    from basicsr.data.prefetch_dataloader import CPUPrefetcher
    from torch.utils.data import DataLoader

    data = list(range(12))
    full = resume.ResumableSampler(data, 1, 0)
    full.set_epoch(0)
    order = [int(i) for i in full]
    sampler = resume.ResumableSampler(data, 1, 0)
    sampler.resume(3, (0, 2), 2)  # 2 of 6 batches done
    loader = DataLoader(data, batch_size=2, sampler=sampler, num_workers=workers, drop_last=True)
    prefetcher = CPUPrefetcher(loader)
    seen = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        prefetcher.reset()
        batches = []
        while (batch := prefetcher.next()) is not None:
            batches.append(batch.tolist())
        seen.append(batches)
    assert sum(seen[0], []) == order[4:]
    full.set_epoch(1)
    assert sum(seen[1], []) == [int(i) for i in full]


def test_sample_index_survives_pickling():
    idx = resume.SampleIndex(4, (1, 2, 9))
    back = pickle.loads(pickle.dumps(idx))
    assert back == 4 and back.key == (1, 2, 9) and [10, 11, 12, 13, 14][back] == 14


def test_dataset_randomness_comes_from_the_key_only(data_dir):
    opt = dict(TRAIN_OPT['datasets']['train'], dataroot_gt=str(data_dir / 'hr'), phase='train')
    dataset = ArbitraryScaleImageDataset(opt)
    key = resume.SampleIndex(2, (7, 0, 5))
    random.seed(1), np.random.seed(1)
    a = dataset[key]
    before = random.random(), np.random.rand()
    random.seed(1), np.random.seed(1)
    random.random(), np.random.rand(), random.random()  # other global state
    b = dataset[key]
    random.seed(1), np.random.seed(1)
    dataset[key]
    assert (random.random(), np.random.rand()) == before  # global streams left untouched
    for name in ('lq', 'coord', 'gt', 'scale'):
        assert torch.equal(a[name], b[name]), name
    other = dataset[resume.SampleIndex(2, (7, 1, 5))]  # same image, other epoch: another draw
    assert not torch.equal(a['coord'], other['coord'])


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    random.random(), np.random.rand(), torch.rand(1)
    saved = rng_states()
    expected = random.random(), np.random.rand(), torch.rand(3)
    torch.save({'rng_states': [saved]}, tmp_path / 's.state')
    loaded = torch.load(tmp_path / 's.state', weights_only=True)['rng_states'][0]
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_states(loaded)
    again = random.random(), np.random.rand(), torch.rand(3)
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def _fake_run(tmp_path, iters, truncated=()):
    exp = tmp_path / 'experiments' / 'x'
    (exp / 'models').mkdir(parents=True)
    (exp / 'training_states').mkdir()
    for it in iters:
        state = {'epoch': 0, 'iter': it, 'optimizers': [], 'schedulers': []}
        torch.save(state, exp / 'training_states' / f'{it}.state')
        torch.save({'params': {}}, exp / 'models' / f'net_g_{it}.pth')
    opt = {'name': 'x', 'num_gpu': 0, 'auto_resume': True, 'network_g': {'type': 'LIIF'}, 'manual_seed': 1,
           'path': {'training_states': str(exp / 'training_states'), 'models': str(exp / 'models'),
                    'resume_state': None}}
    return exp, opt


def test_auto_resume_takes_the_newest_complete_state(tmp_path):
    exp, opt = _fake_run(tmp_path, (3, 6, 9))
    states = exp / 'training_states'
    # leftovers of killed writers, a truncated newer state, a truncated model of another one
    (states / '.12.state.tmp4242').write_bytes(b'PK\x03\x04partial')
    (states / '12.state').write_bytes((states / '9.state').read_bytes()[:40])
    (states / '12.state.bak').write_bytes(b'')
    models = exp / 'models'
    (models / 'net_g_9.pth').write_bytes((models / 'net_g_9.pth').read_bytes()[:-30])
    with pytest.warns(UserWarning) as caught:
        state = resume.load_resume_state(opt)
    assert state['iter'] == 6 and opt['path']['resume_state'] == str(states / '6.state')
    assert opt['path']['pretrain_network_g'] == str(models / 'net_g_6.pth')
    messages = ' '.join(str(w.message) for w in caught)
    assert '12.state' in messages and 'net_g_9.pth' in messages
    assert resume.resume_position(opt) == (0, 6)  # what the train sampler is given


def test_explicit_truncated_resume_state_is_a_one_line_error(tmp_path):
    exp, opt = _fake_run(tmp_path, (3, ))
    path = exp / 'training_states' / '3.state'
    path.write_bytes(path.read_bytes()[:50])
    opt = dict(opt, auto_resume=False, path=dict(opt['path'], resume_state=str(path)))
    with pytest.raises(ValueError, match=r"path.resume_state '.*3\.state': not a readable training state"):
        resume.load_resume_state(opt)


# ----------------------------------------------------------------------------------------------
# SIGKILL at random moments, including mid-checkpoint, then --auto_resume: five times
def _wait_for(proc, err_file, predicate, timeout=90):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = err_file.read_text()
        if predicate(text):
            return text
        if proc.poll() is not None:
            raise AssertionError(f'run ended (rc {proc.returncode}) before the kill point:\n{text[-3000:]}')
        time.sleep(0.005)
    raise AssertionError(f'kill point not reached:\n{err_file.read_text()[-3000:]}')


def _chunks_of(name, n):
    """Kill after ``n`` chunks of this run's first file whose name matches ``name``."""
    def point(text):
        m = re.search(rf'@@ writing (\.?{name}(?:\.tmp\d+)?)\n', text)  # (a direct write too)
        return bool(m) and time.monotonic() - point.seen.setdefault(m[1], time.monotonic()) >= n * 0.01
    point.seen = {}
    return point


def _after_iter(it, rng):
    delay = rng.uniform(0, 0.05)

    def point(text):
        if not re.search(rf'iter:\s+{it}, lr', text):
            return False
        point.when = getattr(point, 'when', time.monotonic() + delay)
        return time.monotonic() >= point.when
    return point


def _check_files_complete(exp):
    """Every checkpoint / state under its real name loads; only temp names may be partial."""
    temps = []
    for folder in ('models', 'training_states'):
        for path in (exp / folder).iterdir() if (exp / folder).is_dir() else ():
            if path.name.startswith('.'):
                assert re.fullmatch(r'\..+\.tmp\d+', path.name), path
                temps.append(path.name)
            else:
                try:
                    torch.load(path, map_location='cpu', weights_only=True)
                except Exception as err:  # noqa: BLE001
                    raise AssertionError(f'{path} is incomplete after SIGKILL: {err}') from None
    return temps


def test_sigkill_and_auto_resume_match_an_uninterrupted_run(data_dir, uninterrupted):
    expected, plain_exp = uninterrupted
    cwd = data_dir / 'killed'
    opt_file = _option_file(cwd, data_dir)
    exp = cwd / 'experiments' / 'rel'
    rng = random.Random(20240607)
    # (kill point, must it leave a temp file behind?)
    kills = [
        (_chunks_of(r'6\.state', rng.randint(0, 2)), True),       # writing a training state
        (_chunks_of(r'net_g_9\.pth', rng.randint(1, 4)), True),   # writing a model
        (_after_iter(rng.randint(10, 11), rng), False),            # training, anywhere
        (lambda text: 'Resuming training from' in text, False),   # during start-up
        (_chunks_of(r'net_g_latest\.pth', rng.randint(1, 4)), True),  # writing the final model
    ]
    seen, outputs = [], []
    for i, (point, leaves_temp) in enumerate(kills):
        err_file = cwd / f'run{i}.err'
        with open(err_file, 'w') as err:
            proc = subprocess.Popen([sys.executable, str(data_dir / 'slow_save.py'), 'train', '-opt', str(opt_file),
                                     '--auto_resume'], cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, env=_env())
            try:
                _wait_for(proc, err_file, point)
                os.kill(proc.pid, signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        text = err_file.read_text()
        outputs.append(text)
        temps = _check_files_complete(exp)
        if leaves_temp:
            assert temps, f'kill {i} was meant to land mid-write:\n{text[-1500:]}'
        if i:  # every restart after the first resumed from a saved state
            assert re.search(r'Resuming training from epoch: \d+, iter: \d+\.', text), text[-2000:]
        seen += all_logged(text)
    final = _train(cwd, opt_file, '--auto_resume')
    outputs.append(final)
    seen += all_logged(final)

    # every iteration any run logged equals the uninterrupted run's (epoch, lr, loss)
    assert {it for it, _ in seen} == set(expected)
    for it, values in seen:
        assert values == expected[it], f'iteration {it}: {values} vs uninterrupted {expected[it]}'
    # resumed from states saved mid-epoch (iteration 3, 9: odd, 2 iterations per epoch)
    starts = re.findall(r'Resuming training from epoch: (\d+), iter: (\d+)\.', ''.join(outputs))
    assert any(int(it) % 2 for _, it in starts), starts
    # the final weights (and EMA) are bit-identical
    ours = torch.load(exp / 'models' / 'net_g_latest.pth', weights_only=True)
    theirs = torch.load(plain_exp / 'models' / 'net_g_latest.pth', weights_only=True)
    for key in ('params', 'params_ema'):
        assert ours[key].keys() == theirs[key].keys()
        for name in ours[key]:
            assert torch.equal(ours[key][name], theirs[key][name]), (key, name)


# ----------------------------------------------------------------------------------------------
# determinism
def test_same_seed_same_losses_and_workers_do_not_matter(data_dir, uninterrupted):
    expected, _ = uninterrupted
    n = 6
    again = logged(_train(data_dir / 'again', _option_file(data_dir / 'again', data_dir, **{'train.total_iter': n})))
    assert again == {it: expected[it] for it in range(1, n + 1)}
    # two data-loader workers: each sample's randomness comes from its (seed, epoch, slot) key
    workers = logged(_train(data_dir / 'workers', _option_file(
        data_dir / 'workers', data_dir, **{'train.total_iter': n, 'datasets.train.num_worker_per_gpu': 2})))
    assert workers == again
    # another seed gives other samples, so other losses (the comparison above can fail)
    other = logged(_train(data_dir / 'seed', _option_file(
        data_dir / 'seed', data_dir, **{'train.total_iter': 2, 'manual_seed': 8})))
    assert other[1][2] != expected[1][2] and other[2][2] != expected[2][2]


# ----------------------------------------------------------------------------------------------
# distributed: 2 CPU processes (gloo) = 1 process with the same global batch
DUMP_WEIGHTS = """\
import os, sys
import torch
import ciisr_plugin
from ciisr_plugin import cli
from ciisr_plugin.models.arbitrary_scale_sr_model import ArbitraryScaleSRModel
_save = ArbitraryScaleSRModel.save
def save(self, epoch, current_iter):
    _save(self, epoch, current_iter)
    if current_iter == -1:  # every rank dumps its final weights
        net = self.get_bare_model(self.net_g)
        torch.save(net.state_dict(), os.path.join(os.environ['DUMP_DIR'], f"rank{self.opt['rank']}.pth"))
ArbitraryScaleSRModel.save = save
sys.exit(cli.main(sys.argv[1:]))
"""


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(data_dir):
    torchrun = shutil.which('torchrun', path=str(BIN))
    assert torchrun, 'torchrun not found next to the Python interpreter'
    script = data_dir / 'dump_weights.py'
    script.write_text(DUMP_WEIGHTS)
    n = 4
    ddp_dir, single_dir = data_dir / 'ddp', data_dir / 'single'
    # SGD: Adam divides by the gradient's running RMS, which turns the rounding noise of
    # near-zero gradients (all-reduce vs one sum) into visible steps; SGD keeps it at rounding level
    common = {'train.total_iter': n, 'train.ema_decay': 0, 'train.optim_g': {'type': 'SGD', 'lr': 0.5}}
    ddp_opt = _option_file(ddp_dir, data_dir, **common)
    single_opt = _option_file(single_dir, data_dir, **common, **{'datasets.train.batch_size_per_gpu': 4})
    env = dict(_env(), DUMP_DIR=str(ddp_dir))
    ddp = subprocess.run([torchrun, '--standalone', '--nproc_per_node', '2', str(script), 'train', '-opt',
                          str(ddp_opt), '--launcher', 'pytorch'], cwd=ddp_dir, capture_output=True, text=True,
                         timeout=180, env=env)
    assert ddp.returncode == 0, (ddp.stdout + ddp.stderr)[-3000:]
    single = subprocess.run([sys.executable, str(script), 'train', '-opt', str(single_opt)], cwd=single_dir,
                            capture_output=True, text=True, timeout=120, env=dict(_env(), DUMP_DIR=str(single_dir)))
    assert single.returncode == 0, single.stderr[-3000:]
    assert 'World size (gpu number): 2' in ddp.stdout + ddp.stderr

    rank0, rank1 = (torch.load(ddp_dir / f'rank{r}.pth', weights_only=True) for r in (0, 1))
    saved = torch.load(ddp_dir / 'experiments' / 'rel' / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    one = torch.load(single_dir / 'rank0.pth', weights_only=True)
    earlier = torch.load(single_dir / 'experiments' / 'rel' / 'models' / 'net_g_3.pth', weights_only=True)['params']
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # DDP keeps the replicas identical
        assert torch.equal(rank0[name], saved[name]), name
        # same samples, gradients averaged over the same 4 samples: equal up to summation order
        torch.testing.assert_close(rank0[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    # one more step moved the weights far more than that tolerance (the comparison can fail)
    assert max((one[k] - earlier[k]).abs().max().item() for k in one) > 1e-3
    ddp_losses, single_losses = logged(ddp.stderr), logged(single.stderr)
    assert sorted(ddp_losses) == sorted(single_losses) == list(range(1, n + 1))
    for it in ddp_losses:  # rank 0 logs the loss averaged over ranks = the global batch's loss
        assert abs(float(ddp_losses[it][2]) - float(single_losses[it][2])) <= 2e-4 * abs(float(single_losses[it][2]))
