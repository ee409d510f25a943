"""Tool calls: the name is one of the tools, the arguments follow its schema, the structure is OpenAI's."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from edgekit.device import Model
from edgekit.device.constrain import ConstraintError

TOOLS = [
    {"type": "function", "function": {"name": "move_arm", "description": "Move the gripper.", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": -300, "maximum": 300},
                                         "y": {"type": "integer", "minimum": -300, "maximum": 300}},
        "required": ["x", "y"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "grip", "description": "Open or close the gripper.", "parameters": {
        "type": "object", "properties": {"state": {"enum": ["open", "closed"]}}, "required": ["state"],
        "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "Move to x 10, y 20."}]


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return Model(tiny_bundle)


def check_call(call: dict) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_")
    tool = next(t for t in TOOLS if t["function"]["name"] == call["function"]["name"])
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


@pytest.mark.parametrize("seed", range(4))
def test_a_required_call_names_a_tool_and_follows_its_schema(seed, model):
    done = model.generate(ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, max_new_tokens=60)
    assert done.finish_reason == "tool_calls" and len(done.tool_calls) == 1
    check_call(done.tool_calls[0])


def test_a_named_tool_choice_calls_that_tool(model):
    done = model.generate(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "grip"}},
                          temperature=1.0, seed=0, max_new_tokens=40)
    assert done.tool_calls[0]["function"]["name"] == "grip"
    check_call(done.tool_calls[0])


@pytest.mark.parametrize("seed", range(4))
def test_auto_gives_a_valid_call_or_words(seed, model):
    done = model.generate(ASK, tools=TOOLS, temperature=1.0, seed=seed, max_new_tokens=40)
    if done.tool_calls:
        check_call(done.tool_calls[0])
    else:
        assert not done.text.lstrip().startswith("{")


def test_none_leaves_the_answer_free(model):
    done = model.generate(ASK, tools=TOOLS, tool_choice="none", temperature=0.0, max_new_tokens=8)
    assert done.tool_calls is None and done.valid is None


@pytest.mark.parametrize("tools, choice, says", [
    ([{"type": "function"}], "auto", "tools[0] must be"),
    ([TOOLS[0], TOOLS[0]], "auto", "two tools share a name: move_arm"),
    (TOOLS, "sometimes", "tool_choice must be one of"),
    (TOOLS, {"type": "function", "function": {"name": "fly"}}, "'fly', which is not one of the tools"),
    ([], "auto", "non-empty list"),
])
def test_unusable_tools_are_one_error_before_generation(tools, choice, says, model):
    with pytest.raises(ConstraintError, match=re.escape(says)):
        model.stream(ASK, tools=tools, tool_choice=choice)


def test_a_template_without_tools_is_told_about_them_in_a_system_message(model):
    text = model.tokenizer.decode(model.encode(ASK, tools=TOOLS), skip_special_tokens=False)
    assert '"name": "move_arm"' in text and "answer with only the JSON" in text


def test_command_line_prints_the_call(tiny_bundle, tmp_path):
    from test_cli import edgekit

    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    r = edgekit("generate", tiny_bundle, "--chat", "Open the gripper.", "--tools", tmp_path / "tools.json",
                "--tool-choice", "grip", "--temperature", "1", "--seed", "1")
    assert r.returncode == 0, r.stderr
    calls = json.loads(r.stdout)
    assert calls[0]["function"]["name"] == "grip"
    check_call(calls[0])
