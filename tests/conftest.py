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


# A pipeline run that prunes quickly (strong penalty at a large opt1 lr, c0 well above 1, kappa 1) on a subset of
# digits: it removes most channels of a barely trained network. It checks mechanics, not quality (the README's
# runs do).
TINY_RUN = dict(
    model="small_cnn", dataset="digits", dense_epochs=3, epochs=6, finetune_epochs=1, gamma=0.1, c0=1.5, kappa=1.0,
    opt1_lr=0.05,
    train_limit=512, test_limit=128, batch_size=64, progress=False, plots=False, latency_batch=8, noise_draws=2,
    latency="eager", latency_repeats=3,
)


@pytest.fixture
def quiet():
    """A log function that prints nothing."""
    return lambda _msg: None


@pytest.fixture
def tiny_config(tmp_path):
    """``tiny_config(name="run", **overrides)``: a :data:`TINY_RUN` PruneConfig writing to ``tmp_path / name``."""
    from catalyst_fused.pruning import PruneConfig

    def make(name: str = "run", **overrides):
        return PruneConfig(out=str(tmp_path / name), **{**TINY_RUN, **overrides})

    return make
