"""Crash recovery: what the task rows and the files on disk say, made one story.

Design notes
------------
* **A plan, then the acts.** ``plan_recovery(rows, files, clean)`` is pure: from the
  rows SQLite kept and a walk of the store (``{rel: lstat}``) it decides every task's
  fate, which files to cut back, which complete files to hash again and which rows to
  forget; the component then performs it (``cut_back`` in a worker thread, rechecks
  through completion, manifest moves through the hand-off). So every rule below is
  unit-tested without a mount or a crash.
* **Matching rows to files.** A row belongs to the file at its path when the inode
  agrees (or the row predates inode records); else to the file that now has its inode
  (a rename, or a directory's, whose record never reached the database: without this
  the file would be a new task and be imported twice), unless that file has a
  temporary name (then the inode was reused after the row's file was removed); else
  its file is gone.
* **Unfinished uploads are cut back** to their durable offset after an unclean stop
  (data first, record second: everything below it was synced), so the size is the
  resume point. Their hashes are dropped: they describe no version now.
* **Complete uploads are trusted only with proof**: same size, mtime and ctime as when
  verified (the ctime moves on every write, truncate and rename; no client can set
  it). Anything else is re-checked (``Event.RECHECK``): hashed before anyone is told
  it is complete again. A complete file nobody touched stays complete unread.
* **Files with no row** (created just before a crash, or put into the store by hand)
  are adopted whole as partial: bytes we cannot prove are garbage are never destroyed.
"""

from __future__ import annotations

import dataclasses
import os

from ..longpaths import BackingTree
from ._task import Event, State, Task

__all__ = ["Recovery", "plan_recovery", "cut_back", "fingerprint"]


def fingerprint(st: os.stat_result) -> tuple[int, int, int]:
    """What proves a complete file unchanged: size, mtime and ctime."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclasses.dataclass
class Recovery:
    tasks: list[Task] = dataclasses.field(default_factory=list)      # every task, placed
    forgotten: list[Task] = dataclasses.field(default_factory=list)  # rows whose file is gone
    moved: list[Task] = dataclasses.field(default_factory=list)      # renamed, found by inode
    cuts: list[tuple[bytes, int]] = dataclasses.field(default_factory=list)  # (rel, size)
    recheck: list[Task] = dataclasses.field(default_factory=list)    # complete, unproven
    adopted: list[Task] = dataclasses.field(default_factory=list)    # files with no row
    ignored: list[bytes] = dataclasses.field(default_factory=list)   # not upload names


def plan_recovery(rows: list[Task], files: dict[bytes, os.stat_result], *, clean: bool,
                  trackable) -> Recovery:
    """Decide every task's fate at start-up (see the design notes). ``files`` is
    consumed; ``trackable(rel)`` says whether a name can be an upload task."""
    plan = Recovery()
    for t, st, moved in _match_rows(rows, files, trackable):
        if st is None:
            plan.forgotten.append(t)
            continue
        if moved:
            plan.moved.append(t)
        size = st.st_size
        t.apply(Event.RESTART)
        if t.state is State.COMPLETE:
            if t.fingerprint != fingerprint(st):
                t.fingerprint = None
                t.apply(Event.RECHECK)
                plan.recheck.append(t)
        else:
            t.computed = {}
            t.fingerprint = None
            if not clean and size > t.durable:
                plan.cuts.append((t.rel, t.durable))
                size = t.durable
        t.ino = st.st_ino
        t.present = size
        t.durable = min(t.durable, size)
        plan.tasks.append(t)
    for rel, st in files.items():
        if not trackable(rel):
            plan.ignored.append(rel)
            continue
        t = Task(rel=rel, present=st.st_size, durable=st.st_size, ino=st.st_ino)
        plan.adopted.append(t)
        plan.tasks.append(t)
    return plan


def _match_rows(rows: list[Task], files: dict[bytes, os.stat_result], trackable):
    """Yield ``(task, stat, moved)``: ``stat`` None for a row whose file is gone.

    A file at a temporary name is never where a task moved to (a rename to such a name
    ends the task's row): when its inode matches a row, the inode was reused by a new
    file (an rsync temp file, say) after the row's own file was removed."""
    by_ino = {st.st_ino: rel for rel, st in files.items() if trackable(rel)}
    unplaced = []
    for t in rows:
        st = files.get(t.rel)
        if st is not None and (t.ino is None or t.ino == st.st_ino):
            del files[t.rel]
            yield t, st, False
        else:
            unplaced.append(t)
    for t in unplaced:
        rel = by_ino.get(t.ino) if t.ino is not None else None
        st = files.pop(rel, None) if rel is not None else None
        if st is not None and st.st_ino == t.ino:
            t.rel = rel
            yield t, st, True
        else:
            yield t, None, False


def cut_back(paths: BackingTree, cuts: list[tuple[bytes, int]]) -> None:
    """Truncate each file to its durable offset and sync it (blocking)."""
    for rel, size in cuts:
        fd = paths.open(rel, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
