"""Cost and quality measurements: MACs/FLOPs (forward hooks), parameters, CPU latency, accuracy."""
from __future__ import annotations

import time
from typing import Iterable

import torch
from torch import nn

from .targets import example_batch, run_example

__all__ = ["count_flops", "count_params", "measure_latency", "evaluate"]


def count_flops(model: nn.Module, example_inputs) -> dict:
    """Multiply-accumulates of every ``nn.Conv2d`` and ``nn.Linear`` per sample, counted with forward hooks
    on one forward pass of ``example_inputs`` (one sample's shape such as ``(C, H, W)``, or example inputs
    as :func:`~catalyst_fused.pruning.targets.find_targets` takes them; the hooks read the first sample):
    conv ``H_out * W_out * C_out * (C_in / groups) * k_h * k_w``, linear ``in * out`` per position,
    ``nn.MultiheadAttention`` its input and output projections per query position. Returns
    ``{"macs": ..., "flops": 2 * macs}`` (BN, activations, pooling and biases are not counted)."""
    total = [0]

    def conv_hook(m, inp, out):
        total[0] += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inp, out):
        total[0] += m.in_features * m.out_features * (out[0].numel() // m.out_features)

    def attention_hook(m, inp, out):  # nn.MultiheadAttention's projections (its out_proj is not called as a module)
        q = inp[0]
        length = q.shape[0] if q.dim() == 2 or not m.batch_first else q.shape[1]
        total[0] += length * (m.in_proj_weight.numel() + m.out_proj.weight.numel()) if m.in_proj_weight is not None else 0

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.MultiheadAttention):
            handles.append(m.register_forward_hook(attention_hook))
    example = example_batch(model, example_inputs)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            run_example(model, example)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return {"macs": int(total[0]), "flops": int(2 * total[0])}


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def measure_latency(model: nn.Module, input_shape, *, batch_size: int = 64, repeats: int = 10, warmup: int = 2) -> dict:
    """Median and minimum wall time (milliseconds) of one eval-mode forward pass of a ``batch_size`` batch
    on the model's device (CPU for the reported figures)."""
    p = next(model.parameters())
    x = torch.randn(batch_size, *input_shape, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            if p.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if p.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    model.train(was_training)
    times.sort()
    return {"batch_size": batch_size, "median_ms": times[len(times) // 2], "min_ms": times[0], "repeats": repeats,
            "threads": torch.get_num_threads(), "device": str(p.device)}


def evaluate(model: nn.Module, loader: Iterable, device="cpu", loss_fn=None) -> dict:
    """Top-1 accuracy (percent) and mean loss (``loss_fn``, a mean over its batch; default cross-entropy) of
    ``model`` in eval mode over ``loader``."""
    was_training = model.training
    model.eval()
    correct = 0
    total = 0
    loss = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            if loss_fn is None:
                loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            else:
                loss += float(loss_fn(out, y)) * int(y.shape[0])
            correct += int((out.argmax(1) == y).sum())
            total += int(y.numel())
    model.train(was_training)
    return {"accuracy": 100.0 * correct / max(total, 1), "loss": loss / max(total, 1), "samples": total}
