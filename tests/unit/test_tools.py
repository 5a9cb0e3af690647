"""Tool calling without an engine: checking tools, rendering them through chat templates,
reading calls back (whole and streamed) and the constraint for forced calls."""

from __future__ import annotations

import json

import jsonschema
import pytest

from orch.api.openai import ChatCompletionChunk
from orch.core.tool_calls import Arguments, CallStart, Content, assemble, call_reader, read_calls
from orch.core.tools import HERMES, LLAMA3, MISTRAL, ToolError, plan_tools, render_tool_chat, template_family
from orch.serve.openai.streams import Generation
from orch.serve.openai.tools import ToolChatChunks, ToolDeltas, message
from tests.unit.test_chat import SMOLLM2_SPECIAL, SMOLLM2_TEMPLATE

# Compact templates in the shape of each family (how they show tools, calls and results).
HERMES_TEMPLATE = """\
{% if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}
{% if m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}{% for call in m.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA3_TEMPLATE = """\
{{ bos_token }}<|start_header_id|>system<|end_header_id|>

{% if tools is defined %}Environment: ipython
Respond with {"name": function name, "parameters": dictionary of arguments}.
{% for t in tools %}{{ t | tojson }}
{% endfor %}{% endif %}<|eot_id|>
{% for m in messages %}{% if m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ m.content }}<|eot_id|>
{% elif 'tool_calls' in m %}<|start_header_id|>assistant<|end_header_id|>

{% for call in m.tool_calls %}{"name": "{{ call.function.name }}", \
"parameters": {{ call.function.arguments | tojson }}}{% endfor %}<|eot_id|>
{% else %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{{ m.content }}<|eot_id|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

MISTRAL_TEMPLATE = """\
{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}\
{% if tools is defined and loop.last %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}\
[INST]{{ m.content }}[/INST]\
{% elif m.tool_calls is defined %}[TOOL_CALLS][{% for call in m.tool_calls %}\
{% if call.id | length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}\
{% endif %}{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}, \
"id": "{{ call.id }}"}{% if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}\
{% elif m.role == 'tool' %}[TOOL_RESULTS]{"content": {{ m.content | tojson }}, "call_id": "{{ m.tool_call_id }}"}\
[/TOOL_RESULTS]{% elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]
USER = [{"role": "user", "content": "Weather and time in Paris?"}]


def plan(choice="auto", template=HERMES_TEMPLATE, tools=TOOLS, parallel=None):
    return plan_tools(tools, choice, parallel, template)


# --------------------------------------------------------------------------- checking tools


@pytest.mark.parametrize(
    "tools, choice, param, fragment",
    [
        ([{"type": "function", "function": {"parameters": {}}}], "auto", "tools[0].function.name", "name is required"),
        ([{"type": "function", "function": {"name": "has space"}}], "auto", "tools[0].function.name", "letters"),
        ([WEATHER, WEATHER], "auto", "tools[1].function.name", "twice"),
        ([{"type": "retrieval"}], "auto", "tools[0].type", "'function'"),
        ([{"type": "function"}], "auto", "tools[0].function", "is required"),
        ("get_weather", "auto", "tools", "must be a list"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "auto",
         "tools[0].function.parameters", "describe an object"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "a": {"type": "strng"}}}}}], "auto", "tools[0].function.parameters", "not a valid JSON Schema"),
        (TOOLS, "sometimes", "tool_choice", "not one of"),
        (TOOLS, {"type": "function", "function": {"name": "get_news"}}, "tool_choice.function.name", "get_news"),
        (TOOLS, {"type": "function"}, "tool_choice", "must be"),
        (None, "required", "tools", "needs tools"),
    ],
)
def test_bad_tools_and_choices_name_the_field(tools, choice, param, fragment):
    with pytest.raises(ToolError) as caught:
        plan(choice, tools=tools)
    assert caught.value.param == param and fragment in caught.value.message
    assert caught.value.openai_code is None


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, None, "{{ tools }}{% for m in messages %}{{ m.content }}"
                                      "{% endfor %}"])
def test_auto_needs_a_template_whose_calls_are_readable(template):
    with pytest.raises(ToolError) as caught:
        plan_tools(TOOLS, None, None, template, "model 'smol'")
    assert caught.value.param == "tools" and caught.value.openai_code == "unsupported_parameter"
    assert "model 'smol'" in caught.value.message and "'required'" in caught.value.message
    with pytest.raises(ToolError) as explicit:
        plan_tools(TOOLS, "auto", None, template)
    assert explicit.value.param == "tool_choice"
    # Forced calls and 'none' work with any template.
    assert plan("required", template).constrained and not plan("none", template).offered


def test_template_families_are_recognised():
    assert template_family(HERMES_TEMPLATE) == (True, HERMES)
    assert template_family(LLAMA3_TEMPLATE) == (True, LLAMA3)
    assert template_family(MISTRAL_TEMPLATE) == (True, MISTRAL)
    assert template_family(SMOLLM2_TEMPLATE) == (False, None)


# --------------------------------------------------------------------------- rendering


def test_tools_reach_the_models_own_template_and_follow_ups_render():
    first = render_tool_chat(USER, HERMES_TEMPLATE, SMOLLM2_SPECIAL, plan()).prompt
    assert json.dumps(WEATHER) in first and "<tools>" in first
    assert render_tool_chat(USER, HERMES_TEMPLATE, SMOLLM2_SPECIAL, plan("none")).prompt.count("<tools>") == 0
    follow_up = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    prompt = render_tool_chat(follow_up, HERMES_TEMPLATE, SMOLLM2_SPECIAL, plan()).prompt
    # Arguments reach the template as an object, so its tojson writes them once, not as a quoted string.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in prompt
    assert "<tool_response>\n21 degrees\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    llama = render_tool_chat(follow_up, LLAMA3_TEMPLATE, {}, plan(template=LLAMA3_TEMPLATE)).prompt
    assert '{"name": "get_weather", "parameters": {"city": "Paris"' in llama and "ipython<|end_header_id|>\n\n21" in llama


def test_mistral_ids_fit_its_template():
    mistral = plan(template=MISTRAL_TEMPLATE)
    call_id = mistral.new_call_id()
    assert len(call_id) == 9 and call_id.isalnum()
    follow_up = USER + [
        {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function",
                                              "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "12:00"},
    ]
    prompt = render_tool_chat(follow_up, MISTRAL_TEMPLATE, {"eos_token": "</s>"}, mistral).prompt
    assert f'"id": "{call_id}"' in prompt and f'"call_id": "{call_id}"' in prompt


def test_a_template_without_tools_gets_them_in_a_system_message_and_past_calls_as_text():
    follow_up = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    prompt = render_tool_chat(follow_up, SMOLLM2_TEMPLATE, SMOLLM2_SPECIAL, plan("required", SMOLLM2_TEMPLATE)).prompt
    assert prompt.startswith("<|im_start|>system\nYou can call these functions:\n" + json.dumps(WEATHER))
    assert '[{"name": "get_time", "arguments": {"zone": "CET"}}]' in prompt
    assert "<|im_start|>user\nResult of get_time (call call_1):\n12:00<|im_end|>" in prompt
    named = plan({"type": "function", "function": {"name": "get_time"}}, SMOLLM2_TEMPLATE)
    assert "Call the function get_time now" in render_tool_chat(USER, SMOLLM2_TEMPLATE, SMOLLM2_SPECIAL,
                                                                named).prompt


# --------------------------------------------------------------------------- reading calls


def streamed(p, text, size=1):
    """The reader's events when ``text`` arrives ``size`` characters at a time."""
    reader = call_reader(p)
    events = []
    for at in range(0, len(text), size):
        events += reader.feed(text[at:at + size])
    return events + reader.finish()


def calls_of(p, text):
    content, calls = read_calls(p, text)
    assert assemble(streamed(p, text))[0] == content  # streamed and whole answers agree
    assert [(c.name, c.arguments) for c in assemble(streamed(p, text, 3))[1]] == [(c.name, c.arguments)
                                                                                   for c in calls]
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize(
    "template, output",
    [
        (HERMES_TEMPLATE, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                          '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
                          '{"zone": "CET"}}\n</tool_call>'),
        (HERMES_TEMPLATE, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
                          '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>\n'),
        (HERMES_TEMPLATE, '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
                          '{"name": "get_time", "arguments": {"zone": "CET"}}'),
        (LLAMA3_TEMPLATE, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": '
                          '"celsius"}}; {"name": "get_time", "parameters": {"zone": "CET"}}'),
        (LLAMA3_TEMPLATE, '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}\n'
                          '{"name": "get_time", "parameters": "{\\"zone\\": \\"CET\\"}"}'),
        (MISTRAL_TEMPLATE, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},'
                           ' {"name": "get_time", "arguments": {"zone": "CET"}}]'),
        (MISTRAL_TEMPLATE, '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                           '{"name": "get_time", "arguments": {"zone": "CET"}}]'),
    ],
)
def test_several_calls_in_one_turn_for_each_family(template, output):
    content, calls = calls_of(plan(template=template), output)
    assert calls == [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "CET"})]
    assert content == ("Let me check." if "Let me" in output else None)


@pytest.mark.parametrize(
    "template, output",
    [
        (HERMES_TEMPLATE, "Paris is sunny today."),
        (HERMES_TEMPLATE, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # cut short
        (HERMES_TEMPLATE, '<tool_call>\n{"name": "get_news", "arguments": {}}\n</tool_call>'),  # not offered
        (HERMES_TEMPLATE, "I would use <tool_c"),
        (LLAMA3_TEMPLATE, '{"name": "get_weather", "parameters": {"city": "Paris"} trailing'),
        (LLAMA3_TEMPLATE, '{"answer": 42}'),
        (MISTRAL_TEMPLATE, "[1] see the forecast"),
    ],
)
def test_malformed_or_plain_output_stays_text(template, output):
    assert calls_of(plan(template=template), output) == (output, [])


def test_a_bad_block_stays_text_between_good_ones():
    output = ('<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
              '<tool_call>{"name": oops}</tool_call>')
    content, calls = calls_of(plan(), output)
    assert calls == [("get_time", {"zone": "CET"})] and content == '<tool_call>{"name": oops}</tool_call>'


def test_parallel_tool_calls_false_keeps_the_first_call():
    output = '[{"name": "get_time", "arguments": {"zone": "A"}}, {"name": "get_time", "arguments": {"zone": "B"}}]'
    assert calls_of(plan(template=MISTRAL_TEMPLATE, parallel=False), output)[1] == [("get_time", {"zone": "A"})]
    assert plan("required", parallel=False).schema()["maxItems"] == 1


def test_none_never_parses():
    assert not plan("none").parses
    text = '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    assert message(plan("none"), text, "stop")[0].model_dump() == {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- forced calls


def test_required_schema_accepts_exactly_calls_with_valid_arguments():
    schema = plan("required", SMOLLM2_TEMPLATE).schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    good = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
            {"name": "get_time", "arguments": {"zone": "CET"}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}],
                [{"name": "get_news", "arguments": {}}], [{"name": "get_time", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    named = plan({"type": "function", "function": {"name": "get_weather"}}, SMOLLM2_TEMPLATE)
    assert named.schema() == WEATHER["function"]["parameters"]
    assert json.loads(named.schema_text()) == named.schema()


def test_constrained_arguments_stream_as_they_come():
    p = plan("required", SMOLLM2_TEMPLATE)
    output = ('[{"name": "get_weather", "arguments": {"city": "Pa\\"ris {x}", "unit": "celsius"}}, '
              '{"arguments": {"zone": "CET"}, "name": "get_time"}]')
    events = streamed(p, output, 2)
    starts = [e for e in events if isinstance(e, CallStart)]
    assert [(e.index, e.name) for e in starts] == [(0, "get_weather"), (1, "get_time")]
    first_args = [e.text for e in events if isinstance(e, Arguments) and e.index == 0]
    assert len(first_args) > 5  # fragments, not one piece at the end
    content, calls = assemble(events)
    assert content is None and json.loads(calls[0].arguments) == {"city": 'Pa"ris {x}', "unit": "celsius"}
    assert json.loads(calls[1].arguments) == {"zone": "CET"} and calls[0].id != calls[1].id
    named = plan({"type": "function", "function": {"name": "get_time"}}, SMOLLM2_TEMPLATE)
    events = streamed(named, '{"zone": "CET"} ', 4)
    assert isinstance(events[0], CallStart) and events[0].name == "get_time"
    assert assemble(events)[1][0].arguments == '{"zone": "CET"}'
    # Output that ignored the constraint is not lost.
    assert assemble(streamed(p, "no calls here"))[0] == "no calls here"


# --------------------------------------------------------------------------- OpenAI shapes


def test_message_and_stream_deltas_have_openais_shape():
    p = plan("required", SMOLLM2_TEMPLATE)
    output = '[{"name": "get_time", "arguments": {"zone": "CET"}}]'
    body, finish = message(p, output, "stop")
    dumped = body.model_dump()
    assert finish == "tool_calls" and dumped["content"] is None
    call = dumped["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_time", "arguments": '{"zone": "CET"}'}
    assert message(p, output[:20], "length")[1] == "length"
    deltas = ToolDeltas(p)
    shown = [d.model_dump() for d in deltas.feed(output[:30])] + [d.model_dump() for d in deltas.feed(output[30:])]
    rest, finish = deltas.finish("stop")
    assert finish == "tool_calls" and not rest
    first = shown[0]["tool_calls"][0]
    assert set(first) == {"index", "id", "type", "function"} and first["function"] == {"name": "get_time",
                                                                                      "arguments": ""}
    later = [d["tool_calls"][0] for d in shown[1:]]
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in later)
    assert "".join(d["function"]["arguments"] for d in later) == '{"zone": "CET"}'
    text = ToolDeltas(plan())
    assert [d.model_dump() for d in text.feed("Hello")] == [{"content": "Hello"}]
    assert text.finish("stop") == ([], "stop")


def test_stream_chunks_carry_tool_call_deltas_and_the_finish():
    chunks = ToolChatChunks(Generation("chatcmpl-1", 0, "m", None, 3), plan("required", SMOLLM2_TEMPLATE))
    output = '[{"name": "get_time", "arguments": {"zone": "CET"}}]'
    wire = chunks.opening(0) + chunks.pieces(0, [{"t": output[at:at + 4]} for at in range(0, len(output), 4)])
    wire += chunks.closing("stop", 0)
    sent = [ChatCompletionChunk.model_validate_json(line[len("data: "):])
            for line in wire.splitlines() if line.startswith("data: ")]
    assert sent[0].choices[0].delta.role == "assistant"
    calls = [c.choices[0].delta.tool_calls[0] for c in sent if c.choices[0].delta.tool_calls]
    assert calls[0].id and calls[0].function.name == "get_time" and calls[0].type == "function"
    assert "".join(c.function.arguments for c in calls) == '{"zone": "CET"}'
    assert sent[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in sent)


def test_a_forced_call_and_a_response_format_do_not_mix():
    from orch.api.openai import ChatCompletionRequest
    from orch.serve.openai.tools import render

    req = ChatCompletionRequest(model="m", messages=USER, tools=TOOLS, tool_choice="required",
                                response_format={"type": "json_object"})
    with pytest.raises(ToolError) as caught:
        render(req, SMOLLM2_TEMPLATE, SMOLLM2_SPECIAL)
    assert caught.value.param == "response_format"
    rendered, tools = render(req.model_copy(update={"response_format": None}), SMOLLM2_TEMPLATE, SMOLLM2_SPECIAL)
    assert tools.constrained and "You can call these functions" in rendered.prompt


def test_capabilities_say_which_pools_take_tools_and_which_parse_auto():
    from orch.api.pools import PoolView
    from orch.core import engine_features
    from orch.serve.routes.meta import pool_features

    row = PoolView("p", "llamacpp", "m", ready=True, has_chat_template=True)
    llamacpp = engine_features.supported("llamacpp")
    assert {"tools", "tool_choice_auto"} <= set(pool_features(row, llamacpp, HERMES_TEMPLATE))
    # A template that shows no tools: forced calls still work (constrained), auto does not.
    plain = pool_features(row, llamacpp, "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert "tools" in plain and "tool_choice_auto" not in plain
    # No structured output on the engine: no tool calling at all.
    assert "tools" not in pool_features(row, engine_features.supported("mock"), HERMES_TEMPLATE)
