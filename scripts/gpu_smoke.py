"""GPU smoke checks for what the test suite does not cover, plus the figures the README records.

    python scripts/gpu_smoke.py --backend cpp --out OUT_DIR        # one backend per process
    python scripts/gpu_smoke.py --backend cpp --only tiny          # the small case compute-sanitizer runs

Run by scripts/gpu_check.sh with TRITON_INTERPRET=0. Each check runs on its own; a failure is printed
(with its traceback) and the others still run. Checks: empty and zero-size tensors, a non-default stream,
torch.cuda.set_sync_debug_mode("error") around every call, fp64 penalty_ with scale 0.37, tensors of more
than 2^31 elements, torch.compile (default and reduce-overhead) with backward, opcheck on the CUDA
operators, duplicate inputs, CUDA graph capture, launch counts and host-to-device copies per call (torch
profiler); then the figures: microseconds per call and achieved bandwidth against the device's copy
bandwidth, for ResNet-56 and a transformer MLP stack, per-row and group layouts. Writes
OUT_DIR/smoke_<backend>.json. Exit status 1 if any check failed, 2 if no GPU is visible.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import catalyst_fused as cf  # noqa: E402
from catalyst_fused import GroupLayout, Slices  # noqa: E402

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def randn(shapes, dtype=torch.float32):
    return [torch.randn(s, device="cuda", dtype=torch.float64).to(dtype) for s in shapes]


def catalysts_for(weights, layout=None):
    sizes = [w.shape[0] for w in weights] if layout is None else layout.segment_sizes
    return [(torch.rand(n, device="cuda", dtype=torch.float64) + 0.5).to(weights[0].dtype) for n in sizes]


def params(tensors):
    return [torch.nn.Parameter(t.detach().clone()) for t in tensors]


def chain(shapes):
    """Group mode over a chain conv_0 -> bn_0 -> conv_1 -> ... (as tests/test_cuda_backend.chain_layout;
    repeated here so that this script runs where pytest is missing): group i of segment k is row i of
    conv_k, BN scale and shift i, and input column i of conv_{k+1}."""
    all_shapes, segments, index = [], [], {}
    for k, shape in enumerate(shapes):
        index[k] = len(all_shapes)
        all_shapes += [shape, (shape[0],), (shape[0],)]
    for k in range(len(shapes)):
        conv = index[k]
        members = [Slices(conv), Slices(conv + 1), Slices(conv + 2)]
        if k + 1 < len(shapes):
            members.append(Slices(index[k + 1], dim=1))
        segments.append(members)
    return all_shapes, segments


def resnet56_chain():
    """The 55 chained 3x3 conv weight shapes of the CIFAR ResNet-56."""
    return [(16, 3, 3, 3)] + [(16, 16, 3, 3)] * 18 + [(32, 16, 3, 3)] + [(32, 32, 3, 3)] * 17 + [(64, 32, 3, 3)] + \
        [(64, 64, 3, 3)] * 17  # fmt: skip


def resnet56():
    """All 57 conv weight shapes of the CIFAR ResNet-56 (option-B shortcuts: two 1x1 convs more)."""
    return resnet56_chain() + [(32, 16, 1, 1), (64, 32, 1, 1)]


def mlp():
    return [(3072, 768), (768, 3072)] * 12


def compare_with_reference(backend, weights, catalysts, layout=None, rtol=2e-5, atol=1e-6, scale=1.0):
    """Autograd and in-place results of `backend` against the fp64 reference."""
    ws, ds = params(weights), params(catalysts)
    stats = cf.penalty(ws, ds, layout=layout, backend=backend, return_stats=True)
    (scale * stats.penalty).backward()
    rw, rd = params([w.double() for w in weights]), params([d.double() for d in catalysts])
    ref = cf.penalty(rw, rd, layout=layout, backend="reference", return_stats=True)
    (scale * ref.penalty).backward()
    torch.testing.assert_close(stats.penalty.double(), ref.penalty, rtol=rtol, atol=atol)
    torch.testing.assert_close(stats.norms.double(), ref.norms, rtol=rtol, atol=atol)
    for a, b in zip(ws + ds, rw + rd):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=rtol, atol=atol)
    iw, id_ = params(weights), params(catalysts)
    cf.penalty_(iw, id_, scale=scale, layout=layout, backend=backend)
    for a, b in zip(iw + id_, rw + rd):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=rtol, atol=atol)


@check
def empty_and_zero_size(backend):
    for shapes in ([(0, 3)], [(3, 0)], [(0, 3), (3, 0), (4, 5)], [(0,)], [(2, 0, 3, 3), (5, 2, 3, 3)]):
        weights = randn(shapes, torch.float64)
        compare_with_reference(backend, weights, catalysts_for(weights), rtol=1e-10, atol=1e-12)
    stats = cf.penalty([torch.zeros(0, 4, device="cuda")], [torch.zeros(0, device="cuda")], backend=backend, return_stats=True)
    assert stats.penalty.item() == 0 and stats.norms.numel() == 0
    return "5 shape sets and an empty model match the reference"


@check
def non_default_stream(backend):
    shapes, segments = chain(resnet56_chain()[:8])
    weights = randn(shapes)
    layout = GroupLayout.build(weights, segments)
    catalysts = catalysts_for(weights, layout)
    expected = cf.penalty(weights, catalysts, layout=layout, backend=backend, return_stats=True)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cf.penalty(weights, catalysts, layout=layout, backend=backend, return_stats=True)
        ws, ds = params(weights), params(catalysts)
        cf.penalty_(ws, ds, scale=1.0, layout=layout, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(got.penalty, expected.penalty) and torch.equal(got.norms, expected.norms)
    rw, rd = params(weights), params(catalysts)
    cf.penalty_(rw, rd, scale=1.0, layout=layout, backend=backend)
    for a, b in zip(ws + ds, rw + rd):
        assert torch.equal(a.grad, b.grad)
    return "side-stream results bitwise equal to the default stream's"


@check
def sync_debug_around_every_call(backend):
    cases = []
    for grouped in (False, True):
        if grouped:
            shapes, segments = chain(resnet56_chain())
            weights = randn(shapes)
            layout = GroupLayout.build(weights, segments)
        else:
            weights, layout = randn(resnet56()), None
        cases.append((params(weights), params(catalysts_for(weights, layout)), layout))
    calls = 0
    for ws, ds, layout in cases:
        for step in range(3):  # the first call of a shape set may sync once (table upload); later ones never
            torch.cuda.set_sync_debug_mode("error" if step else "default")
            try:
                loss = cf.penalty(ws, ds, layout=layout, backend=backend)
                loss.backward()
                cf.penalty_(ws, ds, scale=0.5, layout=layout, backend=backend)
                stats = cf.penalty(ws, ds, layout=layout, backend=backend, return_stats=True)
                calls += 3 if step else 0
            finally:
                torch.cuda.set_sync_debug_mode("default")
            del stats
    return f"{calls} calls under set_sync_debug_mode('error'): no synchronisation"


@check
def fp64_inplace_scale(backend):
    weights = randn([(7, 5, 3, 3), (9, 4), (33,)], torch.float64)
    catalysts = catalysts_for(weights)
    ws, ds = params(weights), params(catalysts)
    cf.penalty_(ws, ds, scale=0.37, backend=backend)
    rw, rd = params(weights), params(catalysts)
    cf.penalty(rw, rd, backend="reference").backward()
    worst = 0.0
    for a, b in zip(ws + ds, rw + rd):
        torch.testing.assert_close(a.grad, 0.37 * b.grad, rtol=1e-14, atol=1e-15)
        worst = max(worst, float(((a.grad - 0.37 * b.grad).abs() / (0.37 * b.grad).abs().clamp_min(1e-300)).max()))
    return f"max relative error {worst:.2e} (fp32 scale would give ~3e-8)"


@check
def over_2_31_elements(backend):
    out = []
    for shape in ((2, 2**30 + 5), (2**24 + 1, 128)):
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        n = shape[0]
        d = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
        stats = cf.penalty([w], [d], backend=backend, return_stats=True)
        expected = torch.cat([w[i : i + 4096].float().square().sum(1).sqrt() for i in range(0, n, 4096)])
        torch.testing.assert_close(stats.norms, expected, rtol=1e-4, atol=1e-4)
        grad = torch.zeros_like(w)
        dgrad = torch.zeros_like(d)
        ops = torch.ops.catalyst_fused
        accumulate = ops.penalty_accumulate_ if backend == "cpp" else ops.triton_penalty_accumulate_
        accumulate([w], [d], [grad], [dgrad], 1.0, None)
        for i in (0, n - 1):  # first and last rows
            factor = d[i].float() / expected[i]
            torch.testing.assert_close(grad[i].float(), (factor * w[i].float()).to(torch.bfloat16).float(), rtol=2e-2, atol=1e-5)
        torch.testing.assert_close(dgrad.float(), expected, rtol=1e-2, atol=1e-3)
        out.append(f"{shape}: {w.numel():,} elements ok")
        del w, grad, expected
        torch.cuda.empty_cache()
    return "; ".join(out)


@check
def compile_with_backward(backend):
    results = []
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        weights = params(randn([(16, 3, 3, 3), (32, 16, 3, 3), (10, 32)]))
        catalysts = params(catalysts_for(weights))

        def step(ws, ds):
            return cf.penalty(ws, ds, backend=backend)

        compiled = torch.compile(step, fullgraph=True, mode=mode)
        for trial in range(4):
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
                torch.testing.assert_close(a, p.grad)
        results.append(mode)
    return f"torch.compile(fullgraph=True) with backward matches eager in modes {results}"


@check
def opcheck_cuda_ops(backend):
    prefix = "" if backend == "cpp" else "triton_"
    ops = torch.ops.catalyst_fused
    weights = randn([(4, 3, 3, 3), (5, 7), (6,)], torch.float64)
    catalysts = catalysts_for(weights)
    shapes, segments = chain([(6, 3, 3, 3), (5, 6, 3, 3)])
    gweights = randn(shapes, torch.float32)
    layout = GroupLayout.build(gweights, segments)
    samples = [(weights, catalysts, None), (gweights, catalysts_for(gweights, layout), layout.member_table)]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for ws, ds, plan in samples:
        torch.library.opcheck(getattr(ops, prefix + "penalty_forward").default,
                              ([w.requires_grad_(True) for w in params(ws)], [d.requires_grad_(True) for d in params(ds)], plan),
                              test_utils=utils)  # fmt: skip
        _, norms, _ = getattr(ops, prefix + "penalty_forward")(ws, ds, plan)
        torch.library.opcheck(getattr(ops, prefix + "penalty_backward").default,
                              (torch.tensor(1.5, device="cuda", dtype=norms.dtype), ws, ds, norms, plan),
                              test_utils=("test_schema", "test_faketensor"))  # fmt: skip
        torch.library.opcheck(getattr(ops, prefix + "penalty_accumulate_").default,
                              (ws, ds, [torch.randn_like(w) for w in ws], [torch.randn_like(d) for d in ds], 0.25, plan),
                              test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    return "opcheck passed on forward, backward and accumulate_ (per-row and grouped)"


@check
def duplicate_inputs(backend):
    # A tied weight listed twice: its gradient would have two racing writers in the in-place op.
    w = torch.nn.Parameter(torch.randn(8, 5, device="cuda"))
    d1 = torch.nn.Parameter(torch.rand(8, device="cuda") + 0.5)
    d2 = torch.nn.Parameter(torch.rand(8, device="cuda") + 0.5)
    try:
        cf.penalty_([w, w], [d1, d2], scale=1.0, backend=backend)
    except ValueError as error:
        return f"rejected: {error}"
    raise AssertionError("a weight listed twice was accepted by penalty_ (issue 11 item 5: it must be rejected)")


@check
def cuda_graph(backend):
    shapes, segments = chain(resnet56_chain()[:6])
    weights = params(randn(shapes))
    layout = GroupLayout.build(weights, segments)
    catalysts = params(catalysts_for(weights, layout))
    for p in weights + catalysts:
        p.grad = torch.zeros_like(p)
    box = {}

    def step():
        for p in weights + catalysts:
            p.grad.zero_()
        box["stats"] = cf.penalty_(weights, catalysts, scale=0.25, layout=layout, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if backend == "triton":
        try:
            with torch.cuda.graph(graph):
                step()
        except RuntimeError as error:
            assert "cannot be captured" in str(error), error
            return "capture refused cleanly (by design)"
        raise AssertionError("the Triton backend was captured, but it must refuse")
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        with torch.no_grad():
            for p in weights + catalysts:
                p.copy_(torch.randn_like(p))
        graph.replay()
        torch.cuda.synchronize()
        rw, rd = params([w.double() for w in weights]), params([d.double() for d in catalysts])
        (0.25 * cf.penalty(rw, rd, layout=layout, backend="reference")).backward()
        for p, r in zip(weights + catalysts, rw + rd):
            torch.testing.assert_close(p.grad.double(), r.grad, rtol=2e-5, atol=1e-6)
    fresh = randn([(11, 3, 5)])  # shapes never seen outside a capture
    fresh_catalysts = catalysts_for(fresh)
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            cf.penalty(fresh, fresh_catalysts, backend=backend)
    except RuntimeError as error:
        assert "outside the capture" in str(error), error
    else:
        raise AssertionError("a first call inside a capture was not refused")
    return "3 replays with new weights match the reference; a first call inside a capture is refused"


def _profile(fn, repeats=3):
    """Kernels and host-to-device copies per call (median over `repeats` steady-state calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = [e.name for e in events]
    kernels = [n for n in names if "memcpy" not in n.lower() and "memset" not in n.lower()]
    copies = [n for n in names if "memcpy" in n.lower() and "htod" in n.lower().replace(" ", "")]
    return len(kernels) / repeats, len(copies) / repeats, sorted(set(kernels))


@check
def launch_counts(backend):
    lines = []
    for name, grouped in (("resnet56 rows", False), ("resnet56 group", True)):
        if grouped:
            shapes, segments = chain(resnet56_chain())
            weights = params(randn(shapes))
            layout = GroupLayout.build(weights, segments)
        else:
            weights, layout = params(randn(resnet56())), None
        catalysts = params(catalysts_for(weights, layout))

        def forward():
            with torch.no_grad():
                cf.penalty(weights, catalysts, layout=layout, backend=backend)

        def forward_backward():  # fresh gradients every step (zero_grad(set_to_none=True))
            for p in weights + catalysts:
                p.grad = None
            cf.penalty(weights, catalysts, layout=layout, backend=backend).backward()

        def inplace():
            cf.penalty_(weights, catalysts, scale=0.5, layout=layout, backend=backend)

        for label, fn, limit in (("forward", forward, 1), ("forward+backward", forward_backward, 3), ("in-place", inplace, 2)):
            kernels, copies, kinds = _profile(fn)
            lines.append(f"{name} {label}: {kernels:g} kernels, {copies:g} HtoD copies per call ({', '.join(k[:40] for k in kinds)})")
            assert copies == 0, lines[-1]
            assert kernels <= limit, lines[-1]
    return "\n    ".join(lines)


def _time(fn, reps=50):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


@check
def figures(backend):
    """us per call and achieved bandwidth (bytes the pass must move / time) against the copy bandwidth."""
    big = torch.empty(2**28, device="cuda", dtype=torch.float32)
    copy_us = _time(lambda: big.clone(), reps=20)
    copy_gbs = 2 * big.numel() * 4 / copy_us / 1e3
    del big
    torch.cuda.empty_cache()
    lines = [f"device copy (read + write 1 GiB each): {copy_gbs:.0f} GB/s"]
    results = {"copy_gbs": copy_gbs}
    for model, convs, chained in (("resnet56", resnet56(), resnet56_chain()), ("transformer_mlp", mlp(), mlp())):
        for grouped in (False, True):
            if grouped:
                shapes, segments = chain(chained)
                weights = params(randn(shapes))
                layout = GroupLayout.build(weights, segments)
            else:
                weights, layout = params(randn(convs)), None
            catalysts = params(catalysts_for(weights, layout))
            elements = sum(w.numel() for w in weights)
            for p in weights + catalysts:
                p.grad = torch.zeros_like(p)

            def forward():
                with torch.no_grad():
                    cf.penalty(weights, catalysts, layout=layout, backend=backend)

            def autograd():
                cf.penalty(weights, catalysts, layout=layout, backend=backend).backward()

            def inplace():
                cf.penalty_(weights, catalysts, scale=0.5, layout=layout, backend=backend)

            key = f"{model} {'group' if grouped else 'rows'}"
            for label, fn, bytes_per_element in (("forward", forward, 4), ("autograd fwd+bwd", autograd, 4 + 4 + 8 + 4),
                                                 ("in-place", inplace, 4 + 12)):  # fmt: skip
                us = _time(fn)
                # forward reads w once; autograd reads w (fwd) + w (bwd) + writes g + AccumulateGrad adds
                # into .grad (read g, read .grad, write .grad); in-place reads w twice + reads and writes .grad
                gbs = elements * bytes_per_element / us / 1e3
                results[f"{key} {label}"] = {"us": us, "gbs": gbs, "fraction_of_copy": gbs / copy_gbs}
                lines.append(f"{key:>22} {label:>16}: {us:9.1f} us  {gbs:7.0f} GB/s  ({gbs / copy_gbs:.0%} of copy bandwidth)")
    figures.results = results
    return "\n    ".join(lines)


@check
def tiny(backend):
    """A small case of every kernel path (per-row, grouped, long columns, width, in-place), for
    compute-sanitizer."""
    weights = randn([(3, 2, 3, 3), (4, 3), (5,), (2, 1030)])
    compare_with_reference(backend, weights, catalysts_for(weights))
    shapes = [(6, 300), (2, 6, 300), (4, 2)]
    weights = randn(shapes)
    layout = GroupLayout.build(weights, [[Slices(0), Slices(1, dim=1, width=2)], [Slices(1), Slices(2, dim=1)], [Slices(2)]])
    compare_with_reference(backend, weights, catalysts_for(weights, layout), layout)
    return "per-row and grouped (long columns, width 2) forward, backward, in-place"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", required=True, choices=["cpp", "triton"])
    parser.add_argument("--out", help="folder for smoke_<backend>.json")
    parser.add_argument("--only", help="comma-separated checks (default: all but tiny)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device is visible", file=sys.stderr)
        return 2
    if args.backend == "triton" and not cf.triton_available(torch.device("cuda")):
        from catalyst_fused.backends.triton_ops import unavailable_reason

        print(f"gpu_smoke: Triton cannot run on CUDA tensors: {unavailable_reason(torch.device('cuda'))}", file=sys.stderr)
        return 1
    if args.backend == "cpp" and not cf.cuda_kernels_built():
        print("gpu_smoke: the extension was built without its CUDA kernels", file=sys.stderr)
        return 1
    names = args.only.split(",") if args.only else [n for n in CHECKS if n != "tiny"]
    print(f"gpu_smoke {args.backend}: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"CUDA {torch.version.cuda}", flush=True)  # fmt: skip
    report = {"backend": args.backend, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": {}}
    failed = 0
    for name in names:
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            detail = CHECKS[name](args.backend)
            status = "PASS"
        except Exception:  # every check runs; the failure is reported with its traceback
            detail = traceback.format_exc()
            status = "FAIL"
            failed += 1
        finally:
            torch.cuda.set_sync_debug_mode("default")
        seconds = time.perf_counter() - start
        print(f"{status} {args.backend} {name} ({seconds:.1f} s): {detail}", flush=True)
        report["checks"][name] = {"status": status, "seconds": seconds, "detail": detail}
        if name == "figures" and status == "PASS":
            report["figures"] = figures.results
    if args.out:
        path = pathlib.Path(args.out) / f"smoke_{args.backend}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    print(f"gpu_smoke {args.backend}: {len(names) - failed}/{len(names)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_smoke: set TRITON_INTERPRET=0 (the interpreter cannot run on CUDA tensors)", file=sys.stderr)
    sys.exit(main())
