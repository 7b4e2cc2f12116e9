"""The hand-off: the one route from uploads into the job engine.

Design notes
------------
* **One route.** Submitting an import, releasing one, asking a job's state and
  moving a manifest row after a rename all go through ``ImportHandOff``, which reaches
  the engine through the host's one route (``host.jobs``, ``fsagent/component.py``).
  Nothing else in ``uploads/`` talks to jobs.
* **Filesets.** A complete upload is handed to the fileset collector
  (``_filesets.py``, by ``import_grouping``), and each fileset it makes ready is
  submitted as one import job; with ``file`` grouping each upload is submitted at
  once, alone. Collecting keeps nothing durable: a complete upload without a job is
  collected again after a restart.
* **Submit**: ``host.jobs.submit("import", spec, job_id=..., stage_with=...)`` with an
  ID picked first; the engine validates the spec (its stats in a worker thread), then
  calls ``stage_with``, which stages the ID on every member, and stages the job's own
  row with no await between: the database takes writes staged together into one transaction
  (``fsagent/db.py``), so the job and the members' record of it are durable together or
  not at all. A crash can never leave a job the uploads forgot (imported twice after
  the restart) nor a job ID that does not exist (never imported). A submit that
  fails, or is cancelled by a shutdown, takes the ID back from every member. The spec
  is ``{"task", "path", "size", "sha256", "mtime_ns"}`` for one file (``file``
  grouping), else ``{"root", "files": [[task, path, size, sha256, mtime_ns], ...]}``.
* **Explicit sets.** An import process (``_service.py``) claims its files
  (``claimed``): ``submit`` leaves them to it, and ``submit_explicit`` hands them to
  the engine as one fileset when its client asks, through the same ``_submit_set``
  (with the process's own record staged in the same step). Its failures go back to
  that client, never to the retry below.
* **Retry**: without a job engine, or when it refuses (its database cannot be written,
  say), the members stay complete with no job and their ``error`` says why and when the
  next try is; tries back off from ``IMPORT_RETRY_FIRST_SECONDS`` doubling up to
  ``IMPORT_RETRY_MAX_SECONDS`` (a refusal that will not go away must not fill the log
  every few seconds forever), and every complete task without a job is handed off at
  start-up. A successful hand-off clears the error.
* **One version, one import**: ``import_state`` lets completion tell whether a version
  that comes back complete with the same bytes still has its import (see
  ``_completion.py``): a fileset's import that skipped this upload (it was being
  rewritten when the import ran) did not import it. An upload that leaves its import
  (removed, rewritten with other bytes) ``release``-s it: the engine cancels a job that
  has not started and had no other file; any other import skips it when it runs.
"""

from __future__ import annotations

import collections
import logging
import os
import uuid
from collections.abc import Callable

import trio

from ..component import Host
from ..longpaths import BackingTree
from ._filesets import VIEW_LIMIT, Fileset, FilesetCollector
from ._manifests import manifest_kind, parse_manifest
from ._store import TaskTable
from ._task import State, Task

__all__ = ["ImportHandOff", "IMPORT_RETRY_FIRST_SECONDS", "IMPORT_RETRY_MAX_SECONDS"]

# The pipeline logs under the component's name, as before the stages were split out:
# operators grep and alert on these lines ("upload complete: ...").
log = logging.getLogger("fsagent.uploads._component")

IMPORT_RETRY_FIRST_SECONDS = 2.0
IMPORT_RETRY_MAX_SECONDS = 600.0
MANIFEST_LIMIT = 16 * 2**20    # bigger "manifests" are not manifests
# Manifest sets are checked on their completions; this full check every few seconds
# catches what changed without one (a listed file imported by another set, a manifest
# removed).
MANIFEST_POLL_SECONDS = 5.0


class _Held:
    """``directory in held`` for ``FilesetCollector.take_ready``: whether a manifest in
    it is being read, or still being written or verified. Answered when asked (for a set
    that would otherwise be imported now), once per directory per pass."""

    __slots__ = ("_handoff", "_answers")

    def __init__(self, handoff: ImportHandOff):
        self._handoff = handoff
        self._answers: dict[bytes, bool] = {}

    def __contains__(self, directory: object) -> bool:
        if not isinstance(directory, bytes):
            return False
        answer = self._answers.get(directory)
        if answer is None:
            answer = self._answers[directory] = bool(
                directory in self._handoff._reading
                or self._handoff._incoming_manifests(directory))
        return answer


class ImportHandOff:
    def __init__(self, agent: Host, tasks: TaskTable, paths: BackingTree):
        self._agent = agent
        self._tasks = tasks
        self._paths = paths
        config = agent.config
        self.grouping = config.import_grouping
        self.collector = None if self.grouping == "file" else FilesetCollector(
            self.grouping, quiet_seconds=config.fileset_quiet_seconds,
            max_files=config.fileset_max_files, max_bytes=config.fileset_max_bytes)
        self._collected = trio.Event()
        self._submitting: list[Fileset] = []  # taken from the collector, not yet a job
        self._reading: collections.Counter[bytes] = collections.Counter()  # manifests
        self._importing: set[str] = set()
        # Renames of uploads being submitted (in ``_importing``): the engine checks the
        # spec's paths in a worker thread, and a directory renamed away and back meanwhile
        # fails that check with every path as it was (see ``_submit_set``).
        self._importing_moves = 0
        # task_id -> (trio time of the next attempt, the delay that led to it, the task)
        self._retry: dict[str, tuple[float, float, Task]] = {}
        self._retry_changed = trio.Event()
        # Whether an upload belongs to an explicit fileset (an import process,
        # ``_service.py``): such uploads are never collected nor submitted alone; the
        # process submits them, all together, when its client asks (``submit_explicit``).
        self.claimed: Callable[[Task], bool] = lambda t: False

    def _jobs(self):
        return self._agent.jobs

    def job_state(self, job: str) -> str | None:
        """The job's state word; None without a job engine or for a job it does not
        have (never submitted, or evicted from its history long after it ended)."""
        jobs = self._jobs()
        return None if jobs is None else jobs.job_state(job)

    def import_state(self, job: str, t: Task) -> str | None:
        """Like ``job_state``, but ``skipped`` when ``job`` ended without importing
        ``t`` (a fileset's import that found it changed or gone)."""
        jobs = self._jobs()
        return None if jobs is None else jobs.import_state(job, t.task_id)

    async def settled_state(self, job: str) -> str | None:
        """The job's state once it is not running: a running import may be checking
        its upload right now, and only its verdict says whether it imported it."""
        state = self.job_state(job)
        if state != "running":
            return state
        jobs = self._jobs()
        try:
            return await jobs.wait_job(job)
        except Exception:  # the agent is stopping: undecided, as if still running
            return state

    def moved(self, t: Task) -> None:
        """``t`` has a new path: its import's manifest row follows (staged)."""
        if t.task_id in self._importing:
            self._importing_moves += 1
        jobs = self._jobs()
        if t.job is not None and jobs is not None:
            jobs.import_moved(t.task_id, t.job, t.path)

    async def release(self, job: str, t: Task) -> None:
        """``t`` (removed, or rewritten with other bytes) leaves import ``job``."""
        jobs = self._jobs()
        if jobs is None:
            return
        try:
            await jobs.release_import(job, t.task_id)
        except Exception:
            log.exception("releasing %s from import job %s failed", t.path, job)

    # -- collecting --------------------------------------------------------------------

    async def submit(self, t: Task) -> None:
        """Complete upload ``t`` goes to its fileset (or, ``file`` grouping, straight to
        the job engine). Returns before the fileset is imported."""
        if (t.job or t.task_id in self._importing or t.state is not State.COMPLETE
                or t.ended or not t.tracked or self.claimed(t)):
            return
        if self.collector is None:
            await self._submit_set([t], None)
            return
        self.collector.add(t, trio.current_time())
        if self.collector.is_manifest(t):
            await self._read_listing(t)
        self._collected.set()

    async def _read_listing(self, t: Task) -> None:
        generation = t.generation
        held = t.rel.rpartition(b"/")[0]
        # Until it is read, sets in its directory wait: this manifest may join them
        # (``MD5SUMS`` next to ``SHA256SUMS``: one fileset, not two).
        self._reading[held] += 1
        try:
            while True:
                rel = t.rel
                try:
                    content = await self._agent.to_thread(read_small, self._paths, rel)
                    break
                except (FileNotFoundError, NotADirectoryError):
                    if t.rel == rel or t.ended:
                        raise  # gone, not moved
                    # renamed while it was read: read it where it is now
        except OSError as e:
            log.warning("reading manifest %s: %s", t.path, e.strerror)
            content = b""
        finally:
            self._reading[held] -= 1
            if not self._reading[held]:
                del self._reading[held]
            self._collected.set()
        if t.generation != generation or t.state is not State.COMPLETE or t.job or t.ended:
            return  # changed meanwhile: its next completion reads it again
        # Where it is now (a rename meanwhile moves what its relative names mean).
        directory, _, name = t.rel.rpartition(b"/")
        kind = manifest_kind(name)
        if kind is None:
            return  # renamed to a name that is not a manifest's: an upload like others
        algorithm, subject = kind
        names = parse_manifest(content, algorithm, subject)
        listed = {(directory + b"/" + n if directory else n): (algorithm, digest)
                  for n, digest in names.items()}
        self.collector.listing(t, listed, trio.current_time())

    def filesets(self) -> list[dict]:
        """The filesets being collected (``filesets.json``)."""
        if self.collector is None:
            return []
        out = self.collector.view(trio.current_time(), self._tasks.get, self._submitting)
        incoming = self._incoming_manifests()
        for item in out:
            root = item.get("root")
            held = incoming.get(os.fsencode(root)) if root is not None else None
            if held:
                item["heldBy"] = sorted(held)[:VIEW_LIMIT]  # manifests not complete yet
        return out

    async def collect(self) -> None:
        """Submit each fileset as the collector makes it ready."""
        if self.collector is None:
            return
        next_poll = trio.current_time() + MANIFEST_POLL_SECONDS
        while True:
            self._collected = trio.Event()
            now = trio.current_time()
            poll = now >= next_poll
            if poll:
                next_poll = now + MANIFEST_POLL_SECONDS
            ready = self.collector.take_ready(now, self._tasks.get, poll=poll,
                                              held=self._held_directories())
            self._submitting.extend(ready)
            for fileset in ready:
                try:
                    await self._submit_set(fileset.usable_members(), fileset)
                finally:
                    self._submitting.remove(fileset)
            due = self.collector.next_due()
            due = next_poll if due is None else min(due, next_poll)
            with trio.move_on_at(due):
                await self._collected.wait()

    def _incoming_manifests(self, directory: bytes | None = None) -> dict[bytes, list[str]]:
        """Manifests still being written or verified, by directory (only ``directory``'s,
        if given): a manifest set there waits for them (``MD5SUMS`` sent before
        ``SHA256SUMS`` may complete after it and the files both list: it must join their
        set, not follow it as a set of its own). Once verified, a manifest is read on its
        way into the collector (``_reading``, with no await between). A manifest that
        failed holds nothing back; one left partial completes when it settles (or is
        removed). A pass over the unfinished tasks: asked only for a set that would
        otherwise be imported now, and for ``filesets.json``."""
        out: dict[bytes, list[str]] = {}
        if self.collector is None or self.collector.grouping != "manifest":
            return out
        for t in self._tasks.unfinished:
            if t.state not in (State.FAILED, State.COMPLETE) and not t.ended:
                where, _, name = t.rel.rpartition(b"/")
                if (directory is None or where == directory) and manifest_kind(name):
                    out.setdefault(where, []).append(t.path)
        return out

    def _held_directories(self) -> _Held:
        """Directories whose manifest sets wait: a manifest there is being read, or is
        still being written or verified (``_incoming_manifests``)."""
        return _Held(self)

    # -- submitting ----------------------------------------------------------------------

    def unclaim(self, t: Task) -> None:
        """``t`` now belongs to an explicit fileset: out of any set being collected."""
        if self.collector is not None:
            self.collector.discard(t)

    async def submit_explicit(self, members: list[Task], root: bytes, key: str,
                              on_recorded: Callable[[str], None]) -> str:
        """Submit ``members`` (complete, verified) as one fileset's import job, now, and
        return the job's ID; ``on_recorded(job)`` is called in the staging step that
        records the job on the members (see the notes). Raises what the engine raised
        (nothing is retried here: the caller's client hears it and may call again)."""
        busy = [t.path for t in members if t.job or t.task_id in self._importing
                or t.state is not State.COMPLETE or not t.tracked or t.ended]
        if busy:
            # Checked with no await before _submit_set takes them: all or nothing.
            raise RuntimeError(f"not ready to import: {', '.join(busy[:10])}")
        fileset = Fileset(key=("process", os.fsencode(key)), root=root,
                          started=trio.current_time())
        job = await self._submit_set(members, fileset, explicit=True, on_recorded=on_recorded)
        if job is None:
            raise RuntimeError("the files changed while they were submitted")
        # A member changed while the engine checked the spec keeps no job (record_job):
        # the import skips it, as any fileset's import skips a file that changed.
        return job

    async def _submit_set(self, members: list[Task], fileset: Fileset | None, *,
                          explicit: bool = False,
                          on_recorded: Callable[[str], None] | None = None) -> str | None:
        """Hand ``members`` (one import job) to the job engine (see the design notes);
        returns the job's ID once it is submitted. ``explicit``: an import process's
        set, whose failures go back to the caller instead of being retried."""
        members = [t for t in members if not t.job and t.task_id not in self._importing
                   and t.state is State.COMPLETE and t.tracked and not t.ended]
        if not members:
            return None
        if self._jobs() is None:
            if explicit:
                raise RuntimeError("there is no job engine")
            for t in members:
                self._failed(t, "there is no job engine")
            return None
        job = str(uuid.uuid4())
        before = [(t, t.job, t.job_sha256, t.error) for t in members]
        for t in members:
            self._importing.add(t.task_id)

        versions = {t.task_id: t.computed["sha256"] for t in members}

        def record_job() -> None:
            # Called by the engine once the spec is valid, right before it stages the
            # job's row (no await between): members and job commit together. A member
            # changed during the validation keeps no job: the run skips it, and its new
            # version gets its own import.
            for t in members:
                if (t.state is State.COMPLETE and not t.ended and not t.job
                        and t.computed.get("sha256") == versions[t.task_id]):
                    t.job, t.job_sha256, t.error = job, versions[t.task_id], None
                    self._tasks.save(t)
            if on_recorded is not None:
                on_recorded(job)

        paths = [t.path for t in members]  # as the spec names them
        moves = self._importing_moves
        try:
            st = self._paths.lstat(members[0].rel)
            if fileset is None:
                spec = _file_spec(members[0], st)
            else:
                spec = {"root": os.fsdecode(fileset.root),
                        "files": [_file_entry(t, self._paths) for t in members]}
            # The import belongs to whoever owns the files: they may cancel or re-prioritise it.
            await self._jobs().submit("import", spec, owner_uid=st.st_uid, job_id=job,
                                      stage_with=record_job)
        except BaseException as e:
            # Not submitted (refused, failed, or cancelled by a shutdown): no member may
            # name a job that does not exist, or its version would never be imported.
            for t, job_before, sha_before, error_before in before:
                if t.job == job:
                    t.job, t.job_sha256, t.error = job_before, sha_before, error_before
                    self._tasks.save(t)
            if not isinstance(e, Exception) or explicit:
                raise
            if self._importing_moves != moves or any(
                    t.path != path or t.ended or t.state is not State.COMPLETE
                    for t, path in zip(members, paths)):
                # A rename or removal (of a member or its directory) or a rewrite raced
                # the engine's check of the paths: not a failure; the members still
                # complete are collected again as they are now. A rename counts even
                # when the paths are the same again (away and back while the engine's
                # thread looked): the check failed on a path that is there now.
                log.debug("uploads renamed while their fileset was submitted; collecting "
                          "them again (%s)", e)
                for t in members:
                    self._importing.discard(t.task_id)
                    await self.submit(t)
                return None
            if not any(t.task_id in self._retry for t in members):
                log.exception("handing %d upload(s) to the job engine failed (%s ...)",
                              len(members), members[0].path)
            for t in members:
                self._failed(t, f"{type(e).__name__}: {e}")
            return None
        finally:
            for t in members:
                self._importing.discard(t.task_id)
        for t in members:
            if t.ended and t.job == job:
                await self.release(job, t)
            if self._retry.pop(t.task_id, None) is not None:
                log.info("upload %s handed to the job engine after earlier failures", t.path)
        if fileset is not None:
            # DEBUG: the engine logs the job's submission (one line per event, not two).
            log.debug("fileset %s/ (%d files) handed to import job %s",
                     os.fsdecode(fileset.root), len(members), job)
        return job

    def _failed(self, t: Task, reason: str) -> None:
        """Record why the import did not start and when it is tried again."""
        _, delay, _ = self._retry.get(t.task_id, (0.0, 0.0, t))
        delay = min(IMPORT_RETRY_MAX_SECONDS, delay * 2 or IMPORT_RETRY_FIRST_SECONDS)
        self._retry[t.task_id] = (trio.current_time() + delay, delay, t)
        self._retry_changed.set()
        t.error = f"{t.path}: import not started ({reason}); next try in {delay:g} s"
        log.warning("upload %s", t.error)
        self._tasks.save(t)

    async def retrier(self) -> None:
        """At start-up every complete upload without a job, then each retry when due."""
        for t in self._tasks.tracked():
            if t.state is State.COMPLETE and not t.job:
                await self.submit(t)
        while True:
            self._retry_changed = trio.Event()
            due = min((at for at, _, _ in self._retry.values()), default=None)
            with trio.move_on_at(due if due is not None else float("inf")):
                await self._retry_changed.wait()
            now = trio.current_time()
            for task_id, (at, delay, t) in list(self._retry.items()):
                if t.ended or t.job or t.state is not State.COMPLETE:
                    del self._retry[task_id]  # gone, re-written, or handed off
                    continue
                if at > now:
                    continue
                if self.collector is not None:
                    # Collected again: its fileset's submit pops this entry, or doubles
                    # the delay if it fails again; until then it is not due.
                    self._retry[task_id] = (float("inf"), delay, t)
                await self.submit(t)


def _file_spec(t: Task, st: os.stat_result) -> dict:
    return {"task": t.task_id, "path": t.path, "size": t.present,
            "sha256": t.computed["sha256"], "mtime_ns": st.st_mtime_ns}


def _file_entry(t: Task, paths: BackingTree) -> list:
    """One file of a fileset spec; the mtime its verification recorded (no syscall)."""
    if t.fingerprint is not None:
        mtime_ns = t.fingerprint[1]
    else:
        mtime_ns = paths.lstat(t.rel).st_mtime_ns
    return [t.task_id, t.path, t.present, t.computed["sha256"], mtime_ns]


def read_small(paths: BackingTree, rel: bytes) -> bytes:
    """A manifest's content (worker thread); bigger "manifests" are not manifests."""
    with open(paths.open(rel, os.O_RDONLY), "rb") as f:
        return f.read(MANIFEST_LIMIT)
