import os
from pathlib import Path

import pytest

import ciisr_plugin  # noqa: F401  (registers everything, applies compat fixes)

REPO = Path(__file__).resolve().parents[1]

FIXTURES = Path(os.environ.get('CIISR_FIXTURES', REPO.parent / 'shared' / 'fixtures' / 'authors'))


@pytest.fixture(scope='session')
def authors_fixture():
    """Load one of the authors' reference cases (shared/fixtures/authors/*.pt)."""
    import torch

    def load(name):
        path = FIXTURES / name
        if not path.is_file():
            pytest.fail(f'authors fixture {path} is missing: clone the repo with shared/ beside it or set '
                        'CIISR_FIXTURES')
        return torch.load(path, weights_only=False)

    return load


@pytest.fixture(autouse=True)
def fresh_basicsr_logger():
    """BasicSR's logger keeps the stderr it first saw; under pytest's capture that stream is
    closed after the test. Drop its handlers after every test, so that a later test's log lines
    do not go to a closed stream (a 'Logging error' trace in that test's output)."""
    yield
    from ciisr_plugin.cli import _reset_basicsr_logger
    _reset_basicsr_logger()
