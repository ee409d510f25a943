"""Constrained output over MQTT: OpenAI-shaped response_format, regex, grammar and tools in a request,
answered by a real service through a real Mosquitto."""

from __future__ import annotations

import json

import jsonschema
import pytest
from test_tools import TOOLS

from edgekit.device.mqtt import Client, RequestError
from edgekit.device.mqtt import protocol as proto

ACTION = {"type": "object", "properties": {"action": {"enum": ["pick", "place", "home", "stop"]},
                                           "object": {"type": ["string", "null"], "maxLength": 20}},
          "required": ["action", "object"], "additionalProperties": False}


def test_response_formats_regex_and_tools_are_answered_within_their_constraint(broker, serve):  # noqa: F811
    serve(broker.config())
    ask = [{"role": "user", "content": "Pick up the red cube"}]
    with Client(broker.config(), device_id="arm-01", timeout=30) as client:
        a = client.ask(ask, temperature=1.0, seed=0, max_new_tokens=60,
                       response_format={"type": "json_schema", "json_schema": {"name": "action", "schema": ACTION}})
        jsonschema.validate(json.loads(a.text), ACTION)
        assert a.valid is True
        b = client.ask(ask, temperature=1.0, seed=1, max_new_tokens=60, response_format={"type": "json_object"})
        assert b.text.startswith("{")  # any object: a random model may still be writing a key when the limit comes
        assert isinstance(json.loads(b.text), dict) if b.valid else b.finish_reason == "length"
        c = client.ask(ask, temperature=1.0, seed=2, max_new_tokens=10, regex="(pick|place) [a-z]{2,8}")
        assert c.valid is True and c.text.split()[0] in ("pick", "place")
        d = client.ask(ask, temperature=1.0, seed=3, max_new_tokens=60, tools=TOOLS, tool_choice="required")
        assert d.finish_reason == "tool_calls" and d.tool_calls[0]["function"]["name"] in ("move_arm", "grip")
        e = client.ask(ask, temperature=1.0, seed=0, max_new_tokens=3,
                       response_format={"type": "json_schema", "json_schema": {"schema": ACTION}})
        assert e.valid is False and e.finish_reason == "length"  # cut short: said, never passed as valid


@pytest.mark.parametrize("settings, code, says", [
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}),
     proto.SCHEMA, "Invalid type"),
    (dict(regex="[a-z"), proto.SCHEMA, "unclosed character class"),
    (dict(tools=[{"type": "function"}]), proto.SCHEMA, "tools[0] must be"),
    (dict(regex="<\\|im_end\\|>"), proto.SCHEMA, "spells the special token '<|im_end|>'"),  # was "internal"
    (dict(grammar="start: a\na: a"), proto.SCHEMA, "no text satisfies this constraint"),  # was "" called valid
])
def test_a_schema_the_device_cannot_compile_is_answered_invalid_schema(settings, code, says, broker,  # noqa: F811
                                                                       serve):  # noqa: F811
    serve(broker.config())
    with Client(broker.config(), device_id="arm-01", timeout=30) as client:
        with pytest.raises(RequestError) as e:
            client.ask("x", max_new_tokens=5, **settings) if "tools" not in settings else \
                client.ask([{"role": "user", "content": "x"}], max_new_tokens=5, **settings)
    assert e.value.code == code and says in e.value.message


@pytest.mark.parametrize("raw, says", [
    ({"response_format": {"type": "yaml"}}, "response_format\".type must be one of"),
    ({"response_format": {"type": "json_schema"}}, 'needs "json_schema": {"schema": {...}}'),
    ({"response_format": {"type": "json_object"}, "regex": "a"}, "at most one of"),
    ({"tool_choice": "auto"}, '"tool_choice" goes with "tools"'),
    ({"regex": 3}, '"regex" must be a string'),
])
def test_malformed_constraint_fields_are_invalid_requests(raw, says):
    with pytest.raises(proto.ProtocolError) as e:
        proto.request_from_dict({"v": 1, "prompt": "x", **raw})
    assert e.value.code == proto.INVALID and says in str(e.value)
