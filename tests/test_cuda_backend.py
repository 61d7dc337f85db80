"""GPU backends: the CUDA C++ operators and the Triton kernels.

* Everywhere: the CUDA kernels are built when torch has CUDA and nvcc is present, and the tile table the
  CUDA host code builds (csrc/cuda/tiles.h, through catalyst_fused::_gpu_tile_table) is word for word the
  one the Triton kernels use (backends/tables.py), which the interpreter tests run against the reference.
* On a GPU (skipped elsewhere; scripts/gpu_check.sh runs them with TRITON_INTERPRET=0, one process per
  backend): both backends against the fp64 reference on every layout kind, in-place, determinism, launch
  counts, no host sync and no host-to-device copy in steady state, streams, CUDA graphs, torch.compile.
"""
import os

import pytest
import torch

import catalyst_fused as cf
from catalyst_fused import GroupLayout, Slices
from catalyst_fused.backends import tables, triton_ops

from _helpers import DTYPES, GRAD_TOL, STAT_TOL, assert_close, check_against_reference, cuda_toolkit_root, random_catalysts

ops = torch.ops.catalyst_fused
HAS_TABLE_OP = cf.cpp_available() and hasattr(ops, "_gpu_tile_table")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
# GPU_BACKENDS=cpp or =triton runs one backend per process (a crash in one cannot hide the other).
GPU_BACKENDS = [b for b in os.environ.get("GPU_BACKENDS", "cpp,triton").split(",") if b]


def _skip_unless_runs(backend):
    if backend == "cpp" and not cf.cuda_kernels_built():
        pytest.skip("the extension was built without its CUDA kernels")
    if backend == "triton" and not cf.triton_available(torch.device("cuda")):
        pytest.skip(f"Triton cannot run on CUDA tensors here: {triton_ops.unavailable_reason(torch.device('cuda'))}")


def test_cuda_kernels_are_built_when_torch_has_cuda():
    # CI installs the CUDA build of torch and has nvcc: the CUDA operators must be compiled and linked
    # there even though no GPU can run them.
    if torch.version.cuda is None or cuda_toolkit_root() is None or os.environ.get("CATALYST_FUSED_CUDA") == "0":
        pytest.skip("torch without CUDA, or no CUDA toolkit: the CUDA kernels are not built here")
    assert cf.cuda_kernels_built()
    assert HAS_TABLE_OP


# ----------------------------------------------------------------------------------------------------
# Weight sets and layouts
# ----------------------------------------------------------------------------------------------------


def chain_layout(shapes):
    """Group mode over a chain conv_0 -> bn_0 -> conv_1 -> ...: group i of segment k is row i of conv_k,
    BN scale and shift i, and input column i of conv_{k+1}. `shapes` are the conv shapes; returns
    (shapes with the BN vectors inserted, segments)."""
    all_shapes, segments, index = [], [], {}
    for k, shape in enumerate(shapes):
        index[k] = len(all_shapes)
        all_shapes += [shape, (shape[0],), (shape[0],)]
    for k, shape in enumerate(shapes):
        conv = index[k]
        members = [Slices(conv), Slices(conv + 1), Slices(conv + 2)]
        if k + 1 < len(shapes):
            members.append(Slices(index[k + 1], dim=1))
        segments.append(members)
    return all_shapes, segments


VGG19_CONVS = [(64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3), (128, 128, 3, 3), (256, 128, 3, 3)] + [(256, 256, 3, 3)] * 3 + \
    [(512, 256, 3, 3)] + [(512, 512, 3, 3)] * 7 + [(512, 512), (100, 512)]  # fmt: skip
RESNET56_CONVS = [(16, 3, 3, 3)] + [(16, 16, 3, 3)] * 18 + [(32, 16, 3, 3)] + [(32, 32, 3, 3)] * 17 + [(64, 32, 3, 3)] + \
    [(64, 64, 3, 3)] * 17  # fmt: skip
MLP = [(3072, 768), (768, 3072)] * 2


def table_cases():
    """(name, shapes, segment sizes, member table or None)."""
    yield "resnet56_rows", RESNET56_CONVS, [s[0] for s in RESNET56_CONVS], None
    yield "vgg19_rows", VGG19_CONVS, [s[0] for s in VGG19_CONVS], None
    yield "mlp_rows", MLP, [s[0] for s in MLP], None
    shapes = [(1 + i % 17, 1 + (i * 7) % 23, 3) for i in range(320)]
    yield "320_tensors", shapes, [s[0] for s in shapes], None
    shapes = [(0, 3), (3, 0), (5,), (2, 40000), (1, 70000), (70000,), (3, 5000)]
    yield "empty_long_and_narrow", shapes, [s[0] for s in shapes], None
    for name, conv_shapes in (("vgg19_group", VGG19_CONVS[:-2]), ("resnet56_group", RESNET56_CONVS), ("mlp_group", MLP)):
        shapes, segments = chain_layout(conv_shapes)
        layout = GroupLayout(shapes, segments)
        yield name, shapes, list(layout.segment_sizes), layout.member_table
    from test_triton_backend import LAYOUTS  # every layout kind of the interpreter tests

    for name, (weights, segments) in LAYOUTS.items():
        layout = GroupLayout.build(weights, segments)
        yield name, [tuple(w.shape) for w in weights], list(layout.segment_sizes), layout.member_table
    shapes, segments = [(6, 300), (2, 6, 300)], [[Slices(0), Slices(1, dim=1, width=2)], [Slices(1)]]
    layout = GroupLayout(shapes, segments)  # long columns (K = 300 > 128) with width 2
    yield "long_columns_width", shapes, list(layout.segment_sizes), layout.member_table


TABLE_CASES = {name: rest for name, *rest in table_cases()}


@pytest.mark.skipif(not HAS_TABLE_OP, reason="the extension was built without its CUDA part")
@pytest.mark.parametrize("name", list(TABLE_CASES))
def test_cuda_host_builds_the_triton_table(name):
    shapes, sizes, plan = TABLE_CASES[name]
    weights = [torch.empty(s, device="meta") for s in shapes]
    catalysts = [torch.empty(n, device="meta") for n in sizes]
    cpp = ops._gpu_tile_table(weights, catalysts, plan)
    python = tables.build_table(shapes, sizes, plan)
    assert cpp.dtype == torch.int64 and cpp.device.type == "cpu"
    assert torch.equal(cpp, python.words)
    assert python.num_tiles > 0


@pytest.mark.skipif(not HAS_TABLE_OP, reason="the extension was built without its CUDA part")
@pytest.mark.parametrize(
    "plan, message",
    [
        ([[0, 0, 0, 2, 0, 0, 1], [0, 0, 1, 1, 0, 0, 1]], r"slice 1 of weights\[0\] along dim 0 is used by more than one plan member"),
        ([[0, 0, 0, 3, 0, 0, 2]], r"has width 2; it must be >= 1 and divide its slice count 3"),
        ([[0, 1, 0, 3, 0, 0, 1]], r"plan member 0 takes slices \[0, 3\) of weights\[0\] along dim 1"),
        ([[0, 0, 0, 3, 1, 0, 1]], r"plan member 0 maps outside catalysts\[1\]"),
    ],
)
def test_table_builders_reject_the_same_plans(plan, message):
    shapes, sizes = [(3, 2)], [3]
    plan = torch.tensor(plan, dtype=torch.int64)
    with pytest.raises(ValueError, match=message):
        tables.build_table(shapes, sizes, plan)
    with pytest.raises(ValueError, match=message):
        ops._gpu_tile_table([torch.empty(3, 2, device="meta")], [torch.empty(3, device="meta")], plan)


# ----------------------------------------------------------------------------------------------------
# On a GPU
# ----------------------------------------------------------------------------------------------------


def _weights(shapes, dtype, device="cuda"):
    return [torch.randn(s, dtype=torch.float64, device=device).to(dtype) for s in shapes]


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, dtype):
    _skip_unless_runs(backend)
    # Row lengths around the team sizes (1..32, 256), the 16-byte packs, the Triton block shapes and the
    # row pieces of the default tile; BN vectors; a 1x1 conv; a long row cut into pieces.
    shapes = [(16, 3, 3, 3), (64, 64, 3, 3), (10, 64), (33,), (4, 16385), (2, 255), (2, 256), (2, 257), (512, 1, 3, 3),
              (3, 1023), (3, 1025), (7, 31), (5, 33), (256, 64, 1, 1), (2, 70001)]  # fmt: skip
    weights = _weights(shapes, dtype)
    check_against_reference(weights, random_catalysts(weights, dtype=dtype), backend=backend)


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["rows_bn_columns", "offsets_concatenation", "partial_members", "width_heads",
                                  "long_columns", "wide_and_narrow_columns", "rows_and_columns_same_group"])  # fmt: skip
def test_layouts_match_reference(backend, name):
    _skip_unless_runs(backend)
    from test_triton_backend import LAYOUTS

    weights, segments = LAYOUTS[name]
    weights = [w.cuda() for w in weights]
    layout = GroupLayout.build(weights, segments)
    check_against_reference(weights, random_catalysts(weights, layout), layout, backend=backend, grad_scale=0.75)


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", ["vgg19", "resnet56", "mlp"])
def test_group_mode_models_match_reference(backend, dtype, model):
    _skip_unless_runs(backend)
    convs = {"vgg19": VGG19_CONVS[:-2], "resnet56": RESNET56_CONVS, "mlp": MLP}[model]
    shapes, segments = chain_layout(convs)
    weights = _weights(shapes, dtype)
    layout = GroupLayout.build(weights, segments)
    check_against_reference(weights, random_catalysts(weights, layout, dtype=dtype), layout, backend=backend)


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_hundreds_of_tensors_and_empty_ones(backend):
    _skip_unless_runs(backend)
    weights = _weights([(1 + i % 17, 1 + (i * 7) % 23, 3) for i in range(320)], torch.float32)
    check_against_reference(weights, random_catalysts(weights), backend=backend)
    weights = _weights([(0, 3), (3, 0), (2, 5)], torch.float64)
    stats = check_against_reference(weights, random_catalysts(weights), backend=backend)
    assert torch.isinf(stats.ratios[:3]).all()


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("grouped", [False, True], ids=["rows", "grouped"])
def test_deterministic_and_inplace(backend, grouped):
    _skip_unless_runs(backend)
    if grouped:
        shapes, segments = chain_layout(VGG19_CONVS[:6])
        weights = _weights(shapes, torch.float32)
        layout = GroupLayout.build(weights, segments)
    else:
        weights, layout = _weights([(256, 128, 3, 3), (1000, 2048), (64,)], torch.float32), None
    catalysts = random_catalysts(weights, layout)
    a = cf.penalty(weights, catalysts, layout=layout, backend=backend, return_stats=True)
    b = cf.penalty(weights, catalysts, layout=layout, backend=backend, return_stats=True)
    assert torch.equal(a.penalty, b.penalty) and torch.equal(a.norms, b.norms) and torch.equal(a.ratios, b.ratios)
    ws = [torch.nn.Parameter(w.clone()) for w in weights]
    ds = [torch.nn.Parameter(d.clone()) for d in catalysts]
    cf.penalty_(ws, ds, scale=0.5, layout=layout, backend=backend)
    rw = [torch.nn.Parameter(w.double()) for w in weights]
    rd = [torch.nn.Parameter(d.double()) for d in catalysts]
    (0.5 * cf.penalty(rw, rd, layout=layout, backend="reference")).backward()
    for p, r in zip(ws + ds, rw + rd):
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=2e-5, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fp64_inplace_scale(backend):
    _skip_unless_runs(backend)
    weights = _weights([(7, 5, 3, 3), (9, 4)], torch.float64)
    catalysts = random_catalysts(weights)
    ws = [torch.nn.Parameter(w.clone()) for w in weights]
    ds = [torch.nn.Parameter(d.clone()) for d in catalysts]
    cf.penalty_(ws, ds, scale=0.37, backend=backend)
    rw = [torch.nn.Parameter(w.clone()) for w in weights]
    rd = [torch.nn.Parameter(d.clone()) for d in catalysts]
    cf.penalty(rw, rd, backend="reference").backward()
    for p, r in zip(ws + ds, rw + rd):
        torch.testing.assert_close(p.grad, 0.37 * r.grad, rtol=1e-14, atol=1e-15)


def _kernels_and_copies(fn):
    """CUDA kernels and host-to-device copies that one call of `fn` issues (after a warm-up call), run
    with torch.cuda.set_sync_debug_mode("error") so that any host synchronisation raises."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e.name for e in events if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    copies = [e.name for e in events if "memcpy" in e.name.lower() and "htod" in e.name.lower().replace(" ", "")]
    return kernels, copies


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("grouped", [False, True], ids=["rows", "grouped"])
def test_launch_counts_no_sync_no_copies(backend, grouped):
    _skip_unless_runs(backend)
    if grouped:
        shapes, segments = chain_layout(RESNET56_CONVS)
        weights = _weights(shapes, torch.float32)
        plan = GroupLayout.build(weights, segments).member_table
        catalysts = random_catalysts(weights, GroupLayout.build(weights, segments))
    else:
        weights, plan = _weights(RESNET56_CONVS, torch.float32), None
        catalysts = random_catalysts(weights)
    prefix = "" if backend == "cpp" else "triton_"
    forward = getattr(ops, prefix + "penalty_forward")
    backward = getattr(ops, prefix + "penalty_backward")
    accumulate = getattr(ops, prefix + "penalty_accumulate_")
    _, norms, _ = forward(weights, catalysts, plan)
    grad = torch.ones((), device="cuda")
    wg = [torch.zeros_like(w) for w in weights]
    dg = [torch.zeros_like(d) for d in catalysts]
    kernels, copies = _kernels_and_copies(lambda: forward(weights, catalysts, plan))
    assert len(kernels) == 1 and not copies, (kernels, copies)
    kernels, copies = _kernels_and_copies(lambda: accumulate(weights, catalysts, wg, dg, 0.5, plan))
    assert len(kernels) == 2 and not copies, (kernels, copies)
    # The backward writes into new tensors; with the caching allocator a repeated call gets the same
    # addresses, so its pointer table is cached too.
    kernels, copies = _kernels_and_copies(lambda: backward(grad, weights, catalysts, norms, plan))
    assert len(kernels) == 1 and not copies, (kernels, copies)


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_default_stream(backend):
    _skip_unless_runs(backend)
    weights = _weights([(64, 32, 3, 3), (10, 64)], torch.float32)
    catalysts = random_catalysts(weights)
    expected = cf.penalty(weights, catalysts, backend=backend, return_stats=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cf.penalty(weights, catalysts, backend=backend, return_stats=True)
        ws = [torch.nn.Parameter(w.clone()) for w in weights]
        ds = [torch.nn.Parameter(d.clone()) for d in catalysts]
        cf.penalty_(ws, ds, scale=1.0, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(got.penalty, expected.penalty) and torch.equal(got.norms, expected.norms)
    rw = [torch.nn.Parameter(w.clone()) for w in weights]
    rd = [torch.nn.Parameter(d.clone()) for d in catalysts]
    cf.penalty_(rw, rd, scale=1.0, backend=backend)
    for a, b in zip(ws + ds, rw + rd):
        assert torch.equal(a.grad, b.grad)


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensors_on_another_device_than_the_current_one(backend):
    _skip_unless_runs(backend)
    weights = _weights([(8, 4, 3, 3), (5, 8)], torch.float32, device="cuda:1")
    with torch.cuda.device(0):
        check_against_reference(weights, random_catalysts(weights), backend=backend)


@needs_gpu
def test_cuda_graph_capture_and_replay_cpp():
    _skip_unless_runs("cpp")
    shapes, segments = chain_layout(VGG19_CONVS[:4])
    weights = [torch.nn.Parameter(w) for w in _weights(shapes, torch.float32)]
    layout = GroupLayout.build(weights, segments)
    catalysts = [torch.nn.Parameter(d) for d in random_catalysts(weights, layout)]
    for p in weights + catalysts:
        p.grad = torch.zeros_like(p)
    stats_out = {}

    def step():
        for p in weights + catalysts:
            p.grad.zero_()
        stats_out["stats"] = cf.penalty_(weights, catalysts, scale=0.25, layout=layout, backend="cpp")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture: builds the tables
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(3):
        with torch.no_grad():
            for p in weights + catalysts:
                p.copy_(torch.randn_like(p))
        graph.replay()
        torch.cuda.synchronize()
        rw = [torch.nn.Parameter(w.detach().double()) for w in weights]
        rd = [torch.nn.Parameter(d.detach().double()) for d in catalysts]
        ref = cf.penalty(rw, rd, layout=layout, backend="reference", return_stats=True)
        (0.25 * ref.penalty).backward()
        assert_close(stats_out["stats"].penalty, ref.penalty, STAT_TOL[torch.float32], f"penalty, replay {trial}")
        for p, r in zip(weights + catalysts, rw + rd):
            assert_close(p.grad, r.grad, GRAD_TOL[torch.float32], f"grad, replay {trial}")


@needs_gpu
def test_capture_before_warm_up_is_refused_cpp():
    _skip_unless_runs("cpp")
    weights = _weights([(13, 7, 3, 3)], torch.float32)  # shapes no other test used
    catalysts = random_catalysts(weights)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="call the penalty once outside the capture"):
        with torch.cuda.graph(graph):
            cf.penalty(weights, catalysts, backend="cpp")


@needs_gpu
def test_capture_is_refused_triton():
    _skip_unless_runs("triton")
    weights = _weights([(8, 4)], torch.float32)
    catalysts = random_catalysts(weights)
    cf.penalty(weights, catalysts, backend="triton")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            cf.penalty(weights, catalysts, backend="triton")


@needs_gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_with_backward(backend, mode):
    _skip_unless_runs(backend)
    torch._dynamo.reset()
    weights = [torch.nn.Parameter(w) for w in _weights([(16, 3, 3, 3), (10, 16)], torch.float32)]
    catalysts = [torch.nn.Parameter(d) for d in random_catalysts(weights)]

    def step(ws, ds):
        return cf.penalty(ws, ds, backend=backend)

    compiled = torch.compile(step, fullgraph=True, mode=mode)
    for trial in range(3):  # reduce-overhead records a CUDA graph on a later call
        with torch.no_grad():
            for p in weights + catalysts:
                p.add_(0.01 * torch.randn_like(p))
        for p in weights + catalysts:
            p.grad = None
        compiled(weights, catalysts).backward()
        got = [p.grad.clone() for p in weights + catalysts]
        for p in weights + catalysts:
            p.grad = None
        step(weights, catalysts).backward()
        for a, p in zip(got, weights + catalysts):
            torch.testing.assert_close(a, p.grad, msg=lambda m: f"trial {trial}: {m}")
