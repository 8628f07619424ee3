"""Each basicsr 1.4.2 fix in ciisr_plugin.compat, shown failing without it and working with it."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch

import ciisr_plugin  # noqa: F401  (applies the fixes)
from ciisr_plugin import compat

import basicsr.train  # noqa: E402  (after ciisr_plugin: needs the #650 shim)
from basicsr.losses import basic_loss  # noqa: E402
from basicsr.models.base_model import BaseModel  # noqa: E402
from basicsr.models.lr_scheduler import MultiStepRestartLR  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _python(code, env=None, timeout=120):
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------------------------
# 1. basicsr#650
def test_functional_tensor_shim():
    import torchvision.transforms.functional as functional
    from basicsr.data import degradations
    assert degradations.rgb_to_grayscale is functional.rgb_to_grayscale


def test_basicsr_import_fails_without_the_shim():
    result = _python("""
        try:
            import torchvision.transforms.functional_tensor
        except ImportError:
            pass
        else:
            raise SystemExit(3)  # an old torchvision: basicsr#650 does not arise
        import basicsr
        """)
    if result.returncode == 3:
        pytest.skip('this torchvision still ships functional_tensor: basicsr#650 does not arise')
    assert result.returncode == 1 and 'functional_tensor' in result.stderr


# ----------------------------------------------------------------------------------------------
# 2. resume on CPU
def _training_state(iteration):
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    net(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    scheduler = MultiStepRestartLR(optimizer, milestones=[2, 4], gamma=0.5)
    return {'epoch': 0, 'iter': iteration, 'optimizers': [optimizer.state_dict()],
            'schedulers': [scheduler.state_dict()]}


@pytest.fixture
def saved_states(tmp_path, monkeypatch):
    # the layout BaseModel.save_training_state writes; cwd = root (1.4.2 searches relative to it)
    monkeypatch.chdir(tmp_path)
    states = tmp_path / 'experiments' / 'run' / 'training_states'
    states.mkdir(parents=True)
    for iteration in (2, 10, 4):
        torch.save(_training_state(iteration), states / f'{iteration}.state')
    opt = {
        'name': 'run', 'num_gpu': 0, 'auto_resume': True, 'network_g': {'type': 'EDSR'},
        'path': {'training_states': str(states), 'models': str(tmp_path / 'experiments' / 'run' / 'models'),
                 'resume_state': None},
    }
    return opt, states


def _state_devices(state):
    return {v.device.type for o in state['optimizers'] for s in o['state'].values() for v in s.values()
            if isinstance(v, torch.Tensor)}


def test_resume_loads_onto_cpu_without_gpus(saved_states):
    opt, states = saved_states
    state = basicsr.train.load_resume_state(opt)  # the function train_pipeline calls
    assert state['iter'] == 10
    assert opt['path']['resume_state'] == str(states / '10.state')
    assert opt['path']['pretrain_network_g'].endswith(os.path.join('models', 'net_g_10.pth'))
    assert _state_devices(state) == {'cpu'}
    assert state['schedulers'][0]['milestones'] == Counter({2: 1, 4: 1})


def test_resume_without_the_fix_needs_cuda(saved_states):
    opt, _ = saved_states
    unpatched = compat.original(basicsr.train, 'load_resume_state')
    if HAS_CUDA:  # 1.4.2 puts a num_gpu: 0 run's state on the GPU
        assert _state_devices(unpatched(dict(opt, path=dict(opt['path'])))) == {'cuda'}
    else:
        with pytest.raises((RuntimeError, AssertionError)):
            unpatched(dict(opt, path=dict(opt['path'])))


def test_resume_state_path_given_explicitly(saved_states):
    opt, states = saved_states
    opt = dict(opt, auto_resume=False, path=dict(opt['path'], resume_state=str(states / '4.state')))
    assert basicsr.train.load_resume_state(opt)['iter'] == 4
    assert basicsr.train.load_resume_state(dict(opt, path=dict(opt['path'], resume_state=None))) is None


def test_training_states_load_with_weights_only(tmp_path):
    # torch>=2.6 loads weights_only=True by default: the scheduler's Counter must be allowed
    torch.save(_training_state(3), tmp_path / '3.state')
    state = torch.load(tmp_path / '3.state', map_location='cpu', weights_only=True)
    assert isinstance(state['schedulers'][0]['milestones'], Counter)


# ----------------------------------------------------------------------------------------------
# 3 + 4. --launcher pytorch on CPU, DDP on CPU
_DIST_SCRIPT = """
import json, torch
import torch.distributed as dist
import ciisr_plugin
from ciisr_plugin import compat
from basicsr.models.base_model import BaseModel
from basicsr.utils import dist_util, options

out = {}
if not torch.cuda.is_available():
    try:  # 1.4.2: torch.cuda.set_device(rank % device_count()) with no GPU
        compat.original(options, 'init_dist')('pytorch')
        out['original_init'] = 'ok'
    except Exception as err:
        out['original_init'] = type(err).__name__
compat.set_dist_params({'backend': 'gloo'}, num_gpu=0)
options.init_dist('pytorch')  # what BasicSR's parse_options calls
out['backend'] = dist.get_backend()
out['world_size'] = dist.get_world_size()

model = BaseModel({'num_gpu': 0, 'is_train': True, 'dist': True})
try:
    compat.original(BaseModel, 'model_to_device')(model, torch.nn.Linear(2, 2))
    out['original_ddp'] = 'ok'
except Exception as err:
    out['original_ddp'] = type(err).__name__
net = model.model_to_device(torch.nn.Linear(2, 2))
out['ddp'] = type(net).__name__
out['ddp_device_ids'] = net.device_ids
out['ddp_output'] = net(torch.ones(1, 2)).shape[-1]
dist.destroy_process_group()
print(json.dumps(out))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_init_dist_and_ddp_on_cpu():
    env = {'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '1', 'MASTER_ADDR': '127.0.0.1',
           'MASTER_PORT': str(_free_port())}
    result = _python(_DIST_SCRIPT, env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    if not HAS_CUDA:
        assert out['original_init'] == 'ZeroDivisionError'
    assert out['backend'] == 'gloo' and out['world_size'] == 1  # 1.4.2 always asks for nccl
    assert out['original_ddp'] != 'ok'  # device_ids=[current_device()] with a CPU module
    assert out['ddp'] == 'DistributedDataParallel' and out['ddp_device_ids'] is None and out['ddp_output'] == 2


def test_default_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert compat.default_dist_backend(None) == 'gloo'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert compat.default_dist_backend(1) == 'nccl'
    assert compat.default_dist_backend(0) == 'gloo'


# ----------------------------------------------------------------------------------------------
# 5. optimizers beyond Adam
def _bare_model():
    return BaseModel({'num_gpu': 0, 'is_train': True, 'dist': False})


def test_any_torch_optimizer_by_name():
    model, params = _bare_model(), [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(NotImplementedError):
        compat.original(BaseModel, 'get_optimizer')(model, 'AdamW', params, 1e-3)
    adamw = model.get_optimizer('AdamW', params, 1e-3, weight_decay=0.5, betas=[0.8, 0.9])
    assert type(adamw) is torch.optim.AdamW
    group = adamw.param_groups[0]
    assert (group['lr'], group['weight_decay'], tuple(group['betas'])) == (1e-3, 0.5, (0.8, 0.9))
    sgd = model.get_optimizer('SGD', params, 0.1, momentum=0.9)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]['momentum'] == 0.9
    assert type(model.get_optimizer('Adam', params, 1e-4)) is torch.optim.Adam


@pytest.mark.parametrize('name, hint', [('Adamw', "did you mean 'AdamW'"), ('Optimizer', None), ('Foo', None)])
def test_unknown_optimizer(name, hint):
    with pytest.raises(ValueError) as err:
        _bare_model().get_optimizer(name, [torch.nn.Parameter(torch.zeros(1))], 1e-3)
    assert f"unknown optimizer type '{name}'" in str(err.value) and 'AdamW' in str(err.value)
    if hint:
        assert hint in str(err.value)


# ----------------------------------------------------------------------------------------------
# 6. basicsr#515: PerceptualLoss(criterion='l2')
class _IdentityFeatures(torch.nn.Module):
    """Stands in for VGG (no weight download): each layer's 'feature' is the image itself."""

    def __init__(self, layer_name_list, **kwargs):
        super().__init__()
        self.layer_name_list = layer_name_list

    def forward(self, x):
        return {name: x for name in self.layer_name_list}


def test_perceptual_loss_l2(monkeypatch):
    monkeypatch.setattr(basic_loss, 'VGGFeatureExtractor', _IdentityFeatures)
    PerceptualLoss = basic_loss.PerceptualLoss
    with pytest.raises(AttributeError, match='L2loss'):
        compat.original(PerceptualLoss, '__init__')(PerceptualLoss.__new__(PerceptualLoss), {'conv1_2': 1.0},
                                                    criterion='l2')

    loss = PerceptualLoss({'conv1_2': 0.5, 'conv2_2': 0.25}, perceptual_weight=2.0, style_weight=0., criterion='l2')
    x, gt = torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5)
    percep, style = loss(x, gt)
    expected = 2.0 * (0.5 + 0.25) * ((x - gt)**2).mean()
    assert style is None and torch.allclose(percep, expected, rtol=1e-6, atol=0)
    # the other criteria are untouched
    assert isinstance(PerceptualLoss({'conv1_2': 1.0}).criterion, torch.nn.L1Loss)
    assert PerceptualLoss({'conv1_2': 1.0}, criterion='fro').criterion is None
    with pytest.raises(NotImplementedError):
        PerceptualLoss({'conv1_2': 1.0}, criterion='l3')


def test_patches_are_installed_once():
    compat.apply()  # a second call changes nothing
    from ciisr_plugin import resume
    assert basicsr.train.load_resume_state is resume.load_resume_state
    assert basicsr.train.EnlargedSampler is resume.ResumableSampler
    assert BaseModel.get_optimizer is compat.get_optimizer
    assert BaseModel.model_to_device is compat.model_to_device
    from basicsr.utils import dist_util, options
    assert options.init_dist is compat.init_dist and dist_util.init_dist is compat.init_dist


def test_compat_only_installs_the_resume_machinery():
    """The exact-resume code lives in ciisr_plugin.resume; compat installs it. Neither it nor
    config imports compat (config's optimizer lookup used to close a compat <-> config circle)."""
    import ast
    from pathlib import Path

    from ciisr_plugin import resume
    package = Path(compat.__file__).parent
    for name in ('config', 'resume', 'fileio'):
        tree = ast.parse((package / f'{name}.py').read_text())
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not any(m and m.split('.')[-1] == 'compat' for m in modules), (name, modules)
    for moved in ('ResumableSampler', 'SampleIndex', '_train_session', 'optimizer_class', 'resume_device'):
        assert not hasattr(compat, moved), moved
    assert basicsr.train.EnlargedSampler is resume.ResumableSampler
