"""Communication the penalty adds per training step under FSDP2: the transformer MLP set (12 blocks of
``x + fc2(gelu(fc1(x)))``, d_model 768, d_ff 3072; groups = fc1 rows + fc1 bias + fc2 input columns, one
segment per block: 36,864 groups) sharded with ``fully_shard`` over N CPU processes (gloo).

Counts every collective issued inside one ``cf.penalty_`` call two ways: torch's ``CommDebugMode`` (its
per-op counts) and a wrapper of ``torch.distributed.all_reduce`` that records the bytes of each call; also
times the call (median of ``--repeats``) sharded and, for comparison, on the unsharded weights in one
process. Writes ``benchmarks/results/distributed_comm.json`` (atomically) with the machine, versions and date.

    python benchmarks/distributed_comm.py --nproc 2 --repeats 5
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def _layout(model):
    from catalyst_fused import GroupLayout, Slices

    weights, segments = [], []
    for block in model.blocks:
        k = len(weights)
        weights += [block.fc1.weight, block.fc1.bias, block.fc2.weight]
        segments.append([Slices(k), Slices(k + 1), Slices(k + 2, dim=1)])
    return weights, GroupLayout.build(weights, segments)


def _worker(rank, world, port, repeats, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    import catalyst_fused as cf
    from weight_sets import TransformerMLP

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = TransformerMLP()
    _, layout = _layout(model)
    catalysts = [torch.nn.Parameter(torch.rand(n) + 0.5) for n in layout.segment_sizes]
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    weights, _ = _layout(model)  # the DTensor parameters fully_shard put in place
    for w in weights:
        w.grad = torch.zeros_like(w)
    sizes = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sizes.append(tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    times, counts = [], []
    for _ in range(repeats):
        sizes.clear()
        dist.all_reduce = counting
        try:
            with CommDebugMode() as comm:
                dist.barrier()
                t0 = time.perf_counter()
                cf.penalty_(weights, catalysts, scale=1e-4, layout=layout)
                times.append(time.perf_counter() - t0)
        finally:
            dist.all_reduce = real
        counts.append({str(k): v for k, v in comm.get_comm_counts().items()})
    if rank == 0:
        local = sum(w.to_local().numel() for w in weights)
        out.put({"collectives_per_call": len(sizes), "bytes_per_rank_per_call": sizes, "comm_debug_mode": counts[-1],
                 "groups": layout.num_groups, "bound_bytes": 4 * layout.num_groups, "local_elements_rank0": local,
                 "sharded_median_ms": 1e3 * statistics.median(times)})
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results" / "distributed_comm.json"))
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(args.nproc, port, args.repeats, queue), nprocs=args.nproc, start_method="spawn")
    result = queue.get()

    import catalyst_fused as cf
    from weight_sets import TransformerMLP

    torch.manual_seed(0)
    model = TransformerMLP()
    weights, layout = _layout(model)
    catalysts = [torch.nn.Parameter(torch.rand(n) + 0.5) for n in layout.segment_sizes]
    for w in weights:
        w.grad = torch.zeros_like(w)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        cf.penalty_(weights, catalysts, scale=1e-4, layout=layout)
        times.append(time.perf_counter() - t0)
    result.update(
        unsharded_one_process_median_ms=1e3 * statistics.median(times), nproc=args.nproc, backend="gloo",
        weight_set="transformer_mlp_group (12 x fc1 [3072, 768] + bias [3072] + fc2 [768, 3072] input columns)",
        command=f"python benchmarks/distributed_comm.py --nproc {args.nproc} --repeats {args.repeats}",
        machine={"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        versions={"torch": torch.__version__, "python": platform.python_version()},
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        note="times on a shared 2-core machine (noisy); one process per core with --nproc 2",
    )
    ok = result["collectives_per_call"] == 1 and max(result["bytes_per_rank_per_call"]) <= result["bound_bytes"]
    result["one_collective_within_bound"] = ok
    path = Path(args.out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(json.dumps(result, indent=2))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
