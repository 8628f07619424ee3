"""LPIPS (Zhang et al., CVPR 2018) through the ``lpips`` package, working offline.

The package ships its linear-layer weights, but its AlexNet / VGG16 backbone comes from
torchvision's download cache (``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth`` ...).
Here nothing is downloaded: the backbone file is loaded from that cache or from the
``backbone_weights`` option, and a missing file is a one-line error naming it.
"""
import os.path as osp
import warnings

import torch

from basicsr.utils.registry import METRIC_REGISTRY

from .metric_inputs import check_same_shape, shave_border, to_rgb_tensor

_MODELS = {}  # (net, backbone file, lpips weights, device) -> LPIPS model


def _backbone_weights_enum(net):
    from torchvision.models import AlexNet_Weights, VGG16_Weights
    if net == 'alex':
        return AlexNet_Weights.IMAGENET1K_V1
    if net == 'vgg':
        return VGG16_Weights.IMAGENET1K_V1
    raise ValueError(f"calculate_lpips: net must be 'alex' or 'vgg', got {net!r}")


def default_backbone_path(net):
    """Where torchvision keeps (and the lpips package would download) the backbone weights."""
    filename = osp.basename(_backbone_weights_enum(net).url)
    return osp.join(torch.hub.get_dir(), 'checkpoints', filename)


def _load_backbone_state(net, path, explicit):
    if not osp.isfile(path):
        where = 'backbone_weights' if explicit else 'the torch hub cache'
        raise FileNotFoundError(
            f"LPIPS (net='{net}') needs the torchvision backbone weights {osp.basename(path)} in {osp.dirname(path)} "
            f'({where}; no internet here): download {_backbone_weights_enum(net).url} there, set TORCH_HOME, or '
            'pass backbone_weights: /path/to/file')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unpickling failure is a bad file)
        raise ValueError(f'{path}: cannot load LPIPS backbone weights ({type(err).__name__}: {err})') from None
    return state.get('state_dict', state) if isinstance(state, dict) else state


def build_lpips(net='alex', backbone_weights=None, lpips_weights=None, device='cpu'):
    """An eval-mode ``lpips.LPIPS`` with the backbone loaded from a local file (cached)."""
    path = osp.abspath(backbone_weights) if backbone_weights else default_backbone_path(net)
    key = (net, path, lpips_weights, str(device))
    if key in _MODELS:
        return _MODELS[key]
    state = _load_backbone_state(net, path, explicit=backbone_weights is not None)
    import lpips
    with warnings.catch_warnings():  # torchvision's 'pretrained' deprecation inside lpips
        warnings.simplefilter('ignore')
        model = lpips.LPIPS(net=net, pnet_rand=True, model_path=lpips_weights, verbose=False)
    # lpips splits torchvision's `features` Sequential into slices that keep the layer
    # indices: slice<k>.<i>.<param> is features.<i>.<param>.
    backbone = {}
    for name in model.net.state_dict():
        source = 'features.' + name.split('.', 1)[1]
        if source not in state:
            raise ValueError(f"{path}: not a torchvision {net} checkpoint (no '{source}')")
        backbone[name] = state[source]
    try:
        model.net.load_state_dict(backbone, strict=True)
    except RuntimeError as err:
        raise ValueError(f'{path}: backbone weights do not fit LPIPS {net} ({str(err).splitlines()[0]})') from None
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    _MODELS[key] = model
    return model


@METRIC_REGISTRY.register()
def calculate_lpips(img, img2, net='alex', backbone_weights=None, lpips_weights=None, crop_border=0, **kwargs):
    """LPIPS distance (lower is better) between two RGB images.

    Args:
        img, img2: RGB float tensors in [0, 1], or BasicSR's HWC BGR uint8 arrays.
        net: backbone, ``'alex'`` (the usual LPIPS) or ``'vgg'``.
        backbone_weights: torchvision backbone state-dict file; default
            ``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth`` (``vgg16-397923af.pth``).
        lpips_weights: linear-layer weights; default the file shipped in the lpips package.
        crop_border: pixels removed from each border first (BasicSR's option name).
    """
    x, y = to_rgb_tensor(img, 'img'), to_rgb_tensor(img2, 'img2')
    check_same_shape(x, y)
    if x.shape[1] != 3:
        raise ValueError(f'calculate_lpips: needs 3-channel images, got {x.shape[1]} channels')
    if crop_border:
        x, y = shave_border(x, crop_border, crop_border), shave_border(y, crop_border, crop_border)
    model = build_lpips(net, backbone_weights, lpips_weights, x.device)
    with torch.no_grad():
        dist = model(x * 2 - 1, y.to(x.device) * 2 - 1)  # LPIPS takes [-1, 1]
    return float(dist.mean().item())
