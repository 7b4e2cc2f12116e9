"""The ``jobs`` component (``JobsComponent``): the engine behind ``MOUNT/jobs/``, its RPC
methods and the hand-off verbs the uploads component calls. Public through
``fsagent.jobs``."""

from __future__ import annotations

import functools
import os
from typing import Any

import trio

from ..component import Component, Host
from ..fs import Node
from ..rpc import RpcError, current_peer
from . import _archive, _import, _verify  # noqa: F401  (each registers its kind)
from ._engine import (
    BadSpec, Engine, JobExists, JobNotFinished, NoSuchJob, ShuttingDown, valid_job_name,
)
from ._handle import jobhandle_methods
from ._import import import_tasks, stage_manifest_move
from ._kinds import KINDS
from ._nodes import JobsDirectory, JobsJson
from ._states import IllegalMove, State, UnknownVerb

__all__ = ["JobsComponent", "KINDS", "BadSpec", "NoSuchJob", "JobExists", "JobNotFinished",
           "ShuttingDown"]


class JobsComponent(Component):
    name = "jobs"

    def __init__(self, agent: Host):
        super().__init__(agent)
        self.engine = Engine(agent)
        self.engine.load()

    # -- the hand-off contract with uploads ----------------------------------------------

    async def submit(self, kind: str, spec: dict[str, Any], *, priority: int = 0,
                     owner_uid: int | None = None, job_id: str | None = None,
                     stage_with=None) -> str:
        return await self.engine.submit(kind, spec, priority=priority, owner_uid=owner_uid,
                                        job_id=job_id, stage_with=stage_with)

    async def cancel_if_not_started(self, job_id: str) -> bool:
        return await self.engine.cancel_if_not_started(job_id)

    def import_moved(self, task: str, job_id: str, path: str) -> None:
        """Upload ``task``, imported by ``job_id``, is at ``path`` now: its manifest row
        follows (staged with the upload's own record)."""
        stage_manifest_move(self.agent.db, task, job_id, path)

    async def wait_job(self, job_id: str) -> str | None:
        """Wait until the job has ended; its final state word, None if there is no such
        job. A shutdown ends the wait with ``ShuttingDown``."""
        try:
            return (await self.engine.wait(job_id)).value
        except NoSuchJob:
            return None

    def job_state(self, job_id: str) -> str | None:
        """The job's state word (``pending`` ... ``cancelled``), None if there is no such
        job (never submitted, or evicted from the history)."""
        job = self.engine.jobs.get(job_id)
        return None if job is None else job.state.value

    def import_state(self, job_id: str, task: str) -> str | None:
        """The job's state word, or ``skipped`` if it succeeded without importing upload
        ``task`` (see ``_import.py``); None if there is no such job."""
        job = self.engine.jobs.get(job_id)
        if job is None:
            return None
        if job.state is State.SUCCESS and task in job.content.get("Skipped", ()):
            return "skipped"
        return job.state.value

    def unfinished_imports(self) -> list[tuple[str, str, dict]]:
        """(job ID, state word, spec) of every import not ended in success or
        cancelled: what the repository still has to push (``failure``: after a retry)."""
        return [(j.id, j.state.value, j.spec) for j in self.engine.jobs.values()
                if j.kind == "import" and j.state.value in (
                    "pending", "running", "paused", "failure")]

    async def release_import(self, job_id: str, task: str) -> None:
        """Upload ``task`` leaves import ``job_id``: a job that has not started and
        imports nothing else is cancelled; any other skips the upload when it runs."""
        job = self.engine.jobs.get(job_id)
        # Only a pending job can be cancelled for it; a finished one's spec is packed
        # (``Job.stored_spec``), not worth unpacking for every upload removed after it.
        if job is None or job.kind != "import" or job.state is not State.PENDING:
            return
        if import_tasks(job.spec) <= {task}:
            await self.engine.cancel_if_not_started(job_id)

    # -- component hooks -------------------------------------------------------------------

    def root_entries(self) -> dict[bytes, Node]:
        return {b"jobs": JobsDirectory(self.engine),
                b"jobs.json": JobsJson(self.engine)}

    def status(self) -> dict[str, Any]:
        return {"counts": self.engine.counts(), "runs_started": self.engine.started_count,
                "evicted": self.engine.evicted_count,
                "max_concurrent_jobs": self.agent.config.max_concurrent_jobs}

    def counts(self) -> dict[str, int]:
        counts = self.engine.counts()
        return {"jobs running": counts["running"], "jobs pending": counts["pending"]}

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.engine.serve(task_status=task_status)

    async def checkpoint(self) -> None:
        await self.engine.checkpoint()

    def rpc_methods(self):
        """``Jobs.*`` and ``JobHandle.*`` (``_handle.py``): each is one engine verb;
        refusals travel as ``[name, message]``.

        The caller's uid (SO_PEERCRED on the Unix socket) owns the jobs it submits, and
        only a job's owner and root may steer it, as with the files. A TCP client proved
        it holds ``rpc_token``, the administrator's credential, and may steer any job.
        """
        e = self.engine

        def check_owner(job_id: str, verb: str) -> None:
            uid = current_peer().uid
            owner = e.get(job_id).owner_uid
            owner = os.getuid() if owner is None else owner
            if uid is not None and uid not in (0, owner):
                raise RpcError("PermissionDenied", f"job {job_id!r} belongs to uid {owner}; "
                               f"only its owner and root may {verb} it")

        async def show(job_id: str) -> dict:
            return e.get(job_id).info()

        async def listing() -> list[dict]:
            return [j.info() for j in e.listing()]

        async def submit(kind: str, spec: dict, priority: int = 0,
                         job_id: str | None = None) -> str:
            if job_id is not None and not valid_job_name(job_id):
                raise BadSpec(f"{job_id!r} is not a job name (letters, digits, . _ -)")
            return await e.submit(kind, spec, priority=priority, job_id=job_id,
                                  owner_uid=current_peer().uid)

        def verb(name: str):
            async def control(job_id: str) -> str:
                check_owner(job_id, name)
                return (await e.control(job_id, name)).value
            return control

        async def wait(job_id: str) -> str:
            return (await e.wait(job_id)).value

        async def remove(job_id: str) -> None:
            check_owner(job_id, "remove")
            await e.remove(job_id)

        async def set_priority(job_id: str, priority: int) -> None:
            check_owner(job_id, "reprioritise")
            await e.set_priority(job_id, priority)

        methods = {
            **jobhandle_methods(e, check_owner, self.agent.config.readblock_max_bytes),
            "Jobs.list": listing, "Jobs.show": show, "Jobs.submit": submit,
            "Jobs.cancel": verb("cancel"), "Jobs.pause": verb("pause"),
            "Jobs.resume": verb("resume"), "Jobs.retry": verb("retry"),
            "Jobs.wait": wait, "Jobs.set_priority": set_priority, "Jobs.remove": remove,
        }
        return {name: _named_errors(fn) for name, fn in methods.items()}


_REFUSALS = (BadSpec, NoSuchJob, JobExists, JobNotFinished, IllegalMove, UnknownVerb,
             ShuttingDown)


def _named_errors(fn):
    """Engine refusals as ``RpcError(class name, message)``: ``["IllegalMove", "job ..."]``."""

    @functools.wraps(fn)
    async def method(*params):
        try:
            return await fn(*params)
        except _REFUSALS as e:
            raise RpcError(type(e).__name__, str(e)) from None

    return method
