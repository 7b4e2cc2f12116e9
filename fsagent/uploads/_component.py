"""``UploadsComponent``: every regular file under ``uploads/`` is an upload task.

Design notes
------------
* **Who does what.** The nodes (``_nodes.py``) do the syscalls on the backing tree and
  report events here; this module keeps the tasks (``_store.py``), moves them along the
  transition table (``_task.py``), hashes (``_hashing.py``), reads manifests
  (``_manifests.py``), makes data durable and hands verified uploads to the job engine.
* **The write path.** ``write`` checks space (free space minus the reserve minus what
  other declared uploads still need minus writes still queued), claims the bytes in the
  task's hash stream, then ``pwrite``s small pieces inline and queues large ones on the
  task's ``BackingWriter`` (``_writer.py``: acknowledged now, applied in order in a
  worker thread; the hash runs in another). Everything that looks at the file drains
  that queue first (``drain``); flush/fsync/the next write report a queued failure.
  The kernel's writeback cache stays off: per connection, it would make the kernel
  trust its own size and mtime of every regular file in the mount (status files, job
  outputs) and defer ENOSPC to close; st_blksize = 1 MiB gives large writes instead.
* **Checkpoints: data first, record second.** One checkpointer task makes tasks
  durable: it notes each task's size, syncs the data (``fdatasync`` per file, or one
  ``syncfs`` for a batch of many, e.g. an rsync of thousands of small files), then
  stages ``durable_offset`` and commits. It runs when a task has
  ``checkpoint_bytes`` of new data, every ``checkpoint_seconds``, when a writer closes
  a file (closes are batched for 20 ms), and ``fsync`` waits for one. Completion is
  considered only after the close's checkpoint, so a complete upload is always durable.
* **Crash recovery.** At start-up after an unclean stop, every unfinished task's file
  is cut back to its durable offset (a file with no row yet to 0): that size is the
  resume point ``rsync --append-verify``/``--inplace`` sees, and everything before it
  was synced. A clean stop (``checkpoint``) syncs everything first, so nothing is cut.
* **Completion** (``_consider``): after the last writer's close, on a declaration, on
  a rename into place, and from the settle loop. ``verify`` uses the on-the-fly digests
  when the stream covered the whole file, otherwise re-hashes in a worker thread; a
  write during verification supersedes it (the generation changed).
* **Import hand-off**: ``agent.jobs.submit("import", spec)``; without a job engine, or
  when it fails (its database cannot be written, say), the task stays complete with no
  job and its ``error`` says why; it is retried with a doubling delay from
  ``IMPORT_RETRY_FIRST_SECONDS`` up to ``IMPORT_RETRY_MAX_SECONDS`` (a refusal that
  will not go away must not fill the log every few seconds forever) and at the next
  start. A successful hand-off clears the error. Unlinking a task cancels its import
  if it has not started.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from typing import Any

import trio
from pyfuse3 import FUSEError

from ..component import Component
from ..fs import DynamicFile, Node
from ..longpaths import BackingTree
from ._hashing import StreamHasher, hash_file
from ._manifests import ALGORITHMS, DIGEST_HEX_LENGTH, manifest_kind, manifest_names_for, \
    parse_manifest
from ._nodes import FSAGENT_XATTR, FileHandle, UploadDir
from ._store import Task, TaskTable, load_tasks
from ._task import Event, State, completion_event, is_temporary_path, is_utf8
from ._writer import INLINE_WRITE, BackingWriter

__all__ = ["UploadsComponent"]

log = logging.getLogger(__name__)

IMPORT_RETRY_FIRST_SECONDS = 2.0
IMPORT_RETRY_MAX_SECONDS = 600.0
CLOSE_BATCH_SECONDS = 0.02     # closes arriving this close together share one sync
SYNCFS_AT = 8                  # this many files to sync: one syncfs beats many fdatasyncs
MANIFEST_LIMIT = 16 * 2**20    # bigger "manifests" are not manifests
REMOVED_REMEMBERED = 100_000   # ended task IDs kept so their import jobs can tell
# An import that ended in these did not import its version: the same bytes coming back
# complete get a new one. Any other state, or none (evicted from the job history: it
# ran long ago), means the version has its import.
_DEAD_IMPORT = {"failure", "cancelled"}
_HEX = re.compile(r"^[0-9a-f]+$")
_STATUS_XATTRS = {b"task", b"state", b"offset", b"progress", b"job", b"error"}
_DECLARABLE = {b"size", b"md5", b"sha1", b"sha256"}
_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(path: bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


def _fdatasync_path(paths: BackingTree, rel: bytes) -> None:
    try:
        fd = paths.open(rel, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


class UploadsComponent(Component):
    name = "uploads"

    def __init__(self, agent):
        super().__init__(agent)
        self.config = agent.config
        self._root_path = os.fsencode(self.config.uploads_dir)
        self.paths = BackingTree(self._root_path)  # syscalls on paths of any length
        self.tasks = TaskTable(agent.db)
        self.root = UploadDir(self, None, b"")
        self._nursery: trio.Nursery | None = None
        self._checkpoint_wanted: set[Task] = set()
        self._consider_after_checkpoint: set[Task] = set()
        self._checkpoint_wakeup = trio.Event()
        self._checkpoint_done = trio.Event()
        self._importing: set[str] = set()
        # task_id -> (trio time of the next attempt, the delay that led to it, the task)
        self._import_retry: dict[str, tuple[float, float, Task]] = {}
        self._import_retry_changed = trio.Event()
        self._declared_sizes: set[Task] = set()  # uploads whose declared size reserves space
        self._unsynced: set[Task] = set()        # written since their last checkpoint
        self._writing: set[Task] = set()         # with a BackingWriter (write-behind)
        self._removed: OrderedDict[str, None] = OrderedDict()  # recently ended task IDs
        self.counters = {"write_calls": 0, "bytes_written": 0, "rehashed": 0, "checkpoints": 0,
                         "recovered_cuts": 0, "rechecked": 0}
        # Collected at scrape time from counts kept anyway: nothing added to the write path.
        agent.metrics.counter("fsagent_upload_bytes_received_total", "Bytes written into "
                              "uploads/", collect=lambda: self.counters["bytes_written"])
        agent.metrics.gauge("fsagent_uploads", "Upload tasks by state", labels=("state",),
                            collect=lambda: {(s,): n for s, n in self.status()["tasks"].items()})
        self.completed_total = agent.metrics.counter(
            "fsagent_uploads_completed_total", "Uploads verified complete (each version once)")
        self.verification_failures = agent.metrics.counter(
            "fsagent_upload_verification_failures_total", "Uploads that failed verification: "
            "a hash mismatch, a file larger than its declared size, or unreadable data",
            labels=("reason",))
        for reason in ("mismatch", "size", "unreadable"):
            self.verification_failures.labels(reason).inc(0)  # zero series from the start

    # -- component hooks ----------------------------------------------------------------

    def root_entries(self) -> dict[bytes, Node]:
        return {b"uploads": self.root, b"uploads.json": DynamicFile(self.render_list)}

    def status(self) -> dict[str, Any]:
        states: dict[str, int] = {s.value: 0 for s in State}
        for t in self.tasks.tracked():
            states[t.state.value] += 1
        return {"tasks": states, **self.counters}

    def counts(self) -> dict[str, int]:
        receiving = sum(1 for t in self.tasks.tracked() if t.state is State.RECEIVING)
        return {"uploads receiving": receiving}

    def _failed(self, t: Task, reason: str) -> None:
        """After ``t.apply`` moved ``t`` to failed: count it and say so, once."""
        self.verification_failures.labels(reason).inc()
        log.warning("upload %s failed: %s", t.task_id, t.error)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._recover()
            nursery.start_soon(self._checkpointer)
            nursery.start_soon(self._settler)
            nursery.start_soon(self._import_retrier)
            for t in self.tasks.tracked():
                if t.state is State.PARTIAL:
                    nursery.start_soon(self._consider, t)
                elif t.state is State.VERIFYING:  # RECHECK at recovery
                    nursery.start_soon(self._recheck, t)
            task_status.started()

    async def checkpoint(self) -> None:
        """Clean stop: sync every upload's data and record it as durable."""
        for t in list(self._writing):
            await self.drain(t)
        dirty = [t for t in self.tasks.tracked() if t.present > t.durable or t.writers]
        await self._sync(dirty)
        for t in self.tasks.tracked():
            self.tasks.save(t)

    # -- paths and lookups ----------------------------------------------------------------

    def backing(self, rel: bytes) -> bytes:
        return self._root_path + b"/" + rel if rel else self._root_path

    def is_task(self, rel: bytes) -> bool:
        t = self.tasks.get(rel)
        return t is not None and t.tracked

    def _task(self, rel: bytes) -> Task:
        """The task of a regular file, made on first sight if it has none."""
        t = self.tasks.get(rel)
        if t is None:
            try:
                st = self.paths.lstat(rel)
                size, ino = st.st_size, st.st_ino
            except OSError:
                size, ino = 0, None
            t = Task(rel=rel, present=size, ino=ino, tracked=_trackable(rel))
            self.tasks.add(t)
        return t

    def describe_task(self, task_id: str) -> dict[str, Any] | None:
        """An upload task as an import job must see it now (``Agent.upload_task``)."""
        t = self.tasks.get_id(task_id)
        if t is None:
            return {"state": "removed"} if task_id in self._removed else None
        if not t.tracked:
            return {"state": "removed"}  # renamed to a temporary name: not an upload now
        return {"path": t.path, "state": t.state.value, "size": t.present,
                "sha256": t.computed.get("sha256")}

    # -- events from the nodes ---------------------------------------------------------------

    async def opened(self, rel: bytes, *, writable: bool, truncated: bool) -> Task | None:
        if not writable:
            return None
        t = self._task(rel)
        t.writers += 1
        was_complete = t.state is State.COMPLETE
        if t.tracked:
            t.apply(Event.OPEN_WRITE)
            t.error = None
            t.held = False
            t.renamed_by_rsync = False
        if truncated and t.present:
            t.present = 0
            t.durable = 0
            t.shrinks += 1
        # Whatever the writer does, the verified hash no longer proves anything. ``job``
        # stays: if these same bytes come back, that import still stands (``_verify``).
        t.changed()
        if t.present == 0 or t.hasher is None or t.hasher.broken:
            self._new_hasher(t)
        self.tasks.save(t)
        if was_complete and t.tracked:
            # Out of complete durably before the writer can change a byte: recovery
            # must never find a "complete" record over bytes that are not its hash.
            await self._commit(t)
        return t

    def _new_hasher(self, t: Task) -> None:
        if t.hasher is not None:
            t.hasher.close()
        t.hasher = StreamHasher({"sha256", *t.client}, self._nursery, self.agent.to_thread)

    async def write(self, handle: FileHandle, offset: int, data: bytes) -> int:
        t = handle.task
        writer = t.writer
        if writer is not None and writer.error is not None:
            self._write_failed(t, handle.fd)  # a queued write failed: this write reports it
        growth = offset + len(data) - t.present
        if growth > 0 and growth > self._space_for(t):
            raise FUSEError(errno.ENOSPC)
        hasher = t.hasher
        if hasher is not None:
            if offset > hasher.position and offset <= t.present and not hasher.broken:
                await self.drain(t)  # the prefix is read back from disk
                await hasher.feed_existing(functools.partial(self.paths.open, t.rel), offset)
            await hasher.feed(offset, data)
        if len(data) > INLINE_WRITE or (writer is not None and writer.pending):
            # Acknowledged now, applied in order in a worker thread (_writer.py).
            if writer is None:
                writer = t.writer = BackingWriter(self._nursery, self.agent.to_thread)
                self._writing.add(t)
            await writer.submit(handle.fd, offset, data)
            written = len(data)
        else:
            try:
                written = os.pwrite(handle.fd, data, offset)
            except OSError as e:
                if hasher is not None:
                    hasher.short_write()
                raise FUSEError(e.errno or errno.EIO) from None
            if written < len(data) and hasher is not None:
                hasher.short_write()
        t.present = max(t.present, offset + written)
        t.changed()
        self.counters["write_calls"] += 1
        self.counters["bytes_written"] += written
        t.since_checkpoint += written
        self._unsynced.add(t)
        if t.tracked and t.since_checkpoint >= self.config.checkpoint_bytes:
            self._want_checkpoint(t)
        return written

    async def drain(self, t: Task | None) -> None:
        """Apply ``t``'s acknowledged writes: call before anything looks at its file."""
        if t is not None and t.writer is not None and t.writer.pending:
            await t.writer.drain()

    async def settle_writes(self, t: Task | None, fd: int) -> None:
        """Drain, then report a queued write's failure (flush, fsync)."""
        if t is None or t.writer is None:
            return
        await t.writer.drain()
        if t.writer.error is not None:
            self._write_failed(t, fd)

    def _write_failed(self, t: Task, fd: int) -> None:
        """A write we acknowledged did not reach the disk: cut the file back to where it
        stops being whole, so what is there is correct and the size is a resume point,
        then raise the error to the client (the write, flush or fsync calling this)."""
        writer = t.writer
        error, at = writer.take_error(), writer.failed_at
        writer.failed_at = None
        try:
            if at is not None and os.fstat(fd).st_size > at:
                os.ftruncate(fd, at)
        except OSError:
            log.exception("cutting %s back after a failed write", t.path)
        if at is not None and at < t.present:
            self._cut(t, at)
        log.warning("upload %s: a write failed (%s); cut back to %s bytes", t.path,
                    error.strerror, t.present)
        raise FUSEError(error.errno or errno.EIO)

    def _cut(self, t: Task, size: int) -> None:
        t.present = size
        t.durable = min(t.durable, size)
        t.shrinks += 1
        t.changed()
        if t.hasher is not None and size < t.hasher.position:
            t.hasher.break_stream()

    async def released(self, t: Task, fd: int) -> None:
        """A handle is closing: apply its writes; a failure no call is left to report
        is logged (flush, which ``close()`` returns, normally reported it already)."""
        try:
            await self.settle_writes(t, fd)
        except FUSEError:
            pass  # _write_failed logged it; release has no caller left to tell
        if t.writer is not None and not t.writers - 1 and not t.writer.pending:
            t.writer.close()
            t.writer = None
            self._writing.discard(t)

    async def fsync(self, handle: FileHandle) -> None:
        """fsync on any descriptor makes the file's data durable: ``sync FILE`` opens it
        read-only, and fdatasync on that descriptor flushes every writer's pages too."""
        t = handle.task
        if t is None:
            t = handle.node.writing_task()
            if t is None:
                try:
                    t = self.tasks.get(handle.node.rel)
                except FUSEError:
                    t = None  # unlinked while open: no task to record it for
            await self.drain(t)
        else:
            await self.settle_writes(t, handle.fd)
        size, shrinks = (t.present, t.shrinks) if t is not None else (0, 0)
        try:
            await self.agent.to_thread(os.fdatasync, handle.fd)
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        if t is not None and t.tracked and not t.ended:
            self._mark_durable(t, size, shrinks)
            await self._flush()

    async def _commit(self, t: Task) -> None:
        """Stage ``t``'s row and wait until it is durable."""
        self.tasks.save(t)
        await self._flush()

    async def changing(self, rel: bytes) -> None:
        """The bytes of ``rel`` are about to change without a writer (a truncate by
        path): a complete task leaves ``complete`` durably first."""
        t = self.tasks.get(rel)
        if t is None or not t.tracked or t.state is not State.COMPLETE:
            return
        t.changed()
        t.apply(Event.MODIFY)
        await self._commit(t)

    async def closed(self, t: Task) -> None:
        t.writers -= 1
        if t.writers or t.ended or not t.tracked:
            return
        t.apply(Event.CLOSE)
        self.tasks.save(t)
        self._want_checkpoint(t, consider=True)
        self._notice_manifest(t)

    def truncated(self, rel: bytes, size: int) -> None:
        t = self.tasks.get(rel)
        if t is None:
            return
        t.present = size
        t.durable = min(t.durable, size)
        t.shrinks += 1
        t.changed()
        if t.hasher is not None and size < t.hasher.position:
            if size == 0:
                self._new_hasher(t)
            else:
                t.hasher.break_stream()
        if t.tracked:
            t.apply(Event.MODIFY)
            self.tasks.save(t)
            if t.state is State.PARTIAL:
                self._want_checkpoint(t, consider=True)

    def attributes_changed(self, rel: bytes) -> None:
        """Mode, owner, times or a user xattr changed through the mount: the bytes did
        not, so a complete task's fingerprint follows (recovery need not hash it)."""
        t = self.tasks.get(rel)
        if t is not None and t.tracked and t.state is State.COMPLETE:
            self._refresh_fingerprint(t)

    def _refresh_fingerprint(self, t: Task) -> None:
        try:
            t.fingerprint = _fingerprint(self.paths.lstat(t.rel))
        except OSError:
            t.fingerprint = None  # recovery will hash it again: never a false proof
        self.tasks.save(t)

    def mtime_set(self, rel: bytes, mtime_ns: int) -> None:
        t = self.tasks.get(rel)
        if t is None:
            return
        t.timed = mtime_ns != 0
        if t.held and mtime_ns != 0:
            t.held = False  # rsync --inplace/--append finished and set the real time
            t.last_change = time.monotonic()
            self.tasks.save(t)

    async def unlinked(self, rel: bytes) -> None:
        t = self.tasks.get(rel)
        if t is not None:
            await self._end(t)

    async def _end(self, t: Task) -> None:
        tracked, job = t.tracked, t.job
        self.tasks.remove(t)
        self._remember_removed(t.task_id)
        self._checkpoint_wanted.discard(t)
        self._consider_after_checkpoint.discard(t)
        self._writing.discard(t)
        if tracked and job:
            await self._cancel_import(job)

    async def renamed(self, old_rel: bytes, new_rel: bytes, is_dir: bool) -> None:
        if not is_dir:
            await self._move(old_rel, new_rel)
            return
        prefix = old_rel + b"/"
        for rel in [r for r in self.tasks.by_path if r.startswith(prefix)]:
            await self._move(rel, new_rel + rel[len(old_rel):])

    async def _move(self, old_rel: bytes, new_rel: bytes) -> None:
        t = self.tasks.get(old_rel)
        replaced = self.tasks.get(new_rel)
        if replaced is not None and replaced is not t:
            await self._end(replaced)
        if t is None:
            return
        was_tracked, now_tracked = t.tracked, _trackable(new_rel)
        self.tasks.move(t, new_rel)
        if was_tracked and not now_tracked:
            job = t.job
            t.tracked = False
            self.tasks.forget_row(t)
            if job:
                await self._cancel_import(job)
        elif not was_tracked and now_tracked:
            await self._renamed_into_place(t, from_rsync=is_temporary_path(old_rel))
        elif was_tracked:
            if t.state is State.COMPLETE:
                self._refresh_fingerprint(t)  # a rename moves the ctime, not the bytes
            jobs = self._jobs()
            if t.job is not None and jobs is not None:
                # The repository manifest records a file at its path: its import's row
                # follows the rename (replacing the row of a file renamed over).
                jobs.import_moved(t.task_id, t.job, t.path)
            self._notice_manifest(t)

    async def _renamed_into_place(self, t: Task, *, from_rsync: bool) -> None:
        """A temp file got its real name: it becomes a task now."""
        await self.drain(t)
        try:
            st = self.paths.lstat(t.rel)
        except OSError:
            return
        t.tracked = True
        t.present = st.st_size
        t.state = State.RECEIVING if t.writers else State.PARTIAL
        # A finished rsync transfer sets the source's mtime on its temp file before the
        # rename; an interrupted --partial does not (rsync < 3.5 even sets mtime 0, which
        # marks it as unfinished for good). Without the explicit time, settling decides.
        t.held = from_rsync and st.st_mtime_ns == 0
        t.renamed_by_rsync = from_rsync and t.timed and not t.held
        # rsync -X carries the source's user.fsagent.* declarations onto its temp file.
        for algorithm in ("size", *ALGORITHMS):
            name = FSAGENT_XATTR + algorithm.encode()
            try:
                with self.paths.at(t.rel) as path:
                    value = os.getxattr(path, name, follow_symlinks=False)
                    os.removexattr(path, name, follow_symlinks=False)
            except OSError:
                continue
            try:
                self._apply_declaration(t, algorithm.encode(), value)
            except FUSEError:
                log.warning("ignoring invalid %s on %s", name.decode(), t.path)
        self.tasks.save(t)
        self._notice_manifest(t)
        if not t.writers:
            self._want_checkpoint(t, consider=True)

    def _remember_removed(self, task_id: str) -> None:
        self._removed[task_id] = None
        if len(self._removed) > REMOVED_REMEMBERED:
            self._removed.popitem(last=False)

    # -- declarations (xattrs) -------------------------------------------------------------------

    def task_xattrs(self, rel: bytes) -> dict[bytes, bytes]:
        t = self.tasks.get(rel)
        if t is None or not t.tracked:
            return {}
        p = t.progress
        out = {
            b"user.fsagent.task": t.task_id.encode(),
            b"user.fsagent.state": t.state.value.encode(),
            b"user.fsagent.offset": str(t.present).encode(),
        }
        if t.declared_size is not None:
            out[b"user.fsagent.size"] = str(t.declared_size).encode()
        out[b"user.fsagent.progress"] = b"" if p is None else f"{p:g}".encode()
        for algorithm in ALGORITHMS:
            value = t.computed.get(algorithm) if algorithm == "sha256" else None
            value = value or t.client.get(algorithm)
            if value:
                out[FSAGENT_XATTR + algorithm.encode()] = value.encode()
        out[b"user.fsagent.job"] = (t.job or "").encode()
        out[b"user.fsagent.error"] = (t.error or "").encode()
        return out

    async def declare(self, rel: bytes, name: bytes, value: bytes) -> None:
        t = self.tasks.get(rel)
        key = name[len(FSAGENT_XATTR):]
        if key in _STATUS_XATTRS:
            raise FUSEError(errno.EPERM)
        if key not in _DECLARABLE:
            raise FUSEError(errno.EINVAL)
        self._apply_declaration(t, key, value)
        self.tasks.save(t)
        await self._declared(t)

    def _apply_declaration(self, t: Task, key: bytes, value: bytes) -> None:
        text = value.decode("ascii", "replace").strip().lower()
        if key == b"size":
            if not text.isdigit():
                raise FUSEError(errno.EINVAL)
            size = int(text)
            if size - t.present > self._space_for(t):
                raise FUSEError(errno.ENOSPC)
            t.declared_size = size
            self._declared_sizes.add(t)
            return
        algorithm = key.decode()
        if len(text) != DIGEST_HEX_LENGTH[algorithm] or not _HEX.match(text):
            raise FUSEError(errno.EINVAL)
        t.client[algorithm] = text
        if t.hasher is not None and algorithm not in t.hasher.algorithms \
                and t.hasher.position == 0:
            self._new_hasher(t)  # nothing hashed yet: include it on the fly

    async def undeclare(self, rel: bytes, name: bytes) -> None:
        t = self.tasks.get(rel)
        key = name[len(FSAGENT_XATTR):]
        if key in _STATUS_XATTRS:
            # Derived values: removing them changes nothing, and succeeding keeps
            # `rsync -aX` (which removes attributes its source lacks) from failing.
            return
        if key == b"size" and t.declared_size is not None:
            t.declared_size = None
        elif key.decode("ascii", "replace") in t.client:
            del t.client[key.decode()]
        elif key == b"sha256" and t.computed.get("sha256"):
            return
        else:
            raise FUSEError(errno.ENODATA)
        self.tasks.save(t)

    async def _declared(self, t: Task) -> None:
        """Something was declared about ``t``: see whether it is complete (or still is)."""
        if t.state is State.PARTIAL and not t.writers:
            self._want_checkpoint(t, consider=True)
        elif t.state in (State.COMPLETE, State.FAILED):
            t.apply(Event.HASH_DECLARED)
            self.tasks.save(t)
            self._nursery.start_soon(self._verify, t, t.generation)

    # -- space ----------------------------------------------------------------------------------

    def _space_for(self, t: Task) -> int:
        """Bytes ``t`` may still add: free space minus the reserve and others' declarations."""
        st = os.statvfs(self._root_path)
        free = st.f_bavail * st.f_frsize - self.config.store_reserve_bytes
        free -= sum(o.writer.queued_bytes for o in self._writing if o.writer is not None)
        reserved = 0
        for o in list(self._declared_sizes):
            if o.ended or o.declared_size is None or o.state is State.COMPLETE:
                self._declared_sizes.discard(o)  # reservations end with the upload
            elif o is not t and o.state is not State.FAILED:
                reserved += max(0, o.declared_size - o.present)
        return free - reserved

    # -- checkpoints ------------------------------------------------------------------------------

    def _want_checkpoint(self, t: Task, *, consider: bool = False) -> None:
        self._checkpoint_wanted.add(t)
        if consider:
            self._consider_after_checkpoint.add(t)
        self._checkpoint_wakeup.set()

    async def _checkpointer(self) -> None:
        while True:
            with trio.move_on_after(self.config.checkpoint_seconds):
                await self._checkpoint_wakeup.wait()
            if self._checkpoint_wakeup.is_set():
                await trio.sleep(CLOSE_BATCH_SECONDS)
            self._checkpoint_wakeup = trio.Event()
            self._checkpoint_wanted |= {t for t in self._unsynced if t.tracked}
            self._unsynced = {t for t in self._unsynced if not t.tracked and not t.ended}
            batch, self._checkpoint_wanted = self._checkpoint_wanted, set()
            consider, self._consider_after_checkpoint = self._consider_after_checkpoint, set()
            try:
                await self._sync(batch)
            except OSError as e:
                log.error("checkpoint failed (%s); will retry", e)
                self._checkpoint_wanted |= batch
                self._consider_after_checkpoint |= consider
                await trio.sleep(1)
                continue
            done, self._checkpoint_done = self._checkpoint_done, trio.Event()
            done.set()
            for t in consider:
                self._nursery.start_soon(self._consider, t)

    async def _sync(self, batch) -> None:
        batch = [t for t in batch if t.tracked and not t.ended]
        if not batch:
            return
        for t in batch:
            await self.drain(t)  # the sizes noted below must be on disk before the sync
        sizes = {t: (t.present, t.shrinks) for t in batch}
        # syncfs flushes the whole filesystem, other programs' dirty data included, so it
        # is only worth it for many files; a clean stop with a few open uploads must not
        # wait for someone else's gigabytes.
        if len(batch) >= SYNCFS_AT:
            await self.agent.to_thread(_syncfs, self._root_path)
        else:
            rels = [t.rel for t in batch]
            await self.agent.to_thread(lambda: [_fdatasync_path(self.paths, r) for r in rels])
        for t, (size, shrinks) in sizes.items():
            if not t.ended:
                self._mark_durable(t, size, shrinks)
        self.counters["checkpoints"] += 1
        await self._flush()

    def _mark_durable(self, t: Task, size: int, shrinks: int) -> None:
        """The first ``size`` bytes of ``t``, noted before a sync that has now returned,
        are on disk. A durable offset only grows here: a checkpoint that noted an older,
        smaller size must not undo an ``fsync`` that finished meanwhile. Unless the file
        was cut or truncated since the size was noted (``shrinks``): then the bytes that
        sync covered may be gone, and the cut already lowered the offset."""
        if shrinks == t.shrinks:
            t.durable = max(t.durable, min(size, t.present))
        t.since_checkpoint = max(0, t.present - t.durable)
        self.tasks.save(t)

    async def _flush(self) -> None:
        try:
            await self.agent.db.flush()
        except Exception:
            log.exception("writing upload records failed; they stay staged")

    # -- completion ---------------------------------------------------------------------------------

    async def _settler(self) -> None:
        settle = self.config.settle_seconds
        while True:
            await trio.sleep(min(1.0, settle / 4))
            now = time.monotonic()
            for t in self.tasks.tracked():
                if (t.state is State.PARTIAL and not t.writers and not t.held
                        and t.declared_size is None and now - t.last_change >= settle
                        and t not in self._consider_after_checkpoint):
                    await self._consider(t)

    async def _consider(self, t: Task) -> None:
        if t.ended or not t.tracked or t.state is not State.PARTIAL or t.writers:
            return
        generation = t.generation
        declarations = await self._declarations(t)
        if t.ended or t.state is not State.PARTIAL or t.writers or t.generation != generation:
            return
        event, reason = completion_event(
            writers=t.writers, size=t.present, declared_size=t.declared_size,
            has_client_hash=bool(declarations), renamed_by_rsync=t.renamed_by_rsync,
            held=t.held, idle_seconds=time.monotonic() - t.last_change,
            settle_seconds=self.config.settle_seconds)
        if event is None:
            return
        if event is Event.FAIL:
            t.error = f"{t.path}: {reason}"
            t.apply(Event.FAIL)
            self.tasks.save(t)
            self._failed(t, "size")
            return
        t.apply(event)
        self.tasks.save(t)
        await self._verify(t, generation, declarations)

    async def _declarations(self, t: Task) -> list[tuple[str, str, str]]:
        """Every hash declared for ``t``: ``(algorithm, hex, where it was declared)``."""
        out = [(a, v, f"user.fsagent.{a}") for a, v in sorted(t.client.items())]
        directory, _, name = t.rel.rpartition(b"/")
        # Most directories have no manifest: a few failed stats here beat a thread hop.
        candidates = [m for m, _ in manifest_names_for(name)
                      if self.paths.exists(directory + b"/" + m if directory else m)]
        if not candidates:
            return out
        try:
            found = await self.agent.to_thread(_read_manifests, self.paths, directory, name)
        except OSError as e:
            log.warning("reading manifests next to %s: %s", t.path, e)
            found = []
        return out + found

    async def _verify(self, t: Task, generation: int,
                      declarations: list[tuple[str, str, str]] | None = None) -> None:
        if declarations is None:
            declarations = await self._declarations(t)
        algorithms = {"sha256", *(a for a, _, _ in declarations)}
        digests = t.computed if algorithms <= t.computed.keys() else None
        if digests is None and t.hasher is not None:
            streamed = await t.hasher.digests(t.present)
            if streamed is not None and algorithms <= streamed.keys():
                digests = streamed
        if digests is None:
            self.counters["rehashed"] += 1
            await self.drain(t)
            try:
                digests = await self.agent.to_thread(_hash_file, self.paths, t.rel,
                                                     sorted(algorithms))
            except OSError as e:
                if self._current(t, generation):
                    t.error = f"{t.path}: cannot read it back to hash it: {e.strerror}"
                    t.apply(Event.FAIL)
                    self.tasks.save(t)
                    self._failed(t, "unreadable")
                return
        if not self._current(t, generation):
            return  # written to, truncated or removed meanwhile: that change decides
        try:
            fingerprint = _fingerprint(self.paths.lstat(t.rel))
        except OSError:
            fingerprint = None  # proves nothing: a crash makes recovery hash it again
        t.computed = dict(digests)
        for algorithm, expected, source in declarations:
            actual = digests[algorithm]
            if actual != expected:
                t.error = (f"{t.path}: {algorithm} mismatch: expected {expected} "
                           f"({source}), got {actual}")
                t.apply(Event.MISMATCH)
                self.tasks.save(t)
                self._failed(t, "mismatch")
                return
        # One version, one import: bytes that come back complete with the hash their
        # import was submitted for (a recheck, a hash declared late, a rewrite with the
        # same bytes) keep that import, unless it ended without success.
        old_job = t.job
        same_version = (old_job is not None and t.job_sha256 == digests["sha256"]
                        and self._import_state(old_job) not in _DEAD_IMPORT)
        t.error = None
        t.fingerprint = fingerprint
        t.apply(Event.VERIFIED)
        if t.hasher is not None:
            t.hasher.close()
            t.hasher = None
        if not same_version:
            t.job = t.job_sha256 = None
            t.completed = time.time()
            self.completed_total.inc()
        # Staged, not committed here: the data is already durable, and a crash before the
        # next flush only means this file is verified again at start-up.
        self.tasks.save(t)
        log.info("upload complete: %s (%d bytes, sha256 %s)", t.path, t.present,
                 t.computed["sha256"])
        if not same_version:
            if old_job is not None:
                await self._cancel_import(old_job)  # it would import bytes that are gone
            await self._hand_off(t)

    def _import_state(self, job: str) -> str | None:
        jobs = self._jobs()
        return None if jobs is None else jobs.job_state(job)

    def _current(self, t: Task, generation: int) -> bool:
        return (not t.ended and t.tracked and t.generation == generation
                and t.state is State.VERIFYING)

    def _notice_manifest(self, t: Task) -> None:
        """If ``t`` is a manifest, what it declares may complete (or fail) other files."""
        directory, _, name = t.rel.rpartition(b"/")
        kind = manifest_kind(name)
        if kind is None:
            return
        self._nursery.start_soon(self._apply_manifest, directory, name, kind)

    async def _apply_manifest(self, directory: bytes, name: bytes, kind) -> None:
        algorithm, subject = kind
        rel = directory + b"/" + name if directory else name
        try:
            content = await self.agent.to_thread(_read_small, self.paths, rel)
        except OSError:
            return
        for target in parse_manifest(content, algorithm, subject):
            rel = directory + b"/" + target if directory else target
            t = self.tasks.get(rel)
            if t is None or not t.tracked:
                continue
            await self._declared(t)

    # -- import hand-off -------------------------------------------------------------------------------

    def _jobs(self):
        return self.agent.jobs

    async def _hand_off(self, t: Task) -> None:
        if t.job or t.task_id in self._importing or t.state is not State.COMPLETE:
            return
        if self._jobs() is None:
            self._import_failed(t, "there is no job engine")
            return
        self._importing.add(t.task_id)
        # The job's ID is chosen here and staged on the task first, so the job engine's
        # durable submit commits the job and the task's record of it in one transaction
        # (one fsync): a crash can leave neither or both, never a job the upload forgot
        # (it would be handed over, and imported, twice after the restart).
        job = str(uuid.uuid4())
        error_before = t.error
        t.job, t.job_sha256, t.error = job, t.computed["sha256"], None
        # No await from here to the engine staging the job's row: the database takes
        # them into one transaction (fsagent/db.py), so neither is ever durable alone.
        self.tasks.save(t)
        try:
            st = self.paths.lstat(t.rel)
            spec = {"task": t.task_id, "path": t.path, "size": t.present,
                    "sha256": t.computed["sha256"], "mtime_ns": st.st_mtime_ns}
            # The import belongs to whoever owns the file: they may cancel or re-prioritise it.
            await self._jobs().submit("import", spec, owner_uid=st.st_uid, job_id=job)
        except BaseException as e:
            # Not submitted (refused, failed, or cancelled by a shutdown): the task must
            # not name a job that does not exist, or the version would never be imported.
            t.job, t.job_sha256, t.error = None, None, error_before
            self.tasks.save(t)
            if not isinstance(e, Exception):
                raise
            if t.task_id not in self._import_retry:
                log.exception("handing %s to the job engine failed", t.path)
            self._import_failed(t, f"{type(e).__name__}: {e}")
            return
        finally:
            self._importing.discard(t.task_id)
        if t.ended:
            await self._cancel_import(job)
            return
        if self._import_retry.pop(t.task_id, None) is not None:
            log.info("upload %s handed to the job engine after earlier failures", t.path)

    def _import_failed(self, t: Task, reason: str) -> None:
        """Record why the import did not start and when it is tried again."""
        _, delay, _ = self._import_retry.get(t.task_id, (0.0, 0.0, t))
        delay = min(IMPORT_RETRY_MAX_SECONDS, delay * 2 or IMPORT_RETRY_FIRST_SECONDS)
        self._import_retry[t.task_id] = (trio.current_time() + delay, delay, t)
        self._import_retry_changed.set()
        t.error = f"{t.path}: import not started ({reason}); next try in {delay:g} s"
        log.warning("upload %s", t.error)
        self.tasks.save(t)

    async def _cancel_import(self, job: str) -> None:
        jobs = self._jobs()
        if jobs is None:
            return
        try:
            await jobs.cancel_if_not_started(job)
        except Exception:
            log.exception("cancelling import job %s failed", job)

    async def _import_retrier(self) -> None:
        # At start-up: every complete upload the last run did not hand off.
        for t in self.tasks.tracked():
            if t.state is State.COMPLETE and not t.job:
                await self._hand_off(t)
        while True:
            self._import_retry_changed = trio.Event()
            due = min((at for at, _, _ in self._import_retry.values()), default=None)
            with trio.move_on_at(due if due is not None else float("inf")):
                await self._import_retry_changed.wait()
            now = trio.current_time()
            for task_id, (at, _, t) in list(self._import_retry.items()):
                if at > now:
                    continue
                if t.ended or t.job or t.state is not State.COMPLETE:
                    del self._import_retry[task_id]  # gone, re-written, or handed off
                    continue
                await self._hand_off(t)

    # -- uploads.json ---------------------------------------------------------------------------------

    def render_list(self) -> bytes:
        tasks = self.tasks.tracked()
        unfinished = [t for t in tasks if t.state is not State.COMPLETE]
        done = sorted((t for t in tasks if t.state is State.COMPLETE),
                      key=lambda t: t.completed or 0, reverse=True)
        shown = sorted(unfinished, key=lambda t: t.updated)
        shown += done[: self.config.recent_uploads]
        return (json.dumps([t.summary() for t in shown], indent=1) + "\n").encode()

    # -- start-up --------------------------------------------------------------------------------------

    async def _recover(self) -> None:
        db = self.agent.db
        clean = db.previous_run_clean
        rows = await db.run(load_tasks)
        files = await self.agent.to_thread(self.paths.walk_files)
        cuts: list[tuple[bytes, int]] = []
        jobs = self._jobs()
        for t, st, moved in _match_rows(rows, files):
            if st is None:
                self.tasks.forget_row(t)  # removed while we were down
                self._remember_removed(t.task_id)
                continue
            size = st.st_size
            t.apply(Event.RESTART)
            if t.state is State.COMPLETE:
                # Trusted only while the file is provably the one verified: same inode,
                # size, mtime and ctime. Anything else (a rename or a change that never
                # reached the database, an edit while we were down) is hashed again
                # before the task is complete again (``_recheck``).
                if t.fingerprint != _fingerprint(st):
                    t.fingerprint = None
                    t.apply(Event.RECHECK)
            else:
                t.computed = {}  # hashes of an unfinished file describe no version now
                t.fingerprint = None
                if not clean and size > t.durable:
                    cuts.append((t.rel, t.durable))
                    size = t.durable
            if moved and t.job is not None and jobs is not None:
                jobs.import_moved(t.task_id, t.job, t.path)  # as a live rename would
            t.ino = st.st_ino
            t.present = size
            t.durable = min(t.durable, size)
            if t.declared_size is not None:
                self._declared_sizes.add(t)
            self.tasks.add(t)
        for rel, st in files.items():
            if not _trackable(rel):
                if not is_temporary_path(rel):
                    log.warning("ignoring %r in the store: its name is not UTF-8, so it "
                                "cannot be an upload task", rel)
                continue
            # A file we hold no record of (created just before a crash, before its row was
            # flushed, or put into the store by hand) is adopted at its size as partial: we
            # never destroy bytes we cannot prove are garbage; a resumed rsync
            # --append-verify checks the whole file and repairs it if it must.
            t = Task(rel=rel, present=st.st_size, ino=st.st_ino)
            t.durable = st.st_size
            self.tasks.add(t)
        if cuts:
            await self.agent.to_thread(_cut_back, self.paths, cuts)
            self.counters["recovered_cuts"] = len(cuts)
            for rel, size in cuts:
                log.warning("unclean stop: cut %s back to its durable offset %d",
                            os.fsdecode(self.backing(rel)), size)
        await db.flush()

    async def _recheck(self, t: Task) -> None:
        """Hash a complete file recovery could not prove unchanged. The same bytes stay
        complete with their import; other bytes are a new version, which the
        completion rules take from ``partial`` like any other."""
        generation = t.generation
        self.counters["rechecked"] += 1
        try:
            digests = await self.agent.to_thread(_hash_file, self.paths, t.rel, ["sha256"])
        except OSError as e:
            digests = {}
            log.warning("rechecking %s: %s", t.path, e.strerror)
        if not self._current(t, generation):
            return
        if digests.get("sha256") == t.computed.get("sha256"):
            await self._verify(t, generation)
            return
        log.warning("upload %s is not the bytes it was verified as (changed while the "
                    "agent was not looking); checking it again as a new version", t.path)
        t.changed()
        t.apply(Event.MODIFY)
        self.tasks.save(t)
        self._want_checkpoint(t, consider=True)


def _fingerprint(st: os.stat_result) -> tuple[int, int, int]:
    """What recovery compares: size, mtime and ctime (no client can set a ctime)."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _match_rows(rows: list[Task], files: dict[bytes, os.stat_result]):
    """Pair each task row with its file: at its own path when the inode agrees (or the
    row has none recorded), else wherever its inode is now (a rename whose record never
    reached the database). Yields ``(task, stat, moved)`` with ``stat`` None for a row
    whose file is gone, and takes every matched file out of ``files``."""
    by_ino = {st.st_ino: rel for rel, st in files.items()}
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
            log.info("upload %s was renamed to %s before the agent stopped", t.path,
                     os.fsdecode(rel))
            t.rel = rel
            yield t, st, True
        else:
            yield t, None, False


def _trackable(rel: bytes) -> bool:
    """Whether a file at ``rel`` is an upload task: not an rsync temp file, and a UTF-8
    path (the mount refuses other names; one put into the store by hand is left alone)."""
    return not is_temporary_path(rel) and is_utf8(rel)


def _cut_back(paths: BackingTree, cuts: list[tuple[bytes, int]]) -> None:
    for rel, size in cuts:
        fd = paths.open(rel, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)


def _hash_file(paths: BackingTree, rel: bytes, algorithms: list[str]) -> dict[str, str]:
    return hash_file(paths.open(rel, os.O_RDONLY), algorithms)  # open() takes the fd


def _read_small(paths: BackingTree, rel: bytes) -> bytes:
    with open(paths.open(rel, os.O_RDONLY), "rb") as f:
        return f.read(MANIFEST_LIMIT)


def _read_manifests(paths: BackingTree, directory: bytes,
                    name: bytes) -> list[tuple[str, str, str]]:
    out = []
    for manifest, algorithm in manifest_names_for(name):
        try:
            content = _read_small(paths, directory + b"/" + manifest if directory else manifest)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
        kind = manifest_kind(manifest)
        digest = parse_manifest(content, algorithm, kind[1]).get(name)
        if digest:
            out.append((algorithm, digest, os.fsdecode(manifest)))
    return out

