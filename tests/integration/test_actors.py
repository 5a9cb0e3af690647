"""orch.actors on a real local Ray: named singletons, and a client that finds a replaced
actor by name once before giving up."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import ray

from orch.actors import ActorClient, find_actor, head_node_resource, singleton

pytestmark = pytest.mark.integration


@ray.remote(num_cpus=0)
class Counter:
    def __init__(self, start: int) -> None:
        self.value = start

    def bump(self) -> int:
        self.value += 1
        return self.value

    def die(self) -> None:
        ray.actor.exit_actor()


class Lost(Exception):
    pass


def kill_and_wait(handle) -> None:
    """ray.kill goes through the GCS, not the actor's queue: a call sent right after it can still
    run on the old actor. Wait, bounded, until the handle answers with RayActorError."""
    ray.kill(handle)
    for _ in range(100):
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.05)
    raise AssertionError("the killed actor still answers")


@pytest.fixture
def namespace(ray_session):
    name = f"actors-{uuid.uuid4().hex[:8]}"
    yield name
    handle = find_actor("counter", name)
    if handle is not None:
        ray.kill(handle)


def test_head_node_resource_names_the_head_of_a_local_cluster(ray_session):
    assert head_node_resource() == {"node:__internal_head__": 0.001}


def test_singleton_is_created_once_and_found_by_name(namespace):
    first = singleton(Counter, "counter", namespace, 10)
    assert ray.get(first.bump.remote()) == 11
    again = singleton(Counter, "counter", namespace, 100)  # the constructor does not run again
    assert ray.get(again.bump.remote()) == 12
    assert ray.get(find_actor("counter", namespace).bump.remote()) == 13
    assert find_actor("nobody", namespace) is None


def test_client_reconnects_once_to_a_replaced_actor(namespace):
    connects = []

    def connect():
        connects.append(1)
        return singleton(Counter, "counter", namespace, 0)

    async def scenario():
        client = ActorClient(connect, lost=lambda exc: Lost(str(exc)))
        assert await client.call("bump") == 1
        old = client.handle
        kill_and_wait(old)
        # the cached handle is dead: the client connects again (a fresh actor) and retries
        assert await client.call("bump") == 1
        assert len(connects) == 2 and client.handle is not old

    asyncio.run(scenario())


def test_client_without_retry_raises_the_mapped_error_and_forgets_the_handle(namespace):
    async def scenario():
        client = ActorClient(lambda: singleton(Counter, "counter", namespace, 0), retry=False,
                             lost=lambda exc: Lost("gone"))
        await client.call("bump")
        kill_and_wait(client.handle)
        with pytest.raises(Lost):
            await client.call("bump")
        assert client.handle is None
        # Ray frees a killed detached actor's name a moment after the kill; until then a lookup
        # by name still finds the dying one. Wait for the name, bounded, then reconnect.
        for _ in range(100):
            if find_actor("counter", namespace) is None:
                break
            await asyncio.sleep(0.1)
        assert await client.call("bump") == 1  # next call connects to a new one

    asyncio.run(scenario())


def test_client_gives_up_after_one_reconnect(namespace):
    async def scenario():
        def connect():
            handle = singleton(Counter, "counter", namespace, 0)
            kill_and_wait(handle)  # every incarnation is dead on arrival
            return handle

        client = ActorClient(connect)
        with pytest.raises(ray.exceptions.RayActorError):
            await client.call("bump")

    asyncio.run(scenario())
