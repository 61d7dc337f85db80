"""The pruned model as safe files: weights (safetensors) plus a JSON pruning spec, and the way back.

    cf.pruning.save_pruned(model, "out/pruned_model", pruner=pruner)    # out/pruned_model.safetensors + .json
    model = cf.load_pruned(SmallCNN(), "out/pruned_model.safetensors")  # or a factory, or "small_cnn"

Nothing in these files is code: the weights are a safetensors file (tensors and a string header) and the spec
is JSON, so loading executes nothing and needs no pickled class. :func:`load_pruned` rebuilds the narrower
model from the **original definition** (a fresh instance, a factory, or a model name of
:mod:`catalyst_fused.models`) by replaying the recorded removals with the same surgery the pruner used
(:func:`~catalyst_fused.pruning.surgery.prune_model`; no trace, no example inputs), then loads the weights.

The spec (``<stem>.json``, format :data:`FORMAT`) holds:

* ``architecture``: the original model's class (module and qualified name), the name and arguments it was
  built with when it came from :func:`catalyst_fused.models.build_model` (else null), and the shape of every
  tensor of its ``state_dict`` **before** pruning (the identity :func:`load_pruned` checks the given model
  against);
* ``removals``: the pruner's history (``Pruner.state_dict()["history"]``): per ``prune()`` call, the targets
  as they were (each a group of module slices, :class:`~catalyst_fused.pruning.targets.Target`) and the kept
  channel indices of every target that lost some;
* ``widths``: per module whose width changed, its widths before and after (for people; checked on load);
* ``tensors``: name, shape and dtype of every saved tensor; ``weights``: the weights file's name, size and
  SHA-256.

The safetensors header carries the format and the SHA-256 of the spec (less its ``weights`` entry), so a
spec and a weights file that do not belong together, a truncated or edited file, or a foreign file give a
:class:`PrunedModelError` naming the file and what is wrong. (The digests detect damage and mismatched
pairs, not a deliberate forgery: whoever can edit the files can recompute them. A forged file still
cannot run code; at worst it holds other weights.)

The weights file is written first and the spec last (each through a temporary file and a rename), so a spec
on disk always has its weights.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .surgery import prune_model
from .targets import Target, target_from_dict

__all__ = ["FORMAT", "PrunedModelError", "save_pruned", "load_pruned", "read_pruned_spec", "pruned_paths",
           "original_shapes", "architecture_id"]

FORMAT = "catalyst_fused.pruned_model/1"
_SUFFIXES = (".safetensors", ".json")


class PrunedModelError(ValueError):
    """A pruned-model file that cannot be used: not ours, damaged, or not matching the model given."""


def _require_safetensors():
    try:
        import safetensors.torch  # noqa: F401
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - safetensors is in requirements.txt and the [pruning] extra
        raise ImportError("the pruned-model files need safetensors: pip install 'catalyst_fused[pruning]' "
                          "(or: pip install safetensors)") from exc
    return safetensors.torch, safe_open


def pruned_paths(path: Union[str, os.PathLike]) -> tuple[Path, Path]:
    """``(weights, spec)`` paths for ``path``: a stem (``out/pruned_model``), either of the two files, or a
    directory (then ``<dir>/pruned_model``).

    Raises:
        PrunedModelError: for a path with another suffix that exists (e.g. an old pickled ``pruned_model.pt``).
    """
    p = Path(path)
    if p.is_dir():
        p = p / "pruned_model"
    elif p.suffix in _SUFFIXES:
        p = p.with_suffix("")
    elif p.suffix and p.exists():
        hint = (" Runs before the safe format wrote pruned_model.pt as a pickled nn.Module; it cannot be loaded "
                "without running pickled code (torch.load(weights_only=False), only for a file you trust). Rerun, "
                "or --resume the finished run, to write pruned_model.safetensors and pruned_model.json."
                if p.suffix == ".pt" else "")
        raise PrunedModelError(f"{p} is not a pruned model of catalyst_fused (expected <stem>.safetensors and "
                               f"<stem>.json).{hint}")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def architecture_id(model: nn.Module) -> str:
    """The class that identifies a model's architecture: ``module.QualifiedName``."""
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _target(d: Mapping) -> Target:
    return target_from_dict(d)


def _direct(shapes: Mapping[str, list], module: str) -> list[str]:
    return [k for k in shapes if k.rpartition(".")[0] == module]


def original_shapes(shapes: Mapping[str, Sequence[int]], removals: Sequence[Mapping]) -> dict:
    """The ``state_dict`` shapes before ``removals`` (a pruner's history), from the shapes after them: every
    removal widened back by the channels it took from each module slice (the inverse of
    :func:`~catalyst_fused.pruning.surgery.prune_model`: producer rows, biases and BatchNorm entries along
    dim 0, consumer input columns along dim 1)."""
    out = {k: list(v) for k, v in shapes.items()}
    for record in reversed(list(removals)):
        for module in record.get("created_biases", []):  # biases a constant fold created did not exist before
            out.pop(f"{module}.bias", None)
        by_name = {t["name"]: _target(t) for t in record["targets"]}
        removed: dict = {}  # (tensor key or module, dim) -> positions removed, in its own indexing before the removal
        for name, kept_idx in record["keep"].items():
            t, kept = by_name[name], set(int(i) for i in kept_idx)
            for p, dim in t.module_slices():
                removed.setdefault((p.module, dim), set()).update(
                    p.start + j for j in range(p.count) if p.offset + j // p.width not in kept)
            for p in t.params:
                removed.setdefault((p.param, p.dim, "param"), set()).update(
                    p.start + j for j in range(p.count) if p.offset + j // p.width not in kept)
        for key, positions in removed.items():
            if len(key) == 3:  # a free parameter
                if key[0] in out:
                    out[key[0]][key[1]] += len(positions)
                continue
            module, dim = key
            for k in _direct(out, module):
                if len(out[k]) > dim:
                    out[k][dim] += len(positions)
    return out


def _widths(m: nn.Module, shapes: Optional[Mapping] = None, name: str = "") -> Optional[dict]:
    """A Conv2d / Linear / BatchNorm module's channel widths (None for other modules): its own, or as they
    follow from the ``state_dict`` shapes ``shapes`` (``name``: the module's name there)."""
    prefix = f"{name}." if name else ""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        key = next((prefix + k for k in ("weight", "running_mean") if shapes and prefix + k in shapes), None)
        return {"num_features": shapes[key][0] if key else m.num_features}
    if not isinstance(m, (nn.Conv2d, nn.Linear)):
        return None
    out_w, in_w = (shapes[prefix + "weight"][:2] if shapes is not None else m.weight.shape[:2])
    if isinstance(m, nn.Conv2d):
        return {"in_channels": int(in_w) * m.groups, "out_channels": int(out_w)}
    return {"in_features": int(in_w), "out_features": int(out_w)}


def _changed_widths(model: nn.Module, before: Mapping) -> dict:
    """``{module: {"before": widths, "after": widths}}`` for every module whose widths changed."""
    out = {}
    for name, m in model.named_modules():
        after = _widths(m)
        if after is not None and _widths(m, before, name) != after:
            out[name] = {"before": _widths(m, before, name), "after": after}
    return out


def _spec_digest(spec: Mapping) -> str:
    core = {k: v for k, v in spec.items() if k != "weights"}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_pruned(model: nn.Module, path: Union[str, os.PathLike], *, pruner=None,
                removals: Optional[Sequence[Mapping]] = None, builder: Optional[Mapping] = None) -> tuple[Path, Path]:
    """Writes ``model`` (pruned) as ``<stem>.safetensors`` (its ``state_dict``) and ``<stem>.json`` (the spec;
    see the module docstring). Returns the two paths.

    Args:
        model: the pruned model (after the bypass formulation's fold, if it was used).
        path: the stem, either file name, or a directory (``<dir>/pruned_model``).
        pruner: the :class:`~catalyst_fused.pruning.Pruner` that pruned ``model`` (its history is the spec's
            ``removals``); or give ``removals`` directly (``[]`` for an unpruned model).
        builder: how :func:`catalyst_fused.models.build_model` built the original, e.g. ``{"name": "small_cnn",
            "num_classes": 10, "in_channels": 1}``; lets :func:`load_pruned` take the model's name.

    Raises:
        ValueError: for a model that still carries the bypass (fold it first), a pruner of another model,
            or both / neither of ``pruner`` and ``removals``.
    """
    from . import bypass

    st, _ = _require_safetensors()
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_pruned: model must be an nn.Module, got {type(model).__name__}")
    if (pruner is None) == (removals is None):
        raise ValueError("save_pruned: pass either the pruner that pruned the model (pruner=) or its removals "
                         "(removals=, [] for none)")
    if pruner is not None:
        if pruner.model is not model:
            raise ValueError("save_pruned: pruner= pruned another model than the one given")
        removals = pruner.state_dict()["history"]
    if bypass.is_wrapped(model):
        raise ValueError("save_pruned: the model still carries the bypass (formulation 'bypass'); call pruner.fold() "
                         "first, so that it has its original architecture")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    shapes = {k: list(v.shape) for k, v in state.items()}
    removals = json.loads(json.dumps(list(removals)))  # plain JSON values (ints, lists, dicts)
    before = original_shapes(shapes, removals)
    spec = {
        "format": FORMAT,
        "architecture": {"class": architecture_id(model), "builder": None if builder is None else dict(builder),
                         "original_shapes": before},
        "removals": removals,
        "widths": _changed_widths(model, before),
        "tensors": {k: {"shape": shapes[k], "dtype": str(v.dtype).replace("torch.", "")} for k, v in state.items()},
    }
    weights_path, spec_path = pruned_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    data = st.save(state, metadata={"format": FORMAT, "spec_sha256": _spec_digest(spec)})
    _write_atomic(weights_path, data)
    spec["weights"] = {"file": weights_path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write_atomic(spec_path, (json.dumps(spec, indent=1) + "\n").encode())
    return weights_path, spec_path


def read_pruned_spec(path: Union[str, os.PathLike]) -> dict:
    """The JSON spec of a pruned model (``path`` as :func:`save_pruned` takes it), checked to be ours.

    Raises:
        FileNotFoundError: no spec file.
        PrunedModelError: a file that is not a pruned-model spec of catalyst_fused (or another version of it).
    """
    _, spec_path = pruned_paths(path)
    if not spec_path.is_file():
        raise FileNotFoundError(f"load_pruned: no pruning spec at {spec_path} (save_pruned writes <stem>.json beside "
                                "<stem>.safetensors)")
    try:
        spec = json.loads(spec_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrunedModelError(f"{spec_path} is not a pruning spec of catalyst_fused (not JSON: {exc}; truncated?)") from exc
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise PrunedModelError(f"{spec_path} is not a pruning spec of catalyst_fused (format {found!r}, expected "
                               f"{FORMAT!r})")
    missing = [k for k in ("architecture", "removals", "tensors", "weights") if k not in spec]
    if missing:
        raise PrunedModelError(f"{spec_path}: the spec lacks {', '.join(missing)} (damaged or edited)")
    return spec


def _read_weights(weights_path: Path, spec: dict, spec_path: Path) -> dict:
    """The tensors of the weights file, after checking its size and digest against the spec and the spec's
    digest against the file's header."""
    _, safe_open = _require_safetensors()
    if not weights_path.is_file():
        raise FileNotFoundError(f"load_pruned: no weights file {weights_path} for the spec {spec_path}")
    expected = spec["weights"]
    data = weights_path.read_bytes()
    if len(data) != expected.get("bytes"):
        raise PrunedModelError(f"{weights_path} has {len(data)} bytes but its spec {spec_path.name} records "
                               f"{expected.get('bytes')} (truncated, or not the weights of this spec)")
    if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
        raise PrunedModelError(f"{weights_path}: its SHA-256 differs from the one in {spec_path.name} (the file was "
                               "modified, or is not the weights of this spec)")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise PrunedModelError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise PrunedModelError(f"{weights_path} is not a pruned model of catalyst_fused (header format "
                               f"{meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("spec_sha256") != _spec_digest(spec):
        raise PrunedModelError(f"{spec_path} was modified after it was written, or belongs to other weights (its digest "
                               f"differs from the one recorded in {weights_path.name})")
    return tensors


def _original_model(model_or_factory, spec: dict, spec_path: Path) -> nn.Module:
    if isinstance(model_or_factory, nn.Module):
        return model_or_factory
    if isinstance(model_or_factory, str):
        from ..models import build_model

        builder = spec["architecture"].get("builder")
        if not builder or builder.get("name") != model_or_factory:
            raise PrunedModelError(f"load_pruned: {spec_path} was not saved from a model built by name "
                                   f"{model_or_factory!r} (builder {builder!r}); pass the original model or a factory")
        return build_model(builder["name"], num_classes=builder.get("num_classes"), in_channels=builder.get("in_channels"),
                           image_size=builder.get("image_size"))
    if callable(model_or_factory):
        model = model_or_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"load_pruned: the factory returned a {type(model).__name__}, not an nn.Module")
        return model
    raise TypeError("load_pruned: model_or_factory must be the original nn.Module (freshly built), a callable that "
                    f"builds it, or a model name of catalyst_fused.models; got {type(model_or_factory).__name__}")


def _shape_differences(expected: Mapping, actual: Mapping, limit: int = 5) -> str:
    lines = [f"{k}: missing in the model" for k in expected if k not in actual]
    lines += [f"{k}: not in the file" for k in actual if k not in expected]
    lines += [f"{k}: {list(actual[k])} in the model, {list(expected[k])} in the file" for k in expected
              if k in actual and list(actual[k]) != list(expected[k])]
    more = f"; and {len(lines) - limit} more" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


def load_pruned(model_or_factory: Union[nn.Module, Callable[[], nn.Module], str], path: Union[str, os.PathLike], *,
                check_class: bool = True) -> nn.Module:
    """Rebuilds a pruned model from the original definition and the files :func:`save_pruned` wrote.

    Args:
        model_or_factory: the **original** (unpruned) model, freshly built (it is pruned in place and
            returned); or a callable that builds it; or a model name of :mod:`catalyst_fused.models` when the
            files were saved from a model built by that name (the workflow's named models).
        path: the stem, either file, or a run's output directory.
        check_class: require the model's class to be the one the files were saved from.

    Returns:
        the narrower model with the saved weights (in the mode the given model was in; call ``.eval()``).

    Raises:
        FileNotFoundError: a missing spec or weights file.
        PrunedModelError (a ValueError): a foreign, truncated or modified file, a spec and weights that do not
            belong together, or a model that is not the original architecture (class or shapes differ).
    """
    weights_path, spec_path = pruned_paths(path)
    spec = read_pruned_spec(spec_path)
    tensors = _read_weights(weights_path, spec, spec_path)
    model = _original_model(model_or_factory, spec, spec_path)
    arch = spec["architecture"]
    if check_class and architecture_id(model) != arch.get("class"):
        raise PrunedModelError(f"load_pruned: {spec_path.name} was saved from a {arch.get('class')} but the model given "
                               f"is a {architecture_id(model)} (check_class=False skips this check)")
    fresh = {k: list(v.shape) for k, v in model.state_dict().items()}
    if fresh != arch.get("original_shapes"):
        raise PrunedModelError(f"load_pruned: the model given is not the original architecture of {spec_path.name} (pass a "
                               "freshly built, unpruned model with the same arguments): "
                               + _shape_differences(arch.get("original_shapes") or {}, fresh))
    for k, record in enumerate(spec["removals"]):
        try:
            targets = [_target(t) for t in record["targets"]]
            keep = {name: torch.as_tensor(idx, dtype=torch.long) for name, idx in record["keep"].items()}
            prune_model(model, targets, keep, inplace=True)
            modules = dict(model.named_modules())
            for name in record.get("created_biases", []):  # biases a constant fold created; values come with the weights
                m = modules[name]
                m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device))
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
            raise PrunedModelError(f"load_pruned: removal {k} of {spec_path.name} does not apply to this model "
                                   f"({type(exc).__name__}: {exc}); the spec is damaged or for another model") from exc
    now = {k: list(v.shape) for k, v in model.state_dict().items()}
    saved = {k: list(v.shape) for k, v in tensors.items()}
    if now != saved:
        raise PrunedModelError(f"load_pruned: the rebuilt model's tensors differ from the ones in {weights_path.name}: "
                               + _shape_differences(saved, now))
    model.load_state_dict(tensors, strict=True)  # copies into the model's tensors (their device and dtype)
    return model
