"""API keys without Ray: minting and hashing, the sqlite store, the replica cache, access
checks and the ``tenants`` config section."""

from __future__ import annotations

import asyncio
import hmac

import pytest

from orch.api.errors import ErrorCode
from orch.api.keys import KeyCreate, KeyLimits, Principal
from orch.api.pools import TaskContext
from orch.api.tasks import Priority, TaskRequest
from orch.config import ConfigError, parse_config
from orch.core.errors import OrchError
from orch.tenants import access, keyhash
from orch.tenants.cache import KeyCache
from orch.tenants.store import KeyStore, LocalKeys
from tests.conftest import home_config


def body(**fields) -> dict:
    return KeyCreate.model_validate({"tenant": "team-a", **fields}).model_dump(mode="json")


@pytest.fixture
def store(tmp_path):
    store = KeyStore(str(tmp_path / "keys.sqlite"))
    yield store
    store.close()


def test_a_key_parses_back_to_its_id_and_secret_and_only_its_secret_matches():
    key_id, secret, whole = keyhash.mint()
    assert whole.startswith(keyhash.KEY_PREFIX) and keyhash.parse(whole) == (key_id, secret)
    salt = keyhash.new_salt()
    stored = keyhash.digest(salt, secret)
    assert keyhash.matches(salt, stored, secret)
    for wrong in (secret[:-1], secret + "x", "x" * 500, "", secret.upper()):
        assert not keyhash.matches(salt, stored, wrong)
    assert keyhash.parse("orch_nothex000000_" + secret) is None and keyhash.parse("sk-" + secret) is None
    assert keyhash.digest(keyhash.new_salt(), secret) != stored  # salted: same secret, other hash


def test_wrong_keys_of_any_length_take_the_same_constant_time_path(monkeypatch, store):
    """Unknown ids, wrong secrets and over-long secrets all end in one compare_digest over
    32-byte digests: nothing short-circuits on the presented value."""
    cache = KeyCache(LocalKeys(store))
    created = store.create(body())
    asyncio.run(cache.refresh())
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keyhash.hmac, "compare_digest", recording)
    key_id = created["key_id"]
    presented = [created["key"], f"orch_{key_id}_{'a' * 20}", f"orch_{key_id}_{'b' * 200}",
                 f"orch_{'0' * 12}_{'c' * 43}"]
    answers = [cache.resolve(p) for p in presented]
    assert answers[0] is not None and answers[0].key_id == key_id and answers[1:] == [None, None, None]
    assert len(compared) == len(presented)
    assert all(len(a) == len(b) == 32 for a, b in compared)


def test_the_store_keeps_only_salted_hashes_and_lists_no_secret(store, tmp_path):
    created = store.create(body(name="notebook", scopes=["infer", "catalog"], models=["smollm2"],
                                limits={"rpm": 60}))
    secret = keyhash.parse(created["key"])[1]
    raw = b"".join(path.read_bytes() for path in tmp_path.glob("keys.sqlite*"))  # the WAL too
    assert b"notebook" in raw
    assert secret.encode() not in raw and created["key"].encode() not in raw
    for listed in (store.list(), [store.get(created["key_id"])]):
        assert "key" not in listed[0] and "hash" not in listed[0] and "salt" not in listed[0]
        assert listed[0]["scopes"] == ["infer", "catalog"] and listed[0]["limits"]["rpm"] == 60
    store.close()
    reopened = KeyStore(str(tmp_path / "keys.sqlite"))  # survives a restart of its owner
    assert reopened.get(created["key_id"])["name"] == "notebook" and reopened.revision() == 1
    reopened.close()


def test_revoke_and_rotate_move_the_revision_and_the_cache_follows(store):
    cache = KeyCache(LocalKeys(store), tenant_weight=lambda tenant: 3.0)
    first, second = store.create(body()), store.create(body(weight=0.5))
    assert asyncio.run(cache.refresh()) and not asyncio.run(cache.refresh())  # no change: no reload
    assert cache.resolve(first["key"]).weight == 3.0 and cache.resolve(second["key"]).weight == 0.5
    before = store.revision()
    assert store.revoke(first["key_id"])["revoked_at"] is not None and store.revision() == before + 1
    assert store.revoke(first["key_id"])["revoked_at"] is not None and store.revision() == before + 1
    rotated = store.rotate(second["key_id"])
    assert rotated["key_id"] == second["key_id"] and rotated["key"] != second["key"]
    assert store.rotate(first["key_id"]) is None and store.revoke("000000000000") is None
    assert asyncio.run(cache.refresh())
    assert cache.resolve(first["key"]) is None and cache.resolve(second["key"]) is None
    assert cache.resolve(rotated["key"]).key_id == second["key_id"]


def test_a_key_made_on_another_replica_works_at_once_and_misses_share_one_store_check(store):
    class Counting(LocalKeys):
        checks = 0

        async def revision(self, create: bool = False) -> int:
            Counting.checks += 1
            return await super().revision(create)

    cache = KeyCache(Counting(store))
    asyncio.run(cache.refresh())
    made_elsewhere = store.create(body())  # this cache has not polled since
    assert cache.resolve(made_elsewhere["key"]) is None

    async def at_once() -> list:
        return await asyncio.gather(*(cache.resolve_fresh(made_elsewhere["key"]) for _ in range(5)),
                                    cache.resolve_fresh("orch_0123456789ab_" + "x" * 43))

    before = Counting.checks
    *found, unknown = asyncio.run(at_once())
    assert [p.key_id for p in found] == [made_elsewhere["key_id"]] * 5 and unknown is None
    assert Counting.checks == before + 1  # six misses, one look at the store
    assert asyncio.run(cache.resolve_fresh("not a key")) is None and Counting.checks == before + 1


@pytest.mark.parametrize("hostile", ["x'); DROP TABLE keys; --", "\" OR 1=1 --", "'; UPDATE meta SET value=0; --",
                                     "Robert'); DELETE FROM keys WHERE ('1'='1", "\0nul", "ключ 🔑"])
def test_names_and_metadata_are_stored_verbatim_whatever_they_hold(store, hostile):
    before = store.create(body(name="before"))
    created = store.create(body(name=hostile, metadata={hostile: hostile, "nested": [hostile]}))
    assert store.get(created["key_id"])["name"] == hostile
    assert store.get(created["key_id"])["metadata"] == {hostile: hostile, "nested": [hostile]}
    assert [row["key_id"] for row in store.list()] == [before["key_id"], created["key_id"]]
    assert store.list(tenant=hostile) == [] and store.get(hostile) is None
    assert store.revision() == 2
    tables = {row[0] for row in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"keys", "meta"}


def test_key_bodies_refuse_bad_fields():
    with pytest.raises(ValueError, match="scopes"):
        KeyCreate.model_validate({"tenant": "t", "scopes": ["root"]})
    with pytest.raises(ValueError, match="weight"):
        KeyCreate.model_validate({"tenant": "t", "weight": 0})
    with pytest.raises(ValueError, match="tenant"):
        KeyCreate.model_validate({"tenant": "has space"})
    assert KeyCreate.model_validate({"tenant": "t", "scopes": ["admin", "infer", "admin"]}).scopes == ["infer", "admin"]


def principal(**fields) -> Principal:
    return Principal(**{"key_id": "k1", "tenant": "team-a", "scopes": frozenset({"infer"}), **fields})


def test_scopes_models_and_priority_are_checked_with_stable_codes():
    access.check_scope(None, "admin")  # no principal: auth off or the loopback bypass
    access.check_scope(principal(), "infer")
    with pytest.raises(OrchError) as refused:
        access.check_scope(principal(), "admin")
    assert refused.value.code == ErrorCode.FORBIDDEN and refused.value.http_status == 403
    assert "'admin' scope" in refused.value.message
    limited = principal(models=("smollm2",), priority_ceiling=Priority.batch)
    access.check_principal(limited, TaskRequest(prompt="x", max_tokens=1, model_ref="smollm2", priority="batch"))
    for request, code in ((TaskRequest(prompt="x", max_tokens=1, model_ref="other", priority="batch"), ErrorCode.MODEL_NOT_ALLOWED),
                          (TaskRequest(prompt="x", max_tokens=1, priority="batch"), ErrorCode.MODEL_NOT_ALLOWED),
                          (TaskRequest(prompt="x", max_tokens=1, model_ref="smollm2"), ErrorCode.PRIORITY_NOT_ALLOWED)):
        with pytest.raises(OrchError) as refused:
            access.check_principal(limited, request)
        assert refused.value.code == code and refused.value.http_status == 403
    with pytest.raises(OrchError, match="'infer' scope"):
        access.check_principal(principal(scopes=frozenset({"catalog"})), TaskRequest(prompt="x", max_tokens=1))


def test_tenant_keys_get_ids_under_their_tenant_and_see_only_their_own():
    a, admin = principal(), principal(tenant="ops", scopes=frozenset({"admin"}))
    task = access.admit_as(a, TaskRequest(prompt="x", max_tokens=1, task_id="job-1", session_id="chat"))
    assert (task.task_id, task.session_id) == ("team-a:job-1", "team-a:chat")
    generated = access.scoped_task(TaskRequest(prompt="x", max_tokens=1), a)
    assert generated.task_id.startswith("team-a:") and generated.session_id is None
    assert access.scoped_id(a, "team-a:job-1") == "team-a:job-1"
    assert access.scoped_id(principal(tenant="team-b"), "team-a:job-1") == "team-b:team-a:job-1"
    assert access.scoped_id(admin, "team-a:job-1") == "team-a:job-1" and access.scoped_id(None, "x") == "x"
    transcript = {"tags": ["task:team-a:job-1", "pool:default"], "metadata": {}}
    assert access.owns_artifact(a, transcript) and not access.owns_artifact(principal(tenant="team-b"), transcript)
    assert access.owns_artifact(admin, transcript) and access.owns_artifact(None, transcript)
    assert access.owns_artifact(a, {"tags": [], "metadata": access.stamped(a, {"tenant": "team-b"})})
    context = access.tenant_context(None, principal(weight=2.5))
    assert (context.tenant, context.weight) == ("team-a", 2.5)
    assert access.tenant_context(None, None) is None
    assert access.tenant_context(TaskContext(kv_warmth=True), a).kv_warmth


def test_the_tenants_section_declares_tenants_and_where_keys_are_kept(tmp_path):
    config = home_config()
    config["tenants"] = {"declared": [{"id": "team-a", "weight": 2}], "key_store": str(tmp_path / "k.sqlite")}
    parsed = parse_config(config)
    assert parsed.tenants.names() == ("default", "admin", "team-a") and parsed.tenants.weight("team-a") == 2.0
    assert parsed.tenants.weight("nobody") == 1.0
    assert parse_config(home_config()).tenants.key_store.endswith(".runtime/keys/keys.sqlite")
    for bad, message in (({"declared": [{"id": "a"}, {"id": "a"}]}, "declared twice"),
                         ({"declared": [{"id": "a", "weight": 0}]}, "weight"),
                         ({"declared": [{"id": "a", "wieght": 2}]}, "wieght")):
        config["tenants"] = bad
        with pytest.raises(ConfigError, match=message):
            parse_config(config)


def test_limits_default_to_unlimited():
    assert set(KeyLimits().model_dump().values()) == {None}
    with pytest.raises(ValueError):
        KeyLimits(rpm=0)


def test_the_store_uses_parameters_never_string_formatting_for_values():
    import inspect

    from orch.tenants import store as store_module

    source = inspect.getsource(store_module)
    assert "execute(f\"" not in source.replace('execute(f"SELECT {_INFO_COLUMNS}', "")
    assert ".format(" not in source and "%s" not in source


def test_no_keys_actor_runs_until_a_key_is_made_or_presented(monkeypatch):
    from orch.tenants import actor as keys_module

    lookups = []
    monkeypatch.setattr(keys_module, "find_actor", lambda name, namespace: lookups.append(name))
    backend = keys_module.ActorKeys("/nonexistent/keys.sqlite", "ns")
    monkeypatch.setattr(backend._client, "call", lambda *a, **k: pytest.fail("the keys actor was started"))
    cache = KeyCache(backend)

    async def polls() -> list:
        return [await cache.refresh() for _ in range(3)]

    assert asyncio.run(polls()) == [False] * 3 and cache.revision is None
    assert lookups == ["orch-keys"]  # looked up once, then not again within a second
