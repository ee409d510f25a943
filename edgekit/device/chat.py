"""Chat formatting on the device: the model's own Jinja template, rendered as transformers renders it.

    messages (+ tools, + template variables such as Qwen3's enable_thinking)
        ──► chat_template.jinja in jinja2's sandbox (transformers' filters and globals) ──► prompt text

The bundle ships the template (chat_template.jinja) and the special tokens it refers to
(bos_token, eos_token, ...); export checks that this renderer gives transformers' text byte for
byte (host/chat_format.py). Bundles from edgekit 0.1 carry the template cut into per-message
pieces instead; they render with `_render_pieces`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime

from edgekit.errors import InputError

ROLES_WITHOUT_CONTENT = ("assistant",)  # an assistant turn may carry tool_calls and no text


class ChatFormatError(InputError):
    """A conversation that this bundle's chat template cannot render."""


def render(chat: dict, messages: Sequence[dict], add_generation_prompt: bool = True, *, template: str | None = None,
           tools: list[dict] | None = None, **variables) -> str:
    """The text the model's chat template gives for `messages` ({"role", "content"} dicts), with
    `tools` (OpenAI-shaped function descriptions) and template `variables` passed to the template."""
    check_messages(messages)
    if template is not None:
        return _render_jinja(template, list(messages), add_generation_prompt, tools,
                             {**chat.get("special_tokens", {}), **variables})
    if tools or variables:
        raise ChatFormatError("this bundle (from edgekit 0.1) has no chat template to pass tools or template "
                              "variables to; export it again")
    return _render_pieces(chat, messages, add_generation_prompt)


RENDER_INPUTS = ("chat", "messages", "add_generation_prompt", "template", "tools", "documents")  # render's own


def check_variables(variables: dict) -> None:
    """Template variables (Qwen3's enable_thinking) are named by strings other than what render() passes."""
    bad = next((k for k in variables if not isinstance(k, str) or k in RENDER_INPUTS), None)
    if bad is not None:
        raise ChatFormatError(f"chat_template_kwargs names template variables (strings), and not "
                              f"{', '.join(RENDER_INPUTS)}; got {bad!r:.60}")


def check_messages(messages: Sequence[dict]) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ChatFormatError("a conversation is a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatFormatError(f"each message must be {{'role': str, 'content': str}}, got {m!r:.200}")
        content = m.get("content")
        if not isinstance(content, str) and not (content is None and m["role"] in ROLES_WITHOUT_CONTENT):
            raise ChatFormatError(f"a {m['role']!r} message needs 'content' as a string, got {content!r:.100}")


def _render_jinja(template: str, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None,
                  variables: dict) -> str:
    import jinja2

    try:
        return _compile(template).render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:  # the template's own raise_exception, or a template bug
        raise ChatFormatError(f"the chat template refuses this conversation: {e}") from None
    except Exception as e:  # what the template does with a message it did not expect ('...' + None)
        raise ChatFormatError(f"the chat template cannot render this conversation ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """transformers' chat-template environment: sandboxed, trim_blocks and lstrip_blocks, loop
    controls, its tojson filter (no HTML escaping), raise_exception and strftime_now globals, and
    the {% generation %} tag (which only marks assistant text for training)."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatFormatError(f"the bundle's chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def _render_pieces(chat: dict, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """edgekit 0.1's format: the text the template puts before, between and after messages.

        start[r1] + c1 + joint["r1>r2"] + c2 + ... + cn + (generation[rn] or end[rn])
    """
    roles = [m["role"] for m in messages]

    def piece(table: str, key: str) -> str:
        try:
            return chat[table][key]
        except KeyError:
            raise ChatFormatError(
                f"this model's chat template has no form for {key!r} ({table}); "
                f"it supports roles {sorted(chat['start'])} and turns {sorted(chat['joint'])}"
            ) from None

    out = [piece("start", roles[0]), messages[0]["content"] or ""]
    for prev, m in zip(roles, messages[1:], strict=False):
        out += [piece("joint", f"{prev}>{m['role']}"), m["content"] or ""]
    out.append(piece("generation" if add_generation_prompt else "end", roles[-1]))
    return "".join(out)
