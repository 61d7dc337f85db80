"""penalty_: the fused forward + backward that adds gamma * dR/dW and gamma * dR/dd into .grad."""
import pytest
import torch

import catalyst_fused as cf

from _helpers import DTYPES, GRAD_TOL, STAT_TOL, assert_close, random_catalysts
from test_layout import conv_bn_conv

BACKENDS = ["reference"] + (["cpp"] if cf.cpp_available() else [])


def params(tensors):
    return [torch.nn.Parameter(t.clone()) for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grouped", [False, True], ids=["rows", "grouped"])
def test_adds_scaled_gradients_into_existing_grads(backend, dtype, grouped):
    if grouped:
        weights, layout = conv_bn_conv(dtype)
    else:
        weights, layout = [torch.randn(s).to(dtype) for s in [(16, 3, 3, 3), (7, 13), (40000,), (3, 17)]], None
    catalysts = random_catalysts(weights, layout, dtype=dtype)
    gamma = 0.37
    ws, ds = params(weights), params(catalysts)
    prior = [torch.randn_like(p) for p in ws + ds]
    for p, g in zip(ws + ds, prior):
        p.grad = g.clone()
    stats = cf.penalty_(ws, ds, scale=gamma, layout=layout, backend=backend)
    assert not stats.penalty.requires_grad

    # Expected: prior + gamma * (reference gradient in fp64).
    rw, rd = params([w.double() for w in weights]), params([d.double() for d in catalysts])
    ref = cf.penalty(rw, rd, layout=layout, backend="reference", return_stats=True)
    ref.penalty.backward()
    assert_close(stats.penalty, ref.penalty, STAT_TOL[dtype], "penalty")
    assert_close(stats.norms, ref.norms, STAT_TOL[dtype], "norms")
    assert_close(stats.ratios, ref.ratios, STAT_TOL[dtype], "ratios")
    for i, (p, g0, r) in enumerate(zip(ws + ds, prior, rw + rd)):
        expected = g0.double() + gamma * r.grad
        rtol, atol = GRAD_TOL[dtype]
        assert_close(p.grad, expected, (rtol, atol + 2 * rtol * g0.double().abs().max().item()), f"grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_grads_are_created(backend):
    ws = params([torch.randn(4, 6, dtype=torch.float64)])
    ds = params([torch.rand(4, dtype=torch.float64) + 0.5])
    cf.penalty_(ws, ds, scale=2.0, backend=backend)
    n = ws[0].detach().norm(dim=1)
    torch.testing.assert_close(ws[0].grad, 2.0 * (ds[0].detach() / n)[:, None] * ws[0].detach())
    torch.testing.assert_close(ds[0].grad, 2.0 * n)


def test_same_result_as_autograd_in_a_training_step():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    weights = [model[0].weight, model[2].weight]
    catalysts = cf.init_catalysts(weights)
    gamma = 0.1

    loss = torch.nn.functional.cross_entropy(model(x), y) + gamma * cf.penalty(weights, catalysts)
    loss.backward()
    expected = [p.grad.clone() for p in weights + catalysts]
    for p in list(model.parameters()) + catalysts:
        p.grad = None

    torch.nn.functional.cross_entropy(model(x), y).backward()
    cf.penalty_(weights, catalysts, scale=gamma)
    for p, e in zip(weights + catalysts, expected):
        torch.testing.assert_close(p.grad, e)


def test_amp_grad_scaler_recipe():
    # With GradScaler, .grad holds S * grad at the time penalty_ runs; scale = gamma * S makes
    # scaler.unscale_ leave exactly gamma * dR/dW.
    w = torch.nn.Parameter(torch.randn(6, 4))
    (d,) = cf.init_catalysts([w])
    opt = torch.optim.SGD([w, d], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((w.sum() * 0.0)).backward()  # loss term with zero gradient
    cf.penalty_([w], [d], scale=0.5 * scaler.get_scale())
    scaler.unscale_(opt)
    n = w.detach().norm(dim=1)
    torch.testing.assert_close(w.grad, 0.5 * (d.detach() / n)[:, None] * w.detach())


@pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
def test_bad_grads_are_reported():
    w = torch.nn.Parameter(torch.randn(4, 6))
    d = torch.nn.Parameter(torch.ones(4))
    w.grad = torch.zeros(6, 4).t()  # right shape, not contiguous
    with pytest.raises(ValueError, match=r"weight_grads\[0\] must be contiguous"):
        cf.penalty_([w], [d])
    with pytest.raises(ValueError, match=r"weight_grads\[0\] has shape"):
        torch.ops.catalyst_fused.penalty_accumulate_([w.detach()], [d.detach()], [torch.zeros(4, 5)], [torch.zeros(4)], 1.0, None)
    with pytest.raises(TypeError, match=r"catalyst_grads\[0\] has dtype"):
        torch.ops.catalyst_fused.penalty_accumulate_(
            [w.detach()], [d.detach()], [torch.zeros(4, 6)], [torch.zeros(4, dtype=torch.float64)], 1.0, None
        )
