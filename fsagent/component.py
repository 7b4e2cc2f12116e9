"""The contract between the agent and its capabilities: ``Component`` and ``Host``.

Design notes
------------
* **One direction.** A capability (uploads, jobs, the RPC server, the monitor, the file
  server) is a ``Component``; the agent (``fsagent/agent.py``) builds the list of them,
  mounts what they add to the tree and runs their hooks. Components import this module
  from the core, never ``fsagent.agent``: the agent knows every component, a component
  knows only the ``Host`` it is given. That keeps the import graph a tree rooted at
  the agent (``tests/test_import_graph.py`` fails on any cycle).
* **Host is what components really use**, named here so it can be read in one place
  and faked in a unit test: the configuration, the database, the metrics registry, the
  worker threads (``to_thread``, the one way to run blocking work), the shutdown event,
  the agent's ``status()`` and component list (the RPC component serves both), and the
  two hand-offs between capabilities: ``jobs`` (uploads into the job engine) and
  ``upload_task`` (import jobs back to the upload they import), and ``events``, the
  hub where uploads and jobs publish their changes and the RPC component subscribes
  connections to them (``fsagent/events.py``). A component needing something new of
  the agent adds it here first.
* **One route into the job engine.** ``host.jobs`` is the engine's hand-off verbs
  (``JobHandOff``: submit, cancel if not started, read a job's state, move an import's
  manifest row after a rename), or None when the agent runs without a job engine;
  callers handle None.
* Every hook of ``Component`` is optional; the base class does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio

if TYPE_CHECKING:
    from .config import Config
    from .db import Database
    from .events import EventHub
    from .fs import Node
    from .service.metrics import Registry

__all__ = ["Component", "Host", "JobHandOff"]


class JobHandOff(Protocol):
    """The job engine's verbs other capabilities may call (``host.jobs``)."""

    async def submit(self, kind: str, spec: dict[str, Any], *, priority: int = 0,
                     owner_uid: int | None = None, job_id: str | None = None,
                     stage_with: Callable[[], None] | None = None) -> str:
        """Queue a job; returns its ID once the job is durable (``job_id`` picks the ID;
        default: a new UUID). Raises on a refused spec or an existing ID. ``stage_with``
        runs once the spec is valid, just before the job's row is staged with no await
        between: what it stages is durable with the job or not at all."""
        ...

    async def cancel_if_not_started(self, job_id: str) -> bool:
        """Cancel the job if it is still pending and not running; True if it was."""
        ...

    async def wait_job(self, job_id: str) -> str | None:
        """Wait until the job has ended; its final state word (None: no such job)."""
        ...

    def job_state(self, job_id: str) -> str | None:
        """The job's state word (``pending`` ... ``cancelled``), None for no such job."""
        ...

    def import_state(self, job_id: str, task: str) -> str | None:
        """Like ``job_state``, but ``skipped`` when the import ``job_id`` ended without
        importing upload ``task`` (it was changed or gone when the job ran)."""
        ...

    async def release_import(self, job_id: str, task: str) -> None:
        """Upload ``task`` leaves import ``job_id`` (removed, or other bytes now): the
        job is cancelled if it has not started and has no other file; otherwise its run
        skips the upload."""
        ...

    def import_moved(self, task: str, job_id: str, path: str) -> None:
        """Upload ``task``, imported by ``job_id``, is at ``path`` now: its repository
        manifest row follows (staged with the upload's own record)."""
        ...

    def unfinished_imports(self) -> list[tuple[str, str, dict]]:
        """(job ID, state word, spec) of imports pending, running, paused or failed:
        the repository's backlog."""
        ...


class Host(Protocol):
    """What the agent offers its components (``Component.agent``)."""

    config: Config
    db: Database  # open before any component is built, closed after the last checkpoint
    metrics: Registry  # register in __init__; see fsagent/service/metrics.py
    shutting_down: trio.Event  # set once shutdown begins (a signal, or the mount gone)
    components: Sequence[Component]  # every component, in start-up order
    # Change events: publish only while ``events.topic(name).active`` (fsagent/events.py).
    events: EventHub

    async def to_thread(self, fn: Callable, *args: Any) -> Any:
        """Run blocking work in a worker thread under the agent's capacity limit."""
        ...

    @property
    def jobs(self) -> JobHandOff | None:
        """The job engine's hand-off verbs; None if the agent has no job engine."""
        ...

    def upload_task(self, task_id: str) -> dict[str, Any] | None:
        """What the uploads component knows of upload task ``task_id`` now; None without
        an uploads component or for an unknown ID."""
        ...

    def status(self) -> dict[str, Any]:
        """What ``MOUNT/status`` shows (JSON-serialisable)."""
        ...

    @property
    def repository(self) -> Any:
        """The repository component when imports push to an object store
        (``repository.backend = "s3"``); None for the local backend. Its ``cache``
        (``fsagent/repository/_cache.py``) is what the uploads component asks about
        evicted files (read back, fetch back before a write, recovery, unlink); the
        cache reaches the uploads component through ``components``."""
        ...


class Component:
    """Base for a capability plugged into the agent. Every hook is optional."""

    name = "component"

    def __init__(self, agent: Host):
        self.agent = agent

    def root_entries(self) -> dict[bytes, Node]:
        """Top-level entries this component adds to the mounted tree."""
        return {}

    def status(self) -> dict[str, Any]:
        """This component's section of ``status`` (JSON-serialisable)."""
        return {}

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Long-running tasks; call ``task_status.started()`` once ready."""
        task_status.started()

    async def checkpoint(self) -> None:
        """Make in-flight state durable. Runs at shutdown, shielded from cancellation."""

    def rpc_methods(self) -> dict[str, Callable[..., Any]]:
        """msgpack-RPC methods this component serves: ``{"Name.op": async fn(*params)}``."""
        return {}

    def counts(self) -> dict[str, int]:
        """Live counts for systemd's one-line STATUS=, e.g. ``{"uploads receiving": 2}``.

        Called on the event loop every second (STATUS= is re-sent when the line
        changes): keep it cheap (no I/O).
        """
        return {}
