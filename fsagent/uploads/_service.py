"""``UploadTasks.*`` and ``ImportProcess.*``: the upload engine over msgpack-RPC.

Design notes
------------
* **One engine, two faces.** An upload started over RPC is a task in ``uploads/`` like
  a file copied into the mount, and goes through the very calls the FUSE nodes make
  (``_nodes.py``): the file is created in the backing tree (owned by the caller when
  the agent is root), the component hears ``opened``; data goes through the write path
  (``WritePath.write``: space check, on-the-fly hash, write-behind queue, checkpoints);
  sizes and hashes are declared with the same ``declare`` as ``setfattr
  user.fsagent.*`` (so the same space check); ``released`` and ``closed`` end a
  writer, and completion, verification and the import hand-off follow as for any
  file. The task record is ``Task.summary()`` plus ``owner``.
* **RPC writers.** A file written over RPC has one open descriptor (``RpcWriter``),
  which counts as a writer of the task (state ``receiving``) while data arrives. It
  is closed when the file reaches its declared size, at ``verifyUpload``, when the
  connection that last wrote it closes (``Peer.on_close``), after ``IDLE_SECONDS``
  without a write, at delete, and at a clean stop; then the task is ``partial`` and
  the completion rules decide, exactly as after a ``close(2)``.
* **Offsets.** A write must start at the file's current size (``BadOffset`` names
  it); writes to one file are applied one at a time, in offset order. Requests on one
  connection run in their own tasks (``rpc/_server.py``) and trio does not promise
  their order, so a write for a later offset waits while an earlier one for the same
  file is being applied, and for up to ``REORDER_SECONDS`` for it to arrive: a client
  may keep several chunks in flight. A reply means the bytes are in the backing file
  (page cache), so ``stat`` through the mount sees them; ``getUploadOffset`` syncs them
  first (``Checkpointer.sync``) and answers the durable offset, which is what a crash
  keeps (recovery cuts back to it).
* **What the kernel caches.** ``uploads/`` lets the kernel keep entries, attributes
  and missing names for 60 s (``_nodes.py``, "What the kernel may cache"); every change
  made there used to arrive through the kernel. Changes made here do not, so each is
  invalidated: a created or removed name (``invalidate_entry``, which also drops a
  negative entry) and its directory's attributes, and a written file's attributes
  (``invalidate_inode`` with ``attr_only``). Only nodes the kernel holds
  (``node.inode`` set, still in its directory's cache) can have anything cached. The
  notifications run in a worker thread, awaited: a notification waits for the
  kernel's lock on that directory, which a FUSE request in flight may hold until the
  event loop answers it, so it must not block the loop, and the reply must not go
  out before the kernel dropped the stale entry.
* **Owners.** The caller's uid (``current_peer().uid``; None on TCP is the token
  holder, treated as root) owns what it creates; only the owner (the file's uid) and
  root may write, delete or verify. Reading is open. Paths are checked as text
  (``_processes.check_relative_path``) and then on the disk: no component may be a
  symlink or a non-directory (``BadArgument``), and a new name goes only into a
  directory the caller may write as a local disk would decide it (owner, group, other
  bits; the caller's groups as its process had them when it connected), else
  ``PermissionDenied``.
* **Import processes** (``_processes.py``): the files of a process are claimed
  (``ImportHandOff.claimed``), so neither the fileset collector nor a lone hand-off
  takes them; ``verifyUpload`` checks every file is complete and its SHA-256 is the
  client's (declaring it first when it was not declared at create, and waiting,
  bounded, for that verification), then submits them as one import job
  (``ImportHandOff.submit_explicit``), recorded on the process in the same
  transaction.
* **Never blocking the loop.** Creating a process's files (up to 4,096 opens and
  chowns), listing owners, hashing, big writes and syncs run in worker threads; a
  single file's create is a few metadata syscalls, inline as in ``_nodes.py``.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import stat
import time
import uuid
from collections import OrderedDict
from typing import Any

import pyfuse3
import trio
from pyfuse3 import FUSEError

from ..rpc import RpcError, current_peer
from ._checkpoints import drain
from ._declarations import declare
from ._names import trackable
from ._processes import (MAX_FILES_PER_CALL, Process, ProcessFile, bad, check_files,
                         check_relative_path, check_sha256, check_size, create_key,
                         load_processes)
from ._task import State, Task

__all__ = ["UploadService", "IDLE_SECONDS", "REORDER_SECONDS", "FRAMING_HEADROOM"]

log = logging.getLogger(__name__)

IDLE_SECONDS = 5.0           # an RPC writer nobody wrote to for this long is closed
REORDER_SECONDS = 0.5        # how long a write for a later offset waits for the earlier
FRAMING_HEADROOM = 64 * 1024  # msgpack framing around a write's bytes
VERIFY_WAIT_SECONDS = 30.0   # verifyUpload waits this long (plus 1 s per 100 MB) per file
PROCESS_HISTORY = 10_000     # finished import processes kept (getHandle, getProcess)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def _error(name: str, message: str) -> RpcError:
    return RpcError(name, message)


def _caller() -> int | None:
    """The caller's uid; None for a TCP client (the token holder: root's rights)."""
    try:
        return current_peer().uid
    except LookupError:
        return None


def _caller_groups() -> frozenset[int]:
    """The caller's gid and supplementary groups (empty for a TCP client)."""
    try:
        return current_peer().groups
    except LookupError:
        return frozenset()


def _privileged(uid: int | None) -> bool:
    return uid is None or uid == 0


def _primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return -1  # no such user in the passwd database: the group stays the agent's


class RpcWriter:
    """One file being written over RPC: an open descriptor counted as a writer."""

    __slots__ = ("task", "fd", "busy", "lot", "last_used", "peer", "closing")

    def __init__(self, task: Task, fd: int):
        self.task = task
        self.fd = fd
        self.busy = False             # a write is being applied
        self.lot = trio.lowlevel.ParkingLot()
        self.last_used = time.monotonic()
        self.peer = None              # the connection that wrote last
        self.closing = False


class UploadService:
    """The RPC face of ``UploadsComponent`` (see the design notes)."""

    def __init__(self, uploads):
        self.u = uploads                      # the UploadsComponent
        self.paths = uploads.paths
        self.max_write = max(1, uploads.config.rpc_max_message_bytes - FRAMING_HEADROOM)
        self.writers: dict[str, RpcWriter] = {}   # task ID -> its RPC writer
        self.processes: dict[str, Process] = {}
        self._unfinished_by_key: dict[str, str] = {}   # create_key -> pid (no job yet)
        self._claimed: dict[bytes, str] = {}           # rel -> pid of an unfinished process
        self._finished: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._watched_peers: set[int] = set()
        self._locks: dict[str, trio.Lock] = {}         # pid -> its lock (create/verify)
        self._opening: dict[str, trio.Event] = {}      # task ID -> its writer being opened
        self.nursery: trio.Nursery | None = None
        uploads.handoff.claimed = lambda t: t.rel in self._claimed

    # -- start-up and background ------------------------------------------------------------

    async def load(self) -> None:
        """Load the processes (before the hand-off's retrier looks at complete uploads:
        a process's files must be claimed by then)."""
        loaded = await self.u.agent.db.run(load_processes)
        for p in sorted(loaded, key=lambda p: p.created):
            self._add_process(p)
            if p.job is not None:
                self._remember_finished(p)

    def _add_process(self, p: Process) -> None:
        self.processes[p.pid] = p
        if p.job is None:
            self._unfinished_by_key[p.key] = p.pid
            for i in range(len(p.files)):
                self._claimed[p.rel(i)] = p.pid

    def _finish_process(self, p: Process) -> None:
        if self._unfinished_by_key.get(p.key) == p.pid:
            del self._unfinished_by_key[p.key]
        for i in range(len(p.files)):
            if self._claimed.get(p.rel(i)) == p.pid:
                del self._claimed[p.rel(i)]
        self._remember_finished(p)

    def _remember_finished(self, p: Process) -> None:
        """Keep the ``PROCESS_HISTORY`` most recently finished processes (their job
        stays in the job engine; only ``getHandle`` by process ID ends)."""
        self._finished[p.pid] = None
        while len(self._finished) > PROCESS_HISTORY:
            old, _ = self._finished.popitem(last=False)
            self.processes.pop(old, None)
            self._locks.pop(old, None)
            Process.stage_delete(self.u.agent.db, old)

    async def run(self, nursery: trio.Nursery) -> None:
        """Close RPC writers nobody wrote to for ``IDLE_SECONDS``."""
        self.nursery = nursery
        while True:
            await trio.sleep(1.0)
            now = time.monotonic()
            for w in list(self.writers.values()):
                if not w.busy and now - w.last_used >= IDLE_SECONDS:
                    await self._close_quietly(w)

    async def _close_quietly(self, w: RpcWriter) -> None:
        """Close a writer no request waits for: a failure is logged, never raised into
        the component's nursery (it would stop the agent)."""
        try:
            await self._close_writer(w)
        except Exception:
            log.exception("closing the RPC writer of %s failed", w.task.path)

    # -- the kernel's caches ---------------------------------------------------------------

    def _node(self, rel: bytes):
        """The node of ``rel`` the kernel holds, or None."""
        node = self.u.root
        if rel:
            for part in rel.split(b"/"):
                cache = getattr(node, "_cache", None)
                node = None if cache is None else cache.get(part)
                if node is None:
                    return None
        return node

    async def _invalidate_names(self, rels: list[bytes]) -> None:
        """Names created or removed behind the kernel's back: drop its entries (negative
        ones too) and the directories' attributes (see the design notes)."""
        calls = []
        for rel in rels:
            parent_rel, _, name = rel.rpartition(b"/")
            parent = self._node(parent_rel)
            if parent is None or parent.inode is None:
                continue
            calls.append((parent.inode, name))
        if calls:
            await self.u.agent.to_thread(_invalidate_entries, calls)

    async def _invalidate_attributes(self, t: Task) -> None:
        node = self._node(t.rel)
        if node is not None and node.inode is not None:
            await self.u.agent.to_thread(_invalidate_inode, node.inode)

    # -- owners and paths ------------------------------------------------------------------

    def _owner_of(self, t: Task) -> int:
        try:
            return self.paths.lstat(t.rel).st_uid
        except OSError:
            return os.getuid()

    def _check_owner(self, owner: int, what: str, verb: str) -> None:
        uid = _caller()
        if not _privileged(uid) and uid != owner:
            raise _error("PermissionDenied", f"{what} belongs to uid {owner}; only its owner "
                         f"and root may {verb} it")

    def _task_by_id(self, task_id: Any) -> Task:
        if isinstance(task_id, bytes):
            task_id = task_id.decode("utf-8", "replace")
        t = self.u.tasks.get_id(task_id) if isinstance(task_id, str) else None
        if t is None or not t.tracked or t.ended:
            raise _error("NoSuchTask", f"no upload task {task_id!r}")
        return t

    def record(self, t: Task, owner: int | None = None) -> dict[str, Any]:
        return {**t.summary(), "owner": self._owner_of(t) if owner is None else owner}

    async def _register_created(self, rel: bytes, fd: int) -> Task:
        """A file we just created: the component hears it opened for writing, as from
        the mount's ``create``."""
        try:
            return await self.u.opened(rel, writable=True, truncated=True)
        except BaseException:
            os.close(fd)
            raise

    def _room(self, own: list[Task]) -> int:
        room = self.u.space.room_for(None)
        for t in own:  # as SpaceAccounting.reserved_by_others counted them
            if (t in self.u.space.declared and t.declared_size is not None and not t.ended
                    and t.state not in (State.COMPLETE, State.FAILED)):
                room += max(0, t.declared_size - t.present)
        return room

    async def _check_space(self, need: int, own: list[Task] = ()) -> None:
        """``NoSpace`` unless ``need`` more bytes fit (the check of a declared size),
        after evicting verified copies if the store is short (s3 backend);
        ``own``: existing tasks being declared again, whose reservations are theirs."""
        if need <= 0:
            return
        room = self._room(own)
        if need > room:
            await self.u.space.evict_for(need - room)
            room = self._room(own)
        if need > room:
            raise _error("NoSpace", f"needs {need} bytes, {max(0, room)} free")

    async def _declare(self, t: Task, size: int | None, hashes: dict[str, str]) -> None:
        """Declare ``size`` and ``hashes`` on ``t`` as ``setfattr user.fsagent.*`` would
        (only what changes: an equal declaration re-checks nothing)."""
        changed = False
        try:
            if size is not None and t.declared_size != size:
                declare(t, b"size", str(size).encode(), self.u.space, self.u.writes.new_hasher)
                changed = True
            for algorithm, value in hashes.items():
                if t.client.get(algorithm) != value:
                    declare(t, algorithm.encode(), value.encode(), self.u.space,
                            self.u.writes.new_hasher)
                    changed = True
        except FUSEError as e:
            if e.errno == errno.ENOSPC:
                room = self.u.space.room_for(t)
                raise _error("NoSpace", f"needs {size - t.present} bytes, "
                             f"{max(0, room)} free") from None
            raise bad(f"cannot declare that on {t.path}: {os.strerror(e.errno)}") from None
        if changed:
            self.u.tasks.save(t)
            await self.u.completion.declared(t)

    # -- writers ---------------------------------------------------------------------------

    async def _writer_for(self, t: Task) -> RpcWriter:
        """The task's RPC writer, opened (once, whatever runs meanwhile) if it has none."""
        while True:
            w = self.writers.get(t.task_id)
            if w is None:
                break
            if not w.closing:
                return w
            await w.lot.park()  # being closed: then opened anew
        opening = self._opening.get(t.task_id)
        if opening is not None:
            await opening.wait()  # another request is opening it: use that one
            return await self._writer_for(t)
        opening = self._opening[t.task_id] = trio.Event()
        try:
            try:
                fd = self.paths.open(t.rel, _WRITE_FLAGS)
            except OSError as e:
                raise _error("IOError", f"cannot open {t.path}: {e.strerror}") from None
            try:
                await self.u.opened(t.rel, writable=True, truncated=False)
            except BaseException:
                os.close(fd)
                raise
            return self._adopt(t, fd)
        finally:
            del self._opening[t.task_id]
            opening.set()

    def _adopt(self, t: Task, fd: int) -> RpcWriter:
        w = self.writers[t.task_id] = RpcWriter(t, fd)
        return w

    def _watch_peer(self, w: RpcWriter) -> None:
        try:
            peer = current_peer()
        except LookupError:
            return
        w.peer = peer
        if peer.id not in self._watched_peers:
            self._watched_peers.add(peer.id)
            peer.on_close(self._peer_closed)

    def _peer_closed(self, peer) -> None:
        self._watched_peers.discard(peer.id)
        for w in list(self.writers.values()):
            if w.peer is peer and self.nursery is not None:
                self.nursery.start_soon(self._close_quietly, w)

    async def _close_writer(self, w: RpcWriter) -> None:
        """Close as a client's ``close(2)`` would: released, descriptor closed, closed."""
        if w.closing or self.writers.get(w.task.task_id) is not w:
            return
        w.closing = True
        try:
            while w.busy:
                await w.lot.park()
            t = w.task
            try:
                await self.u.released(t, w.fd)
            finally:
                os.close(w.fd)
                del self.writers[t.task_id]
                w.lot.unpark_all()
            await self.u.closed(t)
        finally:
            w.lot.unpark_all()
        if not w.task.ended:
            await self._invalidate_attributes(w.task)

    async def _close_task_writer(self, t: Task) -> None:
        w = self.writers.get(t.task_id)
        if w is not None:
            await self._close_writer(w)

    async def _write(self, t: Task, offset: Any, data: Any) -> int:
        """One chunk at ``offset`` (see "Offsets"); returns the new offset."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise bad(f"offset must be a non-negative integer, not {offset!r}")
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray)):
            raise bad(f"bytes must be binary data, not {type(data).__name__}")
        if len(data) > self.max_write:
            raise _error("TooLarge", f"{len(data)} bytes in one write; at most "
                         f"{self.max_write} (maxWriteBytes)")
        if not data:
            # Nothing to write: no writer is opened (that would take a complete file
            # out of ``complete``), the offset is only checked.
            await drain(t)
            if offset != t.present:
                raise _error("BadOffset", f"{t.path}: write at {offset}, but the current "
                             f"offset is {t.present}")
            return t.present
        if t.declared_size is not None and offset + len(data) > t.declared_size:
            raise _error("TooLarge", f"{t.path}: writing {len(data)} bytes at {offset} "
                         f"passes its declared size {t.declared_size}")
        while True:
            w = await self._writer_for(t)
            await self._wait_turn(w, offset)
            if not w.closing and self.writers.get(t.task_id) is w:
                break  # else closed meanwhile (verifyUpload, its connection): open anew
        w.busy = True
        try:
            if t.ended:
                raise _error("NoSuchTask", f"{t.path} was removed")
            try:
                await self.u.writes.write(t, w.fd, offset,
                                          data if isinstance(data, bytes) else bytes(data))
                # Applied before the reply (the queue stays the write path's): a stat
                # through the mount now sees the size this reply announces.
                await self.u.writes.settle(t, w.fd)
            except FUSEError as e:
                if e.errno == errno.ENOSPC:
                    room = self.u.space.room_for(t)
                    raise _error("NoSpace", f"needs {offset + len(data) - t.present} bytes, "
                                 f"{max(0, room)} free") from None
                raise _error("IOError", f"{t.path}: {os.strerror(e.errno)}") from None
        finally:
            w.busy = False
            w.last_used = time.monotonic()
            w.lot.unpark_all()
        self._watch_peer(w)
        new = t.present
        if t.declared_size is not None and new >= t.declared_size:
            await self._close_writer(w)  # complete in size: completion takes it from here
        else:
            await self._invalidate_attributes(t)
        return new

    async def _wait_turn(self, w: RpcWriter, offset: int) -> None:
        """Until ``offset`` is the file's current size and no write is being applied;
        ``BadOffset`` (naming the current offset) when it will not be."""
        deadline = trio.current_time() + REORDER_SECONDS
        while True:
            t = w.task
            if not w.busy:
                await drain(t)
                if w.busy:
                    continue
                if offset == t.present:
                    return
                if offset < t.present or trio.current_time() >= deadline:
                    raise _error("BadOffset", f"{t.path}: write at {offset}, but the "
                                 f"current offset is {t.present}")
            with trio.move_on_at(deadline if not w.busy else float("inf")):
                await w.lot.park()

    async def _durable_offset(self, t: Task) -> int:
        w = self.writers.get(t.task_id)
        while w is not None and w.busy:
            await w.lot.park()
        await drain(t)
        if t.state is State.COMPLETE:
            return t.present
        await self.u.checkpoints.sync([t])
        return t.durable

    # -- UploadTasks -----------------------------------------------------------------------

    async def tasks_list(self) -> list[dict]:
        shown = self.u.listed_tasks()
        owners = await self.u.agent.to_thread(_owners, self.paths, [t.rel for t in shown])
        return [self.record(t, owner) for t, owner in zip(shown, owners)]

    async def tasks_create(self, spec: Any) -> dict:
        if not isinstance(spec, dict):
            raise bad("create takes a map {path, fileSize?, md5?, sha1?, sha256?}")
        spec = {(k.decode() if isinstance(k, bytes) else k): v for k, v in spec.items()}
        unknown = set(spec) - {"path", "fileSize", "md5", "sha1", "sha256"}
        if unknown:
            raise bad(f"unknown key(s) {sorted(map(str, unknown))}")
        path = check_relative_path(spec.get("path"))
        rel = os.fsencode(path)
        if not trackable(rel):
            raise bad(f"{path!r} is a temporary name (rsync's), not an upload")
        size = spec.get("fileSize")
        if size is not None:
            size = check_size(size, "fileSize")
        hashes = {}
        for algorithm, length in (("md5", 32), ("sha1", 40), ("sha256", 64)):
            value = spec.get(algorithm)
            if value is None:
                continue
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            value = value.strip().lower() if isinstance(value, str) else value
            if (not isinstance(value, str) or len(value) != length
                    or any(c not in "0123456789abcdef" for c in value)):
                raise bad(f"{algorithm} must be {length} hex digits, not {spec[algorithm]!r}")
            hashes[algorithm] = value
        uid = _caller()
        st = _check_file(self.paths, rel, uid, _caller_groups())
        if st is not None and not _privileged(uid) and st.st_uid != uid:
            raise _error("PermissionDenied", f"uploads/{path} belongs to uid {st.st_uid}; "
                         "only its owner and root may write it")
        existing = self.u.tasks.get(rel) if st is not None else None
        own = [existing] if existing is not None and not existing.ended else []
        if size is not None:
            await self._check_space(size - (own[0].present if own else 0), own)
        fd, created = _make_file(self.paths, rel, uid, _caller_groups())
        if fd is not None:
            t = await self._register_created(rel, fd)
            self._adopt(t, fd)
            self._watch_peer(self.writers[t.task_id])
            await self._invalidate_names(created)
        else:
            t = self.u._task(rel)
        await self._declare(t, size, hashes)
        if fd is not None and size == 0:
            await self._close_task_writer(t)  # nothing to send: complete when closed
        return {"newResourceID": t.task_id,
                "newResourceLocation": f"{self.u.config.mount}/uploads/{path}",
                "postResultType": "CreateChild", "succeed": True}

    async def tasks_get(self, task_id: Any) -> dict:
        return self.record(self._task_by_id(task_id))

    async def tasks_delete(self, task_id: Any) -> dict:
        t = self._task_by_id(task_id)
        self._check_owner(self._owner_of(t), f"upload task {t.task_id}", "delete")
        await self._close_task_writer(t)
        rel = t.rel
        parent_rel, _, name = rel.rpartition(b"/")
        try:
            with self.paths.at(rel) as path:
                os.unlink(path)
        except FileNotFoundError:
            pass  # removed meanwhile (through the mount): the task ends all the same
        except OSError as e:
            raise _error("IOError", f"cannot remove {t.path}: {e.strerror}") from None
        parent = self._node(parent_rel)
        node = parent._cache.pop(name, None) if parent is not None else None
        if node is not None:
            node.detached = True
        await self.u.unlinked(rel)
        await self._invalidate_names([rel])
        return {"succeed": True}

    async def tasks_offset(self, task_id: Any) -> int:
        return await self._durable_offset(self._task_by_id(task_id))

    async def tasks_write(self, task_id: Any, offset: Any, data: Any) -> int:
        t = self._task_by_id(task_id)
        self._check_owner(self._owner_of(t), f"upload task {t.task_id}", "write")
        return await self._write(t, offset, data)

    # -- ImportProcess ---------------------------------------------------------------------

    def _process(self, pid: Any) -> Process:
        if isinstance(pid, bytes):
            pid = pid.decode("utf-8", "replace")
        p = self.processes.get(pid) if isinstance(pid, str) else None
        if p is None:
            raise _error("NoSuchProcess", f"no import process {pid!r}")
        return p

    def _lock(self, pid: str) -> trio.Lock:
        lock = self._locks.get(pid)
        if lock is None:
            lock = self._locks[pid] = trio.Lock()
        return lock

    def _file_index(self, p: Process, i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(p.files):
            raise bad(f"process {p.pid} has files 0 to {len(p.files) - 1}, not {i!r}")
        return i

    def _process_task(self, p: Process, i: int) -> Task:
        t = self.u.tasks.get(p.rel(i))
        if t is None or t.ended or not t.tracked:
            raise _error("NoSuchTask", f"uploads/{os.fsdecode(p.rel(i))} is gone; create the "
                         "process again to make it anew")
        return t

    async def process_create(self, spec: Any) -> str:
        if not isinstance(spec, dict):
            raise bad("create takes a map {root, files: [{path, size, sha256?}, ...]}")
        spec = {(k.decode() if isinstance(k, bytes) else k): v for k, v in spec.items()}
        unknown = set(spec) - {"root", "files"}
        if unknown:
            raise bad(f"unknown key(s) {sorted(map(str, unknown))}")
        root = check_relative_path(spec.get("root", ""), "root", empty_ok=True)
        files = check_files(spec.get("files"))
        uid = _caller()
        owner = os.getuid() if uid is None else uid
        key = create_key(owner, root, files)
        pid = self._unfinished_by_key.get(key)
        if pid is not None:
            # The same create again (a client resuming): the same process, its files
            # made again if they went, their declarations applied again.
            p = self.processes[pid]
            async with self._lock(pid):
                await self._ensure_files(p, list(enumerate(p.files)), uid)
                await self.u.agent.db.flush()
            return pid
        p = Process(pid=uuid.uuid4().hex, owner=owner, root=root, key=key, files=[])
        async with self._lock(p.pid):
            await self._ensure_files(p, list(enumerate(files)), uid)
            p.files = files
            self._add_process(p)
            p.stage(self.u.agent.db)
            await self.u.agent.db.flush()  # durable before the client hears the ID
        return p.pid

    async def process_add_files(self, pid: Any, files: Any) -> None:
        p = self._process(pid)
        self._check_owner(p.owner, f"import process {p.pid}", "add files to")
        async with self._lock(p.pid):
            if p.job is not None:
                raise _error("AlreadyVerified", f"import process {p.pid} was submitted as "
                             f"job {p.job}; start a new process for more files")
            first = len(p.files)
            new = check_files(files, already=first)
            await self._ensure_files(p, list(enumerate(new, start=first)), _caller(),
                                     taken={p.rel(i) for i in range(first)})
            p.files = p.files + new
            self._add_process(p)
            p.stage(self.u.agent.db, first)
            await self.u.agent.db.flush()

    async def _ensure_files(self, p: Process, files: list[tuple[int, ProcessFile]],
                            uid: int | None, *, taken: set[bytes] = frozenset()) -> None:
        """Make (or find again) ``files`` of ``p`` (index, file), claim them and declare
        their sizes and hashes. Everything is checked first, space included: a refusal
        changes nothing."""
        rels = [os.fsencode(f"{p.root}/{f.path}" if p.root else f.path) for _, f in files]
        seen = set(taken)
        need = 0
        for rel in rels:
            if rel in seen:
                raise bad(f"uploads/{os.fsdecode(rel)} is named twice")
            seen.add(rel)
            if not trackable(rel):
                raise bad(f"{os.fsdecode(rel)!r} is a temporary name (rsync's), not an upload")
            other = self._claimed.get(rel)
            if other is not None and other != p.pid:
                raise _error("Busy", f"uploads/{os.fsdecode(rel)} belongs to import process "
                             f"{other}, which is not finished")
        found = await self.u.agent.to_thread(_check_files, self.paths, rels, uid,
                                                   _caller_groups())
        own = []
        for rel, (_, f), st in zip(rels, files, found):
            if st is not None and not _privileged(uid) and st.st_uid != uid:
                raise _error("PermissionDenied", f"uploads/{os.fsdecode(rel)} belongs to uid "
                             f"{st.st_uid}; only its owner and root may write it")
            t = self.u.tasks.get(rel)
            if t is not None and not t.ended and st is not None:
                own.append(t)
                need += max(0, f.size - t.present)
            else:
                need += f.size
        await self._check_space(need, own)
        made = await self.u.agent.to_thread(_make_files, self.paths, rels, uid,
                                                  _caller_groups())
        created_names: list[bytes] = []
        try:
            for n, (rel, (_, f)) in enumerate(zip(rels, files)):
                fd, created, problem = made[n]
                made[n] = (None, created, problem)
                if problem is not None:
                    raise problem
                created_names.extend(created)
                if fd is not None:
                    # Created: opened and closed as `touch` would, declared below.
                    t = await self._register_created(rel, fd)
                    await self.u.released(t, fd)
                    os.close(fd)
                    await self.u.closed(t)
                else:
                    t = self.u._task(rel)
                self._claimed[rel] = p.pid
                self.u.handoff.unclaim(t)
                await self._declare(t, f.size, {"sha256": f.sha256} if f.sha256 else {})
        finally:
            for fd, _, _ in made:
                if fd is not None:
                    os.close(fd)  # not reached (a refusal above): never left open
            await self._invalidate_names(created_names)

    async def process_offset(self, pid: Any, i: Any) -> int:
        p = self._process(pid)
        i = self._file_index(p, i)
        return await self._durable_offset(self._process_task(p, i))

    async def process_write(self, pid: Any, i: Any, offset: Any, data: Any) -> int:
        p = self._process(pid)
        i = self._file_index(p, i)
        self._check_owner(p.owner, f"import process {p.pid}", "write")
        t = self._process_task(p, i)
        if p.job is not None:
            raise _error("AlreadyVerified", f"import process {p.pid} was submitted as job "
                         f"{p.job}")
        return await self._write(t, offset, data)

    async def process_verify(self, pid: Any, hashes: Any) -> str:
        p = self._process(pid)
        self._check_owner(p.owner, f"import process {p.pid}", "verify")
        if isinstance(hashes, bytes) and len(hashes) == 32 * len(p.files):
            # The extension for processes of more than 4,096 files (a msgpack array in a
            # request holds at most that many): the 32-byte digests, concatenated.
            hashes = [hashes[i:i + 32].hex() for i in range(0, len(hashes), 32)]
        elif not isinstance(hashes, list) or len(hashes) != len(p.files):
            raise bad(f"hashes must be a list of {len(p.files)} hex SHA-256 strings, one per "
                      f"file in order (or one bin of {len(p.files)} 32-byte digests)")
        hashes = [check_sha256(h, f"hashes[{n}]") for n, h in enumerate(hashes)]
        async with self._lock(p.pid):
            if p.job is not None:
                return p.job
            return await self._verify(p, hashes)

    async def _verify(self, p: Process, hashes: list[str]) -> str:
        problems: list[str] = []
        members: list[Task] = []
        for i, expected in enumerate(hashes):
            rel = p.rel(i)
            path = os.fsdecode(rel)
            t = self.u.tasks.get(rel)
            if t is None or t.ended or not t.tracked:
                problems.append(f"{path}: missing")
                continue
            await self._close_task_writer(t)
            size = p.files[i].size
            if t.present != size:
                problems.append(f"{path}: {t.present} of {size} bytes received")
                continue
            if (p.files[i].sha256 is None and t.client.get("sha256") != expected
                    and not (t.shown is State.COMPLETE
                             and t.computed.get("sha256") == expected)):
                # Not declared at create: the hash given now is what completion checks
                # (replacing one an earlier verifyUpload gave, so a client that sent a
                # wrong hash can send the right one).
                await self._declare(t, None, {"sha256": expected})
            members.append(t)
        if problems:
            raise _error("VerificationFailed", _listing(problems))
        for t, expected in zip(members, hashes):
            problem = await self._settled(t, expected)
            if problem is not None:
                problems.append(problem)
        if problems:
            raise _error("VerificationFailed", _listing(problems))
        earlier = {t.job for t in members}
        if len(earlier) == 1 and None not in earlier:
            # These very bytes were imported already (one version, one import): that
            # import is this set's.
            p.job = earlier.pop()
            p.stage_job(self.u.agent.db)
            await self.u.agent.db.flush()
            self._finish_process(p)
            return p.job
        for t in members:
            if t.job is not None:
                problems.append(f"{t.path}: already imported by job {t.job}")
        if problems:
            raise _error("VerificationFailed", _listing(problems))

        def recorded(job: str) -> None:
            p.job = job
            p.stage_job(self.u.agent.db)

        try:
            job = await self.u.handoff.submit_explicit(members, p.root_rel, p.pid, recorded)
        except Exception as e:
            if p.job is not None:  # recorded, then taken back with the members' record
                p.job = None
                p.stage_job(self.u.agent.db)
            raise _error("ImportNotStarted", f"{type(e).__name__}: {e}") from None
        await self.u.agent.db.flush()
        self._finish_process(p)
        return job

    async def _settled(self, t: Task, expected: str) -> str | None:
        """Wait (bounded) until ``t`` is complete or failed; None if it is complete with
        SHA-256 ``expected``, else what is wrong."""
        deadline = trio.current_time() + VERIFY_WAIT_SECONDS + t.present / 100e6
        while True:
            if t.ended:
                return f"{t.path}: removed"
            if t.shown is State.COMPLETE:
                actual = t.computed.get("sha256")
                if actual == expected:
                    return None
                return f"{t.path}: expected {expected}, got {actual}"
            if t.state is State.FAILED:
                actual = t.computed.get("sha256")
                if actual and actual != expected:
                    return f"{t.path}: expected {expected}, got {actual}"
                return f"{t.path}: {t.error or 'failed'}"
            if trio.current_time() >= deadline:
                return f"{t.path}: still {t.shown.value}; call verifyUpload again"
            await trio.sleep(0.02)

    async def process_handle(self, pid: Any) -> str:
        p = self._process(pid)
        if p.job is None:
            raise _error("NotVerified", f"import process {p.pid} has no import job yet: "
                         "call verifyUpload")
        return p.job

    async def process_get(self, pid: Any) -> dict:
        p = self._process(pid)
        files = []
        for i, f in enumerate(p.files):
            t = self.u.tasks.get(p.rel(i))
            if t is None or t.ended or not t.tracked:
                files.append({"taskID": None, "path": os.fsdecode(p.rel(i)), "state": "missing",
                              "offset": 0, "size": f.size, "progress": None, "sha256": None,
                              "job": None, "error": None, "updated": None, "owner": p.owner})
            else:
                files.append(self.record(t))
        return {"pid": p.pid, "root": p.root, "owner": p.owner, "files": files, "job": p.job}

    async def process_settings(self) -> dict:
        c = self.u.config
        return {"algorithms": ["sha256", "sha1", "md5"], "clientHash": "sha256",
                "maxWriteBytes": self.max_write, "maxFilesPerCall": MAX_FILES_PER_CALL,
                "importGrouping": c.import_grouping,
                "filesetQuietSeconds": c.fileset_quiet_seconds,
                "filesetMaxFiles": c.fileset_max_files, "filesetMaxBytes": c.fileset_max_bytes,
                "storeReserveBytes": c.store_reserve_bytes}

    def methods(self) -> dict[str, Any]:
        return {
            "UploadTasks.list": self.tasks_list,
            "UploadTasks.create": self.tasks_create,
            "UploadTasks.get": self.tasks_get,
            "UploadTasks.delete": self.tasks_delete,
            "UploadTasks.getUploadOffset": self.tasks_offset,
            "UploadTasks.write": self.tasks_write,
            "ImportProcess.create": self.process_create,
            "ImportProcess.addFiles": self.process_add_files,
            "ImportProcess.getUploadOffset": self.process_offset,
            "ImportProcess.write": self.process_write,
            "ImportProcess.verifyUpload": self.process_verify,
            "ImportProcess.getHandle": self.process_handle,
            "ImportProcess.getProcess": self.process_get,
            "ImportProcess.getImportSettings": self.process_settings,
        }


def _listing(problems: list[str], limit: int = 50) -> str:
    shown = "; ".join(problems[:limit])
    if len(problems) > limit:
        shown += f"; and {len(problems) - limit} more"
    return shown


# -- worker-thread helpers -------------------------------------------------------------------

def _invalidate_entries(calls: list[tuple[int, bytes]]) -> None:
    for parent_inode, name in calls:
        try:
            pyfuse3.invalidate_entry(parent_inode, name)
        except OSError:
            pass  # the kernel has no such entry (ENOENT) or no inode: nothing cached
    for parent_inode in {p for p, _ in calls}:
        _invalidate_inode(parent_inode)


def _invalidate_inode(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(inode, attr_only=True)
    except OSError:
        pass  # the kernel no longer holds the inode: nothing cached to drop


def _owners(paths, rels: list[bytes]) -> list[int | None]:
    out = []
    for rel in rels:
        try:
            out.append(paths.lstat(rel).st_uid)
        except OSError:
            out.append(None)
    return out


def _walk(paths, rel: bytes, uid: int | None, groups: frozenset[int], *, create: bool):
    """Check ``rel`` as the API wants it on the disk (no symlink or non-directory on the
    way, a new name only where ``uid`` may add one) and, with ``create``, make it (and its
    missing parents) a regular file owned by ``uid`` when the agent is root. Returns
    (a write descriptor of the new file or None, the names created, the lstat of a
    regular file that was already there or None). Raises ``RpcError``."""
    chown = create and os.geteuid() == 0 and uid is not None and uid != os.geteuid()
    gid = _primary_gid(uid) if chown else -1
    parts = rel.split(b"/")
    created: list[bytes] = []
    current = b""
    deepest: tuple[int, int] | None = None   # (uid, mode) of the deepest directory
    missing = False                           # a parent is not there (yet)
    for part in parts[:-1]:
        current = current + b"/" + part if current else part
        st = None
        if not missing:
            try:
                st = paths.lstat(current)
            except FileNotFoundError:
                pass  # a directory still to make (``st`` stays None)
            except OSError as e:
                raise bad(f"uploads/{os.fsdecode(current)}: {e.strerror}") from None
        if st is None:
            if not missing:
                _may_create_in(deepest, uid, groups, current)
            missing = not create
            if create:
                try:
                    with paths.at(current) as path:
                        os.mkdir(path, 0o755)
                        if chown:
                            os.chown(path, uid, gid, follow_symlinks=False)
                    created.append(current)
                except FileExistsError:
                    # made meanwhile: again
                    return _walk(paths, rel, uid, groups, create=create)
                except OSError as e:
                    raise _error("IOError", f"cannot make uploads/{os.fsdecode(current)}: "
                                 f"{e.strerror}") from None
            deepest = (os.getuid() if uid is None else uid, gid, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise bad(f"uploads/{os.fsdecode(current)} is a symlink; paths never go "
                      "through one")
        if not stat.S_ISDIR(st.st_mode):
            raise bad(f"uploads/{os.fsdecode(current)} is not a directory")
        deepest = (st.st_uid, st.st_gid, st.st_mode)
    st = None
    if not missing:
        try:
            st = paths.lstat(rel)
        except FileNotFoundError:
            pass  # a new file (``st`` stays None)
        except OSError as e:
            raise bad(f"uploads/{os.fsdecode(rel)}: {e.strerror}") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise bad(f"uploads/{os.fsdecode(rel)} is a symlink; paths never go through one")
        if not stat.S_ISREG(st.st_mode):
            raise bad(f"uploads/{os.fsdecode(rel)} is not a regular file")
        return None, created, st
    if not missing:
        _may_create_in(deepest, uid, groups, rel)
    if not create:
        return None, created, None
    try:
        fd = paths.open(rel, _CREATE_FLAGS, 0o644)
    except FileExistsError:
        return _walk(paths, rel, uid, groups, create=create)
    except OSError as e:
        raise _error("IOError", f"cannot create uploads/{os.fsdecode(rel)}: "
                     f"{e.strerror}") from None
    try:
        if chown:
            os.fchown(fd, uid, gid)
    except OSError as e:
        os.close(fd)
        raise _error("IOError", f"cannot give uploads/{os.fsdecode(rel)} to uid {uid}: "
                     f"{e.strerror}") from None
    return fd, created + [rel], None


def _check_file(paths, rel: bytes, uid: int | None,
                groups: frozenset[int]) -> os.stat_result | None:
    """The lstat of the regular file at ``rel``, None if it would be created; raises
    ``RpcError`` if the API refuses it (``_walk``)."""
    return _walk(paths, rel, uid, groups, create=False)[2]


def _check_files(paths, rels: list[bytes], uid: int | None,
                 groups: frozenset[int]) -> list:
    return [_check_file(paths, rel, uid, groups) for rel in rels]


def _make_file(paths, rel: bytes, uid: int | None,
               groups: frozenset[int]) -> tuple[int | None, list[bytes]]:
    fd, created, _ = _walk(paths, rel, uid, groups, create=True)
    return fd, created


def _may_create_in(directory: tuple[int, int, int] | None, uid: int | None,
                   groups: frozenset[int], rel: bytes) -> None:
    """``PermissionDenied`` unless ``uid`` may add a name to ``directory`` ((owner, group,
    mode); None: the top of ``uploads/``, shared like /tmp), by the write bit a local
    disk would use: the owner's, else the group's when the directory's group is one of
    the caller's (``groups``), else the others'."""
    if directory is None or _privileged(uid):
        return
    owner, group, mode = directory
    bit = 0o200 if owner == uid else 0o020 if group in groups else 0o002
    if mode & bit:
        return
    raise _error("PermissionDenied", f"cannot create uploads/{os.fsdecode(rel)}: its "
                 f"directory (uid {owner}, gid {group}, mode {stat.S_IMODE(mode):o}) is not "
                 f"writable by uid {uid}")


def _make_files(paths, rels: list[bytes], uid: int | None,
                groups: frozenset[int]) -> list[tuple]:
    """``_make_file`` for each (worker thread): (fd or None, created names, RpcError or
    None); after the first refusal nothing more is made."""
    out = []
    for rel in rels:
        try:
            fd, created = _make_file(paths, rel, uid, groups)
        except RpcError as e:
            out.append((None, [], e))
            break
        out.append((fd, created, None))
    return out
