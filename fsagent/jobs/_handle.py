"""``JobHandle.*``: OMERO's JobHandle (``../shared/seeds/001_*``) over msgpack-RPC.

Design notes
------------
* **One engine, two faces.** Every method is an engine verb or a read of the job's
  record, the same ones ``jobs/<id>/`` and ``Jobs.*`` use: a job cancelled with
  ``echo cancel > control`` is cancelled for a JobHandle client too, and the other way.
* **Stateless.** OMERO's JobHandle is a stateful service (``attach`` once, then the
  other calls act on that job). Over msgpack-RPC a connection may serve many clients'
  requests at once, so every method takes the job ID first; ``attach(id)`` remains, as
  the check that the job exists (``NoSuchJob``) returning its status.
* **Status words** are the engine's (``pending``, ``running``, ``paused``, ``success``,
  ``failure``, ``cancelled``). ``setStatus`` asks for a state and returns the previous
  one: ``cancelled`` is ``cancelJob``; ``paused`` pauses; ``pending`` resumes a paused
  job or retries a failed or cancelled one; anything else (``running``, ``success``,
  ``failure``: the engine's own moves) is ``IllegalMove``, naming the job, the verb and
  the state, as the ``control`` file would answer.
* **Who may steer.** ``cancelJob``, ``setStatus``, ``setMessage`` and
  ``setStatusAndMessage`` follow the files' owner rule (the caller's uid from
  SO_PEERCRED must be the job's owner or root; ``PermissionDenied`` otherwise). Reading
  a job and its outputs is open to every RPC client, as ``jobs/`` is to every user of
  the mount (outputs are mode 0444).
* **readOutput** serves a published output (``outputs/NAME``) in blocks of at most
  ``readblock_max_bytes``, read with ``pread`` in a worker thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..rpc import RpcError, current_peer
from ._engine import BadSpec, Engine, orthanc_time
from ._states import IllegalMove, State

__all__ = ["jobhandle_methods"]

# setStatus(word) -> the engine verb that moves a job there, by the state it is in.
# A move the table refuses (pausing a finished job, say) is refused by ``control``.
_STATUS_VERBS: dict[str, dict[State, str]] = {
    "cancelled": {s: "cancel" for s in State},
    "paused": {s: "pause" for s in State},
    "pending": {State.PAUSED: "resume", State.FAILURE: "retry", State.CANCELLED: "retry"},
}


def jobhandle_methods(engine: Engine, check_owner: Callable[[str, str], None],
                      readblock_max_bytes: int) -> dict[str, Callable[..., Any]]:
    """The ``JobHandle.*`` methods (engine refusals are mapped by the caller)."""
    e = engine

    async def submit(spec: dict) -> str:
        if not isinstance(spec, dict):
            raise BadSpec("a spec is a map with \"type\" and the kind's fields")
        spec = dict(spec)
        kind = spec.pop("type", None)
        if not isinstance(kind, str):
            raise BadSpec('spec needs "type": the job kind (import, archive, verify)')
        priority = spec.pop("priority", 0)
        return await e.submit(kind, spec, priority=priority, owner_uid=current_peer().uid)

    async def attach(job_id: str) -> str:
        return e.get(job_id).state.value

    async def get_job(job_id: str) -> dict:
        return e.get(job_id).info()

    async def job_status(job_id: str) -> str:
        return e.get(job_id).state.value

    async def job_finished(job_id: str) -> str | None:
        job = e.get(job_id)
        return orthanc_time(job.completed) if job.state.final else None

    async def job_message(job_id: str) -> str:
        return e.get(job_id).live_message()

    async def job_running(job_id: str) -> bool:
        return e.get(job_id).state is State.RUNNING

    async def job_error(job_id: str) -> bool:
        return e.get(job_id).state is State.FAILURE

    async def cancel_job(job_id: str) -> str:
        check_owner(job_id, "cancel")
        return (await e.control(job_id, "cancel")).value

    async def set_status(job_id: str, status: str) -> str:
        check_owner(job_id, "set the status of")
        job = e.get(job_id)
        before = job.state
        if not isinstance(status, str):
            raise BadSpec(f"a status is a string, got {type(status).__name__}")
        word = status.lower()
        if word == before.value:
            return before.value  # already there: nothing to do, as the files do
        verbs = _STATUS_VERBS.get(word)
        if verbs is None or before not in verbs:
            raise IllegalMove(job_id, f"set status {status!r} on", before)
        await e.control(job_id, verbs[before])
        return before.value

    async def set_message(job_id: str, message: str) -> str:
        check_owner(job_id, "set the message of")
        if not isinstance(message, str):
            raise BadSpec(f"a message is a string, got {type(message).__name__}")
        return await e.set_message(job_id, message)

    async def set_status_and_message(job_id: str, status: str, message: str) -> str:
        previous = await set_status(job_id, status)
        await set_message(job_id, message)
        return previous

    async def read_output(job_id: str, name: str, offset: int, size: int) -> bytes:
        job = e.get(job_id)
        if job.state is not State.SUCCESS or name not in job.outputs:
            raise RpcError("NoSuchOutput", f"job {job_id!r} has no output {name!r}"
                           + ("" if job.state is State.SUCCESS else
                              f" (it is {job.state.value}; outputs appear on success)"))
        for what, value in (("offset", offset), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RpcError("BadArgument", f"{what} must be a non-negative integer, "
                               f"got {value!r}")
        if size > readblock_max_bytes:
            raise RpcError("BadArgument", f"size {size} is over readblock_max_bytes "
                           f"({readblock_max_bytes})")
        path = e.outputs_dir(job_id) / name
        return await e.agent.to_thread(_pread, path, offset, size)

    return {
        "JobHandle.submit": submit, "JobHandle.attach": attach,
        "JobHandle.getJob": get_job, "JobHandle.jobStatus": job_status,
        "JobHandle.jobFinished": job_finished, "JobHandle.jobMessage": job_message,
        "JobHandle.jobRunning": job_running, "JobHandle.jobError": job_error,
        "JobHandle.cancelJob": cancel_job, "JobHandle.setStatus": set_status,
        "JobHandle.setMessage": set_message,
        "JobHandle.setStatusAndMessage": set_status_and_message,
        "JobHandle.readOutput": read_output,
    }


def _pread(path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)
