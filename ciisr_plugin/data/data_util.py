"""Listing and reading images through BasicSR's FileClient (disk / lmdb / meta_info_file)."""
import math
import os
import os.path as osp

import numpy as np
import torch

from basicsr.utils import FileClient

from .demo_data import resolve_dataroot
from .image_io import decode_image, is_image_file


def positive_int_option(opt, key, default):
    """``opt[key]`` as a positive int, or None when it is null."""
    value = opt.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f'{key}: expected a positive integer, got {value!r}')
    return int(value)


def parse_scale(value, option_name='scale', minimum=1.0):
    """``s`` or ``[sh, sw]`` -> ``(sh, sw)`` floats, each >= ``minimum``."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    values = list(value) if isinstance(value, (list, tuple)) else [value, value]
    try:
        if len(values) != 2:
            raise TypeError
        sh, sw = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f'{option_name}: expected a number or [sh, sw], got {value!r}') from None
    for v in (sh, sw):
        if not math.isfinite(v) or v < minimum:
            raise ValueError(f'{option_name}: scale must be a finite number >= {minimum:g}, got {value!r}')
    return sh, sw


def _read_meta_info(meta_info_file):
    try:
        with open(meta_info_file, 'r') as f:
            names = [line.strip().split(' ')[0] for line in f if line.strip()]
    except OSError as err:
        raise ValueError(f'meta_info_file {meta_info_file}: cannot read ({err.strerror or err})') from None
    if not names:
        raise ValueError(f'meta_info_file {meta_info_file}: lists no images')
    return names


def _scan_folder(folder, option_name):
    if not osp.isdir(folder):
        raise ValueError(f'{option_name}: folder {folder} does not exist')
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file() and not entry.name.startswith('.')
                   and is_image_file(entry.name))
    if not names:
        raise ValueError(f'{option_name}: folder {folder} contains no image files')
    return names


def _lmdb_keys(folder, option_name):
    if not folder.endswith('.lmdb'):
        raise ValueError(f'{option_name}: io_backend lmdb needs a *.lmdb folder, got {folder}')
    meta = osp.join(folder, 'meta_info.txt')
    keys = [name.split('.')[0] for name in _read_meta_info(meta)]
    return keys


class ImageSource:
    """The images of one folder (or lmdb / meta_info_file), read lazily as native RGB arrays.

    Options (BasicSR style): ``<root_key>`` (``dataroot_gt``; ``skimage://train|val`` allowed),
    ``io_backend`` (``{type: disk}`` default, or ``{type: lmdb}``), ``meta_info_file``,
    ``first_k`` (keep only the first k images, in sorted / listed order), ``cache_images``
    (false; true keeps every decoded image in memory, per process, so each file is read and
    decoded once: for small sets such as the bundled photos, where decoding a whole PNG costs
    more than the training step's crop of it). Cached arrays are read-only.
    The FileClient is created on first read, inside the data-loader worker.
    """

    def __init__(self, opt, root_key='dataroot_gt', client_key='gt', names=None):
        self.root_key = root_key
        self.client_key = client_key
        self.folder = resolve_dataroot(opt.get(root_key), root_key)
        self.io_backend_opt = dict(opt.get('io_backend') or {'type': 'disk'})
        self.io_backend_opt.setdefault('type', 'disk')
        self.file_client = None
        cache = opt.get('cache_images', False)
        if not isinstance(cache, bool):
            raise ValueError(f'cache_images: expected true or false, got {cache!r}')
        self.cache = {} if cache else None  # index -> decoded image
        listed_here = names is None  # names given = paired to another source, which applied first_k
        if self.io_backend_opt['type'] == 'lmdb':
            self.io_backend_opt['db_paths'] = [self.folder]
            self.io_backend_opt['client_keys'] = [client_key]
            self.paths = _lmdb_keys(self.folder, root_key) if names is None else list(names)
        else:
            if names is None:
                if opt.get('meta_info_file'):
                    names = _read_meta_info(opt['meta_info_file'])
                else:
                    names = _scan_folder(self.folder, root_key)
            self.paths = [osp.join(self.folder, name) for name in names]
        first_k = opt.get('first_k')
        if listed_here and first_k is not None:  # a subset, e.g. a quick validation
            if isinstance(first_k, bool) or not isinstance(first_k, int) or first_k <= 0:
                raise ValueError(f'first_k: expected a positive integer, got {first_k!r}')
            self.paths = self.paths[:first_k]

    def __len__(self):
        return len(self.paths)

    def read_path(self, path):
        if self.file_client is None:
            opt = dict(self.io_backend_opt)
            self.file_client = FileClient(opt.pop('type'), **opt)
        try:
            content = self.file_client.get(path, self.client_key)
        except OSError as err:
            raise ValueError(f'{path}: cannot read file ({err.strerror or err})') from None
        if content is None:  # lmdb: missing key
            raise ValueError(f'{path}: key not found in {self.folder}')
        return decode_image(content, path)

    def read(self, index):
        """-> (native HxWx3 RGB array, path)."""
        path = self.paths[index]
        if self.cache is None:
            return self.read_path(path), path
        img = self.cache.get(index)
        if img is None:
            img = self.cache[index] = self.read_path(path)
            img.setflags(write=False)  # shared by every later sample of this image
        return img, path


def paired_sources(opt, filename_tmpl='{}'):
    """GT and LQ :class:`ImageSource` whose ``paths`` correspond index by index.

    Pairs are made from the GT names: ``lq name = filename_tmpl.format(gt stem) + gt ext``,
    as BasicSR's PairedImageDataset (e.g. ``'{}x4'`` for the benchmark LR folders).
    """
    gt_source = ImageSource(opt, 'dataroot_gt', 'gt')
    if gt_source.io_backend_opt['type'] == 'lmdb':
        lq_folder = resolve_dataroot(opt.get('dataroot_lq'), 'dataroot_lq')
        lq_keys = set(_lmdb_keys(lq_folder, 'dataroot_lq'))
        missing = [k for k in gt_source.paths if k not in lq_keys]
        if missing:
            raise ValueError(f'dataroot_lq: {lq_folder} lacks keys of dataroot_gt, e.g. {missing[0]!r}')
        return gt_source, ImageSource(opt, 'dataroot_lq', 'lq', names=gt_source.paths)
    lq_names = []
    for gt_path in gt_source.paths:
        stem, ext = osp.splitext(osp.basename(gt_path))
        lq_names.append(f'{filename_tmpl.format(stem)}{ext}')
    lq_source = ImageSource(opt, 'dataroot_lq', 'lq', names=lq_names)
    for lq_path, gt_path in zip(lq_source.paths, gt_source.paths):
        if not osp.isfile(lq_path):
            raise ValueError(f'dataroot_lq: no LR image {lq_path} for {gt_path} (filename_tmpl {filename_tmpl!r})')
    return gt_source, lq_source
