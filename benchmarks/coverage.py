"""Which channels can be pruned at all: our targets against Torch-Pruning's dependency groups.

For a fixed list of torchvision, timm and Hugging Face models (random weights, nothing downloaded; the
optional packages are skipped when missing) this measures, per model and in a fresh process each:

* **ours**: ``catalyst_fused.pruning.find_targets`` (DepGraph groups checked by the channel tracking, plus
  attention heads, plus the trial removal it runs): groups, prunable channels, excluded groups and why,
  wall time and peak memory of the analysis, and the check that matters for surgery: after removing half
  of the channels of **every** group (seeded choice), the pruned model computes what the masked model
  computes (``pruned == masked``: largest absolute difference of the outputs against ``1e-4 * max(1,
  max |output|)`` on random inputs of batch 2);
* **Torch-Pruning**: ``DependencyGraph.build_dependency`` + ``get_all_groups`` (the layers whose outputs
  reach a model output ignored, as a user would), bounded by the same time and memory limits.

"Prunable channels" (the same definition for both): the output channels (weight rows) of every
``nn.Conv*`` / ``nn.Linear`` module, except the layers whose outputs are the model's outputs, that belong to
a group (ours: a producer or depthwise slice of a target; Torch-Pruning: a layer whose output channels are
pruned by one of its groups). Attention projections that are not ``nn.Linear`` modules
(``nn.MultiheadAttention.in_proj_weight``) are not counted for either.

    python benchmarks/coverage.py                          # every model; results/coverage.json + coverage.md
    python benchmarks/coverage.py --models tv:mobilenet_v2 hf:llama --no-tp
    python benchmarks/coverage.py --list

Results are merged into ``benchmarks/results/coverage.json`` by model (a rerun of some models keeps the
others) and rendered to ``benchmarks/results/coverage.md``; both are written atomically.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from configurations, never from the Hub

RESULTS = HERE / "results"

# name -> (family, builder arguments); built by build() in the worker process
MODELS = {
    "tv:resnet18": ("torchvision", {}),
    "tv:resnet50": ("torchvision", {}),
    "tv:densenet121": ("torchvision", {}),
    "tv:googlenet": ("torchvision", {"aux_logits": False, "init_weights": True}),
    "tv:squeezenet1_1": ("torchvision", {}),
    "tv:vgg16_bn": ("torchvision", {}),
    "tv:mobilenet_v2": ("torchvision", {}),
    "tv:mobilenet_v3_small": ("torchvision", {}),
    "tv:efficientnet_b0": ("torchvision", {}),
    "tv:regnet_x_400mf": ("torchvision", {}),
    "tv:resnext50_32x4d": ("torchvision", {}),
    "tv:convnext_tiny": ("torchvision", {}),
    "tv:vit_b_16": ("torchvision", {}),
    "tv:swin_t": ("torchvision", {}),
    "tv:shufflenet_v2_x1_0": ("torchvision", {}),
    "cf:mobilenetv2_cifar": ("catalyst_fused", {}),
    "cf:vit_cifar": ("catalyst_fused", {}),
    "timm:vit_tiny_patch16_224": ("timm", {}),
    "timm:convnext_atto": ("timm", {}),
    "timm:mobilenetv3_small_050": ("timm", {}),
    "timm:efficientnet_b0": ("timm", {}),
    "timm:regnetx_002": ("timm", {}),
    "hf:llama": ("transformers", {}),
    "hf:qwen2": ("transformers", {}),
    "hf:qwen3": ("transformers", {}),
    "hf:bert": ("transformers", {}),
}

# small Hugging Face configurations: 2 layers, width 64, 4 query heads (2 key/value heads where the family has GQA)
_HF_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)


def build(name: str):
    """``(model, example inputs, sample inputs of batch 2)`` for a model name of :data:`MODELS`."""
    import torch

    family, kwargs = MODELS[name]
    kind = name.split(":", 1)[1]
    gen = torch.Generator().manual_seed(0)
    if family == "transformers":
        import transformers as T

        make = {"llama": (T.LlamaForCausalLM, T.LlamaConfig, dict(num_key_value_heads=2)),
                "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config, dict(num_key_value_heads=2)),
                "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config, dict(num_key_value_heads=2, head_dim=16)),
                "bert": (T.BertForSequenceClassification, T.BertConfig, dict(num_labels=3))}[kind]
        model = make[0](make[1](**_HF_COMMON, **make[2]))
        ids = lambda n: torch.randint(0, _HF_COMMON["vocab_size"], (n, 16), generator=gen)  # noqa: E731
        return model, {"input_ids": ids(1), "use_cache": False}, {"input_ids": ids(2), "use_cache": False}
    if family == "timm":
        import timm

        model = timm.create_model(kind, pretrained=False, num_classes=10, **kwargs)
        shape = (3, 224, 224)
    elif family == "catalyst_fused":
        from catalyst_fused.models import build_model

        model, shape = build_model(kind, num_classes=10), (3, 32, 32)
    else:
        import torchvision

        model, shape = getattr(torchvision.models, kind)(weights=None, num_classes=10, **kwargs), (3, 224, 224)
    return model, torch.zeros(1, *shape), torch.randn(2, *shape, generator=gen)


def _randomize_norms(model, seed: int = 0) -> None:
    """BatchNorm statistics and affine parameters away from their initial 0/1, so that channels differ;
    weights initialised to zero (torchvision ViT's head) drawn at random, so that the outputs are not 0."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)


def _outputs(model, x) -> list:
    import torch

    from catalyst_fused.pruning.targets import run_example

    with torch.no_grad():
        out = run_example(model.eval(), x)
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _layer_rows(model, outputs: set) -> dict:
    from torch import nn

    return {n: int(m.weight.shape[0]) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and n not in outputs}


def _reason_kind(reason: str) -> str:
    """A reason without layer names, for counting."""
    reason = re.sub(r"\(.*?\)", "", reason)
    reason = re.sub(r"\b[\w-]+(?:\.[\w-]+)+\b", "<layer>", reason)
    return re.sub(r"\s+", " ", reason).strip()


def worker_ours(name: str, time_limit: float, memory_limit: float) -> dict:
    import torch

    from catalyst_fused.pruning import find_targets, mask_model, prune_model
    from catalyst_fused.pruning.limits import resident_bytes

    torch.manual_seed(0)
    model, example, sample = build(name)
    _randomize_norms(model)
    model.eval()
    base = (resident_bytes() or 0) / 2**20
    start = time.perf_counter()
    targets, excluded = find_targets(model, example, return_excluded=True, time_limit=time_limit, memory_limit=memory_limit)
    seconds = time.perf_counter() - start
    peak = _peak_mib()
    outputs = sorted({p for e in excluded if e["reason"].startswith("its channels are a model output") for p in e["producers"]})
    rows = _layer_rows(model, set(outputs))
    covered: dict = collections.defaultdict(set)
    for t in targets:
        for p in (*t.producers, *t.channelwise):
            if p.module in rows:
                covered[p.module].update(range(p.start, p.start + p.count))
    gen = torch.Generator().manual_seed(1)
    keep = {t.name: torch.randperm(t.channels, generator=gen)[: max(1, t.channels // 2)].sort().values for t in targets}
    check = {"ok": None}
    if targets:
        want = _outputs(mask_model(model, targets, keep), sample)
        got = _outputs(prune_model(model, targets, keep), sample)
        err, scale = float((got - want).abs().max()), float(want.abs().max())
        check = {"max_abs_err": err, "max_abs_output": scale, "tol": 1e-4 * max(scale, 1.0), "ok": err <= 1e-4 * max(scale, 1.0),
                 "removed": int(sum(t.channels - len(keep[t.name]) for t in targets))}
    return {
        "status": "ok", "groups": len(targets), "head_groups": sum(1 for t in targets if t.attention),
        "norm_groups": sum(1 for t in targets if t.norms), "channels": sum(rows.values()),
        "prunable": sum(len(v) for v in covered.values()), "output_layers": outputs, "seconds": seconds,
        "peak_rss_mib": peak, "rss_before_mib": base, "excluded": excluded,
        "excluded_kinds": dict(collections.Counter(_reason_kind(e["reason"]) for e in excluded
                                                   if not e["reason"].startswith("its channels are a model output"))),
        "pruned_equals_masked": check,
    }


def worker_tp(name: str, time_limit: float, memory_limit: float, outputs: list) -> dict:
    import torch
    import torch_pruning as tp
    from torch import nn

    from catalyst_fused.pruning.limits import AnalysisLimitError, bounded, resident_bytes
    from catalyst_fused.pruning.targets import run_example

    model, example, _ = build(name)
    model.eval()
    modules = dict(model.named_modules())
    if not outputs:  # our analysis failed: ignore the last Linear, as the examples of Torch-Pruning do
        outputs = [n for n, m in modules.items() if isinstance(m, nn.Linear)][-1:]
    ignored = [modules[n] for n in outputs]
    rows = _layer_rows(model, set(outputs))
    names = {m: n for n, m in modules.items()}
    base = (resident_bytes() or 0) / 2**20
    start = time.perf_counter()
    covered, groups, status = set(), 0, "ok"
    try:
        with bounded(f"Torch-Pruning on {name}", time_limit, memory_limit), torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example, forward_fn=run_example, verbose=False,
                output_transform=lambda out: getattr(out, "logits", out))
            for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                groups += 1
                for item in group:
                    mod = item.dep.target.module
                    if mod in names and names[mod] in rows and dg.is_out_channel_pruning_fn(item.dep.handler):
                        covered.add(names[mod])
    except AnalysisLimitError as exc:
        status = f"limit: {exc}"
    except Exception as exc:  # Torch-Pruning's own failure, reported as it is
        status = f"error: {type(exc).__name__}: {exc}"
    return {"status": status, "groups": groups, "channels": sum(rows.values()),
            "prunable": sum(rows[n] for n in covered), "seconds": time.perf_counter() - start,
            "peak_rss_mib": _peak_mib(), "rss_before_mib": base}


def _run_worker(args: list, timeout: float, limits: list) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.json"
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), *limits, "--json", str(out), "--worker", *args]
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": f"killed after {timeout:.0f} s"}
        if out.exists():
            return json.loads(out.read_text())
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": f"failed (exit {proc.returncode}): {' | '.join(tail)}"}


def _write_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _pct(r: dict) -> str:
    if not r or r.get("status") != "ok" or not r.get("channels"):
        return "-"
    return f"{100 * r['prunable'] / r['channels']:.1f}%"


def render(results: dict) -> str:
    """The Markdown table of a results dict (model -> record)."""
    lines = ["| model | groups (ours / TP) | prunable channels, ours | Torch-Pruning | analysis time (ours / TP) | "
             "peak memory (ours / TP) | pruned == masked (half of every group removed) | excluded groups: why |",
             "|---|---|---|---|---|---|---|---|"]
    for name in [n for n in MODELS if n in results] + sorted(set(results) - set(MODELS)):
        rec = results[name]
        ours, theirs = rec.get("ours", {}), rec.get("tp", {})

        def status(r):
            s = r.get("status", "-")
            return s if s == "ok" else re.sub(r"\s+", " ", s)[:110]

        if ours.get("status") == "ok":
            chk = ours["pruned_equals_masked"]
            check = "-" if chk.get("ok") is None else (f"{'yes' if chk['ok'] else '**NO**'} ({chk['max_abs_err']:.1e} "
                                                       f"of {chk['max_abs_output']:.1e})")
            kinds = "; ".join(f"{n}x {k}" for k, n in sorted(ours["excluded_kinds"].items(), key=lambda kv: -kv[1])[:3]) or "-"
            groups = f"{ours['groups']}"
            if ours.get("head_groups"):
                groups += f" ({ours['head_groups']} heads)"
        else:
            check, kinds, groups = "-", status(ours), "-"
        tp_groups = str(theirs.get("groups", "-")) if theirs.get("status") == "ok" else "-"
        tp_pct = _pct(theirs) if theirs.get("status") == "ok" else status(theirs) if theirs else "not run"
        time_s = f"{ours.get('seconds', float('nan')):.1f} s / " + (f"{theirs['seconds']:.1f} s" if "seconds" in theirs else "-")
        mem = f"{ours.get('peak_rss_mib', float('nan')) / 1024:.1f} / " + (
            f"{theirs['peak_rss_mib'] / 1024:.1f} GiB" if "peak_rss_mib" in theirs else "-")
        lines.append(f"| {name} | {groups} / {tp_groups} | {_pct(ours)} | {tp_pct} | {time_s} | {mem} | {check} | {kinds} |")
    return "\n".join(lines) + "\n"


def _environment() -> dict:
    import torch
    import torch_pruning

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "torch_pruning": getattr(torch_pruning, "__version__", "?")}
    for pkg in ("torchvision", "timm", "transformers"):
        try:
            env[pkg] = __import__(pkg).__version__
        except ImportError:
            env[pkg] = None
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                    text=True).stdout.strip()
    except OSError:
        env["git"] = None
    return env


def _available(name: str) -> bool:
    family = MODELS[name][0]
    if family in ("timm", "transformers", "torchvision"):
        try:
            __import__(family)
        except ImportError:
            return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help="model names (default: all; see --list)")
    ap.add_argument("--list", action="store_true", help="print the model names and exit")
    ap.add_argument("--no-tp", action="store_true", help="do not run Torch-Pruning's groups")
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds per analysis (default 600)")
    ap.add_argument("--memory-limit", type=float, default=6.0, help="GiB of memory growth per analysis (default 6)")
    ap.add_argument("--out", default=str(RESULTS / "coverage.json"), help="results JSON (merged by model)")
    ap.add_argument("--table", default=None, help="Markdown table (default: the JSON's name with .md)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        tool, name, *rest = args.worker
        limit, memory = args.time_limit, args.memory_limit * 2**30
        result = worker_ours(name, limit, memory) if tool == "ours" else worker_tp(name, limit, memory, rest)
        _write_atomic(pathlib.Path(args.json), json.dumps(result, default=str))
        return 0
    if args.list:
        print("\n".join(MODELS))
        return 0
    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {unknown}; see --list")
    out = pathlib.Path(args.out)
    table = pathlib.Path(args.table) if args.table else out.with_suffix(".md")
    results = json.loads(out.read_text()) if out.exists() else {}
    env = _environment()
    timeout = args.time_limit + 300  # model building, imports and the pruned == masked check beside the limit
    limits = ["--time-limit", str(args.time_limit), "--memory-limit", str(args.memory_limit)]
    for k, name in enumerate(names, 1):
        if not _available(name):
            print(f"[{k}/{len(names)}] {name}: skipped ({MODELS[name][0]} is not installed)", flush=True)
            continue
        print(f"[{k}/{len(names)}] {name}: ours ...", end="", flush=True)
        ours = _run_worker(["ours", name], timeout, limits)
        print(f" {ours.get('status')}, {_pct(ours)} in {ours.get('seconds', float('nan')):.1f} s", end="", flush=True)
        rec = {"ours": ours, "environment": env}
        if not args.no_tp:
            print("; Torch-Pruning ...", end="", flush=True)
            rec["tp"] = _run_worker(["tp", name, *ours.get("output_layers", [])], timeout, limits)
            print(f" {str(rec['tp'].get('status'))[:60]}, {_pct(rec['tp'])}", end="", flush=True)
        elif name in results and "tp" in results[name]:
            rec["tp"] = results[name]["tp"]
        print(flush=True)
        results[name] = rec
        _write_atomic(out, json.dumps(results, indent=1, default=str))
        _write_atomic(table, render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
