"""Tool calling: the functions a request offers, how the prompt shows them, and the
constraint that makes a forced call's arguments valid.

The prompt is rendered with the model's own chat template receiving ``tools`` (OpenAI's
shape). A template that writes tool calls in a format this module recognises has a
``family``; only then does ``tool_choice: auto`` work, because only then can a call be told
apart from text (``orch.core.tool_calls`` reads it back):

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes 2/3, Qwen
  2.5/3 and other templates that use those tags);
- ``llama3``: a bare JSON object ``{"name": ..., "parameters": {...}}`` (Llama 3.1-3.3),
  optionally after ``<|python_tag|>``;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.

``required`` and a named function do not depend on the family: the output is constrained to
JSON (a list of ``{"name", "arguments"}`` objects, or the named function's arguments alone),
so the arguments always validate against the function's ``parameters``. A model whose
template does not take tools is told about them in a system message, and its past tool calls
and results are written into the conversation as text, so any template can render them.

Plain Python, no Ray.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from orch.api.sampling import MAX_CONSTRAINT_CHARS, schema_text
from orch.core.chat import ChatError, RenderedChat, normalize_messages, render_messages

MAX_TOOLS = 128
#: OpenAI's rule for function names.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CHOICES = ("none", "auto", "required")
HERMES, LLAMA3, MISTRAL = "hermes", "llama3", "mistral"
#: What marks each family in a template's source, checked in this order.
_FAMILY_MARKERS = (
    (MISTRAL, ("[TOOL_CALLS]",)),
    (HERMES, ("<tool_call>",)),
    (LLAMA3, ("<|start_header_id|>", "ipython")),
)
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolError(ChatError):
    """Tools or a tool choice the client must fix; ``unsupported`` marks a valid request this
    model cannot serve (OpenAI's ``unsupported_parameter``)."""

    def __init__(self, message: str, param: Optional[str], unsupported: bool = False) -> None:
        super().__init__(message, param)
        self.openai_code = "unsupported_parameter" if unsupported else None


@dataclass(frozen=True)
class Function:
    name: str
    parameters: Mapping[str, Any]
    description: Optional[str] = None

    def as_tool(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request does with tools, decided before rendering."""

    functions: tuple[Function, ...] = ()
    #: ``none``, ``auto``, ``required`` or ``function`` (the function named by ``forced``).
    choice: str = "none"
    forced: Optional[str] = None
    #: The template's call format (None: not one this module reads).
    family: Optional[str] = None
    #: The template renders ``tools`` and tool turns itself.
    template_tools: bool = False
    parallel: bool = True

    @property
    def offered(self) -> bool:
        return bool(self.functions) and self.choice != "none"

    @property
    def constrained(self) -> bool:
        return self.offered and self.choice in ("required", "function")

    @property
    def parses(self) -> bool:
        """Whether the output is read for tool calls."""
        return self.constrained or (self.offered and self.family is not None)

    def schema(self) -> Optional[dict[str, Any]]:
        """The JSON Schema the output is held to (None: unconstrained)."""
        if not self.constrained:
            return None
        if self.choice == "function":
            return dict(next(f.parameters for f in self.functions if f.name == self.forced))
        calls = [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False} for f in self.functions]
        schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                                  "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema

    def schema_text(self) -> Optional[str]:
        """``schema`` as compact JSON text (``TaskRequest.json_schema``)."""
        schema = self.schema()
        return None if schema is None else json.dumps(schema, separators=(",", ":"), ensure_ascii=False)

    def new_call_id(self) -> str:
        """A call id; Mistral templates accept only 9 letters and digits."""
        if self.family == MISTRAL:
            return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
        return "call_" + secrets.token_hex(12)


def template_family(template: Optional[str]) -> tuple[bool, Optional[str]]:
    """(whether the template renders ``tools``, the call format it teaches, if recognised)."""
    if not template or not re.search(r"\btools\b", template):
        return False, None
    for family, markers in _FAMILY_MARKERS:
        if all(marker in template for marker in markers):
            return True, family
    return True, None


def plan_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Optional[bool], template: Optional[str],
               model: str = "this model") -> ToolPlan:
    """The request's tools, checked (errors name the field) against what the model can do."""
    functions = validate_tools(tools)
    choice, forced = _choice(tool_choice, functions)
    template_tools, family = template_family(template)
    plan = ToolPlan(functions, choice, forced, family, template_tools, parallel_tool_calls is not False)
    if plan.offered and choice == "auto" and family is None:
        param = "tools" if tool_choice is None else "tool_choice"
        why = ("has no tool-call format this server reads (supported: Hermes/Qwen <tool_call> tags, "
               "Llama 3.x JSON calls, Mistral [TOOL_CALLS])" if template_tools else "does not support tools")
        raise ToolError(f"tool_choice 'auto' is not supported for {model}: its chat template {why}; send "
                        "tool_choice 'required' or a named function (the output is then constrained to a call), "
                        "or 'none'", param, unsupported=True)
    if plan.constrained and len(plan.schema_text() or "") > MAX_CONSTRAINT_CHARS:
        raise ToolError(f"the tools' parameters make a constraint longer than {MAX_CONSTRAINT_CHARS} characters; "
                        "send fewer or smaller tools", "tools")
    return plan


def validate_tools(tools: Any) -> tuple[Function, ...]:
    if tools is None:
        return ()
    if not isinstance(tools, (list, tuple)) or len(tools) > MAX_TOOLS:
        raise ToolError(f"tools must be a list of at most {MAX_TOOLS} tools", "tools")
    functions: list[Function] = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, Mapping):
            raise ToolError(f"{where} must be an object like {{\"type\": \"function\", \"function\": "
                            "{\"name\": ..., \"parameters\": {...}}}", where)
        if tool.get("type") != "function":
            raise ToolError(f"{where}.type must be 'function'", f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ToolError(f"{where}.function is required: an object with the function's name and parameters",
                            f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ToolError(f"{where}.function.name is required: 1 to 64 letters, digits, '_' or '-'",
                            f"{where}.function.name")
        if any(f.name == name for f in functions):
            raise ToolError(f"{where}.function.name '{name}' is given twice; function names must be unique",
                            f"{where}.function.name")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        functions.append(Function(name, _parameters(function.get("parameters"), f"{where}.function.parameters"),
                                  description))
    return tuple(functions)


def _parameters(parameters: Any, where: str) -> Mapping[str, Any]:
    if parameters is None:
        return _EMPTY_PARAMETERS
    if not isinstance(parameters, Mapping):
        raise ToolError(f"{where} must be a JSON Schema object", where)
    if parameters.get("type", "object") != "object":
        raise ToolError(f"{where} must describe an object (\"type\": \"object\"): arguments are named", where)
    try:
        schema_text(parameters)
    except (TypeError, ValueError) as exc:
        raise ToolError(f"{where}: {exc}", where) from None
    return dict(parameters, type="object")


def _choice(tool_choice: Any, functions: tuple[Function, ...]) -> tuple[str, Optional[str]]:
    if tool_choice is None:
        return ("auto" if functions else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise ToolError(f"tool_choice '{tool_choice}' is not one of {', '.join(CHOICES)} or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
        if tool_choice == "required" and not functions:
            raise ToolError("tool_choice 'required' needs tools to call; send tools", "tools")
        return tool_choice, None
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    if not isinstance(function, Mapping) or tool_choice.get("type") != "function":
        raise ToolError("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                        "\"function\": {\"name\": ...}}", "tool_choice")
    name = function.get("name")
    if not any(f.name == name for f in functions):
        offered = ", ".join(f.name for f in functions) or "none"
        raise ToolError(f"tool_choice names function {name!r}, which is not among the tools (offered: {offered})",
                        "tool_choice.function.name")
    return "function", name


# --------------------------------------------------------------------------- rendering


def render_tool_chat(messages: Any, template: Optional[str], special_tokens: Optional[Mapping[str, str]],
                     plan: ToolPlan) -> RenderedChat:
    """The prompt with the offered tools: given to a template that takes them, otherwise
    described in a system message (constrained choices only; ``plan_tools`` refuses the rest).
    Past tool turns are written as text for a template that cannot render them."""
    normalized = normalize_messages(messages)
    if not plan.template_tools:
        normalized = [_as_text(message) for message in normalized]
        if plan.constrained:
            normalized = _with_system_note(normalized, _instructions(plan))
    tools = [f.as_tool() for f in plan.functions] if plan.offered and plan.template_tools else None
    return render_messages(normalized, template, special_tokens, tools)


def _as_text(message: dict[str, Any]) -> dict[str, Any]:
    if message["role"] == "tool":
        name = message.get("name", "a tool")
        return {"role": "user", "content": f"Result of {name} (call {message['tool_call_id']}):\n"
                                           f"{message['content']}"}
    calls = message.get("tool_calls")
    if not calls:
        return message
    written = json.dumps([{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls],
                         ensure_ascii=False)
    text = f"{message['content']}\n{written}" if message["content"] else written
    return {key: value for key, value in message.items() if key != "tool_calls"} | {"content": text}


def _instructions(plan: ToolPlan) -> str:
    if plan.choice == "function":
        function = next(f for f in plan.functions if f.name == plan.forced)
        return (f"Call the function {function.name} now. Answer with its arguments only, as one JSON object "
                f"valid against this JSON Schema:\n{json.dumps(function.as_tool(), ensure_ascii=False)}")
    listed = "\n".join(json.dumps(f.as_tool(), ensure_ascii=False) for f in plan.functions)
    many = "one or more calls" if plan.parallel else "exactly one call"
    return ("You can call these functions:\n" + listed + "\nAnswer with a JSON list of " + many +
            ', each {"name": <function name>, "arguments": <arguments as a JSON object>}.')


def _with_system_note(messages: list[dict[str, Any]], note: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{note}" if messages[0]["content"] else note)
        return [first, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]
