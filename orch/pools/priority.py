"""The CPU priority of a pool's process.

Ray starts every worker process at niceness 15 (``RAY_worker_niceness``) so that its own
daemons stay responsive. For a pool that is the wrong place: any ordinary process at
niceness 0 (a benchmark client, a compiler, a notebook kernel) then takes a core from the
engine almost entirely, and llama.cpp's threads, which wait for each other at every decode
step, stall together. On 2 cores with one busy process beside it, a pool at 15 decoded
about 1 token/s; at 0 it decoded 23-60 (llama.cpp alone beside the same process: 33-44).

Niceness is per thread on Linux and new threads inherit their creator's, so every thread
the process has is set: those the engine starts later (llama.cpp's and OpenMP's workers,
vLLM's engine process) inherit it. No Ray here.
"""

from __future__ import annotations

import os
from typing import Optional

TASKS_DIR = "/proc/self/task"


def thread_ids() -> list[int]:
    """Every thread of this process (Linux); elsewhere ``[0]``, the whole process."""
    try:
        return sorted(int(name) for name in os.listdir(TASKS_DIR))
    except (OSError, ValueError):
        return [0]


def set_niceness(target: int) -> Optional[str]:
    """Put every thread of this process at niceness ``target``. Returns None when that
    holds, else what to do about it (raising priority needs CAP_SYS_NICE or a high enough
    ``RLIMIT_NICE``, which root in a container usually has and a plain user does not)."""
    if not hasattr(os, "setpriority"):
        return None
    refused: list[int] = []
    for tid in thread_ids():
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) != target:
                os.setpriority(os.PRIO_PROCESS, tid, target)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except PermissionError:
            refused.append(tid)
    if not refused:
        return None
    try:
        now = os.getpriority(os.PRIO_PROCESS, refused[0])
    except OSError:
        now = None
    return (f"the engine runs at niceness {now}, not {target}: this user may not raise a process's priority "
            f"(needs CAP_SYS_NICE or RLIMIT_NICE). Start Ray with RAY_worker_niceness={target} in its environment "
            "(for example `RAY_worker_niceness=0 serve run ...` or before `ray start`), or set the pool's "
            "niceness to null to keep Ray's")
