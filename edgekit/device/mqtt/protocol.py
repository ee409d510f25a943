"""The wire protocol: topic layout, message schemas (version 1) and request validation.

Topics, under a prefix (default `edgekit`):

    {prefix}/req                    requests any device of the fleet may take (shared subscription)
    {prefix}/dev/{device_id}/req    requests for one device only
    {prefix}/cancel                 cancel a request by its correlation data (every device listens)
    {prefix}/dev/{device_id}/status retained: online (model, bundle hash, target) / offline (Last Will)
    {prefix}/dev/{device_id}/heartbeat  periodic load figures
    {prefix}/reply/{client_id}      where the edgekit client asks for replies

A request is an MQTT v5 PUBLISH with the properties ResponseTopic and CorrelationData
and a JSON payload; every reply goes to the ResponseTopic with the same CorrelationData,
provided it lies below the reply prefix (default {prefix}/reply: see reply_topic_problem).
Every payload carries "v": 1. This module is pure: no sockets, no threads.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from edgekit.device.sampling import SamplingConfig, is_unicode
from edgekit.errors import InputError

VERSION = 1
DEFAULT_PREFIX = "edgekit"
DEFAULT_GROUP = "edgekit"

# Error codes of an error reply; a client can branch on them.
INVALID = "invalid_request"  # not UTF-8, not JSON, wrong type, out of range, missing or unknown field
UNSUPPORTED_VERSION = "unsupported_version"
TOO_LARGE = "too_large"  # payload over the service's byte limit
LIMIT = "limit_exceeded"  # prompt length, max_new_tokens above the service's limits
QUEUE_FULL = "queue_full"
EXPIRED = "expired"  # message expiry or deadline passed before the request ran
INTERRUPTED = "interrupted"  # the service stopped while generating; the partial answer is lost
INTERNAL = "internal"
SCHEMA = "invalid_schema"  # a response_format schema, regex, grammar or tools that cannot constrain generation
TIMEOUT = "timeout"  # raised by the client itself when no answer came in time; never sent by a device
CLOSED = "closed"  # raised by the client itself: it was closed with the request in flight; never sent by a device


class ProtocolError(InputError):
    """A request that cannot be served; `code` is one of the error codes above."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# -- topics ------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    """The topic names for one prefix (and one device, where a topic is per device)."""

    prefix: str = DEFAULT_PREFIX

    @property
    def fleet_requests(self) -> str:
        return f"{self.prefix}/req"

    def shared_subscription(self, group: str = DEFAULT_GROUP) -> str:
        """The MQTT v5 shared subscription through which the devices of `group` split fleet requests."""
        return f"$share/{group}/{self.fleet_requests}"

    def device_requests(self, device_id: str) -> str:
        return f"{self.prefix}/dev/{device_id}/req"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}/cancel"

    def status(self, device_id: str) -> str:
        return f"{self.prefix}/dev/{device_id}/status"

    def heartbeat(self, device_id: str) -> str:
        return f"{self.prefix}/dev/{device_id}/heartbeat"

    def device_of_requests(self, topic: str) -> str | None:
        """The device id in a device request topic, or None for any other topic."""
        return self._device_in(topic, "req")

    def device_of_status(self, topic: str) -> str | None:
        """The device id in a status topic, or None for any other topic."""
        return self._device_in(topic, "status")

    def _device_in(self, topic: str, kind: str) -> str | None:
        head, tail = f"{self.prefix}/dev/", f"/{kind}"
        if topic.startswith(head) and topic.endswith(tail) and "/" not in topic[len(head):-len(tail)]:
            return topic[len(head):-len(tail)] or None
        return None

    @property
    def reply_tree(self) -> str:
        """The default reply prefix: replies go to topics below it, never elsewhere."""
        return f"{self.prefix}/reply"

    def replies(self, client_id: str) -> str:
        return f"{self.reply_tree}/{client_id}"

    def protocol_topics(self) -> list[str]:
        """Topics (with everything below them) that carry requests, cancels and presence: never a reply topic."""
        return [self.fleet_requests, self.cancel, f"{self.prefix}/dev"]


def check_topic_name(name: str, what: str) -> None:
    """Raise ValueError when `name` cannot be one level of a topic (device id, client id, group)."""
    if not isinstance(name, str) or not name or any(c in name for c in "/+#\0") or name.startswith("$") \
            or not is_unicode(name):
        raise InputError(f"{what} {name!r} must be non-empty UTF-8 text without '/', '+', '#' or a leading '$'")


def check_topic_prefix(prefix: str, what: str) -> None:
    """Raise ValueError when `prefix` cannot lead a topic name (levels may be separated by '/')."""
    if not isinstance(prefix, str) or not prefix or prefix.startswith(("$", "/")) or prefix.endswith("/") \
            or any(c in prefix for c in "+#\0") or not is_unicode(prefix):
        raise InputError(f"{what} {prefix!r} must be non-empty UTF-8 text without '+', '#', a leading '$' "
                         "or a leading or trailing '/'")


def check_positive(name: str, value: Any, *, integer: bool = False, zero_ok: bool = False,
                   below: float | None = None) -> None:
    """Raise ValueError (one line) unless `value` is a finite number > 0 (>= 0 with zero_ok; an int with
    integer) and, if given, below `below`. For the service's and the client's settings: limits, periods,
    timeouts (a period or timeout is below threading.TIMEOUT_MAX, 292 years: a longer wait overflows)."""
    below = threading.TIMEOUT_MAX if below is None and not integer else below
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if ok and not integer:
        try:
            ok = math.isfinite(value)
        except OverflowError:  # an int too large for a float
            ok = False
    if not ok or value < 0 or (value == 0 and not zero_ok) or (below is not None and value >= below):
        want = "an integer" if integer else "a finite number"
        limit = "" if below is None else f" and below {below:g}"
        raise InputError(f"{name} must be {want} {'>= 0' if zero_ok else '> 0'}{limit}, got {show(value)}")


def reply_topic_problem(topic: str | None, reply_prefix: str, topics: Topics) -> str | None:
    """Why a device must not publish replies to `topic` (a request's ResponseTopic), or None.

    The ResponseTopic is chosen by whoever sent the request, so it is not trusted: replies go
    only below `reply_prefix`, and never onto a topic of the protocol itself (requests,
    cancels, any device's status and heartbeat), whatever the prefix.
    """
    if not topic:
        return "there is no ResponseTopic"
    if any(c in topic for c in "+#\0"):
        return "a ResponseTopic cannot hold '+', '#' or NUL"
    if not topic.startswith(reply_prefix + "/") or topic == reply_prefix + "/":
        return f"replies go only to topics below {reply_prefix}/"
    if any(topic == t or topic.startswith(t + "/") for t in topics.protocol_topics()):
        return "that is a request, cancel or device topic, not a reply topic"
    return None


def check_reply_prefix(reply_prefix: str, topics: Topics) -> None:
    """Raise ValueError when replies cannot be confined below `reply_prefix` (see reply_topic_problem)."""
    check_topic_prefix(reply_prefix, "reply prefix")
    if any(reply_prefix == t or reply_prefix.startswith(t + "/") for t in topics.protocol_topics()):
        raise InputError(f"reply prefix {reply_prefix!r} lies in the request, cancel or device topics; replies need "
                         f"a tree of their own (default {topics.reply_tree})")


# -- requests ----------------------------------------------------------------------


@dataclass
class Request:
    """A validated generation request (the JSON payload of version 1)."""

    prompt: str | None = None  # plain text, continued as is
    messages: list[dict] | None = None  # or a chat: [{"role": ..., "content": ...}]
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = True  # send chunks as they come; false: only the final message
    deadline: float | None = None  # unix time; not started after it, cut off at it
    # constrained output (at most one): OpenAI-shaped response_format, a regex, a Lark grammar, or tools
    response_format: dict | None = None  # {"type": "json_schema", "json_schema": {"schema": ...}} | json_object | text
    regex: str | None = None
    grammar: str | None = None
    tools: list | None = None  # OpenAI-shaped functions; the final then carries tool_calls
    tool_choice: str | dict | None = None  # auto (default with tools) | required | none | {"type": "function", ...}
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None  # {"token id": bias}, as OpenAI: keys are the ids as strings
    top_logprobs: int | None = None  # the final then carries "logprobs"

    def sampling(self) -> dict:
        """The runtime's sampling arguments of this request (Model.stream)."""
        bias = None if self.logit_bias is None else {int(k): float(v) for k, v in self.logit_bias.items()}
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "repetition_penalty": self.repetition_penalty, "seed": self.seed, "min_p": self.min_p,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logit_bias": bias, "top_logprobs": self.top_logprobs}

    def constraint(self) -> dict:
        """The runtime's arguments for this request's constrained output (Model.stream)."""
        fmt = self.response_format or {}
        schema: dict | bool | None = None  # "text", or no response_format: unconstrained
        if fmt.get("type") == "json_object":
            schema = {"type": "object"}
        elif fmt.get("type") == "json_schema":
            schema = fmt["json_schema"]["schema"]
        out: dict[str, Any] = {"json_schema": schema, "regex": self.regex, "grammar": self.grammar}
        if self.tools is not None:
            out.update(tools=self.tools, tool_choice=self.tool_choice or "auto")
        return out

    def prompt_chars(self) -> int:
        if self.prompt is not None:
            return len(self.prompt)
        return sum(len(m["content"]) for m in self.messages or ())

    def to_json(self) -> bytes:
        d: dict[str, Any] = {"v": VERSION}
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None and not (name == "stop" and not value) and not (name == "stream" and value):
                d[name] = value
        return json.dumps(d, ensure_ascii=False).encode()


# field -> accepted JSON types. The sampling settings' ranges live in SamplingConfig (one home for
# them: the CLI and the Python API meet the same ones); the others are the protocol's own.
_NUMBER = (int, float)
_FIELDS: dict[str, tuple[type, ...]] = {
    "prompt": (str,),
    "messages": (list,),
    "max_new_tokens": (int,),
    "temperature": _NUMBER,
    "top_k": (int,),
    "top_p": _NUMBER,
    "repetition_penalty": _NUMBER,
    "seed": (int,),
    "stop": (list,),
    "stream": (bool,),
    "deadline": _NUMBER,
    "response_format": (dict,),
    "regex": (str,),
    "grammar": (str,),
    "tools": (list,),
    "tool_choice": (str, dict),
    "min_p": _NUMBER,
    "presence_penalty": _NUMBER,
    "frequency_penalty": _NUMBER,
    "logit_bias": (dict,),
    "top_logprobs": (int,),
}
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
_SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "min_p", "presence_penalty",
             "frequency_penalty")
SEED_LIMIT = 2**63  # seeds are int64 on the wire, so clients in any language can send them


def parse_request(payload: bytes | bytearray, max_bytes: int) -> Request:
    """Decode and validate a request payload.

    Returns a Request, or raises ProtocolError (never anything else, whatever the bytes)
    whose message, one line, names the field at fault and whose code says the kind of
    fault. Unknown fields are refused, so a typo ("max_tokens") is an error rather than a
    silently ignored setting.
    """
    if len(payload) > max_bytes:
        raise ProtocolError(TOO_LARGE, f"the payload is {len(payload)} bytes; this service accepts up to {max_bytes}")
    return request_from_dict(_load_object(payload, "the payload"))


def request_from_dict(raw: dict) -> Request:
    """Validate a decoded request (with its "v") as parse_request does; the client checks
    what it is about to send with this, so a mistake is reported before anything is sent."""
    raw = dict(raw)
    if "v" not in raw:
        raise ProtocolError(UNSUPPORTED_VERSION, f'"v" must be {VERSION} (the protocol version), and it is missing')
    version = raw.pop("v")
    if type(version) is not int:  # JSON true is a bool, 1.0 a float: neither is the version number 1
        raise ProtocolError(INVALID, f'"v" must be the integer {VERSION} (the protocol version), got {show(version)}')
    if version != VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION, f'"v" must be {VERSION} (the protocol version), got {show(version)}')
    unknown = sorted(k for k in raw if k not in _FIELDS)
    if unknown:
        listed = ", ".join(show(k) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ProtocolError(INVALID, f"unknown field(s) {listed}; known: {', '.join(_FIELDS)}")
    for name, value in raw.items():
        types = _FIELDS[name]
        # JSON true/false are Python bools, which are ints: refuse them where a number is meant
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = "a number" if types is _NUMBER else _json_type(types[0])
            raise ProtocolError(INVALID, f'"{name}" must be {want}, got {_json_type(type(value))}')
        if types is _NUMBER:
            raw[name] = _finite(name, raw[name])  # raw[name], not value: isinstance(value, types) typed value as object
    if ("prompt" in raw) == ("messages" in raw):
        raise ProtocolError(INVALID, 'give exactly one of "prompt" (text) or "messages" (a chat)')
    if "prompt" in raw:
        if not raw["prompt"]:  # nothing to continue: the model would have no token to start from
            raise ProtocolError(INVALID, '"prompt" must not be empty')
        _check_text('"prompt"', raw["prompt"])
    else:
        raw["messages"] = _messages(raw["messages"])
    if raw.get("max_new_tokens", 1) < 1:
        raise ProtocolError(INVALID, f'"max_new_tokens" must be >= 1, got {show(raw["max_new_tokens"])}')
    if not 0 <= raw.get("seed", 0) < SEED_LIMIT:
        raise ProtocolError(INVALID, f'"seed" must be in [0, 2**63), got {show(raw["seed"])}')
    bias = raw.get("logit_bias")
    if bias is not None:
        # ASCII digits: str.isdigit alone takes "²" (which int() refuses) and reads "١٢" as 12
        if not all(isinstance(k, str) and k.isascii() and k.isdigit() and len(k) < 12 for k in bias):
            raise ProtocolError(INVALID, '"logit_bias" keys must be token ids written as decimal strings, e.g. '
                                         '{"1234": -100}')
        bias = {int(k): _finite('"logit_bias"', v) if isinstance(v, _NUMBER) and not isinstance(v, bool) else v
                for k, v in bias.items()}
    try:
        SamplingConfig(**{k: raw[k] for k in _SAMPLING if k in raw}, logit_bias=bias)
    except ValueError as e:
        raise ProtocolError(INVALID, str(e)) from None
    if not 0 <= raw.get("top_logprobs", 0) <= 20:
        raise ProtocolError(INVALID, f'"top_logprobs" must be from 0 to 20, got {show(raw["top_logprobs"])}')
    for i, s in enumerate(raw.get("stop", [])):
        if not isinstance(s, str) or not s:
            raise ProtocolError(INVALID, f'"stop" must be a list of non-empty strings; [{i}] is '
                                         f'{_json_type(type(s)) if s else "empty"}')
        _check_text(f'"stop"[{i}]', s)
    _check_constraint(raw)
    return Request(**raw)


def _check_constraint(raw: dict) -> None:
    """The shape of the constrained-output fields; whether a schema compiles is the device's to say
    (SCHEMA), with its tokenizer."""
    fmt = raw.get("response_format")
    if fmt is not None:
        kind = fmt.get("type")
        if kind not in RESPONSE_FORMATS:
            raise ProtocolError(INVALID, f'"response_format".type must be one of {", ".join(RESPONSE_FORMATS)}, '
                                         f"got {show(kind)}")
        if kind == "json_schema" and not (isinstance(fmt.get("json_schema"), dict)
                                          and isinstance(fmt["json_schema"].get("schema"), (dict, bool))):
            raise ProtocolError(INVALID, '"response_format" of type json_schema needs "json_schema": '
                                         '{"schema": {...}}')
    given = [k for k in ("regex", "grammar", "tools") if k in raw] + \
        (["response_format"] if fmt is not None and fmt.get("type") != "text" else [])
    if len(given) > 1:
        raise ProtocolError(INVALID, f"give at most one of response_format, regex, grammar and tools "
                                     f"(got {', '.join(given)})")
    for name in ("regex", "grammar"):
        if name in raw:
            _check_text(f'"{name}"', raw[name])
    if "tool_choice" in raw and "tools" not in raw:
        raise ProtocolError(INVALID, '"tool_choice" goes with "tools"')


MAX_NESTING = 128  # levels of arrays and objects a message may have (a response_format schema: a few per level)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _too_deep(text: str) -> bool:
    """Whether `text`'s arrays and objects nest deeper than MAX_NESTING (strings skipped), found without
    recursing: Python's parser recurses once per level, and a collection that runs in that deep stack
    (a finalizer of another thread's objects) fails with RecursionError as well."""
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return False  # every ordinary message: no scan
    depth = 0
    for c in _STRING.sub("", text):
        if c in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif c in "]}":
            depth -= 1
    return False


def _load_object(payload: bytes | bytearray, what: str) -> dict:
    """The JSON object in `payload`; ProtocolError (INVALID) for anything else, however malformed."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(INVALID, f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None
    if _too_deep(text):
        raise ProtocolError(INVALID, f"{what} is nested too deeply to be a request (over {MAX_NESTING} levels)")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError(INVALID, f"{what} is not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:  # Python's parser recurses once per level: "[[[[..." exhausts the stack
        raise ProtocolError(INVALID, f"{what} is nested too deeply to be a request") from None
    except ValueError as e:  # an integer literal over Python's 4300-digit conversion limit
        raise ProtocolError(INVALID, f"{what} is not usable JSON ({str(e).split(':')[0]})") from None
    if not isinstance(raw, dict):
        raise ProtocolError(INVALID, f"{what} must be a JSON object, got {_json_type(type(raw))}")
    return raw


def _finite(name: str, value: float) -> float:
    try:
        number = float(value)  # an integer too large for a float raises OverflowError
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ProtocolError(INVALID, f'"{name}" must be a finite number, got {show(value)}')
    return number


def _check_text(name: str, text: str) -> None:
    """Refuse a text that cannot be tokenized or sent back: lone surrogates are not Unicode text."""
    if not is_unicode(text):
        raise ProtocolError(INVALID, f"{name} is not valid text: it holds a lone surrogate "
                                     f"(\\u{_surrogate(text):04x}); send UTF-8 text")


def _surrogate(text: str) -> int:
    return next(ord(c) for c in text if 0xD800 <= ord(c) <= 0xDFFF)


def _messages(msgs: list) -> list[dict]:
    if not msgs:
        raise ProtocolError(INVALID, '"messages" must not be empty')
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and set(m) == {"role", "content"}
                and isinstance(m["role"], str) and isinstance(m["content"], str) and m["role"]):
            raise ProtocolError(INVALID, f'"messages"[{i}] must be {{"role": non-empty string, "content": string}}')
        _check_text(f'"messages"[{i}].role', m["role"])
        _check_text(f'"messages"[{i}].content', m["content"])
    return msgs


def _json_type(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "an array", dict: "an object", type(None): "null"}.get(t, t.__name__)


def show(value: Any) -> str:
    """A short rendering of a value (from the wire) for an error or log line: one line, never long, never raises."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int) and abs(value) >= 10**30:  # no repr over 4300 digits, and none needed
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        text = repr(value)  # escapes control characters and lone surrogates
        return text if len(text) <= 40 else text[:37] + "..."
    return _json_type(type(value))


def parse_cancel(payload: bytes | bytearray) -> None:
    """A cancel message is {"v": 1} (or empty); the request it cancels is named by its
    ResponseTopic and CorrelationData. Raises ProtocolError, never anything else."""
    if not payload:
        return
    raw = _load_object(payload, "a cancel payload")
    if type(raw.get("v")) is not int or raw["v"] != VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION, f'a cancel payload must be {{"v": {VERSION}}}, got "v": '
                                                 f'{show(raw.get("v"))}')


# -- replies -----------------------------------------------------------------------


def chunk(seq: int, text: str) -> bytes:
    """A piece of the answer; `seq` counts from 0 so a client can spot a gap or a repeat."""
    return _dump({"v": VERSION, "type": "chunk", "seq": seq, "text": text})


def done(seq: int, text: str, finish_reason: str, device_id: str, usage: dict, timing: dict,
         valid: bool | None = None, tool_calls: list | None = None, logprobs: list | None = None) -> bytes:
    """The final message: the whole text, why it ended, token counts and timing figures; with
    constrained output, whether the text is complete and valid, and any tool calls.

    finish_reason: eos | stop | length | context | tool_calls (from the runtime), cancelled, deadline.
    """
    d = {"v": VERSION, "type": "done", "seq": seq, "text": text, "finish_reason": finish_reason,
         "device_id": device_id, "usage": usage, "timing": timing}
    if valid is not None:
        d["valid"] = valid
    if tool_calls is not None:
        d["tool_calls"] = tool_calls
    if logprobs is not None:
        d["logprobs"] = logprobs
    return _dump(d)


def error(code: str, message: str, device_id: str) -> bytes:
    """The final message of a request that was not (fully) served."""
    return _dump({"v": VERSION, "type": "error", "code": code, "message": message, "device_id": device_id})


def status(device_id: str, online: bool, **info: Any) -> bytes:
    """The retained presence message; `info` (model, bundle_hash, target, ...) when online."""
    return _dump({"v": VERSION, "device_id": device_id, "state": "online" if online else "offline", **info})


def heartbeat(device_id: str, **figures: Any) -> bytes:
    return _dump({"v": VERSION, "device_id": device_id, **figures})


def parse_reply(payload: bytes | bytearray) -> dict:
    """Decode a reply (chunk, done or error); raises ProtocolError when it is not one."""
    raw = _load_object(payload, "a reply")
    kind = raw.get("type")
    if kind not in _REPLY_FIELDS:
        raise ProtocolError(INVALID, f"not an edgekit reply (type {show(kind)})")
    if type(raw.get("v")) is not int or raw["v"] != VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION, f"reply version {show(raw.get('v'))}; this client reads {VERSION}")
    for name, types in _REPLY_FIELDS[kind].items():
        if not isinstance(raw.get(name), types) or isinstance(raw.get(name), bool):
            raise ProtocolError(INVALID, f'a {kind} reply whose "{name}" is {_json_type(type(raw.get(name)))}')
    return raw


# what a client reads from each kind of reply
_REPLY_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "chunk": {"seq": (int,), "text": (str,)},
    "done": {"text": (str,), "finish_reason": (str,), "device_id": (str,)},
    "error": {"code": (str,), "message": (str,)},
}


def _dump(d: dict) -> bytes:
    # backslashreplace: a lone surrogate that slipped into a text (an exception's message) becomes the
    # JSON escape \udcxx, still valid JSON, instead of an UnicodeEncodeError that loses the reply
    return json.dumps(d, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")
