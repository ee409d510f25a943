"""Tool calls: the model picks a function and its arguments, produced under constraint.

Tools are OpenAI-shaped ({"type": "function", "function": {"name", "description", "parameters"}});
a call is the JSON object {"name": ..., "arguments": {...}}, constrained so that the name is one
of the tools and the arguments follow that tool's parameters schema. A chat template that asks
for {"name": ..., "parameters": {...}} (Llama 3.1-3.3's) gets its own key (`arguments_key`). The completion then carries
OpenAI-shaped tool_calls:

    [{"id": "k3Xq0B7aZ", "type": "function", "function": {"name": "move_arm", "arguments": "{\\"x\\":1}"}}]

The arguments are the model's own JSON text, byte for byte (a number is not re-encoded); an id is
9 letters and digits, new for every call (Mistral's templates refuse any other).

tool_choice: "required" (a call, always), "auto" (a call, or text that does not start with "{"),
"none" (text), or {"type": "function", "function": {"name": N}} (a call of N).
"""

from __future__ import annotations

import json
import secrets
import string

from edgekit.device.chat import ChatFormatError
from edgekit.device.constrain import DESCEND, ConstraintError, Spec, annotated_formats_dropped, rewrite_schema

CHOICES = ("auto", "required", "none")


def check_tools(tools: object) -> list[dict]:
    """`tools` as a list of OpenAI function tools; ConstraintError naming what is wrong."""
    if not isinstance(tools, list) or not tools:
        raise ConstraintError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    names = []
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ConstraintError(f"tools[{k}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ConstraintError(f"tools[{k}].function.name must be a non-empty string")
        if not isinstance(fn.get("parameters", {}), dict):
            raise ConstraintError(f"tools[{k}].function.parameters must be a JSON schema object")
        names.append(fn["name"])
    if len(set(names)) != len(names):
        twice = sorted(n for n in set(names) if names.count(n) > 1)
        raise ConstraintError(f"two tools share a name: {', '.join(twice)}")
    return tools


def arguments_key(template: str | None) -> str:
    """The key a call's arguments go under: "parameters" for a chat template that writes calls that way
    and never quotes "arguments" (Llama 3.1-3.3: the model was trained on it), else "arguments"."""
    if template and '"parameters"' in template and '"arguments"' not in template:
        return "parameters"
    return "arguments"


def call_schema(tools: list[dict], only: str | None = None, key: str = "arguments") -> dict:
    """The JSON schema of one call to one of `tools` (or to the tool named `only`).

    A call wraps its tool's parameters schema, so the refs in it that start at its root ("#",
    "#/$defs/Point", as pydantic writes them) are moved to where the schema now lies:

        {"$defs": {"tool0": <parameters>},
         "anyOf": [{"properties": {"name": {"const": N}, "arguments": {"$ref": "#/$defs/tool0"}}, ...}, ...]}
    """
    options, defs = [], {}
    for k, tool in enumerate(tools):
        fn = tool["function"]
        if only is None or fn["name"] == only:
            try:
                defs[f"tool{k}"] = _rebased(fn.get("parameters") or {"type": "object", "properties": {}},
                                            f"#/$defs/tool{k}")
            except ConstraintError:  # nested too deeply to walk
                raise ConstraintError(f"tools[{k}].function.parameters is nested too deeply") from None
            options.append({"type": "object", "properties": {
                "name": {"const": fn["name"]}, key: {"$ref": f"#/$defs/tool{k}"}},
                "required": ["name", key], "additionalProperties": False})
    if not options:
        raise ConstraintError(f"tool_choice names {only!r}, which is not one of the tools")
    return {"$defs": defs, **(options[0] if len(options) == 1 else {"anyOf": options})}


def _rebased(schema: object, root: str) -> object:
    """`schema` with every local "$ref" ("#...") pointing below `root` instead of the document's root."""
    def keyword(key: str, value: object) -> object:
        return root + value[1:] if key == "$ref" and isinstance(value, str) and value.startswith("#") else DESCEND

    return rewrite_schema(schema, keyword)


def constraint_for(tools: list[dict], tool_choice: object = "auto", key: str = "arguments") -> Spec | None:
    """What the output must follow for `tool_choice`, a call's arguments under `key`; None for "none"."""
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise ConstraintError('tool_choice must be "auto", "required", "none" or '
                                  '{"type": "function", "function": {"name": ...}}')
        return Spec(json_schema=call_schema(tools, only=name, key=key))
    if tool_choice not in CHOICES:
        raise ConstraintError(f"tool_choice must be one of {', '.join(CHOICES)} or a function, got {tool_choice!r:.60}")
    if tool_choice == "none":
        return None
    schema = call_schema(tools, key=key)
    if tool_choice == "required":
        return Spec(json_schema=schema)
    # auto: a call (compact, as json_schema= is), or an answer in words that does not start like a JSON
    # object; it may start with a space: a SentencePiece model's first word is "▁The"
    schema = annotated_formats_dropped(schema)
    schema["x-guidance"] = {"whitespace_flexible": False}
    return Spec(grammar=f"start: call | answer\ncall: %json {json.dumps(schema)}\nanswer: /\\s*[^{{\\s](.|\\n)*/")


def parse_calls(text: str, key: str = "arguments") -> list[dict] | None:
    """OpenAI-shaped tool_calls when `text` is a call, else None (an answer in words).

    `text` is what call_schema's constraint let through: {"name":...,key:...}, compact, in that
    order; the arguments are passed on as the model wrote them."""
    if not text.lstrip().startswith("{"):
        return None
    decode = json.JSONDecoder().raw_decode
    head = '{"name":'
    assert text.startswith(head), text[:40]
    name, end = decode(text, len(head))
    sep = f',"{key}":'
    start = end + len(sep)
    assert text[end:start] == sep and text.endswith("}"), text[:80]
    _, stop = decode(text, start)
    return [{"id": call_id(), "type": "function", "function": {"name": name, "arguments": text[start:stop]}}]


def call_id() -> str:
    """A new call id: 9 letters and digits (Mistral's templates refuse any other shape)."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def instructions(tools: list[dict]) -> str:
    """What a model whose chat template knows no tools is told."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return ("You can call these functions:\n" + listing + "\nTo call one, answer with only the JSON "
            '{"name": <function name>, "arguments": <its arguments>}.')


def told(messages: list[dict], tools: list[dict], role: str) -> list[dict]:
    """`messages` with `instructions(tools)` in the system message (added if there is none: `role`
    "system"), or at the start of the first user message (`role` "user": for a template that has
    no system role, as Mistral 0.1's and Gemma's)."""
    text, messages = instructions(tools), list(messages)
    if role == "system" and messages[0]["role"] != "system":
        return [{"role": "system", "content": text}, *messages]
    k = next((i for i, m in enumerate(messages) if m["role"] == role), 0)
    content = messages[k]["content"] or ""
    messages[k] = {**messages[k], "content": content + "\n\n" + text if role == "system" else text + "\n\n" + content}
    return messages


def earlier_calls(messages: list[dict], template_knows_tools: bool) -> list[dict]:
    """`messages` with the assistant's earlier `tool_calls` (OpenAI-shaped) as the template reads them.

    A template that knows tools writes a call's arguments with `tojson`, so it gets them as an
    object (OpenAI sends JSON text, which would be encoded twice); one that knows none would drop
    the calls, so they become the assistant's text, as the JSON the model was told to answer."""
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        if calls:
            if not isinstance(calls, list) or not all(_is_call(c) for c in calls):
                raise ChatFormatError(f"messages[{i}].tool_calls must be a list of "
                                      '{"type": "function", "function": {"name": str, "arguments": JSON text}}')
            if template_knows_tools:
                m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": _as_object(
                    c["function"]["arguments"])}} for c in calls]}
            else:
                m = {**m, "content": (m.get("content") or "") + "".join(
                    '{"name":' + json.dumps(c["function"]["name"], ensure_ascii=False) + ',"arguments":'
                    + (c["function"]["arguments"] if isinstance(c["function"]["arguments"], str)
                       else json.dumps(c["function"]["arguments"], ensure_ascii=False)) + "}" for c in calls)}
        out.append(m)
    return out


def _is_call(call: object) -> bool:
    fn = call.get("function") if isinstance(call, dict) else None
    return isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), (str, dict))


def _as_object(arguments: str | dict) -> object:
    """JSON text of arguments as the value it writes; text that is not JSON stays as it is."""
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except (ValueError, RecursionError):
        return arguments
