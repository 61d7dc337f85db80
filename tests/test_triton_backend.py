"""The Triton kernels against the fp64 reference. Without a GPU they run under TRITON_INTERPRET=1 (set in
conftest.py) on CPU tensors, about 10^4 times slower than on a GPU, so shapes are small and the block
size is shrunk to 16 elements to exercise rows longer than a block and masked tails."""
import pytest
import torch

import catalyst_fused as cf
from catalyst_fused import GroupLayout, Slices

from _helpers import DTYPES, GRAD_TOL, STAT_TOL, assert_close, check_against_reference, random_catalysts

pytestmark = pytest.mark.skipif(
    not cf.triton_available(torch.device("cpu")), reason="Triton is not importable or TRITON_INTERPRET is not set"
)

SMALL_BLOCK = 16


@pytest.fixture(autouse=True)
def _small_block(monkeypatch):
    from catalyst_fused.backends import triton_penalty

    monkeypatch.setattr(triton_penalty, "BLOCK", SMALL_BLOCK)


SHAPES = {
    "conv_and_linear": [(3, 2, 3, 3), (4, 3)],
    "around_block": [(2, SMALL_BLOCK - 1), (2, SMALL_BLOCK), (1, SMALL_BLOCK + 1), (1, 2 * SMALL_BLOCK + 3)],
    "bn_and_1x1": [(5,), (3, 5, 1, 1)],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference(shapes, dtype):
    weights = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    check_against_reference(weights, random_catalysts(weights, dtype=dtype), backend="triton")


def test_many_tensors_one_launch():
    weights = [torch.randn(1 + i % 3, 1 + i % 4) for i in range(40)]
    check_against_reference(weights, random_catalysts(weights), backend="triton", grad_scale=-1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_layout_rows_columns_and_offsets(dtype):
    weights = [torch.randn(3, 2, 2), torch.randn(3), torch.randn(2, 3, 2), torch.randn(2, 4), torch.randn(4, 5)]
    layout = GroupLayout.build(
        weights,
        [
            [Slices(0), Slices(1), Slices(2, dim=1)],  # 3 groups: conv row + BN + next conv's input column
            [Slices(2), Slices(3, offset=0, count=2, start=0, dim=0)],  # 2 groups
            [Slices(3, dim=1, start=0, count=4), Slices(4, dim=1, start=1, count=4)],  # 4 groups, partial columns
        ],
    )
    weights = [w.to(dtype) for w in weights]
    check_against_reference(weights, random_catalysts(weights, layout, dtype=dtype), layout, backend="triton")


def test_zero_filter_zero_catalyst_and_nan():
    w = torch.randn(4, 5, dtype=torch.float64)
    w[1] = 0
    w[3, 2] = float("nan")
    d = torch.tensor([1.5, 2.0, 0.0, 1.0], dtype=torch.float64)
    ws, ds = [w.clone().requires_grad_(True)], [d.clone().requires_grad_(True)]
    stats = cf.penalty(ws, ds, backend="triton", return_stats=True)
    stats.penalty.backward()
    assert torch.isinf(stats.ratios[1]) and stats.ratios[2] == 0
    assert torch.all(ws[0].grad[1] == 0) and torch.all(ws[0].grad[2] == 0)
    assert torch.isnan(stats.norms[3]) and torch.isnan(ws[0].grad[3]).all() and torch.isnan(stats.penalty)
    assert ds[0].grad[2] == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_inplace_matches_reference(dtype):
    weights = [torch.randn(3, 4, 2).to(dtype), torch.randn(5, 3).to(dtype)]
    catalysts = random_catalysts(weights, dtype=dtype)
    ws = [torch.nn.Parameter(w.clone()) for w in weights]
    ds = [torch.nn.Parameter(d.clone()) for d in catalysts]
    prior = [torch.randn_like(p) for p in ws + ds]
    for p, g in zip(ws + ds, prior):
        p.grad = g.clone()
    stats = cf.penalty_(ws, ds, scale=0.5, backend="triton")
    rw = [torch.nn.Parameter(w.double()) for w in weights]
    rd = [torch.nn.Parameter(d.double()) for d in catalysts]
    ref = cf.penalty(rw, rd, backend="reference", return_stats=True)
    ref.penalty.backward()
    assert_close(stats.penalty, ref.penalty, STAT_TOL[dtype], "penalty")
    for p, g0, r in zip(ws + ds, prior, rw + rd):
        rtol, atol = GRAD_TOL[dtype]
        assert_close(p.grad, g0.double() + 0.5 * r.grad, (rtol, atol + 2 * rtol * g0.double().abs().max().item()), "grad")


def test_opcheck():
    weights = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 5, dtype=torch.float64, requires_grad=True)]
    catalysts = [d.requires_grad_(True) for d in random_catalysts(weights)]
    torch.library.opcheck(torch.ops.catalyst_fused.triton_penalty_forward.default, (weights, catalysts, None),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match=r"catalysts\[0\] has 3 entries but weights\[0\] has 2 channels"):
        cf.penalty([torch.randn(2, 3)], [torch.ones(3)], backend="triton")
    with pytest.raises(TypeError, match=r"weights\[1\] has dtype torch.float64"):
        cf.penalty([torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)], [torch.ones(2), torch.ones(2)], backend="triton")


@pytest.mark.slow
def test_compile_fullgraph():
    torch._dynamo.reset()
    weights = [torch.randn(3, 4), torch.randn(2, 5)]
    catalysts = random_catalysts(weights)

    def fn(ws, ds):
        return cf.penalty(ws, ds, backend="triton", return_stats=True)

    compiled = torch.compile(fn, fullgraph=True)
    leaves = [[t.clone().requires_grad_(True) for t in group] for group in (weights, catalysts)]
    got = compiled(*leaves)
    got.penalty.backward()
    ref_leaves = [[t.clone().requires_grad_(True) for t in group] for group in (weights, catalysts)]
    ref = cf.penalty(*ref_leaves, backend="reference", return_stats=True)
    ref.penalty.backward()
    torch.testing.assert_close(got.penalty, ref.penalty)
    torch.testing.assert_close(got.ratios, ref.ratios)
    for a, b in zip(leaves[0] + leaves[1], ref_leaves[0] + ref_leaves[1]):
        torch.testing.assert_close(a.grad, b.grad)
