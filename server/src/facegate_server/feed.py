"""Following the access log as it is written (WatchAccessEvents), without polling it hard.

    writer (the gate, in an RPC thread)        followers (coroutines on the server's loop)
    store.record_event(...)                    seen = bell.rung
    bell.ring()  ─── wakes ──────────────▶     one store read after the window's tail,
                                               shared by all those woken (a small executor)
                                               each takes its events after its position
                                               await bell.wait(seen, poll)

The store is the truth; the bell only says "read again". On each wake a follower looks at
everything after the last event it sent, so wakes may coalesce (ten events, one wake) and
nothing is lost: an event committed before the follower took `seen` is in the read that
follows, and one committed after rings the bell, which the follower's wait sees. It also
reads again every `poll` seconds unwoken, for events another process wrote to a shared
store. Ids are the order: the stores make an event visible only after every lower id.

Followers take no thread of the RPC pool while they wait: only the short store reads run,
in an executor of their own, so turnstiles never wait behind them. `close()` (the server
stopping) ends every follower with ServerStopping; the caller reconnects with its last id.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent import futures
from typing import Any, Final

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

    async def wait(self, seen: int, timeout: float) -> bool:
        """Return when the bell has rung since it stood at `seen`, or after `timeout`
        seconds (False), or at once when it is closed."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            if self._rung != seen or self._closed:
                return True
            self._waiting.add(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter[1].wait()
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                self._waiting.discard(waiter)


def _wake(waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    # One hand-over a loop, not one a follower: each costs the writer (Identify's thread)
    # a write to the loop's wake-up socket, and all followers wait on the server's loop.
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for loop, event in waiting:
        by_loop.setdefault(loop, []).append(event)
    for loop, events in by_loop.items():
        # A closed loop raises RuntimeError: nobody is waiting there any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_set_all, events)


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


EVERYTHING: Final = EventFilter()


class EventFeed:
    """The followers of one store's access log: at most `max_followers` at once, each
    reading `page` events at a time, re-reading every `poll` seconds when not woken.

    The log's newest events are shared: on a wake, one read of the store (whoever asks
    first; the others wait for it) brings a window of the `recent` newest events up to
    date, and followers at its end take their events from it, filtered in memory. So fifty
    followers cost the store one read an event, not fifty, and turnstiles do not queue
    behind them for the store. A follower behind the window (catching up from an old id,
    or too slow for it) reads the store itself, page by page, until it reaches the window.
    Used from one event loop (the server's): its bookkeeping has no lock.
    """

    def __init__(
        self,
        store: Store,
        bell: EventBell,
        *,
        max_followers: int = 64,
        poll: float = 1.0,
        page: int = 500,
        recent: int = 2000,
        readers: int = 2,
    ) -> None:
        self.store = store
        self.bell = bell
        self.max_followers = max_followers
        self.poll = poll
        self.page = page
        self.recent = recent
        self.store_reads = 0
        """Reads of the store so far (for tests and status)."""
        self._followers = 0
        self._lock = threading.Lock()
        self._reads = futures.ThreadPoolExecutor(readers, thread_name_prefix="facegate-events")
        # The window: every event with an id in (floor, tail], oldest first; None until
        # the first refresh.
        self._window: deque[AccessEvent] = deque()
        self._floor: int | None = None
        self._tail = 0
        # The last refresh begun: the bell's count and the clock then.
        self._refreshed_rung = -1
        self._refreshed_at = float("-inf")
        self._refreshing: asyncio.Lock | None = None

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

    async def _read(
        self, method: Callable[..., list[AccessEvent]], *args: Any
    ) -> list[AccessEvent]:
        self.store_reads += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._reads, method, *args)
        except RuntimeError:  # the readers are shut down
            if self.bell.closed:
                raise ServerStopping(_STOPPING) from None
            raise

    async def _refresh(self, seen: int, since: float | None) -> None:
        """Bring the window up to what the store holds now, unless a refresh that began
        after the bell had rung `seen` times (and after the clock read `since`, for a
        follower that waited in vain: another process may have written) has been done
        meanwhile. So the followers woken by one ring share one read."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if self._refreshed_rung >= seen and (since is None or self._refreshed_at >= since):
                return
            # Every event counted by the bell now is in the store: the read sees them.
            before = self._refreshed_rung, self._refreshed_at
            self._refreshed_rung, self._refreshed_at = self.bell.rung, time.monotonic()
            try:
                await self._read_new()
            except BaseException:  # cancelled (its follower left) or failed: not refreshed
                self._refreshed_rung, self._refreshed_at = before
                raise

    async def _read_new(self) -> None:
        if self._floor is None:
            newest = await self._read(self.store.list_events, EVERYTHING, 1)
            self._floor = self._tail = newest[0].event_id if newest else 0
        while True:
            events = await self._read(self.store.events_after, self._tail, EVERYTHING, self.page)
            self._window.extend(events)
            if events:
                self._tail = events[-1].event_id
            while len(self._window) > self.recent:
                self._floor = self._window.popleft().event_id
            if len(events) < self.page:
                return

    def _from_window(self, after: int, where: EventFilter) -> list[AccessEvent]:
        """The window's events after `after` matching `where`, oldest first."""
        found = []
        for event in reversed(self._window):  # followers at the end look at the newest few
            if event.event_id <= after:
                break
            if where.matches(event):
                found.append(event)
        found.reverse()
        return found

    async def follow(self, after_id: int, where: EventFilter) -> AsyncIterator[AccessEvent]:
        """Every event matching `where` with an id greater than `after_id`, oldest first,
        then each new one as it is written, until the feed closes (ServerStopping) or the
        caller stops iterating. FollowersLimit when there are too many followers."""
        self._join()
        try:
            position = after_id  # every event up to here has been sent, or did not match
            since: float | None = time.monotonic()  # a new follower sees the store as it is
            while True:
                if self.bell.closed:
                    raise ServerStopping(_STOPPING)
                seen = self.bell.rung  # before reading: a later event rings after it
                await self._refresh(seen, since)
                tail = self._tail  # the store held every event up to here when read
                if self._floor is not None and position >= self._floor:
                    events = self._from_window(position, where)
                else:
                    events = await self._read(self.store.events_after, position, where, self.page)
                more = len(events) >= self.page
                for event in events[: self.page]:
                    yield event
                    position = event.event_id
                since = None
                if not more:
                    position = max(position, tail)  # nothing else matched up to the tail
                    if not await self.bell.wait(seen, self.poll):
                        since = time.monotonic()  # the poll: read the store anew
        finally:
            self._leave()

    def close(self) -> None:
        """End every follower (they raise ServerStopping); new ones end at once."""
        self.bell.close()

    def shutdown(self) -> None:
        """Release the readers (after the RPC server has stopped)."""
        self.bell.close()
        self._reads.shutdown(wait=True, cancel_futures=True)


_STOPPING = (
    "the server is stopping: reconnect with after_event_id set to the last event id received"
)
