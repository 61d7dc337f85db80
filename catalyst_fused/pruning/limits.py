"""Bounded analysis: a time and memory limit around a piece of Python work, with a clear error.

Torch-Pruning's group search can grow without bound on some graphs (its index mappings through slices and
concatenations: a 2-layer Llama's query projection never finishes, swin_t exhausted 18 GB). :func:`bounded`
runs a watchdog thread beside the work; when the elapsed time or the growth of the process's resident
memory passes its limit it raises :class:`AnalysisLimitError` in the working thread (through
``PyThreadState_SetAsyncExc``, delivered at the next Python bytecode: a single long C call is not
interrupted). The resident size is read from ``/proc/self/statm``; where that does not exist only the time
limit applies.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from contextlib import contextmanager
from typing import Optional

__all__ = ["AnalysisLimitError", "bounded", "resident_bytes"]


class AnalysisLimitError(RuntimeError):
    """The analysis passed its time or memory limit (the message says which, and how to raise it)."""


def resident_bytes() -> Optional[int]:
    """The resident memory of this process, or None where ``/proc/self/statm`` does not exist."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _Fired(AnalysisLimitError):
    """Raised asynchronously; :func:`bounded` turns it into an :class:`AnalysisLimitError` with the message."""


@contextmanager
def bounded(what: str, time_limit: Optional[float], memory_limit: Optional[float], *, hint: str = "", poll: float = 0.05):
    """Raises :class:`AnalysisLimitError` inside the ``with`` block once it has run ``time_limit`` seconds or
    the resident memory has grown by ``memory_limit`` bytes (None: no limit). ``what`` and ``hint`` go into
    the message."""
    if time_limit is None and memory_limit is None:
        yield
        return
    tid = threading.get_ident()
    start, base = time.monotonic(), resident_bytes()
    state = {"active": True, "reason": None}
    lock = threading.Lock()
    stop = threading.Event()
    fired = type("_Fired", (_Fired,), {})  # one class per block: nested limits tell their exceptions apart

    def watch():
        while not stop.wait(poll):
            elapsed = time.monotonic() - start
            reason = None
            if time_limit is not None and elapsed > time_limit:
                reason = f"{what} ran longer than its time limit of {time_limit:g} s"
            elif memory_limit is not None and base is not None:
                grown = (resident_bytes() or base) - base
                if grown > memory_limit:
                    reason = (f"{what} grew the process's memory by {grown / 2**30:.2f} GiB, past its limit of "
                              f"{memory_limit / 2**30:.2f} GiB")
            if reason is not None:
                with lock:
                    if state["active"]:
                        state["reason"] = reason
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(fired))
                return

    watcher = threading.Thread(target=watch, name="catalyst-fused-limit", daemon=True)
    watcher.start()
    try:
        yield
    except fired:
        raise AnalysisLimitError(f"{state['reason']}{'; ' + hint if hint else ''}") from None
    finally:
        with lock:
            state["active"] = False
            if state["reason"] is not None:  # fired but possibly not delivered yet: cancel it
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
        stop.set()
        watcher.join()
