"""Tool calls read back from a model's output, piece by piece as it streams.

One reader serves both a streamed answer (its events become ``delta.tool_calls`` chunks)
and a whole one (``read_calls`` feeds it everything at once), so both say the same.

- Constrained output (``tool_choice`` ``required`` or a named function, see
  ``orch.core.tools``) is valid JSON by construction: a call is announced as soon as its name
  is known and its arguments follow as they are generated.
- Free output (``auto``) is read in the template family's format. A call is announced only
  once it is whole and parses, naming an offered function; anything else stays text, so
  malformed output is never lost or half-reported.

Plain Python, no Ray.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from orch.core.tools import HERMES, LLAMA3, MISTRAL, ToolPlan

#: Where a family's calls start (and, for Hermes, end) in text. Engines that hide special
#: tokens drop ``<|python_tag|>`` and ``[TOOL_CALLS]``, so output that starts like a call
#: (``LEADING``) is held and read as one too.
START = {HERMES: "<tool_call>", LLAMA3: "<|python_tag|>", MISTRAL: "[TOOL_CALLS]"}
END = {HERMES: "</tool_call>"}
LEADING = {HERMES: "{", LLAMA3: "{", MISTRAL: "["}
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    #: The arguments as a string of JSON (OpenAI's shape).
    arguments: str


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class Arguments:
    index: int
    text: str


Event = Union[Content, CallStart, Arguments]


def call_reader(plan: ToolPlan) -> Union["ConstrainedReader", "FamilyReader"]:
    return ConstrainedReader(plan) if plan.constrained else FamilyReader(plan)


def read_calls(plan: ToolPlan, text: str) -> tuple[Optional[str], list[ToolCall]]:
    """The message content (None when calls leave none) and the calls of a whole output."""
    reader = call_reader(plan)
    return assemble(reader.feed(text) + reader.finish())


def assemble(events: list[Event]) -> tuple[Optional[str], list[ToolCall]]:
    content: list[str] = []
    calls: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, Content):
            content.append(event.text)
        elif isinstance(event, CallStart):
            calls[event.index] = [event.id, event.name, ""]
        else:
            calls[event.index][2] += event.text
    text = "".join(content)
    if not calls:
        return text, []
    return (text.strip() or None), [ToolCall(*calls[index]) for index in sorted(calls)]


class ConstrainedReader:
    """Reads JSON the grammar guarantees: a list of ``{"name", "arguments"}`` objects
    (``required``) or the named function's arguments alone. It tracks nesting depth outside
    strings, so arguments pass through as they come, without waiting for the whole call."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.named = plan.choice == "function"
        #: Depth at which a call's arguments are done: the top level, or inside a call object.
        self.base = 0 if self.named else 2
        self.depth = 0
        self.in_string = self.escape = False
        self.index = -1
        #: A call object's text while its name is not known yet (None: not reading one).
        self.head: Optional[str] = None
        self.in_args = self.args_started = False
        self.done = False
        self.unread = ""  # the output until a call starts: text, should the engine not hold to the constraint

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        if self.named and self.index < 0:
            self._start(events, self.plan.forced or "")
        if self.index < 0:
            self.unread += text
        fragment = ""
        for char in text:
            if self.done:
                break
            before = self.depth
            self._scan(char)
            if self.in_args:
                if self.args_started or not char.isspace():
                    self.args_started = True
                    fragment += char
                    if self.depth == self.base and not self.in_string:
                        self.in_args = False
                        self.done = self.named
                continue
            if fragment:
                events.append(Arguments(self.index, fragment))
                fragment = ""
            self._between(char, before, events)
        if fragment:
            events.append(Arguments(self.index, fragment))
        return events

    def finish(self) -> list[Event]:
        # Arguments cut short (the token limit) were passed on as they came.
        return [Content(self.unread)] if self.index < 0 and self.unread else []

    def _start(self, events: list[Event], name: str) -> None:
        self.index += 1
        events.append(CallStart(self.index, self.plan.new_call_id(), name))
        self.in_args, self.args_started = True, False

    def _between(self, char: str, before: int, events: list[Event]) -> None:
        """A character of the call list outside any arguments."""
        if before == 1 and self.depth == 2:
            self.head = char
        elif self.head is not None:
            self.head += char
            if self.depth == 1:  # closed before its name was read: keys in another order
                self._whole_object(events, self.head)
                self.head = None
            elif self.depth == 2 and not self.in_string:
                match = _HEADER.fullmatch(self.head)
                if match:
                    self.head = None
                    self._start(events, json.loads(f'"{match.group(1)}"'))
        elif before == 1 and self.depth == 0:
            self.done = True

    def _whole_object(self, events: list[Event], text: str) -> None:
        try:
            call = json.loads(text)
        except ValueError:
            return
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            self._start(events, call["name"])
            events.append(Arguments(self.index, json.dumps(call.get("arguments", {}), ensure_ascii=False)))
            self.in_args = False

    def _scan(self, char: str) -> None:
        if self.in_string:
            if self.escape:
                self.escape = False
            elif char == "\\":
                self.escape = True
            elif char == '"':
                self.in_string = False
        elif char == '"':
            self.in_string = True
        elif char in "[{":
            self.depth += 1
        elif char in "]}":
            self.depth -= 1


class FamilyReader:
    """Reads free output in the template family's format (``tool_choice: auto``)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        family = plan.family or HERMES
        self.start, self.end, self.leading = START[family], END.get(family), LEADING[family]
        self.mode = "start"  # start: only whitespace so far; text; call: inside start..end; rest: held to the end
        self.pending = ""
        self.held = ""  # whitespace between calls, passed on only if text follows
        self.index = -1

    def feed(self, text: str) -> list[Event]:
        self.pending += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        pending, self.pending = self.pending, ""
        if self.mode == "call":
            self._calls(events, pending, self.start + pending)
        elif self.mode == "rest":
            self._calls(events, pending.replace(self.start, "", 1), pending)
        else:
            self._content(events, pending)
        return events

    def _step(self, events: list[Event]) -> bool:
        """One move through the pending text; False when it must wait for more."""
        if self.mode == "start":
            stripped = self.pending.lstrip()
            if not stripped or (self.start.startswith(stripped) and stripped != self.start):
                return False
            if stripped.startswith(self.leading) or (self.end is None and stripped.startswith(self.start)):
                self.mode = "rest"
                return False
            self.mode = "text"
            return True
        if self.mode == "text":
            at = self.pending.find(self.start)
            if at < 0:
                keep = _partial_suffix(self.pending, self.start)
                self._content(events, self.pending[:len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                return False
            self._content(events, self.pending[:at])
            self.pending = self.pending[at + len(self.start):]
            self.mode = "call" if self.end else "rest"
            return True
        if self.mode == "call":
            at = self.pending.find(self.end or "")
            if at < 0:
                return False
            body, self.pending = self.pending[:at], self.pending[at + len(self.end or ""):]
            self._calls(events, body, self.start + body + (self.end or ""))
            self.mode = "text"
            return True
        return False

    def _content(self, events: list[Event], text: str) -> None:
        if not text:
            return
        if self.index >= 0 and not text.strip():
            self.held += text
            return
        events.append(Content(self.held + text))
        self.held = ""

    def _calls(self, events: list[Event], body: str, raw: str) -> None:
        calls = parse_call_json(body, {f.name for f in self.plan.functions})
        if calls is None:
            self._content(events, raw)
            return
        for name, arguments in calls:
            if self.index >= 0 and not self.plan.parallel:
                break
            self.index += 1
            events += [CallStart(self.index, self.plan.new_call_id(), name), Arguments(self.index, arguments)]


def parse_call_json(text: str, names: set[str]) -> Optional[list[tuple[str, str]]]:
    """(name, arguments JSON) of each call in ``text``: JSON objects or lists of them,
    separated by whitespace, ``;`` or ``,``; None unless every one is a call of an offered
    function."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    at = 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] in ";,"):
            at += 1
        if at >= len(text):
            break
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.extend(value if isinstance(value, list) else [value])
    calls = []
    for value in values:
        if not isinstance(value, dict) or value.get("name") not in names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append((value["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls or None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that could be the start of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
