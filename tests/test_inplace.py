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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grouped", [False, True], ids=["rows", "grouped"])
def test_frozen_weights_and_constant_catalysts_get_no_gradient(backend, grouped, recwarn):
    # requires_grad=False: read (the tensor is part of its groups) but no .grad created or changed, and no
    # warning (constant catalysts are how Group Lasso runs); the others get exactly what they would get if
    # everything required grad.
    if grouped:
        weights, layout = conv_bn_conv(torch.float64)
    else:
        weights, layout = [torch.randn(s, dtype=torch.float64) for s in [(6, 3, 3, 3), (5, 6), (7,)]], None
    catalysts = random_catalysts(weights, layout)
    full_w, full_d = params(weights), params(catalysts)
    cf.penalty_(full_w, full_d, scale=0.5, layout=layout, backend=backend)

    ws, ds = params(weights), params(catalysts)
    ws[1].requires_grad_(False)
    ds[0].requires_grad_(False)
    ws[2].requires_grad_(False)
    ws[2].grad = torch.full_like(ws[2], 3.0)  # left over from before it was frozen: untouched
    stats = cf.penalty_(ws, ds, scale=0.5, layout=layout, backend=backend)
    assert ws[1].grad is None and ds[0].grad is None
    assert torch.equal(ws[2].grad, torch.full_like(ws[2], 3.0))
    for i in (0, 3) if grouped else (0,):
        torch.testing.assert_close(ws[i].grad, full_w[i].grad, rtol=0, atol=0)
    for j in range(1, len(ds)):
        torch.testing.assert_close(ds[j].grad, full_d[j].grad, rtol=0, atol=0)
    assert torch.isfinite(stats.penalty)
    # constant catalysts only (Group Lasso): weights still get scale * dR/dW
    ones = [torch.ones_like(d) for d in catalysts]
    wl = params(weights)
    cf.penalty_(wl, ones, scale=0.5, layout=layout, backend=backend)
    assert all(d.grad is None for d in ones)
    reference = params(weights)
    ref = cf.penalty(reference, ones, layout=layout, backend="reference")
    (0.5 * ref).backward()
    for a, b in zip(wl, reference):
        torch.testing.assert_close(a.grad, b.grad)
    assert not [w for w in recwarn.list if "catalyst_fused" in str(w.message)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_leaf_tensors_are_rejected(backend):
    w = torch.nn.Parameter(torch.randn(4, 3))
    raw = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match=r"catalysts\[0\] requires grad but is not a leaf tensor"):
        cf.penalty_([w], [raw * 2], backend=backend)
    with pytest.raises(ValueError, match=r"weights\[0\] requires grad but is not a leaf tensor"):
        cf.penalty_([w * 1.0], [raw], backend=backend)
    assert w.grad is None and raw.grad is None
    # a detached view does not require grad: read, no gradient
    cf.penalty_([w], [(raw * 2).detach()], backend=backend)
    assert w.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "scale, exc, message",
    [
        (float("nan"), ValueError, "scale must be finite, got nan"),
        (float("inf"), ValueError, "scale must be finite, got inf"),
        ("0.1", TypeError, "scale must be a real number, got str"),
        (None, TypeError, "scale must be a real number, got NoneType"),
        (True, TypeError, "scale must be a real number, got bool"),
        (torch.ones(2), TypeError, r"scale must be a real number, got a tensor of shape \(2,\)"),
    ],
)
def test_bad_scale(backend, scale, exc, message):
    w = torch.nn.Parameter(torch.randn(4, 3))
    d = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(exc, match=message):
        cf.penalty_([w], [d], scale=scale, backend=backend)
    assert w.grad is None and d.grad is None


def test_scale_may_be_a_number_or_one_element_tensor():
    import numpy as np

    for scale in (2, np.float32(2.0), torch.tensor(2.0)):
        w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
        d = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
        cf.penalty_([w], [d], scale=scale)
        torch.testing.assert_close(d.grad, 2.0 * w.detach().norm(dim=1))


@pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
@pytest.mark.parametrize("kernel", ["cpu", "composite"])
def test_selected_operator(kernel):
    # The CPU kernel skips tensors without a buffer; the composite (what CUDA tensors use) fills them with
    # scratch zeros: both must equal the full operator on the selected buffers.
    op = torch.ops.catalyst_fused.penalty_accumulate_selected_.default
    call = op if kernel == "cpu" else lambda *a: op._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *a)
    weights, layout = conv_bn_conv(torch.float32)
    catalysts = random_catalysts(weights, layout)
    full_w = [torch.randn_like(w) for w in weights]
    full_d = [torch.randn_like(d) for d in catalysts]
    some_w = [full_w[i].clone() for i in (0, 3)]
    some_d = [full_d[1].clone()]
    expected = torch.ops.catalyst_fused.penalty_accumulate_(weights, catalysts, full_w, full_d, 0.25, layout.member_table)
    got = call(weights, catalysts, some_w, [0, 3], some_d, [1], 0.25, layout.member_table)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert torch.equal(some_w[0], full_w[0]) and torch.equal(some_w[1], full_w[3]) and torch.equal(some_d[0], full_d[1])
    for index, message in [([3, 0], r"weight_index\[1\] = 0 must be an index into weights"), ([0, 5], r"weight_index\[1\] = 5"), ([0], "got 2 weight_grads but 1 entries")]:
        with pytest.raises(ValueError, match=message):
            call(weights, catalysts, some_w, index, some_d, [1], 0.25, layout.member_table)
    with pytest.raises(ValueError, match=r"weight_grads\[1\] has shape \[6, 8, 3, 3\] but weights\[4\] has shape \[5, 6\]"):
        call(weights, catalysts, some_w, [0, 4], some_d, [1], 0.25, layout.member_table)


@pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
@pytest.mark.parametrize("grouped", [False, True], ids=["rows", "grouped"])
def test_lean_path_equals_the_operator(grouped):
    # cf.penalty_ on plain CPU tensors takes one C++ call (operators.penalty_inplace_lean) instead of the
    # operator: same checks, same kernels, so bitwise the same results; frozen tensors get no gradient and
    # missing ones are created.
    from catalyst_fused import operators

    if grouped:
        weights, layout = conv_bn_conv(torch.float32)
    else:
        weights, layout = [torch.randn(s) for s in [(16, 3, 3, 3), (7, 13), (3, 17)]], None
    catalysts = random_catalysts(weights, layout)
    plan = None if layout is None else layout.member_table
    for frozen in (None, 1):
        ws, ds = params(weights), params(catalysts)
        if frozen is not None:
            ws[frozen].requires_grad_(False)
        for p in ws[2:]:  # the others have no .grad yet
            p.grad = torch.randn_like(p)
        expected_w = [torch.zeros_like(w) if w.grad is None else w.grad.clone() for w in ws]
        expected_d = [torch.zeros_like(d) for d in ds]
        expected = torch.ops.catalyst_fused.penalty_accumulate_(ws, ds, expected_w, expected_d, 0.3, plan)
        got = operators.penalty_inplace_lean(ws, ds, 0.3, plan, None if layout is None else layout._shape_key)
        assert got is not None
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
        for i, w in enumerate(ws):
            assert (w.grad is None) if i == frozen else torch.equal(w.grad, expected_w[i])
        for d, e in zip(ds, expected_d):
            assert torch.equal(d.grad, e)


@pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
def test_lean_path_steps_aside_and_rechecks_every_call():
    from catalyst_fused import operators

    lean = operators.penalty_inplace_lean
    weights, layout = conv_bn_conv(torch.float32)
    ws, ds = params(weights), params(random_catalysts(weights, layout))
    key = layout._shape_key
    # Arguments it does not handle: None, with nothing changed, so that the Python path decides.
    assert lean(iter(ws), ds, 1.0, layout.member_table, key) is None
    assert lean(ws, ds, 1.0, layout.member_table, torch.zeros(3, dtype=torch.int64)) is None  # other shapes
    assert lean(ws, [d * 2 for d in ds], 1.0, layout.member_table, key) is None  # non-leaf catalysts
    assert lean(ws, ds, 1, layout.member_table, key) is None  # scale not a float
    assert lean([ws[0].double()] + ws[1:], ds, 1.0, layout.member_table, key) is None  # a failing check
    assert all(p.grad is None for p in ws + ds)
    with torch.inference_mode():
        assert lean(ws, ds, 1.0, layout.member_table, key) is None
    # The lists are read before any check (their metadata is prefetched): whatever they hold returns None
    # unharmed, a meta or sparse weight, something not a tensor, a sparse .grad.
    others = ws[1:]
    assert lean([torch.empty(ws[0].shape, device="meta", requires_grad=True), *others], ds, 1.0, layout.member_table, key) is None
    assert lean([ws[0].detach().to_sparse().requires_grad_(), *others], ds, 1.0, layout.member_table, key) is None
    assert lean([3, *others], ds, 1.0, layout.member_table, key) is None
    ws[0].grad = torch.zeros_like(ws[0]).to_sparse()
    assert lean(ws, ds, 1.0, layout.member_table, key) is None
    assert ws[0].grad.is_sparse and ws[0].grad._nnz() == 0
    ws[0].grad = None
    assert all(p.grad is None for p in ws + ds)

    class Count(torch.overrides.TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():  # a mode sees the operator call of the Python path
        cf.penalty_(ws, ds, layout=layout)
    assert Count.calls > 0
    first = [p.grad.clone() for p in ws + ds]
    cf.penalty_(ws, ds, layout=layout)  # the lean path, on the same tensors
    assert all(torch.allclose(p.grad, 2 * g) for p, g in zip(ws + ds, first))
    # Checks that passed before are not skipped when a tensor changes.
    ws[1].grad = ws[0].grad.view(-1)[: ws[1].numel()].view_as(ws[1])
    with pytest.raises(ValueError, match=r"weight_grads\[0\] and weight_grads\[1\] share memory"):
        cf.penalty_(ws, ds, layout=layout)
    ws[1].grad = torch.zeros_like(ws[1])
    ws[0].data = torch.randn(ws[0].shape[0] + 1, *ws[0].shape[1:])
    with pytest.raises(ValueError, match=r"weights\[0\] has shape .* but the layout was built for"):
        cf.penalty_(ws, ds, layout=layout)


@pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
def test_lean_path_repeats_notice_every_change():
    # A repeated call compares its arguments with the facts recorded when the same call last passed and,
    # if all hold, runs the kernels at once. Each change below must be seen: the results must stay those of
    # the operator (bitwise: same kernels, same plan) and its errors must still be raised.
    weights, layout = conv_bn_conv(torch.float32)
    ws, ds = params(weights), params(random_catalysts(weights, layout))

    def step(scale=0.3):
        expected_w = [torch.zeros_like(w) if w.grad is None else w.grad.clone() for w in ws]
        expected_d = [torch.zeros_like(d) if d.grad is None else d.grad.clone() for d in ds]
        before = [None if p.grad is None else p.grad.clone() for p in ws + ds]
        expected = torch.ops.catalyst_fused.penalty_accumulate_(ws, ds, expected_w, expected_d, scale, layout.member_table)
        stats = cf.penalty_(ws, ds, scale=scale, layout=layout)
        for got, want in zip(stats, expected):
            assert torch.equal(got, want)
        for p, want, old in zip(ws + ds, expected_w + expected_d, before):
            if p.requires_grad:
                assert torch.equal(p.grad, want)
            else:
                assert (p.grad is None) if old is None else torch.equal(p.grad, old)

    for _ in range(3):  # the first call creates the .grad tensors, the second records, the third repeats
        step()
    with torch.no_grad():
        ws[0].data = torch.randn_like(ws[0])  # new memory, same shape
        ds[1].mul_(2)  # new values in the same memory
    step()
    ws[1].requires_grad_(False)
    step()
    ws[1].requires_grad_(True)
    step()
    ws[2].grad = None  # created again (a call that creates a .grad records nothing: the next one records)
    step()
    step()
    old = ws[0].grad
    kept = old.clone()
    ws[0].grad = torch.randn_like(ws[0])
    step()
    assert torch.equal(old, kept)  # the replaced buffer is not written
    ws[3] = torch.nn.Parameter(torch.randn_like(ws[3]))  # another tensor in the list
    step()
    other = torch.nn.Parameter(torch.randn_like(ws[0]))
    torch.utils.swap_tensors(ws[0], other)  # the same Python object, another tensor (and no .grad)
    step()
    step()
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        step()
    finally:
        torch.set_num_threads(threads)
    step(scale=-1.5)
    ds[0].grad = torch.zeros(2 * ds[0].numel())[::2]
    with pytest.raises(ValueError, match=r"catalyst_grads\[0\] must be contiguous"):
        cf.penalty_(ws, ds, layout=layout)
    ds[0].grad = torch.zeros_like(ds[0])
    step()
    ws[4].grad.data = torch.zeros(ws[4].shape, dtype=torch.float64)  # the same .grad tensor, another dtype
    with pytest.raises(TypeError, match=r"weight_grads\[4\] has dtype torch.float64"):
        cf.penalty_(ws, ds, layout=layout)
    ws[4].grad.data = torch.zeros_like(ws[4])
    step()
    saved = layout.member_table.clone()
    layout.member_table[0, 3] = 10**6  # the count of member 0, out of range
    with pytest.raises(ValueError, match=r"plan member 0 takes 1000000 slices"):
        cf.penalty_(ws, ds, layout=layout)
    layout.member_table.copy_(saved)
    step()
    with torch.no_grad():  # two weights share memory: weights[1] (BatchNorm) is now a slice of weights[0]
        ws[1].data = ws[0].data.view(-1)[: ws[1].numel()]
    with pytest.raises(ValueError, match=r"weights\[0\] and weights\[1\] share memory"):
        cf.penalty_(ws, ds, layout=layout)
