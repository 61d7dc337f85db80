"""What Catalyst does around every optimizer step besides the penalty: threshold tracking, freezing of decided
channels, the feedback to a target speed-up, the end of the budget and the prune side's pull
(catalyst-method.md section 9).

After every optimizer step, :class:`CatalystControl` evaluates the corrected ratio
``u_i = c_i sqrt(k_i)`` of every group (:class:`~.dynamics.Coverage`) and, for the channels that are still
undecided:

1. **Threshold tracking.** ``k_i`` changes as the weights change (in group mode an overlapped element shrinks
   under two catalysts, a BN entry under one, so the overlapped share falls and ``c*_i = 1 / sqrt(k_i)`` rises:
   measured on ResNet-56 without the loss, every channel drifted to the keep side by ``lam t = 1.5``).
   ``d_i`` is multiplied by ``tau_i(previous step) / tau_i(now)``, ``tau = u / c = sqrt(k)``, which leaves ``u_i``
   where the flow put it: ``u = 1`` stays the threshold of every group for the whole run, not only at the start.
2. **Freezing (the stop rule's hysteresis).** A channel whose ``|log10 u_i|`` passes ``kappa`` is *decided*
   and its catalyst is frozen from then on (its gradient is dropped and its value restored after every
   step; only step 5 changes it). Argued from the flow: on the prune side, with ``d`` fixed, the group shrinks as
   ``dn/dt = -lam k d``, linearly to 0 in ``1 / (lam sqrt(k) 10^kappa)`` steps, so ``c = d / n`` only grows;
   before, ``d`` drained with ``n`` (``d^2 - n^2`` is conserved) and ``c`` stalled where the loss's noise
   floor of ``n`` put it, which is why pruned channels hovered around ``kappa``. On the keep side the frozen
   ``d`` leaves the group at ``10^-kappa`` of the threshold strength, weaker than weight decay. Decided
   channels therefore stay decided, the count of decided channels only grows, and the stop rule (every
   channel decided) fires.
3. **Target speed-up.** With a target, the undecided catalysts are multiplied by one common factor
   ``10^-t`` per step, ``t`` chosen so that the channels predicted to be pruned (frozen ones, and undecided
   ones with ``u > 1``) give the target FLOPs ratio (:class:`FlopsModel`). The data decides *which*
   channels (their order is untouched), the target *how many*: one opt1 run instead of a search over runs.
4. **End of the budget.** When ``budget_steps`` is known, at ``FORCE_FRACTION`` of it the channels still
   undecided are decided by the side they are on (``u > 1``: prune) and moved to ``u = 10^(+-kappa)``;
   the rest of the budget lets the prune side shrink to 0 before removal.
5. **The prune side's pull** (``prune_pull``, on by default). A frozen ``d`` pulls a pruned group towards 0
   with a constant force ``gamma |d|``; where the loss's gradient on the group is as strong, the group stops
   short of 0 (BN mode, where the group is a channel's BN scale and shift: pruned channels held at a median
   ``log10 u`` of 1.2 and the removal changed the logits by 6-12 on the small CNN at 3x). So the catalyst of
   a pruned channel grows by a decade per ``pull_steps`` (the time the flow alone takes to empty a
   just-decided group), and once one step of the pull, ``lam k d``, exceeds the group's mass ``n`` (the
   flow would carry it past 0: ``c >= 1 / (lam k)``) the group's slices are set to zero instead of
   overshooting. The pruned channels are then exactly zero when they are removed.

The stop rule: every channel decided, and at least ``settle_steps`` since the last decision (the time the
flow takes to shrink a just-frozen group to 0).

**The width floor** (``max_prune_fraction``) holds through steps 2-4: a target keeps at least
``min_width(n)`` channels. When the flow, the feedback's prediction or the end of the budget would take it
lower, the least pruned of its candidates are frozen on the keep side instead (``spared``). The feedback
takes channels in the order of ``u`` whatever each costs, so a layer that sits above the threshold as a whole
and whose channels are cheap loses nearly all of them: on VGG-19-BN at 3x (seed 0, group mode) the end of the
budget left the late 512-wide layers with 1-7 channels and the accuracy fell from 97% to 19% in one epoch.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..layout import GroupLayout
from .dynamics import Coverage, CorrectedStats
from .methods import DEFAULT_MAX_PRUNE_FRACTION, check_max_prune_fraction, width_floors
from .targets import run_example_observed

__all__ = ["FORCE_FRACTION", "FlopsModel", "CatalystControl", "UNDECIDED", "PRUNED", "KEPT", "zero_groups_"]

FORCE_FRACTION = 0.8
UNDECIDED, PRUNED, KEPT = 0, 1, -1


class FlopsModel:
    """The multiply-accumulates of ``model`` (as :func:`~.metrics.count_flops` counts them: every ``Conv2d``
    and ``Linear``, and the input and output projections of ``nn.MultiheadAttention``) as a function of
    per-channel prune masks over ``targets``, without running the model:
    ``macs = sum_m macs_m (kept_in_m / in_m) (kept_out_m / out_m)``, counting the rows and columns each
    channel takes from ``m`` (``width`` of them for a head or a flattened map; a depthwise convolution scales
    with its channels once). Built with one forward pass.

    Raises:
        ValueError: when a target reaches a grouped (not depthwise) convolution, whose cost after a removal
            this model cannot express.
    """

    def __init__(self, model: nn.Module, targets: Sequence, example_inputs):
        modules = dict(model.named_modules())
        # unit name -> [MACs, rows, columns, depthwise]; an attention module is two units: its packed
        # input projection (under its own name) and its output projection (called functionally, not as a module)
        units: dict[str, list] = {}

        def add(name, macs, rows, cols, depthwise=False):
            units.setdefault(name, [0.0, rows, cols, depthwise])[0] += macs

        def hook(name):
            def count(m, inp, out):
                if isinstance(m, nn.Conv2d):
                    macs = out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                    add(name, macs, m.out_channels, m.in_channels, m.groups > 1)
                elif isinstance(m, nn.Linear):
                    add(name, m.in_features * m.out_features * (out[0].numel() // m.out_features), m.out_features, m.in_features)
                elif m.in_proj_weight is not None:  # nn.MultiheadAttention, as count_flops counts it
                    q = inp[0]
                    length = q.shape[0] if q.dim() == 2 or not m.batch_first else q.shape[1]
                    add(name, length * m.in_proj_weight.numel(), *m.in_proj_weight.shape)
                    add(f"{name}.out_proj", length * m.out_proj.weight.numel(), *m.out_proj.weight.shape)
            return count

        handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()
                   if isinstance(m, (nn.Conv2d, nn.Linear, nn.MultiheadAttention))]
        run_example_observed(model, example_inputs, handles)
        names = list(units)
        index = {n: i for i, n in enumerate(names)}
        sizes = [t.channels for t in targets]
        total = sum(sizes)
        self.macs_dense = torch.tensor([units[n][0] for n in names], dtype=torch.float64)
        self.total = float(self.macs_dense.sum())
        self.c_out = torch.tensor([float(units[n][1]) for n in names], dtype=torch.float64)
        self.c_in = torch.tensor([float(units[n][2]) for n in names], dtype=torch.float64)
        self.depthwise = torch.tensor([bool(units[n][3]) for n in names], dtype=torch.bool)
        # a[unit, channel]: rows (a_out) or columns (a_in) of the unit that removing the channel removes
        a_out = torch.zeros(len(names), total, dtype=torch.float64)
        a_in = torch.zeros(len(names), total, dtype=torch.float64)
        start = 0
        for t, size in zip(targets, sizes):
            for pieces, a in ((t.producers, a_out), (t.channelwise, a_out), (t.consumers, a_in)):
                for p in pieces:
                    if p.module not in index:
                        continue
                    m = modules.get(p.module)
                    if isinstance(m, nn.Conv2d) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
                        raise ValueError(f"FlopsModel: target {t.name} reaches grouped convolution {p.module} "
                                         f"(groups={m.groups})")
                    first = start + p.offset
                    a[index[p.module], first : first + p.count // p.width] += float(p.width)
            start += size
        # a depthwise conv's input channels are its output channels: count them once
        a_out[self.depthwise] = torch.maximum(a_out[self.depthwise], a_in[self.depthwise])
        a_in[self.depthwise] = 0.0
        self.a_out, self.a_in = a_out, a_in

    def macs(self, prune: torch.Tensor) -> torch.Tensor:
        """MACs for prune mask(s) ``prune`` (flat over all targets' channels; ``[channels]`` or
        ``[channels, batch]``)."""
        p = prune.to(torch.float64)
        squeeze = p.dim() == 1
        if squeeze:
            p = p[:, None]
        kept_out = (self.c_out[:, None] - self.a_out @ p) / self.c_out[:, None]
        kept_in = (self.c_in[:, None] - self.a_in @ p) / self.c_in[:, None]
        out = (self.macs_dense[:, None] * kept_in * kept_out).sum(0)
        return out[0] if squeeze else out

    def ratio(self, prune: torch.Tensor) -> torch.Tensor:
        """Dense MACs / MACs after removing ``prune``."""
        return self.total / self.macs(prune).clamp_min(1.0)


def _floor_channels(order_scores: torch.Tensor, segments: torch.Tensor, candidates: torch.Tensor,
                    pruned: torch.Tensor, floors: torch.Tensor) -> torch.Tensor:
    """Candidates that must stay so that no target goes below its floor (its minimum width): in a target where
    the pruned channels and the candidates leave fewer than ``floors[target]``, the candidates with the
    smallest scores, as many as it is short."""
    n_segments = floors.numel()
    keep = torch.zeros_like(candidates)
    cand = torch.zeros(n_segments, dtype=torch.long).index_add_(0, segments, candidates.long())
    gone = torch.zeros(n_segments, dtype=torch.long).index_add_(0, segments, pruned.long())
    sizes = torch.zeros(n_segments, dtype=torch.long).index_add_(0, segments, torch.ones_like(segments))
    allowed = (sizes - floors - gone).clamp_min(0)  # removals each target still allows
    for seg in (cand > allowed).nonzero().flatten().tolist():
        idx = (candidates & (segments == seg)).nonzero().flatten()
        short = int(cand[seg] - allowed[seg])
        keep[idx[torch.argsort(order_scores[idx], stable=True)[:short]]] = True
    return keep


def zero_groups_(weights: Sequence[torch.Tensor], layout: Optional[GroupLayout], groups: torch.Tensor) -> None:
    """Sets the slices of every group flagged in ``groups`` (bool, flat over all segments) to zero in
    ``weights`` (``layout`` None: group ``i`` of segment ``k`` is row ``i`` of ``weights[k]``)."""
    members = layout.members if layout is not None else [(k, 0, 0, w.shape[0], k, 0, 1) for k, w in enumerate(weights)]
    sizes = layout.segment_sizes if layout is not None else [w.shape[0] for w in weights]
    firsts = [0]
    for size in sizes[:-1]:
        firsts.append(firsts[-1] + size)
    with torch.no_grad():
        for tensor, dim, start, count, segment, offset, width in members:
            first = firsts[segment] + offset
            chosen = groups[first : first + count // width]
            if bool(chosen.any()):
                w = weights[tensor]
                idx = chosen.repeat_interleave(width).nonzero().flatten() + start
                w.index_fill_(dim, idx.to(w.device), 0)


class CatalystControl:
    """The per-channel state and per-step logic of the module docstring, for one target set.

    ``rescale_(factors)`` multiplies the catalysts by per-channel factors (flat); the pruner supplies it so
    that a formulation that carries ``d`` in the forward pass (the bypass) can keep its function.
    """

    def __init__(self, sizes: Sequence[int], max_prune_fraction: float = DEFAULT_MAX_PRUNE_FRACTION):
        n = int(sum(sizes))
        self.sizes = list(int(s) for s in sizes)
        self.max_prune_fraction = check_max_prune_fraction(max_prune_fraction)
        # minimum width per target, from the widths the control started with (a later removal does not lower it)
        self.floors = width_floors(self.sizes, self.max_prune_fraction)
        self.spared = torch.zeros(n, dtype=torch.bool)  # kept back by the width floor (forced to the keep side)
        self.state = torch.zeros(n, dtype=torch.int8)  # UNDECIDED / PRUNED / KEPT
        self.frozen_d = torch.zeros(n, dtype=torch.float64)
        self.decided_at = torch.full((n,), -1, dtype=torch.long)  # step of the decision
        self.statistic_at_decision = torch.zeros(n, dtype=torch.float64)
        self.forced = torch.zeros(n, dtype=torch.bool)  # decided by the end of the budget, not by the flow
        self.emptied_u = torch.zeros(n, dtype=torch.float64)  # u when step 5 first set the group to zero (0: never)
        self.tau_prev: Optional[torch.Tensor] = None  # threshold factor u / c of the previous step
        self.last_decision_step = -1
        self.total_shift = 0.0  # sum of the target feedback's shifts t (decades)
        self.last_shift = 0.0
        self._coverage: Optional[Coverage] = None
        self._segment_cache: Optional[tuple] = None

    # --------------------------------------------------------------------------------------- helpers
    def coverage(self, ts, backend: str = "auto") -> Coverage:
        if self._coverage is None or len(self._coverage.weights) != len(ts.weights) or any(
                a is not b for a, b in zip(self._coverage.weights, ts.weights)):
            self._coverage = Coverage(ts.weights, ts.layout, backend)
        return self._coverage

    @property
    def undecided(self) -> torch.Tensor:
        return self.state == UNDECIDED

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(flat, self.sizes))

    def _freeze(self, mask: torch.Tensor, side: torch.Tensor, flat_d: torch.Tensor, stat: torch.Tensor, step: int,
                forced: bool = False) -> None:
        if not bool(mask.any()):
            return
        self.state[mask] = side[mask].to(torch.int8)
        self.frozen_d[mask] = flat_d[mask]
        self.decided_at[mask] = step
        self.statistic_at_decision[mask] = stat[mask]
        self.forced[mask] = forced
        self.last_decision_step = step

    def _segments(self) -> torch.Tensor:
        """The target index of every channel (flat), cached until the sizes change."""
        key = tuple(self.sizes)
        if self._segment_cache is None or self._segment_cache[0] != key:
            self._segment_cache = (key, torch.repeat_interleave(torch.arange(len(key)), torch.tensor(key, dtype=torch.long)))
        return self._segment_cache[1]

    def _floor_tensor(self) -> torch.Tensor:
        return torch.tensor(self.floors, dtype=torch.long)

    def _spare_last(self, to_prune, s, flat_d, factors, kappa: float, step: int):
        """Of the channels ``to_prune`` (about to be decided on the prune side), keeps those that must stay so
        that no target goes below its minimum width (the ones with the smallest ``s`` in such a target): moves
        them to ``u = 10^-kappa`` and freezes them there, on the keep side (counted as forced, and as
        ``spared``: the flow did not put them there). Deciding them here, not only at the removal, keeps the
        FLOPs the feedback predicts equal to what the removal obtains (a head or a residual-stream channel kept
        back at the removal costs a lot). Returns ``(spared, factors, flat_d, s)``."""
        spare = torch.zeros_like(to_prune)
        if bool(to_prune.any()):
            spare = _floor_channels(s, self._segments(), to_prune, self.state == PRUNED, self._floor_tensor())
        if bool(spare.any()):
            f = torch.where(spare, 10.0 ** (-kappa - s), torch.ones_like(s))
            factors, flat_d = factors * f, flat_d * f
            s = torch.where(spare, torch.full_like(s, -kappa), s)
            self._freeze(spare, torch.full_like(self.state, KEPT), flat_d, s, step, forced=True)
            self.spared |= spare
        return spare, factors, flat_d, s

    # ------------------------------------------------------------------------------------------ a step
    def after_step(self, ts, catalysts: Sequence[torch.Tensor], *, kappa: float, step: int,
                   rescale_: Callable[[torch.Tensor], None], flops: Optional[FlopsModel] = None,
                   target: Optional[float] = None, force_step: Optional[int] = None,
                   pull_rate: Optional[float] = None, pull_steps: Optional[int] = None,
                   backend: str = "auto") -> CorrectedStats:
        """Steps 1-5 of the module docstring, right after optimizer step number ``step`` (1-based), so that the
        catalysts are in their controlled state whenever the user reads them (statistics, decisions, the
        stop rule) and at the next penalty call; returns the statistics it acted on (``u`` after the
        adjustments)."""
        self.restore_(catalysts)
        st = self.coverage(ts, backend)(catalysts)
        u = st.u
        tau = torch.where((st.ratios > 0) & torch.isfinite(st.ratios), u / st.ratios, torch.ones_like(u))
        und = self.undecided
        factors = torch.ones_like(u)
        if self.tau_prev is not None and self.tau_prev.shape == tau.shape:
            factors = torch.where(und, self.tau_prev / tau, factors)  # 1. tracking
            u = u * factors
        self.tau_prev = tau
        s = torch.log10(u.clamp_min(1e-300))
        flat_d = torch.cat([d.detach().double().cpu() for d in catalysts]) * factors
        newly = und & (s.abs() > kappa)  # 2. decisions
        spare, factors, flat_d, s = self._spare_last(newly & (s > 0), s, flat_d, factors, kappa, step)
        self._freeze(newly & ~spare, torch.where(s > 0, PRUNED, KEPT), flat_d, s, step)
        und = self.undecided
        if target is not None and flops is not None and bool(und.any()):  # 3. feedback
            t = self.target_shift(s, flops, target)
            self.last_shift = t
            self.total_shift += t
            if t != 0.0:
                f = torch.where(und, torch.full_like(s, 10.0 ** (-t)), torch.ones_like(s))
                factors = factors * f
                flat_d = flat_d * f
                s = torch.where(und, s - t, s)
        if force_step is not None and step >= force_step and bool(und.any()):  # 4. end of the budget
            _, factors, flat_d, s = self._spare_last(und & (s > 0), s, flat_d, factors, kappa, step)
            und = self.undecided
            side = torch.where(s > 0, PRUNED, KEPT)
            goal = torch.where(s > 0, torch.full_like(s, kappa), torch.full_like(s, -kappa))
            f = torch.where(und, 10.0 ** (goal - s), torch.ones_like(s))
            factors = factors * f
            flat_d = flat_d * f
            s = torch.where(und, goal, s)
            self._freeze(und, side, flat_d, s, step, forced=True)
        pruned = self.state == PRUNED
        if pull_rate and pull_steps and bool(pruned.any()):  # 5. the prune side's pull
            # one step of the pull, lam k d, takes the group's whole mass n: the flow would carry it past 0
            gone = pruned & (st.ratios * (pull_rate * st.k) >= 1)
            if bool(gone.any()):
                zero_groups_(ts.weights, ts.layout, gone)
                first = gone & (self.emptied_u == 0) & torch.isfinite(s)
                self.emptied_u[first] = 10.0 ** s[first]
            grow = pruned & ~gone
            if bool(grow.any()):
                f = torch.where(grow, torch.full_like(s, 10.0 ** (1.0 / pull_steps)), torch.ones_like(s))
                factors, flat_d, s = factors * f, flat_d * f, s + torch.log10(f)
                self.frozen_d = self.frozen_d * f
        if bool((factors != 1).any()):
            rescale_(factors)
        return CorrectedStats(st.norms, st.ratios, st.k, 10.0 ** s)

    def target_shift(self, s: torch.Tensor, flops: FlopsModel, target: float) -> float:
        """The shift ``t`` (decades) after which the frozen-pruned channels and the undecided ones with
        ``s > t`` give the ``target`` FLOPs ratio (the fewest such channels that reach it); no target goes
        below its minimum width (those channels are not candidates)."""
        und = self.undecided
        pruned = self.state == PRUNED
        keep_last = _floor_channels(s, self._segments(), und, pruned, self._floor_tensor())
        cand = (und & ~keep_last).nonzero().flatten()
        if cand.numel() == 0:
            return 0.0
        order = cand[torch.argsort(-s[cand], stable=True)]
        n = order.numel()
        base = pruned.clone()

        def ratio_with(m: int) -> float:  # the m best candidates pruned besides the frozen ones
            mask = base.clone()
            mask[order[:m]] = True
            return float(flops.ratio(mask))

        lo, hi = 0, n  # the ratio grows with m: the smallest m that reaches the target (n if none does)
        while lo < hi:
            mid = (lo + hi) // 2
            if ratio_with(mid) >= target:
                hi = mid
            else:
                lo = mid + 1
        m = lo
        if m == 0:  # the frozen channels alone reach it: every candidate to the keep side
            return max(0.0, float(s[order[0]]) + 1e-3)
        if m == n:  # every candidate to the prune side
            return min(0.0, float(s[order[-1]]) - 1e-3)
        return 0.5 * (float(s[order[m - 1]]) + float(s[order[m]]))

    def reported_statistic(self, s: torch.Tensor) -> torch.Tensor:
        """``log10 u`` (flat) as reports show it: a group that step 5 emptied has ``u = inf`` from then on; it
        shows the ``u`` at which it was emptied (at least ``1 / (lam sqrt(k))``), a finite lower bound."""
        emptied = torch.isinf(s) & (s > 0) & (self.emptied_u > 0)
        return torch.where(emptied, torch.log10(self.emptied_u.clamp_min(1e-300)), s)

    def stop_ready(self, step: int, settle_steps: int) -> bool:
        """Every channel decided, and ``settle_steps`` since the last decision."""
        return not bool(self.undecided.any()) and step - self.last_decision_step >= settle_steps

    def restore_(self, catalysts: Sequence[torch.Tensor]) -> None:
        """Puts the frozen catalysts back to their frozen values (after ``optimizer.step()``)."""
        frozen = self.split(self.state != UNDECIDED)
        values = self.split(self.frozen_d)
        with torch.no_grad():
            for d, m, v in zip(catalysts, frozen, values):
                if bool(m.any()):
                    idx = m.nonzero().flatten().to(d.device)
                    d.index_copy_(0, idx, v[m].to(device=d.device, dtype=d.dtype))

    def drop_frozen_grads_(self, catalysts: Sequence[torch.Tensor]) -> None:
        frozen = self.state != UNDECIDED
        if not bool(frozen.any()):  # nothing decided yet: one test instead of one per segment, every step
            return
        for d, m in zip(catalysts, self.split(frozen)):
            if d.grad is not None and bool(m.any()):
                d.grad[m.to(d.device)] = 0

    # --------------------------------------------------------------------------------- bookkeeping
    def narrow_(self, keep: Sequence[Optional[torch.Tensor]]) -> None:
        """Keeps the entries of the kept channels (``keep[s]``: indices per segment, None = all)."""
        parts = {name: self.split(getattr(self, name)) for name in
                 ("state", "frozen_d", "decided_at", "statistic_at_decision", "forced", "emptied_u", "spared")}
        k_parts = None if self.tau_prev is None else self.split(self.tau_prev)
        for name, chunks in parts.items():
            setattr(self, name, torch.cat([c if idx is None else c[idx] for c, idx in zip(chunks, keep)]))
        if k_parts is not None:
            self.tau_prev = torch.cat([c if idx is None else c[idx] for c, idx in zip(k_parts, keep)])
        self.sizes = [s if idx is None else int(idx.numel()) for s, idx in zip(self.sizes, keep)]
        self.floors = [min(f, s) for f, s in zip(self.floors, self.sizes)]
        self._segment_cache = None
        self._coverage = None

    def state_dict(self) -> dict:
        return {"sizes": list(self.sizes), "state": self.state.clone(), "frozen_d": self.frozen_d.clone(),
                "decided_at": self.decided_at.clone(), "statistic_at_decision": self.statistic_at_decision.clone(),
                "forced": self.forced.clone(), "emptied_u": self.emptied_u.clone(), "spared": self.spared.clone(),
                "floors": list(self.floors), "max_prune_fraction": self.max_prune_fraction,
                "tau_prev": None if self.tau_prev is None else self.tau_prev.clone(),
                "last_decision_step": self.last_decision_step, "total_shift": self.total_shift,
                "last_shift": self.last_shift}

    def load_state_dict(self, state: dict) -> None:
        if list(state["sizes"]) != self.sizes:
            raise ValueError(f"Catalyst state: saved for targets of sizes {list(state['sizes'])}, these have {self.sizes}")
        for name in ("state", "frozen_d", "decided_at", "statistic_at_decision", "forced"):
            setattr(self, name, state[name].clone())
        emptied = state.get("emptied_u")  # absent in states saved before the pull
        self.emptied_u = torch.zeros_like(self.frozen_d) if emptied is None else emptied.clone()
        # absent in states saved before the width floor: those runs kept only the last channel of a target
        spared = state.get("spared")
        self.spared = torch.zeros_like(self.forced) if spared is None else spared.clone()
        if "floors" in state:
            self.max_prune_fraction = float(state["max_prune_fraction"])
            self.floors = [int(f) for f in state["floors"]]
        else:
            self.max_prune_fraction, self.floors = 1.0, [1] * len(self.sizes)
        self.tau_prev = None if state["tau_prev"] is None else state["tau_prev"].clone()
        self.last_decision_step = int(state["last_decision_step"])
        self.total_shift = float(state["total_shift"])
        self.last_shift = float(state["last_shift"])
        self._coverage = None

    def summary(self) -> dict:
        n = int(self.state.numel())
        decided = self.state != UNDECIDED
        return {"channels": n, "decided": int(decided.sum()), "pruned": int((self.state == PRUNED).sum()),
                "kept_decided": int((self.state == KEPT).sum()), "forced": int(self.forced.sum()),
                "spared_by_width_floor": int(self.spared.sum()), "max_prune_fraction": self.max_prune_fraction,
                "emptied": int((self.emptied_u > 0).sum()),
                "last_decision_step": self.last_decision_step, "total_target_shift_decades": self.total_shift,
                "decision_steps": self.decided_at[decided].tolist()}
