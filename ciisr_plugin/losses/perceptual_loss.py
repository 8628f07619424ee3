"""BasicSR's perceptual loss with the VGG weights read from a local file, never downloaded.

BasicSR 1.4.2's ``VGGFeatureExtractor`` loads ``experiments/pretrained_models/vgg19-dcbb9e9d.pth``
when that file exists (relative to the working directory, whatever ``vgg_type`` is) and
otherwise asks torchvision for ``pretrained=True`` weights, which downloads them into the
torch hub cache - an obscure network error on an offline machine.
:class:`LocalWeightsPerceptualLoss` finds the file first and names it when it is missing.
"""
import contextlib
import os
import os.path as osp
import pickle

import torch

from basicsr.archs import vgg_arch
from basicsr.losses.basic_loss import PerceptualLoss
from basicsr.utils.registry import LOSS_REGISTRY


def vgg_weights_filename(vgg_type):
    """torchvision's file name of the ImageNet weights, e.g. ``vgg19-dcbb9e9d.pth``."""
    from torchvision.models import get_model_weights
    try:
        weights = get_model_weights(vgg_type)
    except ValueError:
        raise ValueError(f"perceptual loss: unknown vgg_type '{vgg_type}'") from None
    return osp.basename(weights.IMAGENET1K_V1.url)


def hub_cache_path(filename):
    """Where torchvision keeps downloaded weights: ``$TORCH_HOME/hub/checkpoints/<filename>``."""
    return osp.join(torch.hub.get_dir(), 'checkpoints', filename)


def find_vgg_weights(vgg_type='vgg19', vgg_weights_path=None):
    """The local VGG weights file to use, or ``FileNotFoundError`` naming where to put it.

    Order: ``vgg_weights_path`` if given; BasicSR's own ``experiments/pretrained_models/<file>``
    (relative to the working directory); the torch hub cache.
    """
    filename = vgg_weights_filename(vgg_type)
    if vgg_weights_path is not None:
        path = osp.expanduser(os.fspath(vgg_weights_path))
        if not osp.isfile(path):
            raise FileNotFoundError(f'perceptual_opt.vgg_weights_path: no such file {path} (expected torchvision '
                                    f'{vgg_type} ImageNet weights, {filename})')
        return path
    candidates = [osp.join(osp.dirname(vgg_arch.VGG_PRETRAIN_PATH), filename), hub_cache_path(filename)]
    for path in candidates:
        if osp.isfile(path):
            return path
    raise FileNotFoundError(
        f'perceptual loss: the {vgg_type} weights {filename} are missing and cannot be downloaded here: put '
        f'{filename} (https://download.pytorch.org/models/{filename}) in {osp.dirname(candidates[1])} '
        f'($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints), or set '
        f'perceptual_opt.vgg_weights_path: /path/to/{filename}')


def _check_layers(layer_weights, vgg_type):
    names = vgg_arch.NAMES.get(vgg_type.replace('_bn', ''))
    if names is None:
        raise ValueError(f"perceptual loss: unknown vgg_type '{vgg_type}' (choose from "
                         f"{', '.join(sorted(vgg_arch.NAMES))}, optionally with '_bn')")
    if not isinstance(layer_weights, dict) or not layer_weights:
        raise ValueError(f'perceptual loss: layer_weights must map VGG layer names to weights, got {layer_weights!r}')
    unknown = [k for k in layer_weights if k not in names]
    if unknown:
        raise ValueError(f"perceptual loss: layer_weights names unknown {vgg_type} layer(s) {', '.join(unknown)} "
                         f"(e.g. conv5_4 = before relu5_4, relu5_4)")


class _TorchvisionVGGWithoutInit:
    """Stands in for ``torchvision.models.vgg`` while BasicSR builds its extractor: the
    network is allocated uninitialised because BasicSR overwrites every parameter from the
    file right away (strict ``load_state_dict``); random-initialising VGG19's 140M
    parameters first would cost seconds per loss built."""

    def __getattr__(self, vgg_type):
        import torchvision.models.vgg as tv_vgg
        builder = getattr(tv_vgg, vgg_type)

        def build(pretrained=False, **kwargs):
            with torch.device('meta'):
                net = builder(weights=None, **kwargs)
            return net.to_empty(device='cpu')

        return build


@contextlib.contextmanager
def _basicsr_vgg_loads(path):
    """Make BasicSR's VGGFeatureExtractor load ``path`` (its module-level file name)."""
    saved = vgg_arch.VGG_PRETRAIN_PATH, vgg_arch.vgg
    vgg_arch.VGG_PRETRAIN_PATH, vgg_arch.vgg = path, _TorchvisionVGGWithoutInit()
    try:
        yield
    finally:
        vgg_arch.VGG_PRETRAIN_PATH, vgg_arch.vgg = saved


@LOSS_REGISTRY.register()
class LocalWeightsPerceptualLoss(PerceptualLoss):
    """BasicSR's ``PerceptualLoss`` (same options and output) reading the VGG weights from a
    local file: ``vgg_weights_path``, else BasicSR's ``experiments/pretrained_models/``, else
    the torch hub cache (``$TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth`` for vgg19).
    A missing or unusable file is a one-line error naming it."""

    def __init__(self, layer_weights, vgg_type='vgg19', vgg_weights_path=None, **kwargs):
        _check_layers(layer_weights, vgg_type)
        path = find_vgg_weights(vgg_type, vgg_weights_path)
        with _basicsr_vgg_loads(path):
            try:
                super().__init__(layer_weights, vgg_type=vgg_type, **kwargs)
            except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # bad file / state-dict mismatch
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise ValueError(f'{path}: not usable as torchvision {vgg_type} weights ({first})') from None
        self.vgg_weights_path = path
