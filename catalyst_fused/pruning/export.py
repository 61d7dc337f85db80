"""Export of a (pruned) model for deployment: ``torch.export`` (a ``.pt2`` file) and ONNX, each checked.

    results = cf.pruning.export_model(model, x_test, "out/pruned_model", formats=("onnx", "pt2"))
    results["onnx"].ok, results["onnx"].max_abs_err

* ``pt2``: :func:`torch.export.export` of the model in eval mode, saved with :func:`torch.export.save`; loaded
  back with :func:`torch.export.load` for the check.
* ``onnx``: :func:`torch.onnx.export` with the installed exporter (``dynamo=True``: the torch.export-based
  exporter and its default opset), weights inside the one ``.onnx`` file; checked with onnxruntime's CPU
  provider. Needs the ``[export]`` extra (onnx, onnxscript, onnxruntime).

Both have a dynamic batch dimension (the first dimension of every input), so one file serves batch 1 and
batch 64. **Check**: the exported program, read back from the file, is run on ``check_inputs`` (real
inputs: the workflow passes test images) and its outputs compared with the eager model's; it passes when
``max |exported - eager| <= rtol * max(1, max |eager|)``. A file is written under its final name only after
its check passed; with ``strict=True`` (the default) a failed check raises :class:`ExportCheckError`.
"""
from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .._validation import check_choices, comma_items

__all__ = ["EXPORT_FORMATS", "ExportResult", "ExportCheckError", "export_model", "parse_formats", "require_export_extra"]

EXPORT_FORMATS = ("onnx", "pt2")


class ExportCheckError(RuntimeError):
    """An exported model whose outputs differ from the eager model's (or that could not be exported)."""


@dataclass
class ExportResult:
    """One export: the file, and how its outputs compared with the eager model's on the check inputs."""

    format: str
    path: Optional[str]  # None when the export or its check failed (no file is left behind)
    ok: bool
    max_abs_err: Optional[float]
    tol: Optional[float]
    max_abs_output: Optional[float]
    check_samples: int
    argmax_agreement: Optional[float]  # fraction of samples whose top class agrees (classifier outputs)
    seconds: float
    opset: Optional[int] = None  # ONNX only: the default opset of the installed exporter
    runtime: Optional[str] = None  # what ran the check: "torch.export.load" or "onnxruntime <version>"
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_formats(text: Union[str, Sequence[str], None], where: str = "--export") -> tuple[str, ...]:
    """``"onnx,pt2"`` (or a sequence) -> ``("onnx", "pt2")``; empty -> ``()``.

    Raises:
        ValueError: naming ``where`` for an unknown format or a repeated one.
    """
    if text is None:
        return ()
    items = comma_items(text)
    check_choices(items, EXPORT_FORMATS, where, "format")
    if len(set(items)) != len(items):
        raise ValueError(f"{where}: a format is named twice in {text!r}")
    return tuple(items)


def require_export_extra(what: str = "ONNX export") -> None:
    """Raises ImportError naming the ``[export]`` extra if onnx, onnxscript or onnxruntime is missing."""
    import importlib.util

    missing = [pkg for pkg in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ImportError(f"{what} needs the [export] extra; missing: {', '.join(missing)}. Install it with "
                          f"pip install 'catalyst_fused[export]' (or: pip install {' '.join(missing)})")


def _as_args(inputs) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise ValueError("export_model: example_inputs / check_inputs must be a batch tensor or a tuple of batch tensors, "
                     f"got {type(inputs).__name__}")


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _outputs(out[k])]
    raise TypeError(f"export_model: cannot compare a model output of type {type(out).__name__}")


def _compare(expected: list, got: list, rtol: float) -> tuple[float, float, float, Optional[float]]:
    """``(max_abs_err, tol, max_abs_output, argmax_agreement)`` of ``got`` against ``expected``."""
    if len(expected) != len(got):
        raise ExportCheckError(f"the exported model returns {len(got)} outputs, the eager one {len(expected)}")
    err, scale = 0.0, 0.0
    for e, g in zip(expected, got):
        g = torch.as_tensor(g).to(e.dtype)
        if g.shape != e.shape:
            raise ExportCheckError(f"an exported output has shape {tuple(g.shape)}, the eager one {tuple(e.shape)}")
        err = max(err, float((g - e).abs().max()) if e.numel() else 0.0)
        scale = max(scale, float(e.abs().max()) if e.numel() else 0.0)
    first_e, first_g = expected[0], torch.as_tensor(got[0])
    agree = float((first_e.argmax(-1) == first_g.argmax(-1)).float().mean()) if first_e.dim() == 2 else None
    return err, rtol * max(1.0, scale), scale, agree


def _dynamic_batch(args: tuple):
    batch = torch.export.Dim("batch")
    return tuple({0: batch} for _ in args)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warn about their own internals; the result says what matters."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _export_pt2(model: nn.Module, args: tuple, tmp: Path, check_args: tuple) -> tuple[list, dict]:
    with _quiet():
        program = torch.export.export(model, args, dynamic_shapes=_dynamic_batch(args))
        torch.export.save(program, str(tmp))
        loaded = torch.export.load(str(tmp)).module()
    with torch.no_grad():
        return _outputs(loaded(*check_args)), {"runtime": f"torch.export.load (torch {torch.__version__})"}


def _export_onnx(model: nn.Module, args: tuple, tmp: Path, check_args: tuple) -> tuple[list, dict]:
    require_export_extra()
    import onnx
    import onnxruntime as ort

    names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    with _quiet():
        torch.onnx.export(model, args, str(tmp), dynamo=True, external_data=False, verbose=False, input_names=names,
                          output_names=None, dynamic_shapes=_dynamic_batch(args))
    opset = next((int(o.version) for o in onnx.load(str(tmp), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")), None)
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    feed = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), check_args)}
    got = [torch.from_numpy(o) for o in session.run(None, feed)]
    return got, {"opset": opset, "runtime": f"onnxruntime {ort.__version__} (CPUExecutionProvider)"}


_EXPORTERS = {"pt2": (".pt2", _export_pt2), "onnx": (".onnx", _export_onnx)}


def export_model(model: nn.Module, example_inputs, path: Union[str, os.PathLike],
                 formats: Union[str, Sequence[str]] = EXPORT_FORMATS, *, check_inputs=None, rtol: float = 1e-4,
                 strict: bool = True, log=None) -> dict:
    """Exports ``model`` to every format in ``formats`` as ``<path>.pt2`` / ``<path>.onnx`` and checks each
    against the eager model (see the module docstring).

    Args:
        model: the model (exported in eval mode on the CPU; its mode and device are restored afterwards).
        example_inputs: a batch tensor (or tuple of them) to trace with; the batch dimension is exported as
            dynamic (a batch of 1 is repeated to 2 for the trace, as a batch of 1 would be specialised).
        path: the output stem (``out/pruned_model`` -> ``out/pruned_model.onnx``, ``out/pruned_model.pt2``).
        formats: ``"onnx"``, ``"pt2"``, both (a sequence or ``"onnx,pt2"``).
        check_inputs: real inputs for the check (default: ``example_inputs``).
        rtol: the check passes when ``max |exported - eager| <= rtol * max(1, max |eager|)``.
        strict: raise :class:`ExportCheckError` when an export or its check fails (else it is only reported).
        log: a function for progress lines (default: none).

    Returns:
        ``{format: ExportResult}``.

    Raises:
        ValueError: an unknown format or bad inputs; ImportError: ONNX without the ``[export]`` extra.
        ExportCheckError: with ``strict``, for a failed export or check.
    """
    fmts = parse_formats(formats, "export_model: formats")
    if not fmts:
        raise ValueError("export_model: formats is empty; choose from " + ", ".join(EXPORT_FORMATS))
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_model: model must be an nn.Module, got {type(model).__name__}")
    if "onnx" in fmts:
        require_export_extra()
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0:
        raise ValueError(f"export_model: rtol must be a positive float, got {rtol!r}")
    log = log or (lambda _msg: None)
    args = tuple(a.detach().cpu() for a in _as_args(example_inputs))
    args = tuple(a.repeat(2, *([1] * (a.dim() - 1))) if a.shape[0] == 1 else a for a in args)
    check_args = tuple(a.detach().cpu() for a in _as_args(example_inputs if check_inputs is None else check_inputs))
    stem = Path(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    p0 = next(model.parameters(), None)
    device, was_training = (p0.device if p0 is not None else torch.device("cpu")), model.training
    model.cpu().eval()
    results = {}
    try:
        with torch.no_grad():
            expected = _outputs(model(*check_args))
        for fmt in fmts:
            suffix, exporter = _EXPORTERS[fmt]
            final = stem.with_name(stem.name + suffix)
            tmp = stem.with_name(f".{stem.name}.tmp{suffix}")
            t0 = time.perf_counter()
            try:
                got, extra = exporter(model, args, tmp, check_args)
                err, tol, scale, agree = _compare(expected, got, rtol)
                ok, error = err <= tol, None if err <= tol else f"max |{fmt} - eager| = {err:.3g} > tol {tol:.3g}"
            except ExportCheckError as exc:
                err = tol = scale = agree = None
                ok, error, extra = False, str(exc), {}
            except Exception as exc:  # an exporter's failure is reported (or raised below), whatever its type
                err = tol = scale = agree = None
                ok, error, extra = False, f"{type(exc).__name__}: {exc}", {}
            if ok:
                os.replace(tmp, final)
            elif tmp.exists():
                tmp.unlink()
            results[fmt] = ExportResult(fmt, str(final) if ok else None, ok, err, tol, scale, int(check_args[0].shape[0]),
                                        agree, time.perf_counter() - t0, error=error, **extra)
            log(f"export {fmt}: " + (f"{final} (max |{fmt} - eager| {err:.2e} <= {tol:.2e} on {check_args[0].shape[0]} "
                                      f"inputs, {results[fmt].seconds:.1f} s)" if ok else f"FAILED: {error}"))
    finally:
        model.to(device).train(was_training)
    failed = [r for r in results.values() if not r.ok]
    if strict and failed:
        raise ExportCheckError("; ".join(f"{r.format}: {r.error}" for r in failed))
    return results
