"""An in-vehicle node that explains diagnostic trouble codes to the driver, offline.

The model runs in this process (no separate service): a vehicle ECU gateway publishes
each new trouble code on `vehicle/{id}/dtc`, this node publishes a short driver-facing
message on `vehicle/{id}/hmi`. Two rules make it fit for a car:

- A fixed, pre-written warning for a critical code goes out at once, before the model
  runs; the model's sentence only follows it. A slow or odd answer never delays a warning.
- The model's sentence is constrained to what a dashboard can show (DASHBOARD_TEXT: one line,
  plain characters, at most 140); when it does not finish within the token limit, the code's
  meaning from the table is shown instead.
- The system prompt is the same for every code, so its tokens stay in the model's KV cache
  and only the new code is computed (see `cached_tokens` in the log).

    python dtc_explainer.py --bundle bundles/smollm2 --broker mqtt://localhost:1883 --vehicle car-01
    mosquitto_pub -t vehicle/car-01/dtc -m '{"code": "P0301"}'
    mosquitto_sub -t vehicle/car-01/hmi
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import re
import sys
import threading
from collections.abc import Iterator

from edgekit.device import Model
from edgekit.device.mqtt import BrokerConfig
from edgekit.device.mqtt.connection import make_connection
from edgekit.errors import EdgekitError

# What the codes mean comes from this table, not from the model: a 135M model rephrases, it does not diagnose.
CODES = {
    "P0301": ("Cylinder 1 misfire detected", "critical"),
    "P0217": ("Engine over-temperature condition", "critical"),
    "C0035": ("Left front wheel speed sensor circuit", "critical"),
    "P0420": ("Catalyst system efficiency below threshold", "service"),
    "P0456": ("Evaporative emission system small leak", "service"),
    "B1000": ("Electronic control unit internal fault", "service"),
}
CRITICAL_WARNING = "Warning: {meaning}. Reduce speed and stop safely as soon as possible."
SYSTEM = ("You write one short, calm sentence for a car's dashboard telling the driver what a fault means "
          "and what to do. No technical jargon.")
# One sentence the dashboard can show: a capital, plain characters, a full stop, at most 140 characters.
DASHBOARD_TEXT = r"[A-Z][A-Za-z0-9 ,;'()-]{8,138}\."
DTC = r"[PCBU][0-9A-F]{4}"  # SAE J2012: system letter, four hex digits
log = logging.getLogger("dtc")


def hmi_messages(model: Model, code: str, max_new_tokens: int) -> Iterator[dict]:
    """The dashboard messages for one trouble code, each as soon as it exists: a critical code's
    warning before the model runs, then the model's sentence."""
    meaning, severity = CODES.get(code, ("Unrecognised fault code", "service"))
    if severity == "critical":
        yield {"code": code, "severity": severity, "text": CRITICAL_WARNING.format(meaning=meaning.lower())}
    user = f"Fault {code}: {meaning}. Severity: {severity}."
    done = model.generate([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                          max_new_tokens=max_new_tokens, temperature=0, regex=DASHBOARD_TEXT)
    log.info("%s: %d prompt tokens (%d cached), %.0f ms to first token", code, done.stats.prompt_tokens,
             done.stats.cached_tokens, done.stats.time_to_first_token_s * 1e3)
    yield {"code": code, "severity": severity, "text": done.text if done.valid else f"{meaning}."}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--broker", default="mqtt://localhost:1883")
    p.add_argument("--vehicle", default="car-01")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, help="intra-op threads (default: the cores other processes leave free)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="dtc: %(message)s")
    model = Model(args.bundle, threads=args.threads)

    # paho's network thread only queues codes; the model runs on this thread, one code at a time.
    codes: queue.Queue[str] = queue.Queue(maxsize=64)
    conn = make_connection(BrokerConfig(url=args.broker), f"{args.vehicle}-dtc", session_expiry_s=300)  # mqtts: TLS
    bus = conn.client
    bus.on_connect = lambda c, u, f, rc, props: c.subscribe(f"vehicle/{args.vehicle}/dtc", qos=1)

    def on_dtc(client, userdata, msg):
        try:
            code = str(json.loads(msg.payload)["code"]).upper()
            if not re.fullmatch(DTC, code):  # a bus message is not trusted: a long one would not fit the context
                raise ValueError(code)
            codes.put_nowait(code)
        except (ValueError, KeyError, TypeError):
            log.warning("ignored malformed DTC message %r", msg.payload[:80])
        except queue.Full:
            log.warning("busy: dropped DTC %r", msg.payload[:80])

    subscribed = threading.Event()
    bus.on_message = on_dtc
    bus.on_subscribe = lambda *a: subscribed.set()
    conn.start()
    subscribed.wait()  # (re)connects with backoff until the broker is up
    log.info("ready: trouble codes on vehicle/%s/dtc", args.vehicle)
    while True:
        code = codes.get()
        for message in hmi_messages(model, code, args.max_new_tokens):
            bus.publish(f"vehicle/{args.vehicle}/hmi", json.dumps(message), qos=1)


if __name__ == "__main__":
    try:
        main()
    except (EdgekitError, OSError) as e:  # a wrong flag, file or broker: one line, as edgekit's own commands say it
        print(f"{sys.argv[0]}: error: {e}", file=sys.stderr)
        sys.exit(2)
