"""Hashing uploads: on the fly from the write stream, or by reading the file back.

Design notes
------------
* **On the fly.** While an upload's writes arrive in order (each starting where the
  last ended), ``StreamHasher`` feeds them to SHA-256 (and MD5/SHA-1 when the client
  declared those), so a 2 GiB file is verified without being read back. The first
  write that is not in order (a seek, an overwrite, a hole) marks the stream
  ``broken``; verification then re-hashes the file with ``hash_file`` in a worker thread.
* **Order without blocking.** A write handler claims its place in the stream on the
  event loop *before* its data goes to disk (``feed``), so concurrent writes are
  hashed in the order they were claimed, whatever order their disk writes finish in.
  Small pieces with nothing queued are hashed inline (a 4 KiB SHA-256 costs ~3 µs, less
  than a thread hop); larger ones go through a bounded channel to one consumer task
  per upload that hashes whole batches in a worker thread (hashlib releases the GIL for
  large updates, so hashing runs on the second core while the next write is served).
  The channel's bound is the back-pressure that keeps memory flat in file size. The
  channel and its consumer task are made for the first queued item: a small file,
  hashed inline from its first write to its last, costs neither (nor a thread hop).
* **Resume.** A writer that appends to a file with bytes already present (rsync
  ``--append``, a resumed ``--inplace``) first queues the existing prefix as a *range*
  item, read back from disk by the consumer, so the stream stays whole.
* A short write (disk full) after a claim also breaks the stream: the claim promised
  bytes that did not arrive.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

__all__ = ["StreamHasher", "hash_file", "batches", "CHUNK"]

CHUNK = 1 << 20
INLINE_LIMIT = 64 * 1024
QUEUE_ITEMS = 16  # x up to 1 MiB per FUSE write: the memory bound of one upload's backlog


def hash_file(path: bytes | int, algorithms: Iterable[str]) -> dict[str, str]:
    """Hex digests of the whole file at ``path`` or open as descriptor ``path`` (then
    closed here). Blocking: run it in a worker thread."""
    hashes = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb", buffering=0) as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                break
            for h in hashes.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashes.items()}


async def batches(recv: trio.MemoryReceiveChannel, limit: int):
    """Yield what ``recv`` holds in lists of up to ``limit`` items (one worker-thread
    hop per list instead of per item), waiting only for the first item of each."""
    async for item in recv:
        batch = [item]
        while len(batch) < limit:
            try:
                batch.append(recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        yield batch


class StreamHasher:
    """Hashes one upload's byte stream in write order. Create per upload; ``close`` it."""

    def __init__(self, algorithms: Iterable[str], nursery: trio.Nursery,
                 to_thread: Callable[..., Awaitable[Any]]):
        self.algorithms = tuple(sorted(set(algorithms)))
        self._hashes = {a: hashlib.new(a) for a in self.algorithms}
        self._to_thread = to_thread
        self._nursery = nursery
        self.position = 0  # bytes claimed so far: where the next in-order write starts
        self.broken = False
        self._closed = False
        self._send: trio.MemorySendChannel | None = None  # made with the consumer
        self._pending = 0                                 # items queued, not yet hashed
        self._idle: trio.Event | None = None              # set when _pending drops to 0

    # -- producers (event loop) ---------------------------------------------------------

    async def feed(self, offset: int, data: bytes) -> None:
        """Claim ``data`` at ``offset``; call before the bytes are written to disk."""
        if self.broken:
            return
        if offset != self.position:
            self.break_stream()
            return
        self.position += len(data)
        if not self._pending and len(data) <= INLINE_LIMIT:
            for h in self._hashes.values():
                h.update(data)
            return
        await self._queue(data)

    async def feed_existing(self, path: bytes | Callable[[], int], end: int) -> None:
        """Claim the bytes already on disk up to ``end`` (a resumed upload's prefix).
        ``path`` is the file's path or a function opening it for reading (any length:
        ``BackingTree.open``), called when the bytes are read."""
        if self.broken or end <= self.position:
            return
        start, self.position = self.position, end
        await self._queue((path, start, end))

    def includes(self, algorithm: str) -> bool:
        return algorithm in self.algorithms

    @property
    def fresh(self) -> bool:
        """Nothing claimed yet: a hasher with other algorithms may replace this one."""
        return self.position == 0 and not self.broken

    @property
    def usable(self) -> bool:
        """Whether this stream can still produce digests (else start a new one)."""
        return not self.broken

    def gap_before(self, offset: int, present: int) -> bool:
        """A write at ``offset`` skips bytes already on disk (a resumed append): the
        prefix up to ``offset`` must be claimed from disk first (``feed_existing``)."""
        return not self.broken and self.position < offset <= present

    def cut_to(self, size: int) -> None:
        """The file was cut to ``size`` bytes: bytes this stream claimed are gone."""
        if size < self.position:
            self.break_stream()

    def short_write(self) -> None:
        """A claimed write did not fully reach the disk."""
        self.break_stream()

    def break_stream(self) -> None:
        self.broken = True
        self.close()

    def close(self) -> None:
        self._closed = True
        if self._send is not None:
            self._send.close()

    async def digests(self, size: int) -> dict[str, str] | None:
        """The digests of bytes [0, size), or None if the stream does not cover exactly that."""
        while self._pending:
            await self._idle.wait()
        if self.broken or self.position != size:
            return None
        return {a: h.copy().hexdigest() for a, h in self._hashes.items()}

    async def _queue(self, item) -> None:
        if self._send is None:
            if self._closed:
                self.broken = True  # fed after close: the stream cannot be whole
                return
            send, recv = trio.open_memory_channel(QUEUE_ITEMS)
            try:
                self._nursery.start_soon(self._consume, recv)
            except RuntimeError:  # the agent is stopping: no stream, verify re-hashes
                recv.close()
                self.break_stream()
                return
            self._send = send
        self._pending += 1
        if self._idle is None or self._idle.is_set():
            self._idle = trio.Event()
        try:
            try:
                self._send.send_nowait(item)
            except trio.WouldBlock:
                await self._send.send(item)  # back-pressure; blocked senders keep FIFO order
        except trio.ClosedResourceError:
            # Broken (or closed) meanwhile, also while this send waited: not hashed. The
            # consumer may have ended (and zeroed the count) first.
            self.broken = True
            self._pending = max(0, self._pending - 1)
            if not self._pending:
                self._idle.set()

    # -- the consumer -------------------------------------------------------------------------

    async def _consume(self, recv: trio.MemoryReceiveChannel) -> None:
        async with recv:
            async for batch in batches(recv, QUEUE_ITEMS):
                if not self.broken:
                    try:
                        await self._to_thread(self._update, batch)
                    except OSError:
                        self.broken = True
                self._pending -= len(batch)
                if not self._pending:
                    self._idle.set()
        self._pending = 0
        self._idle.set()  # made by the first _queue, before this task started

    def _update(self, batch: list) -> None:
        hashes = list(self._hashes.values())
        for item in batch:
            if isinstance(item, bytes):
                for h in hashes:
                    h.update(item)
                continue
            path, start, end = item
            fd = path() if callable(path) else os.open(path, os.O_RDONLY)
            try:
                while start < end:
                    block = os.pread(fd, min(CHUNK, end - start), start)
                    if not block:
                        raise OSError(f"{path!r} shorter than {end} bytes")
                    for h in hashes:
                        h.update(block)
                    start += len(block)
            finally:
                os.close(fd)
