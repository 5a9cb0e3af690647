"""The ingress's PoolClient maps Ray's failures to typed errors once: a lost pool under a
submit is POOL_UNAVAILABLE (never resent), under a stream a WORKER_RESET end, under a cancel
WORKER_RESET; a read is retried once through a fresh lookup by name. Fake handles, no Ray."""

from __future__ import annotations

import asyncio

import pytest
import ray

from orch.api.errors import ErrorCode
from orch.api.pools import Admission, PoolError, PoolView, SubmitResult
from orch.api.tasks import TaskRequest
from orch.core.errors import OrchError
from orch.serve import pool_client
from orch.serve.pool_client import PoolClient, PoolLost, PoolNotRunning, PreparationError


class Method:
    def __init__(self, answer):
        self.answer = answer
        self.calls = 0

    def remote(self, *args):
        self.calls += 1

        async def run():
            if isinstance(self.answer, BaseException):
                raise self.answer
            if callable(self.answer):
                return await self.answer()
            return self.answer
        return run()


class Handle:
    def __init__(self, **methods):
        for name, answer in methods.items():
            setattr(self, name, Method(answer))


DEAD = ray.exceptions.RayActorError()
VIEW = PoolView(pool_id="a", engine="mock", model_ref="mock-model", ready=True)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def no_lookup_by_name(monkeypatch):
    """A lookup by name would reach Ray; here there is no actor of any name."""
    def missing(pool_id, namespace):
        raise ValueError(f"no actor for pool {pool_id}")

    monkeypatch.setattr(pool_client, "pool_handle", missing)


def test_a_submit_to_a_dead_pool_is_unavailable_and_not_sent_twice():
    handle = Handle(submit=DEAD)
    client = PoolClient("ns", {"a": handle})
    with pytest.raises(PoolLost) as info:
        run(client.submit("a", TaskRequest(prompt="hi", max_tokens=2), "t1", None, None))
    assert info.value.code == ErrorCode.POOL_UNAVAILABLE and info.value.retriable and info.value.pool_id == "a"
    assert handle.submit.calls == 1


def test_a_refusal_is_raised_typed_and_an_admission_returned():
    refusal = PoolError(ErrorCode.ADMISSION_REJECT, "full", retriable=True, retry_after_ms=100, policy_label="reject")
    client = PoolClient("ns", {"a": Handle(submit=SubmitResult(error=refusal))})
    with pytest.raises(OrchError) as info:
        run(client.submit("a", TaskRequest(prompt="hi", max_tokens=2), "t1", None, None))
    assert info.value.code == ErrorCode.ADMISSION_REJECT and info.value.policy_label == "reject"
    prep = PoolError(ErrorCode.POOL_UNREADY, "fetching", preparation={"steps": []})
    with pytest.raises(PreparationError):
        run(PoolClient("ns", {"a": Handle(submit=SubmitResult(error=prep))}).submit("a", TaskRequest(prompt="x", max_tokens=2),
                                                                                   "t", None, None))
    admitted = SubmitResult(admission=Admission("t1", "a", 2, 40))
    assert run(PoolClient("ns", {"a": Handle(submit=admitted)}).submit("a", TaskRequest(prompt="hi", max_tokens=2), "t1", None,
                                                                       None)).queue_position == 2


def test_a_stream_of_a_lost_pool_ends_with_worker_reset_and_a_cancel_raises_it():
    page = run(PoolClient("ns", {"a": Handle(poll=DEAD)}).poll("a", "t1", 7, 0.0))
    assert page.done and page.events[0][0] == 7 and page.events[0][1] == "error"
    assert page.events[0][2]["code"] == "WORKER_RESET" and page.events[0][2]["retriable"] is True
    client = PoolClient("ns", {"a": Handle(cancel=DEAD)})
    with pytest.raises(OrchError) as info:
        run(client.cancel("a", "t1"))
    assert info.value.code == ErrorCode.WORKER_RESET
    with pytest.raises(PoolNotRunning):  # the dead handle was dropped; no actor of that name now
        run(client.cancel("a", "t1"))


def test_a_read_looks_the_pool_up_again_once(monkeypatch):
    fresh = Handle(snapshot=VIEW)
    lookups = []
    monkeypatch.setattr(pool_client, "pool_handle", lambda pool_id, namespace: lookups.append(pool_id) or fresh)
    client = PoolClient("ns", {"a": Handle(snapshot=DEAD)})
    assert run(client.view("a")) == VIEW and lookups == ["a"]
    gone = PoolClient("ns", {"b": Handle(snapshot=DEAD)})
    monkeypatch.setattr(pool_client, "pool_handle", lambda pool_id, namespace: Handle(snapshot=DEAD))
    with pytest.raises(PoolLost):
        run(gone.view("b"))


def test_no_actor_of_that_name_and_a_silent_pool_are_unavailable():
    with pytest.raises(PoolNotRunning) as info:
        run(PoolClient("ns").view("a"))
    assert info.value.code == ErrorCode.POOL_UNAVAILABLE and "(re)started" in info.value.message

    async def slow():
        await asyncio.sleep(5)

    with pytest.raises(OrchError) as info:
        run(PoolClient("ns", {"a": Handle(report=slow)}).report("a", timeout=0.05))
    assert info.value.code == ErrorCode.POOL_UNAVAILABLE and "did not answer" in info.value.message
