"""The operator layer: torch.library.opcheck, fp64 gradcheck and torch.compile(fullgraph=True)."""
import pytest
import torch

import catalyst_fused as cf

from _helpers import random_catalysts
from test_layout import attention_heads, conv_bn_conv

pytestmark = pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
ops = torch.ops.catalyst_fused


def samples():
    """(weights, catalysts, plan) samples: per-row, grouped, odd shapes, tensors without grad."""
    w_rows = [torch.randn(s, dtype=torch.float64) for s in [(4, 3, 3, 3), (5, 7), (6,)]]
    yield w_rows, random_catalysts(w_rows), None
    w_group, layout = conv_bn_conv(torch.float32)
    yield w_group, random_catalysts(w_group, layout), layout.member_table
    w_half = [torch.randn(3, 17).to(torch.bfloat16), torch.randn(2, 33).to(torch.bfloat16)]
    yield w_half, random_catalysts(w_half), None
    w_heads, heads = attention_heads(torch.float32)
    yield w_heads, random_catalysts(w_heads, heads), heads.member_table


NUM_SAMPLES = 4


@pytest.mark.parametrize("index", range(NUM_SAMPLES))
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_forward(index, requires_grad):
    weights, catalysts, plan = list(samples())[index]
    weights = [w.requires_grad_(requires_grad) for w in weights]
    catalysts = [d.requires_grad_(requires_grad) for d in catalysts]
    torch.library.opcheck(ops.penalty_forward.default, (weights, catalysts, plan))


@pytest.mark.parametrize("index", range(NUM_SAMPLES))
def test_opcheck_backward_and_accumulate(index):
    weights, catalysts, plan = list(samples())[index]
    _, norms, _ = ops.penalty_forward(weights, catalysts, plan)
    grad = torch.tensor(1.5, dtype=norms.dtype)
    torch.library.opcheck(ops.penalty_backward.default, (grad, weights, catalysts, norms, plan))
    wg = [torch.randn_like(w) for w in weights]
    dg = [torch.randn_like(d) for d in catalysts]
    torch.library.opcheck(ops.penalty_accumulate_.default, (weights, catalysts, wg, dg, 0.25, plan))


@pytest.mark.parametrize("grouped", [False, True], ids=["rows", "grouped"])
def test_gradcheck_fp64(grouped):
    if grouped:
        weights, layout = conv_bn_conv(torch.float64)
        weights = [w[..., :2, :2] if w.dim() == 4 else w for w in weights]  # keep gradcheck small
        weights = [w.contiguous() for w in weights]
        layout = cf.GroupLayout.build(weights, [[cf.Slices(0), cf.Slices(1), cf.Slices(2), cf.Slices(3, dim=1)], [cf.Slices(3), cf.Slices(4, dim=1)]])
    else:
        weights, layout = [torch.randn(s, dtype=torch.float64) for s in [(3, 2, 2), (4, 5), (3,)]], None
    catalysts = random_catalysts(weights, layout)
    inputs = [t.clone().requires_grad_(True) for t in weights + catalysts]
    k = len(weights)

    def fn(*xs):
        return cf.penalty(list(xs[:k]), list(xs[k:]), layout=layout)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    weights, layout = conv_bn_conv(torch.float32)
    catalysts = random_catalysts(weights, layout)
    rows = [torch.randn(8, 3, 3, 3), torch.randn(5, 8)]
    row_catalysts = random_catalysts(rows)

    def step(ws, ds, rws, rds):
        grouped = cf.penalty(ws, ds, layout=layout, return_stats=True)
        plain = cf.penalty(rws, rds)
        return grouped.penalty + 0.5 * plain, grouped.ratios

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [[t.clone().requires_grad_(True) for t in group] for group in (weights, catalysts, rows, row_catalysts)]
        value, ratios = fn(*leaves)
        value.backward()
        results.append((value.detach(), ratios, [t.grad for group in leaves for t in group]))
    (v0, r0, g0), (v1, r1, g1) = results
    torch.testing.assert_close(v1, v0)
    torch.testing.assert_close(r1, r0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)
