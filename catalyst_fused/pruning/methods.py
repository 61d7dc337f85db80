"""Catalyst and the baselines it is compared with, behind one interface, on the same fused kernels.

Every method trains the same target set (the groups of :mod:`.targets`) during the sparsity stage
("opt1"), turns it into one *decision statistic* per channel, in decades, where larger means "prune", and
owns its decision rule and its stop rule:

================ ============================================ ==================================== ==========
method           training (objective / step)                  statistic ``s``                      decision
================ ============================================ ==================================== ==========
``catalyst``     ``L + gamma R(W, d)``, ``d`` trained          ``log10 u``, ``u = c sqrt(k)``       see below
``group_lasso``  ``L + gamma sum_i n_i`` (``d = 1``, frozen)   ``-log10 n``                         see below
``slimming``     ``L + gamma sum_i |bn.gamma_i|`` (BN mode)    ``-log10 |bn.gamma|``                see below
``lats_channel`` elementwise soft threshold (proximal L1)     ``-log10 n``                         see below
``lats_group``   group soft threshold (proximal Group Lasso)  ``-log10 n``                         see below
``random``       plain training (no sparsity term)            a fixed random score                 see below
================ ============================================ ==================================== ==========

* Group Lasso and network slimming are the Catalyst penalty with constant catalysts (catalyst-method.md
  section 2), so they run through the same fused ``penalty_`` call; only the catalyst gradient is dropped.
  Network slimming always uses BN-scale groups without the shift (its definition, Liu et al. 2017).
* LATS (section 7) is proximal SGD with a constant ``lam = gamma``: after every optimizer step the weights
  are soft-thresholded by ``gamma * lr``, so the cumulative threshold is ``t_k = gamma * sum_{s<k} lr_s``
  (the LATS schedule; reported as ``final_threshold``). ``lats_channel`` thresholds every element of the
  tensors that hold the groups (one fused ``cf.soft_threshold_`` call; a channel becomes removable when its
  whole group is zero); ``lats_group`` scales each group by ``max(0, 1 - gamma lr / n_i)``, the proximal step of Group
  Lasso, with the norms from the fused kernel.
* Catalyst decides by itself. Its statistic is the corrected ratio ``u = c sqrt(k)`` (:mod:`.dynamics`:
  ``u = 1`` is every group's threshold whatever its overlap with other groups). A channel is *decided* when
  ``|log10 u|`` passes ``kappa``; from then on its catalyst is frozen and it keeps its side (:mod:`.control`);
  decided channels with ``u > 1`` are pruned, undecided ones kept. Its stop rule is "every channel decided"
  (and the just-decided ones have had time to shrink). A target speed-up is reached by feedback on the
  undecided catalysts during opt1, not by ranking. The baselines have no notion of "undecided" and no
  stop rule (the epoch budget ends them): with a target speed-up, channels are removed in decreasing order
  of ``s`` (a global ranking, as network slimming does) until the FLOPs ratio reaches the target; without
  one, channels with ``n_i <= norm_threshold`` are removed. ``random`` is the control: the same epochs of
  plain training, then a random order.
* **Width floor** (``max_prune_fraction``, default 0.9): no rule removes more than that fraction of a target's
  channels; every target keeps at least ``min_width(n) = max(1, ceil((1 - max_prune_fraction) n))``, the
  channels with the smallest ``s`` among those it would remove (``forced_keep`` when the floor binds). Without
  it, a FLOPs target can take nearly all of a layer whose channels all score high and cost little: on
  VGG-19-BN at 3x the late 512-wide layers went down to 1-7 channels and the network did not recover.
* Width rounding (:func:`round_widths`, the pruner's ``round_to``): kept widths are rounded **up** to a
  multiple of ``round_to`` by keeping, among the channels a rule would remove, those with the smallest ``s``
  (the least pruned); widths such as 13 are slow for CPU kernels that work in blocks of 8 or 16 channels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .. import functional as F_cf
from .. import sparsity as F_cf_sparsity

__all__ = [
    "DEFAULT_MAX_PRUNE_FRACTION",
    "check_max_prune_fraction",
    "METHODS",
    "Decision",
    "DecisionRule",
    "RuleContext",
    "PruningMethod",
    "get_method",
    "min_width",
    "width_floors",
    "rank_decisions",
    "round_widths",
    "threshold_decisions",
    "top_k_decisions",
    "decision_flips",
    "spearman",
    "scale_groups_",
]

# log10 of a norm or ratio; zeros map to -300 (a zero filter's c is +inf: always prunable).
_TINY = 1e-300
DEFAULT_MAX_PRUNE_FRACTION = 0.9


def check_max_prune_fraction(value, where: str = "max_prune_fraction") -> float:
    """``value`` as a float in (0, 1], or a ValueError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < float(value) <= 1):
        raise ValueError(f"{where} must be a number in (0, 1] (the largest fraction of a layer's channels a decision "
                         f"may remove; 1 = all but one), got {value!r}")
    return float(value)


def min_width(channels: int, max_prune_fraction: float = DEFAULT_MAX_PRUNE_FRACTION) -> int:
    """The fewest channels a target of ``channels`` keeps: ``max(1, ceil((1 - max_prune_fraction) channels))``
    (rounded to 9 digits first, so that 0.1 * 20 is 2, not 3), at most ``channels``."""
    return min(int(channels), max(1, math.ceil(round((1.0 - max_prune_fraction) * channels, 9))))


def width_floors(sizes: Sequence[int], max_prune_fraction: float = DEFAULT_MAX_PRUNE_FRACTION) -> list[int]:
    return [min_width(n, max_prune_fraction) for n in sizes]


def _log10(x: torch.Tensor) -> torch.Tensor:
    return torch.log10(x.detach().double().cpu().clamp_min(_TINY))


def _segment_sizes(ts) -> list[int]:
    return [w.shape[0] for w in ts.weights] if ts.layout is None else list(ts.layout.segment_sizes)


@dataclass
class Decision:
    """One target's decision: ``prune`` and ``undecided`` are bool masks over its channels (undecided
    channels are kept); ``statistic`` is the method's ``s`` per channel (fp64, CPU; larger = prune)."""

    target: str
    statistic: torch.Tensor
    prune: torch.Tensor
    undecided: torch.Tensor
    forced_keep: bool = False
    rounded: int = 0  # channels kept only to round the kept width up to a multiple (round_widths)

    @property
    def keep(self) -> torch.Tensor:
        """Indices of the channels that stay."""
        return (~self.prune).nonzero().flatten()

    @property
    def channels(self) -> int:
        return int(self.prune.numel())


def round_widths(decisions: Sequence[Decision], multiple: int) -> list[Decision]:
    """``decisions`` with every kept width rounded up to a multiple of ``multiple`` (at most the target's
    channel count): among the channels to prune, the ones with the smallest statistic (least pruned) are
    kept instead; ``Decision.rounded`` counts them. ``multiple`` 1 changes nothing.

    Raises:
        ValueError: for a ``multiple`` that is not a positive integer.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"round_to must be a positive integer (1 = no rounding), got {multiple!r}")
    out = []
    for d in decisions:
        kept = d.channels - int(d.prune.sum())
        want = min(d.channels, -(-kept // multiple) * multiple)
        if want == kept:
            out.append(d)
            continue
        candidates = d.prune.nonzero().flatten()
        extra = candidates[torch.argsort(d.statistic[candidates], stable=True)[: want - kept]]
        prune = d.prune.clone()
        prune[extra] = False
        out.append(Decision(d.target, d.statistic, prune, d.undecided, d.forced_keep, d.rounded + want - kept))
    return out


@dataclass
class RuleContext:
    """What a decision rule may use besides the statistics."""

    kappa: float = 2.0
    target_speedup: Optional[float] = None
    norm_threshold: float = 1e-2
    speedup_of: Optional[Callable[[list], float]] = None  # prune masks -> FLOPs ratio dense / pruned
    max_prune_fraction: float = DEFAULT_MAX_PRUNE_FRACTION  # the width floor (min_width)

    def floors(self, scores: Sequence[torch.Tensor]) -> list[int]:
        return width_floors([len(s) for s in scores], self.max_prune_fraction)


@dataclass
class DecisionRule:
    """A method's rule for one context: ``decide(scores) -> [(prune, undecided, forced_keep)]``;
    ``redecide`` applies the same rule to perturbed statistics (for the robustness figure: a ranking
    removes the same *number* of channels again, so call ``decide`` first); ``text`` says it in words."""

    text: str
    decide: Callable[[list], list]
    redecide: Callable[[list], list]


class PruningMethod:
    """Base class: what a method does around each optimizer step, how it scores and decides channels."""

    name = ""
    statistic = "-log10 n"
    trains_catalysts = False  # are the catalysts optimizer parameters?
    uses_catalysts = False  # does training need catalyst vectors at all?
    has_stop_rule = False  # can the method tell by itself that opt1 is done?
    reaches_target_by_ranking = True  # a target speed-up is met by ranking channels (else: calibration)
    needs_lr = False  # does after_step need the learning rate?

    def effective_mode(self, mode: str, bn_beta: bool) -> tuple[str, bool]:
        return mode, bn_beta

    def init_catalysts(self, ts, c0: float) -> list[torch.Tensor]:
        """Catalyst vectors (one per segment); constant ones for the constant-catalyst baselines."""
        if not self.uses_catalysts:
            return []
        return [torch.ones(s, dtype=ts.weights[0].dtype, device=ts.weights[0].device) for s in _segment_sizes(ts)]

    def regularize(self, ts, catalysts: Sequence[torch.Tensor], scale: float):
        """Adds ``scale`` times the sparsity term's gradient (between ``loss.backward()`` and
        ``optimizer.step()``); returns the fused call's :class:`~catalyst_fused.PenaltyStats` or None."""
        return None

    def after_step(self, ts, gamma: float, lr: Optional[float]) -> None:
        """The proximal part of the step (after ``optimizer.step()``)."""

    def norms(self, ts, weights: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        return F_cf.group_norms(ts.weights if weights is None else weights, layout=ts.layout)

    def scores(self, ts, catalysts, weights: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
        """The decision statistic per segment (fp64, CPU; larger = prune)."""
        norms = self.norms(ts, weights)
        return list(torch.split(-_log10(norms), _segment_sizes(ts)))

    def undecided(self, scores: Sequence[torch.Tensor], kappa: float) -> list[torch.Tensor]:
        """Masks of the channels the method has not decided yet (none for the baselines)."""
        return [torch.zeros(len(s), dtype=torch.bool) for s in scores]

    def rule(self, ctx: RuleContext) -> DecisionRule:
        """The baselines' rule: a global ranking to ``ctx.target_speedup``, else a norm threshold."""
        if ctx.target_speedup is not None:
            if ctx.speedup_of is None:
                raise ValueError(f"method {self.name}: a target speed-up needs a FLOPs counter (speedup_of)")
            rule = DecisionRule(f"remove the channels with the largest {self.statistic} (one global ranking), the fewest "
                                f"that reach a {ctx.target_speedup}x FLOPs ratio", None, None)
            count = [0]

            def decide(scores):
                floors = ctx.floors(scores)
                masks = rank_decisions(scores, ctx.speedup_of, ctx.target_speedup, floors)
                count[0] = sum(int(m.sum()) for m in masks)
                rule.text = (f"remove the {count[0]} channels with the largest {self.statistic} (one global ranking), the "
                             f"fewest that reach a {ctx.target_speedup}x FLOPs ratio")
                return _no_undecided(scores, masks, floors)

            def redecide(scores):  # the same number of channels again
                floors = ctx.floors(scores)
                return _no_undecided(scores, top_k_decisions(scores, count[0], floors), floors)

            rule.decide, rule.redecide = decide, redecide
            return rule
        threshold = -math.log10(ctx.norm_threshold)

        def by_threshold(scores):
            floors = ctx.floors(scores)
            return _no_undecided(scores, threshold_decisions(scores, threshold, floors), floors)

        return DecisionRule(f"remove iff the group norm n_i <= norm_threshold={ctx.norm_threshold}", by_threshold, by_threshold)

    def bind(self, pruner) -> None:
        """Called by the :class:`~.pruner.Pruner` that owns this method (Catalyst reads its step, settings and
        optimizer through it)."""

    def narrow_(self, keep: Sequence[Optional[torch.Tensor]]) -> None:
        """After a removal: per segment the kept indices (None: all kept), for per-channel method state."""

    def all_decided(self, pruner) -> bool:
        """The stop rule (methods without one: never)."""
        return self.has_stop_rule and pruner.undecided() == 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def summary(self) -> dict:
        """Method-specific figures for the report."""
        return {}


def _no_undecided(scores, masks, floors) -> list:
    """(prune, undecided, forced_keep) per target; ``forced_keep``: the width floor is what stopped the removal
    (the target is down to its floor and more channels were candidates)."""
    return [(m, torch.zeros_like(m), bool(len(m) > f and len(m) - int(m.sum()) == f)) for m, f in zip(masks, floors)]


def keep_to_floor(prune: torch.Tensor, s: torch.Tensor, floor: int) -> tuple[torch.Tensor, bool]:
    """``prune`` with the channels of smallest ``s`` among the pruned ones kept back until at least ``floor``
    channels stay; and whether any was."""
    short = floor - (len(prune) - int(prune.sum()))
    if short <= 0:
        return prune, False
    candidates = prune.nonzero().flatten()
    back = candidates[torch.argsort(s[candidates], stable=True)[:short]]
    prune = prune.clone()
    prune[back] = False
    return prune, True


class Catalyst(PruningMethod):
    """Catalyst with threshold-corrected catalysts (:mod:`.dynamics`) and the per-step control of
    :mod:`.control` (threshold tracking, freezing of decided channels, target feedback, end of the budget).

    Its statistic is ``log10 u``, ``u_i = c_i sqrt(k_i)`` the corrected ratio (``u = 1`` is every group's
    threshold); a channel is decided when ``|log10 u|`` passes ``kappa`` and keeps its side from then on.
    Bound to a :class:`~.pruner.Pruner` (``bind``) it runs the control every step; unbound (the method alone)
    it is the plain penalty with the stateless rule ``|log10 u| > kappa and u > 1``."""

    name = "catalyst"
    statistic = "log10 u"
    trains_catalysts = True
    uses_catalysts = True
    has_stop_rule = True
    reaches_target_by_ranking = False

    def __init__(self):
        self.control = None  # CatalystControl once the catalysts exist
        self.initial = None  # CorrectedStats at the start (k per group)
        self._pruner = None

    def bind(self, pruner) -> None:
        self._pruner = pruner

    def init_catalysts(self, ts, c0: float) -> list[torch.Tensor]:
        from .control import CatalystControl
        from .dynamics import threshold_corrected_catalysts

        backend = getattr(self._pruner, "backend", "auto")
        catalysts, self.initial = threshold_corrected_catalysts(ts.weights, ts.layout, c0, backend=backend)
        fraction = getattr(self._pruner, "max_prune_fraction", DEFAULT_MAX_PRUNE_FRACTION)
        self.control = CatalystControl(_segment_sizes(ts), max_prune_fraction=fraction)
        st = self.initial
        self.control.tau_prev = torch.where((st.ratios > 0) & torch.isfinite(st.ratios), st.u / st.ratios,
                                            torch.ones_like(st.u))
        return catalysts

    def _controlled(self, ts) -> bool:
        return self.control is not None and self.control.sizes == _segment_sizes(ts)

    def regularize(self, ts, catalysts, scale: float):
        stats = F_cf.penalty_(ts.weights, catalysts, scale=scale, layout=ts.layout)
        if self._controlled(ts):
            self.control.drop_frozen_grads_(catalysts)
        return stats

    def after_step(self, ts, gamma: float, lr: Optional[float]) -> None:
        p = self._pruner
        if p is not None and self._controlled(ts):
            self.control.after_step(ts, p.catalysts, kappa=p.kappa, step=p.steps + 1, rescale_=p.rescale_catalysts_,
                                    flops=p.flops_model() if p.target_speedup is not None else None,
                                    target=p.target_speedup, force_step=p.force_step, backend=p.backend,
                                    **p.pull_settings())

    def scores(self, ts, catalysts, weights=None) -> list[torch.Tensor]:
        from .dynamics import Coverage

        if weights is None and self._controlled(ts):
            cov = self.control.coverage(ts, getattr(self._pruner, "backend", "auto"))
        else:
            cov = Coverage(ts.weights if weights is None else weights, ts.layout)
        s = _log10(cov(catalysts).u)
        if self._controlled(ts):
            s = self.control.reported_statistic(s)
        return list(torch.split(s, _segment_sizes(ts)))

    def _controlled_sizes(self, sizes) -> bool:
        return self.control is not None and self.control.sizes == list(sizes)

    def _state_masks(self, scores):
        if not self._controlled_sizes([len(s) for s in scores]):
            return None
        from .control import PRUNED, UNDECIDED

        return (self.control.split(self.control.state == PRUNED), self.control.split(self.control.state == UNDECIDED))

    def undecided(self, scores, kappa: float) -> list[torch.Tensor]:
        masks = self._state_masks(scores)
        return [s.abs() <= kappa for s in scores] if masks is None else masks[1]

    def all_decided(self, pruner) -> bool:
        if self.control is None:
            return pruner.undecided() == 0
        return self.control.stop_ready(pruner.steps, pruner.settle_steps())

    def rule(self, ctx: RuleContext) -> DecisionRule:
        kappa = ctx.kappa

        def finish(prune, undecided, s, floor):
            # the control already keeps the floor while it decides; this covers the stateless rule and
            # perturbed statistics
            prune, forced = keep_to_floor(prune, s, floor)
            return prune, undecided, forced

        def floors_of(scores):
            if self._controlled_sizes([len(s) for s in scores]):
                return list(self.control.floors)
            return ctx.floors(scores)

        def decide(scores):
            masks, floors = self._state_masks(scores), floors_of(scores)
            if masks is None:  # no state (the method alone): the stateless rule
                return [finish((s.abs() > kappa) & (s > 0), s.abs() <= kappa, s, f) for s, f in zip(scores, floors)]
            out = []
            for p, u, s, f, spared in zip(*masks, scores, floors, self.control.split(self.control.spared)):
                prune, und, forced = finish(p.clone(), u.clone(), s, f)
                out.append((prune, und, forced or bool(spared.any())))
            return out

        def redecide(scores):  # the side of every decided channel, from (perturbed) statistics
            masks, floors = self._state_masks(scores), floors_of(scores)
            undecided = [s.abs() <= kappa for s in scores] if masks is None else masks[1]
            return [finish((s > 0) & ~u, u, s, f) for s, u, f in zip(scores, undecided, floors)]

        return DecisionRule(f"remove the channels decided on the prune side (log10 u passed +kappa={kappa}; decided "
                            "channels keep their side); undecided channels are kept", decide, redecide)

    def narrow_(self, keep: Sequence[Optional[torch.Tensor]]) -> None:
        if self.control is not None:
            self.control.narrow_(keep)

    def state_dict(self) -> dict:
        out = {} if self.control is None else {"control": self.control.state_dict()}
        if self.initial is not None:  # the k of the run's start: settle_steps and the pull's pace come from it
            out["initial"] = {name: getattr(self.initial, name).clone() for name in ("norms", "ratios", "k", "u")}
        return out

    def load_state_dict(self, state: dict) -> None:
        from .dynamics import CorrectedStats

        if self.control is not None and state.get("control") is not None:
            self.control.load_state_dict(state["control"])
        if state.get("initial") is not None:  # a resumed run builds its pruner on later weights
            self.initial = CorrectedStats(**{name: t.clone() for name, t in state["initial"].items()})

    def summary(self) -> dict:
        return {} if self.control is None else {"decisions": self.control.summary()}


class GroupLasso(PruningMethod):
    """``gamma * sum_i n_i``: the Catalyst penalty with ``d = 1`` frozen (subgradient descent)."""

    name = "group_lasso"
    uses_catalysts = True

    def regularize(self, ts, catalysts, scale: float):
        stats = F_cf.penalty_(ts.weights, catalysts, scale=scale, layout=ts.layout)
        for d in catalysts:  # constant catalysts: a gradient written for them is not used (zeroed, not freed)
            if d.grad is not None:
                d.grad.zero_()
        return stats


class NetworkSlimming(GroupLasso):
    """L1 on BN scales (Liu et al. 2017): Group Lasso over one-element groups ``bn.gamma_i``."""

    name = "slimming"
    statistic = "-log10 |bn.gamma|"

    def effective_mode(self, mode: str, bn_beta: bool) -> tuple[str, bool]:
        return "bn", False


class _SoftThreshold(PruningMethod):
    needs_lr = True

    def __init__(self):
        self.threshold = 0.0  # the cumulative threshold t_k = sum gamma_s * lr_s

    def after_step(self, ts, gamma: float, lr: Optional[float]) -> None:
        if lr is None:
            raise ValueError(f"method {self.name}: after_step needs the learning rate (pass lr= or attach the optimizer)")
        tau = gamma * lr
        self.threshold += tau
        with torch.no_grad():
            self._threshold_(ts, tau)

    def _threshold_(self, ts, tau: float) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = float(state.get("threshold", 0.0))

    def summary(self) -> dict:
        return {"final_threshold": self.threshold}


class LATSChannel(_SoftThreshold):
    """Elementwise soft threshold with the LATS schedule (proximal L1, ``lam = gamma`` constant), channels then
    ranked by group norm: a structured baseline. (Published, unstructured LATS is ``method="lats"``:
    :mod:`.unstructured`.)"""

    name = "lats_channel"

    def _threshold_(self, ts, tau: float) -> None:
        F_cf_sparsity.soft_threshold_(ts.weights, tau)  # in place, every tensor in one call


class LATSGroup(_SoftThreshold):
    """Group soft threshold ``F_i <- F_i max(0, 1 - gamma lr / n_i)``: proximal Group Lasso, LATS schedule."""

    name = "lats_group"

    def _threshold_(self, ts, tau: float) -> None:
        norms = self.norms(ts)
        factors = (1 - tau / norms.clamp_min(_TINY)).clamp_min(0)
        scale_groups_(ts.weights, ts.layout, factors)


class RandomPruning(PruningMethod):
    """The control baseline: no sparsity term (opt1 is plain training), channels removed in a random order
    (one fixed random score per channel from its own generator, seeded by ``seed``, default: the seed torch's
    global generator was given, so a run's seed picks the order and no global random state is drawn) until the
    target FLOPs ratio is reached."""

    name = "random"
    statistic = "random score"

    def __init__(self, seed: Optional[int] = None):
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self._scores: Optional[list] = None

    def init_catalysts(self, ts, c0: float) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        self._scores = [torch.rand(n, generator=gen, dtype=torch.float64) for n in _segment_sizes(ts)]
        return []

    def scores(self, ts, catalysts, weights=None) -> list[torch.Tensor]:
        if self._scores is None or [len(s) for s in self._scores] != _segment_sizes(ts):
            raise ValueError("method random: the scores are not initialised for these targets")
        return [s.clone() for s in self._scores]

    def narrow_(self, keep: Sequence[Optional[torch.Tensor]]) -> None:
        if self._scores is not None:
            self._scores = [s if idx is None else s[idx.cpu()] for s, idx in zip(self._scores, keep)]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "scores": None if self._scores is None else [s.clone() for s in self._scores]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scores") is not None:
            self._scores = [s.clone() for s in state["scores"]]


def scale_groups_(weights: Sequence[torch.Tensor], layout, factors: torch.Tensor) -> None:
    """Multiplies every slice of group ``i`` by ``factors[i]`` (flat, segments in order), in place."""
    if layout is None:
        for w, f in zip(weights, torch.split(factors, [w.shape[0] for w in weights])):
            w.mul_(f.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))
        return
    starts = [0]
    for s in layout.segment_sizes[:-1]:
        starts.append(starts[-1] + s)
    table = layout.member_table.tolist()
    for row in table:
        tensor, dim, start, count, segment, offset = row[:6]
        width = row[6] if len(row) > 6 else 1  # slices per group (several consecutive rows per group)
        w = weights[tensor]
        groups = count // width
        f = factors[starts[segment] + offset : starts[segment] + offset + groups].to(w.dtype).repeat_interleave(width)
        shape = [1] * w.dim()
        shape[dim] = count
        w.narrow(dim, start, count).mul_(f.view(shape))


METHODS: dict[str, type] = {m.name: m for m in (Catalyst, GroupLasso, NetworkSlimming, LATSChannel, LATSGroup, RandomPruning)}


def get_method(name: str) -> PruningMethod:
    if name not in METHODS:
        raise ValueError(f"--method: unknown method {name!r}; choose one of: {', '.join(METHODS)} (channels), "
                         "lats, magnitude (unstructured, with --sparsity)")
    return METHODS[name]()


# --------------------------------------------------------------------------------------------- decisions
def _floors(scores, floors: Optional[Sequence[int]]) -> list[int]:
    """``floors`` checked against ``scores``, or 1 per segment (only the last channel stays)."""
    if floors is None:
        return [1] * len(scores)
    if len(floors) != len(scores):
        raise ValueError(f"floors: one minimum width per segment expected ({len(scores)}), got {len(floors)}")
    return [int(f) for f in floors]


def threshold_decisions(scores: Sequence[torch.Tensor], threshold: float,
                        floors: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
    """Prune masks ``s > threshold`` per segment; segment ``k`` keeps at least ``floors[k]`` channels (default 1)
    (those with the smallest ``s``)."""
    return [keep_to_floor(s > threshold, s, f)[0] for s, f in zip(scores, _floors(scores, floors))]


def _rank_order(scores: Sequence[torch.Tensor], floors: Optional[Sequence[int]] = None) -> list[tuple[int, int]]:
    """(segment, channel) pairs in pruning order: decreasing ``s`` (ties by position), skipping the channels
    that would take a segment below its floor (default: its last channel)."""
    flat = torch.cat(list(scores)).double()
    seg = torch.cat([torch.full((len(s),), k, dtype=torch.long) for k, s in enumerate(scores)])
    idx = torch.cat([torch.arange(len(s)) for s in scores])
    order = torch.argsort(-flat, stable=True).tolist()  # ties keep their position order
    left = [len(s) - f for s, f in zip(scores, _floors(scores, floors))]  # removals each segment still allows
    out = []
    for j in order:
        k = int(seg[j])
        if left[k] > 0:
            left[k] -= 1
            out.append((k, int(idx[j])))
    return out


def _masks_from(pairs, scores) -> list[torch.Tensor]:
    masks = [torch.zeros(len(s), dtype=torch.bool) for s in scores]
    for k, i in pairs:
        masks[k][i] = True
    return masks


def rank_decisions(scores: Sequence[torch.Tensor], speedup_of: Callable[[list], float], target: float,
                   floors: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
    """The fewest channels, taken in decreasing order of ``s``, whose removal reaches ``target`` (FLOPs ratio
    given by ``speedup_of(masks)``; binary search, the ratio grows with every removed channel), never taking a
    segment below ``floors`` (default: its last channel). Removes everything removable if the target cannot be
    reached."""
    order = _rank_order(scores, floors)
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if speedup_of(_masks_from(order[:mid], scores)) >= target:
            hi = mid
        else:
            lo = mid + 1
    return _masks_from(order[:lo], scores)


def top_k_decisions(scores: Sequence[torch.Tensor], k: int, floors: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
    return _masks_from(_rank_order(scores, floors)[:k], scores)


def decision_flips(decide: Callable[[list], list], scores_of: Callable[[list], list], weights: Sequence[torch.Tensor],
                   reference: Sequence[torch.Tensor], *, noise: float = 0.01, draws: int = 5, seed: int = 0) -> dict:
    """How many decisions flip when every weight element gets relative Gaussian noise,
    ``w * (1 + noise * eps)``: the mean and max over ``draws`` of the flipped fraction of channels.

    ``scores_of(weights)`` recomputes the statistic on perturbed weights, ``decide(scores)`` applies the
    method's decision rule and returns prune masks, ``reference`` is the unperturbed prune masks."""
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
