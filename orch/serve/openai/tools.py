"""Tool calling on ``/v1/chat/completions``: the prompt and constraint a request's tools
make (``orch.core.tools``), and the model's output as ``message.tool_calls`` or as
``delta.tool_calls`` stream chunks (``orch.core.tool_calls`` reads it)."""

from __future__ import annotations

from typing import Any, Optional

from orch.api.openai.chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
)
from orch.core.chat import RenderedChat
from orch.core.tool_calls import Arguments, CallStart, Content, Event, call_reader, read_calls
from orch.core.tools import ToolError, ToolPlan, plan_tools, render_tool_chat
from orch.serve.openai.logprobs import chat_logprobs
from orch.serve.openai.streams import ChatChunks, Generation

TOOL_CALLS = "tool_calls"


def render(req: ChatCompletionRequest, template: Optional[str],
           special: Optional[dict[str, Any]]) -> tuple[RenderedChat, ToolPlan]:
    """The prompt with the request's tools, and what to do with them; raises ChatError
    (ToolError with its OpenAI code) for what the client must fix."""
    plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, template, f"model '{req.model}'")
    if plan.constrained and req.json_schema() is not None:
        raise ToolError("response_format cannot be combined with tool_choice 'required' or a named function: the "
                        "output is a tool call; leave one of them out", "response_format")
    return render_tool_chat(req.messages, template, special, plan), plan


def finish_reason(finish: str, called: bool) -> str:
    """``tool_calls`` for a turn that ended in calls; a cut-short one keeps ``length``."""
    return TOOL_CALLS if called and finish == "stop" else finish


def message(plan: ToolPlan, text: str, finish: str) -> tuple[AssistantMessage, str]:
    """The whole answer's message and finish reason."""
    if not plan.parses:
        return AssistantMessage(content=text), finish
    content, calls = read_calls(plan, text)
    tool_calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
    return AssistantMessage(content=content, tool_calls=tool_calls or None), finish_reason(finish, bool(calls))


def chat_choice(plan: ToolPlan, index: int, text: str, finish: str,
                logprobs: Optional[ChoiceLogprobs]) -> ChatChoice:
    body, finish = message(plan, text, finish)
    return ChatChoice(index=index, message=body, finish_reason=finish, logprobs=logprobs)


def chat_chunks(gen: Generation, plan: ToolPlan) -> ChatChunks:
    return ToolChatChunks(gen, plan) if plan.parses else ChatChunks(gen)


class ToolDeltas:
    """One choice's streamed text as deltas: content passes through, calls become
    ``delta.tool_calls`` (first the index, id, type and name, then argument fragments)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.reader = call_reader(plan)
        self.called = False

    def feed(self, text: str) -> list[ChatDelta]:
        return self._deltas(self.reader.feed(text))

    def finish(self, finish: str) -> tuple[list[ChatDelta], str]:
        """Deltas still held back, and the finish reason to send."""
        deltas = self._deltas(self.reader.finish())
        return deltas, finish_reason(finish, self.called)

    def _deltas(self, events: list[Event]) -> list[ChatDelta]:
        deltas: list[ChatDelta] = []
        for event in events:
            if isinstance(event, Content):
                deltas.append(ChatDelta(content=event.text))
            elif isinstance(event, CallStart):
                self.called = True
                deltas.append(ChatDelta(tool_calls=[ToolCallDelta(
                    index=event.index, id=event.id, type="function",
                    function=FunctionCallDelta(name=event.name, arguments=""))]))
            elif isinstance(event, Arguments):
                deltas.append(ChatDelta(tool_calls=[ToolCallDelta(
                    index=event.index, function=FunctionCallDelta(arguments=event.text))]))
        return deltas


class ToolChatChunks(ChatChunks):
    """Chat chunks of a request whose output is read for tool calls: each choice's text goes
    through its own ``ToolDeltas``; logprobs ride on the first chunk a token produces (or on
    an empty delta while its text is held back)."""

    def __init__(self, gen: Generation, plan: ToolPlan) -> None:
        super().__init__(gen)
        self.plan = plan
        self._choices: dict[int, ToolDeltas] = {}

    def _reader(self, index: int) -> ToolDeltas:
        return self._choices.setdefault(index, ToolDeltas(self.plan))

    def text(self, text: str, index: int = 0, entries: Optional[list[dict[str, Any]]] = None) -> str:
        logprobs = chat_logprobs(entries) if entries is not None else None
        deltas = self._reader(index).feed(text) or ([ChatDelta()] if logprobs is not None else [])
        return "".join(self._chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs if first else None)])
                       for first, delta in zip([True] + [False] * len(deltas), deltas))

    def closing(self, finish_reason: str, index: int = 0) -> str:
        deltas, finish = self._reader(index).finish(finish_reason)
        held = "".join(self._chunk([ChatChunkChoice(index=index, delta=delta)]) for delta in deltas)
        return held + super().closing(finish, index)
