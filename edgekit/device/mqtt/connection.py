"""How to reach the broker: URL, TLS and credentials, turned into a configured paho client."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgekit.errors import InputError


@dataclass
class BrokerConfig:
    """Where the broker is and how to log in.

    url: mqtt://host[:1883] or mqtts://host[:8883] (TLS; the server certificate is
    always checked, against `cafile` or the system's CAs). `certfile`/`keyfile` give a
    client certificate for brokers that require one.
    """

    url: str = "mqtt://localhost:1883"
    username: str | None = None
    password: str | None = None
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    keepalive: int = 30
    reconnect_min_s: float = 1.0  # backoff after a lost connection: doubles up to reconnect_max_s
    reconnect_max_s: float = 30.0

    def address(self) -> tuple[str, int, bool]:
        """(host, port, tls) from the URL; ValueError with the accepted forms when it is not one."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise InputError(f"broker URL {self.url!r}: use mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port is None:
            port = 8883 if tls else 1883
        elif not 1 <= port <= 65535:
            raise InputError(f"broker URL {self.url!r}: the port must be a number from 1 to 65535")
        return parts.hostname, port, tls


def read_password_file(path: str | Path) -> str:
    """The password in `path` (its first line, without the newline); InputError when unreadable."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--password-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    return text.splitlines()[0] if text else ""


@dataclass
class Connection:
    """A paho client with what connect_async needs; `start()` connects in the background."""

    client: mqtt.Client
    config: BrokerConfig
    properties: Properties  # CONNECT properties: the session expiry
    clean_start: mqtt.CleanStartOption
    last_error: str | None = None  # paho's last socket error, e.g. a TLS alert after the handshake

    def take_error(self) -> str | None:
        """The socket error paho logged since the last call (why a connection dropped), or None."""
        error, self.last_error = self.last_error, None
        return error

    def start(self) -> None:
        """Connect from paho's network thread, which retries with backoff until it succeeds
        and reconnects the same way after a lost connection."""
        host, port, _ = self.config.address()
        self.client.connect_async(host, port, keepalive=self.config.keepalive, clean_start=self.clean_start,
                                  properties=self.properties)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_connection(config: BrokerConfig, client_id: str, *, session_expiry_s: int,
                    clean_start: mqtt.CleanStartOption = False) -> Connection:
    """A paho MQTT v5 client with TLS, credentials and reconnect backoff set, not yet connected.

    With clean_start off and a session expiry, the broker keeps the client's subscriptions
    and its queued QoS 1 messages that long while the client is away.
    """
    _, _, tls = config.address()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if tls:
        if config.keyfile and not config.certfile:
            raise InputError("a client key (--keyfile) needs its certificate (--certfile)")
        for flag, name in (("--cafile", config.cafile), ("--certfile", config.certfile), ("--keyfile", config.keyfile)):
            if name is not None and not Path(name).is_file():  # ssl's own error does not say which file
                raise InputError(f"{flag} {name}: no such file")
        try:
            client.tls_set(ca_certs=config.cafile, certfile=config.certfile, keyfile=config.keyfile,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except ssl.SSLError as e:
            raise InputError(f"cannot use the TLS files (--cafile {config.cafile}, --certfile {config.certfile}, "
                             f"--keyfile {config.keyfile}): {e.reason or e}; they must be PEM files") from None
    elif config.cafile or config.certfile or config.keyfile:
        raise InputError(f"TLS files were given but the broker URL {config.url!r} is not mqtts://")
    if config.username is not None:
        client.username_pw_set(config.username, config.password)
    # paho annotates the delays as int, but only doubles, compares and sleeps them: fractions of a second work
    client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)  # type: ignore[arg-type]
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    conn = Connection(client, config, props, clean_start)

    def remember_errors(client, userdata, level, text) -> None:
        # A broker that refuses a client certificate does so after the TLS handshake: paho sees it only
        # as a failed read, which it logs ("failed to receive on socket: ... certificate required").
        if level == mqtt.MQTT_LOG_ERR and "socket" in text:
            conn.last_error = text

    client.on_log = remember_errors
    return conn


def connect_failure(exc: BaseException | None) -> str:
    """Why a connection attempt failed, in words an operator can act on (TLS reasons included).

    `exc` is the exception paho's connect raised (None when unknown).
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        # e.g. "certificate has expired", "Hostname mismatch, ...", "unable to get local issuer certificate"
        return (f"TLS: the broker's certificate was refused ({exc.verify_message or exc.reason}); check --cafile "
                "(the CA that signed it), the host name in the URL and the certificate's dates")
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc}); check the broker's TLS settings and --certfile/--keyfile"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running and listening on that port?)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "no answer from the broker (timed out)"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    if exc is not None:
        return f"{type(exc).__name__}: {exc}"
    return "the connection failed"
