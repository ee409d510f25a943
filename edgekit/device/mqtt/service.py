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

Every request with a usable ResponseTopic gets exactly one final reply (done or error),
whatever its payload and whatever fails while taking it. The ResponseTopic is chosen by
the sender, so replies go only below the reply prefix (`ServiceConfig.reply_prefix`) and
never onto the protocol's own topics; a request naming another topic is dropped with a log line.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgekit.device import sysinfo
from edgekit.device.bundle import Manifest
from edgekit.device.chat import ChatFormatError
from edgekit.device.constrain import ConstraintError
from edgekit.device.generate import Completion, ContextLengthError, Model
from edgekit.device.mqtt import protocol as proto
from edgekit.device.mqtt.connection import BrokerConfig, connect_failure, make_connection
from edgekit.device.mqtt.journal import Journal, JournaledRequest, JournalError, OutboxReply, lock, move_aside, salvage

log = logging.getLogger("edgekit.mqtt")


@dataclass
class Limits:
    """What one device takes on; beyond any of these a request gets an error reply."""

    queue: int = 32  # requests waiting or running
    payload_bytes: int = 64 * 1024
    prompt_chars: int = 16_000
    max_new_tokens: int = 512
    request_s: float = 120.0  # generation is cut off (finish_reason "deadline") after this long

    def __post_init__(self) -> None:
        for name in ("queue", "payload_bytes", "prompt_chars", "max_new_tokens"):
            proto.check_positive(f"limits.{name}", getattr(self, name), integer=True)
        proto.check_positive("limits.request_s", self.request_s)


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
    reply_prefix: str | None = None  # replies go only to topics below it; None: {prefix}/reply
    reset_journal: bool = False  # a damaged journal: move it aside and start a new one (else JournalError)

    def __post_init__(self) -> None:
        proto.check_positive("heartbeat_s", self.heartbeat_s)
        proto.check_positive("keep_done_s", self.keep_done_s)
        proto.check_positive("session_expiry_s", self.session_expiry_s, integer=True, zero_ok=True,
                             below=2**32)  # a four-byte MQTT property

    def replies_below(self) -> str:
        """The reply prefix in force (without a trailing '/')."""
        return (self.reply_prefix or proto.Topics(self.prefix).reply_tree).rstrip("/")

    def journal_path(self) -> Path:
        if self.journal is not None:
            return Path(self.journal)
        state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        return state / "edgekit" / f"mqtt-{self.device_id}.sqlite"


STOPPED_MID_ANSWER = "the service stopped while generating this answer; send the request again"
# cancels remembered for requests not (yet) taken: one that overtook its request (a broker's other route,
# a shared subscription's redelivery) still cancels it; the others were for other devices, and age out
EARLY_CANCELS = 256


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
        proto.check_topic_prefix(config.prefix, "topic prefix")
        self.topics = proto.Topics(config.prefix)
        self.reply_prefix = config.replies_below()
        proto.check_reply_prefix(self.reply_prefix, self.topics)
        self.model = model
        self.config = config
        self.limits = config.limits
        self.device_id = config.device_id
        self.journal = self._open_journal()
        self._jobs: queue.Queue = queue.Queue()
        self._out: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # guards the sets and the dict below; never held while publishing
        self._in_flight: set[tuple[str, bytes]] = set()
        self._cancelled: set[tuple[str, bytes]] = set()
        self._early_cancels: OrderedDict[tuple[str, bytes], None] = OrderedDict()  # oldest first
        self._stopping = threading.Event()
        self._interrupt = threading.Event()  # stop() waited long enough: end the answer being generated
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
        c.on_connect_fail = self._on_connect_fail
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
        chunks cannot be taken back. Replies to a topic the reply prefix no longer allows are
        dropped (the configuration changed since).
        """
        self.journal.prune(time.time() - self.config.keep_done_s)
        for reply in self.journal.unsent():
            try:
                self._resend(reply)
            except Exception as e:  # noqa: BLE001 (a row that reads but makes no sense: damage sqlite cannot see)
                log.warning("dropped a damaged journaled reply (%s: %s)", type(e).__name__, e)
                self.journal.sent(reply.id)
        for request in self.journal.unfinished():
            try:
                self._resume(request)
            except Exception as e:  # noqa: BLE001 (the same, for a request)
                self._give_up_on(request, f"{type(e).__name__}: {e}")
        if self._jobs.qsize():
            log.info("resuming %d request(s) from the journal", self._jobs.qsize())

    def _resend(self, r: OutboxReply) -> None:
        if (problem := proto.reply_topic_problem(r.topic, self.reply_prefix, self.topics)) is not None:
            log.warning("not re-sending a journaled reply to %s: %s", proto.show(r.topic), problem)
            self.journal.sent(r.id)
            return
        self._out.put(_Outgoing(r.topic, _blob(r.payload), None if r.correlation is None else _blob(r.correlation),
                                outbox_id=r.id))

    def _resume(self, r: JournaledRequest) -> None:
        """Run, expire or interrupt one request the previous run left unfinished."""
        key = (r.response_topic, _blob(r.correlation))
        if (problem := proto.reply_topic_problem(r.response_topic, self.reply_prefix, self.topics)) is not None:
            log.warning("not resuming a journaled request for %s: %s", proto.show(r.response_topic), problem)
            self.journal.drop(*key)
        elif r.state == "running":
            self._finish_error(key, proto.INTERRUPTED, STOPPED_MID_ANSWER)
        elif r.expires is not None and time.time() >= float(r.expires):
            self._finish_error(key, proto.EXPIRED, "the request expired while the service was down")
        else:
            payload = _blob(r.payload)
            try:
                request = proto.parse_request(payload, max(self.limits.payload_bytes, len(payload)))
            except proto.ProtocolError as e:  # accepted by an older configuration: still answer
                self._finish_error(key, e.code, str(e))
                return
            with self._lock:
                self._in_flight.add(key)
                if r.state == "cancelled":  # cancelled while queued, before the last stop: answered so
                    self._cancelled.add(key)
            self._jobs.put(_Job(key, request, float(r.received), None if r.expires is None else float(r.expires)))

    def _give_up_on(self, r: JournaledRequest, reason: str) -> None:
        """A journaled request whose row reads but makes no sense: answer it "interrupted" when it
        says where to, else forget it."""
        log.warning("a journaled request is damaged (%s); answering it 'interrupted' where possible", reason)
        if isinstance(r.correlation, bytes) and isinstance(r.response_topic, str) and \
                proto.reply_topic_problem(r.response_topic, self.reply_prefix, self.topics) is None:
            self._finish_error((r.response_topic, r.correlation), proto.INTERRUPTED,
                               "the device's journal entry for this request was damaged; send it again")
        else:
            self.journal.drop(r.response_topic, r.correlation)

    def _open_journal(self) -> Journal:
        """The journal; a damaged one is moved aside when config.reset_journal says so (else JournalError).

        Starting over answers "interrupted" to each request the damaged file still shows as
        not done, and sends again the intact replies it had not delivered.
        """
        path = self.config.journal_path()
        self._journal_lock = lock(path)  # first: a second service with this device id stops here
        try:
            return Journal(path)
        except JournalError as e:
            if not (e.damaged and self.config.reset_journal):
                raise
            reason = e.reason
        try:
            moved = move_aside(path)
        except OSError as e:
            raise JournalError(path, f"damaged ({reason}), and moving it aside failed: {e}", damaged=False) from None
        found = salvage(moved)
        journal = Journal(path)
        lost = proto.error(proto.INTERRUPTED, "the device's journal was damaged and this request was lost with it; "
                                              "send it again", self.device_id)
        for topic, correlation in found.unfinished:
            journal.accept(topic, correlation, b"", time.time(), None)
            journal.finish(topic, correlation, lost)
        resent = 0
        for r in found.unsent:
            try:
                proto.parse_reply(r.payload)  # damage can leave a row that reads but is not a reply
            except proto.ProtocolError:
                continue
            journal.add_reply(r.topic, r.correlation, r.payload)
            resent += 1
        log.warning("the journal %s was damaged (%s): moved it to %s and started a new one; %d request(s) in it "
                    "will be answered 'interrupted', %d unsent repl(ies) sent again%s", path, reason, moved,
                    len(found.unfinished), resent, f" (read stopped at: {found.problem})" if found.problem else "")
        return journal

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the request being generated (up to `timeout`, then it is answered "interrupted"),
        leave queued ones in the journal for the next start, publish the offline status and disconnect."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if not self._worker.is_alive():  # never started
            self.journal.close()
            self._journal_lock.close()
            return
        self._jobs.put(_STOP)
        self._worker.join(timeout)
        if self._worker.is_alive():  # a long answer: end it at its next token (a process must not exit under
            self._interrupt.set()    # onnxruntime's threads: that aborts it, SIGABRT instead of a clean stop)
            self._worker.join()
        self._out.put(_Outgoing(self.topics.status(self.device_id), proto.status(self.device_id, online=False),
                                retain=True))
        self._out.put(_STOP)
        self._sender.join(timeout)
        self.conn.stop()
        self.journal.close()
        self._journal_lock.close()

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
        # did not (a broker restarted without persistence). Requests retained on the broker are not
        # wanted (retainHandling 2): one would be run again at every connect.
        requests = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        subs = [(self.topics.device_requests(self.device_id), requests),
                (self.topics.cancel, SubscribeOptions(qos=1))]
        if self.config.group:
            subs.append((self.topics.shared_subscription(self.config.group), requests))
        # the broker keeps a session's subscriptions across restarts: those of an earlier --group or
        # --prefix would still bring requests
        filters = {topic for topic, _ in subs}
        stale = self.journal.subscriptions() - filters
        if stale:
            client.unsubscribe(sorted(stale))
        self.journal.set_subscriptions(filters)
        _, self._sub_mid = client.subscribe(subs)
        m = self.model.manifest
        self._out.put(_Outgoing(self.topics.status(self.device_id), proto.status(
            self.device_id, online=True, model=_model_name(m), bundle_hash=self.model.bundle_hash,
            target=m.target.name, context_length=self.model.context_length,
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
        error = self.conn.take_error()
        if not self._stopping.is_set():
            log.warning("lost the broker (%s%s); reconnecting with backoff", reason_code, f": {error}" if error else "")

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its `except OSError:` around the connect, so the exception being
        # handled is the reason (a refused TLS certificate, a refused connection, ...)
        log.warning("cannot connect to the broker at %s: %s; retrying with backoff", self.conn.config.url,
                    connect_failure(sys.exc_info()[1]))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if reason_code.is_failure:  # e.g. an ACL that forbids the reply topic: retrying would not help
            log.warning("the broker refused message %d: %s", mid, reason_code)
        self._out.put(_Ack(mid))

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        # a bug here must not kill paho's network thread: log it (a request still gets its reply)
        try:
            if msg.topic == self.topics.cancel:
                self._handle_cancel(msg)
            elif msg.retain:  # a retained request, replayed by the broker to every new subscription
                self.counts["dropped"] += 1
                log.warning("ignored a retained request on %s: publish requests without retain", msg.topic)
            elif msg.topic in self._request_topics():
                self._handle_request(msg)
            else:  # a subscription of an earlier --group or --prefix, until the broker drops it
                self.counts["dropped"] += 1
                log.warning("ignored a message on %s, which this service does not serve", proto.show(msg.topic))
        except Exception:
            log.exception("could not handle a message on %s", proto.show(msg.topic))

    def _handle_request(self, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None)
        problem = proto.reply_topic_problem(response_topic, self.reply_prefix, self.topics)
        if problem is not None:
            self.counts["dropped"] += 1
            log.warning("dropped a request on %s with ResponseTopic %s: %s", msg.topic, proto.show(response_topic),
                        problem)
            return
        assert response_topic is not None  # reply_topic_problem refuses a missing one
        correlation = getattr(props, "CorrelationData", None)
        correlation = None if correlation is None else bytes(correlation)
        try:
            self._take_request(msg, response_topic, correlation)
        except Exception as e:  # a bug, or a journal that fails: the request still gets its one final reply
            log.exception("could not take a request on %s", msg.topic)
            self._reply_error(response_topic, correlation, proto.INTERNAL, f"{type(e).__name__}: {e}")

    def _take_request(self, msg: mqtt.MQTTMessage, response_topic: str, correlation: bytes | None) -> None:
        """Answer, refuse or queue one request; raises only before it is queued (then nothing was sent)."""
        if correlation is None:
            self._reply_error(response_topic, None, proto.INVALID,
                              "the request has no CorrelationData; set it so replies can be matched")
            return
        key = (response_topic, correlation)
        seen = self.journal.lookup(*key)
        if seen is not None:
            # QoS 1 may deliver a request twice, and clients repeat requests they got no answer to
            _, final = seen
            self.counts["duplicates"] += 1
            if final is not None:
                self._out.put(_Outgoing(response_topic, final, correlation))
            return
        received = time.time()
        try:
            request = proto.parse_request(msg.payload, self.limits.payload_bytes)
            self._check_limits(request)
        except proto.ProtocolError as e:
            self._reply_error(response_topic, correlation, e.code, str(e))
            return
        expiry = getattr(msg.properties, "MessageExpiryInterval", None)
        ends = [t for t in (expiry and received + expiry, request.deadline) if t]
        expires = min(ends) if ends else None
        if request.deadline is not None and request.deadline <= received:
            self._reply_error(response_topic, correlation, proto.EXPIRED,
                              "the request's deadline had passed on arrival")
            return
        with self._lock:
            full = len(self._in_flight) >= self.limits.queue
            if not full and not self._stopping.is_set():
                self._in_flight.add(key)
            cancelled = key in self._early_cancels
            self._early_cancels.pop(key, None)
            if cancelled and not full:
                self._cancelled.add(key)  # answered `cancelled` when its turn comes, without generating
        if full:
            self._reply_error(response_topic, correlation, proto.QUEUE_FULL,
                              f"{self.limits.queue} requests are already queued on {self.device_id}; retry later")
            return
        try:
            # committed before this callback returns, i.e. before paho sends the PUBACK
            self.journal.accept(response_topic, correlation, msg.payload, received, expires)
            if cancelled:
                self.journal.cancel(*key)
        except BaseException:
            with self._lock:
                self._in_flight.discard(key)
                self._cancelled.discard(key)
            raise
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
        # anyone on the bus can publish here: a malformed cancel costs one log line, never a traceback
        props = msg.properties
        key = (getattr(props, "ResponseTopic", None), getattr(props, "CorrelationData", None))
        if key[0] is None or key[1] is None:
            self.counts["dropped"] += 1
            log.warning("ignored a cancel without the ResponseTopic and CorrelationData of its request")
            return
        try:
            proto.parse_cancel(msg.payload)
        except proto.ProtocolError as e:
            self.counts["dropped"] += 1
            log.warning("ignored a malformed cancel for %s: %s", proto.show(key[0]), e)
            return
        key = (key[0], bytes(key[1]))
        with self._lock:
            if key not in self._in_flight:  # not ours (yet): served elsewhere, already done, or still to come
                self._early_cancels[key] = None
                self._early_cancels.move_to_end(key)
                while len(self._early_cancels) > EARLY_CANCELS:
                    self._early_cancels.popitem(last=False)
                return
            self._cancelled.add(key)
        self.journal.cancel(*key)  # a queued one stays cancelled across a restart

    def _request_topics(self) -> tuple[str, ...]:
        """The topics requests to this service arrive on (a shared subscription's without its $share/)."""
        own = self.topics.device_requests(self.device_id)
        return (own, self.topics.fleet_requests) if self.config.group else (own,)

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
                try:
                    self._finish_error(job.key, proto.INTERNAL, f"{type(e).__name__}: {e}")
                except Exception:  # the worker must outlive anything: it serves every later request
                    log.exception("could not answer a failed request")
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
        max_new = r.max_new_tokens or min(self.model.manifest.generation.max_new_tokens,
                                          self.limits.max_new_tokens)
        prompt = r.prompt if r.prompt is not None else r.messages
        assert prompt is not None  # parse_request takes exactly one of the two
        try:
            stream = self.model.stream(prompt, max_new_tokens=max_new, stop=r.stop, **r.sampling(), **r.constraint())
        except ContextLengthError as e:
            return self._finish_error(key, proto.LIMIT, str(e))
        except ConstraintError as e:
            return self._finish_error(key, proto.SCHEMA, str(e))
        except (ChatFormatError, ValueError) as e:
            return self._finish_error(key, proto.INVALID, str(e))
        cutoff = started + self.limits.request_s
        if r.deadline is not None:
            cutoff = min(cutoff, r.deadline)
        chunks = 0
        try:
            for piece in stream:
                if r.stream:
                    self._out.put(_Outgoing(key[0], proto.chunk(chunks, piece), key[1]))
                    chunks += 1
                if stream.stop_reason is None:
                    if self._is_cancelled(key):
                        stream.stop("cancelled")
                    elif time.time() >= cutoff:
                        stream.stop("deadline")
                    elif self._interrupt.is_set():
                        stream.stop("interrupted")
        except ConstraintError as e:  # a grammar with a dead end part-way (the first step's is refused above)
            return self._finish_error(key, proto.SCHEMA, str(e))
        if stream.stop_reason == "interrupted":
            return self._finish_error(key, proto.INTERRUPTED, STOPPED_MID_ANSWER)
        self._finish_done(job, started, stream.completion, chunks)

    def _is_cancelled(self, key) -> bool:
        with self._lock:
            return key in self._cancelled

    def _finish_done(self, job: _Job, started: float, completion: Completion | None, chunks: int = 0) -> None:
        """Send the final message; no completion means the request was cancelled before it started."""
        end = time.time()
        timing = {"queue_s": round(started - job.received, 4), "total_s": round(end - started, 4)}
        text, reason, usage, valid, calls, logprobs = "", "cancelled", {}, None, None, None
        if completion is not None:
            valid, calls, logprobs = completion.valid, completion.tool_calls, completion.logprobs
            s = completion.stats
            text, reason = completion.text, completion.finish_reason
            usage = {"prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens,
                     "completion_tokens": len(completion.token_ids)}
            timing.update(ttft_s=round(s.time_to_first_token_s, 4), prefill_s=round(s.prefill_s, 4),
                          decode_tokens_per_s=round(s.decode_tokens_per_s, 1))
        final = proto.done(chunks, text, reason, self.device_id, usage, timing, valid, calls, logprobs)
        self.counts["served"] += 1
        self._send_final(job.key, final, lambda: self.journal.finish(*job.key, final))

    def _finish_error(self, key: tuple[str, bytes], code: str, message: str) -> None:
        """Answer an accepted request with an error (it is then done in the journal)."""
        final = proto.error(code, message, self.device_id)
        self.counts["errors"] += 1
        self._send_final(key, final, lambda: self.journal.finish(*key, final))

    def _reply_error(self, topic: str, correlation: bytes | None, code: str, message: str) -> None:
        """Answer a request that was not accepted (malformed, over a limit, queue full)."""
        log.info("refused a request (%s): %s", code, message)
        payload = proto.error(code, message, self.device_id)
        self.counts["errors"] += 1
        self._send_final((topic, correlation), payload, lambda: self.journal.add_reply(topic, correlation, payload))

    def _send_final(self, key: tuple[str, bytes | None], final: bytes, journal_it: Callable[[], int]) -> None:
        """Journal a final reply with `journal_it()` (which returns its outbox id), then queue it for sending.

        A journal that fails (a full or failing disk) costs the reply its durability, not the reply.
        """
        try:
            oid = journal_it()
        except sqlite3.Error as e:
            log.error("could not journal the reply to %s (%s); sending it unjournaled", proto.show(key[0]), e)
            oid = None
        self._out.put(_Outgoing(key[0], final, key[1], outbox_id=oid))

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
                self._journal_quietly(self.journal.prune, time.time() - self.config.keep_done_s)
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
                    self._journal_quietly(self.journal.sent, oid)
            else:
                info = self._publish(item)
                if info is not None and item.outbox_id is not None:
                    waiting[info.mid] = item.outbox_id

    def _journal_quietly(self, op, *args) -> None:
        """A journal write from the sender, whose thread must outlive a failing disk (it sends every reply)."""
        try:
            op(*args)
        except sqlite3.Error as e:
            log.error("the journal failed (%s): %s", op.__name__, e)

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


def _blob(value) -> bytes:
    """A journal BLOB as bytes; TypeError for anything else (damage can leave a number or a text there)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes in the journal, found {type(value).__name__}")
    return bytes(value)


def _model_name(manifest: Manifest) -> str | None:
    """The model as a fleet sees it: the shipped name or relative path export was given; of an absolute
    path only its last part (the folder or .gguf file), not a path on the host that exported it."""
    name = manifest.source.spec or manifest.source.name_or_path
    return (Path(name).name if Path(name).is_absolute() else name) or None
