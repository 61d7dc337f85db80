"""The reference itself: against the per-layer loop a user writes, against the closed-form derivatives of
catalyst-method.md section 2, and the subgradient / NaN conventions (for every backend)."""
import math

import pytest
import torch

import catalyst_fused as cf

from _helpers import random_catalysts, run_autograd

BACKENDS = ["reference"] + (["cpp"] if cf.cpp_available() else [])


def test_reference_matches_eager_loop():
    weights = [torch.randn(s, dtype=torch.float64) for s in [(8, 3, 3, 3), (5, 8), (7,)]]
    catalysts = random_catalysts(weights)
    ref, rw, rd = run_autograd(weights, catalysts, backend="reference")
    ws = [w.clone().requires_grad_(True) for w in weights]
    ds = [d.clone().requires_grad_(True) for d in catalysts]
    eager = cf.reference.eager_penalty(ws, ds)
    eager.backward()
    torch.testing.assert_close(ref.penalty, eager.detach())
    for a, b in zip(rw + rd, [w.grad for w in ws] + [d.grad for d in ds]):
        torch.testing.assert_close(a, b)


def test_eager_group_loop_matches_reference():
    from test_layout import attention_heads, conv_bn_conv

    for weights, layout in (conv_bn_conv(), attention_heads()):
        catalysts = random_catalysts(weights, layout)
        ref, rw, rd = run_autograd(weights, catalysts, layout, backend="reference")
        ws = [w.clone().requires_grad_(True) for w in weights]
        ds = [d.clone().requires_grad_(True) for d in catalysts]
        eager = cf.reference.eager_group_penalty(ws, ds, layout)
        eager.backward()
        torch.testing.assert_close(ref.penalty, eager.detach())
        for a, b in zip(rw + rd, [w.grad for w in ws] + [d.grad for d in ds]):
            torch.testing.assert_close(a, b)


def test_reference_matches_closed_form():
    w = torch.randn(6, 4, 3, dtype=torch.float64)
    d = torch.randn(6, dtype=torch.float64)
    stats, (gw,), (gd,) = run_autograd([w], [d], backend="reference")
    n = w.reshape(6, -1).norm(dim=1)
    torch.testing.assert_close(stats.penalty, (d.abs() * n).sum())
    torch.testing.assert_close(stats.ratios, d.abs() / n)
    torch.testing.assert_close(gw, (d.abs() / n).view(6, 1, 1) * w)
    torch.testing.assert_close(gd, torch.sign(d) * n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_zero_filter_and_zero_catalyst_conventions(backend, dtype):
    w = torch.randn(4, 5, dtype=torch.float64).to(dtype)
    w[1] = 0  # all-zero filter: gradient 0, ratio +inf
    d = torch.tensor([1.5, 2.0, 0.0, -0.5], dtype=torch.float64).to(dtype)  # d = 0: sign(0) = 0
    stats, (gw,), (gd,) = run_autograd([w], [d], backend=backend)
    assert math.isinf(stats.ratios[1].item()) and stats.ratios[1] > 0
    assert stats.norms[1] == 0
    assert torch.all(gw[1] == 0) and not torch.isnan(gw).any()
    assert gd[2] == 0 and stats.ratios[2] == 0
    assert torch.all(gw[2] == 0)  # |d| = 0 scales the filter's gradient to 0
    assert gd[3] < 0  # sign(d) * n


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_sized_shapes(backend):
    # No channels, and channels with empty rows (n = 0, ratio +inf): well defined, no error.
    weights = [torch.randn(0, 5, dtype=torch.float64), torch.randn(3, 0, dtype=torch.float64)]
    catalysts = [torch.ones(0, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    stats, gw, gd = run_autograd(weights, catalysts, backend=backend)
    assert stats.penalty.item() == 0
    assert torch.isinf(stats.ratios).all() and stats.ratios.shape == (3,)
    assert gw[0].shape == (0, 5) and gw[1].shape == (3, 0)
    assert torch.all(gd[1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate(backend):
    w = torch.randn(3, 4, dtype=torch.float64)
    w[0, 1] = float("nan")
    w[2, 0] = float("inf")
    d = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    stats, (gw,), (gd,) = run_autograd([w], [d], backend=backend)
    assert torch.isnan(stats.penalty) or torch.isinf(stats.penalty)
    assert torch.isnan(stats.norms[0]) and torch.isinf(stats.norms[2])
    assert torch.isfinite(stats.norms[1])
    assert torch.isnan(gw[0]).all()  # NaN filter: every entry's gradient is NaN, never a finite value
    assert torch.isnan(gd[0])
    assert torch.isfinite(gw[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["autograd", "inplace"])
def test_nan_and_inf_catalysts_propagate(backend, inplace):
    # NaN catalysts never give finite gradients (torch.sign(NaN) is 0; the reference must not use it), also on
    # an all-zero group, where the weight gradient's scale is |d| * 0; an Inf catalyst on an all-zero group
    # gives NaN there too (Inf * 0).
    w = torch.randn(4, 3, dtype=torch.float64)
    w[1] = 0
    w[3] = 0
    d = torch.tensor([float("nan"), float("nan"), 1.0, float("inf")], dtype=torch.float64)
    if inplace:
        ws, ds = [torch.nn.Parameter(w.clone())], [torch.nn.Parameter(d.clone())]
        stats = cf.penalty_(ws, ds, backend=backend)
        gw, gd = ws[0].grad, ds[0].grad
    else:
        stats, (gw,), (gd,) = run_autograd([w], [d], backend=backend)
    assert torch.isnan(stats.penalty)
    assert torch.isnan(gd[0]) and torch.isnan(gd[1])  # sign(NaN) * n
    assert gd[2] == stats.norms[2] and gd[3] == 0  # sign(inf) * 0
    assert torch.isnan(gw[0]).all() and torch.isnan(gw[1]).all() and torch.isnan(gw[3]).all()
    assert torch.isfinite(gw[2]).all()
    assert torch.isnan(stats.ratios[0]) and torch.isnan(stats.ratios[1])
    assert stats.ratios[3] == float("inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_policy_raise_names_the_group(backend):
    w = torch.randn(3, 4)
    w[2, 1] = float("nan")
    d = torch.ones(3)
    with pytest.raises(ValueError, match=r"group 2 of segment 0 has a non-finite norm"):
        cf.penalty([w], [d], backend=backend, nan_policy="raise")
    bad_d = torch.tensor([1.0, float("inf"), 1.0])
    with pytest.raises(ValueError, match=r"catalysts\[0\]\[1\] is inf"):
        cf.penalty([torch.randn(3, 4)], [bad_d], backend=backend, nan_policy="raise")
    with pytest.raises(ValueError, match="nan_policy"):
        cf.penalty([torch.randn(3, 4)], [d], backend=backend, nan_policy="ignore")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_policy_raise_reads_back_once_per_call(backend, monkeypatch):
    # One host read-back (device sync on a GPU) per call however many segments, when all is finite.
    weights = [torch.randn(3, 4) for _ in range(20)]
    catalysts = [torch.nn.Parameter(torch.ones(3)) for _ in range(20)]
    reads = []
    for name in ("__bool__", "item", "__int__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cf.penalty(weights, catalysts, backend=backend, nan_policy="raise")
    assert len(reads) == 1, reads
    reads.clear()
    cf.penalty_(weights, catalysts, backend=backend, nan_policy="raise")
    assert len(reads) == 1, reads


def test_init_catalysts_puts_every_channel_at_c0():
    w = torch.randn(10, 3, 3, 3) * torch.logspace(-3, 2, 10).view(10, 1, 1, 1)  # magnitudes over 5 decades
    (d,) = cf.init_catalysts([w], c0=1.5)
    assert isinstance(d, torch.nn.Parameter) and d.requires_grad and d.dtype == w.dtype
    ratios = cf.penalty([w], [d], return_stats=True).ratios
    torch.testing.assert_close(ratios, torch.full_like(ratios, 1.5))
    with pytest.raises(ValueError, match="c0 must be a positive finite number"):
        cf.init_catalysts([w], c0=0.0)
    with pytest.raises(ValueError, match="c0 must be a positive finite number"):
        cf.init_catalysts([w], c0=float("nan"))
