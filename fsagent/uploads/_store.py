"""Upload tasks in memory and in SQLite.

Design notes
------------
* **Memory is the working copy, SQLite the durable one.** Every task lives in a
  ``Task`` object (``_task.py``; found by path or ID through ``TaskTable``); FUSE handlers read and change
  it on the event loop. Its row is written with ``Database.stage`` (coalesced by task
  ID, one transaction per flush) on state changes and at checkpoints, not per write:
  ``bytes_present`` in SQLite is therefore only as fresh as the last checkpoint, which
  is exactly what crash recovery needs (``durable_offset``).
* **Schema**: the ``upload_tasks`` table is the ``"uploads"`` entry of
  ``fsagent.db.MIGRATIONS``; its columns are ``Task.row()``'s (``_task.COLUMNS``).
* **Deletion** stages a DELETE under the same key, replacing any pending upsert, so a
  flush never writes a row for a task that no longer exists. ``path`` is indexed but
  not unique: within one flush a task may take over the path of one being deleted.
* **Identity and proof** (crash consistency). ``ino`` is the backing file's inode
  number, recorded when the task first sees its file: a rename keeps it, so recovery
  matches a row whose path change never reached SQLite to the file that moved;
  ``ino_generation`` (the inode's generation, ``BackingTree.identity``) tells that file
  from a later one given the same number.
  ``fingerprint`` is ``(size, mtime_ns, ctime_ns)`` of the backing file when it was
  verified (refreshed when the mount itself changes only metadata): any write,
  truncate or rename moves the ctime, which no client can set, so recovery trusts a
  ``complete`` row only while the fingerprint still matches and hashes it again
  otherwise. ``job_sha256`` is the SHA-256 of the version ``job`` imports: a file
  that comes back to ``complete`` with those same bytes keeps its import.
* **Indexes by what is shown** (so nothing a user reads costs O(all uploads): a store
  holds 100,000 complete uploads long after they were imported). ``counts`` is the
  number of tracked tasks per shown state (``Task.shown``: ``status``, metrics);
  ``unfinished`` holds the tracked tasks not shown ``complete`` (``uploads.json`` lists
  them all; the settle loop looks only at these). ``most_recent(n)`` gives the ``n``
  most recently completed of the ones shown complete, from a bounded index (see
  ``most_recent``). A task is indexed while it is tracked, not ended, and the one at
  its path; the table (``add``, ``move``, ``remove``) and the task's own writers of
  what ``shown`` reads (``Task.apply``, ``mark_committed``, ``set_tracked``) call
  ``reindex``, which moves it from the state it was counted under
  (``Task.counted_as``) to the one it shows now. ``recount`` is the slow truth the
  tests hold the indexes to.
* **Change events** (``Events.subscribe``, ``fsagent/events.py``): ``save`` is called
  after every change of a task's row, and ``reindex`` sees every change of its shown
  state, so those two publish the task's record, and only while the ``uploads`` topic
  has a subscriber (one attribute read otherwise). From ``reindex``, only what no
  ``save`` follows: shown ``complete`` (``mark_committed``) and the end of a task
  (removed, or renamed to a temporary name), sent with state ``removed``. The offset
  of a task being written moves with no ``save``: while subscribed, the hub polls the
  ``receiving`` tasks (``_poll_progress``, ~4 times a second), never the write path.
* **Temporary files** (rsync's ``.NAME.XXXXXX``) get a ``Task`` too, so their writes
  are hashed on the fly, but ``tracked`` is False: no row, no listing, no state
  changes, until a rename into place promotes them.
"""

from __future__ import annotations

import heapq
import sqlite3

from ._task import COLUMNS as _COLUMNS
from ._task import Event, State, Task

__all__ = ["TaskTable", "load_tasks"]

_UPSERT = (
    f"INSERT INTO upload_tasks ({', '.join(_COLUMNS)}) VALUES "
    f"({', '.join('?' for _ in _COLUMNS)}) ON CONFLICT(task_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:])
)


def load_tasks(conn: sqlite3.Connection) -> list[Task]:
    rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM upload_tasks").fetchall()
    return [Task.from_row(r) for r in rows]


class TaskTable:
    """Tasks by path and by ID, indexed by shown state, plus the staging of their rows."""

    def __init__(self, db, *, recent: int = 100, events=None):
        self._db = db
        self._events = events  # EventHub (fsagent/events.py) or None
        self._topic = events.topic("uploads") if events is not None else None
        if events is not None:
            events.add_poller(self._topic, self._poll_progress)
        self.by_path: dict[bytes, Task] = {}
        self.by_id: dict[str, Task] = {}
        self.counts: dict[State, int] = {s: 0 for s in State}
        # Insertion-ordered set (a dict keeps order and removes in O(1)).
        self.unfinished: dict[Task, None] = {}
        # Candidates for the ``recent`` most recently completed (see ``most_recent``).
        self._recent_size = recent
        self._recent: dict[Task, None] = {}
        self._recent_lost = False

    def get(self, rel: bytes) -> Task | None:
        return self.by_path.get(rel)

    def get_id(self, task_id: str) -> Task | None:
        return self.by_id.get(task_id)

    def add(self, task: Task) -> Task:
        displaced = self.by_path.get(task.rel)
        self.by_path[task.rel] = task
        self.by_id[task.task_id] = task
        task.table = self
        if displaced is not None and displaced is not task:
            self.reindex(displaced)
        self.reindex(task)
        self.save(task)
        return task

    def save(self, task: Task) -> None:
        if task.tracked and not task.ended:
            task.stored = True
            self._db.stage(("upload", task.task_id), _UPSERT, task.row())
            if self._topic is not None and self._topic.active:
                self._events.publish(self._topic, task.task_id, task.summary())

    def _poll_progress(self) -> None:
        """Publish the tasks being written (their offset moves at every write, which
        publishes nothing); the hub drops a record that did not change."""
        if not self.counts[State.RECEIVING]:
            return  # the usual case between uploads: no pass at all
        for task in self.unfinished:
            if task.state is State.RECEIVING:
                self._events.publish(self._topic, task.task_id, task.summary())

    def remove(self, task: Task) -> None:
        task.apply(Event.UNLINK)  # the table ends it (``task.ended``)
        if self.by_path.get(task.rel) is task:
            del self.by_path[task.rel]
        if self.by_id.get(task.task_id) is task:
            del self.by_id[task.task_id]
        self.reindex(task)
        if task.hasher is not None:
            task.hasher.close()
            task.hasher = None
        self.forget_row(task)

    def forget_row(self, task: Task) -> None:
        if task.stored:
            task.stored = False
            self._db.stage(("upload", task.task_id),
                           "DELETE FROM upload_tasks WHERE task_id = ?", (task.task_id,))

    def move(self, task: Task, new_rel: bytes) -> None:
        if self.by_path.get(task.rel) is task:
            del self.by_path[task.rel]
        displaced = self.by_path.get(new_rel)
        task.rel = new_rel
        self.by_path[new_rel] = task
        if displaced is not None and displaced is not task:
            self.reindex(displaced)
        self.reindex(task)
        self.save(task)

    def tracked(self) -> list[Task]:
        return [t for t in self.by_path.values() if t.tracked]

    # -- the indexes by shown state -------------------------------------------------------

    def reindex(self, task: Task) -> None:
        """Count ``task`` under the state it shows now (or nowhere, if it is not an
        indexed task any more). O(1); called whenever what ``shown`` reads may change."""
        now = (task.shown if task.tracked and not task.ended
               and self.by_path.get(task.rel) is task else None)
        was = task.counted_as
        if now is was:
            return
        if was is State.COMPLETE:
            if self._recent.pop(task, 0) is None:
                self._recent_lost = True  # one of the most recent left: look again
        elif was is not None:
            del self.unfinished[task]
        if now is State.COMPLETE:
            self._recent[task] = None
            if len(self._recent) > 2 * self._recent_size:
                self._recent = dict.fromkeys(
                    heapq.nlargest(self._recent_size, self._recent, key=_completed))
        elif now is not None:
            self.unfinished[task] = None
        if was is not None:
            self.counts[was] -= 1
        if now is not None:
            self.counts[now] += 1
        task.counted_as = now
        if self._topic is not None and self._topic.active and (
                now is None or now is State.COMPLETE):
            record = task.summary()
            if now is None:
                record["state"] = "removed"
            self._events.publish(self._topic, task.task_id, record)

    def most_recent(self, n: int) -> list[Task]:
        """The ``n`` (at most ``recent``) tasks shown complete that completed last,
        newest first.

        ``_recent`` holds every task that became shown-complete since it was last
        trimmed to the ``recent`` newest; a trim drops only tasks older than all it
        keeps, so while none of those kept leaves ``complete``, the newest complete
        tasks are among the candidates. When one leaves (removed, rewritten) an older
        task may be due in its place: the next call looks at every task once (O(all),
        but only after one of the most recent uploads changed)."""
        n = min(n, self._recent_size)
        if self._recent_lost:
            self._recent = dict.fromkeys(heapq.nlargest(
                self._recent_size,
                (t for t in self.by_path.values() if t.counted_as is State.COMPLETE),
                key=_completed))
            self._recent_lost = False
        return heapq.nlargest(n, self._recent, key=_completed)

    def recount(self) -> dict[State, int]:
        """The counts by a full pass over every task (what ``counts`` must equal)."""
        counts = {s: 0 for s in State}
        for t in self.tracked():
            counts[t.shown] += 1
        return counts


def _completed(task: Task) -> float:
    return task.completed or 0.0
