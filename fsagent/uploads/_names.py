"""Names: a task follows its file through renames, and ends with it.

Design notes
------------
* **Renames move a task with its file** (a directory's rename moves every task under
  it). A rename over another upload ends that upload's task. A complete task's
  fingerprint follows (a rename moves the ctime, not the bytes), and so does the
  manifest row of its import (``_handoff.py``).
* **A directory's rename touches no file in it**: the kernel moves the ctime of the
  directory's inode only (ext4, tmpfs, xfs alike), so the fingerprints of the files
  under it still hold and are not refreshed: no ``lstat`` per file on the event loop
  when ``mv`` moves a directory of 100,000 uploads. Were a filesystem to touch them
  anyway, the old fingerprint would only make recovery hash those files again
  (``_recovery.py``): a stale fingerprint costs a recheck, never a false proof, and
  each task's new path is staged with its fingerprint in one step (no await between),
  so no flush can record one without the other.
* **Temporary names.** rsync's temp files (``.NAME.XXXXXX``) and anything under its
  partial or delay directories are not tasks (``Task.tracked`` is False: no row, no
  listing); renamed to a real name they become one (``Event.NAMED``), carrying the
  ``user.fsagent.*`` declarations ``rsync -X`` copied onto them. A task renamed to a
  temporary name stops being one, and its import is cancelled if not started.
* **Unlink ends the task** (``Event.UNLINK``), deletes its row and cancels its import
  if it has not started. The IDs of recently ended tasks are remembered, so an import
  job that runs later can tell "removed" from "never an upload".
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

from pyfuse3 import FUSEError

from ..longpaths import BackingTree
from ._checkpoints import Checkpointer, drain
from ._completion import Completion
from ._declarations import FSAGENT_XATTR, declare
from ._handoff import ImportHandOff
from ._manifests import ALGORITHMS
from ._recovery import fingerprint
from ._space import SpaceAccounting
from ._store import TaskTable
from ._task import Event, State, Task, is_temporary_path, is_utf8
from ._writes import WritePath

__all__ = ["Names", "trackable", "REMOVED_REMEMBERED"]

# The pipeline logs under the component's name, as before the stages were split out:
# operators grep and alert on these lines ("upload complete: ...").
log = logging.getLogger("fsagent.uploads._component")

REMOVED_REMEMBERED = 100_000   # ended task IDs kept so their import jobs can tell


def trackable(rel: bytes) -> bool:
    """Whether a file at ``rel`` is an upload task: not an rsync temp file, and a UTF-8
    path (the mount refuses other names; one put into the store by hand is left alone)."""
    return not is_temporary_path(rel) and is_utf8(rel)


class Names:
    def __init__(self, *, tasks: TaskTable, paths: BackingTree, space: SpaceAccounting,
                 checkpoints: Checkpointer, completion: Completion, handoff: ImportHandOff,
                 writes: WritePath):
        self._tasks = tasks
        self._paths = paths
        self._space = space
        self._checkpoints = checkpoints
        self._completion = completion
        self._handoff = handoff
        self._writes = writes
        self._removed: OrderedDict[str, None] = OrderedDict()  # recently ended task IDs

    def was_removed(self, task_id: str) -> bool:
        return task_id in self._removed

    def remember_removed(self, task_id: str) -> None:
        self._removed[task_id] = None
        if len(self._removed) > REMOVED_REMEMBERED:
            self._removed.popitem(last=False)

    def attributes_changed(self, rel: bytes) -> None:
        """Mode, owner, times or a user xattr changed through the mount: the bytes did
        not, so a complete task's fingerprint follows (recovery need not hash it)."""
        t = self._tasks.get(rel)
        if t is not None and t.tracked and t.state is State.COMPLETE:
            self._refresh_fingerprint(t)

    def _refresh_fingerprint(self, t: Task) -> None:
        try:
            t.fingerprint = fingerprint(self._paths.lstat(t.rel))
        except OSError:
            t.fingerprint = None  # recovery will hash it again: never a false proof
        self._tasks.save(t)

    async def unlinked(self, rel: bytes) -> None:
        t = self._tasks.get(rel)
        if t is not None:
            await self._end(t)

    async def _end(self, t: Task) -> None:
        tracked, job = t.tracked, t.job
        self._tasks.remove(t)
        self.remember_removed(t.task_id)
        self._checkpoints.forget(t)
        self._space.writing.discard(t)
        if tracked and job:
            await self._handoff.release(job, t)

    async def renamed(self, old_rel: bytes, new_rel: bytes, is_dir: bool) -> None:
        if not is_dir:
            await self._move(old_rel, new_rel)
            return
        prefix = old_rel + b"/"
        for rel in [r for r in self._tasks.by_path if r.startswith(prefix)]:
            await self._move(rel, new_rel + rel[len(old_rel):], refresh=False)

    async def _move(self, old_rel: bytes, new_rel: bytes, *, refresh: bool = True) -> None:
        """Move the task at ``old_rel`` to ``new_rel``; ``refresh``: the file itself was
        renamed (its ctime moved), not a directory above it (see the notes)."""
        t = self._tasks.get(old_rel)
        replaced = self._tasks.get(new_rel)
        if replaced is not None and replaced is not t:
            await self._end(replaced)
        if t is None:
            return
        was_tracked, now_tracked = t.tracked, trackable(new_rel)
        self._tasks.move(t, new_rel)
        if was_tracked and not now_tracked:
            job = t.job
            t.set_tracked(False)
            self._tasks.forget_row(t)
            if job:
                await self._handoff.release(job, t)
        elif not was_tracked and now_tracked:
            await self._named(t, from_rsync=is_temporary_path(old_rel))
        elif was_tracked:
            if t.state is State.COMPLETE and refresh:
                self._refresh_fingerprint(t)  # a rename moves the ctime, not the bytes
            self._handoff.moved(t)  # the import's manifest row follows the file
            self._completion.notice_manifest(t)

    async def _named(self, t: Task, *, from_rsync: bool) -> None:
        """A temporary file got its real name: it becomes a task now."""
        await drain(t)
        try:
            st = self._paths.lstat(t.rel)
        except OSError:
            return
        t.set_tracked(True)
        t.present = st.st_size
        t.apply(Event.NAMED)
        if t.writers:
            t.apply(Event.OPEN_WRITE)
        # A finished rsync transfer sets the source's mtime on its temp file before the
        # rename; an interrupted --partial does not (rsync < 3.5 even sets mtime 0, which
        # marks it as unfinished for good). Without the explicit time, settling decides.
        t.held = from_rsync and st.st_mtime_ns == 0
        t.renamed_by_rsync = from_rsync and t.timed and not t.held
        # rsync -X carries the source's user.fsagent.* declarations onto its temp file.
        # One listxattr first: most files carry none, and a failed getxattr per name
        # costs a syscall and an exception each (rsync's small-file path).
        try:
            with self._paths.at(t.rel) as path:
                present = set(os.listxattr(path, follow_symlinks=False))
        except OSError:
            present = set()
        for algorithm in ("size", *ALGORITHMS):
            name = FSAGENT_XATTR + algorithm.encode()
            if os.fsdecode(name) not in present:
                continue
            try:
                with self._paths.at(t.rel) as path:
                    value = os.getxattr(path, name, follow_symlinks=False)
                    os.removexattr(path, name, follow_symlinks=False)
            except OSError:
                continue
            try:
                declare(t, algorithm.encode(), value, self._space, self._writes.new_hasher)
            except FUSEError:
                log.warning("ignoring invalid %s on %s", name.decode(), t.path)
        self._tasks.save(t)
        self._completion.notice_manifest(t)
        if not t.writers:
            self._checkpoints.want(t, consider=True)
