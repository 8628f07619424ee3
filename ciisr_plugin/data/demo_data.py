"""Demo data that needs no download: photographs shipped inside scikit-image.

``prepare_skimage_dataroot(root)`` writes them as PNGs into ``root/train`` and ``root/val``;
datasets accept ``dataroot_gt: skimage://train`` (or ``skimage://val``), resolved to a cache
under ``$CIISR_DATA_HOME`` (default ``~/.cache/ciisr``) and prepared on first use.

Only images stored in the scikit-image wheel are used (``skimage.data`` fetches some others,
e.g. ``kidney``, ``lily``, through pooch from the internet). ``cat`` is the same photo as
``chelsea``, so it is not offered.
"""
import contextlib
import os
import os.path as osp

import cv2
import numpy as np

from ..fileio import replaced_atomically

SKIMAGE_SCHEME = 'skimage://'

# Colour photographs bundled with scikit-image (name -> loader), all RGB uint8.
_LOADERS = {
    'astronaut': lambda d: d.astronaut(),  # 512x512
    'chelsea': lambda d: d.chelsea(),  # 300x451
    'coffee': lambda d: d.coffee(),  # 400x600
    'rocket': lambda d: d.rocket(),  # 427x640
    'motorcycle_left': lambda d: d.stereo_motorcycle()[0],  # 500x741
    'immunohistochemistry': lambda d: d.immunohistochemistry(),  # 512x512
    'hubble_deep_field': lambda d: d.hubble_deep_field(),  # 872x1000
    'retina': lambda d: d.retina(),  # 1411x1411
}
SKIMAGE_PHOTOS = tuple(_LOADERS)

# Held-out validation photos are different scenes from the training photos.
DEFAULT_SPLIT = {
    'train': ['astronaut', 'rocket', 'motorcycle_left', 'immunohistochemistry', 'hubble_deep_field'],
    'val': ['chelsea', 'coffee'],
}


def data_home():
    return os.environ.get('CIISR_DATA_HOME') or osp.join(osp.expanduser('~'), '.cache', 'ciisr')


def load_skimage_photo(name):
    """One bundled photo as an RGB uint8 array."""
    if name not in _LOADERS:
        raise ValueError(f"unknown scikit-image photo '{name}', available: {list(SKIMAGE_PHOTOS)}")
    import skimage.data
    img = np.asarray(_LOADERS[name](skimage.data))
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"scikit-image photo '{name}' is not an RGB uint8 image (shape {img.shape}, {img.dtype})")
    return img


def _write_png(img_rgb, path):
    """Write atomically so a concurrent reader never sees a half-written file."""
    with replaced_atomically(path, '.png') as tmp:
        if not cv2.imwrite(tmp, np.ascontiguousarray(img_rgb[:, :, ::-1])):
            raise ValueError(f'{path}: could not write PNG')


def prepare_skimage_dataroot(root, names=None):
    """Write scikit-image photos as ``root/train/*.png`` and ``root/val/*.png``.

    Args:
        root (str): target folder (created if needed).
        names (dict | None): ``{'train': [...], 'val': [...]}``; default :data:`DEFAULT_SPLIT`.

    Idempotent: existing files are kept, and catalogue photos that are not in the requested
    split are removed from the split folders (so a folder always holds exactly the split).
    Returns ``{'train': path, 'val': path}``.
    """
    names = DEFAULT_SPLIT if names is None else names
    if not isinstance(names, dict) or not set(names) <= {'train', 'val'}:
        raise ValueError("prepare_skimage_dataroot: names must be a dict with keys 'train' and/or 'val'")
    splits = {split: list(names.get(split, [])) for split in ('train', 'val')}
    for split, split_names in splits.items():
        for name in split_names:
            if name not in _LOADERS:
                raise ValueError(f"prepare_skimage_dataroot: unknown photo '{name}' in '{split}', available: "
                                 f'{list(SKIMAGE_PHOTOS)}')
    overlap = set(splits['train']) & set(splits['val'])
    if overlap:
        raise ValueError(f'prepare_skimage_dataroot: photos in both train and val: {sorted(overlap)}')

    out = {}
    for split, split_names in splits.items():
        folder = osp.join(root, split)
        os.makedirs(folder, exist_ok=True)
        for name in SKIMAGE_PHOTOS:
            path = osp.join(folder, f'{name}.png')
            if name in split_names:
                if not osp.isfile(path):
                    _write_png(load_skimage_photo(name), path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        out[split] = folder
    return out


def skimage_photo_file(spec):
    """``skimage://NAME`` -> a PNG of that bundled photo (written once under :func:`data_home`);
    anything else -> None. Lets every command that reads image files take the bundled photos."""
    spec = str(spec)
    if not spec.startswith(SKIMAGE_SCHEME):
        return None
    name = spec[len(SKIMAGE_SCHEME):].strip('/')
    if name not in _LOADERS:
        raise ValueError(f"'{spec}': unknown scikit-image photo, available: "
                         f"{', '.join(SKIMAGE_SCHEME + n for n in SKIMAGE_PHOTOS)}")
    folder = osp.join(data_home(), 'skimage_photos')
    os.makedirs(folder, exist_ok=True)
    path = osp.join(folder, f'{name}.png')
    if not osp.isfile(path):
        _write_png(load_skimage_photo(name), path)
    return path


def resolve_dataroot(path, option_name='dataroot_gt'):
    """``skimage://train`` / ``skimage://val`` -> a prepared cache folder; other paths unchanged."""
    if path is None:
        raise ValueError(f'{option_name} is not set')
    path = str(path)
    if not path.startswith(SKIMAGE_SCHEME):
        return path
    split = path[len(SKIMAGE_SCHEME):].strip('/')
    if split not in DEFAULT_SPLIT:
        raise ValueError(f"{option_name}: '{path}' is not a demo dataroot, use 'skimage://train' or 'skimage://val'")
    return prepare_skimage_dataroot(osp.join(data_home(), 'skimage_demo'))[split]
