"""Multi-process tests on CPU: spawn ``world`` processes with a gloo process group from pytest, with a timeout.

Workers raise (an ``AssertionError``) on failure; :func:`spawn` re-raises it in the test with the worker's
traceback. A worker that hangs (a collective whose peer died) is killed at the timeout and the test fails.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(rank: int, world: int, port: int) -> dict:
    """The environment ``torchrun`` gives a worker (single node)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _entry(rank, fn, world, port, args):
    os.environ.update(launcher_env(rank, world, port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # A passing worker leaves without interpreter finalization. DTensor work keeps the gloo group alive past
    # destroy_process_group (torch 2.13), and a gloo worker thread that drops its last reference to a finished
    # collective while Python is finalizing aborts the process ("terminate called without an active
    # exception", pytorch/pytorch#190489), failing a test whose checks all passed. A failing worker raises
    # above, so the spawn wrapper still reports its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args, world: int = 2, timeout: float = 240.0) -> None:
    """Runs ``fn(rank, world, *args)`` in ``world`` fresh processes (a gloo group is up when it starts)."""
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed test workers did not finish within {timeout} s")


def python_env() -> dict:
    """Environment for a child ``python``: the worktree first on the path, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"  # logs reach their files line by line
    return env


PYTHON = sys.executable
