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
  matches a row whose path change never reached SQLite to the file that moved.
  ``fingerprint`` is ``(size, mtime_ns, ctime_ns)`` of the backing file when it was
  verified (refreshed when the mount itself changes only metadata): any write,
  truncate or rename moves the ctime, which no client can set, so recovery trusts a
  ``complete`` row only while the fingerprint still matches and hashes it again
  otherwise. ``job_sha256`` is the SHA-256 of the version ``job`` imports: a file
  that comes back to ``complete`` with those same bytes keeps its import.
* **Temporary files** (rsync's ``.NAME.XXXXXX``) get a ``Task`` too, so their writes
  are hashed on the fly, but ``tracked`` is False: no row, no listing, no state
  changes, until a rename into place promotes them.
"""

from __future__ import annotations

import sqlite3

from ._task import COLUMNS as _COLUMNS
from ._task import Event, Task

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
    """Tasks by path and by ID, plus the staging of their rows."""

    def __init__(self, db):
        self._db = db
        self.by_path: dict[bytes, Task] = {}
        self.by_id: dict[str, Task] = {}

    def get(self, rel: bytes) -> Task | None:
        return self.by_path.get(rel)

    def get_id(self, task_id: str) -> Task | None:
        return self.by_id.get(task_id)

    def add(self, task: Task) -> Task:
        self.by_path[task.rel] = task
        self.by_id[task.task_id] = task
        self.save(task)
        return task

    def save(self, task: Task) -> None:
        if task.tracked and not task.ended:
            task.stored = True
            self._db.stage(("upload", task.task_id), _UPSERT, task.row())

    def remove(self, task: Task) -> None:
        task.apply(Event.UNLINK)  # the table ends it (``task.ended``)
        if self.by_path.get(task.rel) is task:
            del self.by_path[task.rel]
        if self.by_id.get(task.task_id) is task:
            del self.by_id[task.task_id]
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
        task.rel = new_rel
        self.by_path[new_rel] = task
        self.save(task)

    def tracked(self) -> list[Task]:
        return [t for t in self.by_path.values() if t.tracked]
