"""Retention of the access log: events older than `event_retention_days` are deleted, once
when the server starts and then every `retention_interval_s` (an hour), in a background
thread. The cutoff is read from the gate's wall clock, so tests move time by hand and call
`run_once`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from facegate_server.store.base import Store

log = logging.getLogger(__name__)


class Retention:
    def __init__(
        self,
        store: Store,
        days: int,
        *,
        clock: Callable[[], datetime],
        interval: float = 3600.0,
    ) -> None:
        self.store, self.days, self.clock, self.interval = store, days, clock, interval
        self.last_run: datetime | None = None
        self.last_deleted = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.days > 0

    def cutoff(self) -> datetime | None:
        """Events before this are deleted; None when events are kept forever."""
        return self.clock() - timedelta(days=self.days) if self.enabled else None

    def run_once(self) -> int:
        """Delete the events older than the retention period; how many."""
        cutoff = self.cutoff()
        if cutoff is None:
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
            try:
                self.run_once()
            except Exception:  # the store closing under it, a full disk: try next time
                log.exception("retention failed")
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
