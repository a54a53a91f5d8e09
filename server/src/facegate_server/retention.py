"""Retention of the access log: events older than `event_retention_days` are deleted, once
when the server starts and then every `retention_interval_s` (an hour), in a background
thread. The cutoff is read from the gate's wall clock, so tests move time by hand and call
`run_once`.

A chain's servers share one access log in PostgreSQL: one of them deletes, the holder of
the `event-retention` lease there (cloud/lease.py), so that the log is not swept by every
server each hour. The holder renews it at each run, well inside its ttl (two intervals);
the others try at theirs, and one takes over when the holder stops (at once after a clean
stop, which releases it; within its ttl after a crash). A server alone holds a LocalLease:
always.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from facegate_server.cloud.lease import Lease, LocalLease, PostgresLease
from facegate_server.errors import StoreUnavailable
from facegate_server.store.base import Store

log = logging.getLogger(__name__)

RETRY_S = 60.0
"""How soon a run the store could not serve (a chain's database unreachable) is tried again."""
LEASE = "event-retention"
"""The lease's name in facegate_lease (the chain's database: one access log, one lease)."""


def chain_lease(store_url: str, days: int, interval: float) -> Lease | None:
    """The lease that picks the one server of a chain (`store_url`: its PostgreSQL) that
    deletes old events; None for a server alone (no store URL) or with no retention."""
    if not store_url or days <= 0:
        return None
    return PostgresLease(store_url, name=LEASE, ttl=2 * interval)


class LeaseUnanswered(Exception):
    """The lease's database did not answer: whether another server deletes is unknown."""


class Retention:
    def __init__(
        self,
        store: Store,
        days: int,
        *,
        clock: Callable[[], datetime],
        interval: float = 3600.0,
        lease: Lease | None = None,
    ) -> None:
        self.store, self.days, self.clock, self.interval = store, days, clock, interval
        self.lease: Lease = lease or LocalLease(LEASE)
        self.last_run: datetime | None = None
        self.last_deleted = 0
        self.held: bool | None = None
        """Whether this server deleted at its last try (None: not tried yet); False when
        another server of the chain holds the lease."""
        self._token: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.days > 0

    def cutoff(self) -> datetime | None:
        """Events before this are deleted; None when events are kept forever."""
        return self.clock() - timedelta(days=self.days) if self.enabled else None

    def run_once(self) -> int:
        """Delete the events older than the retention period; how many. On a chain, only
        while this server holds the lease (0 otherwise: another server deletes)."""
        cutoff = self.cutoff()
        if cutoff is None:
            return 0
        token = self.lease.acquire()
        if token is None and not self.lease.answered:  # nobody knows whose it is: soon again
            raise LeaseUnanswered(
                f"the chain's database did not answer for the {self.lease.name} lease"
            )
        if (token is not None) != self.held:
            log.info(
                "deleting access events past retention here"
                if token is not None
                else "another server of the chain deletes access events past retention",
                extra={"lease": self.lease.name, "holder": self.lease.holder},
            )
        self._token, self.held = token, token is not None
        if token is None:
            return 0
        deleted = self.store.delete_events_before(cutoff)
        self.last_run, self.last_deleted = self.clock(), deleted
        if deleted:
            log.info(
                "access events past retention deleted",
                extra={"deleted": deleted, "before": cutoff.isoformat(), "days": self.days},
            )
        return deleted

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            wait = self.interval
            try:
                self.run_once()
            except (StoreUnavailable, LeaseUnanswered) as error:  # the database away: soon
                log.warning("retention postponed: %s", error)
                wait = min(wait, RETRY_S)
            except Exception:  # the store closing under it, a full disk: try next time
                log.exception("retention failed")
            if self._stop.wait(wait):
                return

    def stop(self) -> None:
        """Stop, and let another server of the chain take the deleting over at its next try."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._token is not None:
            self.lease.release(self._token)
            self._token, self.held = None, None
        self.lease.close()
