"""Store-and-forward outbox: every device → hub message is written here first and deleted only once the
broker acknowledged it, so a broker outage or an agent crash loses nothing that was accepted.

SQLite in WAL mode survives `kill -9` of the agent without corruption; `synchronous=NORMAL` trades the last
few commits on *power loss* for not fsyncing every message. The queue is bounded: when full, the oldest
messages are dropped (telemetry first, then results, events last), counted, and the count is reported.
"""

import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Which messages go first when the bound is reached: telemetry is periodic and superseded by the next one,
# results matter more, events (update outcomes, errors) matter most.
DROP_ORDER = ("telemetry", "results", "events")
SQLITE_FULL = 13  # sqlite3.SQLITE_FULL exists only from Python 3.11
# On a full disk SQLite in WAL mode cannot even delete (the WAL must grow, and a checkpoint grows the database),
# so the outbox keeps a small reserve file it gives up to make room; the WAL is checkpointed every 100 pages
# (400 KiB) so that a checkpoint never needs more than the reserve.
RESERVE_BYTES = 512 * 1024
WAL_AUTOCHECKPOINT_PAGES = 100


class StoreFull(Exception):
    """The disk stayed full after dropping old messages: this message was not queued."""


class StoreClosed(Exception):
    """The outbox was closed (the agent stopped): this message was not queued."""


def _is_full(error: sqlite3.OperationalError) -> bool:
    return getattr(error, "sqlite_errorcode", None) == SQLITE_FULL or "disk is full" in str(error)


def make_private(path: Path) -> None:
    """The outbox holds everything the device reports: its folder (the agent's data folder) 0700 and the database
    0600 before SQLite opens it; SQLite gives its -wal and -shm files the database's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)  # a database from before this rule


@dataclass(frozen=True)
class Queued:
    seq: int
    topic: str
    payload: bytes
    qos: int


class Outbox:
    def __init__(self, path: Path, max_messages: int = 100_000) -> None:
        make_private(path)
        self.path = path
        self.max_messages = max_messages
        self._lock = threading.Lock()
        self._closed = False
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        self._reserve = path.with_name(path.name + ".reserve")
        self._fill_reserve()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, topic TEXT NOT NULL,"
            " payload BLOB NOT NULL, qos INTEGER NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self._last_seq = max(self._meta("last_seq"), self._max_queued_seq())
        # Kept in memory: counting the table on every append would cost O(backlog) per message.
        self._depth = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self.dropped = self._meta("dropped")
        self.overflows = 0  # times the disk was full (this process)
        self.lost = 0  # messages not queued at all because the disk stayed full (this process)

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _max_queued_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0])

    def append(self, kind: str, topic: str, qos: int, make_payload: Callable[[int], bytes]) -> tuple[int, int]:
        """Give the message the next seq (persisted: seqs never repeat across restarts) and queue it, in one
        transaction. Returns (seq, how many older messages were dropped to respect the bound).

        A full disk ("database or disk is full") is handled like the bound: the WAL is checkpointed, the oldest
        messages are dropped in DROP_ORDER (counted in `dropped` and `overflows`) and the append is retried once;
        if it still does not fit, StoreFull is raised and the message was not queued (it has no seq)."""
        with self._lock:
            if self._closed:
                raise StoreClosed(f"outbox {self.path}: closed, {kind} message not queued")
            try:
                return self._append(kind, topic, qos, make_payload)
            except sqlite3.OperationalError as error:
                if not _is_full(error):
                    raise
            self.overflows += 1
            freed = self._make_room()
            try:
                seq, dropped = self._append(kind, topic, qos, make_payload)
            except sqlite3.OperationalError as error:
                if not _is_full(error):
                    raise
                self.lost += 1
                # Give the WAL's space back to the file system and rebuild the reserve from it, so the next
                # attempt has room to checkpoint and drop instead of staying stuck.
                self._checkpoint("TRUNCATE")
                self._fill_reserve()
                raise StoreFull(f"outbox {self.path}: disk full, {kind} message not queued") from error
            return seq, dropped + freed

    def _append(self, kind: str, topic: str, qos: int, make_payload: Callable[[int], bytes]) -> tuple[int, int]:
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
            # SQLite rolls back by itself on some errors (SQLITE_FULL at COMMIT): a second ROLLBACK would raise
            # "no transaction is active" and hide the real error.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._last_seq = seq
        self._depth += 1 - dropped
        return seq, dropped

    def _make_room(self) -> int:
        """After a full disk: give up the reserve, checkpoint (the WAL file keeps its size and is reused from its
        start, so the next writes need no new space), drop the oldest tenth of the queue (at least one message) by
        the drop order into free pages, and take back what space is left as the reserve. Returns how many
        messages were dropped."""
        self._reserve.unlink(missing_ok=True)
        self._checkpoint()
        excess, dropped_before = max(1, self._depth // 10), self.dropped
        try:
            self._db.execute("BEGIN IMMEDIATE")
            dropped = self._enforce_bound(self.max_messages + excess)
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self.dropped = dropped_before
            if not _is_full(error):
                raise
            return 0
        self._depth -= dropped
        self._checkpoint()
        self._fill_reserve()
        return dropped

    def _fill_reserve(self) -> None:
        """Best effort: (re)create the reserve; on a disk that is still full it is whatever fits."""
        size = self._reserve.stat().st_size if self._reserve.exists() else 0
        block = bytes(64 * 1024)
        try:
            with open(self._reserve, "ab") as handle:
                while size < RESERVE_BYTES:
                    handle.write(block)
                    handle.flush()
                    size += len(block)
        except OSError:
            pass

    def _checkpoint(self, mode: str = "RESTART") -> None:
        try:
            self._db.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        except sqlite3.OperationalError as error:
            if not _is_full(error):
                raise

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

    @property
    def last_seq(self) -> int:
        """The seq the latest queued message got (0: none yet); seqs are never reused, even after acks."""
        return self._last_seq

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
            try:
                self._ack(seqs)
            except sqlite3.OperationalError as error:
                if not _is_full(error):
                    raise
                # Even a delete needs WAL space: free the reserve, checkpoint, and try once more.
                self._reserve.unlink(missing_ok=True)
                self._checkpoint()
                self._ack(seqs)
                self._fill_reserve()

    def _ack(self, seqs: list[int]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            deleted = sum(self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount for seq in seqs)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._depth -= deleted

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()
