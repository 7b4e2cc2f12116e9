"""Upload tasks in memory and in SQLite.

Design notes
------------
* **Memory is the working copy, SQLite the durable one.** Every task lives in a
  ``Task`` object (found by path through ``TaskTable``); FUSE handlers read and change
  it on the event loop. Its row is written with ``Database.stage`` (coalesced by task
  ID, one transaction per flush) on state changes and at checkpoints, not per write:
  ``bytes_present`` in SQLite is therefore only as fresh as the last checkpoint, which
  is exactly what crash recovery needs (``durable_offset``).
* **Schema**: the ``upload_tasks`` table is the ``"uploads"`` entry of
  ``fsagent.db.MIGRATIONS``; its columns are ``_COLUMNS`` here.
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

import dataclasses
import os
import sqlite3
import time
import uuid
from typing import Any

from ._task import Event, State, next_state, progress_percent

__all__ = ["Task", "TaskTable", "load_tasks"]

_COLUMNS = ("task_id", "path", "state", "bytes_present", "durable_offset", "declared_size",
            "client_md5", "client_sha1", "client_sha256", "md5", "sha1", "sha256", "job",
            "error", "held", "renamed_by_rsync", "created", "updated", "completed", "ino",
            "fp_size", "fp_mtime_ns", "fp_ctime_ns", "job_sha256")
_UPSERT = (
    f"INSERT INTO upload_tasks ({', '.join(_COLUMNS)}) VALUES "
    f"({', '.join('?' for _ in _COLUMNS)}) ON CONFLICT(task_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:])
)


@dataclasses.dataclass(eq=False)
class Task:
    rel: bytes                      # path under uploads/
    task_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    state: State = State.PARTIAL
    present: int = 0                # bytes present (the file's size)
    durable: int = 0                # bytes synced to disk and recorded
    declared_size: int | None = None
    client: dict[str, str] = dataclasses.field(default_factory=dict)    # algorithm -> hex
    computed: dict[str, str] = dataclasses.field(default_factory=dict)
    job: str | None = None
    error: str | None = None
    held: bool = False              # rsync left it with mtime 0: never settles by itself
    renamed_by_rsync: bool = False
    created: float = dataclasses.field(default_factory=time.time)
    updated: float = dataclasses.field(default_factory=time.time)
    completed: float | None = None
    ino: int | None = None          # the backing file's inode (follows renames)
    fingerprint: tuple[int, int, int] | None = None  # (size, mtime_ns, ctime_ns) verified
    job_sha256: str | None = None   # the SHA-256 of the version ``job`` imports
    # -- runtime only --
    tracked: bool = True
    writers: int = 0
    hasher: Any = None
    writer: Any = None              # BackingWriter: acknowledged writes not yet applied
    generation: int = 0             # bumped on every change of the bytes
    last_change: float = dataclasses.field(default_factory=time.monotonic)
    since_checkpoint: int = 0
    shrinks: int = 0                # bumped when bytes may be cut away (truncate, cut-back)
    timed: bool = False             # a real mtime was set since the bytes last changed
    ended: bool = False
    stored: bool = False            # a row may exist: deleting must reach SQLite

    @property
    def path(self) -> str:
        return os.fsdecode(self.rel)

    def apply(self, event: Event) -> State | None:
        """Move along the transition table (raises ``TaskStateError`` if not allowed)."""
        new = next_state(self.state, event)
        if new is not None:
            self.state = new
        self.updated = time.time()
        return new

    def changed(self) -> None:
        self.generation += 1
        self.last_change = time.monotonic()
        self.computed = {}
        self.fingerprint = None
        self.timed = False

    @property
    def progress(self) -> float | None:
        return progress_percent(self.present, self.declared_size, self.state)

    def summary(self) -> dict[str, Any]:
        """The task as uploads.json shows it."""
        return {
            "taskID": self.task_id, "path": self.path, "state": self.state.value,
            "offset": self.present, "size": self.declared_size, "progress": self.progress,
            "sha256": self.computed.get("sha256"), "job": self.job, "error": self.error,
            "updated": round(self.updated, 3),
        }

    def row(self) -> tuple:
        return (self.task_id, self.path, self.state.value, self.present, self.durable,
                self.declared_size, self.client.get("md5"), self.client.get("sha1"),
                self.client.get("sha256"), self.computed.get("md5"),
                self.computed.get("sha1"), self.computed.get("sha256"), self.job,
                self.error, int(self.held), int(self.renamed_by_rsync), self.created,
                self.updated, self.completed, self.ino,
                *(self.fingerprint or (None, None, None)), self.job_sha256)

    @classmethod
    def from_row(cls, row: sqlite3.Row | tuple) -> Task:
        values = dict(zip(_COLUMNS, row))
        return cls(
            rel=os.fsencode(values["path"]), task_id=values["task_id"],
            state=State(values["state"]), present=values["bytes_present"],
            durable=values["durable_offset"], declared_size=values["declared_size"],
            client={a: values[f"client_{a}"] for a in ("md5", "sha1", "sha256")
                    if values[f"client_{a}"]},
            computed={a: values[a] for a in ("md5", "sha1", "sha256") if values[a]},
            job=values["job"], error=values["error"], held=bool(values["held"]),
            renamed_by_rsync=bool(values["renamed_by_rsync"]), created=values["created"],
            updated=values["updated"], completed=values["completed"], ino=values["ino"],
            fingerprint=(None if values["fp_size"] is None else
                         (values["fp_size"], values["fp_mtime_ns"], values["fp_ctime_ns"])),
            job_sha256=values["job_sha256"], stored=True,
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
        task.apply(Event.UNLINK)
        task.ended = True
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
