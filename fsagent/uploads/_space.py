"""Space accounting: may this upload grow by N bytes?

Design notes
------------
* **One number per question.** ``room_for(t)`` is what upload ``t`` may still add to
  the store: the filesystem's free space (``statvfs``: what an unprivileged writer may
  use), minus ``store_reserve_bytes`` (kept for the database and checkpoints), minus
  the bytes acknowledged but not yet on disk (write-behind queues, ``_writer.py``), minus
  what *other* uploads declared they will still write (a declared size is a
  reservation: ``user.fsagent.size`` fails with ENOSPC at once if it cannot fit, so an
  upload that was allowed to start is not starved later by another).
* **Reservations end with the upload**: once it is complete, ended or has no declared
  size any more; a failed upload holds none (it may never be resent). Stale entries
  are dropped lazily when the sum is taken, so nothing else has to remember to.
* **Cheap when there is room.** The exact sum walks every upload with a declared
  size, and ``fits`` runs before every write: with thousands of declared uploads (an
  ``ImportProcess`` declares all its files up front) that walk per write was most of
  the agent's CPU. ``fits`` first compares against the sum of the declared *sizes*
  (kept as declarations are made and dropped), an upper bound of what others still
  reserve; only a store too full for that bound takes the exact walk. The bound is
  never below the truth: a declared size only grows through ``declare``/``restore``,
  which count it, and the walk re-counts what shrank or ended.
* **A full store frees itself first** (repository backend ``s3``): before a write is
  refused, ``make_room`` asks the ``evictor`` (the repository's cache,
  ``fsagent/repository/_cache.py``) to evict local copies of uploads verified in the
  store, least recently used first, in worker threads while the write waits; only if
  that frees too little is the answer still no. Without an evictor nothing changes.
  A size declaration is a write announced in advance, so it gets the same chance:
  ``evict_for`` (``setfattr user.fsagent.size``, ``UploadTasks.create``,
  ``ImportProcess.create``) evicts what is missing before the declaration is refused.
* **No FUSE here.** Callers turn a "no" into ENOSPC; this module answers with numbers
  and booleans, so it is tested without a mount.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from ._task import State, Task

__all__ = ["SpaceAccounting"]


class SpaceAccounting:
    def __init__(self, root: bytes, reserve_bytes: int,
                 statvfs: Callable[[bytes], os.statvfs_result] = os.statvfs):
        self._root = root
        self._reserve = reserve_bytes
        self._statvfs = statvfs
        # Uploads whose declared size reserves space -> the size counted for them in
        # ``_declared_total`` (see "Cheap when there is room").
        self.declared: dict[Task, int] = {}
        self._declared_total = 0
        self.writing: set[Task] = set()    # uploads with a write-behind queue
        # Frees at least N bytes if it can (evicts verified copies); the bytes freed.
        self.evictor: Callable[[int], Awaitable[int]] | None = None

    def _count(self, t: Task, size: int) -> None:
        self._declared_total += size - self.declared.get(t, 0)
        self.declared[t] = size

    def _drop(self, t: Task) -> None:
        self._declared_total -= self.declared.pop(t, 0)

    def queued_bytes(self) -> int:
        """Bytes acknowledged to clients and not yet written to the store."""
        return sum(t.writer.queued_bytes for t in self.writing if t.writer is not None)

    def reserved_by_others(self, t: Task | None) -> int:
        reserved = 0
        for o, counted in list(self.declared.items()):
            if o.ended or o.declared_size is None or o.state is State.COMPLETE:
                self._drop(o)  # reservations end with the upload
                continue
            if o.declared_size != counted:
                self._count(o, o.declared_size)
            if o is not t and o.state is not State.FAILED:
                reserved += max(0, o.declared_size - o.present)
        return reserved

    def _free(self) -> int:
        st = self._statvfs(self._root)
        return st.f_bavail * st.f_frsize - self._reserve - self.queued_bytes()

    def room_for(self, t: Task | None) -> int:
        """Bytes ``t`` may still add (negative: already over)."""
        return self._free() - self.reserved_by_others(t)

    def fits(self, t: Task, growth: int) -> bool:
        """Whether ``t`` may grow by ``growth`` bytes (shrinking always fits)."""
        if growth <= 0:
            return True
        free = self._free()
        if growth <= free - self._declared_total:  # room even if nothing were written yet
            return True
        return growth <= free - self.reserved_by_others(t)

    async def make_room(self, t: Task, growth: int) -> bool:
        """``fits``, after evicting what is missing when it does not (see "A full store
        frees itself first")."""
        if self.fits(t, growth):
            return True
        if self.evictor is None:
            return False
        await self.evictor(growth - self.room_for(t))
        return self.fits(t, growth)

    async def evict_for(self, short: int) -> None:
        """Evict verified copies to free ``short`` more bytes if it can (a declaration
        that does not fit: see "A full store frees itself first"); no evictor, no-op."""
        if self.evictor is not None and short > 0:
            await self.evictor(short)

    def declare(self, t: Task, size: int) -> bool:
        """Reserve room for ``t`` to reach ``size`` bytes; False (nothing changed) if the
        store cannot hold it."""
        if not self.fits(t, size - t.present):
            return False
        t.declared_size = size
        self._count(t, size)
        return True

    def restore(self, t: Task) -> None:
        """A task loaded at start-up with a declared size holds its reservation again."""
        if t.declared_size is not None:
            self._count(t, t.declared_size)
