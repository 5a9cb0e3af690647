"""The SSE reader shared by the CLI and the benchmarks, against frames the server writes."""

from __future__ import annotations

from orch.api.sse_client import SSEDecoder, SSEMessage, events, messages, parse
from orch.serve.sse import KEEPALIVE, frame, frames

TASK_STREAM = frames([(0, "started", {"pool_id": "p"}), (1, "token", {"t": "h\u00e9\nllo", "i": 0})]) + KEEPALIVE \
    + frame(2, "end", {"finish_reason": "stop"})


def test_reads_back_the_frames_the_server_writes():
    assert parse(TASK_STREAM) == [
        SSEMessage("started", '{"pool_id":"p"}', "0"),
        SSEMessage("token", '{"t":"h\u00e9\\nllo","i":0}', "1"),
        SSEMessage("end", '{"finish_reason":"stop"}', "2"),
    ]
    assert list(events(TASK_STREAM.split("\n"))) == [
        ("started", {"pool_id": "p"}), ("token", {"t": "h\u00e9\nllo", "i": 0}), ("end", {"finish_reason": "stop"})]


def test_chunks_may_split_lines_characters_and_crlf_anywhere():
    body = TASK_STREAM.replace("\n", "\r\n").encode()
    for size in (1, 2, 3, 7):
        decoder, found = SSEDecoder(), []
        for start in range(0, len(body), size):
            found += decoder.feed(body[start:start + size])
        assert found == parse(TASK_STREAM), size


def test_openai_stream_defaults_multiline_data_and_done():
    body = 'data: {"choices":[{"text":"a"}]}\n\ndata: line one\ndata: line two\n\ndata: [DONE]\n\n'
    found = parse(body)
    assert [message.event for message in found] == ["message"] * 3
    assert found[0].payload() == {"choices": [{"text": "a"}]}
    assert found[1].data == "line one\nline two" and found[1].payload() == {"raw": "line one\nline two"}
    assert found[2].payload() == {"done": True}


def test_messages_without_data_and_unfinished_ones_are_not_delivered():
    assert list(messages(["event: ping", "", ": comment", "", "event: token", "data: {}"])) == []
    assert parse("event: token\ndata: {}") == [SSEMessage("token", "{}")]  # a complete body needs no final blank
