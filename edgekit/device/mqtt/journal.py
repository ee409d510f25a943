"""An on-disk journal of accepted requests and of replies the broker has not acknowledged.

paho keeps its MQTT session in memory only, so a power cut or a SIGKILL loses what was
in flight. The journal keeps, in one sqlite file:

    requests  one row per accepted request, keyed by (response topic, correlation data):
              queued -> running -> done (with its final reply, to answer a repeat without
              generating again); queued -> cancelled -> done (a cancel survives a restart)
    outbox    final and error replies written before they are published and deleted when
              the broker's PUBACK arrives; what is left after a crash is sent again
    subscriptions  the topic filters the device subscribed to: its broker session keeps them
              across restarts, so those the next start no longer wants are unsubscribed

One service uses a journal at a time (`lock()`, a lock file beside it): two services with the
same device id would answer each other's requests "interrupted".

A request row is committed before the service returns from on_message, which is when
paho sends the PUBACK: a request the broker considers delivered is always on disk.
Streamed chunks are not journaled (they are many and only useful live); the final
reply carries the whole text.

Opening checks the file (sqlite's integrity check and this schema), so a damaged journal
(garbage bytes, a truncated copy, another program's database) is refused at start with a
JournalError that names the file, instead of failing on some later request. `move_aside()`
and `salvage()` are how a service starts over from one (`edgekit serve --reset-journal`).

Thread-safe: one connection behind a lock. Nothing here publishes.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import quote

from edgekit.errors import EdgekitError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    response_topic TEXT NOT NULL,
    correlation BLOB NOT NULL,
    payload BLOB NOT NULL,
    received REAL NOT NULL,       -- unix time
    expires REAL,                 -- unix time from the MQTT message expiry or the deadline, or NULL
    state TEXT NOT NULL,          -- queued | running | cancelled | done
    final BLOB,                   -- the final reply once done
    PRIMARY KEY (response_topic, correlation)
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    correlation BLOB,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS subscriptions (
    filter TEXT PRIMARY KEY
);
"""


# the columns each table must have: a file whose tables lack them is not (or no longer) a journal
_COLUMNS = {"requests": {"response_topic", "correlation", "payload", "received", "expires", "state", "final"},
            "outbox": {"id", "topic", "correlation", "payload"}}
# sqlite result codes that say the file cannot be opened or written, not that its content is damaged
_NOT_DAMAGE = ("SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_READONLY", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL",
               "SQLITE_IOERR", "SQLITE_AUTH", "SQLITE_NOMEM")


class JournalError(EdgekitError):
    """The journal file cannot be used. `damaged`: its content is broken (moving it aside and
    starting a new one helps); otherwise it cannot be opened (a path or permission problem)."""

    def __init__(self, path: Path, reason: str, damaged: bool):
        path = Path(path).absolute()
        if damaged:
            message = (f"the journal {path} is damaged ({reason}); move it aside and start a new one with "
                       "`edgekit serve ... --reset-journal` (the requests it held that can still be read are "
                       "answered 'interrupted'), or delete it")
        else:
            message = (f"cannot open the journal {path} ({reason}); check that its folder exists and is writable "
                       "by this user, or give another with --journal")
        super().__init__(message)
        self.path = path
        self.reason = reason
        self.damaged = damaged


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
        """Open (or create) the journal at `path`; raises JournalError when it cannot be used."""
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JournalError(self.path, e.strerror or str(e), damaged=False) from None
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        except sqlite3.Error as e:
            raise JournalError(self.path, str(e), damaged=False) from None
        try:
            # WAL: a commit is one append; synchronous=FULL: committed rows survive a power cut, not only a crash
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._check()
        except JournalError:
            self._db.close()
            raise
        except sqlite3.Error as e:
            self._db.close()
            raise JournalError(self.path, str(e), damaged=_is_damage(e)) from None

    def _check(self) -> None:
        """Create the tables in a new file; in an existing one, check sqlite's integrity and the schema."""
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        tables.discard("sqlite_sequence")  # sqlite's own, for AUTOINCREMENT
        if tables and not set(_COLUMNS) <= tables:
            raise JournalError(self.path, f"a database with the tables {sorted(tables)}, not an edgekit journal",
                               damaged=True)
        if tables:
            problems = [r[0] for r in self._db.execute("PRAGMA integrity_check(5)")]
            if problems != ["ok"]:
                said = "; ".join(problems).replace("\n", " ")[:300]
                raise JournalError(self.path, f"sqlite's integrity check: {said}", damaged=True)
            for table, columns in _COLUMNS.items():
                have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                if not columns <= have:
                    raise JournalError(self.path, f"its {table} table lacks {sorted(columns - have)}", damaged=True)
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

    def accept(self, response_topic: str, correlation: bytes, payload: bytes | bytearray, received: float,
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

    def cancel(self, response_topic: str, correlation: bytes) -> None:
        """A queued request was cancelled: the next start answers it so, if this one does not."""
        with self._lock:
            self._db.execute("UPDATE requests SET state = 'cancelled' WHERE response_topic = ? AND correlation = ? "
                             "AND state = 'queued'", (response_topic, correlation))

    def finish(self, response_topic: str, correlation: bytes, final: bytes) -> int:
        """Mark a request done and put its final reply in the outbox, in one transaction.

        Returns the outbox id to pass to `sent()` when the broker acknowledges the reply.
        """
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "UPDATE requests SET state = 'done', final = ? WHERE response_topic = ? AND correlation = ?",
                (final, response_topic, correlation))
            cur = self._db.execute("INSERT INTO outbox (topic, correlation, payload) VALUES (?, ?, ?)",
                                   (response_topic, correlation, final))
            assert cur.lastrowid is not None  # an INSERT that adds a row sets it
            return cur.lastrowid

    def drop(self, response_topic: str, correlation: bytes) -> None:
        """Forget a request without answering it (its reply topic is no longer allowed)."""
        with self._lock:
            self._db.execute("DELETE FROM requests WHERE response_topic = ? AND correlation = ?",
                             (response_topic, correlation))

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
            cur = self._db.execute("INSERT INTO outbox (topic, correlation, payload) VALUES (?, ?, ?)",
                                   (topic, correlation, payload))
            assert cur.lastrowid is not None  # an INSERT that adds a row sets it
            return cur.lastrowid

    def sent(self, outbox_id: int) -> None:
        """The broker acknowledged this reply: it no longer needs to be kept."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (outbox_id,))

    def unsent(self) -> list[OutboxReply]:
        """Replies not acknowledged by the broker, in the order they were written."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, correlation, payload FROM outbox ORDER BY id").fetchall()
        return [OutboxReply(*r) for r in rows]



    # -- subscriptions ---------------------------------------------------------------------

    def subscriptions(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT filter FROM subscriptions")}

    def set_subscriptions(self, filters: set[str]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM subscriptions")
            self._db.executemany("INSERT INTO subscriptions (filter) VALUES (?)", [(f,) for f in sorted(filters)])
            self._db.execute("COMMIT")


def lock(path: str | Path) -> IO:
    """An exclusive lock on the journal at `path` (the file `path`.lock), held while the returned
    file is open; JournalError when another service holds it."""
    import fcntl

    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a")
    except OSError as e:
        raise JournalError(path, f"{lock_path}: {e.strerror or e}", damaged=False) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise JournalError(path, "another process uses it: is an `edgekit serve` with the same --device-id "
                                 "running? Stop it first (or give this one its own --journal)", damaged=False) from None
    return f


def _is_damage(e: sqlite3.Error) -> bool:
    name = getattr(e, "sqlite_errorname", "") or ""
    return not name.startswith(_NOT_DAMAGE)


# -- starting over from a damaged journal ---------------------------------------------


@dataclass
class Salvage:
    """What could still be read from a damaged journal."""

    unfinished: list[tuple[str, bytes]] = field(default_factory=list)  # (response topic, correlation) not done
    unsent: list[OutboxReply] = field(default_factory=list)  # replies the broker never acknowledged
    problem: str | None = None  # why reading stopped early, if it did


def move_aside(path: str | Path) -> Path:
    """Rename the journal at `path` (with its -wal and -shm files) to PATH.damaged-TIME; returns the new path.

    The next Journal(path) then starts empty. Nothing is deleted: the file stays for a post-mortem.
    """
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    for suffix in ("-wal", "-shm"):  # sqlite finds them by name next to the database: they move with it
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    path.rename(target)
    return target


def salvage(path: str | Path) -> Salvage:
    """Read what can still be read from a damaged journal, row by row, never raising.

    Rows that come back with the wrong types (damage that sqlite does not notice) are skipped.
    """
    out = Salvage()
    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)
    except sqlite3.Error as e:
        out.problem = str(e)
        return out
    try:
        _read_rows(db, "SELECT response_topic, correlation FROM requests WHERE state != 'done'", out,
                   lambda r: out.unfinished.append((r[0], r[1]))
                   if isinstance(r[0], str) and isinstance(r[1], bytes) else None)
        _read_rows(db, "SELECT id, topic, correlation, payload FROM outbox ORDER BY id", out,
                   lambda r: out.unsent.append(OutboxReply(*r))
                   if isinstance(r[1], str) and isinstance(r[2], (bytes, type(None))) and isinstance(r[3], bytes)
                   else None)
    finally:
        db.close()
    return out


def _read_rows(db: sqlite3.Connection, query: str, out: Salvage, keep) -> None:
    try:
        cursor = db.execute(query)
        while (row := cursor.fetchone()) is not None:  # one at a time: keep what precedes a damaged page
            keep(row)
    except sqlite3.Error as e:
        out.problem = out.problem or str(e)
