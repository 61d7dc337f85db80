"""Shared test helpers: compare a backend against the fp64 reference, values and every gradient."""
from __future__ import annotations

import torch

import catalyst_fused as cf

# (rtol, atol) per input dtype. Statistics (penalty, norms, ratios) are returned in fp32 for fp16/bf16
# and accumulated in fp32, so they are held to fp32-accumulation tolerances; weight/catalyst gradients
# are rounded to the input dtype, so they get that dtype's rounding error.
STAT_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.bfloat16: (2e-5, 1e-6),
    torch.float16: (2e-5, 1e-6),
}
GRAD_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (2e-3, 1e-6),
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def random_catalysts(weights, layout=None, dtype=None, low=0.5, high=2.0):
    """Catalysts away from 0 (where |d| has a kink), both signs."""
    sizes = [w.shape[0] for w in weights] if layout is None else layout.segment_sizes
    dtype = dtype or weights[0].dtype
    out = []
    for n in sizes:
        mag = torch.empty(n, dtype=torch.float64).uniform_(low, high)
        sign = torch.where(torch.rand(n) < 0.3, -1.0, 1.0).to(torch.float64)
        out.append((mag * sign).to(dtype))
    return out


def leaf(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def run_autograd(weights, catalysts, layout=None, backend="cpp", grad_scale=1.0):
    ws, ds = leaf(weights), leaf(catalysts)
    stats = cf.penalty(ws, ds, layout=layout, backend=backend, return_stats=True)
    (stats.penalty * grad_scale).backward()
    return stats, [w.grad for w in ws], [d.grad for d in ds]


def assert_close(actual, expected, tol, what):
    rtol, atol = tol
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def check_against_reference(weights, catalysts, layout=None, backend="cpp", grad_scale=1.0):
    """Values and all gradients of `backend` versus the reference evaluated in fp64 on the same inputs."""
    dtype = weights[0].dtype
    got, gw, gd = run_autograd(weights, catalysts, layout, backend, grad_scale)
    ref, rw, rd = run_autograd([w.double() for w in weights], [d.double() for d in catalysts], layout, "reference", grad_scale)
    acc = cf.reference.accumulation_dtype(dtype)
    assert got.penalty.dtype == acc and got.norms.dtype == acc and got.ratios.dtype == acc
    assert got.penalty.shape == () and got.norms.shape == got.ratios.shape == (sum(d.numel() for d in catalysts),)
    assert_close(got.penalty, ref.penalty, STAT_TOL[dtype], "penalty")
    assert_close(got.norms, ref.norms, STAT_TOL[dtype], "norms")
    assert_close(got.ratios, ref.ratios, STAT_TOL[dtype], "ratios")
    for i, (a, e) in enumerate(zip(gw, rw)):
        assert a.dtype == dtype and a.shape == weights[i].shape
        assert_close(a, e, GRAD_TOL[dtype], f"grad of weights[{i}]")
    for i, (a, e) in enumerate(zip(gd, rd)):
        assert a.dtype == dtype and a.shape == catalysts[i].shape
        assert_close(a, e, GRAD_TOL[dtype], f"grad of catalysts[{i}]")
    return got


def cuda_toolkit_root():
    """The CUDA toolkit the build uses, found as scripts/setup.sh finds it: $CUDA_HOME, else /usr/local/cuda."""
    import os

    root = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return root if os.path.exists(os.path.join(root, "bin", "nvcc")) else None


def assert_resumed_run_equals_straight_run(straight_dir, resumed_dir, straight, resumed) -> None:
    """An interrupted-and-resumed pipeline run ended exactly where the uninterrupted one did: the same pruned
    weights bit for bit, the same accuracies, widths and training losses (``straight``, ``resumed``: the
    runs' :class:`~catalyst_fused.pruning.Report`)."""
    from safetensors.torch import load_file

    if (straight_dir / "pruned_model.safetensors").exists():
        a = load_file(straight_dir / "pruned_model.safetensors")
        b = load_file(resumed_dir / "pruned_model.safetensors")
    else:  # unstructured methods: the sparse weights with their masks
        a, b = (torch.load(d / "sparse_model.pt", weights_only=True)["state_dict"] for d in (straight_dir, resumed_dir))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.status == resumed.status == "done"
    assert straight.accuracy == resumed.accuracy
    assert straight.per_layer_kept == resumed.per_layer_kept
    assert [h["train_loss"] for h in straight.history] == [h["train_loss"] for h in resumed.history]


def no_loss_steps(pruner, model, opt, steps: int) -> None:
    """``steps`` optimizer steps on ``gamma * R`` alone (zero loss gradients) through the pruner's step calls:
    the catalysts' decision dynamics without a task loss."""
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        pruner.regularize()
        opt.step()
        pruner.after_step()
