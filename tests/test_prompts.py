"""Chat prompt layouts: the built-in prompt styles, custom styles, and Jinja chat templates."""

import pytest

from zinfer.services.registry import catalog
from zinfer.services.worker.instance.prompts import render_chat_template, render_prompt_style
from zinfer.shared.errors import InvalidRequest
from zinfer.shared.payloads import ChatMessage

CHAT = [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Hello!"),
        ChatMessage(role="user", content="Who are you?")]


@pytest.mark.parametrize("style,expected", [
    ("CHATML", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n"
               "<|im_start|>assistant\n"),
    ("QWEN", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
             "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n"
             "<|im_start|>assistant\n"),
    ("LLAMA2", "<s>[INST] <<SYS>>\nYou are a helpful AI assistant.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>"
               "[INST] Who are you? [/INST]"),
    ("ADD_COLON_TWO", "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                      "helpful, detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello!</s>"
                      "USER: Who are you? ASSISTANT:"),
    ("NO_COLON_TWO", " <reserved_102> Hi <reserved_103> Hello!</s> <reserved_102> Who are you? <reserved_103> "),
])
def test_builtin_styles(style, expected):
    assert render_prompt_style(catalog.prompt_styles()[style], CHAT) == expected


def test_add_colon_single_and_system_messages():
    style = catalog.prompt_styles()["ADD_COLON_SINGLE"]
    out = render_prompt_style(style, [ChatMessage(role="system", content="Be brief."),
                                      ChatMessage(role="user", content="Sum 2+2")])
    assert out == "Be brief.\n\n### Instruction: Sum 2+2\n\n### Response:"
    llama = render_prompt_style(catalog.prompt_styles()["LLAMA2"], [ChatMessage(role="system", content="Pirate."),
                                                                   ChatMessage(role="user", content="Hi")])
    assert llama.startswith("<s>[INST] <<SYS>>\nPirate.\n<</SYS>>\n\nHi ")


def test_bad_conversations_name_the_message():
    style = catalog.prompt_styles()["CHATML"]
    with pytest.raises(InvalidRequest, match=r"messages\[1\].role"):
        render_prompt_style(style, [ChatMessage(role="user", content="a"), ChatMessage(role="tool", content="b")])
    with pytest.raises(InvalidRequest, match="last message"):
        render_prompt_style(style, [ChatMessage(role="user", content="a"), ChatMessage(role="assistant", content="b")])
    with pytest.raises(InvalidRequest, match="system message"):
        render_prompt_style(style, [ChatMessage(role="user", content="a"), ChatMessage(role="system", content="b"),
                                    ChatMessage(role="user", content="c")])


def test_chat_templates_render_and_fail_clearly():
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}" \
               "{% if add_generation_prompt %}[assistant]{% endif %}"
    assert render_chat_template(template, CHAT[:1], bos_token="<s>") == "<s>[user]Hi[assistant]"
    with pytest.raises(InvalidRequest, match="chat_template"):
        render_chat_template("{{ raise_exception('no system role') }}", CHAT)
