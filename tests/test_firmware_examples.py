"""The firmware examples run as a device would run them, against a real Mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import paho.mqtt.publish as publish
import pytest
from mqtt_broker import Broker, Listener, service_env

EXAMPLES = Path(__file__).resolve().parent.parent / "firmware_examples"


@pytest.fixture
def broker(tmp_path):
    if not Broker.available():
        pytest.fail("mosquitto is not installed; scripts/test.sh installs it")
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.kill()


def run(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=service_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def send(broker: Broker, topic: str, payload: str) -> None:
    publish.single(topic, payload, qos=1, hostname="127.0.0.1", port=broker.port)


def test_vehicle_dtc_warns_at_once_then_explains_and_reuses_the_cached_system_prompt(broker, tiny_bundle):
    hmi = "vehicle/car-01/hmi"
    with Listener(broker.config(), [hmi]) as wire:
        proc = run(str(EXAMPLES / "vehicle_dtc" / "dtc_explainer.py"), "--bundle", str(tiny_bundle),
                   "--broker", broker.url, "--vehicle", "car-01", "--max-new-tokens", "8", "--threads", "1")
        try:
            ready = proc.stderr.readline()
            while "ready" not in ready:
                assert ready, "the example exited before it was ready"
                ready = proc.stderr.readline()
            send(broker, "vehicle/car-01/dtc", "not json")  # ignored, the node keeps running
            send(broker, "vehicle/car-01/dtc", json.dumps({"code": "P0301"}))
            send(broker, "vehicle/car-01/dtc", json.dumps({"code": "p0420"}))
            wire.wait_for(lambda msgs: len(msgs) >= 3, timeout=60)
        finally:
            proc.kill()
            log = proc.stderr.read()
    first, second, third = wire.payloads(hmi)
    assert first == {"code": "P0301", "severity": "critical",
                     "text": "Warning: cylinder 1 misfire detected. Reduce speed and stop safely as soon as possible."}
    assert second["code"] == "P0301" and second["text"]
    assert third["code"] == "P0420" and third["severity"] == "service"
    assert "ignored malformed DTC message" in log
    cached = [int(line.split("(")[1].split()[0]) for line in log.splitlines() if "cached)" in line]
    assert cached[0] == 0 and cached[1] > 20  # the second code reuses the system prompt's KV cache


def test_robot_arm_refuses_an_answer_that_is_not_a_valid_action(broker, tiny_bundle, tmp_path):
    # A tiny random model cannot produce a valid action: the controller must refuse, not guess.
    serve = run("-m", "edgekit.cli", "serve", str(tiny_bundle), "--broker", broker.url, "--device-id", "arm-01",
                "--journal", str(tmp_path / "journal.sqlite"), "--threads", "1")
    arm = run(str(EXAMPLES / "robot_arm" / "arm_controller.py"), "--broker", broker.url, "--arm", "arm-01",
              "--max-new-tokens", "8")
    try:
        with Listener(broker.config(), ["robot/arm-01/action"]) as wire:
            for _ in range(50):  # until the controller has subscribed: a bounded retry, 0.2 s apart
                send(broker, "robot/arm-01/command", "Pick up the red cube")
                try:
                    wire.wait_for(lambda msgs: len(msgs) >= 1, timeout=0.2 if _ < 49 else 60)
                    break
                except AssertionError:
                    continue
    finally:
        arm.kill()
        serve.kill()
    action = wire.payloads("robot/arm-01/action")[0]
    assert action["command"] == "Pick up the red cube"
    assert action["action"] is None and action["refused"]
