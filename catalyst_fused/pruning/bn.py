"""BatchNorm statistics that tell the truth about a model whose weights moved fast.

During the sparsity stage the weights shrink faster than BatchNorm's running averages follow (momentum 0.1
per batch), so an eval-mode accuracy uses statistics of an older network: measured on this project's pipeline
(catalyst-method.md section 9), eval mode reported 10.6% where re-estimated statistics gave 93-99% (small CNN)
and 31% where they gave 94-97% (ResNet-56). :func:`recalibrate_bn` re-estimates them from training batches
before an accuracy is reported or acted on.

    from catalyst_fused.pruning import recalibrate_bn
    recalibrate_bn(model, train_loader, batches=8)   # then evaluate as usual
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

__all__ = ["recalibrate_bn", "batchnorms"]

_BN = nn.modules.batchnorm._BatchNorm


def batchnorms(model: nn.Module) -> list:
    """The BatchNorm modules of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]


def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int, device: Optional[torch.device] = None) -> int:
    """Re-estimates the running mean and variance of every BatchNorm of ``model`` from the first ``batches``
    batches of ``loader`` (``(x, y)`` pairs or bare inputs), without gradients: the statistics are reset and
    averaged over exactly those batches (cumulative average, ``momentum=None``). Only the BatchNorm layers
    run in training mode (dropout and the like stay off); every module's mode and momentum is restored; no
    parameter changes and this function draws no random number (a ``DataLoader`` draws its base seed from the
    global generator unless it has its own ``generator``: give it one). If the loader yields nothing or the forward pass fails, the old statistics are kept. Returns the number of samples used (0 when the
    model has no BatchNorm with running statistics).

    Raises:
        ValueError: ``batches`` is not a positive integer, or ``loader`` yields no batch.
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"recalibrate_bn: batches must be a positive integer, got {batches!r}")
    bns = batchnorms(model)
    if not bns:
        return 0
    if device is None:
        ref = next(model.parameters(), None)
        device = ref.device if ref is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    saved = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns}
    samples = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i == batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))
                samples += int(x.shape[0])
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
        if samples == 0:  # nothing was seen (or the forward failed): the old statistics stay
            with torch.no_grad():
                for m, (mean, var, count) in saved.items():
                    m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)
    if samples == 0:
        raise ValueError("recalibrate_bn: the loader yielded no batch")
    return samples
