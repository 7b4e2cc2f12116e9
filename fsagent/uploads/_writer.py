"""Write-behind: an upload's large writes are acknowledged first and applied in order.

Design notes
------------
* **Why.** Without the kernel's writeback cache every FUSE write is synchronous: the
  client's ``write()`` waits for our reply, so cp, the kernel's copy, our ``pwrite``
  into the backing file and the reply run one after another on one core. Replying once
  the bytes are in our hands and applying them to the backing file in a worker thread
  lets the next request arrive while the previous one is written: the same overlap the
  writeback cache gives, without its costs (it is per connection: the kernel would then
  trust its own cached size and mtime for *every* regular file of the mount, so
  ``status``, ``uploads.json`` and job outputs would show stale sizes; see README).
* **What stays exact.** The space check runs before a write is acknowledged, counting
  the bytes still queued, so ``ENOSPC`` is still returned by the ``write()`` that does
  not fit. Pieces of at most ``INLINE_WRITE`` bytes with nothing queued are written on
  the spot (cheaper than a hop, and exact).
* **Order.** One FIFO per upload, applied by one consumer in batches in a worker
  thread, so overlapping writes land in the order they were acknowledged.
* **Everything that looks at the backing file drains first** (``drain``): reads,
  getattr, truncate, setattr (an mtime set by rsync must not be overwritten by a later
  ``pwrite``), fsync, flush, release, checkpoints and re-hashing. So the file behaves as
  if each write had been applied when it was acknowledged.
* **Errors** (the disk failing, or filling up behind our back) cannot go back to the
  ``write()`` already answered: the first one is kept and raised by the next write,
  flush (so ``close()`` fails and cp exits non-zero), fsync or release of that upload,
  exactly like a local filesystem's delayed writeback error. ``failed_at`` is where the
  file stops being whole; the caller trims its byte count and hash to it.
* **Shutdown.** A clean stop cancels the consumer before the checkpoint runs; ``drain``
  then applies what is left itself, so a clean stop still loses nothing acknowledged.
* **Memory** is bounded by ``QUEUE_ITEMS`` pieces (each at most one FUSE write, 1 MiB),
  per upload; a full queue makes the next write wait (back-pressure on the client).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ._hashing import batches

__all__ = ["BackingWriter", "INLINE_WRITE", "QUEUE_ITEMS"]

INLINE_WRITE = 64 * 1024  # pwrite smaller pieces on the loop (when nothing is queued)
QUEUE_ITEMS = 8           # x up to 1 MiB: acknowledged bytes not yet in the backing file


class BackingWriter:
    """One upload's queue of acknowledged writes. Create per upload; ``close`` it."""

    def __init__(self, nursery: trio.Nursery, to_thread: Callable[..., Awaitable[Any]]):
        self._to_thread = to_thread
        self._send, self._recv = trio.open_memory_channel(QUEUE_ITEMS)
        self._pending = 0
        self.queued_bytes = 0               # counted against free space until applied
        self._idle = trio.Event()
        self._idle.set()
        self.error: OSError | None = None   # the first failure not yet reported
        self.failed_at: int | None = None   # lowest offset a failed piece should have covered
        self._consuming = True
        self._unapplied: list[tuple[int, int, bytes]] = []
        nursery.start_soon(self._consume)

    @property
    def pending(self) -> int:
        return self._pending

    async def submit(self, fd: int, offset: int, data: bytes) -> None:
        """Queue ``data`` for ``offset`` of ``fd``; returns once it is queued."""
        self._pending += 1
        self.queued_bytes += len(data)
        if self._idle.is_set():
            self._idle = trio.Event()
        item = (fd, offset, data)
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            await self._send.send(item)  # back-pressure; blocked senders keep FIFO order

    async def drain(self) -> None:
        """Wait until every queued write has been applied (or has failed)."""
        while self._pending:
            if not self._consuming:
                # The consumer was cancelled (shutdown): the clean stop's checkpoint
                # applies what is left itself, so nothing acknowledged is dropped.
                leftovers, self._unapplied = self._unapplied, []
                while True:
                    try:
                        leftovers.append(self._recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                        break
                await self._to_thread(self._apply, leftovers)
                self._done(leftovers)
                return
            await self._idle.wait()

    def take_error(self) -> OSError | None:
        error, self.error = self.error, None
        return error

    def take_failure(self) -> tuple[OSError | None, int | None]:
        """The queued write's error and the offset where the file stops being whole
        (``failed_at``); both are reported once."""
        at, self.failed_at = self.failed_at, None
        return self.take_error(), at

    def close(self) -> None:
        self._send.close()
        self._recv.close()

    async def _consume(self) -> None:
        try:
            async for batch in batches(self._recv, QUEUE_ITEMS):
                # Held until applied: a cancel before the thread starts leaves it to drain.
                self._unapplied = batch
                await self._to_thread(self._apply, batch)
                self._unapplied = []
                self._done(batch)
        except trio.ClosedResourceError:
            pass  # closed by ``close``: nothing was pending
        finally:
            self._consuming = False
            self._idle.set()  # wake drains: they take over what is left

    def _done(self, batch: list[tuple[int, int, bytes]]) -> None:
        self._pending -= len(batch)
        self.queued_bytes -= sum(len(data) for _, _, data in batch)
        if not self._pending:
            self._idle.set()

    def _apply(self, batch: list[tuple[int, int, bytes]]) -> None:
        for fd, offset, data in batch:
            view, done = memoryview(data), 0
            try:
                while done < len(view):
                    n = os.pwrite(fd, view[done:], offset + done)
                    if n == 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += n
            except OSError as e:
                if self.error is None:
                    self.error = e
                at = offset + done
                self.failed_at = at if self.failed_at is None else min(self.failed_at, at)
