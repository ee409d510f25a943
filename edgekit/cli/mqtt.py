"""`edgekit serve` and `edgekit ask`: the MQTT service and a client that streams an answer.

    edgekit serve BUNDLE --broker mqtt://localhost:1883 --device-id arm-01
    edgekit serve BUNDLE --broker mqtts://broker.local:8883 --cafile ca.pem \
        --username arm-01 --password-file /etc/edgekit/pw
    edgekit ask --broker mqtt://localhost:1883 --device-id arm-01 "Pick up the red cube"
"""

from __future__ import annotations

import argparse
import sys

from edgekit.cli import THREADS_DEFAULT
from edgekit.errors import UserError


def register(sub) -> None:
    """Add the `serve` and `ask` subcommands to the `edgekit` parser's subparsers."""
    p = sub.add_parser("serve", help="answer generation requests over MQTT v5 (device side)",
                       description="Serve a bundle over MQTT v5: requests on {prefix}/dev/DEVICE_ID/req and, "
                                   "shared with the fleet, {prefix}/req. See docs/mqtt.md.")
    p.add_argument("bundle", help="a bundle folder made by `edgekit export`")
    p.add_argument("--device-id", required=True, help="this device's name on the bus (one topic level)")
    _add_broker_args(p)
    p.add_argument("--group", default="edgekit",
                   help="shared-subscription group of the fleet (default: edgekit); 'none': device topic only")
    p.add_argument("--journal", help="the sqlite journal (default: $XDG_STATE_HOME/edgekit/mqtt-DEVICE_ID.sqlite)")
    p.add_argument("--reset-journal", action="store_true",
                   help="if the journal is damaged, move it aside (to JOURNAL.damaged-TIME) and start a new one, "
                        "answering 'interrupted' to the requests it still shows; without it a damaged journal stops "
                        "the service with a message. A healthy journal is left alone")
    p.add_argument("--reply-prefix", metavar="TOPIC",
                   help="replies go only to ResponseTopics below this (default: PREFIX/reply); a request naming "
                        "another topic is dropped with a log line")
    p.add_argument("--threads", type=int, help=f"onnxruntime intra-op threads (default: {THREADS_DEFAULT})")
    p.add_argument("--heartbeat", type=_positive(float), default=10.0, metavar="SECONDS",
                   help="heartbeat period (default 10)")
    p.add_argument("--session-expiry", type=_positive(int, zero_ok=True), default=24 * 3600, metavar="SECONDS",
                   help="how long the broker queues requests while this device is away (default 86400)")
    lim = p.add_argument_group("limits (beyond them a request gets an error reply)")
    lim.add_argument("--queue-limit", type=_positive(int), default=32, help="requests waiting or running (default 32)")
    lim.add_argument("--max-prompt-chars", type=_positive(int), default=16_000)
    lim.add_argument("--max-new-tokens", type=_positive(int), default=512)
    lim.add_argument("--max-payload-bytes", type=_positive(int), default=64 * 1024)
    lim.add_argument("--max-request-seconds", type=_positive(float), default=120.0,
                     help="generation is cut off after this long (finish_reason deadline)")
    p.set_defaults(run=_run_serve)

    a = sub.add_parser("ask", help="ask a device over MQTT and stream the answer",
                       description="Send MESSAGE to a device (or any device of the fleet) and print the answer "
                                   "as it streams in.")
    a.add_argument("message", help="a user message (formatted with the model's chat template), or text with --raw")
    a.add_argument("--device-id", help="ask this device only (default: any device of the fleet)")
    a.add_argument("--client-id", help="this client's MQTT id, which names its reply topic (default: --username, "
                                       "as the documented ACL wants; else a random one)")
    _add_broker_args(a)
    a.add_argument("--raw", action="store_true", help="send MESSAGE as a plain prompt, without the chat template")
    a.add_argument("--system", help="a system message")
    a.add_argument("--max-new-tokens", type=int)
    a.add_argument("--temperature", type=float)
    a.add_argument("--seed", type=int)
    a.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    a.add_argument("--timeout", type=_positive(float), default=60.0,
                   help="seconds to wait for each part of the answer (default 60)")
    a.add_argument("--stats", action="store_true", help="print the finish reason and timing after the answer")
    a.set_defaults(run=_run_ask)


def _positive(kind: type, zero_ok: bool = False):
    """An argparse type: a number of `kind` > 0 (>= 0 with zero_ok), by the service's own rule."""
    def parse(text: str):
        from edgekit.device.mqtt.protocol import check_positive

        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        try:
            check_positive("the value", value, integer=kind is int, zero_ok=zero_ok)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _add_broker_args(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("broker")
    b.add_argument("--broker", default="mqtt://localhost:1883",
                   help="mqtt://HOST[:1883] or mqtts://HOST[:8883] (default: mqtt://localhost:1883)")
    b.add_argument("--prefix", default="edgekit", help="topic prefix (default: edgekit)")
    b.add_argument("--cafile", help="CA certificate that signed the broker's (mqtts; default: the system's CAs)")
    b.add_argument("--certfile", help="client certificate, for brokers that require one")
    b.add_argument("--keyfile", help="the client certificate's key")
    b.add_argument("--username")
    b.add_argument("--password-file", help="a file whose first line is the password (keeps it out of `ps`)")


def _broker_config(args):
    from edgekit.device.mqtt.connection import BrokerConfig, read_password_file

    if args.password_file and not args.username:
        raise UserError("--password-file goes with --username")
    password = read_password_file(args.password_file) if args.password_file else None
    config = BrokerConfig(url=args.broker, username=args.username, password=password, cafile=args.cafile,
                          certfile=args.certfile, keyfile=args.keyfile)
    config.address()  # a malformed URL: InputError, before anything connects
    return config


def _run_serve(args) -> int:
    from edgekit.device import Model
    from edgekit.device.mqtt.service import Limits, Service, ServiceConfig

    broker = _broker_config(args)
    limits = Limits(queue=args.queue_limit, payload_bytes=args.max_payload_bytes, prompt_chars=args.max_prompt_chars,
                    max_new_tokens=args.max_new_tokens, request_s=args.max_request_seconds)
    config = ServiceConfig(device_id=args.device_id, prefix=args.prefix,
                           group=None if args.group == "none" else args.group, journal=args.journal,
                           limits=limits, heartbeat_s=args.heartbeat, session_expiry_s=args.session_expiry,
                           reply_prefix=args.reply_prefix, reset_journal=args.reset_journal)
    model = Model(args.bundle, threads=args.threads)
    service = Service(model, broker, config)  # a damaged journal: JournalError, one line naming it, what to do
    print(f"edgekit serve: {args.device_id} serving {args.bundle} ({model.bundle_hash}) via {args.broker}",
          file=sys.stderr, flush=True)
    service.run_forever()
    return 0


def _run_ask(args) -> int:
    from edgekit.device.mqtt import protocol as proto
    from edgekit.device.mqtt.client import Client, RequestError

    prompt, settings = _ask_request(args)
    try:
        client = Client(_broker_config(args), device_id=args.device_id, prefix=args.prefix, timeout=args.timeout,
                        client_id=args.client_id or args.username)
    except (ConnectionError, ValueError) as e:
        raise UserError(str(e)) from None
    with client:
        if args.device_id and client.follows_presence and \
                client.wait_for_state(args.device_id, min(args.timeout, 2.0)) != "online":
            # a request for it would wait in the broker, and be answered when nobody listens any more
            print(f"edgekit ask: {client.silence_reason(args.device_id)}; nothing was sent", file=sys.stderr)
            return 1
        pending = client.stream(prompt, **settings)
        streamed = False
        try:
            for piece in pending:
                sys.stdout.write(piece)
                sys.stdout.flush()
                streamed = True
        except KeyboardInterrupt:  # Ctrl-C stops the device's answer too, not only this command
            pending.cancel()
            raise
        except RequestError as e:
            if streamed:
                sys.stdout.write("\n")
            if e.code == proto.TIMEOUT:  # the client's own verdict: no device answered
                print(f"edgekit ask: {e.message}", file=sys.stderr)
            else:
                print(f"edgekit ask: the device answered with an error: {e}", file=sys.stderr)
            return 1
        sys.stdout.write("\n")
    answer = pending.answer
    if args.stats and answer is not None:
        print(f"[{answer.finish_reason}] {answer.device_id} | {answer.usage} | {answer.timing}", file=sys.stderr)
    return 0


def _ask_request(args) -> tuple[str | list[dict], dict]:
    """The prompt and the request settings `edgekit ask` sends; ValueError (one line) for a mistake in them,
    by the device's own validation, before connecting (a lone surrogate from invalid UTF-8 in argv included)."""
    from edgekit.device.mqtt import protocol as proto

    if args.raw and args.system:
        raise UserError("--system needs the chat template; leave out --raw")
    prompt = args.message
    if not args.raw:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": args.message}]
    settings = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature),
                                  ("seed", args.seed)) if v is not None}
    if args.stop:
        settings["stop"] = args.stop
    proto.request_from_dict({"v": proto.VERSION, "prompt" if args.raw else "messages": prompt, **settings})
    return prompt, settings
