"""Compatibility fixes for basicsr 1.4.2 on current torch / torchvision, and on CPU.

Each fix is explicit and small, names its upstream issue, replaces named BasicSR
attributes (the originals are kept: :func:`original`), is applied once by :func:`apply`
(called when ``ciisr_plugin`` is imported) and has a test in ``tests/training/test_compat.py``
that fails without it.

1. ``torchvision.transforms.functional_tensor`` shim - basicsr#650.
2. ``basicsr.train.load_resume_state`` -> :func:`resume.load_resume_state`: resume onto the
   CPU when ``num_gpu`` is 0 or there is no CUDA (1.4.2 always maps the state onto
   ``torch.cuda.current_device()``), and look for ``--auto_resume`` states where this run
   saves them, skipping incomplete ones. No upstream issue found.
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
7. ``basicsr.train.EnlargedSampler`` -> :class:`resume.ResumableSampler`: after a resume,
   1.4.2's train loop restarts the interrupted epoch from its first batch (replaying batches it
   already trained on while ``current_iter`` goes on), so a resumed run sees other data than an
   uninterrupted one. The sampler skips the batches the saved iteration already consumed, keeps
   1.4.2's order otherwise, and names every draw ``(seed, epoch, slot)`` so that datasets can
   derive their per-sample randomness from it instead of a global RNG (same sample whatever
   the worker count, rank split or resume). No upstream issue found. Fix 8 hands it the run's
   seed and resume position.
8. ``basicsr.train.create_train_val_dataloader``: 1.4.2 counts ``ceil(len / batch)``
   iterations per epoch while the loader drops the last partial batch, so when the batch
   does not divide the data the run stops before ``total_iter`` (it only got there after a
   resume by replaying an epoch, which fix 7 removes). The epoch count is recomputed from
   the loader's real length; a train set without one full batch is an error. It also gives
   fix 7's sampler the seed and resume position (:func:`resume.prepare_train_sampler`). No
   upstream issue found.

The resume machinery itself (fixes 2 and 7, and the RNG states the model saves) lives in
:mod:`ciisr_plugin.resume`; this module only installs it.

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
_dist_hint = {'backend': None, 'num_gpu': None}


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
def get_optimizer(self, optim_type, params, lr, **kwargs):
    """``BaseModel.get_optimizer`` accepting any ``torch.optim`` class name (AdamW, SGD, ...)."""
    from .config import optimizer_class
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


def create_train_val_dataloader(opt, logger):
    """``basicsr.train.create_train_val_dataloader`` with enough epochs for ``total_iter`` (fix 8)."""
    import math
    import basicsr.train

    from .resume import prepare_train_sampler

    loaders = original(basicsr.train, 'create_train_val_dataloader')(opt, logger)
    train_loader, train_sampler, val_loaders, total_epochs, total_iters = loaders
    prepare_train_sampler(train_sampler, opt)  # fix 7: seed and resume position
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

    from . import resume  # imports basicsr: after fix 1
    _replace(basicsr.train, 'load_resume_state', resume.load_resume_state)
    _replace(options, 'init_dist', init_dist)  # the name parse_options calls
    _replace(dist_util, 'init_dist', init_dist)
    _replace(BaseModel, 'model_to_device', model_to_device)
    _replace(BaseModel, 'get_optimizer', get_optimizer)
    _replace(PerceptualLoss, '__init__', _perceptual_loss_init(PerceptualLoss.__init__))
    _replace(basicsr.train, 'EnlargedSampler', resume.ResumableSampler)
    _replace(basicsr.train, 'create_train_val_dataloader', create_train_val_dataloader)
    _applied = True
