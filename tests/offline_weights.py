"""Random-init torchvision weight files under their real names, so that the perceptual loss and
LPIPS find them in a TORCH_HOME without any download. Shared by conftest's ``torch_home`` fixture
and the recipe-resume tests (which hand the folder to fresh interpreters)."""
import math

import torch


def random_vgg19_state():
    """torchvision vgg19 keys/shapes: He-initialised convolutions; the classifier (never used
    by the perceptual loss) as zero tensors expanded from one element, so the file stays small."""
    import torchvision
    with torch.device('meta'):
        shapes = {k: v.shape for k, v in torchvision.models.vgg19().state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        if key.startswith('features') and key.endswith('weight'):
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=gen) * math.sqrt(2 / fan_in)
        elif key.startswith('features'):
            state[key] = 0.01 * torch.randn(shape, generator=gen)
        else:
            state[key] = torch.zeros(1).expand(shape)
    return state


def random_alexnet_features_state():
    import torchvision
    with torch.device('meta'):
        shapes = {k: v.shape for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith('features')}
    gen = torch.Generator().manual_seed(1)
    return {k: torch.randn(s, generator=gen) * (math.sqrt(2 / math.prod(s[1:])) if len(s) > 1 else 0.01)
            for k, s in shapes.items()}


def write_torch_home(home):
    """Put both files where torchvision's hub cache under TORCH_HOME=``home`` looks; ``home``."""
    checkpoints = home / 'hub' / 'checkpoints'
    checkpoints.mkdir(parents=True)
    torch.save(random_vgg19_state(), checkpoints / 'vgg19-dcbb9e9d.pth')
    torch.save(random_alexnet_features_state(), checkpoints / 'alexnet-owt-7be5be79.pth')
    return home
