"""Store-and-forward outbox: every device → hub message is written here first and deleted only once the
broker acknowledged it, so a broker outage or an agent crash loses nothing that was accepted.

SQLite in WAL mode survives `kill -9` of the agent without corruption; `synchronous=NORMAL` trades the last
few commits on *power loss* for not fsyncing every message. The queue is bounded: when full, the oldest
messages are dropped (telemetry first, then results, events last), counted, and the count is reported.
"""

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Which messages go first when the bound is reached: telemetry is periodic and superseded by the next one,
# results matter more, events (update outcomes, errors) matter most.
DROP_ORDER = ("telemetry", "results", "events")


@dataclass(frozen=True)
class Queued:
    seq: int
    topic: str
    payload: bytes
    qos: int


class Outbox:
    def __init__(self, path: Path, max_messages: int = 100_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_messages = max_messages
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, topic TEXT NOT NULL,"
            " payload BLOB NOT NULL, qos INTEGER NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self._last_seq = max(self._meta("last_seq"), self._max_queued_seq())
        # Kept in memory: counting the table on every append would cost O(backlog) per message.
        self._depth = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self.dropped = self._meta("dropped")

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _max_queued_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0])

    def append(self, kind: str, topic: str, qos: int, make_payload: Callable[[int], bytes]) -> tuple[int, int]:
        """Give the message the next seq (persisted: seqs never repeat across restarts) and queue it, in one
        transaction. Returns (seq, how many older messages were dropped to respect the bound)."""
        with self._lock:
            seq = self._last_seq + 1
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO outbox (seq, kind, topic, payload, qos) VALUES (?, ?, ?, ?, ?)",
                    (seq, kind, topic, make_payload(seq), qos),
                )
                self._set_meta("last_seq", seq)
                dropped = self._enforce_bound(self._depth + 1)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._last_seq = seq
            self._depth += 1 - dropped
            return seq, dropped

    def _enforce_bound(self, depth: int) -> int:
        excess = depth - self.max_messages
        dropped = 0
        for kind in DROP_ORDER:
            if excess - dropped <= 0:
                break
            cursor = self._db.execute(
                "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE kind = ? ORDER BY seq LIMIT ?)",
                (kind, excess - dropped),
            )
            dropped += cursor.rowcount
        if dropped:
            self.dropped += dropped
            self._set_meta("dropped", self.dropped)
        return dropped

    def depth(self) -> int:
        return self._depth

    def peek(self, after: int, limit: int) -> list[Queued]:
        """The oldest queued messages with seq > `after`, in seq order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, qos FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()
        return [Queued(seq, topic, bytes(payload), qos) for seq, topic, payload, qos in rows]

    def ack(self, seqs: list[int]) -> None:
        """Delete acknowledged messages, in one transaction (one commit, not one per message)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                deleted = sum(self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount for seq in seqs)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._depth -= deleted

    def close(self) -> None:
        with self._lock:
            self._db.close()
