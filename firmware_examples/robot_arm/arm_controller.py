"""A robot arm's command node: spoken or typed commands in, checked arm actions out.

The language model runs as its own service (`edgekit serve`, see edgekit-serve@.service);
this node is one more client on the bus. It listens for commands on
`robot/{arm}/command`, asks the model to turn each into one JSON action, checks the
action against what the arm can do, and publishes it on `robot/{arm}/action`. A model
answer that is not a valid action is never executed: the node publishes a refusal.

    python arm_controller.py --broker mqtt://localhost:1883 --arm arm-01
    mosquitto_pub -t robot/arm-01/command -m "Pick up the red cube"
    mosquitto_sub -t robot/arm-01/action
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
import threading

from edgekit.device.mqtt import BrokerConfig, Client, RequestError
from edgekit.device.mqtt.connection import make_connection
from edgekit.errors import EdgekitError

# Short on purpose: every command's prompt repeats it, so it is most of the prompt's tokens.
SYSTEM = "You control a robot arm. Answer with a JSON action: pick, place, home or stop, with its object and location."
ACTIONS = {"pick", "place", "home", "stop"}


def _shape(action: str, obj: dict, loc: dict) -> dict:
    return {"type": "object", "properties": {"action": {"const": action}, "object": obj, "location": loc},
            "required": ["action", "object", "location"], "additionalProperties": False}


_NAME = {"type": "string", "minLength": 1, "maxLength": 40}
_NONE = {"type": "null"}
# What the model's answer is constrained to: exactly the actions parse_action accepts, with the
# fields each one needs (pick: an object; place: an object and a location; home, stop: neither).
ACTION_SCHEMA = {"anyOf": [_shape("pick", _NAME, _NONE), _shape("place", _NAME, _NAME),
                           _shape("home", _NONE, _NONE), _shape("stop", _NONE, _NONE)]}
log = logging.getLogger("arm")


def action_json(action: str, obj: str | None, location: str | None) -> str:
    """An action as the compact JSON that generation constrained by ACTION_SCHEMA writes."""
    return json.dumps({"action": action, "object": obj, "location": location}, separators=(",", ":"))


def parse_action(text: str) -> dict:
    """The first JSON object in the model's answer, if it is an action this arm can do; ValueError if not."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError(f"no JSON object in the answer {text[:80]!r}")
    action = json.loads(text[start:end + 1])
    if not isinstance(action, dict) or action.get("action") not in ACTIONS:
        raise ValueError(f"not an action this arm can do: {action!r}")
    if action["action"] in ("pick", "place") and not isinstance(action.get("object"), str):
        raise ValueError(f"{action['action']} needs an object: {action!r}")
    return {"action": action["action"], "object": action.get("object"), "location": action.get("location")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", default="mqtt://localhost:1883")
    p.add_argument("--arm", default="arm-01", help="the arm's id: its topics and the edgekit device it asks")
    p.add_argument("--cafile")
    p.add_argument("--username")
    p.add_argument("--password-file")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="arm: %(message)s")
    password = open(args.password_file).read().strip() if args.password_file else None
    config = BrokerConfig(url=args.broker, cafile=args.cafile, username=args.username, password=password)

    # Commands arrive on paho's network thread; they are handled here, one at a time, in order.
    commands: queue.Queue[str] = queue.Queue(maxsize=16)
    conn = make_connection(config, f"{args.arm}-controller", session_expiry_s=300)  # TLS and login as the Client's
    bus = conn.client
    bus.on_connect = lambda c, u, f, rc, props: c.subscribe(f"robot/{args.arm}/command", qos=1)

    def on_command(client, userdata, msg):
        try:
            commands.put_nowait(msg.payload.decode("utf-8", "replace"))
        except queue.Full:  # never block paho's thread; a flooded arm drops commands, it does not lag
            log.warning("busy: dropped command %r", msg.payload[:80])

    subscribed = threading.Event()
    bus.on_message = on_command
    bus.on_subscribe = lambda *a: subscribed.set()
    conn.start()
    subscribed.wait()  # (re)connects with backoff until the broker is up

    with Client(config, device_id=args.arm, timeout=30) as llm:
        log.info("ready: commands on robot/%s/command", args.arm)
        while True:
            command = commands.get()
            try:
                answer = llm.ask([{"role": "system", "content": SYSTEM}, {"role": "user", "content": command}],
                                 max_new_tokens=args.max_new_tokens, temperature=0,
                                 response_format={"type": "json_schema", "json_schema": {"schema": ACTION_SCHEMA}})
                if answer.valid is False:  # the token limit cut the action short
                    raise ValueError(f"incomplete action after {args.max_new_tokens} tokens: {answer.text!r}")
                action = parse_action(answer.text)
                result = {"command": command, **action, "ttft_s": answer.timing.get("ttft_s")}
            except (RequestError, ValueError) as e:  # no answer, or not a safe action: refuse, do not guess
                result = {"command": command, "action": None, "refused": str(e)}
            log.info("%s", result)
            bus.publish(f"robot/{args.arm}/action", json.dumps(result), qos=1)


if __name__ == "__main__":
    try:
        main()
    except (EdgekitError, OSError) as e:  # a wrong flag, file or broker: one line, as edgekit's own commands say it
        print(f"{sys.argv[0]}: error: {e}", file=sys.stderr)
        sys.exit(2)
