"""Claim 1: Catalyst has no magnitude bias. Per method, the rank correlation between a channel's group
norm when the sparsity stage starts and (a) its decision statistic, (b) its decision (1 = pruned).

    python experiments/magnitude_bias.py                     # quick: digits, 3 seeds, CPU, minutes
    python experiments/magnitude_bias.py --setting full

A magnitude-biased method prunes small channels: strongly negative correlation with the decision. Writes
results/magnitude_bias_<setting>.{md,json,png}.
"""
from __future__ import annotations

import math

import _runs


def main(argv=None) -> int:
    args, setting, records, methods = _runs.start(__doc__, argv)
    rows = ["| method | runs | rho(norm, statistic) | rho(norm, pruned) | within-layer rho(norm, statistic) | FLOPs ratio |",
            "|---|---|---|---|---|---|"]
    summary = {}
    for m in methods:
        rs = [r for r in records if r["method"] == m]
        stat = [r["bias"]["spearman_initial_norm_vs_statistic"] for r in rs]
        dec = [r["bias"]["spearman_initial_norm_vs_pruned"] for r in rs]
        within = [r["bias"]["spearman_within_layer_mean"] for r in rs]
        summary[m] = {"rho_statistic": _runs.mean_std(stat), "rho_pruned": _runs.mean_std(dec),
                      "rho_within_layer": _runs.mean_std(within), "runs": len(rs)}
        rows.append(f"| {m} | {len(rs)} | {_runs.fmt(stat)} | {_runs.fmt(dec)} | {_runs.fmt(within)} | "
                    f"{_runs.fmt([r['flops_ratio'] for r in rs])} |")
    cat = summary["catalyst"]["rho_pruned"][0]
    others = {m: s["rho_pruned"][0] for m, s in summary.items() if m != "catalyst" and s["rho_pruned"][0] is not None}
    if cat is None or not others:
        verdict = "not enough decisions to compare (nothing pruned, or one method only)"
    else:
        weaker = [m for m, v in others.items() if abs(cat) < abs(v)]
        verdict = (f"|rho(norm, pruned)| of Catalyst ({cat:+.2f}) is smaller than that of {len(weaker)}/{len(others)} "
                   f"baselines ({', '.join(f'{m} {v:+.2f}' for m, v in others.items())})")
    md = ("Spearman rank correlation between each channel's initial group norm and its decision statistic / its "
          "decision (1 = pruned), mean ± std over runs (seeds x operating points). 0 = no magnitude bias; "
          "negative = small channels are pruned.\n\n" + "\n".join(rows) + f"\n\nClaim check: {verdict}.\n")
    plot = _plot(args, setting, records, methods)
    if plot:
        md += f"\n![initial norm vs decision statistic]({plot.name})\n"
    _runs.write_results(args, "magnitude_bias", setting, md, {"summary": summary, "verdict": verdict})
    return 0


def _plot(args, setting, records, methods):
    plt = _runs.pyplot()
    first = _runs.first_run_per_method(records, methods)
    fig, axes = plt.subplots(1, len(first), figsize=(3.0 * len(first), 2.8), squeeze=False)
    for ax, r in zip(axes[0], first):
        ch = r["channels"]
        x = [math.log10(max(n, 1e-300)) for n in ch["initial_norm"]]
        y = [max(min(s, 12.0), -12.0) for s in ch["statistic"]]
        colors = ["tab:red" if p else "tab:blue" for p in ch["pruned"]]
        ax.scatter(x, y, s=6, c=colors)
        ax.set_title(f"{r['method']} (seed {r['seed']})", fontsize=8)
        ax.set_xlabel("log10 initial norm", fontsize=7)
        ax.set_ylabel(r["statistic"], fontsize=7)
    fig.suptitle("red: pruned, blue: kept", fontsize=8)
    return _runs.save_figure(fig, args, "magnitude_bias")


if __name__ == "__main__":
    raise SystemExit(main())
