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


def check_call(call: dict, tools: list[dict] = TOOLS) -> None:
    assert call["type"] == "function" and re.fullmatch("[A-Za-z0-9]{9}", call["id"])  # as Mistral's templates need
    tool = next(t for t in tools if t["function"]["name"] == call["function"]["name"])
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


@pytest.mark.parametrize("seed", range(3))
def test_an_auto_call_is_compact_json_as_a_required_one_is(seed, model):
    """The model is pushed to open a call and to write spaces: the grammar leaves it no room for them."""
    space, brace = model.tokenizer.token_to_id("Ġ"), model.tokenizer.token_to_id("{")
    done = model.generate(ASK, tools=TOOLS, temperature=1.0, seed=seed, max_new_tokens=60,
                          logit_bias={brace: 30, space: 10})
    assert done.text.startswith('{"name":"') and done.valid, done.text
    check_call(done.tool_calls[0])


P = {"type": "integer", "minimum": 0, "maximum": 9}
NESTED = [{"type": "function", "function": {"name": "plan", "parameters": {  # refs from the parameters' root
    "$defs": {"At": {"type": "object", "properties": {"x": P, "y": P}, "required": ["x", "y"]}},
    "type": "object", "required": ["to", "then"],
    "properties": {"to": {"$ref": "#/$defs/At"}, "then": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}}}},
    {"type": "function", "function": {"name": "say", "parameters": {  # another tool's $defs of the same name
        "$defs": {"At": {"enum": ["hi", "bye"]}}, "properties": {"text": {"$ref": "#/$defs/At"}},
        "required": ["text"]}}}]


@pytest.fixture(scope="module")
def roomy(make_tiny, tmp_path_factory):
    """A tiny model with room (1024 positions) for long tool listings."""
    from edgekit.host import export

    folder, _ = make_tiny("llama", max_position_embeddings=1024)
    return Model(export(folder, tmp_path_factory.mktemp("roomy"), progress=lambda _: None))


def test_refs_in_a_tools_parameters_resolve_in_those_parameters(roomy):
    """pydantic's model_json_schema() writes "$defs" and "$ref": they were resolved against the call around them."""
    valid = 0
    for seed in range(8):
        done = roomy.generate(ASK, tools=NESTED, tool_choice="required", temperature=1.0, seed=seed, max_new_tokens=50)
        if done.valid:
            check_call(done.tool_calls[0], NESTED)
            valid += 1
        else:
            assert done.finish_reason in ("length", "context")
    assert valid >= 1  # some calls end within 50 tokens (2-4 of 8, by the machine's rounding)


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_a_tool_whose_parameters_carry_formats_llguidance_does_not_enforce_is_usable(choice, model):
    tools = [{"type": "function", "function": {"name": "save_map", "parameters": {  # as pydantic writes a Path
        "type": "object", "properties": {"path": {"type": "string", "format": "path", "maxLength": 12},
                                         "x": {"type": "integer", "format": "int32"}},
        "required": ["path", "x"], "additionalProperties": False}}}]
    for seed in range(3):
        done = model.generate(ASK, tools=tools, tool_choice=choice, temperature=1.0, seed=seed, max_new_tokens=40)
        for call in done.tool_calls or []:
            check_call(call, tools)


def test_the_arguments_are_the_text_the_model_wrote(model):
    """Not parsed and encoded again: a number past a double's range stays JSON, 1.000 stays 1.000."""
    tools = [{"type": "function", "function": {"name": "set_speed", "parameters": {
        "type": "object", "properties": {"speed": {"type": "number"}}, "required": ["speed"],
        "additionalProperties": False}}}]
    for seed in range(12):
        done = model.generate(ASK, tools=tools, tool_choice="required", temperature=1.0, seed=seed, max_new_tokens=40)
        if done.valid:
            arguments = done.tool_calls[0]["function"]["arguments"]
            assert done.text == '{"name":"set_speed","arguments":' + arguments + "}"
            json.loads(arguments, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    ids = {model.generate(ASK, tools=TOOLS, tool_choice="required", max_new_tokens=60).tool_calls[0]["id"]
           for _ in range(3)}
    assert len(ids) == 3  # a new id for every call


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


# Templates as real models write them: one that lists tools and writes earlier calls (Qwen 2.5's
# way: `arguments | tojson`), and one with no system role and no tools (Mistral 0.1, Gemma)
WITH_TOOLS = """{%- if tools %}<|im_start|>system
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.content %}{{ m.content }}{% endif %}{% for call in m.tool_calls or [] %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
NO_SYSTEM = """{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}\
{% endif %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Llama 3.1-3.3's way: the model is told to answer {"name", "parameters"} and earlier calls are written so
LLAMA31 = """{%- if tools %}<|im_start|>system
Call as {"name", "parameters"}.
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}
{% for call in m.tool_calls or [] %}{{ '{"name": "' + call.function.name + '", "parameters": ' }}\
{{- call.function.arguments | tojson }}}{% endfor %}{% if m.content %}{{ m.content }}{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def with_template(template: str, tiny_folder, tmp_path) -> Model:
    from edgekit.host import ExportOptions, export

    (tmp_path / "t.jinja").write_text(template)
    return Model(export(tiny_folder, tmp_path / "b", ExportOptions(chat_template=str(tmp_path / "t.jinja")),
                        progress=lambda _: None))


@pytest.mark.parametrize("seed", range(3))
def test_a_template_that_asks_for_parameters_gets_its_calls_written_so(seed, tiny_folder, tmp_path):
    model = with_template(LLAMA31, tiny_folder, tmp_path)
    done = model.generate(ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, max_new_tokens=60)
    assert re.match(r'\{"name":"\w+","parameters":\{', done.text), done.text
    check_call(done.tool_calls[0])  # OpenAI-shaped: "arguments", as from any other template


@pytest.mark.parametrize("template", [None, WITH_TOOLS, NO_SYSTEM, LLAMA31],
                         ids=["smollm2", "with-tools", "no-system", "llama-3.1"])
def test_the_openai_tool_loop_runs_on_every_kind_of_template(template, model, tiny_folder, tmp_path):
    """Call, then send the call back (content None, as OpenAI's clients do) with the tool's result."""
    if template is not None:
        model = with_template(template, tiny_folder, tmp_path)
    call = model.generate(ASK, tools=TOOLS, tool_choice="required", max_new_tokens=60).tool_calls[0]
    loop = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": '{"done": true}'}]
    text = model.tokenizer.decode(model.encode(loop, tools=TOOLS), skip_special_tokens=False)
    arguments = call["function"]["arguments"]
    if template in (WITH_TOOLS, LLAMA31):  # the arguments written once, as an object (not their JSON text as a string)
        assert json.dumps(json.loads(arguments)) in text and json.dumps(arguments) not in text
    else:  # the call as the JSON the model was told to answer, the tools in the system or first user message
        assert '{"name":"' + call["function"]["name"] + '","arguments":' + arguments + "}" in text
        assert text.count("answer with only the JSON") == 1
    assert model.generate(loop, tools=TOOLS, max_new_tokens=4).finish_reason in ("length", "eos", "tool_calls")


def test_command_line_prints_the_call(tiny_bundle, tmp_path):
    from test_cli import edgekit

    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    r = edgekit("generate", tiny_bundle, "--chat", "Open the gripper.", "--tools", tmp_path / "tools.json",
                "--tool-choice", "grip", "--temperature", "1", "--seed", "1")
    assert r.returncode == 0, r.stderr
    calls = json.loads(r.stdout)
    assert calls[0]["function"]["name"] == "grip"
    check_call(calls[0])
