"""BasicSR option files with inheritance, and their validation.

An option file may name parent files under ``_base_`` (a path or a list, relative to the
file). They are merged with mmengine's ``Config`` rules: bases first, then the child
overrides them key by key, nested dicts are merged, and ``_delete_: true`` in a child dict
replaces the base dict instead of merging into it. The result is plain dicts / lists, in
the order base keys first, then keys new in the child, ready to be written back as the
single YAML file BasicSR reads.

``validate_options`` checks, before anything runs, that the required keys exist and that
every ``type`` names something registered in BasicSR (arches, datasets, losses, metrics,
models), so a typo fails in one line naming the option instead of deep in a training run.
"""
import difflib
import os

import yaml

GENERAL_KEYS = ('name', 'model_type', 'scale', 'num_gpu', 'manual_seed')  # head of BasicSR option files
REQUIRED_KEYS = ('name', 'model_type', 'num_gpu', 'datasets', 'path')
# keys the BasicSR pipelines read unconditionally, on top of REQUIRED_KEYS
PIPELINE_KEYS = {'train': ('train', 'logger'), 'test': ('val', )}
OPTION_SUFFIXES = ('.yml', '.yaml')


class OptionsError(ValueError):
    """An option file that cannot be used; the message names the file and what is wrong."""

    def __init__(self, path, reason):
        super().__init__(f"option file '{path}': {reason}")
        self.path, self.reason = path, reason


# ----------------------------------------------------------------------------------------------
# loading
def load_options(path):
    """Read ``path`` and its ``_base_`` files into one plain dict (see module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OptionsError(path, 'no such file' if not os.path.exists(path) else 'not a file')
    if not path.endswith(OPTION_SUFFIXES):
        raise OptionsError(path, f'expected a YAML file ({" or ".join(OPTION_SUFFIXES)})')
    # Parse the file ourselves first: YAML syntax errors get their line number and an empty
    # or non-mapping file a clear message (mmengine would fail on them with a bare trace).
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
        raw = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as err:
        if '_base_' not in text:
            raise OptionsError(path, f'invalid YAML: {_one_line(err)}') from None
        raw = {'_base_': None}  # may be mmengine's unquoted {{ _base_.x }} placeholders: let it try
    except (OSError, UnicodeDecodeError) as err:
        raise OptionsError(path, f'cannot read: {_one_line(err)}') from None
    if not isinstance(raw, dict):
        raise OptionsError(path, f'expected a mapping of options at the top level, got '
                           f'{"nothing" if raw is None else type(raw).__name__}')
    if '_base_' not in raw:
        return to_plain(raw)

    from mmengine.config import Config
    try:
        # custom_imports would import arbitrary modules: not part of BasicSR option files
        cfg = Config.fromfile(path, import_custom_modules=False)
    except FileNotFoundError as err:
        raise OptionsError(path, f'_base_: {_one_line(err)}') from None
    except Exception as err:  # mmengine raises assorted types for bad bases / duplicate keys
        raise OptionsError(path, f'cannot merge _base_ files: {type(err).__name__}: {_one_line(err)}') from None
    return _general_keys_first(to_plain(cfg.to_dict()))


def direct_bases(path):
    """``None`` when :func:`load_options` reads ``path`` as it is (no ``_base_``); else the
    ``_base_`` files it names itself, as absolute paths (empty when only mmengine can parse it)."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    try:
        raw = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError:
        return []
    if not isinstance(raw, dict) or '_base_' not in raw:
        return None
    bases = [raw['_base_']] if isinstance(raw['_base_'], str) else list(raw['_base_'] or [])
    return [os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), b)) for b in bases]


def _general_keys_first(opt):
    # mmengine appends keys the child adds after the base's; keep BasicSR's usual head
    head = {k: opt[k] for k in GENERAL_KEYS if k in opt}
    return {**head, **{k: v for k, v in opt.items() if k not in head}}


def _yaml_loader():
    try:
        return yaml.CSafeLoader
    except AttributeError:
        return yaml.SafeLoader


def _one_line(err):
    text = ' '.join(str(err).split())
    return text or type(err).__name__


def to_plain(obj):
    """ConfigDicts / OrderedDicts / tuples -> plain dicts (string keys) and lists, order kept:
    what YAML writes back and what a ``weights_only`` checkpoint can hold."""
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def dump_options(opt, header=()):
    """The YAML text of ``opt`` (key order kept), after ``header`` lines as comments."""
    comments = ''.join(f'# {line}\n' for line in header)
    return comments + yaml.safe_dump(opt, sort_keys=False, default_flow_style=False, allow_unicode=True)


def write_options(opt, path, header=()):
    with open(path, 'w', encoding='utf-8') as f:
        f.write(dump_options(opt, header))
    return path


# ----------------------------------------------------------------------------------------------
# validation
def validate_options(opt, path, command='train'):
    """Raise :class:`OptionsError` for missing keys or a ``type`` no BasicSR registry knows."""
    from basicsr.utils.registry import (ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY,
                                        MODEL_REGISTRY)

    required = REQUIRED_KEYS + PIPELINE_KEYS.get(command, ())
    missing = [k for k in required if k not in opt]
    if missing:
        raise OptionsError(path, f'missing required top-level key(s): {", ".join(missing)}')
    for key in ('datasets', 'path') + PIPELINE_KEYS.get(command, ()):
        if not isinstance(opt[key], dict):
            raise OptionsError(path, f'{key}: expected a mapping, got {type(opt[key]).__name__}')

    _check_name(path, 'model_type', opt['model_type'], MODEL_REGISTRY, 'model')

    for key, value in opt.items():
        if key.startswith('network_') and value is not None:
            if not isinstance(value, dict) or 'type' not in value:
                raise OptionsError(path, f"{key}: expected a mapping with a 'type'")
            # nested {'type': ...} dicts (e.g. LIIF's encoder) are built with build_network too
            for where, name in _nested_types(value, key):
                _check_name(path, where, name, ARCH_REGISTRY, 'arch')

    if not opt['datasets']:
        raise OptionsError(path, 'datasets: no dataset given')
    for phase, dataset in opt['datasets'].items():
        if not isinstance(dataset, dict) or 'type' not in dataset:
            raise OptionsError(path, f"datasets.{phase}: expected a mapping with a 'type'")
        _check_name(path, f'datasets.{phase}.type', dataset['type'], DATASET_REGISTRY, 'dataset')

    for key, value in (opt.get('train') or {}).items():
        if not isinstance(value, dict) or 'type' not in value:
            continue  # e.g. `perceptual_opt: ~` switches a loss off
        if key.endswith('_opt'):
            _check_name(path, f'train.{key}.type', value['type'], LOSS_REGISTRY, 'loss')
        elif key.startswith('optim_'):
            try:
                optimizer_class(value['type'])
            except ValueError as err:
                raise OptionsError(path, f'train.{key}.type: {err}') from None

    metrics = (opt.get('val') or {}).get('metrics') or {}
    if not isinstance(metrics, dict):
        raise OptionsError(path, f'val.metrics: expected a mapping, got {type(metrics).__name__}')
    for name, metric in metrics.items():
        if not isinstance(metric, dict) or 'type' not in metric:
            raise OptionsError(path, f"val.metrics.{name}: expected a mapping with a 'type'")
        _check_name(path, f'val.metrics.{name}.type', metric['type'], METRIC_REGISTRY, 'metric')

    # the evaluation protocol (val.cell_clip_scale_max, val.pad_to_window), before any directory is made
    from .models.arbitrary_scale_sr_model import eval_protocol
    try:
        eval_protocol(opt.get('val'))
    except ValueError as err:
        raise OptionsError(path, str(err)) from None


def optimizer_class(name):
    """The ``torch.optim`` optimizer class called ``name``; ValueError (with close names) otherwise."""
    import torch

    cls = getattr(torch.optim, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
        return cls
    known = sorted(k for k, v in vars(torch.optim).items()
                   if isinstance(v, type) and issubclass(v, torch.optim.Optimizer) and v is not torch.optim.Optimizer)
    hint = suggest(name, known) if isinstance(name, str) else ''
    raise ValueError(f'unknown optimizer type {name!r}{hint}; torch.optim has {", ".join(known)}')


def _nested_types(node, where):
    if isinstance(node, dict):
        if 'type' in node:
            yield f'{where}.type', node['type']
        for key, value in node.items():
            if key != 'type':
                yield from _nested_types(value, f'{where}.{key}')
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _nested_types(value, f'{where}[{i}]')


def _check_name(path, where, name, registry, kind):
    # BasicSR's Registry.get also accepts '<name>_basicsr' registrations under the bare name
    if isinstance(name, str) and (name in registry or f'{name}_basicsr' in registry):
        return
    if not isinstance(name, str):
        raise OptionsError(path, f'{where}: expected a {kind} name, got {name!r}')
    raise OptionsError(path, f"{where}: unknown {kind} type '{name}'{suggest(name, registry.keys())}")


def suggest(name, known):
    """' (did you mean 'X'?)' for close names among ``known``, case-insensitively; else ''."""
    by_lower = {}
    for k in sorted(known):
        by_lower.setdefault(k.lower(), k)
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    if not close:
        return ''
    return ' (did you mean ' + ' or '.join(repr(by_lower[c]) for c in close) + '?)'


# ----------------------------------------------------------------------------------------------
# network options from the checkpoint
# options that change how a network is evaluated, not what it computes: render settings
# (``val.chunk_size``, ``--chunk-size``), which older option files and checkpoints carried in
# ``network_g``; they are taken out before a network is built
RENDER_ONLY_KEYS = ('chunk_size', )


def without_render_options(network_opt):
    """``network_opt`` without :data:`RENDER_ONLY_KEYS` (a copy; the input is not changed)."""
    if not isinstance(network_opt, dict):
        return network_opt
    return {k: v for k, v in network_opt.items() if k not in RENDER_ONLY_KEYS}


def render_options_to_val(opt):
    """Move render settings given under ``network_g`` (older option files) to ``val``, where
    the renderer reads them (an explicit ``val`` value wins). Returns a line saying so, or None."""
    network = opt.get('network_g')
    moved = [k for k in RENDER_ONLY_KEYS if isinstance(network, dict) and k in network]
    if not moved:
        return None
    val = opt.get('val')
    for key in moved:
        value = network.pop(key)
        if isinstance(val, dict):
            val.setdefault(key, value)
    where = 'val' if isinstance(val, dict) else 'nowhere (no val section)'
    return f"network_g.{', network_g.'.join(moved)} is a render setting: moved to {where}"


def network_from_checkpoint(opt, path):
    """Reconcile ``network_g`` with the checkpoint in ``path.pretrain_network_g``.

    Our checkpoints (and ``basicsr convert`` outputs, and the authors' training checkpoints)
    say which network they hold. Without ``network_g`` in ``opt`` (absent, null or empty) it is
    taken from the checkpoint; returns a line saying so, else None. When both are given, they
    must describe the same network (unless ``strict_load_g: false`` asks for a partial load):
    their options are compared with each arch's defaults filled in, and a difference is an
    :class:`OptionsError` naming every differing key.
    """
    from .checkpoint import CheckpointError, identify, read_checkpoint

    ckpt_path = (opt.get('path') or {}).get('pretrain_network_g')
    given = opt.get('network_g')
    if not ckpt_path or not isinstance(ckpt_path, str):
        return None
    if given not in (None, {}) and not isinstance(given, dict):
        return None  # validate_options reports it
    try:
        stored, _ = identify(read_checkpoint(ckpt_path, lazy=True), ckpt_path)  # the options, not the weights
    except CheckpointError as err:
        if given in (None, {}):
            raise OptionsError(path, f'network_g is not given and path.pretrain_network_g cannot provide it: '
                               f'{err}') from None
        return None  # a checkpoint without options: BasicSR loads it into network_g as usual
    if given in (None, {}):
        opt['network_g'] = stored
        encoder = stored.get('encoder')
        encoder = f", encoder {encoder['type']}" if isinstance(encoder, dict) and 'type' in encoder else ''
        return f"network_g taken from {ckpt_path} ({stored.get('type')}{encoder})"
    if not opt['path'].get('strict_load_g', True):
        return None  # a deliberate partial load (e.g. an encoder into another arch)
    ours, theirs = _flat_effective(given), _flat_effective(stored)
    differing = sorted(k for k in set(ours) | set(theirs)
                       if ours.get(k, '(unset)') != theirs.get(k, '(unset)') and k.split('.')[-1] not in
                       RENDER_ONLY_KEYS)
    if differing:
        details = ', '.join(f'{k}: {ours.get(k, "(unset)")!r} here vs {theirs.get(k, "(unset)")!r}' for k in differing)
        raise OptionsError(path, f'network_g differs from the network stored in {ckpt_path} ({details}); '
                           'remove network_g to use the checkpoint\'s, or fix it')
    return None


def _flat_effective(network_opt, prefix=''):
    """``{'encoder.num_block': 16, ...}``: the options as given, each registered arch's
    constructor defaults filled in where an option is not given."""
    import inspect

    from basicsr.utils.registry import ARCH_REGISTRY

    node = dict(network_opt)
    if isinstance(node.get('type'), str) and node['type'] in ARCH_REGISTRY:
        params = inspect.signature(ARCH_REGISTRY.get(node['type']).__init__).parameters
        for name, param in params.items():
            if name != 'self' and param.default is not inspect.Parameter.empty and param.kind not in (
                    param.VAR_POSITIONAL, param.VAR_KEYWORD):
                node.setdefault(name, param.default)
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flat_effective(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
    return flat
