"""Command line for the Catalyst pruning workflow.

    python -m catalyst_fused.prune --model small_cnn --dataset digits --mode group --out runs/digits
    python -m catalyst_fused.prune --out runs/digits --resume          # continue an interrupted run
    python -m catalyst_fused.prune --formulation bypass --opt2-epochs 5  # extended model psi = Dx - Dbar x + sigma(x)
    python -m catalyst_fused.prune --export onnx,pt2 --round-to 8    # deployable files; kernel-friendly widths
    python -m catalyst_fused.prune --method lats --sparsity 0.9 --out runs/lats  # unstructured: 90% zero weights

Defaults run on CPU in a few minutes (small_cnn on sklearn digits). See
:mod:`catalyst_fused.pruning.workflow` for what each stage does.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import fields
from typing import Optional, Sequence

from . import require_pruning_extra


def _number(kind, accept, requirement: str):
    """An argparse type: ``kind(text)``, refused with "must be <requirement>" unless ``accept`` holds."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {noun}: {text!r}")
        if not accept(value):  # written as "not ..." so that NaN is refused too
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    return parse


def _int_at_least(low: int):
    return _number(int, lambda v: v >= low, f">= {low}")


_nonneg_int = _int_at_least(0)
_positive_float = _number(float, lambda v: v > 0, "> 0")
_nonneg_float = _number(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
_fraction = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")  # momentum, sparsity


def _gamma(text: str):
    if text == "auto":
        return text
    return _nonneg_float(text)


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .models import MODEL_NAMES
    from .pruning.formulations import FORMULATIONS
    from .pruning.methods import METHODS
    from .pruning.targets import MODES
    from .pruning.unstructured import SCHEDULES, SCOPES, SPARSITY_METHODS
    from .pruning.workflow import PruneConfig

    d = PruneConfig()
    p = argparse.ArgumentParser(prog="python -m catalyst_fused.prune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODEL_NAMES, default=d.model)
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    p.add_argument("--data-root", default=None, help="dataset directory (cifar10/cifar100/imagefolder)")
    p.add_argument("--method", choices=list(METHODS) + list(SPARSITY_METHODS), default=d.method,
                   help="catalyst, or a channel baseline on the same kernels: group_lasso, slimming, lats_channel, "
                        "lats_group; or unstructured pruning to --sparsity: lats (soft-threshold reparameterisation, "
                        "Chen et al. 2023), magnitude")
    p.add_argument("--mode", choices=MODES, default=d.mode, help="catalyst groups: BN scales, filters, or coupled groups")
    p.add_argument("--formulation", choices=FORMULATIONS, default=d.formulation,
                   help="regularizer: d only in R (default); bypass: extended model psi(x) = D x - Dbar x + sigma(x), "
                        "then opt2 folds the bypass away")
    p.add_argument("--out", default=d.out, help="output directory (checkpoint.pt, report.json, plots)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (its saved config wins)")
    p.add_argument("--dense-epochs", type=_nonneg_int, default=d.dense_epochs)
    p.add_argument("--epochs", type=_nonneg_int, default=d.epochs, help="opt1 epoch budget")
    p.add_argument("--finetune-epochs", type=_nonneg_int, default=d.finetune_epochs)
    p.add_argument("--opt2-epochs", type=_nonneg_int, default=d.opt2_epochs,
                   help="bypass: epochs of L + mu_t * sum (d - dbar)^2 before d = dbar is snapped and the bypass folded")
    p.add_argument("--opt2-mu", type=_positive_float, default=d.opt2_mu, help="bypass: opt2 penalty weight mu")
    p.add_argument("--opt2-ramp", type=_nonneg_int, default=d.opt2_ramp, help="bypass: epochs of linear mu ramp")
    p.add_argument("--opt2-lr", type=_positive_float, default=None, help="bypass: constant opt2 learning rate (default: --finetune-lr)")
    p.add_argument("--opt2-tol", type=_positive_float, default=d.opt2_tol,
                   help="bypass: largest max|d - dbar| accepted at the snap (a larger one is reported, not raised)")
    p.add_argument("--gamma", type=_gamma, default=d.gamma,
                   help="penalty weight gamma, or 'auto' (Catalyst, the default: from the opt1 step budget, so that a "
                        "channel 2%% off the threshold decides within half of it); the baselines need a number (their "
                        "L1 / Group Lasso weight)")
    p.add_argument("--gamma-warmup", type=_nonneg_int, default=d.gamma_warmup, help="epochs of linear gamma warm-up")
    p.add_argument("--c0", type=_positive_float, default=d.c0,
                   help="catalyst init: every channel starts at corrected ratio u = c sqrt(k) = c0 (1: the threshold)")
    p.add_argument("--target-speedup", type=_positive_float, default=None,
                   help="FLOPs ratio to reach: Catalyst steers its undecided catalysts to it during opt1 (one run); "
                        "the baselines remove channels in the order of their statistic until it is reached")
    p.add_argument("--kappa", type=_positive_float, default=d.kappa,
                   help="a channel is decided (and frozen) when |log10 u| > kappa")
    p.add_argument("--norm-threshold", type=_positive_float, default=d.norm_threshold,
                   help="baselines without --target-speedup: remove groups with norm <= this")
    p.add_argument("--dense-checkpoint", default=None,
                   help="start from these dense weights (e.g. dense_model.pt of an earlier run) instead of training")
    p.add_argument("--noise-level", type=_nonneg_float, default=d.noise_level,
                   help="relative weight noise for the decision-flip figure")
    p.add_argument("--noise-draws", type=_int_at_least(1), default=d.noise_draws)
    p.add_argument("--lr", type=_positive_float, default=d.lr, help="peak learning rate of dense training")
    p.add_argument("--opt1-lr", type=_positive_float, default=None,
                   help="constant opt1 learning rate (default: 0.1 x --lr; the dense stage ends annealed, and a jump back "
                        "to its peak costs accuracy)")
    p.add_argument("--bn-recalibration-batches", type=_nonneg_int, default=d.bn_recalibration_batches,
                   help="re-estimate BatchNorm statistics on this many training batches before every reported accuracy "
                        "(0: off)")
    p.add_argument("--catalyst-lr", type=_positive_float, default=None, help="catalyst learning rate (default: --lr)")
    p.add_argument("--finetune-lr", type=_positive_float, default=d.finetune_lr)
    p.add_argument("--momentum", type=_fraction, default=d.momentum)
    p.add_argument("--weight-decay", type=_nonneg_float, default=d.weight_decay)
    p.add_argument("--batch-size", type=_int_at_least(1), default=d.batch_size)
    p.add_argument("--seed", type=_nonneg_int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--image-size", type=_int_at_least(1), default=None,
                   help="input resolution (default: 8 for small_cnn on digits, else 32)")
    p.add_argument("--latency-batch", type=_int_at_least(1), default=d.latency_batch,
                   help="latency is measured at batch 1 and this batch size")
    p.add_argument("--latency", default=d.latency,
                   help="runtimes the dense and pruned models are timed in, comma-separated from eager, compile, "
                        "onnxruntime (eager always; default: all three)")
    p.add_argument("--latency-threads", default=d.latency_threads, help="thread counts timed, comma-separated")
    p.add_argument("--latency-repeats", type=_int_at_least(3), default=d.latency_repeats,
                   help="timed samples per model and setting")
    p.add_argument("--export", default=d.export,
                   help="export the pruned model: onnx, pt2 or onnx,pt2 (pruned_model.onnx / .pt2 in --out, each checked "
                        "against the eager model on test inputs; onnx needs the [export] extra). With --resume on a "
                        "finished run: export it (and retake the latency figures) without training")
    p.add_argument("--round-to", type=_int_at_least(1), default=d.round_to,
                   help="round every kept width up to a multiple of this (e.g. 8 or 16) by keeping the least-pruned "
                        "extra channels; 1 = no rounding")
    p.add_argument("--max-prune-fraction", type=float, default=d.max_prune_fraction,
                   help="width floor: no layer loses more than this fraction of its channels (it keeps at least "
                        "ceil((1 - f) n), at least 1); 1 = all but one")
    p.add_argument("--bn-gamma-only", action="store_true", help="bn mode: regularise gamma only (not beta)")
    p.add_argument("--no-prune-pull", action="store_true",
                   help="Catalyst: keep a decided prune-side catalyst at its frozen value (the control before the pull): "
                        "the loss can then hold such a channel away from 0 and the removal is not lossless")
    p.add_argument("--train-limit", type=_int_at_least(1), default=None,
                   help="use only the first N training samples (smoke runs)")
    p.add_argument("--test-limit", type=_int_at_least(1), default=None, help="use only the first N test samples (smoke runs)")
    p.add_argument("--sparsity", type=_fraction, default=None,
                   help="lats/magnitude: target fraction of zero weights over the sparsified tensors, in [0, 1)")
    p.add_argument("--sparsity-scope", choices=SCOPES, default=d.sparsity_scope,
                   help="global: one threshold over all sparsified tensors; layer: every tensor at --sparsity")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="lats threshold schedule: lats (cumulative per-epoch cosine lr), slats (x + sin(pi x)/pi), "
                        "continuation (L1 coefficient growing by --beta over the run)")
    p.add_argument("--beta", type=_positive_float, default=d.beta, help="continuation schedule: growth factor")
    p.add_argument("--sparsify-first", action="store_true", help="lats/magnitude: also sparsify the first layer")
    p.add_argument("--sparsify-classifier", action="store_true",
                   help="lats/magnitude: also sparsify the last layer (the classifier)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--stop-after-epochs", type=int, default=None, help=argparse.SUPPRESS)  # simulate an interruption
    return p


def config_from_args(args: argparse.Namespace):
    from .pruning.workflow import PruneConfig

    values = {f.name: getattr(args, f.name) for f in fields(PruneConfig) if hasattr(args, f.name)}
    values["bn_beta"] = not args.bn_gamma_only
    values["prune_pull"] = not args.no_prune_pull
    values["progress"] = not args.no_progress
    values["plots"] = not args.no_plots
    return PruneConfig(**values)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        require_pruning_extra("python -m catalyst_fused.prune")
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .pruning import distributed
    from .pruning.workflow import OutputBusyError, run_pipeline

    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    try:
        # under torchrun: one process per device, gloo on CPU / nccl on CUDA (pruning/distributed.py)
        distributed.init_from_env(cfg.device)
        result = run_pipeline(cfg, resume=args.resume, stop_after_epochs=args.stop_after_epochs)
    except (ValueError, FileNotFoundError, OutputBusyError) as exc:
        parser.error(str(exc))
    finally:
        distributed.shutdown()
    if result.status == "diverged":
        print(f"error: {result.error} (report: {cfg.out}/report.json)", file=sys.stderr)
        return 1
    failed = [f"{fmt}: {r['error']}" for fmt, r in (getattr(result, "exports", None) or {}).items() if not r["ok"]]
    if failed:
        print(f"error: export failed: {'; '.join(failed)} (report: {cfg.out}/report.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
