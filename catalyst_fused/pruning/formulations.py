"""How the catalysts enter the model (catalyst-method.md section 4): the pruner's formulation strategies.

* :class:`Regularizer` (``"regularizer"``, the default): the catalysts ``d`` appear only in the penalty
  ``R``; the model is not changed and there is nothing to remove afterwards.
* :class:`BypassFormulation` (``"bypass"``): the extended model ``psi(x) = D x - Dbar x + sigma(x)``
  (:mod:`.bypass`): ``d`` enters the forward pass too, ``dbar`` is trained beside it, and after the removal
  opt2 drives ``d - dbar`` to 0 before the bypass is folded away (:meth:`BypassFormulation.fold_`).

A formulation decides which targets it can carry, owns any parameters it adds to the model, narrows them
when channels are removed, and serialises whether the model is wrapped.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from . import bypass
from .targets import Target

__all__ = ["FORMULATIONS", "Formulation", "Regularizer", "BypassFormulation", "get_formulation"]


class Formulation:
    name = ""

    def supported(self, model: nn.Module, targets: Sequence[Target], mode: str) -> tuple[list, list]:
        """``(targets it can carry, excluded)`` (excluded in ``find_targets``'s format)."""
        return list(targets), []

    def attach_(self, model: nn.Module, targets: Sequence[Target], mode: str, catalysts: list) -> list:
        """Prepares ``model`` in place; returns the catalysts the penalty uses."""
        return catalysts

    def inner(self, model: nn.Module, targets: Sequence[Target]) -> list:
        """The targets as the (possibly wrapped) model names its modules."""
        return list(targets)

    def outer(self, targets: Sequence[Target]) -> list:
        return list(targets)

    def extra_parameters(self, model: nn.Module) -> list:
        """Parameters the formulation adds beside the catalysts (optimizer: the catalysts' group)."""
        return []

    def narrow_(self, model: nn.Module, targets: Sequence[Target], keep: Mapping[str, torch.Tensor], record) -> None:
        """Narrows the formulation's own parameters after a removal."""

    def is_attached(self, model: nn.Module) -> bool:
        return False

    def catalysts(self, model: nn.Module, targets: Sequence[Target]) -> list:
        """The catalysts the model itself holds (attached formulations)."""
        raise ValueError(f"formulation {self.name!r} holds no catalysts in the model")

    def rescale_(self, model: nn.Module, targets: Sequence[Target], catalysts: Sequence[torch.Tensor],
                 factors: torch.Tensor) -> None:
        """Multiplies the catalysts by ``factors`` (flat over the targets' channels), in place (Catalyst's threshold
        tracking and target feedback)."""
        with torch.no_grad():
            for d, f in zip(catalysts, torch.split(factors, [d.shape[0] for d in catalysts])):
                d.mul_(f.to(device=d.device, dtype=d.dtype))


class Regularizer(Formulation):
    name = "regularizer"


class BypassFormulation(Formulation):
    name = "bypass"

    def supported(self, model, targets, mode):
        supported, excluded = bypass.supported_targets(targets)
        if not supported:
            raise ValueError("formulation 'bypass': no target with a single producer and at most one BatchNorm")
        bypass.find_sites(model, supported, mode)  # raises a clear error for a site that cannot carry a bypass
        return supported, excluded

    def attach_(self, model, targets, mode, catalysts):
        bypass.attach_(model, targets, mode, catalysts)
        return bypass.catalysts(model, targets)

    def inner(self, model, targets):
        return bypass.inner_targets(model, targets)

    def outer(self, targets):
        return bypass.outer_targets(targets)

    def extra_parameters(self, model):
        return [w.dbar for _, w in bypass.wrappers(model)]

    def narrow_(self, model, targets, keep, record):
        bypass.narrow_(model, targets, keep, record)

    def is_attached(self, model):
        return bypass.is_wrapped(model)

    def catalysts(self, model, targets):
        return bypass.catalysts(model, targets)

    def rescale_(self, model, targets, catalysts, factors):
        # d enters the forward pass: dbar moves with it so that the coefficient d - dbar (the function) stays
        with torch.no_grad():
            for w, f in zip(bypass.ordered_wrappers(model, targets), torch.split(factors, [d.shape[0] for d in catalysts])):
                f = f.to(device=w.d.device, dtype=w.d.dtype)
                w.dbar.add_(w.d * (f - 1))
                w.d.mul_(f)

    # --- opt2 (see bypass.py for the choices)
    @staticmethod
    def coefficient_penalty_(model: nn.Module, mu: float) -> float:
        return bypass.add_coefficient_penalty_grad_(model, mu)

    @staticmethod
    def max_abs_coefficient(model: nn.Module) -> float:
        return bypass.max_abs_coefficient(model)

    @staticmethod
    def fold_(model: nn.Module) -> float:
        return bypass.fold_(model)


FORMULATIONS: dict[str, type] = {f.name: f for f in (Regularizer, BypassFormulation)}


def get_formulation(name: str) -> Formulation:
    if name not in FORMULATIONS:
        raise ValueError(f"--formulation: unknown formulation {name!r}; choose one of: {', '.join(FORMULATIONS)}")
    return FORMULATIONS[name]()
