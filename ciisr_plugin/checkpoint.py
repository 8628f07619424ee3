"""Loading models from checkpoints: this plugin's self-describing ones and the authors'.

Our checkpoints are BasicSR's (``params`` / ``params_ema``) plus ``network_g``, the arch
options, so ``load_model(path)`` needs no YAML. The LIIF / A-LIIF authors' training
checkpoints (``{'model': {'name', 'args', 'sd'}}``) are translated: their spec becomes our
options and their state-dict keys are renamed to our modules. Anything that does not
fit exactly is an error listing what is missing or unexpected - never a partial load.
"""
import copy
import os
import pickle
import re
import zipfile

import torch

from basicsr.archs import build_network

from .config import to_plain, without_render_options
from .fileio import atomic_write

NETWORK_OPT_KEY = 'network_g'


class CheckpointError(ValueError):
    """A checkpoint that cannot be turned into a model; the message says why."""


# ----------------------------------------------------------------------------------------------
# reading files
def read_checkpoint(path, allow_pickle=False, lazy=False):
    """``torch.load`` a checkpoint on CPU, refusing arbitrary pickles unless ``allow_pickle``.

    Checkpoints of this plugin and the authors' are plain tensors/dicts and load with
    ``weights_only=True``; a file that needs arbitrary code to unpickle is refused with a
    message saying so (pass ``allow_pickle=True`` only for files you trust). ``lazy``: memory-map
    the tensors (read only when touched), for callers that want the options alone; files in
    torch's old, non-zip format are read whole.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such checkpoint file')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'{path}: checkpoint file is empty')
    try:
        if lazy and zipfile.is_zipfile(path):
            return torch.load(path, map_location='cpu', weights_only=not allow_pickle, mmap=True)
        return torch.load(path, map_location='cpu', weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        if allow_pickle:
            raise CheckpointError(f'{path}: not a readable torch checkpoint ({_first_line(err)})') from None
        raise CheckpointError(f'{path}: refusing to unpickle arbitrary objects (weights_only load failed: '
                              f'{_first_line(err)}); pass allow_pickle=True / --allow-pickle only if you '
                              'trust this file') from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f'{path}: not a readable torch checkpoint ({_first_line(err)})') from None


def _first_line(err):
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ----------------------------------------------------------------------------------------------
# the authors' format
def _authors_encoder_opt(spec):
    name, args = spec['name'], dict(spec.get('args', {}))
    if name == 'swinir':
        # The LTE authors' make_swinir builds SwinIR() with its defaults whatever the args (it
        # ignores no_upsampling and never upsamples), so a real spec is {'no_upsampling': True}:
        # our defaults. SwinIR's size args are also read, for small models in that format.
        sizes = ('img_size', 'embed_dim', 'depths', 'num_heads', 'window_size', 'mlp_ratio', 'qkv_bias',
                 'drop_path_rate', 'patch_norm', 'resi_connection')
        inert = ('no_upsampling', 'upscale', 'img_range', 'use_checkpoint')  # upsampler / memory only / unused
        unknown = sorted(set(args) - set(sizes) - set(inert) - {'in_chans'})
        if unknown:
            raise CheckpointError(f"authors' swinir encoder: unsupported args {unknown} (known: in_chans, "
                                  f"{', '.join(sizes)})")
        opt = {'type': 'SwinIREncoder', **{k: args[k] for k in sizes if k in args}}
        if 'in_chans' in args:
            opt['num_in_ch'] = args['in_chans']
        return opt
    if not args.get('no_upsampling', False):
        raise CheckpointError(f"authors' encoder '{name}' has an upsampling tail (no_upsampling is not set); "
                              'LIIF encoders have none')
    if name in ('edsr-baseline', 'edsr'):
        defaults = (16, 64, 1.0) if name == 'edsr-baseline' else (32, 256, 0.1)
        return {
            'type': 'EDSREncoder',
            'num_block': args.get('n_resblocks', defaults[0]),
            'num_feat': args.get('n_feats', defaults[1]),
            'res_scale': args.get('res_scale', defaults[2]),
        }
    if name == 'rdn':
        return {
            'type': 'RDNEncoder',
            'num_feat': args.get('G0', 64),
            'config': args.get('RDNconfig', 'B'),
            'kernel_size': args.get('RDNkSize', 3),
        }
    if name == 'rcan':
        return {
            'type': 'RCANEncoder',
            'num_feat': args.get('n_feats', 64),
            'num_group': args.get('n_resgroups', 10),
            'num_block': args.get('n_resblocks', 20),
            'reduction': args.get('reduction', 16),
        }
    raise CheckpointError(f"authors' encoder '{name}' is not supported "
                          '(known: edsr-baseline, edsr, rdn, rcan, swinir)')


def _authors_archs(name):
    """Our arch classes that read the authors' model ``name`` (each lists it in ``authors_names``)."""
    from basicsr.utils.registry import ARCH_REGISTRY
    return [cls for _, cls in ARCH_REGISTRY if name in getattr(cls, 'authors_names', ())]


def _known_authors_names():
    from basicsr.utils.registry import ARCH_REGISTRY
    return sorted({n for _, cls in ARCH_REGISTRY for n in getattr(cls, 'authors_names', ())})


def _authors_network_opt(model_spec):
    """The authors' ``model`` spec -> our ``network_g`` options.

    Each arch says which of the authors' model names it reads (``authors_names``) and turns
    their ``args`` into its options (``authors_options(name, args, encoder)``, returning None
    for a spec of that name that is another arch's: the A-LIIF authors save as 'liif' too).
    """
    name = model_spec.get('name')
    args = model_spec.get('args', {})
    archs = _authors_archs(name)
    if not archs:
        raise CheckpointError(f"authors' model '{name}' is not supported (known: "
                              f"{', '.join(_known_authors_names())})")
    encoder = _authors_encoder_opt(args['encoder_spec'])
    for cls in archs:
        try:
            opt = cls.authors_options(name, args, encoder)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        if opt is not None:
            return opt
    raise CheckpointError(f"authors' model '{name}' with these arguments is not supported "
                          f"(keys: {sorted(args)})")


def _authors_state_dict(sd, network_opt):
    """Rename the authors' keys to ours: the arch's decoder rules (``authors_decoder_keys``),
    then the encoder's (``authors_key_rules``); the first matching pattern applies, a None
    replacement drops the key."""
    from basicsr.utils.registry import ARCH_REGISTRY
    encoder = network_opt['encoder']
    rules = (list(getattr(ARCH_REGISTRY.get(network_opt['type']), 'authors_decoder_keys', []))
             + ARCH_REGISTRY.get(encoder['type']).authors_key_rules(encoder))
    out = {}
    for key, value in sd.items():
        new_key = key
        for pattern, repl in rules:
            if re.match(pattern, new_key):
                new_key = None if repl is None else re.sub(pattern, repl, new_key)
                break
        if new_key is not None:
            out[new_key] = value
    return out


def convert_authors_checkpoint(ckpt):
    """Authors' training checkpoint -> ``(network_opt, state_dict)`` in our naming."""
    model_spec = ckpt['model']
    network_opt = _authors_network_opt(model_spec)
    return network_opt, _authors_state_dict(model_spec['sd'], network_opt)


# ----------------------------------------------------------------------------------------------
# ours
def describe(network_opt, params, params_ema=None):
    """A self-describing checkpoint: BasicSR's keys plus the arch options."""
    ckpt = {'params': params, NETWORK_OPT_KEY: copy.deepcopy(dict(network_opt))}
    if params_ema is not None:
        ckpt['params_ema'] = params_ema
    return ckpt


def is_authors_checkpoint(ckpt):
    """Whether ``ckpt`` is a training checkpoint of the LIIF codebase (``{'model': {name, args, sd}}``)."""
    return isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict) and {'name', 'args', 'sd'} <= set(
        ckpt['model'])


def identify(ckpt, source='checkpoint'):
    """``(network_opt, state_dict)`` of any supported checkpoint dict."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{source}: expected a dict checkpoint, got {type(ckpt).__name__}')
    if is_authors_checkpoint(ckpt):
        try:
            return convert_authors_checkpoint(ckpt)
        except KeyError as err:
            raise CheckpointError(f"{source}: authors' checkpoint lacks {err}") from None
    if NETWORK_OPT_KEY in ckpt:
        for key in ('params_ema', 'params'):
            if isinstance(ckpt.get(key), dict):
                # checkpoints written before chunk_size became a render setting carry it
                return without_render_options(to_plain(ckpt[NETWORK_OPT_KEY])), ckpt[key]
        raise CheckpointError(f"{source}: has '{NETWORK_OPT_KEY}' but no 'params' / 'params_ema' state dict")
    if 'params' in ckpt or 'params_ema' in ckpt:
        raise CheckpointError(f"{source}: a BasicSR checkpoint without '{NETWORK_OPT_KEY}' options; build the "
                              'network from its option file instead (path: pretrain_network_g)')
    raise CheckpointError(f'{source}: unknown checkpoint format (top-level keys: {sorted(map(str, ckpt))[:8]})')


def load_state_dict_exact(net, state_dict, source='checkpoint'):
    """``load_state_dict`` that reports every missing / unexpected / mis-shaped key."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f'{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}' for k in set(own) & set(state_dict)
                    if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (('missing', missing), ('unexpected', unexpected), ('wrong shape', shapes)):
            if keys:
                parts.append(f'{label}: {", ".join(keys[:6])}' + (f' (+{len(keys) - 6} more)' if len(keys) > 6 else ''))
        raise CheckpointError(f'{source}: does not fit {type(net).__name__}; ' + '; '.join(parts))
    net.load_state_dict(state_dict, strict=True)


def load_model(path_or_dict, device='cpu', allow_pickle=False):
    """Build and load a model from a checkpoint path or an already-loaded dict.

    Accepts this plugin's checkpoints (``params``/``params_ema`` + ``network_g``; EMA weights
    preferred), the LIIF / A-LIIF authors' training checkpoints and zoo names (``zoo://NAME``
    or ``NAME``, see :mod:`ciisr_plugin.zoo`). Returns the network in eval mode on ``device``.
    """
    if isinstance(path_or_dict, (str, os.PathLike)):
        from .zoo import resolve
        source = os.fspath(resolve(path_or_dict))  # 'zoo://NAME' / a zoo name -> the cached weights
        ckpt = read_checkpoint(source, allow_pickle)
    else:
        source, ckpt = 'checkpoint', path_or_dict
    network_opt, state_dict = identify(ckpt, source)
    try:
        net = build_network(network_opt)
    except KeyError as err:
        raise CheckpointError(f'{source}: {err.args[0] if err.args else err}') from None
    load_state_dict_exact(net, state_dict, source)
    net.network_opt = network_opt
    return net.to(device).eval()


def convert(src, dst, allow_pickle=False):
    """Write ``src`` (any format :func:`load_model` reads) as our self-describing checkpoint,
    usable as BasicSR's ``pretrain_network_g``. Written to a temporary name, then renamed."""
    from .zoo import resolve
    src = resolve(src)
    ckpt = read_checkpoint(src, allow_pickle)
    network_opt, state_dict = identify(ckpt, src)
    net = build_network(network_opt)
    load_state_dict_exact(net, state_dict, src)  # validate before writing anything
    save_atomic(describe(network_opt, net.state_dict()), dst)
    return network_opt


def save_atomic(obj, path):
    """``torch.save`` through :func:`atomic_write`: never a truncated checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))
