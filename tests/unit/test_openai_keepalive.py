"""An OpenAI stream that waits (a long prompt, a long queue) must stay readable by the
OpenAI-compatible clients people benchmark with, not only by a strict SSE parser."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from orch.api.events import EventKind
from orch.api.sse_client import parse
from orch.serve import sse
from orch.serve.openai.streams import CompletionChunks, Generation, relay


class WaitingStream:
    """A task whose first poll comes back empty (its wait ran out), then a token, then its end."""

    task_id = "t-waiting"

    async def batches(self):
        yield []
        yield [(0, EventKind.token.value, {"t": "Hello"})]
        yield [(1, EventKind.token.value, {"t": " world"}),
               (2, EventKind.end.value, {"tokens_out": 2, "decode_time_ms": 5, "finish_reason": "length"})]


def relayed_writes() -> list[str]:
    """Each string the OpenAI route writes, in order: one network read each for the client."""
    chunks = CompletionChunks(Generation(id="cmpl-1", created=1, model="m", fingerprint=None, prompt_tokens=3))

    async def run() -> list[str]:
        return [out async for out in relay(None, [WaitingStream()], chunks)]

    return asyncio.run(run())


def vllm_client_texts(reads: list[str]) -> list[str]:
    """The texts vLLM's benchmark client (``vllm.benchmarks``, the comparison client of
    bench/vs_server.py) takes from these reads, with its own parsing: each read stripped,
    messages split on blank lines, comments skipped."""
    endpoint = pytest.importorskip("vllm.benchmarks.lib.endpoint_request_func")
    handler = endpoint.StreamedResponseHandler()
    texts: list[str] = []
    for read in reads:
        chunk_bytes = read.encode().strip()
        if not chunk_bytes:
            continue
        for message in handler.add_chunk(chunk_bytes):
            if message.startswith(":"):
                continue
            chunk = message.removeprefix("data: ")
            if chunk != "[DONE]":
                data: dict[str, Any] = json.loads(chunk)
                if choices := data.get("choices"):
                    texts.append(choices[0]["text"])
    return texts


def test_a_waiting_openai_stream_sends_a_blank_line_that_sse_parsers_ignore():
    writes = relayed_writes()
    assert writes[0] == sse.OPENAI_KEEPALIVE == "\n"
    assert writes[-1].endswith(sse.DONE)
    texts = [json.loads(m.data)["choices"][0]["text"] for m in parse("".join(writes)) if m.data != "[DONE]"]
    assert texts == ["Hello", " world", ""]


def test_vllm_benchmark_client_reads_every_chunk_after_a_wait():
    writes = relayed_writes()
    assert vllm_client_texts(writes) == ["Hello", " world", ""]
    # With a comment as the keepalive that client loses every message until one read carries
    # two of them: here both texts, leaving the closing chunk. When every message comes in a
    # read of its own, it reads nothing and counts the request as failed.
    with_comment = [sse.KEEPALIVE if write == sse.OPENAI_KEEPALIVE else write for write in writes]
    assert vllm_client_texts(with_comment) == [""]
    one_message_a_read = [part + "\n\n" for write in with_comment for part in write.split("\n\n") if part]
    assert vllm_client_texts(one_message_a_read) == []
    assert vllm_client_texts([sse.OPENAI_KEEPALIVE if write == sse.KEEPALIVE else write
                              for write in one_message_a_read]) == ["Hello", " world", ""]
