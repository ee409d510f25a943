"""Tool calls: the model picks a function and its arguments, produced under constraint.

Tools are OpenAI-shaped ({"type": "function", "function": {"name", "description", "parameters"}});
a call is the JSON object {"name": ..., "arguments": {...}}, constrained so that the name is one
of the tools and the arguments follow that tool's parameters schema. The completion then carries
OpenAI-shaped tool_calls:

    [{"id": "call_0", "type": "function", "function": {"name": "move_arm", "arguments": "{\\"x\\":1}"}}]

tool_choice: "required" (a call, always), "auto" (a call, or text that does not start with "{"),
"none" (text), or {"type": "function", "function": {"name": N}} (a call of N).
"""

from __future__ import annotations

import json

from edgekit.device.constrain import ConstraintError, Spec

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


def call_schema(tools: list[dict], only: str | None = None) -> dict:
    """The JSON schema of one call to one of `tools` (or to the tool named `only`)."""
    options = []
    for tool in tools:
        fn = tool["function"]
        if only is None or fn["name"] == only:
            options.append({"type": "object", "properties": {
                "name": {"const": fn["name"]},
                "arguments": fn.get("parameters") or {"type": "object", "properties": {}}},
                "required": ["name", "arguments"], "additionalProperties": False})
    if not options:
        raise ConstraintError(f"tool_choice names {only!r}, which is not one of the tools")
    return options[0] if len(options) == 1 else {"anyOf": options}


def constraint_for(tools: list[dict], tool_choice: object = "auto") -> Spec | None:
    """What the output must follow for `tool_choice`; None for "none"."""
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise ConstraintError('tool_choice must be "auto", "required", "none" or '
                                  '{"type": "function", "function": {"name": ...}}')
        return Spec(json_schema=call_schema(tools, only=name))
    if tool_choice not in CHOICES:
        raise ConstraintError(f"tool_choice must be one of {', '.join(CHOICES)} or a function, got {tool_choice!r:.60}")
    if tool_choice == "none":
        return None
    schema = call_schema(tools)
    if tool_choice == "required":
        return Spec(json_schema=schema)
    # auto: a call, or an answer in words that does not start like a JSON object
    return Spec(grammar=f"start: call | answer\ncall: %json {json.dumps(schema)}\nanswer: /[^{{\\s](.|\\n)*/")


def parse_calls(text: str) -> list[dict] | None:
    """OpenAI-shaped tool_calls when `text` is a call, else None (an answer in words)."""
    if not text.lstrip().startswith("{"):
        return None
    call = json.loads(text)
    return [{"id": "call_0", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}]


def instructions(tools: list[dict]) -> str:
    """What a model whose chat template knows no tools is told (as a system message)."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return ("You can call these functions:\n" + listing + "\nTo call one, answer with only the JSON "
            '{"name": <function name>, "arguments": <its arguments>}.')
