"""The write path: a client's write, checked, claimed by the hash, then applied.

Design notes
------------
* **In order.** ``write`` checks space (``_space.py``: ENOSPC from that ``write()``,
  nothing written past what fits), claims the bytes in the task's hash stream
  (``_hashing.py``; a resumed append first claims the prefix already on disk), then
  ``pwrite``s small pieces inline and queues large ones on the task's ``BackingWriter``
  (``_writer.py``: acknowledged now, applied in order in a worker thread). The
  checkpointer is told how many bytes are new (``_checkpoints.py``).
* **Anything that looks at the file drains the queue first** (``drain`` in
  ``_checkpoints.py``); flush, fsync and the next write report a queued write's
  failure (``settle``): the file is cut back to where it is whole, so what is there is
  correct and its size is a resume point, and the client gets the errno.
* The kernel's writeback cache stays off: per connection, it would make the kernel
  trust its own size and mtime of every regular file in the mount (status files, job
  outputs) and defer ENOSPC to close; st_blksize = 1 MiB gives large writes instead.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable

import trio
from pyfuse3 import FUSEError

from ..longpaths import BackingTree
from ._checkpoints import Checkpointer, drain
from ._hashing import StreamHasher
from ._space import SpaceAccounting
from ._task import Task
from ._writer import INLINE_WRITE, BackingWriter

__all__ = ["WritePath"]

# The pipeline logs under the component's name, as before the stages were split out:
# operators grep and alert on these lines ("upload complete: ...").
log = logging.getLogger("fsagent.uploads._component")


class WritePath:
    def __init__(self, *, paths: BackingTree, space: SpaceAccounting,
                 checkpoints: Checkpointer, to_thread: Callable[..., Awaitable],
                 counters: dict[str, int]):
        self._paths = paths
        self._space = space
        self._checkpoints = checkpoints
        self._to_thread = to_thread
        self._counters = counters
        self.nursery: trio.Nursery | None = None

    def new_hasher(self, t: Task) -> None:
        if t.hasher is not None:
            t.hasher.close()
        t.hasher = StreamHasher({"sha256", *t.client}, self.nursery, self._to_thread)

    async def write(self, t: Task, fd: int, offset: int, data: bytes) -> int:
        writer = t.writer
        if writer is not None and writer.error is not None:
            self._failed(t, fd)  # a queued write failed: this write reports it
        growth = offset + len(data) - t.present
        if not self._space.fits(t, growth) and not await self._space.make_room(t, growth):
            raise FUSEError(errno.ENOSPC)
        hasher = t.hasher
        if hasher is not None:
            if hasher.gap_before(offset, t.present):
                await drain(t)  # the prefix is read back from disk
                await hasher.feed_existing(functools.partial(self._paths.open, t.rel), offset)
            await hasher.feed(offset, data)
        if len(data) > INLINE_WRITE or (writer is not None and writer.pending):
            # Acknowledged now, applied in order in a worker thread (_writer.py).
            if writer is None:
                writer = t.writer = BackingWriter(self.nursery, self._to_thread)
                self._space.writing.add(t)
            await writer.submit(fd, offset, data)
            written = len(data)
        else:
            try:
                written = os.pwrite(fd, data, offset)
            except OSError as e:
                if hasher is not None:
                    hasher.short_write()
                raise FUSEError(e.errno or errno.EIO) from None
            if written < len(data) and hasher is not None:
                hasher.short_write()
        t.present = max(t.present, offset + written)
        t.changed()
        self._counters["write_calls"] += 1
        self._counters["bytes_written"] += written
        self._checkpoints.wrote(t, written)
        return written

    async def settle(self, t: Task | None, fd: int) -> None:
        """Drain, then report a queued write's failure (flush, fsync)."""
        if t is None or t.writer is None:
            return
        await t.writer.drain()
        if t.writer.error is not None:
            self._failed(t, fd)

    async def released(self, t: Task, fd: int) -> None:
        """A handle is closing: apply its writes; a failure no call is left to report
        is logged (flush, which ``close()`` returns, normally reported it already)."""
        try:
            await self.settle(t, fd)
        except FUSEError:
            pass  # _failed logged it; release has no caller left to tell
        if t.writer is not None and not t.writers - 1 and not t.writer.pending:
            t.writer.close()
            t.writer = None
            self._space.writing.discard(t)

    def _failed(self, t: Task, fd: int) -> None:
        """A write we acknowledged did not reach the disk: cut the file back to where it
        stops being whole, then raise the error to the client calling us."""
        error, at = t.writer.take_failure()
        try:
            if at is not None and os.fstat(fd).st_size > at:
                os.ftruncate(fd, at)
        except OSError:
            log.exception("cutting %s back after a failed write", t.path)
        if at is not None and at < t.present:
            self.resized(t, at)
        log.warning("upload %s: a write failed (%s); cut back to %s bytes", t.path,
                    error.strerror, t.present)
        raise FUSEError(error.errno or errno.EIO)

    def resized(self, t: Task, size: int) -> None:
        """The file is ``size`` bytes now (a truncate or a cut): bytes at and after it
        are no longer what was hashed or synced."""
        t.present = size
        t.durable = min(t.durable, size)
        t.shrinks += 1
        t.changed()
        if t.hasher is not None:
            if size == 0:
                self.new_hasher(t)
            else:
                t.hasher.cut_to(size)
