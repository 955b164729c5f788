"""Suite-wide settings. The test models are tiny: one intra-op thread is several times faster than
two on a 2-core machine (thread hand-off costs more than the matmuls), and subprocesses inherit it."""
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('MKL_NUM_THREADS', '1')

import torch  # noqa: E402  (after the env vars, so OpenMP reads them)

torch.set_num_threads(1)
