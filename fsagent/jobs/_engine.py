"""The job engine: the jobs, their verbs, the scheduler, persistence and history.

Design notes
------------
* **One code path per verb.** ``submit``, ``control`` (cancel/pause/resume/retry),
  ``set_priority`` and ``wait`` are the engine's public verbs; the ``control`` and
  ``priority`` files, ``mkdir``+``spec``, the RPC methods and the CLI all call these,
  never the state table or the database directly. Every state change goes through
  ``_apply``, which asks ``_states.next_state``.
* **Scheduling.** Pending jobs start highest ``priority`` first, then oldest first,
  at most ``max_concurrent_jobs`` at a time. A job whose previous run is still
  unwinding (paused or cancelled mid-step, then resumed or retried) does not start
  again until that run has finished, so two runs of a job never overlap.
* **Cooperative stop.** Pausing or cancelling a running job changes its state at
  once (the files show it immediately) and cancels the run's scope; worker threads
  notice at their next ``checkpoint`` and async work (a subprocess) is cancelled by
  trio. The run then finds its job no longer ``running`` and throws its work away.
* **Persistence.** A job's row is staged in the database under one key per job, so
  the latest row always wins: progress ticks are staged (written every
  ``db_flush_seconds``), state changes are staged and flushed before the verb
  returns (one transaction, durable). On start, jobs found ``running`` were
  interrupted (stop or crash): they are requeued with a message saying so.
* **Group commits.** Nothing here costs a transaction of its own: ``Database.flush``
  lets every flush that arrives while one is being written share the next one. A
  submit returns once its row is durable (the uploads hand-off relies on it); a
  run's start is only staged (a crash requeues it either way); a run's end is staged,
  its slot freed so the next job starts at once, and then made durable, so the ends
  of many short jobs share transactions. ``wait`` flushes before it answers: nobody
  is told a job ended before its end is on disk.
* **A job is cheap** (thousands of small imports): a job has a directory
  ``STATE/jobs/<id>/`` only when it needs one, i.e. when its kind asks for its
  outputs directory (``RunContext.outputs_dir``, made on first use) or its log is
  kept on disk (``_log.py``: lines live in memory and are written in batches, and
  only some logs are written at all). ``JobLog.on_disk`` is the engine's knowledge of
  whether a job may have a directory, learnt at start-up from one listing of
  ``STATE/jobs``; a job without one costs no system call to run, end or evict.
* **Outputs** live under ``STATE/jobs/<id>/``: ``log``, ``outputs/`` (published by
  renaming ``outputs.tmp/`` after fsync, only on success, and only if the run made
  ``outputs.tmp/``). A run of a job that has a directory starts by clearing both
  output directories (not the log), which is how a retried or requeued kind resets
  its work.
* **Observability.** ``_apply`` is where every state change happens, so it is where
  each change is logged (one INFO line: job, kind, from -> to, the error if it failed)
  and where a run's duration is observed (``fsagent_job_duration_seconds{kind,state}``,
  the state the run ended in). ``fsagent_jobs{state,kind}`` is counted at scrape time.
  Change events (``jobChanged``) are published where a job's row is staged
  (``_stage``), after the verb has set the message and progress that go with the new
  state, and only while someone subscribed.
* **History.** Finished jobs beyond ``job_history`` (newest kept) or older than
  ``job_ttl`` are removed with their directory; only finished jobs are ever evicted.
  Eviction sorts the finished jobs on the event loop (no system call) and removes the
  directories of those that have one in a worker thread; directories left by a crash
  between the two (no job row) are removed in a worker thread at start-up.
* **Why one module** (it is over 500 lines): the jobs table, the pending heap, the
  active runs and the staged rows are one state with invariants across them (a job is
  in the heap only while pending, has a run only while running, has a row for as long
  as it exists), and the verbs, the scheduler and eviction all write it. Split, that
  state would have writers in several modules; what is not that state (the transition
  table, the kinds, the FUSE tree, the CLI) already lives elsewhere.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import os
import re
import shutil
import time
import uuid
import zlib
from pathlib import Path
from collections.abc import Callable
from typing import Any

import trio

from ..component import Host
from ._kinds import KINDS, JobFailed, KindEnv, RunContext, SpecError, Stopped
from ._log import JobLog, JobLogs
from ._states import ErrorCode, IllegalMove, State, next_state

__all__ = ["Engine", "Job", "PackedSpec", "NoSuchJob", "BadSpec", "JobExists",
           "JobNotFinished", "ShuttingDown", "valid_job_name"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def valid_job_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


class NoSuchJob(LookupError):
    def __init__(self, job_id: str):
        super().__init__(f"no job {job_id!r}")


class BadSpec(ValueError):
    """A refused submission; ``str()`` is the one-line reason."""


class JobExists(Exception):
    def __init__(self, job_id: str):
        super().__init__(f"job {job_id!r} already exists")


class JobNotFinished(Exception):
    def __init__(self, job_id: str, state: State):
        super().__init__(f"job {job_id!r} is {state.value}; only a finished job can be "
                         "removed (cancel it first)")


class ShuttingDown(Exception):
    def __init__(self):
        super().__init__("the agent is shutting down")


def _clean(text: str) -> str:
    """Text safe for SQLite and the files: undecodable file names become U+FFFD."""
    return text.encode("utf-8", "replace").decode("utf-8")


def orthanc_time(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}"


def _compact_json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


class PackedSpec:
    """A finished job's spec: its compact JSON (ASCII: ``json.dumps`` escapes the rest),
    compressed, and that JSON's length, so ``jobs.json`` knows its size without
    unpacking it."""

    __slots__ = ("data", "length")

    def __init__(self, text: str):
        self.data = zlib.compress(text.encode("ascii"))
        self.length = len(text)

    def text(self) -> str:
        return zlib.decompress(self.data).decode("ascii")


@dataclasses.dataclass(eq=False)
class Job:
    id: str
    seq: int
    kind: str
    # The spec as submitted: a dict while the job may still run; once it is finished,
    # its compact JSON compressed (``pack_spec``; ``spec`` and ``spec_json`` read
    # either). A fileset's spec lists every member: as Python objects ~230 bytes each,
    # packed ~70, and the history keeps 1,000 jobs (100,000 members and more).
    stored_spec: dict[str, Any] | PackedSpec
    state: State
    priority: int = 0
    progress: int = 0
    message: str = ""
    error_code: int = 0
    error_description: str = ""
    content: dict[str, Any] = dataclasses.field(default_factory=dict)
    outputs: list[str] = dataclasses.field(default_factory=list)
    owner_uid: int | None = None
    created: float = 0.0
    completed: float | None = None
    runtime: float = 0.0        # seconds spent running, over every run
    updated: float = 0.0
    # -- in memory only
    ended: trio.Event = dataclasses.field(default_factory=trio.Event)
    run_started: float | None = None   # monotonic start of the current run
    ctx: RunContext | None = None
    scope: trio.CancelScope | None = None
    log: JobLog | None = None          # made on first use (``Engine.log_of``)

    @property
    def spec(self) -> dict[str, Any]:
        """The spec (a new dict each time for a finished job: read it, do not change it)."""
        stored = self.stored_spec
        return stored if isinstance(stored, dict) else json.loads(stored.text())

    def spec_json(self) -> str:
        """The spec as compact JSON (what ``jobs.json`` shows), without building it as
        Python objects when it is packed."""
        stored = self.stored_spec
        return _compact_json(stored) if isinstance(stored, dict) else stored.text()

    def pack_spec(self) -> None:
        """A finished job: keep the spec as compressed compact JSON (see ``stored_spec``)."""
        if isinstance(self.stored_spec, dict):
            self.stored_spec = PackedSpec(_compact_json(self.stored_spec))

    def unpack_spec(self) -> None:
        """The job may run again (retry): its spec as a dict."""
        if not isinstance(self.stored_spec, dict):
            self.stored_spec = self.spec

    def effective_runtime(self) -> float:
        extra = time.monotonic() - self.run_started if self.run_started is not None else 0.0
        return round(self.runtime + extra, 3)

    def live_progress(self) -> int:
        # A running job's progress lives in its context (updated from worker threads).
        if self.state is State.RUNNING and self.ctx is not None:
            return self.ctx.progress
        return self.progress

    def live_message(self) -> str:
        if self.state is State.RUNNING and self.ctx is not None and self.ctx.message:
            return self.ctx.message
        return self.message

    def live_content(self) -> dict[str, Any]:
        # A running job's Content is its context's (an import's push progress).
        if self.state is State.RUNNING and self.ctx is not None and self.ctx.content:
            return dict(self.ctx.content)
        return self.content

    def info(self, *, with_spec: bool = True) -> dict[str, Any]:
        """The Orthanc-style record of ``info.json`` and ``jobs.json`` (``Spec`` last;
        left out if not ``with_spec``)."""
        record = {
            "ID": self.id,
            "Type": self.kind,
            "State": self.state.orthanc,
            "Progress": self.live_progress(),
            "Priority": self.priority,
            "Message": self.live_message(),
            "ErrorCode": self.error_code,
            "ErrorDescription": self.error_description,
            "CreationTime": orthanc_time(self.created),
            "CompletionTime": orthanc_time(self.completed),
            "EffectiveRuntime": self.effective_runtime(),
            "Timestamp": orthanc_time(self.updated),
            "Content": self.live_content(),
            "Outputs": self.outputs,
        }
        if with_spec:
            record["Spec"] = self.spec
        return record

    def info_json(self) -> bytes:
        """``info()`` as one line of compact JSON (a ``jobs.json`` record), the same bytes
        ``json.dumps(self.info(), separators=(",", ":"))`` gives, with the spec's JSON put
        in as text: a finished fileset's spec is never built as Python objects."""
        head, packed = self.info_json_parts()
        return head if packed is None else head + packed.text().encode("ascii") + b"}"

    def info_json_parts(self) -> tuple[bytes, PackedSpec | None]:
        """``info_json()`` of a finished job as ``(the record up to its spec's JSON, the
        packed spec)``, the record then ending with ``}``; ``(info_json(), None)`` for
        a job whose spec is not packed."""
        head = _compact_json(self.info(with_spec=False))[:-1].encode()
        stored = self.stored_spec
        if isinstance(stored, dict):
            return head + b',"Spec":' + _compact_json(stored).encode() + b"}", None
        return head + b',"Spec":', stored

    def row(self) -> tuple:
        return (self.id, self.seq, self.kind, self.spec_json(), self.state.value,
                self.priority, self.live_progress(), self.live_message(), self.error_code,
                self.error_description, json.dumps(self.content), json.dumps(self.outputs),
                self.owner_uid, self.created, self.completed, self.runtime, self.updated)


_COLUMNS = ("id, seq, kind, spec, state, priority, progress, message, error_code, "
            "error_description, content, outputs, owner_uid, created, completed, runtime, "
            "updated")
_UPSERT = f"INSERT OR REPLACE INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 17)})"
_DELETE = "DELETE FROM jobs WHERE id = ?"


def _job_from_row(row: tuple) -> Job:
    (id_, seq, kind, spec, state, priority, progress, message, error_code, error_description,
     content, outputs, owner_uid, created, completed, runtime, updated) = row
    job = Job(id=id_, seq=seq, kind=kind, stored_spec=json.loads(spec), state=State(state),
              priority=priority, progress=progress, message=message, error_code=error_code,
              error_description=error_description, content=json.loads(content),
              outputs=json.loads(outputs), owner_uid=owner_uid, created=created,
              completed=completed, runtime=runtime, updated=updated)
    if job.state.final:
        job.ended.set()
        job.pack_spec()
    return job


@dataclasses.dataclass(eq=False)
class Draft:
    """``mkdir jobs/NAME`` before a valid ``spec`` was written (kept in memory only)."""

    id: str
    owner_uid: int | None
    created: float
    message: str = ""


class Engine:
    def __init__(self, agent: Host):
        self.agent = agent
        self.config = agent.config
        self.db = agent.db
        self.jobs_dir: Path = self.config.state_dir / "jobs"
        self.logs = JobLogs(self.jobs_dir)
        self._orphan_dirs: list[Path] = []  # found at start-up; removed by ``serve``
        self.jobs: dict[str, Job] = {}
        self.drafts: dict[str, Draft] = {}
        self._seq = 0
        self._active: set[str] = set()      # jobs with a run in progress (or unwinding)
        # Pending jobs as (-priority, seq, id), best first. Entries go stale when a job
        # leaves pending or is reprioritised (a fresh entry is pushed then); stale ones
        # are skipped when popped. Picking the next job is O(log n), not a scan of every
        # job the history holds (10,000 by default) each time one ends.
        self._pending: list[tuple[int, int, str]] = []
        self._finished = 0                  # jobs in a final state (history size)
        self._wakeup = trio.Event()
        self.started_count = 0              # runs started since the agent started
        self.evicted_count = 0
        self._events = agent.events.topic("jobs")  # jobChanged (fsagent/events.py)
        metrics = agent.metrics
        metrics.gauge("fsagent_jobs", "Jobs by state and kind", labels=("state", "kind"),
                      collect=self.counts_by_state_and_kind)
        self.run_seconds = metrics.histogram(
            "fsagent_job_duration_seconds", "Duration of one run of a job, by kind and the "
            "state the run ended in", labels=("kind", "state"))

    # -- loading (start-up, synchronous) -------------------------------------------------

    def load(self) -> None:
        rows = self.db.run_sync(
            lambda conn: conn.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY seq").fetchall())
        try:
            with os.scandir(self.jobs_dir) as entries:
                dirs = {e.name for e in entries}
        except FileNotFoundError:
            dirs = set()
        for row in rows:
            job = _job_from_row(row)
            self.jobs[job.id] = job
            self._seq = max(self._seq, job.seq)
            if job.id in dirs:
                job.log = self.logs.new(job.id, on_disk=True)
            if job.state is State.RUNNING:
                job.state = next_state(job.id, "requeue", job.state)
                job.runtime = round(job.runtime, 3)
                job.progress = 0
                job.message = "interrupted (the agent stopped while it ran); requeued"
                log.info("job %s (%s): running -> pending: %s", job.id, job.kind, job.message)
                job.updated = time.time()
                self._stage(job)
                self._log(job, job.message)
            self._track(job, None)
        # Left by a crash after an eviction was committed and before its directories
        # were removed (or by jobs removed from the database by hand).
        self._orphan_dirs = [self.jobs_dir / name for name in sorted(dirs - set(self.jobs))]
        self.db.flush_sync()
        log.info("jobs: loaded %d jobs (%d with a directory)", len(self.jobs),
                 len(dirs) - len(self._orphan_dirs))

    # -- paths -------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def outputs_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "outputs"

    def log_of(self, job: Job) -> JobLog:
        """The job's log (made on first use: most jobs never have a directory)."""
        if job.log is None:
            job.log = self.logs.new(job.id, on_disk=False)
        return job.log

    @staticmethod
    def has_dir(job: Job) -> bool:
        """Whether the job may have a directory on disk (else it surely has none)."""
        return job.log is not None and job.log.on_disk

    # -- lookups -----------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NoSuchJob(job_id) from None

    def listing(self) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: j.seq)

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in State}
        for job in self.jobs.values():
            out[job.state.value] += 1
        return out

    def counts_by_state_and_kind(self) -> dict[tuple[str, str], int]:
        """Every (state, kind) pair, zeros included, so dashboards see whole series."""
        out = {(s.value, k): 0 for s in State for k in KINDS}
        for job in self.jobs.values():
            out[job.state.value, job.kind] = out.get((job.state.value, job.kind), 0) + 1
        return out

    # -- verbs (the one code path for each) --------------------------------------------

    async def submit(self, kind: str, spec: dict[str, Any], *, priority: int = 0,
                     owner_uid: int | None = None, job_id: str | None = None,
                     stage_with: Callable[[], None] | None = None) -> str:
        """Validate and queue a job; returns its ID once the job is durable.

        ``stage_with`` is called once the spec is valid, right before the job's row is
        staged, with no await between: what it stages commits in the job's transaction
        (the uploads hand-off records the job on its uploads that way)."""
        if kind not in KINDS:
            raise BadSpec(f"unknown job type {kind!r}; known: {', '.join(sorted(KINDS))}")
        if not isinstance(spec, dict):
            raise BadSpec("a spec is a JSON object")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise BadSpec(f"priority must be an integer, got {priority!r}")
        if job_id is None:
            job_id = str(uuid.uuid4())
        elif job_id in self.jobs:
            raise JobExists(job_id)
        env = KindEnv(uploads_dir=self.config.uploads_dir, db=self.db,
                      to_thread=self.agent.to_thread, owner_uid=owner_uid)
        try:
            normalised = await KINDS[kind].validate(dict(spec), env)
        except SpecError as e:
            raise BadSpec(f"{kind}: {e}") from None
        if job_id in self.jobs:  # another submit took the name while we validated
            raise JobExists(job_id)
        self._seq += 1
        now = time.time()
        job = Job(id=job_id, seq=self._seq, kind=kind, stored_spec=normalised,
                  state=State.PENDING,
                  priority=priority, owner_uid=owner_uid, created=now, updated=now,
                  message="queued")
        self.jobs[job_id] = job
        try:
            if stage_with is not None:
                stage_with()
            # Shielded: a cancel (the agent stopping) must not leave us unsure whether the
            # job is durable. Another flush may commit its row before ours runs, so once
            # it is staged only a failed commit means "not submitted" (the uploads
            # hand-off keeps or drops its record of the job on exactly that answer).
            with trio.CancelScope(shield=True):
                await self._persist(job, durable=True)
        except BaseException:
            # Not durable, so not submitted: the caller gets the error and nothing is
            # queued (the scheduler only sees it below). A draft stays a draft.
            del self.jobs[job_id]
            self.db.unstage(("job", job_id))
            raise
        self._track(job, None)
        self.drafts.pop(job_id, None)
        log.info("job %s (%s): submitted -> pending, priority %d, owner uid %s", job_id,
                 kind, priority, owner_uid)
        self._wake()
        return job_id

    async def submit_spec_text(self, job_id: str, text: str, *, owner_uid: int | None) -> str:
        """A configfs ``spec`` write: ``{"type": KIND, "priority"?: N, ...kind fields}``."""
        try:
            spec = json.loads(text)
        except ValueError as e:
            raise BadSpec(f"spec is not valid JSON: {e}") from None
        if not isinstance(spec, dict):
            raise BadSpec("spec must be a JSON object with a \"type\"")
        kind = spec.pop("type", None)
        if not isinstance(kind, str):
            raise BadSpec(f'spec needs "type": one of {", ".join(sorted(KINDS))}')
        priority = spec.pop("priority", 0)
        return await self.submit(kind, spec, priority=priority, owner_uid=owner_uid,
                                 job_id=job_id)

    async def control(self, job_id: str, verb: str) -> State:
        """cancel, pause, resume or retry; raises UnknownVerb/IllegalMove/NoSuchJob."""
        job = self.get(job_id)
        before = job.state
        after = self._apply(job, verb)
        if after is before:
            return after
        if before is State.RUNNING:
            # The run's threads notice at their next step; its async work is cancelled.
            if job.ctx is not None:
                job.ctx.request_stop()
            if job.scope is not None:
                job.scope.cancel()
        if verb == "cancel":
            job.message = "cancelled" + (" while running" if before is State.RUNNING else "")
        elif verb == "pause":
            job.message = "paused" + (" while running; will restart from the beginning"
                                      if before is State.RUNNING else "")
        elif verb in ("resume", "retry"):
            job.message = "queued"
            if verb == "retry":
                job.error_code, job.error_description, job.content = 0, "", {}
                job.completed = None
                if self.has_dir(job):
                    await self.agent.to_thread(shutil.rmtree, self.outputs_dir(job.id), True)
                job.outputs = []
        self._log(job, f"{verb}: {before.value} -> {after.value}")
        await self._persist(job, durable=True)
        self._wake()
        return after

    async def set_message(self, job_id: str, message: str) -> str:
        """Set the job's message (JobHandle.setMessage); returns the previous one. A
        running job's kind may set its own later, as it progresses."""
        job = self.get(job_id)
        previous = job.live_message()
        job.message = _clean(message)
        if job.state is State.RUNNING and job.ctx is not None:
            job.ctx.message = job.message
        job.updated = time.time()
        self._log(job, f"message set: {job.message}")
        await self._persist(job, durable=True)
        return previous

    async def set_priority(self, job_id: str, priority: int) -> None:
        job = self.get(job_id)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise BadSpec(f"priority must be an integer, got {priority!r}")
        if job.state not in (State.PENDING, State.PAUSED):
            raise IllegalMove(job_id, "reprioritise", job.state)
        job.priority = priority
        job.updated = time.time()
        self._track(job, job.state)
        await self._persist(job, durable=True)
        self._wake()

    async def cancel_if_not_started(self, job_id: str) -> bool:
        """Cancel a job that has not started running yet (uploads: the file was removed)."""
        job = self.jobs.get(job_id)
        if job is None or job.state is not State.PENDING or job.id in self._active:
            return False
        await self.control(job_id, "cancel")
        return True

    async def wait(self, job_id: str) -> State:
        """Block until the job is finished; ``ShuttingDown`` if the agent stops first."""
        job = self.get(job_id)
        shutting_down = self.agent.shutting_down
        while not job.state.final:
            if shutting_down.is_set():
                raise ShuttingDown()
            async with trio.open_nursery() as nursery:
                async def until(event, scope=nursery.cancel_scope):
                    await event.wait()
                    scope.cancel()
                nursery.start_soon(until, job.ended)
                nursery.start_soon(until, shutting_down)
        # The run stages its final record (and an import's manifest row) and flushes it
        # right after the state changes; a waiter must not see the end before that is
        # durable, or a crash could un-finish a job someone was told had finished.
        await self.db.flush()
        return job.state

    # -- drafts: mkdir jobs/NAME before its spec ------------------------------------------

    def create_draft(self, name: str, owner_uid: int | None) -> Draft:
        if name in self.jobs or name in self.drafts:
            raise JobExists(name)
        draft = Draft(name, owner_uid, time.time())
        self.drafts[name] = draft
        return draft

    def remove_draft(self, name: str) -> None:
        del self.drafts[name]

    # -- state changes and persistence ---------------------------------------------------

    def _apply(self, job: Job, verb: str) -> State:
        before = job.state
        after = next_state(job.id, verb, before)
        if after is before:
            return after
        now = time.time()
        if before is State.RUNNING and job.run_started is not None:
            ran = time.monotonic() - job.run_started
            job.runtime += ran
            job.run_started = None
            self.run_seconds.labels(job.kind, after.value).observe(ran)
            if job.ctx is not None:
                job.progress = job.ctx.progress
        job.state = after
        job.updated = now
        self._track(job, before)
        if after.final:
            job.completed = now
            job.ended.set()
            job.pack_spec()
        elif before.final:
            job.ended = trio.Event()
            job.unpack_spec()
        # The first line only: a command's error output belongs to the job's log file.
        failed = (f": error {job.error_code}: {job.error_description.splitlines()[0]}"
                  if after is State.FAILURE and job.error_description else "")
        log.info("job %s (%s): %s -> %s%s", job.id, job.kind, before.value, after.value,
                 failed)
        return after

    def _track(self, job: Job, before: State | None) -> None:
        """Keep the pending heap and the finished count in step with ``job``'s state
        (``before`` is its previous state, None for a job new to ``self.jobs``)."""
        if job.state is State.PENDING:
            heapq.heappush(self._pending, (-job.priority, job.seq, job.id))
        if job.state.final and (before is None or not before.final):
            self._finished += 1
        elif before is not None and before.final and not job.state.final:
            self._finished -= 1

    async def _persist(self, job: Job, *, durable: bool) -> None:
        if job.id not in self.jobs:
            return  # evicted meanwhile
        self._stage(job)
        if durable:
            await self.db.flush()

    def _stage(self, job: Job) -> None:
        """Stage ``job``'s row: every change of a job (state, progress, message) ends
        here once the record is whole, so this is where it is published too."""
        self.db.stage(("job", job.id), _UPSERT, job.row())
        if self._events.active:
            # Without the spec: a fileset's lists every member (hundreds of KB), and
            # a running job is republished as its runtime grows. ``Jobs.show`` has it.
            record = job.info(with_spec=False)
            self.agent.events.publish(self._events, job.id, record)

    def _log(self, job: Job, line: str) -> None:
        """A line worth keeping on disk (a control verb, a requeue, a failure)."""
        entry = self.log_of(job)
        entry.keep()
        entry(line)

    def _wake(self) -> None:
        self._wakeup.set()

    # -- the scheduler ---------------------------------------------------------------------

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tick)
            nursery.start_soon(self._stop_runs_on_shutdown)
            nursery.start_soon(self._evict_periodically)
            if self._orphan_dirs:
                orphans, self._orphan_dirs = self._orphan_dirs, []
                nursery.start_soon(self._remove_orphans, orphans)
            task_status.started()
            while True:
                self._start_ready(nursery)
                await self._wakeup.wait()
                self._wakeup = trio.Event()

    async def _stop_runs_on_shutdown(self) -> None:
        # Worker threads cannot be cancelled: the moment the agent cancels the engine,
        # tell every run's threads to stop at their next checkpoint, so shutdown does not
        # wait for a 5 GiB archive to finish.
        try:
            await trio.sleep_forever()
        finally:
            for job in self.jobs.values():
                if job.ctx is not None:
                    job.ctx.request_stop()

    def _start_ready(self, nursery: trio.Nursery) -> None:
        free = self.config.max_concurrent_jobs - len(self._active)
        if free <= 0:
            return
        while free > 0 and self._pending:
            neg_priority, _, job_id = heapq.heappop(self._pending)
            job = self.jobs.get(job_id)
            if (job is None or job.state is not State.PENDING or job.id in self._active
                    or -neg_priority != job.priority):
                continue  # stale: the job moved on or has a fresher entry
            self._active.add(job.id)
            free -= 1
            nursery.start_soon(self._run, job)

    async def _tick(self) -> None:
        """Stage the progress of running jobs (coalesced by the database flush) and
        write the job log lines waiting to be written (one worker-thread call)."""
        while True:
            interval = max(self.config.db_flush_seconds, 0.2)
            await trio.sleep(interval)
            started_before = time.monotonic() - interval
            for job in list(self.jobs.values()):
                if job.state is State.RUNNING:
                    await self._persist(job, durable=False)
                    if job.run_started is not None and job.run_started < started_before:
                        # Running for a while: its log is worth having after a crash.
                        self.log_of(job).keep()
            await self._write_logs()

    async def _write_logs(self) -> None:
        if self.logs.pending:
            await self.agent.to_thread(self.logs.write_pending)

    async def _remove_orphans(self, dirs: list[Path]) -> None:
        log.info("jobs: removing %d directories of jobs that no longer exist", len(dirs))
        await self.agent.to_thread(self.logs.remove_dirs, dirs)

    async def _run(self, job: Job) -> None:
        try:
            ended = await self._run_once(job)
        finally:
            self._active.discard(job.id)
            job.ctx = None
            self._wake()
        if ended:
            # After the slot is free: the next job starts while this end is written,
            # and the ends of jobs that finish meanwhile share its transaction.
            await self._record_end(job)

    async def _run_once(self, job: Job) -> bool:
        """One run; True if it ended (success or failure) and its end is staged."""
        kind = KINDS[job.kind]
        tmp = self.job_dir(job.id) / "outputs.tmp"
        entry = self.log_of(job)
        if entry.on_disk:
            # Only a job that may have a directory can have outputs of an earlier run.
            try:
                await self.agent.to_thread(_reset_work_dir, self.job_dir(job.id))
            except OSError as e:
                if job.state is State.PENDING:  # else paused or cancelled meanwhile
                    log.error("job %s (%s): cannot prepare %s: %s", job.id, job.kind,
                              self.job_dir(job.id), e)
                    self._apply(job, "start")
                    self._finish_failed(job, JobFailed(
                        ErrorCode.INTERNAL, f"cannot prepare the job's directory: {e}"))
                    return True
                return False
        if job.state is not State.PENDING:
            return False  # paused or cancelled before the run began

        def make_outputs_dir() -> Path:
            entry.keep(made_dir=True)  # the job has a directory now: its log too
            tmp.mkdir(parents=True, exist_ok=True)
            return tmp

        ctx = RunContext(job_id=job.id, spec=job.spec, config=self.config, db=self.db,
                         owner_uid=job.owner_uid, upload_task=self.agent.upload_task,
                         repository=getattr(self.agent, "repository", None),
                         make_outputs_dir=make_outputs_dir, log=entry,
                         to_thread=self.agent.to_thread)
        self._apply(job, "start")
        job.ctx, job.progress, job.content, job.outputs = ctx, 0, {}, []
        job.error_code, job.error_description, job.message = 0, "", "running"
        job.run_started = time.monotonic()
        self.started_count += 1
        ctx.log(f"started ({job.kind})")
        # Not durable on purpose: after a crash a job recorded "pending" is run again,
        # exactly what a recorded "running" job gets (requeued), so an fsync here would
        # buy nothing; the batched flush writes it within db_flush_seconds.
        await self._persist(job, durable=False)

        failure: JobFailed | None = None
        finished = False
        with trio.CancelScope() as scope:
            job.scope = scope
            try:
                await kind.run(ctx)
                finished = True
            except Exception as raised:
                e = _unwrap(raised)
                if isinstance(e, JobFailed):
                    failure = e
                elif not isinstance(e, Stopped):
                    log.exception("job %s (%s) raised", job.id, job.kind)
                    failure = JobFailed(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
        job.scope = None

        if job.state is not State.RUNNING:  # paused or cancelled meanwhile: drop the work
            ctx.log(f"stopped: the job is {job.state.value}")
            if ctx.has_outputs_dir:
                await self.agent.to_thread(shutil.rmtree, tmp, True)
            return False
        if failure is not None:
            if ctx.has_outputs_dir:
                await self.agent.to_thread(shutil.rmtree, tmp, True)
            job.content = ctx.content
            self._finish_failed(job, failure)
            return True
        elif finished:
            outputs: list[str] = []
            if ctx.has_outputs_dir:
                try:
                    outputs = await self.agent.to_thread(_publish, tmp,
                                                         self.outputs_dir(job.id))
                except OSError as e:
                    log.error("job %s (%s): publishing its outputs failed: %s", job.id,
                              job.kind, e)
                    await self.agent.to_thread(shutil.rmtree, tmp, True)
                    self._finish_failed(job, JobFailed(
                        ErrorCode.INTERNAL, f"cannot publish the outputs: {e}"))
                    return True
                if job.state is not State.RUNNING:  # cancelled during the publish
                    await self.agent.to_thread(shutil.rmtree, self.outputs_dir(job.id), True)
                    return False
            job.content, job.outputs = ctx.content, outputs
            job.error_code, job.error_description = 0, "Success"
            self._apply(job, "succeed")
            job.progress = 100
            job.message = _clean(ctx.message or "done")
            ctx.log(f"success: {job.message}")
            self._stage(job)
            return True
        else:
            # Stopped while still running: only the agent's shutdown does that. Leave the
            # row "running"; the next start requeues it.
            return False

    def _finish_failed(self, job: Job, failure: JobFailed) -> None:
        """running -> failure with ``failure`` as ErrorCode/ErrorDescription, staged
        (``_record_end`` makes it durable)."""
        description = _clean(failure.description)
        job.error_code, job.error_description = int(failure.code), description
        self._apply(job, "fail")
        job.message = description.splitlines()[0] if description else ""
        self._log(job, f"failure: {description}")
        self._stage(job)

    async def _record_end(self, job: Job) -> None:
        """Make a run's end (staged by the run) durable, then keep the history in bounds.

        The database failing here (the disk full or broken) must not take the agent
        down: the record stays staged, the periodic flush retries it, and the failure
        is logged. Waiters are not told the job ended before it is durable (``wait``).
        """
        try:
            await self.db.flush()
        except Exception:
            log.exception("job %s (%s): recording its end failed; kept staged for retry",
                          job.id, job.kind)
            return
        if self._finished > self.config.job_history + self.config.job_history // 100:
            # Evicting in batches (1% over the count, then back down to it) spares a
            # sort, a transaction and a directory removal for each job that ends once
            # the history is full; job_ttl is the periodic evictor's.
            await self.evict()

    # -- history ----------------------------------------------------------------------------

    async def _evict_periodically(self) -> None:
        while True:
            await self.evict()
            await trio.sleep(min(60.0, max(1.0, self.config.job_ttl / 4)))

    async def evict(self) -> int:
        """Remove finished jobs beyond ``job_history`` or older than ``job_ttl``."""
        finished = sorted((j for j in self.jobs.values() if j.state.final),
                          key=lambda j: (j.completed or 0, j.seq), reverse=True)
        cutoff = time.time() - self.config.job_ttl
        doomed = [j for i, j in enumerate(finished)
                  if i >= self.config.job_history or (j.completed or 0) < cutoff]
        if not doomed:
            return 0
        await self._remove(doomed)
        self.evicted_count += len(doomed)
        log.info("jobs: evicted %d finished jobs", len(doomed))
        return len(doomed)

    async def remove(self, job_id: str) -> None:
        """``rmdir jobs/<id>``: delete a finished job with its log and outputs now.

        A job that is not finished is ``JobNotFinished``: cancel it first, so nothing
        ever disappears while a worker thread still writes into its directory.
        """
        job = self.get(job_id)
        if not job.state.final:
            raise JobNotFinished(job_id, job.state)
        await self._remove([job])
        log.info("job %s (%s) removed", job.id, job.kind)

    async def _remove(self, jobs: list[Job]) -> None:
        # On the event loop: dictionaries and staged rows only, no system call.
        logs = []
        for job in jobs:
            del self.jobs[job.id]
            self._finished -= job.state.final
            self.db.stage(("job", job.id), _DELETE, (job.id,))
            if job.log is not None:
                logs.append(job.log)
        self.logs.forget(logs)
        try:
            await self.db.flush()
        except Exception:  # the deletes stay staged and are retried with the next flush
            log.exception("jobs: recording the removal of %d jobs failed; will retry",
                          len(jobs))
        # Only jobs that may have a directory cost a system call (in a worker thread).
        dirs = [entry.dir for entry in logs if entry.on_disk]
        if dirs:
            await self.agent.to_thread(self.logs.remove_dirs, dirs)

    async def checkpoint(self) -> None:
        for job in list(self.jobs.values()):
            if job.state is State.RUNNING:
                await self._persist(job, durable=False)
                self.log_of(job).keep()  # a stop requeues it: keep what it logged
        await self._write_logs()
        await self.db.flush()


def _unwrap(e: BaseException) -> BaseException:
    # trio wraps what escapes a nursery in an ExceptionGroup; a kind's lone error counts.
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def _reset_work_dir(job_dir: Path) -> None:
    """Before a run of a job that has a directory: no outputs from an earlier run.
    A directory that cannot be listed (EACCES, EIO) fails the run: its stale outputs
    would otherwise be published again."""
    for name in ("outputs", "outputs.tmp"):
        path = job_dir / name
        if path.exists():
            shutil.rmtree(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> list[str]:
    """Make the outputs durable, then visible with one rename."""
    names = sorted(os.listdir(tmp))
    if not names:
        # Nothing to make durable (imports, most of all): an empty outputs/ lost in a
        # crash is recreated by the next run or read as empty, so skip the fsyncs.
        os.rename(tmp, final)
        return names
    for name in names:
        fd = os.open(tmp / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    return names

