"""A client for other nodes on the bus: ask a device (or the fleet) and get the answer.

    with Client("mqtt://localhost:1883", device_id="arm-01") as client:
        print(client.ask("Pick up the red cube", max_new_tokens=64).text)
        for piece in client.stream("Where is the cube?"):
            print(piece, end="", flush=True)

Delivery is at least once on the wire (QoS 1) and exactly once here: replies are
matched by correlation data, repeated chunks and finals are dropped, and a request
that hears nothing for `retry_s` is published again with the same correlation data,
which the service answers from its journal without generating twice.

The client also follows the devices' retained status, so a request that gets no answer
says whether its device is online (`device_state()`), and a mistake in a request (a
wrong type, a setting out of range) raises ProtocolError before anything is sent.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgekit.device.mqtt import protocol as proto
from edgekit.device.mqtt.connection import BrokerConfig, connect_failure, make_connection
from edgekit.errors import EdgekitError, InputError

log = logging.getLogger("edgekit.mqtt")


class RequestError(EdgekitError, RuntimeError):
    """The device answered with an error reply (`code` as in protocol.py), or no answer came in time."""

    def __init__(self, code: str, message: str, device_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.device_id = device_id


@dataclass
class Answer:
    text: str
    finish_reason: str  # eos | stop | length | context | cancelled | deadline
    device_id: str
    usage: dict = field(default_factory=dict)  # prompt_tokens, cached_tokens, completion_tokens
    timing: dict = field(default_factory=dict)  # queue_s, ttft_s, prefill_s, decode_tokens_per_s, total_s
    valid: bool | None = None  # constrained output: complete and valid (False: cut short by a limit)
    tool_calls: list | None = None  # with tools: OpenAI-shaped calls
    logprobs: list | None = None  # with top_logprobs: per token {"id", "token", "logprob", "top"}


class Pending:
    """One request in flight. Iterate for the text pieces as they stream in; `result()`
    waits for the whole answer; `cancel()` asks the device to stop."""

    def __init__(self, client: Client, topic: str, correlation: bytes, payload: bytes, timeout: float,
                 expiry_s: int | None = None, device_id: str | None = None):
        self._client = client
        self.expiry_s = expiry_s
        self.device_id = device_id  # the device asked, or None for the fleet
        self.topic = topic
        self.correlation = correlation
        self.payload = payload
        self.timeout = timeout
        self._replies: queue.Queue[dict] = queue.Queue()
        # touched only on paho's network thread: what was already passed on
        self._next_seq = 0
        self._final_seen = False
        self._answer: Answer | None = None
        self._error: RequestError | None = None
        self._streamed = ""
        self.last_heard = time.monotonic()  # last publish of the request or reply to it
        self.last_reply = 0.0  # last reply to it, passed on or not (a chunk after a gap counts: the device is at it)
        self.first_sent: float | None = None  # when it was first published: its expiry counts from then
        self.lost = False  # the broker lost its session since it was published: the request may be lost too

    def __iter__(self) -> Iterator[str]:
        """Text pieces in order; ends when the answer is complete (then see `result()`).

        Raises RequestError on an error reply or when nothing arrives within the timeout.
        """
        while self._answer is None:
            if self._error is not None:
                raise self._error
            reply = self._next_reply()
            if reply["type"] == "chunk":
                self._streamed += reply["text"]
                yield reply["text"]
            elif reply["type"] == "done":
                self._answer = Answer(reply["text"], reply["finish_reason"], reply["device_id"],
                                      reply.get("usage", {}), reply.get("timing", {}), reply.get("valid"),
                                      reply.get("tool_calls"), reply.get("logprobs"))
                # chunks lost with a broker that restarted without persistence: the final has everything
                if self._answer.text.startswith(self._streamed) and len(self._answer.text) > len(self._streamed):
                    yield self._answer.text[len(self._streamed):]
            else:
                self._error = RequestError(reply["code"], reply["message"], reply.get("device_id"))
                raise self._error

    def result(self) -> Answer:
        """The whole answer; raises RequestError on an error reply or a timeout."""
        for _ in self:
            pass
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer

    @property
    def answer(self) -> Answer | None:
        """The answer once iteration has finished, else None."""
        return self._answer

    def cancel(self) -> None:
        """Ask the device to stop; the answer then ends with finish_reason "cancelled"."""
        self._client._cancel(self)

    def _next_reply(self) -> dict:
        waiting_since = time.monotonic()
        while True:  # timeout: nothing heard from the device for that long
            left = max(waiting_since, self.last_reply) + self.timeout - time.monotonic()
            if left <= 0:  # give up, and tell the device: it would otherwise spend its CPU on an answer no one reads
                self._client._cancel(self)
                self._client._forget(self)
                raise RequestError(proto.TIMEOUT, f"{self._client.silence_reason(self.device_id)}; "
                                                  f"no answer within {self.timeout:g} s")
            try:
                return self._replies.get(timeout=min(left, self._client.retry_s / 2))
            except queue.Empty:
                self._client._retry_silent()

    def _deliver(self, reply: dict) -> None:
        """On the network thread: pass a reply on once, in order."""
        if self._final_seen:
            return
        self.last_heard = self.last_reply = time.monotonic()
        if reply["type"] == "chunk":
            if reply.get("seq") != self._next_seq:
                return  # a repeat (QoS 1 redelivery, a re-sent request) or a gap the final will fill
            self._next_seq += 1
        else:
            self._final_seen = True
        self._replies.put(reply)


class Client:
    """Asks edgekit devices over MQTT v5. Safe to use from several threads."""

    def __init__(self, broker: str | BrokerConfig, *, device_id: str | None = None,
                 prefix: str = proto.DEFAULT_PREFIX, client_id: str | None = None, timeout: float = 60.0,
                 retry_s: float = 10.0, connect_timeout: float = 10.0):
        if not isinstance(broker, (str, BrokerConfig)):
            raise InputError(f"broker must be a URL (mqtt://host:port) or a BrokerConfig, got {type(broker).__name__}")
        self.config = broker if isinstance(broker, BrokerConfig) else BrokerConfig(url=broker)
        proto.check_topic_prefix(prefix, "topic prefix")
        self.topics = proto.Topics(prefix)
        if device_id is not None:
            proto.check_topic_name(device_id, "device id")
        self.device_id = device_id
        self.client_id = client_id or f"edgekit-client-{uuid.uuid4().hex[:12]}"
        proto.check_topic_name(self.client_id, "client id")
        for name, value in (("timeout", timeout), ("retry_s", retry_s), ("connect_timeout", connect_timeout)):
            proto.check_positive(name, value)
        self.timeout = timeout
        self.retry_s = retry_s
        self.reply_topic = self.topics.replies(self.client_id)
        self._pending: dict[bytes, Pending] = {}
        self._lock = threading.Lock()
        self._status_seen = threading.Condition(self._lock)  # notified when a device's status arrives
        self.connected = threading.Event()  # connected, subscribed, and the retained statuses are in
        self._was_connected = False
        self._sub_mid: int | None = None
        self._barrier_mid: int | None = None
        self._states: dict[str, str] = {}  # device id -> "online" | "offline", from the retained status
        self._presence = False  # the broker let us read the status topics
        self._failure: str | None = None  # why the last connection attempt failed
        self._closed = False
        self.conn = make_connection(self.config, self.client_id, session_expiry_s=300,
                                    clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY)
        c = self.conn.client
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        self.conn.start()
        if not self.connected.wait(connect_timeout):
            self.conn.stop()
            raise ConnectionError(f"could not connect to {self.config.url} and subscribe within {connect_timeout:g} s: "
                                  f"{self._failure or 'no answer from the broker'}")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect. Requests still in flight are cancelled first (a device would otherwise spend
        its CPU on answers no one reads), and reading one of them then raises RequestError."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            open_ = [p for p in self._pending.values() if not p._final_seen]
            self._pending.clear()
        self._cancel(*open_)
        for p in open_:
            p._replies.put({"type": "error", "code": proto.CLOSED, "message": "the Client was closed before the "
                            "answer came; the device was told to cancel it", "device_id": p.device_id})
        self.conn.stop()

    # -- asking --------------------------------------------------------------------------

    def submit(self, prompt: str | Sequence[dict], *, device_id: str | None = None,
               timeout: float | None = None, expiry_s: int | None = None, **settings) -> Pending:
        """Send a request and return at once. `prompt` is text or chat messages; `settings` are
        the request fields (max_new_tokens, temperature, seed, stop, stream, deadline...).

        device_id: that device only; None: the client's device, or else any device of the fleet.
        expiry_s: MQTT message expiry; the broker drops the request, and the device refuses
        it, when it has waited longer.
        """
        if self._closed:
            raise ConnectionError("this Client is closed; make a new one to send requests")
        if not isinstance(prompt, (str, list, tuple)):
            raise proto.ProtocolError(proto.INVALID, "the prompt must be text or a list of chat messages, got "
                                                     f"{type(prompt).__name__}")
        key = "prompt" if isinstance(prompt, str) else "messages"
        # the device's own validation, here: a mistake raises ProtocolError (a ValueError) before anything is sent
        request = proto.request_from_dict({"v": proto.VERSION, key: prompt if isinstance(prompt, str) else list(prompt),
                                           **settings})
        device = device_id or self.device_id
        if device_id is not None:
            proto.check_topic_name(device_id, "device id")
        topic = self.topics.device_requests(device) if device else self.topics.fleet_requests
        if timeout is not None:
            proto.check_positive("timeout", timeout)
        if expiry_s is not None:
            proto.check_positive("expiry_s", expiry_s, integer=True, below=2**32)  # MQTT's four-byte interval
        pending = Pending(self, topic, uuid.uuid4().hex.encode(), request.to_json(), timeout or self.timeout,
                          expiry_s, device)
        with self._lock:
            self._pending[pending.correlation] = pending
        try:
            self._publish_request(pending)
        except BaseException:  # nothing sent: nothing to wait for (or to publish again on a retry)
            self._forget(pending)
            raise
        return pending

    def ask(self, prompt: str | Sequence[dict], **settings) -> Answer:
        """Send a request and wait for the whole answer; raises RequestError on an error reply."""
        if "stream" in settings:
            raise InputError("ask() waits for the whole answer and takes no stream=; use stream() for the pieces")
        return self.submit(prompt, stream=False, **settings).result()

    def stream(self, prompt: str | Sequence[dict], **settings) -> Pending:
        """Send a request; iterate the result for text pieces, then read `.answer`."""
        if "stream" in settings:
            raise InputError("stream() always streams and takes no stream=; use ask() for the whole answer at once")
        return self.submit(prompt, stream=True, **settings)

    def send_raw(self, topic: str, payload: bytes, correlation: bytes | None = None,
                 timeout: float | None = None) -> Pending:
        """Publish any payload as a request (tests, other languages' payloads); await its replies."""
        correlation = correlation or uuid.uuid4().hex.encode()
        pending = Pending(self, topic, correlation, payload, timeout or self.timeout,
                          device_id=self.topics.device_of_requests(topic))
        with self._lock:
            self._pending[correlation] = pending
        self._publish_request(pending)
        return pending

    def _retry_silent(self) -> None:
        """Publish again every request that heard nothing for retry_s (same correlation data:
        the device answers a repeat from its journal and never generates twice).

        A request to the fleet only when the broker lost its session since: a device may hold it in
        its queue, silent, and a repeat would go to another device of the share group, which has no
        journal entry for it and would generate it a second time."""
        now = time.monotonic()
        with self._lock:
            silent = [p for p in self._pending.values()
                      if now - p.last_heard >= self.retry_s and (p.device_id is not None or p.lost)]
        for p in silent:  # publish outside the lock
            self._publish_request(p)

    def _publish_request(self, pending: Pending) -> None:
        now = pending.last_heard = time.monotonic()
        pending.first_sent = pending.first_sent or now
        pending.lost = False
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = pending.correlation
        props.ContentType = "application/json"
        if pending.expiry_s:  # a repeat expires when the first would have
            left = pending.expiry_s - int(now - pending.first_sent)
            if left <= 0:
                return  # expired: the broker dropped it, the device refuses it; nothing to revive
            props.MessageExpiryInterval = left
        self.conn.client.publish(pending.topic, pending.payload, qos=1, properties=props)

    def _cancel(self, *pendings: Pending) -> None:
        """Publish a cancel for each, then wait up to 2 s in all for the broker to take them: the caller
        may close the client next (Ctrl-C in `edgekit ask`, close()), and the cancels go out first."""
        sent = []
        for pending in pendings:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = pending.correlation
            sent.append(self.conn.client.publish(self.topics.cancel, b'{"v":1}', qos=1, properties=props))
        until = time.monotonic() + 2.0
        for info in sent:
            try:
                info.wait_for_publish(timeout=max(0.0, until - time.monotonic()))
            except (RuntimeError, ValueError):  # not connected: paho sends it on reconnect, if the client lives
                pass

    def _forget(self, pending: Pending) -> None:
        with self._lock:
            self._pending.pop(pending.correlation, None)

    # -- presence ------------------------------------------------------------------------

    def device_state(self, device_id: str) -> str | None:
        """The device's state from its retained status: "online", "offline", or None when it has
        none (it never connected to this broker, or the broker forgot it) or this client may not read it."""
        with self._lock:
            return self._states.get(device_id)

    @property
    def follows_presence(self) -> bool:
        """True when the broker lets this client read the devices' status topics."""
        return self._presence

    def wait_for_state(self, device_id: str, timeout: float) -> str | None:
        """device_state(), waiting up to `timeout` for a status to arrive when none has yet.

        Mosquitto delivers retained statuses before the client counts as connected; brokers that
        deliver them later (EMQX) may need this moment.
        """
        with self._status_seen:
            self._status_seen.wait_for(lambda: device_id in self._states, timeout)
            return self._states.get(device_id)

    def online_devices(self) -> list[str]:
        """The devices whose retained status says online, sorted."""
        with self._lock:
            return sorted(d for d, state in self._states.items() if state == "online")

    def silence_reason(self, device_id: str | None) -> str:
        """Why a request to `device_id` (None: the fleet) may have gone unanswered, from what presence shows."""
        if not self.connected.is_set():  # the statuses below are stale then
            return f"the connection to the broker {self.config.url} is down (closed, or lost and not back yet)"
        if not self._presence:
            where = f"the device {device_id}" if device_id else "a device of the fleet"
            return f"is {where} online? (this client may not read {self.topics.status('+')})"
        if device_id is None:
            online = self.online_devices()
            if not online:
                return "no device of the fleet is online"
            return f"{len(online)} device(s) online ({', '.join(online[:5])}) but none answered"
        state = self.device_state(device_id)
        if state == "online":
            return (f"the device {device_id} is online but did not answer (busy, or it cannot publish to "
                    f"{self.reply_topic})")
        if state == "offline":
            return f"the device {device_id} is not online (its status is offline)"
        return f"the device {device_id} is not online (it has no status on {self.topics.status(device_id)})"

    # -- paho callbacks (network thread) ------------------------------------------------

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its `except OSError:` around the connect: that exception is the reason
        self._failure = connect_failure(sys.exc_info()[1])

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        error = self.conn.take_error()
        if not self._was_connected and self._failure is None:  # a refusal: __init__ says why (CONNACK's first)
            self._failure = f"the broker closed the connection ({error or reason_code})"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._failure = f"the broker refused the connection ({reason_code})"
            return  # connect_timeout in __init__ reports it
        if self._was_connected and not flags.session_present:
            # the broker lost our session (restarted without persistence): it may have lost requests
            # and replies too, so ask again at the next wait rather than after a full retry_s
            with self._lock:
                for p in self._pending.values():
                    p.last_heard -= self.retry_s
                    p.lost = True
        _, self._sub_mid = client.subscribe([(self.reply_topic, SubscribeOptions(qos=1)),
                                             (self.topics.status("+"), SubscribeOptions(qos=1))])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid == self._sub_mid:
            if reason_codes[0].is_failure:
                self._failure = f"the broker refused the subscription to {self.reply_topic} ({reason_codes[0]})"
                return
            self._presence = not reason_codes[1].is_failure
            # The broker sends the retained statuses after this SUBACK; a second SUBACK comes after them
            # (Mosquitto handles a client's packets in order), so once it is in, presence is known.
            _, self._barrier_mid = client.subscribe(self.reply_topic, options=SubscribeOptions(qos=1))
        elif mid == self._barrier_mid:
            self._was_connected = True
            self.connected.set()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            self._take_message(msg)
        except Exception:  # a bug must not kill paho's network thread (malformed messages are no bug)
            log.exception("could not handle a message on %s", proto.show(msg.topic))

    def _take_message(self, msg: mqtt.MQTTMessage) -> None:
        device = self.topics.device_of_status(msg.topic)
        if device is not None:
            self._take_status(device, msg.payload)
            return
        correlation = getattr(msg.properties, "CorrelationData", None)
        with self._lock:
            pending = self._pending.get(bytes(correlation)) if correlation is not None else None
        if pending is None:
            return  # a late repeat of an answer already taken, or someone else's
        try:
            reply = proto.parse_reply(msg.payload)
        except proto.ProtocolError:
            return
        pending._deliver(reply)
        if reply["type"] != "chunk":
            self._forget(pending)

    def _take_status(self, device: str, payload: bytes | bytearray) -> None:
        try:
            state = json.loads(payload.decode("utf-8")).get("state") if payload else None
        except (ValueError, RecursionError, AttributeError):
            return
        with self._status_seen:
            if state in ("online", "offline"):
                self._states[device] = state
                self._status_seen.notify_all()
            elif not payload:  # a cleared retained status: nothing is known
                self._states.pop(device, None)
