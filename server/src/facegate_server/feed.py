"""Following the access log as it is written (WatchAccessEvents), without polling it hard.

    writer (the gate, in an RPC thread)        follower (a coroutine on the server's loop)
    store.record_event(...)                    seen = bell.rung
    bell.ring()  ─── wakes ──────────────▶     events_after(last, ...) in a small executor
                                               yield each, last = its id
                                               await bell.wait(seen, poll)

The store is the truth; the bell only says "read again". A follower reads everything after
the last id it sent on each wake, so wakes may coalesce (ten events, one wake) and nothing
is lost: an event committed before the follower took `seen` is in its read, and one
committed after rings the bell, which the follower's wait sees. It also reads again every
`poll` seconds unwoken, for events another process wrote to a shared store.

Followers take no thread of the RPC pool while they wait: only their short store reads run,
in an executor of their own, so turnstiles never wait behind them. `close()` (the server
stopping) ends every follower with ServerStopping; the caller reconnects with its last id.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from concurrent import futures

from facegate_server.domain import AccessEvent, EventFilter
from facegate_server.errors import FollowersLimit, ServerStopping
from facegate_server.store import Store


class EventBell:
    """Rung by the writer after each access event is stored; awaited by followers on any
    event loop. Thread-safe; ringing with nobody waiting costs a lock and an addition."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rung = 0
        self._closed = False
        self._waiting: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    @property
    def rung(self) -> int:
        """How many times the bell has rung: take it before reading the store."""
        with self._lock:
            return self._rung

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def ring(self) -> None:
        with self._lock:
            self._rung += 1
            waiting = list(self._waiting)
        _wake(waiting)

    def close(self) -> None:
        """Wake every waiter for good: `wait` returns at once from now on."""
        with self._lock:
            self._closed = True
            waiting = list(self._waiting)
        _wake(waiting)

    async def wait(self, seen: int, timeout: float) -> None:
        """Return when the bell has rung since it stood at `seen`, or after `timeout`
        seconds, or at once when it is closed."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            if self._rung != seen or self._closed:
                return
            self._waiting.add(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter[1].wait()
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiting.discard(waiter)


def _wake(waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    for loop, event in waiting:
        # A closed loop raises RuntimeError: nobody is waiting there any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(event.set)


class EventFeed:
    """The followers of one store's access log: at most `max_followers` at once, each
    reading `page` events at a time, re-reading every `poll` seconds when not woken."""

    def __init__(
        self,
        store: Store,
        bell: EventBell,
        *,
        max_followers: int = 64,
        poll: float = 1.0,
        page: int = 500,
        readers: int = 2,
    ) -> None:
        self.store = store
        self.bell = bell
        self.max_followers = max_followers
        self.poll = poll
        self.page = page
        self._followers = 0
        self._lock = threading.Lock()
        self._reads = futures.ThreadPoolExecutor(readers, thread_name_prefix="facegate-events")

    @property
    def followers(self) -> int:
        with self._lock:
            return self._followers

    def _join(self) -> None:
        with self._lock:
            if self._followers >= self.max_followers:
                raise FollowersLimit(
                    f"the server already has {self.max_followers} followers of the access log "
                    "(FACEGATE_MAX_FOLLOWERS); retry later",
                    retry_delay=max(1.0, self.poll),
                    metadata={"followers": str(self.max_followers)},
                )
            self._followers += 1

    def _leave(self) -> None:
        with self._lock:
            self._followers -= 1

    async def follow(self, after_id: int, where: EventFilter) -> AsyncIterator[AccessEvent]:
        """Every event matching `where` with an id greater than `after_id`, oldest first,
        then each new one as it is written, until the feed closes (ServerStopping) or the
        caller stops iterating. FollowersLimit when there are too many followers."""
        self._join()
        try:
            loop = asyncio.get_running_loop()
            last = after_id
            while True:
                if self.bell.closed:
                    raise ServerStopping(
                        "the server is stopping: reconnect with after_event_id set to the "
                        "last event id received"
                    )
                seen = self.bell.rung
                try:
                    events = await loop.run_in_executor(
                        self._reads, self.store.events_after, last, where, self.page
                    )
                except RuntimeError:  # the readers are shut down: the server is stopping
                    if self.bell.closed:
                        continue
                    raise
                for event in events:
                    yield event
                    last = event.event_id
                if len(events) < self.page:
                    await self.bell.wait(seen, self.poll)
        finally:
            self._leave()

    def close(self) -> None:
        """End every follower (they raise ServerStopping); new ones end at once."""
        self.bell.close()

    def shutdown(self) -> None:
        """Release the readers (after the RPC server has stopped)."""
        self.bell.close()
        self._reads.shutdown(wait=True, cancel_futures=True)
