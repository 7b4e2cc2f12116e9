"""Crash recovery: what the task rows and the files on disk say, made one story.

Design notes
------------
* **A plan, then the acts.** ``plan_recovery(rows, files, clean)`` is pure: from the
  rows SQLite kept and a walk of the store (``{rel: lstat}``) it decides every task's
  fate, which files to cut back, which complete files to hash again and which rows to
  forget; the component then performs it (``cut_back`` in a worker thread, rechecks
  through completion, manifest moves through the hand-off). So every rule below is
  unit-tested without a mount or a crash.
* **Matching rows to files.** A row belongs to the file at its path when it is the
  row's file (below); else to the file that is, wherever it is now (a rename, or a
  directory's, whose record never reached the database: without this the file would
  be a new task and be imported twice), unless that file has a temporary name (a rename
  to such a name ends a task's row); else its file is gone.
* **Which file is the row's.** The inode number alone does not say: once a file is
  removed its number is free, and ext4 gives it to the next file created nearby (the
  crash soak saw an rsync temp file get the number of a file it replaced, then be
  renamed elsewhere: matched by number, the new file took the old task, its import and
  its declared hash). So a row records the inode's generation too (``Task.
  ino_generation``, drawn anew at each allocation) and a file is the row's when both
  agree. The generation costs an ``open`` per file, so it is read only where the number
  could be a reused one: not for a complete row whose fingerprint still matches (a new
  inode has a new ctime). Unknown generations (older rows, a filesystem without them)
  leave the number to decide, as before.
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
                  trackable, generation) -> Recovery:
    """Decide every task's fate at start-up (see the design notes). ``files`` is
    consumed; ``trackable(rel)`` says whether a name can be an upload task;
    ``generation(rel)`` is the inode generation of the file at ``rel`` or None
    (``BackingTree.inode_generation``: blocking, so the plan runs in a worker thread)."""
    plan = Recovery()
    known = _Generations(generation)
    for t, st, moved in _match_rows(rows, files, trackable, known):
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
        if t.ino != st.st_ino or t.ino_generation is None:
            t.ino_generation = known(t.rel)  # rows from before generations: from now on
        t.ino = st.st_ino
        t.present = size
        t.durable = min(t.durable, size)
        plan.tasks.append(t)
    for rel, st in files.items():
        if not trackable(rel):
            plan.ignored.append(rel)
            continue
        t = Task(rel=rel, present=st.st_size, durable=st.st_size, ino=st.st_ino,
                 ino_generation=known(rel))
        plan.adopted.append(t)
        plan.tasks.append(t)
    return plan


class _Generations:
    """``generation(rel)``, each file's read once."""

    def __init__(self, generation):
        self._generation = generation
        self._seen: dict[bytes, int | None] = {}

    def __call__(self, rel: bytes) -> int | None:
        if rel not in self._seen:
            self._seen[rel] = self._generation(rel)
        return self._seen[rel]


def _is_rows_file(t: Task, rel: bytes, st: os.stat_result, generation) -> bool:
    """Whether the file at ``rel`` (``st``) is the one ``t``'s row was written for."""
    if t.ino is None:
        return True  # a row from before inode records: its path is all it has
    if st.st_ino != t.ino:
        return False
    if t.ino_generation is None:
        return True  # generation unknown: the number decides, as before generations
    if t.state is State.COMPLETE and t.fingerprint == fingerprint(st):
        return True  # the ctime a reused inode would have moved is the verified one
    found = generation(rel)
    return found is None or found == t.ino_generation


def _match_rows(rows: list[Task], files: dict[bytes, os.stat_result], trackable,
                generation):
    """Yield ``(task, stat, moved)``: ``stat`` None for a row whose file is gone.

    A file at a temporary name is never where a task moved to (a rename to such a name
    ends the task's row): when its inode matches a row, the inode was reused by a new
    file (an rsync temp file, say) after the row's own file was removed."""
    by_ino = {st.st_ino: rel for rel, st in files.items() if trackable(rel)}
    unplaced = []
    for t in rows:
        st = files.get(t.rel)
        if st is not None and _is_rows_file(t, t.rel, st, generation):
            del files[t.rel]
            yield t, st, False
        else:
            unplaced.append(t)
    for t in unplaced:
        rel = by_ino.get(t.ino) if t.ino is not None else None
        st = files.get(rel) if rel is not None else None
        if st is not None and _is_rows_file(t, rel, st, generation):
            del files[rel]
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
