"""Restart policy of the pool supervisor: exponential backoff and a circuit breaker.

Plain Python with an injectable clock. A pool that fails (its actor died, or its engine
failed to load) is restarted after ``base_s``, then twice as long each time, up to
``max_s``. ``breaker_failures`` failures within ``breaker_window_s`` open the circuit: no
more restarts for ``breaker_cooloff_s``, and the pool stays Unready with its last cause, so
a broken driver cannot cause a restart storm. After the cool-off one trial restart is made
(half-open); it closes the circuit when the pool stays up for ``healthy_after_s``.

``next_action`` decides, from what the supervisor observed of one pool in a round, the one
thing to do with it; the supervisor (orch/pools/supervisor.py) only observes and acts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Optional


@dataclass(frozen=True)
class RestartPolicy:
    base_s: float = 1.0
    factor: float = 2.0
    max_s: float = 60.0
    breaker_failures: int = 5
    breaker_window_s: float = 300.0
    breaker_cooloff_s: float = 600.0
    healthy_after_s: float = 30.0

    def backoff_s(self, consecutive_failures: int) -> float:
        if consecutive_failures <= 0:
            return 0.0
        return min(self.max_s, self.base_s * self.factor ** (consecutive_failures - 1))


@dataclass
class RestartState:
    """What the supervisor remembers about one pool's failures."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    clock: Callable[[], float] = time.monotonic
    failures: list[float] = field(default_factory=list)
    consecutive: int = 0
    last_cause: Optional[str] = None
    open_until: Optional[float] = None
    up_since: Optional[float] = None
    restarts: int = 0
    half_open: bool = False

    def failed(self, cause: str) -> None:
        now = self.clock()
        self.last_cause = cause
        self.up_since = None
        self.consecutive += 1
        self.failures = [t for t in self.failures if now - t <= self.policy.breaker_window_s] + [now]
        if self.half_open or len(self.failures) >= self.policy.breaker_failures:
            self.open_until = now + self.policy.breaker_cooloff_s
        self.half_open = False

    def came_up(self) -> None:
        if self.up_since is None:
            self.up_since = self.clock()

    def observe_healthy(self) -> None:
        """Called while the pool is up: after long enough, forget the failure streak."""
        if self.up_since is not None and self.clock() - self.up_since >= self.policy.healthy_after_s:
            self.consecutive = 0
            self.open_until = None
            self.half_open = False
            self.failures = []

    @property
    def circuit_open(self) -> bool:
        return self.open_until is not None and self.clock() < self.open_until

    def next_restart_at(self) -> Optional[float]:
        """When a restart may happen; None while the circuit is open."""
        if self.circuit_open:
            return None
        if not self.failures:
            return self.clock()
        return self.failures[-1] + self.policy.backoff_s(self.consecutive)

    def may_restart(self) -> bool:
        at = self.next_restart_at()
        return at is not None and self.clock() >= at

    def restarting(self) -> None:
        self.restarts += 1
        if self.open_until is not None and not self.circuit_open:
            # Half-open: one trial; a failure now re-opens the circuit at once.
            self.open_until = None
            self.half_open = True

    def describe(self) -> Optional[str]:
        if self.circuit_open:
            return (f"circuit open after {len(self.failures)} failures in {self.policy.breaker_window_s:.0f} s; "
                    f"no restart for {max(0.0, self.open_until - self.clock()):.0f} s; last cause: {self.last_cause}")
        if self.consecutive:
            wait = max(0.0, (self.next_restart_at() or 0) - self.clock())
            return f"failed {self.consecutive} time(s), restarting in {wait:.1f} s; last cause: {self.last_cause}"
        return None


# -- what to do with one pool this round ---------------------------------------------------


class Step(str, Enum):
    #: A start or a bind is in flight, or the model still loads: nothing to do.
    wait = "wait"
    #: Up and Ready: the failure streak may be forgotten.
    healthy = "healthy"
    #: Held on the catalog's word (its model is not present, or retired): not a failure.
    hold = "hold"
    #: Hand the pool the catalog's new binding; it loads, swaps or holds in place.
    bind = "bind"
    #: A failure: record it (once per actor), then restart the pool when the policy allows.
    restart = "restart"
    #: Stop the actor and start a new one (not a failure).
    replace = "replace"
    #: There is no actor (any more): create one when the policy allows.
    create = "create"


class Reason(str, Enum):
    config_changed = "config_changed"
    runtime_env_changed = "runtime_env_changed"
    bind_failed = "bind_failed"
    engine_failed = "engine_failed"
    disappeared = "disappeared"
    lost = "lost"


@dataclass(frozen=True)
class PoolObservation:
    """What the supervisor saw of one pool this round (its actor, its snapshot, the catalog)."""

    #: A start or bind call to the pool is still in flight.
    starting: bool = False
    #: An actor answers to the pool's name.
    found: bool = False
    #: This supervisor saw the pool's actor before (one that vanished has failed).
    seen: bool = False
    #: The actor exists but its snapshot failed: why (a lost actor).
    lost: Optional[str] = None
    #: The actor was built from another configuration.
    config_changed: bool = False
    #: The catalog's binding this round names the load the pool failed to bind.
    bind_failed: bool = False
    #: The catalog's binding needs another runtime_env (a handed-off engine).
    runtime_env_changed: bool = False
    #: The catalog's binding differs from the one the pool runs.
    binding_changed: bool = False
    ready: bool = False
    #: Waiting for its model, or its model retired.
    held: bool = False
    loading: bool = False
    engine_failed: bool = False
    last_error: Optional[str] = None
    #: This actor's failure is counted already.
    counted: bool = False


@dataclass(frozen=True)
class Action:
    step: Step
    reason: Optional[Reason] = None
    #: The failure to record (restart; create after an actor was lost or vanished).
    cause: Optional[str] = None
    #: Restart: record the failure (not yet counted for this actor).
    count: bool = False


def next_action(seen: PoolObservation) -> Action:
    """The one thing to do with a pool this round, in order of precedence."""
    if seen.starting:
        return Action(Step.wait)
    if not seen.found:
        if seen.seen:
            return Action(Step.create, Reason.disappeared, "pool actor disappeared (its process or node died)")
        return Action(Step.create)
    if seen.lost is not None:
        return Action(Step.create, Reason.lost, f"pool actor lost: {seen.lost}")
    if seen.config_changed:
        return Action(Step.replace, Reason.config_changed)
    if seen.bind_failed:
        return Action(Step.restart, Reason.bind_failed, seen.last_error or "binding the catalog's model failed",
                      count=not seen.counted)
    if seen.runtime_env_changed:
        return Action(Step.replace, Reason.runtime_env_changed)
    if seen.binding_changed:
        return Action(Step.bind)
    if seen.ready:
        return Action(Step.healthy)
    if seen.held:  # waiting for its model, or its model retired: not a failure
        return Action(Step.hold)
    if seen.engine_failed or (seen.last_error and not seen.loading):
        return Action(Step.restart, Reason.engine_failed, seen.last_error or "engine failed", count=not seen.counted)
    return Action(Step.wait)  # still loading
