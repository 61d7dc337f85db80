"""Grouped layouts: groups spanning several tensors, along rows and input columns."""
import pytest
import torch

import catalyst_fused as cf
from catalyst_fused import GroupLayout, Slices

from _helpers import DTYPES, check_against_reference, random_catalysts

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
