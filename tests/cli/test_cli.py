"""The `basicsr` command line: dispatch, errors, option inheritance, and real BasicSR runs.

The end-to-end runs use BasicSR's own PairedImageDataset + SRModel with a tiny EDSR on a
few 16x16 PNGs, CPU only, each in a fresh interpreter as a user would run them.
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import ciisr_plugin
from ciisr_plugin.cli import COMMANDS, _move_local_rank, build_parser, main

BIN = Path(sys.executable).parent
SCALE = 2


def _console_script():
    script = shutil.which('basicsr', path=str(BIN)) or shutil.which('basicsr')
    assert script, 'the `basicsr` console script is not installed: run `pip install -e .` in the repo'
    return script


def _run(args, cwd, timeout=180):
    env = {k: v for k, v in os.environ.items() if k != 'CIISR_TRACEBACK'}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _last_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0, err
    assert re.match(r'basicsr( \w+)?: error: ', err), err
    return err


# ----------------------------------------------------------------------------------------------
# dispatch
def test_help_lists_commands_and_module_form_is_identical(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(['--help'])  # what the `basicsr` console script runs
    assert done.value.code == 0
    in_process = capsys.readouterr().out
    module = _run([sys.executable, '-m', 'ciisr_plugin', '--help'], tmp_path)
    assert module.returncode == 0, module.stderr
    assert module.stdout == in_process
    assert in_process.startswith('usage: basicsr')
    for name in ('train', 'test', 'convert'):
        assert re.search(rf'^\s+{name}\s+\S', in_process, re.M), name


def test_unknown_command(capsys):
    assert main(['trian', '-opt', 'x.yml']) == 2
    err = _last_line_error(capsys)
    assert "unknown command 'trian'" in err and "did you mean 'train'" in err and 'convert' in err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert 'usage: basicsr' in capsys.readouterr().out


def test_pipeline_arguments_match_basicsr():
    parser = build_parser()
    args = parser.parse_args(['train', '-opt', 'o.yml', '--launcher', 'pytorch', '--auto_resume', '--debug',
                              '--local-rank', '3', '--force_yml', 'a:b=1', 'c=2'])
    assert (args.opt, args.launcher, args.auto_resume, args.debug, args.local_rank, args.force_yml) == \
        ('o.yml', 'pytorch', True, True, 3, ['a:b=1', 'c=2'])
    assert parser.parse_args(['test', '-opt', 'o.yml', '--local_rank', '1']).local_rank == 1
    # torch.distributed.launch puts --local-rank before the script's own arguments
    assert _move_local_rank(['--local-rank=1', 'train', '-opt', 'o.yml']) == \
        ['train', '--local-rank=1', '-opt', 'o.yml']
    assert _move_local_rank(['--local_rank', '2', 'test']) == ['test', '--local_rank', '2']
    assert set(COMMANDS) >= {'train', 'test', 'convert'}


def test_missing_option_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(['train', '-opt', 'missing.yml']) == 2
    assert _last_line_error(capsys) == "basicsr train: error: option file 'missing.yml': no such file"
    assert not (tmp_path / 'experiments').exists()


def test_unknown_type_is_named_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'bad.yml').write_text(textwrap.dedent("""\
        name: bad
        model_type: SRModel
        num_gpu: 0
        network_g: {type: EDSRR, num_in_ch: 3, num_out_ch: 3}
        datasets: {val: {type: PairedImageDataset}}
        path: {}
        val: {metrics: {}}
        """))
    assert main(['test', '-opt', 'bad.yml']) == 2
    err = _last_line_error(capsys)
    assert err.startswith("basicsr test: error: option file 'bad.yml': network_g.type: unknown arch type 'EDSRR' "
                          "(did you mean 'EDSR'")
    assert not (tmp_path / 'results').exists()


# ----------------------------------------------------------------------------------------------
# registration
def test_importing_the_plugin_registers_it(tmp_path):
    code = textwrap.dedent("""\
        import sys, types
        from torchvision.transforms import functional
        # only the basicsr#650 shim, by hand, so that basicsr imports without the plugin
        shim = types.ModuleType('torchvision.transforms.functional_tensor')
        shim.rgb_to_grayscale = functional.rgb_to_grayscale
        sys.modules[shim.__name__] = shim
        import basicsr
        from basicsr.utils.registry import ARCH_REGISTRY
        before = [n in ARCH_REGISTRY for n in ('LIIF', 'EDSREncoder', 'EDSR')]
        import ciisr_plugin
        after = [n in ARCH_REGISTRY for n in ('LIIF', 'EDSREncoder', 'EDSR')]
        print(before, after)
        """)
    result = _run([sys.executable, '-c', code], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == '[False, False, True] [True, True, True]'


# ----------------------------------------------------------------------------------------------
# end to end: basicsr train / --auto_resume / test, on CPU
BASE_YML = """\
    model_type: SRModel
    scale: {scale}
    num_gpu: 0
    manual_seed: 0
    network_g: {{type: EDSR, num_in_ch: 3, num_out_ch: 3, num_feat: 16, num_block: 2, upscale: {scale}, img_range: 1.0}}
    datasets:
      train:
        name: tiny
        type: PairedImageDataset
        dataroot_gt: {data}/gt
        dataroot_lq: {data}/lq
        filename_tmpl: '{{}}'
        io_backend: {{type: disk}}
        gt_size: 8
        use_hflip: true
        use_rot: true
        num_worker_per_gpu: 0
        batch_size_per_gpu: 2
      val:
        name: tinyval
        type: PairedImageDataset
        dataroot_gt: {data}/gt
        dataroot_lq: {data}/lq
        io_backend: {{type: disk}}
    path: {{pretrain_network_g: ~, strict_load_g: true, resume_state: ~}}
    train:
      optim_g: {{type: Adam, lr: !!float 1e-3, weight_decay: 0, betas: [0.9, 0.99]}}
      scheduler: {{type: MultiStepLR, milestones: [3], gamma: 0.5}}
      total_iter: 100
      warmup_iter: -1
      pixel_opt: {{type: L1Loss, loss_weight: 1.0, reduction: mean}}
    val:
      val_freq: 2
      save_img: false
      metrics:
        psnr: {{type: calculate_psnr, crop_border: 2, test_y_channel: false}}
    logger: {{print_freq: 1, save_checkpoint_freq: 2, use_tb_logger: false}}
    dist_params: {{backend: nccl, port: 29500}}
    """
CHILD_YML = """\
    _base_: ../bases/base.yml
    name: tiny_edsr
    network_g: {num_feat: 8, num_block: 1}
    train:
      optim_g: {type: AdamW, lr: !!float 2e-3}
      total_iter: 2
    """


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """Tiny paired data, a base + child option file in another folder than the cwd `run/`."""
    root = tmp_path_factory.mktemp('cli_e2e')
    rng = np.random.default_rng(0)
    for sub in ('gt', 'lq'):
        (root / 'data' / sub).mkdir(parents=True)
    for i in range(3):
        gt = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        cv2.imwrite(str(root / 'data' / 'gt' / f'im{i}.png'), gt)
        cv2.imwrite(str(root / 'data' / 'lq' / f'im{i}.png'), cv2.resize(gt, (8, 8), interpolation=cv2.INTER_AREA))
    (root / 'bases').mkdir()
    (root / 'bases' / 'base.yml').write_text(textwrap.dedent(BASE_YML).format(scale=SCALE, data=root / 'data'))
    (root / 'opts').mkdir()
    (root / 'opts' / 'train_tiny.yml').write_text(textwrap.dedent(CHILD_YML))
    (root / 'run').mkdir()
    return root


@pytest.fixture(scope='module')
def first_run(workspace):
    result = _run([_console_script(), 'train', '-opt', '../opts/train_tiny.yml'], workspace / 'run')
    assert result.returncode == 0, result.stderr[-3000:]
    return workspace / 'run' / 'experiments' / 'tiny_edsr'


def _expected_merged(data):
    """base.yml with the child's changes applied by hand."""
    opt = yaml.safe_load(textwrap.dedent(BASE_YML).format(scale=SCALE, data=data))
    opt['network_g'].update(num_feat=8, num_block=1)
    opt['train']['optim_g'].update(type='AdamW', lr=2e-3)
    opt['train']['total_iter'] = 2
    return {'name': 'tiny_edsr', **opt}


def test_train_writes_under_cwd_with_merged_options(workspace, first_run):
    assert sorted(p.name for p in (workspace / 'run').iterdir()) == ['experiments']
    assert not (workspace / 'opts' / 'experiments').exists()
    assert sorted(p.name for p in (first_run / 'models').iterdir()) == ['net_g_2.pth', 'net_g_latest.pth']
    assert sorted(p.name for p in (first_run / 'training_states').iterdir()) == ['2.state']
    # BasicSR copied the merged options, under the original file name
    from basicsr.utils.options import ordered_yaml
    copied = first_run / 'train_tiny.yml'
    with open(copied) as f:
        copied_opt = yaml.load(f, Loader=ordered_yaml()[0])
    assert copied_opt == _expected_merged(workspace / 'data')
    assert list(copied_opt)[:5] == ['name', 'model_type', 'scale', 'num_gpu', 'manual_seed']
    assert 'command: basicsr train -opt ../opts/train_tiny.yml' in copied.read_text()
    # the run used what the file says: AdamW, 8 features, 1 block
    log = next(first_run.glob('train_tiny_edsr_*.log')).read_text()
    assert 'Network: EDSR, with parameters: 4,531' in log  # 8 features, 1 block, x2 (counted below)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3), torch.nn.Conv2d(8, 8, 3),
                              torch.nn.Conv2d(8, 8, 3), torch.nn.Conv2d(8, 32, 3), torch.nn.Conv2d(8, 3, 3))
    assert sum(p.numel() for p in net.parameters()) == 4531
    # resume states load under torch's weights_only default
    state = torch.load(first_run / 'training_states' / '2.state', map_location='cpu', weights_only=True)
    assert state['iter'] == 2 and state['optimizers'][0]['param_groups'][0]['lr'] == 2e-3
    assert 'weight_decay' in state['optimizers'][0]['param_groups'][0]
    assert state['optimizers'][0]['param_groups'][0]['weight_decay'] == 0  # from base, merged under AdamW


def test_auto_resume_on_cpu(workspace, first_run):
    result = _run([sys.executable, '-m', 'ciisr_plugin', 'train', '-opt', '../opts/train_tiny.yml', '--auto_resume',
                   '--force_yml', 'train:total_iter=4'], workspace / 'run')
    assert result.returncode == 0, result.stderr[-3000:]
    log = max(first_run.glob('train_tiny_edsr_*.log'), key=lambda p: p.stat().st_mtime).read_text()
    assert re.search(r'Resuming training from epoch: \d+, iter: 2\.', log)
    assert f"Loading EDSR model from {first_run / 'models' / 'net_g_2.pth'}" in log
    trained = [int(i) for i in re.findall(r'iter:\s+(\d+), lr', log)]
    assert trained == [3, 4]
    assert sorted(p.name for p in (first_run / 'training_states').iterdir()) == ['2.state', '4.state']
    assert (first_run / 'models' / 'net_g_4.pth').is_file()
    assert not list((workspace / 'run' / 'experiments').glob('*archived*'))  # resumed, not restarted


def test_test_command_reports_psnr_of_saved_images(workspace, first_run):
    model = first_run / 'models' / 'net_g_2.pth'
    (workspace / 'opts' / 'test_tiny.yml').write_text(textwrap.dedent(f"""\
        _base_: ../bases/base.yml
        name: tiny_edsr_test
        network_g: {{num_feat: 8, num_block: 1}}
        datasets: {{_delete_: true, test_1: {{name: tinytest, type: PairedImageDataset,
                    dataroot_gt: {workspace}/data/gt, dataroot_lq: {workspace}/data/lq, io_backend: {{type: disk}}}}}}
        path: {{pretrain_network_g: {model}}}
        val: {{save_img: true, suffix: ~}}
        """))
    result = _run([_console_script(), 'test', '-opt', '../opts/test_tiny.yml'], workspace / 'run')
    assert result.returncode == 0, result.stderr[-3000:]
    results = workspace / 'run' / 'results' / 'tiny_edsr_test'
    log = next(results.glob('test_tiny_edsr_test_*.log')).read_text()
    logged = float(re.search(r'# psnr: ([0-9.]+)', log).group(1))
    psnrs = []
    for i in range(3):
        sr = cv2.imread(str(results / 'visualization' / 'tinytest' / f'im{i}_tiny_edsr_test.png')).astype(np.float64)
        gt = cv2.imread(str(workspace / 'data' / 'gt' / f'im{i}.png')).astype(np.float64)
        assert sr.shape == gt.shape == (16, 16, 3)
        mse = np.mean((sr[2:-2, 2:-2] - gt[2:-2, 2:-2])**2)
        psnrs.append(10 * np.log10(255.0**2 / mse))
    assert abs(np.mean(psnrs) - logged) < 1e-3


def test_torchrun_two_cpu_processes(workspace, first_run):
    torchrun = shutil.which('torchrun', path=str(BIN))
    assert torchrun, 'torchrun not found next to the Python interpreter'
    # a file without _base_ is handed to BasicSR as it is (its comments survive in the copy)
    flat = dict(_expected_merged(workspace / 'data'), name='tiny_ddp')
    assert flat['dist_params']['backend'] == 'nccl'  # BasicSR's usual template value: gloo is used on CPU
    (workspace / 'opts' / 'flat.yml').write_text('# a flat option file\n' + yaml.safe_dump(flat, sort_keys=False))
    result = _run([torchrun, '--standalone', '--nproc_per_node', '2', '--no-python', _console_script(), 'train',
                   '-opt', '../opts/flat.yml', '--launcher', 'pytorch'], workspace / 'run', timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    run = workspace / 'run' / 'experiments' / 'tiny_ddp'
    log = next(run.glob('train_tiny_ddp_*.log')).read_text()
    assert 'World size (gpu number): 2' in log and 'Network: DistributedDataParallel - EDSR' in log
    assert sorted(p.name for p in (run / 'models').iterdir()) == ['net_g_2.pth', 'net_g_latest.pth']
    copied = (run / 'flat.yml').read_text()
    assert '# a flat option file\n' in copied and copied.endswith((workspace / 'opts' / 'flat.yml').read_text())


def test_in_process_run_writes_its_own_log(workspace, first_run, monkeypatch):
    # BasicSR sets its logger up once per process; an earlier build_network (no log file)
    # must not leave main()'s run without its INFO log file
    from basicsr.utils import get_root_logger
    get_root_logger().info('some earlier use of BasicSR in this process')
    monkeypatch.chdir(workspace / 'run')
    assert main(['train', '-opt', '../opts/train_tiny.yml', '--force_yml', 'name=tiny_inproc']) == 0
    log = next((workspace / 'run' / 'experiments' / 'tiny_inproc').glob('train_tiny_inproc_*.log')).read_text()
    assert 'Start training from epoch: 0, iter: 0' in log and 'Saving models and training states.' in log
