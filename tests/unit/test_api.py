"""Unit tests for the API contract types (orch.api) and OrchError."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from orch.api.errors import HTTP_STATUS, BackpressureBody, ErrorCode, ErrorEnvelope
from orch.api.events import TERMINAL_EVENTS, EventKind, SSEEnd, SSEToken
from orch.api.tasks import (
    MAX_SEED,
    DeterminismLevel,
    Engine,
    KVHint,
    PlacementMode,
    PlacementOverrides,
    Priority,
    TaskRequest,
    Workload,
)
from orch.core.errors import OrchError

SEED_FULL_FORM = {
    "task_id": "00000000-0000-0000-0000-000000000001",
    "session_id": "11111111-1111-1111-1111-111111111111",
    "workload": "completion",
    "model_ref": "smollm2",
    "engine": "llamacpp",
    "ctx": 2048,
    "priority": "interactive",
    "seed": 123456789,
    "determinism": "strict",
    "sampler_profile_version": "v1",
    "prompt": "Hello",
    "max_tokens": 64,
    "deadline_ms": 30000,
    "expected_tokens": 10,
    "kv_hint": "reuse",
    "inputs": ["x"],
    "placement": {"mode": "prefer", "prefer_pools": ["default"]},
}


def refused(**body) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        TaskRequest.model_validate(body)
    return info.value


# --------------------------------------------------------------------------- TaskRequest


@pytest.mark.parametrize("missing", ["prompt", "max_tokens"])
def test_prompt_and_max_tokens_required(missing):
    body = {"prompt": "hi", "max_tokens": 8}
    del body[missing]
    err = refused(**body)
    assert any(e["loc"] == (missing,) and e["type"] == "missing" for e in err.errors())


def test_defaults():
    r = TaskRequest(prompt="hi", max_tokens=8)
    assert r.priority is Priority.interactive
    assert r.temperature == 0.8
    assert r.top_p == 0.95
    assert r.top_k == 40
    assert r.workload is Workload.completion
    assert r.stop == []
    for field in ("task_id", "session_id", "model_ref", "engine", "ctx", "deadline_ms", "seed",
                  "determinism", "placement", "kv_hint", "inputs", "expected_tokens"):
        assert getattr(r, field) is None, field


@pytest.mark.parametrize("extra", ["max_token", "temprature", "model", "n", "stream"])
def test_unknown_fields_refused(extra):
    err = refused(prompt="hi", max_tokens=8, **{extra: 1})
    assert any(e["type"] == "extra_forbidden" and e["loc"] == (extra,) for e in err.errors())


def test_unknown_placement_field_refused():
    refused(prompt="hi", max_tokens=8, placement={"mode": "auto", "pin_pool": "a"})


def test_seed_full_form_accepted():
    r = TaskRequest.model_validate(SEED_FULL_FORM)
    assert r.task_id == SEED_FULL_FORM["task_id"]
    assert r.session_id == SEED_FULL_FORM["session_id"]
    assert r.workload is Workload.completion
    assert r.model_ref == "smollm2"
    assert r.engine is Engine.llamacpp
    assert r.ctx == 2048
    assert r.priority is Priority.interactive
    assert r.seed == 123456789
    assert r.determinism is DeterminismLevel.strict
    assert r.sampler_profile_version == "v1"
    assert r.max_tokens == 64
    assert r.deadline_ms == 30000
    assert r.expected_tokens == 10
    assert r.kv_hint is KVHint.reuse
    assert r.inputs == ["x"]
    assert r.placement == PlacementOverrides(mode=PlacementMode.prefer, prefer_pools=["default"])
    # JSON round trip keeps it valid and equal
    assert TaskRequest.model_validate_json(r.model_dump_json()) == r


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", -1),
        ("max_tokens", 0),
        ("seed", -1),
        ("seed", MAX_SEED + 1),
        ("priority", "urgent"),
        ("priority", "INTERACTIVE"),
        ("engine", "gpt"),
        ("temperature", 2.5),
        ("top_p", 0.0),
        ("ctx", 0),
        ("prompt", ""),
        ("stop", [""]),
        ("workload", "embedding"),
    ],
)
def test_bad_values_refused(field, value):
    body = {"prompt": "hi", "max_tokens": 8, field: value}
    err = refused(**body)
    assert err.errors()


def test_seed_bounds_accepted():
    assert TaskRequest(prompt="p", max_tokens=1, seed=0).seed == 0
    assert TaskRequest(prompt="p", max_tokens=1, seed=MAX_SEED).seed == MAX_SEED


@pytest.mark.parametrize(
    "bad_id", ["", "a b", "a/b", "../etc", "-leading", ".dot", "ümlaut", "x" * 129, "abc\n", "semi;colon"]
)
@pytest.mark.parametrize("field", ["task_id", "session_id"])
def test_bad_id_characters_refused(field, bad_id):
    refused(prompt="hi", max_tokens=8, **{field: bad_id})


@pytest.mark.parametrize("good_id", ["a", "A-1", "task_1.2:3", "0" * 128])
def test_good_ids_accepted(good_id):
    assert TaskRequest(prompt="hi", max_tokens=8, task_id=good_id).task_id == good_id


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=140))
def test_id_pattern_property(candidate):
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")
    ok = (
        1 <= len(candidate) <= 128
        and candidate[0].isascii()
        and candidate[0].isalnum()
        and all(c in allowed for c in candidate)
    )
    try:
        TaskRequest(prompt="hi", max_tokens=8, task_id=candidate)
    except ValidationError:
        assert not ok, repr(candidate)
    else:
        assert ok, repr(candidate)


# --------------------------------------------------------------------------- placement overrides


def test_pin_mode_without_pool_refused():
    with pytest.raises(ValidationError) as info:
        PlacementOverrides(mode="pin")
    assert "pin_pool_id" in str(info.value)
    refused(prompt="hi", max_tokens=8, placement={"mode": "pin"})


def test_pin_pool_id_alone_implies_pin():
    o = PlacementOverrides(pin_pool_id="gpu0")
    assert o.mode is PlacementMode.pin
    r = TaskRequest.model_validate({"prompt": "hi", "max_tokens": 8, "placement": {"pin_pool_id": "gpu0"}})
    assert r.placement.mode is PlacementMode.pin
    assert r.placement.pin_pool_id == "gpu0"


def test_pin_pool_id_with_prefer_mode_refused():
    # regression: the pin used to be silently ignored, letting the task land on another pool
    with pytest.raises(ValidationError) as info:
        PlacementOverrides(mode="prefer", prefer_pools=["a"], pin_pool_id="b")
    assert "pin_pool_id" in str(info.value)
    refused(prompt="hi", max_tokens=8, placement={"mode": "prefer", "prefer_pools": ["a"], "pin_pool_id": "b"})
    # explicit pin mode with the id is fine
    assert PlacementOverrides(mode="pin", pin_pool_id="b").pin_pool_id == "b"


def test_prefer_mode_needs_pools():
    with pytest.raises(ValidationError):
        PlacementOverrides(mode="prefer")


def test_placement_defaults():
    o = PlacementOverrides()
    assert o.mode is PlacementMode.auto
    assert o.pin_pool_id is None
    assert o.prefer_pools == [] and o.avoid_pools == []
    assert o.allow_fallback is True


def test_bad_pin_pool_id_refused():
    with pytest.raises(ValidationError):
        PlacementOverrides(pin_pool_id="no spaces")


# --------------------------------------------------------------------------- errors


EXPECTED_CODES = {
    "ADMISSION_REJECT",
    "QUEUE_FULL_DROP_LRU",
    "INVALID_PARAMS",
    "POOL_UNREADY",
    "POOL_UNAVAILABLE",
    "REPLICA_EXHAUSTED",
    "DECODE_TIMEOUT",
    "WORKER_RESET",
    "INTERNAL",
    "BUDGET_EXCEEDED",
    "NOT_FOUND",
    "UNAUTHORIZED",
    "FORBIDDEN",
    "MODEL_NOT_ALLOWED",
    "PRIORITY_NOT_ALLOWED",
    "RATE_LIMITED",
}


def test_error_codes_are_exactly_the_sixteen():
    assert len(ErrorCode) == 16
    assert {c.value for c in ErrorCode} == EXPECTED_CODES
    assert {c.name for c in ErrorCode} == EXPECTED_CODES
    assert set(HTTP_STATUS) == set(ErrorCode)


@pytest.mark.parametrize(
    "code,status",
    [
        ("ADMISSION_REJECT", 429),
        ("QUEUE_FULL_DROP_LRU", 429),
        ("INVALID_PARAMS", 400),
        ("POOL_UNREADY", 503),
        ("POOL_UNAVAILABLE", 503),
        ("REPLICA_EXHAUSTED", 503),
        ("DECODE_TIMEOUT", 504),
        ("WORKER_RESET", 503),
        ("INTERNAL", 500),
        ("BUDGET_EXCEEDED", 429),
        ("NOT_FOUND", 404),
        ("UNAUTHORIZED", 401),
        ("FORBIDDEN", 403),
        ("MODEL_NOT_ALLOWED", 403),
        ("PRIORITY_NOT_ALLOWED", 403),
        ("RATE_LIMITED", 429),
    ],
)
def test_http_status(code, status):
    assert HTTP_STATUS[ErrorCode(code)] == status
    assert OrchError(ErrorCode(code), "m").http_status == status
    # a plain string code is accepted and normalised
    e = OrchError(code, "m")
    assert e.code is ErrorCode(code)
    assert e.http_status == status


def test_orch_error_unknown_code_refused():
    with pytest.raises(ValueError):
        OrchError("NOPE", "m")


@settings(max_examples=200, deadline=None)
@given(
    code=st.sampled_from(list(ErrorCode)),
    message=st.text(max_size=50),
    retriable=st.booleans(),
    retry_after_ms=st.one_of(st.none(), st.integers(0, 10**9)),
    pool_id=st.one_of(st.none(), st.text(min_size=1, max_size=10)),
    engine=st.one_of(st.none(), st.sampled_from(["llamacpp", "vllm"])),
    policy_label=st.one_of(st.none(), st.text(max_size=10)),
)
def test_orch_error_pickle_round_trip(code, message, retriable, retry_after_ms, pool_id, engine, policy_label):
    e = OrchError(
        code,
        message,
        retriable=retriable,
        retry_after_ms=retry_after_ms,
        pool_id=pool_id,
        engine=engine,
        policy_label=policy_label,
    )
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is OrchError
    assert back.code is code
    assert back.message == message
    assert str(back) == message
    assert back.retriable is retriable
    assert back.retry_after_ms == retry_after_ms
    assert back.pool_id == pool_id
    assert back.engine == engine
    assert back.policy_label == policy_label
    assert back.http_status == HTTP_STATUS[code]
    assert back.to_dict() == e.to_dict()


def test_orch_error_to_dict_omits_empty_fields_and_fits_envelope():
    e = OrchError(ErrorCode.POOL_UNREADY, "wait", retriable=True, retry_after_ms=1000, pool_id="default")
    body = e.to_dict()
    assert body == {
        "code": "POOL_UNREADY",
        "message": "wait",
        "retriable": True,
        "retry_after_ms": 1000,
        "pool_id": "default",
    }
    env = ErrorEnvelope.model_validate(body)
    assert env.code == "POOL_UNREADY"
    back = OrchError.from_dict(body)
    assert (back.code, back.message, back.retriable, back.retry_after_ms, back.pool_id) == (
        ErrorCode.POOL_UNREADY,
        "wait",
        True,
        1000,
        "default",
    )


def test_backpressure_body_requires_its_fields():
    with pytest.raises(ValidationError):
        BackpressureBody(code="ADMISSION_REJECT", message="full")
    body = BackpressureBody(
        code="ADMISSION_REJECT", message="full", policy_label="reject", retriable=True, retry_after_ms=500
    )
    assert body.retry_after_ms == 500
    with pytest.raises(ValidationError):
        ErrorEnvelope(code="NOT_A_CODE", message="x")


# --------------------------------------------------------------------------- events


def test_terminal_events():
    assert TERMINAL_EVENTS == {"end", "error"}
    assert {k.value for k in EventKind} == {"started", "token", "metrics", "end", "error"}


def test_event_payload_bounds():
    with pytest.raises(ValidationError):
        SSEToken(t="x", i=-1)
    with pytest.raises(ValidationError):
        SSEEnd(tokens_out=1, decode_time_ms=1, finish_reason="timeout")
    assert SSEEnd(tokens_out=0, decode_time_ms=0, finish_reason="stop").finish_reason.value == "stop"
