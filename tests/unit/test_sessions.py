"""Unit tests for orch.core.sessions: TTL, turns, budgets, bounded memory, metadata only."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orch.api.errors import ErrorCode
from orch.api.sessions import SessionInfo
from orch.config import ConfigError, parse_config
from orch.core.errors import OrchError
from orch.core.sessions import POLICY_LABEL, SessionBook, SessionPolicy, TurnCheck, _Session


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def book(**policy) -> tuple[SessionBook, Clock]:
    clock = Clock()
    return SessionBook(SessionPolicy(**policy), clock), clock


def turn(sessions: SessionBook, session_id: str = "s1", pool_id: str = "p1", **check) -> None:
    sessions.check(session_id, **check)
    sessions.record_turn(session_id, pool_id)


def refused(sessions: SessionBook, session_id: str = "s1", **check) -> OrchError:
    with pytest.raises(OrchError) as info:
        sessions.check(session_id, **check)
    assert info.value.code is ErrorCode.BUDGET_EXCEEDED
    assert info.value.http_status == 429
    assert info.value.retriable is False
    assert info.value.policy_label == POLICY_LABEL
    return info.value


# --------------------------------------------------------------------------- lifecycle


def test_first_use_creates_the_session_and_info_is_metadata():
    sessions, _ = book()
    assert sessions.info("s1") is None
    assert sessions.check("s1", max_tokens=8) is None
    sessions.record_turn("s1", "p1")
    info = sessions.info("s1")
    SessionInfo.model_validate(info)
    assert info == {
        "session_id": "s1", "ttl_ms_remaining": 600_000, "turns": 1, "max_turns": 8, "kv_bytes": 0,
        "kv_warmth": False, "last_pool_id": "p1", "budgets": None,
    }


def test_affinity_and_kv_warmth_follow_the_pool_of_the_previous_turn():
    sessions, _ = book()
    turn(sessions, pool_id="p1")
    assert sessions.info("s1")["kv_warmth"] is False  # first turn: nothing to be warm from
    assert sessions.check("s1") == "p1"
    sessions.record_turn("s1", "p1")
    assert sessions.info("s1")["kv_warmth"] is True
    sessions.record_turn("s1", "p2")  # failover to another pool
    info = sessions.info("s1")
    assert info["kv_warmth"] is False and info["last_pool_id"] == "p2" and info["kv_bytes"] == 0


def test_ttl_counts_down_from_the_last_activity_and_expires():
    sessions, clock = book(ttl_s=10)
    turn(sessions)
    clock.advance(4)
    assert sessions.info("s1")["ttl_ms_remaining"] == 6000
    sessions.record_usage("s1", tokens_in=1, tokens_out=1, decode_time_ms=1)  # a finished turn is activity
    assert sessions.info("s1")["ttl_ms_remaining"] == 10_000
    clock.advance(6)
    turn(sessions)  # so is a new turn
    clock.advance(9.999)
    assert sessions.info("s1")["turns"] == 2
    clock.advance(0.001)
    assert sessions.info("s1") is None
    assert sessions.delete("s1") is False
    # the id starts afresh; usage reported for the expired session is not resurrected
    assert sessions.record_usage("s1", tokens_in=5, tokens_out=5, decode_time_ms=5) is False
    turn(sessions)
    assert sessions.info("s1")["turns"] == 1


def test_a_refused_request_does_not_keep_a_session_alive():
    sessions, clock = book(ttl_s=10, max_turns=1)
    turn(sessions)
    clock.advance(8)
    error = refused(sessions)
    assert error.retry_after_ms == 2000  # when the session expires and the id starts afresh
    clock.advance(2)
    assert sessions.info("s1") is None
    turn(sessions)


def test_delete():
    sessions, _ = book()
    turn(sessions)
    assert sessions.delete("s1") is True
    assert sessions.info("s1") is None
    assert sessions.delete("s1") is False


def test_expired_sessions_are_swept_and_memory_is_capped():
    sessions, clock = book(ttl_s=10, max_sessions=3)
    for name in ("a", "b"):
        turn(sessions, name)
    clock.advance(5)
    turn(sessions, "c")
    clock.advance(5)  # a and b expire
    assert sessions.sweep() == 2
    assert len(sessions) == 1
    for name in ("d", "e"):
        turn(sessions, name)
    sessions.record_turn("c", "p1")  # c becomes the most recently active
    turn(sessions, "f")  # full: the least recently active (d) makes room
    assert len(sessions) == 3
    assert sessions.info("d") is None
    assert all(sessions.info(name) for name in ("c", "e", "f"))


# --------------------------------------------------------------------------- turns and budgets


def test_ninth_turn_is_refused():
    sessions, _ = book()
    for _ in range(8):
        turn(sessions)
    error = refused(sessions)
    assert "all 8 of its turns" in error.message and "new session" in error.message
    assert sessions.info("s1")["turns"] == 8


def test_token_budget_refuses_what_would_exceed_and_allows_what_fits():
    sessions, _ = book(tokens=100)
    error = refused(sessions, max_tokens=101)  # more than the whole budget, even on first use
    assert "100 of its 100 budget tokens left" in error.message
    assert sessions.info("s1") is None  # a refused first use creates nothing
    turn(sessions, max_tokens=40)
    sessions.record_usage("s1", tokens_in=10, tokens_out=40, decode_time_ms=0)
    assert sessions.info("s1")["budgets"] == {"tokens": 50, "time_ms": None, "cost": None}
    error = refused(sessions, max_tokens=51)
    assert "50 of its 100 budget tokens left" in error.message and "lower max_tokens to at most 50" in error.message
    turn(sessions, max_tokens=50)
    sessions.record_usage("s1", tokens_in=10, tokens_out=50, decode_time_ms=0)  # the prompt overran
    assert sessions.info("s1")["budgets"]["tokens"] == 0
    error = refused(sessions, max_tokens=1)
    assert "used its token budget" in error.message


def test_time_budget_refuses_when_spent_or_when_the_deadline_allows_more():
    sessions, _ = book(time_ms=1000)
    turn(sessions, deadline_ms=1000)
    sessions.record_usage("s1", tokens_in=1, tokens_out=1, decode_time_ms=700)
    assert sessions.info("s1")["budgets"]["time_ms"] == 300
    error = refused(sessions, deadline_ms=301)
    assert "300 ms of its 1000 ms" in error.message and "lower deadline_ms to at most 300" in error.message
    turn(sessions, deadline_ms=300)
    turn(sessions)  # without a deadline: admitted while any time is left
    sessions.record_usage("s1", tokens_in=1, tokens_out=1, decode_time_ms=400)
    assert sessions.info("s1")["budgets"]["time_ms"] == 0
    assert "decode-time budget" in refused(sessions).message


def test_cost_budget_prices_tokens_in_and_out():
    sessions, _ = book(cost=1.0, cost_per_1k_tokens_in=0.5, cost_per_1k_tokens_out=2.0)
    turn(sessions, max_tokens=500)  # up to 1.0
    sessions.record_usage("s1", tokens_in=200, tokens_out=100, decode_time_ms=5)  # 0.1 + 0.2
    assert sessions.info("s1")["budgets"]["cost"] == pytest.approx(0.7)
    error = refused(sessions, max_tokens=351)  # 0.702 > 0.7
    assert "lower max_tokens to at most 350" in error.message
    turn(sessions, max_tokens=350)
    sessions.record_usage("s1", tokens_in=1400, tokens_out=0, decode_time_ms=5)  # 0.7
    assert sessions.info("s1")["budgets"]["cost"] == 0.0
    assert "spent its cost budget" in refused(sessions).message


def test_failed_and_cancelled_turns_are_charged_what_they_used():
    sessions, _ = book(tokens=100, time_ms=10_000)
    turn(sessions, max_tokens=50)
    # e.g. a DECODE_TIMEOUT after 30 tokens, then a cancel after 5: both still count
    sessions.record_usage("s1", tokens_in=12, tokens_out=30, decode_time_ms=900)
    turn(sessions, max_tokens=50)
    sessions.record_usage("s1", tokens_in=12, tokens_out=5, decode_time_ms=100)
    assert sessions.info("s1")["budgets"] == {"tokens": 41, "time_ms": 9000, "cost": None}


def test_configure_keeps_usage_and_applies_the_new_limits():
    sessions, _ = book(tokens=100, max_turns=2)
    turn(sessions)
    sessions.record_usage("s1", tokens_in=30, tokens_out=30, decode_time_ms=0)
    sessions.configure(SessionPolicy(tokens=80, max_turns=1))
    assert sessions.info("s1")["budgets"]["tokens"] == 20
    assert "turns" in refused(sessions).message


def test_check_turn_answers_what_check_raises_as_plain_data():
    """The sessions actor answers with a TurnCheck; the ingress raises its error()."""
    sessions, clock = book(tokens=100, max_turns=2)
    first = sessions.check_turn("s1", max_tokens=10)
    assert first == TurnCheck(last_pool_id=None, budgets={"tokens": 100, "time_ms": None, "cost": None})
    assert first.error() is None and sessions.info("s1") is not None  # the session exists now
    sessions.record_turn("s1", "p1")
    assert sessions.check_turn("s1").last_pool_id == "p1"
    sessions.record_turn("s1", "p1")
    clock.advance(100)
    answer = sessions.check_turn("s1")
    assert answer.refusal is not None and answer.retry_after_ms == 500_000
    assert pickle.loads(pickle.dumps(answer)) == answer  # crosses Ray as it is
    error = answer.error()
    raised = refused(sessions)
    assert error.to_dict() == raised.to_dict() == {
        "code": "BUDGET_EXCEEDED", "message": answer.refusal, "retriable": False, "retry_after_ms": 500_000,
        "policy_label": POLICY_LABEL}
    assert sessions.check_turn("new", max_tokens=101).retry_after_ms is None  # refused first use: no session
    assert sessions.info("new") is None


# --------------------------------------------------------------------------- metadata only


@pytest.mark.parametrize("call", [
    lambda b: b.check("Once upon a time there was"),
    lambda b: b.check("s1", max_tokens="Once upon a time"),
    lambda b: b.check("s1", max_tokens=1.5),
    lambda b: b.check("s1", deadline_ms=True),
    lambda b: b.record_turn("s1", "the cat sat on the mat."),
    lambda b: b.record_turn("s1\nsecret", "p1"),
    lambda b: b.record_usage("s1", tokens_in="Once upon a time", tokens_out=1, decode_time_ms=1),
    lambda b: b.record_usage("s1", tokens_in=1, tokens_out=["a story"], decode_time_ms=1),
    lambda b: b.record_usage("s1", tokens_in=1, tokens_out=1, decode_time_ms=-1),
    lambda b: b.info({"prompt": "hello"}),
    lambda b: b.delete(b"bytes"),
])
def test_no_text_is_accepted_anywhere(call):
    sessions, _ = book()
    with pytest.raises((TypeError, ValueError)):
        call(sessions)
    assert len(sessions) == 0


def test_sessions_hold_only_numbers_ids_and_flags():
    for field in dataclasses.fields(_Session):
        assert field.type in {"float", "int", "bool", "Optional[str]"}, field
    assert _Session.__slots__  # no attribute can be added to a session
    public = [name for name in dir(SessionBook) if not name.startswith("_")]
    for name in public:
        member = getattr(SessionBook, name)
        if callable(member):
            for parameter in list(inspect.signature(member).parameters)[1:]:
                assert parameter in {"session_id", "pool_id", "max_tokens", "deadline_ms", "tokens_in",
                                     "tokens_out", "decode_time_ms", "policy"}, (name, parameter)


def test_sessions_core_does_not_import_ray():
    code = "import sys\nimport orch.core.sessions, orch.api.sessions\nprint('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------- config


def test_sessions_config_defaults_and_strictness():
    pools = [{"id": "p", "engine": "llamacpp", "model": "file:/m.gguf", "num_gpus": 1}]
    config = parse_config({"pools": pools})
    assert config.sessions.ttl_s == 600 and config.sessions.max_turns == 8 and config.sessions.budgets is None
    budgets = {"tokens": 10, "time_ms": 20, "cost": 0.5, "cost_per_1k_tokens_in": 0.1, "cost_per_1k_tokens_out": 0.2}
    config = parse_config({"pools": pools, "sessions": {"ttl_s": 2, "max_turns": 3, "budgets": budgets}})
    assert config.sessions.budgets.tokens == 10 and config.sessions.budgets.cost_per_1k_tokens_out == 0.2
    with pytest.raises(ConfigError, match=r"sessions\.ttl: unknown key"):
        parse_config({"pools": pools, "sessions": {"ttl": 5}})
    with pytest.raises(ConfigError, match=r"sessions\.budgets\.token: unknown key"):
        parse_config({"pools": pools, "sessions": {"budgets": {"token": 5}}})
    with pytest.raises(ConfigError, match="needs a price"):
        parse_config({"pools": pools, "sessions": {"budgets": {"cost": 1}}})
    with pytest.raises(ConfigError, match=r"sessions\.max_turns"):
        parse_config({"pools": pools, "sessions": {"max_turns": 0}})


# --------------------------------------------------------------------------- properties

operations = st.lists(
    st.one_of(
        st.tuples(st.just("turn"), st.sampled_from(["a", "b"]), st.integers(0, 300), st.sampled_from(["p1", "p2"])),
        st.tuples(st.just("usage"), st.sampled_from(["a", "b"]), st.integers(0, 300), st.integers(0, 300),
                  st.integers(0, 5000)),
        st.tuples(st.just("wait"), st.floats(0, 30)),
        st.tuples(st.just("delete"), st.sampled_from(["a", "b"])),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=operations, tokens=st.integers(1, 500), time_ms=st.integers(1, 5000), max_turns=st.integers(1, 6))
def test_remaining_never_negative_and_turns_never_exceed_max(ops, tokens, time_ms, max_turns):
    clock = Clock()
    sessions = SessionBook(SessionPolicy(ttl_s=60, max_turns=max_turns, tokens=tokens, time_ms=time_ms, cost=1.0,
                                         cost_per_1k_tokens_in=1.0, cost_per_1k_tokens_out=3.0), clock)
    for op in ops:
        if op[0] == "turn":
            _, name, max_tokens, pool = op
            try:
                sessions.check(name, max_tokens=max_tokens)
            except OrchError as exc:
                assert exc.code is ErrorCode.BUDGET_EXCEEDED
            else:
                sessions.record_turn(name, pool)
        elif op[0] == "usage":
            _, name, tokens_in, tokens_out, decode_ms = op
            sessions.record_usage(name, tokens_in=tokens_in, tokens_out=tokens_out, decode_time_ms=decode_ms)
        elif op[0] == "wait":
            clock.advance(op[1])
        else:
            sessions.delete(op[1])
        for name in ("a", "b"):
            info = sessions.info(name)
            if info is None:
                continue
            SessionInfo.model_validate(info)
            assert 0 <= info["turns"] <= max_turns
            assert 0 <= info["ttl_ms_remaining"] <= 60_000
            assert all(value >= 0 for value in info["budgets"].values())
