"""Bounded per-pool queue with two priorities.

Interactive tasks always leave before batch tasks; within a priority the order is FIFO.
When the queue is full, policy ``reject`` refuses the newcomer, and policy ``drop-lru``
evicts the least recently queued task to make room: the oldest batch task first, else the
oldest interactive one. A batch newcomer never evicts an interactive task (that would let
lower priority work displace higher); it is refused instead.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Generic, Iterator, Optional, TypeVar

from orch.api.tasks import Priority

T = TypeVar("T")


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


class TaskQueue(Generic[T]):
    def __init__(self, capacity: int, policy: QueuePolicy | str = QueuePolicy.reject) -> None:
        if capacity < 1:
            raise ValueError("queue capacity must be at least 1")
        self.capacity = capacity
        self.policy = QueuePolicy(policy)
        self._lanes: dict[Priority, OrderedDict[str, T]] = {
            Priority.interactive: OrderedDict(),
            Priority.batch: OrderedDict(),
        }

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def __contains__(self, task_id: object) -> bool:
        return any(task_id in lane for lane in self._lanes.values())

    def depth(self, priority: Priority) -> int:
        return len(self._lanes[Priority(priority)])

    def enqueue(self, task_id: str, priority: Priority | str, item: T) -> EnqueueOutcome:
        """Queue ``item``; raises QueueFullError, or ValueError for a duplicate id."""
        priority = Priority(priority)
        if task_id in self:
            raise ValueError(f"task {task_id!r} is already queued")
        dropped = None
        if len(self) >= self.capacity:
            dropped = self._evict_for(priority)
        lane = self._lanes[priority]
        lane[task_id] = item
        position = len(lane) - 1
        if priority == Priority.batch:
            position += len(self._lanes[Priority.interactive])
        return EnqueueOutcome(position=position, dropped=dropped)

    def _evict_for(self, priority: Priority) -> str:
        if self.policy == QueuePolicy.drop_lru:
            batch = self._lanes[Priority.batch]
            if batch:
                return batch.popitem(last=False)[0]
            if priority == Priority.interactive:
                return self._lanes[Priority.interactive].popitem(last=False)[0]
        raise QueueFullError(self.policy, self.capacity)

    def pop(self) -> Optional[tuple[str, T]]:
        """Next task to run, or None when empty."""
        for priority in (Priority.interactive, Priority.batch):
            lane = self._lanes[priority]
            if lane:
                return lane.popitem(last=False)
        return None

    def cancel(self, task_id: str) -> Optional[T]:
        """Remove a queued task; returns its item, or None if it was not queued."""
        for lane in self._lanes.values():
            if task_id in lane:
                return lane.pop(task_id)
        return None

    def position(self, task_id: str) -> Optional[int]:
        """Tasks ahead of ``task_id``, or None if it is not queued."""
        ahead = 0
        for priority in (Priority.interactive, Priority.batch):
            lane = self._lanes[priority]
            if task_id in lane:
                for index, queued in enumerate(lane):
                    if queued == task_id:
                        return ahead + index
            ahead += len(lane)
        return None

    def ids(self) -> Iterator[str]:
        """Task ids in the order they would be popped."""
        for priority in (Priority.interactive, Priority.batch):
            yield from self._lanes[priority]
