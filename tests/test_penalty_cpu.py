"""The C++ CPU operator against the fp64 reference: values and every gradient, all dtypes, odd shapes,
many tensors, and sizes around the kernel's boundaries (32 accumulator lanes per sum; work chunks of
kChunkElements = 32768 elements; multi-threading above 4 * 32768 elements; see csrc/plan.h)."""
import pytest
import torch

import catalyst_fused as cf

from _helpers import DTYPES, check_against_reference, random_catalysts

pytestmark = pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")

LANES = 32  # csrc/cpu/leaf_kernels.h kLanes
CHUNK = 1 << 15

SHAPE_SETS = {
    "conv3x3": [(16, 3, 3, 3), (32, 16, 3, 3)],
    "conv1x1": [(32, 16, 1, 1), (8, 32, 1, 1)],
    "depthwise": [(32, 1, 3, 3), (24, 1, 5, 5)],
    "linear": [(10, 64), (7, 13)],
    "bn_scale": [(33,), (1,)],
    "rows_around_lanes": [(3, LANES - 1), (3, LANES), (3, LANES + 1), (2, 2 * LANES + 1), (5, 1)],
    "long_rows": [(4, 16384), (3, 16385), (2, 16383)],
    "around_chunk": [(1, CHUNK - 1), (1, CHUNK), (1, CHUNK + 1), (33, 1000), (65, 1000), (31, 1000)],
    "one_row_bigger_than_chunk": [(2, 3 * CHUNK + 5)],
    "mixed_ranks": [(6, 4, 3, 3), (6, 5), (6,), (5, 2, 7)],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", list(SHAPE_SETS.values()), ids=list(SHAPE_SETS))
def test_matches_reference(shapes, dtype):
    weights = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    check_against_reference(weights, random_catalysts(weights, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multithreaded_sizes(dtype):
    # Above 4 * CHUNK elements the passes run under at::parallel_for; the result must not depend on it.
    shapes = [(64, 64, 3, 3), (128, 64, 3, 3), (256, 128, 1, 1), (100, 1000)]
    weights = [torch.randn(s).to(dtype) for s in shapes]
    catalysts = random_catalysts(weights, dtype=dtype)
    check_against_reference(weights, catalysts)
    # Deterministic: the same bits on every call and for any thread count.
    first = cf.penalty(weights, catalysts, return_stats=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cf.penalty(weights, catalysts, return_stats=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first.penalty, single.penalty) and torch.equal(first.norms, single.norms)


def test_hundreds_of_tensors():
    shapes = [(1 + i % 17, 1 + (i * 7) % 23, 1 + i % 3) for i in range(320)]
    weights = [torch.randn(s, dtype=torch.float32) for s in shapes]
    check_against_reference(weights, random_catalysts(weights))


def test_grad_output_scale_is_applied():
    weights = [torch.randn(6, 5, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)]
    check_against_reference(weights, random_catalysts(weights), grad_scale=-2.5)


def test_weights_without_grad_and_catalysts_only():
    w = torch.randn(5, 7, dtype=torch.float64)  # frozen weight
    d = torch.rand(5, dtype=torch.float64, requires_grad=True)
    cf.penalty([w], [d]).backward()
    torch.testing.assert_close(d.grad, torch.linalg.vector_norm(w, dim=1))


def test_non_contiguous_weights_are_copied():
    base = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    w = base.to(memory_format=torch.channels_last).requires_grad_(True)
    assert not w.is_contiguous()
    d = torch.rand(8, dtype=torch.float64, requires_grad=True)
    got = cf.penalty([w], [d])
    got.backward()
    wr = base.clone().requires_grad_(True)
    dr = d.detach().clone().requires_grad_(True)
    ref = cf.reference.penalty([wr], [dr])
    ref.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(w.grad, wr.grad)
    torch.testing.assert_close(d.grad, dr.grad)


def test_stats_are_detached_and_match_group_norms():
    weights = [torch.randn(6, 5, requires_grad=True), torch.randn(3, 2, 2, requires_grad=True)]
    catalysts = cf.init_catalysts(weights, c0=2.0)
    stats = cf.penalty(weights, catalysts, return_stats=True)
    assert stats.penalty.requires_grad and not stats.norms.requires_grad and not stats.ratios.requires_grad
    torch.testing.assert_close(stats.norms, cf.group_norms(weights))
    torch.testing.assert_close(stats.ratios, torch.full_like(stats.ratios, 2.0))
    per_weight = cf.split_per_weight(stats.norms, catalysts)
    assert [n.shape[0] for n in per_weight] == [6, 3]


def test_backward_reuses_only_unreferenced_gradient_buffers():
    # penalty_backward hands out the storages of earlier calls again (no fresh pages to fault in), but only
    # when nothing references them any more: results a caller keeps are never overwritten.
    weights = [torch.randn(64, 32, 3, 3, requires_grad=True), torch.randn(128, 64, requires_grad=True)]
    catalysts = [torch.rand(64, requires_grad=True), torch.rand(128, requires_grad=True)]

    def grads_of(ws, scale=1.0):
        return torch.autograd.grad(scale * cf.penalty(ws, catalysts), ws)

    kept = grads_of(weights)
    kept_copy = [g.clone() for g in kept]
    view = grads_of(weights, 2.0)[0][3:5]  # only a view survives
    view_copy = view.clone()
    for _ in range(3):
        fresh = grads_of(weights, 3.0)
        torch.testing.assert_close(fresh[0], 3.0 * kept_copy[0])
    for a, b in zip(kept, kept_copy):
        assert torch.equal(a, b)
    assert torch.equal(view, view_copy)

    # zero_grad(set_to_none=True) loop: the dropped .grad storage comes back as the next step's .grad
    cf.penalty(weights, catalysts).backward()
    first = [w.grad.data_ptr() for w in weights]
    expected = [w.grad.clone() for w in weights]
    for _ in range(2):
        for w in weights:
            w.grad = None
        cf.penalty(weights, catalysts).backward()
    assert [w.grad.data_ptr() for w in weights] == first
    for w, e in zip(weights, expected):
        assert torch.equal(w.grad, e)
    # existing gradients: autograd adds the penalty's gradient into them
    cf.penalty(weights, catalysts).backward()
    for w, e in zip(weights, expected):
        torch.testing.assert_close(w.grad, 2 * e)
    cf.functional.release_cached_memory()
    cf.penalty(weights, catalysts).backward()
    for w, e in zip(weights, expected):
        torch.testing.assert_close(w.grad, 3 * e)
