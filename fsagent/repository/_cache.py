"""The local disk as a cache of the store: eviction, read-back, fetch-back, deletes.

Design notes
------------
* **What may be evicted.** An upload whose object the push verified (a
  ``repo_objects`` row naming its task: HEAD size and ``sha256`` metadata checked), that
  is ``complete`` with that same SHA-256 and size, whose backing file still has the
  fingerprint recorded with its verdict (size, mtime, ctime: the uploads component's
  proof that the bytes are the hash), with no writer and no open handle. Right before
  evicting, the store is asked again (HEAD: size and ``sha256``), and in the worker
  thread that punches, the open descriptor's inode, size, mtime and ctime are compared
  once more: a file changed since is never punched.
* **How.** The file keeps its inode, size, mode, owner, times and xattrs: only its
  blocks go (``fallocate(PUNCH_HOLE | KEEP_SIZE)``; where the filesystem lacks it,
  ``ftruncate`` to 0 and back), then its atime and mtime are put back. The punch moves
  the ctime, so the upload's recorded fingerprint is refreshed (``copy_changed``) and
  the task stays ``complete`` with its SHA-256. ``stat`` through the mount shows the same
  size (``st_blocks`` is the local disk's truth: about 0).
* **Not while something reads the backing file.** A copy is evicted only once the
  import that pushed it has succeeded (or is gone from the history): the import's
  ``import_command`` and a re-run read the backing file directly. Jobs that read
  uploads directly (archive, verify) run inside ``local_copies``: evicted files they
  name come back first, and nothing they name is evicted until they end.
* **Which, and when** (least recently used first: the newest of the file's atime, mtime
  and the last open through the mount this run): while the local copies of verified
  uploads exceed ``repository.cache_bytes``, while the store's free space is below
  ``repository.cache_free_floor_bytes`` (a keeper task, every ``KEEP_SECONDS`` and after
  every push), and when a write would not fit (``SpaceAccounting.make_room``: the write
  waits for the eviction, done in worker threads, instead of failing with ENOSPC).
* **Reading an evicted file** streams it from the object with ranged GETs of
  ``CHUNK`` bytes, each checked (the object's size and ``sha256`` metadata must be the
  recorded ones, else EIO): a sequential reader gets ``READ_AHEAD`` chunks fetched ahead
  in the background; a handle holds at most ``READ_AHEAD + 3`` chunks (20 MiB: the read's,
  the one behind it, the read ahead; about 120 MiB/s from a loopback rclone, half a plain
  GET's rate). **Emptying** an evicted file (an open with ``O_TRUNC``, as ``cp`` over
  it does, or a truncate to 0) fetches nothing: its record is dropped once the file is
  empty (``emptying``). **Writing** to an evicted file (any other open for writing, a
  truncate) first fetches it back whole: ranged GETs written in place, synced, hashed again (it must be
  the recorded SHA-256, else EIO and it stays evicted), times restored; then the write
  proceeds as on any complete upload. A push that needs the bytes again (a re-run of an
  import) fetches them back the same way.
* **Crash story.** ``repo_cache`` is the truth about which local bytes are not to be
  trusted. Eviction writes the row ``evicting`` *durably before the first byte is
  punched*, and ``evicted`` after the punch and the new fingerprint; fetch-back deletes
  the row only after the bytes were written, synced and hashed. So after a kill -9 at any
  moment a file is either whole and unrecorded, or recorded. At start-up, before the
  uploads component decides which complete uploads to trust (``recover``, called from its
  recovery), every recorded file (found by its inode and size: at its recorded path, or
  wherever a rename whose record was lost put it) is punched again (a half-punched or
  half-fetched file is made a clean hole), gets its recorded times back, and its
  fingerprint is refreshed: it stays ``complete`` and is read from the store. Its local
  bytes are never read as the upload's. (An ``evicting`` record whose punch never
  happened costs a needless punch, never a wrong byte.)
* **Unlink** of a pushed file (``rm`` through the mount) deletes its object(s), or with
  ``repository.keep_deleted`` copies each to ``PREFIX/deleted/PATH`` first. The unlink
  never waits for the store: the keys are recorded durably (``repo_deletes``) and a
  background task deletes them, retrying failures with backoff (up to ``DELETE_BACKOFF_MAX``
  seconds apart, across restarts) and logging each. An object whose ``task`` metadata
  names another upload (the path was reused) is left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import logging
import os
import time
from typing import Any

import trio
from pyfuse3 import FUSEError

from ._push import backoff_delay
from ._s3 import StoreError

__all__ = ["Cache", "CachedCopy"]

log = logging.getLogger(__name__)

CHUNK = 4 * 2**20          # one ranged GET of a reader
READ_AHEAD = 2             # chunks fetched ahead of a sequential reader
FETCH_CHUNK = 8 * 2**20    # one ranged GET of a fetch-back
KEEP_SECONDS = 10.0        # the keeper's period (it is also woken after each push)
HELD_BACK_SECONDS = 1.0    # ... while copies wait for their import to end
GET_ATTEMPTS = 5           # a transient error on a read-back is tried this often
DELETE_BACKOFF_MAX = 300.0

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _meta(head: dict, name: str) -> str | None:
    """User metadata ``name`` of a HEAD answer (stores differ in the keys' case)."""
    for k, v in (head.get("metadata") or {}).items():
        if k.lower() == name:
            return v
    return None


class _Changed(Exception):
    """The file is not the one the eviction checked: nothing was punched."""


@dataclasses.dataclass
class CachedCopy:
    """An upload whose local bytes are not its bytes (``evicting`` or ``evicted``):
    reads go to ``key``. A handle keeps it and asks ``evicted`` on every read."""

    task: str
    key: str
    sha256: str
    size: int
    ino: int
    atime_ns: int
    mtime_ns: int
    state: str
    evicted: bool = True   # False once fetched back: reads are local again


# -- blocking work (worker threads) ---------------------------------------------------------


def punch(fd: int, size: int) -> None:
    """Free every block of the file, keeping its size (a sparse file of zeros)."""
    if size and _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0,
                                size) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(code, os.strerror(code))
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)


def _punch_checked(paths, rel: bytes, st: os.stat_result) -> int:
    """Punch ``rel`` if it is still exactly ``st`` (inode, size, mtime, ctime), put its
    times back; the bytes freed. Raises ``_Changed`` (nothing done) otherwise."""
    try:
        fd = paths.open(rel, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise _Changed(str(e)) from None
    try:
        now = os.fstat(fd)
        if (now.st_ino, now.st_size, now.st_mtime_ns, now.st_ctime_ns) != \
                (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            raise _Changed("changed since it was checked")
        punch(fd, st.st_size)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        return max(0, now.st_blocks - os.fstat(fd).st_blocks) * 512
    finally:
        os.close(fd)


def _find(paths, rel: bytes, copy: CachedCopy) -> bytes | None:
    """Where the recorded file is: at ``rel``, else (a rename whose record was lost in
    the crash) wherever a file has its inode and size."""
    try:
        st = paths.lstat(rel)
        if st.st_ino == copy.ino and st.st_size == copy.size:
            return rel
    except OSError:
        pass  # gone from there (renamed, and its record with it): look by inode below
    for other, st in paths.walk_files().items():
        if st.st_ino == copy.ino and st.st_size == copy.size:
            return other
    return None


def _repunch(paths, rel: bytes, copy: CachedCopy) -> tuple[bytes, os.stat_result] | None:
    """Start-up: make a recorded file a clean hole with its recorded times again; (its
    path, its new stat), or None if the recorded file is nowhere."""
    rel = _find(paths, rel, copy)
    if rel is None:
        return None
    try:
        fd = paths.open(rel, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_blocks:
                punch(fd, copy.size)
            os.utime(fd, ns=(copy.atime_ns, copy.mtime_ns))
        finally:
            os.close(fd)
    except OSError as e:
        # Still recorded, so still read from the store: its local bytes are never used.
        log.error("cache: cannot punch %s again (%s); it is read from the store",
                  os.fsdecode(rel), e)
    return rel, paths.lstat(rel)


def _lru(paths, rels: list[tuple[Any, bytes]], touched: dict[str, float]) -> list[tuple]:
    """(last use, local bytes, item) of each (item, rel) still there."""
    out = []
    for item, rel in rels:
        try:
            st = paths.lstat(rel)
        except OSError:
            continue
        last = max(st.st_atime_ns / 1e9, st.st_mtime_ns / 1e9, touched.get(item[0], 0.0))
        out.append((last, st.st_blocks * 512, item))
    out.sort(key=lambda x: x[0])
    return out


def _hash_file(paths, rel: bytes) -> str:
    fd = paths.open(rel, os.O_RDONLY | os.O_CLOEXEC)
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, 2**20):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


def _open_for_fetch(paths, rel: bytes, copy: CachedCopy) -> int:
    fd = paths.open(rel, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if st.st_ino != copy.ino or st.st_size != copy.size:
        os.close(fd)
        raise OSError(errno.EIO, "the file is not the one that was evicted")
    return fd


def _finish_fetch(fd: int, copy: CachedCopy) -> None:
    try:
        os.fsync(fd)
        os.utime(fd, ns=(copy.atime_ns, copy.mtime_ns))
    finally:
        os.close(fd)


_SELECT_VERIFIED = ("SELECT task, key, sha256, size, job_id FROM repo_objects WHERE "
                    "target = ? AND task IS NOT NULL ORDER BY verified")
_UPSERT_COPY = ("INSERT OR REPLACE INTO repo_cache (task, target, key, sha256, size, ino, "
                "atime_ns, mtime_ns, state, since) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_DELETE_COPY = "DELETE FROM repo_cache WHERE task = ?"


class Cache:
    """The cache of one agent (``repository.backend = "s3"``)."""

    def __init__(self, *, host, store, target: str, prefix: str, cache_bytes: int | None,
                 free_floor: int, keep_deleted: bool, concurrency: int, metrics: dict):
        self.host = host
        self.db = host.db
        self.store = store
        self.target = target
        self.prefix = prefix
        self.cache_bytes = cache_bytes
        self.free_floor = free_floor
        self.keep_deleted = keep_deleted
        self.metrics = metrics
        self.limiter = trio.CapacityLimiter(concurrency)  # reads, apart from the push's
        self.copies: dict[str, CachedCopy] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._evicting = trio.Lock()     # one eviction pass at a time
        self.touched: dict[str, float] = {}
        self.pinned: dict[str, int] = {}  # task -> jobs reading its backing file now
        self.local_bytes = 0             # local copies of verified uploads (last pass)
        self.held_back = 0               # copies whose import has not ended (last pass)
        self.deletes_pending = 0
        self._wake = trio.Event()
        self._wake_deleter = trio.Event()
        self.nursery: trio.Nursery | None = None

    # -- the uploads component, through the host ---------------------------------------------

    @property
    def uploads(self):
        for c in self.host.components:
            if c.name == "uploads":
                return c
        return None

    def _lock(self, task: str) -> trio.Lock:
        lock = self._locks.get(task)
        if lock is None:
            lock = self._locks[task] = trio.Lock()
        return lock

    def _unlock_done(self, task: str) -> None:
        lock = self._locks.get(task)
        if lock is not None and not lock.locked() and not lock.statistics().tasks_waiting:
            del self._locks[task]

    # -- start-up ----------------------------------------------------------------------------

    async def recover(self, rows: list, paths) -> dict[str, os.stat_result]:
        """Before the uploads component decides which complete uploads to trust: every
        recorded copy still in place is made a clean hole again with its recorded times;
        task ID -> its new stat (the fingerprint the upload's record must carry now)."""
        def load(conn):
            return conn.execute("SELECT task, key, sha256, size, ino, atime_ns, mtime_ns, "
                                "state FROM repo_cache WHERE target = ?",
                                (self.target,)).fetchall()
        recorded = [CachedCopy(*r) for r in await self.db.run(load)]
        by_task = {t.task_id: t for t in rows}
        fresh: dict[str, os.stat_result] = {}
        for copy in recorded:
            row = by_task.get(copy.task)
            found = None
            if row is not None:
                found = await self.host.to_thread(_repunch, paths, row.rel, copy)
            if found is None:
                if row is None:
                    log.info("cache: upload %s is gone (removed or replaced); forgetting "
                             "its eviction record", copy.task)
                else:
                    log.warning("cache: the evicted copy of upload %s is nowhere in the "
                                "store; forgetting the record", copy.task)
                self.db.stage(("repo-cache", copy.task), _DELETE_COPY, (copy.task,))
                continue
            rel, st = found
            if copy.state != "evicted":
                log.info("cache: %s was being evicted when the agent stopped; it is read "
                         "from the store", os.fsdecode(rel))
                copy.state = "evicted"
                self._stage(copy)
            self.copies[copy.task] = copy
            fresh[copy.task] = st
        await self.db.flush()
        return fresh

    # -- what the uploads component asks ---------------------------------------------------------

    def opened(self, task: str) -> CachedCopy | None:
        """A handle of ``task`` was opened: its use time, and its record if evicted."""
        self.touched[task] = time.time()
        return self.copies.get(task)

    async def ensure_local(self, task: str) -> None:
        """Before anything writes ``task``'s bytes: an evicted copy is fetched back whole
        (EIO if that fails; it stays evicted)."""
        self.touched[task] = time.time()
        if task not in self.copies and task not in self._locks:
            return
        try:
            async with self._lock(task):
                copy = self.copies.get(task)
                if copy is not None:
                    await self._fetch_back(copy)
        finally:
            self._unlock_done(task)

    @contextlib.asynccontextmanager
    async def emptying(self, task: str):
        """``async with cache.emptying(task)``: around a truncation of ``task``'s file to
        nothing (an open with ``O_TRUNC``, a truncate to 0). Its bytes are about to go, so
        an evicted copy is not fetched back: once the body succeeded, its record is
        dropped (the file is the empty one now; handles reading the old object read the
        file from then on). A kill between the two leaves a record whose size no longer
        matches its file: ``recover`` forgets it. Waits for an eviction in progress."""
        self.touched[task] = time.time()
        if task not in self.copies and task not in self._locks:
            yield
            return
        try:
            async with self._lock(task):
                yield
                copy = self.copies.pop(task, None)
                if copy is not None:
                    copy.evicted = False
                    self.db.stage(("repo-cache", task), _DELETE_COPY, (task,))
                    await self.db.flush()
                    log.info("cache: upload %s was emptied; its evicted copy is "
                             "forgotten, not fetched back", task)
        finally:
            self._unlock_done(task)

    @contextlib.asynccontextmanager
    async def local_copies(self, paths: list[str]):
        """``async with cache.local_copies(paths)``: for a job that reads the backing files
        of ``paths`` (files, or directories: everything under them) directly (archive,
        verify): the evicted ones are fetched back first, and none is evicted until the
        block ends."""
        tasks = self.uploads.tasks_under(paths)
        for task in tasks:
            self.pinned[task] = self.pinned.get(task, 0) + 1
        try:
            for task in tasks:
                await self.ensure_local(task)
            yield
        finally:
            for task in tasks:
                if self.pinned[task] > 1:
                    self.pinned[task] -= 1
                else:
                    del self.pinned[task]

    def unlinked(self, task: str) -> None:
        """``task``'s file was removed through the mount: its objects go (recorded now,
        deleted in the background)."""
        copy = self.copies.pop(task, None)
        if copy is not None:
            copy.evicted = False
            self.db.stage(("repo-cache", task), _DELETE_COPY, (task,))
        self.touched.pop(task, None)
        if self.nursery is not None:
            self.nursery.start_soon(self._record_deletes, task)

    async def read(self, handle, offset: int, size: int) -> bytes:
        reader = getattr(handle, "remote_reader", None)
        if reader is None or reader.copy is not handle.cached:
            reader = handle.remote_reader = _Reader(self, handle.cached)
        return await reader.read(offset, size)

    def wake(self) -> None:
        """Something was pushed: the keeper looks at the cache now."""
        self._wake.set()

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        evicted = [c for c in self.copies.values() if c.state == "evicted"]
        return {"local_bytes": self.local_bytes,
                "evicted_files": len(evicted),
                "evicted_bytes": sum(c.size for c in evicted),
                "limit_bytes": self.cache_bytes, "free_floor_bytes": self.free_floor,
                "keep_deleted": self.keep_deleted, "deletes_pending": self.deletes_pending}

    # -- store requests (worker threads, retried while transient) -------------------------------

    async def _request(self, what: str, fn, *args, attempts: int = GET_ATTEMPTS):
        attempt = 0
        while True:
            try:
                return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
            except StoreError as e:
                attempt += 1
                if not e.transient or attempt >= attempts:
                    raise
                log.info("cache: retrying %s (attempt %d): %s", what, attempt + 1, e)
                await trio.sleep(backoff_delay(attempt))

    async def get(self, copy: CachedCopy, offset: int, length: int) -> bytes:
        """``length`` bytes of ``copy``'s object from ``offset``, checked; EIO if the store
        cannot give them or holds another object there now."""
        try:
            data, size, metadata = await self._request(
                f"reading {copy.key}", self.store.get_range, copy.key, offset, length)
        except StoreError as e:
            log.error("cache: cannot read back %s from the store: %s", copy.key, e)
            raise FUSEError(errno.EIO) from None
        if size != copy.size or metadata.get("sha256") != copy.sha256:
            log.error("cache: the store's %s is not the evicted upload any more (size %d, "
                      "sha256 %s); refusing to serve it", copy.key, size,
                      metadata.get("sha256"))
            raise FUSEError(errno.EIO)
        want = min(length, copy.size - offset)
        if len(data) != want:
            log.error("cache: a read of %s returned %d bytes, not %d", copy.key, len(data),
                      want)
            raise FUSEError(errno.EIO)
        self.metrics["read_back"].inc(len(data))
        return data

    # -- fetch-back ------------------------------------------------------------------------

    async def _fetch_back(self, copy: CachedCopy) -> None:
        uploads = self.uploads
        rel = uploads.path_of(copy.task)
        if rel is None:
            raise FUSEError(errno.ENOENT)
        paths = uploads.paths
        try:
            fd = await self.host.to_thread(_open_for_fetch, paths, rel, copy)
        except OSError as e:
            log.error("cache: cannot fetch %s back: %s", os.fsdecode(rel), e)
            raise FUSEError(errno.EIO) from None
        try:
            for offset in range(0, copy.size, FETCH_CHUNK):
                data = await self.get(copy, offset, FETCH_CHUNK)
                await self.host.to_thread(os.pwrite, fd, data, offset)
        except BaseException:
            os.close(fd)
            raise
        try:
            await self.host.to_thread(_finish_fetch, fd, copy)
            digest = await self.host.to_thread(_hash_file, paths, rel)
        except OSError as e:
            log.error("cache: cannot fetch %s back: %s", os.fsdecode(rel), e)
            raise FUSEError(e.errno or errno.EIO) from None
        if digest != copy.sha256:
            log.error("cache: %s fetched back hashes to %s, not %s; it stays evicted",
                      os.fsdecode(rel), digest, copy.sha256)
            raise FUSEError(errno.EIO)
        uploads.copy_changed(copy.task)
        copy.evicted = False
        self.copies.pop(copy.task, None)
        self.db.stage(("repo-cache", copy.task), _DELETE_COPY, (copy.task,))
        await self.db.flush()
        self.metrics["fetched_back"].inc()
        log.info("cache: fetched %s back from the store (%d bytes)", os.fsdecode(rel),
                 copy.size)

    # -- eviction --------------------------------------------------------------------------

    def _stage(self, copy: CachedCopy) -> None:
        self.db.stage(("repo-cache", copy.task), _UPSERT_COPY,
                      (copy.task, self.target, copy.key, copy.sha256, copy.size, copy.ino,
                       copy.atime_ns, copy.mtime_ns, copy.state, time.time()))

    async def _candidates(self) -> list[tuple]:
        """(last use, local bytes, (task, key, sha256, size, rel)) of every upload whose
        local copy may be evicted, least recently used first."""
        await self.db.flush()   # objects the push verified are staged, not yet written
        rows = await self.db.run(lambda conn: conn.execute(
            _SELECT_VERIFIED, (self.target,)).fetchall())
        latest = {task: (key, sha, size, job) for task, key, sha, size, job in rows}
        uploads = self.uploads
        jobs = self.host.jobs
        items = []
        self.held_back = 0
        for task, (key, sha, size, job) in latest.items():
            if task in self.copies:
                continue
            if job and jobs is not None and jobs.job_state(job) not in (None, "success"):
                # Its import has not finished: its command may still read the file.
                self.held_back += 1
                continue
            local = uploads.local_copy(task)
            if local is None or (local[1], local[2]) != (size, sha):
                continue
            items.append(((task, key, sha, size, local[0]), local[0]))
        return await self.host.to_thread(_lru, uploads.paths, items, self.touched)

    async def evict(self, task: str, key: str, sha256: str, size: int) -> int:
        """Evict ``task``'s local copy if it is still evictable; the bytes freed."""
        if task in self.copies:
            return 0
        try:
            async with self._lock(task):
                return await self._evict(task, key, sha256, size)
        finally:
            self._unlock_done(task)

    async def _evict(self, task: str, key: str, sha256: str, size: int) -> int:
        uploads = self.uploads
        local = uploads.local_copy(task)
        if local is None or task in self.copies or (local[1], local[2]) != (size, sha256):
            return 0
        try:
            head = await self._request(f"checking {key}", self.store.head_object, key)
        except StoreError as e:
            log.warning("cache: not evicting %s: the store cannot be asked (%s)", key, e)
            return 0
        if head is None or head.get("size") != size or _meta(head, "sha256") != sha256:
            log.warning("cache: not evicting %s: the store's object is not the upload "
                        "(%s)", key, "missing" if head is None else "size or sha256 differ")
            return 0
        rel = local[0]
        try:
            st = await self.host.to_thread(uploads.paths.lstat, rel)
        except OSError:
            return 0
        # No await from here to the record: nobody opened it meanwhile, and from the
        # record on every read of it goes to the store.
        if uploads.local_copy(task) != local or task in self.copies or task in self.pinned \
                or \
                (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != local[3]:
            return 0
        copy = CachedCopy(task=task, key=key, sha256=sha256, size=size, ino=st.st_ino,
                          atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns,
                          state="evicting")
        self.copies[task] = copy
        self._stage(copy)
        try:
            await self.db.flush()   # durable before the first byte is punched
            freed = await self.host.to_thread(_punch_checked, uploads.paths, rel, st)
        except (_Changed, OSError) as e:
            log.warning("cache: not evicting %s: %s", os.fsdecode(rel), e)
            self.copies.pop(task, None)
            copy.evicted = False
            self.db.stage(("repo-cache", task), _DELETE_COPY, (task,))
            await self.db.flush()
            return 0
        if self.copies.get(task) is not copy:
            return freed   # removed meanwhile (``unlinked``): nothing left to record
        uploads.copy_changed(task)
        copy.state = "evicted"
        self._stage(copy)
        await self.db.flush()
        self.metrics["evictions"].inc()
        self.local_bytes = max(0, self.local_bytes - freed)
        log.info("cache: evicted %s (%d bytes; object %s)", os.fsdecode(rel), size, key)
        return freed

    async def evict_for(self, need: int) -> int:
        """The store runs short by ``need`` bytes: evict least recently used verified
        copies until that much is freed (or none is left); the bytes freed."""
        freed = 0
        try:
            async with self._evicting:
                for _, local, item in await self._candidates():
                    if freed >= need:
                        break
                    if local:
                        freed += await self.evict(*item[:4])
        except Exception:   # the write is refused as before, not failed with EIO
            log.exception("cache: evicting to make room failed")
        return freed

    @property
    def limited(self) -> bool:
        return self.cache_bytes is not None or bool(self.free_floor)

    def _forget_gone(self) -> None:
        """Records of uploads that ended without an unlink (replaced by a rename over
        them): their file is gone, so is the record."""
        uploads = self.uploads
        for task in [t for t in self.copies if uploads.path_of(t) is None
                     and t not in self._locks]:
            self.copies.pop(task).evicted = False
            self.db.stage(("repo-cache", task), _DELETE_COPY, (task,))

    async def _keep(self) -> None:
        self._forget_gone()
        async with self._evicting:
            candidates = await self._candidates()
            self.local_bytes = sum(local for _, local, _ in candidates)
            for _, local, item in candidates:
                over = self.cache_bytes is not None and self.local_bytes > self.cache_bytes
                short = self.free_floor and await self._free() < self.free_floor
                if not (over or short):
                    break
                if local:
                    await self.evict(*item[:4])

    async def _free(self) -> int:
        st = await self.host.to_thread(os.statvfs, self.uploads.paths.root)
        return st.f_bavail * st.f_frsize

    # -- deletes ------------------------------------------------------------------------------

    def deleted_key(self, key: str) -> str:
        rest = key[len(self.prefix) + 1:] if self.prefix and key.startswith(
            self.prefix + "/") else key
        return f"{self.prefix}/deleted/{rest}" if self.prefix else f"deleted/{rest}"

    async def _record_deletes(self, task: str) -> None:
        try:
            await self._record_deletes_of(task)
        except Exception:
            log.exception("cache: recording the objects of removed upload %s failed; "
                          "they stay in the store", task)

    async def _record_deletes_of(self, task: str) -> None:
        def record(conn):
            keys = [k for (k,) in conn.execute(
                "SELECT key FROM repo_objects WHERE target = ? AND task = ?",
                (self.target, task))]
            return keys
        keys = await self.db.run(record)
        for key in keys:
            self.db.stage(("repo-delete", self.target, key),
                          "INSERT OR REPLACE INTO repo_deletes (target, key, task, keep, "
                          "recorded) VALUES (?, ?, ?, ?, ?)",
                          (self.target, key, task, int(self.keep_deleted), time.time()))
            self.db.stage(("repo-object", self.target, key),
                          "DELETE FROM repo_objects WHERE target = ? AND key = ?",
                          (self.target, key))
        if keys:
            await self.db.flush()
            self._wake_deleter.set()

    async def _delete_one(self, key: str, task: str | None, keep: bool) -> None:
        head = await trio.to_thread.run_sync(self.store.head_object, key,
                                             limiter=self.limiter)
        if head is None:
            return
        owner = _meta(head, "task")
        if task is not None and owner is not None and owner != task:
            log.info("cache: %s belongs to another upload now; not deleting it", key)
            return
        if keep:
            await trio.to_thread.run_sync(self.store.copy_object, key, self.deleted_key(key),
                                          head["size"], head.get("metadata"),
                                          limiter=self.limiter)
        await trio.to_thread.run_sync(self.store.delete_object, key, limiter=self.limiter)
        self.metrics["deleted"].inc()
        log.info("cache: %s %s", "moved to " + self.deleted_key(key) if keep else "deleted",
                 key)

    async def _deleter(self) -> None:
        failures = 0
        while True:
            try:
                failed = await self._delete_pass()
            except Exception:
                log.exception("cache: a pass of the deleter failed")
                failed = True
            failures = failures + 1 if failed else 0
            self._wake_deleter = trio.Event()
            if failures:
                with trio.move_on_after(min(DELETE_BACKOFF_MAX, backoff_delay(failures))):
                    await trio.sleep_forever()
            else:
                await self._wake_deleter.wait()

    async def _delete_pass(self) -> bool:
        """Delete every recorded key once; whether any failed."""
        rows = await self.db.run(lambda conn: conn.execute(
            "SELECT key, task, keep FROM repo_deletes WHERE target = ? ORDER BY "
            "recorded", (self.target,)).fetchall())
        self.deletes_pending = len(rows)
        failed = False
        for key, task, keep in rows:
            try:
                await self._delete_one(key, task, bool(keep))
            except StoreError as e:
                failed = True
                self.metrics["delete_errors"].inc()
                log.warning("cache: removing %s from the store failed (%s); tried "
                            "again later", key, e)
                continue
            self.db.stage(("repo-delete", self.target, key),
                          "DELETE FROM repo_deletes WHERE target = ? AND key = ?",
                          (self.target, key))
            self.deletes_pending -= 1
        await self.db.flush()
        return failed

    # -- the task ------------------------------------------------------------------------------

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._deleter)
            while True:
                try:
                    await self._keep()
                except Exception:
                    log.exception("cache: the keeper's pass failed")
                # Copies held back only until their import ends: look again soon.
                soon = self.limited and self.held_back
                with trio.move_on_after(HELD_BACK_SECONDS if soon else KEEP_SECONDS):
                    await self._wake.wait()
                self._wake = trio.Event()


class _Reader:
    """One handle's read-back of an evicted file: chunks, read ahead when sequential."""

    def __init__(self, cache: Cache, copy: CachedCopy):
        self.cache = cache
        self.copy = copy
        self.chunks: dict[int, bytes] = {}
        self.pending: dict[int, trio.Event] = {}
        self.expected = 0   # where a sequential reader reads next

    async def _chunk(self, index: int) -> bytes:
        while True:
            data = self.chunks.get(index)
            if data is not None:
                return data
            event = self.pending.get(index)
            if event is None:
                break
            await event.wait()
            if index not in self.chunks:
                break   # the read ahead failed: read it here (and report its error)
        await self._load(index)
        return self.chunks[index]

    async def _load(self, index: int) -> None:
        event = self.pending[index] = trio.Event()
        try:
            data = await self.cache.get(self.copy, index * CHUNK, CHUNK)
            self.chunks[index] = data
        finally:
            if self.pending.get(index) is event:
                del self.pending[index]
            event.set()

    async def _ahead(self, index: int) -> None:
        try:
            await self._load(index)
        except Exception:   # never the agent's end: the reader reads it itself
            log.debug("cache: reading ahead %s failed", self.copy.key, exc_info=True)

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.copy.size)
        if offset >= end:
            return b""
        sequential = offset == self.expected
        first, last = offset // CHUNK, (end - 1) // CHUNK
        # Bounded: what this read, the read ahead and a read just behind (the kernel
        # sends several reads at once, not always in order) need.
        for old in [i for i in self.chunks if i < first - 1 or i > last + READ_AHEAD + 1]:
            del self.chunks[old]
        out = []
        for index in range(first, last + 1):
            data = await self._chunk(index)
            lo = max(offset, index * CHUNK) - index * CHUNK
            hi = min(end, (index + 1) * CHUNK) - index * CHUNK
            out.append(data[lo:hi])
        self.expected = end
        if sequential and self.cache.nursery is not None:
            for index in range(last + 1, last + 1 + READ_AHEAD):
                if index * CHUNK < self.copy.size and index not in self.chunks \
                        and index not in self.pending:
                    self.cache.nursery.start_soon(self._ahead, index)
        return b"".join(out)
