"""Cut a model's Jinja chat template into the pieces device/chat.py renders with.

The template is rendered (by transformers, as `apply_chat_template` does) on probe
conversations whose contents are unique markers; the text between markers is what
the template puts between messages. The result is then checked: conversations
rebuilt from the pieces must equal the template's own output, byte for byte.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgekit.device import chat as device_chat
from edgekit.errors import ExportError

PROBES = [
    ["user"],
    ["user", "assistant"],
    ["user", "assistant", "user"],
    ["system", "user"],
    ["system", "user", "assistant", "user"],
]
# Conversations the derived pieces must reproduce exactly.
CHECKS = [
    [("user", "What is a Raspberry Pi?")],
    [("system", "You control a robot arm."), ("user", "Pick up the red cube."),
     ("assistant", "Done: the cube is in the gripper."), ("user", "Now put it\non the shelf.")],
    [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")],
]


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


def marker(k: int) -> str:
    return f"@@EDGEKIT{k}@@"


def derive(tokenizer) -> dict | None:
    """The chat pieces for `tokenizer.chat_template`, or None when the model has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    chat: dict = {"start": {}, "joint": {}, "end": {}, "generation": {}}
    for roles in PROBES:
        msgs = [{"role": r, "content": marker(k)} for k, r in enumerate(roles)]
        for gen in (False, True):
            try:
                text = _render(tokenizer, msgs, gen)
            except Exception:  # templates may refuse a probe, e.g. no system role
                continue
            pieces = re.split(r"@@EDGEKIT\d+@@", text)
            if len(pieces) != len(roles) + 1:
                continue
            _put(chat["start"], roles[0], pieces[0])
            for prev, cur, piece in zip(roles, roles[1:], pieces[1:-1]):
                _put(chat["joint"], f"{prev}>{cur}", piece)
            _put(chat["generation" if gen else "end"], roles[-1], pieces[-1])
    for check in CHECKS:
        msgs = [{"role": r, "content": c} for r, c in check]
        try:
            want = _render(tokenizer, msgs, True)
        except Exception:
            continue
        try:
            got = device_chat.render(chat, msgs)
        except device_chat.ChatFormatError as e:
            got = f"<{e}>"
        if got != want:
            raise ExportError(
                "this model's chat template does not reduce to per-message pieces "
                f"(rebuilt {got!r}, template gives {want!r}); export without chat support is not implemented"
            )
    return chat


def _put(table: dict, key: str, value: str) -> None:
    if table.setdefault(key, value) != value:
        raise ExportError(f"this model's chat template puts different text at {key!r} in different "
                          f"conversations ({table[key]!r} vs {value!r}); it cannot be run without Jinja")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
