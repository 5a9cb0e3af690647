"""The SSE payload models (orch.api.events) give the wire's ``data`` objects."""

from __future__ import annotations

from orch.api.errors import ErrorCode
from orch.api.events import SSEEnd, SSEError, SSEMetrics, SSEStarted, SSEToken


def test_absent_fields_stay_off_the_wire():
    started = SSEStarted(queue_position=0, predicted_start_ms=0, queue_wait_ms=3, pool_id="a", engine="mock",
                         engine_version="1", prompt_tokens=4)
    assert started.payload() == {"queue_position": 0, "predicted_start_ms": 0, "queue_wait_ms": 3, "pool_id": "a",
                                 "engine": "mock", "engine_version": "1", "prompt_tokens": 4}
    assert SSEToken(t="hi", i=0).payload() == {"t": "hi", "i": 0}
    assert SSEEnd(tokens_out=2, decode_time_ms=9, finish_reason="length").payload() == {
        "tokens_out": 2, "decode_time_ms": 9, "finish_reason": "length"}
    embedded = SSEEnd(tokens_out=0, decode_time_ms=1, finish_reason="stop", tokens_in=3, embeddings=[[0.5]])
    assert embedded.payload()["embeddings"] == [[0.5]] and embedded.payload()["tokens_in"] == 3
    error = SSEError(code=ErrorCode.WORKER_RESET, message="lost", retriable=True, pool_id="a")
    assert error.payload() == {"code": "WORKER_RESET", "message": "lost", "retriable": True, "pool_id": "a"}


def test_metrics_state_fields_are_sent_even_when_null():
    frame = SSEMetrics(queue_depth=0, queue_position=None, on_time_probability=None, kv_warmth=False, tokens_out=5,
                       tokens_per_s=None, human="Running.")
    assert frame.payload() == {"queue_depth": 0, "queue_position": None, "on_time_probability": None,
                               "kv_warmth": False, "tokens_out": 5, "tokens_per_s": None, "human": "Running."}
    with_prep = SSEMetrics(queue_depth=1, prep={"pool_id": "a"}).payload()
    assert with_prep["prep"] == {"pool_id": "a"} and "budgets" not in with_prep and "human" not in with_prep
