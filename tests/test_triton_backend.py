"""The Triton kernels against the fp64 reference. Without a GPU they run under TRITON_INTERPRET=1 (set in
conftest.py) on CPU tensors, about 10^4 times slower than on a GPU, so shapes are small. Most tests run
twice: with the default tile sizes and with tiny tiles (32 elements, `small_tiles`), which cut rows into
pieces and columns into several row tiles, so that every group goes through the slot-and-counter path
of backends/tables.py, and block steps end in masked tails."""
import struct

import pytest
import torch

import catalyst_fused as cf
from catalyst_fused import GroupLayout, Slices
from catalyst_fused.backends import tables, triton_ops

from _helpers import DTYPES, GRAD_TOL, STAT_TOL, assert_close, check_against_reference, random_catalysts

def _interpreter_problem():
    if not cf.triton_available(torch.device("cpu")):
        return triton_ops.unavailable_reason(torch.device("cpu"))
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
        # Its interpreter cannot use loop bounds loaded from memory (fixed in 3.7); the GPU does not use
        # the interpreter, and scripts/aot_compile_triton.py compiles the kernels with this version.
        return f"the Triton {triton.__version__} interpreter cannot run these kernels (needs 3.7)"
    return ""


pytestmark = pytest.mark.skipif(bool(_interpreter_problem()), reason=_interpreter_problem() or "n/a")
ops = torch.ops.catalyst_fused
SMALL_TILE = 32


@pytest.fixture(autouse=True)
def _fresh_tables():
    from catalyst_fused.backends import triton_penalty

    triton_penalty._ENTRIES.clear()
    yield
    triton_penalty._ENTRIES.clear()


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    if request.param == "small_tiles":
        monkeypatch.setattr(tables, "TILE_MIN", SMALL_TILE)
        monkeypatch.setattr(tables, "TILE_MAX", SMALL_TILE)
    return request.param


def randn(*shapes, dtype=torch.float32):
    return [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]


# Row lengths around the kernels' block shapes ([1024, 1], [64, 16], [8, 128]) and the row pieces of the
# smallest tile (1024 elements: rows longer than 128 elements are cut into pieces of 128).
SHAPES = {
    "conv_and_linear": [(3, 2, 3, 3), (4, 3)],
    "row_lengths": [(5,), (3, 2), (2, 16), (2, 17), (2, 128), (1, 129), (1, 1023), (1, 1025)],
    "bn_and_1x1": [(5,), (3, 5, 1, 1)],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference(shapes, dtype):
    weights = randn(*shapes, dtype=dtype)
    check_against_reference(weights, random_catalysts(weights, dtype=dtype), backend="triton")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_small_tiles_rows(dtype, monkeypatch):
    monkeypatch.setattr(tables, "TILE_MIN", SMALL_TILE)
    monkeypatch.setattr(tables, "TILE_MAX", SMALL_TILE)
    # Tiles of 32 elements, rows cut into pieces of 4: 70 BN entries in 3 tiles, rows of 40, 33, 18 and
    # 7 elements in 10, 9, 5 and 2 pieces.
    weights = randn((70,), (3, 40), (5, 33), (2, 2, 3, 3), (9, 7), dtype=dtype)
    check_against_reference(weights, random_catalysts(weights, dtype=dtype), backend="triton", grad_scale=-1.5)


def test_many_tensors_one_launch():
    weights = [torch.randn(1 + i % 3, 1 + i % 4) for i in range(40)]
    check_against_reference(weights, random_catalysts(weights), backend="triton", grad_scale=-1.5)


def layout_cases():
    """(name, weights, segments) for every layout kind the kernels distinguish."""
    yield "rows_bn_columns", randn((8, 3, 3, 3), (8,), (8,), (6, 8, 3, 3), (5, 6)), [
        [Slices(0), Slices(1), Slices(2), Slices(3, dim=1)],
        [Slices(3), Slices(4, dim=1)],
    ]
    yield "offsets_concatenation", randn((3, 4), (4, 2), (2, 7, 5)), [[Slices(0), Slices(1, offset=3), Slices(2, dim=1)]]
    yield "partial_members", randn((3, 2, 2), (3,), (2, 3, 2), (2, 4), (4, 5)), [
        [Slices(0), Slices(1), Slices(2, dim=1)],
        [Slices(2), Slices(3, offset=0, count=2, start=0, dim=0)],
        [Slices(3, dim=1, start=0, count=4), Slices(4, dim=1, start=1, count=4)],
    ]
    # attention heads: 3 heads of 2 rows of q, k, v, and 2 input columns each of the output projection
    yield "width_heads", randn((6, 5), (6, 5), (6, 5), (5, 6)), [
        [Slices(0, width=2), Slices(1, width=2), Slices(2, width=2), Slices(3, dim=1, width=2)]
    ]
    # input columns longer than the 128-element column range (K = 130): every column is cut in two
    yield "long_columns", randn((2, 3), (3, 2, 130)), [[Slices(0), Slices(1, dim=1)], [Slices(1)]]
    # wide and narrow consumers: 1x1 columns, 3x3 columns, a [N, 1] column
    yield "wide_and_narrow_columns", randn((5, 4), (3, 5, 1, 1), (2, 5, 3, 3), (7, 1)), [
        [Slices(0), Slices(1, dim=1), Slices(2, dim=1)],
        [Slices(1), Slices(3, dim=1, count=1)],
        [Slices(2), Slices(3, count=2)],
        [Slices(3, start=2)],
    ]
    # rows and columns of one square weight in the same groups
    yield "rows_and_columns_same_group", randn((4, 4)), [[Slices(0), Slices(0, dim=1)]]


LAYOUTS = {name: (weights, segments) for name, weights, segments in layout_cases()}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_match_reference(name, tiles):
    weights, segments = LAYOUTS[name]
    layout = GroupLayout.build(weights, segments)
    check_against_reference(weights, random_catalysts(weights, layout), layout, backend="triton", grad_scale=0.75)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_layout_dtypes(dtype):
    weights, segments = LAYOUTS["rows_bn_columns"]
    layout = GroupLayout.build(weights, segments)
    weights = [w.to(dtype) for w in weights]
    check_against_reference(weights, random_catalysts(weights, layout, dtype=dtype), layout, backend="triton")


def test_uncovered_slices_get_zero_gradient(tiles):
    w = torch.randn(4, 3, dtype=torch.float64)
    consumer = torch.randn(3, 8, dtype=torch.float64)
    consumer[:, 0] = float("inf")  # never read: must not leak into anything
    layout = GroupLayout.build([w, consumer], [[Slices(0), Slices(1, dim=1, start=2, count=4)]])
    ws = [w.clone().requires_grad_(True), consumer.clone().requires_grad_(True)]
    ds = [d.requires_grad_(True) for d in random_catalysts(ws, layout)]
    stats = cf.penalty(ws, ds, layout=layout, backend="triton", return_stats=True)
    stats.penalty.backward()
    assert torch.isfinite(stats.penalty)
    assert torch.all(ws[1].grad[:, [0, 1, 6, 7]] == 0)


def test_empty_tensors_and_empty_groups(tiles):
    # A weight without rows (no groups), one with rows of no elements (groups with n = 0), a normal one.
    weights = [torch.randn(0, 3, dtype=torch.float64), torch.randn(3, 0, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)]
    catalysts = random_catalysts(weights)
    stats = check_against_reference(weights, catalysts, backend="triton")
    assert torch.equal(stats.norms[:3], torch.zeros(3, dtype=torch.float64)) and torch.isinf(stats.ratios[:3]).all()
    only_empty = [torch.randn(0, 4)]
    stats = cf.penalty(only_empty, [torch.ones(0)], backend="triton", return_stats=True)
    assert stats.penalty.item() == 0 and stats.norms.shape == (0,)


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


def _inplace(weights, catalysts, layout, scale, dtype):
    ws = [torch.nn.Parameter(w.clone()) for w in weights]
    ds = [torch.nn.Parameter(d.clone()) for d in catalysts]
    prior = [torch.randn_like(p) for p in ws + ds]
    for p, g in zip(ws + ds, prior):
        p.grad = g.clone()
    stats = cf.penalty_(ws, ds, scale=scale, layout=layout, backend="triton")
    rw = [torch.nn.Parameter(w.double()) for w in weights]
    rd = [torch.nn.Parameter(d.double()) for d in catalysts]
    ref = cf.penalty(rw, rd, layout=layout, backend="reference", return_stats=True)
    ref.penalty.backward()
    return stats, ref, [(p.grad, g0.double() + scale * r.grad) for p, g0, r in zip(ws + ds, prior, rw + rd)], prior


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("grouped", [False, True], ids=["rows", "grouped"])
def test_inplace_matches_reference(dtype, grouped, tiles):
    if grouped:
        weights, segments = LAYOUTS["rows_bn_columns"]
        weights, layout = [w.to(dtype) for w in weights], GroupLayout.build(weights, segments)
    else:
        weights, layout = randn((3, 4, 2), (5, 3), (7,), dtype=dtype), None
    stats, ref, grads, prior = _inplace(weights, random_catalysts(weights, layout, dtype=dtype), layout, 0.5, dtype)
    assert_close(stats.penalty, ref.penalty, STAT_TOL[dtype], "penalty")
    assert_close(stats.norms, ref.norms, STAT_TOL[dtype], "norms")
    rtol, atol = GRAD_TOL[dtype]
    for i, ((got, expected), g0) in enumerate(zip(grads, prior)):
        assert_close(got, expected, (rtol, atol + 2 * rtol * g0.double().abs().max().item()), f"grad {i}")


def test_fp64_scale_reaches_the_kernel_exactly():
    # Compiled Triton types a Python float argument as fp32 (0.37 would be off by ~3e-8 relative); the
    # kernels take the float64's bits as an int64 and bitcast them back. The interpreter keeps Python
    # floats in fp64, so this checks the bit transport (encode, int64 argument, bitcast); the compiled
    # path is checked by test_cuda_backend.py::test_fp64_inplace_scale on a GPU.
    from catalyst_fused.backends import triton_penalty

    bits = triton_penalty._scale_bits(0.37)
    assert isinstance(bits, int) and struct.unpack("<d", struct.pack("<q", bits))[0] == 0.37
    assert "scale_bits" in triton_penalty._norm_kernel.arg_names and "scale_bits" in triton_penalty._grad_kernel.arg_names
    weights = randn((3, 4, 2), (5, 3), dtype=torch.float64)
    stats, ref, grads, _ = _inplace(weights, random_catalysts(weights), None, 0.37, torch.float64)
    for got, expected in grads:
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-15)


def test_deterministic(tiles):
    weights, segments = LAYOUTS["rows_bn_columns"]
    layout = GroupLayout.build(weights, segments)
    catalysts = random_catalysts(weights, layout)
    runs = []
    for _ in range(2):
        ws = [w.clone().requires_grad_(True) for w in weights]
        ds = [d.clone().requires_grad_(True) for d in catalysts]
        stats = cf.penalty(ws, ds, layout=layout, backend="triton", return_stats=True)
        stats.penalty.backward()
        runs.append([stats.penalty, stats.norms, stats.ratios] + [t.grad for t in ws + ds])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops the host code issues (kernel launches excluded)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# Ops that allocate or make views: no kernel, no copy.
_NO_KERNEL = {"aten.empty.memory_format", "aten.empty_like.default", "aten.view.default", "aten._unsafe_view.default", "aten.reshape.default"}


@pytest.mark.parametrize("grouped", [False, True], ids=["rows", "grouped"])
def test_launch_counts_and_no_hidden_work(grouped, monkeypatch):
    from catalyst_fused.backends import triton_penalty

    if grouped:
        weights, segments = LAYOUTS["rows_bn_columns"]
        layout = GroupLayout.build(weights, segments)
        plan = layout.member_table
    else:
        weights, layout, plan = randn((4, 3, 3), (6, 5), (7,)), None, None
    catalysts = random_catalysts(weights, layout)
    grads = [torch.zeros_like(t) for t in weights + catalysts]
    k = len(weights)
    launch = triton_penalty._launch
    recorder = _RecordOps()

    def counted(*args, **kwargs):  # the interpreter's own tensor handling is not host work of ours
        with torch.utils._python_dispatch._disable_current_modes():
            launch(*args, **kwargs)

    monkeypatch.setattr(triton_penalty, "_launch", counted)

    def launches(fn, fresh_outputs=False):
        fn()  # first call: builds and uploads the tables
        before, uploads = triton_penalty.LAUNCHES, triton_penalty.POINTER_UPLOADS
        recorder.ops.clear()
        with recorder:
            fn()
        uploads = triton_penalty.POINTER_UPLOADS - uploads
        assert recorder.ops, "the recorder saw nothing: it would miss hidden work too"
        # The backward writes into new gradient tensors: if the allocator hands out other addresses than
        # last time (always on the CPU, rarely with the CUDA caching allocator), their pointers are copied.
        assert uploads == 0 or (fresh_outputs and uploads == 1)
        unexpected = set(recorder.ops) - _NO_KERNEL - ({"aten.lift_fresh.default"} if uploads else set())
        assert not unexpected, f"host code issued {unexpected}"
        return triton_penalty.LAUNCHES - before

    # The host functions behind the operators (a dispatch mode sees an operator as one op).
    _, norms, _ = triton_penalty.penalty_forward(weights, catalysts, plan)
    grad = torch.ones((), dtype=norms.dtype)
    assert launches(lambda: triton_penalty.penalty_forward(weights, catalysts, plan)) == 1
    assert launches(lambda: triton_penalty.penalty_backward(grad, weights, catalysts, norms, plan), fresh_outputs=True) == 1
    assert launches(lambda: triton_penalty.penalty_accumulate_(weights, catalysts, grads[:k], grads[k:], 0.5, plan)) == 2


def test_opcheck():
    weights = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 5, dtype=torch.float64, requires_grad=True)]
    catalysts = [d.requires_grad_(True) for d in random_catalysts(weights)]
    torch.library.opcheck(ops.triton_penalty_forward.default, (weights, catalysts, None),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    plain = [w.detach() for w in weights]
    plain_d = [d.detach() for d in catalysts]
    _, norms, _ = ops.triton_penalty_forward(plain, plain_d, None)
    torch.library.opcheck(ops.triton_penalty_backward.default, (torch.tensor(1.5, dtype=torch.float64), plain, plain_d, norms, None),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.triton_penalty_accumulate_.default,
                          (plain, plain_d, [torch.randn_like(w) for w in plain], [torch.randn_like(d) for d in plain_d], 0.25, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match=r"catalysts\[0\] has 3 entries but weights\[0\] has 2 channels"):
        cf.penalty([torch.randn(2, 3)], [torch.ones(3)], backend="triton")
    with pytest.raises(TypeError, match=r"weights\[1\] has dtype torch.float64"):
        cf.penalty([torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)], [torch.ones(2), torch.ones(2)], backend="triton")
    w, d = [torch.randn(2, 3)], [torch.ones(2)]
    with pytest.raises(ValueError, match=r"norms must be the contiguous torch.float32 \[2\] tensor"):
        ops.triton_penalty_backward(torch.ones(()), w, d, torch.ones(3), None)
    with pytest.raises(ValueError, match=r"grad_penalty must have one element"):
        ops.triton_penalty_backward(torch.ones(2), w, d, torch.ones(2), None)
    with pytest.raises(ValueError, match=r"catalysts\[0\] has 3 entries"):
        ops.triton_penalty_backward(torch.ones(()), w, [torch.ones(3)], torch.ones(3), None)
    overlapping = torch.tensor([[0, 0, 0, 2, 0, 0, 1], [0, 0, 1, 1, 0, 0, 1]])
    with pytest.raises(ValueError, match=r"slice 1 of weights\[0\] along dim 0 is used by more than one plan member"):
        ops.triton_penalty_forward(w, d, overlapping)
    with pytest.raises(ValueError, match=r"width 2; it must be >= 1 and divide its slice count 3"):
        ops.triton_penalty_forward([torch.randn(3, 3)], [torch.ones(2)], torch.tensor([[0, 0, 0, 3, 0, 0, 2]]))


def test_interpreter_never_claims_cuda():
    # Under TRITON_INTERPRET=1 the kernels would read device addresses as host memory: CUDA tensors must
    # be refused with the reason (a GPU run sets TRITON_INTERPRET=0).
    assert not cf.triton_available(torch.device("cuda"))
    assert "TRITON_INTERPRET=1" in triton_ops.unavailable_reason(torch.device("cuda"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cf.resolve_backend("triton", torch.device("cuda"))


def test_cuda_graph_capture_is_refused(monkeypatch):
    from catalyst_fused.backends import triton_penalty

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        triton_penalty._check_capture(torch.device("cuda", 0))
    triton_penalty._check_capture(torch.device("cpu"))  # CPU tensors are never captured
    assert torch.Tag.cudagraph_unsafe in ops.triton_penalty_forward.default.tags


def test_launches_run_under_the_tensors_device(monkeypatch):
    # Triton launches on the current device: every launch must happen inside the tensors' device context
    # (torch.cuda.device(tensor.device) for CUDA tensors, as the C++ path's CUDAGuard).
    from catalyst_fused.backends import triton_penalty

    context = triton_penalty._context(torch.device("cuda", 1))
    assert isinstance(context, torch.cuda.device) and context.idx == 1
    active, launched = [], []

    class Recording:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            active.append(self.device)

        def __exit__(self, *exc):
            active.pop()

    launch = triton_penalty._launch

    def checked(*args, **kwargs):
        launched.append(list(active))
        launch(*args, **kwargs)

    monkeypatch.setattr(triton_penalty, "_context", Recording)
    monkeypatch.setattr(triton_penalty, "_launch", checked)
    weights = randn((3, 4), (2, 5))
    catalysts = random_catalysts(weights)
    check_against_reference(weights, catalysts, backend="triton")
    cf.penalty_([torch.nn.Parameter(w) for w in weights], [torch.nn.Parameter(d) for d in catalysts], backend="triton")
    assert len(launched) == 4 and all(devices == [torch.device("cpu")] for devices in launched), launched


def test_tables_per_row_layout_is_direct():
    info = tables.build_table([(2, 3), (4,)], [2, 4], None)
    words = info.words.tolist()
    assert info.num_tiles == 2 and info.num_groups == 6 and info.num_slots == 0
    tiles = words[info.offsets["tiles"] :][: 2 * tables.TILE_FIELDS]
    assert tiles[:7] == [0, 0, 2, 0, 3, 0, 0] and tiles[8:15] == [1, 0, 4, 0, 1, 0, 0]
    assert words[info.offsets["lookup_group"] :][:6] == [0, 1, 2, 3, 4, 5]
    assert words[info.offsets["lookup_slot"] :][:6] == [-1] * 6


def test_tables_grouped_slots(monkeypatch):
    monkeypatch.setattr(tables, "TILE_MIN", 16)
    monkeypatch.setattr(tables, "TILE_MAX", 16)
    # conv [2, 3, 2] rows + next [4, 2] columns. Tiles of 16 elements cut rows into pieces of 16 / 8 = 2
    # elements: each conv row gives 3 contributions; each column of the [4, 2] weight one (its 4 rows fit
    # in one tile): 4 slots per group.
    plan = GroupLayout([(2, 3, 2), (4, 2)], [[Slices(0), Slices(1, dim=1)]]).member_table
    info = tables.build_table([(2, 3, 2), (4, 2)], [2], plan)
    assert info.num_tiles == 3 + 1 and info.num_slots == 8
    w = info.words.tolist()
    assert w[info.offsets["slot_begin"] :][:3] == [0, 4, 8]
    lookup = w[info.offsets["lookup_slot"] :]
    # rows of weight 0 at 0..1, rows of weight 1 at 2..5 (no group), columns of weight 1 at 6..7
    assert lookup[:8] == [0, 4, -1, -1, -1, -1, 3, 7]
