"""Markdown table of the newest overhead.py run per (weight set, device, dtype, grads, threads, cache) in a CSV.

    python benchmarks/summarize.py                      # benchmarks/results/overhead.csv
    python benchmarks/summarize.py --csv other.csv --mode full
"""
from __future__ import annotations

import argparse
import csv
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
PROVIDER_ORDER = ["eager", "foreach", "compile", "torch_pruning", "cpp", "cpp_inplace", "pruner", "triton", "triton_inplace"]
BASELINES = ("eager", "foreach", "compile", "torch_pruning")


def newest_runs(rows: list[dict]) -> list[dict]:
    """Rows of the newest run (date) of each configuration."""
    key = lambda r: (r["weight_set"], r["device"], r["dtype"], r.get("grads", ""), r["threads"], r["gpu"], r.get("cache", ""))
    newest: dict = {}
    for r in rows:
        if r["date"] > newest.get(key(r), ""):
            newest[key(r)] = r["date"]
    return [r for r in rows if r["date"] == newest[key(r)]]


def table(rows: list[dict], mode: str) -> str:
    rows = [r for r in newest_runs(rows) if r["mode"] == mode]
    configs = sorted({(r["weight_set"], r["device"], r.get("grads", ""), r["threads"], r.get("cache", "")) for r in rows})
    providers = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in rows)]
    head = "| weight set | grads | floor ms | " + " | ".join(providers) + " |"
    lines = [head, "|" + "---|" * (3 + len(providers))]
    for weight_set, device, grads, threads, cache in configs:
        cell = {r["provider"]: r for r in rows
                if (r["weight_set"], r["device"], r.get("grads", ""), r["threads"], r.get("cache", "")) == (weight_set, device, grads, threads, cache)}
        floor = next(iter(cell.values()))["floor_ms"]
        parts = []
        for p in providers:
            r = cell.get(p)
            if r is None:
                parts.append("-")
                continue
            text = f"{float(r['median_ms']):.3g} ms"
            if p not in BASELINES:  # ratios to the baselines that were run in the same run
                ratios = []
                if r["speedup_vs_eager"]:
                    ratios.append(f"{float(r['speedup_vs_eager']):.1f}x eager")
                if r["speedup_vs_compile"]:
                    ratios.append(f"{float(r['speedup_vs_compile']):.2f}x compile")
                ratios.append(f"{float(r['ratio_vs_floor']):.2f}x floor")
                text += f" ({', '.join(ratios)})"
            parts.append(text)
        where = f"{device}, {threads} thr" + (", cache cold" if cache == "cold" else "")
        lines.append(f"| {weight_set} ({where}) | {grads or 'none'} | {float(floor):.3g} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default=str(HERE / "results" / "overhead.csv"))
    parser.add_argument("--mode", default="full", choices=["forward", "full"])
    args = parser.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    print(table(rows, args.mode))


if __name__ == "__main__":
    main()
