"""``UploadsComponent``: every regular file under ``uploads/`` is an upload task.

Design notes
------------
* **A forward pipeline.** Data and events flow one way: the nodes (``_nodes.py``, the
  syscalls on the backing tree) report to this component, which keeps the tasks
  (``_task.py``: the record and its one transition table; ``_store.py``: their rows)
  and passes each event on to the stage that owns it; a stage never calls back up
  into the nodes:

  ========================  ==========================================================
  ``_writes.py``            the write path: space check, hash claim, inline or queued
  ``_space.py``             space accounting: free space, reserve, declared sizes, queue
  ``_checkpoints.py``       durability: data synced first, durable offset recorded second
  ``_recovery.py``          crash recovery: rows and files made one story at start-up
  ``_declarations.py``      ``user.fsagent.*``: what a client declares, what it reads
  ``_completion.py``        completion rules, verification, rechecks, manifests
  ``_handoff.py``           the one route into the job engine (submit, cancel, state)
  ``_service.py``           the same pipeline over msgpack-RPC (``UploadTasks``,
                            ``ImportProcess``; ``_processes.py``: their records)
  ========================  ==========================================================

* **What ``complete`` promises**: the recorded SHA-256 is the file's bytes' SHA-256,
  now and after any crash. Every change of the bytes leaves ``complete`` first, and
  durably when it can be seen before the change (``opened``, ``changing``); renames
  and metadata changes keep the recorded fingerprint current (``_recovery.py``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from typing import Any

import trio
from pyfuse3 import FUSEError

from ..component import Component, Host
from ..fs import DynamicFile, Node
from ..longpaths import BackingTree
from ._checkpoints import Checkpointer, drain
from ._completion import Completion
from ._declarations import FSAGENT_XATTR, declare, task_xattrs, undeclare
from ._handoff import ImportHandOff
from ._names import Names, trackable
from ._nodes import FileHandle, UploadDir
from ._recovery import Recovery, cut_back, fingerprint, plan_recovery
from ._service import UploadService
from ._space import SpaceAccounting
from ._store import TaskTable, load_tasks
from ._task import Event, State, Task, is_temporary_path
from ._writes import WritePath

__all__ = ["UploadsComponent"]

log = logging.getLogger(__name__)

# How long a stat of uploads.json may report the size of the last stat's rendering
# (``fs.DynamicFile``): one ``cat`` stats it three times in a row before it opens.
STAT_SECONDS = 0.25


class UploadsComponent(Component):
    name = "uploads"

    def __init__(self, agent: Host):
        super().__init__(agent)
        config = self.config = agent.config
        self._root_path = os.fsencode(config.uploads_dir)
        self.paths = BackingTree(self._root_path)  # syscalls on paths of any length
        self.tasks = TaskTable(agent.db, recent=config.recent_uploads, events=agent.events)
        self.root = UploadDir(self, None, b"")
        self.counters = {"write_calls": 0, "bytes_written": 0, "rehashed": 0, "checkpoints": 0,
                         "recovered_cuts": 0, "rechecked": 0}
        self.space = SpaceAccounting(self._root_path, config.store_reserve_bytes)
        self.handoff = ImportHandOff(agent, self.tasks, self.paths)
        self.checkpoints = Checkpointer(
            tasks=self.tasks, paths=self.paths, root=self._root_path, to_thread=agent.to_thread,
            flush=self._flush, checkpoint_bytes=config.checkpoint_bytes,
            checkpoint_seconds=config.checkpoint_seconds, then=self._consider)
        self.completion = Completion(
            tasks=self.tasks, paths=self.paths, settle_seconds=config.settle_seconds,
            to_thread=agent.to_thread, handoff=self.handoff, db=agent.db,
            metrics=agent.metrics,
            counters=self.counters, want_checkpoint=self.checkpoints.want,
            checkpoint_pending=self.checkpoints.pending_consideration)
        self.writes = WritePath(paths=self.paths, space=self.space,
                                checkpoints=self.checkpoints, to_thread=agent.to_thread,
                                counters=self.counters)
        self.names = Names(tasks=self.tasks, paths=self.paths, space=self.space,
                           checkpoints=self.checkpoints, completion=self.completion,
                           handoff=self.handoff, writes=self.writes)
        # UploadTasks.* and ImportProcess.*: the same pipeline over msgpack-RPC.
        self.service = UploadService(self)
        # Collected at scrape time from counts kept anyway: nothing added to the write path.
        agent.metrics.counter("fsagent_upload_bytes_received_total", "Bytes written into "
                              "uploads/", collect=lambda: self.counters["bytes_written"])
        agent.metrics.gauge("fsagent_uploads", "Upload tasks by state", labels=("state",),
                            collect=lambda: {(s,): n for s, n in self.status()["tasks"].items()})

    # -- component hooks ----------------------------------------------------------------

    def root_entries(self) -> dict[bytes, Node]:
        return {b"uploads": self.root,
                b"uploads.json": DynamicFile(self.render_list, reuse_size_for=STAT_SECONDS),
                b"filesets.json": DynamicFile(self.render_filesets,
                                              reuse_size_for=STAT_SECONDS)}

    def status(self) -> dict[str, Any]:
        states = {s.value: n for s, n in self.tasks.counts.items()}  # kept, not counted
        collector = self.handoff.collector
        return {"tasks": states, **self.counters, "checkpoints": self.checkpoints.count,
                "import_grouping": self.handoff.grouping,
                "collecting": 0 if collector is None else collector.waiting_count}

    def counts(self) -> dict[str, int]:
        return {"uploads receiving": self.tasks.counts[State.RECEIVING]}

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.writes.nursery = self.completion.nursery = nursery
            await self._recover()
            if self.cache is not None:
                self.space.evictor = self.cache.evict_for  # a full store frees itself
            nursery.start_soon(self.checkpoints.run, nursery)
            nursery.start_soon(self.completion.settler)
            nursery.start_soon(self.handoff.retrier)
            nursery.start_soon(self.handoff.collect)
            nursery.start_soon(self.service.run, nursery)
            for t in self.tasks.tracked():
                if t.state is State.PARTIAL:
                    nursery.start_soon(self._consider, t)
                elif t.state is State.VERIFYING:  # recovery could not prove it unchanged
                    nursery.start_soon(self.completion.recheck, t)
            task_status.started()

    async def checkpoint(self) -> None:
        """Clean stop: sync every upload's data and record it as durable."""
        for t in list(self.space.writing):
            await drain(t)
        await self.checkpoints.sync(
            [t for t in self.tasks.tracked() if t.present > t.durable or t.writers])
        for t in self.tasks.tracked():
            self.tasks.save(t)

    async def _flush(self) -> None:
        try:
            await self.agent.db.flush()
        except Exception:
            log.exception("writing upload records failed; they stay staged")

    async def _commit(self, t: Task) -> None:
        """Stage ``t``'s row and wait until it is durable."""
        self.tasks.save(t)
        await self._flush()

    async def _consider(self, t: Task) -> None:
        await self.completion.consider(t)

    # -- lookups ------------------------------------------------------------------------

    def backing(self, rel: bytes) -> bytes:
        """The backing path (for messages: syscalls go through ``self.paths``)."""
        return self._root_path + b"/" + rel if rel else self._root_path

    def is_task(self, rel: bytes) -> bool:
        t = self.tasks.get(rel)
        return t is not None and t.tracked

    def _task(self, rel: bytes) -> Task:
        """The task of a regular file, made on first sight if it has none."""
        t = self.tasks.get(rel)
        if t is None:
            try:
                st, generation = self.paths.identity(rel)
                size, ino = st.st_size, st.st_ino
            except OSError:
                size, ino, generation = 0, None, None
            t = Task(rel=rel, present=size, ino=ino, ino_generation=generation,
                     tracked=trackable(rel))
            self.tasks.add(t)
        return t

    def describe_task(self, task_id: str) -> dict[str, Any] | None:
        """An upload task as an import job must see it now (``Agent.upload_task``)."""
        t = self.tasks.get_id(task_id)
        if t is None:
            return {"state": "removed"} if self.names.was_removed(task_id) else None
        if not t.tracked:
            return {"state": "removed"}  # renamed to a temporary name: not an upload now
        return {"path": t.path, "state": t.state.value, "size": t.present,
                "sha256": t.computed.get("sha256"), "job": t.job}

    # -- events from the nodes: data ------------------------------------------------------

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
            self.writes.resized(t, 0)
        # Whatever the writer does, the verified hash no longer proves anything. ``job``
        # stays: if these same bytes come back, that import still stands (_completion).
        t.changed()
        if t.present == 0 or t.hasher is None or not t.hasher.usable:
            self.writes.new_hasher(t)
        self.tasks.save(t)
        if was_complete and t.tracked:
            # Out of complete durably before the writer can change a byte: recovery
            # must never find a "complete" record over bytes that are not its hash.
            await self._commit(t)
        return t

    async def write(self, handle: FileHandle, offset: int, data: bytes) -> int:
        return await self.writes.write(handle.task, handle.fd, offset, data)

    async def drain(self, t: Task | None) -> None:
        await drain(t)

    async def settle_writes(self, t: Task | None, fd: int) -> None:
        await self.writes.settle(t, fd)

    async def released(self, t: Task, fd: int) -> None:
        await self.writes.released(t, fd)

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
            await drain(t)
        else:
            await self.writes.settle(t, handle.fd)
        size, shrinks = (t.present, t.shrinks) if t is not None else (0, 0)
        try:
            await self.agent.to_thread(os.fdatasync, handle.fd)
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        if t is not None and t.tracked and not t.ended:
            self.checkpoints.synced(t, size, shrinks)
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
        self.checkpoints.want(t, consider=True)
        self.completion.notice_manifest(t)

    def truncated(self, rel: bytes, size: int) -> None:
        t = self.tasks.get(rel)
        if t is None:
            return
        self.writes.resized(t, size)
        if t.tracked:
            t.apply(Event.MODIFY)
            self.tasks.save(t)
            if t.state is State.PARTIAL:
                self.checkpoints.want(t, consider=True)

    # -- events from the nodes: metadata, names -------------------------------------------

    def attributes_changed(self, rel: bytes) -> None:
        self.names.attributes_changed(rel)

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
        await self.names.unlinked(rel)
        cache = self.cache
        if cache is not None and t is not None:
            cache.unlinked(t.task_id)  # its object goes too (fsagent/repository/_cache.py)

    async def renamed(self, old_rel: bytes, new_rel: bytes, is_dir: bool) -> None:
        await self.names.renamed(old_rel, new_rel, is_dir)

    # -- events from the nodes: declarations (xattrs) ------------------------------------

    def task_xattrs(self, rel: bytes) -> dict[bytes, bytes]:
        t = self.tasks.get(rel)
        return task_xattrs(t) if t is not None and t.tracked else {}

    async def declare(self, rel: bytes, name: bytes, value: bytes) -> None:
        t = self.tasks.get(rel)
        key = name[len(FSAGENT_XATTR):]
        if key == b"size" and value.strip().isdigit():
            # A full store frees itself first (_space.py), for a declared size too.
            short = int(value) - t.present - self.space.room_for(t)
            if short > 0:
                await self.space.evict_for(short)
                if self.tasks.get(rel) is not t or t.ended:
                    raise FUSEError(errno.ENOENT)  # removed or replaced while evicting
        declare(t, key, value, self.space, self.writes.new_hasher)
        self.tasks.save(t)
        await self.completion.declared(t)

    async def undeclare(self, rel: bytes, name: bytes) -> None:
        t = self.tasks.get(rel)
        if undeclare(t, name[len(FSAGENT_XATTR):]):
            self.tasks.save(t)

    # -- the repository's cache (fsagent/repository/_cache.py; s3 backend only) -------------

    @property
    def cache(self):
        """The cache of verified uploads' local copies; None for the local backend."""
        repo = self.agent.repository
        return None if repo is None else repo.cache

    def path_of(self, task_id: str) -> bytes | None:
        t = self.tasks.get_id(task_id)
        return None if t is None or t.ended else t.rel

    def local_copy(self, task_id: str) -> tuple[bytes, int, str, tuple] | None:
        """(path, size, SHA-256, fingerprint) of upload ``task_id`` if its local copy may
        be evicted: complete, its proof recorded, no writer and no handle open."""
        t = self.tasks.get_id(task_id)
        if t is None or not t.tracked or t.ended or t.state is not State.COMPLETE \
                or t.writers or t.fingerprint is None or self._open(t.rel):
            return None
        sha = t.computed.get("sha256")
        return None if sha is None else (t.rel, t.present, sha, t.fingerprint)

    def tasks_under(self, paths: list[str]) -> list[str]:
        """IDs of the uploads at or under ``paths`` (relative to uploads/)."""
        tops = [os.fsencode(p.strip("/")) for p in paths]
        if b"" in tops:
            return [t.task_id for t in self.tasks.tracked()]
        return [t.task_id for t in self.tasks.tracked()
                if any(t.rel == p or t.rel.startswith(p + b"/") for p in tops)]

    def _open(self, rel: bytes) -> bool:
        node = self.root
        for name in rel.split(b"/"):
            node = getattr(node, "_cache", {}).get(name)
            if node is None:
                return False
        return bool(getattr(node, "handles", ()))

    def copy_changed(self, task_id: str) -> None:
        """The cache punched or restored the file's blocks (its bytes are still the
        upload's, by hash): the recorded proof follows the new ctime."""
        t = self.tasks.get_id(task_id)
        if t is not None and t.state is State.COMPLETE and t.fingerprint is not None:
            try:
                t.fingerprint = fingerprint(self.paths.lstat(t.rel))
            except OSError:
                t.fingerprint = None  # recovery hashes it again: never a false proof
            self.tasks.save(t)

    async def need_local(self, rel: bytes) -> None:
        """Before ``rel``'s bytes change: an evicted copy is fetched back whole."""
        cache = self.cache
        t = self.tasks.get(rel) if cache is not None else None
        if t is not None:
            await cache.ensure_local(t.task_id)

    @contextlib.asynccontextmanager
    async def emptying(self, rel: bytes):
        """Around a truncation of ``rel`` to nothing: an evicted copy is forgotten after
        it, not fetched back before (``Cache.emptying``)."""
        cache = self.cache
        t = self.tasks.get(rel) if cache is not None else None
        if t is None:
            yield
            return
        async with cache.emptying(t.task_id):
            yield

    def copy_opened(self, rel: bytes):
        """A handle of ``rel`` was opened: the cache's record when it is evicted."""
        cache = self.cache
        t = self.tasks.get(rel) if cache is not None else None
        return None if t is None else cache.opened(t.task_id)

    async def read_back(self, handle: FileHandle, offset: int, size: int) -> bytes:
        return await self.cache.read(handle, offset, size)

    # -- uploads.json ---------------------------------------------------------------------

    def listed_tasks(self) -> list[Task]:
        """What ``uploads.json`` and ``UploadTasks.list`` show: every unfinished upload
        (oldest change first), then the ``recent_uploads`` most recently completed. From
        the table's indexes: the complete uploads (most of a big store) are neither
        scanned nor sorted."""
        shown = sorted(self.tasks.unfinished, key=lambda t: t.updated)
        return shown + self.tasks.most_recent(self.config.recent_uploads)

    def render_list(self) -> bytes:
        return (json.dumps([t.summary() for t in self.listed_tasks()], indent=1)
                + "\n").encode()

    def render_filesets(self) -> bytes:
        return (json.dumps(self.handoff.filesets(), indent=1) + "\n").encode()

    def rpc_methods(self) -> dict[str, Any]:
        """``Uploads.filesets``: the filesets being collected, as ``filesets.json``;
        ``UploadTasks.*`` and ``ImportProcess.*`` (``_service.py``)."""
        async def filesets() -> list[dict]:
            return self.handoff.filesets()
        return {"Uploads.filesets": filesets, **self.service.methods()}

    # -- start-up -------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Make the rows and the files one story (``_recovery.py``), then act on it."""
        db = self.agent.db
        rows = await db.run(load_tasks)
        if self.cache is not None:
            # Evicted copies first: their punched bytes are not the hash, by design.
            fresh = await self.cache.recover(rows, self.paths)
            for t in rows:
                st = fresh.get(t.task_id)
                if st is not None and t.state is State.COMPLETE:
                    t.fingerprint = fingerprint(st)
        def plan() -> Recovery:  # a walk of the store and a generation per doubtful file
            return plan_recovery(rows, self.paths.walk_files(), clean=db.previous_run_clean,
                                 trackable=trackable, generation=self.paths.inode_generation)
        plan = await self.agent.to_thread(plan)
        for t in plan.forgotten:
            self.tasks.forget_row(t)  # removed while we were down
            self.names.remember_removed(t.task_id)
        for t in plan.moved:
            log.info("upload %s was renamed there before the agent stopped", t.path)
            self.handoff.moved(t)  # as a live rename would
        for rel in plan.ignored:
            if not is_temporary_path(rel):
                log.warning("ignoring %r in the store: its name is not UTF-8, so it cannot "
                            "be an upload task", rel)
        for t in plan.tasks:
            self.space.restore(t)
            self.tasks.add(t)
        if plan.cuts:
            await self.agent.to_thread(cut_back, self.paths, plan.cuts)
            self.counters["recovered_cuts"] = len(plan.cuts)
            for rel, size in plan.cuts:
                log.warning("unclean stop: cut %s back to its durable offset %d",
                            os.fsdecode(self.backing(rel)), size)
        # Import processes claim their files before anything hands complete uploads on.
        await self.service.load()
        await db.flush()

