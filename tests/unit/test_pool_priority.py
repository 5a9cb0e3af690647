"""orch/pools/priority.py: every thread of the process moves, later threads inherit, and a
refusal says what to do. Run in a child process, since niceness only goes up for a plain user."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orch.pools import priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness (/proc)")

CHILD = r"""
import json, os, threading, time
from orch.pools.priority import set_niceness, thread_ids

release = threading.Event()
early = threading.Thread(target=release.wait)
early.start()
start = os.getpriority(os.PRIO_PROCESS, 0)
refused = set_niceness(start + 3)
seen = {}
late = threading.Thread(target=lambda: seen.update(late=os.getpriority(os.PRIO_PROCESS, 0)))
late.start(); late.join()
every = {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in thread_ids()}
release.set(); early.join()
print(json.dumps({"start": start, "refused": refused, "every": sorted(set(every.values())),
                  "threads": len(every), "late": seen["late"]}))
"""


def test_every_thread_moves_and_new_threads_inherit():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60,
                          cwd=os.getcwd())
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    target = min(found["start"] + 3, 19)
    assert found["refused"] is None and found["threads"] >= 2
    assert found["every"] == [target] and found["late"] == target


def test_a_refusal_names_the_way_out(monkeypatch):
    def refuse(which, who, value):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(priority.os, "setpriority", refuse)
    monkeypatch.setattr(priority.os, "getpriority", lambda which, who: 15)
    said = priority.set_niceness(0)
    assert said is not None and "niceness 15, not 0" in said and "RAY_worker_niceness=0" in said


def test_nothing_to_change_is_quiet(monkeypatch):
    monkeypatch.setattr(priority.os, "setpriority", lambda *args: pytest.fail("nothing needed changing"))
    monkeypatch.setattr(priority.os, "getpriority", lambda which, who: 0)
    assert priority.set_niceness(0) is None


def test_a_pool_left_at_rays_niceness_is_told_how_to_start_ray(monkeypatch):
    monkeypatch.setattr(priority.os, "getpriority", lambda which, who: 15)
    said = priority.above_normal_niceness()
    assert said is not None and "niceness 15" in said and "RAY_worker_niceness=0" in said
    monkeypatch.setattr(priority.os, "getpriority", lambda which, who: 0)
    assert priority.above_normal_niceness() is None
