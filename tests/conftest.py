"""Suite-wide settings. The test models are tiny: one intra-op thread is several times faster than
two on a 2-core machine (thread hand-off costs more than the matmuls), and subprocesses inherit it."""
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('MKL_NUM_THREADS', '1')

import torch  # noqa: E402  (after the env vars, so OpenMP reads them)

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need CUDA: skipped, not failed, on CPU-only machines (CI)."""
    if torch.cuda.is_available():
        return
    import pytest
    skip = pytest.mark.skip(reason='needs a CUDA GPU')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)
