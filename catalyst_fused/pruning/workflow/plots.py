"""The report's plots: ``log10c_histograms.png`` (the decision statistic per layer at the end of opt1) and
``accuracy_curve.png`` (test accuracy over every training epoch, stages shaded). Needs matplotlib (the
``[pruning]`` extra); without it the plots are skipped with a note."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["HIST_BINS", "make_plots"]

HIST_BINS = [float(b) for b in np.arange(-12.0, 12.5, 0.5)]  # log10 c histogram bin edges (+-inf clipped)
_STAGE_SHADES = ("dense", "calibrate", "opt1", "prune", "opt2", "finetune", "done", "sparsify", "masks")


def make_plots(out: Path, kappa: float, opt1, history: list, log) -> list[str]:
    """Writes the plots into ``out`` and returns their paths. ``opt1``: the run's
    :class:`~.report.Opt1Report` (or None)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("  plots skipped: matplotlib is not installed (pip install 'catalyst_fused[pruning]')")
        return []
    files = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = Path(out) / name
        tmp = path.with_name("tmp-" + name)
        fig.savefig(tmp, dpi=100)
        tmp.replace(path)
        plt.close(fig)
        files.append(str(path))

    final = (opt1.final_catalysts if opt1 is not None else None) or {}
    layers = final.get("layers", {})
    statistic = final.get("statistic", "log10 c")
    if layers:
        n = len(layers)
        cols = min(4, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
        centers = (np.array(HIST_BINS[:-1]) + np.array(HIST_BINS[1:])) / 2
        for ax, (name, info) in zip(axes.flat, layers.items()):
            ax.bar(centers, info["hist"], width=0.45)
            if statistic in ("log10 c", "log10 u"):  # the +-kappa band is Catalyst's decision rule; baselines have none
                ax.axvline(kappa, color="r", lw=0.8)
                ax.axvline(-kappa, color="r", lw=0.8)
            ax.set_title(name, fontsize=8)
            ax.set_xlabel(statistic, fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        save(fig, "log10c_histograms.png")
    if history:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = np.arange(1, len(history) + 1)
        acc = [h.get("test_accuracy") for h in history]
        ax.plot(x, acc, marker=".")
        start = 0
        for i, h in enumerate(history + [{"stage": None}]):
            if i == len(history) or h["stage"] != history[start]["stage"]:
                ax.axvspan(start + 0.5, i + 0.5, alpha=0.08 * (1 + _STAGE_SHADES.index(history[start]["stage"]) % 3))
                low = min((a for a in acc if a is not None), default=0.0)
                ax.text((start + i) / 2 + 0.5, low, history[start]["stage"], fontsize=7, ha="center")
                start = i
        ax.set_xlabel("epoch (all stages)")
        ax.set_ylabel("test accuracy (%)")
        save(fig, "accuracy_curve.png")
    return files
