"""One monitor: its lifecycle, its inotify loop, its filters, batches and timers.

Design notes
------------
* **Lifecycle** is the transition table ``TRANSITIONS`` (state, verb) → state; a verb
  that does not apply raises ``OmeroFSError`` naming the verb and the state. ``stop``
  on a stopped monitor is a no-op (the reference says so); ``destroy`` stops first.
  ``finish`` is the monitor stopping itself (OneShot, Inactivity, timeouts).
* **The loop** (one trio task per started monitor): wait until the inotify fd is
  readable or a deadline passes (a pending rename pair, a batch's flush, an inactivity
  timeout); read everything queued; translate (``_translate``); watch and list new
  directories in a worker thread, then drain and settle; filter; batch; send.
* **Backpressure.** Sending a notification waits while the client's outbox is full,
  and meanwhile the loop does not read inotify: the kernel queue holds the events,
  and if it overflows, that is recovered like any overflow (System "Overflow", then a
  rescan that reports the real differences). A monitor never holds more than
  ``max_pending`` events. A client that disconnects leaves the monitor waiting for a
  re-attach (``startMonitor`` from a new connection) until ``monitor_grace_seconds``.
* **Batches**: ``blockSize`` events per notification (0 = no limit), sent once full or
  ``flush_ms`` after the first pending event. A rename's Delete+Create stay together,
  so such a batch may hold one event more than ``blockSize``.
* **System events** are the monitor's own news (an overflow, a watch that failed, the
  watched directory gone, Inactive, Timed out): each is logged once as it is queued,
  WARNING for trouble and INFO otherwise, and overflows are counted.
* **Timers** are trio deadlines on the loop's wait, so they are exact and testable:
  Inactivity's timer restarts at every delivered event.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import trio

from ..rpc import OmeroFSError, Peer
from ._filters import Filters
from ._inotify import InotifyWatcher, walk
from ._translate import SYNC_PREFIX, Translator

__all__ = ["Monitor", "MonitorSpec", "MonitorCounters", "TRANSITIONS", "MONITOR_TYPES", "PATH_MODES",
           "WATCH_EVENT_TYPES"]

log = logging.getLogger(__name__)

MONITOR_TYPES = ("Persistent", "OneShot", "Inactivity")
PATH_MODES = ("Flat", "Recurse", "Follow")
WATCH_EVENT_TYPES = {"Creation": "Create", "Modification": "Modify", "Deletion": "Delete",
                     "All": None}

STOPPED, STARTED, DESTROYED = "Stopped", "Started", "Destroyed"
TRANSITIONS: dict[tuple[str, str], str] = {
    (STOPPED, "start"): STARTED,
    (STARTED, "start"): STARTED,
    (STARTED, "stop"): STOPPED,
    (STOPPED, "stop"): STOPPED,
    (STARTED, "finish"): STOPPED,
    (STOPPED, "destroy"): DESTROYED,
    (STARTED, "destroy"): DESTROYED,
}

# Slack subtracted from the last good read's time when a rescan looks for files
# modified during an overflow: the kernel stamps mtimes with a coarse (tick) clock.
_MTIME_SLACK_NS = 10_000_000


# System event messages that are trouble (WARNING); the others are routine (INFO).
_TROUBLE = ("Overflow", "Watch limit reached", "Cannot watch", "Watched directory")


@dataclass(frozen=True)
class MonitorCounters:
    """The server's counters every monitor adds to (``fsagent/service/metrics.py`` Counters)."""

    delivered: Any
    overflows: Any


@dataclass(frozen=True)
class MonitorSpec:
    mtype: str
    event_types: frozenset[str]
    mode: str
    root: str
    whitelist: tuple[str, ...]
    blacklist: tuple[str, ...]
    timeout: float
    block_size: int
    ignore_sys_files: bool
    ignore_dir_events: bool


class Monitor:
    def __init__(self, spec: MonitorSpec, peer: Peer, *, agent, flush_ms: int,
                 max_pending: int, counters: MonitorCounters):
        self.id = str(uuid.uuid1())
        self.spec = spec
        self.peer = peer
        self.agent = agent
        self.state = STOPPED
        self.flush_seconds = flush_ms / 1000
        self.max_pending = max_pending
        self.filters = Filters(spec.root, spec.whitelist, spec.blacklist,
                               spec.ignore_sys_files)
        self.events_sent = 0
        self.counters = counters
        self._pending: list[list[dict]] = []
        self._pending_count = 0
        self._first_pending_at: float | None = None
        self._scope: trio.CancelScope | None = None
        self._done: trio.Event | None = None
        self._translator: Translator | None = None
        self._sync_waiters: dict[str, trio.Event] = {}
        self._reattached = trio.Event()
        self._send_lock = trio.Lock()

    def status(self) -> dict:
        return {"path": self.spec.root, "state": self.state, "type": self.spec.mtype,
                "mode": self.spec.mode, "events_sent": self.events_sent,
                "watches": len(self._translator.path_wd) if self._translator else 0}

    def _transition(self, verb: str) -> None:
        new = TRANSITIONS.get((self.state, verb))
        if new is None:
            raise OmeroFSError(f"cannot {verb} monitor {self.id}: it is {self.state}")
        self.state = new

    def _excluded(self, path: str) -> bool:
        if os.path.basename(path).startswith(SYNC_PREFIX):
            return True
        return self.filters.excluded(path)

    def attach(self, peer: Peer) -> None:
        """Deliver to ``peer`` from now on (after the creator's connection closed)."""
        self.peer = peer
        self._reattached.set()
        self._reattached = trio.Event()

    # -- verbs ----------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        if self.state == STARTED:
            return
        self._transition("start")
        try:
            await nursery.start(self._run)
        except BaseException:
            self.state = STOPPED
            raise

    async def stop(self) -> None:
        if self.state != STARTED:
            self._transition("stop")
            return
        self._scope.cancel()
        await self._done.wait()
        if self.state == STARTED:
            self._transition("stop")
        await self._deliver_leftovers()

    async def destroy(self) -> None:
        if self.state == STARTED:
            await self.stop()
        self._transition("destroy")

    async def sync(self) -> None:
        """Return once every event that happened before the call has been sent."""
        if self.state != STARTED:
            return
        name = f"{SYNC_PREFIX}{uuid.uuid4().hex}"
        seen = self._sync_waiters[name] = trio.Event()
        path = os.path.join(self.spec.root, name)

        def touch():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            os.unlink(path)

        try:
            await self.agent.to_thread(touch)
        except OSError as e:
            self._sync_waiters.pop(name, None)
            raise OmeroFSError(f"cannot sync monitor {self.id}: {path}: {e.strerror}") from None
        with trio.move_on_after(30) as scope:
            while not seen.is_set() and self.state == STARTED:
                with trio.move_on_after(0.1):
                    await seen.wait()
        self._sync_waiters.pop(name, None)
        if scope.cancelled_caught:
            raise OmeroFSError(f"monitor {self.id} did not see its sync file in 30 s")

    # -- the loop -------------------------------------------------------------------------

    async def _run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._done = trio.Event()
        try:
            watcher = InotifyWatcher()
        except OSError as e:
            raise OmeroFSError(f"cannot create an inotify instance: {e.strerror}") from None
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                tr = self._translator = Translator(self.spec.root, self.spec.mode,
                                                   self._excluded)
                first = await self._walk(watcher, self.spec.root, check_writers=False)
                if self.spec.root not in dict(first.watched):
                    reason = next((f[2] for f in first.failures), "not a directory")
                    raise OmeroFSError(f"cannot watch {self.spec.root}: {reason}")
                tr.add_listing(first, report=False)
                await self._settle(tr, watcher)
                tr.take_units()  # the start-up scan reports nothing
                task_status.started()
                await self._loop(tr, watcher)
        except OmeroFSError:
            raise
        except Exception as e:
            log.exception("monitor %s on %s failed", self.id, self.spec.root)
            self._queue_units([[("System", f"Monitor failed: {type(e).__name__}: {e}",
                                 False)]])
        finally:
            watcher.close()
            if self.state == STARTED and self._done is not None:
                self.state = STOPPED
            self._done.set()

    async def _walk(self, watcher, top: str, *, with_mtime: bool = False,
                    check_writers: bool = True):
        recurse = self.spec.mode != "Flat"
        return await self.agent.to_thread(
            lambda: walk(watcher, top, recurse=recurse, excluded=self._excluded,
                         with_mtime=with_mtime, check_writers=check_writers))

    async def _settle(self, tr: Translator, watcher: InotifyWatcher) -> None:
        """Watch and list new directories (or rescan), then drain what queued meanwhile."""
        while tr.walk_requests or tr.need_rescan or tr.unwatch:
            for wd in tr.unwatch:
                watcher.rm_watch(wd)
            tr.unwatch.clear()
            if tr.need_rescan:
                since = self._last_good_read_ns - _MTIME_SLACK_NS
                result = await self._walk(watcher, self.spec.root, with_mtime=True)
                tr.apply_rescan(result, modified_since_ns=since)
            elif tr.walk_requests:
                requests, tr.walk_requests = tr.walk_requests, []
                for path, report in requests:
                    tr.add_listing(await self._walk(watcher, path), report=report)
            else:
                continue
            tr.feed(watcher.read_now(), trio.current_time())
            tr.finalize_listing()

    async def _loop(self, tr: Translator, watcher: InotifyWatcher) -> None:
        spec = self.spec
        started_at = last_activity = trio.current_time()
        self._last_good_read_ns = time.time_ns()
        while True:
            deadlines = [d for d in (tr.next_deadline(), self._flush_deadline()) if d]
            if spec.timeout > 0 and spec.mtype == "Inactivity":
                deadlines.append(last_activity + spec.timeout)
            if spec.timeout > 0 and spec.mtype == "OneShot" and not self.events_sent:
                deadlines.append(started_at + spec.timeout)
            with trio.move_on_at(min(deadlines, default=float("inf"))):
                await watcher.wait_readable()
            read_ns = time.time_ns()
            tr.feed(watcher.read_now(), trio.current_time())
            if not tr.need_rescan:
                self._last_good_read_ns = read_ns
            await self._settle(tr, watcher)
            if self._queue_units(tr.take_units()):
                last_activity = trio.current_time()
            now = trio.current_time()
            synced = [n for n in tr.sync_seen if n in self._sync_waiters]
            tr.sync_seen.clear()
            await self._flush(force=bool(synced))
            for name in synced:
                self._sync_waiters[name].set()
            if spec.mtype == "OneShot" and self.events_sent:
                break
            if spec.timeout > 0:
                if spec.mtype == "Inactivity" and now >= last_activity + spec.timeout:
                    self._queue_units([[("System", "Inactive", False)]])
                    break
                if (spec.mtype == "OneShot" and not self.events_sent
                        and now >= started_at + spec.timeout):
                    self._queue_units([[("System", "Timed out", False)]])
                    break
        await self._flush(force=True)
        self._transition("finish")

    # -- filtering and batching ----------------------------------------------------------

    def _queue_units(self, units) -> bool:
        """Filter and queue; True if any event survived the filters."""
        spec = self.spec
        queued = False
        for unit in units:
            kept = []
            for kind, path, is_dir in unit:
                if kind == "System":
                    self._system_event(path)
                else:
                    if kind not in spec.event_types:
                        continue
                    if is_dir and spec.ignore_dir_events:
                        continue
                    if not is_dir and not self.filters.wanted_file(path):
                        continue
                kept.append({"fileId": path, "type": kind})
            if kept:
                if self._first_pending_at is None:
                    self._first_pending_at = trio.current_time()
                self._pending.append(kept)
                self._pending_count += len(kept)
                queued = True
        return queued

    def _system_event(self, message: str) -> None:
        if message.startswith("Monitor failed"):
            return  # _run logged it with its traceback
        trouble = message.startswith(_TROUBLE)
        if message == "Overflow":
            self.counters.overflows.inc()
            message = "inotify queue overflowed; rescanning to report what changed"
        log.log(logging.WARNING if trouble else logging.INFO, "monitor %s on %s: %s",
                self.id, self.spec.root, message)

    def _flush_deadline(self) -> float | None:
        if self._first_pending_at is None:
            return None
        return self._first_pending_at + self.flush_seconds

    async def _flush(self, *, force: bool) -> None:
        block = self.spec.block_size
        while self._pending:
            due = (force or self._pending_count >= self.max_pending
                   or trio.current_time() >= self._flush_deadline())
            if block > 0 and not due and self._pending_count < block:
                return
            if block <= 0 and not due:
                return
            batch: list[dict] = []
            while self._pending and (block <= 0 or not batch
                                     or len(batch) + len(self._pending[0]) <= block):
                unit = self._pending.pop(0)
                batch.extend(unit)
            self._pending_count -= len(batch)
            if not self._pending:
                self._first_pending_at = None
            await self._send(batch)

    async def _send(self, batch: list[dict]) -> None:
        async with self._send_lock:
            while True:
                try:
                    await self.peer.notify("fsEventHappened", [self.id, batch])
                    self.events_sent += len(batch)
                    self.counters.delivered.inc(len(batch))
                    return
                except trio.ClosedResourceError:
                    log.info("monitor %s: client gone; waiting for a re-attach", self.id)
                    await self._reattached.wait()

    async def _deliver_leftovers(self) -> None:
        tr = self._translator
        if tr is not None:
            tr.expire_moves(0, all_of_them=True)
            self._queue_units(tr.take_units())
        if self._pending and not self.peer.closed.is_set():
            with trio.move_on_after(2):
                await self._flush(force=True)
        self._pending.clear()
        self._pending_count = 0
        self._first_pending_at = None
