"""The penalty on DTensor weights sharded along dim 0 (FSDP2's layout), 2 gloo processes on CPU: values and
every gradient equal the unsharded fp64 reference, for row groups (rows split unevenly and in the middle
of width-groups), input-column groups and multi-tensor groups; one all-reduce per call."""
import pytest
import torch

import catalyst_fused as cf
from catalyst_fused import reference
from catalyst_fused.layout import GroupLayout, Slices
from catalyst_fused.sharded import local_layout

from _distributed import spawn


def _cases():
    g = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    rows = [rnd(5, 3, 2, 2), rnd(7, 4), rnd(1, 3)]  # 5 rows -> 3/2, 7 -> 4/3, 1 -> 1/0
    rows[0][2].zero_()  # an all-zero group: the subgradient convention
    cols = [rnd(6, 4), rnd(5, 6, 3)]
    col_layout = GroupLayout.build(cols, [[Slices(0), Slices(1, dim=1)]])  # rows of cols[0] + columns of cols[1]
    multi = [rnd(6, 3), rnd(6), rnd(6), rnd(4, 6), rnd(9, 2)]
    multi_layout = GroupLayout.build(multi, [
        [Slices(0, width=2), Slices(1, width=2), Slices(2, width=2), Slices(3, dim=1, width=2)],  # heads of 2 rows
        [Slices(4, count=3, width=3), Slices(4, start=3, count=6, offset=1)],  # 9 rows: 3/3/3 split -> cut at 5
    ])
    for name, ws, lay in (("rows", rows, None), ("columns", cols, col_layout), ("multi", multi, multi_layout)):
        sizes = [w.shape[0] for w in ws] if lay is None else lay.segment_sizes
        cats = [rnd(n) + torch.where(rnd(n) > 0, 1.0, -1.0) for n in sizes]
        cats[0][0] = 0.0  # sign(0) = 0
        yield name, ws, lay, cats


def _reference(ws, cats, lay):
    w = [t.clone().requires_grad_() for t in ws]
    d = [t.clone().requires_grad_() for t in cats]
    value, norms, ratios = reference.penalty_with_stats(w, d, lay)
    value.backward()
    return value.detach(), norms, ratios, [t.grad for t in w], [t.grad for t in d]


def _close(a, b, what):
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), f"{what}: max diff {(a - b).abs().max()}"


def _sharded_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    calls = []
    import catalyst_fused.sharded as sh

    real = sh._all_reduce
    sh._all_reduce = lambda sums, m: calls.append(sums.numel() * sums.element_size()) or real(sums, m)
    for name, ws, lay, cats in _cases():
        value, norms, ratios, gw, gd = _reference(ws, cats, lay)
        for backend in ("cpp", "reference"):
            where = f"{name}/{backend}/rank {rank}"
            # autograd: cf.penalty on DTensors, backward gives DTensor gradients
            dw = [distribute_tensor(w.clone(), mesh, [Shard(0)]).requires_grad_() for w in ws]
            dd = [d.clone().requires_grad_() for d in cats]
            calls.clear()
            stats = cf.penalty(dw, dd, layout=lay, return_stats=True, backend=backend)
            assert len(calls) == 1 and calls[0] == 8 * sum(d.numel() for d in cats), where  # one flat vector
            stats.penalty.backward()
            _close(stats.penalty.detach(), value, f"{where} value")
            _close(stats.norms, norms.detach(), f"{where} norms")
            assert torch.equal(torch.isinf(stats.ratios), torch.isinf(ratios)), where
            for k, (a, b) in enumerate(zip(dw, gw)):
                _close(a.grad.full_tensor(), b, f"{where} weight grad {k}")
            for k, (a, b) in enumerate(zip(dd, gd)):
                _close(a.grad, b, f"{where} catalyst grad {k}")
            # in place: adds scale * grad into existing gradients, one all-reduce
            base = [torch.full_like(w, 0.25) for w in ws]
            dw = [distribute_tensor(w.clone(), mesh, [Shard(0)]).requires_grad_() for w in ws]
            for t, b in zip(dw, base):
                t.grad = distribute_tensor(b.clone(), mesh, [Shard(0)])
            dd = [d.clone().requires_grad_() for d in cats]
            calls.clear()
            out = cf.penalty_(dw, dd, scale=0.5, layout=lay, backend=backend)
            assert len(calls) == 1, where
            _close(out.penalty, value, f"{where} in-place value")
            for k, (a, b, g0) in enumerate(zip(dw, gw, base)):
                _close(a.grad.full_tensor(), g0 + 0.5 * b, f"{where} in-place weight grad {k}")
            for k, (a, b) in enumerate(zip(dd, gd)):
                _close(a.grad, 0.5 * b, f"{where} in-place catalyst grad {k}")
    # catalysts initialised from sharded weights are full, plain tensors equal to the unsharded ones
    _, ws, lay, _ = next(_cases())
    dw = [distribute_tensor(w.clone(), mesh, [Shard(0)]) for w in ws]
    for a, b in zip(cf.init_catalysts(dw, 2.0, layout=lay), cf.init_catalysts(ws, 2.0, layout=lay)):
        _close(a.detach(), b.detach(), "init_catalysts")
    # a mix of DTensors and plain tensors is refused, naming the plain ones
    with pytest.raises(ValueError, match=r"weights\[1\] are plain tensors"):
        cf.penalty([dw[0], ws[1], dw[2]], [torch.ones(5), torch.ones(7), torch.ones(1)])


def test_the_dtensor_penalty_equals_the_unsharded_reference_in_value_and_every_gradient():
    spawn(_sharded_worker, world=2, timeout=240)


@pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_partial_sums_and_finish_match_the_reference_and_the_fused_call(dtype):
    ops = torch.ops.catalyst_fused
    for name, ws, lay, cats in _cases():
        ws, cats = [w.to(dtype) for w in ws], [d.to(dtype) for d in cats]
        plan = None if lay is None else lay.member_table
        sums = ops.penalty_partial_sums(ws, cats, plan)
        assert torch.allclose(sums, reference.partial_sums(ws, cats, lay), rtol=1e-5, atol=1e-6), name
        # finishing from the full sums is the fused in-place call (same gradients, statistics, penalty)
        idx_w, idx_d = list(range(len(ws))), list(range(len(cats)))
        fin_w, fin_d = [torch.ones_like(w) for w in ws], [torch.ones_like(d) for d in cats]
        fused_w, fused_d = [torch.ones_like(w) for w in ws], [torch.ones_like(d) for d in cats]
        ref_w, ref_d = [torch.ones_like(w) for w in ws], [torch.ones_like(d) for d in cats]
        got = ops.penalty_finish_(ws, cats, fin_w, idx_w, fin_d, idx_d, 0.7, plan, sums)
        want = ops.penalty_accumulate_(ws, cats, fused_w, fused_d, 0.7, plan)
        via_ref = reference.finish_(ws, cats, ref_w, ref_d, 0.7, lay, sums)
        for a, b, c in zip(got, want, via_ref):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True), name
            assert torch.allclose(a, c, rtol=1e-5, atol=1e-6, equal_nan=True), name
        rtol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        for a, b, c in zip(fin_w + fin_d, fused_w + fused_d, ref_w + ref_d):
            assert torch.allclose(a.float(), b.float(), rtol=rtol, atol=1e-6), name
            assert torch.allclose(a.float(), c.float(), rtol=rtol, atol=1e-2 if dtype == torch.bfloat16 else 1e-6), name
        # only the listed tensors get gradients
        part = [torch.zeros_like(ws[1])]
        ops.penalty_finish_(ws, cats, part, [1], [], [], 1.0, plan, sums)
        assert torch.allclose(part[0].float(), (fin_w[1].float() - 1) / 0.7, rtol=rtol, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    with pytest.raises(ValueError, match="sums must be the contiguous"):
        ops.penalty_finish_(ws, cats, [], [], [], [], 1.0, plan, sums[:-1])


@pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
def test_opcheck_partial_sums_and_finish():
    ops = torch.ops.catalyst_fused
    _, ws, lay, cats = list(_cases())[1]
    sums = ops.penalty_partial_sums(ws, cats, lay.member_table)
    torch.library.opcheck(ops.penalty_partial_sums.default, (ws, cats, lay.member_table))
    wg, dg = [torch.randn_like(w) for w in ws], [torch.randn_like(d) for d in cats]
    torch.library.opcheck(ops.penalty_finish_.default, (ws, cats, wg, [0, 1], dg, [0], 0.25, lay.member_table, sums))


def test_local_layouts_split_cut_width_groups_into_members():
    # 9 rows in groups of 3 on the rank holding rows [5, 9) of a 2-rank split (chunks of 5): a cut group
    # (rows 5) then one whole group (rows 6-8); input columns are untouched
    class Fake:
        members = ((0, 0, 0, 9, 0, 0, 3), (1, 1, 0, 4, 0, 0, 1))

    from catalyst_fused import sharded

    real = sharded._row_range
    sharded._row_range = lambda w, i: [(5, 9), (0, 2)][i]
    try:
        lay = local_layout(Fake, [torch.zeros(9, 2), torch.zeros(3, 4)])
    finally:
        sharded._row_range = real
    assert lay.members == ((0, 0, 0, 1, 0, 1, 1), (0, 0, 1, 3, 0, 2, 3), (1, 1, 0, 4, 0, 0, 1))


def _mlp():
    from torch import nn

    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))


def _fsdp_worker(rank, world):
    import copy
    import warnings

    from catalyst_fused.pruning import distributed

    def pruner_of(m):
        return cf.Pruner(m, torch.zeros(2, 6), gamma=0.1, c0=2.0, ignored_layers=[m[4]])

    ref_model = _mlp()
    model = copy.deepcopy(ref_model)
    ref = pruner_of(ref_model)
    pruner = pruner_of(model)
    distributed.shard(model, pruner, modules=[model[0], model[2], model[4]])
    assert all(type(w).__name__ == "DTensor" for w in pruner.target_set.weights)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    for m, p in ((model, pruner), (ref_model, ref)):  # the same batch on both ranks: FSDP2's mean = the batch's
        torch.nn.functional.cross_entropy(m(x), y).backward()
        p.regularize()
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(a.grad.full_tensor(), b.grad, rtol=1e-5, atol=1e-7), name
    for a, b in zip(pruner.catalysts, ref.catalysts):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert abs(pruner.stats().penalty - ref.stats().penalty) <= 1e-5 * ref.stats().penalty
    for a, b in zip(pruner.scores(), ref.scores()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # physical removal under FSDP2: gather, prune on a full copy, re-shard
    keep = {t.name: list(range(0, t.channels, 2)) for t in pruner.targets}
    fresh = _mlp()
    fresh.load_state_dict(distributed.gathered_state(model))
    fresh_pruner = pruner_of(fresh)
    with torch.no_grad():
        for d, src in zip(fresh_pruner.catalysts, pruner.catalysts):
            d.copy_(src)
    with warnings.catch_warnings():  # no optimizer here: the test builds none
        warnings.simplefilter("ignore", UserWarning)
        fresh_pruner.prune(keep)
        ref.prune(keep)
    ref_model.zero_grad(set_to_none=True)  # prune() narrowed the old gradients into the new parameters
    for d in ref.catalysts:
        d.grad = None
    distributed.shard(fresh, fresh_pruner, modules=[fresh[0], fresh[2], fresh[4]])
    assert fresh[0].weight.shape == ref_model[0].weight.shape == (5, 6)
    assert torch.allclose(fresh(x), ref_model(x), rtol=1e-5, atol=1e-6)
    torch.nn.functional.cross_entropy(fresh(x), y).backward()
    fresh_pruner.regularize()  # the narrower sharded model trains on
    torch.nn.functional.cross_entropy(ref_model(x), y).backward()
    ref.regularize()
    assert torch.allclose(fresh[2].weight.grad.full_tensor(), ref_model[2].weight.grad, rtol=1e-5, atol=1e-7)


def test_the_pruner_under_fsdp2_regularizes_like_the_unsharded_model_and_prunes_by_gather_and_reshard():
    spawn(_fsdp_worker, world=2, timeout=240)
