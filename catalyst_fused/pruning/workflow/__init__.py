"""The Catalyst pruning pipeline (catalyst-method.md section 5), resumable epoch by epoch, built on the public
:class:`~catalyst_fused.pruning.Pruner`.

    dense training -> [c0 calibration for a target speed-up] -> opt1 (L + gamma_t R, until every channel is
    decided or the budget ends) -> decide (prune decided channels with c > 1) -> physical removal (verified)
    -> fine-tuning -> report (JSON + plots)

``method`` picks what opt1 does and how channels are decided: Catalyst (the default, described below) or
one of the baselines of :mod:`.methods` (Group Lasso, network slimming, LATS elementwise and group), which
share every other stage.

Layout: :mod:`.config` (``PruneConfig``, the CLI's options), :mod:`.stages` (one function per stage),
:mod:`.training` (the one epoch loop), :mod:`.runner` (state, checkpoints, interruption, output files),
:mod:`.calibration` (``c0`` for a target speed-up), :mod:`.report` (the typed report), :mod:`.plots`.

``run_pipeline`` takes a :class:`PruneConfig` (models and data by name, as the CLI does) and, optionally, the
model, datasets and loss as objects.

Choices **[our reading]**, stated here once:

* Formulation (``formulation``): ``"regularizer"`` (the default, section 4a): the catalysts ``d`` appear
  only in ``R``; nothing has to be removed afterwards. ``"bypass"`` (section 4b): the extended model
  ``psi(x) = D x - Dbar x + sigma(x)``, where ``d`` enters the forward pass too; after the removal, opt2
  drives ``d - dbar`` of the kept channels to 0 and folds the bypass away (:mod:`.bypass` states its
  choices). The stage ``opt2`` is skipped by the regularizer formulation.
* Catalysts are trained by the same SGD optimizer (``Pruner.param_groups``) in their **own parameter group with no weight decay but
  the same momentum as the weights** (``catalyst_lr`` defaults to ``lr``). Weight decay on ``d`` would pull
  every ``c`` towards 0 (keep) regardless of the data. Momentum is kept for symmetry: without the loss,
  the penalty moves ``d`` by ``lr_d * gamma * n`` and ``n`` by ``lr_w * gamma * d`` per step, so the
  unstable fixed point of ``c`` is ``sqrt(lr_d / lr_w)``; with momentum ``m`` on the weights only, the
  weights' effective rate is ``lr / (1 - m)`` and the threshold would move from ``c = 1`` to
  ``sqrt(1 - m)`` (0.32 at m = 0.9), which in a first trial pushed every channel above 1. For the same
  reason a ``catalyst_lr`` different from ``lr`` moves the threshold to ``sqrt(catalyst_lr / lr)``.
* The penalty is applied with the fused in-place call ``cf.penalty_(..., scale=gamma_t)`` after
  ``loss.backward()``, i.e. the objective is ``L + gamma_t R``. Catalysts are threshold-corrected,
  ``d = c0 n / sqrt(k)`` (:mod:`..dynamics`), so ``u = c sqrt(k) = 1`` is the unstable point of every group.
* gamma: ``"auto"`` (default) picks it from the opt1 step budget (:func:`..dynamics.auto_gamma`) and the run
  logs the predicted decision epoch. gamma schedule: ``gamma_t = gamma * min(1, (t + 1) / (gamma_warmup + 1))`` per opt1 epoch ``t`` (linear
  warm-up over ``gamma_warmup`` epochs, then constant; ``gamma_warmup = 0`` is constant). opt1 uses a
  constant learning rate of its own (``opt1_lr``, default 0.1 x ``lr``: no jump from the annealed dense
  stage); dense training and fine-tuning use cosine annealing.
* Evaluation: every accuracy reported or acted on is measured after re-estimating the BatchNorm statistics
  on ``bn_recalibration_batches`` training batches (:func:`..bn.recalibrate_bn`; 0 = eval-mode statistics).
* Stop rule: a channel is decided when ``|log10 u_i| > kappa`` and frozen from then on (:mod:`..control`);
  at 80% of the budget the undecided ones are decided by their side. opt1 ends after the first epoch at
  which every channel is decided (and settled), or when the epoch budget is spent. Undecided channels are
  reported and **kept**.
* Decision: remove a channel iff it is decided and ``u_i > 1`` (so ``log10 u_i > kappa``). A layer never
  loses more than ``max_prune_fraction`` (default 0.9) of its channels: the control keeps the least pruned
  ones back when it decides, at least ``ceil((1 - max_prune_fraction) n)`` and at least one (reported as
  ``forced_keep``; :func:`..methods.min_width`). Every method obeys the same floor.
* Verification at the prune step (eval mode, on up to 256 test samples): the pruned model must match the
  *masked* model (the regularized model with the removed channels' consumer columns zeroed: the same
  function) to ``1e-4 * max|logits|`` (checks the surgery), and the regularized model itself to
  ``verify_rtol * max|logits|`` (default 1e-2; checks that removed channels were really ~0). Both figures
  are reported; a failed check is reported, not raised. With the bypass, all three are extended models:
  the pruned one keeps the ``d``/``dbar`` entries of its kept channels.
* Target speed-up: reached within the one opt1 run: after every step the undecided catalysts are moved by
  one common factor so that the channels predicted to go give the target FLOPs ratio (:mod:`..control`);
  the baselines rank channels to it after opt1.
* A non-finite training loss stops the run at once: ``report.json`` gets ``"status": "diverged"`` and the
  error, the last checkpoint (before the bad step) is kept, and the CLI exits with status 1.
* Determinism: the data order of epoch ``e`` of a stage comes from a generator seeded with
  ``seed * 1000 + stage_index * 100 + e`` only, and every checkpoint stores model, catalysts, optimizer,
  scheduler and RNG states, so ``resume`` reproduces an uninterrupted run exactly (on CPU).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

from .. import distributed
from ..formulations import FORMULATIONS
from ..unstructured import is_unstructured
from .calibration import gamma_t
from .config import AFTER_RUN_FIELDS, RUN_ONLY_FIELDS, PruneConfig
from .plots import HIST_BINS
from .report import Interrupted, Report
from .runner import Interrupt, OutputBusyError, OutputLock, Run, RunInputs, load_checkpoint
from .stages import final_report, run_stages, write_outputs
from .training import Diverged

__all__ = ["PruneConfig", "Report", "Interrupted", "OutputBusyError", "run_pipeline", "gamma_t", "HIST_BINS", "FORMULATIONS"]


def run_pipeline(config: PruneConfig, *, model=None, train_data=None, test_data=None, example_inputs=None,
                 loss_fn: Optional[Callable] = None, resume: bool = False, stop_after_epochs: Optional[int] = None,
                 log: Callable[[str], None] = print) -> Union[Report, Interrupted]:
    """Runs (or, with ``resume``, continues) the pipeline in ``config.out``; returns the :class:`Report`
    (also written to ``<out>/report.json``; ``status`` "done", or "diverged" when the loss became
    non-finite) or :class:`Interrupted`. ``stop_after_epochs`` stops after that many training epochs of
    this call (all stages together), as an interruption would.

    The model and data come from ``config.model`` / ``config.dataset`` (names, as on the command line) unless
    given as objects: ``model`` (an ``nn.Module``, trained from its current weights for
    ``config.dense_epochs`` — 0 to start from them — and pruned in place), ``train_data`` / ``test_data``
    (``Dataset`` s of ``(x, y)``, or ``DataLoader`` s whose datasets are used: the pipeline draws its own
    seeded batches of ``config.batch_size``), ``example_inputs`` (a batch; default: the first training
    sample) and ``loss_fn(output, target)`` (default: cross-entropy; accuracy is top-1). To resume a run made
    with objects, pass the same kind of objects again (a freshly built model: the checkpoint restores it).

    Raises:
        ValueError: a bad configuration (naming the flag), an unreadable checkpoint (naming the file).
        FileNotFoundError: ``resume`` without a checkpoint, or missing data.
        OutputBusyError: another run holds ``config.out`` (a RuntimeError).
    """
    out = Path(config.out)
    state = None
    log = distributed.main_only(log)  # under torch.distributed: rank 0 logs (every rank runs the same steps)
    if resume:
        state = load_checkpoint(out / "checkpoint.pt")
        saved = PruneConfig.from_dict(state.config)
        ignored = config.ignored_overrides(saved)
        if ignored:
            log("warning: --resume continues with the saved configuration; these options differ from it and are "
                "ignored: " + ", ".join(ignored))
        default = PruneConfig()
        for name in RUN_ONLY_FIELDS:  # where and how to write: this call's; what to measure and export: this call's if set
            if name not in AFTER_RUN_FIELDS or getattr(config, name) != getattr(default, name):
                setattr(saved, name, getattr(config, name))
        config = saved
        config.validate(named_model=model is None, named_data=train_data is None and test_data is None)
        log(f"resuming {out / 'checkpoint.pt'}: stage {state.stage}, {state.epoch} epochs done")
    else:
        config.validate(named_model=model is None, named_data=train_data is None and test_data is None)
    if (train_data is None) != (test_data is None):
        raise ValueError("run_pipeline: give both train_data and test_data, or neither")
    out.mkdir(parents=True, exist_ok=True)
    with distributed.output_lock(out):  # OutputLock, held by rank 0 under torch.distributed
        inputs = RunInputs.from_objects(config, model, train_data, test_data, example_inputs, loss_fn)
        run = Run(config, state, inputs, log=log, stop_after_epochs=stop_after_epochs)
        dropped = "; ".join(f"{', '.join(e['producers'])}: {e['reason']}" for e in run.excluded) or "none"
        if is_unstructured(config.method):
            log(f"targets: {len(run.targets)} tensors, {sum(t.numel for t in run.targets)} weights; left dense: {dropped}")
        else:
            log(f"targets: {len(run.targets)} coupled groups, {sum(t.channels for t in run.targets)} channels; excluded: {dropped}")
        try:
            run_stages(run)
        except Interrupt as stop:  # raised right after a checkpoint, which holds the stage's time so far
            return Interrupted(stop.stage, stop.epoch)
        except Diverged as exc:
            log(f"error: {exc}")
            return _write_outputs(run, final_report(run, status="diverged", error=str(exc)))
        report = _write_outputs(run, final_report(run))
        acc, cost = report.accuracy, report.cost
        log(f"done: acc dense {acc.dense:.2f}% -> finetuned {acc.after_finetune:.2f}%, FLOPs {cost.flops_ratio:.2f}x, "
            f"params {cost.params_ratio:.2f}x, latency {cost.latency_ratio:.2f}x; report {out / 'report.json'}")
        return report


def _write_outputs(run: Run, report: Report) -> Report:
    """Output files from rank 0 only (the report is the same on every rank)."""
    return write_outputs(run, report) if distributed.is_main() else report
