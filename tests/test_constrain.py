"""Constrained generation: the output follows a JSON schema, a regex or a grammar, always.

A tiny random model sampled at temperature 1 wants to write anything, which is the hardest test
of a constraint: whatever it is, the text must parse and validate (jsonschema) unless a limit cut
it short, and then the completion says so (valid is False, finish_reason names the limit).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgekit.device import Model
from edgekit.device.constrain import ENFORCED_FORMATS, ConstraintError, repeats_a_key

ARM = {"type": "object", "properties": {
    "action": {"enum": ["pick", "place", "home", "stop"]},
    "object": {"type": "string", "maxLength": 24},
    "speed": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["action", "object"], "additionalProperties": False}

SCHEMAS = {
    "enum and bounded number": ARM,
    "nested objects": {"type": "object", "properties": {
        "target": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -500, "maximum": 500},
                                                    "y": {"type": "integer", "minimum": -500, "maximum": 500}},
                   "required": ["x", "y"], "additionalProperties": False},
        "gripper": {"enum": ["open", "closed"]}}, "required": ["target", "gripper"], "additionalProperties": False},
    "array of enums": {"type": "object", "properties": {
        "steps": {"type": "array", "items": {"enum": ["up", "down", "left", "right"]}, "minItems": 1, "maxItems": 4}},
        "required": ["steps"], "additionalProperties": False},
    "optional fields and booleans": {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 10}, "count": {"type": "integer"}},
        "required": ["ok"], "additionalProperties": False},
    "a bare enum": {"enum": ["yes", "no", "maybe"]},
}


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return Model(tiny_bundle)


@pytest.mark.parametrize("name", SCHEMAS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_output_parses_and_validates_against_the_schema(name, seed, model):
    schema = SCHEMAS[name]
    done = model.generate("The robot", json_schema=schema, max_new_tokens=120, temperature=1.0, seed=seed)
    assert done.valid is True, (done.text, done.finish_reason)
    jsonschema.validate(json.loads(done.text), schema)


def test_a_schema_may_be_given_as_json_text(model):
    done = model.generate("x", json_schema=json.dumps(ARM), max_new_tokens=60, temperature=1.0, seed=3)
    jsonschema.validate(json.loads(done.text), ARM)


def test_forced_tokens_are_fed_in_one_run(model):
    """{"action":" is fixed by the schema: the model never runs a step per forced token."""
    done = model.generate("The robot", json_schema=ARM, max_new_tokens=80, temperature=1.0, seed=0)
    assert done.stats.decode_tokens > len(done.stats.decode_s)


def test_a_regex_is_matched_whole(model):
    pattern = r"(left|right) [0-9]{1,3} (mm|cm)"
    for seed in range(3):
        done = model.generate("Move", regex=pattern, max_new_tokens=20, temperature=1.0, seed=seed)
        assert done.valid and re.fullmatch(pattern, done.text), done.text


def test_a_lark_grammar_is_followed(model):
    grammar = 'start: "move " DIR " " NUM " mm"\nDIR: "left" | "right"\nNUM: /[1-9][0-9]?/'
    done = model.generate("Go", grammar=grammar, max_new_tokens=20, temperature=1.0, seed=5)
    assert done.valid and re.fullmatch(r"move (left|right) [1-9][0-9]? mm", done.text), done.text


def test_a_cut_off_answer_is_reported_incomplete_never_as_valid(model):
    done = model.generate("The robot", json_schema=ARM, max_new_tokens=4, temperature=1.0, seed=0)
    assert done.finish_reason == "length" and done.valid is False
    with pytest.raises(json.JSONDecodeError):
        json.loads(done.text)


@pytest.mark.parametrize("spec", [dict(json_schema={"type": "integer"}), dict(regex="[a-z ]+"),
                                  dict(json_schema=True)])
def test_text_the_grammar_could_go_on_from_is_valid_only_when_the_model_ended_it(spec, model):
    """'12' is an integer, but as the first 2 tokens of '1234567' it is not the answer: a limit cut it.
    (JSON Schema's `true` takes any JSON value: 'false' is whole, '12' is not.)"""
    for seed in range(4):
        cut = model.generate("Robot:", **spec, max_new_tokens=3, temperature=1.0, seed=seed)
        whole = spec.get("json_schema") is True and cut.text in ("true", "false", "null")
        assert cut.valid is (cut.finish_reason == "eos" or whole), cut
    eos = next(iter(model.eos_token_ids))
    ended = model.generate("Robot:", **spec, max_new_tokens=30, temperature=1.0, seed=0, logit_bias={eos: 100})
    assert ended.finish_reason == "eos" and ended.valid is True and ended.text, ended
    if "regex" not in spec:
        json.loads(ended.text)


def test_json_that_names_a_key_twice_is_not_valid(model):
    """llguidance tracks only the properties a schema names: under patternProperties the model may
    repeat a key, and json.loads keeps one, so minProperties 2 is not met."""
    schema = {"type": "object", "patternProperties": {"^[ab]$": {"type": "integer", "minimum": 0, "maximum": 9}},
              "additionalProperties": False, "minProperties": 2, "maxProperties": 2}
    outcomes = [model.generate("JSON:", json_schema=schema, temperature=1.0, seed=seed, max_new_tokens=40)
                for seed in range(20)]
    for done in outcomes:
        if done.valid:
            jsonschema.validate(json.loads(done.text), schema)
    assert any(done.finish_reason == "eos" and not done.valid for done in outcomes)  # repeats were made and caught


@pytest.mark.parametrize("kwargs, says", [
    (dict(json_schema={"type": "nonsense"}), "Invalid type"),
    (dict(json_schema="{not json"), "not valid JSON"),
    (dict(json_schema=[1, 2]), "json_schema must be a JSON object"),
    (dict(regex="[a-z"), "unclosed character class"),
    (dict(grammar="start: undefined_rule"), "undefined_rule"),
    (dict(json_schema=ARM, regex="a"), "at most one of json_schema, regex and grammar"),
    (dict(json_schema={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}), "nowhere"),
    (dict(json_schema='{"maxLength": ' + "9" * 5000 + "}"), "not valid JSON"),  # Python's 4300-digit limit
    (dict(regex="a\udcff"), "regex is not valid Unicode text"),  # invalid UTF-8 from argv
    (dict(grammar='start: "\udcff"'), "grammar is not valid Unicode text"),
    (dict(regex="[^\\x00-\\U0010ffff]"), "no text satisfies this constraint"),  # was "" and valid
    (dict(grammar="start: a\na: a"), "no text satisfies this constraint"),
    (dict(json_schema=False), "the JSON schema false admits no value"),
])
def test_a_schema_that_cannot_be_used_is_one_error_before_any_generation(kwargs, says, model):
    cached = list(model._cached_ids)
    with pytest.raises(ConstraintError, match=re.escape(says)):
        model.stream("The robot", **kwargs)
    assert model._cached_ids == cached  # nothing ran


@pytest.mark.parametrize("kind", ["regex", "json const", "grammar", "in the middle"])
def test_a_constraint_that_spells_a_special_token_is_refused_before_any_generation(kind, model):
    """A special token is not text: llguidance forced it (from the text's tokenization), then refused it."""
    special = [t.content for t in model.tokenizer.get_added_tokens_decoder().values() if t.special]
    assert len(special) >= 3
    for token in special:
        spec = {"regex": dict(regex=re.escape(token)), "json const": dict(json_schema={"const": token}),
                "grammar": dict(grammar=f"start: {json.dumps(token)}"),
                "in the middle": dict(regex="go " + re.escape(token) + " now")}[kind]
        cached = list(model._cached_ids)
        with pytest.raises(ConstraintError, match=re.escape(f"spells the special token {token!r}")):
            model.stream("The robot", **spec)
        assert model._cached_ids == cached


# every format JSON Schema 2020-12 defines, OpenAPI's, and those pydantic writes (Path, Json, SecretStr, bytes)
FORMATS = ["date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname", "ipv4", "ipv6",
           "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template", "json-pointer",
           "relative-json-pointer", "regex", "int32", "int64", "float", "double", "byte", "binary", "password",
           "path", "file-path", "directory-path", "json-string", "multi-host-uri"]


def test_enforced_formats_are_the_ones_the_installed_llguidance_enforces(model):
    from llguidance import LLMatcher

    def enforced(name: str) -> bool:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps({"type": "string", "format": name}))
        return not LLMatcher.validate_grammar(grammar, model.guide_tokenizer)

    assert {f for f in FORMATS if enforced(f)} == ENFORCED_FORMATS


@pytest.mark.parametrize("fmt", sorted(set(FORMATS) - ENFORCED_FORMATS))
def test_a_format_llguidance_does_not_enforce_is_an_annotation(fmt, model, caplog):
    """Refused before ("Unknown format: int32"): an OpenAPI or pydantic schema failed whole."""
    schema = {"type": "object", "properties": {
        "id": {"type": "string", "format": fmt, "maxLength": 6},
        "tags": {"type": "array", "items": {"type": "string", "format": fmt, "maxLength": 4}, "maxItems": 2},
        "format": {"enum": ["png", "jpg"]}},  # a property named "format" is not the keyword
        "required": ["id", "tags", "format"], "additionalProperties": False}
    done = model.generate("Robot:", json_schema=schema, max_new_tokens=60, temperature=1.0, seed=0)
    if done.valid:
        jsonschema.validate(json.loads(done.text), schema)  # jsonschema treats format as an annotation too
    else:
        assert done.finish_reason == "length"
    assert done.text.startswith('{"id":')
    assert f"format {fmt} not enforced" in caplog.text


def test_an_enforced_format_constrains_the_text(model):
    done = model.generate("Robot:", json_schema={"type": "string", "format": "date"}, max_new_tokens=20,
                          temperature=1.0, seed=0)
    assert done.valid and re.fullmatch(r'"\d{4}-\d{2}-\d{2}"', done.text)


def test_hostile_schemas_compile_or_are_refused_quickly(model):
    huge_enum = {"enum": [f"item-{i}" for i in range(5000)]}
    done = model.generate("x", json_schema=huge_enum, max_new_tokens=20, temperature=1.0, seed=0)
    assert done.valid and json.loads(done.text) in huge_enum["enum"]
    deep: dict = {"type": "integer"}
    for _ in range(60):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"], "additionalProperties": False}
    done = model.generate("x", json_schema=deep, max_new_tokens=400, temperature=1.0, seed=0)
    assert done.valid is True and jsonschema.validate(json.loads(done.text), deep) is None
    nested_json = "[" * 100000 + "]" * 100000
    with pytest.raises(ConstraintError):
        model.stream("x", json_schema=nested_json)


# -- the class: any schema built from the pieces a robot's command uses --------------------------

LEAVES = st.one_of(
    st.lists(st.text(alphabet="abcdefghij", min_size=1, max_size=6), min_size=1, max_size=5, unique=True)
    .map(lambda vals: {"enum": vals}),
    st.tuples(st.integers(-100, 0), st.integers(0, 100)).map(lambda b: {"type": "integer", "minimum": b[0],
                                                                         "maximum": b[1]}),
    st.just({"type": "boolean"}),
    st.integers(1, 8).map(lambda n: {"type": "string", "maxLength": n}),
)


def objects(children):
    return st.dictionaries(st.text(alphabet="xyzuvw", min_size=1, max_size=4), children, min_size=1, max_size=3) \
        .flatmap(lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {"type": "object", "properties": props, "required": req, "additionalProperties": False}))


def keyed_by_pattern(children):  # keys the schema does not name, which the model may repeat
    return st.tuples(children, st.integers(0, 2)).map(lambda c: {
        "type": "object", "patternProperties": {"^[ab]$": c[0]}, "additionalProperties": False,
        "minProperties": c[1], "maxProperties": 2})


SCHEMA = st.recursive(LEAVES, lambda children: st.one_of(
    objects(children), keyed_by_pattern(children),
    children.map(lambda item: {"type": "array", "items": item, "maxItems": 3})), max_leaves=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(schema=SCHEMA, seed=st.integers(0, 10_000))
# found by this test: max_new_tokens ran out where the grammar forces "}]", and the forced tokens
# it cut off the text had been consumed by the grammar, so the cut text was called valid
@example(schema={"type": "array", "maxItems": 3, "items": {
    "type": "object", "properties": {"vw": {"enum": ["a", "aaeba"]}, "u": {"type": "boolean"},
                                     "vuuu": {"type": "boolean"}},
    "required": ["u", "vuuu", "vw"], "additionalProperties": False}}, seed=182)
def test_any_schema_of_this_kind_gives_valid_json_or_says_it_is_incomplete(schema, seed, model):
    done = model.generate("Robot:", json_schema=schema, max_new_tokens=60, temperature=1.0, seed=seed)
    if done.valid:
        jsonschema.validate(json.loads(done.text), schema)
    else:
        assert done.finish_reason in ("length", "context") or repeats_a_key(done.text)


def test_a_stop_string_that_cuts_a_constrained_answer_leaves_it_invalid(model):
    schema = {"enum": ["abcabc"]}
    whole = model.generate("Robot:", json_schema=schema, max_new_tokens=20)
    assert whole.valid and whole.text == '"abcabc"'
    cut = model.generate("Robot:", json_schema=schema, max_new_tokens=20, stop=["ca"])
    assert (cut.text, cut.finish_reason, cut.valid) == ('"ab', "stop", False)


def test_command_line_constrains_and_says_when_the_answer_is_cut(tiny_bundle, tmp_path):
    from test_cli import assert_one_line_error, edgekit

    (tmp_path / "arm.json").write_text(json.dumps(ARM))
    r = edgekit("generate", tiny_bundle, "The robot", "--json-schema", tmp_path / "arm.json", "--temperature", "1",
                "--seed", "0", "--max-new-tokens", "80")
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), ARM)
    r = edgekit("generate", tiny_bundle, "The robot", "--json-schema", tmp_path / "arm.json", "--max-new-tokens", "3")
    assert r.returncode == 3 and "does not follow the schema or grammar: cut at --max-new-tokens" in r.stderr
    (tmp_path / "bad.json").write_text('{"type": "nonsense"}')
    assert_one_line_error(edgekit("generate", tiny_bundle, "x", "--json-schema", tmp_path / "bad.json"),
                          "Invalid type")
    assert_one_line_error(edgekit("generate", tiny_bundle, "x", "--regex", "[a-z"), "unclosed character class")
