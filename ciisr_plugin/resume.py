"""Exact resumption of BasicSR training: a killed and resumed run equals an uninterrupted one.

Three things make it exact (on CPU, same batch size, data and process count), each installed into
BasicSR 1.4.2 by :mod:`ciisr_plugin.compat` (fixes 2, 7 and 8):

* **where to resume** - :func:`load_resume_state` finds the newest *complete* training state
  (``--auto_resume``) and loads it on the right device;
* **which samples come next** - :class:`ResumableSampler` keeps BasicSR's order, skips the batches
  the saved iteration already consumed, and names every draw ``(seed, epoch, slot)``
  (:class:`SampleIndex`) so that datasets derive each sample's randomness from it alone;
  :func:`prepare_train_sampler` hands it the run's seed and resume position, read from the
  options and the state file (no module state);
* **the random streams** - :func:`rng_states` / :func:`set_rng_states`, saved in and restored
  from every training state by ``ArbitraryScaleSRModel``.
"""
import os
import pickle
import random
import re
import warnings
import zipfile

import numpy as np
import torch

from basicsr.data.data_sampler import EnlargedSampler

STATE_KEYS = {'epoch', 'iter', 'optimizers', 'schedulers'}


# ----------------------------------------------------------------------------------------------
# where to resume
def resume_device(opt):
    """Where a training state is loaded: the current CUDA device, or the CPU when the run
    uses no GPU (``num_gpu: 0``) or CUDA is unavailable."""
    if opt.get('num_gpu', 0) != 0 and torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def load_resume_state(opt):
    """``basicsr.train.load_resume_state`` loading onto :func:`resume_device`.

    1.4.2 maps every state onto ``torch.cuda.current_device()``, which fails without CUDA.
    With ``--auto_resume`` it searches ``opt['path']['training_states']`` (where
    ``save_training_state`` writes them, under the run's root) rather than a path relative
    to the working directory, and takes the newest state that is complete: ``<iter>.state``
    files only (a killed run's ``.<name>.tmp<pid>`` leftovers are ignored), skipping, with a
    warning, one that does not load or whose ``net_*_<iter>.pth`` is truncated; the chosen one
    becomes ``opt['path']['resume_state']``. The states hold only tensors, numbers, lists and a
    ``collections.Counter``, so they load with ``weights_only=True``.
    """
    from basicsr.utils import check_resume

    resume_state = None
    if opt['auto_resume']:
        state_dir = opt['path'].get('training_states') or os.path.join('experiments', opt['name'], 'training_states')
        resume_state = _newest_complete_state(opt, state_dir)
    elif opt['path'].get('resume_state'):
        path = opt['path']['resume_state']
        resume_state = read_state(path, resume_device(opt))
        if isinstance(resume_state, str):
            raise ValueError(f"path.resume_state '{path}': {resume_state}")
    if resume_state is None:
        return None
    check_resume(opt, resume_state['iter'])
    return resume_state


def read_state(path, device, mmap=False):
    """The training state at ``path``, or a string saying why it cannot be used."""
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        return f'not a readable training state ({" ".join(str(err).split())[:200] or type(err).__name__})'
    if not isinstance(state, dict) or not STATE_KEYS <= set(state):
        return 'not a BasicSR training state (needs epoch, iter, optimizers, schedulers)'
    return state


def _newest_complete_state(opt, state_dir):
    if not os.path.isdir(state_dir):
        return None
    iters = sorted((int(name[:-len('.state')]) for name in os.listdir(state_dir)
                    if re.fullmatch(r'\d+\.state', name)), reverse=True)
    models_dir = opt['path'].get('models') or os.path.join(os.path.dirname(state_dir), 'models')
    ignored = opt['path'].get('ignore_resume_networks') or []
    networks = [k[len('network_'):] for k in opt if k.startswith('network_') and k not in ignored]
    for it in iters:
        path = os.path.join(state_dir, f'{it}.state')
        # torch checkpoints are zip archives whose directory sits at the end: a truncated
        # file is not a zip file (checked without reading the weights). A missing one is
        # reported by BasicSR's load_network.
        nets = [os.path.join(models_dir, f'net_{n}_{it}.pth') for n in networks]
        bad = [os.path.basename(p) for p in nets if os.path.exists(p) and not zipfile.is_zipfile(p)]
        state = f'truncated {", ".join(bad)}' if bad else read_state(path, resume_device(opt))
        if isinstance(state, str):
            warnings.warn(f'auto_resume: skipping {path}: {state}')
            continue
        opt['path']['resume_state'] = path
        return state
    return None


def resume_position(opt):
    """``(epoch, iter)`` of the state this run resumes from (``opt['path']['resume_state']``,
    as :func:`load_resume_state` leaves it), or None for a fresh run. Memory-mapped: only the
    two numbers are read."""
    path = (opt.get('path') or {}).get('resume_state')
    if not path:
        return None
    state = read_state(path, torch.device('cpu'), mmap=True)
    if isinstance(state, str):
        raise ValueError(f"path.resume_state '{path}': {state}")
    return int(state['epoch']), int(state['iter'])


def batch_per_rank(opt):
    """Samples per iteration and process, as ``basicsr.data.build_dataloader`` batches them."""
    train = (opt.get('datasets') or {}).get('train') or {}
    batch = train.get('batch_size_per_gpu')
    if not isinstance(batch, int):
        return None
    num_gpu = opt.get('num_gpu') or 0
    return batch if opt.get('dist') else batch * max(num_gpu if isinstance(num_gpu, int) else 1, 1)


# ----------------------------------------------------------------------------------------------
# which samples come next
class SampleIndex(int):
    """A dataset index that also names its draw, ``key = (seed, epoch, slot)``: ``slot`` is
    the position in the epoch's enlarged permutation (unique across ranks). It is an ``int``,
    so every dataset can use it as an index; ours seed their randomness from ``key``."""

    def __new__(cls, index, key):
        obj = super().__new__(cls, index)
        obj.key = key
        return obj

    def __reduce__(self):  # keeps the key when sent to data-loader workers
        return (SampleIndex, (int(self), self.key))


class ResumableSampler(EnlargedSampler):
    """``EnlargedSampler`` (same order) yielding :class:`SampleIndex` once it knows the run's
    seed and, in the epoch a run resumes in, only the samples the saved iteration had not
    consumed (both set by :meth:`resume`; until then it is 1.4.2's sampler)."""

    def __init__(self, dataset, num_replicas, rank, ratio=1):
        super().__init__(dataset, num_replicas, rank, ratio)
        self.seed = None
        # epoch -> samples of this rank to skip. Kept for every pass over that epoch, not used
        # up by the first: BasicSR's CPUPrefetcher builds a loader iterator before the train
        # loop's set_epoch + reset, and with workers that throw-away iterator already draws
        # indices; the loop's own pass over the resumed epoch must skip them again.
        self.skip = {}

    def resume(self, seed, position=None, batch=None):
        """Key the draws by ``seed``; ``position = (epoch, iter)`` of the saved state, ``batch`` =
        samples per iteration of this rank."""
        self.seed = seed
        self.skip = {}
        if position is None:
            return
        epoch, it = position
        per_epoch = self.num_samples // batch if batch else 0  # drop_last batches
        done = it - epoch * per_epoch
        if per_epoch and 0 <= done <= per_epoch:
            self.skip[epoch] = done * batch
        else:
            warnings.warn(f'resume: iteration {it} is not inside epoch {epoch} of {per_epoch} iterations '
                          '(batch size or data changed?); the epoch restarts from its first batch')

    def slots(self):
        """This rank's positions in the epoch's permutation (1.4.2's order, before ``% len``)."""
        g = torch.Generator()
        g.manual_seed(self.epoch)
        return torch.randperm(self.total_size, generator=g).tolist()[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        size, epoch = len(self.dataset), self.epoch
        slots = self.slots()[self.skip.get(epoch, 0):]
        if self.seed is None:
            return iter([v % size for v in slots])
        return iter([SampleIndex(v % size, (int(self.seed), epoch, v)) for v in slots])


def prepare_train_sampler(sampler, opt):
    """Give the training run's :class:`ResumableSampler` its seed and resume position."""
    if isinstance(sampler, ResumableSampler):
        sampler.resume(opt.get('manual_seed'), resume_position(opt), batch_per_rank(opt))


# ----------------------------------------------------------------------------------------------
# the random streams
def rng_states():
    """This process's python / numpy / torch (and CUDA) RNG states, in types that load with
    ``weights_only=True`` (numpy's key array as a list)."""
    np_state = np.random.get_state(legacy=False)
    np_state['state']['key'] = np_state['state']['key'].tolist()
    state = {'python': random.getstate(), 'numpy': np_state, 'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state):
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state['numpy'], state=dict(state['numpy']['state']))
    np_state['state']['key'] = np.asarray(np_state['state']['key'], dtype=np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])
