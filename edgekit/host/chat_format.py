"""The chat template a bundle ships, checked against transformers.

The device renders the model's own Jinja template (device/chat.py) with the special tokens it
refers to. At export, conversations rendered by the device's renderer must equal what
transformers' apply_chat_template gives, byte for byte (with tools and template variables where
the template reads them), or the model is refused: a device must format chats exactly as the
model was trained to read them.
"""

from __future__ import annotations

from pathlib import Path

from edgekit.device import chat as device_chat
from edgekit.errors import ExportError

# Conversations the device's renderer must reproduce exactly.
CHECKS = [
    [("user", "What is a Raspberry Pi?")],
    [("system", "You control a robot arm."), ("user", "Pick up the red cube."),
     ("assistant", "Done: the cube is in the gripper."), ("user", "Now put it\non the shelf.")],
    [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")],
]
TOOLS = [{"type": "function", "function": {
    "name": "move_arm", "description": "Move the arm's gripper to a position.",
    "parameters": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                   "required": ["x", "y"]}}}]
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


# The instruction formats of the open models' fine-tunes that ship without a chat template, as
# templates (`edgekit export --chat-template NAME`): Dolly v2, MPT-instruct and Alpaca fine-tunes
# share the Alpaca format; Open Assistant's Pythia fine-tunes use prompter/assistant tokens.
_ALPACA_INTRO = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.")
INSTRUCTION_FORMATS = {
    "alpaca": (
        "{%- if messages[0]['role'] != 'system' -%}{{ '" + _ALPACA_INTRO + "\\n\\n' }}{%- endif -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}{{ m['content'] + '\\n\\n' }}"
        "{%- elif m['role'] == 'user' -%}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
        "{%- else -%}{{ '### Response:\\n' + m['content'] + '\\n\\n' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"),
    "oasst": (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}{{ '<|system|>' + m['content'] + '<|endoftext|>' }}"
        "{%- elif m['role'] == 'user' -%}{{ '<|prompter|>' + m['content'] + '<|endoftext|>' }}"
        "{%- else -%}{{ '<|assistant|>' + m['content'] + '<|endoftext|>' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"),
}
INSTRUCTION_FORMATS["dolly"] = INSTRUCTION_FORMATS["alpaca"]


def template_text(spec: str) -> str:
    """A chat template by instruction-format name (INSTRUCTION_FORMATS) or from a Jinja file."""
    if spec in INSTRUCTION_FORMATS:
        return INSTRUCTION_FORMATS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ExportError(f"--chat-template {spec}: neither a file nor a known format "
                          f"({', '.join(sorted(INSTRUCTION_FORMATS))})")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ExportError(f"--chat-template {spec}: not a UTF-8 text file") from None
    except OSError as e:
        raise ExportError(f"--chat-template {spec}: cannot read it ({e.strerror})") from None


def derive(tokenizer) -> dict | None:
    """The manifest's chat record for `tokenizer.chat_template`, or None when the model has none.
    ExportError when the device would render a checked conversation differently from transformers."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    special = {k: str(getattr(tokenizer, k)) for k in SPECIAL_TOKENS if getattr(tokenizer, k, None) is not None}
    chat = {"template": "chat_template.jinja", "special_tokens": special}
    variants: list[dict] = [{}]
    if "tools" in template:
        variants.append({"tools": TOOLS})
    if "enable_thinking" in template:
        variants.append({"enable_thinking": False})
    for check in CHECKS:
        msgs = [{"role": r, "content": c} for r, c in check]
        for extra in variants:
            for gen in (True, False):
                try:
                    want = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **extra)
                except Exception:  # templates may refuse a conversation, e.g. one with a system role
                    continue
                try:
                    got = device_chat.render(chat, msgs, gen, template=template, **extra)
                except device_chat.ChatFormatError as e:
                    got = f"<{e}>"
                if got != want:
                    raise ExportError(f"edgekit's device renderer gives {got!r:.300} for this model's chat template "
                                      f"where transformers gives {want!r:.300}; please report it (the template "
                                      "uses a feature the device does not render alike)")
    return chat
