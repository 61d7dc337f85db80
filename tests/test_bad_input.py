"""Bad input gets a clear error naming the argument, through the public API (every backend) and through
the raw operators (the C++ checks)."""
import pytest
import torch

import catalyst_fused as cf

BACKENDS = ["reference"] + (["cpp"] if cf.cpp_available() else [])


def w(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


CASES = [
    # (weights, catalysts, exception, message)
    ([], [torch.ones(2)], ValueError, r"weights must be a non-empty sequence"),
    ([w(2, 3)], [], ValueError, r"catalysts must be a non-empty sequence"),
    (w(2, 3), [torch.ones(2)], TypeError, r"weights must be a sequence of tensors, got a single tensor"),
    ([w(2, 3), "conv"], [torch.ones(2), torch.ones(2)], TypeError, r"weights\[1\] must be a torch.Tensor"),
    ([w(2, 3), w(4, 3)], [torch.ones(2)], ValueError, r"got 2 weights but 1 catalysts"),
    ([w(2, 3), w(4, 3)], [torch.ones(2), torch.ones(3)], ValueError, r"catalysts\[1\] has 3 entries but weights\[1\] has 4 channels"),
    ([w(2, 3), w(4, 3, dtype=torch.float64)], [torch.ones(2), torch.ones(4)], TypeError, r"weights\[1\] has dtype torch.float64"),
    ([w(2, 3)], [torch.ones(2, dtype=torch.float64)], TypeError, r"catalysts\[0\] has dtype torch.float64"),
    ([torch.ones(2, 3, dtype=torch.int64)], [torch.ones(2)], TypeError, r"weights\[0\] must be a floating-point tensor"),
    ([torch.tensor(1.0)], [torch.ones(1)], ValueError, r"weights\[0\] must have at least one dimension"),
    ([w(2, 3)], [torch.ones(2, 1)], ValueError, r"catalysts\[0\] must be 1-D"),
    ([w(2, 3), w(2, 3, device="meta")], [torch.ones(2), torch.ones(2)], ValueError, r"weights\[1\] is on meta"),
    ([w(2, 3)], [torch.ones(2, device="meta")], ValueError, r"catalysts\[0\] is on meta"),
]


def _call(fn, weights, catalysts, backend):
    fn(weights, catalysts, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights, catalysts, exc, message", CASES)
def test_penalty_rejects(backend, weights, catalysts, exc, message):
    with pytest.raises(exc, match=message):
        cf.penalty(weights, catalysts, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights, catalysts, exc, message", CASES[4:11])
def test_penalty_inplace_rejects(backend, weights, catalysts, exc, message):
    weights = [x.requires_grad_(True) if x.is_floating_point() else x for x in weights]
    with pytest.raises(exc, match=message):
        cf.penalty_(weights, catalysts, backend=backend)


@pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
@pytest.mark.parametrize("weights, catalysts, exc, message", [c for c in CASES if not isinstance(c[0], torch.Tensor)][:2] + CASES[4:])
def test_raw_operator_rejects(weights, catalysts, exc, message):
    if any(not isinstance(x, torch.Tensor) for x in weights):
        pytest.skip("the schema itself rejects non-tensors")
    if any(x.device.type == "meta" for x in list(weights) + list(catalysts)):
        pytest.skip("mixed meta/cpu is rejected by the dispatcher before the kernel")
    with pytest.raises(exc, match=message):
        torch.ops.catalyst_fused.penalty_forward(weights, catalysts, None)


@pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
def test_raw_operator_rejects_bad_plans():
    weights, catalysts = [w(4, 3), w(5, 4)], [torch.ones(4)]
    ops = torch.ops.catalyst_fused
    good = cf.GroupLayout.build(weights, [[cf.Slices(0), cf.Slices(1, dim=1)]]).member_table
    ops.penalty_forward(weights, catalysts, good)
    big = 2**62
    cases = [
        (good.to(torch.int32), r"plan must be a contiguous int64 CPU tensor"),
        (good[:, :6].contiguous(), r"plan must be a contiguous int64 CPU tensor of shape \[members, 7\]"),
        (torch.tensor([[2, 0, 0, 4, 0, 0, 1]]), r"plan member 0 refers to weights\[2\]"),
        (torch.tensor([[0, 3, 0, 4, 0, 0, 1]]), r"plan member 0 has dim 3"),
        (torch.tensor([[0, 0, 1, 4, 0, 0, 1]]), r"takes 4 slices from index 1 of weights\[0\]"),
        (torch.tensor([[0, 0, 0, 4, 1, 0, 1]]), r"refers to catalysts\[1\]"),
        (torch.tensor([[0, 0, 0, 4, 0, 1, 1]]), r"maps to 4 groups from group 1 of catalysts\[0\]"),
        (torch.tensor([[0, 0, 0, -1, 0, 0, 1]]), r"takes -1 slices"),
        (torch.tensor([[0, 0, 0, 4, 0, 0, 0]]), r"has width 0"),
        (torch.tensor([[0, 0, 0, 4, 0, 0, 3]]), r"has width 3; it must be >= 1 and divide its slice count 4"),
        # values whose sums overflow int64: rejected, never used as offsets
        (torch.tensor([[0, 0, big, big, 0, 0, 1]]), r"takes 4611686018427387904 slices"),
        (torch.tensor([[0, 0, 2, 2**63 - 1, 0, 0, 1]]), r"takes 9223372036854775807 slices from index 2"),
        (torch.tensor([[0, 0, 0, 4, 0, 2**63 - 2, 1]]), r"maps to 4 groups from group 9223372036854775806"),
        (torch.tensor([[0, 0, 0, 4, 0, -(2**63), 1]]), r"maps to 4 groups"),
        (torch.tensor([[-(2**63), 0, 0, 4, 0, 0, 1]]), r"refers to weights\[-9223372036854775808\]"),
        (torch.tensor([[0, 0, 0, 4, 2**63 - 1, 0, 1]]), r"refers to catalysts\[9223372036854775807\]"),
        (torch.tensor([[0, 0, 0, 4, 0, 0, -(2**63)]]), r"has width -9223372036854775808"),
    ]
    for plan, message in cases:
        for call in (
            lambda: ops.penalty_forward(weights, catalysts, plan),
            lambda: ops.penalty_backward(torch.tensor(1.0), weights, catalysts, torch.ones(4), plan),
            lambda: ops.penalty_accumulate_(weights, catalysts, [torch.zeros_like(x) for x in weights], [torch.zeros(4)], 1.0, plan),
        ):
            with pytest.raises(ValueError, match=message):
                call()
    _, norms, _ = ops.penalty_forward(weights, catalysts, good)
    with pytest.raises(ValueError, match=r"norms must be the contiguous"):
        ops.penalty_backward(torch.tensor(1.0), weights, catalysts, norms[:2], good)
    with pytest.raises(ValueError, match=r"grad_penalty must have one element"):
        ops.penalty_backward(torch.ones(2), weights, catalysts, norms, good)


@pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
def test_fake_functions_check_the_plan():
    # Meta tensors run the registered fake functions: the same plan checks and messages as the kernels.
    ops = torch.ops.catalyst_fused
    weights = [torch.empty(4, 3, device="meta"), torch.empty(5, 4, device="meta")]
    catalysts = [torch.empty(2, device="meta")]
    heads = cf.GroupLayout([(4, 3), (5, 4)], [[cf.Slices(0, width=2), cf.Slices(1, dim=1, width=2)]]).member_table
    assert ops.penalty_forward(weights, catalysts, heads)[1].shape == (2,)
    for plan, message in [
        (torch.tensor([[0, 0, 0, 4, 0, 0, 3]]), r"has width 3"),
        (torch.tensor([[0, 0, 0, 4, 0, 1, 2]]), r"maps to 2 groups from group 1 of catalysts\[0\]"),
        (torch.tensor([[0, 0, 2**62, 2**62, 0, 0, 1]]), r"takes 4611686018427387904 slices"),
        (heads[:, :6].contiguous(), r"shape \[members, 7\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            ops.penalty_forward(weights, catalysts, plan)
        with pytest.raises(ValueError, match=message):
            ops.penalty_accumulate_(weights, catalysts, [torch.empty_like(x) for x in weights], [torch.empty(2, device="meta")], 1.0, plan)


def test_bad_options():
    weights, catalysts = [w(2, 3)], [torch.ones(2)]
    with pytest.raises(ValueError, match="backend must be one of"):
        cf.penalty(weights, catalysts, backend="tpu")
    with pytest.raises(TypeError, match="layout must be a GroupLayout"):
        cf.penalty(weights, catalysts, layout=[[0]])


@pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
def test_non_contiguous_inplace_weight_is_rejected():
    weight = torch.nn.Parameter(torch.randn(6, 4).t())
    with pytest.raises(ValueError, match=r"weights\[0\] must be contiguous"):
        cf.penalty_([weight], [torch.nn.Parameter(torch.ones(4))])


def test_nothing_is_modified_on_error():
    weight = torch.nn.Parameter(torch.randn(4, 3))
    d = torch.nn.Parameter(torch.ones(5))
    weight.grad = torch.ones(4, 3)
    before = weight.grad.clone()
    with pytest.raises(ValueError):
        cf.penalty_([weight], [d])
    assert torch.equal(weight.grad, before)
    assert d.grad is None  # no gradient was created for a call that failed


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_tensors_are_rejected(backend):
    # A tied weight or a shared catalyst listed twice would get two gradient writers.
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    d1, d2 = torch.ones(4), torch.ones(4)
    cases = [
        ([a, a], [d1, d2], r"weights\[0\] and weights\[1\] share memory"),
        ([a, b], [d1, d1], r"catalysts\[0\] and catalysts\[1\] share memory"),
        ([a, a.view(3, 4)[1:].reshape(2, 4)], [d1, torch.ones(2)], r"weights\[0\] and weights\[1\] share memory"),
        ([b, a.view(-1)[:4]], [d1, a.view(-1)[2:6]], r"weights\[1\] and catalysts\[1\] share memory"),
    ]
    for weights, catalysts, message in cases:
        with pytest.raises(ValueError, match=message):
            cf.penalty(weights, catalysts, backend=backend)
    # in place (tied parameters): rejected before any gradient is created
    p, q = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    e1, e2 = torch.nn.Parameter(d1.clone()), torch.nn.Parameter(d2.clone())
    with pytest.raises(ValueError, match=r"weights\[0\] and weights\[1\] share memory"):
        cf.penalty_([p, p], [e1, e2], backend=backend)
    with pytest.raises(ValueError, match=r"catalysts\[0\] and catalysts\[1\] share memory"):
        cf.penalty_([p, q], [e1, e1], backend=backend)
    assert all(x.grad is None for x in (p, q, e1, e2))
    # disjoint pieces of one storage are fine
    base = torch.randn(8, 3)
    cf.penalty([base[:4], base[4:]], [d1, d2], backend=backend)


@pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
def test_raw_operators_reject_duplicates():
    ops = torch.ops.catalyst_fused
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    d1, d2 = torch.ones(4), torch.ones(4)
    with pytest.raises(ValueError, match=r"weights\[0\] and weights\[1\] share memory"):
        ops.penalty_forward([a, a], [d1, d2], None)
    _, norms, _ = ops.penalty_forward([a, b], [d1, d2], None)
    with pytest.raises(ValueError, match=r"catalysts\[0\] and catalysts\[1\] share memory"):
        ops.penalty_backward(torch.tensor(1.0), [a, b], [d1, d1], norms, None)
    g = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"weight_grads\[0\] and weight_grads\[1\] share memory"):
        ops.penalty_accumulate_([a, b], [d1, d2], [g, g], [torch.zeros(4), torch.zeros(4)], 1.0, None)
    with pytest.raises(ValueError, match=r"weights\[1\] and weight_grads\[1\] share memory"):
        ops.penalty_accumulate_([a, b], [d1, d2], [g, b], [torch.zeros(4), torch.zeros(4)], 1.0, None)
    gd = torch.zeros(8)
    with pytest.raises(ValueError, match=r"share memory"):
        ops.penalty_accumulate_([a, b], [d1, d2], [torch.zeros(4, 3), torch.zeros(4, 3)], [gd[:4], gd[2:6]], 1.0, None)
    with pytest.raises(ValueError, match=r"share memory"):
        ops.penalty_accumulate_selected_([a, b], [d1, d2], [g, g], [0, 1], [], [], 1.0, None)


@pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
def test_reused_plans_still_check_every_call():
    # The CPU operators keep plans for shapes and member tables they have seen: a changed table (even the
    # same tensor edited in place), a bad table or bad tensors with the same shapes must still be caught.
    ops = torch.ops.catalyst_fused
    weights, catalysts = [w(4, 3), w(5, 4)], [torch.ones(4), torch.ones(5)]
    layout = cf.GroupLayout.build(weights, [[cf.Slices(0), cf.Slices(1, dim=1)], [cf.Slices(1)]])
    table = layout.member_table.clone()
    first = ops.penalty_forward(weights, catalysts, table)
    assert torch.equal(ops.penalty_forward(weights, catalysts, table)[1], first[1])
    table[1, 3] = 2  # member 1 now takes 2 input columns: groups 2 and 3 of segment 0 lose them
    changed = ops.penalty_forward(weights, catalysts, table)[1]
    assert not torch.equal(changed[:4], first[1][:4])
    torch.testing.assert_close(changed[2:4], weights[0][2:4].norm(dim=1))
    table[1, 3] = 7  # out of range
    with pytest.raises(ValueError, match=r"plan member 1 takes 7 slices"):
        ops.penalty_forward(weights, catalysts, table)
    with pytest.raises(ValueError, match=r"weights\[1\] must be contiguous"):
        ops.penalty_forward([weights[0], weights[1].t().contiguous().t()], catalysts, layout.member_table)
    with pytest.raises(TypeError, match=r"weights\[1\] has dtype torch.float64"):
        ops.penalty_forward([weights[0], weights[1].double()], catalysts, layout.member_table)
    base = torch.randn(32)
    with pytest.raises(ValueError, match=r"weights\[0\] and weights\[1\] share memory"):
        ops.penalty_forward([base[:12].view(4, 3), base[10:30].view(5, 4)], catalysts, layout.member_table)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_gradient_buffers_are_rejected(backend):
    p, q = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    d1, d2 = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    shared = torch.zeros(4, 3)
    p.grad = shared
    q.grad = shared
    with pytest.raises(ValueError, match=r"weight_grads\[0\] and weight_grads\[1\] share memory"):
        cf.penalty_([p, q], [d1, d2], backend=backend)
    assert torch.equal(shared, torch.zeros(4, 3))
    assert d1.grad is None and d2.grad is None  # nothing created by a failing call
