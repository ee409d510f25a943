"""An on-disk journal of accepted requests and of replies the broker has not acknowledged.

paho keeps its MQTT session in memory only, so a power cut or a SIGKILL loses what was
in flight. The journal keeps, in one sqlite file:

    requests  one row per accepted request, keyed by (response topic, correlation data):
              queued -> running -> done (with its final reply, to answer a repeat without
              generating again)
    outbox    final and error replies written before they are published and deleted when
              the broker's PUBACK arrives; what is left after a crash is sent again

A request row is committed before the service returns from on_message, which is when
paho sends the PUBACK: a request the broker considers delivered is always on disk.
Streamed chunks are not journaled (they are many and only useful live); the final
reply carries the whole text.

Thread-safe: one connection behind a lock. Nothing here publishes.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    response_topic TEXT NOT NULL,
    correlation BLOB NOT NULL,
    payload BLOB NOT NULL,
    received REAL NOT NULL,       -- unix time
    expires REAL,                 -- unix time from the MQTT message expiry or the deadline, or NULL
    state TEXT NOT NULL,          -- queued | running | done
    final BLOB,                   -- the final reply once done
    PRIMARY KEY (response_topic, correlation)
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    correlation BLOB,
    payload BLOB NOT NULL
);
"""


@dataclass
class JournaledRequest:
    response_topic: str
    correlation: bytes
    payload: bytes
    received: float
    expires: float | None
    state: str


@dataclass
class OutboxReply:
    id: int
    topic: str
    correlation: bytes | None
    payload: bytes


class Journal:
    """The service's durable memory; see the module docstring."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        # WAL: a commit is one append; synchronous=FULL: committed rows survive a power cut, not only a crash
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- requests ----------------------------------------------------------------------

    def lookup(self, response_topic: str, correlation: bytes) -> tuple[str, bytes | None] | None:
        """(state, final reply or None) of a request seen before, or None for a new one."""
        with self._lock:
            row = self._db.execute(
                "SELECT state, final FROM requests WHERE response_topic = ? AND correlation = ?",
                (response_topic, correlation)).fetchone()
        return None if row is None else (row[0], row[1])

    def accept(self, response_topic: str, correlation: bytes, payload: bytes, received: float,
               expires: float | None) -> bool:
        """Record a request as queued; False (and nothing recorded) when it is already known."""
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO requests (response_topic, correlation, payload, received, expires, state) "
                "VALUES (?, ?, ?, ?, ?, 'queued') ON CONFLICT DO NOTHING",
                (response_topic, correlation, payload, received, expires))
            return cur.rowcount == 1

    def mark_running(self, response_topic: str, correlation: bytes) -> None:
        with self._lock:
            self._db.execute("UPDATE requests SET state = 'running' WHERE response_topic = ? AND correlation = ?",
                             (response_topic, correlation))

    def finish(self, response_topic: str, correlation: bytes, final: bytes) -> int:
        """Mark a request done and put its final reply in the outbox, in one transaction.

        Returns the outbox id to pass to `sent()` when the broker acknowledges the reply.
        """
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "UPDATE requests SET state = 'done', final = ? WHERE response_topic = ? AND correlation = ?",
                (final, response_topic, correlation))
            return self._db.execute("INSERT INTO outbox (topic, correlation, payload) VALUES (?, ?, ?)",
                                    (response_topic, correlation, final)).lastrowid

    def unfinished(self) -> list[JournaledRequest]:
        """Requests accepted but not done (after a restart: what the last run left), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT response_topic, correlation, payload, received, expires, state FROM requests "
                "WHERE state != 'done' ORDER BY received").fetchall()
        return [JournaledRequest(*r) for r in rows]

    def prune(self, older_than: float) -> int:
        """Forget done requests received before `older_than` (unix time); returns how many.

        After that a repeat of one of them is treated as a new request.
        """
        with self._lock:
            return self._db.execute("DELETE FROM requests WHERE state = 'done' AND received < ?",
                                    (older_than,)).rowcount

    # -- outbox ------------------------------------------------------------------------

    def add_reply(self, topic: str, correlation: bytes | None, payload: bytes) -> int:
        """Keep a reply that is not tied to a request row (an error for a malformed request)."""
        with self._lock:
            return self._db.execute("INSERT INTO outbox (topic, correlation, payload) VALUES (?, ?, ?)",
                                    (topic, correlation, payload)).lastrowid

    def sent(self, outbox_id: int) -> None:
        """The broker acknowledged this reply: it no longer needs to be kept."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (outbox_id,))

    def unsent(self) -> list[OutboxReply]:
        """Replies not acknowledged by the broker, in the order they were written."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, correlation, payload FROM outbox ORDER BY id").fetchall()
        return [OutboxReply(*r) for r in rows]

