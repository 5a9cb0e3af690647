"""Chat messages rendered into one prompt with the model's own chat template.

The template is the Jinja source a GGUF carries in ``tokenizer.chat_template``; it runs in
Jinja's immutable sandbox with the helpers Hugging Face templates expect
(``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text), and
``add_generation_prompt=True`` so the prompt ends where the assistant's turn begins.

A model without a template gets ``FALLBACK_FORMAT``, a ChatML-like layout::

    <|im_start|>{role}\\n{content}<|im_end|>\\n   (one block per message)
    <|im_start|>assistant\\n

Generation must stop at the end of the assistant's turn. Engines stop at their
end-of-generation tokens already; the text of the model's ``eos_token`` (``<|im_end|>`` for
the fallback) is added as a stop string as well, for engines or models where that token
comes out as plain text.

Tool-calling turns render through the template too: an assistant message's ``tool_calls``
(``arguments`` decoded into an object, as templates write them with ``tojson``) and ``tool``
messages with their ``tool_call_id`` (and the called function's ``name``). How tools are
offered is ``orch.core.tools``.

Plain Python, no Ray: the ingress renders, the pool only ever sees a prompt.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Optional, Sequence

from jinja2 import TemplateError, TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: Roles a conversation may use. ``developer`` (OpenAI's newer name for the system role) is
#: rendered as ``system``, which is what chat templates know.
ROLES = ("system", "developer", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}
#: Message keys that ask for behaviour this orchestrator does not have (the legacy
#: ``function_call``, audio); a message carrying one with a value is refused rather than
#: half-honoured.
UNSUPPORTED_MESSAGE_KEYS = ("function_call", "audio")
MAX_TOOL_CALLS = 128
#: Text content parts are joined with this, as other OpenAI-compatible servers do.
PART_SEPARATOR = "\n"
MAX_MESSAGES = 4096

FALLBACK_START = "<|im_start|>"
FALLBACK_END = "<|im_end|>"
FALLBACK_FORMAT = f"{FALLBACK_START}{{role}}\n{{content}}{FALLBACK_END}\n"


class ChatError(ValueError):
    """Messages that cannot be rendered: the client's to fix (``param`` names the field)."""

    def __init__(self, message: str, param: Optional[str] = "messages") -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ChatTemplateError(RuntimeError):
    """The model's own template does not compile: the operator's to fix, not the client's."""


@dataclass(frozen=True)
class RenderedChat:
    prompt: str
    #: Stop strings that end the assistant's turn (to add to the caller's own).
    stop: tuple[str, ...]
    #: False when the model has no template and the fallback format was used.
    used_model_template: bool


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the messages and return them as the templates expect them.

    Each message becomes ``{"role", "content", ["name"]}`` with ``content`` a string (a
    list of text parts is joined). Unknown keys without a behaviour are dropped.
    """
    if not isinstance(messages, (list, tuple)):
        raise ChatError("messages must be a list of message objects")
    if not messages:
        raise ChatError("messages must contain at least one message")
    if len(messages) > MAX_MESSAGES:
        raise ChatError(f"messages has {len(messages)} entries; at most {MAX_MESSAGES} are accepted")
    normalized = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise ChatError(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if not isinstance(role, str):
            raise ChatError(f"{where}.role is required and must be a string", f"{where}.role")
        if role not in ROLES:
            hint = " (the legacy 'function' role: send 'tool' messages)" if role == "function" else ""
            raise ChatError(f"{where}.role '{role}' is not supported{hint}; use one of: {', '.join(ROLES)}",
                            f"{where}.role")
        for key in UNSUPPORTED_MESSAGE_KEYS:
            if message.get(key):
                hint = "; use tool_calls" if key == "function_call" else ""
                raise ChatError(f"{where}.{key} is not supported{hint}", f"{where}.{key}")
        calls = _tool_calls(message.get("tool_calls"), f"{where}.tool_calls") if role == "assistant" else []
        content = message.get("content")
        item: dict[str, Any] = {"role": ROLE_ALIASES.get(role, role),
                                "content": "" if content is None and calls else _content_text(content, f"{where}.content")}
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise ChatError(f"{where}.name must be a string", f"{where}.name")
            item["name"] = name
        if calls:
            item["tool_calls"] = calls
        if role == "tool":
            _tool_result(item, message.get("tool_call_id"), where, normalized)
        normalized.append(item)
    return normalized


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's calls as templates read them: ``arguments`` as an object."""
    if calls is None:
        return []
    if not isinstance(calls, (list, tuple)) or len(calls) > MAX_TOOL_CALLS:
        raise ChatError(f"{where} must be a list of at most {MAX_TOOL_CALLS} tool calls", where)
    out = []
    for index, call in enumerate(calls):
        at = f"{where}[{index}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise ChatError(f"{at} must be an object like {{\"id\": ..., \"type\": \"function\", "
                            f"\"function\": {{\"name\": ..., \"arguments\": \"{{...}}\"}}}}", at)
        if call.get("type", "function") != "function":
            raise ChatError(f"{at}.type must be 'function'", f"{at}.type")
        call_id, name = call.get("id"), function.get("name")
        if not isinstance(call_id, str) or not call_id:
            raise ChatError(f"{at}.id is required: the id that the tool message answering it repeats", f"{at}.id")
        if not isinstance(name, str) or not name:
            raise ChatError(f"{at}.function.name is required and must be a string", f"{at}.function.name")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            raise ChatError(f"{at}.function.arguments must be a string of JSON", f"{at}.function.arguments")
        try:
            decoded: Any = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            decoded = arguments  # kept as the model wrote it; the template shows it as text
        out.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": decoded}})
    return out


def _tool_result(item: dict[str, Any], call_id: Any, where: str, earlier: list[dict[str, Any]]) -> None:
    """A ``tool`` message names the call it answers; templates also read the function's name."""
    if not isinstance(call_id, str) or not call_id:
        raise ChatError(f"{where}.tool_call_id is required: the id of the assistant's tool call this answers",
                        f"{where}.tool_call_id")
    item["tool_call_id"] = call_id
    if "name" not in item:
        for message in reversed(earlier):
            for call in message.get("tool_calls", ()):
                if call["id"] == call_id:
                    item["name"] = call["function"]["name"]
                    break
            if "name" in item:
                break


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise ChatError(f"{where} is required: a string or a list of text parts", where)
    if isinstance(content, (list, tuple)):
        texts = []
        for index, part in enumerate(content):
            at = f"{where}[{index}]"
            if not isinstance(part, Mapping):
                raise ChatError(f"{at} must be an object like {{\"type\": \"text\", \"text\": \"...\"}}", at)
            if part.get("type") != "text":
                raise ChatError(f"{at}.type {part.get('type')!r} is not supported; only text parts are", f"{at}.type")
            text = part.get("text")
            if not isinstance(text, str):
                raise ChatError(f"{at}.text must be a string", f"{at}.text")
            texts.append(text)
        return PART_SEPARATOR.join(texts)
    raise ChatError(f"{where} must be a string or a list of text parts, not {type(content).__name__}", where)


def render_chat(
    messages: Any,
    template: Optional[str] = None,
    special_tokens: Optional[Mapping[str, str]] = None,
) -> RenderedChat:
    """The prompt for ``messages`` (validated here), ready for the assistant to answer.

    Raises ChatError for messages the client must fix (including a template's own
    ``raise_exception``), ChatTemplateError for a template that does not compile.
    """
    return render_messages(normalize_messages(messages), template, special_tokens)


def render_messages(
    normalized: list[dict[str, Any]],
    template: Optional[str] = None,
    special_tokens: Optional[Mapping[str, str]] = None,
    tools: Optional[list[dict[str, Any]]] = None,
) -> RenderedChat:
    """``render_chat`` for messages already normalized; ``tools`` (OpenAI's shape) are given
    to the template, which decides how the model sees them."""
    special = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}
    if not template:
        prompt = "".join(FALLBACK_FORMAT.format(role=m["role"], content=m["content"]) for m in normalized)
        return RenderedChat(prompt + f"{FALLBACK_START}assistant\n", (FALLBACK_END,), used_model_template=False)
    compiled = _compile(template)
    try:
        prompt = compiled.render(
            messages=normalized,
            add_generation_prompt=True,
            **({"tools": tools} if tools else {}),
            bos_token=special.get("bos_token", ""),
            eos_token=special.get("eos_token", ""),
            **{k: v for k, v in special.items() if k not in ("bos_token", "eos_token")},
        )
    except TemplateError as exc:
        raise ChatError(f"the model's chat template refused these messages: {exc.message or exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ChatError(f"the model's chat template could not render these messages: {exc}") from None
    eos = special.get("eos_token")
    return RenderedChat(prompt, (eos,) if eos else (), used_model_template=True)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Optional[Sequence[str]] = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=tuple(separators) if separators else None, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(template: str):
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(template)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from None
