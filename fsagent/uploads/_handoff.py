"""The hand-off: the one route from uploads into the job engine.

Design notes
------------
* **One route.** Submitting an import, cancelling one, asking a job's state and
  moving a manifest row after a rename all go through ``ImportHandOff``, which reaches
  the engine through the host's one route (``host.jobs``, ``fsagent/component.py``).
  Nothing else in ``uploads/`` talks to jobs.
* **Submit**: ``host.jobs.submit("import", {"task", "path", "size", "sha256",
  "mtime_ns"}, job_id=...)`` with an ID picked and staged on the task first, with no
  await until the engine stages the job's own row: the database takes writes staged
  together into one transaction (``fsagent/db.py``), so the job and the task's record
  of it are durable together or not at all. A crash can never leave a job the upload
  forgot (imported twice after the restart) nor a job ID that does not exist (never
  imported). A submit that fails, or is cancelled by a shutdown, takes the ID back.
* **Retry**: without a job engine, or when it refuses (its database cannot be written,
  say), the task stays complete with no job and its ``error`` says why and when the
  next try is; tries back off from ``IMPORT_RETRY_FIRST_SECONDS`` doubling up to
  ``IMPORT_RETRY_MAX_SECONDS`` (a refusal that will not go away must not fill the log
  every few seconds forever), and every complete task without a job is handed off at
  start-up. A successful hand-off clears the error.
* **One version, one import**: ``job_state`` lets completion tell whether a version
  that comes back complete with the same bytes still has its import (see
  ``_completion.py``); an import whose version is gone is cancelled if not started.
"""

from __future__ import annotations

import logging
import uuid

import trio

from ..component import Host
from ..longpaths import BackingTree
from ._store import TaskTable
from ._task import State, Task

__all__ = ["ImportHandOff", "IMPORT_RETRY_FIRST_SECONDS", "IMPORT_RETRY_MAX_SECONDS"]

# The pipeline logs under the component's name, as before the stages were split out:
# operators grep and alert on these lines ("upload complete: ...").
log = logging.getLogger("fsagent.uploads._component")

IMPORT_RETRY_FIRST_SECONDS = 2.0
IMPORT_RETRY_MAX_SECONDS = 600.0


class ImportHandOff:
    def __init__(self, agent: Host, tasks: TaskTable, paths: BackingTree):
        self._agent = agent
        self._tasks = tasks
        self._paths = paths
        self._importing: set[str] = set()
        # task_id -> (trio time of the next attempt, the delay that led to it, the task)
        self._retry: dict[str, tuple[float, float, Task]] = {}
        self._retry_changed = trio.Event()

    def _jobs(self):
        return self._agent.jobs

    def job_state(self, job: str) -> str | None:
        """The job's state word; None without a job engine or for a job it does not
        have (never submitted, or evicted from its history long after it ended)."""
        jobs = self._jobs()
        return None if jobs is None else jobs.job_state(job)

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
        jobs = self._jobs()
        if t.job is not None and jobs is not None:
            jobs.import_moved(t.task_id, t.job, t.path)

    async def cancel(self, job: str) -> None:
        """Cancel an import that has not started (its upload was removed or rewritten)."""
        jobs = self._jobs()
        if jobs is None:
            return
        try:
            await jobs.cancel_if_not_started(job)
        except Exception:
            log.exception("cancelling import job %s failed", job)

    async def submit(self, t: Task) -> None:
        """Hand complete upload ``t`` to the job engine (see the design notes)."""
        if t.job or t.task_id in self._importing or t.state is not State.COMPLETE:
            return
        if self._jobs() is None:
            self._failed(t, "there is no job engine")
            return
        self._importing.add(t.task_id)
        job = str(uuid.uuid4())
        error_before = t.error
        t.job, t.job_sha256, t.error = job, t.computed["sha256"], None
        # No await from here to the engine staging the job's row (see the design notes).
        self._tasks.save(t)
        try:
            st = self._paths.lstat(t.rel)
            spec = {"task": t.task_id, "path": t.path, "size": t.present,
                    "sha256": t.computed["sha256"], "mtime_ns": st.st_mtime_ns}
            # The import belongs to whoever owns the file: they may cancel or re-prioritise it.
            await self._jobs().submit("import", spec, owner_uid=st.st_uid, job_id=job)
        except BaseException as e:
            # Not submitted (refused, failed, or cancelled by a shutdown): the task must
            # not name a job that does not exist, or the version would never be imported.
            t.job, t.job_sha256, t.error = None, None, error_before
            self._tasks.save(t)
            if not isinstance(e, Exception):
                raise
            if t.task_id not in self._retry:
                log.exception("handing %s to the job engine failed", t.path)
            self._failed(t, f"{type(e).__name__}: {e}")
            return
        finally:
            self._importing.discard(t.task_id)
        if t.ended:
            await self.cancel(job)
            return
        if self._retry.pop(t.task_id, None) is not None:
            log.info("upload %s handed to the job engine after earlier failures", t.path)

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
            for task_id, (at, _, t) in list(self._retry.items()):
                if at > now:
                    continue
                if t.ended or t.job or t.state is not State.COMPLETE:
                    del self._retry[task_id]  # gone, re-written, or handed off
                    continue
                await self.submit(t)
