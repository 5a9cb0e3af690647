"""Unit tests for fair queueing between tenants in orch.core.queue.TaskQueue."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orch.api.tasks import Priority
from orch.core.queue import QueueFullError, QueuePolicy, TaskQueue

I = Priority.interactive
B = Priority.batch


def drain(q: TaskQueue) -> list[str]:
    out = []
    while (item := q.pop()) is not None:
        out.append(item[0])
    return out


def fill(q: TaskQueue, tenant: str, count: int, prio: Priority = B, weight: float = 1.0, start: int = 0) -> None:
    for n in range(start, start + count):
        q.enqueue(f"{tenant}{n}", prio, tenant, tenant=tenant, weight=weight)


def served(q: TaskQueue, pops: int) -> Counter:
    return Counter(q.pop()[1] for _ in range(pops))


def test_weights_respected_over_many_pops():
    q: TaskQueue[str] = TaskQueue(2000)
    fill(q, "a", 600, weight=2.0)
    fill(q, "b", 600, weight=1.0)
    got = served(q, 300)
    assert abs(got["a"] - 200) <= 1 and abs(got["b"] - 100) <= 1, got


def test_equal_weights_share_equally_whatever_the_arrival_order():
    q: TaskQueue[str] = TaskQueue(1000)
    fill(q, "a", 300)  # a's whole backlog arrived first
    fill(q, "b", 30)
    first = [q.pop()[1] for _ in range(20)]
    assert first.count("b") == 10, first
    # and no run of b's longer than two: interleaved, not b's burst after a's backlog
    assert "bbb" not in "".join(first)


def test_three_tenants_by_weight():
    q: TaskQueue[str] = TaskQueue(3000)
    for tenant, weight in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        fill(q, tenant, 800, weight=weight)
    got = served(q, 600)
    assert abs(got["a"] - 100) <= 2 and abs(got["b"] - 200) <= 2 and abs(got["c"] - 300) <= 2, got


def test_idle_tenant_banks_no_credit():
    q: TaskQueue[str] = TaskQueue(2000)
    fill(q, "a", 400)
    assert served(q, 200) == Counter(a=200)  # b was idle all along
    fill(q, "b", 100)
    # b is not owed the 200 turns it did not ask for: from now on it gets half, not all
    got = served(q, 40)
    assert 19 <= got["b"] <= 21, got


def test_a_tenant_served_ahead_waits_for_the_others_to_catch_up():
    q: TaskQueue[str] = TaskQueue(100)
    fill(q, "a", 4)
    fill(q, "b", 4)
    assert [q.pop()[1] for _ in range(4)] == ["a", "b", "a", "b"]
    fill(q, "a", 2, start=4)  # a comes back with more: its tags continue, no jump ahead of b
    # equal tags go to b, which has less queued
    assert "".join(q.pop()[1] for _ in range(6)) == "babaaa"


def test_single_tenant_is_fifo_with_priorities():
    for tenant in ("default", "acme"):
        q: TaskQueue[int] = TaskQueue(50)
        expected_i, expected_b = [], []
        for n in range(20):
            prio = I if n % 3 == 0 else B
            q.enqueue(f"t{n}", prio, n, tenant=tenant, weight=1.0 + n % 4)  # weights never reorder one tenant
            (expected_i if prio == I else expected_b).append(f"t{n}")
        assert list(q.ids()) == expected_i + expected_b
        assert drain(q) == expected_i + expected_b


def test_interactive_before_batch_across_tenants():
    q: TaskQueue[str] = TaskQueue(100)
    fill(q, "a", 5, prio=B)
    fill(q, "b", 3, prio=I)
    fill(q, "c", 2, prio=B, weight=10.0)
    order = drain(q)
    assert [t[0] for t in order[:3]] == ["b", "b", "b"]
    assert sorted(order[3:]) == sorted(["a0", "a1", "a2", "a3", "a4", "c0", "c1"])


@pytest.mark.parametrize("weight", [0, -1, math.nan, math.inf, "2"])
def test_bad_weight_is_refused(weight):
    q: TaskQueue[str] = TaskQueue(4)
    with pytest.raises(ValueError):
        q.enqueue("x", B, "", tenant="a", weight=weight)
    assert len(q) == 0 and "x" not in q


def test_cancel_gives_the_share_back():
    q: TaskQueue[str] = TaskQueue(100)
    fill(q, "a", 4)
    fill(q, "b", 4)
    assert q.cancel("a1") == "a"
    assert q.cancel("a1") is None and "a1" not in q
    # a's later tasks moved up: a0 a2 a3 interleave with b as if a1 had never been queued
    order = list(q.ids())
    assert order == ["a0", "b0", "a2", "b1", "a3", "b2", "b3"]
    assert drain(q) == order
    assert len(q) == 0


def test_emptied_band_forgets_its_tags():
    q: TaskQueue[str] = TaskQueue(100)
    fill(q, "a", 50)
    drain(q)
    fill(q, "b", 2)
    fill(q, "a", 2, start=50)
    assert drain(q) == ["b0", "a50", "b1", "a51"]


# --------------------------------------------------------------------------- drop-lru


def test_drop_lru_tenant_holding_most_of_the_queue_evicts_its_own_oldest():
    q: TaskQueue[str] = TaskQueue(10, QueuePolicy.drop_lru)
    fill(q, "b", 1)
    fill(q, "a", 9)
    out = q.enqueue("a9", B, "a", tenant="a")
    assert out.dropped == "a0"
    assert "b0" in q
    # b's newcomer also makes room at a's expense, not its own older task's
    out = q.enqueue("b1", B, "b", tenant="b")
    assert out.dropped == "a1"
    assert "b0" in q and "b1" in q


def test_drop_lru_never_takes_another_tenants_only_task_whatever_the_weights():
    q: TaskQueue[str] = TaskQueue(6, QueuePolicy.drop_lru)
    fill(q, "b", 1, weight=0.5)   # one task, but a large share for its weight
    fill(q, "a", 5, weight=100.0)
    out = q.enqueue("a5", B, "a", tenant="a", weight=100.0)
    assert out.dropped == "a0"
    assert "b0" in q


def test_drop_lru_weighs_backlog_by_weight():
    q: TaskQueue[str] = TaskQueue(8, QueuePolicy.drop_lru)
    fill(q, "a", 5, weight=4.0)   # backlog 5/4
    fill(q, "b", 3, weight=1.0)   # backlog 3: most over its share
    out = q.enqueue("c0", B, "c", tenant="c")
    assert out.dropped == "b0"


def test_drop_lru_interactive_newcomer_evicts_batch_of_the_heaviest_tenant():
    q: TaskQueue[str] = TaskQueue(5, QueuePolicy.drop_lru)
    fill(q, "b", 1, prio=B)
    fill(q, "a", 3, prio=B)
    fill(q, "b", 1, prio=I, start=1)
    out = q.enqueue("b2", I, "b", tenant="b")
    assert out.dropped == "a0"
    assert out.position == 1
    # batch work never displaces interactive work, whoever sends it
    q2: TaskQueue[str] = TaskQueue(2, QueuePolicy.drop_lru)
    fill(q2, "a", 2, prio=I)
    with pytest.raises(QueueFullError):
        q2.enqueue("b0", B, "b", tenant="b")


def test_drop_lru_single_tenant_evicts_oldest_batch():
    q: TaskQueue[str] = TaskQueue(3, QueuePolicy.drop_lru)
    q.enqueue("i1", I, "")
    q.enqueue("b1", B, "")
    q.enqueue("b2", B, "")
    assert q.enqueue("b3", B, "").dropped == "b1"
    assert q.enqueue("i2", I, "").dropped == "b2"
    assert list(q.ids()) == ["i1", "i2", "b3"]


# --------------------------------------------------------------------------- generated sequences


TENANTS = st.sampled_from([("a", 1.0), ("b", 2.0), ("c", 0.5), ("a", 3.0)])
IDS = st.sampled_from([f"t{n}" for n in range(16)])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("enq"), IDS, st.sampled_from([I, B]), TENANTS),
        st.tuples(st.just("pop")),
        st.tuples(st.just("cancel"), IDS),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 8), policy=st.sampled_from(list(QueuePolicy)), ops=OPS)
def test_positions_and_ids_are_the_pop_order(capacity, policy, ops):
    """Whatever happened before, ids() and position() say exactly how the queue drains."""
    q: TaskQueue[str] = TaskQueue(capacity, policy)
    owner: dict[str, str] = {}
    for op in ops:
        if op[0] == "enq":
            _, task_id, prio, (tenant, weight) = op
            try:
                out = q.enqueue(task_id, prio, tenant, tenant=tenant, weight=weight)
            except (QueueFullError, ValueError):
                continue
            owner[task_id] = tenant
            assert out.position == q.position(task_id)
            assert out.dropped is None or out.dropped not in q
        elif op[0] == "pop":
            head = next(iter(q.ids()), None)
            entry = q.pop()
            assert (entry[0] if entry else None) == head
            if entry is not None:
                assert entry[1] == owner[entry[0]]
        else:
            q.cancel(op[1])
        order = list(q.ids())
        assert len(order) == len(q) <= capacity
        assert [q.position(t) for t in order] == list(range(len(order)))
    predicted = list(q.ids())
    assert drain(q) == predicted


@settings(max_examples=100, deadline=None)
@given(ops=OPS)
def test_each_tenant_keeps_its_arrival_order(ops):
    q: TaskQueue[int] = TaskQueue(64)
    clock = 0
    tenant_of: dict[str, str] = {}
    popped: list[tuple[str, int]] = []
    for op in ops:
        if op[0] == "enq":
            clock += 1
            _, task_id, prio, (tenant, weight) = op
            try:
                q.enqueue(task_id, B, clock, tenant=tenant, weight=weight)
            except ValueError:
                continue
            tenant_of[task_id] = tenant
        elif op[0] == "pop" and (entry := q.pop()) is not None:
            popped.append((tenant_of[entry[0]], entry[1]))
        elif op[0] == "cancel":
            q.cancel(op[1])
    while (entry := q.pop()) is not None:
        popped.append((tenant_of[entry[0]], entry[1]))
    for tenant in {t for t, _ in popped}:
        stamps = [stamp for t, stamp in popped if t == tenant]
        assert stamps == sorted(stamps)
