"""The catalysts' dynamics without the loss (catalyst-method.md section 9), and what the pruner derives from it.

Without loss gradients, SGD with momentum ``m`` on ``gamma R`` moves the ratio ``c_i = |d_i| / n_i`` of group
``i`` as ``dc_i/dt = lam (k_i c_i^2 - 1)`` per step, ``lam = lr gamma / (1 - m)``, where

    k_i = sum_{e in i} s_e w_e^2 / (c_i n_i^2),    s_e = sum of c_j over the groups j that hold element e.

``k_i = 1`` when no element of group ``i`` is in another group (BN mode); in group mode a conv's row is in its
output-channel group and its column in an input-channel group, so ``k_i`` is 1 plus the overlapped share of the
group's mass (about 1.6-1.8). The unstable fixed point is ``c*_i = 1 / sqrt(k_i)``, and the **corrected ratio**

    u_i = c_i sqrt(k_i) = sqrt(c_i Q_i) / n_i,    Q_i = sum_{e in i} s_e w_e^2,

follows ``du/dt = lam sqrt(k) (u^2 - 1)`` for every group whatever its structure: ``u = 1`` is the threshold of
every group in every mode. ``Q`` costs one fused ``penalty_`` call into zeroed buffers (the gradient it writes is
``s_e w_e``) and one ``group_norms`` call over ``sqrt(grad * w)`` (:class:`Coverage`).

From the same flow:

* **Initialisation** (:func:`threshold_corrected_catalysts`): ``d_i = c0 n_i / sqrt(k_i)``, so every group
  starts at ``u_i = c0``. ``k_i`` depends on the neighbours' ratios, so the start is a small fixed point
  (a few iterations).
* **Decision time** (:func:`steps_to_decide`): from ``u0`` to ``|log10 u| = kappa`` takes
  ``[ln|(U-1)/(U+1)| - ln|(u0-1)/(u0+1)|] / (2 lam sqrt(k))`` steps (``U = 10^{+-kappa}``), plus a few steps
  of momentum build-up.
* **gamma from the budget** (:func:`auto_gamma`): the ``lam`` that decides a channel starting ``AUTO_GAMMA_OFFSET``
  away from the threshold within ``AUTO_GAMMA_FRACTION`` of the step budget.
* **How far c can go** (:func:`reachable_log10`): on the prune side a step shrinks the group by ``lam k c``
  of itself, so ``c`` cannot usefully pass about ``1 / (lam k)``; a ``kappa`` above ``log10`` of that is never
  reached (the stop rule never fires).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import functional as F_cf

__all__ = [
    "AUTO_GAMMA_OFFSET",
    "AUTO_GAMMA_FRACTION",
    "Coverage",
    "CorrectedStats",
    "threshold_corrected_catalysts",
    "steps_to_decide",
    "auto_gamma",
    "effective_rate",
    "reachable_log10",
]

# gamma="auto": a channel that starts (or is pushed by the data) this far from the threshold, |u0 - 1|, decides
# within this fraction of the opt1 step budget; the rest of the budget is for the slower ones.
AUTO_GAMMA_OFFSET = 0.02
AUTO_GAMMA_FRACTION = 0.5
_MOMENTUM_STEPS = 10  # steps for momentum SGD to reach its steady velocity (added to predictions)


@dataclass
class CorrectedStats:
    """One evaluation of the groups (flat over all segments, fp64)."""

    norms: torch.Tensor  # n_i
    ratios: torch.Tensor  # c_i = |d_i| / n_i
    k: torch.Tensor  # k_i (1 where c_i or n_i is 0: undefined there, and not needed)
    u: torch.Tensor  # corrected ratio c_i sqrt(k_i): 0 where d_i = 0, inf where n_i = 0


class Coverage:
    """Computes ``Q_i = sum_{e in i} s_e w_e^2`` and the corrected ratios for a target set, reusing its buffers.

    ``weights`` and ``layout`` are a :class:`~catalyst_fused.pruning.targets.TargetSet`'s (rebuild the object
    when they change, e.g. after a removal)."""

    def __init__(self, weights: Sequence[torch.Tensor], layout, backend: str = "auto"):
        self.weights = list(weights)
        self.layout = layout
        self.backend = backend
        self._grads = [torch.zeros_like(w, memory_format=torch.contiguous_format) for w in self.weights]

    def __call__(self, catalysts: Sequence[torch.Tensor]) -> CorrectedStats:
        with torch.no_grad():
            # leaves sharing the weights' storage: the fused call writes s_e * w_e into our own buffers
            leaves = [w.detach().requires_grad_(True) for w in self.weights]
            for leaf, g in zip(leaves, self._grads):
                leaf.grad = g.zero_()
            cats = [d.detach().abs().requires_grad_(True) for d in catalysts]
            stats = F_cf.penalty_(leaves, cats, scale=1.0, layout=self.layout, backend=self.backend)
            # g * w = s_e w_e^2 >= 0; its square root has group norms^2 = Q (in place: the buffers are ours)
            roots = self._grads
            torch._foreach_mul_(roots, [w.detach() for w in self.weights])
            torch._foreach_clamp_min_(roots, 0.0)
            torch._foreach_sqrt_(roots)
            q = F_cf.group_norms(roots, layout=self.layout, backend=self.backend).double() ** 2
            for leaf in leaves:
                leaf.grad = None
        n, c = stats.norms.double(), stats.ratios.double()
        u = torch.sqrt(c * q) / n
        u = torch.where(n == 0, torch.full_like(u, math.inf), torch.where(c == 0, torch.zeros_like(u), u))
        defined = (n > 0) & (c > 0) & torch.isfinite(c)
        k = torch.where(defined, q / (c * n * n).clamp_min(1e-300), torch.ones_like(q))
        return CorrectedStats(n.cpu(), c.cpu(), k.cpu(), u.cpu())


def threshold_corrected_catalysts(weights: Sequence[torch.Tensor], layout, c0: float, *, backend: str = "auto",
                                  iters: int = 20, tol: float = 1e-6) -> tuple[list, CorrectedStats]:
    """Catalysts ``d_i = c0 n_i / sqrt(k_i)`` (every group starts at corrected ratio ``u_i = c0``), and the
    :class:`CorrectedStats` they give. ``k_i`` depends on the neighbours' ratios, so the start is iterated to
    a fixed point (``iters`` at most, until every ``u_i`` is within ``tol`` of ``c0`` relatively)."""
    cov = Coverage(weights, layout, backend)
    norms = F_cf.group_norms(weights, layout=layout, backend=backend).double().cpu()
    ratio = torch.full_like(norms, float(c0))
    for _ in range(max(int(iters), 1)):
        st = cov(_catalysts_from(ratio * norms, weights, layout))
        err = float(((st.u / c0) - 1).abs().nan_to_num(0.0).max()) if st.u.numel() else 0.0
        if err <= tol:
            break
        ratio = ratio * (c0 / st.u).nan_to_num(1.0, posinf=1.0, neginf=1.0)
    cats = _catalysts_from(ratio * norms, weights, layout)
    return [torch.nn.Parameter(d) for d in cats], cov(cats)


def _catalysts_from(flat: torch.Tensor, weights, layout) -> list[torch.Tensor]:
    sizes = [w.shape[0] for w in weights] if layout is None else list(layout.segment_sizes)
    return [d.to(device=weights[0].device, dtype=weights[0].dtype).clone() for d in torch.split(flat, sizes)]


def effective_rate(lr: float, gamma: float, momentum: float = 0.0) -> float:
    """``lam = lr gamma / (1 - momentum)``: the penalty's step per unit of ``c`` (momentum SGD's steady state)."""
    return float(lr) * float(gamma) / (1.0 - float(momentum))


def steps_to_decide(u0, k, lam: float, kappa: float) -> torch.Tensor:
    """Steps for the no-loss flow to take the corrected ratio from ``u0`` to ``10^kappa`` (``u0 > 1``) or
    ``10^-kappa`` (``u0 < 1``): ``[ln|(U-1)/(U+1)| - ln|(u0-1)/(u0+1)|] / (2 lam sqrt(k))`` plus the momentum
    build-up; ``inf`` at ``u0 = 1`` exactly (only the data moves a channel off the threshold)."""
    u0 = torch.as_tensor(u0, dtype=torch.float64)
    k = torch.as_tensor(k, dtype=torch.float64)
    if lam <= 0:
        return torch.full(torch.broadcast_shapes(u0.shape, k.shape), math.inf, dtype=torch.float64)
    big = 10.0 ** kappa
    end = torch.where(u0 > 1, torch.full_like(u0, big), torch.full_like(u0, 1 / big))
    start = torch.where(u0 > 1, torch.maximum(u0, torch.full_like(u0, 1.0)), u0)
    inside = ((start - 1) / (start + 1)).abs()
    target = ((end - 1) / (end + 1)).abs()
    steps = (torch.log(target) - torch.log(inside)) / (2 * lam * torch.sqrt(k))
    steps = torch.where(inside >= target, torch.zeros_like(steps), steps)  # already decided
    return torch.where(u0 == 1, torch.full_like(steps, math.inf), steps + _MOMENTUM_STEPS)


def auto_gamma(budget_steps: int, lr: float, momentum: float, k_mean: float, kappa: float, *,
               offset: float = AUTO_GAMMA_OFFSET, fraction: float = AUTO_GAMMA_FRACTION) -> float:
    """The gamma whose no-loss flow decides a channel starting at ``u0 = 1 + offset`` after ``fraction`` of
    ``budget_steps`` (``lr``, ``momentum``: the catalysts' optimizer settings; ``k_mean``: a typical ``k``)."""
    if budget_steps < 1:
        raise ValueError(f"auto gamma: the opt1 step budget must be >= 1, got {budget_steps}")
    steps = max(fraction * budget_steps - _MOMENTUM_STEPS, 1.0)
    u0 = 1.0 + offset
    big = 10.0 ** kappa
    span = math.log((big - 1) / (big + 1)) - math.log((u0 - 1) / (u0 + 1))
    lam = span / (2 * steps * math.sqrt(k_mean))
    return lam * (1.0 - momentum) / lr


def reachable_log10(lam: float, k_max: float) -> float:
    """``log10`` of the largest ratio the prune side can usefully reach, ``1 / (lam k)``: one step then
    shrinks the group by all of its mass."""
    return math.inf if lam <= 0 else -math.log10(lam * k_max)
