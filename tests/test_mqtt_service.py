"""The MQTT service against a real Mosquitto broker, running the real runtime on a real bundle.

Every test starts its own broker on a free 127.0.0.1 port (tests/mqtt_broker.py). Answers
are kept short (a few tokens) so the whole file runs in a couple of minutes on 2 cores.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from mqtt_broker import Broker, Listener, make_certs, service_env

from edgekit.device import Model
from edgekit.device.mqtt import BrokerConfig, Client, Limits, RequestError, Topics
from edgekit.device.mqtt.journal import Journal

T = Topics()


@pytest.fixture(scope="module")
def local_model(tiny_bundle):
    """The same bundle run locally, for the answers the devices must give."""
    return Model(tiny_bundle, threads=1)


def docs_acl() -> str:
    """The Mosquitto ACL that docs/mqtt.md shows (the fenced block after "ACL file"), so the docs are tested."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "mqtt.md").read_text()
    block = text.split("<!-- acl -->", 1)[1].split("```", 2)[1]
    return block.split("\n", 1)[1]  # drop the fence's language tag


def greedy(model: Model, prompt, n: int) -> str:
    return model.generate(prompt, max_new_tokens=n, temperature=0).text


@pytest.fixture(scope="module")
def long_bundle(make_tiny, tmp_path_factory):
    """The tiny model with room for long answers, that must still be running while a deadline, a cancel or
    a broker kill happens (ask them as RUNNING says: 240 greedy tokens from tiny_bundle take 0.1 s, too
    close to a message round trip)."""
    from edgekit.host import export

    folder, _ = make_tiny("llama", tie_word_embeddings=True, max_position_embeddings=4096)
    return export(folder, tmp_path_factory.mktemp("bundles") / "long", progress=lambda _: None)


@pytest.fixture(scope="module")
def long_model(long_bundle):
    return Model(long_bundle, threads=1)


LONG = 1000  # new tokens in a long answer
# how an answer that must still be running when a stop, cancel or timeout comes is asked for: sampled, about
# 6 ms a token here, where greedy decoding of this model runs 2000 tokens a second on a quiet host (its text
# repeats, so prompt lookup drafts it); seeded, so that every run samples the same tokens
RUNNING = dict(temperature=1.0, seed=7)


def test_ask_and_stream_answer_with_the_bundles_own_greedy_text(broker, serve, local_model):
    serve(broker.config())
    question = [{"role": "user", "content": "Pick up the red cube"}]
    with Client(broker.config(), device_id="arm-01", timeout=20) as client:
        pending = client.stream(question, max_new_tokens=8, temperature=0)
        pieces = list(pending)
        answer = client.ask("The capital of France is", max_new_tokens=5, temperature=0)

    assert len(pieces) >= 2 and "".join(pieces) == pending.answer.text
    assert pending.answer.text == greedy(local_model, question, 8)
    assert pending.answer.device_id == "arm-01"
    assert pending.answer.usage["completion_tokens"] <= 8
    assert {"queue_s", "ttft_s", "prefill_s", "decode_tokens_per_s", "total_s"} <= set(pending.answer.timing)
    assert answer.text == greedy(local_model, "The capital of France is", 5)
    assert answer.finish_reason in ("length", "eos")


def test_status_is_retained_and_heartbeats_report_load(broker, serve, tiny_bundle, tiny_folder):
    service = serve(broker.config())
    with Listener(broker.config(), [T.status("arm-01"), T.heartbeat("arm-01")]) as wire:
        wire.wait_for(lambda msgs: sum(m.topic == T.heartbeat("arm-01") for m in msgs) >= 2, timeout=5)
        status = wire.payloads(T.status("arm-01"))[0]
        beat = wire.payloads(T.heartbeat("arm-01"))[-1]
        assert wire.messages[0].retain  # a late subscriber still learns the device is there
    assert status["v"] == 1 and status["state"] == "online"
    assert status["bundle_hash"] == Model(tiny_bundle).bundle_hash == service.model.bundle_hash
    assert status["target"] == service.model.manifest.target.name
    assert status["model"] == tiny_folder.name  # exported from a folder: its name, not the exporting host's path
    assert beat["queue_depth"] == 0 and beat["queue_limit"] == service.limits.queue and "load1" in beat

    service.stop()
    with Listener(broker.config(), [T.status("arm-01")], client_id="late") as wire:
        wire.wait_for(lambda msgs: msgs, timeout=5)
        assert wire.payloads(T.status("arm-01"))[-1]["state"] == "offline"


def test_malformed_payloads_each_get_an_error_reply_and_the_service_stays_up(broker, serve, local_model):
    serve(broker.config(), limits=Limits(payload_bytes=4096))
    topic = T.device_requests("arm-01")
    bad = {
        "not JSON": b"pick up the cube",
        "invalid UTF-8": b'{"v": 1, "prompt": "\xff\xfe"}',
        "wrong type": b'{"v": 1, "prompt": "hi", "max_new_tokens": "ten"}',
        "missing field": b'{"v": 1}',
        "unknown field": b'{"v": 1, "prompt": "hi", "max_tokens": 4}',
        "oversized": json.dumps({"v": 1, "prompt": "x" * 5000}).encode(),
        "wrong version": b'{"v": 99, "prompt": "hi"}',
        "not an object": b'"hi"',
    }
    with Client(broker.config(), timeout=10) as client:
        pendings = {name: client.send_raw(topic, payload) for name, payload in bad.items()}
        errors = {}
        for name, pending in pendings.items():
            with pytest.raises(RequestError) as e:
                pending.result()
            errors[name] = e.value
        # still serving, and answering correctly
        assert client.ask("Robots", device_id="arm-01", max_new_tokens=3, temperature=0).text == \
            greedy(local_model, "Robots", 3)

    assert {n: e.code for n, e in errors.items()} == {
        "not JSON": "invalid_request", "invalid UTF-8": "invalid_request", "wrong type": "invalid_request",
        "missing field": "invalid_request", "unknown field": "invalid_request", "oversized": "too_large",
        "wrong version": "unsupported_version", "not an object": "invalid_request"}
    assert "max_new_tokens" in str(errors["wrong type"]) and "max_tokens" in str(errors["unknown field"])
    assert all(e.device_id == "arm-01" for e in errors.values())


def test_requests_over_the_limits_get_an_error_reply_with_the_reason(broker, serve, long_bundle):
    serve(broker.config(), bundle=long_bundle, limits=Limits(prompt_chars=100, max_new_tokens=2000))
    with Client(broker.config(), device_id="arm-01", timeout=10) as client:
        cases = {
            "prompt": client.submit("x" * 101),
            "max_new_tokens": client.submit("hi", max_new_tokens=2001),
            "deadline passed": client.submit("hi", deadline=time.time() - 1),
            # 2000 tokens take about 3 s: the deadline falls mid-answer, with 0.5 s for the request to arrive
            "cut off": client.submit("Once upon a time", max_new_tokens=2000, temperature=0,
                                     deadline=time.time() + 0.5),
            "within the limits": client.submit("word " * 20, max_new_tokens=16),
        }
        outcomes = {}
        for name, pending in cases.items():
            try:
                answer = pending.result()
                outcomes[name] = (answer.finish_reason, answer.usage.get("completion_tokens"))
            except RequestError as e:
                outcomes[name] = (e.code, str(e))
    assert outcomes["prompt"][0] == "limit_exceeded" and "101 characters" in outcomes["prompt"][1]
    assert outcomes["max_new_tokens"][0] == "limit_exceeded" and "limit of 2000" in outcomes["max_new_tokens"][1]
    assert outcomes["deadline passed"][0] == "expired"
    assert outcomes["cut off"][0] == "deadline"  # stopped at its deadline, with the text so far
    assert 0 < outcomes["cut off"][1] < 2000
    assert outcomes["within the limits"][0] in ("length", "eos")


def test_a_full_queue_refuses_with_queue_full_and_every_request_is_answered(broker, serve):
    serve(broker.config(), limits=Limits(queue=2, max_new_tokens=200))
    with Client(broker.config(), device_id="arm-01", timeout=30) as client:
        pendings = [client.submit("Once upon a time", max_new_tokens=200, stream=False) for _ in range(8)]
        outcomes = []
        for p in pendings:
            try:
                outcomes.append(p.result().finish_reason)
            except RequestError as e:
                outcomes.append(e.code)
    assert len(outcomes) == 8
    assert outcomes[0] in ("length", "context", "eos")  # the first one is always taken
    assert "queue_full" in outcomes
    assert set(outcomes) <= {"length", "context", "eos", "queue_full"}


def test_cancel_stops_a_request_in_flight(broker, serve, long_bundle):
    serve(broker.config(), bundle=long_bundle, limits=Limits(max_new_tokens=LONG))
    with Client(broker.config(), device_id="arm-01", timeout=20) as client:
        pending = client.stream("Once upon a time", max_new_tokens=LONG, **RUNNING)
        first = next(iter(pending))
        pending.cancel()
        rest = list(pending)
        after = client.ask("Robots", max_new_tokens=2)  # the worker is free again
    assert pending.answer.finish_reason == "cancelled"
    assert pending.answer.text == first + "".join(rest)
    assert pending.answer.usage["completion_tokens"] < LONG
    assert after.finish_reason in ("length", "eos")


def test_a_request_that_expired_while_the_device_was_down_gets_an_expiry_error_not_an_answer(broker, serve,
                                                                                             long_bundle, tmp_path):
    journal = tmp_path / "arm.sqlite"
    service = serve(broker.config(), bundle=long_bundle, journal=journal, heartbeat_s=0.05,
                    limits=Limits(max_new_tokens=LONG))
    with Listener(broker.config(), [T.heartbeat("arm-01")]) as beats, \
            Client(broker.config(), device_id="arm-01", timeout=20) as client:
        long = client.submit("Once upon a time", max_new_tokens=LONG, stream=False)
        stale = client.submit("Hurry", max_new_tokens=2, expiry_s=1)  # MQTT message expiry
        beats.wait_for_queue_depth(2)
        service.stop()  # finishes the long answer; "Hurry" stays queued in the journal
        assert long.result().finish_reason in ("length", "context", "eos")
        time.sleep(1.2)  # what is under test is the passing of wall-clock time: let "Hurry" expire
        serve(broker.config(), bundle=long_bundle, journal=journal)
        with pytest.raises(RequestError) as e:
            stale.result()
    assert e.value.code == "expired" and "while the service was down" in str(e.value)


def test_200_requests_from_10_concurrent_clients_are_answered_exactly_once(broker, serve, local_model):
    service = serve(broker.config(), limits=Limits(queue=256))
    prompts = [f"Robot {i} moves" for i in range(20)]
    expected = {p: greedy(local_model, p, 3) for p in prompts}
    results: dict[int, list] = {}

    def one_client(n: int) -> None:
        with Client(broker.config(), device_id="arm-01", timeout=60, retry_s=30) as client:
            pendings = [(p, client.stream(p, max_new_tokens=3, temperature=0)) for p in prompts]
            results[n] = [(p, pending.correlation, "".join(pending), pending.answer) for p, pending in pendings]

    with Listener(broker.config(), ["edgekit/reply/#"]) as wire:
        threads = [threading.Thread(target=one_client, args=(n,)) for n in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        answers = [a for r in results.values() for a in r]
        assert len(answers) == 200
        for prompt, _, streamed, answer in answers:
            assert streamed == answer.text == expected[prompt]
        # on the wire: exactly one final per request, and no chunk twice
        wire.wait_for(lambda msgs: sum(b'"type":"done"' in m.payload for m in msgs) >= 200, timeout=10)
        finals = Counter(m.properties.CorrelationData for m in wire.messages if b'"type":"done"' in m.payload)
        chunks = Counter((m.properties.CorrelationData, json.loads(m.payload)["seq"])
                         for m in wire.messages if b'"type":"chunk"' in m.payload)
    assert sorted(finals) == sorted(c for _, c, _, _ in answers)
    assert set(finals.values()) == {1}
    assert set(chunks.values()) == {1}
    assert service.counts["served"] == 200


def test_broker_killed_and_restarted_mid_run_loses_no_accepted_request(broker, serve, local_model):
    service = serve(broker.config(), limits=Limits(queue=256))
    prompts = [f"Step {i}:" for i in range(40)]
    with Client(broker.config(), device_id="arm-01", timeout=60, retry_s=2) as client:
        pendings = [client.submit(p, max_new_tokens=12, temperature=0, stream=False) for p in prompts]
        pendings[3].result()  # the service is working through them
        broker.kill()
        served_before_the_kill = service.counts["served"]
        broker.start()
        answers = [p.result() for p in pendings]
    assert served_before_the_kill < len(prompts)  # the kill really was mid-run
    assert [a.text for a in answers] == [greedy(local_model, p, 12) for p in prompts]


def test_a_reply_the_broker_never_acknowledged_is_sent_after_a_restart(broker, serve, long_bundle, long_model,
                                                                      tmp_path):
    journal = tmp_path / "arm.sqlite"
    service = serve(broker.config(), bundle=long_bundle, journal=journal, limits=Limits(max_new_tokens=LONG))
    with Client(broker.config(), device_id="arm-01", timeout=20, retry_s=120) as client:  # no retry in this test
        pending = client.stream("Once upon a time", max_new_tokens=LONG, temperature=0)
        first = next(iter(pending))
        broker.kill()  # the rest of the answer has nowhere to go
        service.stop()  # finishes the answer; the broker cannot acknowledge it
        assert [json.loads(r.payload)["type"] for r in Journal(journal).unsent()] == ["done"]
        broker.start()
        # this broker keeps no sessions: a reply sent before the client subscribes again would be dropped
        assert client.connected.wait(10)
        serve(broker.config(), bundle=long_bundle, journal=journal)
        rest = "".join(pending)  # the chunks died with the first service; the final fills the gap
    assert first + rest == pending.answer.text == greedy(long_model, "Once upon a time", LONG)
    # the broker's PUBACK to the service and its delivery to the client race: give the ack a moment
    assert _unsent_after(journal, timeout=10) == []


def _unsent_after(path: Path, timeout: float) -> list:
    journal, deadline = Journal(path), time.monotonic() + timeout
    while (unsent := journal.unsent()) and time.monotonic() < deadline:
        time.sleep(0.05)
    journal.close()
    return unsent


def _serve_process(bundle, broker: Broker, journal, device_id="arm-01") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgekit", "serve", str(bundle), "--broker", broker.url, "--device-id", device_id,
         "--journal", str(journal), "--heartbeat", "1", "--threads", "1", "--queue-limit", "256"],
        env=service_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_service_sigkilled_mid_run_and_restarted_leaves_no_accepted_request_unanswered(broker, tiny_bundle,
                                                                                    tmp_path, local_model):
    journal = tmp_path / "journal.sqlite"
    status = T.status("arm-01")
    with Listener(broker.config(), [status], client_id="watch") as wire:
        proc = _serve_process(tiny_bundle, broker, journal)
        try:
            wire.wait_for(lambda msgs: any(json.loads(m.payload)["state"] == "online" for m in msgs), timeout=30)
            with Client(broker.config(), device_id="arm-01", timeout=60, retry_s=3) as client:
                prompts = [f"Task {i}:" for i in range(40)]
                pendings = [client.stream(p, max_new_tokens=12, temperature=0) for p in prompts]
                next(iter(pendings[5]))  # generating the sixth answer
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                # the Last Will marks the device offline
                wire.wait_for(lambda msgs: json.loads(msgs[-1].payload)["state"] == "offline", timeout=10)
                proc = _serve_process(tiny_bundle, broker, journal)
                outcomes = []
                for prompt, pending in zip(prompts, pendings, strict=True):
                    try:
                        outcomes.append(pending.result().text == greedy(local_model, prompt, 12))
                    except RequestError as e:
                        outcomes.append(e.code)
        finally:
            proc.kill()
            proc.wait(timeout=10)
    assert len(outcomes) == 40
    # every request answered: correctly, or (the one cut off mid-generation) with "interrupted"
    assert set(outcomes) <= {True, "interrupted"}, outcomes
    assert outcomes.count("interrupted") <= 1
    assert outcomes[-1] is True  # the ones queued at the kill were run after the restart


def test_requests_sent_while_the_device_is_offline_are_answered_after_it_reconnects(broker, serve, local_model,
                                                                                 tmp_path):
    journal = tmp_path / "arm.sqlite"
    serve(broker.config(), journal=journal).stop()  # the broker now holds arm-01's persistent session
    with Client(broker.config(), device_id="arm-01", timeout=30, retry_s=60) as client:
        pendings = [client.submit(f"Offline {i}", max_new_tokens=4, temperature=0) for i in range(5)]
        with pytest.raises(RequestError, match="timeout"):
            client.submit("nobody home", timeout=1, max_new_tokens=1).result()  # really offline
        serve(broker.config(), journal=journal)
        answers = [p.result() for p in pendings]
    assert [a.text for a in answers] == [greedy(local_model, f"Offline {i}", 4) for i in range(5)]


def test_two_devices_on_a_shared_subscription_both_serve(broker, serve):
    serve(broker.config(), "arm-01")
    serve(broker.config(), "arm-02")
    with Client(broker.config(), timeout=30) as client:  # no device id: the fleet topic
        fleet = [client.submit(f"Job {i}", max_new_tokens=2, stream=False) for i in range(20)]
        direct = [client.submit("Only you", device_id="arm-02", max_new_tokens=2) for _ in range(5)]
        served_by = Counter(p.result().device_id for p in fleet)
        direct_by = Counter(p.result().device_id for p in direct)
    assert set(served_by) == {"arm-01", "arm-02"} and sum(served_by.values()) == 20
    assert direct_by == {"arm-02": 5}


def test_tls_with_client_certificate_and_password(tmp_path, serve, local_model):
    tls = make_certs(tmp_path / "certs")
    broker = Broker(tmp_path / "broker", tls=tls, users={"arm-01": "s3cret", "planner": "pl4n"})
    broker.start()
    try:
        serve(broker.config("arm-01", "s3cret"))
        with Client(broker.config("planner", "pl4n"), device_id="arm-01", timeout=20) as client:
            assert client.ask("Secure", max_new_tokens=3, temperature=0).text == greedy(local_model, "Secure", 3)
        with pytest.raises(ConnectionError):  # the broker's certificate is not signed by a CA we trust
            Client(BrokerConfig(url=broker.url, username="planner", password="pl4n", certfile=str(tls.client_cert),
                                keyfile=str(tls.client_key)), connect_timeout=1)
        with pytest.raises(ConnectionError, match=r"refused the connection \(Not authorized\)"):  # was "Protocol error"
            Client(broker.config("planner", "wrong"), connect_timeout=1)
    finally:
        broker.kill()


def test_acl_lets_a_device_read_only_its_own_requests(tmp_path, serve):
    broker = Broker(tmp_path / "broker", users={"arm-01": "a", "arm-02": "b", "planner": "p"}, acl=docs_acl())
    broker.start()
    try:
        serve(broker.config("arm-01", "a"), "arm-01")
        with Listener(broker.config("arm-02", "b"), [T.device_requests("arm-01")], client_id="arm-02") as snoop, \
                Client(broker.config("planner", "p"), client_id="planner", timeout=20) as client:
            assert client.ask("Private", device_id="arm-01", max_new_tokens=2).device_id == "arm-01"
            assert client.ask("Anyone?", max_new_tokens=2).device_id == "arm-01"  # the fleet topic
            assert snoop.messages == []  # arm-02 subscribed to arm-01's requests and got nothing

    finally:
        broker.kill()
