"""Completion: when a closed upload is complete, proving it, and handing it on.

Design notes
------------
* **When.** ``consider(t)`` runs after the last writer's close has been checkpointed,
  on a declaration, on a rename into place, and from the settle loop (``settler``).
  Which rule holds is ``_task.completion_event``'s pure decision; this module gathers
  the facts (declarations in xattrs and in manifests next to the file) and acts on it.
* **Proof.** ``verify`` uses the on-the-fly digests when the hash stream covered the
  whole file (``_hashing.py``), otherwise re-hashes in a worker thread. A write, a
  truncate or a removal meanwhile supersedes the check (the generation changed or the
  task left ``verifying``). A declared hash that differs fails the task, naming the
  file, the algorithm, where it was declared and both hashes. The backing file's
  fingerprint (size, mtime, ctime) is recorded with the verdict, so recovery can
  trust the record while nothing touched the file (``_recovery.py``).
* **One version, one import.** A version is its bytes. Bytes that come back complete
  with the SHA-256 their import was for (a recheck, a hash declared late, a file
  opened for writing and closed unchanged) keep that import, unless it failed or was
  cancelled, or skipped this upload (a fileset's import); other bytes release it (it is
  cancelled if it has not started and had no other file) and get their own
  (``_handoff.py``). An import that is running while its upload is re-verified may be
  looking at the upload (not complete yet) and fail: its verdict is awaited first.
* **Shown once durable.** ``complete`` is shown (xattrs, ``uploads.json``) only once
  the task's record says so on disk (``Task.shown``): the hand-off's commit of the
  import job carries it, so no fsync is added; until then the task shows
  ``verifying``. So a crash never takes back a ``complete`` (or a job ID) a user saw,
  unless the database itself cannot be written (then the task's ``error`` says so).
* **Recheck** (``recheck``): a complete file recovery could not prove unchanged is
  hashed; the same bytes are verified as above, other bytes are a new version that
  the rules take from ``partial`` like any other.
* **Manifests.** A file that is itself a checksum manifest (``_manifests.py``) may
  complete or fail the files it lists: each listed task is reconsidered.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable

import trio

from ..longpaths import BackingTree
from ._checkpoints import drain
from ._handoff import ImportHandOff, read_small
from ._hashing import hash_file
from ._manifests import manifest_kind, manifest_names_for, parse_manifest
from ._recovery import fingerprint
from ._store import TaskTable
from ._task import Event, State, Task, completion_event, digests_of

__all__ = ["Completion"]

# The pipeline logs under the component's name, as before the stages were split out:
# operators grep and alert on these lines ("upload complete: ...").
log = logging.getLogger("fsagent.uploads._component")

# An import that ended in these did not import its version: the same bytes coming back
# complete get a new one ("skipped": a fileset's import that found this upload changed
# or gone). Any other state, or none (evicted from the job history: it ran long ago),
# means the version has its import.
_DEAD_IMPORT = {"failure", "cancelled", "skipped"}


class Completion:
    def __init__(self, *, tasks: TaskTable, paths: BackingTree, settle_seconds: float,
                 to_thread: Callable[..., Awaitable], handoff: ImportHandOff, db, metrics,
                 counters: dict[str, int], want_checkpoint: Callable[..., None],
                 checkpoint_pending: Callable[[Task], bool]):
        self._tasks = tasks
        self._paths = paths
        self._settle = settle_seconds
        self._to_thread = to_thread
        self._handoff = handoff
        self._db = db
        self._counters = counters
        self._want_checkpoint = want_checkpoint      # Checkpointer.want
        self._checkpoint_pending = checkpoint_pending
        self.nursery: trio.Nursery | None = None
        self.completed_total = metrics.counter(
            "fsagent_uploads_completed_total", "Uploads verified complete (each version once)")
        self.verification_failures = metrics.counter(
            "fsagent_upload_verification_failures_total", "Uploads that failed verification: "
            "a hash mismatch, a file larger than its declared size, or unreadable data",
            labels=("reason",))
        for reason in ("mismatch", "size", "unreadable"):
            self.verification_failures.labels(reason).inc(0)  # zero series from the start

    def _failed(self, t: Task, event: Event, reason: str, error: str) -> None:
        t.error = error
        t.apply(event)
        self._tasks.save(t)
        self.verification_failures.labels(reason).inc()
        log.warning("upload %s failed: %s", t.task_id, t.error)

    # -- when ------------------------------------------------------------------------------

    async def settler(self) -> None:
        while True:
            await trio.sleep(min(1.0, self._settle / 4))
            now = time.monotonic()
            # Only unfinished tasks can be partial: the pass costs nothing per complete
            # upload, however many the store holds (``TaskTable.unfinished``).
            for t in list(self._tasks.unfinished):
                if (t.state is State.PARTIAL and not t.writers and not t.held
                        and t.declared_size is None and now - t.last_change >= self._settle
                        and not self._checkpoint_pending(t)):
                    await self.consider(t)

    async def consider(self, t: Task) -> None:
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
            settle_seconds=self._settle)
        if event is None:
            return
        if event is Event.FAIL:
            self._failed(t, Event.FAIL, "size", f"{t.path}: {reason}")
            return
        t.apply(event)
        self._tasks.save(t)
        await self.verify(t, generation, declarations)

    async def declared(self, t: Task) -> None:
        """Something was declared about ``t``: see whether it is complete (or still is)."""
        if t.state is State.PARTIAL and not t.writers:
            self._want_checkpoint(t, consider=True)
        elif t.state in (State.COMPLETE, State.FAILED):
            t.apply(Event.HASH_DECLARED)
            self._tasks.save(t)
            self.nursery.start_soon(self.verify, t, t.generation)
        elif t.state is State.VERIFYING:
            # The check in progress read the declarations before this one: it must not
            # decide. Supersede it (its ``_current`` fails) and check again with all.
            t.supersede_check()
            self.nursery.start_soon(self.verify, t, t.generation)

    async def _declarations(self, t: Task) -> list[tuple[str, str, str]]:
        """Every hash declared for ``t``: ``(algorithm, hex, where it was declared)``."""
        out = [(a, v, f"user.fsagent.{a}") for a, v in sorted(t.client.items())]
        directory, _, name = t.rel.rpartition(b"/")
        # Most directories have no manifest: a few failed stats here beat a thread hop.
        if not self._paths.any_exists([directory + b"/" + m if directory else m
                                       for m, _ in manifest_names_for(name)]):
            return out
        try:
            found = await self._to_thread(_read_manifests, self._paths, directory, name)
        except OSError as e:
            log.warning("reading manifests next to %s: %s", t.path, e)
            found = []
        return out + found

    # -- proof ------------------------------------------------------------------------------

    async def verify(self, t: Task, generation: int,
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
            self._counters["rehashed"] += 1
            await drain(t)
            try:
                digests = await self._hash_where_it_is(t, sorted(algorithms))
            except OSError as e:
                if self._current(t, generation):
                    self._failed(t, Event.FAIL, "unreadable",
                                 f"{t.path}: cannot read it back to hash it: {e.strerror}")
                return
        if not self._current(t, generation):
            return  # written to, truncated or removed meanwhile: that change decides
        try:
            proof = fingerprint(self._paths.lstat(t.rel))
        except OSError:
            proof = None  # proves nothing: a crash makes recovery hash it again
        t.computed = digests_of(digests)
        for algorithm, expected, source in declarations:
            actual = digests[algorithm]
            if actual != expected:
                self._failed(t, Event.MISMATCH, "mismatch",
                             f"{t.path}: {algorithm} mismatch: expected {expected} "
                             f"({source}), got {actual}")
                return
        old_job = t.job
        same_version = old_job is not None and t.job_sha256 == digests["sha256"]
        if same_version:
            # A running import may be looking at this task (not complete yet) and about
            # to fail: wait for its verdict, then decide (no await after this).
            await self._handoff.settled_state(old_job)
            if not self._current(t, generation):
                return
            same_version = self._handoff.import_state(old_job, t) not in _DEAD_IMPORT
        t.error = None
        t.fingerprint = proof
        t.apply(Event.VERIFIED)
        if t.hasher is not None:
            t.hasher.close()
            t.hasher = None
        if not same_version:
            t.job = t.job_sha256 = None
            t.completed = time.time()
            self.completed_total.inc()
        self._tasks.save(t)
        mark = self._db.staged_generation
        log.info("upload complete: %s (%d bytes, sha256 %s)", t.path, t.present,
                 t.computed["sha256"])
        if not same_version:
            if old_job is not None:
                await self._handoff.release(old_job, t)  # its bytes are gone
            await self._handoff.submit(t)
        await self._commit_complete(t, generation, mark)

    async def _commit_complete(self, t: Task, generation: int, mark: int) -> None:
        """Show ``complete`` once its record is durable (``Task.shown``): a crash must
        not take back what a user saw. The hand-off's commit (the job and the task's
        record of it) normally took the row already, so this costs no fsync."""
        try:
            await self._db.flush(through=mark)
        except Exception as e:
            # The database cannot record anything now (a failing disk): the row stays
            # staged for its retry. The bytes are verified, and hiding that would hide
            # the failure, which the task's ``error`` (import not started) names.
            log.error("recording %s as complete failed (%s); it stays staged", t.path, e)
        if t.state is State.COMPLETE and t.generation == generation and not t.ended:
            t.mark_committed()

    async def recheck(self, t: Task) -> None:
        """Hash a complete file recovery could not prove unchanged (see the notes)."""
        generation = t.generation
        self._counters["rechecked"] += 1
        try:
            digests = await self._hash_where_it_is(t, ["sha256"])
        except OSError as e:
            digests = {}
            log.warning("rechecking %s: %s", t.path, e.strerror)
        if not self._current(t, generation):
            return
        if digests.get("sha256") == t.computed.get("sha256"):
            await self.verify(t, generation)
            return
        log.warning("upload %s is not the bytes it was verified as (changed while the "
                    "agent was not looking); checking it again as a new version", t.path)
        # A complete upload's bytes never change through the mount without it leaving
        # complete durably first, so these bytes are another file's: the backing store
        # was changed behind the agent, or (seen in the crash soak) the row was matched by
        # an inode number that a new file reused after this one was replaced. What the
        # client declared (size, hashes) described the old bytes, not these: dropped, so
        # the new version is judged as any undeclared upload, not failed against them.
        t.client = {}
        t.declared_size = None
        t.changed()
        t.apply(Event.MODIFY)
        self._tasks.save(t)
        self._want_checkpoint(t, consider=True)

    async def _hash_where_it_is(self, t: Task, algorithms: list[str]) -> dict[str, str]:
        """Hash ``t``'s file (worker thread). A rename of the file or a directory above
        it between reading ``t.rel`` and the open is followed, not taken for a missing
        file: only a path that did not move while it was tried is an error."""
        while True:
            rel = t.rel
            try:
                return await self._to_thread(_hash_file, self._paths, rel, algorithms)
            except (FileNotFoundError, NotADirectoryError):
                if t.rel == rel or t.ended:
                    raise

    def _current(self, t: Task, generation: int) -> bool:
        return (not t.ended and t.tracked and t.generation == generation
                and t.state is State.VERIFYING)

    # -- manifests --------------------------------------------------------------------------

    def notice_manifest(self, t: Task) -> None:
        """If ``t`` is a manifest, what it declares may complete (or fail) other files."""
        directory, _, name = t.rel.rpartition(b"/")
        kind = manifest_kind(name)
        if kind is None:
            return
        self.nursery.start_soon(self._apply_manifest, directory, name, kind)

    async def _apply_manifest(self, directory: bytes, name: bytes, kind) -> None:
        algorithm, subject = kind
        rel = directory + b"/" + name if directory else name
        try:
            content = await self._to_thread(read_small, self._paths, rel)
        except OSError:
            return
        for target in parse_manifest(content, algorithm, subject):
            rel = directory + b"/" + target if directory else target
            t = self._tasks.get(rel)
            if t is None or not t.tracked:
                continue
            await self.declared(t)


def _hash_file(paths: BackingTree, rel: bytes, algorithms: list[str]) -> dict[str, str]:
    return hash_file(paths.open(rel, os.O_RDONLY), algorithms)  # open() takes the fd


def _read_manifests(paths: BackingTree, directory: bytes,
                    name: bytes) -> list[tuple[str, str, str]]:
    out = []
    for manifest, algorithm in manifest_names_for(name):
        try:
            content = read_small(paths, directory + b"/" + manifest if directory else manifest)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
        kind = manifest_kind(manifest)
        digest = parse_manifest(content, algorithm, kind[1]).get(name)
        if digest:
            out.append((algorithm, digest, os.fsdecode(manifest)))
    return out
