import os
from pathlib import Path

import pytest
import torch

import ciisr_plugin  # noqa: F401  (registers everything, applies compat fixes)

REPO = Path(__file__).resolve().parents[1]

FIXTURES = Path(os.environ.get('CIISR_FIXTURES', REPO.parent / 'shared' / 'fixtures' / 'authors'))


@pytest.fixture(scope='session')
def authors_fixture():
    """Load one of the authors' reference cases (shared/fixtures/authors/*.pt)."""

    def load(name):
        path = FIXTURES / name
        if not path.is_file():
            pytest.fail(f'authors fixture {path} is missing: clone the repo with shared/ beside it or set '
                        'CIISR_FIXTURES')
        return torch.load(path, weights_only=False)

    return load


@pytest.fixture(scope='session')
def torch_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds random-init VGG19 and AlexNet files under
    torchvision's names (no downloads here)."""
    from offline_weights import write_torch_home
    return write_torch_home(tmp_path_factory.mktemp('torch_home'))


@pytest.fixture
def offline(torch_home, monkeypatch, tmp_path):
    """``torch_home`` in TORCH_HOME, and a fresh working directory."""
    monkeypatch.setenv('TORCH_HOME', str(torch_home))
    monkeypatch.chdir(tmp_path)  # BasicSR also looks in ./experiments/pretrained_models
    return torch_home


@pytest.fixture(scope='module')
def one_thread():
    """torch on one thread for a module of tiny tensors (``pytestmark = pytest.mark.usefixtures
    ('one_thread')``): one thread is faster there, and immune to stalls when other processes share
    the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_basicsr_logger():
    """BasicSR's logger keeps the stderr it first saw; under pytest's capture that stream is
    closed after the test. Drop its handlers after every test, so that a later test's log lines
    do not go to a closed stream (a 'Logging error' trace in that test's output)."""
    yield
    from ciisr_plugin.cli import _reset_basicsr_logger
    _reset_basicsr_logger()
