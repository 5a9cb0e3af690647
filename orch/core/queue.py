"""Bounded per-pool queue with two priorities, fair between tenants inside each.

Interactive tasks always leave before batch tasks. Inside a priority band, tenants share the
pool by start-time fair queueing (SFQ): a task gets the start tag ``max(V, F)``, where ``V``
is the band's virtual time (the start tag of the task it last handed out) and ``F`` the finish
tag of its tenant's previous task, and it finishes at ``start + cost / weight``. The band
hands out the smallest start tag. Equal tags go first to the tenant with less work queued
(the smaller finish tag: a light tenant's burst is not interleaved with a heavy tenant's
backlog when both are owed the same), then to the earlier arrival; never by a tenant's name.
A tenant's own tasks keep their arrival order, and with one tenant (every task "default"
when keys are not in use) the order is exactly FIFO.

- Cost is 1 per task. The queue hands out slots, and a task holds its slot until it ends
  whatever its length; what a task will really cost is unknown here (``max_tokens`` is only an
  upper bound, often far above the real output), so charging it would punish generous
  clients. Tokens are metered and limited per tenant at the ingress instead.
- No banked credit: a tenant that was idle starts at ``V``, not at its old finish tag, so it
  is not owed the service it did not ask for. When a band empties its tags are forgotten.
- A cancelled or evicted task gives its share back: its tenant's later tasks move up by its
  ``cost / weight``, as if it had never been queued.
- ``position()`` and ``ids()`` are the real pop order of what is queued now: pops move only
  ``V``, so that order holds until the next enqueue or cancel (a later arrival of a less
  served tenant may go ahead, as an interactive task may).
- ``pop_idle()`` serves a pool's reserve slot: the next task of a tenant with nothing running,
  ahead of the order above (its tenant was charged its share when it was queued, so its
  later tasks still wait their turn). It moves ``V`` only when that task was next anyway.

When the queue is full, policy ``reject`` refuses the newcomer, and policy ``drop-lru``
evicts a least recently queued task to make room: from the batch band if it holds any, else
from the interactive band; a batch newcomer never evicts an interactive task (that would let
lower priority work displace higher), it is refused instead. Inside the band the victim is
the oldest task of the tenant most over its share, the newcomer counted with its own tenant:
first a tenant with more than one task, then the largest queued ``cost / weight``, then the
oldest task. So a tenant that holds most of a band evicts its own oldest work there, never
another tenant's only task, whatever the weights (priority still comes first: batch work is
evicted before interactive work, whoever holds it); with one tenant the victim is simply
the oldest task of the band, as before tenants existed.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Container, Generic, Iterator, Optional, TypeVar

from orch.api.tasks import Priority

T = TypeVar("T")

DEFAULT_TENANT = "default"
#: What one task costs in virtual time at weight 1 (see the module docstring).
TASK_COST = 1.0
_ORDER = (Priority.interactive, Priority.batch)


class QueuePolicy(str, Enum):
    reject = "reject"
    drop_lru = "drop-lru"


class QueueFullError(Exception):
    """The queue had no room and the policy did not make any for this task."""

    def __init__(self, policy: QueuePolicy, capacity: int) -> None:
        super().__init__(f"queue full ({capacity} tasks, policy {policy.value})")
        self.policy = policy
        self.capacity = capacity


@dataclass(frozen=True)
class EnqueueOutcome:
    #: Number of tasks ahead of the new one at the moment it was queued.
    position: int
    #: Id of the task evicted to make room (drop-lru), if any.
    dropped: Optional[str] = None


class _Entry:
    __slots__ = ("task_id", "item", "start", "share", "seq", "owner")

    def __init__(self, task_id: str, item: object, start: float, share: float, seq: int, owner: "_Tenant") -> None:
        self.task_id = task_id
        self.item = item
        self.start = start
        self.share = share  # cost / weight: how far this task moves its tenant's tags
        self.seq = seq
        self.owner = owner

    @property
    def key(self) -> tuple[float, float, int]:
        """Pop order: start tag, then the tenant with less queued work (its finish tag), then arrival.
        Pops move neither (only V moves), so the order of what is queued is fixed until the
        next enqueue or cancel."""
        return (self.start, self.owner.finish, self.seq)


class _Tenant:
    __slots__ = ("queue", "finish")

    def __init__(self) -> None:
        self.queue: deque[_Entry] = deque()
        self.finish = 0.0

    def backlog(self) -> float:
        return sum(entry.share for entry in self.queue)


def _key(entry: _Entry) -> tuple[float, float, int]:
    return entry.key


def _index(queue: deque[_Entry], entry: _Entry) -> int:
    """Where ``entry`` sits in its tenant's queue (sorted by key: a binary search)."""
    index = bisect.bisect_left(queue, entry.key, key=_key)
    if index == len(queue) or queue[index] is not entry:
        raise KeyError(entry.task_id)
    return index


class _Band:
    """One priority's tasks: a FIFO per tenant, merged by start tag."""

    def __init__(self) -> None:
        self.tenants: dict[str, _Tenant] = {}
        self.vtime = 0.0
        self.count = 0

    def add(self, tenant: str, task_id: str, item: object, share: float, seq: int) -> _Entry:
        state = self.tenants.get(tenant)
        if state is None:
            state = self.tenants[tenant] = _Tenant()
        entry = _Entry(task_id, item, max(self.vtime, state.finish), share, seq, state)
        state.finish = entry.start + share
        state.queue.append(entry)
        self.count += 1
        return entry

    def pop(self, skip: Container[str] = ()) -> Optional[_Entry]:
        """The task with the smallest tag, of a tenant not in ``skip``."""
        best: Optional[_Tenant] = None
        first: Optional[_Tenant] = None  # the smallest tag of all: virtual time moves only to it
        for name, state in list(self.tenants.items()):
            if not state.queue:
                if state.finish <= self.vtime:  # nothing left to remember: it would start at V anyway
                    del self.tenants[name]
                continue
            if first is None or state.queue[0].key < first.queue[0].key:
                first = state
            if name not in skip and (best is None or state.queue[0].key < best.queue[0].key):
                best = state
        if best is None:
            return None
        entry = best.queue.popleft()
        if best is first:
            self.vtime = entry.start
        self.count -= 1
        self._forget_if_idle()
        return entry

    def remove(self, entry: _Entry) -> None:
        """Take a task out; its tenant's later tasks move up by its share."""
        state = entry.owner
        index = _index(state.queue, entry)
        del state.queue[index]
        for later in itertools.islice(state.queue, index, None):
            later.start -= entry.share
        state.finish -= entry.share
        self.count -= 1
        self._forget_if_idle()

    def _forget_if_idle(self) -> None:
        if self.count == 0:  # end of a busy period: nobody carries tags into the next
            self.tenants.clear()
            self.vtime = 0.0

    def order(self) -> Iterator[_Entry]:
        queues = [state.queue for state in self.tenants.values() if state.queue]
        if len(queues) == 1:
            return iter(queues[0])
        return heapq.merge(*queues, key=_key)

    def ahead_of(self, entry: _Entry) -> int:
        """Tasks of this band that leave before ``entry`` (each tenant's queue is sorted by key)."""
        mine = entry.key
        return sum(bisect.bisect_left(state.queue, mine, key=_key) for state in self.tenants.values())

    def victim(self, newcomer: Optional[tuple[str, float]]) -> Optional[str]:
        """drop-lru's pick in this band (see the module docstring); None if the band is empty."""
        best: Optional[tuple[bool, float, int]] = None
        victim = None
        for name, state in self.tenants.items():
            if not state.queue:
                continue
            count, backlog = len(state.queue), state.backlog()
            if newcomer is not None and newcomer[0] == name:
                count, backlog = count + 1, backlog + newcomer[1]
            rank = (count > 1, backlog, -state.queue[0].seq)
            if best is None or rank > best:
                best, victim = rank, state.queue[0].task_id
        return victim


class TaskQueue(Generic[T]):
    def __init__(self, capacity: int, policy: QueuePolicy | str = QueuePolicy.reject) -> None:
        if capacity < 1:
            raise ValueError("queue capacity must be at least 1")
        self.capacity = capacity
        self.policy = QueuePolicy(policy)
        self._bands: dict[Priority, _Band] = {priority: _Band() for priority in _ORDER}
        #: task id -> (priority, its entry)
        self._where: dict[str, tuple[Priority, _Entry]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._where

    def depth(self, priority: Priority) -> int:
        return self._bands[Priority(priority)].count

    def enqueue(self, task_id: str, priority: Priority | str, item: T, tenant: str = DEFAULT_TENANT,
                weight: float = 1.0) -> EnqueueOutcome:
        """Queue ``item`` for ``tenant`` at ``weight`` (> 0); raises QueueFullError, or
        ValueError for a duplicate id or a bad weight."""
        priority = Priority(priority)
        if task_id in self._where:
            raise ValueError(f"task {task_id!r} is already queued")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a finite number above 0, not {weight!r}")
        share = TASK_COST / weight
        dropped = None
        if len(self) >= self.capacity:
            dropped = self._evict_for(priority, tenant, share)
        self._seq += 1
        self._where[task_id] = (priority, self._bands[priority].add(tenant, task_id, item, share, self._seq))
        return EnqueueOutcome(position=self.position(task_id), dropped=dropped)

    def _evict_for(self, priority: Priority, tenant: str, share: float) -> str:
        if self.policy == QueuePolicy.drop_lru:
            for band_priority in (Priority.batch, Priority.interactive):
                if band_priority == Priority.interactive and priority == Priority.batch:
                    break  # batch work never displaces interactive work
                newcomer = (tenant, share) if band_priority == priority else None
                victim = self._bands[band_priority].victim(newcomer)
                if victim is not None:
                    self.cancel(victim)
                    return victim
        raise QueueFullError(self.policy, self.capacity)

    def pop(self) -> Optional[tuple[str, T]]:
        """Next task to run, or None when empty."""
        for priority in _ORDER:
            entry = self._bands[priority].pop()
            if entry is not None:
                del self._where[entry.task_id]
                return entry.task_id, entry.item  # type: ignore[return-value]
        return None

    def pop_idle(self, busy: Container[str]) -> Optional[tuple[str, T]]:
        """Next task of a tenant not in ``busy`` (tenants with work running), by priority and
        then tag; None when every queued task's tenant is busy. What a reserve slot takes."""
        for priority in _ORDER:
            entry = self._bands[priority].pop(skip=busy)
            if entry is not None:
                del self._where[entry.task_id]
                return entry.task_id, entry.item  # type: ignore[return-value]
        return None

    def cancel(self, task_id: str) -> Optional[T]:
        """Remove a queued task; returns its item, or None if it was not queued."""
        where = self._where.pop(task_id, None)
        if where is None:
            return None
        priority, entry = where
        self._bands[priority].remove(entry)
        return entry.item  # type: ignore[return-value]

    def position(self, task_id: str) -> Optional[int]:
        """Tasks ahead of ``task_id`` in pop order, or None if it is not queued."""
        where = self._where.get(task_id)
        if where is None:
            return None
        priority, entry = where
        ahead = self._bands[Priority.interactive].count if priority == Priority.batch else 0
        return ahead + self._bands[priority].ahead_of(entry)

    def ids(self) -> Iterator[str]:
        """Task ids in the order they would be popped."""
        for priority in _ORDER:
            for entry in self._bands[priority].order():
                yield entry.task_id
