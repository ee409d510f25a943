"""`edgekit serve`: a device answering generation requests over MQTT v5.

Three threads, each with one job:

    paho network thread   on_message: validate, journal, queue (or queue an error reply)
            │  jobs                      never generates, never publishes
            ▼
    worker thread         owns the Model (not thread-safe): generates, queues chunks and
            │  outgoing                  the final reply
            ▼
    sender thread         the one place that publishes: replies, status, heartbeats;
                          turns PUBACKs into "sent" in the journal

Callbacks only put items on queues, so no callback publishes while holding a lock of
ours (a known way to deadlock paho). The journal (journal.py) makes accepted requests
and unacknowledged final replies survive a crash; see `recover()`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgekit.device import sysinfo
from edgekit.device.chat import ChatFormatError
from edgekit.device.generate import Completion, ContextLengthError, Model
from edgekit.device.mqtt import protocol as proto
from edgekit.device.mqtt.connection import BrokerConfig, make_connection
from edgekit.device.mqtt.journal import Journal

log = logging.getLogger("edgekit.mqtt")


@dataclass
class Limits:
    """What one device takes on; beyond any of these a request gets an error reply."""

    queue: int = 32  # requests waiting or running
    payload_bytes: int = 64 * 1024
    prompt_chars: int = 16_000
    max_new_tokens: int = 512
    request_s: float = 120.0  # generation is cut off (finish_reason "deadline") after this long


@dataclass
class ServiceConfig:
    device_id: str
    prefix: str = proto.DEFAULT_PREFIX
    group: str | None = proto.DEFAULT_GROUP  # shared-subscription group; None: device topic only
    journal: str | Path | None = None  # default: $XDG_STATE_HOME/edgekit/mqtt-{device_id}.sqlite
    limits: Limits = field(default_factory=Limits)
    heartbeat_s: float = 10.0
    session_expiry_s: int = 24 * 3600  # how long the broker queues requests for this device while it is away
    keep_done_s: float = 3600.0  # how long a done request is remembered to answer a repeat without generating

    def journal_path(self) -> Path:
        if self.journal is not None:
            return Path(self.journal)
        state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        return state / "edgekit" / f"mqtt-{self.device_id}.sqlite"


@dataclass
class _Job:
    key: tuple[str, bytes]  # (response topic, correlation data): the identity of a request
    request: proto.Request
    received: float  # unix time
    expires: float | None  # unix time: message expiry or deadline, whichever is first


@dataclass
class _Outgoing:
    topic: str
    payload: bytes
    correlation: bytes | None = None
    qos: int = 1
    retain: bool = False
    outbox_id: int | None = None  # journal row to delete when the broker acknowledges


@dataclass
class _Ack:
    mid: int


_STOP = object()


class Service:
    """One device serving a Model over MQTT. `start()` returns at once; `stop()` shuts down cleanly."""

    def __init__(self, model: Model, broker: BrokerConfig, config: ServiceConfig):
        for name, what in ((config.device_id, "device id"), (config.group, "group")):
            if name is not None:
                proto.check_topic_name(name, what)
        self.model = model
        self.config = config
        self.limits = config.limits
        self.topics = proto.Topics(config.prefix)
        self.device_id = config.device_id
        self.journal = Journal(config.journal_path())
        self._jobs: queue.Queue = queue.Queue()
        self._out: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # guards the sets below; never held while publishing
        self._in_flight: set[tuple[str, bytes]] = set()
        self._cancelled: set[tuple[str, bytes]] = set()
        self._stopping = threading.Event()
        self.ready = threading.Event()  # connected and subscribed
        self._sub_mid: int | None = None
        self.counts = {"served": 0, "errors": 0, "duplicates": 0, "dropped": 0}
        self._started = time.monotonic()
        self.conn = make_connection(broker, f"edgekit-{config.device_id}",
                                    session_expiry_s=config.session_expiry_s, clean_start=False)
        c = self.conn.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_connect_fail = lambda *_: log.warning("cannot reach the broker at %s; retrying with backoff", broker.url)
        # sent by the broker when the connection drops without a DISCONNECT (crash, power cut, network)
        c.will_set(self.topics.status(self.device_id), proto.status(self.device_id, online=False),
                   qos=1, retain=True)
        self._worker = threading.Thread(target=self._work, name="edgekit-worker", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="edgekit-sender", daemon=True)

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Recover what the journal holds, then connect and serve (in background threads)."""
        self.recover()
        self._worker.start()
        self._sender.start()
        self.conn.start()

    def recover(self) -> None:
        """Act on what a previous run left in the journal.

        Replies the broker never acknowledged are sent again. Requests accepted but not
        started are run, unless they have expired (expiry error); a request that was
        generating when the service died gets an "interrupted" error, since its streamed
        chunks cannot be taken back.
        """
        self.journal.prune(time.time() - self.config.keep_done_s)
        for r in self.journal.unsent():
            self._out.put(_Outgoing(r.topic, r.payload, r.correlation, outbox_id=r.id))
        for r in self.journal.unfinished():
            key = (r.response_topic, r.correlation)
            if r.state == "running":
                self._finish_error(key, proto.INTERRUPTED,
                                   "the service stopped while generating this answer; send the request again")
            elif r.expires is not None and time.time() >= r.expires:
                self._finish_error(key, proto.EXPIRED, "the request expired while the service was down")
            else:
                try:
                    request = proto.parse_request(r.payload, max(self.limits.payload_bytes, len(r.payload)))
                except proto.ProtocolError as e:  # accepted by an older configuration: still answer
                    self._finish_error(key, e.code, str(e))
                    continue
                with self._lock:
                    self._in_flight.add(key)
                self._jobs.put(_Job(key, request, r.received, r.expires))
        if self._jobs.qsize():
            log.info("resuming %d request(s) from the journal", self._jobs.qsize())

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the request being generated (up to `timeout`), leave queued ones in the
        journal for the next start, publish the offline status and disconnect."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if not self._worker.is_alive():  # never started
            self.journal.close()
            return
        self._jobs.put(_STOP)
        self._worker.join(timeout)
        self._out.put(_Outgoing(self.topics.status(self.device_id), proto.status(self.device_id, online=False),
                                retain=True))
        self._out.put(_STOP)
        self._sender.join(timeout)
        self.conn.stop()
        self.journal.close()

    def run_forever(self) -> None:
        """Serve until SIGINT or SIGTERM (the CLI and systemd use this)."""
        import signal

        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        while not done.wait(1.0):
            pass
        self.stop()

    # -- paho callbacks (network thread): no generation, no publishing ---------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("the broker refused the connection: %s", reason_code)
            return
        log.info("connected (session present: %s)", flags.session_present)
        # Subscribing again is harmless when the broker kept the session, and needed when it
        # did not (a broker restarted without persistence).
        subs = [(self.topics.device_requests(self.device_id), SubscribeOptions(qos=1)),
                (self.topics.cancel, SubscribeOptions(qos=1))]
        if self.config.group:
            subs.append((self.topics.shared_subscription(self.config.group), SubscribeOptions(qos=1)))
        _, self._sub_mid = client.subscribe(subs)
        m = self.model.manifest
        self._out.put(_Outgoing(self.topics.status(self.device_id), proto.status(
            self.device_id, online=True, model=_model_name(m), bundle_hash=self.model.bundle_hash,
            target=(m.target or {}).get("name"), context_length=self.model.context_length,
            group=self.config.group, max_new_tokens=self.limits.max_new_tokens), retain=True))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid != self._sub_mid:
            return
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:  # e.g. an ACL that does not let this device read its topics
            log.error("the broker refused subscriptions: %s; check the ACL for %s", refused, self.device_id)
        self.ready.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.ready.clear()
        if not self._stopping.is_set():
            log.warning("lost the broker (%s); reconnecting with backoff", reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if reason_code.is_failure:  # e.g. an ACL that forbids the reply topic: retrying would not help
            log.warning("the broker refused message %d: %s", mid, reason_code)
        self._out.put(_Ack(mid))

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == self.topics.cancel:
                self._handle_cancel(msg)
            else:
                self._handle_request(msg)
        except Exception:  # a bug here must not kill paho's network thread
            log.exception("could not handle a message on %s", msg.topic)

    def _handle_request(self, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        if not response_topic or any(c in response_topic for c in "+#"):
            self.counts["dropped"] += 1
            log.warning("dropped a request on %s with ResponseTopic %r: there is nowhere to reply",
                        msg.topic, response_topic)
            return
        if correlation is None:
            self._reply_error(response_topic, None, proto.INVALID,
                              "the request has no CorrelationData; set it so replies can be matched")
            return
        key = (response_topic, bytes(correlation))
        seen = self.journal.lookup(*key)
        if seen is not None:
            # QoS 1 may deliver a request twice, and clients repeat requests they got no answer to
            _, final = seen
            self.counts["duplicates"] += 1
            if final is not None:
                self._out.put(_Outgoing(response_topic, final, key[1]))
            return
        received = time.time()
        try:
            request = proto.parse_request(msg.payload, self.limits.payload_bytes)
            self._check_limits(request)
        except proto.ProtocolError as e:
            self._reply_error(response_topic, key[1], e.code, str(e))
            return
        expiry = getattr(props, "MessageExpiryInterval", None)
        ends = [t for t in (expiry and received + expiry, request.deadline) if t]
        expires = min(ends) if ends else None
        if request.deadline is not None and request.deadline <= received:
            self._reply_error(response_topic, key[1], proto.EXPIRED, "the request's deadline had passed on arrival")
            return
        with self._lock:
            full = len(self._in_flight) >= self.limits.queue
            if not full and not self._stopping.is_set():
                self._in_flight.add(key)
        if full:
            self._reply_error(response_topic, key[1], proto.QUEUE_FULL,
                              f"{self.limits.queue} requests are already queued on {self.device_id}; retry later")
            return
        # committed before this callback returns, i.e. before paho sends the PUBACK
        self.journal.accept(response_topic, key[1], msg.payload, received, expires)
        if not self._stopping.is_set():  # when stopping, the next start runs it from the journal
            self._jobs.put(_Job(key, request, received, expires))

    def _check_limits(self, r: proto.Request) -> None:
        lim = self.limits
        if r.prompt_chars() > lim.prompt_chars:
            raise proto.ProtocolError(proto.LIMIT, f"the prompt is {r.prompt_chars()} characters; "
                                                   f"this device takes up to {lim.prompt_chars}")
        if r.max_new_tokens is not None and r.max_new_tokens > lim.max_new_tokens:
            raise proto.ProtocolError(proto.LIMIT, f"max_new_tokens {r.max_new_tokens} is over this device's "
                                                   f"limit of {lim.max_new_tokens}")

    def _handle_cancel(self, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        key = (getattr(props, "ResponseTopic", None), getattr(props, "CorrelationData", None))
        if key[0] is None or key[1] is None:
            log.warning("ignored a cancel without the ResponseTopic and CorrelationData of its request")
            return
        proto.parse_cancel(msg.payload)
        key = (key[0], bytes(key[1]))
        with self._lock:
            if key in self._in_flight:  # requests served elsewhere, or already done, are not ours to cancel
                self._cancelled.add(key)

    # -- worker thread: owns the model --------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP or self._stopping.is_set():
                return  # what is still queued stays queued in the journal for the next start
            try:
                self._serve(job)
            except Exception as e:  # a bug must cost one request an error reply, not the service
                log.exception("request failed")
                self._finish_error(job.key, proto.INTERNAL, f"{type(e).__name__}: {e}")
            finally:
                with self._lock:
                    self._in_flight.discard(job.key)
                    self._cancelled.discard(job.key)

    def _serve(self, job: _Job) -> None:
        r, key = job.request, job.key
        started = time.time()
        if self._is_cancelled(key):
            return self._finish_done(job, started, None)
        if job.expires is not None and started >= job.expires:
            return self._finish_error(key, proto.EXPIRED, "the request expired while it waited in the queue")
        self.journal.mark_running(*key)
        max_new = r.max_new_tokens or min(self.model.manifest.generation.get("max_new_tokens", 256),
                                          self.limits.max_new_tokens)
        try:
            stream = self.model.stream(r.prompt if r.prompt is not None else r.messages, max_new_tokens=max_new,
                                       temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                       repetition_penalty=r.repetition_penalty, seed=r.seed, stop=r.stop)
        except ContextLengthError as e:
            return self._finish_error(key, proto.LIMIT, str(e))
        except (ChatFormatError, ValueError) as e:
            return self._finish_error(key, proto.INVALID, str(e))
        cutoff = started + self.limits.request_s
        if r.deadline is not None:
            cutoff = min(cutoff, r.deadline)
        chunks = 0
        for piece in stream:
            if r.stream:
                self._out.put(_Outgoing(key[0], proto.chunk(chunks, piece), key[1]))
                chunks += 1
            if stream.stop_reason is None:
                if self._is_cancelled(key):
                    stream.stop("cancelled")
                elif time.time() >= cutoff:
                    stream.stop("deadline")
        self._finish_done(job, started, stream.completion, chunks)

    def _is_cancelled(self, key) -> bool:
        with self._lock:
            return key in self._cancelled

    def _finish_done(self, job: _Job, started: float, completion: Completion | None, chunks: int = 0) -> None:
        """Send the final message; no completion means the request was cancelled before it started."""
        end = time.time()
        timing = {"queue_s": round(started - job.received, 4), "total_s": round(end - started, 4)}
        text, reason, usage = "", "cancelled", {}
        if completion is not None:
            s = completion.stats
            text, reason = completion.text, completion.finish_reason
            usage = {"prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens,
                     "completion_tokens": len(completion.token_ids)}
            timing.update(ttft_s=round(s.time_to_first_token_s, 4), prefill_s=round(s.prefill_s, 4),
                          decode_tokens_per_s=round(s.decode_tokens_per_s, 1))
        final = proto.done(chunks, text, reason, self.device_id, usage, timing)
        oid = self.journal.finish(*job.key, final)
        self.counts["served"] += 1
        self._out.put(_Outgoing(job.key[0], final, job.key[1], outbox_id=oid))

    def _finish_error(self, key: tuple[str, bytes], code: str, message: str) -> None:
        """Answer an accepted request with an error (it is then done in the journal)."""
        final = proto.error(code, message, self.device_id)
        oid = self.journal.finish(*key, final)
        self.counts["errors"] += 1
        self._out.put(_Outgoing(key[0], final, key[1], outbox_id=oid))

    def _reply_error(self, topic: str, correlation: bytes | None, code: str, message: str) -> None:
        """Answer a request that was not accepted (malformed, over a limit, queue full)."""
        log.info("refused a request (%s): %s", code, message)
        payload = proto.error(code, message, self.device_id)
        oid = self.journal.add_reply(topic, correlation, payload)
        self.counts["errors"] += 1
        self._out.put(_Outgoing(topic, payload, correlation, outbox_id=oid))

    # -- sender thread: the one place that publishes -------------------------------------

    def _send_loop(self) -> None:
        waiting: dict[int, int] = {}  # paho message id -> journal outbox id, until the PUBACK
        next_beat = next_prune = time.monotonic()
        drain_until = None
        while True:
            now = time.monotonic()
            if drain_until is not None and (not waiting or now >= drain_until or not self.ready.is_set()):
                return  # unacknowledged replies stay in the journal's outbox for the next start
            if now >= next_beat and drain_until is None:
                self._publish(_Outgoing(self.topics.heartbeat(self.device_id), self._heartbeat(), qos=0))
                next_beat = now + self.config.heartbeat_s
            if now >= next_prune:  # keep the journal to what a repeat may still need
                self.journal.prune(time.time() - self.config.keep_done_s)
                next_prune = now + 60.0
            try:
                item = self._out.get(timeout=max(0.05, min(next_beat, drain_until or next_beat) - now))
            except queue.Empty:
                continue
            if item is _STOP:
                drain_until = now + 5.0  # wait a little for the PUBACKs of the last replies
            elif isinstance(item, _Ack):
                oid = waiting.pop(item.mid, None)
                if oid is not None:
                    self.journal.sent(oid)
            else:
                info = self._publish(item)
                if info is not None and item.outbox_id is not None:
                    waiting[info.mid] = item.outbox_id

    def _publish(self, item: _Outgoing) -> mqtt.MQTTMessageInfo | None:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        if item.correlation is not None:
            props.CorrelationData = item.correlation
        try:
            # QoS 1 while disconnected: paho queues the message and sends it after reconnecting
            return self.conn.client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain,
                                            properties=props)
        except Exception:
            log.exception("could not publish to %s", item.topic)
            return None

    def _heartbeat(self) -> bytes:
        with self._lock:
            depth = len(self._in_flight)
        try:
            load1 = os.getloadavg()[0]
        except OSError:
            load1 = None
        return proto.heartbeat(self.device_id, time=round(time.time(), 3), queue_depth=depth,
                               queue_limit=self.limits.queue, uptime_s=round(time.monotonic() - self._started, 1),
                               load1=load1, rss_mb=sysinfo.rss_mb(), cpu_temp_c=sysinfo.cpu_temperature_c(),
                               **self.counts)


def _model_name(manifest) -> str | None:
    source = manifest.source or {}
    return source.get("spec") or (Path(source["name_or_path"]).name if source.get("name_or_path") else None)
