"""Delivery over time: requests generated once across retries, restarts, retained messages and
configuration changes; a stop that does not outlive the answer it interrupts.

A real Mosquitto and in-process services, as in test_mqtt_service.py; `long_bundle` makes answers
that are still running while the thing under test happens.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from mqtt_broker import Listener, service_env
from test_mqtt_hardening import finals, publish, publisher
from test_mqtt_service import LONG, RUNNING, long_bundle  # noqa: F401 (a fixture)

from edgekit.device import Model
from edgekit.device.mqtt import Client, Limits, RequestError, Service, ServiceConfig, Topics
from edgekit.device.mqtt.journal import JournalError

T = Topics()


def test_a_fleet_request_waiting_in_a_busy_queue_is_generated_by_one_device_only(broker, serve, long_bundle):  # noqa: F811
    """Both devices busy for seconds, the client retrying after 0.5 s of silence: a repeat to the fleet
    would reach the other device, which has no journal entry for it, and generate it again."""
    devices = [serve(broker.config(), d, bundle=long_bundle, limits=Limits(max_new_tokens=LONG))
               for d in ("arm-01", "arm-02")]
    with Listener(broker.config(), [T.reply_tree + "/#"]) as wire, \
            Client(broker.config(), timeout=30, retry_s=0.5) as client:
        # a LONG answer on each device, then one that waits behind one of them (its repeats go round the group)
        pendings = [client.stream(f"Story {i}", max_new_tokens=LONG if i < 2 else 20, temperature=0)
                    for i in range(3)]
        texts = [("".join(p), p.answer) for p in reversed(pendings)]  # the last waits longest: retries go out
        time.sleep(0.5)  # a late duplicate would be on the wire by now
    assert all(streamed == answer.text for streamed, answer in texts)  # one device's text each
    assert sum(d.counts["served"] for d in devices) == 3
    assert sorted(finals(wire.messages).values()) == [1, 1, 1]


def test_a_repeat_expires_when_the_first_would_have(broker, serve, tmp_path):
    journal = tmp_path / "arm.sqlite"
    serve(broker.config(), journal=journal).stop()  # the broker holds arm-01's session: it queues requests
    with Client(broker.config(), device_id="arm-01", timeout=30, retry_s=0.3) as client:
        pending = client.submit("Hurry", max_new_tokens=2, expiry_s=1, timeout=4)
        time.sleep(2)  # retries went out for the first second, none after
        service = serve(broker.config(), journal=journal)
        with pytest.raises(RequestError, match="timeout"):
            pending.result()
    assert service.counts["served"] == 0 and service.counts["errors"] == 0  # nothing reached it


def test_a_stream_that_lost_chunks_waits_while_the_device_still_sends(broker):
    """Chunks after a gap (lost with a broker restart) are not passed on, but they say the device is at
    work: the client waits for the final, which has the whole text, instead of timing out."""
    with Client(broker.config(), timeout=1.0) as client:
        pending = client.send_raw(T.device_requests("nobody"), b"{}")
        device = publisher(broker.config(), "fake-device")
        replies = [{"type": "chunk", "seq": 0, "text": "a"}] + \
                  [{"type": "chunk", "seq": seq, "text": "c"} for seq in range(2, 10)] + \
                  [{"type": "done", "seq": 10, "text": "ab" + "c" * 8, "finish_reason": "length",
                    "device_id": "nobody"}]  # seq 1 was lost

        def the_device() -> None:  # 2.7 s in all: longer than the timeout, never that long without a reply
            for reply in replies:
                time.sleep(0.3)
                publish(device, client.reply_topic, json.dumps({"v": 1, **reply}).encode(), None,
                        pending.correlation)

        sending = threading.Thread(target=the_device)
        sending.start()
        try:
            assert "".join(pending) == "ab" + "c" * 8 == pending.answer.text
        finally:
            sending.join()
            device.disconnect()


def test_a_stop_that_outlasts_its_wait_answers_the_running_request_interrupted(broker, serve, long_bundle):  # noqa: F811
    """A process must not exit while onnxruntime runs (SIGTERM then ended in SIGABRT): the answer ends first."""
    service = serve(broker.config(), bundle=long_bundle, limits=Limits(max_new_tokens=LONG))
    with Client(broker.config(), device_id="arm-01", timeout=20) as client:
        pending = client.stream("Once upon a time", max_new_tokens=LONG, **RUNNING)
        next(iter(pending))
        service.stop(timeout=0.1)
        assert not service._worker.is_alive()
        with pytest.raises(RequestError) as e:
            list(pending)
    assert e.value.code == "interrupted"


def test_a_cancel_of_a_queued_request_holds_across_a_restart(broker, serve, long_bundle, tmp_path):  # noqa: F811
    journal = tmp_path / "arm.sqlite"
    service = serve(broker.config(), bundle=long_bundle, journal=journal, heartbeat_s=0.05,
                    limits=Limits(max_new_tokens=LONG))
    with Listener(broker.config(), [T.heartbeat("arm-01")]) as beats, \
            Client(broker.config(), device_id="arm-01", timeout=20) as client:
        running = client.submit("Once upon a time", max_new_tokens=LONG, stream=False, **RUNNING)
        queued = client.submit("Then", max_new_tokens=LONG, stream=False, **RUNNING)
        beats.wait_for_queue_depth(2)
        queued.cancel()
        time.sleep(0.3)  # the cancel reaches the device
        service.stop(timeout=0.1)
        with pytest.raises(RequestError):
            running.result()  # interrupted
        serve(broker.config(), bundle=long_bundle, journal=journal)
        answer = queued.result()
    assert (answer.finish_reason, answer.text) == ("cancelled", "")


def test_a_retained_request_is_not_run_again_at_each_connect(broker, serve, tmp_path):
    journal = tmp_path / "arm.sqlite"
    reply_to = T.replies("watch")
    with Listener(broker.config(), [reply_to], client_id="watch") as wire:
        service = serve(broker.config(), journal=journal)
        sender = publisher(broker.config(), "sender")
        sender.publish(T.device_requests("arm-01"), b'{"v": 1, "prompt": "Once", "max_new_tokens": 2}', qos=1,
                       retain=True, properties=_request_properties(reply_to, b"r1")).wait_for_publish(10)
        sender.disconnect()
        wire.wait_for(lambda msgs: finals(msgs)[b"r1"] == 1, timeout=10)  # the live delivery is answered
        service.stop()
        serve(broker.config(), journal=journal).stop()  # the same journal: once it was a repeat, answered again
        serve(broker.config(), journal=tmp_path / "new.sqlite")  # a new one: once it was generated again
        time.sleep(1.0)
    assert finals(wire.messages) == {b"r1": 1}


def _request_properties(response_topic: str, correlation: bytes):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic, props.CorrelationData = response_topic, correlation
    return props


def test_a_device_restarted_without_its_group_no_longer_takes_fleet_requests(broker, serve, tmp_path):
    """The broker keeps a session's subscriptions across restarts: the old group's came back with it."""
    journal = tmp_path / "arm.sqlite"
    serve(broker.config(), journal=journal).stop()
    service = serve(broker.config(), journal=journal, group=None)
    with Client(broker.config(), timeout=2) as client:
        with pytest.raises(RequestError, match="timeout"):
            client.ask("Anyone?", max_new_tokens=2)
        assert client.ask("You", device_id="arm-01", max_new_tokens=2).device_id == "arm-01"
    assert service.counts["served"] == 1


def test_a_second_service_with_the_same_device_id_stops_at_start(broker, serve, tiny_bundle, tmp_path):
    journal = tmp_path / "arm.sqlite"
    serve(broker.config(), journal=journal)
    with pytest.raises(JournalError, match="another process uses it.*same --device-id"):
        Service(Model(tiny_bundle, threads=1), broker.config(), ServiceConfig("arm-01", journal=journal))


def test_a_client_that_times_out_cancels_its_request(broker, serve, long_bundle):  # noqa: F811
    serve(broker.config(), bundle=long_bundle, limits=Limits(max_new_tokens=3 * LONG))
    with Client(broker.config(), device_id="arm-01", timeout=20) as client, \
            Listener(broker.config(), [client.reply_topic]) as wire:
        pending = client.submit("Once upon a time", max_new_tokens=3 * LONG, stream=False, timeout=0.5, **RUNNING)
        with pytest.raises(RequestError) as e:
            pending.result()  # nothing is sent before the whole answer: seconds
        finals = wire.wait_for(lambda msgs: any(json.loads(m.payload)["type"] == "done" for m in msgs), timeout=20)
    done = json.loads(finals[-1].payload)
    assert e.value.code == "timeout"
    assert done["finish_reason"] == "cancelled" and done["usage"]["completion_tokens"] < 3 * LONG


def test_ctrl_c_in_edgekit_ask_cancels_the_devices_answer(broker, serve, long_bundle):  # noqa: F811
    serve(broker.config(), bundle=long_bundle, limits=Limits(max_new_tokens=3 * LONG))
    with Listener(broker.config(), [T.cancel, "edgekit/reply/#"]) as wire:
        ask = subprocess.Popen([sys.executable, "-m", "edgekit", "ask", "--broker", broker.url, "--device-id", "arm-01",
                                "--max-new-tokens", str(3 * LONG), "--temperature", str(RUNNING["temperature"]),
                                "--seed", str(RUNNING["seed"]), "Once upon a time"],
                               env=service_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               # a terminal's Ctrl-C: a suite started in the background (nohup, CI) ignores SIGINT,
                               # and a child inherits that
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert ask.stdout is not None
        ask.stdout.read(1)  # the answer is streaming
        ask.send_signal(signal.SIGINT)
        assert ask.wait(timeout=30) == 130
        wire.wait_for(lambda msgs: any(b'"done"' in m.payload for m in msgs), timeout=10)
    done = next(json.loads(m.payload) for m in wire.messages if b'"done"' in m.payload)
    assert done["finish_reason"] == "cancelled" and done["usage"]["completion_tokens"] < 3 * LONG


def test_closing_a_client_cancels_the_requests_it_still_waits_for(broker, serve, long_bundle):  # noqa: F811
    serve(broker.config(), bundle=long_bundle, heartbeat_s=0.05, limits=Limits(max_new_tokens=3 * LONG))
    with Listener(broker.config(), ["edgekit/reply/#"]) as wire, \
            Listener(broker.config(), [T.heartbeat("arm-01")]) as beats:
        client = Client(broker.config(), device_id="arm-01")
        running = client.stream("Once upon a time", max_new_tokens=3 * LONG, **RUNNING)
        queued = client.submit("The robot", max_new_tokens=3 * LONG, stream=False, **RUNNING)
        beats.wait_for_queue_depth(2)  # one answer is being generated, the other waits behind it
        client.close()
        finals = wire.wait_for(lambda msgs: sum(b'"done"' in m.payload for m in msgs) == 2, timeout=20)
    for reply in (json.loads(m.payload) for m in finals if b'"done"' in m.payload):
        assert reply["finish_reason"] == "cancelled" and reply["usage"].get("completion_tokens", 0) < 3 * LONG
    for pending in (running, queued):
        with pytest.raises(RequestError) as e:
            pending.result()
        assert e.value.code == "closed"
    client.close()  # twice is harmless
