"""A real Mosquitto broker for the MQTT tests, on a free loopback port with a generated config.

    broker = Broker(tmp_path)                       # plain, anonymous
    broker = Broker(tmp_path, tls=make_certs(dir))  # TLS with client certificates
    broker = Broker(tmp_path, users={"arm-01": "pw"}, acl=ACL)
    broker.start(); broker.kill(); broker.start()   # same port, as after a crash

Mosquitto is the Debian package `mosquitto` (scripts/test.sh installs it when missing).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from edgekit.device.mqtt import BrokerConfig

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(folder: Path, *, server_names: str = "IP:127.0.0.1,DNS:localhost", server_days: int = 2) -> TlsFiles:
    """A throwaway CA, a server certificate for `server_names` (127.0.0.1) and a client certificate (openssl CLI).

    server_days=-1 makes a server certificate that expired a day ago.
    """
    folder.mkdir(parents=True, exist_ok=True)

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=edgekit test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    for name, ext, days in (("server", f"subjectAltName={server_names}", server_days),
                            ("client", "extendedKeyUsage=clientAuth", 2)):
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        (folder / f"{name}.ext").write_text(ext + "\n")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", str(days), "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key",
                    folder / "client.pem", folder / "client.key")


class Broker:
    """One mosquitto process; `start()` waits until it accepts connections."""

    def __init__(self, workdir: Path, *, tls: TlsFiles | None = None, users: dict[str, str] | None = None,
                 acl: str | None = None):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.users = users
        self.proc: subprocess.Popen | None = None
        lines = [f"listener {self.port} 127.0.0.1",
                 "user root",  # started as root, mosquitto would switch to a user that cannot read tmp files
                 "persistence false",  # a restart forgets sessions: the harder case for the service
                 f"log_dest file {workdir / 'mosquitto.log'}",
                 "log_type error", "log_type warning", "log_type notice",
                 "max_queued_messages 2000"]
        if tls:
            lines += [f"cafile {tls.ca}", f"certfile {tls.server_cert}", f"keyfile {tls.server_key}",
                      "require_certificate true"]
        if users:
            pw = workdir / "passwords"
            pw.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True, timeout=30,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if acl:
            (workdir / "acl").write_text(acl)
            lines.append(f"acl_file {workdir / 'acl'}")
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    @staticmethod
    def available() -> bool:
        return os.path.exists(MOSQUITTO)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def config(self, username: str | None = None, password: str | None = None,
               client_cert: bool = True) -> BrokerConfig:
        """How a service or client reaches this broker; quick reconnects for the tests."""
        tls = self.tls
        return BrokerConfig(url=self.url, username=username, password=password,
                            cafile=str(tls.ca) if tls else None,
                            certfile=str(tls.client_cert) if tls and client_cert else None,
                            keyfile=str(tls.client_key) if tls and client_cert else None,
                            keepalive=5, reconnect_min_s=0.2, reconnect_max_s=1.0)

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None, "already running"
        # never skipped: an MQTT test without a broker is a missing install step, and CI must say so
        assert self.available(), f"mosquitto is not installed ({MOSQUITTO}); scripts/test.sh installs it"
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode()} {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s: {self.log()}")

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no Last Will sent by a client, sessions gone."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text()[-3000:] if path.exists() else ""


def service_env() -> dict[str, str]:
    """The environment for a service subprocess: this checkout importable, quiet threads."""
    root = Path(__file__).resolve().parent.parent
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


class Listener:
    """A plain paho subscriber that records every message it sees, to assert on the wire itself.

    >>> with Listener(broker.config(), ["edgekit/reply/#"]) as wire:
    ...     wire.wait_for(lambda msgs: len(msgs) >= 3, timeout=5)
    """

    def __init__(self, config: BrokerConfig, topics: list[str], client_id: str | None = None):
        import threading
        import uuid

        from edgekit.device.mqtt.connection import make_connection

        self.messages: list = []  # paho MQTTMessage objects, in arrival order
        self._cond = threading.Condition()
        subscribed = threading.Event()
        # a unique id by default: two listeners with one id would take each other's session over
        client_id = client_id or f"listener-{uuid.uuid4().hex[:8]}"
        self.conn = make_connection(config, client_id, session_expiry_s=0, clean_start=True)

        def on_connect(client, userdata, flags, rc, props):
            client.subscribe([(t, 1) for t in topics])

        def on_message(client, userdata, msg):
            with self._cond:
                self.messages.append(msg)
                self._cond.notify_all()

        self.conn.client.on_connect = on_connect
        self.conn.client.on_subscribe = lambda *a: subscribed.set()
        self.conn.client.on_message = on_message
        self.conn.start()
        if not subscribed.wait(10):
            raise RuntimeError(f"listener could not subscribe to {topics}")

    def wait_for(self, predicate, timeout: float) -> list:
        """Block until predicate(messages) is true; return the messages. AssertionError after `timeout`."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.messages), timeout):
                raise AssertionError(f"timed out after {timeout} s; saw {len(self.messages)} messages: "
                                     f"{[(m.topic, m.payload[:80]) for m in self.messages[-5:]]}")
            return list(self.messages)

    def wait_for_queue_depth(self, depth: int, timeout: float = 10) -> None:
        """Block until a heartbeat says `depth` requests are queued or running (listen to T.heartbeat)."""
        import json

        self.wait_for(lambda msgs: any(json.loads(m.payload).get("queue_depth") == depth for m in msgs), timeout)

    def payloads(self, topic: str) -> list[dict]:
        import json

        with self._cond:
            return [json.loads(m.payload) for m in self.messages if m.topic == topic]

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc) -> None:
        self.conn.stop()


class LogWatch:
    """Records what a logger says, so a test can wait for a line instead of sleeping.

    >>> with LogWatch("edgekit.mqtt") as log:
    ...     log.wait_for(lambda records: any("cannot connect" in r.getMessage() for r in records), timeout=10)
    """

    def __init__(self, name: str, level: int = 10):
        import logging
        import threading

        self.records: list = []  # logging.LogRecord, in order
        self._cond = threading.Condition()
        self._logger = logging.getLogger(name)
        self._old_level = self._logger.level
        watch = self

        class _Handler(logging.Handler):
            def emit(self, record):
                with watch._cond:
                    watch.records.append(record)
                    watch._cond.notify_all()

        self._handler = _Handler(level)
        self._logger.addHandler(self._handler)
        self._logger.setLevel(min(level, self._old_level or level))

    def wait_for(self, predicate, timeout: float) -> list:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.records), timeout):
                raise AssertionError(f"timed out after {timeout} s; the log said: "
                                     f"{[r.getMessage()[:200] for r in self.records[-8:]]}")
            return list(self.records)

    def messages(self) -> list[str]:
        with self._cond:
            return [r.getMessage() for r in self.records]

    def __enter__(self) -> LogWatch:
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._old_level)
