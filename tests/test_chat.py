"""Chat templates on the device: rendered as transformers renders them, with tools and variables.

Export refuses a template the device would render differently (host/chat_format.py); these tests
check the renderer itself against transformers on templates with the features real models use:
system prompts, tools listed by the template, a thinking switch, {% generation %} tags,
raise_exception, loop controls.
"""

from __future__ import annotations

import json

import pytest

from edgekit.device import Model
from edgekit.device.chat import ChatFormatError, render
from edgekit.host.chat_format import TOOLS

QWEN_LIKE = """{%- if tools %}<|im_start|>system
{%- if messages[0]['role'] == 'system' %}
{{ messages[0]['content'] }}
{% endif %}
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message['role'] == 'system' %}{% continue %}{% endif %}
<|im_start|>{{ message['role'] }}
{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}
{%- endif %}"""

STRICT = """{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}[{{ m['role'] | upper }}] {{ m['content'] | trim }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Pick up the red cube."}],
    [{"role": "system", "content": "You control a robot arm."}, {"role": "user", "content": "Home."},
     {"role": "assistant", "content": "Going home."}, {"role": "user", "content": "Now stop.\n"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(smol_tokenizer):
    return smol_tokenizer


@pytest.mark.parametrize("template", [QWEN_LIKE, STRICT], ids=["qwen-like", "strict"])
@pytest.mark.parametrize("extra", [{}, {"tools": TOOLS}, {"enable_thinking": False}], ids=["plain", "tools", "think"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_the_device_renders_as_transformers_does(template, extra, conversation, hf_tokenizer):
    messages = CONVERSATIONS[conversation]
    special = {"bos_token": hf_tokenizer.bos_token, "eos_token": hf_tokenizer.eos_token}
    try:
        want = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=True, **extra)
    except Exception as e:
        with pytest.raises(ChatFormatError, match="System role not supported"):
            render({"special_tokens": special}, messages, True, template=template, **extra)
        assert "System role" in str(e)
        return
    assert render({"special_tokens": special}, messages, True, template=template, **extra) == want


def test_a_bundle_chat_uses_its_template_with_tools_and_variables(tiny_folder, tmp_path):
    from edgekit.host import ExportOptions, export

    (tmp_path / "qwen.jinja").write_text(QWEN_LIKE)
    bundle = export(tiny_folder, tmp_path / "b", ExportOptions(chat_template=str(tmp_path / "qwen.jinja")),
                    progress=lambda _: None)
    model = Model(bundle)
    assert model.manifest.chat["special_tokens"]["eos_token"] == "<|im_end|>"
    text = model.tokenizer.decode(model.encode(CONVERSATIONS[0], tools=TOOLS,
                                               chat_template_kwargs={"enable_thinking": False}),
                                  skip_special_tokens=False)
    assert json.dumps(TOOLS[0]) in text and text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
