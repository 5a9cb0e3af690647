"""Restart policy: backoff grows, the circuit opens on a storm and closes after a healthy run;
and next_action, branch by branch, from what the supervisor observed of a pool."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from orch.core.supervision import Action, PoolObservation, Reason, RestartPolicy, RestartState, Step, next_action


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


# -- next_action: one branch each, then the precedence between them ------------------------
LIVE = dict(found=True, seen=True)


def test_a_start_in_flight_waits_whatever_else_is_seen():
    assert next_action(PoolObservation(starting=True, found=True, engine_failed=True)) == Action(Step.wait)


def test_no_actor_is_created_and_one_that_vanished_counts_as_a_failure():
    assert next_action(PoolObservation()) == Action(Step.create)
    vanished = next_action(PoolObservation(seen=True))
    assert vanished.step is Step.create and vanished.reason is Reason.disappeared and "disappeared" in vanished.cause


def test_an_actor_that_does_not_answer_is_lost():
    lost = next_action(PoolObservation(lost="GetTimeoutError", **LIVE))
    assert lost == Action(Step.create, Reason.lost, "pool actor lost: GetTimeoutError")


def test_a_changed_config_or_runtime_env_replaces_the_actor():
    assert next_action(PoolObservation(config_changed=True, ready=True, **LIVE)) == Action(Step.replace,
                                                                                          Reason.config_changed)
    assert next_action(PoolObservation(runtime_env_changed=True, binding_changed=True, **LIVE)) == Action(
        Step.replace, Reason.runtime_env_changed)


def test_a_failed_bind_restarts_counting_the_failure_once():
    first = next_action(PoolObservation(bind_failed=True, last_error="no such file", ready=True, **LIVE))
    assert first == Action(Step.restart, Reason.bind_failed, "no such file", count=True)
    again = next_action(PoolObservation(bind_failed=True, counted=True, **LIVE))
    assert again == Action(Step.restart, Reason.bind_failed, "binding the catalog's model failed", count=False)


def test_a_changed_binding_is_bound_in_place():
    assert next_action(PoolObservation(binding_changed=True, ready=True, **LIVE)) == Action(Step.bind)


def test_ready_is_healthy_and_held_is_not_a_failure():
    assert next_action(PoolObservation(ready=True, **LIVE)) == Action(Step.healthy)
    held = PoolObservation(held=True, last_error="waiting for the model", **LIVE)
    assert next_action(held) == Action(Step.hold)


def test_a_failed_engine_or_load_restarts_and_a_loading_pool_waits():
    assert next_action(PoolObservation(engine_failed=True, **LIVE)) == Action(
        Step.restart, Reason.engine_failed, "engine failed", count=True)
    assert next_action(PoolObservation(last_error="preload failed: x", **LIVE)) == Action(
        Step.restart, Reason.engine_failed, "preload failed: x", count=True)
    assert next_action(PoolObservation(last_error="note", loading=True, **LIVE)) == Action(Step.wait)
    assert next_action(PoolObservation(loading=True, **LIVE)) == Action(Step.wait)


def test_precedence_config_before_bind_failure_before_runtime_env_before_binding():
    everything = dict(config_changed=True, bind_failed=True, runtime_env_changed=True, binding_changed=True,
                      ready=True, held=True, engine_failed=True, **LIVE)
    order = []
    for flag in ("config_changed", "bind_failed", "runtime_env_changed", "binding_changed", "ready", "held"):
        action = next_action(PoolObservation(**everything))
        order.append(action.step.value + (f":{action.reason.value}" if action.reason else ""))
        everything[flag] = False
    order.append(next_action(PoolObservation(**everything)).step.value)
    assert order == ["replace:config_changed", "restart:bind_failed", "replace:runtime_env_changed", "bind",
                     "healthy", "hold", "restart"]
