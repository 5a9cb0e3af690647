"""Restart policy: backoff grows, the circuit opens on a storm and closes after a healthy run."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from orch.core.supervision import RestartPolicy, RestartState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(**policy) -> tuple[RestartState, Clock]:
    clock = Clock()
    return RestartState(policy=RestartPolicy(**policy), clock=clock), clock


def test_backoff_doubles_up_to_the_cap():
    policy = RestartPolicy(base_s=1, factor=2, max_s=10)
    assert [policy.backoff_s(n) for n in range(0, 7)] == [0, 1, 2, 4, 8, 10, 10]


def test_restart_waits_for_the_backoff():
    restarts, clock = state(base_s=2, breaker_failures=10)
    assert restarts.may_restart()
    restarts.failed("boom")
    assert not restarts.may_restart()
    clock.now += 2
    assert restarts.may_restart()
    restarts.restarting()
    restarts.failed("boom again")
    clock.now += 3.9
    assert not restarts.may_restart()
    clock.now += 0.1
    assert restarts.may_restart()
    assert "last cause: boom again" in restarts.describe()


def test_a_storm_opens_the_circuit_and_the_cooloff_allows_one_trial():
    restarts, clock = state(base_s=0.1, max_s=0.1, breaker_failures=3, breaker_window_s=60, breaker_cooloff_s=100)
    for _ in range(3):
        restarts.failed("driver lost")
        clock.now += 1
    assert restarts.circuit_open and not restarts.may_restart()
    assert "circuit open after 3 failures" in restarts.describe() and "driver lost" in restarts.describe()
    clock.now += 100
    assert restarts.may_restart()
    restarts.restarting()
    restarts.failed("still lost")
    assert restarts.circuit_open  # the trial failed: open again at once


def test_a_healthy_run_forgets_the_streak():
    restarts, clock = state(base_s=1, breaker_failures=3, healthy_after_s=30)
    restarts.failed("x")
    restarts.failed("y")
    restarts.came_up()
    clock.now += 29
    restarts.observe_healthy()
    assert restarts.consecutive == 2
    clock.now += 1
    restarts.observe_healthy()
    assert restarts.consecutive == 0 and restarts.describe() is None and restarts.may_restart()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["fail", "tick", "up", "restart"]), st.floats(0, 50)), max_size=60))
def test_restarts_never_happen_while_the_circuit_is_open(steps):
    restarts, clock = state(base_s=0.5, max_s=8, breaker_failures=4, breaker_window_s=60, breaker_cooloff_s=120)
    for action, dt in steps:
        clock.now += dt
        if action == "fail":
            restarts.failed("cause")
        elif action == "up":
            restarts.came_up()
            restarts.observe_healthy()
        elif action == "restart" and restarts.may_restart():
            restarts.restarting()
        if restarts.circuit_open:
            assert not restarts.may_restart()
        if restarts.consecutive:
            assert restarts.policy.backoff_s(restarts.consecutive) <= 8
