import os

# The Triton interpreter must be chosen before any @triton.jit decorator runs (GPU-less CI runs Triton
# kernels on CPU tensors).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
