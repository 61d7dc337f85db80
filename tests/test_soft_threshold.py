"""The soft-threshold operator (cf.soft_threshold_): the reference against hand values and the loop a user
writes, then every backend against the reference, bit for bit (the same formula rounded once), on all
dtypes, odd sizes, sizes around the chunk, hundreds of tensors, in place and from sources; bad input;
opcheck and torch.compile."""
import math
import os

import pytest
import torch

import catalyst_fused as cf
from catalyst_fused import reference_sparsity as ref
from catalyst_fused.backends import triton_soft_threshold

from _helpers import DTYPES

CHUNK = 1 << 14  # csrc/soft_threshold.h kChunkElements, and the Triton kernel's CHUNK
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.skipif(
    not cf.triton_available(torch.device("cpu")), reason="Triton is not importable or TRITON_INTERPRET is not set"))]


def test_chunk_size_matches_the_triton_kernel():
    assert triton_soft_threshold.CHUNK == CHUNK


def test_reference_by_hand():
    x = torch.tensor([0.3, -0.05, -0.4, 0.1, -0.1, 0.0, -0.0, math.inf, -math.inf, math.nan], dtype=torch.float64)
    w = torch.empty_like(x)
    counts = ref.soft_threshold_([w], [x], [0.1])
    expected = torch.tensor([0.2, 0.0, -0.3, 0.0, 0.0, 0.0, 0.0, math.inf, -math.inf, math.nan], dtype=torch.float64)
    torch.testing.assert_close(w, expected, equal_nan=True, rtol=1e-15, atol=0)
    assert counts.tolist() == [5]  # |x| <= t is pruned, the threshold itself included; NaN is not a zero


def test_reference_equals_the_eager_loop_on_finite_inputs():
    xs = [torch.randn(s, dtype=torch.float64) for s in [(4, 3, 3, 3), (10,), (7, 5)]]
    ts = [0.5, 0.0, 1.1]
    a, b = [torch.empty_like(x) for x in xs], [torch.empty_like(x) for x in xs]
    assert torch.equal(ref.soft_threshold_(a, xs, ts), ref.eager_soft_threshold_(b, xs, ts))
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_reference_rounds_once_in_the_accumulation_dtype():
    # fp16: |x| - t in fp32, rounded once; a result below fp16's smallest subnormal becomes 0 and is counted
    x = torch.tensor([1.0, 0.5, 6e-5], dtype=torch.float16)
    t = float(torch.tensor(6e-5, dtype=torch.float16)) - 2e-8
    w = torch.empty_like(x)
    counts = ref.soft_threshold_([w], [x], [t])
    assert w.tolist()[2] == 0.0 and counts.tolist() == [1]
    assert w.tolist()[:2] == [float(torch.tensor(1.0 - t, dtype=torch.float32).half()),
                              float(torch.tensor(0.5 - t, dtype=torch.float32).half())]


def _tensors(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        x = torch.randn(s, generator=g, dtype=torch.float64)
        if x.numel() > 4:
            x.view(-1)[::7] = 0.0  # exact zeros (and a negative zero) among the values
            x.view(-1)[1] = -0.0
        out.append(x.to(dtype))
    return out


def _check(shapes, dtype, backend, *, in_place, thresholds=None, seed=0):
    sources = _tensors(shapes, dtype, seed)
    thresholds = thresholds if thresholds is not None else [0.05 + 0.4 * (i % 5) / 4 for i in range(len(shapes))]
    expected = [torch.empty_like(x) for x in sources]
    expected_counts = ref.soft_threshold_(expected, sources, thresholds)
    if in_place:
        weights = [x.clone() for x in sources]
        counts = cf.soft_threshold_(weights, thresholds, backend=backend)
    else:
        weights = [torch.full_like(x, 7.0) for x in sources]
        kept = [x.clone() for x in sources]
        counts = cf.soft_threshold_(weights, thresholds, sources=sources, backend=backend)
        for x, k in zip(sources, kept):
            assert torch.equal(x, k), "the sources must not change"
    assert counts.dtype == torch.int64 and counts.shape == (len(shapes),)
    assert counts.tolist() == expected_counts.tolist()
    for i, (w, e) in enumerate(zip(weights, expected)):
        if backend == "triton" and dtype == torch.bfloat16 and INTERPRETED:
            # Triton 3.7's interpreter truncates fp32 -> bf16 (GPUs round to nearest even, test_cuda_* below):
            # within one bf16 ulp, same zeros
            assert torch.equal(w == 0, e == 0)
            torch.testing.assert_close(w, e, rtol=2.0 ** -7, atol=0)
            continue
        assert torch.equal(w, e), f"tensor {i} of shape {tuple(w.shape)} differs from the reference"


SHAPES = {
    "conv_linear_bias": [(4, 3, 3, 3), (10, 7), (10,)],
    "odd": [(1,), (3, 5, 7), (13, 1, 1), ()],
    "around_chunk": [(CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2 * CHUNK + 3,)],
    "empty_tensors": [(0,), (3, 0), (5, 2)],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("in_place", [False, True], ids=["sources", "in_place"])
def test_backend_matches_reference(shapes, dtype, backend, in_place):
    _check(shapes, dtype, backend, in_place=in_place)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hundreds_of_tensors_in_one_call(backend):
    shapes = [(1 + i % 7, 1 + i % 5, 3, 3) if i % 3 else (1 + i % 11,) for i in range(300)]
    _check(shapes, torch.float32, backend, in_place=False, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_threshold_for_every_tensor_and_zero_threshold(backend):
    xs = _tensors([(6, 4), (9,)], torch.float32)
    ws = [torch.empty_like(x) for x in xs]
    counts = cf.soft_threshold_(ws, 0.0, sources=xs, backend=backend)
    for w, x in zip(ws, xs):
        assert torch.equal(w, x)  # t = 0 is the identity (-0.0 included)
    assert counts.tolist() == [int((x == 0).sum()) for x in xs]
    big = cf.soft_threshold_([w.clone() for w in ws], 1e30, backend=backend)
    assert big.tolist() == [x.numel() for x in xs]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_values_are_kept(backend):
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.5, -2.0])
    w = torch.empty_like(x)
    counts = cf.soft_threshold_([w], [1.0], sources=[x], backend=backend)
    torch.testing.assert_close(w, torch.tensor([math.nan, math.inf, -math.inf, 0.0, -1.0]), equal_nan=True)
    assert counts.tolist() == [1]


def test_threshold_forms():
    xs = _tensors([(5,), (4,)], torch.float64)
    a = [torch.empty_like(x) for x in xs]
    b = [torch.empty_like(x) for x in xs]
    cf.soft_threshold_(a, torch.tensor([0.3, 0.7], dtype=torch.float64), sources=xs)
    cf.soft_threshold_(b, (0.3, 0.7), sources=xs)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


BAD = [
    (lambda w, x: dict(weights=[], thresholds=0.1), ValueError, "weights must be a non-empty sequence"),
    (lambda w, x: dict(weights=[w[0].long()], thresholds=0.1), TypeError, r"weights\[0\] must be a floating-point tensor"),
    (lambda w, x: dict(weights=[w[0], w[1].double()], thresholds=0.1), TypeError, r"weights\[1\] has dtype torch.float64"),
    (lambda w, x: dict(weights=[w[0], w[1].t()], thresholds=0.1), ValueError, r"weights\[1\] must be contiguous"),
    (lambda w, x: dict(weights=w, thresholds=0.1, sources=x[:1]), ValueError, "got 1 sources for 2 weights"),
    (lambda w, x: dict(weights=w, thresholds=0.1, sources=[x[0], x[0]]), ValueError,
     r"sources\[1\] has shape \[4, 3\] but weights\[1\] has shape \[3, 4\]"),
    (lambda w, x: dict(weights=w, thresholds=0.1, sources=[x[0], x[1].half()]), TypeError, r"sources\[1\] has dtype"),
    (lambda w, x: dict(weights=w, thresholds=[0.1]), ValueError, "got 1 thresholds for 2 weights"),
    (lambda w, x: dict(weights=w, thresholds=[0.1, -1.0]), ValueError, r"thresholds\[1\] must be a finite number >= 0"),
    (lambda w, x: dict(weights=w, thresholds=[0.1, math.nan]), ValueError, r"thresholds\[1\] must be a finite number >= 0"),
    (lambda w, x: dict(weights=[w[0], w[0]], thresholds=0.1), ValueError, r"weights\[1\] shares memory with weights\[0\]"),
    (lambda w, x: dict(weights=w, thresholds=0.1, sources=[x[0], w[0].view(3, 4)]), ValueError,
     r"sources\[1\] shares memory with weights\[0\]"),
    (lambda w, x: dict(weights=[w[0].view(-1)[:6], w[0].view(-1)[4:]], thresholds=0.1), ValueError,
     r"weights\[1\] shares memory with weights\[0\]"),
]


@pytest.mark.parametrize("backend", ["cpp", "reference", BACKENDS[1]])
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_names_the_argument_and_writes_nothing(case, backend):
    make, error, message = BAD[case]
    weights = [torch.randn(4, 3), torch.randn(3, 4)]
    sources = [torch.randn(4, 3), torch.randn(3, 4)]
    before = [w.clone() for w in weights]
    kwargs = make(weights, sources)
    with pytest.raises(error, match=message):
        cf.soft_threshold_(kwargs.pop("weights"), kwargs.pop("thresholds"), backend=backend, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(weights, before))


def test_bad_python_arguments():
    w = [torch.randn(3)]
    with pytest.raises(TypeError, match="thresholds must be a number or a sequence"):
        cf.soft_threshold_(w, True)
    with pytest.raises(TypeError, match=r"thresholds\[0\] must be a number"):
        cf.soft_threshold_(w, ["0.1"])
    with pytest.raises(TypeError, match="weights must be a sequence of tensors, got a single tensor"):
        cf.soft_threshold_(w[0], 0.1)


def test_sources_may_share_memory_with_each_other():
    base = torch.randn(6)
    ws = [torch.empty(6), torch.empty(6)]
    cf.soft_threshold_(ws, 0.2, sources=[base, base])
    assert torch.equal(ws[0], ws[1]) and torch.equal(ws[0], ref.soft_threshold(base, 0.2))


def test_opcheck():
    ws = [torch.randn(4, 3), torch.randn(5)]
    xs = [torch.randn(4, 3), torch.randn(5)]
    torch.library.opcheck(torch.ops.catalyst_fused.soft_threshold_.default, (ws, xs, [0.3, 0.1]))
    torch.library.opcheck(torch.ops.catalyst_fused.soft_threshold_.default, ([w.clone() for w in ws], None, [0.3, 0.1]))


def test_fake_tensors_give_the_counts_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ws = [torch.empty(4, 3), torch.empty(5)]
        out = torch.ops.catalyst_fused.soft_threshold_(ws, None, [0.1, 0.2])
        assert out.shape == (2,) and out.dtype == torch.int64
        with pytest.raises(ValueError, match="got 1 thresholds"):
            torch.ops.catalyst_fused.soft_threshold_(ws, None, [0.1])


def test_torch_compile_fullgraph():
    ws = [torch.randn(8, 4), torch.randn(6)]
    thetas = [torch.randn(8, 4), torch.randn(6)]

    def step(weights, sources):
        return cf.soft_threshold_(weights, [0.25, 0.5], sources=sources)

    expected_w = [torch.empty_like(t) for t in thetas]
    expected = ref.soft_threshold_(expected_w, thetas, [0.25, 0.5])
    counts = torch.compile(step, fullgraph=True, backend="aot_eager")(ws, thetas)
    assert counts.tolist() == expected.tolist()
    assert all(torch.equal(a, b) for a, b in zip(ws, expected_w))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(backend, dtype):
    shapes = [(CHUNK + 1,), (3, 5, 7), (0,), (300, 300)]
    xs = _tensors(shapes, dtype)
    expected = [torch.empty_like(x) for x in xs]
    counts_ref = ref.soft_threshold_(expected, xs, [0.3] * len(xs))
    ws = [torch.empty_like(x, device="cuda") for x in xs]
    counts = cf.soft_threshold_(ws, 0.3, sources=[x.cuda() for x in xs], backend=backend)
    assert counts.device.type == "cuda" and counts.cpu().tolist() == counts_ref.tolist()
    assert all(torch.equal(w.cpu(), e) for w, e in zip(ws, expected))


@pytest.mark.slow
def test_triton_kernel_compiles_ahead_of_time_for_sm80_and_sm90():
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(root / "scripts" / "aot_compile_soft_threshold.py")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("B cubin") == 8  # 4 dtypes x 2 architectures


def test_cuda_kernel_is_registered_with_the_cuda_build():
    # CI builds the CUDA kernels (no GPU runs them): the soft threshold must be among them
    if not cf.cuda_kernels_built():
        pytest.skip("the extension was built without its CUDA kernels")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("catalyst_fused::soft_threshold_", "CUDA")


@pytest.mark.skipif(not cf.cpp_available(), reason="the compiled extension is not built")
def test_benchmark_runs_on_the_harness_and_writes_its_csv(tmp_path):
    import csv
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "soft_threshold.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "soft_threshold.py"), "--weight-sets", "resnet56",
                           "--providers", "eager,cpp,triton", "--reps", "3", "--warmup", "1", "--rounds", "1",
                           "--threads", "1", "--out", str(out)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skip triton/update: the Triton backend is timed on CUDA only" in done.stdout
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["provider"] for r in rows) == ["cpp", "eager", "floor"]
    for r in rows:
        assert r["mode"] == "update" and int(r["n_tensors"]) == 57 and int(r["n_params"]) == 850_864
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
    assert float(next(r for r in rows if r["provider"] == "eager")["speedup_vs_eager"]) == pytest.approx(1.0)
