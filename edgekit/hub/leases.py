"""Leases: jobs one hub process at a time may do on a shared database (the rollout controller, retention).

A lease is a row (`edgekit.hub.db.Lease`): its holder and when it expires. `acquire` is one UPDATE that succeeds
when the caller holds the lease or it has expired, so two processes can never both take it; the holder renews
it by acquiring again well before it expires. A holder that dies (or loses the database) stops renewing, and
another process takes over `ttl_s` later. `fence` does the same inside a caller's transaction, so a holder that
was paused past its expiry cannot commit what it decided while another process held the lease.

Works the same on SQLite and PostgreSQL. Expiry times are each process's wall clock: replicas' clocks must agree
to well within `ttl_s` (NTP does).
"""

import logging
import time

from sqlalchemy import or_, update
from sqlalchemy.orm import Session, sessionmaker

from edgekit.hub.db import Lease as LeaseRow
from edgekit.hub.db import dialect_insert

log = logging.getLogger(__name__)
CONTROLLER = "controller"
RETENTION = "retention"


class LostLease(Exception):
    """This process no longer holds the lease: what it was about to commit is rolled back."""


class Lease:
    def __init__(self, sessions: sessionmaker, name: str, holder: str, ttl_s: float) -> None:
        self.sessions = sessions
        self.name = name
        self.holder = holder
        self.ttl_s = ttl_s
        self._row_made = False

    def acquire(self) -> bool:
        """Take or renew the lease; True when this process holds it now (for `ttl_s`)."""
        self._make_row()
        with self.sessions.begin() as session:
            return self._take(session, time.time())

    def fence(self, session: Session) -> None:
        """In `session`'s transaction: renew the lease, or raise LostLease (the caller's transaction then rolls
        back) when another process holds it."""
        if not self._take(session, time.time()):
            raise LostLease(f"lease '{self.name}' is held by another hub process")

    def release(self) -> None:
        """Give the lease up now (a clean stop), so another process takes over at once rather than after ttl_s."""
        mine = (LeaseRow.name == self.name) & (LeaseRow.holder == self.holder)
        try:
            with self.sessions.begin() as session:
                session.execute(update(LeaseRow).where(mine).values(expires=0.0))
        except Exception:  # the database is away: the lease then expires by itself, ttl_s later
            log.warning("could not release lease '%s'; another hub process takes it when it expires", self.name)

    def _take(self, session: Session, now: float) -> bool:
        free = or_(LeaseRow.holder == self.holder, LeaseRow.expires < now)
        statement = update(LeaseRow).where(LeaseRow.name == self.name, free)
        return session.execute(statement.values(holder=self.holder, expires=now + self.ttl_s)).rowcount == 1

    def _make_row(self) -> None:
        if self._row_made:
            return
        with self.sessions.begin() as session:
            insert = dialect_insert(session)
            session.execute(insert(LeaseRow).values(name=self.name, holder="", expires=0.0).on_conflict_do_nothing())
        self._row_made = True
