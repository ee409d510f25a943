"""The MQTT service against what an untrusted bus and a broken disk can do, on a real Mosquitto.

Every behaviour here is about MQTT, so every test runs a real broker (tests/mqtt_broker.py) and
the real runtime on the tiny bundle: one final reply per request whatever its payload, replies
confined to the reply prefix, a damaged journal at start, TLS failures said with their reason,
malformed cancels, and `edgekit ask` to a device that is not online. Tests wait for events
(messages, log lines, exits), never for a fixed time.
"""

from __future__ import annotations

import functools
import json
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, example, given, settings
from mqtt_broker import Broker, Listener, LogWatch, make_certs, service_env
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_mqtt_properties import payloads

from edgekit.device.mqtt import BrokerConfig, Client, Limits, RequestError, Topics
from edgekit.device.mqtt.connection import make_connection
from edgekit.device.mqtt.journal import Journal

T = Topics()
REFUSED = {"invalid_request", "unsupported_version", "too_large", "limit_exceeded", "expired"}  # never "internal"


@pytest.fixture
def serve(serve):
    """conftest's serve, with a heartbeat every 0.2 s."""
    return functools.partial(serve, heartbeat_s=0.2)


def publisher(config: BrokerConfig, client_id: str) -> mqtt.Client:
    """A plain paho client, connected: to publish what the edgekit Client never would."""
    conn = make_connection(config, client_id, session_expiry_s=0, clean_start=True)
    conn.start()
    deadline = time.monotonic() + 10
    while not conn.client.is_connected():
        assert time.monotonic() < deadline, "the publisher could not connect"
        time.sleep(0.01)
    return conn.client


def publish(client: mqtt.Client, topic: str, payload: bytes, response_topic: str | None,
            correlation: bytes | None) -> None:
    props = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)


def finals(messages) -> Counter:
    """How many final replies (done or error) the wire carried for each CorrelationData."""
    out: Counter = Counter()
    for m in messages:
        if b'"type":"done"' in m.payload or b'"type":"error"' in m.payload:
            out[getattr(m.properties, "CorrelationData", None)] += 1
    return out


# -- one final reply per request ------------------------------------------------------

MALFORMED = {
    "deeply nested": b"[" * 60_000,
    "deeply nested field": b'{"v": 1, "prompt": "hi", "stop": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    "5000-digit integer": b'{"v": 1, "prompt": "hi", "seed": ' + b"9" * 5000 + b"}",
    "integer over a double": b'{"v": 1, "prompt": "hi", "temperature": 1' + b"0" * 400 + b"}",
    "lone surrogate": b'{"v": 1, "prompt": "\\udcff"}',
    "lone surrogate in a message": b'{"v": 1, "messages": [{"role": "user", "content": "a\\ud800"}]}',
    "lone surrogate in a stop": b'{"v": 1, "prompt": "hi", "stop": ["\\udfff"]}',
    "empty prompt": b'{"v": 1, "prompt": ""}',
    "v true": b'{"v": true, "prompt": "hi"}',
    "v 1.0": b'{"v": 1.0, "prompt": "hi"}',
    "bool max_new_tokens": b'{"v": 1, "prompt": "hi", "max_new_tokens": true}',
    "bool seed": b'{"v": 1, "prompt": "hi", "seed": false}',
    "tiny temperature": b'{"v": 1, "prompt": "hi", "temperature": 1e-300}',
    "subnormal temperature": b'{"v": 1, "prompt": "hi", "temperature": 5e-324}',
    "tiny penalty": b'{"v": 1, "prompt": "hi", "repetition_penalty": 1e-300}',
    "huge penalty": b'{"v": 1, "prompt": "hi", "repetition_penalty": 1e300}',
    "NaN temperature": b'{"v": 1, "prompt": "hi", "temperature": NaN}',
    "infinite top_p": b'{"v": 1, "prompt": "hi", "top_p": Infinity}',
    "infinite deadline": b'{"v": 1, "prompt": "hi", "deadline": -Infinity}',
    "overflowing penalty": b'{"v": 1, "prompt": "hi", "repetition_penalty": 1e999}',
    "empty role": b'{"v": 1, "messages": [{"role": "", "content": "hi"}]}',
    "a token id past the vocabulary": b'{"v": 1, "prompt": "hi", "logit_bias": {"99999": 5}}',
    "a superscript digit as a token id": '{"v": 1, "prompt": "hi", "logit_bias": {"²": 5}}'.encode(),
}


def test_malformed_payloads_of_every_class_each_get_one_refusal_never_internal(broker, serve):
    service = serve(broker.config(), limits=Limits(max_new_tokens=4))
    topic = T.device_requests("arm-01")
    with Listener(broker.config(), ["edgekit/reply/#"]) as wire, \
            Client(broker.config(), timeout=20, retry_s=120) as client:
        pendings = {name: client.send_raw(topic, payload) for name, payload in MALFORMED.items()}
        codes = {}
        for name, pending in pendings.items():
            with pytest.raises(RequestError) as e:
                pending.result()
            codes[name] = (e.value.code, e.value.message)
        sentinel = client.ask("Robots", device_id="arm-01", max_new_tokens=2)  # still serving
        wire.wait_for(lambda msgs: sum(finals(msgs).values()) >= len(MALFORMED) + 1, timeout=10)
        counts = finals(wire.messages)
    assert {name: code for name, (code, _) in codes.items()} == dict.fromkeys(MALFORMED, "invalid_request"), codes
    assert all("\n" not in message for _, message in codes.values())
    assert [counts[p.correlation] for p in pendings.values()] == [1] * len(MALFORMED)
    assert sentinel.finish_reason in ("length", "eos")
    assert service.counts["errors"] == len(MALFORMED)


def test_any_payload_gets_exactly_one_final_reply_through_the_broker(broker, serve):
    """The parser's property, end to end: whatever hypothesis sends, one final reply, never `internal`."""
    serve(broker.config(), limits=Limits(max_new_tokens=3, payload_bytes=1 << 20))
    topic = T.device_requests("arm-01")
    sent: dict[bytes, str] = {}
    with Listener(broker.config(), ["edgekit/reply/#"]) as wire, \
            Client(broker.config(), timeout=30, retry_s=300) as client:

        @settings(max_examples=60, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(payload=payloads)
        @example(payload=b'{"v":1,"prompt":"\\u0016","stream":false}')  # tokenizes to nothing: was `internal`
        def one_final_reply(payload):
            pending = client.send_raw(topic, payload)
            try:
                outcome = pending.result().finish_reason
            except RequestError as e:
                assert e.code in REFUSED, (e.code, e.message, payload[:200])
                outcome = e.code
            sent[pending.correlation] = outcome

        one_final_reply()
        # the last reply is in: every earlier one was published before it, on the same topic
        wire.wait_for(lambda msgs: sum(finals(msgs).values()) >= len(sent), timeout=10)
        counts = finals(wire.messages)
    assert sent and all(counts[c] == 1 for c in sent), {c: counts[c] for c in sent if counts[c] != 1}


# -- the ResponseTopic is untrusted ----------------------------------------------------


def test_a_response_topic_outside_the_reply_prefix_gets_nothing_published_there(tmp_path, serve):
    """With the ACL of docs/mqtt.md: a client that may not write arm-01's status cannot make arm-01 write it."""
    from test_mqtt_service import docs_acl

    broker = Broker(tmp_path / "broker", users={"arm-01": "a", "planner": "p", "watch": "w"},
                    acl=docs_acl() + "\nuser watch\ntopic read #\n")
    broker.start()
    try:
        service = serve(broker.config("arm-01", "a"))
        hijacks = [T.status("arm-01"), T.heartbeat("arm-01"), T.device_requests("arm-01"), T.fleet_requests,
                   T.cancel, T.status("arm-02"), "edgekit/reply", "edgekit/replyx/planner", "robot/arm-01/command",
                   "edgekit/dev/arm-01/status/x"]
        with Listener(broker.config("watch", "w"), ["#"], client_id="watch") as wire:
            bus = publisher(broker.config("planner", "p"), "planner")
            try:
                for i, topic in enumerate(hijacks):
                    publish(bus, T.device_requests("arm-01"), b'{"v": 1, "prompt": "hi", "max_new_tokens": 2}',
                            topic, b"hijack-%d" % i)
            finally:
                bus.disconnect()
            # the heartbeat counts what was dropped: wait for all of them rather than for a while
            wire.wait_for(lambda msgs: any(m.topic == T.heartbeat("arm-01") and json.loads(m.payload)["dropped"]
                                           >= len(hijacks) for m in msgs), timeout=20)
            with Client(broker.config("planner", "p"), client_id="planner", device_id="arm-01", timeout=20) as c:
                assert c.ask("Robots", max_new_tokens=2).device_id == "arm-01"  # a real reply topic still works
            hijacked = [m.topic for m in wire.messages
                        if (getattr(m.properties, "CorrelationData", b"") or b"").startswith(b"hijack")
                        and m.topic != T.device_requests("arm-01")]
        assert hijacked == []
        assert service.counts["dropped"] == len(hijacks)
        with Listener(broker.config("watch", "w"), [T.status("arm-01")], client_id="late") as late:
            late.wait_for(lambda msgs: msgs, timeout=10)
            assert [json.loads(m.payload)["state"] for m in late.messages] == ["online"]
    finally:
        broker.kill()


def test_a_configured_reply_prefix_is_the_only_place_replies_go(broker, serve):
    serve(broker.config(), reply_prefix="plant7/answers/")
    with Listener(broker.config(), ["#"], client_id="watch") as wire:
        bus = publisher(broker.config(), "raw")
        try:
            publish(bus, T.device_requests("arm-01"), b'{"v": 1, "prompt": "hi", "max_new_tokens": 2}',
                    "edgekit/reply/me", b"default-tree")
            publish(bus, T.device_requests("arm-01"), b'{"v": 1, "prompt": "hi", "max_new_tokens": 2}',
                    "plant7/answers/me", b"configured-tree")
        finally:
            bus.disconnect()
        wire.wait_for(lambda msgs: finals(msgs)[b"configured-tree"] == 1, timeout=20)
        wire.wait_for(lambda msgs: any(m.topic == T.heartbeat("arm-01") and json.loads(m.payload)["dropped"] >= 1
                                       for m in msgs), timeout=20)
        assert finals(wire.messages)[b"default-tree"] == 0


# -- a damaged journal ------------------------------------------------------------------


def serve_process(bundle, broker: Broker, journal: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgekit", "serve", str(bundle), "--broker", broker.url, "--device-id", "arm-01",
         "--journal", str(journal), "--heartbeat", "1", "--threads", "1", *extra],
        env=service_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def a_journal_with_requests(path: Path, topic: str, correlations: list[bytes]) -> None:
    """What a run that died leaves: accepted requests, the first one generating, plenty of done ones."""
    j = Journal(path)
    for i in range(150):  # enough rows for the file to span many pages
        j.accept("edgekit/reply/old", b"old-%d" % i, b'{"v":1,"prompt":"' + b"x" * 300 + b'"}', 1.0, None)
        j.finish("edgekit/reply/old", b"old-%d" % i, b"final")
    for c in correlations:
        j.accept(topic, c, b'{"v":1,"prompt":"hi"}', time.time(), None)
    if correlations:
        j.mark_running(topic, correlations[0])
    j.close()


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "garbage bytes":
        path.write_bytes(bytes((i * 37 + 11) % 256 for i in range(len(data))))
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif how == "not a database":
        path.write_text("{\"this\": \"is a JSON file\"}\n" * 200)
    elif how == "zeroed header":
        path.write_bytes(b"\0" * 100 + data[100:])
    elif how == "another program's database":
        path.unlink()
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE settings (key TEXT, value TEXT)")
        db.commit()
        db.close()
    elif how == "a damaged index":  # the rows still read: what --reset-journal salvages
        db = sqlite3.connect(path)
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_requests_1'").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
        db.close()
        with path.open("r+b") as f:
            f.seek((root - 1) * size + 8)  # keep the page header's type byte: the cells are what is damaged
            f.write(bytes((i * 91 + 7) % 256 for i in range(size - 8)))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["garbage bytes", "truncated", "not a database", "zeroed header",
                                 "another program's database", "a damaged index"])
def test_a_damaged_journal_stops_serve_with_one_line_and_reset_journal_starts_afresh(broker, tiny_bundle, tmp_path,
                                                                                   how):
    journal = tmp_path / "state" / "mqtt-arm-01.sqlite"
    journal.parent.mkdir()
    a_journal_with_requests(journal, "edgekit/reply/gone", [b"a", b"b"])
    damage(journal, how)

    proc = serve_process(tiny_bundle, broker, journal)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len([x for x in lines if x.startswith("edgekit serve: error:")]) == 1, err
    line = next(x for x in lines if x.startswith("edgekit serve: error:"))
    assert str(journal) in line and "damaged" in line and "--reset-journal" in line

    with Listener(broker.config(), [T.status("arm-01")]) as wire:
        proc = serve_process(tiny_bundle, broker, journal, "--reset-journal")
        try:
            wire.wait_for(lambda msgs: any(json.loads(m.payload)["state"] == "online" for m in msgs), timeout=60)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    moved = [f for f in journal.parent.glob("mqtt-arm-01.sqlite.damaged-*") if not f.name.endswith(("-wal", "-shm"))]
    assert len(moved) == 1  # kept for a post-mortem, with its -wal and -shm files when there were any
    assert "moved it to" in err and str(moved[0]) in err
    Journal(journal).close()  # the new journal is healthy


def test_reset_journal_answers_interrupted_to_the_requests_the_damaged_journal_still_shows(broker, tiny_bundle,
                                                                                         tmp_path):
    journal = tmp_path / "mqtt-arm-01.sqlite"
    with Client(broker.config(), timeout=60, retry_s=300) as client:
        # requests the client is waiting for, which a previous run of the device had accepted
        pendings = [client.send_raw(T.device_requests("nobody"), b'{"v":1,"prompt":"hi"}') for _ in range(3)]
        a_journal_with_requests(journal, client.reply_topic, [p.correlation for p in pendings])
        damage(journal, "a damaged index")
        proc = serve_process(tiny_bundle, broker, journal, "--reset-journal")
        try:
            outcomes = []
            for p in pendings:
                with pytest.raises(RequestError) as e:
                    p.result()
                outcomes.append((e.value.code, "journal was damaged" in e.value.message))
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
    assert outcomes == [("interrupted", True)] * 3
    assert "3 request(s) in it will be answered 'interrupted'" in err


def test_journal_rows_that_read_but_make_no_sense_are_answered_interrupted_and_the_rest_served(broker, serve,
                                                                                             tmp_path):
    """Damage sqlite's integrity check cannot see: a number or a text where bytes or a time belong."""
    journal = tmp_path / "mqtt-arm-01.sqlite"
    with Client(broker.config(), timeout=30, retry_s=300) as client:
        good, bad = (client.send_raw(T.device_requests("nobody"), b"{}") for _ in range(2))
        Journal(journal).close()
        db = sqlite3.connect(journal)
        rows = [(client.reply_topic, good.correlation, b'{"v":1,"prompt":"hi","max_new_tokens":2}', time.time(),
                 None, "queued"),
                (client.reply_topic, bad.correlation, "a text payload", "not a time", "never", "queued"),
                (7, 8, 9, 10, None, "running")]
        db.executemany("INSERT INTO requests (response_topic, correlation, payload, received, expires, state) "
                       "VALUES (?, ?, ?, ?, ?, ?)", rows)
        db.execute("INSERT INTO outbox (topic, correlation, payload) VALUES (?, ?, ?)", (3, "x", 4))
        db.commit()
        db.close()
        with LogWatch("edgekit.mqtt") as log:
            serve(broker.config(), journal=journal)
            assert good.result().finish_reason in ("length", "eos")
            with pytest.raises(RequestError) as e:
                bad.result()
        assert e.value.code == "interrupted" and "journal entry for this request was damaged" in e.value.message
        assert not any(r.exc_info for r in log.records)


def test_a_journal_that_cannot_be_opened_is_one_line_too(broker, tiny_bundle, tmp_path):
    journal = tmp_path / "a-folder.sqlite"
    journal.mkdir()
    proc = serve_process(tiny_bundle, broker, journal, "--reset-journal")  # reset does not apply: not damaged
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err
    assert f"cannot open the journal {journal}" in err and journal.is_dir()


# -- what the operator reads -------------------------------------------------------------


@pytest.mark.parametrize("case, says", [
    # Mosquitto sends its CA along, so OpenSSL says which of the two it found untrusted
    ("unknown CA", "self-signed certificate in certificate chain|unable to get local issuer certificate"),
    ("wrong host name", "(Hostname|IP address) mismatch"),
    ("expired", "certificate has expired"),
    ("no client certificate", "certificate required"),  # refused by the broker, after the handshake
])
def test_a_tls_failure_is_logged_with_its_reason(tmp_path, serve, case, says):
    tls = make_certs(tmp_path / "certs", server_names="DNS:elsewhere.example" if case == "wrong host name"
                     else "IP:127.0.0.1,DNS:localhost", server_days=-1 if case == "expired" else 2)
    broker = Broker(tmp_path / "broker", tls=tls)
    broker.start()
    try:
        config = broker.config(client_cert=case != "no client certificate")
        if case == "unknown CA":
            config.cafile = None  # the system's CAs: they never signed this throwaway CA
        with LogWatch("edgekit.mqtt") as log:
            serve(config, wait=False)
            records = log.wait_for(lambda rs: any(re.search(says, r.getMessage()) for r in rs), timeout=20)
        line = next(r.getMessage() for r in records if re.search(says, r.getMessage()))
        assert "\n" not in line and ("cannot connect to the broker at " + broker.url in line
                                     or "lost the broker" in line)
        with pytest.raises(ConnectionError, match=says):
            Client(config, connect_timeout=2)
    finally:
        broker.kill()


def test_malformed_cancels_are_one_log_line_each_and_the_service_keeps_serving(broker, serve):
    service = serve(broker.config())
    cancels = [(b"\xff\xfe", "edgekit/reply/x", b"1"), (b"[" * 60_000, "edgekit/reply/x", b"2"),
               (b'{"v": true}', "edgekit/reply/x", b"3"), (b"[]", "edgekit/reply/x", b"4"),
               (b'{"v": 2}', "edgekit/reply/x", b"5"), (b'{"v": 1}', None, None), (b"null", "edgekit/reply/x", b"6")]
    with LogWatch("edgekit.mqtt") as log:
        bus = publisher(broker.config(), "raw")
        try:
            for payload, topic, correlation in cancels:
                publish(bus, T.cancel, payload, topic, correlation)
        finally:
            bus.disconnect()
        records = log.wait_for(lambda rs: sum("ignored" in r.getMessage() and "cancel" in r.getMessage()
                                              for r in rs) >= len(cancels), timeout=20)
    ignored = [r for r in records if "ignored" in r.getMessage()]
    assert len(ignored) == len(cancels)
    assert all(r.exc_info is None and "\n" not in r.getMessage() and len(r.getMessage()) < 300 for r in ignored)
    assert not any(r.exc_info for r in records)  # no traceback anywhere
    with Client(broker.config(), device_id="arm-01", timeout=20) as client:
        assert client.ask("Robots", max_new_tokens=2).finish_reason in ("length", "eos")
    assert service.counts["dropped"] == len(cancels)


def test_a_cancel_that_overtakes_its_request_still_cancels_it(broker, serve):
    """The device dropped a cancel for a request it had not seen, and then generated the answer in full."""
    serve(broker.config())
    reply = "edgekit/reply/raw"
    with Listener(broker.config(), [reply]) as wire:
        bus = publisher(broker.config(), "raw")
        try:
            publish(bus, T.cancel, b'{"v": 1}', reply, b"late")
            for correlation in (b"late", b"other"):
                publish(bus, T.device_requests("arm-01"), b'{"v": 1, "prompt": "Robots", "max_new_tokens": 4, '
                                                          b'"stream": false}', reply, correlation)
            wire.wait_for(lambda msgs: finals(msgs) == {b"late": 1, b"other": 1}, timeout=20)
        finally:
            bus.disconnect()
    done = {m.properties.CorrelationData: json.loads(m.payload) for m in wire.messages if b'"done"' in m.payload}
    assert done[b"late"]["finish_reason"] == "cancelled" and done[b"late"]["text"] == ""
    assert done[b"other"]["finish_reason"] in ("length", "eos")  # only the cancelled one


def ask(broker: Broker, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgekit", "ask", "--broker", broker.url, *args],
                          env=service_env(), capture_output=True, text=True, timeout=120, check=False)


def test_client_mistakes_are_refused_before_anything_is_sent_and_leave_the_client_working(broker, serve):
    """Each used to escape as a raw TypeError / OverflowError / struct.error, and the too-long expiry also
    left the request registered, to fail every later request on its retry."""
    serve(broker.config())
    with Client(broker.config(), device_id="arm-01", timeout=20, retry_s=1) as client:
        for prompt in (None, 5, 3.5, {"role": "user"}):
            with pytest.raises(ValueError, match="the prompt must be text or a list of chat messages"):
                client.ask(prompt)
        with pytest.raises(ValueError, match=re.escape("expiry_s must be an integer > 0 and below 4.29497e+09")):
            client.submit("hi", expiry_s=2**32)
        with pytest.raises(ValueError, match="timeout must be a finite number > 0 and below"):
            client.submit("hi", timeout=1e300)
        with pytest.raises(ValueError, match="ask\\(\\) waits for the whole answer and takes no stream="):
            client.ask("hi", stream=True)  # was a TypeError
        time.sleep(1.5)  # past retry_s: a request left registered would be published again now
        assert client.ask("Robots", max_new_tokens=2).finish_reason in ("length", "eos")
    with pytest.raises(ConnectionError, match="this Client is closed"):
        client.ask("Robots")
    with pytest.raises(ValueError, match="connect_timeout must be a finite number > 0 and below"):
        Client(broker.config(), connect_timeout=1e12)
    with pytest.raises(ValueError, match="broker must be a URL"):
        Client(12345)  # was an AttributeError


def test_ask_a_device_that_never_came_online_says_it_is_not_online(broker):
    started = time.monotonic()
    r = ask(broker, "--device-id", "ghost", "Are you there?")  # the default --timeout is 60 s
    took = time.monotonic() - started
    assert r.returncode == 1, r.stderr
    assert "the device ghost is not online (it has no status on edgekit/dev/ghost/status); nothing was sent" \
        in r.stderr
    assert "answered with an error" not in r.stderr and "Traceback" not in r.stderr
    assert took < 30  # said at once, not after --timeout


def test_ask_the_fleet_with_no_device_online_says_so(broker):
    r = ask(broker, "--timeout", "1", "Anyone?")
    assert r.returncode == 1, r.stderr
    assert "no device of the fleet is online" in r.stderr and "answered with an error" not in r.stderr


def test_ask_a_device_that_went_offline_says_so_at_once_and_sends_nothing(broker, serve):
    serve(broker.config()).stop()  # its retained status now says offline
    with Listener(broker.config(), [T.device_requests("arm-01")]) as wire:
        started = time.monotonic()
        r = ask(broker, "--device-id", "arm-01", "--timeout", "60", "Are you there?")
        took = time.monotonic() - started
        assert wire.messages == []
    assert r.returncode == 1, r.stderr
    assert "the device arm-01 is not online (its status is offline); nothing was sent" in r.stderr
    assert took < 30  # said at once, not after --timeout


def test_the_client_says_whether_a_silent_device_is_online(broker, serve):
    with Client(broker.config(), timeout=1) as client:
        with pytest.raises(RequestError, match="timeout") as e:
            client.ask("hi", device_id="ghost")
        assert "the device ghost is not online" in e.value.message
        with pytest.raises(RequestError) as e:
            client.ask("hi")
        assert e.value.code == "timeout" and "no device of the fleet is online" in e.value.message
    serve(broker.config())
    with Client(broker.config()) as client:  # the service's online status may still be on its way
        assert client.wait_for_state("arm-01", timeout=10) == "online" and client.online_devices() == ["arm-01"]
