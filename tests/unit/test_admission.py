"""Unit tests for orch.core.admission."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orch.api.errors import ErrorCode
from orch.api.tasks import TaskRequest
from orch.core.admission import ModelLimits, check_context, check_request
from orch.core.errors import OrchError


def req(**kw) -> TaskRequest:
    kw.setdefault("prompt", "Hello")
    kw.setdefault("max_tokens", 16)
    return TaskRequest(**kw)


def invalid(fn, *args) -> OrchError:
    with pytest.raises(OrchError) as info:
        fn(*args)
    assert info.value.code == ErrorCode.INVALID_PARAMS
    assert info.value.http_status == 400
    assert info.value.retriable is False
    return info.value


# --------------------------------------------------------------------------- check_request


def test_default_ctx_is_ctx_max():
    assert check_request(req(), ModelLimits(ctx_max=2048)) == 2048


def test_explicit_ctx_is_kept():
    assert check_request(req(ctx=512), ModelLimits(ctx_max=2048)) == 512
    assert check_request(req(ctx=2048), ModelLimits(ctx_max=2048)) == 2048


def test_ctx_above_ctx_max_is_invalid():
    err = invalid(check_request, req(ctx=4096), ModelLimits(ctx_max=2048))
    assert "4096" in err.message and "2048" in err.message


def test_max_tokens_must_leave_room_for_the_prompt():
    limits = ModelLimits(ctx_max=2048)
    err = invalid(check_request, req(max_tokens=2048), limits)
    assert "2048" in err.message
    invalid(check_request, req(ctx=100, max_tokens=100), limits)
    invalid(check_request, req(ctx=100, max_tokens=500), limits)
    assert check_request(req(ctx=100, max_tokens=99), limits) == 100
    assert check_request(req(max_tokens=2047), limits) == 2048


def test_max_tokens_out_limit():
    limits = ModelLimits(ctx_max=2048, max_tokens_out=256)
    assert check_request(req(max_tokens=256), limits) == 2048
    err = invalid(check_request, req(max_tokens=257), limits)
    assert "257" in err.message and "256" in err.message
    # no limit configured: only the context bounds max_tokens
    assert check_request(req(max_tokens=2000), ModelLimits(ctx_max=2048)) == 2048


@settings(max_examples=200, deadline=None)
@given(
    ctx_max=st.integers(1, 1 << 16),
    ctx=st.one_of(st.none(), st.integers(1, 1 << 17)),
    max_tokens=st.integers(1, 1 << 17),
    out_limit=st.one_of(st.none(), st.integers(1, 1 << 17)),
)
def test_check_request_property(ctx_max, ctx, max_tokens, out_limit):
    request = req(ctx=ctx, max_tokens=max_tokens)
    limits = ModelLimits(ctx_max=ctx_max, max_tokens_out=out_limit)
    effective = ctx if ctx is not None else ctx_max
    ok = effective <= ctx_max and max_tokens < effective and (out_limit is None or max_tokens <= out_limit)
    if ok:
        assert check_request(request, limits) == effective
    else:
        invalid(check_request, request, limits)


# --------------------------------------------------------------------------- check_context


def test_check_context_overflow_names_the_numbers():
    err = invalid(check_context, 1000, 100, 1024)
    assert "1000" in err.message
    assert "100" in err.message
    assert "1100" in err.message
    assert "1024" in err.message


def test_check_context_exact_fit_is_ok():
    assert check_context(1000, 24, 1024) is None
    assert check_context(0, 1024, 1024) is None
    invalid(check_context, 1001, 24, 1024)


@settings(max_examples=200, deadline=None)
@given(prompt_tokens=st.integers(0, 1 << 20), max_tokens=st.integers(1, 1 << 20), ctx=st.integers(1, 1 << 21))
def test_check_context_accepts_iff_it_fits(prompt_tokens, max_tokens, ctx):
    if prompt_tokens + max_tokens <= ctx:
        check_context(prompt_tokens, max_tokens, ctx)
    else:
        err = invalid(check_context, prompt_tokens, max_tokens, ctx)
        assert str(prompt_tokens + max_tokens) in err.message
        assert str(ctx) in err.message
