"""Compatibility fixes for basicsr 1.4.2 on current torch / torchvision, and on CPU.

Each fix is explicit and small, names its upstream issue, replaces named BasicSR
attributes (the originals are kept: :func:`original`), is applied once by :func:`apply`
(called when ``ciisr_plugin`` is imported) and has a test in ``tests/test_compat.py``
that fails without it.

1. ``torchvision.transforms.functional_tensor`` shim - basicsr#650.
2. ``basicsr.train.load_resume_state``: resume onto the CPU when ``num_gpu`` is 0 or there
   is no CUDA (1.4.2 always maps the state onto ``torch.cuda.current_device()``), and look
   for ``--auto_resume`` states where this run saves them. No upstream issue found.
3. ``basicsr.utils.options.init_dist`` (and ``dist_util.init_dist``): ``--launcher pytorch``
   honours ``dist_params.backend``, defaults to gloo without CUDA, and picks the CUDA device
   from torchrun's ``LOCAL_RANK``; 1.4.2 hard-codes nccl and divides by the GPU count.
   No upstream issue found (BasicSR#626 is the related ``--local-rank`` report, handled
   by the CLI).
4. ``BaseModel.model_to_device``: DistributedDataParallel with ``device_ids=None`` for CPU
   modules. No upstream issue found.
5. ``BaseModel.get_optimizer``: any ``torch.optim`` optimizer by name (1.4.2: Adam only).
   No upstream issue found in XPixelGroup/BasicSR (reported downstream, xinntao/Real-ESRGAN#766).
6. ``PerceptualLoss(criterion='l2')`` crashed on ``torch.nn.L2loss``: basicsr#515,
   fixed upstream after 1.4.2 by PR #570 (MSELoss).
7. ``basicsr.train.EnlargedSampler`` -> :class:`ResumableSampler`: after a resume, 1.4.2's
   train loop restarts the interrupted epoch from its first batch (replaying batches it
   already trained on while ``current_iter`` goes on), so a resumed run sees other data
   than an uninterrupted one. The sampler skips the batches the saved iteration already
   consumed, keeps 1.4.2's order otherwise, and names every draw ``(seed, epoch, slot)``
   (:class:`SampleIndex`) so that datasets can derive their per-sample randomness from it
   instead of a global RNG (same sample whatever the worker count, rank split or resume).
   No upstream issue found. ``load_resume_state`` (fix 2) hands it the resume position.
8. ``basicsr.train.create_train_val_dataloader``: 1.4.2 counts ``ceil(len / batch)``
   iterations per epoch while the loader drops the last partial batch, so when the batch
   does not divide the data the run stops before ``total_iter`` (it only got there after a
   resume by replaying an epoch, which fix 7 removes). The epoch count is recomputed from
   the loader's real length; a train set without one full batch is an error. No upstream
   issue found.

Checked, needs no fix: torch>=2.6 loads with ``weights_only=True`` by default; BasicSR's
``.state`` files (optimizer + scheduler state dicts, including MultiStepRestartLR's
``collections.Counter``) and ``BaseModel.load_network``'s ``.pth`` files load that way
(torch allowlists ``Counter``), so no ``add_safe_globals`` is added.
"""
import functools
import inspect
import os
import sys
import types
import warnings

_applied = False
_originals = {}  # (owner, attribute name) -> the BasicSR object a fix replaced
ResumableSampler = None  # defined by apply(): its base class needs basicsr, importable only after fix 1
_dist_hint = {'backend': None, 'num_gpu': None}
# this process's training run, set by load_resume_state (called once per train_pipeline, just
# before the train sampler is built): seed, batch_per_rank, resume (epoch, iter) or None
_train_session = {}


def original(owner, name):
    """The BasicSR attribute ``owner.name`` as it was before :func:`apply` replaced it."""
    return _originals[(owner, name)]


def _replace(owner, name, new):
    _originals.setdefault((owner, name), getattr(owner, name))
    setattr(owner, name, new)


# ----------------------------------------------------------------------------------------------
# 1. basicsr#650
def _shim_functional_tensor():
    """basicsr#650: ``basicsr.data.degradations`` imports ``rgb_to_grayscale`` from
    ``torchvision.transforms.functional_tensor``, removed in torchvision 0.17. Provide
    that module name, backed by the public ``torchvision.transforms.functional``."""
    name = 'torchvision.transforms.functional_tensor'
    if name in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401  (old torchvision: nothing to do)
        return
    except ImportError:
        pass
    from torchvision.transforms import functional
    shim = types.ModuleType(name)
    shim.rgb_to_grayscale = functional.rgb_to_grayscale
    sys.modules[name] = shim


# ----------------------------------------------------------------------------------------------
# 2. resume on CPU (no upstream issue found)
def resume_device(opt):
    """Where a training state is loaded: the current CUDA device, or the CPU when the run
    uses no GPU (``num_gpu: 0``) or CUDA is unavailable."""
    import torch
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
    warning, one that does not load or whose ``net_*_<iter>.pth`` is truncated.
    The states hold only tensors, numbers, lists and a ``collections.Counter``, so they load
    with ``weights_only=True``. The resume position is handed to :class:`ResumableSampler`.
    """
    from basicsr.utils import check_resume

    resume_state = None
    if opt['auto_resume']:
        state_dir = opt['path'].get('training_states') or os.path.join('experiments', opt['name'], 'training_states')
        resume_state = _newest_complete_state(opt, state_dir)
    elif opt['path'].get('resume_state'):
        path = opt['path']['resume_state']
        resume_state = _read_state(path, resume_device(opt))
        if isinstance(resume_state, str):
            raise ValueError(f"path.resume_state '{path}': {resume_state}")
    _train_session.clear()
    _train_session.update(seed=opt.get('manual_seed'), batch_per_rank=_batch_per_rank(opt),
                          resume=None if resume_state is None else (resume_state['epoch'], resume_state['iter']))
    if resume_state is None:
        return None
    check_resume(opt, resume_state['iter'])
    return resume_state


def _read_state(path, device):
    """The training state at ``path``, or a string saying why it cannot be used."""
    import pickle
    import torch
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        return f'not a readable training state ({" ".join(str(err).split())[:200] or type(err).__name__})'
    if not isinstance(state, dict) or not {'epoch', 'iter', 'optimizers', 'schedulers'} <= set(state):
        return 'not a BasicSR training state (needs epoch, iter, optimizers, schedulers)'
    return state


def _newest_complete_state(opt, state_dir):
    import re
    import zipfile

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
        state = f'truncated {", ".join(bad)}' if bad else _read_state(path, resume_device(opt))
        if isinstance(state, str):
            warnings.warn(f'auto_resume: skipping {path}: {state}')
            continue
        opt['path']['resume_state'] = path
        return state
    return None


def _batch_per_rank(opt):
    """Samples per iteration and process, as ``basicsr.data.build_dataloader`` batches them."""
    train = (opt.get('datasets') or {}).get('train') or {}
    batch = train.get('batch_size_per_gpu')
    if not isinstance(batch, int):
        return None
    num_gpu = opt.get('num_gpu') or 0
    return batch if opt.get('dist') else batch * max(num_gpu if isinstance(num_gpu, int) else 1, 1)


# ----------------------------------------------------------------------------------------------
# 3. --launcher pytorch: backend and device (no upstream issue found)
def set_dist_params(dist_params=None, num_gpu=None):
    """Tell :func:`init_dist` the run's ``dist_params`` and ``num_gpu`` (BasicSR's
    ``parse_options`` passes neither for ``--launcher pytorch``). Called by the CLI."""
    _dist_hint['backend'] = (dist_params or {}).get('backend')
    _dist_hint['num_gpu'] = num_gpu


def default_dist_backend(num_gpu=None):
    import torch
    return 'nccl' if torch.cuda.is_available() and num_gpu != 0 else 'gloo'


def init_dist(launcher, backend=None, **kwargs):
    """``basicsr.utils.dist_util.init_dist`` that works on CPU and under torchrun.

    Backend: the explicit argument (``--launcher slurm`` passes ``dist_params``), else
    ``dist_params.backend`` from :func:`set_dist_params`, else nccl with CUDA / gloo without.
    A nccl request without CUDA (BasicSR's templates all say nccl) falls back to gloo with a
    warning. For ``pytorch`` the CUDA device (only set when CUDA exists) is ``LOCAL_RANK``
    (torchrun, ``torch.distributed.launch --use-env``) or ``RANK % device_count`` as in 1.4.2.
    ``slurm`` is 1.4.2's code with the backend chosen here; it still needs GPUs.
    """
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from basicsr.utils import dist_util

    backend = backend or _dist_hint['backend'] or default_dist_backend(_dist_hint['num_gpu'])
    if backend == 'nccl' and default_dist_backend(_dist_hint['num_gpu']) == 'gloo':
        warnings.warn('dist_params.backend nccl needs CUDA (and num_gpu != 0); using gloo')
        backend = 'gloo'
    if mp.get_start_method(allow_none=True) is None:
        mp.set_start_method('spawn')  # as 1.4.2 does
    if launcher == 'pytorch':
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            local_rank = os.environ.get('LOCAL_RANK')
            device = int(local_rank) if local_rank is not None else int(os.environ['RANK'])
            torch.cuda.set_device(device % torch.cuda.device_count())
        dist.init_process_group(backend=backend)
    elif launcher == 'slurm':
        dist_util._init_dist_slurm(backend, **kwargs)  # unchanged apart from the backend default
    else:
        raise ValueError(f'Invalid launcher type: {launcher}')


# ----------------------------------------------------------------------------------------------
# 4. DDP on CPU (no upstream issue found)
def model_to_device(self, net):
    """``BaseModel.model_to_device`` that wraps CPU modules in DDP with ``device_ids=None``
    (1.4.2 always passes ``[torch.cuda.current_device()]``, which fails on CPU)."""
    import torch
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    net = net.to(self.device)
    if self.opt['dist']:
        device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
        net = DistributedDataParallel(
            net, device_ids=device_ids, find_unused_parameters=self.opt.get('find_unused_parameters', False))
    elif self.opt['num_gpu'] > 1:
        net = DataParallel(net)
    return net


# ----------------------------------------------------------------------------------------------
# 5. optimizers beyond Adam (no upstream issue found; xinntao/Real-ESRGAN#766)
def optimizer_class(name):
    """The ``torch.optim`` optimizer class called ``name``; ValueError (with close names) otherwise."""
    import torch
    from .config import suggest

    cls = getattr(torch.optim, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
        return cls
    known = sorted(k for k, v in vars(torch.optim).items()
                   if isinstance(v, type) and issubclass(v, torch.optim.Optimizer) and v is not torch.optim.Optimizer)
    hint = suggest(name, known) if isinstance(name, str) else ''
    raise ValueError(f'unknown optimizer type {name!r}{hint}; torch.optim has {", ".join(known)}')


def get_optimizer(self, optim_type, params, lr, **kwargs):
    """``BaseModel.get_optimizer`` accepting any ``torch.optim`` class name (AdamW, SGD, ...)."""
    return optimizer_class(optim_type)(params, lr, **kwargs)


# ----------------------------------------------------------------------------------------------
# 6. basicsr#515 / PR #570
def _perceptual_loss_init(init):

    @functools.wraps(init)  # keeps the signature visible to inspect
    def __init__(self, *args, **kwargs):
        import torch
        bound = inspect.signature(init).bind(self, *args, **kwargs)
        if bound.arguments.get('criterion') != 'l2':
            return init(self, *args, **kwargs)
        bound.arguments['criterion'] = 'l1'  # build everything else as 1.4.2 does
        init(*bound.args, **bound.kwargs)
        self.criterion_type = 'l2'
        self.criterion = torch.nn.MSELoss()

    __init__.__doc__ = ("PerceptualLoss.__init__ with criterion='l2' giving torch.nn.MSELoss (1.4.2 calls the "
                        'non-existent torch.nn.L2loss; basicsr#515, PR #570).')
    return __init__


# ----------------------------------------------------------------------------------------------
# 7. resume inside an epoch; per-sample randomness keyed by the draw (no upstream issue found)
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


def _resumable_sampler_class():
    from basicsr.data.data_sampler import EnlargedSampler

    class ResumableSampler(EnlargedSampler):
        """``EnlargedSampler`` (same order) yielding :class:`SampleIndex` and, in the epoch
        a run resumes in, only the samples the saved iteration had not consumed."""

        def __init__(self, dataset, num_replicas, rank, ratio=1):
            super().__init__(dataset, num_replicas, rank, ratio)
            self.seed = _train_session.get('seed')
            # epoch -> samples of this rank to skip. Kept for every pass over that epoch, not used
            # up by the first: BasicSR's CPUPrefetcher builds a loader iterator before the train
            # loop's set_epoch + reset, and with workers that throw-away iterator already draws
            # indices; the loop's own pass over the resumed epoch must skip them again.
            self.skip = {}
            resume, batch = _train_session.get('resume'), _train_session.get('batch_per_rank')
            if resume is not None:
                epoch, it = resume
                per_epoch = self.num_samples // batch if batch else 0  # drop_last batches
                done = it - epoch * per_epoch
                if per_epoch and 0 <= done <= per_epoch:
                    self.skip[epoch] = done * batch
                else:
                    warnings.warn(f'resume: iteration {it} is not inside epoch {epoch} of {per_epoch} iterations '
                                  '(batch size or data changed?); the epoch restarts from its first batch')

        def slots(self):
            """This rank's positions in the epoch's permutation (1.4.2's order, before ``% len``)."""
            import torch
            g = torch.Generator()
            g.manual_seed(self.epoch)
            return torch.randperm(self.total_size, generator=g).tolist()[self.rank:self.total_size:self.num_replicas]

        def __iter__(self):
            size, epoch = len(self.dataset), self.epoch
            slots = self.slots()[self.skip.get(epoch, 0):]
            if self.seed is None:
                return iter([v % size for v in slots])
            return iter([SampleIndex(v % size, (int(self.seed), epoch, v)) for v in slots])

    return ResumableSampler


def create_train_val_dataloader(opt, logger):
    """``basicsr.train.create_train_val_dataloader`` with enough epochs for ``total_iter`` (fix 8)."""
    import math
    import basicsr.train

    loaders = original(basicsr.train, 'create_train_val_dataloader')(opt, logger)
    train_loader, train_sampler, val_loaders, total_epochs, total_iters = loaders
    per_epoch = len(train_loader)
    if per_epoch == 0:
        train = opt['datasets']['train']
        raise ValueError(f"datasets.train: {len(train_loader.dataset)} sample(s) x dataset_enlarge_ratio "
                         f"{train.get('dataset_enlarge_ratio', 1)} give no full batch of "
                         f"{train_loader.batch_size} per process (batch_size_per_gpu)")
    return train_loader, train_sampler, val_loaders, max(total_epochs, math.ceil(total_iters / per_epoch)), total_iters


# ----------------------------------------------------------------------------------------------
def apply():
    """Apply every fix once. The #650 shim must precede the first ``import basicsr``."""
    global _applied
    if _applied:
        return
    _shim_functional_tensor()

    import basicsr.train
    from basicsr.losses.basic_loss import PerceptualLoss
    from basicsr.models.base_model import BaseModel
    from basicsr.utils import dist_util, options

    _replace(basicsr.train, 'load_resume_state', load_resume_state)
    _replace(options, 'init_dist', init_dist)  # the name parse_options calls
    _replace(dist_util, 'init_dist', init_dist)
    _replace(BaseModel, 'model_to_device', model_to_device)
    _replace(BaseModel, 'get_optimizer', get_optimizer)
    _replace(PerceptualLoss, '__init__', _perceptual_loss_init(PerceptualLoss.__init__))
    global ResumableSampler
    ResumableSampler = _resumable_sampler_class()
    _replace(basicsr.train, 'EnlargedSampler', ResumableSampler)
    _replace(basicsr.train, 'create_train_val_dataloader', create_train_val_dataloader)
    _applied = True
