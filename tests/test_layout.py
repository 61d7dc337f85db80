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
