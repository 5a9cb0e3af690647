"""Unit tests for orch.core.queue.TaskQueue: examples plus a model-based state machine."""

from __future__ import annotations

from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from orch.api.tasks import Priority
from orch.core.queue import EnqueueOutcome, QueueFullError, QueuePolicy, TaskQueue

I = Priority.interactive
B = Priority.batch


def drain(q: TaskQueue) -> list[str]:
    out = []
    while (item := q.pop()) is not None:
        out.append(item[0])
    return out


# --------------------------------------------------------------------------- examples


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        TaskQueue(0)
    with pytest.raises(ValueError):
        TaskQueue(-3)


def test_policy_accepts_string_values():
    assert TaskQueue(1, "drop-lru").policy is QueuePolicy.drop_lru
    assert TaskQueue(1, "reject").policy is QueuePolicy.reject
    assert TaskQueue(1).policy is QueuePolicy.reject
    with pytest.raises(ValueError):
        TaskQueue(1, "drop_oldest")


def test_empty_queue():
    q: TaskQueue[str] = TaskQueue(4)
    assert len(q) == 0
    assert q.pop() is None
    assert q.position("x") is None
    assert q.cancel("x") is None
    assert list(q.ids()) == []
    assert "x" not in q


def test_interactive_popped_before_batch_and_fifo_within_priority():
    q: TaskQueue[str] = TaskQueue(10)
    q.enqueue("b1", B, "B1")
    q.enqueue("i1", I, "I1")
    q.enqueue("b2", "batch", "B2")
    q.enqueue("i2", "interactive", "I2")
    q.enqueue("b3", B, "B3")
    assert q.depth(I) == 2 and q.depth("batch") == 3
    assert list(q.ids()) == ["i1", "i2", "b1", "b2", "b3"]
    assert q.pop() == ("i1", "I1")
    assert q.pop() == ("i2", "I2")
    assert q.pop() == ("b1", "B1")
    # an interactive arriving late still jumps ahead of remaining batch work
    q.enqueue("i3", I, "I3")
    assert q.pop() == ("i3", "I3")
    assert drain(q) == ["b2", "b3"]
    assert q.pop() is None


def test_enqueue_returns_tasks_ahead():
    q: TaskQueue[int] = TaskQueue(10)
    assert q.enqueue("b1", B, 0) == EnqueueOutcome(position=0)
    assert q.enqueue("b2", B, 0).position == 1
    # interactive goes ahead of every batch task
    assert q.enqueue("i1", I, 0).position == 0
    assert q.enqueue("i2", I, 0).position == 1
    # a batch task is behind all interactive and earlier batch tasks
    assert q.enqueue("b3", B, 0).position == 4
    assert q.position("b1") == 2
    assert q.position("b3") == 4
    assert q.position("i2") == 1


def test_reject_policy_raises_and_leaves_queue_unchanged():
    q: TaskQueue[str] = TaskQueue(2, QueuePolicy.reject)
    q.enqueue("b1", B, "x")
    q.enqueue("i1", I, "y")
    before = list(q.ids())
    for prio in (I, B):
        with pytest.raises(QueueFullError) as info:
            q.enqueue("new", prio, "z")
        assert info.value.policy is QueuePolicy.reject
        assert info.value.capacity == 2
        assert "queue full" in str(info.value)
        assert list(q.ids()) == before
        assert len(q) == 2
        assert "new" not in q


def test_drop_lru_evicts_oldest_batch_first():
    q: TaskQueue[str] = TaskQueue(3, QueuePolicy.drop_lru)
    q.enqueue("i1", I, "")
    q.enqueue("b1", B, "")
    q.enqueue("b2", B, "")
    out = q.enqueue("i2", I, "")
    assert out.dropped == "b1"
    assert out.position == 1
    assert list(q.ids()) == ["i1", "i2", "b2"]
    out = q.enqueue("b3", B, "")
    assert out.dropped == "b2"
    assert out.position == 2
    assert list(q.ids()) == ["i1", "i2", "b3"]
    assert len(q) == 3


def test_drop_lru_evicts_oldest_interactive_when_no_batch():
    q: TaskQueue[str] = TaskQueue(2, "drop-lru")
    q.enqueue("i1", I, "")
    q.enqueue("i2", I, "")
    out = q.enqueue("i3", I, "")
    assert out.dropped == "i1"
    assert out.position == 1
    assert list(q.ids()) == ["i2", "i3"]


def test_drop_lru_batch_never_evicts_interactive():
    q: TaskQueue[str] = TaskQueue(2, QueuePolicy.drop_lru)
    q.enqueue("i1", I, "")
    q.enqueue("i2", I, "")
    with pytest.raises(QueueFullError) as info:
        q.enqueue("b1", B, "")
    assert info.value.policy is QueuePolicy.drop_lru
    assert list(q.ids()) == ["i1", "i2"]
    assert "b1" not in q


def test_no_eviction_below_capacity():
    q: TaskQueue[str] = TaskQueue(3, QueuePolicy.drop_lru)
    assert q.enqueue("b1", B, "").dropped is None
    assert q.enqueue("b2", B, "").dropped is None
    assert q.enqueue("i1", I, "").dropped is None
    assert len(q) == 3


def test_duplicate_id_raises_value_error_in_any_lane():
    q: TaskQueue[str] = TaskQueue(5)
    q.enqueue("t", I, "first")
    with pytest.raises(ValueError):
        q.enqueue("t", I, "again")
    with pytest.raises(ValueError):
        q.enqueue("t", B, "again")
    assert len(q) == 1
    assert q.pop() == ("t", "first")
    # once gone, the id may be reused
    q.enqueue("t", B, "reused")
    assert q.pop() == ("t", "reused")


def test_duplicate_id_checked_before_eviction():
    q: TaskQueue[str] = TaskQueue(2, QueuePolicy.drop_lru)
    q.enqueue("b1", B, "")
    q.enqueue("b2", B, "")
    with pytest.raises(ValueError):
        q.enqueue("b2", I, "")
    assert list(q.ids()) == ["b1", "b2"]


def test_cancel_removes_exactly_that_task():
    q: TaskQueue[str] = TaskQueue(5)
    q.enqueue("i1", I, "I1")
    q.enqueue("b1", B, "B1")
    q.enqueue("i2", I, "I2")
    assert q.cancel("i1") == "I1"
    assert "i1" not in q
    assert q.cancel("i1") is None
    assert q.cancel("unknown") is None
    assert list(q.ids()) == ["i2", "b1"]
    assert q.position("b1") == 1
    assert q.cancel("b1") == "B1"
    assert list(q.ids()) == ["i2"]
    # cancelling frees room
    q2: TaskQueue[str] = TaskQueue(1)
    q2.enqueue("a", B, "")
    with pytest.raises(QueueFullError):
        q2.enqueue("b", B, "")
    q2.cancel("a")
    assert q2.enqueue("b", B, "").position == 0


# --------------------------------------------------------------------------- reference model


class RefQueue:
    """Obviously-correct model: one list in arrival order."""

    def __init__(self, capacity: int, policy: QueuePolicy) -> None:
        self.capacity = capacity
        self.policy = policy
        self.items: list[tuple[str, Priority, object]] = []

    def order(self) -> list[str]:
        return [t for t, p, _ in self.items if p == I] + [t for t, p, _ in self.items if p == B]

    def enqueue(self, task_id: str, prio: Priority, item: object) -> EnqueueOutcome:
        if any(t == task_id for t, _, _ in self.items):
            raise ValueError(task_id)
        dropped = None
        if len(self.items) >= self.capacity:
            victim = None
            if self.policy == QueuePolicy.drop_lru:
                batch = [e for e in self.items if e[1] == B]
                inter = [e for e in self.items if e[1] == I]
                if batch:
                    victim = batch[0]
                elif prio == I and inter:
                    victim = inter[0]
            if victim is None:
                raise QueueFullError(self.policy, self.capacity)
            self.items.remove(victim)
            dropped = victim[0]
        self.items.append((task_id, prio, item))
        return EnqueueOutcome(position=self.order().index(task_id), dropped=dropped)

    def pop(self) -> Optional[tuple[str, object]]:
        order = self.order()
        if not order:
            return None
        return self.cancel_entry(order[0])

    def cancel_entry(self, task_id: str) -> Optional[tuple[str, object]]:
        for entry in self.items:
            if entry[0] == task_id:
                self.items.remove(entry)
                return (entry[0], entry[2])
        return None


IDS = st.sampled_from([f"t{n}" for n in range(12)])
PRIOS = st.sampled_from([I, B])


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.counter = 0

    @initialize(capacity=st.integers(1, 6), policy=st.sampled_from(list(QueuePolicy)))
    def setup(self, capacity: int, policy: QueuePolicy) -> None:
        self.q: TaskQueue[object] = TaskQueue(capacity, policy)
        self.ref = RefQueue(capacity, policy)

    @rule(task_id=IDS, prio=PRIOS, as_str=st.booleans())
    def enqueue(self, task_id: str, prio: Priority, as_str: bool) -> None:
        self.counter += 1
        item = ("payload", self.counter)
        before = list(self.q.ids())
        interactive_before = {t for t, p, _ in self.ref.items if p == I}
        try:
            expected = self.ref.enqueue(task_id, prio, item)
        except (ValueError, QueueFullError) as exc:
            with pytest.raises(type(exc)):
                self.q.enqueue(task_id, prio.value if as_str else prio, item)
            # a refused enqueue leaves the queue exactly as it was
            assert list(self.q.ids()) == before
            return
        got = self.q.enqueue(task_id, prio.value if as_str else prio, item)
        assert got == expected
        assert self.q.position(task_id) == got.position
        if got.dropped is not None:
            assert got.dropped not in self.q
            # a batch newcomer never evicts an interactive task
            if prio == B:
                assert got.dropped not in interactive_before

    @rule()
    def pop(self) -> None:
        assert self.q.pop() == self.ref.pop()

    @rule(task_id=IDS)
    def cancel(self, task_id: str) -> None:
        expected = self.ref.cancel_entry(task_id)
        got = self.q.cancel(task_id)
        if expected is None:
            assert got is None
        else:
            assert got == expected[1]
        assert task_id not in self.q

    @precondition(lambda self: hasattr(self, "q"))
    @invariant()
    def matches_reference(self) -> None:
        order = self.ref.order()
        assert list(self.q.ids()) == order
        assert len(self.q) == len(order) <= self.q.capacity
        assert self.q.depth(I) == sum(1 for _, p, _ in self.ref.items if p == I)
        assert self.q.depth(B) == sum(1 for _, p, _ in self.ref.items if p == B)
        for index, task_id in enumerate(order):
            assert task_id in self.q
            assert self.q.position(task_id) == index


QueueMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestQueueMachine = QueueMachine.TestCase


# --------------------------------------------------------------------------- generated sequences


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("enq"), IDS, PRIOS),
        st.tuples(st.just("pop")),
        st.tuples(st.just("cancel"), IDS),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 5), policy=st.sampled_from(list(QueuePolicy)), ops=OPS)
def test_pop_order_priority_and_fifo(capacity, policy, ops):
    """Whatever happened before, draining pops interactive first, each lane FIFO by arrival."""
    q: TaskQueue[int] = TaskQueue(capacity, policy)
    arrival: dict[str, int] = {}
    prio_of: dict[str, Priority] = {}
    clock = 0
    for op in ops:
        if op[0] == "enq":
            clock += 1
            try:
                out = q.enqueue(op[1], op[2], clock)
            except (QueueFullError, ValueError):
                continue
            arrival[op[1]] = clock
            prio_of[op[1]] = op[2]
            if out.dropped is not None:
                # batch newcomers only ever displace batch work
                if op[2] == B:
                    assert prio_of[out.dropped] == B
        elif op[0] == "pop":
            q.pop()
        else:
            q.cancel(op[1])
        assert len(q) <= capacity
    predicted = {t: q.position(t) for t in q.ids()}
    popped = []
    while (entry := q.pop()) is not None:
        task_id, item = entry
        assert item == arrival[task_id]
        assert predicted[task_id] == len(popped)
        popped.append(task_id)
    prios = [prio_of[t] for t in popped]
    assert prios == sorted(prios, key=lambda p: p != I)
    for lane in (I, B):
        stamps = [arrival[t] for t in popped if prio_of[t] == lane]
        assert stamps == sorted(stamps)


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 5),
    prios=st.lists(PRIOS, min_size=1, max_size=12),
    newcomer=PRIOS,
)
def test_reject_when_full_is_a_no_op(capacity, prios, newcomer):
    q: TaskQueue[int] = TaskQueue(capacity, QueuePolicy.reject)
    for n, prio in enumerate(prios[:capacity]):
        q.enqueue(f"t{n}", prio, n)
    if len(q) < capacity:
        return
    snapshot = [(t, q.position(t)) for t in q.ids()]
    with pytest.raises(QueueFullError):
        q.enqueue("newcomer", newcomer, -1)
    assert [(t, q.position(t)) for t in q.ids()] == snapshot
    assert "newcomer" not in q
