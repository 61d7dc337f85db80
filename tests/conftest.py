import os

# The Triton interpreter must be chosen before any @triton.jit decorator runs (GPU-less CI runs Triton
# kernels on CPU tensors). While it is on, the Triton backend refuses CUDA tensors and its GPU tests skip
# with that reason: a GPU run sets TRITON_INTERPRET=0 (scripts/gpu_check.sh does).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
