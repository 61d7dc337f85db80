"""Claim 3: at the same FLOPs reduction, Catalyst keeps more accuracy than L1 / Group Lasso style pruning.
Every method prunes the same dense model (per seed) to the FLOPs ratio Catalyst reached, with the same
budgets and fine-tuning; mean ± std over seeds.

    python experiments/accuracy_vs_flops.py                  # quick: digits, 3 seeds, one operating point
    python experiments/accuracy_vs_flops.py --setting full   # digits, two operating points
    python experiments/accuracy_vs_flops.py --setting cifar10 --data-root ~/data/cifar10  # ResNet-56, slow

Writes results/accuracy_vs_flops_<setting>.{md,json,png}.
"""
from __future__ import annotations


import _runs


def main(argv=None) -> int:
    args, setting, records, methods = _runs.start(__doc__, argv)
    rows = ["| Catalyst c0 | method | FLOPs ratio | dense acc. | acc. at prune step (before -> after removal) | "
            "acc. after fine-tune | delta vs dense |", "|---|---|---|---|---|---|---|"]
    points = []
    for c0 in setting.c0s:
        for m in methods:
            rs = [r for r in records if r["method"] == m and r["catalyst_c0"] == c0]
            if not rs:
                continue
            delta = [r["acc_finetuned"] - r["acc_dense"] for r in rs]
            points.append({"c0": c0, "method": m, "flops_ratio": _runs.mean_std([r["flops_ratio"] for r in rs]),
                           "acc_finetuned": _runs.mean_std([r["acc_finetuned"] for r in rs]),
                           "acc_after_removal": _runs.mean_std([r["acc_after_removal"] for r in rs]),
                           "delta": _runs.mean_std(delta), "seeds": [r["seed"] for r in rs]})
            rows.append(f"| {c0} | {m} | {_runs.fmt([r['flops_ratio'] for r in rs])}x | {_runs.fmt([r['acc_dense'] for r in rs])} | "
                        f"{_runs.fmt([r['acc_regularized'] for r in rs])} -> {_runs.fmt([r['acc_after_removal'] for r in rs])} | "
                        f"{_runs.fmt([r['acc_finetuned'] for r in rs])} | {_runs.fmt(delta)} |")
    verdicts = []
    for c0 in setting.c0s:
        at = {p["method"]: p for p in points if p["c0"] == c0}
        if "catalyst" not in at or len(at) < 2:
            continue
        cat = at["catalyst"]["acc_finetuned"][0]
        beaten = [m for m, p in at.items() if m != "catalyst" and cat > p["acc_finetuned"][0]]
        verdicts.append(f"at {at['catalyst']['flops_ratio'][0]:.2f}x Catalyst's fine-tuned accuracy ({cat:.2f}%) is higher "
                        f"than {len(beaten)}/{len(at) - 1} baselines' ({', '.join(beaten) or 'none'})")
    verdict = "; ".join(verdicts) or "no operating point to compare"
    md = "\n".join(rows) + f"\n\nClaim check: {verdict}.\n"
    plot = _plot(args, points, methods)
    md += f"\n![accuracy vs FLOPs ratio]({plot.name})\n"
    _runs.write_results(args, "accuracy_vs_flops", setting, md, {"points": points, "verdict": verdict})
    return 0


def _plot(args, points, methods):
    plt = _runs.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for m in methods:
        ps = sorted((p for p in points if p["method"] == m), key=lambda p: p["flops_ratio"][0])
        x = [p["flops_ratio"][0] for p in ps]
        for ax, key in zip(axes, ("acc_after_removal", "acc_finetuned")):
            ax.errorbar(x, [p[key][0] for p in ps], yerr=[p[key][1] for p in ps], marker="o", capsize=3, label=m)
    for ax, title in zip(axes, ("right after removal", "after fine-tuning")):
        ax.set_xlabel("FLOPs ratio (dense / pruned)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title, fontsize=9)
    axes[1].legend(fontsize=7)
    return _runs.save_figure(fig, args, "accuracy_vs_flops")


if __name__ == "__main__":
    raise SystemExit(main())
