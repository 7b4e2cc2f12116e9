"""Change events for subscribers (``Events.subscribe``): a hub of topics, a pending map
per subscriber, and the rate limit of progress-only changes.

Design notes
------------
* **Who talks to whom.** Components *publish* records (``EventHub.publish(topic, key,
  record)``): the uploads table a task's ``summary()`` whenever it stages the task's row
  or its shown state changes, the job engine a job's ``info()`` whenever it stages the
  job's row. The RPC component *subscribes* connections (``Subscriber``, one per
  connection, over a ``Sink``: the connection's outbox). This module knows neither: it
  imports nothing of fsagent, so both sides depend on it and not on each other.
* **Nothing when nobody listens.** A publisher first reads ``topic.active`` (a plain
  attribute, True while the topic has a subscriber) and renders nothing otherwise: the
  write path of uploads pays one attribute read per row it stages, never per write.
* **Every state move, in order.** A record whose state (``topic.state_field``) differs
  from the last one emitted for its key is emitted at once, to every subscriber, in
  publication order. A subscriber with room in its outbox gets it queued there
  synchronously (``Sink.try_send``), so two moves in one scheduling step are two
  messages. Per key, order holds because nothing bypasses what is pending: a record
  goes straight to the outbox only while the subscriber has nothing pending and no
  send in flight.
* **Progress at most ``1 / min_interval`` per second per key.** A record in the same
  state as the last one emitted for its key, less than ``min_interval`` after it, is
  held (the latest one per key, replacing older held ones) and emitted when its time
  comes (``tick``, run by ``run``); a state move in the meantime supersedes it. A
  record equal to the last one emitted is dropped. The per-key memory of what was
  emitted is pruned once it is older than ``min_interval`` (forgetting it changes no
  decision: the next record would go out at once either way).
* **Polled progress.** What changes on every write (an upload's offset) is not
  published by the write: a topic may have *pollers* (``add_poller``), which ``run``
  calls every ``min_interval`` while the topic has a subscriber, and which publish the
  records of what may be moving (the uploads table: its ``receiving`` tasks). An
  unchanged record is dropped as above, so a poll costs a few renders and no messages.
* **A slow subscriber is bounded, never waited for.** When its outbox is full (the
  byte bound of the RPC server's per-connection outbox), records wait in its
  ``pending`` map, one per key: a newer record for a key replaces the pending one in
  place (``coalesced`` counts those). So its memory is bounded by the number of tasks
  and jobs, not by the number of changes, and once it reads again it ends with the
  latest record of each. Its ``pump`` task moves pending records into the outbox,
  waiting for room; a publisher never waits (nor does a FUSE request behind it).
* **Time** is the ``clock`` the hub is given (``time.monotonic``; tests pass a fake
  one), so the rate limit is exact and testable without sleeping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import trio

__all__ = ["EventHub", "Topic", "Subscriber", "Sink", "UPLOADS", "JOBS", "UnknownTopic"]

log = logging.getLogger(__name__)

UPLOADS = "uploads"
JOBS = "jobs"
# How often a key's progress-only changes may go out: ~4 per second.
MIN_INTERVAL = 0.25


class UnknownTopic(ValueError):
    def __init__(self, name: object, known: Iterable[str]):
        super().__init__(f"unknown topic {name!r}; known: {', '.join(sorted(known))}")


class Sink(Protocol):
    """Where a subscriber's records go (the RPC connection's outbox)."""

    def try_send(self, method: str, params: list) -> bool:
        """Queue a notification if there is room now; False if there is not."""
        ...

    async def send(self, method: str, params: list) -> None:
        """Queue a notification, waiting for room; raises once the connection is gone."""
        ...


class Topic:
    """One kind of change (``uploads``, ``jobs``): its notification, its subscribers and
    what was last emitted per key."""

    def __init__(self, name: str, method: str, state_field: str):
        self.name = name
        self.method = method              # the notification's name on the wire
        self.state_field = state_field    # the record's field that holds its state
        self.active = False               # someone subscribed: publishers render records
        self.subscribers: dict[Subscriber, None] = {}  # insertion-ordered set
        # key -> (state, emitted at, record): the last record emitted, while recent.
        self._last: dict[str, tuple[Any, float, dict]] = {}
        self._prune_at = 1024
        # key -> (due, record): progress-only records held back by the rate limit.
        self.held: dict[str, tuple[float, dict]] = {}
        # Called every ``min_interval`` while active, to publish polled progress.
        self.pollers: list[Callable[[], None]] = []


class Subscriber:
    """One connection's subscription: its topics and its pending records."""

    def __init__(self, sink: Sink, label: str = ""):
        self.sink = sink
        self.label = label
        self.topics: set[str] = set()
        # (method, key) -> record, oldest first; at most one per key (see the notes).
        self.pending: dict[tuple[str, str], dict] = {}
        self.coalesced = 0        # records replaced while pending (never sent)
        self.sent = 0
        self.closed = False
        self._in_flight = False   # ``pump`` is sending a record taken from ``pending``
        self._wakeup: trio.Event | None = None

    def deliver(self, method: str, key: str, record: dict) -> None:
        """Queue ``record`` for this subscriber; never waits."""
        if self.closed:
            return
        if not self.pending and not self._in_flight and self.sink.try_send(method, [record]):
            self.sent += 1
            return
        slot = (method, key)
        if slot in self.pending:
            self.coalesced += 1
        self.pending[slot] = record  # an existing key keeps its place: no starvation
        if self._wakeup is not None:
            self._wakeup.set()

    def take(self) -> tuple[str, dict] | None:
        """The oldest pending record as ``(method, record)``, or None."""
        if not self.pending:
            return None
        slot = next(iter(self.pending))
        return slot[0], self.pending.pop(slot)

    async def pump(self) -> None:
        """Move pending records into the sink, waiting for room, until ``close``."""
        try:
            while not self.closed:
                item = self.take()
                if item is None:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    continue
                self._in_flight = True
                try:
                    await self.sink.send(item[0], [item[1]])
                finally:
                    self._in_flight = False
                self.sent += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the connection is gone; its close callback drops us
        finally:
            self.closed = True
            self.pending.clear()

    def close(self) -> None:
        self.closed = True
        self.pending.clear()
        if self._wakeup is not None:
            self._wakeup.set()


class EventHub:
    """Topics, their subscribers, and the rate limit (see the module notes)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 min_interval: float = MIN_INTERVAL):
        self.clock = clock
        self.min_interval = min_interval
        self.topics = {UPLOADS: Topic(UPLOADS, "uploadChanged", "state"),
                       JOBS: Topic(JOBS, "jobChanged", "State")}
        self.subscribers: dict[Subscriber, None] = {}
        self.published = 0    # records emitted to subscribers (one count per record)
        self._coalesced_gone = 0  # ``coalesced`` of subscribers that are gone
        self._timer: trio.Event | None = None

    def topic(self, name: str) -> Topic:
        return self.topics[name]

    def add_poller(self, topic: Topic, poll: Callable[[], None]) -> None:
        """Call ``poll`` every ``min_interval`` while ``topic`` has a subscriber (see the
        notes); it publishes what changed without telling anyone."""
        topic.pollers.append(poll)

    # -- subscriptions ------------------------------------------------------------------

    def named(self, names: Iterable[Any]) -> list[Topic]:
        """The topics ``names`` names (str or UTF-8 bytes); ``UnknownTopic`` otherwise."""
        out = []
        for name in names:
            if isinstance(name, bytes):
                try:
                    name = name.decode()
                except UnicodeDecodeError:
                    raise UnknownTopic(name, self.topics) from None
            if not isinstance(name, str) or name not in self.topics:
                raise UnknownTopic(name, self.topics)
            out.append(self.topics[name])
        return out

    def subscribe(self, sub: Subscriber, names: Iterable[Any]) -> None:
        """Add ``names`` to ``sub``'s topics (all or none: ``UnknownTopic``)."""
        for topic in self.named(names):
            topic.subscribers[sub] = None
            topic.active = True
            sub.topics.add(topic.name)
        self.subscribers[sub] = None
        self._wake_timer()  # pollers may start

    def unsubscribe(self, sub: Subscriber, names: Iterable[Any]) -> None:
        """Remove ``names`` from ``sub``'s topics; records already pending still go."""
        for topic in self.named(names):
            topic.subscribers.pop(sub, None)
            sub.topics.discard(topic.name)
            if not topic.subscribers:
                self._idle(topic)

    def drop(self, sub: Subscriber) -> None:
        """``sub``'s connection is gone: forget it entirely."""
        for topic in self.topics.values():
            if sub in topic.subscribers:
                del topic.subscribers[sub]
                if not topic.subscribers:
                    self._idle(topic)
        if sub in self.subscribers:
            del self.subscribers[sub]
            self._coalesced_gone += sub.coalesced
        sub.topics.clear()
        sub.close()

    def _idle(self, topic: Topic) -> None:
        topic.active = False
        topic._last.clear()
        topic.held.clear()

    # -- publishing ----------------------------------------------------------------------

    def publish(self, topic: Topic, key: str, record: dict) -> None:
        """``record`` is the latest of ``key`` in ``topic``. Callers check ``topic.active``
        first (and render nothing without it); never raises, never waits."""
        if not topic.active:
            return
        try:
            now = self.clock()
            state = record.get(topic.state_field)
            last = topic._last.get(key)
            if last is not None and last[0] == state:
                if last[2] == record:
                    topic.held.pop(key, None)  # what is held is older than this
                    return  # nothing a subscriber could see changed
                if now - last[1] < self.min_interval:
                    topic.held[key] = (last[1] + self.min_interval, record)
                    self._wake_timer()
                    return
            topic.held.pop(key, None)
            self._emit(topic, key, state, record, now)
        except Exception:
            # An event must never fail the change it reports (a FUSE write, a job's run).
            log.exception("publishing a %s change of %s failed", topic.name, key)

    def _emit(self, topic: Topic, key: str, state: Any, record: dict, now: float) -> None:
        topic._last[key] = (state, now, record)
        if len(topic._last) > topic._prune_at:
            self._prune(topic, now)
        for sub in topic.subscribers:
            sub.deliver(topic.method, key, record)
        self.published += 1

    def _prune(self, topic: Topic, now: float) -> None:
        """Forget what was emitted more than ``min_interval`` ago (amortised O(1))."""
        cutoff = now - self.min_interval
        topic._last = {k: v for k, v in topic._last.items()
                       if v[1] > cutoff or k in topic.held}
        topic._prune_at = max(1024, 2 * len(topic._last))

    # -- the rate limit's timer ------------------------------------------------------------

    def next_due(self) -> float | None:
        """When the earliest held record is due (clock time), or None."""
        dues = [due for topic in self.topics.values() for due, _ in topic.held.values()]
        return min(dues) if dues else None

    def tick(self) -> int:
        """Emit every held record that is due; returns how many."""
        now = self.clock()
        emitted = 0
        for topic in self.topics.values():
            due = [(k, r) for k, (d, r) in topic.held.items() if d <= now]
            for key, record in due:
                del topic.held[key]
                self._emit(topic, key, record.get(topic.state_field), record, now)
                emitted += 1
        return emitted

    def poll(self) -> None:
        """Run the pollers of every topic that has a subscriber."""
        for topic in self.topics.values():
            if topic.active:
                for poll in topic.pollers:
                    try:
                        poll()
                    except Exception:
                        log.exception("polling %s changes failed", topic.name)

    def _polling(self) -> bool:
        return any(t.active and t.pollers for t in self.topics.values())

    def _wake_timer(self) -> None:
        if self._timer is not None:
            self._timer.set()

    async def run(self) -> None:
        """Emit held records when they are due and run the pollers every
        ``min_interval`` (the agent runs this for its lifetime). ``clock`` must be
        ``time.monotonic`` here: the waits are trio sleeps."""
        next_poll = self.clock()
        while True:
            due = self.next_due()
            if self._polling():
                due = next_poll if due is None else min(due, next_poll)
            if due is None:
                self._timer = trio.Event()
                await self._timer.wait()
                self._timer = None
                next_poll = self.clock()
                continue
            await trio.sleep(max(0.0, due - self.clock()))
            if self._polling() and self.clock() >= next_poll:
                self.poll()
                next_poll = self.clock() + self.min_interval
            self.tick()

    def status(self) -> dict[str, Any]:
        subs = list(self.subscribers)
        return {"subscribers": len(subs),
                "topics": {t.name: len(t.subscribers) for t in self.topics.values()},
                "published": self.published,
                "pending": sum(len(s.pending) for s in subs),
                "coalesced": self._coalesced_gone + sum(s.coalesced for s in subs)}
