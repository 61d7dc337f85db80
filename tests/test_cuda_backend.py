"""GPU backends on a GPU: the CUDA C++ operators and the Triton kernels on CUDA tensors, against the fp64
reference. These tests skip on machines without a GPU (CI); on a GPU machine run the suite with
TRITON_INTERPRET=0 so that Triton compiles for the device. The build check below runs everywhere."""
import os

import pytest
import torch

import catalyst_fused as cf
from catalyst_fused import GroupLayout, Slices

from _helpers import DTYPES, check_against_reference, cuda_toolkit_root, random_catalysts

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
GPU_BACKENDS = ["cpp", "triton"]


def test_cuda_kernels_are_built_when_torch_has_cuda():
    # CI installs the CUDA build of torch and has nvcc: the CUDA operators must be compiled and linked
    # there even though no GPU can run them.
    if torch.version.cuda is None or cuda_toolkit_root() is None or os.environ.get("CATALYST_FUSED_CUDA") == "0":
        pytest.skip("torch without CUDA, or no CUDA toolkit: the CUDA kernels are not built here")
    assert cf.cuda_kernels_built()


def _weights(shapes, dtype):
    return [torch.randn(s, dtype=torch.float64, device="cuda").to(dtype) for s in shapes]


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, dtype):
    shapes = [(16, 3, 3, 3), (64, 64, 3, 3), (10, 64), (33,), (4, 16385), (2, 255), (2, 256), (2, 257), (512, 1, 3, 3)]
    weights = _weights(shapes, dtype)
    check_against_reference(weights, random_catalysts(weights, dtype=dtype), backend=backend)


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_hundreds_of_tensors_and_grouped_layouts(backend):
    weights = _weights([(1 + i % 17, 1 + (i * 7) % 23, 3) for i in range(320)], torch.float32)
    check_against_reference(weights, random_catalysts(weights), backend=backend)
    grouped = _weights([(8, 3, 3, 3), (8,), (8,), (6, 8, 3, 3), (5, 6)], torch.float32)
    layout = GroupLayout.build(grouped, [[Slices(0), Slices(1), Slices(2), Slices(3, dim=1)], [Slices(3), Slices(4, dim=1)]])
    check_against_reference(grouped, random_catalysts(grouped, layout), layout, backend=backend)


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic_and_inplace(backend):
    weights = _weights([(256, 128, 3, 3), (1000, 2048)], torch.float32)
    catalysts = random_catalysts(weights)
    a = cf.penalty(weights, catalysts, backend=backend, return_stats=True)
    b = cf.penalty(weights, catalysts, backend=backend, return_stats=True)
    assert torch.equal(a.penalty, b.penalty) and torch.equal(a.norms, b.norms)
    ws = [torch.nn.Parameter(w.clone()) for w in weights]
    ds = [torch.nn.Parameter(d.clone()) for d in catalysts]
    cf.penalty_(ws, ds, scale=0.5, backend=backend)
    rw = [torch.nn.Parameter(w.clone()) for w in weights]
    rd = [torch.nn.Parameter(d.clone()) for d in catalysts]
    (0.5 * cf.penalty(rw, rd, backend="reference")).backward()
    for p, r in zip(ws + ds, rw + rd):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    weights = _weights([(16, 3, 3, 3), (10, 16)], torch.float32)
    catalysts = random_catalysts(weights)

    def fn(ws, ds):
        return cf.penalty(ws, ds, backend=backend)

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(weights, catalysts), fn(weights, catalysts))
