"""Durability: upload data synced first, its durable offset recorded second.

Design notes
------------
* **Data first, record second.** ``sync(batch)`` applies each task's acknowledged
  writes, notes each size, syncs the data (``fdatasync`` per file, or one ``syncfs``
  for a batch of ``SYNCFS_AT`` or more, e.g. an rsync of thousands of small files),
  and only then stages ``durable_offset`` and commits. Crash recovery cuts an
  unfinished upload back to that offset, so everything below it was on disk.
* **When.** One checkpointer task runs a batch when a task has ``checkpoint_bytes``
  of new data, every ``checkpoint_seconds`` for everything written since, and when a
  writer closes a file (closes within ``CLOSE_BATCH_SECONDS`` share one sync).
  Completion is considered only after the close's checkpoint (``then``), so a
  complete upload is always durable. ``fsync`` on any descriptor records its own
  offset (``synced``), without waiting for the checkpointer.
* **Offsets only grow**, unless the file was cut or truncated since the size was
  noted (``Task.shrinks``): a checkpoint that noted an older, smaller size must not
  lower the offset an fsync raised meanwhile (recovery would cut fsync'd data).
* **Failures** (the disk failing): the batch is kept and retried a second later; the
  records stay staged for the database's own retry.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Awaitable, Callable

import trio

from ..longpaths import BackingTree
from ._store import TaskTable
from ._task import Task

__all__ = ["Checkpointer", "CLOSE_BATCH_SECONDS", "SYNCFS_AT"]

# The pipeline logs under the component's name, as before the stages were split out:
# operators grep and alert on these lines ("upload complete: ...").
log = logging.getLogger("fsagent.uploads._component")

CLOSE_BATCH_SECONDS = 0.02     # closes arriving this close together share one sync
SYNCFS_AT = 8                  # this many files to sync: one syncfs beats many fdatasyncs
_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(path: bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


def _fdatasync(paths: BackingTree, rel: bytes) -> None:
    try:
        fd = paths.open(rel, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


async def drain(t: Task | None) -> None:
    """Apply ``t``'s acknowledged writes: call before anything looks at its file."""
    if t is not None and t.writer is not None and t.writer.pending:
        await t.writer.drain()


class Checkpointer:
    def __init__(self, *, tasks: TaskTable, paths: BackingTree, root: bytes,
                 to_thread: Callable[..., Awaitable], flush: Callable[[], Awaitable[None]],
                 checkpoint_bytes: int, checkpoint_seconds: float,
                 then: Callable[[Task], Awaitable[None]]):
        self._tasks = tasks
        self._paths = paths
        self._root = root
        self._to_thread = to_thread
        self._flush = flush
        self._checkpoint_bytes = checkpoint_bytes
        self._checkpoint_seconds = checkpoint_seconds
        self._then = then                     # completion's consider(t)
        self._wanted: set[Task] = set()
        self._consider: set[Task] = set()     # considered for completion after the sync
        self._unsynced: set[Task] = set()     # written since their last checkpoint
        self._wakeup = trio.Event()
        self.count = 0

    def wrote(self, t: Task, n: int) -> None:
        """``n`` new bytes of ``t`` were acknowledged (not yet on disk)."""
        t.since_checkpoint += n
        self._unsynced.add(t)
        if t.tracked and t.since_checkpoint >= self._checkpoint_bytes:
            self.want(t)

    def want(self, t: Task, *, consider: bool = False) -> None:
        """Sync ``t`` soon (and then see whether it is complete, with ``consider``)."""
        self._wanted.add(t)
        if consider:
            self._consider.add(t)
        self._wakeup.set()

    def pending_consideration(self, t: Task) -> bool:
        return t in self._consider

    def forget(self, t: Task) -> None:
        self._wanted.discard(t)
        self._consider.discard(t)

    async def run(self, nursery: trio.Nursery) -> None:
        while True:
            with trio.move_on_after(self._checkpoint_seconds):
                await self._wakeup.wait()
            if self._wakeup.is_set():
                await trio.sleep(CLOSE_BATCH_SECONDS)
            self._wakeup = trio.Event()
            self._wanted |= {t for t in self._unsynced if t.tracked}
            self._unsynced = {t for t in self._unsynced if not t.tracked and not t.ended}
            batch, self._wanted = self._wanted, set()
            consider, self._consider = self._consider, set()
            try:
                await self.sync(batch)
            except OSError as e:
                log.error("checkpoint failed (%s); will retry", e)
                self._wanted |= batch
                self._consider |= consider
                await trio.sleep(1)
                continue
            for t in consider:
                nursery.start_soon(self._then, t)

    async def sync(self, batch) -> None:
        """Make every task in ``batch`` durable up to its current size and record it."""
        batch = [t for t in batch if t.tracked and not t.ended]
        if not batch:
            return
        for t in batch:
            await drain(t)  # the sizes noted below must be on disk before the sync
        sizes = {t: (t.present, t.shrinks) for t in batch}
        # syncfs flushes the whole filesystem, other programs' dirty data included, so it
        # is only worth it for many files; a clean stop with a few open uploads must not
        # wait for someone else's gigabytes.
        if len(batch) >= SYNCFS_AT:
            await self._to_thread(_syncfs, self._root)
        else:
            rels = [t.rel for t in batch]
            await self._to_thread(lambda: [_fdatasync(self._paths, r) for r in rels])
        for t, (size, shrinks) in sizes.items():
            if not t.ended:
                self.synced(t, size, shrinks)
        self.count += 1
        await self._flush()

    def synced(self, t: Task, size: int, shrinks: int) -> None:
        """The first ``size`` bytes of ``t``, noted (with ``t.shrinks``) before a sync
        that has now returned, are on disk: record it (see "Offsets only grow")."""
        if shrinks == t.shrinks:
            t.durable = max(t.durable, min(size, t.present))
        t.since_checkpoint = max(0, t.present - t.durable)
        self._tasks.save(t)
