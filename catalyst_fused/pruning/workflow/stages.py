"""The stages of the pipeline, each a function of the :class:`~.runner.Run` that ends by advancing it:

    dense -> calibrate -> opt1 -> prune -> [opt2] -> finetune -> (report)

Every stage is written against the public :class:`~catalyst_fused.pruning.Pruner` (attach, regularize,
decide, remove) and the one epoch loop of :mod:`.training`; the runner owns checkpoints and interruption.
"""
from __future__ import annotations

import platform
from typing import Optional

import numpy as np
import torch

from .. import distributed
from ..methods import decision_flips, round_widths, spearman
from ..export import export_model, parse_formats
from ..latency import compare_latency, parse_threads
from ..metrics import count_flops, count_params
from ..pruner import Decision, margin
from ..serialization import save_pruned
from ..surgery import mask_model
from .calibration import calibrate as calibrate_pruner, opt1_hooks
from .report import Accuracy, Cost, Opt1Report, Opt2Report, PruneStageReport, Report, StageEval
from .runner import Run, save_atomic
from .training import epoch_loop
from .plots import HIST_BINS, make_plots

__all__ = ["STAGES", "run_stages", "final_report", "decision_stats"]


def decision_stats(pruner) -> dict:
    """Per-layer figures of the method's statistic ``s`` (``log10 c`` for Catalyst) for logs and the report.
    Keys keep Catalyst's names (``log10c_gt_0`` = ``s > 0``); the baselines have no undecided channels."""
    st = pruner.stats()
    layers = {}
    for t in st.targets:
        hist, _ = np.histogram(t.statistic.clamp(HIST_BINS[0], HIST_BINS[-1]).numpy(), bins=HIST_BINS)
        layers[t.name] = {"channels": t.channels, "decided": t.decided, "log10c_gt_0": t.above_zero,
                          "min_log10c": t.min, "max_log10c": t.max, "hist": hist.tolist()}
    return {"penalty": st.penalty, "statistic": st.statistic, "fraction_decided": st.fraction_decided,
            "fraction_c_gt_1": st.fraction_above_zero, "undecided": st.undecided, "layers": layers}


def _supervised(run: Run, stage: str, epochs: int, lr: float) -> StageEval:
    """Plain training with a cosine schedule (dense training, fine-tuning), resumable epoch by epoch."""
    opt = run.sgd(run.model.parameters(), lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    run.load_state_into(opt, sched)

    def after_epoch(e, rec):
        rec.update(stage=stage, epoch=e, test_accuracy=run.evaluate()["accuracy"])
        run.log(f"{stage} {e}/{epochs}: loss {rec['train_loss']:.4f} test acc {rec['test_accuracy']:.2f}%")
        run.end_of_epoch(stage, e, rec, optimizer=opt, scheduler=sched)
        return False

    epoch_loop(stage, epochs, start=run.state.epoch, model=run.model, optimizer=opt, train_set=run.train_set,
               batch_size=run.cfg.batch_size, seed=run.cfg.seed, device=run.device, scheduler=sched,
               after_epoch=after_epoch, progress=run.cfg.progress, loss_fn=run.loss_fn)
    return StageEval(epochs=epochs, **run.evaluate())


# ------------------------------------------------------------------------------------------------ stages
def dense(run: Run) -> None:
    cfg = run.cfg
    with run.timed("dense"):
        if cfg.dense_checkpoint is not None:
            loaded = torch.load(cfg.dense_checkpoint, map_location=run.device, weights_only=True)
            try:
                run.model.load_state_dict(loaded)
            except (RuntimeError, TypeError, AttributeError) as exc:
                raise ValueError(f"--dense-checkpoint {cfg.dense_checkpoint} does not fit model {cfg.model}: {exc}") from exc
            run.stages.dense = StageEval(epochs=0, loaded_from=cfg.dense_checkpoint, **run.evaluate())
            run.log(f"dense weights loaded from {cfg.dense_checkpoint}: test acc {run.stages.dense.accuracy:.2f}%")
        else:
            run.stages.dense = _supervised(run, "dense", cfg.dense_epochs, cfg.lr)
    save_atomic(run.model.state_dict(), run.out / "dense_model.pt")  # reusable with --dense-checkpoint
    run.advance("calibrate")


def calibrate(run: Run) -> None:
    """The pruner (threshold-corrected catalysts), its gamma (``auto``: from the opt1 budget) and the
    dynamics' predictions (:mod:`.calibration`)."""
    with run.timed("calibrate"):
        run.pruner = run.new_pruner(run.state.c0)
        run.stages.calibration = calibrate_pruner(run)
        # group norms when opt1 starts, before any catalyst moved (magnitude-bias figure)
        run.state.initial_norms = run.pruner.method.norms(run.pruner.target_set).cpu()
    run.advance("opt1")


def _opt1_log(e: int, epochs: int, rec: dict, st: dict, pruner) -> str:
    text = (f"opt1 {e}/{epochs}: loss {rec['train_loss']:.4f} R {st['penalty']:.4f} acc {rec['test_accuracy']:.2f}% "
            f"decided {100 * st['fraction_decided']:.1f}% {st['statistic']}>0 {100 * st['fraction_c_gt_1']:.1f}%")
    control = getattr(pruner.method, "control", None)
    if control is not None:
        text += f" (pruned {int((control.state == 1).sum())}, kept {int((control.state == -1).sum())}"
        if pruner.target_speedup is not None:
            text += f", predicted {rec['predicted_speedup']:.2f}x, target shift {control.total_shift:+.3f} decades"
        text += ")"
    return text


def opt1(run: Run) -> None:
    """``L + gamma_t R`` (or the baseline's sparsity step) until the method's stop rule or the budget."""
    cfg, pruner = run.cfg, run.pruner
    with run.timed("opt1"):
        lr = cfg.opt1_learning_rate
        base_gamma = run.stages.calibration.gamma
        opt = torch.optim.SGD(pruner.param_groups(lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay))
        pruner.attach_optimizer(opt)
        run.load_state_into(opt)
        start = run.state.epoch
        if run.stages.opt1 is None:
            run.stages.opt1 = Opt1Report(method=pruner.method.name, c0=run.state.c0, gamma=base_gamma, lr=lr)
        op = run.stages.opt1
        stats = decision_stats(pruner)
        if start == 0:
            op.initial_fraction_decided = stats["fraction_decided"]
        stopped = start > 0 and pruner.all_decided()
        dense_acc = run.stages.dense.accuracy

        def after_epoch(e, rec):
            st = decision_stats(pruner)
            ev = run.evaluate()  # BatchNorm statistics re-estimated: the weights moved faster than they follow
            rec.update(stage="opt1", epoch=e, gamma=pruner.gamma, test_accuracy=ev["accuracy"], test_loss=ev["loss"],
                       penalty=st["penalty"], fraction_decided=st["fraction_decided"],
                       fraction_c_gt_1=st["fraction_c_gt_1"], undecided=st["undecided"],
                       layers={k: {kk: v[kk] for kk in ("decided", "log10c_gt_0", "hist")} for k, v in st["layers"].items()})
            control = getattr(pruner.method, "control", None)
            if control is not None and pruner.target_speedup is not None:
                predicted = (control.state == 1) | ((control.state == 0) & (torch.cat(pruner.scores()) > 0))
                rec.update(predicted_speedup=float(pruner.flops_model().ratio(predicted)),
                           target_shift_decades=control.total_shift)
            run.log(_opt1_log(e, cfg.epochs, rec, st, pruner))
            if dense_acc - ev["accuracy"] > 10 and not any(w.startswith("opt1 epoch") for w in op.warnings):
                op.warnings.append(f"opt1 epoch {e}: test accuracy {ev['accuracy']:.2f}% is {dense_acc - ev['accuracy']:.1f} "
                                   f"points below the dense {dense_acc:.2f}% (BatchNorm statistics re-estimated): the "
                                   "sparsity term or the opt1 learning rate is too strong for this model")
                run.log(f"warning: {op.warnings[-1]}")
            stop = pruner.all_decided()
            op.epochs_run = e
            run.end_of_epoch("opt1", e, rec, optimizer=opt)
            return stop

        e = start
        if not stopped:
            before_epoch, after_backward, after_step = opt1_hooks(pruner, base_gamma, cfg)
            e, stopped = epoch_loop("opt1", cfg.epochs, start=start, model=run.model, optimizer=opt, train_set=run.train_set,
                                    batch_size=cfg.batch_size, seed=cfg.seed, device=run.device, before_epoch=before_epoch,
                                    after_backward=after_backward, after_step=after_step, after_epoch=after_epoch,
                                    progress=cfg.progress, loss_fn=run.loss_fn)
        op.stop_rule_fired = bool(stopped) if pruner.method.has_stop_rule else None
        op.stopped_because = "all channels decided" if stopped else "epoch budget spent"
        op.epochs_run = e
        final = decision_stats(pruner)
        op.final_catalysts = final
        summary = pruner.method.summary()
        op.final_threshold = summary.get("final_threshold")
        op.decisions = summary.get("decisions")
        ev = run.evaluate()
        op.accuracy, op.loss, op.samples = ev["accuracy"], ev["loss"], ev["samples"]
    run.advance("prune")


def _magnitude_bias(initial_norms: torch.Tensor, decisions: list) -> dict:
    """Spearman rank correlations between each channel's group norm when the sparsity stage started and
    its decision statistic / its decision (1 = pruned): near 0 means no magnitude bias."""
    stat = torch.cat([d.statistic for d in decisions])
    pruned = torch.cat([d.prune for d in decisions]).double()
    per_layer = []
    start = 0
    for d in decisions:
        n = len(d.statistic)
        r = spearman(initial_norms[start : start + n], d.statistic)
        if r is not None:
            per_layer.append(r)
        start += n
    return {"spearman_initial_norm_vs_statistic": spearman(initial_norms, stat),
            "spearman_initial_norm_vs_pruned": spearman(initial_norms, pruned),
            "spearman_within_layer_mean": sum(per_layer) / len(per_layer) if per_layer else None}


def prune(run: Run) -> None:
    """Decide, verify against the regularized model, remove physically (in place, through the pruner)."""
    cfg, pruner, model = run.cfg, run.pruner, run.model
    with run.timed("prune"):
        # re-estimated BatchNorm statistics first: the verification below compares eval-mode outputs
        acc_reg = run.evaluate()["accuracy"]
        rule = pruner.rule()
        scores = pruner.scores()
        decisions = [Decision(t.name, s, p, u, f) for t, s, (p, u, f) in zip(pruner.targets, scores, rule.decide(scores))]
        robustness = decision_flips(lambda sc: [p for p, _, _ in rule.redecide(sc)], pruner.scores,
                                    pruner.target_set.weights, [d.prune for d in decisions], noise=cfg.noise_level,
                                    draws=cfg.noise_draws, seed=cfg.seed)
        # --round-to keeps extra (least-pruned) channels; the method's figures (margin, flips, bias) stay the rule's
        removed = round_widths(decisions, cfg.round_to)
        keep = {d.target: d.keep for d in removed}
        # constants that removed channels still feed their consumers (a BN shift left out of the groups) move
        # into the consumers' biases; the masked model (removed consumer columns zeroed, same folds) has the
        # pruned model's function
        folds = pruner.constant_folds(keep)
        masked = mask_model(model, pruner.formulation.inner(model, pruner.targets), keep, folds=folds)
        x = run.test_batch()
        model.eval(), masked.eval()
        with torch.no_grad():
            y_reg, y_mask = model(x), masked(x)
        summary = pruner.prune(keep, folds=folds)
        model.eval()
        with torch.no_grad():
            y_pruned = model(x)
        scale = float(y_reg.abs().max())
        surgery_err = float((y_pruned - y_mask).abs().max())
        function_err = float((y_pruned - y_reg).abs().max())
        acc_pruned = run.evaluate()["accuracy"]
        per_layer = {d.target: {"channels": d.channels, "kept": int(d.keep.numel()), "pruned": int(d.prune.sum()),
                                "undecided": int(d.undecided.sum()), "forced_keep": d.forced_keep, "rounded": d.rounded,
                                "undecided_indices": d.undecided.nonzero().flatten().tolist()} for d in removed}
        statistic = pruner.method.statistic
        report = PruneStageReport(
            method=pruner.method.name, rule=rule.text, statistic=statistic,
            channels_total=summary.channels_total, channels_pruned=summary.channels_pruned,
            undecided_total=sum(v["undecided"] for v in per_layer.values()),
            margin_log10c=margin(decisions), margin_log10c_decided_only=margin(decisions, decided_only=True),
            margin_definition=f"min {statistic} over pruned channels - max {statistic} over kept channels (incl. "
                              "undecided), in decades" + ("; a group the prune side's pull set to zero counts with "
                              "the value at which it was zeroed (its ratio is infinite after), so the margin is a "
                              "lower bound" if pruner.method.name == "catalyst" and pruner.prune_pull else ""),
            robustness=robustness,
            magnitude_bias=_magnitude_bias(run.state.initial_norms, decisions),
            # one entry per channel (targets in order): what the experiments in experiments/ plot
            channels={"layer": [k for k, d in enumerate(decisions) for _ in range(d.channels)],
                      "initial_norm": run.state.initial_norms.tolist(),
                      "statistic": torch.cat([d.statistic for d in decisions]).tolist(),
                      "pruned": torch.cat([d.prune for d in decisions]).tolist()},
            per_layer=per_layer, accuracy_regularized=acc_reg, accuracy_after_removal=acc_pruned,
            verification={
                "samples": int(x.shape[0]), "max_abs_logit": scale,
                "surgery_max_abs_err": surgery_err, "surgery_tol": 1e-4 * max(scale, 1.0),
                "surgery_ok": surgery_err <= 1e-4 * max(scale, 1.0),
                "function_max_abs_err": function_err, "function_tol": cfg.verify_rtol * max(scale, 1.0),
                "function_ok": function_err <= cfg.verify_rtol * max(scale, 1.0),
                "argmax_agreement": float((y_pruned.argmax(1) == y_reg.argmax(1)).float().mean()),
                "constants_folded": summary.folded,
            },
        )
        # A penalty or learning rate too large for the model collapses it during opt1: say so.
        lost = run.stages.dense.accuracy - acc_reg
        if lost > 10:
            report.warnings.append(
                f"opt1 lost {lost:.1f} points of test accuracy (dense {run.stages.dense.accuracy:.2f}% -> {acc_reg:.2f}%, "
                "BatchNorm statistics re-estimated): the sparsity term or the opt1 learning rate is too large for this "
                "model; try a smaller --gamma or --opt1-lr, or a longer --epochs budget with --gamma auto")
        for w in report.warnings:
            run.log(f"warning: {w}")
        run.stages.prune = report
        v = report.verification
        run.log(f"prune: removed {report.channels_pruned}/{report.channels_total} channels, undecided {report.undecided_total}, "
                f"margin {report.margin_log10c}, acc {acc_reg:.2f}% -> {acc_pruned:.2f}%, "
                f"|pruned - regularized| {function_err:.2e} (tol {v['function_tol']:.2e}), surgery err {surgery_err:.2e}")
    run.advance("opt2" if pruner.formulation.is_attached(model) else "finetune")


def opt2(run: Run) -> None:
    """Bypass formulation: drive ``d - dbar`` of the kept channels to 0, then snap and fold the bypass away."""
    from .. import bypass

    cfg, pruner, model = run.cfg, run.pruner, run.model
    with run.timed("opt2"):
        lr2 = cfg.opt2_learning_rate
        opt = bypass.opt2_optimizer(model, lr2, cfg.momentum, cfg.weight_decay)
        run.load_state_into(opt)
        if run.stages.opt2 is None:
            run.stages.opt2 = Opt2Report(epochs=cfg.opt2_epochs, mu=cfg.opt2_mu, ramp=cfg.opt2_ramp, lr=lr2,
                                         initial_max_abs_coefficient=pruner.max_abs_coefficient(),
                                         objective="L + mu_t * sum (d - dbar)^2 over the kept channels")
        mu = [0.0]

        def before_epoch(e):
            mu[0] = bypass.opt2_mu(cfg.opt2_mu, cfg.opt2_ramp, e)

        def after_epoch(e, rec):
            rec.update(stage="opt2", epoch=e, mu=mu[0], max_abs_coefficient=pruner.max_abs_coefficient(),
                       test_accuracy=run.evaluate()["accuracy"])
            run.log(f"opt2 {e}/{cfg.opt2_epochs}: loss {rec['train_loss']:.4f} mu {mu[0]:.3g} max|d - dbar| "
                    f"{rec['max_abs_coefficient']:.2e} acc {rec['test_accuracy']:.2f}%")
            run.end_of_epoch("opt2", e, rec, optimizer=opt)
            return False

        epoch_loop("opt2", cfg.opt2_epochs, start=run.state.epoch, model=model, optimizer=opt, train_set=run.train_set,
                   batch_size=cfg.batch_size, seed=cfg.seed, device=run.device, before_epoch=before_epoch,
                   after_backward=lambda: pruner.bypass_penalty_(mu[0]), after_epoch=after_epoch, progress=cfg.progress,
                   loss_fn=run.loss_fn)
        x = run.test_batch()
        acc_before = run.evaluate()["accuracy"]
        model.eval()
        with torch.no_grad():
            y_before = model(x)
        residual = pruner.fold()
        model.eval()
        with torch.no_grad():
            y_after = model(x)
        acc_after = run.evaluate()["accuracy"]
        op2 = run.stages.opt2
        op2.residual_max_abs_coefficient, op2.residual_tol, op2.residual_ok = residual, cfg.opt2_tol, residual <= cfg.opt2_tol
        op2.accuracy_before_snap, op2.accuracy_after_snap = acc_before, acc_after
        op2.snap_accuracy_change = acc_after - acc_before
        op2.snap_max_abs_logit_change = float((y_after - y_before).abs().max())
        op2.samples = int(x.shape[0])
        run.log(f"opt2: residual max|d - dbar| {residual:.2e} ({'ok' if op2.residual_ok else 'ABOVE'} tol {cfg.opt2_tol:g}); "
                f"snap d = dbar changed acc {acc_before:.2f}% -> {acc_after:.2f}%, logits by "
                f"{op2.snap_max_abs_logit_change:.2e}; bypass folded away")
    run.advance("finetune")


def finetune(run: Run) -> None:
    with run.timed("finetune"):
        run.stages.finetune = _supervised(run, "finetune", run.cfg.finetune_epochs, run.cfg.finetune_lr)
    run.advance("done")


STAGES = (("dense", dense), ("calibrate", calibrate), ("opt1", opt1), ("prune", prune), ("opt2", opt2), ("finetune", finetune))


def run_stages(run: Run) -> None:
    """Runs every stage from the one the state is at (a stage that is not reached is skipped). Unstructured
    methods (lats, magnitude) run their own stages (unstructured.py): no channel is removed."""
    from ..unstructured import is_unstructured
    from .unstructured import UNSTRUCTURED_STAGES

    for name, stage in UNSTRUCTURED_STAGES if is_unstructured(run.cfg.method) else STAGES:
        if run.state.stage == name:
            stage(run)


# ------------------------------------------------------------------------------------------------ report
def final_report(run: Run, *, status: str = "done", error: Optional[str] = None) -> Report:
    """The typed report of the run so far (``status`` "done", or "diverged" with ``error``)."""
    cfg, st = run.cfg, run.stages
    cost = None
    if status == "done":
        pruned_cost = {"flops": count_flops(run.model, run.input_shape), "params": count_params(run.model)}
        flops_ratio = run.dense_cost["flops"]["macs"] / pruned_cost["flops"]["macs"]
        threads = parse_threads(cfg.latency_threads)
        run.log(f"latency: dense vs pruned, runtimes {cfg.latency}, batch 1 and {cfg.latency_batch}, threads "
                f"{cfg.latency_threads} (CPU)")
        table = compare_latency(_dense_model(run), run.model, run.input_shape, batches=(1, cfg.latency_batch),
                                threads=threads, runtimes=cfg.latency, repeats=cfg.latency_repeats, flops_ratio=flops_ratio,
                                seed=cfg.seed, log=run.log)
        head = table.row("eager", cfg.latency_batch, max(threads))  # the headline figure: eager, most threads

        def latency(side):
            return {"runtime": "eager", "device": "cpu", "batch_size": cfg.latency_batch, "threads": head.threads,
                    "median_ms": getattr(head, f"{side}_ms"), "p20_ms": getattr(head, f"{side}_p20_ms"),
                    "p80_ms": getattr(head, f"{side}_p80_ms"), "repeats": head.samples}

        cost = Cost(dense={**run.dense_cost, "latency": latency("dense")}, pruned={**pruned_cost, "latency": latency("pruned")},
                    flops_ratio=flops_ratio, params_ratio=run.dense_cost["params"] / pruned_cost["params"],
                    latency_ratio=head.speedup,
                    flops_counting="MACs of Conv2d and Linear layers via forward hooks, one sample; flops = 2 * macs",
                    latency_table=table)
    from dataclasses import asdict

    accuracy = Accuracy(
        dense=None if st.dense is None else st.dense.accuracy,
        regularized=None if st.opt1 is None else st.opt1.accuracy,
        after_removal=None if st.prune is None else st.prune.accuracy_after_removal,
        after_opt2=None if st.opt2 is None else st.opt2.accuracy_after_snap,
        after_finetune=None if st.finetune is None else st.finetune.accuracy,
    )
    elapsed = run.state.elapsed
    return Report(
        status=status, config=cfg, dataset=dict(run.info), input_shape=list(run.input_shape),
        targets=[asdict(t) for t in run.targets], targets_excluded=run.excluded, c0_used=run.state.c0, stages=st,
        accuracy=accuracy, cost=cost,
        per_layer_kept={} if st.prune is None else {k: v["kept"] for k, v in st.prune.per_layer.items()},
        margin_log10c=None if st.prune is None else st.prune.margin_log10c,
        decision_flips=None if st.prune is None else st.prune.robustness,
        magnitude_bias=None if st.prune is None else st.prune.magnitude_bias,
        undecided_total=None if st.prune is None else st.prune.undecided_total,
        history=run.state.history, runtime_s=dict(elapsed, total=sum(elapsed.values())),
        environment={"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
                     **distributed.environment()},
        method=cfg.method, formulation=cfg.formulation, opt2=None if st.opt2 is None else st.opt2.to_dict(), error=error,
        evaluation=(f"every accuracy with BatchNorm statistics re-estimated on {cfg.bn_recalibration_batches} training "
                    f"batches of {cfg.batch_size} (no gradient) first" if cfg.bn_recalibration_batches else
                    "eval mode with the running BatchNorm statistics training left (bn_recalibration_batches = 0)"),
    )


def _dense_model(run: Run) -> torch.nn.Module:
    """A dense model with the run's dense weights (``dense_model.pt``), for the latency comparison."""
    model = run.new_model()
    path = run.out / "dense_model.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, map_location=run.device, weights_only=True))
    return model


def write_outputs(run: Run, report: Report) -> Report:
    """Plots, then the pruned model (``pruned_model.safetensors`` + ``pruned_model.json``, see
    :mod:`..serialization`) and its exports (``--export``: ``pruned_model.onnx`` / ``.pt2``, each checked against
    the eager model on test inputs), then ``report.json`` (each atomic; the report last, so a report on disk
    always has its model)."""
    if run.cfg.plots:
        report.plots = make_plots(run.out, run.cfg.kappa, run.stages.opt1, run.state.history, run.log)
    from ..unstructured import is_unstructured

    if report.status == "done":
        # Unstructured methods keep every channel: their deliverable is sparse_model.pt (weights + masks).
        if not is_unstructured(run.cfg.method):
            save_pruned(run.model, run.out / "pruned_model", pruner=run.pruner, builder=run.inputs.builder)
        formats = parse_formats(run.cfg.export)
        if formats:
            x = run.test_batch()
            results = export_model(run.model, x[:2], run.out / "pruned_model", formats, check_inputs=x, strict=False,
                                   log=run.log)
            report.exports = {fmt: r.to_dict() for fmt, r in results.items()}
    report.to_json(run.out / "report.json")
    return report
