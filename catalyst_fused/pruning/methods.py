"""Catalyst and the baselines it is compared with, behind one interface, on the same fused kernels.

Every method trains the same target set (the groups of :mod:`.targets`) during the sparsity stage
("opt1") and turns it into one *decision statistic* per channel, in decades, where larger means "prune":

=============== ============================================ ==================================== ==========
method          training (objective / step)                  statistic ``s``                      decision
=============== ============================================ ==================================== ==========
``catalyst``    ``L + gamma R(W, d)``, ``d`` trained          ``log10 c = log10 |d| / n``         ``s > kappa``
``group_lasso`` ``L + gamma sum_i n_i`` (``d = 1``, frozen)   ``-log10 n``                         see below
``slimming``    ``L + gamma sum_i |bn.gamma_i|`` (BN mode)    ``-log10 |bn.gamma|``                see below
``lats``        elementwise soft threshold (proximal L1)     ``-log10 n``                         see below
``lats_group``  group soft threshold (proximal Group Lasso)  ``-log10 n``                         see below
=============== ============================================ ==================================== ==========

* Group Lasso and network slimming are the Catalyst penalty with constant catalysts (catalyst-method.md
  section 2), so they run through the same fused ``penalty_`` call; only the catalyst gradient is dropped.
  Network slimming always uses BN-scale groups without the shift (its definition, Liu et al. 2017).
* LATS (section 7) is proximal SGD with a constant ``lam = gamma``: after every optimizer step the weights
  are soft-thresholded by ``gamma * lr``, so the cumulative threshold is ``t_k = gamma * sum_{s<k} lr_s``
  (the LATS schedule; reported as ``final_threshold``). ``lats`` thresholds every element of the tensors
  that hold the groups (unstructured, its original form; a channel becomes removable when its whole group
  is zero); ``lats_group`` scales each group by ``max(0, 1 - gamma lr / n_i)``, the proximal step of Group
  Lasso, with the norms from the fused kernel.
* Baseline decisions: with a target speed-up, channels are removed in decreasing order of ``s`` (a global
  ranking, as network slimming does) until the FLOPs ratio reaches the target; without one, channels with
  ``n_i <= norm_threshold`` are removed. They have no notion of "undecided": their stop rule is the epoch
  budget. A layer never loses all its channels (the channel with the smallest ``s`` stays).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .. import functional as F_cf

__all__ = ["METHODS", "PruningMethod", "get_method", "rank_decisions", "decision_flips", "spearman"]

# log10 of a norm or ratio; zeros map to -300 (a zero filter's c is +inf: always prunable).
_TINY = 1e-300


def _log10(x: torch.Tensor) -> torch.Tensor:
    return torch.log10(x.detach().double().cpu().clamp_min(_TINY))


class PruningMethod:
    """Base class: what a method does around each optimizer step and how it scores channels."""

    name = ""
    statistic = "-log10 n"
    trains_catalysts = False  # are the catalysts optimizer parameters?
    uses_catalysts = False  # does training need catalyst vectors at all?
    self_deciding = False  # does the method decide without a threshold or a target (Catalyst's c rule)?

    def effective_mode(self, mode: str, bn_beta: bool) -> tuple[str, bool]:
        return mode, bn_beta

    def init_catalysts(self, ts, c0: float) -> list[torch.Tensor]:
        """Catalyst vectors (one per segment); constant ones for the constant-catalyst baselines."""
        if not self.uses_catalysts:
            return []
        sizes = [w.shape[0] for w in ts.weights] if ts.layout is None else list(ts.layout.segment_sizes)
        return [torch.ones(s, dtype=ts.weights[0].dtype, device=ts.weights[0].device) for s in sizes]

    def after_backward(self, ts, catalysts: Sequence[torch.Tensor], gamma: float) -> None:
        """Adds the penalty's gradient (between ``loss.backward()`` and ``optimizer.step()``)."""

    def after_step(self, ts, gamma: float, lr: float) -> None:
        """The proximal part of the step (after ``optimizer.step()``)."""

    def norms(self, ts, weights: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        return F_cf.group_norms(ts.weights if weights is None else weights, layout=ts.layout)

    def scores(self, ts, catalysts, weights: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
        """The decision statistic per segment (fp64, CPU; larger = prune)."""
        norms = self.norms(ts, weights)
        return list(torch.split(-_log10(norms), _segment_sizes(ts)))


def _segment_sizes(ts) -> list[int]:
    return [w.shape[0] for w in ts.weights] if ts.layout is None else list(ts.layout.segment_sizes)


class Catalyst(PruningMethod):
    name = "catalyst"
    statistic = "log10 c"
    trains_catalysts = True
    uses_catalysts = True
    self_deciding = True

    def init_catalysts(self, ts, c0: float) -> list[torch.Tensor]:
        return F_cf.init_catalysts(ts.weights, c0=c0, layout=ts.layout)

    def after_backward(self, ts, catalysts, gamma: float) -> None:
        F_cf.penalty_(ts.weights, catalysts, scale=gamma, layout=ts.layout)

    def scores(self, ts, catalysts, weights=None) -> list[torch.Tensor]:
        with torch.no_grad():
            stats = F_cf.penalty(ts.weights if weights is None else weights, catalysts, layout=ts.layout,
                                 return_stats=True)
        return list(torch.split(_log10(stats.ratios), _segment_sizes(ts)))


class GroupLasso(PruningMethod):
    """``gamma * sum_i n_i``: the Catalyst penalty with ``d = 1`` frozen (subgradient descent)."""

    name = "group_lasso"
    uses_catalysts = True

    def after_backward(self, ts, catalysts, gamma: float) -> None:
        F_cf.penalty_(ts.weights, catalysts, scale=gamma, layout=ts.layout)
        for d in catalysts:  # constant catalysts: their gradient is not used (zeroed, not freed: no realloc per step)
            d.grad.zero_()


class NetworkSlimming(GroupLasso):
    """L1 on BN scales (Liu et al. 2017): Group Lasso over one-element groups ``bn.gamma_i``."""

    name = "slimming"
    statistic = "-log10 |bn.gamma|"

    def effective_mode(self, mode: str, bn_beta: bool) -> tuple[str, bool]:
        return "bn", False


class LATS(PruningMethod):
    """Elementwise soft threshold with the LATS schedule (proximal L1, ``lam = gamma`` constant)."""

    name = "lats"

    def after_step(self, ts, gamma: float, lr: float) -> None:
        tau = gamma * lr
        with torch.no_grad():
            for w in ts.weights:
                w.copy_(torch.sign(w) * (w.abs() - tau).clamp_min(0))


class LATSGroup(PruningMethod):
    """Group soft threshold ``F_i <- F_i max(0, 1 - gamma lr / n_i)``: proximal Group Lasso, LATS schedule."""

    name = "lats_group"

    def after_step(self, ts, gamma: float, lr: float) -> None:
        tau = gamma * lr
        with torch.no_grad():
            norms = self.norms(ts)
            factors = (1 - tau / norms.clamp_min(_TINY)).clamp_min(0)
            scale_groups_(ts.weights, ts.layout, factors)


def scale_groups_(weights: Sequence[torch.Tensor], layout, factors: torch.Tensor) -> None:
    """Multiplies every slice of group ``i`` by ``factors[i]`` (flat, segments in order), in place."""
    if layout is None:
        for w, f in zip(weights, torch.split(factors, [w.shape[0] for w in weights])):
            w.mul_(f.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))
        return
    starts = [0]
    for s in layout.segment_sizes[:-1]:
        starts.append(starts[-1] + s)
    for tensor, dim, start, count, segment, offset in layout.member_table.tolist():
        w = weights[tensor]
        f = factors[starts[segment] + offset : starts[segment] + offset + count].to(w.dtype)
        shape = [1] * w.dim()
        shape[dim] = count
        w.narrow(dim, start, count).mul_(f.view(shape))


METHODS: dict[str, type] = {m.name: m for m in (Catalyst, GroupLasso, NetworkSlimming, LATS, LATSGroup)}


def get_method(name: str) -> PruningMethod:
    if name not in METHODS:
        raise ValueError(f"--method: unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]()


# --------------------------------------------------------------------------------------------- decisions
def threshold_decisions(scores: Sequence[torch.Tensor], threshold: float) -> list[torch.Tensor]:
    """Prune masks ``s > threshold`` per segment; a segment never loses its last channel."""
    masks = []
    for s in scores:
        prune = s > threshold
        if bool(prune.all()):
            prune = prune.clone()
            prune[int(torch.argmin(s))] = False
        masks.append(prune)
    return masks


def _rank_order(scores: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """(segment, channel) pairs in pruning order: decreasing ``s`` (ties by position), skipping the last
    channel of each segment so that no layer is emptied."""
    flat = torch.cat(list(scores))
    seg = torch.cat([torch.full((len(s),), k, dtype=torch.long) for k, s in enumerate(scores)])
    idx = torch.cat([torch.arange(len(s)) for s in scores])
    order = sorted(range(flat.numel()), key=lambda j: (-float(flat[j]), j))
    left = [len(s) for s in scores]
    out = []
    for j in order:
        k = int(seg[j])
        if left[k] > 1:
            left[k] -= 1
            out.append((k, int(idx[j])))
    return out


def _masks_from(pairs, scores) -> list[torch.Tensor]:
    masks = [torch.zeros(len(s), dtype=torch.bool) for s in scores]
    for k, i in pairs:
        masks[k][i] = True
    return masks


def rank_decisions(scores: Sequence[torch.Tensor], speedup_of: Callable[[list], float], target: float) -> list[torch.Tensor]:
    """The fewest channels, taken in decreasing order of ``s``, whose removal reaches ``target`` (FLOPs ratio
    given by ``speedup_of(masks)``; binary search, the ratio grows with every removed channel). Removes
    everything removable if the target cannot be reached."""
    order = _rank_order(scores)
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if speedup_of(_masks_from(order[:mid], scores)) >= target:
            hi = mid
        else:
            lo = mid + 1
    return _masks_from(order[:lo], scores)


def top_k_decisions(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    return _masks_from(_rank_order(scores)[:k], scores)


def decision_flips(decide: Callable[[list], list], scores_of: Callable[[list], list], weights: Sequence[torch.Tensor],
                   reference: Sequence[torch.Tensor], *, noise: float = 0.01, draws: int = 5, seed: int = 0) -> dict:
    """How many decisions flip when every weight element gets relative Gaussian noise,
    ``w * (1 + noise * eps)``: the mean and max over ``draws`` of the flipped fraction of channels.

    ``scores_of(weights)`` recomputes the statistic on perturbed weights, ``decide(scores)`` applies the
    method's decision rule, ``reference`` is the unperturbed prune masks."""
    gen = torch.Generator().manual_seed(seed)
    ref = torch.cat([m.cpu() for m in reference])
    fractions = []
    for _ in range(draws):
        noisy = [w.detach() * (1 + noise * torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w)) for w in weights]
        masks = torch.cat([m.cpu() for m in decide(scores_of(noisy))])
        fractions.append(float((masks != ref).double().mean()))
    return {"noise": noise, "draws": draws, "mean_flip_fraction": sum(fractions) / len(fractions),
            "max_flip_fraction": max(fractions), "noise_model": "w * (1 + noise * N(0, 1)) per element"}


def spearman(x: torch.Tensor, y: torch.Tensor) -> Optional[float]:
    """Spearman rank correlation (average ranks for ties); None when either side is constant."""
    def ranks(v: torch.Tensor) -> torch.Tensor:
        v = v.double().flatten()
        order = torch.argsort(v, stable=True)
        r = torch.empty_like(v)
        sorted_v = v[order]
        i = 0
        n = v.numel()
        while i < n:
            j = i
            while j + 1 < n and sorted_v[j + 1] == sorted_v[i]:
                j += 1
            r[order[i : j + 1]] = (i + j) / 2.0
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return None if den == 0 else float((rx * ry).sum()) / den
