"""Chat formatting on the device, without a template engine.

At export the host renders the model's own Jinja chat template with placeholder
messages and cuts the result into the text that the template puts around each
message (see host/chat_format.py, which also checks that rebuilding conversations
from these pieces gives exactly what the template gives). A conversation
r1: c1, r2: c2, ..., rn: cn then renders as

    start[r1] + c1 + joint["r1>r2"] + c2 + ... + cn + (generation[rn] or end[rn])
"""

from __future__ import annotations

from collections.abc import Sequence


class ChatFormatError(ValueError):
    """A conversation that this bundle's chat template cannot render."""


def render(chat: dict, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The text the model's chat template gives for `messages` ({"role", "content"} dicts)."""
    if not messages:
        raise ChatFormatError("a conversation needs at least one message")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatFormatError(f"each message must be {{'role': str, 'content': str}}, got {m!r}")
    roles = [m["role"] for m in messages]

    def piece(table: str, key: str) -> str:
        try:
            return chat[table][key]
        except KeyError:
            raise ChatFormatError(
                f"this model's chat template has no form for {key!r} ({table}); "
                f"it supports roles {sorted(chat['start'])} and turns {sorted(chat['joint'])}"
            ) from None

    out = [piece("start", roles[0]), messages[0]["content"]]
    for prev, m in zip(roles, messages[1:]):
        out += [piece("joint", f"{prev}>{m['role']}"), m["content"]]
    out.append(piece("generation" if add_generation_prompt else "end", roles[-1]))
    return "".join(out)
