"""Token logprobs as the pools send them (``SSETokenLogprob`` entries on ``token`` events) in
OpenAI's two shapes: the completions one (parallel lists with ``text_offset``) and the chat
one (``content[]`` with bytes and ``top_logprobs``)."""

from __future__ import annotations

from typing import Any, Optional

from orch.api.openai import ChatTokenLogprob, ChoiceLogprobs, CompletionLogprobs, TopLogprob

Entry = dict[str, Any]


def completion_logprobs(entries: list[Entry], offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """The completions shape for ``entries``, whose first token starts at ``offset`` of the
    choice's text; returns it and the offset after the last token."""
    out = CompletionLogprobs()
    for entry in entries:
        out.tokens.append(entry["token"])
        out.token_logprobs.append(entry["logprob"])
        top = entry.get("top") or []
        # The prompt's first token has nothing predicting it: no alternatives either.
        out.top_logprobs.append({alt["token"]: alt["logprob"] for alt in top} if entry["logprob"] is not None
                                else None)
        out.text_offset.append(offset)
        offset += len(entry["token"])
    return out, offset


def chat_logprobs(entries: list[Entry]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[ChatTokenLogprob(
        token=entry["token"], logprob=_value(entry["logprob"]), bytes=entry.get("bytes") or _bytes(entry["token"]),
        top_logprobs=[TopLogprob(token=alt["token"], logprob=alt["logprob"], bytes=_bytes(alt["token"]))
                      for alt in entry.get("top") or []],
    ) for entry in entries])


def _value(logprob: Optional[float]) -> float:
    return -9999.0 if logprob is None else logprob


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))
