"""The wire protocol: topic layout, message schemas (version 1) and request validation.

Topics, under a prefix (default `edgekit`):

    {prefix}/req                    requests any device of the fleet may take (shared subscription)
    {prefix}/dev/{device_id}/req    requests for one device only
    {prefix}/cancel                 cancel a request by its correlation data (every device listens)
    {prefix}/dev/{device_id}/status retained: online (model, bundle hash, target) / offline (Last Will)
    {prefix}/dev/{device_id}/heartbeat  periodic load figures
    {prefix}/reply/{client_id}      where the edgekit client asks for replies (any topic works)

A request is an MQTT v5 PUBLISH with the properties ResponseTopic and CorrelationData
and a JSON payload; every reply goes to the ResponseTopic with the same CorrelationData.
Every payload carries "v": 1. This module is pure: no sockets, no threads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

VERSION = 1
DEFAULT_PREFIX = "edgekit"
DEFAULT_GROUP = "edgekit"

# Error codes of an error reply; a client can branch on them.
INVALID = "invalid_request"  # not UTF-8, not JSON, wrong type, missing or unknown field
UNSUPPORTED_VERSION = "unsupported_version"
TOO_LARGE = "too_large"  # payload over the service's byte limit
LIMIT = "limit_exceeded"  # prompt length, max_new_tokens above the service's limits
QUEUE_FULL = "queue_full"
EXPIRED = "expired"  # message expiry or deadline passed before the request ran
INTERRUPTED = "interrupted"  # the service stopped while generating; the partial answer is lost
INTERNAL = "internal"


class ProtocolError(ValueError):
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

    def replies(self, client_id: str) -> str:
        return f"{self.prefix}/reply/{client_id}"


def check_topic_name(name: str, what: str) -> None:
    """Raise ValueError when `name` cannot be one level of a topic (device id, client id, group)."""
    if not name or any(c in name for c in "/+#\0") or name.startswith("$"):
        raise ValueError(f"{what} {name!r} must be non-empty without '/', '+', '#' or a leading '$'")


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


# field -> (accepted JSON types, check of the value or None)
_NUMBER = (int, float)
_FIELDS: dict[str, tuple[tuple[type, ...], Any]] = {
    "prompt": ((str,), None),
    "messages": ((list,), None),
    "max_new_tokens": ((int,), lambda v: v >= 1 or "must be >= 1"),
    "temperature": (_NUMBER, lambda v: v >= 0 or "must be >= 0"),
    "top_k": ((int,), lambda v: v >= 0 or "must be >= 0"),
    "top_p": (_NUMBER, lambda v: 0 < v <= 1 or "must be in (0, 1]"),
    "repetition_penalty": (_NUMBER, lambda v: v > 0 or "must be > 0"),
    "seed": ((int,), lambda v: 0 <= v < 2**63 or "must be in [0, 2**63)"),
    "stop": ((list,), None),
    "stream": ((bool,), None),
    "deadline": (_NUMBER, None),
}


def parse_request(payload: bytes, max_bytes: int) -> Request:
    """Decode and validate a request payload.

    Returns a Request, or raises ProtocolError whose message names the field at fault
    and whose code says the kind of fault. Unknown fields are refused, so a typo
    ("max_tokens") is an error rather than a silently ignored setting.
    """
    if len(payload) > max_bytes:
        raise ProtocolError(TOO_LARGE, f"the payload is {len(payload)} bytes; this service accepts up to {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(INVALID, f"the payload is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError(INVALID, f"the payload is not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(raw, dict):
        raise ProtocolError(INVALID, f"the payload must be a JSON object, got {type(raw).__name__}")
    version = raw.pop("v", None)
    if version != VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION, f'"v" must be {VERSION} (the protocol version), got {version!r}')
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ProtocolError(INVALID, f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(_FIELDS)}")
    for name, value in raw.items():
        types, check = _FIELDS[name]
        # JSON true/false are Python bools, which are ints: refuse them where a number is meant
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join(_json_type(t) for t in types)
            raise ProtocolError(INVALID, f'"{name}" must be {want}, got {_json_type(type(value))}')
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(INVALID, f'"{name}" must be a finite number')
        if check is not None and (problem := check(value)) is not True:
            raise ProtocolError(INVALID, f'"{name}" {problem}, got {value!r}')
    if ("prompt" in raw) == ("messages" in raw):
        raise ProtocolError(INVALID, 'give exactly one of "prompt" (text) or "messages" (a chat)')
    if "messages" in raw:
        msgs = raw["messages"]
        if not msgs:
            raise ProtocolError(INVALID, '"messages" must not be empty')
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and set(m) == {"role", "content"}
                    and isinstance(m["role"], str) and isinstance(m["content"], str)):
                raise ProtocolError(INVALID, f'"messages"[{i}] must be {{"role": string, "content": string}}')
    if not all(isinstance(s, str) and s for s in raw.get("stop", [])):
        raise ProtocolError(INVALID, '"stop" must be a list of non-empty strings')
    return Request(**raw)


def _json_type(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "an array", dict: "an object", type(None): "null"}.get(t, t.__name__)


def parse_cancel(payload: bytes) -> None:
    """A cancel message is {"v": 1}; the request it cancels is named by its CorrelationData."""
    try:
        raw = json.loads(payload.decode("utf-8")) if payload else {"v": VERSION}
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError(INVALID, "a cancel payload must be the JSON object {\"v\": 1}") from None
    if not isinstance(raw, dict) or raw.get("v") != VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION, f'a cancel payload must carry "v": {VERSION}')


# -- replies -----------------------------------------------------------------------


def chunk(seq: int, text: str) -> bytes:
    """A piece of the answer; `seq` counts from 0 so a client can spot a gap or a repeat."""
    return _dump({"v": VERSION, "type": "chunk", "seq": seq, "text": text})


def done(seq: int, text: str, finish_reason: str, device_id: str, usage: dict, timing: dict) -> bytes:
    """The final message: the whole text, why it ended, token counts and timing figures.

    finish_reason: eos | stop | length | context (from the runtime), cancelled, deadline.
    """
    return _dump({"v": VERSION, "type": "done", "seq": seq, "text": text, "finish_reason": finish_reason,
                  "device_id": device_id, "usage": usage, "timing": timing})


def error(code: str, message: str, device_id: str) -> bytes:
    """The final message of a request that was not (fully) served."""
    return _dump({"v": VERSION, "type": "error", "code": code, "message": message, "device_id": device_id})


def status(device_id: str, online: bool, **info: Any) -> bytes:
    """The retained presence message; `info` (model, bundle_hash, target, ...) when online."""
    return _dump({"v": VERSION, "device_id": device_id, "state": "online" if online else "offline", **info})


def heartbeat(device_id: str, **figures: Any) -> bytes:
    return _dump({"v": VERSION, "device_id": device_id, **figures})


def parse_reply(payload: bytes) -> dict:
    """Decode a reply (chunk, done or error); raises ProtocolError when it is not one."""
    try:
        raw = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(INVALID, f"a reply that is not JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("type") not in ("chunk", "done", "error"):
        raise ProtocolError(INVALID, f"not an edgekit reply: {payload[:80]!r}")
    if raw.get("v") != VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION, f"reply version {raw.get('v')!r}; this client reads {VERSION}")
    return raw


def _dump(d: dict) -> bytes:
    return json.dumps(d, ensure_ascii=False, separators=(",", ":")).encode()
