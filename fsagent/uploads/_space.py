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
* **No FUSE here.** Callers turn a "no" into ENOSPC; this module answers with numbers
  and booleans, so it is tested without a mount.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ._task import State, Task

__all__ = ["SpaceAccounting"]


class SpaceAccounting:
    def __init__(self, root: bytes, reserve_bytes: int,
                 statvfs: Callable[[bytes], os.statvfs_result] = os.statvfs):
        self._root = root
        self._reserve = reserve_bytes
        self._statvfs = statvfs
        self.declared: set[Task] = set()   # uploads whose declared size reserves space
        self.writing: set[Task] = set()    # uploads with a write-behind queue

    def queued_bytes(self) -> int:
        """Bytes acknowledged to clients and not yet written to the store."""
        return sum(t.writer.queued_bytes for t in self.writing if t.writer is not None)

    def reserved_by_others(self, t: Task | None) -> int:
        reserved = 0
        for o in list(self.declared):
            if o.ended or o.declared_size is None or o.state is State.COMPLETE:
                self.declared.discard(o)  # reservations end with the upload
            elif o is not t and o.state is not State.FAILED:
                reserved += max(0, o.declared_size - o.present)
        return reserved

    def room_for(self, t: Task | None) -> int:
        """Bytes ``t`` may still add (negative: already over)."""
        st = self._statvfs(self._root)
        free = st.f_bavail * st.f_frsize - self._reserve - self.queued_bytes()
        return free - self.reserved_by_others(t)

    def fits(self, t: Task, growth: int) -> bool:
        """Whether ``t`` may grow by ``growth`` bytes (shrinking always fits)."""
        return growth <= 0 or growth <= self.room_for(t)

    def declare(self, t: Task, size: int) -> bool:
        """Reserve room for ``t`` to reach ``size`` bytes; False (nothing changed) if the
        store cannot hold it."""
        if not self.fits(t, size - t.present):
            return False
        t.declared_size = size
        self.declared.add(t)
        return True

    def restore(self, t: Task) -> None:
        """A task loaded at start-up with a declared size holds its reservation again."""
        if t.declared_size is not None:
            self.declared.add(t)
