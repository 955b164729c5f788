"""Suite-wide settings. The test models are tiny: one intra-op thread is several times faster than
two on a 2-core machine (thread hand-off costs more than the matmuls), and subprocesses inherit it."""
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('MKL_NUM_THREADS', '1')

import pytest  # noqa: E402
import torch  # noqa: E402  (after the env vars, so OpenMP reads them)

torch.set_num_threads(1)


# GSM8K (MIT, OpenAI) is read from the shared data folder, never copied into the repo; set
# NANOSFT_GSM8K_DIR when it lives elsewhere (benchmarks/common.py reads the same variable).
GSM8K_DIR = os.environ.get('NANOSFT_GSM8K_DIR') or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'data', 'gsm8k')


@pytest.fixture
def gsm8k_train():
    path = os.path.join(GSM8K_DIR, 'train.jsonl')
    if not os.path.exists(path):
        pytest.skip(f'GSM8K not found at {path}: set NANOSFT_GSM8K_DIR')
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need CUDA: skipped, not failed, on CPU-only machines (CI)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)
