"""The CPU priority of a pool's process.

Ray starts every worker process at niceness 15 (``RAY_worker_niceness``) so that its own
daemons stay responsive. Pools, the ingress and Serve's proxy all run there, so they share
the CPU fairly among themselves, but any ordinary process at niceness 0 (a build, a notebook
kernel, a test runner) takes a core from them almost entirely. llama.cpp's threads, which
wait for each other at every decode step, then stall together: on 2 cores, one busy loop
beside ``serve run`` took a stream from ~80 to 1 token/s. With Ray's workers started at 0
(``RAY_worker_niceness=0``) the same stream ran 34-49 tokens/s beside it.

Raising only the pool (``niceness: 0`` with the rest at 15) fixed the stream too, but then
the engine's spinning threads took the CPU of the proxy and ingress: admissions and the
first events of other streams waited behind decode steps. So pools keep Ray's niceness
unless told otherwise, and the cluster configs start Ray's workers at 0.

Niceness is per thread on Linux and new threads inherit their creator's, so when a pool does
set it, every thread the process has is set: those the engine starts later (llama.cpp's and
OpenMP's workers, vLLM's engine process) inherit it. No Ray here.
"""

from __future__ import annotations

import os
from typing import Optional

TASKS_DIR = "/proc/self/task"
HINT = ("start Ray with RAY_worker_niceness=0 in its environment (for example "
        "`RAY_worker_niceness=0 serve run ...`, or before `ray start`) so that every worker runs at 0")


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
            f"(needs CAP_SYS_NICE or RLIMIT_NICE); {HINT}, or set the pool's niceness to null to keep Ray's")


def above_normal_niceness() -> Optional[str]:
    """A note when this process runs at a niceness above 0 (Ray's default for workers)."""
    if not hasattr(os, "getpriority"):
        return None
    now = os.getpriority(os.PRIO_PROCESS, 0)
    if now <= 0:
        return None
    return (f"runs at niceness {now}, as Ray started it: any busy process at 0 beside it slows the engine "
            f"sharply; {HINT}")
