"""The unstructured path of the pipeline (``--method lats | magnitude --sparsity S``): no channel is removed.

    dense -> attach (the stage after dense, named "calibrate" in the state machine) -> sparsify -> masks
    -> finetune (masks kept) -> report

* **attach**: the :class:`~catalyst_fused.pruning.unstructured.SparsityPruner` on the dense model (magnitude
  pruning zeroes its weights here, once).
* **sparsify** (``--epochs``): SGD with a cosine learning rate stepped per epoch (``CosineAnnealingLR``, from
  ``--lr``), through the pruner's loop: LATS trains ``theta`` with the straight-through gradient and writes
  ``w = S_t(theta)`` after every step (one fused call), its threshold rising with the ``--schedule`` to the
  value that gives ``--sparsity`` (re-estimated every epoch, exact at the last step); magnitude trains with its
  masks. The same epochs, data order and learning rates for both, so they compare at equal budgets.
* **masks**: fixes the masks (:meth:`~catalyst_fused.pruning.unstructured.SparsityPruner.prune`) and reports
  the real sparsity against the target (per tensor, in total, over the whole model), the accuracy before and
  after (equal: LATS's weights are already ``S_T(theta)``), the largest logit change, and the MACs with a
  non-zero weight against the dense MACs (what an ideal sparse kernel would skip; dense kernels skip none).
* **finetune** (``--finetune-epochs``, ``--finetune-lr``, cosine): masks re-applied after every step; then
  ``sparse_model.pt`` = ``{"state_dict", "masks", "sparsity"}`` (the final weights with their masks).

Selected by the method in :func:`~.stages.run_stages`; the channel path's stages are not touched.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from ..unstructured import SparsityPruner, choose_tensors, sparse_macs
from .report import MaskReport, SparsifyReport, StageEval
from .runner import Run, save_atomic
from .stages import dense
from .training import epoch_loop

__all__ = ["UNSTRUCTURED_STAGES", "plan", "make_pruner", "steps_per_epoch"]


def plan(model, cfg, input_shape) -> tuple[list, list]:
    """The tensors a run with ``cfg`` sparsifies, and the conv/linear layers left dense (with why)."""
    return choose_tensors(model, input_shape, include_first=cfg.sparsify_first, include_classifier=cfg.sparsify_classifier)


def steps_per_epoch(run: Run) -> int:
    return -(-len(run.train_set) // run.cfg.batch_size)


def make_pruner(run: Run) -> SparsityPruner:
    """The run's pruner on the run's model (reusing the tensors found at the start)."""
    cfg = run.cfg
    lats = cfg.method == "lats"
    per = steps_per_epoch(run)
    return SparsityPruner(run.model, run.input_shape, method=cfg.method, sparsity=cfg.sparsity, scope=cfg.sparsity_scope,
                          schedule=cfg.schedule if lats else None,
                          beta=cfg.beta if lats and cfg.schedule == "continuation" else None,
                          total_steps=cfg.epochs * per if lats else None, steps_per_epoch=per if lats else None,
                          targets=run.targets)


def _sparsity_record(pruner: SparsityPruner) -> dict:
    st = pruner.stats()
    return {"sparsity": st.sparsity, "progress": st.progress, "final_threshold": st.final_threshold,
            "threshold": pruner.thresholds[0] if pruner.scope == "global" else list(pruner.thresholds)}


def attach(run: Run) -> None:
    cfg = run.cfg
    with run.timed("attach"):
        run.pruner = make_pruner(run)
        st = run.pruner.stats()
        run.stages.sparsify = SparsifyReport(
            method=cfg.method, target_sparsity=cfg.sparsity, scope=cfg.sparsity_scope,
            schedule=cfg.schedule if cfg.method == "lats" else None,
            beta=cfg.beta if cfg.method == "lats" and cfg.schedule == "continuation" else None,
            tensors=len(run.pruner.targets), elements=st.elements, total_steps=run.pruner.total_steps,
            steps_per_epoch=steps_per_epoch(run), initial_sparsity=st.sparsity,
            lr_schedule=f"cosine from --lr {cfg.lr}, stepped per epoch over {cfg.epochs} epochs")
        run.log(f"attach: {cfg.method} to sparsity {cfg.sparsity} ({cfg.sparsity_scope}) over {len(run.pruner.targets)} "
                f"tensors, {st.elements} weights; sparsity now {100 * st.sparsity:.2f}%")
    run.advance("sparsify")


def sparsify(run: Run) -> None:
    cfg, pruner = run.cfg, run.pruner
    with run.timed("sparsify"):
        opt = torch.optim.SGD(pruner.param_groups(cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay))
        pruner.attach_optimizer(opt)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
        run.load_state_into(opt, sched)
        report = run.stages.sparsify

        def after_epoch(e, rec):
            rec.update(stage="sparsify", epoch=e, test_accuracy=run.evaluate()["accuracy"], **_sparsity_record(pruner))
            run.log(f"sparsify {e}/{cfg.epochs}: loss {rec['train_loss']:.4f} acc {rec['test_accuracy']:.2f}% sparsity "
                    f"{100 * rec['sparsity']:.2f}% (target {100 * cfg.sparsity:.1f}%, threshold at {100 * rec['progress']:.1f}% "
                    f"of its final value)")
            report.epochs_run = e
            run.end_of_epoch("sparsify", e, rec, optimizer=opt, scheduler=sched)
            return False

        epoch_loop("sparsify", cfg.epochs, start=run.state.epoch, model=run.model, optimizer=opt, train_set=run.train_set,
                   batch_size=cfg.batch_size, seed=cfg.seed, device=run.device, scheduler=sched,
                   after_backward=pruner.regularize, after_step=pruner.after_step, after_epoch=after_epoch,
                   progress=cfg.progress, loss_fn=run.loss_fn)
        st = pruner.stats()
        ev = run.evaluate()
        report.accuracy, report.loss, report.samples = ev["accuracy"], ev["loss"], ev["samples"]
        report.sparsity, report.steps = st.sparsity, st.step
        report.final_threshold = st.final_threshold
        report.threshold_history = list(pruner.threshold_history)
    run.advance("masks")


def masks(run: Run) -> None:
    cfg, pruner, model = run.cfg, run.pruner, run.model
    with run.timed("masks"):
        x = run.test_batch()
        model.eval()
        with torch.no_grad():
            before = model(x)
        acc_before = run.evaluate()["accuracy"]
        summary = pruner.prune()
        model.eval()
        with torch.no_grad():
            after = model(x)
        acc_after = run.evaluate()["accuracy"]
        macs = sparse_macs(model, run.input_shape)
        run.stages.masks = MaskReport(
            method=cfg.method, target_sparsity=cfg.sparsity, scope=cfg.sparsity_scope, sparsity=summary.sparsity,
            abs_error_points=summary.abs_error_points, within_one_point=summary.abs_error_points <= 1.0,
            zeros=summary.zeros, elements=summary.elements, per_tensor=summary.per_target,
            model_params=summary.model_params, model_zeros=summary.model_zeros, model_sparsity=summary.model_sparsity,
            final_threshold=summary.final_threshold, accuracy_before=acc_before, accuracy_after=acc_after,
            max_abs_logit_change=float((after - before).abs().max()), samples=int(x.shape[0]),
            dense_macs=macs["dense"], nonzero_macs=macs["nonzero"],
            macs_note="dense kernels run every MAC: unstructured zeros change neither the FLOPs nor the latency of "
                      "the dense model; nonzero_macs is what an ideal sparse kernel would run")
        m = run.stages.masks
        run.log(f"masks: sparsity {100 * m.sparsity:.2f}% (target {100 * m.target_sparsity:.1f}%, off by "
                f"{m.abs_error_points:.3f} points) over {m.elements} weights; whole model {100 * m.model_sparsity:.2f}%; "
                f"acc {acc_before:.2f}% -> {acc_after:.2f}% (max logit change {m.max_abs_logit_change:.2e}); MACs with a "
                f"non-zero weight {m.nonzero_macs}/{m.dense_macs}")
    run.advance("finetune")


def finetune(run: Run) -> None:
    """Fine-tuning with the masks kept (the pruner re-applies them after every step)."""
    cfg, pruner = run.cfg, run.pruner
    with run.timed("finetune"):
        opt = run.sgd(run.model.parameters(), cfg.finetune_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.finetune_epochs, 1))
        run.load_state_into(opt, sched)

        def after_epoch(e, rec):
            rec.update(stage="finetune", epoch=e, test_accuracy=run.evaluate()["accuracy"], sparsity=pruner.stats().sparsity)
            run.log(f"finetune {e}/{cfg.finetune_epochs}: loss {rec['train_loss']:.4f} test acc {rec['test_accuracy']:.2f}% "
                    f"sparsity {100 * rec['sparsity']:.2f}%")
            run.end_of_epoch("finetune", e, rec, optimizer=opt, scheduler=sched)
            return False

        epoch_loop("finetune", cfg.finetune_epochs, start=run.state.epoch, model=run.model, optimizer=opt,
                   train_set=run.train_set, batch_size=cfg.batch_size, seed=cfg.seed, device=run.device, scheduler=sched,
                   after_step=pruner.after_step, after_epoch=after_epoch, progress=cfg.progress, loss_fn=run.loss_fn)
        run.stages.finetune = StageEval(epochs=cfg.finetune_epochs, **run.evaluate())
        st = pruner.stats()
        run.stages.masks.sparsity_after_finetune = st.sparsity
        save_atomic({"state_dict": run.model.state_dict(), "masks": pruner.masks(),
                     "sparsity": {"target": cfg.sparsity, "reached": st.sparsity, "per_tensor": st.per_target},
                     "targets": [asdict(t) for t in pruner.targets]}, run.out / "sparse_model.pt")
    run.advance("done")


UNSTRUCTURED_STAGES = (("dense", dense), ("calibrate", attach), ("sparsify", sparsify), ("masks", masks),
                       ("finetune", finetune))
