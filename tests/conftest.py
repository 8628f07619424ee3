import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))  # literal reference transcriptions used as baselines

import ciisr_plugin  # noqa: E402,F401  (registers everything, applies compat fixes)

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
