"""Property-based tests (hypothesis) of the request parser and of the CLI/runtime boundaries.

Each test states a property for every input of a class, not for a few examples, so a whole class
of malformed input stays closed: arbitrary bytes and JSON values, nesting at any depth, wrong
types (bools where integers are meant), lone surrogates, huge integers, NaN and infinities.
No broker here: tests/test_mqtt_hardening.py sends the same payloads through a real Mosquitto.
"""

from __future__ import annotations

import argparse
import json
import math
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgekit.device.mqtt import protocol as proto
from edgekit.device.sampling import SamplingConfig

# No example database: the checkout stays clean, and a run is what the seed and strategies make it.
PROPERTY = settings(max_examples=400, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BIG = 1 << 20  # a byte limit no test payload reaches, so the parser itself is what is tested
CODES = {proto.INVALID, proto.UNSUPPORTED_VERSION, proto.TOO_LARGE}
FIELDS = ["prompt", "messages", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
          "stop", "stream", "deadline"]

# -- strategies: what a client on the bus can send ------------------------------------

surrogate = st.integers(0xD800, 0xDFFF).map(chr)
# text with a lone surrogate somewhere: what Python makes of invalid UTF-8 (argv, surrogateescape)
text_with_surrogate = st.tuples(st.text(max_size=20), surrogate, st.text(max_size=20)).map("".join)
any_text = st.one_of(st.text(max_size=30), text_with_surrogate)
edge_numbers = st.sampled_from([0, -1, 1, 2, 2**31, 2**63, 2**64, -(2**63), 10**30, 10**400, -(10**400),
                                0.0, -0.0, 1e-300, 5e-324, 1e300, 1.7976931348623157e308, float("nan"),
                                float("inf"), float("-inf"), 0.5, 1.0, 2.0])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(10**500), 10**500),
                    st.floats(allow_nan=True, allow_infinity=True), edge_numbers, any_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(any_text, inner, max_size=4)), max_leaves=12)
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", ""]) | any_text,
                           "content": any_text}),
    json_values), max_size=3)
# a request the device must take: every field within its range
valid_text = st.text(min_size=1, max_size=30)
settings_in_range = {
    "max_new_tokens": st.none() | st.integers(1, 10**6),
    "temperature": st.none() | st.just(0.0) | st.floats(0.01, 100),
    "top_k": st.none() | st.integers(0, 10**6),
    "top_p": st.none() | st.floats(1e-6, 1.0),
    "repetition_penalty": st.none() | st.floats(0.01, 100),
    "seed": st.none() | st.integers(0, 2**63 - 1),
    "stop": st.lists(valid_text, max_size=3),
    "stream": st.booleans(),
    "deadline": st.none() | st.floats(-1e12, 1e12),
}
valid_requests = st.one_of(
    st.builds(proto.Request, prompt=valid_text, **settings_in_range),
    st.builds(proto.Request, messages=st.lists(st.fixed_dictionaries({"role": valid_text, "content": st.text()}),
                                               min_size=1, max_size=3), **settings_in_range))

# a near-valid request: the right fields, each holding anything at all
version = st.sampled_from([1] * 6 + [True, False, 1.0, 0, 2, "1", None, [1]])
field_values = {name: st.one_of(json_values, edge_numbers) for name in FIELDS}
field_values["messages"] = st.one_of(messages, json_values)
field_values["stop"] = st.one_of(st.lists(any_text, max_size=3), json_values)
near_valid = st.fixed_dictionaries({"v": version}, optional={**field_values, "max_tokens": json_values})


def with_field(request: proto.Request, name: str, value) -> dict:
    d = json.loads(request.to_json())
    d[name] = value
    return d


# a valid request with one field (or "v", or an unknown one) changed to anything at all
one_field_off = st.builds(with_field, valid_requests, st.sampled_from(FIELDS + ["v", "max_tokens"]),
                          st.one_of(json_values, edge_numbers, text_with_surrogate))


def encode(obj, ascii_only: bool) -> bytes:
    """JSON as a client would send it; a lone surrogate written raw makes the bytes invalid UTF-8."""
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def nested(depth: int, inside: bool) -> bytes:
    body = b"[" * depth + b"]" * depth
    return b'{"v": 1, "prompt": "hi", "stop": ' + body + b"}" if inside else body


payloads = st.one_of(
    st.binary(max_size=300),
    st.tuples(json_values, st.booleans()).map(lambda t: encode(*t)),
    st.tuples(near_valid, st.booleans()).map(lambda t: encode(*t)),
    st.tuples(one_field_off, st.booleans()).map(lambda t: encode(*t)),
    valid_requests.map(proto.Request.to_json),
    st.tuples(st.integers(1, 200_000), st.booleans()).map(lambda t: nested(*t)),
    st.integers(4000, 60_000).map(lambda n: b'{"v": 1, "prompt": "hi", "seed": ' + b"7" * n + b"}"),
)


def check_refusal(e: proto.ProtocolError) -> None:
    """A refusal is a known code and one short line, and its error reply encodes and decodes."""
    assert e.code in CODES
    message = str(e)
    assert message and "\n" not in message and len(message) < 600, message
    reply = proto.parse_reply(proto.error(e.code, message, "arm-01"))
    assert reply["code"] == e.code and reply["message"] == message


def check_request(r: proto.Request) -> None:
    """What the parser lets through is what the runtime takes: strict types, finite numbers, valid text."""
    assert (r.prompt is None) != (r.messages is None)
    texts = [r.prompt] if r.prompt is not None else [t for m in r.messages for t in (m["role"], m["content"])]
    if r.prompt is not None:
        assert r.prompt
    for t in texts + r.stop:
        assert isinstance(t, str)
        t.encode("utf-8")  # no lone surrogate
    for name in ("max_new_tokens", "top_k", "seed"):
        value = getattr(r, name)
        assert value is None or type(value) is int
    for name in ("temperature", "top_p", "repetition_penalty", "deadline"):
        value = getattr(r, name)
        assert value is None or (type(value) is float and math.isfinite(value))
    assert type(r.stream) is bool
    SamplingConfig(**{k: getattr(r, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
                      if getattr(r, k) is not None})
    assert proto.parse_request(r.to_json(), BIG) == r  # and it survives the trip back onto the wire


# -- the parser ------------------------------------------------------------------------


@PROPERTY
@given(payload=payloads)
@example(payload=b"[" * 100_000)
@example(payload=b'{"v": true, "prompt": "hi"}')
@example(payload=b'{"v": 1, "prompt": "\\udcff"}')
@example(payload=b'{"v": 1, "prompt": ""}')
@example(payload=b'{"v": 1, "prompt": "hi", "temperature": 1e-300}')
@example(payload=b'{"v": 1, "prompt": "hi", "repetition_penalty": 5e-324}')
@example(payload=b'{"v": 1, "prompt": "hi", "deadline": 1' + b"0" * 400 + b"}")
def test_any_payload_gives_a_request_the_runtime_takes_or_a_one_line_refusal(payload):
    try:
        request = proto.parse_request(payload, BIG)
    except proto.ProtocolError as e:
        check_refusal(e)
    else:
        check_request(request)


@PROPERTY
@given(payload=payloads, limit=st.integers(0, 400))
def test_the_byte_limit_is_checked_before_anything_is_decoded(payload, limit):
    try:
        proto.parse_request(payload, limit)
    except proto.ProtocolError as e:
        check_refusal(e)
        if len(payload) > limit:
            assert e.code == proto.TOO_LARGE


@PROPERTY
@given(depth=st.integers(2, 300_000), inside=st.booleans())
@example(depth=1, inside=False)
def test_nesting_at_any_depth_is_refused_as_invalid(depth, inside):
    with pytest.raises(proto.ProtocolError) as e:
        proto.parse_request(nested(depth, inside), 1 << 21)
    assert e.value.code == proto.INVALID
    check_refusal(e.value)


@PROPERTY
@given(name=st.sampled_from(["max_new_tokens", "top_k", "seed", "temperature", "top_p", "repetition_penalty",
                             "deadline", "v"]), value=st.booleans())
def test_a_bool_is_never_taken_for_a_number(name, value):
    request = {"v": 1, "prompt": "hi", name: value}
    with pytest.raises(proto.ProtocolError) as e:
        proto.parse_request(json.dumps(request).encode(), BIG)
    assert e.value.code == proto.INVALID and f'"{name}"' in str(e.value)


@PROPERTY
@given(name=st.sampled_from(["temperature", "top_p", "repetition_penalty", "deadline"]),
       value=st.one_of(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]),
                       st.integers(309, 4000).map(lambda n: "9" * n)))
def test_a_number_that_is_not_finite_as_a_double_is_refused(name, value):
    payload = f'{{"v": 1, "prompt": "hi", "{name}": {value}}}'.encode()
    with pytest.raises(proto.ProtocolError) as e:
        proto.parse_request(payload, BIG)
    assert e.value.code == proto.INVALID and "finite" in str(e.value)


@PROPERTY
@given(where=st.sampled_from(["prompt", "content", "role", "stop"]), text=text_with_surrogate,
       ascii_only=st.booleans())
def test_a_lone_surrogate_in_any_text_is_refused_as_invalid(where, text, ascii_only):
    request = {"v": 1, "prompt": text} if where == "prompt" else \
        {"v": 1, "prompt": "hi", "stop": ["\n", text]} if where == "stop" else \
        {"v": 1, "messages": [{"role": text if where == "role" else "user",
                               "content": text if where == "content" else "hi"}]}
    with pytest.raises(proto.ProtocolError) as e:
        proto.parse_request(encode(request, ascii_only), BIG)
    assert e.value.code == proto.INVALID  # "not UTF-8" when written raw, "lone surrogate" when escaped
    check_refusal(e.value)


@PROPERTY
@given(name_and_low=st.sampled_from([("temperature", 1e-4), ("repetition_penalty", 0.01)]), data=st.data())
def test_a_temperature_or_penalty_that_would_break_sampling_is_invalid(name_and_low, data):
    name, low = name_and_low
    value = data.draw(st.floats(min_value=0, max_value=low, exclude_min=True, exclude_max=True)
                      | st.floats(100, 1e308, exclude_min=True))
    with pytest.raises(proto.ProtocolError) as e:
        proto.parse_request(json.dumps({"v": 1, "prompt": "hi", name: value}).encode(), BIG)
    assert e.value.code == proto.INVALID and name in str(e.value) and f"from {low:g} to 100" in str(e.value)


@PROPERTY
@given(request=valid_requests)
def test_every_valid_request_is_taken_as_sent(request):
    got = proto.parse_request(request.to_json(), BIG)
    assert got == request
    check_request(got)


@PROPERTY
@given(settings_=st.dictionaries(st.sampled_from(FIELDS[2:] + ["max_tokens"]), st.one_of(json_values, edge_numbers),
                                 max_size=4),
       prompt=st.one_of(any_text, messages))
def test_the_client_sends_only_what_the_device_takes(settings_, prompt):
    """Client.submit validates with request_from_dict: whatever it lets through, the device parses the same."""
    key = "prompt" if isinstance(prompt, str) else "messages"
    try:
        request = proto.request_from_dict({"v": 1, key: prompt, **settings_})
    except proto.ProtocolError as e:
        check_refusal(e)
        return
    assert proto.parse_request(request.to_json(), BIG) == request


@PROPERTY
@given(payload=payloads | st.sampled_from([b"", b"{}", b'{"v": 1}', b'{"v": true}', b"null"]))
def test_a_cancel_payload_is_accepted_or_refused_with_a_protocol_error(payload):
    try:
        proto.parse_cancel(payload)
    except proto.ProtocolError as e:
        check_refusal(e)


@PROPERTY
@given(payload=payloads)
def test_a_reply_payload_is_read_or_refused_with_a_protocol_error(payload):
    try:
        reply = proto.parse_reply(payload)
    except proto.ProtocolError as e:
        assert e.code in CODES and "\n" not in str(e)
    else:
        assert reply["type"] in ("chunk", "done", "error")


# -- topics ----------------------------------------------------------------------------

T = proto.Topics()
TOPIC_CHARS = st.one_of(st.sampled_from(list("/+#$ \0")), st.characters(), surrogate)


@PROPERTY
@given(name=st.text(TOPIC_CHARS, max_size=12))
def test_a_topic_level_is_refused_or_makes_a_plain_topic(name):
    try:
        proto.check_topic_name(name, "device id")
    except ValueError as e:
        assert "\n" not in str(e)
        return
    for topic, levels in ((T.status(name), 4), (T.device_requests(name), 4), (T.replies(name), 3)):
        topic.encode("utf-8")
        assert not any(c in topic for c in "+#\0") and len(topic.split("/")) == levels
    assert T.device_of_status(T.status(name)) == name and T.device_of_requests(T.device_requests(name)) == name


@PROPERTY
@given(topic=st.one_of(st.text(TOPIC_CHARS, max_size=30),
                       st.sampled_from(["edgekit/reply", "edgekit/reply/", "edgekit/reply/a", "edgekit/replyx/a",
                                        "edgekit/dev/arm-01/status", "edgekit/req", "edgekit/cancel"]),
                       st.text(TOPIC_CHARS, max_size=10).map(lambda t: "edgekit/reply/" + t)),
       prefix=st.sampled_from(["edgekit/reply", "edgekit", "plant7/answers"]))
def test_replies_go_only_below_the_reply_prefix_and_never_onto_protocol_topics(topic, prefix):
    problem = proto.reply_topic_problem(topic, prefix, T)
    if problem is None:
        assert topic.startswith(prefix + "/") and len(topic) > len(prefix) + 1
        assert not any(c in topic for c in "+#\0")
        protocol = ("edgekit/req", "edgekit/cancel", "edgekit/dev")
        assert not any(topic == t or topic.startswith(t + "/") for t in protocol)
    else:
        assert "\n" not in problem


@PROPERTY
@given(prefix=st.text(TOPIC_CHARS, max_size=20))
def test_a_reply_prefix_inside_the_protocol_topics_is_refused(prefix):
    try:
        proto.check_reply_prefix(prefix, T)
    except ValueError as e:
        assert "\n" not in str(e)
        return
    assert not any(prefix == t or prefix.startswith(t + "/") for t in T.protocol_topics())


# -- settings of the service, the client and the CLI -----------------------------------


@PROPERTY
@given(value=st.one_of(edge_numbers, st.booleans(), st.integers(), st.floats(), st.text(max_size=5), st.none()),
       integer=st.booleans(), zero_ok=st.booleans())
def test_a_setting_is_a_positive_finite_number_or_refused_in_one_line(value, integer, zero_ok):
    try:
        proto.check_positive("queue", value, integer=integer, zero_ok=zero_ok)
    except ValueError as e:
        assert str(e).startswith("queue must be") and "\n" not in str(e)
        return
    assert type(value) is int or (not integer and type(value) is float and math.isfinite(value))
    assert value > 0 or (zero_ok and value == 0)


def cli_parser() -> argparse.ArgumentParser:
    from edgekit.cli import mqtt as mqtt_cli

    parser = argparse.ArgumentParser(prog="edgekit", exit_on_error=False)
    mqtt_cli.register(parser.add_subparsers(dest="command"))
    return parser


@PROPERTY
@given(flag=st.sampled_from(["--heartbeat", "--queue-limit", "--max-new-tokens", "--max-request-seconds",
                             "--session-expiry", "--max-payload-bytes"]),
       text=st.one_of(st.sampled_from(["nan", "inf", "-inf", "0", "-1", "1e400", "1" * 500, "", "1.5", "true"]),
                      st.text(max_size=8), st.floats().map(repr), st.integers().map(str)))
def test_serve_takes_a_limit_or_period_only_when_it_is_positive_and_finite(flag, text):
    parser = cli_parser()
    try:
        args = parser.parse_args(["serve", "bundle", "--device-id", "arm-01", f"{flag}={text}"])
    except (argparse.ArgumentError, SystemExit):
        return  # argparse's one-line error (exit code 2)
    value = getattr(args, flag[2:].replace("-", "_"))
    assert type(value) is int or (type(value) is float and value < threading.TIMEOUT_MAX)  # a longer wait overflows
    assert value > 0 or (flag == "--session-expiry" and value == 0)


@PROPERTY
@given(message=any_text, raw=st.booleans(),
       temperature=st.none() | st.one_of(edge_numbers, st.floats()).filter(lambda v: not isinstance(v, int)),
       seed=st.none() | st.integers(-(2**70), 2**70), max_new_tokens=st.none() | st.integers(-5, 10**9),
       stop=st.lists(any_text, max_size=2))
def test_ask_refuses_a_mistake_in_one_line_before_connecting_or_sends_what_the_device_takes(
        message, raw, temperature, seed, max_new_tokens, stop):
    from edgekit.cli.mqtt import _ask_request
    from edgekit.errors import UserError

    argv = ["ask", "--raw"] if raw else ["ask"]
    for flag, value in (("--temperature", temperature), ("--seed", seed), ("--max-new-tokens", max_new_tokens)):
        if value is not None:
            argv.append(f"{flag}={value!r}")
    for s in stop:
        argv.append(f"--stop={s}")
    args = cli_parser().parse_args(argv + ["--", message])
    try:
        prompt, settings_ = _ask_request(args)
    except (ValueError, UserError) as e:
        assert "\n" not in str(e)
        return
    key = "prompt" if raw else "messages"
    sent = proto.request_from_dict({"v": 1, key: prompt, **settings_})
    assert proto.parse_request(sent.to_json(), BIG) == sent
    assert (sent.prompt if raw else sent.messages[-1]["content"]) == message
