"""Grouped layouts: groups spanning several tensors, along rows and input columns."""
import pytest
import torch

import catalyst_fused as cf
from catalyst_fused import GroupLayout, Slices

from _helpers import DTYPES, check_against_reference, random_catalysts, run_autograd

BACKENDS = ["reference"] + (["cpp"] if cf.cpp_available() else [])


def conv_bn_conv(dtype=torch.float64):
    # conv1 -> bn1 -> conv2 -> linear: channel i of conv1 is coupled to bn1[i] and conv2[:, i];
    # channel j of conv2 to the linear layer's input column j.
    weights = [
        torch.randn(8, 3, 3, 3),  # 0 conv1
        torch.randn(8),  # 1 bn1 gamma
        torch.randn(8),  # 2 bn1 beta
        torch.randn(6, 8, 3, 3),  # 3 conv2 (rows: its own channels; columns: conv1's channels)
        torch.randn(5, 6),  # 4 linear (columns: conv2's channels)
    ]
    segments = [
        [Slices(0), Slices(1), Slices(2), Slices(3, dim=1)],
        [Slices(3), Slices(4, dim=1)],
    ]
    return [w.to(dtype) for w in weights], GroupLayout.build(weights, segments)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_coupled_groups_across_tensors_and_dims(dtype):
    weights, layout = conv_bn_conv(dtype)
    assert layout.segment_sizes == (8, 6)
    stats = check_against_reference(weights, random_catalysts(weights, layout), layout)
    # Spot-check group 3 of segment 0 by hand.
    w = [x.double() for x in weights]
    n3 = torch.sqrt(w[0][3].square().sum() + w[1][3] ** 2 + w[2][3] ** 2 + w[3][:, 3].square().sum())
    torch.testing.assert_close(stats.norms[3].double(), n3, rtol=2e-5, atol=0)


def test_partial_members_with_offsets_concatenation():
    # A segment made of two producers stacked (as a torch.cat along channels would couple them), and a
    # consumer that reads all 7 channels.
    a, b, consumer = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 7, 5, dtype=torch.float64)
    layout = GroupLayout.build([a, b, consumer], [[Slices(0), Slices(1, offset=3), Slices(2, dim=1)]])
    assert layout.segment_sizes == (7,)
    check_against_reference([a, b, consumer], random_catalysts([a, b, consumer], layout), layout)


def test_sub_range_members_and_uncovered_slices():
    # Only columns 2..5 of the consumer belong to the segment; the others get exactly zero gradient.
    w = torch.randn(4, 3, dtype=torch.float64)
    consumer = torch.randn(3, 8, dtype=torch.float64)
    consumer[:, 0] = float("inf")  # never read: must not leak into anything
    layout = GroupLayout.build([w, consumer], [[Slices(0), Slices(1, dim=1, start=2, count=4)]])
    catalysts = random_catalysts([w, consumer], layout)
    for backend in BACKENDS:
        ws = [w.clone().requires_grad_(True), consumer.clone().requires_grad_(True)]
        ds = [c.clone().requires_grad_(True) for c in catalysts]
        stats = cf.penalty(ws, ds, layout=layout, backend=backend, return_stats=True)
        stats.penalty.backward()
        assert torch.isfinite(stats.penalty)
        assert torch.all(ws[1].grad[:, [0, 1, 6, 7]] == 0), backend
    consumer[:, 0] = 1.0
    check_against_reference([w, consumer], catalysts, layout)


def test_per_row_layout_equals_default():
    weights = [torch.randn(5, 3, 2), torch.randn(4, 7)]
    catalysts = random_catalysts(weights)
    a = cf.penalty(weights, catalysts, return_stats=True)
    b = cf.penalty(weights, catalysts, layout=GroupLayout.per_row(weights), return_stats=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_layout_split_and_init():
    weights, layout = conv_bn_conv(torch.float32)
    catalysts = cf.init_catalysts(weights, c0=1.0, layout=layout)
    assert [d.shape for d in catalysts] == [(8,), (6,)]
    stats = cf.penalty(weights, catalysts, layout=layout, return_stats=True)
    parts = layout.split(stats.ratios)
    assert [p.shape[0] for p in parts] == [8, 6]
    torch.testing.assert_close(stats.ratios, torch.ones_like(stats.ratios))


def test_many_segments_and_members():
    weights, segments = [], []
    for i in range(60):
        c_in = 3 + i % 5
        weights.append(torch.randn(4 + i % 7, c_in, 3, 3, dtype=torch.float64))
    for i in range(60):
        members = [Slices(i)]
        if i + 1 < 60 and weights[i + 1].shape[1] == weights[i].shape[0]:
            members.append(Slices(i + 1, dim=1))
        segments.append(members)
    layout = GroupLayout.build(weights, segments)
    check_against_reference(weights, random_catalysts(weights, layout), layout)


def attention_heads(dtype=torch.float64, heads=3, head_dim=4, d_model=5):
    # Head h = rows [h*hd, (h+1)*hd) of q, k and v + input columns [h*hd, (h+1)*hd) of o_proj: one group
    # per head (width = head_dim); a second segment groups o_proj's output rows with a per-channel gain.
    inner = heads * head_dim
    weights = [
        torch.randn(inner, d_model),  # 0 q_proj
        torch.randn(inner, d_model),  # 1 k_proj
        torch.randn(inner, d_model),  # 2 v_proj
        torch.randn(d_model, inner),  # 3 o_proj
        torch.randn(d_model),  # 4 a gain on o_proj's outputs
    ]
    segments = [
        [Slices(0, width=head_dim), Slices(1, width=head_dim), Slices(2, width=head_dim), Slices(3, dim=1, width=head_dim)],
        [Slices(3), Slices(4)],
    ]
    return [w.to(dtype) for w in weights], GroupLayout.build(weights, segments)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_head_groups(dtype):
    weights, layout = attention_heads(dtype)
    assert layout.segment_sizes == (3, 5)
    assert layout.member_table.shape == (6, 7) and layout.member_table[:, 6].tolist() == [4, 4, 4, 4, 1, 1]
    stats = check_against_reference(weights, random_catalysts(weights, layout), layout)
    w = [x.double() for x in weights]
    n1 = torch.sqrt(sum(w[i][4:8].square().sum() for i in range(3)) + w[3][:, 4:8].square().sum())
    torch.testing.assert_close(stats.norms[1].double(), n1, rtol=2e-5, atol=0)


def test_width_mixed_with_width_one_in_one_segment():
    # Segment 0: rows of a in pairs (width 2, offset 1) + 4 single input columns of b + a 1-D tensor c in
    # triples; groups 0 comes from b and c only. Sub-ranges and offsets on width > 1 members.
    a, b, c = torch.randn(6, 3, 2), torch.randn(5, 4, 3), torch.randn(12)
    weights = [x.double() for x in (a, b, c)]
    layout = GroupLayout.build(
        weights,
        [[Slices(0, start=2, count=4, offset=1, width=2), Slices(1, dim=1), Slices(2, width=3)], [Slices(0, count=2), Slices(1)]],
    )
    assert layout.segment_sizes == (4, 5)
    check_against_reference(weights, random_catalysts(weights, layout), layout)
    w = weights
    n2 = torch.sqrt(w[0][4:6].square().sum() + w[1][:, 2].square().sum() + w[2][6:9].square().sum())
    got = cf.penalty(weights, random_catalysts(weights, layout), layout=layout, return_stats=True, backend="reference")
    torch.testing.assert_close(got.norms[2], n2)


def test_width_one_is_the_default():
    weights, layout = conv_bn_conv(torch.float64)
    same = GroupLayout.build(weights, [[Slices(0, width=1), Slices(1), Slices(2), Slices(3, dim=1, width=1)], [Slices(3), Slices(4, dim=1)]])
    assert torch.equal(layout.member_table, same.member_table)
    assert layout.member_table[:, 6].eq(1).all()


def test_huge_offset_is_rejected_without_allocating():
    with pytest.raises(ValueError, match="group 4 of segment 0 has no slices"):
        GroupLayout([(4, 3)], [[Slices(0), Slices(0, dim=1, offset=10**15)]])
    with pytest.raises(ValueError, match="beyond any catalyst vector"):
        GroupLayout([(4, 3)], [[Slices(0, offset=2**63 - 2)]])


@pytest.mark.parametrize(
    "member, exc, message",
    [
        (Slices(0, width=0), ValueError, "width=0; it must be >= 1"),
        (Slices(0, width=3), ValueError, "takes 4 slices, which is not a multiple of its width 3"),
        (Slices(0, width=2.0), TypeError, r"segments\[0\]\[0\].width must be an integer"),
        (Slices(0, offset=True), TypeError, r"offset must be an integer"),
        (Slices("0"), TypeError, r"tensor must be an integer, got str"),
    ],
)
def test_bad_member_fields(member, exc, message):
    with pytest.raises(exc, match=message):
        GroupLayout([(4, 3)], [[member]])


@pytest.mark.parametrize(
    "segments, message",
    [
        ([[Slices(5)]], r"refers to weights\[5\]"),
        ([[Slices(0, dim=2)]], "only 0 \\(rows\\) and 1"),
        ([[Slices(1, dim=1)]], "along dim 1"),
        ([[Slices(0, start=2, count=5)]], r"takes slices \[2, 7\)"),
        ([[Slices(0), Slices(0)], [Slices(1)]], "more than one member"),
        ([[Slices(0, offset=1)], [Slices(1)]], "group 0 of segment 0 has no slices"),
        ([[Slices(0)]], r"weights\[1\] are not used"),
        ([], "at least one segment"),
        ([[]], r"segments\[0\] has no members"),
    ],
)
def test_bad_layouts(segments, message):
    with pytest.raises(ValueError, match=message):
        GroupLayout([(4, 3), (5,)], segments)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_shape_mismatch_is_reported(backend):
    weights, layout = conv_bn_conv(torch.float32)
    catalysts = random_catalysts(weights, layout)
    smaller = list(weights)
    smaller[3] = torch.randn(6, 7, 3, 3)  # conv2 after pruning one input channel: the layout is stale
    with pytest.raises(ValueError, match=r"weights\[3\] has shape \(6, 7, 3, 3\) but the layout was built for"):
        cf.penalty(smaller, catalysts, layout=layout, backend=backend)
    with pytest.raises(ValueError, match="layout has 2 segments"):
        cf.penalty(weights, catalysts[:1], layout=layout, backend=backend)
    with pytest.raises(ValueError, match=r"catalysts\[1\] has shape \(5,\) but segment 1 has 6 groups"):
        cf.penalty(weights, [catalysts[0], torch.ones(5)], layout=layout, backend=backend)


# ---- Group-mode layouts on the streaming kernels (issue 15) ----------------------------------------------
# csrc/cpu/penalty_cpu.cpp: blocks of about CHUNK elements, at least MIN_COLUMN_ROWS rows when the tensor has
# column groups; calls above PARALLEL elements run on several threads.
CHUNK = 1 << 15
MIN_COLUMN_ROWS = 16
PARALLEL = 4 * CHUNK


def chain(shapes, dtype=torch.float32, bn=True, classifier=None, widths=None):
    """Group mode on a conv/linear chain: group i of segment k = row i of weights[k] (+ BN scale and shift)
    + input column i of the next layer; an optional classifier whose rows are not pruned (only its input
    columns belong to the last segment)."""
    weights, segments = [], []
    index = []
    for k, shape in enumerate(shapes):
        index.append(len(weights))
        weights.append(torch.randn(shape, dtype=torch.float64).to(dtype))
        if bn:
            weights.append(torch.randn(shape[0], dtype=torch.float64).to(dtype))
            weights.append(torch.randn(shape[0], dtype=torch.float64).to(dtype))
    if classifier is not None:
        index.append(len(weights))
        weights.append(torch.randn(classifier, dtype=torch.float64).to(dtype))
    for k, shape in enumerate(shapes):
        t = index[k]
        width = 1 if widths is None else widths[k]
        members = [Slices(t, width=width)]
        if bn:
            members += [Slices(t + 1, width=width), Slices(t + 2, width=width)]
        if k + 1 < len(index):
            members.append(Slices(index[k + 1], dim=1, width=width))
        segments.append(members)
    return weights, GroupLayout.build(weights, segments)


GROUP_CASES = {
    # rows and columns of 3x3 convs, BN entries between them
    "convs": dict(shapes=[(24, 3, 3, 3), (40, 24, 3, 3), (16, 40, 1, 1)], classifier=(10, 16)),
    # column tensors with rows around the 16-row minimum (L = 4096: 8 rows would make a chunk)
    "rows_around_min_block": dict(shapes=[(15, 7), (16, 15, 16, 16), (17, 16, 16, 16), (33, 17, 16, 16)], bn=False),
    # short rows: blocks of ceil(CHUNK / 9) = 3641 rows (3642 rows: two blocks) and ceil(CHUNK / 18) = 1821
    "rows_around_chunk": dict(shapes=[(3, 1, 3, 3), (3642, 3, 3, 1), (2, 3642, 1, 1), (3641, 2, 3, 3)], bn=False),
    # wide linear columns (inner = 1, 3000 columns) and narrow ones
    "wide_and_narrow_columns": dict(shapes=[(3000, 7), (20, 3000), (2, 20, 3, 3)], classifier=(5, 2)),
    # width > 1 on every member (heads of 4 channels)
    "heads": dict(shapes=[(24, 5), (12, 24), (8, 12, 3, 3)], widths=[4, 2, 4], classifier=(3, 8)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GROUP_CASES), ids=list(GROUP_CASES))
def test_group_mode_layouts(case, dtype):
    weights, layout = chain(dtype=dtype, **GROUP_CASES[case])
    check_against_reference(weights, random_catalysts(weights, layout), layout)


def test_group_mode_many_segments_parallel_and_thread_invariant():
    # A model-sized group layout above the parallel threshold: results bitwise equal for 1 and 2 threads, for
    # the statistics and every gradient, through autograd and in place.
    shapes = [(64, 3, 3, 3)] + [(64 + 16 * (k % 3), 64 + 16 * ((k - 1) % 3), 3, 3) for k in range(1, 9)] + [(48, 96, 1, 1)]
    weights, layout = chain(shapes, classifier=(10, 48))
    assert sum(w.numel() for w in weights) > PARALLEL
    catalysts = random_catalysts(weights, layout)
    check_against_reference(weights, catalysts, layout)

    def run():
        ws = [w.clone().requires_grad_(True) for w in weights]
        ds = [d.clone().requires_grad_(True) for d in catalysts]
        stats = cf.penalty(ws, ds, layout=layout, return_stats=True)
        (0.7 * stats.penalty).backward()
        wi = [torch.nn.Parameter(w.clone()) for w in weights]
        di = [torch.nn.Parameter(d.clone()) for d in catalysts]
        for p in wi + di:
            p.grad = torch.ones_like(p)
        inplace = cf.penalty_(wi, di, scale=0.3, layout=layout)
        return [*stats, *[p.grad for p in ws + ds], *inplace, *[p.grad for p in wi + di]]

    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uncovered_rows_with_covered_columns(backend):
    # A classifier whose rows are not pruned but whose input columns are (partly): its rows get only the
    # column factors; elements in neither a row nor a column group get an exact 0, even if Inf or NaN.
    conv = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    fc = torch.randn(4, 10, 2, dtype=torch.float64)  # inner = 2
    fc[:, 0] = float("nan")  # columns 0, 7..9 belong to no group
    fc[:, 8] = float("inf")
    layout = GroupLayout.build([conv, fc], [[Slices(0), Slices(1, dim=1, start=1, count=6)]])
    catalysts = random_catalysts([conv, fc], layout)
    stats, (gc, gf), _ = run_autograd([conv, fc], catalysts, layout, backend=backend)
    assert torch.isfinite(stats.penalty)
    assert torch.all(gf[:, [0, 7, 8, 9]] == 0)
    n = torch.sqrt(conv.reshape(6, -1).square().sum(1) + fc[:, 1:7].square().sum((0, 2)))
    expected = torch.zeros_like(fc)
    expected[:, 1:7] = (catalysts[0].abs() / n).view(1, 6, 1) * fc[:, 1:7]
    torch.testing.assert_close(gf, expected)
    # in place: uncovered elements keep their gradient untouched
    ws = [torch.nn.Parameter(conv.clone()), torch.nn.Parameter(fc.clone())]
    ds = [torch.nn.Parameter(catalysts[0].clone())]
    for p in ws + ds:
        p.grad = torch.full_like(p, 2.0)
    cf.penalty_(ws, ds, scale=0.5, layout=layout, backend=backend)
    torch.testing.assert_close(ws[1].grad, 2.0 + 0.5 * expected)


def test_partial_rows_and_columns_of_one_tensor():
    # One tensor whose rows are split over two segments and whose columns are partly covered by a third;
    # some rows and columns belong to nothing.
    w = torch.randn(40, 30, 3, dtype=torch.float64)
    other = torch.randn(30, 4, dtype=torch.float64)
    layout = GroupLayout.build(
        [w, other],
        [
            [Slices(0, start=0, count=12, width=3)],  # 4 groups of 3 rows
            [Slices(0, start=20, count=15), Slices(1, dim=1, start=0, count=4, offset=3)],  # rows 12..19, 35.. free
            [Slices(0, dim=1, start=5, count=20), Slices(1, start=10, count=20)],  # columns 0..4, 25.. free
        ],
    )
    assert layout.segment_sizes == (4, 15, 20)
    check_against_reference([w, other], random_catalysts([w, other], layout), layout)


@pytest.mark.skipif(not cf.cpp_available(), reason="C++ extension not built")
def test_two_members_on_one_slice_are_rejected_by_the_operators():
    w = [torch.randn(4, 3), torch.randn(5, 4)]
    d = [torch.ones(4), torch.ones(2)]
    plan = torch.tensor([[0, 0, 0, 4, 0, 0, 1], [1, 1, 0, 4, 0, 0, 1], [1, 1, 2, 2, 1, 0, 1]])
    with pytest.raises(ValueError, match=r"plan member 2 takes input column 2 of weights\[1\], which an earlier member"):
        torch.ops.catalyst_fused.penalty_forward(w, d, plan)
